-- The database adtrack writes into. The service rewrites the name `adtrack` to
-- ADTRACK_CLICKHOUSE_DATABASE when it applies these files itself.
CREATE DATABASE IF NOT EXISTS adtrack;
