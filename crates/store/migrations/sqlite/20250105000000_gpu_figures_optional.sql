-- GPU figures NVML may not give (utilisation on a MIG-enabled GPU; anything
-- of a GPU fallen off the bus or a sample past its deadline) are NULL, never
-- 0. Keep in step with migrations/postgres.
-- Raw and staging tables: util_pct, temp_c, power_w, power_limit_w become
-- nullable. Rollups: their means and maxima become nullable and gain
-- `<x>_n` (samples that had a value), as for the engine's optional figures;
-- rows rolled up before this migration had every value, so `<x>_n` = n.
-- SQLite cannot drop NOT NULL in place: each table is rebuilt.

CREATE TABLE gpu_samples_new (
    instance_id    TEXT NOT NULL,
    seq            BIGINT NOT NULL,
    at             BIGINT NOT NULL,
    gpu_index      BIGINT NOT NULL,
    name           TEXT NOT NULL,
    uuid           TEXT,
    util_pct       DOUBLE PRECISION,
    mem_used_mib   BIGINT NOT NULL,
    mem_total_mib  BIGINT NOT NULL,
    temp_c         DOUBLE PRECISION,
    power_w        DOUBLE PRECISION,
    power_limit_w  DOUBLE PRECISION,
    PRIMARY KEY (instance_id, seq, gpu_index),
    FOREIGN KEY (instance_id, seq) REFERENCES samples (instance_id, seq) ON DELETE CASCADE
);
INSERT INTO gpu_samples_new SELECT instance_id, seq, at, gpu_index, name, uuid, util_pct,
    mem_used_mib, mem_total_mib, temp_c, power_w, power_limit_w FROM gpu_samples;
DROP TABLE gpu_samples;
ALTER TABLE gpu_samples_new RENAME TO gpu_samples;
CREATE INDEX gpu_samples_by_instance_at ON gpu_samples (instance_id, at);
CREATE INDEX gpu_samples_by_at ON gpu_samples (at);

CREATE TABLE gpu_samples_staging_new (
    part           BIGINT NOT NULL,
    instance_id    TEXT NOT NULL,
    seq            BIGINT NOT NULL,
    at             BIGINT NOT NULL,
    gpu_index      BIGINT NOT NULL,
    name           TEXT NOT NULL,
    uuid           TEXT,
    util_pct       DOUBLE PRECISION,
    mem_used_mib   BIGINT NOT NULL,
    mem_total_mib  BIGINT NOT NULL,
    temp_c         DOUBLE PRECISION,
    power_w        DOUBLE PRECISION,
    power_limit_w  DOUBLE PRECISION,
    PRIMARY KEY (part, at, instance_id, seq, gpu_index)
) WITHOUT ROWID;
INSERT INTO gpu_samples_staging_new SELECT part, instance_id, seq, at, gpu_index, name, uuid,
    util_pct, mem_used_mib, mem_total_mib, temp_c, power_w, power_limit_w FROM gpu_samples_staging;
DROP TABLE gpu_samples_staging;
ALTER TABLE gpu_samples_staging_new RENAME TO gpu_samples_staging;

CREATE TABLE gpu_samples_1m_new (
    instance_id    TEXT NOT NULL,
    bucket         BIGINT NOT NULL,
    gpu_index      BIGINT NOT NULL,
    n              BIGINT NOT NULL,
    util_n         BIGINT NOT NULL,
    util_avg       DOUBLE PRECISION,
    util_max       DOUBLE PRECISION,
    mem_used_avg   DOUBLE PRECISION NOT NULL,
    mem_used_max   DOUBLE PRECISION NOT NULL,
    mem_total      DOUBLE PRECISION NOT NULL,
    temp_n         BIGINT NOT NULL,
    temp_avg       DOUBLE PRECISION,
    temp_max       DOUBLE PRECISION,
    power_n        BIGINT NOT NULL,
    power_avg      DOUBLE PRECISION,
    power_max      DOUBLE PRECISION,
    power_limit_n  BIGINT NOT NULL,
    power_limit    DOUBLE PRECISION,
    PRIMARY KEY (instance_id, bucket, gpu_index)
);
INSERT INTO gpu_samples_1m_new SELECT instance_id, bucket, gpu_index, n, n, util_avg, util_max,
    mem_used_avg, mem_used_max, mem_total, n, temp_avg, temp_max, n, power_avg, power_max,
    n, power_limit FROM gpu_samples_1m;
DROP TABLE gpu_samples_1m;
ALTER TABLE gpu_samples_1m_new RENAME TO gpu_samples_1m;
CREATE INDEX gpu_samples_1m_by_bucket ON gpu_samples_1m (bucket);

CREATE TABLE gpu_samples_1h_new (
    instance_id    TEXT NOT NULL,
    bucket         BIGINT NOT NULL,
    gpu_index      BIGINT NOT NULL,
    n              BIGINT NOT NULL,
    util_n         BIGINT NOT NULL,
    util_avg       DOUBLE PRECISION,
    util_max       DOUBLE PRECISION,
    mem_used_avg   DOUBLE PRECISION NOT NULL,
    mem_used_max   DOUBLE PRECISION NOT NULL,
    mem_total      DOUBLE PRECISION NOT NULL,
    temp_n         BIGINT NOT NULL,
    temp_avg       DOUBLE PRECISION,
    temp_max       DOUBLE PRECISION,
    power_n        BIGINT NOT NULL,
    power_avg      DOUBLE PRECISION,
    power_max      DOUBLE PRECISION,
    power_limit_n  BIGINT NOT NULL,
    power_limit    DOUBLE PRECISION,
    PRIMARY KEY (instance_id, bucket, gpu_index)
);
INSERT INTO gpu_samples_1h_new SELECT instance_id, bucket, gpu_index, n, n, util_avg, util_max,
    mem_used_avg, mem_used_max, mem_total, n, temp_avg, temp_max, n, power_avg, power_max,
    n, power_limit FROM gpu_samples_1h;
DROP TABLE gpu_samples_1h;
ALTER TABLE gpu_samples_1h_new RENAME TO gpu_samples_1h;
CREATE INDEX gpu_samples_1h_by_bucket ON gpu_samples_1h (bucket);
