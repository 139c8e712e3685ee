//! Black-box tests: the real app over HTTP, checked against what ClickHouse stores.

mod auth;
mod cors;
mod faults;
mod helpers;
mod idempotency;
mod ingest;
mod raw_events;
mod rollup;
mod stats;
