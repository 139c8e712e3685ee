//! Summaries of `events` by hour (`clickhouse-init/05_rollup.sql`), kept exact.
//!
//! Reading 10 million raw events with `FINAL` for every dashboard request is slow; most
//! dashboard queries only need counts and sums per hour, campaign and event type. So a
//! background task ([`Rollup::refresh`]) summarizes `events FINAL` one day partition at a
//! time into `events_hourly` (per UTC hour, campaign and event type), and from that into
//! `events_daily` (per UTC day) and `events_hourly_totals` (per hour, without the campaign);
//! a query that such a summary can answer reads the coarsest one that does (see
//! [`held::summary_spans`]).
//!
//! **Exactness.** The table is a ReplacingMergeTree: until a merge, a re-sent event has
//! several copies. A summary computed with `FINAL` counts each event once, but is only right
//! while its partition has not changed. Every summary records the *fingerprint* of the parts
//! it was computed from (their names, which ClickHouse changes on every insert, merge and
//! mutation); a query uses a day's summary only while the partition's current fingerprint is
//! that one, and reads the other partitions from `events FINAL`. The partial hours at the ends
//! of a range are read raw from the partitions that hold events then (each summary records
//! the first and last event time of its partition), keeping the copy of each event `FINAL`
//! would keep. An event committed before a query started is therefore always counted, once,
//! whether it is new, a re-sent copy, or deleted.
//!
//! **In memory.** What a query reads from a summary generation, and the deduplicated events
//! of a partial hour, never change while the generation is published and the partition's
//! fingerprint is the same; so they are held in memory ([`held`]) and the figures are summed
//! there (`figures`). A query then sends one statement for the fingerprints (shared by the
//! queries that arrive while it runs) and one for the partitions without a current summary;
//! besides, at most once a second, one for what is published, and reads of what is not held
//! yet (a new generation, a new partial hour).
//!
//! **Generations.** Each computation writes its own partition `(day, generation)` of the
//! summary tables and then publishes it in `events_hourly_state` (only if the parts did not
//! change meanwhile). Superseded generations are dropped a minute after their successor was
//! published (a query picks its partitions a moment before it runs); unpublished ones after
//! ten minutes (and a computation slower than five is never published).
//!
//! On a cluster (`events` is a Distributed table, with no parts of its own) no partition is
//! ever summarized and every query reads `events FINAL`, as before.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use chrono::{Offset, TimeZone};
use clickhouse::Client;
use serde::Deserialize;

use super::model::{AnalyticsQuery, Bucket, Dimension};

pub mod held;
use held::Held;

/// How long a superseded generation is kept after its successor was published.
const SUPERSEDED_GRACE: Duration = Duration::from_secs(60);
/// How long an unpublished generation may be in the making before it is dropped.
const ABANDONED_AFTER: Duration = Duration::from_secs(600);
/// ClickHouse `max_execution_time` of one partition's computation.
const COMPUTE_LIMIT: Duration = Duration::from_secs(120);
/// Low bits of a generation that are random (the rest is the time it was started, in µs).
const GENERATION_RANDOM_BITS: u32 = 10;

/// Where the rows of one query come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coverage {
    /// Whole UTC hours `[from, to)` (Unix seconds) read from summaries.
    pub hours: (i64, i64),
    /// The current summaries of partitions.
    pub summaries: Vec<Summarized>,
    /// The summarized partitions that hold events in the partial hours at either end of the
    /// range (those events are read raw).
    pub edges: Vec<Edge>,
    /// Events partitions without a current summary: read raw.
    pub unsummarized: Vec<String>,
    /// When the published state this is based on was read.
    pub published_at: Instant,
}

/// The current summary of a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summarized {
    /// The rollup partition, `"{day}-{generation}"`.
    pub generation: String,
    /// The first and last event_time in the partition (Unix ms; last < first when empty).
    pub first_ms: i64,
    pub last_ms: i64,
}

