-- Cluster variant of clickhouse-init/02_events.sql: the table that holds the rows, one copy
-- per replica of each shard. Columns, PARTITION BY, ORDER BY, TTL and settings are exactly
-- those of the single-node table (tests/infra/test_infra.py checks it); only the engine and
-- the name differ. adtrack writes and reads `adtrack.events`, the Distributed table of
-- 03_events_distributed.sql, never this one directly.
--
-- ReplicatedReplacingMergeTree: the replicas of one shard share the Keeper path
-- /clickhouse/tables/{shard}/adtrack/events_local and copy each other's parts; `{shard}` and
-- `{replica}` come from each node's macros (config/macros-*.xml). `received_at` is the
-- version, as on one node: of several copies of an event the last received one stays.
-- A copy of an event is always sent to the same shard (the sharding key of the Distributed
-- table is built from the event's identity), so duplicates meet in one shard and collapse
-- there, in merges and under FINAL.
--
-- TTL: the service rewrites `INTERVAL 30 DAY` to ADTRACK_RETENTION_DAYS when it applies the
-- single-node files itself; this file is applied by hand, so edit the interval here if the
-- retention is not 30 days.
CREATE TABLE IF NOT EXISTS adtrack.events_local ON CLUSTER adtrack_cluster
(
    tenant         LowCardinality(String),
    event_id       UUID,
    event_type     Enum8('impression' = 1, 'click' = 2, 'conversion' = 3),
    timestamp      DateTime64(3, 'UTC') COMMENT 'event time as reported by the client',
    event_time     DateTime64(3, 'UTC') COMMENT 'timestamp corrected by the client clock offset (received_at - sent_at)',
    sent_at        Nullable(DateTime64(3, 'UTC')),
    received_at    DateTime64(3, 'UTC') COMMENT 'server time the event was accepted',
    campaign_id    LowCardinality(String),
    ad_id          String,
    publisher_id   LowCardinality(String),
    advertiser_id  LowCardinality(String) COMMENT 'empty when not given',
    user_id        String COMMENT 'empty when not given',
    country        LowCardinality(String) COMMENT 'ISO 3166-1 alpha-2, empty when not given',
    device         LowCardinality(String) COMMENT 'desktop | mobile | tablet | ctv | other, empty when not given',
    os             LowCardinality(String),
    browser        LowCardinality(String),
    cost_micros    UInt64,
    revenue_micros UInt64,
    attributes     Map(String, String),
    INDEX event_time_minmax event_time TYPE minmax GRANULARITY 1
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/adtrack/events_local', '{replica}', received_at)
PARTITION BY toYYYYMMDD(timestamp)
ORDER BY (tenant, campaign_id, event_type, toStartOfHour(timestamp), event_id)
TTL toDateTime(timestamp) + INTERVAL 30 DAY
SETTINGS ttl_only_drop_parts = 1;
