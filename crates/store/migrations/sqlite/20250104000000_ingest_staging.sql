-- Ingestion staging: heartbeats land here first, then move to `samples` /
-- `gpu_samples` in bulk (`Store::compact_staging`). Keep in step with the
-- other engine's directory.
--
-- Why: `samples` and `gpu_samples` are indexed by instance, so a batch of
-- heartbeats from N instances touches N pages of each such index; moving
-- many batches at once, sorted by instance, touches each page once.
-- Readers of raw samples read both tables (see `store::staging`).
-- Same columns as `samples` / `gpu_samples`, plus `part`: a hash of the
-- instance id into 32 partitions. The key (part, at, ...) keeps each
-- partition's rows together in arrival order, so a batch appends to 32
-- pages, one partition moves at a time (a short write lock), and reading
-- one instance's staged rows scans one partition. (instance_id, seq) is
-- unique already: the seq guard on `instances.last_heartbeat_seq`.

CREATE TABLE samples_staging (
    part                     BIGINT NOT NULL,
    instance_id              TEXT NOT NULL,
    seq                      BIGINT NOT NULL,
    at                       BIGINT NOT NULL,
    sent_at                  BIGINT NOT NULL,
    cpu_pct                  DOUBLE PRECISION NOT NULL,
    load1                    DOUBLE PRECISION NOT NULL,
    load5                    DOUBLE PRECISION NOT NULL,
    load15                   DOUBLE PRECISION NOT NULL,
    mem_used_bytes           BIGINT NOT NULL,
    mem_total_bytes          BIGINT NOT NULL,
    disk_used_bytes          BIGINT NOT NULL,
    disk_total_bytes         BIGINT NOT NULL,
    net_rx_bps               DOUBLE PRECISION NOT NULL,
    net_tx_bps               DOUBLE PRECISION NOT NULL,
    gpu_source               TEXT NOT NULL,
    engine_status            TEXT NOT NULL,
    requests_running         DOUBLE PRECISION NOT NULL,
    requests_waiting         DOUBLE PRECISION NOT NULL,
    engine_restarts          BIGINT NOT NULL,
    kv_cache_usage           DOUBLE PRECISION,
    prompt_tokens_per_s      DOUBLE PRECISION,
    generation_tokens_per_s  DOUBLE PRECISION,
    ttft_mean_s              DOUBLE PRECISION,
    PRIMARY KEY (part, at, instance_id, seq)
) WITHOUT ROWID;

CREATE TABLE gpu_samples_staging (
    part           BIGINT NOT NULL,
    instance_id    TEXT NOT NULL,
    seq            BIGINT NOT NULL,
    at             BIGINT NOT NULL,
    gpu_index      BIGINT NOT NULL,
    name           TEXT NOT NULL,
    uuid           TEXT,
    util_pct       DOUBLE PRECISION NOT NULL,
    mem_used_mib   BIGINT NOT NULL,
    mem_total_mib  BIGINT NOT NULL,
    temp_c         DOUBLE PRECISION NOT NULL,
    power_w        DOUBLE PRECISION NOT NULL,
    power_limit_w  DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (part, at, instance_id, seq, gpu_index)
) WITHOUT ROWID;