impl Coverage {
    /// The summaries that may hold events in `[from, to)` (Unix seconds).
    pub fn summaries_within(&self, (from, to): (i64, i64)) -> Vec<String> {
        self.summaries
            .iter()
            .filter(|s| from * 1000 <= s.last_ms && s.first_ms < to * 1000)
            .map(|s| s.generation.clone())
            .collect()
    }
}

/// The events a summarized partition holds in a partial hour at an end of a query's range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edge {
    pub partition: String,
    pub fingerprint: u64,
    /// All copies of each event in the partition agree on event_time.
    pub uniform: bool,
    /// Start of the UTC hour (Unix seconds).
    pub hour: i64,
    /// The part of the hour in the range: `[from_ms, to_ms)`.
    pub from_ms: i64,
    pub to_ms: i64,
}

/// The whole hours of `q`'s range a summary may answer, if any: the query must need only
/// counts and sums, filter and group by campaign and event type only, and its buckets (if
/// any) must start on whole UTC hours in its time zone over the range.
pub fn hours_for(q: &AnalyticsQuery) -> Option<(i64, i64)> {
    if !q.aggs().is_additive() {
        return None;
    }
    let summarized_dimension =
        |d: &Dimension| matches!(d, Dimension::CampaignId | Dimension::EventType);
    if !q.group_by.iter().all(summarized_dimension)
        || !q.filters.iter().all(|f| summarized_dimension(&f.dimension))
    {
        return None;
    }
    let from = q.range.from_ms.div_euclid(3_600_000) * 3_600
        + 3_600 * i64::from(q.range.from_ms.rem_euclid(3_600_000) != 0);
    let to = q.range.to_ms.div_euclid(3_600_000) * 3_600;
    if from >= to {
        return None;
    }
    match q.bucket {
        None => {}
        Some(Bucket::Minute) => return None,
        Some(Bucket::Hour | Bucket::Day | Bucket::Week | Bucket::Month) => {
            // Local hours start on whole UTC hours only where the offset is whole hours.
            // From the hour holding `from`: events of a partial hour go into its bucket.
            let first = q.range.from_ms.div_euclid(3_600_000) * 3_600;
            let whole = (first..=to).step_by(3_600).all(|s| {
                chrono::DateTime::from_timestamp(s, 0).is_some_and(|t| {
                    q.time_zone
                        .offset_from_utc_datetime(&t.naive_utc())
                        .fix()
                        .local_minus_utc()
                        % 3_600
                        == 0
                })
            });
            if !whole {
                return None;
            }
        }
    }
    Some((from, to))
}

/// One partition of `events`: its current fingerprint and its published summary, if any.
#[derive(Debug, clickhouse::Row, Deserialize)]
struct PartitionRow {
    partition_id: String,
    fingerprint: u64,
    /// 0 when the partition was never summarized.
    generation: u64,
    summarized_fingerprint: u64,
    published_at_ms: i64,
}

impl PartitionRow {
    fn is_current(&self) -> bool {
        self.generation != 0 && self.summarized_fingerprint == self.fingerprint
    }
}

const PARTITIONS: &str = "\
SELECT p.partition_id AS partition_id, p.fingerprint AS fingerprint, s.current AS generation,
       s.summarized AS summarized_fingerprint, toUnixTimestamp64Milli(s.published) AS published_at_ms
FROM (SELECT partition_id, groupBitXor(cityHash64(name)) AS fingerprint FROM system.parts
      WHERE database = currentDatabase() AND table = 'events' AND active GROUP BY partition_id) AS p
LEFT JOIN (SELECT toString(day) AS partition_id, max(generation) AS current,
                  argMax(fingerprint, generation) AS summarized, argMax(computed_at, generation) AS published
           FROM events_hourly_state GROUP BY day) AS s USING (partition_id)
ORDER BY partition_id DESC
SETTINGS join_use_nulls = 0";

const FINGERPRINT: &str = "SELECT groupBitXor(cityHash64(name)) FROM system.parts \
WHERE database = currentDatabase() AND table = 'events' AND active AND partition_id = ?";

