-- Several control-plane replicas on one database.
-- Keep in step with migrations/sqlite.

-- Leases: background work (a reconciler) runs on the replica that holds its
-- lease. `token` grows whenever the lease changes hands (or its holder lets
-- it lapse): writes made under a lease check it (a fencing token), so a
-- replica that lost its lease while stalled writes nothing.
CREATE TABLE leases (
    name        TEXT NOT NULL PRIMARY KEY,
    holder      TEXT NOT NULL,
    token       BIGINT NOT NULL,
    -- Milliseconds since the epoch, on the database's clock.
    expires_at  BIGINT NOT NULL
);

-- Instance changes reach every replica: each lifecycle write (a new
-- generation) notifies `gpufleet_instances` with "<id> <generation>", sent
-- at commit. Heartbeat columns do not bump the generation and notify nothing.
CREATE FUNCTION gpufleet_notify_instance() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('gpufleet_instances', NEW.id || ' ' || NEW.generation);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER instances_notify_insert AFTER INSERT ON instances
    FOR EACH ROW EXECUTE FUNCTION gpufleet_notify_instance();
CREATE TRIGGER instances_notify_update AFTER UPDATE ON instances
    FOR EACH ROW WHEN (OLD.generation IS DISTINCT FROM NEW.generation)
    EXECUTE FUNCTION gpufleet_notify_instance();

-- API key changes (a revocation) notify `gpufleet_api_keys` with the key's
-- digest, so every replica's router forgets what it cached for it.
CREATE FUNCTION gpufleet_notify_api_key() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('gpufleet_api_keys', OLD.key_hash);
    ELSE
        PERFORM pg_notify('gpufleet_api_keys', NEW.key_hash);
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER api_keys_notify AFTER UPDATE OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION gpufleet_notify_api_key();

-- The catch-up read after a lost notification connection.
CREATE INDEX instances_updated_at ON instances (updated_at);

-- A bootstrap secret works until the agent's first heartbeat (not only
-- once): a registration whose answer was lost (the replica died after the
-- commit) is retried with the same secret, gets a new token, and the
-- earlier token is revoked. When it was last used:
ALTER TABLE instances ADD COLUMN bootstrap_used_at BIGINT;
