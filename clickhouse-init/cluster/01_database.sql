-- Cluster variant of clickhouse-init/01_database.sql: the database on every node of the
-- cluster `adtrack_cluster` (defined in config/remote_servers.xml). Apply once, on any node
-- (see README.md); ON CLUSTER runs it everywhere through ClickHouse Keeper.
CREATE DATABASE IF NOT EXISTS adtrack ON CLUSTER adtrack_cluster;