const COMPUTE: &str = "\
INSERT INTO events_hourly (tenant, day, generation, hour, campaign_id, event_type, events, cost_micros, revenue_micros)
SELECT tenant, {day:UInt32}, {generation:UInt64}, toStartOfHour(toDateTime(event_time, 'UTC')) AS hour,
       campaign_id, event_type, count(), sum(cost_micros), sum(revenue_micros)
FROM events FINAL WHERE _partition_id = {partition:String}
GROUP BY tenant, hour, campaign_id, event_type";

/// The coarser summaries, from the hourly ones of the same generation.
const COMPUTE_COARSER: [&str; 2] = [
    "INSERT INTO events_daily (tenant, day, generation, date, campaign_id, event_type, events, cost_micros, revenue_micros)
SELECT tenant, day, generation, toStartOfDay(hour, 'UTC') AS date, campaign_id, event_type, sum(events), sum(cost_micros), sum(revenue_micros)
FROM events_hourly WHERE _partition_id = {summary:String}
GROUP BY tenant, day, generation, date, campaign_id, event_type",
    "INSERT INTO events_hourly_totals (tenant, day, generation, hour, event_type, events, cost_micros, revenue_micros)
SELECT tenant, day, generation, hour, event_type, sum(events), sum(cost_micros), sum(revenue_micros)
FROM events_hourly WHERE _partition_id = {summary:String}
GROUP BY tenant, day, generation, hour, event_type",
];

/// Every table a generation writes into.
const SUMMARY_TABLES: [&str; 3] = ["events_hourly", "events_daily", "events_hourly_totals"];

/// Whether all copies of each event in a partition agree on event_time (they differ only when
/// a client re-sent an event with another `sent_at`), the first and last event_time of any
/// copy, and how many events there are.
const EXTENT: &str = "SELECT countIf(lo != hi) = 0, toUnixTimestamp64Milli(min(lo)), toUnixTimestamp64Milli(max(hi)), count() \
FROM (SELECT min(event_time) AS lo, max(event_time) AS hi FROM events WHERE _partition_id = {partition:String} \
      GROUP BY tenant, campaign_id, event_type, toStartOfHour(timestamp), event_id)";

const PUBLISH: &str = "INSERT INTO events_hourly_state (day, generation, fingerprint, computed_at, uniform, first_ms, last_ms) \
SELECT {day:UInt32}, {generation:UInt64}, {fingerprint:UInt64}, fromUnixTimestamp64Milli({now:Int64}, 'UTC'), {uniform:UInt8}, \
       {first_ms:Int64}, {last_ms:Int64}";

/// The current fingerprint of every partition of `events`.
const FINGERPRINTS: &str = "SELECT partition_id, groupBitXor(cityHash64(name)) FROM system.parts \
WHERE database = currentDatabase() AND table = 'events' AND active GROUP BY partition_id";

/// The published summary of every day.
const PUBLISHED: &str = "SELECT toString(day), max(generation), argMax(fingerprint, generation), argMax(uniform, generation), \
argMax(first_ms, generation), argMax(last_ms, generation) \
FROM events_hourly_state GROUP BY day";

const ROLLUP_PARTITIONS: &str = "SELECT DISTINCT partition_id FROM system.parts \
WHERE database = currentDatabase() AND table IN ('events_hourly', 'events_daily', 'events_hourly_totals') AND active";

/// What one refresh did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Refreshed {
    /// Partitions summarized and published.
    pub computed: usize,
    /// Partitions that changed while they were being summarized (tried again next time).
    pub changed: usize,
    /// Partitions still without a current summary after this refresh (changed meanwhile, or
    /// summarized too recently to be again).
    pub stale: usize,
    /// Old generations dropped.
    pub dropped: usize,
}

/// What the last refreshes saw of each partition (see [`Rollup::refresh`]).
#[derive(Debug, Default)]
pub struct Pacing(HashMap<String, Seen>);

#[derive(Debug)]
struct Seen {
    /// The partition's fingerprint at the last refresh.
    fingerprint: u64,
    /// When it was last summarized, and how long that took.
    computed: Option<(Instant, Duration)>,
}

