//! Counters and histograms, rendered in the Prometheus text format at `GET /metrics`.
//!
//! Plain atomics: the request path only ever does a relaxed `fetch_add`.

use std::{
    collections::BTreeMap,
    fmt::Write,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, RwLock,
    },
    time::Duration,
};

/// Why an event was rejected; one counter each.
#[derive(Debug, Clone, Copy)]
pub enum RejectReason {
    /// Not a valid event (a field failed a rule, or the JSON had the wrong shape).
    Invalid,
    /// Larger than the per-event limit.
    TooLarge,
}

/// A fixed-bucket latency histogram.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

const LATENCY_BOUNDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// How many observations were made.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|&b| secs <= b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        self.render_series(out, name, labels);
    }

    fn render_series(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let total = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {total}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{braces} {sum}\n{name}_count{braces} {total}"
        );
    }
}

/// (route template, method, status).
type RequestKey = (&'static str, &'static str, u16);

#[derive(Debug)]
pub struct Metrics {
    pub events_accepted: AtomicU64,
    pub events_rejected_invalid: AtomicU64,
    pub events_rejected_too_large: AtomicU64,
    pub requests_rejected_budget: AtomicU64,
    pub fsync_seconds: Histogram,
    pub flushes: AtomicU64,
    pub flushed_rows: AtomicU64,
    pub flush_seconds: Histogram,
    pub clickhouse_errors_retryable: AtomicU64,
    pub clickhouse_errors_data: AtomicU64,
    /// Inserts that went in as RowBinary after their Native block was refused or not made.
    pub native_fallbacks: AtomicU64,
    pub dead_lettered_events: AtomicU64,
    pub duplicate_events: AtomicU64,
    /// Analytics requests answered (partly) from hourly summaries, and from raw events only.
    pub analytics_from_summaries: AtomicU64,
    pub analytics_from_raw: AtomicU64,
    /// Day partitions summarized, and those without a current summary after the last refresh.
    pub rollup_computed: AtomicU64,
    pub rollup_stale_partitions: AtomicU64,
    pub rollup_held_bytes: AtomicU64,
    /// Request latency by (route template, method, status).
    requests: RwLock<BTreeMap<RequestKey, Arc<Histogram>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            events_accepted: AtomicU64::new(0),
            events_rejected_invalid: AtomicU64::new(0),
            events_rejected_too_large: AtomicU64::new(0),
            requests_rejected_budget: AtomicU64::new(0),
            fsync_seconds: Histogram::new(LATENCY_BOUNDS),
            flushes: AtomicU64::new(0),
            flushed_rows: AtomicU64::new(0),
            flush_seconds: Histogram::new(LATENCY_BOUNDS),
            clickhouse_errors_retryable: AtomicU64::new(0),
            clickhouse_errors_data: AtomicU64::new(0),
            native_fallbacks: AtomicU64::new(0),
            dead_lettered_events: AtomicU64::new(0),
            duplicate_events: AtomicU64::new(0),
            analytics_from_summaries: AtomicU64::new(0),
            analytics_from_raw: AtomicU64::new(0),
            rollup_computed: AtomicU64::new(0),
            rollup_stale_partitions: AtomicU64::new(0),
            rollup_held_bytes: AtomicU64::new(0),
            requests: RwLock::new(BTreeMap::new()),
        }
    }
}

