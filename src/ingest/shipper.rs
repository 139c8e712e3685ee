//! The background writer: drains the write-ahead log into ClickHouse in large batches.
//!
//! ```text
//!  WAL files ──read up to the durable position──▶ batch (≤ max_rows, ≤ max_bytes, ≤ interval)
//!      ──INSERT … FORMAT Native (LZ4)──▶ ClickHouse ──ok──▶ checkpoint + retire old segments
//!                                               │                + publish the committed lsn
//!                                               └─error──▶ data error: split the batch, bad rows
//!                                                          to the dead-letter file
//!                                                          anything else: back off, retry
//! ```
//!
//! One insert at a time, about one per `interval` under steady load: few, large parts, which is
//! what MergeTree wants. Nothing is deleted from the log before ClickHouse has acknowledged it.
//!
//! The log holds RowBinary rows; each batch goes to ClickHouse as one Native block (columns,
//! with `LowCardinality` columns as a dictionary: far less work for ClickHouse to read, see
//! `clickhouse::native`). A block ClickHouse refuses is sent again at once as its RowBinary
//! rows, and only that answer counts, so a fault in the transposition can cost a retry but
//! never sends good rows to the dead-letter file.

use std::{
    io::Write,
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use anyhow::Context;
use bytes::Bytes;
use tokio::sync::watch;

use super::{
    refused::RefusedRows,
    wal::{self, Shared, WalPos, WalReader},
    Refusals,
};
use crate::{
    clickhouse::{
        error_code, insert_sql, is_data_error, native::Layout, refused_what_was_sent, rowbinary,
    },
    config::FlushSettings,
    metrics::Metrics,
};

/// What the shipper needs to know about the rows of its table.
pub trait RowFormat: Send + 'static {
    /// The table, and its columns with their types in the order of the rows.
    fn table(&self) -> (&'static str, &'static [(&'static str, &'static str)]);
    /// Where each row of `rows` starts and ends (to split a batch ClickHouse refused).
    fn row_bounds(&self, rows: &[u8]) -> Vec<std::ops::Range<usize>>;
    /// The rows for a person reading the dead-letter file: (field name, rows as JSON).
    fn describe(&self, rows: &[u8]) -> (&'static str, serde_json::Value);
    /// The dead-letter file's name starts with this.
    fn dead_letter_name(&self) -> &'static str;
    /// Sees every batch once before it is sent.
    fn inspect(&mut self, _rows: &[u8], _metrics: &Metrics) {}
}

/// Events, as `rowbinary` encodes them.
#[derive(Default)]
pub struct EventRows {
    recent: RecentIds,
}

impl RowFormat for EventRows {
    fn table(&self) -> (&'static str, &'static [(&'static str, &'static str)]) {
        ("events", rowbinary::COLUMNS)
    }

    fn row_bounds(&self, rows: &[u8]) -> Vec<std::ops::Range<usize>> {
        rowbinary::row_bounds(rows).unwrap_or_default()
    }

    fn describe(&self, rows: &[u8]) -> (&'static str, serde_json::Value) {
        let events = rowbinary::decode_all(rows).unwrap_or_default();
        ("events", serde_json::json!(events))
    }

    fn dead_letter_name(&self) -> &'static str {
        "dead-letter"
    }

    fn inspect(&mut self, rows: &[u8], metrics: &Metrics) {
        self.recent.count(rows, metrics);
    }
}

/// Usage-log rows, as `usage::UsageRow::encode` writes them.
pub struct UsageRows;

impl RowFormat for UsageRows {
    fn table(&self) -> (&'static str, &'static [(&'static str, &'static str)]) {
        ("usage_log", crate::usage::COLUMNS)
    }

    fn row_bounds(&self, rows: &[u8]) -> Vec<std::ops::Range<usize>> {
        crate::usage::decode(rows)
            .map(|rows| rows.into_iter().map(|(bounds, _)| bounds).collect())
            .unwrap_or_default()
    }