impl Pacing {
    /// Notes `p`'s fingerprint and says whether to summarize it now: only if it has not
    /// changed since the last refresh, and not sooner than ten times its last computation
    /// took after that began.
    fn due(&mut self, p: &PartitionRow) -> bool {
        let seen = self.0.entry(p.partition_id.clone()).or_insert(Seen {
            // First seen: not quiet yet (any fingerprint other than the current one).
            fingerprint: !p.fingerprint,
            computed: None,
        });
        let quiet = std::mem::replace(&mut seen.fingerprint, p.fingerprint) == p.fingerprint;
        quiet
            && seen
                .computed
                .is_none_or(|(started, took)| started.elapsed() >= took * 10)
    }

    fn computed(&mut self, p: &PartitionRow, started: Instant) {
        if let Some(seen) = self.0.get_mut(&p.partition_id) {
            seen.computed = Some((started, started.elapsed()));
        }
    }
}

/// A day's published summary.
#[derive(Debug, Clone, Copy)]
struct Published {
    generation: u64,
    fingerprint: u64,
    /// All copies of each event agree on event_time.
    uniform: bool,
    /// The first and last event_time of any copy in the partition (Unix ms; last < first
    /// when it is empty).
    first_ms: i64,
    last_ms: i64,
}

/// Each day's published summary, by events partition.
type PublishedDays = Arc<HashMap<String, Published>>;

/// How long what was published may be cached. A cached summary is used only while its
/// partition is still exactly the one summarized, and superseded generations are kept for
/// [`SUPERSEDED_GRACE`]; so this must stay well below that.
const PUBLISHED_CACHE: Duration = Duration::from_secs(1);

/// The current fingerprint of every partition of `events`.
type Fingerprints = Arc<Vec<(String, u64)>>;

/// The summaries of one database.
#[derive(Clone)]
pub struct Rollup {
    client: Client,
    /// When it was read, and what was published then.
    published: Arc<Mutex<Option<(Instant, PublishedDays)>>>,
    /// When the last read of the fingerprints started, and what it read.
    fingerprints: Arc<tokio::sync::Mutex<Option<(Instant, Fingerprints)>>>,
    held: Arc<Held>,
}

impl Rollup {
    /// `cache_bytes`: how much of the summaries may be held in memory; `max_execution_ms`:
    /// the time limit of a read of them.
    pub fn new(client: Client, cache_bytes: usize, max_execution_ms: u64) -> Self {
        Rollup {
            held: Arc::new(Held::new(client.clone(), cache_bytes, max_execution_ms)),
            client,
            published: Arc::default(),
            fingerprints: Arc::default(),
        }
    }

    async fn partitions(&self) -> clickhouse::error::Result<Vec<PartitionRow>> {
        self.client.query(PARTITIONS).fetch_all().await
    }

    /// Which partitions a query over `range` (milliseconds), whose whole `hours` summaries
    /// may answer, reads from summaries, and which raw. The parts of `events` are read fresh,
    /// so an event committed before the query is never missed; what was published is cached
    /// for a second (see [`PUBLISHED_CACHE`]).
    pub async fn coverage(
        &self,
        range: (i64, i64),
        hours: (i64, i64),
    ) -> clickhouse::error::Result<Coverage> {
        let (fingerprints, (published_at, published)) =
            tokio::try_join!(self.fingerprints(), self.published())?;
        let mut coverage = Coverage {
            hours,
            summaries: vec![],
            edges: vec![],
            unsummarized: vec![],
            published_at,
        };
        // The partial hours, in milliseconds: events at or after `start`, before `end`.
        let partial = [(range.0, hours.0 * 1000), (hours.1 * 1000, range.1)];
        for (partition, fingerprint) in fingerprints.iter() {
            match published.get(partition) {
                Some(p) if p.fingerprint == *fingerprint => {
                    coverage.summaries.push(Summarized {
                        generation: format!("{partition}-{}", p.generation),
                        first_ms: p.first_ms,
                        last_ms: p.last_ms,
                    });
                    for (start, end) in partial {
                        if start < end && start <= p.last_ms && p.first_ms < end {
                            coverage.edges.push(Edge {
                                partition: partition.clone(),
                                fingerprint: *fingerprint,
                                uniform: p.uniform,
                                hour: start.div_euclid(3_600_000) * 3_600,
                                from_ms: start,
                                to_ms: end,
                            });
                        }
                    }
                }
                _ => coverage.unsummarized.push(partition.clone()),
            }
        }
        Ok(coverage)
    }