impl Metrics {
    /// Records one request. `route` is a template from a fixed set (never a raw path), so
    /// the number of series stays bounded.
    pub fn observe_request(
        &self,
        route: &'static str,
        method: &str,
        status: u16,
        elapsed: Duration,
    ) {
        let key = (route, static_method(method), status);
        if let Some(h) = self
            .requests
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            h.observe(elapsed);
            return;
        }
        self.requests
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_insert_with(|| Arc::new(Histogram::new(LATENCY_BOUNDS)))
            .observe(elapsed);
    }

    pub fn rejected(&self, reason: RejectReason) {
        let counter = match reason {
            RejectReason::Invalid => &self.events_rejected_invalid,
            RejectReason::TooLarge => &self.events_rejected_too_large,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The text of `/metrics`; the log's backlog is read from the log itself.
    pub fn render(&self, wal_pending_bytes: u64) -> String {
        let mut out = String::with_capacity(4096);
        let counter = |out: &mut String, name: &str, help: &str, series: &[(&str, &AtomicU64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, value) in series {
                let labels = if labels.is_empty() {
                    String::new()
                } else {
                    format!("{{{labels}}}")
                };
                let _ = writeln!(out, "{name}{labels} {}", value.load(Ordering::Relaxed));
            }
        };
        counter(
            &mut out,
            "adtrack_events_accepted_total",
            "Events acknowledged (durable in the write-ahead log).",
            &[("", &self.events_accepted)],
        );
        counter(
            &mut out,
            "adtrack_events_rejected_total",
            "Events rejected in a request, by reason.",
            &[
                ("reason=\"invalid\"", &self.events_rejected_invalid),
                ("reason=\"too_large\"", &self.events_rejected_too_large),
            ],
        );
        counter(
            &mut out,
            "adtrack_requests_over_budget_total",
            "Ingest requests answered 503 because the write-ahead log was over its disk budget.",
            &[("", &self.requests_rejected_budget)],
        );
        counter(
            &mut out,
            "adtrack_flushes_total",
            "Batches committed to ClickHouse.",
            &[("", &self.flushes)],
        );
        counter(
            &mut out,
            "adtrack_flushed_rows_total",
            "Rows committed to ClickHouse (replays after a crash included).",
            &[("", &self.flushed_rows)],
        );
        counter(
            &mut out,
            "adtrack_clickhouse_errors_total",
            "Failed inserts, by whether they are retried.",
            &[
                ("kind=\"retryable\"", &self.clickhouse_errors_retryable),
                ("kind=\"data\"", &self.clickhouse_errors_data),
            ],
        );
        counter(
            &mut out,
            "adtrack_native_fallbacks_total",
            "Inserts ClickHouse refused as a Native block (or whose block could not be made) and then took as RowBinary rows (each part of a split batch counts); the service log has its answer.",
            &[("", &self.native_fallbacks)],
        );
        counter(
            &mut out,
            "adtrack_dead_lettered_events_total",
            "Events ClickHouse refused as invalid, written to the dead-letter file.",
            &[("", &self.dead_lettered_events)],
        );
        counter(
            &mut out,
            "adtrack_duplicate_events_total",
            "Re-sent events (same tenant and event_id) seen within two flush batches; all copies are inserted and collapse in ClickHouse.",
            &[("", &self.duplicate_events)],
        );
        counter(
            &mut out,
            "adtrack_analytics_queries_total",
            "Aggregate queries, by whether hourly summaries answered them (with raw events of changed partitions and partial hours) or raw events alone.",
            &[
                ("source=\"summaries\"", &self.analytics_from_summaries),
                ("source=\"raw\"", &self.analytics_from_raw),
            ],
        );
        counter(
            &mut out,
            "adtrack_rollup_partitions_computed_total",
            "Day partitions of events summarized into hourly figures.",
            &[("", &self.rollup_computed)],
        );
        let _ = writeln!(
            out,
            "# HELP adtrack_rollup_stale_partitions Day partitions without a current summary after the last refresh (changed since, or not quiet for a refresh interval yet; read raw meanwhile).\n# TYPE adtrack_rollup_stale_partitions gauge\nadtrack_rollup_stale_partitions {}",
            self.rollup_stale_partitions.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP adtrack_rollup_held_bytes Estimated bytes of summaries and partial hours held in memory for queries (ADTRACK_ROLLUP_CACHE_MB bounds it).\n# TYPE adtrack_rollup_held_bytes gauge\nadtrack_rollup_held_bytes {}",
            self.rollup_held_bytes.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP adtrack_wal_pending_bytes Write-ahead log bytes not yet committed to ClickHouse.\n# TYPE adtrack_wal_pending_bytes gauge\nadtrack_wal_pending_bytes {}",
            wal_pending_bytes
        );
        self.fsync_seconds.render(
            &mut out,
            "adtrack_wal_fsync_seconds",
            "Duration of write-ahead log fsyncs (one per commit group).",
            "",
        );
        self.flush_seconds.render(
            &mut out,
            "adtrack_flush_seconds",
            "Duration of successful ClickHouse inserts.",
            "",
        );
        let requests = self.requests.read().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(
            out,
            "# HELP adtrack_request_seconds Request latency by route, method and status.\n# TYPE adtrack_request_seconds histogram"
        );
        for ((route, method, status), histogram) in requests.iter() {
            histogram.render_series(
                &mut out,
                "adtrack_request_seconds",
                &format!("route=\"{route}\",method=\"{method}\",status=\"{status}\""),
            );
        }
        out
    }
}

/// The method as a label value: a bounded set, and no allocation per request.
fn static_method(method: &str) -> &'static str {
    const KNOWN: [&str; 7] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];
    KNOWN.into_iter().find(|m| *m == method).unwrap_or("OTHER")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative() {
        let m = Metrics::default();
        m.fsync_seconds.observe(Duration::from_micros(200));
        m.fsync_seconds.observe(Duration::from_millis(3));
        let text = m.render(0);
        assert!(text.contains("adtrack_wal_fsync_seconds_bucket{le=\"0.00025\"} 1"));
        assert!(text.contains("adtrack_wal_fsync_seconds_bucket{le=\"0.005\"} 2"));
        assert!(text.contains("adtrack_wal_fsync_seconds_count 2"));
    }
}
