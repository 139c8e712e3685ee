//! The usage log: one row per request (whatever its outcome) into ClickHouse's `usage_log`,
//! through a write-ahead log and shipper of its own (the same code as events).
//!
//! ```text
//!  request done ─▶ UsageLog::record (JSON line into a buffer, no I/O)
//!                        │ every ADTRACK_USAGE_FLUSH_MS
//!                        ▼
//!              usage write-ahead log (fsync) ─▶ shipper ─▶ INSERT … FORMAT JSONEachRow
//! ```
//!
//! Requests never wait for it: rows are gathered in memory and appended in one record per
//! interval. The price is that a hard crash (`kill -9`) can lose the usage rows of the last
//! interval; a graceful stop writes them all. Events never take this path.

use std::{
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::watch;

use crate::ingest::wal::{AppendError, WalHandle};

/// Most bytes of rows held in memory while the log cannot take them; past it rows are dropped
/// (and counted), so a full disk never grows memory without bound.
const MAX_BUFFERED_BYTES: usize = 64 << 20;

/// What handlers report about their request, read when the request ends.
#[derive(Debug, Default)]
pub struct RequestUsage {
    pub bytes_in: AtomicU64,
    pub events_accepted: AtomicU32,
    pub events_rejected: AtomicU32,
}

/// One row of `usage_log`.
#[derive(Debug, Serialize)]
pub struct UsageRow<'a> {
    #[serde(serialize_with = "micros")]
    pub time: DateTime<Utc>,
    pub request_id: &'a str,
    pub instance_id: &'a str,
    pub seq: u64,
    pub tenant: &'a str,
    pub key_id: &'a str,
    pub method: &'a str,
    pub route: &'a str,
    pub status: u16,
    pub latency_us: u32,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub events_accepted: u32,
    pub events_rejected: u32,
}

/// `YYYY-MM-DD hh:mm:ss.ffffff`, as `DateTime64(6)` reads it (written field by field: a
/// `format` string would be parsed again for every request).
fn micros<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    use chrono::{Datelike, Timelike};
    s.collect_str(&format_args!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}",
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.timestamp_subsec_micros().min(999_999)
    ))
}

pub struct UsageLog {
    pub instance_id: String,
    /// 16 random hex digits of this run: generated request ids are this and the sequence
    /// number (unique without a random draw per request).
    id_prefix: String,
    seq: AtomicU64,
    buffer: Mutex<Buffer>,
    pub dropped: AtomicU64,
}

#[derive(Default)]
struct Buffer {
    rows: Vec<u8>,
    count: u32,
}

impl UsageLog {
    pub fn new(instance_id: String) -> Self {
        let random = uuid::Uuid::new_v4().simple().to_string();
        UsageLog {
            instance_id,
            id_prefix: random[..16].to_string(),
            seq: AtomicU64::new(0),
            buffer: Mutex::default(),
            dropped: AtomicU64::new(0),
        }
    }

    /// The next sequence number of this instance (taken when a request arrives).
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A request id for a request that came without one (32 hex digits, like a UUID's).
    pub fn request_id(&self, seq: u64) -> String {
        format!("{}{seq:016x}", self.id_prefix)
    }

    pub fn record(&self, row: &UsageRow<'_>) {
        let mut buffer = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
        if buffer.rows.len() >= MAX_BUFFERED_BYTES {
            drop(buffer);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if serde_json::to_writer(&mut buffer.rows, row).is_ok() {
            buffer.rows.push(b'\n');
            buffer.count += 1;
        }
    }

    fn take(&self) -> Buffer {
        std::mem::take(&mut *self.buffer.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Appends what is buffered to the log. Rows the log refuses (over its disk budget,
    /// closed) are dropped and counted: the usage log must never hold up requests.
    pub async fn flush(&self, wal: &WalHandle) {
        let Buffer { rows, count } = self.take();
        if count == 0 {
            return;
        }
        match wal.append(rows, count).await {
            Ok(_) => {}
            Err(err) => {
                self.dropped.fetch_add(u64::from(count), Ordering::Relaxed);
                match err {
                    AppendError::Full => {
                        tracing::warn!(rows = count, "usage log over its disk budget; rows dropped")
                    }
                    other => {
                        tracing::error!(rows = count, error = %other, "usage rows could not be logged")
                    }
                }
            }
        }
    }
}

/// Appends the buffer every `every` until `stop` turns true, then once more, and returns
/// (dropping the log handle, which lets the log thread end).
pub async fn run_flusher(
    log: Arc<UsageLog>,
    wal: WalHandle,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopped = tokio::select! {
            _ = tick.tick() => false,
            changed = stop.changed() => changed.is_err() || *stop.borrow(),
        };
        if stopped {
            break;
        }
        log.flush(&wal).await;
    }
    log.flush(&wal).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_written_as_datetime64_reads_them() {
        let text = |us| {
            let mut out = Vec::new();
            let t = DateTime::from_timestamp_micros(us).unwrap();
            micros(&t, &mut serde_json::Serializer::new(&mut out)).unwrap();
            String::from_utf8(out).unwrap()
        };
        assert_eq!(
            text(1_700_000_000_000_042),
            r#""2023-11-14 22:13:20.000042""#
        );
        assert_eq!(text(946_684_800_000_000), r#""2000-01-01 00:00:00.000000""#);
    }

    #[test]
    fn a_row_is_one_json_line_with_microsecond_time() {
        let log = UsageLog::new("host-1".into());
        let row = UsageRow {
            time: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            request_id: "r1",
            instance_id: &log.instance_id,
            seq: log.next_seq(),
            tenant: "acme",
            key_id: "adt_0123456789ab",
            method: "POST",
            route: "/v1/events",
            status: 202,
            latency_us: 350,
            bytes_in: 1000,
            bytes_out: 30,
            events_accepted: 10,
            events_rejected: 1,
        };
        log.record(&row);
        log.record(&UsageRow {
            seq: log.next_seq(),
            ..row
        });
        let buffer = log.take();
        assert_eq!(buffer.count, 2);
        let text = String::from_utf8(buffer.rows).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["time"], "2023-11-14 22:13:20.123456");
        assert_eq!(
            (lines[0]["seq"].as_u64(), lines[1]["seq"].as_u64()),
            (Some(1), Some(2))
        );
        assert_eq!(lines[1]["events_rejected"], 1);
        assert_eq!(log.take().count, 0);
        let (a, b) = (log.request_id(1), log.request_id(2));
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert_ne!(a, UsageLog::new("host-1".into()).request_id(1));
    }
}
