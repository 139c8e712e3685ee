//! Liveness, readiness and metrics.

use poem_openapi::{
    payload::{Json, PlainText},
    ApiResponse, OpenApi,
};

use super::{types::HealthBody, ApiTags};
use crate::{
    ingest::wal::{Shared, WalHandle},
    metrics::Metrics,
    usage::UsageLog,
};
use std::{
    fmt::Write,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

/// The usage log's figures for `/metrics`.
pub struct UsageStatus {
    pub metrics: Arc<Metrics>,
    pub log: Arc<UsageLog>,
    pub shared: Arc<Shared>,
}

impl UsageStatus {
    fn render(&self, out: &mut String) {
        let m = &self.metrics;
        let series = [
            (
                "adtrack_usage_rows_written_total",
                "counter",
                "Usage-log rows committed to ClickHouse.",
                m.flushed_rows.load(Ordering::Relaxed),
            ),
            (
                "adtrack_usage_rows_dropped_total",
                "counter",
                "Usage-log rows dropped because the usage log was over its disk budget or closed.",
                self.log.dropped.load(Ordering::Relaxed),
            ),
            (
                "adtrack_usage_rows_dead_lettered_total",
                "counter",
                "Usage-log rows ClickHouse refused (in the usage_log dead-letter file).",
                m.dead_lettered_events.load(Ordering::Relaxed),
            ),
            (
                "adtrack_usage_log_pending_bytes",
                "gauge",
                "Bytes of usage-log rows not yet committed to ClickHouse.",
                self.shared.pending_bytes.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, help, value) in series {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
    }
}

/// How long readiness waits for the write-ahead log's test write after a failure.
const WAL_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long readiness waits for ClickHouse's answers (a server that takes connections but
/// does not answer would otherwise hold the check, and the prober, indefinitely).
const CLICKHOUSE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(ApiResponse)]
pub enum ReadyResponse {
    /// ClickHouse answers, the schema is in place, and the write-ahead log can write and sync.
    #[oai(status = 200)]
    Ready(Json<HealthBody>),
    /// Not ready; `reason` says what is missing. Load balancers should not send traffic.
    #[oai(status = 503)]
    NotReady(Json<HealthBody>),
}

pub struct HealthApi {
    pub clickhouse: clickhouse::Client,
    pub wal: WalHandle,
    pub metrics: Arc<Metrics>,
    pub usage: UsageStatus,
}

#[OpenApi]
impl HealthApi {
    /// Liveness
    ///
    /// 200 while the process is running.
    #[oai(path = "/health/live", method = "get", tag = "ApiTags::Health")]
    async fn live(&self) -> Json<HealthBody> {
        Json(HealthBody {
            status: "ok".into(),
            reason: None,
        })
    }

    /// Readiness
    ///
    /// 200 only when ClickHouse answers (within 2 s), the `events` table has the expected
    /// schema, the key and usage-log tables exist, and the write-ahead log can write and sync:
    /// after one of its writes or fsyncs failed, until a later one succeeds (each readiness
    /// check tries one).
    #[oai(path = "/health/ready", method = "get", tag = "ApiTags::Health")]
    async fn ready(&self) -> ReadyResponse {
        let reason = if !self.wal.probe(WAL_PROBE_TIMEOUT).await {
            Some(format!(
                "the write-ahead log cannot write or sync: a write or fsync failed, and so did \
                 a test write now (or it took over {} s)",
                WAL_PROBE_TIMEOUT.as_secs()
            ))
        } else {
            let verified = crate::clickhouse::schema::verify(&self.clickhouse);
            match tokio::time::timeout(CLICKHOUSE_CHECK_TIMEOUT, verified).await {
                Ok(verified) => verified.err().map(|e| format!("ClickHouse: {e:#}")),
                Err(_) => Some(format!(
                    "ClickHouse did not answer within {} s",
                    CLICKHOUSE_CHECK_TIMEOUT.as_secs()
                )),
            }
        };
        match reason {
            None => ReadyResponse::Ready(Json(HealthBody {
                status: "ok".into(),
                reason: None,
            })),
            Some(reason) => ReadyResponse::NotReady(Json(HealthBody {
                status: "unavailable".into(),
                reason: Some(reason),
            })),
        }
    }

    /// Metrics
    ///
    /// Prometheus text format: ingest counters, write-ahead log depth, fsync and flush
    /// durations, ClickHouse errors, request latency.
    #[oai(path = "/metrics", method = "get", tag = "ApiTags::Health")]
    async fn metrics(&self) -> PlainText<String> {
        let mut text = self.metrics.render(self.wal.pending_bytes());
        self.usage.render(&mut text);
        PlainText(text)
    }
}
