-- When a request last wanted a deployment's model (routers write it at each
-- usage flush, and at once when a request arrives with no ready replica):
-- what scale to zero measures idleness by and what wakes a deployment at
-- zero. Not part of the compare-and-swap writes (no generation bump).
ALTER TABLE deployments ADD COLUMN demand_at BIGINT;
