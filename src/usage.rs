//! The usage log: one row per request (whatever its outcome) into ClickHouse's `usage_log`,
//! through a write-ahead log and shipper of its own (the same code as events).
//!
//! ```text
//!  request done ─▶ UsageLog::record (RowBinary row into a buffer, no I/O)
//!                        │ every ADTRACK_USAGE_FLUSH_MS
//!                        ▼
//!              usage write-ahead log (fsync) ─▶ shipper ─▶ INSERT … FORMAT RowBinary
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

use crate::{
    clickhouse::rowbinary::{put_str, DecodeError, Reader},
    ingest::wal::{AppendError, WalHandle},
};

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

/// The columns of `usage_log` and their types, in the order `UsageRow::encode` writes them.
pub const COLUMNS: &[(&str, &str)] = &[
    ("time", "DateTime64(6, 'UTC')"),
    ("request_id", "String"),
    ("instance_id", "LowCardinality(String)"),
    ("seq", "UInt64"),
    ("tenant", "LowCardinality(String)"),
    ("key_id", "String"),
    ("method", "LowCardinality(String)"),
    ("route", "LowCardinality(String)"),
    ("status", "UInt16"),
    ("latency_us", "UInt32"),
    ("bytes_in", "UInt64"),
    ("bytes_out", "UInt64"),
    ("events_accepted", "UInt32"),
    ("events_rejected", "UInt32"),
];

impl UsageRow<'_> {
    /// Appends the row in RowBinary (a third of the bytes of JSON, and far cheaper for
    /// ClickHouse to read: one row per request adds up).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.time.timestamp_micros().to_le_bytes());
        for text in [self.request_id, self.instance_id] {
            put_str(out, text);
        }
        out.extend_from_slice(&self.seq.to_le_bytes());
        for text in [self.tenant, self.key_id, self.method, self.route] {
            put_str(out, text);
        }
        out.extend_from_slice(&self.status.to_le_bytes());
        out.extend_from_slice(&self.latency_us.to_le_bytes());
        out.extend_from_slice(&self.bytes_in.to_le_bytes());
        out.extend_from_slice(&self.bytes_out.to_le_bytes());
        out.extend_from_slice(&self.events_accepted.to_le_bytes());
        out.extend_from_slice(&self.events_rejected.to_le_bytes());
    }
}

/// `YYYY-MM-DD hh:mm:ss.ffffff`, as `usage_log` shows its times.
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

/// Every row of `rows` (for dead-letter files and tests), with the byte range it took.
pub fn decode(rows: &[u8]) -> Result<Vec<(std::ops::Range<usize>, UsageRow<'_>)>, DecodeError> {
    let mut reader = Reader::new(rows);
    let mut out = Vec::new();
    while !reader.at_end() {
        let start = reader.position();
        let micros = reader.i64()?;
        let row = UsageRow {
            time: DateTime::from_timestamp_micros(micros).unwrap_or_default(),
            request_id: reader.str()?,
            instance_id: reader.str()?,
            seq: reader.u64()?,
            tenant: reader.str()?,
            key_id: reader.str()?,
            method: reader.str()?,
            route: reader.str()?,
            status: reader.u16()?,
            latency_us: reader.u32()?,
            bytes_in: reader.u64()?,
            bytes_out: reader.u64()?,
            events_accepted: reader.u32()?,
            events_rejected: reader.u32()?,
        };
        out.push((start..reader.position(), row));
    }
    Ok(out)
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
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut id = String::with_capacity(self.id_prefix.len() + 16);
        id.push_str(&self.id_prefix);
        // `{seq:016x}` without the formatting machinery (~1 % of a request's CPU).
        id.extend(
            (0..16)
                .rev()
                .map(|i| HEX[(seq >> (i * 4)) as usize & 0xf] as char),
        );
        id
    }

    pub fn record(&self, row: &UsageRow<'_>) {
        let mut buffer = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
        if buffer.rows.len() >= MAX_BUFFERED_BYTES {
            drop(buffer);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        row.encode(&mut buffer.rows);
        buffer.count += 1;
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
    fn times_read_back_with_microseconds() {
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
    fn rows_are_buffered_as_rowbinary_and_read_back_whole() {
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
            tenant: "",
            key_id: "",
            status: 401,
            ..row
        });
        let buffer = log.take();
        assert_eq!(buffer.count, 2);
        let rows = decode(&buffer.rows).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].0.start, rows[1].0.end), (0, buffer.rows.len()));
        assert_eq!(rows[0].0.end, rows[1].0.start);
        let json = serde_json::to_value(&rows[0].1).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "time": "2023-11-14 22:13:20.123456", "request_id": "r1",
                "instance_id": "host-1", "seq": 1, "tenant": "acme",
                "key_id": "adt_0123456789ab", "method": "POST", "route": "/v1/events",
                "status": 202, "latency_us": 350, "bytes_in": 1000, "bytes_out": 30,
                "events_accepted": 10, "events_rejected": 1
            })
        );
        assert_eq!((rows[1].1.seq, rows[1].1.status), (2, 401));
        assert_eq!(rows[1].1.tenant, "");
        assert!(decode(&buffer.rows[..buffer.rows.len() - 1]).is_err());
        assert_eq!(log.take().count, 0);
        let (a, b) = (log.request_id(1), log.request_id(2));
        assert_eq!(a.len(), 32);
        let seq = 0x0123_4567_89ab_cdef;
        assert_eq!(log.request_id(seq), format!("{}{seq:016x}", &a[..16]));
        assert_ne!(a, b);
        assert_ne!(a, UsageLog::new("host-1".into()).request_id(1));
    }

    #[test]
    fn the_columns_are_the_tables() {
        let sql = include_str!("../clickhouse-init/04_usage_log.sql");
        let declared: Vec<&str> = sql
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .skip_while(|w| *w != "(")
            .skip(1)
            .take_while(|w| *w != ")")
            .collect();
        let names: Vec<&str> = COLUMNS.iter().map(|(name, _)| *name).collect();
        assert_eq!(declared, names);
        crate::clickhouse::schema::assert_declares(sql, COLUMNS);
    }
}
