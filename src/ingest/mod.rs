//! The ingestion pipeline: request body → validated events → write-ahead log (durable, then
//! acknowledged) → background batches into ClickHouse.
//!
//! ```text
//!  POST /v1/events ─▶ parse + validate ─▶ RowBinary ─▶ wal::append (group fsync) ─▶ 202
//!                                                          │
//!              shipper: WAL files ─▶ Native block ─▶ INSERT (≥ 100k rows or 1 s) ─▶ ClickHouse
//! ```

pub mod parse;
pub mod refused;
pub mod shipper;
pub mod wal;

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

use crate::{
    auth::rate_limit::{Exceeded, TokenBucket},
    config::Limits,
    domain::TimeRules,
    metrics::Metrics,
};
pub use parse::{BodyError, BodyFormat, Rejection};
pub use refused::{Refusals, RefusedRows};
pub use wal::AppendError;

/// What one ingest request achieved.
#[derive(Debug)]
pub struct Outcome {
    pub accepted: usize,
    pub rejected: Vec<Rejection>,
    /// True when the caller asked to wait and ClickHouse has committed the events.
    pub committed: bool,
    /// Accepted events ClickHouse refused, found while waiting (they are in the dead-letter
    /// file, not in the table); none when not waiting.
    pub refused: Vec<RefusedRows>,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("{0:?}")]
    Body(BodyError),
    #[error(transparent)]
    Log(#[from] AppendError),
    /// The key's events-per-second bucket cannot take this request's valid events; nothing
    /// from it was accepted.
    #[error("over the events rate limit")]
    RateLimited(Exceeded),
}

/// Shared by all ingest handlers.
#[derive(Clone)]
pub struct Ingest {
    pub wal: wal::WalHandle,
    pub committed: watch::Receiver<u64>,
    /// Records of which ClickHouse refused rows (noted by the shipper before it commits past).
    pub refusals: Refusals,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub retention: Duration,
    pub max_future_skew: Duration,
    pub wait_timeout: Duration,
}

impl Ingest {
    /// Validates the events of `body` for `tenant`, takes one token per valid event from
    /// `events_limit`, makes the valid ones durable, and (with `wait`) waits until ClickHouse
    /// has them.
    pub async fn ingest(
        &self,
        tenant: &str,
        body: String,
        format: BodyFormat,
        wait: bool,
        events_limit: Option<&TokenBucket>,
    ) -> Result<Outcome, IngestError> {
        let rules = TimeRules {
            received_at_ms: chrono::Utc::now().timestamp_millis(),
            max_future_ms: self.max_future_skew.as_millis() as i64,
            retention_ms: self.retention.as_millis() as i64,
        };
        let (limits, owner) = (self.limits, tenant.to_owned());
        let sorted = crate::serve::cpu_bound(body.len(), move || {
            parse::sort_events(&body, format, &limits, &rules, &owner)
        })
        .await
        .map_err(IngestError::Body)?;
        for rejection in &sorted.rejected {
            self.metrics.rejected(rejection.reason);
        }
        let accepted = sorted.accepted;
        if accepted == 0 {
            return Ok(Outcome {
                accepted,
                rejected: sorted.rejected,
                committed: false,
                refused: Vec::new(),
            });
        }

        if let Some(bucket) = events_limit {
            bucket
                .take(accepted as u32)
                .map_err(IngestError::RateLimited)?;
        }

        let lsn = self.wal.append(sorted.rows, accepted as u32).await?;
        self.metrics
            .events_accepted
            .fetch_add(accepted as u64, std::sync::atomic::Ordering::Relaxed);

        let committed = wait && self.wait_for_commit(lsn).await;
        // Whether some rows were refused may no longer be known: then the answer is the one
        // without waiting (durable), never "committed".
        let (committed, refused) = match committed.then(|| self.refusals.take(lsn)) {
            Some(Some(refused)) => (true, refused),
            _ => (false, Vec::new()),
        };
        Ok(Outcome {
            accepted,
            rejected: sorted.rejected,
            committed,
            refused,
        })
    }

    /// True once ClickHouse has committed everything up to `lsn`, false on timeout.
    async fn wait_for_commit(&self, lsn: u64) -> bool {
        let mut committed = self.committed.clone();
        let reached = tokio::time::timeout(self.wait_timeout, async {
            committed.wait_for(|&c| c >= lsn).await.is_ok()
        });
        reached.await.unwrap_or(false)
    }
}
