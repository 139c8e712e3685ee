//! Liveness, readiness and metrics.

use poem_openapi::{
    payload::{Json, PlainText},
    ApiResponse, OpenApi,
};

use super::{types::HealthBody, ApiTags};
use crate::{ingest::wal::WalHandle, metrics::Metrics};
use std::sync::Arc;

#[derive(ApiResponse)]
pub enum ReadyResponse {
    /// ClickHouse answers, the schema is in place, and the write-ahead log is writable.
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
    /// 200 only when ClickHouse answers, the `events` table has the expected schema, and the
    /// write-ahead log is usable.
    #[oai(path = "/health/ready", method = "get", tag = "ApiTags::Health")]
    async fn ready(&self) -> ReadyResponse {
        let reason = if !self.wal.is_healthy() {
            Some("the write-ahead log had an unrecoverable I/O error".to_string())
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
        PlainText(self.metrics.render(self.wal.pending_bytes()))
    }
}
