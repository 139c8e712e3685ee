//! adtrack: ad-event ingestion and analytics over ClickHouse.
//!
//! `startup` wires the pieces; `serve` runs the request threads; `api` is HTTP; `domain` is
//! what a valid event is; `ingest` is the durable write path (write-ahead log → batches →
//! ClickHouse); `clickhouse` holds the schema and row format.

pub mod analytics;
pub mod api;
pub mod auth;
pub mod clickhouse;
pub mod config;
pub mod domain;
pub mod ingest;
pub mod local_engine;
pub mod metrics;
pub mod serve;
pub mod startup;
pub mod telemetry;
pub mod usage;
