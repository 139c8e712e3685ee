//! What queries read from the summaries, held in memory.
//!
//! A published generation of a day's summaries never changes (a new computation writes a new
//! generation), and neither do the events of a partition while its fingerprint stays the
//! same. So the rows a query reads from them are kept, per tenant, and later queries only
//! ask ClickHouse which partitions changed (and read those raw):
//!
//! - the rows of one summary table in one generation;
//! - the events of one partition in one UTC hour, one copy per event (the one `FINAL` keeps),
//!   for ranges that start or end inside an hour.
//!
//! The least recently used entries go when their estimated size exceeds the budget
//! (`ADTRACK_ROLLUP_CACHE_MB`); a read that alone would exceed it is refused, and remembered
//! as such (the query then reads raw events).
//!
//! Two reads could otherwise see something else than what a query's coverage describes, and
//! are not used then (the query reads raw events): a summary read finishing so long after the
//! published state was read that the generation may have been dropped meanwhile (see
//! [`STALE_AFTER`]), and a partial hour read after its partition changed (its fingerprint is
//! read again after it).

use std::{
    collections::HashMap,
    mem::size_of,
    sync::{Arc, Mutex},
};

use clickhouse::Client;

use super::Edge;
use crate::analytics::{
    figures::{Figure, Names},
    model::{AnalyticsQuery, Dimension},
};

/// A summary table, its time column, and its campaign column.
#[derive(Debug, PartialEq, Eq)]
pub struct Summary {
    pub table: &'static str,
    time: &'static str,
    campaign: &'static str,
}

pub const HOURLY: Summary = Summary {
    table: "events_hourly",
    time: "hour",
    campaign: "CAST(campaign_id AS String)",
};
pub const DAILY: Summary = Summary {
    table: "events_daily",
    time: "date",
    campaign: "CAST(campaign_id AS String)",
};
pub const HOURLY_TOTALS: Summary = Summary {
    table: "events_hourly_totals",
    time: "hour",
    campaign: "''",
};

/// Which summary serves which whole hours of `q` (Unix seconds): totals without the
/// campaign when `q` neither groups nor filters by it; otherwise whole UTC days from the daily
/// summary when `q` has no buckets, and the hours around them from the hourly one.
pub fn summary_spans(
    q: &AnalyticsQuery,
    (from, to): (i64, i64),
) -> Vec<(&'static Summary, i64, i64)> {
    if !by_campaign(q) {
        return vec![(&HOURLY_TOTALS, from, to)];
    }
    let (days_from, days_to) = (
        from.div_euclid(86_400) * 86_400 + 86_400 * i64::from(from.rem_euclid(86_400) != 0),
        to.div_euclid(86_400) * 86_400,
    );
    if q.bucket.is_some() || days_from >= days_to {
        return vec![(&HOURLY, from, to)];
    }
    let mut spans = vec![(&DAILY, days_from, days_to)];
    if from < days_from {
        spans.push((&HOURLY, from, days_from));
    }
    if days_to < to {
        spans.push((&HOURLY, days_to, to));
    }
    spans
}

/// Whether `q` groups or filters by campaign.
pub fn by_campaign(q: &AnalyticsQuery) -> bool {
    q.group_by.contains(&Dimension::CampaignId)
        || q.filters
            .iter()
            .any(|f| f.dimension == Dimension::CampaignId)
}

/// One event of an hour at the edge of a range: its event_time (Unix ms) and its figure
/// (`time` is the start of its hour, `events` is 1).
#[derive(Debug, Clone)]
pub struct EdgeEvent {
    pub ms: i64,
    pub figure: Figure,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Summary {
        table: &'static str,
        /// The rollup partition, `"{day}-{generation}"`.
        generation: String,
        tenant: String,
    },
    Hour {
        partition: String,
        fingerprint: u64,
        hour: i64,
        tenant: String,
    },
}

#[derive(Clone)]
enum Value {
    Summary(Arc<Vec<Figure>>),
    Hour(Arc<Vec<EdgeEvent>>),
}

struct Entry {
    value: Value,
    bytes: usize,
    used: u64,
}

