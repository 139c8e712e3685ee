-- Cluster variant of clickhouse-init/04_usage_log.sql: the usage log, sharded like events.
-- `usage_log_local` holds the rows, one copy per replica of each shard: columns, PARTITION BY,
-- ORDER BY, TTL and settings are exactly those of the single-node table (tests/infra/
-- test_infra.py checks it); only the engine and the name differ. `usage_log` is the
-- Distributed table under the single-node name: the service inserts into it and the admin API
-- reads it with FINAL, never the local table directly.
--
-- One row per request makes this table as large as events, so it is sharded, not copied to
-- every node like 04_keys.sql. The Keeper path has {shard}: the replicas of one shard share
-- /clickhouse/tables/{shard}/adtrack/usage_log_local.
--
-- Sharding key cityHash64(instance_id, seq): the identity of a request. A batch the service
-- replays from its write-ahead log after a crash carries the same rows, with the same
-- (instance_id, seq), so every copy of a row lands on the shard that holds its first copy, and
-- ReplacingMergeTree collapses them there, in merges and under FINAL (which runs on each shard
-- separately). A key that is not the request's identity (rand(), time, or tenant alone with
-- time) could send a replayed copy to another shard, where it would count twice. It also
-- spreads the rows evenly, where sharding by tenant would put a large tenant on one shard.
--
-- TTL: the service rewrites `INTERVAL 90 DAY` to ADTRACK_USAGE_RETENTION_DAYS only when it
-- applies the single-node files itself. This file is applied by hand: edit the interval here
-- before applying it, or change it later with ALTER TABLE ... MODIFY TTL (README.md).
CREATE TABLE IF NOT EXISTS adtrack.usage_log_local ON CLUSTER adtrack_cluster
(
    time            DateTime64(6, 'UTC') COMMENT 'when the request arrived',
    request_id      String COMMENT 'X-Request-Id (from nginx or the client when given)',
    instance_id     LowCardinality(String),
    seq             UInt64 COMMENT 'per-instance sequence number, in arrival order',
    tenant          LowCardinality(String) COMMENT 'empty when no valid key was sent',
    key_id          String COMMENT 'public id of the key, empty when no valid key was sent',
    method          LowCardinality(String),
    route           LowCardinality(String) COMMENT 'route template, e.g. /v1/events/{event_id}',
    status          UInt16,
    latency_us      UInt32,
    bytes_in        UInt64,
    bytes_out       UInt64,
    events_accepted UInt32,
    events_rejected UInt32
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/adtrack/usage_log_local', '{replica}')
PARTITION BY toYYYYMMDD(time)
ORDER BY (tenant, key_id, time, instance_id, seq)
TTL toDateTime(time) + INTERVAL 90 DAY
SETTINGS ttl_only_drop_parts = 1;

-- `AS adtrack.usage_log_local` copies the columns. Like events, inserts wait until every row is
-- on its shard (distributed_foreground_insert in config/users.xml), so the service's log
-- segment is deleted only once the rows are stored.
CREATE TABLE IF NOT EXISTS adtrack.usage_log ON CLUSTER adtrack_cluster
AS adtrack.usage_log_local
ENGINE = Distributed(adtrack_cluster, adtrack, usage_log_local, cityHash64(instance_id, seq));
