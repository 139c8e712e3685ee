-- One row per request to the service, whatever its outcome (401, 429 and 5xx included),
-- written through the same write-ahead log and batches as events. Never a key, a body or a
-- raw path: the key's public id and the route template only.
--
-- (instance_id, seq) identifies a request: `seq` counts the requests of one instance run in
-- arrival order. A batch replayed after a crash carries the same rows, which
-- ReplacingMergeTree collapses; queries read with FINAL.
CREATE TABLE IF NOT EXISTS adtrack.usage_log
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
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMMDD(time)
ORDER BY (tenant, key_id, time, instance_id, seq)
TTL toDateTime(time) + INTERVAL 90 DAY
SETTINGS ttl_only_drop_parts = 1;