    /// The current fingerprint of every partition of `events`, read after the caller
    /// arrived (so every part committed before is in it). Queries that arrive while it is
    /// being read wait for the next read and share it: one read per wave of queries.
    async fn fingerprints(&self) -> clickhouse::error::Result<Fingerprints> {
        let arrived = Instant::now();
        let mut last = self.fingerprints.lock().await;
        if let Some((started, fingerprints)) = &*last {
            if *started >= arrived {
                return Ok(fingerprints.clone());
            }
        }
        let started = Instant::now();
        let fingerprints: Fingerprints =
            Arc::new(self.client.query(FINGERPRINTS).fetch_all().await?);
        *last = Some((started, fingerprints.clone()));
        Ok(fingerprints)
    }

    /// What queries read from the summaries, held in memory.
    pub fn held(&self) -> &Held {
        &self.held
    }

    /// What is published, at most [`PUBLISHED_CACHE`] old, and when it was read.
    async fn published(&self) -> clickhouse::error::Result<(Instant, PublishedDays)> {
        if let Some((at, published)) = &*self.published.lock().unwrap_or_else(|e| e.into_inner()) {
            if at.elapsed() < PUBLISHED_CACHE {
                return Ok((*at, published.clone()));
            }
        }
        let read_at = Instant::now();
        let rows: Vec<(String, u64, u64, u8, i64, i64)> =
            self.client.query(PUBLISHED).fetch_all().await?;
        let published: PublishedDays = Arc::new(
            rows.into_iter()
                .map(
                    |(day, generation, fingerprint, uniform, first_ms, last_ms)| {
                        (
                            day,
                            Published {
                                generation,
                                fingerprint,
                                uniform: uniform != 0,
                                first_ms,
                                last_ms,
                            },
                        )
                    },
                )
                .collect(),
        );
        *self.published.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((read_at, published.clone()));
        // Superseded summaries, and partial hours of partitions summarized again since, serve
        // no query any more.
        self.held.retain(|partition, generation, fingerprint| {
            published.get(partition).is_some_and(|p| match generation {
                Some(g) => p.generation == g,
                None => p.fingerprint == fingerprint,
            })
        });
        Ok((read_at, published))
    }

    /// Summarizes every partition that changed since its summary, newest first, then drops
    /// generations no query can still read. A partition is summarized only once it has not
    /// changed for a whole refresh interval: one that keeps changing (today, under ingestion:
    /// a new part every flush) would make a summary that is out of date within a second, so
    /// the work (a `FINAL` read of the whole day) would be wasted and would only take CPU
    /// from ClickHouse's inserts; queries read such a partition raw. And a partition is
    /// summarized at most once per ten times its last computation took.
    pub async fn refresh(&self, pacing: &mut Pacing) -> clickhouse::error::Result<Refreshed> {
        let mut done = Refreshed::default();
        let partitions = self.partitions().await?;
        pacing
            .0
            .retain(|id, _| partitions.iter().any(|p| &p.partition_id == id));
        for p in partitions.iter().filter(|p| !p.is_current()) {
            // Only partitions of a day (toYYYYMMDD) can be summarized.
            let Ok(day) = p.partition_id.parse::<u32>() else {
                continue;
            };
            if !pacing.due(p) {
                done.stale += 1;
                continue;
            }
            let started = Instant::now();
            let published = self.compute(day, p).await?;
            pacing.computed(p, started);
            if published {
                done.computed += 1;
            } else {
                done.changed += 1;
                done.stale += 1;
            }
        }
        done.dropped = self.collect_garbage(&partitions).await?;
        Ok(done)
    }

