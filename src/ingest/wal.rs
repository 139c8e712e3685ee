//! The write-ahead log: what makes a `202 Accepted` mean "on disk".
//!
//! ```text
//!  handlers ──append(rows)──▶ [channel] ──▶ log thread: write many records, ONE fdatasync,
//!     ▲                                        │        then publish the durable position
//!     └──────────── ack(lsn) ◀─────────────────┘        and answer every waiting handler
//! ```
//!
//! The log is a directory of numbered segment files. A record is
//! `len u32 | crc32 u32 | lsn u64 | rows u32 | payload` (little-endian; the CRC covers
//! everything after itself), where the payload is RowBinary rows of the log's table.
//! Group commit: while one fsync runs, new requests queue up and share the next one; and a
//! group starts at most once per `Durability::min_group_interval`, so under load each fsync
//! (and each wake-up of the log thread) serves more requests, while a lone request after a
//! quiet moment is written at once.
//! Segments are zero-filled to their full size before use (in the background, one segment
//! ahead), so an append never changes the file's size and `fdatasync` never has to commit
//! file-system metadata: measured here under concurrent disk writes, that took the fsync p99
//! from 13 ms (appending) to 0.2 ms (overwriting preallocated space).
//! Zero-filling is itself a burst of writes (64 MB by default) that holds up the log's own
//! fsyncs while the disk takes it (10–20 ms here), so committed segments are reused instead:
//! up to [`MAX_SPARES`] of them are kept as spares (`<id>.spare`) and a new segment is made
//! from one when there is one. A reused segment still holds old records after the new ones;
//! they are told apart by their sequence numbers (records of a segment are numbered without
//! gaps, old ones are numbered lower), and its first record header is zeroed before it is
//! used, so that an old record is never taken for the first new one.
//! Every group is written with an end marker (a zeroed record header) after it, in the same
//! write and fsync, so reading stops after the newest group. A group whose write or fsync
//! failed (its requests got an error) may still reach the disk, numbered like the records
//! written in its place: the next group writes zeros over all of it, and until then the
//! segment is not switched. Until a group succeeds again the log reports itself unhealthy;
//! readiness then sends a probe, a group without records (just the end marker, synced).
//!
//! The writer to ClickHouse (`shipper`) reads records back from the files up to the durable
//! position and records how far ClickHouse has committed in a checkpoint file; segments wholly
//! before the checkpoint are retired (kept as spares, or deleted). After a crash, recovery
//! ends each segment's records before a torn last record (bad length or CRC) or an old one
//! (out of sequence), by zeroing the header there, and the shipper replays from the
//! checkpoint; events replayed that were already inserted are collapsed by the table's
//! `event_id` key.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, BufReader, Read, Seek, SeekFrom, Write},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::metrics::Metrics;

const HEADER_LEN: usize = 20;
/// A record larger than this is corruption, not data (requests are limited far below it).
const MAX_RECORD_LEN: usize = 256 * 1024 * 1024;
/// The log thread writes at most this much per fsync, so one huge burst cannot delay acks.
const MAX_GROUP_BYTES: usize = 8 * 1024 * 1024;
/// Committed segments kept for reuse (see the module documentation), per log.
const MAX_SPARES: usize = 2;
/// A spare not reused within this time is deleted (at the next commit or start): it holds
/// committed events, which need not stay on the service's disk.
const SPARE_MAX_AGE: Duration = Duration::from_secs(600);

/// How records are made durable.
#[derive(Debug, Clone, Copy)]
pub struct Durability {
    /// `fdatasync` after each group (off only to measure the rest of the pipeline).
    pub fsync: bool,
    /// A group is started at most this often (measured on 2 cores at saturation: 500 µs
    /// took fsyncs from ~3,300/s to ~1,250/s and CPU per request down ~10 %).
    pub min_group_interval: Duration,
}

impl Durability {
    /// fsync every group, start each group as soon as a record waits (tests).
    pub const IMMEDIATE: Self = Self {
        fsync: true,
        min_group_interval: Duration::ZERO,
    };
}

/// A position in the log: just after the record with sequence number `lsn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct WalPos {
    pub segment: u64,
    pub offset: u64,
    pub lsn: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("the write-ahead log is over its disk budget")]
    Full,
    #[error("the write-ahead log is closed")]
    Closed,
    #[error("write-ahead log I/O failed: {0}")]
    Io(String),
}

struct AppendRequest {
    /// RowBinary rows and how many; `None` for a probe, which adds no record: its group is
    /// written and synced all the same (with no other request in it, just an end marker).
    record: Option<(Vec<u8>, u32)>,
    done: oneshot::Sender<Result<u64, AppendError>>,
}

/// Cheap to clone; used by request handlers to append.
#[derive(Clone)]
pub struct WalHandle {
    tx: mpsc::Sender<AppendRequest>,
    shared: Arc<Shared>,
}

/// State both sides of the log read.
#[cfg_attr(test, derive(Default))]
pub struct Shared {
    /// Bytes of records not yet committed to ClickHouse: the disk budget is checked on this.
    pub pending_bytes: AtomicU64,
    pub max_pending_bytes: u64,
    /// Set when a group's write or fsync fails, cleared when a later group (or probe)
    /// succeeds: readiness reports it.
    failing: AtomicBool,
}

impl WalHandle {
    /// Appends `rows` RowBinary rows and returns their sequence number once they are durable.
    pub async fn append(&self, payload: Vec<u8>, rows: u32) -> Result<u64, AppendError> {
        let size = (payload.len() + HEADER_LEN) as u64;
        if self.shared.pending_bytes.load(Ordering::Relaxed) + size > self.shared.max_pending_bytes
        {
            return Err(AppendError::Full);
        }
        let (done, ack) = oneshot::channel();
        self.tx
            .send(AppendRequest {
                record: Some((payload, rows)),
                done,
            })
            .await
            .map_err(|_| AppendError::Closed)?;
        ack.await.map_err(|_| AppendError::Closed)?
    }

    /// Whether the log can write and sync. After a failed group it finds out: a probe writes
    /// the end marker where the log ends and syncs it (what a group does), waiting at most
    /// `timeout` (a failing disk may hang).
    pub async fn probe(&self, timeout: Duration) -> bool {
        if self.is_healthy() {
            return true;
        }
        let probed = async {
            let (done, ack) = oneshot::channel();
            let request = AppendRequest { record: None, done };
            self.tx.send(request).await.is_ok() && matches!(ack.await, Ok(Ok(_)))
        };
        tokio::time::timeout(timeout, probed).await.unwrap_or(false)
    }

    pub fn pending_bytes(&self) -> u64 {
        self.shared.pending_bytes.load(Ordering::Relaxed)
    }

    /// False from a group's failed write or fsync (its requests got an error; later groups
    /// are tried as usual) until a later group or probe succeeds.
    pub fn is_healthy(&self) -> bool {
        !self.shared.failing.load(Ordering::Relaxed)
    }
}

/// What `open` hands to the rest of the pipeline.
pub struct Wal {
    pub handle: WalHandle,
    /// The position up to which records are on disk (advanced after every fsync).
    pub durable: watch::Receiver<WalPos>,
    /// Where the shipper starts reading: the checkpoint, or the oldest record.
    pub start: WalPos,
    pub dir: PathBuf,
    /// Joins the log thread; it ends when every `WalHandle` is dropped.
    pub thread: std::thread::JoinHandle<()>,
    pub shared: Arc<Shared>,
}

