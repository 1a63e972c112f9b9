-- The router's per-instance routing events, added up like the usage counts:
-- requests that stalled before their first token, circuits opened
-- (ejections), hedged copies sent, and streams continued elsewhere.
ALTER TABLE usage_counters ADD COLUMN stalls BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_counters ADD COLUMN ejections BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_counters ADD COLUMN hedges BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_counters ADD COLUMN failovers BIGINT NOT NULL DEFAULT 0;
