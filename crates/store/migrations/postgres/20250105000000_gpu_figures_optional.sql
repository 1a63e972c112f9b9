-- GPU figures NVML may not give (utilisation on a MIG-enabled GPU; anything
-- of a GPU fallen off the bus or a sample past its deadline) are NULL, never
-- 0. Keep in step with migrations/sqlite.
-- Raw and staging tables: util_pct, temp_c, power_w, power_limit_w become
-- nullable. Rollups: their means and maxima become nullable and gain
-- `<x>_n` (samples that had a value), as for the engine's optional figures;
-- rows rolled up before this migration had every value, so `<x>_n` = n.

ALTER TABLE gpu_samples
    ALTER COLUMN util_pct DROP NOT NULL,
    ALTER COLUMN temp_c DROP NOT NULL,
    ALTER COLUMN power_w DROP NOT NULL,
    ALTER COLUMN power_limit_w DROP NOT NULL;

ALTER TABLE gpu_samples_staging
    ALTER COLUMN util_pct DROP NOT NULL,
    ALTER COLUMN temp_c DROP NOT NULL,
    ALTER COLUMN power_w DROP NOT NULL,
    ALTER COLUMN power_limit_w DROP NOT NULL;

ALTER TABLE gpu_samples_1m
    ALTER COLUMN util_avg DROP NOT NULL,
    ALTER COLUMN util_max DROP NOT NULL,
    ALTER COLUMN temp_avg DROP NOT NULL,
    ALTER COLUMN temp_max DROP NOT NULL,
    ALTER COLUMN power_avg DROP NOT NULL,
    ALTER COLUMN power_max DROP NOT NULL,
    ALTER COLUMN power_limit DROP NOT NULL,
    ADD COLUMN util_n BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN temp_n BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN power_n BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN power_limit_n BIGINT NOT NULL DEFAULT 0;
UPDATE gpu_samples_1m SET util_n = n, temp_n = n, power_n = n, power_limit_n = n;
ALTER TABLE gpu_samples_1m
    ALTER COLUMN util_n DROP DEFAULT,
    ALTER COLUMN temp_n DROP DEFAULT,
    ALTER COLUMN power_n DROP DEFAULT,
    ALTER COLUMN power_limit_n DROP DEFAULT;

ALTER TABLE gpu_samples_1h
    ALTER COLUMN util_avg DROP NOT NULL,
    ALTER COLUMN util_max DROP NOT NULL,
    ALTER COLUMN temp_avg DROP NOT NULL,
    ALTER COLUMN temp_max DROP NOT NULL,
    ALTER COLUMN power_avg DROP NOT NULL,
    ALTER COLUMN power_max DROP NOT NULL,
    ALTER COLUMN power_limit DROP NOT NULL,
    ADD COLUMN util_n BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN temp_n BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN power_n BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN power_limit_n BIGINT NOT NULL DEFAULT 0;
UPDATE gpu_samples_1h SET util_n = n, temp_n = n, power_n = n, power_limit_n = n;
ALTER TABLE gpu_samples_1h
    ALTER COLUMN util_n DROP DEFAULT,
    ALTER COLUMN temp_n DROP DEFAULT,
    ALTER COLUMN power_n DROP DEFAULT,
    ALTER COLUMN power_limit_n DROP DEFAULT;