/// Opens (recovering if needed) the log in `dir` and starts the log thread.
pub fn open(
    dir: &Path,
    segment_bytes: u64,
    max_pending_bytes: u64,
    durability: Durability,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Wal> {
    fs::create_dir_all(dir).with_context(|| format!("creating WAL dir {}", dir.display()))?;
    // While the disk has room: later checkpoints are written into these.
    prepare_slots(dir).context("creating the WAL checkpoint slots")?;
    keep_unfinished_segments_as_spares(dir)?;
    let segments = list_segments(dir)?;
    let checkpoint = read_checkpoint(dir);
    // Without a checkpoint the numbering may start again below the spares' old records.
    let max_age = checkpoint.map_or(Duration::ZERO, |_| SPARE_MAX_AGE);
    remove_spares_older_than(dir, max_age)?;

    // Recover every segment: find its valid length and last lsn; cut torn tails.
    let mut last_lsn = checkpoint.map_or(0, |c| c.lsn);
    let mut pending: u64 = 0;
    for &id in &segments {
        let path = segment_path(dir, id);
        let scan = scan_segment(&path)?;
        match scan.tail {
            Tail::Clean => {}
            Tail::Old => tracing::debug!(
                segment = id,
                valid = scan.valid_len,
                "a reused segment's old records follow the new ones"
            ),
            // Unacknowledged: the crash came before the fsync that would have covered it (or,
            // in a reused segment, old records that do not line up with the new ones).
            Tail::Torn => tracing::warn!(
                segment = id,
                valid = scan.valid_len,
                file = scan.file_len,
                "ending a write-ahead log segment's records before a torn last group (or a reused segment's old records)"
            ),
        }
        if scan.tail != Tail::Clean {
            mark_end(
                &mut OpenOptions::new().write(true).open(&path)?,
                scan.valid_len,
            )?;
        }
        last_lsn = last_lsn.max(scan.last_lsn);
        let uncommitted_from = match checkpoint {
            Some(c) if c.segment == id => c.offset,
            Some(c) if c.segment > id => scan.valid_len,
            _ => 0,
        };
        pending += scan.valid_len.saturating_sub(uncommitted_from);
    }

    let start = match checkpoint {
        Some(c) if segments.contains(&c.segment) => c,
        // The checkpoint's segment was deleted (everything in it committed): start at the
        // first segment after it.
        Some(c) => WalPos {
            segment: segments
                .iter()
                .copied()
                .find(|&s| s > c.segment)
                .unwrap_or(c.segment + 1),
            offset: 0,
            lsn: c.lsn,
        },
        None => WalPos {
            segment: segments.first().copied().unwrap_or(1),
            offset: 0,
            lsn: 0,
        },
    };

    // New records always go to a fresh segment: recovered files are never appended to. Never
    // below where reading starts (segments may be missing after it, removed by hand), or the
    // shipper would never read the new records.
    let active_id = segments.last().map_or(1, |&s| s + 1).max(start.segment);
    let file = finish_segment(dir, active_id, new_segment(dir, active_id, segment_bytes)?)?;
    let initial = WalPos {
        segment: active_id,
        offset: 0,
        lsn: last_lsn,
    };
    let (durable_tx, durable) = watch::channel(initial);
    let shared = Arc::new(Shared {
        pending_bytes: AtomicU64::new(pending),
        max_pending_bytes,
        failing: AtomicBool::new(false),
    });

    let (tx, rx) = mpsc::channel(16 * 1024);
    let mut writer = LogWriter {
        next: Some(prepare_segment(dir, active_id + 1, segment_bytes)),
        dir: dir.to_path_buf(),
        file,
        pos: initial,
        segment_bytes,
        durability,
        durable: durable_tx,
        shared: shared.clone(),
        metrics,
        failed_until: 0,
        #[cfg(test)]
        fail_next_sync: false,
    };
    let thread = std::thread::Builder::new()
        .name("wal-writer".into())
        .spawn(move || writer.run(rx))
        .context("starting the WAL thread")?;

    Ok(Wal {
        handle: WalHandle {
            tx,
            shared: shared.clone(),
        },
        durable,
        start,
        dir: dir.to_path_buf(),
        thread,
        shared,
    })
}

/// How long after a failed rotation the next attempt waits.
const ROTATION_RETRY: Duration = Duration::from_secs(1);

struct LogWriter {
    /// The next segment, being zero-filled in the background.
    next: Option<PreparedSegment>,
    dir: PathBuf,
    file: File,
    pos: WalPos,
    segment_bytes: u64,
    durability: Durability,
    durable: watch::Sender<WalPos>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    /// How far into the current segment a failed group may have written (0: no such group
    /// since the last successful one). Its records may be on disk, numbered exactly like the
    /// ones written in their place, so the next group writes zeros over all of it.
    failed_until: u64,
    /// Tests: the next fsync fails (after its write succeeded), as a failing disk's would.
    #[cfg(test)]
    fail_next_sync: bool,
}

impl LogWriter {
    fn run(&mut self, mut rx: mpsc::Receiver<AppendRequest>) {
        let mut buf = Vec::with_capacity(MAX_GROUP_BYTES);
        let mut group: Vec<(u64, oneshot::Sender<Result<u64, AppendError>>)> = Vec::new();
        let mut last_group = Instant::now();
        let mut rotation_failed: Option<Instant> = None;
        while let Some(first) = rx.blocking_recv() {
            // Group commit: let more records gather if the last group began only moments ago,
            // then take whatever is waiting.
            let since = last_group.elapsed();
            if since < self.durability.min_group_interval {
                std::thread::sleep(self.durability.min_group_interval - since);
            }
            last_group = Instant::now();
            let mut next = Some(first);
            let mut lsn = self.pos.lsn;
            while let Some(req) = next.take() {
                if let Some((payload, rows)) = &req.record {
                    lsn += 1;
                    encode_record(&mut buf, lsn, *rows, payload);
                }
                group.push((lsn, req.done));
                if buf.len() < MAX_GROUP_BYTES {
                    next = rx.try_recv().ok();
                }
            }
            let result = self.write_group(&mut buf, lsn);
            let record_bytes = buf.len() as u64;
            buf.clear();
            match result {
                Ok(()) => {
                    self.shared
                        .pending_bytes
                        .fetch_add(record_bytes, Ordering::Relaxed);
                    for (lsn, done) in group.drain(..) {
                        let _ = done.send(Ok(lsn));
                    }
                }
                Err(err) => {
                    tracing::error!(error = %err, "write-ahead log append failed");
                    for (_, done) in group.drain(..) {
                        let _ = done.send(Err(AppendError::Io(err.to_string())));
                    }
                }
            }
            // A segment that could not be replaced (say, the disk was full) takes more records
            // past its prepared size; the switch is tried again a little later, with a
            // successor prepared in the background meanwhile.
            let retry_due = rotation_failed.is_none_or(|at| at.elapsed() >= ROTATION_RETRY);
            // Not while a failed group's records may lie after the log's end: they are
            // overwritten in this segment first (a finished segment is read to its end).
            if self.pos.offset >= self.segment_bytes && retry_due && self.failed_until == 0 {
                rotation_failed = match self.rotate() {
                    Ok(()) => None,
                    Err(err) => {
                        tracing::error!(error = %err, "cannot start a new WAL segment; the current one grows meanwhile");
                        Some(Instant::now())
                    }
                };
            }
        }
        // The next segment is complete before the log counts as closed.
        if let Some(next) = self.next.take() {
            let _ = next.handle.join();
        }
        tracing::debug!("write-ahead log closed");
    }

    /// Writes a group of records where the log ends (after a failed group: where that one
    /// started) and syncs it.
    fn write_group(&mut self, buf: &mut Vec<u8>, last_lsn: u64) -> io::Result<()> {
        let records_len = buf.len() as u64;
        let end = self.pos.offset + records_len;
        let zeros = self.failed_until.saturating_sub(end).max(HEADER_LEN as u64);
        let written = write_group_at(&self.file, self.pos.offset, buf, zeros).and_then(|()| {
            if !self.durability.fsync {
                return Ok(());
            }
            let started = Instant::now();
            #[cfg(test)]
            if std::mem::take(&mut self.fail_next_sync) {
                return Err(io::Error::other("injected fsync failure"));
            }
            let synced = self.file.sync_data();
            self.metrics.fsync_seconds.observe(started.elapsed());
            synced
        });
        if let Err(err) = written {
            // Nothing lies past the file's end (a write that ran out of space stopped there).
            let reached = self.file.metadata().map_or(end + zeros, |m| m.len());
            self.failed_until = self.failed_until.max(reached.min(end + zeros));
            self.shared.failing.store(true, Ordering::Relaxed);
            // The group's records may reach the disk all the same: end the log where they
            // begin, as far as the disk still takes that, so that a crash before the next
            // successful group (which overwrites them) does not bring them back.
            let _ = self
                .file
                .write_all_at(&[0; HEADER_LEN], self.pos.offset)
                .and_then(|()| match self.durability.fsync {
                    true => self.file.sync_data(),
                    false => Ok(()),
                });
            return Err(err);
        }
        if self.shared.failing.swap(false, Ordering::Relaxed) {
            tracing::info!("the write-ahead log writes and syncs again");
        }
        self.failed_until = 0;
        if records_len > 0 {
            self.pos.offset += records_len;
            self.pos.lsn = last_lsn;
            self.durable.send_replace(self.pos);
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let id = self.pos.segment + 1;
        let prepared = match self.next.take() {
            Some(next) if next.id == id => next.handle.join().unwrap_or_else(|_| {
                Err(io::Error::other("the segment preparation thread panicked"))
            }),
            _ => new_segment(&self.dir, id, self.segment_bytes),
        };
        let file = match prepared.and_then(|file| finish_segment(&self.dir, id, file)) {
            Ok(file) => file,
            Err(err) => {
                // Not left to fill a full disk further; made again in the background for the
                // next attempt.
                let _ = fs::remove_file(unfinished_path(&self.dir, id));
                self.next = Some(prepare_segment(&self.dir, id, self.segment_bytes));
                return Err(err);
            }
        };
        self.file = file;
        self.next = Some(prepare_segment(&self.dir, id + 1, self.segment_bytes));
        self.pos = WalPos {
            segment: id,
            offset: 0,
            lsn: self.pos.lsn,
        };
        self.durable.send_replace(self.pos);
        Ok(())
    }
}

fn encode_record(buf: &mut Vec<u8>, lsn: u64, rows: u32, payload: &[u8]) {
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let crc_at = buf.len();
    buf.extend_from_slice(&[0; 4]);
    let body_at = buf.len();
    buf.extend_from_slice(&lsn.to_le_bytes());
    buf.extend_from_slice(&rows.to_le_bytes());
    buf.extend_from_slice(payload);
    let crc = crc32fast::hash(&buf[body_at..]);
    buf[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Writes encoded records at `offset` followed by `zeros` zero bytes (at least an end marker:
/// a zeroed header), in one write, and leaves `group` as it was. The marker ends reading
/// after these records whatever an earlier write left beyond them: a longer group that failed
/// (its records may be on disk, numbered exactly like the ones that replace them), a reused
/// segment's old records.
fn write_group_at(file: &File, offset: u64, group: &mut Vec<u8>, zeros: u64) -> io::Result<()> {
    let records_len = group.len();
    group.resize(records_len + zeros as usize, 0);
    let written = file.write_all_at(group, offset);
    group.truncate(records_len);
    written
}

/// One record read back from the log (its payload was appended to the caller's buffer).
#[derive(Debug)]
pub struct Record {
    pub lsn: u64,
    pub rows: u32,
    /// Payload length in bytes.
    pub len: usize,
    /// The position just after this record.
    pub end: WalPos,
}

impl Record {
    /// Bytes the record takes in the log, header included.
    pub fn disk_bytes(&self) -> u64 {
        (HEADER_LEN + self.len) as u64
    }
}

enum ReadOutcome {
    Record {
        lsn: u64,
        rows: u32,
        len: usize,
    },
    /// Clean end of data: the file's end, or an end marker (a zeroed header).
    End,
    /// A torn or corrupt record (bad length or CRC): nothing more can be read here either.
    Broken,
}

/// Reads one record, appending its payload to `out` (left unchanged unless a whole, valid
/// record was read, also on an error). Appending avoids a zeroed temporary per record on the
/// shipper's path.
fn read_record(reader: &mut impl Read, out: &mut Vec<u8>) -> io::Result<ReadOutcome> {
    let start = out.len();
    let read = read_one(reader, out);
    if !matches!(read, Ok(ReadOutcome::Record { .. })) {
        out.truncate(start);
    }
    read
}

fn read_one(reader: &mut impl Read, out: &mut Vec<u8>) -> io::Result<ReadOutcome> {
    let mut header = [0u8; HEADER_LEN];
    match reader.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(ReadOutcome::End),
        Err(e) => return Err(e),
    }
    if header == [0; HEADER_LEN] {
        return Ok(ReadOutcome::End);
    }
    let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    let lsn = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let rows = u32::from_le_bytes(header[16..20].try_into().expect("4 bytes"));
    if len > MAX_RECORD_LEN {
        return Ok(ReadOutcome::Broken);
    }
    let start = out.len();
    // Not all at once: after a crash the length may be an old record's bytes.
    out.reserve(len.min(16 << 20));
    if reader.take(len as u64).read_to_end(out)? < len {
        return Ok(ReadOutcome::Broken);
    }
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[8..]);
    hasher.update(&out[start..]);
    if hasher.finalize() != crc {
        return Ok(ReadOutcome::Broken);
    }
    Ok(ReadOutcome::Record { lsn, rows, len })
}

struct Scan {
    valid_len: u64,
    file_len: u64,
    last_lsn: u64,
    tail: Tail,
}

/// What follows a segment's valid records.
#[derive(Debug, PartialEq, Eq)]
enum Tail {
    /// The file's end, or zeros (preallocated, or an end marked before).
    Clean,
    /// A whole record numbered out of sequence: an old record of a reused segment.
    Old,
    /// Anything else: a group the crash interrupted, or corruption.
    Torn,
}

fn scan_segment(path: &Path) -> anyhow::Result<Scan> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let file_len = file.metadata()?.len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut scratch = Vec::new();
    let (mut valid_len, mut last_lsn) = (0u64, None);
    let mut old_record = false;
    while let ReadOutcome::Record { lsn, len, .. } = read_record(&mut reader, &mut scratch)? {
        scratch.clear();
        if last_lsn.is_some_and(|last| lsn != last + 1) {
            old_record = true;
            break;
        }
        valid_len += (HEADER_LEN + len) as u64;
        last_lsn = Some(lsn);
    }
    let mut after = [0u8; HEADER_LEN];
    let mut file = reader.into_inner();
    file.seek(SeekFrom::Start(valid_len))?;
    let n = file.read(&mut after)?;
    Ok(Scan {
        valid_len,
        file_len,
        last_lsn: last_lsn.unwrap_or(0),
        tail: if after[..n].iter().all(|&b| b == 0) {
            Tail::Clean
        } else if old_record {
            Tail::Old
        } else {
            Tail::Torn
        },
    })
}

/// Zeroes the record header at `offset`, so that readers stop there.
fn mark_end(file: &mut File, offset: u64) -> io::Result<()> {
    file.seek(SeekFrom::Start(offset))?;
    file.write_all(&[0; HEADER_LEN])?;
    file.sync_data()
}

/// Reads records in order from a start position up to the durable position.
pub struct WalReader {
    dir: PathBuf,
    pos: WalPos,
    file: Option<BufReader<DurablePart>>,
}

/// A segment file that yields no byte past `end`: the durable position while the segment is
/// the one being written. So the read buffer never holds bytes that may still change
/// (preallocated zeros, a group being written), and a read costs only what is new.
struct DurablePart {
    file: File,
    pos: u64,
    end: u64,
}

impl Read for DurablePart {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let room = self.end.saturating_sub(self.pos).min(buf.len() as u64) as usize;
        if room == 0 {
            return Ok(0);
        }
        let n = self.file.read(&mut buf[..room])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl WalReader {
    pub fn new(dir: &Path, start: WalPos) -> Self {
        Self {
            dir: dir.to_path_buf(),
            pos: start,
            file: None,
        }
    }

    pub fn position(&self) -> WalPos {
        self.pos
    }

    /// The next record before `durable`, its payload appended to `out`; `None` when
    /// everything durable has been read.
    pub fn next(&mut self, durable: WalPos, out: &mut Vec<u8>) -> anyhow::Result<Option<Record>> {
        loop {
            if self.pos.segment > durable.segment
                || (self.pos.segment == durable.segment && self.pos.offset >= durable.offset)
            {
                return Ok(None);
            }
            let end = if self.pos.segment == durable.segment {
                durable.offset
            } else {
                u64::MAX
            };
            if self.file.is_none() {
                let path = segment_path(&self.dir, self.pos.segment);
                match File::open(&path) {
                    Ok(mut file) => {
                        file.seek(SeekFrom::Start(self.pos.offset))?;
                        let part = DurablePart {
                            file,
                            pos: self.pos.offset,
                            end,
                        };
                        self.file = Some(BufReader::with_capacity(1 << 20, part));
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        self.next_segment();
                        continue;
                    }
                    Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
                }
            }
            let reader = self.file.as_mut().expect("opened above");
            reader.get_mut().end = end;
            let read = read_record(reader, out).inspect_err(|_| {
                // The buffered reader may have stopped inside a record: read it again from
                // the position (still that of the last whole record) on the next call.
                self.file = None;
            });
            match read? {
                ReadOutcome::Record { lsn, rows, len } => {
                    self.pos.offset += (HEADER_LEN + len) as u64;
                    self.pos.lsn = lsn;
                    return Ok(Some(Record {
                        lsn,
                        rows,
                        len,
                        end: self.pos,
                    }));
                }
                ReadOutcome::End if self.pos.segment < durable.segment => self.next_segment(),
                ReadOutcome::Broken if self.pos.segment < durable.segment => {
                    // Written whole and synced once, so the disk changed it since; where the
                    // records after it start depends on its length, which cannot be trusted.
                    tracing::error!(
                        segment = self.pos.segment,
                        offset = self.pos.offset,
                        "a write-ahead log record is corrupt; the rest of its segment is skipped and its events are lost"
                    );
                    self.next_segment();
                }
                ReadOutcome::End | ReadOutcome::Broken => {
                    // Only possible if the file changed under us; re-open on the next call.
                    self.file = None;
                    return Ok(None);
                }
            }
        }
    }

    fn next_segment(&mut self) {
        self.file = None;
        self.pos.segment += 1;
        self.pos.offset = 0;
    }
}

/// Records that ClickHouse has committed everything before `pos` (an error only when that
/// record is not durable), then retires the segments wholly before it (kept as spares, or
/// deleted; a failure there is logged and left to the next checkpoint).
///
/// The checkpoint lives in two slots written in turn, in place ([`SLOTS`]): a write needs no
/// new disk block, so a disk the log itself filled while ClickHouse was away can still take
/// the checkpoint that lets segments be retired (a new file per checkpoint could not be
/// written then, and nothing was ever freed). A slot torn by a crash fails its CRC and the
/// other one, a checkpoint older, is read instead: a longer replay, which is harmless.
pub fn checkpoint(dir: &Path, pos: WalPos) -> anyhow::Result<()> {
    prepare_slots(dir).context("creating the WAL checkpoint slots")?;
    let (seq, slot) = match newest_slot(dir) {
        Some((_, seq, slot)) => (seq + 1, 1 - slot),
        None => (1, 0),
    };
    // Durable before it counts: otherwise a machine crash could bring back an older
    // checkpoint, and the replay re-insert rows deleted since (a user's data deletion waits
    // only until the rows are committed).
    OpenOptions::new()
        .write(true)
        .open(dir.join(SLOTS[slot]))
        .and_then(|file| {
            file.write_all_at(&encode_slot(pos, seq), 0)?;
            file.sync_data()
        })
        .context("writing WAL checkpoint")?;
    // Tidying up only: what it leaves is tried again at the next checkpoint.
    if let Err(err) = retire_before(dir, pos) {
        tracing::warn!(error = %format!("{err:#}"), "could not retire committed WAL segments");
    }
    Ok(())
}

/// Retires the segments wholly before `pos` (kept as spares, or deleted), and spares unused
/// for too long.
fn retire_before(dir: &Path, pos: WalPos) -> anyhow::Result<()> {
    // A checkpoint of an older version of the service, superseded now.
    let _ = fs::remove_file(dir.join(OLD_CHECKPOINT));
    remove_spares_older_than(dir, SPARE_MAX_AGE)?;
    let mut spares = list_ids(dir, SPARE)?.len();
    for id in list_segments(dir)? {
        if id >= pos.segment {
            continue;
        }
        let path = segment_path(dir, id);
        if spares < MAX_SPARES && fs::rename(&path, spare_path(dir, id)).is_ok() {
            spares += 1;
        } else {
            fs::remove_file(&path)
                .with_context(|| format!("deleting committed WAL segment {id}"))?;
        }
    }
    Ok(())
}

/// The two checkpoint slots. Each holds `segment u64 | offset u64 | lsn u64 | seq u64 |
/// crc32 u32` (little-endian; the CRC covers the rest); the valid one with the higher `seq`
/// is the checkpoint. All zeros (as created) is no checkpoint.
const SLOTS: [&str; 2] = ["checkpoint.0", "checkpoint.1"];
const SLOT_LEN: usize = 36;
/// The checkpoint file of versions before the slots (JSON), still read when no slot is valid.
const OLD_CHECKPOINT: &str = "checkpoint";

/// Creates the slots not there yet (zeroed, synced, and the directory entry synced).
fn prepare_slots(dir: &Path) -> io::Result<()> {
    let mut created = false;
    for name in SLOTS {
        let path = dir.join(name);
        if !path.exists() {
            let file = File::create(&path)?;
            file.write_all_at(&[0; SLOT_LEN], 0)?;
            file.sync_all()?;
            created = true;
        }
    }
    if created {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn encode_slot(pos: WalPos, seq: u64) -> [u8; SLOT_LEN] {
    let mut slot = [0; SLOT_LEN];
    for (i, value) in [pos.segment, pos.offset, pos.lsn, seq]
        .into_iter()
        .enumerate()
    {
        slot[i * 8..i * 8 + 8].copy_from_slice(&value.to_le_bytes());
    }
    let crc = crc32fast::hash(&slot[..32]);
    slot[32..].copy_from_slice(&crc.to_le_bytes());
    slot
}

/// The position and sequence number in a slot, if it holds a whole checkpoint.
fn decode_slot(bytes: &[u8]) -> Option<(WalPos, u64)> {
    let bytes: &[u8; SLOT_LEN] = bytes.get(..SLOT_LEN)?.try_into().ok()?;
    let crc = u32::from_le_bytes(bytes[32..].try_into().ok()?);
    let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
    let seq = word(3);
    if seq == 0 || crc != crc32fast::hash(&bytes[..32]) {
        return None;
    }
    let pos = WalPos {
        segment: word(0),
        offset: word(1),
        lsn: word(2),
    };
    Some((pos, seq))
}

/// The newest valid slot: its position, sequence number and index.
fn newest_slot(dir: &Path) -> Option<(WalPos, u64, usize)> {
    (0..SLOTS.len())
        .filter_map(|i| {
            let bytes = fs::read(dir.join(SLOTS[i])).ok()?;
            decode_slot(&bytes).map(|(pos, seq)| (pos, seq, i))
        })
        .max_by_key(|&(_, seq, _)| seq)
}

fn read_checkpoint(dir: &Path) -> Option<WalPos> {
    if let Some((pos, _, _)) = newest_slot(dir) {
        return Some(pos);
    }
    let bytes = fs::read(dir.join(OLD_CHECKPOINT)).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(pos) => Some(pos),
        Err(err) => {
            // Losing the checkpoint only means replaying more (harmless: replays collapse).
            tracing::warn!(error = %err, "ignoring an unreadable WAL checkpoint");
            None
        }
    }
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.wal"))
}

const SPARE: &str = ".spare";

fn remove_spares_older_than(dir: &Path, max_age: Duration) -> anyhow::Result<()> {
    for id in list_ids(dir, SPARE)? {
        let path = spare_path(dir, id);
        let age = fs::metadata(&path)
            .and_then(|m| m.modified())
            .map(|t| t.elapsed().unwrap_or_default());
        if !age.is_ok_and(|age| age < max_age) {
            match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(e).context("removing a spare WAL segment")
                }
                _ => {}
            }
        }
    }
    Ok(())
}

fn spare_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}{SPARE}"))
}

fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    list_ids(dir, ".wal")
}

/// The numbers of the files in `dir` named `<number><suffix>`, in order.
fn list_ids(dir: &Path, suffix: &str) -> io::Result<Vec<u64>> {
    let mut ids: Vec<u64> = fs::read_dir(dir)?
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(suffix)?.parse().ok()
        })
        .collect();
    ids.sort_unstable();
    Ok(ids)
}

struct PreparedSegment {
    id: u64,
    handle: std::thread::JoinHandle<io::Result<File>>,
}

fn prepare_segment(dir: &Path, id: u64, size: u64) -> PreparedSegment {
    let dir = dir.to_path_buf();
    PreparedSegment {
        id,
        handle: std::thread::spawn(move || new_segment(&dir, id, size)),
    }
}

const UNFINISHED: &str = ".wal.tmp";

fn unfinished_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}{UNFINISHED}"))
}

/// Makes `<id>.wal.tmp` ready for records, `size` bytes long: from
/// a spare when there is one, else zero-filled.
fn new_segment(dir: &Path, id: u64, size: u64) -> io::Result<File> {
    for spare in list_ids(dir, SPARE)? {
        match reused(dir, spare, id, size) {
            Ok(Some(file)) => return Ok(file),
            Ok(None) => {}
            Err(err) => tracing::warn!(error = %err, "cannot reuse a spare WAL segment"),
        }
    }
    zero_filled(dir, id, size)
}