    fn describe(&self, rows: &[u8]) -> (&'static str, serde_json::Value) {
        let decoded: Vec<_> = crate::usage::decode(rows)
            .unwrap_or_default()
            .into_iter()
            .map(|(_, row)| row)
            .collect();
        ("rows", serde_json::json!(decoded))
    }

    fn dead_letter_name(&self) -> &'static str {
        "usage_log"
    }
}

/// How often an open batch takes in what the log has made durable since.
const POLL: Duration = Duration::from_millis(20);

pub struct Shipper<F: RowFormat> {
    pub format: F,
    pub client: clickhouse::Client,
    /// Set when the service started without ClickHouse: the schema is applied and checked
    /// before the first insert.
    pub schema: Option<crate::startup::SchemaSetup>,
    pub settings: FlushSettings,
    pub wal_dir: PathBuf,
    pub start: WalPos,
    pub durable: watch::Receiver<WalPos>,
    pub committed: watch::Sender<u64>,
    /// Where refused rows are noted by record, for requests waiting on their commit.
    pub refusals: Option<Refusals>,
    pub shared: Arc<Shared>,
    pub metrics: Arc<Metrics>,
    /// Turns true when the service stops: drain what is durable, then return.
    pub stopping: watch::Receiver<bool>,
    /// How long the final drain may keep retrying a failing ClickHouse.
    pub drain_timeout: Duration,
}

/// How a batch goes in: as one Native block when the table's columns have a layout, else (and
/// as a second try after a refused block) as its RowBinary rows.
struct Statements {
    row_binary: String,
    native: Option<(String, Layout)>,
    /// The last block's memory, for the next one: a batch's block is as large as the batch,
    /// and a new allocation each time would leave the allocator holding several.
    spare: std::sync::Mutex<Vec<u8>>,
    /// The most memory `spare` keeps (a block from an unusually large batch is let go).
    spare_limit: usize,
}

impl Statements {
    fn new(format: &impl RowFormat, spare_limit: usize) -> Self {
        let (table, columns) = format.table();
        let native = Layout::new(columns);
        if native.is_none() {
            tracing::warn!(
                table,
                "a column type has no Native layout; sending RowBinary"
            );
        }
        Statements {
            row_binary: insert_sql(table, columns, "RowBinary"),
            native: native.map(|layout| (insert_sql(table, columns, "Native"), layout)),
            spare: Default::default(),
            spare_limit,
        }
    }

    /// Memory for the next block (empty the first time).
    fn take_spare(&self) -> Vec<u8> {
        std::mem::take(&mut *self.spare.lock().unwrap())
    }

    /// Keeps a sent block's memory for the next one, unless something still holds it or it
    /// grew past the limit.
    fn keep_spare(&self, block: Bytes) {
        if let Ok(spare) = block.try_into_mut() {
            if spare.capacity() <= self.spare_limit {
                *self.spare.lock().unwrap() = spare.into();
            }
        }
    }
}

/// Completes when the drain time is over: at `deadline` once the stop has been seen, else
/// `drain` after the stop comes (never, while the service runs).
async fn drain_over(stopping: watch::Receiver<bool>, deadline: Option<Instant>, drain: Duration) {
    let deadline = match deadline {
        Some(deadline) => deadline,
        None => {
            stopped(stopping).await;
            Instant::now() + drain
        }
    };
    tokio::time::sleep_until(deadline.into()).await;
}

