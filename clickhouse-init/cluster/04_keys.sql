-- Cluster variant of clickhouse-init/03_keys.sql: tenants and API keys. Columns and ORDER BY
-- are exactly those of the single-node tables (tests/infra/test_infra.py checks it); only the
-- engine differs. The names are the ones the service uses on one node, so it needs no change.
--
-- Not sharded: every node holds a full copy. These tables are tiny (one row per tenant, one
-- per key version) and every adtrack instance reads them whole, with FINAL, every few
-- seconds, through whichever node it is connected to. A full local copy keeps that read on
-- one node, keeps authentication working while another shard is down, and puts every version
-- of a row in one table, where FINAL returns the latest (ReplacingMergeTree collapses versions
-- only within one table): a revocation can never be hidden by an older version of the key's
-- row on another shard.
--
-- So there is no Distributed table and no {shard} in the Keeper path: ALL nodes of the
-- cluster are replicas of one Keeper path per table, and a row inserted on any node is copied
-- to every other. The replica name must then be unique across all nodes, not only within a
-- shard: `{replica}` is the node's host name (CLICKHOUSE_REPLICA in
-- docker-compose.cluster.yml, substituted by config/macros.xml), which is. If your nodes
-- name replicas per shard (r1, r2 in each shard), use '{shard}-{replica}' instead.
--
-- `updated_at` is the version, as on one node: revoking inserts a newer row for the key, and
-- FINAL reads the latest. A row inserted through one node reaches the others after the
-- replication delay (usually well under a second), so a revocation takes effect on instances
-- connected to other nodes after their reload period (2 s by default) plus that delay.
CREATE TABLE IF NOT EXISTS adtrack.tenants ON CLUSTER adtrack_cluster
(
    tenant_id  String,
    name       String,
    created_at DateTime64(6, 'UTC'),
    updated_at DateTime64(6, 'UTC')
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/all/adtrack/tenants', '{replica}', updated_at)
ORDER BY tenant_id;

CREATE TABLE IF NOT EXISTS adtrack.api_keys ON CLUSTER adtrack_cluster
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
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/all/adtrack/api_keys', '{replica}', updated_at)
ORDER BY key_id;