/// Turns spare `spare` into `<id>.wal.tmp`: cut to `size` (so a segment switched at its size
/// leaves no old record behind) and its first record header zeroed; `None` if it is gone or
/// too small (then removed).
fn reused(dir: &Path, spare: u64, id: u64, size: u64) -> io::Result<Option<File>> {
    let path = unfinished_path(dir, id);
    match fs::rename(spare_path(dir, spare), &path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        renamed => renamed?,
    }
    let prepare = || {
        let mut file = OpenOptions::new().write(true).open(&path)?;
        if file.metadata()?.len() < size {
            // Growing it would change the file's size with every group.
            fs::remove_file(&path)?;
            return Ok(None);
        }
        file.set_len(size)?;
        file.write_all(&[0; HEADER_LEN])?;
        file.sync_all()?;
        file.seek(SeekFrom::Start(0))?;
        Ok(Some(file))
    };
    prepare().inspect_err(|_| {
        let _ = fs::remove_file(&path);
    })
}

/// Creates `<id>.wal.tmp`, filled with `size` zero bytes and fsynced.
/// On failure the file is removed (a full disk is not left fuller).
fn zero_filled(dir: &Path, id: u64, size: u64) -> io::Result<File> {
    let path = unfinished_path(dir, id);
    let fill = || {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        let zeros = vec![0u8; 1 << 20];
        let mut left = size;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            file.write_all(&zeros[..n])?;
            left -= n as u64;
        }
        file.sync_all()?;
        file.seek(SeekFrom::Start(0))?;
        Ok(file)
    };
    fill().inspect_err(|_| {
        let _ = fs::remove_file(&path);
    })
}