/// Completes when the service stops (never, should nobody be left to say so).
async fn stopped(mut stopping: watch::Receiver<bool>) {
    if stopping.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

struct Batch {
    rows: Vec<u8>,
    /// Per record in the batch: where its rows end in `rows`, and its sequence number.
    records: Vec<(usize, u64)>,
    count: usize,
    wal_bytes: u64,
    end: WalPos,
    started: Option<Instant>,
    /// Parts of `rows` already written to the dead-letter file, so that a retry of the batch
    /// (after a network error) does not write them again.
    dead_lettered: Vec<std::ops::Range<usize>>,
}

impl<F: RowFormat> Shipper<F> {
    pub async fn run(mut self) {
        let mut reader = WalReader::new(&self.wal_dir, self.start);
        let mut batch = Batch {
            rows: Vec::new(),
            records: Vec::new(),
            count: 0,
            wal_bytes: 0,
            end: self.start,
            started: None,
            dead_lettered: Vec::new(),
        };
        let statements = Statements::new(&self.format, self.settings.max_bytes);
        let mut drain_deadline: Option<Instant> = None;

        loop {
            let stopping = *self.stopping.borrow();
            self.drain_deadline(&mut drain_deadline);
            // Fill the batch from what is durable.
            let durable = *self.durable.borrow_and_update();
            let mut caught_up = false;
            while batch.count < self.settings.max_rows && batch.rows.len() < self.settings.max_bytes
            {
                match reader.next(durable, &mut batch.rows) {
                    Ok(Some(record)) => {
                        batch.started.get_or_insert_with(Instant::now);
                        batch.count += record.rows as usize;
                        batch.records.push((batch.rows.len(), record.lsn));
                        batch.wal_bytes += record.disk_bytes();
                        batch.end = record.end;
                    }
                    Ok(None) => {
                        caught_up = true;
                        break;
                    }
                    Err(err) => {
                        tracing::error!(error = %err, "reading the write-ahead log failed");
                        caught_up = true;
                        break;
                    }
                }
            }

            let full = batch.count >= self.settings.max_rows
                || batch.rows.len() >= self.settings.max_bytes;
            let due = batch
                .started
                .is_some_and(|t| t.elapsed() >= self.settings.interval);
            if batch.count > 0 && (full || due || stopping) {
                self.format.inspect(&batch.rows, &self.metrics);
                let committed = self
                    .flush(&statements, &mut batch, &mut drain_deadline)
                    .await;
                if !committed {
                    // Only while stopping: the drain time ran out before ClickHouse took it.
                    tracing::warn!(
                        rows = batch.count,
                        "stopping with events still in the write-ahead log; they are sent on the next start"
                    );
                    return;
                }
                continue;
            }
            if stopping && caught_up && batch.count == 0 {
                return;
            }
            if !caught_up {
                continue;
            }
            // Wait for new durable records, the batch's deadline, or shutdown.
            let wait = batch.started.map_or(self.settings.interval, |t| {
                self.settings.interval.saturating_sub(t.elapsed())
            });
            if batch.count == 0 {
                tokio::select! {
                    _ = self.durable.changed() => {}
                    _ = self.stopping.changed() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
            } else {
                // A batch is open: look at the log again every POLL rather than at each of its
                // (thousands per second) group commits; reading more often gains nothing, the
                // batch is sent at its deadline or when full.
                tokio::select! {
                    _ = self.stopping.changed() => {}
                    _ = tokio::time::sleep(wait.min(POLL)) => {}
                }
            }
        }
    }

    /// The drain deadline: `drain_timeout` after the stop was first seen (`None` until then).
    fn drain_deadline(&self, deadline: &mut Option<Instant>) -> Option<Instant> {
        if deadline.is_none() && *self.stopping.borrow() {
            *deadline = Some(Instant::now() + self.drain_timeout);
        }
        *deadline
    }

    /// Commits the batch, retrying until it is in ClickHouse or in the dead-letter file, and
    /// returns true. Returns false, with the batch untouched, only when the service is stopping
    /// and the drain deadline has come (or would pass before the next attempt); an attempt
    /// under way then is given up (ClickHouse may have taken it: the next start sends the
    /// records again, and the table collapses the copies).
    async fn flush(
        &mut self,
        statements: &Statements,
        batch: &mut Batch,
        deadline: &mut Option<Instant>,
    ) -> bool {
        let mut backoff = Duration::from_millis(100);
        let rows = Bytes::from(std::mem::take(&mut batch.rows));
        let mut inserted = false;
        loop {
            let started = Instant::now();
            let drain_over = drain_over(
                self.stopping.clone(),
                self.drain_deadline(deadline),
                self.drain_timeout,
            );
            let attempt = async {
                if !inserted {
                    self.ensure_schema().await.map_err(Failure::ClickHouse)?;
                    self.insert_or_dead_letter(
                        statements,
                        rows.clone(),
                        &batch.records,
                        &mut batch.dead_lettered,
                    )
                    .await?;
                    inserted = true;
                }
                // Recorded before the commit is announced: a replay after a crash must never
                // re-insert rows a user's data deletion (which waits for the commit) removed.
                wal::checkpoint(&self.wal_dir, batch.end).map_err(Failure::Local)
            };
            let attempt = tokio::select! {
                attempt = attempt => attempt,
                () = drain_over => {
                    batch.rows = rows.to_vec();
                    return false;
                }
            };
            match attempt {
                Ok(()) => {
                    self.metrics.flush_seconds.observe(started.elapsed());
                    self.metrics.flushes.fetch_add(1, Ordering::Relaxed);
                    self.metrics
                        .flushed_rows
                        .fetch_add(batch.count as u64, Ordering::Relaxed);
                    self.committed(batch);
                    // Keep the buffer (its pages are faulted in already) for the next batch,
                    // unless a full batch made it larger than batches usually are.
                    if let Ok(buffer) = rows.try_into_mut() {
                        if buffer.capacity() <= self.settings.max_bytes {
                            batch.rows = buffer.into();
                            batch.rows.clear();
                        }
                    }
                    return true;
                }
                Err(Failure::ClickHouse(err)) => {
                    self.metrics
                        .clickhouse_errors_retryable
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %format!("{err:#}"), rows = batch.count, retry_in = ?backoff, "insert into ClickHouse failed; retrying");
                }
                Err(Failure::Local(err)) => {
                    tracing::error!(error = %format!("{err:#}"), rows = batch.count, retry_in = ?backoff, "a batch cannot be completed on this machine's disk; retrying");
                }
            }
            if self
                .drain_deadline(deadline)
                .is_some_and(|d| Instant::now() + backoff >= d)
            {
                batch.rows = rows.to_vec();
                return false;
            }
            // A stop during the pause starts the drain's attempts at once.
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = stopped(self.stopping.clone()), if deadline.is_none() => {}
            }
            backoff = (backoff * 2).min(self.settings.max_backoff);
        }
    }

    async fn ensure_schema(&mut self) -> anyhow::Result<()> {
        if let Some(schema) = &self.schema {
            schema.prepare(&self.client).await?;
            tracing::info!("ClickHouse answers and the schema is in place; sending the log");
            self.schema = None;
        }
        Ok(())
    }

    /// The batch is in ClickHouse (or the dead-letter file) and the checkpoint past it is
    /// written: announces it and empties the batch.
    fn committed(&mut self, batch: &mut Batch) {
        self.shared
            .pending_bytes
            .fetch_sub(batch.wal_bytes, Ordering::Relaxed);
        self.committed.send_replace(batch.end.lsn);
        batch.rows.clear();
        batch.records.clear();
        batch.count = 0;
        batch.wal_bytes = 0;
        batch.started = None;
        batch.dead_lettered.clear();
    }

    /// Inserts `rows` (the rows of `records`, see `Batch`). A data error splits them in halves
    /// until the bad rows are isolated and written to the dead-letter file (the parts in
    /// `dead_lettered` are there already), and their records noted as refused; the good rows
    /// still reach ClickHouse. Any other error, or a dead-letter file that cannot be written,
    /// is returned for the caller to retry.
    async fn insert_or_dead_letter(
        &self,
        statements: &Statements,
        rows: Bytes,
        records: &[(usize, u64)],
        dead_lettered: &mut Vec<std::ops::Range<usize>>,
    ) -> Result<(), Failure> {
        let batch = rows.clone();
        // (where in the batch the rows start, rows)
        let mut pending = vec![(0, rows)];
        while let Some((at, rows)) = pending.pop() {
            let part = at..at + rows.len();
            if dead_lettered.contains(&part) {
                continue;
            }
            match insert_rows(&self.client, &self.metrics, statements, rows.clone()).await {
                Ok(()) => {}
                Err(err) if is_data_error(&err) => {
                    self.metrics
                        .clickhouse_errors_data
                        .fetch_add(1, Ordering::Relaxed);
                    let bounds = self.format.row_bounds(&rows);
                    if bounds.len() > 1 {
                        let mid = bounds[bounds.len() / 2].start;
                        pending.push((at + mid, rows.slice(mid..)));
                        pending.push((at, rows.slice(..mid)));
                        continue;
                    }
                    // One row, or (never written so) rows that do not split: every record
                    // they touch is reported refused to its waiting request.
                    let lsns = records_within(records, part.clone());
                    let described = self.format.describe(&rows);
                    let event_id = described.1[0]["event_id"].as_str().map(str::to_owned);
                    let count = self
                        .dead_letter(&rows, described, &err, lsns[0])
                        .map_err(Failure::Local)?;
                    dead_lettered.push(part);
                    if let Some(refusals) = &self.refusals {
                        let row = match (lsns.len(), bounds.len(), event_id) {
                            (1, 1, Some(id)) => self
                                .position_in_record(&batch, records, at)
                                .map(|position| (position, id)),
                            _ => None,
                        };
                        for lsn in lsns {
                            let row = row.clone();
                            refusals.note(lsn, at, RefusedRows { count, row });
                        }
                    }
                }
                Err(err) => return Err(Failure::ClickHouse(err.into())),
            }
        }
        Ok(())
    }

    /// The position of the row at byte `at` of `batch` among the rows of its record.
    fn position_in_record(&self, batch: &[u8], records: &[(usize, u64)], at: usize) -> Option<u32> {
        let record = records.partition_point(|&(end, _)| end <= at);
        let start = record.checked_sub(1).map_or(0, |before| records[before].0);
        Some(self.format.row_bounds(batch.get(start..at)?).len() as u32)
    }

    /// Writes refused rows of record `lsn` (and `describe`'s reading of them) to the dead-letter
    /// file, synced; returns how many.
    fn dead_letter(
        &self,
        rows: &[u8],
        (field, described): (&'static str, serde_json::Value),
        err: &clickhouse::error::Error,
        lsn: u64,
    ) -> anyhow::Result<u32> {
        let count = described.as_array().map_or(0, Vec::len).max(1);
        let mut line = serde_json::json!({
            "at": chrono::Utc::now().to_rfc3339(),
            "reason": err.to_string(),
            "code": error_code(err),
            "wal_lsn": lsn,
        });
        if described.as_array().is_some_and(|rows| !rows.is_empty()) {
            line[field] = described;
        } else {
            line["raw_hex"] = hex(rows).into();
        }
        let path = self.settings.dead_letter_dir.join(format!(
            "{}-{}.ndjson",
            self.format.dead_letter_name(),
            chrono::Utc::now().format("%Y%m%d")
        ));
        let written = std::fs::create_dir_all(&self.settings.dead_letter_dir)
            .and_then(|()| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
            })
            .and_then(|mut file| {
                writeln!(file, "{line}")?;
                file.sync_data()
            });
        // Not written: the rows stay in the log and the batch is tried again.
        written.with_context(|| {
            format!(
                "ClickHouse refused rows ({err}) and the dead-letter file {} could not be written",
                path.display()
            )
        })?;
        tracing::error!(rows = count, file = %path.display(), reason = %err, "ClickHouse refused rows; written to the dead-letter file");
        self.metrics
            .dead_lettered_events
            .fetch_add(count as u64, Ordering::Relaxed);
        Ok(count as u32)
    }
}