    /// Summarizes one partition; publishes the summary if the partition did not change while
    /// it was computed (returns whether it did).
    async fn compute(&self, day: u32, p: &PartitionRow) -> clickhouse::error::Result<bool> {
        let generation = new_generation();
        self.client
            .query(COMPUTE)
            .param("day", day)
            .param("generation", generation)
            .param("partition", &p.partition_id)
            .with_setting("do_not_merge_across_partitions_select_final", "1")
            .with_setting("max_execution_time", COMPUTE_LIMIT.as_secs().to_string())
            .execute()
            .await?;
        let summary = format!("{day}-{generation}");
        for statement in COMPUTE_COARSER {
            self.client
                .query(statement)
                .param("summary", &summary)
                .execute()
                .await?;
        }
        let (uniform, first_ms, last_ms, events): (bool, i64, i64, u64) = self
            .client
            .query(EXTENT)
            .param("partition", &p.partition_id)
            .with_setting("max_execution_time", COMPUTE_LIMIT.as_secs().to_string())
            .fetch_one()
            .await?;
        let (first_ms, last_ms) = if events == 0 {
            (0, -1)
        } else {
            (first_ms, last_ms)
        };
        let after: Option<u64> = self
            .client
            .query(FINGERPRINT)
            .bind(&p.partition_id)
            .fetch_optional()
            .await?;
        // Changed meanwhile, or so slow that garbage collection (elsewhere) may already have
        // dropped part of it: not published.
        let late = now_ms() - started_ms(generation) > ABANDONED_AFTER.as_millis() as i64 / 2;
        if after != Some(p.fingerprint) || late {
            self.drop_generation(&summary).await?;
            return Ok(false);
        }
        self.client
            .query(PUBLISH)
            .param("day", day)
            .param("generation", generation)
            .param("fingerprint", p.fingerprint)
            .param("now", now_ms())
            .param("uniform", u8::from(uniform))
            .param("first_ms", first_ms)
            .param("last_ms", last_ms)
            .execute()
            .await?;
        Ok(true)
    }