/// Gives a prepared segment its real name; the directory entry is durable before any record
/// in the file is acknowledged.
fn finish_segment(dir: &Path, id: u64, file: File) -> io::Result<File> {
    fs::rename(unfinished_path(dir, id), segment_path(dir, id))?;
    File::open(dir)?.sync_all()?;
    Ok(file)
}

/// A segment prepared and not yet used (the one a stop leaves ready, or one whose preparation
/// a crash interrupted) holds no record still to be shipped: it becomes a spare while there
/// are fewer than [`MAX_SPARES`] (and then goes the way of spares: reused, or deleted when
/// unused for long or when the log starts without a checkpoint), so a restart does not
/// zero-fill a new segment while a prepared one is thrown away.
fn keep_unfinished_segments_as_spares(dir: &Path) -> anyhow::Result<()> {
    let mut spares = list_ids(dir, SPARE)?.len();
    for id in list_ids(dir, UNFINISHED)? {
        let path = unfinished_path(dir, id);
        if spares < MAX_SPARES && fs::rename(&path, spare_path(dir, id)).is_ok() {
            spares += 1;
        } else {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens the log with every group fsynced at once.
    fn open_at(dir: &Path, segment_bytes: u64, max_pending_bytes: u64) -> Wal {
        open(
            dir,
            segment_bytes,
            max_pending_bytes,
            Durability::IMMEDIATE,
            metrics(),
        )
        .unwrap()
    }

    fn metrics() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    /// A log of 4 KB segments holding 60 records of 200 bytes (payload `[i; 200]`, i = 0..60),
    /// all of one size.
    async fn sixty_records(dir: &Path) -> Wal {
        let wal = open_at(dir, 4096, u64::MAX);
        for i in 0..60u8 {
            wal.handle.append(vec![i; 200], 1).await.unwrap();
        }
        wal
    }

    /// Stops the log as a shutdown does (the log thread finishes before this returns).
    fn close(wal: Wal) {
        let Wal { handle, thread, .. } = wal;
        drop(handle);
        thread.join().unwrap();
    }

    /// Every record up to `durable`, with its payload.
    fn read_all(wal_dir: &Path, start: WalPos, durable: WalPos) -> Vec<(Record, Vec<u8>)> {
        let mut reader = WalReader::new(wal_dir, start);
        let mut out = Vec::new();
        let mut payload = Vec::new();
        while let Some(rec) = reader.next(durable, &mut payload).unwrap() {
            out.push((rec, std::mem::take(&mut payload)));
        }
        out
    }

    #[tokio::test]
    async fn appended_records_read_back_in_order_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let wal = open_at(dir.path(), 4096, u64::MAX);
        for i in 0..100u32 {
            let lsn = wal.handle.append(vec![i as u8; 100], i).await.unwrap();
            assert_eq!(lsn, u64::from(i) + 1);
        }
        let durable = *wal.durable.borrow();
        let records = read_all(dir.path(), wal.start, durable);
        assert_eq!(records.len(), 100);
        assert!(records
            .iter()
            .enumerate()
            .all(|(i, (r, payload))| r.rows == i as u32
                && *payload == vec![i as u8; 100]
                && r.lsn == i as u64 + 1));
        assert!(list_segments(dir.path()).unwrap().len() > 1, "rotated");
    }

    #[tokio::test]
    async fn appends_go_on_while_a_new_segment_cannot_be_made_and_rotation_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let wal = open_at(dir.path(), 4096, u64::MAX);
        // Segment 2 cannot get its name: a directory with something in it stands there.
        let blocker = segment_path(dir.path(), 2);
        fs::create_dir(&blocker).unwrap();
        fs::write(blocker.join("x"), b"x").unwrap();
        for i in 0..100u32 {
            wal.handle.append(vec![i as u8; 100], i).await.unwrap();
        }
        assert!(wal.handle.is_healthy());
        let grown = fs::metadata(segment_path(dir.path(), 1)).unwrap().len();
        assert!(grown > 10_000, "segment 1 grew past its size: {grown}");
        assert!(!segment_path(dir.path(), 3).exists());

        // Once the name is free, the next attempt (a second later) rotates again.
        fs::remove_dir_all(&blocker).unwrap();
        tokio::time::sleep(ROTATION_RETRY + Duration::from_millis(100)).await;
        for i in 100..200u32 {
            wal.handle.append(vec![i as u8; 100], i).await.unwrap();
        }
        assert!(
            list_segments(dir.path()).unwrap().len() > 2,
            "rotated again"
        );
        let records = read_all(dir.path(), wal.start, *wal.durable.borrow());
        assert_eq!(records.len(), 200);
        assert!(records
            .iter()
            .enumerate()
            .all(|(i, (r, payload))| r.lsn == i as u64 + 1 && *payload == vec![i as u8; 100]));
    }

    #[tokio::test]
    async fn a_reader_that_caught_up_sees_later_records() {
        let dir = tempfile::tempdir().unwrap();
        let wal = open_at(dir.path(), 1 << 20, u64::MAX);
        let mut reader = WalReader::new(dir.path(), wal.start);
        let mut out = Vec::new();
        wal.handle.append(b"first".to_vec(), 1).await.unwrap();
        let durable = *wal.durable.borrow();
        assert!(reader.next(durable, &mut out).unwrap().is_some());
        // Caught up: the read-ahead buffer now holds the preallocated zeros after "first".
        assert!(reader.next(durable, &mut out).unwrap().is_none());
        wal.handle.append(b"second".to_vec(), 1).await.unwrap();
        let durable = *wal.durable.borrow();
        let record = reader.next(durable, &mut out).unwrap();
        assert_eq!(record.map(|r| r.lsn), Some(2));
        assert_eq!(out, b"firstsecond");
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_and_numbering_continues() {
        let dir = tempfile::tempdir().unwrap();
        {
            let wal = open_at(dir.path(), 1 << 20, u64::MAX);
            wal.handle.append(b"one".to_vec(), 1).await.unwrap();
            wal.handle.append(b"two".to_vec(), 1).await.unwrap();
            close(wal);
        }
        // Simulate a crash mid-write: half a record at the end of the last segment.
        let seg = segment_path(dir.path(), list_segments(dir.path()).unwrap()[0]);
        let end = scan_segment(&seg).unwrap().valid_len;
        let mut torn = Vec::new();
        encode_record(&mut torn, 3, 1, b"three");
        let mut file = OpenOptions::new().write(true).open(&seg).unwrap();
        file.seek(SeekFrom::Start(end)).unwrap();
        file.write_all(&torn[..torn.len() - 2]).unwrap();
        drop(file);
        assert_eq!(scan_segment(&seg).unwrap().tail, Tail::Torn);

        let wal = open_at(dir.path(), 1 << 20, u64::MAX);
        let lsn = wal.handle.append(b"four".to_vec(), 1).await.unwrap();
        assert_eq!(
            lsn, 3,
            "the torn record never got an ack, its lsn is reused"
        );
        let durable = *wal.durable.borrow();
        let payloads: Vec<Vec<u8>> = read_all(dir.path(), wal.start, durable)
            .into_iter()
            .map(|(_, payload)| payload)
            .collect();
        assert_eq!(
            payloads,
            vec![b"one".to_vec(), b"two".to_vec(), b"four".to_vec()]
        );
    }

    #[tokio::test]
    async fn a_corrupt_record_is_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let wal = open_at(dir.path(), 1 << 20, u64::MAX);
            wal.handle.append(b"good".to_vec(), 1).await.unwrap();
            wal.handle.append(b"flipped".to_vec(), 1).await.unwrap();
            close(wal);
        }
        let seg = segment_path(dir.path(), list_segments(dir.path()).unwrap()[0]);
        let mut bytes = fs::read(&seg).unwrap();
        let last = scan_segment(&seg).unwrap().valid_len as usize - 1;
        bytes[last] ^= 0xff;
        fs::write(&seg, bytes).unwrap();

        let wal = open_at(dir.path(), 1 << 20, u64::MAX);
        let durable = *wal.durable.borrow();
        let records = read_all(dir.path(), wal.start, durable);
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].1, b"good");
    }

    #[test]
    fn a_read_that_fails_inside_a_record_leaves_nothing_of_it() {
        /// Yields `ok` bytes of `data`, then fails.
        struct Failing<'a> {
            data: &'a [u8],
            ok: usize,
        }
        impl Read for Failing<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.ok == 0 {
                    return Err(io::Error::other("injected read error"));
                }
                let n = buf.len().min(self.ok).min(self.data.len());
                buf[..n].copy_from_slice(&self.data[..n]);
                (self.data, self.ok) = (&self.data[n..], self.ok - n);
                Ok(n)
            }
        }
        let mut record = Vec::new();
        encode_record(&mut record, 1, 1, &[7; 100]);
        let mut out = b"earlier".to_vec();
        let mut reader = Failing {
            data: &record,
            ok: HEADER_LEN + 40,
        };
        assert!(read_record(&mut reader, &mut out).is_err());
        assert_eq!(out, b"earlier", "part of a record was kept");
    }

    #[tokio::test]
    async fn a_reader_whose_read_failed_reads_the_record_again() {
        let dir = tempfile::tempdir().unwrap();
        let wal = open_at(dir.path(), 1 << 20, u64::MAX);
        wal.handle.append(b"one".to_vec(), 1).await.unwrap();
        let durable = *wal.durable.borrow();
        close(wal);
        // The segment's file cannot be read for a while (a directory in its place: EISDIR).
        let seg = segment_path(dir.path(), durable.segment);
        let kept = dir.path().join("kept");
        fs::rename(&seg, &kept).unwrap();
        fs::create_dir(&seg).unwrap();
        let mut reader = WalReader::new(
            dir.path(),
            WalPos {
                segment: durable.segment,
                offset: 0,
                lsn: 0,
            },
        );
        let mut out = Vec::new();
        assert!(reader.next(durable, &mut out).is_err());
        fs::remove_dir(&seg).unwrap();
        fs::rename(&kept, &seg).unwrap();
        let record = reader.next(durable, &mut out).unwrap();
        assert_eq!(record.map(|r| r.lsn), Some(1));
        assert_eq!(out, b"one");
    }

    #[tokio::test]
    async fn new_records_go_where_reading_starts_when_segments_before_it_are_missing() {
        let dir = tempfile::tempdir().unwrap();
        let wal = sixty_records(dir.path()).await;
        let records = read_all(dir.path(), wal.start, *wal.durable.borrow());
        let committed = records[59].0.end;
        checkpoint(dir.path(), committed).unwrap();
        close(wal);
        // The checkpoint's segment is gone (removed by hand), an older one is back.
        fs::remove_file(segment_path(dir.path(), committed.segment)).unwrap();
        fs::write(segment_path(dir.path(), 1), vec![0; 4096]).unwrap();

        let wal = open_at(dir.path(), 4096, u64::MAX);
        wal.handle.append(b"after".to_vec(), 1).await.unwrap();
        let records = read_all(dir.path(), wal.start, *wal.durable.borrow());
        assert_eq!(records.len(), 1, "the new record is read");
        assert_eq!(records[0].1, b"after");
    }

    fn writable(path: &Path) -> File {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap()
    }

    /// A log writer at the start of segment 1 of `dir`, to drive `write_group` directly.
    fn writer_on(dir: &Path) -> LogWriter {
        let start = WalPos {
            segment: 1,
            offset: 0,
            lsn: 0,
        };
        LogWriter {
            next: None,
            dir: dir.to_path_buf(),
            file: writable(&segment_path(dir, 1)),
            pos: start,
            segment_bytes: 1 << 20,
            durability: Durability::IMMEDIATE,
            durable: watch::channel(start).0,
            shared: Arc::new(Shared {
                pending_bytes: AtomicU64::new(0),
                max_pending_bytes: u64::MAX,
                failing: AtomicBool::new(false),
            }),
            metrics: metrics(),
            failed_until: 0,
            fail_next_sync: false,
        }
    }

    /// Records numbered `lsns`, 100 bytes of payload each.
    fn records(lsns: std::ops::RangeInclusive<u64>) -> Vec<u8> {
        let mut buf = Vec::new();
        for lsn in lsns {
            encode_record(&mut buf, lsn, 1, &[lsn as u8; 100]);
        }
        buf
    }

    /// A writer on segment 1 of `dir` whose first group, records `1..=last`, failed (the log
    /// reports it), though the records reached the disk. Its file still refuses writes.
    fn after_a_failed_group(dir: &Path, last: u64) -> LogWriter {
        let path = segment_path(dir, 1);
        let mut writer = writer_on(dir);
        write_group_at(
            &writable(&path),
            0,
            &mut records(1..=last),
            HEADER_LEN as u64,
        )
        .unwrap();
        writer.file = File::open(&path).unwrap();
        assert!(writer.write_group(&mut records(1..=last), last).is_err());
        assert!(
            writer.shared.failing.load(Ordering::Relaxed),
            "readiness reports it"
        );
        writer
    }

    #[test]
    fn the_records_of_a_failed_group_are_never_read_back() {
        // A group whose fsync failed (its requests got an error) may reach the disk all the
        // same, and the next groups are written in its place with the same sequence numbers:
        // with records of one size, each of its records starts exactly where a shorter
        // successor ends, numbered as that one's successor.
        let dir = tempfile::tempdir().unwrap();
        let path = segment_path(dir.path(), 1);
        let mut writer = after_a_failed_group(dir.path(), 3);
        writer.file = writable(&path);

        // One record is acknowledged; then a crash tears the next group: its record reached
        // the disk, the end marker after it did not.
        writer.write_group(&mut records(1..=1), 1).unwrap();
        writable(&path)
            .write_all_at(&records(2..=2), writer.pos.offset)
            .unwrap();
        let scan = scan_segment(&path).unwrap();
        assert_eq!(scan.last_lsn, 2, "a record of the failed group was read");
        assert_eq!(scan.tail, Tail::Clean);
    }

    #[test]
    fn a_group_whose_fsync_failed_is_cut_off_where_it_starts() {
        // The disk took the group's write, then failed its fsync: the requests got an error,
        // yet the records may well be on disk. The log must end before them, so that a crash
        // now (before a later group writes over them) does not bring them back on recovery.
        let dir = tempfile::tempdir().unwrap();
        let mut writer = writer_on(dir.path());
        writer.write_group(&mut records(1..=2), 2).unwrap();
        writer.fail_next_sync = true;
        assert!(writer.write_group(&mut records(3..=4), 4).is_err());
        assert!(writer.shared.failing.load(Ordering::Relaxed));
        drop(writer); // the crash

        let scan = scan_segment(&segment_path(dir.path(), 1)).unwrap();
        assert_eq!((scan.last_lsn, scan.tail), (2, Tail::Clean));
        assert_eq!(scan.valid_len, records(1..=2).len() as u64);
    }

    #[test]
    fn after_a_failed_group_the_log_is_unhealthy_until_a_write_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let path = segment_path(dir.path(), 1);
        let mut writer = after_a_failed_group(dir.path(), 2);

        // A probe is a group without records: while the disk refuses, it fails too.
        assert!(writer.write_group(&mut Vec::new(), 0).is_err());
        assert!(writer.shared.failing.load(Ordering::Relaxed));

        // Once the disk takes it, the log is healthy again, nothing was added to it, and the
        // failed group's records are gone.
        writer.file = writable(&path);
        writer.write_group(&mut Vec::new(), 0).unwrap();
        assert!(!writer.shared.failing.load(Ordering::Relaxed));
        assert_eq!((writer.pos.offset, writer.pos.lsn), (0, 0));
        let scan = scan_segment(&path).unwrap();
        assert_eq!((scan.valid_len, scan.last_lsn), (0, 0));
    }

    #[tokio::test]
    async fn a_probe_writes_no_record() {
        let dir = tempfile::tempdir().unwrap();
        let wal = open_at(dir.path(), 1 << 20, u64::MAX);
        assert_eq!(wal.handle.append(vec![1; 100], 1).await.unwrap(), 1);
        let timeout = Duration::from_secs(5);
        assert!(wal.handle.probe(timeout).await, "healthy: nothing to probe");

        wal.shared.failing.store(true, Ordering::Relaxed);
        assert!(!wal.handle.is_healthy());
        assert!(wal.handle.probe(timeout).await);
        assert!(
            wal.handle.is_healthy(),
            "the probe's success clears the failure"
        );
        assert_eq!(wal.handle.append(vec![2; 100], 1).await.unwrap(), 2);
        let records = read_all(dir.path(), wal.start, *wal.durable.borrow());
        let lsns: Vec<u64> = records.iter().map(|(r, _)| r.lsn).collect();
        assert_eq!(lsns, [1, 2]);
        close(wal);
    }

    #[tokio::test]
    async fn the_checkpoint_skips_committed_records_and_deletes_their_segments() {
        let dir = tempfile::tempdir().unwrap();
        let committed;
        {
            let wal = sixty_records(dir.path()).await;
            let durable = *wal.durable.borrow();
            let records = read_all(dir.path(), wal.start, durable);
            committed = records[39].0.end;
            checkpoint(dir.path(), committed).unwrap();
            close(wal);
        }
        assert!(list_segments(dir.path()).unwrap()[0] >= committed.segment);
        let wal = open_at(dir.path(), 4096, u64::MAX);
        assert_eq!(wal.start, committed);
        let durable = *wal.durable.borrow();
        let records = read_all(dir.path(), wal.start, durable);
        assert_eq!(records.len(), 20);
        assert_eq!(records[0].1, vec![40u8; 200]);
        assert_eq!(
            wal.shared.pending_bytes.load(Ordering::Relaxed),
            20 * (200 + HEADER_LEN as u64)
        );
    }

    #[test]
    fn a_checkpoint_counts_once_written_even_if_old_segments_cannot_be_retired() {
        let dir = tempfile::tempdir().unwrap();
        for id in 100..100 + MAX_SPARES as u64 {
            fs::write(spare_path(dir.path(), id), b"").unwrap();
        }
        // A committed segment that cannot be kept (spares are full) nor deleted.
        let stuck = segment_path(dir.path(), 1);
        fs::create_dir(&stuck).unwrap();
        fs::write(stuck.join("x"), b"x").unwrap();
        let pos = WalPos {
            segment: 5,
            offset: 0,
            lsn: 9,
        };
        checkpoint(dir.path(), pos).unwrap();
        assert_eq!(read_checkpoint(dir.path()), Some(pos));
        assert!(stuck.exists());
    }

    #[tokio::test]
    async fn committed_segments_are_reused_and_their_old_records_never_read_again() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        // Records of one size: the old records of a reused segment line up with the new ones.
        let wal = sixty_records(dir.path()).await;
        let records = read_all(dir.path(), wal.start, *wal.durable.borrow());
        let committed = records[59].0.end;
        checkpoint(dir.path(), committed).unwrap();
        let spares = list_ids(dir.path(), SPARE).unwrap();
        assert_eq!(
            spares.len(),
            MAX_SPARES,
            "committed segments kept for reuse"
        );
        let spare_inodes: Vec<u64> = spares
            .iter()
            .map(|&id| fs::metadata(spare_path(dir.path(), id)).unwrap().ino())
            .collect();

        // Write on into the second reused segment (the first successor was made before there
        // were spares), three records into it.
        let mut i = 60u8;
        let reused_id = committed.segment + 2;
        while wal.durable.borrow().segment < reused_id || wal.durable.borrow().offset < 3 * 220 {
            wal.handle.append(vec![i; 200], 1).await.unwrap();
            i += 1;
        }
        let reused = segment_path(dir.path(), reused_id);
        assert!(
            spare_inodes.contains(&fs::metadata(&reused).unwrap().ino()),
            "segment {reused_id} is a reused one"
        );
        // The last group's end marker stops reading there.
        assert_eq!(scan_segment(&reused).unwrap().tail, Tail::Clean);
        // A crash tears the next group: its first record reached the disk, its end marker did
        // not, and an old record follows it.
        let (end, last_lsn) = {
            let durable = wal.durable.borrow();
            (durable.offset, durable.lsn)
        };
        close(wal);
        let mut torn = Vec::new();
        encode_record(&mut torn, last_lsn + 1, 1, &[i; 200]);
        writable(&reused).write_all_at(&torn, end).unwrap();
        assert_eq!(scan_segment(&reused).unwrap().tail, Tail::Old);

        // After the restart only the new records are read (the torn group's one included,
        // never acknowledged but whole): none of the old ones past them.
        let wal = open_at(dir.path(), 4096, u64::MAX);
        assert_eq!(wal.start, committed);
        let records = read_all(dir.path(), wal.start, *wal.durable.borrow());
        let payloads: Vec<u8> = records.iter().map(|(_, p)| p[0]).collect();
        assert_eq!(payloads, (60..=i).collect::<Vec<u8>>());
        assert!(records.windows(2).all(|w| w[1].0.lsn == w[0].0.lsn + 1));
        assert_eq!(
            wal.handle.append(vec![0; 200], 1).await.unwrap(),
            last_lsn + 2
        );
        // The segment written after the restart ends with a marker too.
        let active = wal.durable.borrow().segment;
        close(wal);
        assert_eq!(
            scan_segment(&segment_path(dir.path(), active))
                .unwrap()
                .tail,
            Tail::Clean
        );
    }

    #[tokio::test]
    async fn a_restart_keeps_the_segment_prepared_ahead_as_a_spare() {
        let dir = tempfile::tempdir().unwrap();
        let wal = sixty_records(dir.path()).await;
        checkpoint(dir.path(), *wal.durable.borrow()).unwrap();
        // Fewer spares than allowed: one is reused for the next segment at the restart.
        let spares = list_ids(dir.path(), SPARE).unwrap();
        fs::remove_file(spare_path(dir.path(), spares[0])).unwrap();
        close(wal);
        let prepared = list_ids(dir.path(), UNFINISHED).unwrap();
        assert_eq!(prepared.len(), 1, "a stop leaves the next segment prepared");
        // Marked where no record of this test reaches, so it can be found again.
        let mark = b"prepared ahead";
        writable(&unfinished_path(dir.path(), prepared[0]))
            .write_all_at(mark, 4096 - mark.len() as u64)
            .unwrap();

        // Started and stopped: the segment prepared ahead meanwhile is ready (reusing a
        // spare zeroes its first header only).
        close(open_at(dir.path(), 4096, u64::MAX));
        let marked: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|path| fs::read(path).unwrap().ends_with(mark))
            .collect();
        assert_eq!(marked.len(), 1, "the prepared segment was thrown away");
        // Used like any spare: records written across it read back.
        let wal = open_at(dir.path(), 4096, u64::MAX);
        for i in 0..40u8 {
            wal.handle.append(vec![i; 200], 1).await.unwrap();
        }
        let records = read_all(dir.path(), wal.start, *wal.durable.borrow());
        let payloads: Vec<u8> = records.iter().map(|(_, p)| p[0]).collect();
        assert_eq!(
            &payloads[payloads.len() - 40..],
            (0..40).collect::<Vec<u8>>()
        );
        close(wal);
    }

    #[tokio::test]
    async fn spares_not_reused_for_ten_minutes_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let wal = sixty_records(dir.path()).await;
        let committed = *wal.durable.borrow();
        checkpoint(dir.path(), committed).unwrap();
        let spares = list_ids(dir.path(), SPARE).unwrap();
        assert_eq!(spares.len(), MAX_SPARES);
        let aged = File::options()
            .write(true)
            .open(spare_path(dir.path(), spares[0]))
            .unwrap();
        aged.set_modified(std::time::SystemTime::now() - SPARE_MAX_AGE)
            .unwrap();
        checkpoint(dir.path(), committed).unwrap();
        assert_eq!(list_ids(dir.path(), SPARE).unwrap(), spares[1..]);
        close(wal);
        // Without a checkpoint a start keeps none.
        for slot in SLOTS {
            fs::remove_file(dir.path().join(slot)).unwrap();
        }
        let wal = open_at(dir.path(), 4096, u64::MAX);
        assert!(list_ids(dir.path(), SPARE).unwrap().is_empty());
        close(wal);
    }

    #[test]
    fn checkpoints_are_written_in_place_in_turn_and_a_torn_one_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let at = |segment, lsn| WalPos {
            segment,
            offset: 100 * lsn,
            lsn,
        };
        // A checkpoint of the older format is read until the first new one replaces it.
        fs::write(
            dir.path().join(OLD_CHECKPOINT),
            serde_json::to_vec(&at(1, 5)).unwrap(),
        )
        .unwrap();
        assert_eq!(read_checkpoint(dir.path()), Some(at(1, 5)));
        checkpoint(dir.path(), at(1, 7)).unwrap();
        assert!(!dir.path().join(OLD_CHECKPOINT).exists());

        // Later checkpoints create no file (no new disk block): the same two, in turn.
        use std::os::unix::fs::MetadataExt;
        let inodes = || -> Vec<u64> {
            let mut all: Vec<u64> = fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().metadata().unwrap().ino())
                .collect();
            all.sort();
            all
        };
        let before = inodes();
        for lsn in 8..=11 {
            checkpoint(dir.path(), at(1, lsn)).unwrap();
            assert_eq!(read_checkpoint(dir.path()), Some(at(1, lsn)));
        }
        assert_eq!(inodes(), before);

        // A crash tears the newest slot: the one before it is read (a longer replay).
        let (_, _, newest) = newest_slot(dir.path()).unwrap();
        let torn = OpenOptions::new()
            .write(true)
            .open(dir.path().join(SLOTS[newest]))
            .unwrap();
        torn.write_all_at(&[0xff; 4], 8).unwrap();
        assert_eq!(read_checkpoint(dir.path()), Some(at(1, 10)));
        // And the next checkpoint goes where the torn one was, newer than the one left.
        checkpoint(dir.path(), at(2, 12)).unwrap();
        assert_eq!(read_checkpoint(dir.path()), Some(at(2, 12)));
    }

    #[tokio::test]
    async fn records_arriving_within_the_group_interval_share_one_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = metrics();
        let durability = Durability {
            fsync: true,
            min_group_interval: Duration::from_millis(500),
        };
        let wal = open(dir.path(), 1 << 20, u64::MAX, durability, metrics.clone()).unwrap();
        wal.handle.append(vec![0], 1).await.unwrap();
        let groups_before = metrics.fsync_seconds.count();
        // Ten records, 5 ms apart: without the interval each would get a group of its own.
        let mut appends = Vec::new();
        for i in 1..=10u8 {
            let handle = wal.handle.clone();
            appends.push(tokio::spawn(async move { handle.append(vec![i], 1).await }));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut lsns = Vec::new();
        for append in appends {
            lsns.push(append.await.unwrap().unwrap());
        }
        lsns.sort();
        assert_eq!(lsns, (2..=11).collect::<Vec<u64>>());
        assert_eq!(metrics.fsync_seconds.count() - groups_before, 1);
    }

    #[tokio::test]
    async fn appends_past_the_budget_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let wal = open_at(dir.path(), 1 << 20, 1000);
        wal.handle.append(vec![0; 500], 1).await.unwrap();
        let err = wal.handle.append(vec![0; 500], 1).await.unwrap_err();
        assert!(matches!(err, AppendError::Full));
    }
}