/// Why a batch could not be completed (both are retried).
enum Failure {
    /// ClickHouse did not answer, or failed in a way that is not about the rows.
    ClickHouse(anyhow::Error),
    /// This machine's disk: the dead-letter file or the log's checkpoint.
    Local(anyhow::Error),
}

/// The sequence numbers of the records whose rows lie in bytes `part` of a batch (at least
/// one).
fn records_within(records: &[(usize, u64)], part: std::ops::Range<usize>) -> Vec<u64> {
    let first = records.partition_point(|&(end, _)| end <= part.start);
    // A record starts where the one before it ends.
    let mut lsns: Vec<u64> = records[first..]
        .iter()
        .scan(part.start, |start, &(end, lsn)| {
            (*start < part.end).then(|| {
                *start = end;
                lsn
            })
        })
        .collect();
    if lsns.is_empty() {
        lsns.extend(records.last().map(|&(_, lsn)| lsn));
    }
    lsns
}

/// The identities of the last two batches, to count re-sent events. Counting only: every
/// copy is inserted (the table keeps the last received one), and a re-send that arrives
/// further apart is collapsed by ClickHouse without being counted here.
#[derive(Default)]
struct RecentIds {
    previous: foldhash::HashSet<(u64, u128)>,
}

impl RecentIds {
    fn count(&mut self, rows: &[u8], metrics: &Metrics) {
        let mut current = foldhash::HashSet::with_capacity_and_hasher(
            self.previous.len(),
            foldhash::fast::RandomState::default(),
        );
        let mut duplicates = 0u64;
        let walked = rowbinary::for_each_identity(rows, |tenant, id| {
            let key = (tenant_key(tenant), id);
            if self.previous.contains(&key) || !current.insert(key) {
                duplicates += 1;
            }
        });
        if walked.is_ok() {
            metrics
                .duplicate_events
                .fetch_add(duplicates, Ordering::Relaxed);
        }
        self.previous = current;
    }
}

