-- The engine's TLS certificate, as the agent of a cloud instance reports it
-- (`POST /internal/v1/agent/engine-cert`): the router trusts it alone when it
-- connects to that engine over mutual TLS. NULL: not reported (yet), or a
-- machine on this host whose engine speaks plain HTTP on loopback.
-- Keep in step with migrations/sqlite.
ALTER TABLE instances ADD COLUMN engine_cert_pem TEXT;