#[derive(Default)]
struct Entries {
    map: HashMap<Key, Entry>,
    bytes: usize,
    clock: u64,
    /// Entries too large for the budget (until they are superseded).
    too_large: std::collections::HashSet<Key>,
}

/// Estimated bytes of an entry besides its rows (key, map slot, vectors).
const ENTRY_OVERHEAD: usize = 256;

/// How long after the published state was read a summary read may finish and still be used:
/// a generation is dropped at the earliest a minute after its successor was published
/// (`SUPERSEDED_GRACE`), so one current then still exists for this long (with room for clocks
/// of other instances that differ by seconds).
pub const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

impl Entries {
    fn get(&mut self, key: &Key) -> Option<Value> {
        self.clock += 1;
        let entry = self.map.get_mut(key)?;
        entry.used = self.clock;
        Some(entry.value.clone())
    }

    /// Keeps `value`, dropping the least recently used entries while over `budget`; a value
    /// larger than the budget is not kept (and drops nothing).
    fn put(&mut self, key: Key, value: Value, bytes: usize, budget: usize) {
        let bytes = bytes + ENTRY_OVERHEAD;
        if bytes > budget {
            return;
        }
        self.clock += 1;
        if let Some(old) = self.map.insert(
            key,
            Entry {
                value,
                bytes,
                used: self.clock,
            },
        ) {
            self.bytes -= old.bytes;
        }
        self.bytes += bytes;
        while self.bytes > budget {
            let Some(oldest) = self
                .map
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(e) = self.map.remove(&oldest) {
                self.bytes -= e.bytes;
            }
        }
    }
}

/// Estimated bytes of `figures` (their campaign names are shared within one read).
fn size_of_figures<'a>(figures: impl Iterator<Item = &'a Figure>, names: usize) -> usize {
    figures.count() * size_of::<EdgeEvent>() + names
}

/// Summaries and edge hours of one database, held in memory.
pub struct Held {
    client: Client,
    budget: usize,
    /// `max_execution_time` of a read (the analytics limit), in ms.
    max_execution_ms: u64,
    entries: Mutex<Entries>,
    /// One read from ClickHouse at a time: concurrent queries missing the same rows wait for
    /// the first to read them instead of reading them again (and others wait too: misses are
    /// rare, once per generation or hour).
    reading: tokio::sync::Mutex<()>,
}

/// Why what is held cannot answer a query (it reads raw events instead).
#[derive(Debug)]
pub enum Error {
    ClickHouse(clickhouse::error::Error),
    /// A read that alone would exceed the budget.
    OverBudget,
    /// A read that may not match the query's coverage (see the module doc).
    Stale,
}

impl From<clickhouse::error::Error> for Error {
    fn from(e: clickhouse::error::Error) -> Self {
        match crate::clickhouse::error_code(&e) {
            // TOO_MANY_ROWS, TOO_MANY_ROWS_OR_BYTES: the row limit derived from the budget.
            Some(158 | 396) => Error::OverBudget,
            _ => Error::ClickHouse(e),
        }
    }
}

/// Deduplicated events of a partition in one hour: per event (the table's sorting key) the
/// last received copy, as `FINAL` keeps it. `{rows}` selects the copies grouped.
const HOUR_EVENTS: &str = "\
SELECT toUnixTimestamp64Milli(winner.1), CAST(campaign_id AS String), toUInt8(event_type), winner.2, winner.3
FROM (SELECT campaign_id, event_type, argMax((event_time, cost_micros, revenue_micros), received_at) AS winner
      FROM events WHERE tenant = {tenant:String} AND _partition_id = {partition:String} AND {rows}
      GROUP BY tenant, campaign_id, event_type, toStartOfHour(timestamp), event_id)
WHERE winner.1 >= fromUnixTimestamp64Milli({from:Int64}, 'UTC') AND winner.1 < fromUnixTimestamp64Milli({to:Int64}, 'UTC')";