fn tenant_key(tenant: &[u8]) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::default().hash_one(tenant)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Inserts `rows` as one Native block, or as RowBinary when the table has no layout. When
/// ClickHouse refuses the block with an exception that may be about what was sent (anything
/// but "not now": see `refused_what_was_sent`), the rows go again at once as RowBinary, and
/// what that attempt says is what counts: a rejection that was in fact about how the block
/// was made can cost a retry, but never sends good rows to the dead-letter file or holds the
/// log up. Everything else (no answer, an overloaded server) is returned for the caller's
/// backoff, as it was.
async fn insert_rows(
    client: &clickhouse::Client,
    metrics: &Metrics,
    statements: &Statements,
    rows: Bytes,
) -> Result<(), clickhouse::error::Error> {
    let Some((sql, layout)) = &statements.native else {
        return insert(client, &statements.row_binary, rows).await;
    };
    let mut block = statements.take_spare();
    let failure = match layout.block_into(&rows, &mut block) {
        Ok(()) => {
            let block = Bytes::from(block);
            let inserted = insert(client, sql, block.clone()).await;
            statements.keep_spare(block);
            match inserted {
                Err(err) if refused_what_was_sent(&err) => err.to_string(),
                inserted => return inserted,
            }
        }
        Err(err) => err.to_string(),
    };
    let inserted = insert(client, &statements.row_binary, rows).await;
    match &inserted {
        Ok(()) => {
            metrics.native_fallbacks.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %failure, "ClickHouse took as RowBinary rows a batch whose Native block it refused (or that could not be made)");
        }
        // Both refused: the rows themselves, as when a batch is split to find a bad row.
        Err(_) => tracing::debug!(error = %failure, "the Native block was refused too"),
    }
    inserted
}

