-- One row per ad event. Idempotency: the identity of an event is its sorting key
-- (tenant, campaign_id, event_type, hour of the client timestamp, event_id); a re-sent
-- event carries the same values, so every copy lands in the same partition under the same
-- key, and ReplacingMergeTree keeps the last received copy (`received_at` is the version).
-- Until a merge happens copies are visible, so every analytics query reads with FINAL.
--
-- Partition and TTL use the client's own `timestamp`, which is stable across retries; the
-- clock-skew corrected time (`event_time`) can differ between retries (a new `sent_at`),
-- so it is a plain column that analytics filter and bucket on (minmax-indexed).
CREATE TABLE IF NOT EXISTS adtrack.events
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
ENGINE = ReplacingMergeTree(received_at)
PARTITION BY toYYYYMMDD(timestamp)
ORDER BY (tenant, campaign_id, event_type, toStartOfHour(timestamp), event_id)
TTL toDateTime(timestamp) + INTERVAL 30 DAY
SETTINGS ttl_only_drop_parts = 1;