    /// Drops rollup partitions that are neither published nor possibly in the making, and
    /// superseded ones a query can no longer be about to read. `partitions` is what was
    /// published when this refresh began: a generation published since is newer than that,
    /// so it is kept as one in the making, and what it supersedes goes at a later refresh.
    async fn collect_garbage(
        &self,
        partitions: &[PartitionRow],
    ) -> clickhouse::error::Result<usize> {
        let published: HashMap<&str, (u64, i64)> = partitions
            .iter()
            .filter(|p| p.generation != 0)
            .map(|p| (p.partition_id.as_str(), (p.generation, p.published_at_ms)))
            .collect();
        let now_ms = now_ms();
        let mut dropped = 0;
        let ids: Vec<String> = self.client.query(ROLLUP_PARTITIONS).fetch_all().await?;
        for id in ids {
            let Some((day, generation)) = parse_rollup_partition(&id) else {
                continue;
            };
            if !keep_generation(generation, published.get(day.as_str()).copied(), now_ms) {
                self.drop_generation(&id).await?;
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    async fn drop_generation(&self, id: &str) -> clickhouse::error::Result<()> {
        // `id` is "<u32>-<u64>", made or checked by this module: safe to splice.
        debug_assert!(parse_rollup_partition(id).is_some());
        for table in SUMMARY_TABLES {
            self.client
                .query(&format!("ALTER TABLE {table} DROP PARTITION ID '{id}'"))
                .execute()
                .await?;
        }
        Ok(())
    }

    /// Refreshes every `interval` until the task is dropped, and counts what it did in
    /// `metrics`. Instances start at a random point of the interval, so that several of them
    /// rarely summarize the same partition at once (each sees what the others published).
    pub async fn refresh_forever(self, interval: Duration, metrics: Arc<crate::metrics::Metrics>) {
        static WARNED: AtomicBool = AtomicBool::new(false);
        let mut random = [0u8; 4];
        let _ = getrandom::fill(&mut random);
        let phase = interval.mul_f64(f64::from(u32::from_le_bytes(random)) / f64::from(u32::MAX));
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + phase, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pacing = Pacing::default();
        loop {
            ticker.tick().await;
            match self.refresh(&mut pacing).await {
                Ok(done) => {
                    metrics
                        .rollup_computed
                        .fetch_add(done.computed as u64, Ordering::Relaxed);
                    metrics
                        .rollup_stale_partitions
                        .store(done.stale as u64, Ordering::Relaxed);
                    if done.computed + done.dropped > 0 {
                        tracing::debug!(?done, "hourly summaries refreshed");
                    }
                    WARNED.store(false, Ordering::Relaxed);
                }
                Err(err) => {
                    if !WARNED.swap(true, Ordering::Relaxed) {
                        tracing::warn!(error = %err, "cannot refresh the hourly summaries; analytics read raw events meanwhile");
                    }
                }
            }
        }
    }
}

/// Whether a generation of a day's summaries may still be read or published, given the day's
/// published generation and when it was published (none for a day never summarized, or
/// whose events are gone).
fn keep_generation(generation: u64, published: Option<(u64, i64)>, now_ms: i64) -> bool {
    let started_ms = started_ms(generation);
    match published {
        Some((current, _)) if generation == current => true,
        // Superseded: a query may have picked it a moment before its successor appeared.
        Some((current, published_at_ms)) if generation < current => {
            now_ms - published_at_ms < SUPERSEDED_GRACE.as_millis() as i64
        }
        // Newer than the published one, or the day's first: maybe in the making.
        _ => now_ms - started_ms < ABANDONED_AFTER.as_millis() as i64,
    }
}

/// `"<day>-<generation>"` → (day as the events partition id, generation).
fn parse_rollup_partition(id: &str) -> Option<(String, u64)> {
    let (day, generation) = id.split_once('-')?;
    let day: u32 = day.parse().ok()?;
    Some((day.to_string(), generation.parse().ok()?))
}

fn now_micros() -> u64 {
    chrono::Utc::now().timestamp_micros().max(0) as u64
}

fn now_ms() -> i64 {
    (now_micros() / 1000) as i64
}

/// When the computation of `generation` started (Unix ms).
fn started_ms(generation: u64) -> i64 {
    ((generation >> GENERATION_RANDOM_BITS) / 1000) as i64
}

fn new_generation() -> u64 {
    let mut random = [0u8; 2];
    let _ = getrandom::fill(&mut random);
    let random = u64::from(u16::from_le_bytes(random)) & ((1 << GENERATION_RANDOM_BITS) - 1);
    (now_micros() << GENERATION_RANDOM_BITS) | random
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analytics::model::{Filter, Metric, TimeRange};

    fn query(from_ms: i64, to_ms: i64) -> AnalyticsQuery {
        AnalyticsQuery {
            range: TimeRange { from_ms, to_ms },
            time_zone: "Europe/Berlin".parse().unwrap(),
            metrics: Metric::DEFAULT.to_vec(),
            group_by: vec![Dimension::CampaignId],
            bucket: Some(Bucket::Hour),
            filters: vec![Filter {
                dimension: Dimension::EventType,
                negate: false,
                values: vec!["click".into()],
            }],
            order_by: Metric::Spend,
            limit: Some(5),
            other: true,
        }
    }

    const H: i64 = 3_600_000;

    #[test]
    fn summaries_answer_the_whole_hours_of_sums_by_campaign_and_type() {
        let day = 1_764_547_200_000; // 2025-12-01T00:00Z
        assert_eq!(
            hours_for(&query(day, day + 24 * H)),
            Some((day / 1000, day / 1000 + 86_400))
        );
        // Partial hours at either end are read raw.
        assert_eq!(
            hours_for(&query(day + 1, day + 3 * H - 1)),
            Some((day / 1000 + 3_600, day / 1000 + 7_200))
        );
        assert_eq!(hours_for(&query(day + 1, day + H + 5)), None);
    }

    #[test]
    fn a_partition_is_summarized_only_after_a_refresh_without_change() {
        let part = |fingerprint| PartitionRow {
            partition_id: "20261201".into(),
            fingerprint,
            generation: 0,
            summarized_fingerprint: 0,
            published_at_ms: 0,
        };
        let mut pacing = Pacing::default();
        // Under ingestion the parts change between refreshes: never summarized.
        for fingerprint in 1..5 {
            assert!(!pacing.due(&part(fingerprint)), "changed ({fingerprint})");
        }
        // Quiet for one refresh: summarized.
        assert!(pacing.due(&part(4)));
        // Then not again before ten times the computation took, even if quiet.
        pacing.computed(&part(4), Instant::now() - Duration::from_secs(1));
        assert!(!pacing.due(&part(4)), "paced");
        pacing.computed(&part(4), Instant::now() - Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(20));
        assert!(pacing.due(&part(4)), "pacing over");
        // Another partition is judged on its own.
        let mut other = part(4);
        other.partition_id = "20261130".into();
        assert!(!pacing.due(&other), "first seen");
    }

    #[test]
    fn other_queries_read_raw_events() {
        let day = 1_764_547_200_000;
        let mut q = query(day, day + 24 * H);
        q.metrics.push(Metric::UniqueUsersApprox);
        assert_eq!(hours_for(&q), None, "distinct counts");
        let mut q = query(day, day + 24 * H);
        q.order_by = Metric::UniqueUsersExact;
        assert_eq!(hours_for(&q), None, "ranked by a distinct count");
        let mut q = query(day, day + 24 * H);
        q.group_by.push(Dimension::Country);
        assert_eq!(hours_for(&q), None, "a dimension not summarized");
        let mut q = query(day, day + 24 * H);
        q.filters[0].dimension = Dimension::Attribute("placement".into());
        assert_eq!(hours_for(&q), None, "an attribute filter");
        let mut q = query(day, day + 24 * H);
        q.bucket = Some(Bucket::Minute);
        assert_eq!(hours_for(&q), None, "minutes");
        let mut q = query(day, day + 24 * H);
        q.time_zone = "Asia/Kolkata".parse().unwrap();
        assert_eq!(hours_for(&q), None, "a half-hour zone");
        q.bucket = None;
        assert!(
            hours_for(&q).is_some(),
            "without buckets the zone does not matter"
        );
    }

    #[test]
    fn generations_are_dropped_only_when_no_query_can_read_them() {
        let at = |ms: i64| ((ms as u64) * 1000) << GENERATION_RANDOM_BITS;
        let now = 10_000_000;
        let (old, current, newer) = (at(now - 700_000), at(now - 30_000), at(now - 1_000));
        let published = Some((current, now - 20_000));
        assert!(
            keep_generation(current, published, now),
            "the published one"
        );
        assert!(keep_generation(old, published, now), "superseded 20 s ago");
        assert!(
            !keep_generation(old, Some((current, now - 61_000)), now),
            "superseded 61 s ago"
        );
        assert!(keep_generation(newer, published, now), "being computed");
        assert!(
            keep_generation(newer, None, now),
            "a day's first, being computed"
        );
        assert!(
            !keep_generation(old, None, now),
            "never published, started 700 s ago"
        );
        // Even the current generation of a day whose events are gone (not in `published`).
        assert!(!keep_generation(at(now - 601_000), None, now));
    }

    #[test]
    fn rollup_partition_ids_round_trip() {
        let generation = new_generation();
        let id = format!("20261130-{generation}");
        assert_eq!(
            parse_rollup_partition(&id),
            Some(("20261130".to_string(), generation))
        );
        assert_eq!(parse_rollup_partition("x-1"), None);
        assert_eq!(parse_rollup_partition("20261130"), None);
        assert_ne!(new_generation(), new_generation());
    }
}
