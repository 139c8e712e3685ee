-- The table adtrack talks to on a cluster. It has the name the service uses on one node,
-- `adtrack.events`, so the service needs no change: it inserts into it, its readiness check
-- finds the expected columns on it, and queries read it with FINAL.
--
-- A Distributed table stores nothing itself. An INSERT is split by the sharding key and each
-- part goes to one replica of its shard (internal_replication: the shard's replicas then copy
-- it among themselves). A SELECT runs on one replica of every shard and merges the results.
--
-- Sharding key cityHash64(tenant, event_id): the identity of an event, so every copy of an
-- event (a client's resend, a retry through nginx, a replay of adtrack's write-ahead log
-- after a crash) lands on the same shard. That is what makes deduplication work on a
-- cluster: ReplacingMergeTree collapses copies only within one table, i.e. one shard, and
-- `SELECT ... FROM events FINAL` applies FINAL on each shard separately. With copies of an
-- event on two shards, FINAL could not see them together and the event would count twice.
-- Never shard by rand() or by time.
--
-- `AS adtrack.events_local` copies the columns (the skip index stays on the local table,
-- where the data is).
CREATE TABLE IF NOT EXISTS adtrack.events ON CLUSTER adtrack_cluster
AS adtrack.events_local
ENGINE = Distributed(adtrack_cluster, adtrack, events_local, cityHash64(tenant, event_id));
