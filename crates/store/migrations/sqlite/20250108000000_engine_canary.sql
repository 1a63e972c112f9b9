-- The engine canary of the instance's latest applied heartbeat (JSON of
-- gpufleet_proto::CanarySample), written with the other heartbeat columns:
-- Health turns a ready instance whose canary fails unhealthy. NULL: the
-- latest heartbeat carried none (canary off, engine not ready, older agent).
-- Keep in step with migrations/postgres.
ALTER TABLE instances ADD COLUMN engine_canary TEXT;