/// The copies in the hour: where all copies of each event agree on event_time (`uniform`),
/// the copies found by event_time are all of them ...
const IN_HOUR: &str = "event_time >= fromUnixTimestamp64Milli({from:Int64}, 'UTC') \
AND event_time < fromUnixTimestamp64Milli({to:Int64}, 'UTC')";
/// ... elsewhere every copy of an event with a copy in the hour is looked up by the primary
/// index, and the last received one decides whether the event is in the hour at all.
const OF_EVENTS_IN_HOUR: &str =
    "(tenant, campaign_id, event_type, toStartOfHour(timestamp), event_id) IN \
(SELECT tenant, campaign_id, event_type, toStartOfHour(timestamp), event_id FROM events \
 WHERE tenant = {tenant:String} AND _partition_id = {partition:String} AND {in_hour})";

impl Held {
    pub fn new(client: Client, budget_bytes: usize, max_execution_ms: u64) -> Self {
        Held {
            client,
            budget: budget_bytes,
            max_execution_ms,
            entries: Mutex::default(),
            reading: tokio::sync::Mutex::new(()),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps only the entries `keep(events partition, Some(generation), _)` (summaries) or
    /// `keep(events partition, None, fingerprint)` (partial hours) is true for.
    pub fn retain(&self, keep: impl Fn(&str, Option<u64>, u64) -> bool) {
        let kept = |key: &Key| match key {
            Key::Summary { generation, .. } => super::parse_rollup_partition(generation)
                .is_some_and(|(day, g)| keep(&day, Some(g), 0)),
            Key::Hour {
                partition,
                fingerprint,
                ..
            } => keep(partition, None, *fingerprint),
        };
        let mut entries = self.entries();
        let mut freed = 0;
        entries.map.retain(|key, entry| {
            let kept = kept(key);
            if !kept {
                freed += entry.bytes;
            }
            kept
        });
        entries.bytes -= freed;
        entries.too_large.retain(kept);
    }

    /// Estimated bytes held.
    pub fn bytes(&self) -> usize {
        self.entries().bytes
    }

    /// Rows that fit in the budget.
    fn max_rows(&self) -> u64 {
        (self.budget / size_of::<EdgeEvent>()).max(1) as u64
    }

    /// A read's settings: the analytics time limit, and no more rows than fit in the budget.
    fn read(&self, sql: &str) -> clickhouse::query::Query {
        self.client
            .query(sql)
            .with_setting(
                "max_execution_time",
                format!("{:.3}", self.max_execution_ms as f64 / 1000.0),
            )
            .with_setting("max_result_rows", self.max_rows().to_string())
            .with_setting("result_overflow_mode", "throw")
    }

    /// The rows of `summary` for `tenant` in each of `generations` (rollup partitions),
    /// published as of `published_at`.
    pub async fn summaries(
        &self,
        summary: &'static Summary,
        tenant: &str,
        generations: &[String],
        published_at: std::time::Instant,
    ) -> Result<Vec<Arc<Vec<Figure>>>, Error> {
        let key = |generation: &String| Key::Summary {
            table: summary.table,
            generation: generation.clone(),
            tenant: tenant.to_string(),
        };
        let cached = |entries: &mut Entries| {
            let mut found = vec![];
            let mut missing = vec![];
            for g in generations {
                match entries.get(&key(g)) {
                    Some(Value::Summary(rows)) => found.push(rows),
                    _ if entries.too_large.contains(&key(g)) => return Err(Error::OverBudget),
                    _ => missing.push(g.clone()),
                }
            }
            Ok((found, missing))
        };
        let (found, missing) = cached(&mut self.entries())?;
        if missing.is_empty() {
            return Ok(found);
        }
        let _reading = self.reading.lock().await;
        let (mut found, missing) = cached(&mut self.entries())?;
        if missing.is_empty() {
            return Ok(found);
        }
        let rows: Vec<(String, u32, String, u8, u64, u64, u64)> = match self
            .read(&format!(
                "SELECT _partition_id, toUInt32({time}), {campaign}, toUInt8(event_type), events, cost_micros, revenue_micros \
                 FROM {table} WHERE tenant = {{tenant:String}} AND _partition_id IN {{generations:Array(String)}}",
                time = summary.time,
                campaign = summary.campaign,
                table = summary.table,
            ))
            .param("tenant", tenant)
            .param("generations", &missing)
            .fetch_all()
            .await
            .map_err(Error::from)
        {
            Err(Error::OverBudget) => {
                let mut entries = self.entries();
                entries.too_large.extend(missing.iter().map(key));
                return Err(Error::OverBudget);
            }
            read => read?,
        };
        if published_at.elapsed() > STALE_AFTER {
            return Err(Error::Stale);
        }
        let mut names = Names::default();
        let mut by_generation: HashMap<String, Vec<Figure>> =
            missing.iter().map(|g| (g.clone(), vec![])).collect();
        for (generation, time, campaign, event_type, events, cost, revenue) in rows {
            if let Some(figures) = by_generation.get_mut(&generation) {
                figures.push(Figure {
                    time: i64::from(time),
                    campaign: names.get(campaign),
                    event_type,
                    events,
                    cost,
                    revenue,
                });
            }
        }
        let mut entries = self.entries();
        let mut names_bytes = names.bytes;
        for (generation, figures) in by_generation {
            let bytes = size_of_figures(figures.iter(), std::mem::take(&mut names_bytes));
            let figures = Arc::new(figures);
            entries.put(
                key(&generation),
                Value::Summary(figures.clone()),
                bytes,
                self.budget,
            );
            found.push(figures);
        }
        Ok(found)
    }

    /// The events of `edge`'s partition for `tenant` in its hour, one copy per event.
    pub async fn hour(&self, tenant: &str, edge: &Edge) -> Result<Arc<Vec<EdgeEvent>>, Error> {
        let key = Key::Hour {
            partition: edge.partition.clone(),
            fingerprint: edge.fingerprint,
            hour: edge.hour,
            tenant: tenant.to_string(),
        };
        if let Some(Value::Hour(events)) = self.entries().get(&key) {
            return Ok(events);
        }
        let _reading = self.reading.lock().await;
        if let Some(Value::Hour(events)) = self.entries().get(&key) {
            return Ok(events);
        }
        let rows = match edge.uniform {
            true => IN_HOUR.to_string(),
            false => OF_EVENTS_IN_HOUR.replace("{in_hour}", IN_HOUR),
        };
        let rows: Vec<(i64, String, u8, u64, u64)> = self
            .read(&HOUR_EVENTS.replace("{rows}", &rows))
            .param("tenant", tenant)
            .param("partition", &edge.partition)
            .param("from", edge.hour * 1000)
            .param("to", (edge.hour + 3600) * 1000)
            .fetch_all()
            .await?;
        // Read from the partition as summarized, or (changed meanwhile) not used: the summary
        // and these events would describe two different states of it.
        let after: Option<u64> = self
            .client
            .query(super::FINGERPRINT)
            .bind(&edge.partition)
            .fetch_optional()
            .await?;
        if after != Some(edge.fingerprint) {
            return Err(Error::Stale);
        }
        let mut names = Names::default();
        let events: Vec<EdgeEvent> = rows
            .into_iter()
            .map(|(ms, campaign, event_type, cost, revenue)| EdgeEvent {
                ms,
                figure: Figure {
                    time: edge.hour,
                    campaign: names.get(campaign),
                    event_type,
                    events: 1,
                    cost,
                    revenue,
                },
            })
            .collect();
        let bytes = size_of_figures(events.iter().map(|e| &e.figure), names.bytes);
        let events = Arc::new(events);
        self.entries()
            .put(key, Value::Hour(events.clone()), bytes, self.budget);
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analytics::model::{Bucket, Filter, Metric, TimeRange};

    #[test]
    fn the_coarsest_summary_that_answers_is_read() {
        const DAY: i64 = 86_400;
        let tables = |q: &AnalyticsQuery, hours| -> Vec<(&str, i64, i64)> {
            summary_spans(q, hours)
                .into_iter()
                .map(|(s, a, b)| (s.table, a, b))
                .collect()
        };
        let mut q = AnalyticsQuery {
            range: TimeRange {
                from_ms: 0,
                to_ms: 5 * DAY * 1000,
            },
            time_zone: "UTC".parse().unwrap(),
            metrics: vec![Metric::Ctr],
            group_by: vec![],
            bucket: Some(Bucket::Hour),
            filters: vec![],
            order_by: Metric::Ctr,
            limit: None,
            other: false,
        };
        let hours = (DAY - 3_600, 4 * DAY + 7_200);
        assert_eq!(
            tables(&q, hours),
            [("events_hourly_totals", hours.0, hours.1)]
        );
        q.filters.push(Filter {
            dimension: Dimension::CampaignId,
            negate: false,
            values: vec!["c".into()],
        });
        assert_eq!(tables(&q, hours), [("events_hourly", hours.0, hours.1)]);
        q.bucket = None;
        assert_eq!(
            tables(&q, hours),
            [
                ("events_daily", DAY, 4 * DAY),
                ("events_hourly", hours.0, DAY),
                ("events_hourly", 4 * DAY, hours.1)
            ]
        );
        assert_eq!(
            tables(&q, (DAY + 3_600, 2 * DAY - 3_600)),
            [("events_hourly", DAY + 3_600, 2 * DAY - 3_600)]
        );
    }

    fn figures(n: usize) -> Value {
        Value::Summary(Arc::new(vec![
            Figure {
                time: 0,
                campaign: Arc::from(""),
                event_type: 1,
                events: 1,
                cost: 0,
                revenue: 0,
            };
            n
        ]))
    }

    fn key(generation: &str) -> Key {
        Key::Summary {
            table: "events_hourly",
            generation: generation.into(),
            tenant: "t".into(),
        }
    }

    #[test]
    fn only_what_is_current_is_kept() {
        let held = Held::new(Client::default(), 1 << 20, 1000);
        let hour = |fingerprint| Key::Hour {
            partition: "20261130".into(),
            fingerprint,
            hour: 0,
            tenant: "t".into(),
        };
        {
            let mut entries = held.entries();
            for k in [key("20261130-7"), key("20261130-8"), hour(1), hour(2)] {
                entries.put(k, figures(1), 10, 1 << 20);
            }
        }
        held.retain(|partition, generation, fingerprint| {
            partition == "20261130" && (generation == Some(8) || fingerprint == 2)
        });
        let mut entries = held.entries();
        assert!(entries.get(&key("20261130-8")).is_some());
        assert!(entries.get(&hour(2)).is_some());
        assert!(entries.get(&key("20261130-7")).is_none());
        assert!(entries.get(&hour(1)).is_none());
        assert_eq!(entries.bytes, 2 * (10 + ENTRY_OVERHEAD));
    }

    #[test]
    fn the_least_recently_used_entries_go_over_the_budget() {
        let o = ENTRY_OVERHEAD;
        let budget = 2 * (o + 40) + 10;
        let mut entries = Entries::default();
        entries.put(key("a"), figures(1), 40, budget);
        entries.put(key("b"), figures(1), 40, budget);
        assert!(entries.get(&key("a")).is_some(), "a is now the most recent");
        entries.put(key("c"), figures(1), 40, budget);
        assert!(
            entries.get(&key("b")).is_none(),
            "b was the least recently used"
        );
        assert!(entries.get(&key("a")).is_some());
        assert!(entries.get(&key("c")).is_some());
        assert_eq!(entries.bytes, 2 * (o + 40));
        entries.put(key("c"), figures(1), 10, budget);
        assert_eq!(
            entries.bytes,
            2 * o + 50,
            "a replaced entry no longer counts"
        );
        entries.put(key("d"), figures(1), budget, budget);
        assert!(
            entries.get(&key("d")).is_none(),
            "larger than the budget: not kept"
        );
        assert_eq!(entries.bytes, 2 * o + 50, "and nothing else dropped for it");
        let empty = Value::Summary(Arc::new(vec![]));
        entries.put(key("e"), empty, 0, budget);
        assert!(entries.get(&key("b")).is_none() && entries.bytes <= budget);
    }
}
