-- Metric history: the engine gauges, 1-minute and 1-hour rollups, and the
-- rollup watermarks. Keep in step with migrations/sqlite.
-- Rollup conventions: `bucket` is the bucket start in Unix ms; `n` the
-- samples aggregated; `<x>_avg` a mean, `<x>_max` a maximum, a bare column a
-- capacity (the maximum seen: totals and limits); `<x>_n` how many samples
-- had a value for a figure that may be absent (its mean is over those only).
-- Rows combine exactly: a count-weighted mean of means, a max of maxes.

ALTER TABLE samples ADD COLUMN kv_cache_usage DOUBLE PRECISION;
ALTER TABLE samples ADD COLUMN prompt_tokens_per_s DOUBLE PRECISION;
ALTER TABLE samples ADD COLUMN generation_tokens_per_s DOUBLE PRECISION;
ALTER TABLE samples ADD COLUMN ttft_mean_s DOUBLE PRECISION;

-- Rollups and retention scan all instances by time.
CREATE INDEX samples_by_at ON samples (at);
CREATE INDEX gpu_samples_by_at ON gpu_samples (at);

CREATE TABLE samples_1m (
    instance_id           TEXT NOT NULL,
    bucket                BIGINT NOT NULL,
    n                     BIGINT NOT NULL,
    cpu_pct_avg           DOUBLE PRECISION NOT NULL,
    cpu_pct_max           DOUBLE PRECISION NOT NULL,
    load1_avg             DOUBLE PRECISION NOT NULL,
    mem_used_avg          DOUBLE PRECISION NOT NULL,
    mem_total             DOUBLE PRECISION NOT NULL,
    disk_used_avg         DOUBLE PRECISION NOT NULL,
    disk_total            DOUBLE PRECISION NOT NULL,
    net_rx_avg            DOUBLE PRECISION NOT NULL,
    net_tx_avg            DOUBLE PRECISION NOT NULL,
    running_avg           DOUBLE PRECISION NOT NULL,
    waiting_avg           DOUBLE PRECISION NOT NULL,
    kv_cache_n            BIGINT NOT NULL,
    kv_cache_avg          DOUBLE PRECISION,
    kv_cache_max          DOUBLE PRECISION,
    prompt_tps_n          BIGINT NOT NULL,
    prompt_tps_avg        DOUBLE PRECISION,
    gen_tps_n             BIGINT NOT NULL,
    gen_tps_avg           DOUBLE PRECISION,
    ttft_n                BIGINT NOT NULL,
    ttft_avg              DOUBLE PRECISION,
    ttft_max              DOUBLE PRECISION,
    PRIMARY KEY (instance_id, bucket)
);
CREATE INDEX samples_1m_by_bucket ON samples_1m (bucket);

CREATE TABLE samples_1h (
    instance_id           TEXT NOT NULL,
    bucket                BIGINT NOT NULL,
    n                     BIGINT NOT NULL,
    cpu_pct_avg           DOUBLE PRECISION NOT NULL,
    cpu_pct_max           DOUBLE PRECISION NOT NULL,
    load1_avg             DOUBLE PRECISION NOT NULL,
    mem_used_avg          DOUBLE PRECISION NOT NULL,
    mem_total             DOUBLE PRECISION NOT NULL,
    disk_used_avg         DOUBLE PRECISION NOT NULL,
    disk_total            DOUBLE PRECISION NOT NULL,
    net_rx_avg            DOUBLE PRECISION NOT NULL,
    net_tx_avg            DOUBLE PRECISION NOT NULL,
    running_avg           DOUBLE PRECISION NOT NULL,
    waiting_avg           DOUBLE PRECISION NOT NULL,
    kv_cache_n            BIGINT NOT NULL,
    kv_cache_avg          DOUBLE PRECISION,
    kv_cache_max          DOUBLE PRECISION,
    prompt_tps_n          BIGINT NOT NULL,
    prompt_tps_avg        DOUBLE PRECISION,
    gen_tps_n             BIGINT NOT NULL,
    gen_tps_avg           DOUBLE PRECISION,
    ttft_n                BIGINT NOT NULL,
    ttft_avg              DOUBLE PRECISION,
    ttft_max              DOUBLE PRECISION,
    PRIMARY KEY (instance_id, bucket)
);
CREATE INDEX samples_1h_by_bucket ON samples_1h (bucket);

CREATE TABLE gpu_samples_1m (
    instance_id    TEXT NOT NULL,
    bucket         BIGINT NOT NULL,
    gpu_index      BIGINT NOT NULL,
    n              BIGINT NOT NULL,
    util_avg       DOUBLE PRECISION NOT NULL,
    util_max       DOUBLE PRECISION NOT NULL,
    mem_used_avg   DOUBLE PRECISION NOT NULL,
    mem_used_max   DOUBLE PRECISION NOT NULL,
    mem_total      DOUBLE PRECISION NOT NULL,
    temp_avg       DOUBLE PRECISION NOT NULL,
    temp_max       DOUBLE PRECISION NOT NULL,
    power_avg      DOUBLE PRECISION NOT NULL,
    power_max      DOUBLE PRECISION NOT NULL,
    power_limit    DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (instance_id, bucket, gpu_index)
);
CREATE INDEX gpu_samples_1m_by_bucket ON gpu_samples_1m (bucket);

CREATE TABLE gpu_samples_1h (
    instance_id    TEXT NOT NULL,
    bucket         BIGINT NOT NULL,
    gpu_index      BIGINT NOT NULL,
    n              BIGINT NOT NULL,
    util_avg       DOUBLE PRECISION NOT NULL,
    util_max       DOUBLE PRECISION NOT NULL,
    mem_used_avg   DOUBLE PRECISION NOT NULL,
    mem_used_max   DOUBLE PRECISION NOT NULL,
    mem_total      DOUBLE PRECISION NOT NULL,
    temp_avg       DOUBLE PRECISION NOT NULL,
    temp_max       DOUBLE PRECISION NOT NULL,
    power_avg      DOUBLE PRECISION NOT NULL,
    power_max      DOUBLE PRECISION NOT NULL,
    power_limit    DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (instance_id, bucket, gpu_index)
);
CREATE INDEX gpu_samples_1h_by_bucket ON gpu_samples_1h (bucket);

-- Per rollup tier ('minute', 'hour'): every bucket that starts before
-- `up_to` (Unix ms, a bucket boundary) has been rolled up.
CREATE TABLE rollup_watermarks (
    tier   TEXT NOT NULL PRIMARY KEY,
    up_to  BIGINT NOT NULL
);