async fn insert(
    client: &clickhouse::Client,
    sql: &str,
    rows: Bytes,
) -> Result<(), clickhouse::error::Error> {
    let mut insert = client
        .insert_formatted_with(sql)
        .with_timeouts(Some(Duration::from_secs(30)), Some(Duration::from_secs(60)));
    insert.send(rows).await?;
    insert.end().await
}

#[cfg(test)]
mod tests {
    use clickhouse::test::{handlers, Mock};

    use super::*;
    use crate::usage::UsageRow;

    #[test]
    fn rows_are_traced_to_the_records_they_came_from() {
        // Records 5, 6, 7 hold bytes 0..100, 100..250, 250..300.
        let records = [(100, 5), (250, 6), (300, 7)];
        assert_eq!(records_within(&records, 0..10), [5]);
        assert_eq!(records_within(&records, 90..100), [5]);
        assert_eq!(records_within(&records, 100..120), [6]);
        assert_eq!(records_within(&records, 240..250), [6]);
        assert_eq!(records_within(&records, 250..300), [7]);
        assert_eq!(records_within(&records, 90..260), [5, 6, 7]);
        assert_eq!(records_within(&records, 0..300), [5, 6, 7]);
    }

    /// Two usage rows. The mock hands a request's body over as text, so every number is small
    /// enough that each byte of the rows, and of their Native block, is ASCII.
    fn usage_rows() -> Bytes {
        let mut rows = Vec::new();
        for (seq, route) in [(1, "/v1/events"), (2, "/v1/stats/summary")] {
            UsageRow {
                time: chrono::DateTime::UNIX_EPOCH,
                request_id: "r",
                instance_id: "host-1",
                seq,
                tenant: "acme",
                key_id: "k",
                method: "GET",
                route,
                status: 99,
                latency_us: 10,
                bytes_in: 0,
                bytes_out: 5,
                events_accepted: 0,
                events_rejected: 0,
            }
            .encode(&mut rows);
        }
        rows.into()
    }

