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

#[derive(ApiResponse)]
pub enum ReadyResponse {
    /// ClickHouse answers, the schema is in place, and no write of the write-ahead log failed
    /// in the last 10 s.
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
    /// 200 only when ClickHouse answers, the `events` table has the expected schema, the key
    /// and usage-log tables exist, and no write or fsync of the write-ahead log failed in the
    /// last 10 s.
    #[oai(path = "/health/ready", method = "get", tag = "ApiTags::Health")]
    async fn ready(&self) -> ReadyResponse {
        let reason = if !self.wal.is_healthy() {
            Some("a write or fsync of the write-ahead log failed in the last 10 s".to_string())
        } else {
            crate::clickhouse::schema::verify(&self.clickhouse)
                .await
                .err()
                .map(|e| format!("ClickHouse: {e:#}"))
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
