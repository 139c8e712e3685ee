-- Hourly figures per campaign and event type, summarized from `events FINAL` one day
-- partition at a time by the service (src/analytics/rollup.rs), so dashboards do not scan
-- and deduplicate every raw event on each request.
--
-- Exactness: a summary of a partition is used only while that partition's set of parts is
-- the one it was computed from (the fingerprint in events_hourly_state); a partition that
-- changed since (new events, re-sent copies, a deletion) is read from `events FINAL` until
-- the next computation. Duplicates never count twice: summaries are computed with FINAL.
-- Each computation writes a new `generation`, its own partition; old generations are
-- dropped by the service once no query can still be reading them.
CREATE TABLE IF NOT EXISTS adtrack.events_hourly
(
    tenant         LowCardinality(String),
    day            UInt32 COMMENT 'the events partition summarized (toYYYYMMDD(timestamp))',
    generation     UInt64 COMMENT 'which computation of that partition',
    hour           DateTime('UTC') COMMENT 'start of the UTC hour of event_time',
    campaign_id    LowCardinality(String),
    event_type     Enum8('impression' = 1, 'click' = 2, 'conversion' = 3),
    events         UInt64,
    cost_micros    UInt64,
    revenue_micros UInt64
)
ENGINE = MergeTree
PARTITION BY (day, generation)
ORDER BY (tenant, campaign_id, event_type, hour);

-- The same figures per UTC day (for ranges without time buckets, such as a 30-day breakdown),
-- and per hour without the campaign (for queries that neither group nor filter by it).
-- Computed from events_hourly in the same generation.
CREATE TABLE IF NOT EXISTS adtrack.events_daily
(
    tenant         LowCardinality(String),
    day            UInt32,
    generation     UInt64,
    date           DateTime('UTC') COMMENT 'start of the UTC day of event_time',
    campaign_id    LowCardinality(String),
    event_type     Enum8('impression' = 1, 'click' = 2, 'conversion' = 3),
    events         UInt64,
    cost_micros    UInt64,
    revenue_micros UInt64
)
ENGINE = MergeTree
PARTITION BY (day, generation)
ORDER BY (tenant, campaign_id, event_type, date);

CREATE TABLE IF NOT EXISTS adtrack.events_hourly_totals
(
    tenant         LowCardinality(String),
    day            UInt32,
    generation     UInt64,
    hour           DateTime('UTC'),
    event_type     Enum8('impression' = 1, 'click' = 2, 'conversion' = 3),
    events         UInt64,
    cost_micros    UInt64,
    revenue_micros UInt64
)
ENGINE = MergeTree
PARTITION BY (day, generation)
ORDER BY (tenant, event_type, hour);

-- The current generation of each day's summary and the parts of `events` it reflects.
CREATE TABLE IF NOT EXISTS adtrack.events_hourly_state
(
    day         UInt32,
    generation  UInt64,
    fingerprint UInt64 COMMENT 'groupBitXor(cityHash64(part name)) of the active parts summarized',
    computed_at DateTime64(3, 'UTC'),
    first_ms    Int64 COMMENT 'the first and last event_time of any copy in the partition (Unix ms, last < first when empty)',
    last_ms     Int64,
    uniform     UInt8 COMMENT '1 when all copies of each event agree on event_time'
)
ENGINE = ReplacingMergeTree(generation)
ORDER BY day;
