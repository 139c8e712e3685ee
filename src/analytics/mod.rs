//! Analytics over the `events` table: the query model, how it becomes SQL, and raw-event reads.
//!
//! # The query model
//!
//! One model serves every analytics endpoint ([`model::AnalyticsQuery`]):
//!
//! - **metrics** — counts and sums computed by ClickHouse, or summed in the service from
//!   summaries (`events`, `impressions`, `clicks`,
//!   `conversions`, `spend`, `revenue`, `unique_users_exact`, `unique_users_approx`) and ratios
//!   computed here from them (`ctr`, `cvr`, `roas`; `None` when the denominator is zero). Only
//!   the aggregates the requested metrics need are computed.
//! - **dimensions** to group by (at most three): a fixed list of columns, or `attributes.<key>`.
//! - **filters**: a dimension is (not) one of a list of values.
//! - **time range** `[from, to)` on `event_time` — the clock-skew corrected time, never the
//!   client's `timestamp` — bounded by a maximum span.
//! - optional **buckets** (minute … month) in an IANA **time zone**: ClickHouse buckets with
//!   `toStartOfDay(t, tz)` and friends; [`buckets`] computes the same boundaries in Rust and
//!   fills the buckets without events with zeros, so charts have no gaps.
//! - optional **top-N** groups ranked by one metric, and an **other** group that sums the rest
//!   (counts and sums: the totals minus the top N; distinct-user counts, which do not
//!   subtract: computed by ClickHouse as "not in the top N").
//!
//! # Safety and correctness rules every query follows
//!
//! - `FROM events FINAL`: the table is a ReplacingMergeTree, and copies of a re-sent event stay
//!   visible until a merge. `do_not_merge_across_partitions_select_final = 1` keeps FINAL cheap;
//!   it is exact because every copy of an event lands in the same partition. Counts and sums
//!   by campaign and event type read the [`rollup`] (hourly summaries computed with `FINAL`,
//!   held in memory once read) for the partitions they are current for, the copy of each
//!   event `FINAL` would keep (`argMax` by `received_at`) in partial hours at the ends of the
//!   range, and `events FINAL` for the rest.
//! - `tenant = {tenant:String}` on every read, with the tenant the API layer was given.
//! - Values reach ClickHouse only as query parameters (`{p3:String}`); identifiers only as
//!   fixed SQL snippets chosen by enum (see [`sql`]); attribute keys are parameters too.
//! - Guards: the time-range span, the number of groups and points are checked before a query
//!   runs; `max_execution_time`, `max_memory_usage` and `max_result_rows` go with every query
//!   (reads of summaries into memory: the time limit, and rows within the memory budget),
//!   and ClickHouse refusing on one of them becomes [`AnalyticsError::Guard`] (a 4xx), never
//!   a 5xx.

pub mod buckets;
pub mod engine;
pub mod figures;
pub mod model;
pub mod raw;
pub mod rollup;
pub mod sql;

pub use engine::{answer_limit, Aggregates, Analytics, GroupResult, QueryOutput};
pub use model::{AnalyticsQuery, Bucket, Dimension, Filter, Metric, TimeRange};

/// A request the API cannot answer as asked, and which field is at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidInput {
    /// Machine-readable: `invalid_filter`, `time_range_too_large`, …
    pub code: &'static str,
    /// The request field (query parameter or JSON path) at fault.
    pub field: String,
    pub message: String,
    /// For limits: the limit that was exceeded.
    pub limit: Option<u64>,
}

impl InvalidInput {
    pub fn new(code: &'static str, field: &str, message: impl Into<String>) -> Self {
        InvalidInput {
            code,
            field: field.to_string(),
            message: message.into(),
            limit: None,
        }
    }

    pub fn with_limit(mut self, limit: u64) -> Self {
        self.limit = Some(limit);
        self
    }
}