    fn mock_client(mock: &Mock) -> clickhouse::Client {
        clickhouse::Client::default()
            .with_url(mock.url())
            .with_compression(clickhouse::Compression::None)
    }

    #[tokio::test]
    async fn a_batch_goes_as_one_native_block() {
        let mock = Mock::new();
        let sent = mock.add(handlers::record_ddl());
        let metrics = Metrics::default();
        let statements = Statements::new(&UsageRows, usize::MAX);
        let rows = usage_rows();
        insert_rows(&mock_client(&mock), &metrics, &statements, rows.clone())
            .await
            .unwrap();
        let (_, layout) = statements.native.as_ref().unwrap();
        assert_eq!(
            sent.query().await.into_bytes(),
            layout.block(&rows).unwrap()
        );
        assert_eq!(metrics.native_fallbacks.load(Ordering::Relaxed), 0);
    }

    async fn send(
        mock: &Mock,
        metrics: &Metrics,
        rows: Bytes,
    ) -> Result<(), clickhouse::error::Error> {
        let statements = Statements::new(&UsageRows, usize::MAX);
        insert_rows(&mock_client(mock), metrics, &statements, rows).await
    }

    #[tokio::test]
    async fn a_refused_native_block_goes_again_as_row_binary_and_that_answer_counts() {
        let mock = Mock::new();
        let metrics = Metrics::default();
        let rows = usage_rows();
        mock.add(handlers::exception(27)); // CANNOT_PARSE_INPUT_ASSERTION_FAILED
        let sent = mock.add(handlers::record_ddl());
        send(&mock, &metrics, rows.clone()).await.unwrap();
        assert_eq!(sent.query().await.into_bytes(), rows.to_vec());
        assert_eq!(metrics.native_fallbacks.load(Ordering::Relaxed), 1);

        // Refused both ways: the RowBinary answer is the one returned, nothing is counted.
        mock.add(handlers::exception(27));
        mock.add(handlers::exception(53));
        let refused = send(&mock, &metrics, rows.clone()).await.unwrap_err();
        assert!(refused.to_string().contains("Code: 53"), "{refused}");
        assert_eq!(metrics.native_fallbacks.load(Ordering::Relaxed), 1);

        // Rows that do not lay out as a block go as RowBinary at once.
        let torn = rows.slice(..10);
        let sent = mock.add(handlers::record_ddl());
        send(&mock, &metrics, torn.clone()).await.unwrap();
        assert_eq!(sent.query().await.into_bytes(), torn.to_vec());
        assert_eq!(metrics.native_fallbacks.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_batch_retried_after_a_network_error_writes_its_refused_rows_once() {
        let mock = Mock::new();
        let dir = tempfile::tempdir().unwrap();
        let (_, durable) = watch::channel(WalPos::default());
        let (stop, stopping) = watch::channel(false);
        let shipper = Shipper {
            format: UsageRows,
            client: mock_client(&mock),
            schema: None,
            settings: FlushSettings {
                max_rows: 100,
                max_bytes: 1 << 20,
                interval: Duration::from_secs(1),
                max_backoff: Duration::from_millis(10),
                dead_letter_dir: dir.path().to_path_buf(),
            },
            wal_dir: dir.path().to_path_buf(),
            start: WalPos::default(),
            durable,
            committed: watch::channel(0).0,
            refusals: Some(Refusals::default()),
            shared: Default::default(),
            metrics: Default::default(),
            stopping,
            drain_timeout: Duration::from_secs(1),
        };
        let statements = Statements::new(&UsageRows, usize::MAX);
        let rows = usage_rows();
        let bounds = UsageRows.row_bounds(&rows);
        let records = [(bounds[0].end, 1), (bounds[1].end, 2)];
        let mut dead_lettered = Vec::new();
        // Both rows refused (as a Native block, then as RowBinary), the first alone too; the
        // second is not taken for a moment.
        let refused = || handlers::exception(53); // TYPE_MISMATCH
        for _ in 0..4 {
            mock.add(refused());
        }
        mock.add(handlers::failure(poem::http::StatusCode::BAD_GATEWAY));
        let first = shipper
            .insert_or_dead_letter(&statements, rows.clone(), &records, &mut dead_lettered)
            .await;
        assert!(matches!(first, Err(Failure::ClickHouse(_))));
        // Tried again: both refused, the first is in the dead-letter file already, the second
        // goes in.
        mock.add(refused());
        mock.add(refused());
        let second_row = mock.add(handlers::record_ddl());
        shipper
            .insert_or_dead_letter(&statements, rows.clone(), &records, &mut dead_lettered)
            .await
            .map_err(|_| "the retry failed")
            .unwrap();
        let (_, layout) = statements.native.as_ref().unwrap();
        assert_eq!(
            second_row.query().await.into_bytes(),
            layout.block(&rows[bounds[1].clone()]).unwrap()
        );
        let file = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|f| f.unwrap().path())
            .find(|p| p.to_string_lossy().contains("usage_log"))
            .unwrap();
        let text = std::fs::read_to_string(file).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert_eq!(
            shipper.metrics.dead_lettered_events.load(Ordering::Relaxed),
            1
        );
        let refusals = shipper.refusals.as_ref().unwrap();
        let first = refusals.take(1).unwrap();
        assert_eq!(first.iter().map(|r| r.count).sum::<u32>(), 1);
        assert_eq!(refusals.take(2), Some(vec![]));
        drop(stop);
    }

    #[tokio::test]
    async fn a_server_that_says_not_now_is_left_to_the_backoff() {
        let mock = Mock::new();
        let metrics = Metrics::default();
        // One answer each: a second attempt would find no handler and fail differently.
        mock.add(handlers::exception(252)); // TOO_MANY_PARTS
        let err = send(&mock, &metrics, usage_rows()).await.unwrap_err();
        assert!(err.to_string().contains("Code: 252"), "{err}");
        mock.add(handlers::failure(poem::http::StatusCode::BAD_GATEWAY));
        let err = send(&mock, &metrics, usage_rows()).await.unwrap_err();
        assert!(err.to_string().contains("Bad Gateway"), "{err}");
        assert_eq!(metrics.native_fallbacks.load(Ordering::Relaxed), 0);
    }
}
