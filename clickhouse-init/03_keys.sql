-- Tenants and API keys. Every instance reads these (cached, reloaded every few seconds), so a
-- key created or revoked on one instance is seen by all. A key is stored only as the SHA-256
-- of the key; `key_id` is its public part (`adt_` and 12 hex digits).
--
-- Rows are never updated in place: revoking inserts a new version of the key's row, and
-- ReplacingMergeTree(updated_at) with FINAL reads the latest one.
CREATE TABLE IF NOT EXISTS adtrack.tenants
(
    tenant_id  String,
    name       String,
    created_at DateTime64(6, 'UTC'),
    updated_at DateTime64(6, 'UTC')
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY tenant_id;

CREATE TABLE IF NOT EXISTS adtrack.api_keys
(
    key_id           String COMMENT 'public id of the key, adt_ + 12 hex digits',
    key_hash         String COMMENT 'hex SHA-256 of the whole key (the key itself is never stored)',
    tenant_id        String,
    name             String,
    scopes           Array(LowCardinality(String)) COMMENT 'ingest, read, admin',
    requests_per_sec Nullable(UInt32) COMMENT 'NULL: the deployment default, 0: unlimited',
    requests_burst   Nullable(UInt32),
    events_per_sec   Nullable(UInt32),
    events_burst     Nullable(UInt32),
    created_at       DateTime64(6, 'UTC'),
    revoked_at       Nullable(DateTime64(6, 'UTC')),
    updated_at       DateTime64(6, 'UTC')
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY key_id;