/// Why an analytics request failed.
#[derive(Debug, thiserror::Error)]
pub enum AnalyticsError {
    /// Bad input: 400.
    #[error("{}: {}", .0.field, .0.message)]
    Invalid(InvalidInput),
    /// The query is valid but too expensive: a guard stopped it (422).
    #[error("{message}")]
    Guard {
        code: &'static str,
        message: String,
        limit: Option<u64>,
    },
    /// No such event (404).
    #[error("not found")]
    NotFound,
    /// ClickHouse cannot be reached or is overloaded (503).
    #[error("ClickHouse is unavailable: {0}")]
    Unavailable(#[source] clickhouse::error::Error),
    /// Anything else ClickHouse said (500); the cause goes to the log, not to the client.
    #[error("query failed: {0}")]
    Internal(#[source] clickhouse::error::Error),
}

impl From<InvalidInput> for AnalyticsError {
    fn from(value: InvalidInput) -> Self {
        AnalyticsError::Invalid(value)
    }
}

impl AnalyticsError {
    /// Sorts a ClickHouse error: guard codes become 4xx, connection trouble 503, the rest 500.
    pub fn from_clickhouse(err: clickhouse::error::Error, guards: &GuardLimits) -> Self {
        use clickhouse::error::Error as E;
        match crate::clickhouse::error_code(&err) {
            // TIMEOUT_EXCEEDED, TOO_SLOW
            Some(159 | 160) => AnalyticsError::Guard {
                code: "query_timeout",
                message: format!(
                    "the query ran longer than the {} ms allowed; narrow the time range or add filters",
                    guards.max_execution_ms
                ),
                limit: Some(guards.max_execution_ms),
            },
            // MEMORY_LIMIT_EXCEEDED
            Some(241) => AnalyticsError::Guard {
                code: "query_memory_limit",
                message: format!(
                    "the query needed more than the {} bytes of memory allowed; group by fewer or smaller dimensions, narrow the time range or add filters",
                    guards.max_memory_bytes
                ),
                limit: Some(guards.max_memory_bytes),
            },
            // TOO_MANY_ROWS, TOO_MANY_ROWS_OR_BYTES
            Some(158 | 396) => AnalyticsError::Guard {
                code: "result_too_large",
                message: format!(
                    "the result has more than {} rows; use a limit, a coarser bucket or filters",
                    guards.max_result_rows
                ),
                limit: Some(guards.max_result_rows),
            },
            // BAD_ARGUMENTS "Cannot load time zone": a name chrono-tz knows but ClickHouse not.
            Some(36) if err.to_string().contains("time zone") => {
                AnalyticsError::Invalid(InvalidInput::new(
                    "invalid_time_zone",
                    "time_zone",
                    "ClickHouse does not know this time zone",
                ))
            }
            // TOO_MANY_SIMULTANEOUS_QUERIES, and 503-ish server states
            Some(202 | 203 | 209 | 210) => AnalyticsError::Unavailable(err),
            _ => match err {
                E::Network(_) | E::TimedOut => AnalyticsError::Unavailable(err),
                E::BadResponse(ref text) if text.contains("Connection refused") => {
                    AnalyticsError::Unavailable(err)
                }
                other => AnalyticsError::Internal(other),
            },
        }
    }
}

/// The limits reported back in guard errors.
#[derive(Debug, Clone, Copy)]
pub struct GuardLimits {
    pub max_execution_ms: u64,
    pub max_memory_bytes: u64,
    pub max_result_rows: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clickhouse::error::Error;

    const GUARDS: GuardLimits = GuardLimits {
        max_execution_ms: 1000,
        max_memory_bytes: 1 << 30,
        max_result_rows: 10_000,
    };

    fn code_of(text: &str) -> &'static str {
        match AnalyticsError::from_clickhouse(Error::BadResponse(text.into()), &GUARDS) {
            AnalyticsError::Guard { code, .. } => code,
            AnalyticsError::Invalid(i) => i.code,
            AnalyticsError::Unavailable(_) => "unavailable",
            AnalyticsError::Internal(_) => "internal",
            AnalyticsError::NotFound => "not_found",
        }
    }

    #[test]
    fn guard_codes_become_client_errors() {
        assert_eq!(
            code_of("Code: 159. DB::Exception: Timeout exceeded: elapsed 1005 ms"),
            "query_timeout"
        );
        assert_eq!(
            code_of("Code: 241. DB::Exception: Query memory limit exceeded"),
            "query_memory_limit"
        );
        assert_eq!(
            code_of("Code: 396. DB::Exception: Limit for result exceeded"),
            "result_too_large"
        );
        assert_eq!(
            code_of("Code: 36. DB::Exception: Cannot load time zone Foo/Bar"),
            "invalid_time_zone"
        );
        assert_eq!(
            code_of("Code: 60. DB::Exception: Unknown table"),
            "internal"
        );
        assert!(matches!(
            AnalyticsError::from_clickhouse(Error::Network("refused".into()), &GUARDS),
            AnalyticsError::Unavailable(_)
        ));
    }
}
