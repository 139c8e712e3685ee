//! Runs an [`AnalyticsQuery`]: checks the guards, sends the statements (concurrently when
//! there are several), and assembles groups, gap-filled series and the other row.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::{
    buckets,
    figures::{self, Figure, Fold, Names},
    model::{Agg, AnalyticsQuery, Metric},
    rollup::{self, held, Coverage, Rollup},
    sql::{self, Scope, Sql},
    AnalyticsError, GuardLimits, InvalidInput,
};
use crate::{config::AnalyticsSettings, metrics::Metrics};

/// The analytics service: a ClickHouse client, the guards, and the hourly summaries (when
/// they are kept).
#[derive(Clone)]
pub struct Analytics {
    client: clickhouse::Client,
    settings: AnalyticsSettings,
    rollup: Option<Rollup>,
    metrics: Arc<Metrics>,
}

/// Why [`Analytics::summarized`] stopped: what is held cannot answer (read raw events
/// instead), or the query itself failed.
enum GaveUp {
    Held(held::Error),
    Query(clickhouse::error::Error),
}

/// Most rows of figures read raw for the days without a current summary (per bucket,
/// campaign and event type); a query with more reads raw events with the top N in ClickHouse.
const RAW_FIGURES_MAX_ROWS: u64 = 250_000;

/// How much longer than its own time limit a read may take before the service stops waiting
/// for ClickHouse (network, queueing): a server that takes connections but never answers
/// (stopped, wedged) costs a dashboard this long and a 503, not a request that never ends.
const ANSWER_GRACE: Duration = Duration::from_secs(5);

/// How long the service waits for the answer to a read ClickHouse runs with
/// `max_execution_ms`: that, and [`ANSWER_GRACE`].
pub fn answer_limit(max_execution_ms: u64) -> Duration {
    Duration::from_millis(max_execution_ms) + ANSWER_GRACE
}

/// The aggregates of one group (or one bucket of it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Aggregates {
    pub events: u64,
    pub impressions: u64,
    pub clicks: u64,
    pub conversions: u64,
    pub spend: u64,
    pub revenue: u64,
    pub users_exact: u64,
    pub users_approx: u64,
}

/// A metric's value: an exact count or sum, or a ratio (`None` when its denominator is 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MetricValue {
    Count(u64),
    Ratio(Option<f64>),
}

impl Aggregates {
    pub fn get(&self, agg: Agg) -> u64 {
        match agg {
            Agg::Events => self.events,
            Agg::Impressions => self.impressions,
            Agg::Clicks => self.clicks,
            Agg::Conversions => self.conversions,
            Agg::Spend => self.spend,
            Agg::Revenue => self.revenue,
            Agg::UsersExact => self.users_exact,
            Agg::UsersApprox => self.users_approx,
        }
    }

    pub fn metric(&self, metric: Metric) -> MetricValue {
        match metric.ratio() {
            Some((num, den)) => {
                let den = self.get(den);
                MetricValue::Ratio((den != 0).then(|| self.get(num) as f64 / den as f64))
            }
            None => {
                let agg = Agg::ALL
                    .into_iter()
                    .find(|a| metric.aggs().contains(*a))
                    .expect("a metric has an aggregate");
                MetricValue::Count(self.get(agg))
            }
        }
    }

    fn add(&mut self, other: &Aggregates) {
        self.events += other.events;
        self.impressions += other.impressions;
        self.clicks += other.clicks;
        self.conversions += other.conversions;
        self.spend += other.spend;
        self.revenue += other.revenue;
        // Distinct counts of one bucket and group come in one row; nothing is summed twice.
        self.users_exact += other.users_exact;
        self.users_approx += other.users_approx;
    }
}

/// A result row: columns as `sql::aggregate` names them (RowBinary has no `flatten`).
#[derive(Debug, Clone, clickhouse::Row, Deserialize)]
pub(super) struct AggRow {
    pub bucket: u32,
    pub keys: Vec<String>,
    pub events: u64,
    pub impressions: u64,
    pub clicks: u64,
    pub conversions: u64,
    pub spend: u64,
    pub revenue: u64,
    pub users_exact: u64,
    pub users_approx: u64,
}

impl AggRow {
    fn aggs(&self) -> Aggregates {
        Aggregates {
            events: self.events,
            impressions: self.impressions,
            clicks: self.clicks,
            conversions: self.conversions,
            spend: self.spend,
            revenue: self.revenue,
            users_exact: self.users_exact,
            users_approx: self.users_approx,
        }
    }
}

/// One group's figures: `totals` over the whole range (absent for an ungrouped time series),
/// `points` per bucket (empty without buckets), every bucket present.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupResult {
    /// The group's values, in `group_by` order (empty when ungrouped, and for the other row).
    pub keys: Vec<String>,
    pub totals: Option<Aggregates>,
    pub points: Vec<(DateTime<Utc>, Aggregates)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct QueryOutput {
    /// Ranked by the ordering metric, highest first (ties by their values).
    pub groups: Vec<GroupResult>,
    /// Everything outside the top groups, when asked for.
    pub other: Option<GroupResult>,
}

impl Analytics {
    pub fn new(
        client: clickhouse::Client,
        settings: AnalyticsSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        // Without memory for what queries read from the summaries, every query reads raw.
        let rollup =
            (!settings.rollup_refresh.is_zero() && settings.rollup_cache_bytes > 0).then(|| {
                Rollup::new(
                    client.clone(),
                    settings.rollup_cache_bytes,
                    settings.max_execution_ms,
                )
            });
        Analytics {
            client,
            settings,
            rollup,
            metrics,
        }
    }

    /// Where `q`'s rows come from: summaries where they can answer it, else `None` (raw).
    async fn coverage(&self, q: &AnalyticsQuery) -> Option<(&Rollup, Coverage)> {
        let (rollup, hours) = (self.rollup.as_ref()?, rollup::hours_for(q)?);
        match rollup
            .coverage((q.range.from_ms, q.range.to_ms), hours)
            .await
        {
            Ok(c) if !c.summaries.is_empty() => Some((rollup, c)),
            Ok(_) => None,
            Err(err) => {
                tracing::debug!(error = %err, "cannot read which summaries are current; reading raw events");
                None
            }
        }
    }

    /// `q`'s rows from the summaries held in memory over `coverage`, the partial hours at
    /// the ends of the range, and the raw events of the partitions without a current summary
    /// (the only statement sent when everything else is held). `None` when what is held
    /// cannot answer (more than the memory budget, a read that failed or may not match the
    /// coverage): the caller then reads raw events.
    async fn summarized(
        &self,
        rollup: &Rollup,
        coverage: &Coverage,
        q: &AnalyticsQuery,
        tenant: &str,
        starts: &[DateTime<Utc>],
        n: u64,
    ) -> Result<Option<figures::Rows>, AnalyticsError> {
        let held = rollup.held();
        let spans = held::summary_spans(q, coverage.hours);
        let summaries = async {
            let mut read = vec![];
            for (summary, from, to) in spans {
                let generations = coverage.summaries_within((from, to));
                let figures = held
                    .summaries(summary, tenant, &generations, coverage.published_at)
                    .await?;
                read.push((figures, from, to));
            }
            Ok(read)
        };
        let edges = async {
            let mut read = vec![];
            for edge in &coverage.edges {
                read.push((edge, held.hour(tenant, edge).await?));
            }
            Ok(read)
        };
        let raw = async {
            if coverage.unsummarized.is_empty() {
                return Ok(vec![]);
            }
            let sql = sql::raw_figures(q, tenant, &coverage.unsummarized, held::by_campaign(q));
            self.read(&sql, self.settings.max_execution_ms)
                .with_setting("max_result_rows", RAW_FIGURES_MAX_ROWS.to_string())
                .with_setting("result_overflow_mode", "throw")
                .fetch_all::<(u32, String, u8, u64, u64, u64)>()
                .await
                .map_err(|e| match held::Error::from(e) {
                    // The query's own errors (guards: a time limit) are the answer.
                    held::Error::ClickHouse(e) => GaveUp::Query(e),
                    too_many => GaveUp::Held(too_many),
                })
        };
        let read = tokio::try_join!(
            async { summaries.await.map_err(GaveUp::Held) },
            async { edges.await.map_err(GaveUp::Held) },
            raw
        );
        self.metrics
            .rollup_held_bytes
            .store(held.bytes() as u64, Ordering::Relaxed);
        let (summaries, edges, raw) = match read {
            Ok(read) => read,
            Err(GaveUp::Query(err)) => return Err(self.error(err)),
            Err(GaveUp::Held(why)) => {
                tracing::debug!(?why, "the summaries held cannot answer; reading raw events");
                return Ok(None);
            }
        };

        let mut fold = Fold::new(q, starts.iter().map(DateTime::timestamp).collect());
        for (figures, from, to) in &summaries {
            for f in figures.iter().flat_map(|f| f.iter()) {
                if (*from..*to).contains(&f.time) {
                    fold.add(f);
                }
            }
        }
        for (edge, events) in &edges {
            for e in events.iter() {
                if (edge.from_ms..edge.to_ms).contains(&e.ms) {
                    fold.add(&e.figure);
                }
            }
        }
        let mut names = Names::default();
        let raw: Vec<Figure> = raw
            .into_iter()
            .map(
                |(bucket, campaign, event_type, events, cost, revenue)| Figure {
                    time: i64::from(bucket),
                    campaign: names.get(campaign),
                    event_type,
                    events,
                    cost,
                    revenue,
                },
            )
            .collect();
        for f in &raw {
            fold.add(f);
        }
        Ok(Some(fold.finish(n)))
    }

    pub fn settings(&self) -> &AnalyticsSettings {
        &self.settings
    }

    pub fn guard_limits(&self) -> GuardLimits {
        GuardLimits {
            max_execution_ms: self.settings.max_execution_ms,
            max_memory_bytes: self.settings.max_memory_bytes,
            max_result_rows: self.max_result_rows(),
        }
    }

    fn max_result_rows(&self) -> u64 {
        u64::from(self.settings.max_points.max(self.settings.max_groups)) + 1
    }

    /// A statement with the dedup setting and the guards of an analytics read.
    pub fn statement(&self, sql: &Sql) -> clickhouse::query::Query {
        self.read(sql, self.settings.max_execution_ms)
            .with_setting("max_result_rows", self.max_result_rows().to_string())
            .with_setting("result_overflow_mode", "throw")
    }

    /// A bounded read ([`crate::clickhouse::bounded_read`]) with the dedup setting and the
    /// memory limit.
    pub fn read(&self, sql: &Sql, max_execution_ms: u64) -> clickhouse::query::Query {
        crate::clickhouse::bounded_read(sql.query(&self.client), max_execution_ms)
            .with_setting("do_not_merge_across_partitions_select_final", "1")
            .with_setting(
                "max_memory_usage",
                self.settings.max_memory_bytes.to_string(),
            )
    }

    /// `read` (statements with `max_execution_ms`, which ClickHouse enforces once it runs
    /// them), given up as unavailable (503) when no answer came within [`answer_limit`].
    pub async fn within<T>(
        &self,
        max_execution_ms: u64,
        read: impl Future<Output = Result<T, AnalyticsError>>,
    ) -> Result<T, AnalyticsError> {
        tokio::time::timeout(answer_limit(max_execution_ms), read)
            .await
            .unwrap_or(Err(AnalyticsError::Unavailable(
                clickhouse::error::Error::TimedOut,
            )))
    }

    /// One statement's answer, within its time limit as [`Analytics::within`] has it.
    pub async fn answer<T>(
        &self,
        max_execution_ms: u64,
        read: impl Future<Output = clickhouse::error::Result<T>>,
    ) -> Result<T, AnalyticsError> {
        self.within(max_execution_ms, async {
            read.await.map_err(|e| self.error(e))
        })
        .await
    }

    pub fn error(&self, err: clickhouse::error::Error) -> AnalyticsError {
        AnalyticsError::from_clickhouse(err, &self.guard_limits())
    }

    async fn rows(&self, sql: Option<Sql>) -> Result<Vec<AggRow>, AnalyticsError> {
        match sql {
            None => Ok(vec![]),
            Some(sql) => self
                .statement(&sql)
                .fetch_all::<AggRow>()
                .await
                .map_err(|e| self.error(e)),
        }
    }

    /// `q`'s rows from raw events: up to three statements, concurrently: the (ranked) groups
    /// or series, the ranking totals of bucketed groups, and the other row (for counts and
    /// sums, the totals, from which the caller subtracts the top groups; distinct counts do not
    /// subtract, so those count the events outside the top groups).
    async fn statements(
        &self,
        q: &AnalyticsQuery,
        tenant: &str,
        n: u64,
    ) -> Result<(Vec<AggRow>, Vec<AggRow>, Vec<AggRow>), AnalyticsError> {
        let grouped = !q.group_by.is_empty();
        let main = sql::aggregate(q, tenant, Scope::Top(n), true);
        let ranking = (grouped && q.bucket.is_some())
            .then(|| sql::aggregate(q, tenant, Scope::Top(n), false));
        let other = q.other.then(|| match q.aggs().is_additive() {
            true => {
                let totals = AnalyticsQuery {
                    group_by: vec![],
                    limit: None,
                    other: false,
                    ..q.clone()
                };
                sql::aggregate(&totals, tenant, Scope::Top(0), true)
            }
            false => sql::aggregate(q, tenant, Scope::Other(n), true),
        });
        tokio::try_join!(self.rows(Some(main)), self.rows(ranking), self.rows(other))
    }

    /// Runs `q` for `tenant`.
    pub async fn run(
        &self,
        tenant: &str,
        q: &AnalyticsQuery,
    ) -> Result<QueryOutput, AnalyticsError> {
        let max_groups = self.settings.max_groups;
        let max_points = self.settings.max_points as usize;
        q.check(max_groups)?;
        let grouped = !q.group_by.is_empty();
        // Without a limit, one more group than allowed is fetched to tell "too many" apart.
        let n = match q.limit {
            Some(limit) => u64::from(limit),
            None => u64::from(max_groups) + 1,
        };

        let starts = match q.bucket {
            None => vec![],
            Some(bucket) => {
                let series = if grouped {
                    n as usize + usize::from(q.other)
                } else {
                    1
                };
                let max_buckets = (max_points / series.max(1)).max(1);
                buckets::sequence(bucket, q.time_zone, q.range.from_ms, q.range.to_ms, max_buckets)
                    .map_err(|_| {
                        let field = if q.limit.is_some() { "limit" } else { "bucket" };
                        InvalidInput::new(
                            "too_many_points",
                            field,
                            format!(
                                "{series} series of {bucket:?} buckets over this range exceed the {max_points} points allowed; use a coarser bucket, a shorter range{}",
                                if grouped { " or a smaller limit" } else { "" }
                            )
                            .to_lowercase(),
                        )
                        .with_limit(max_points as u64)
                    })?
            }
        };

        // The summaries' statements run one after another (coverage, summaries, edge hours),
        // each within the time limit; together they get one limit and 5 s, then the query
        // reads raw events (a fresh limit), as when what is held cannot answer.
        let limit = self.settings.max_execution_ms;
        let held = self
            .within(limit, async {
                match self.coverage(q).await {
                    Some((rollup, coverage)) => {
                        self.summarized(rollup, &coverage, q, tenant, &starts, n)
                            .await
                    }
                    None => Ok(None),
                }
            })
            .await;
        let held = match held {
            Err(AnalyticsError::Unavailable(clickhouse::error::Error::TimedOut)) => {
                tracing::debug!("the summaries did not answer in time; reading raw events");
                None
            }
            held => held?,
        };
        let counter = match held {
            Some(_) => &self.metrics.analytics_from_summaries,
            None => &self.metrics.analytics_from_raw,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let additive = q.aggs().is_additive();
        let (main, ranking, mut other) = match held {
            Some(rows) => (rows.main, rows.ranking, rows.totals),
            None => self.within(limit, self.statements(q, tenant, n)).await?,
        };
        if q.other && additive {
            subtract_groups(&mut other, &main);
        }

        let too_many = |count: usize| -> Result<(), AnalyticsError> {
            if q.limit.is_none() && count > max_groups as usize {
                return Err(AnalyticsError::Guard {
                    code: "too_many_groups",
                    message: format!(
                        "more than {max_groups} groups; give a limit (top-N) or filters"
                    ),
                    limit: Some(u64::from(max_groups)),
                });
            }
            Ok(())
        };

        let groups = match (grouped, q.bucket.is_some()) {
            (false, false) => vec![GroupResult {
                keys: vec![],
                totals: Some(main.first().map(AggRow::aggs).unwrap_or_default()),
                points: vec![],
            }],
            (false, true) => vec![GroupResult {
                keys: vec![],
                totals: None,
                points: fill(&starts, &main),
            }],
            (true, false) => {
                too_many(main.len())?;
                main.into_iter()
                    .map(|r| GroupResult {
                        totals: Some(r.aggs()),
                        keys: r.keys,
                        points: vec![],
                    })
                    .collect()
            }
            (true, true) => {
                too_many(ranking.len())?;
                let mut by_keys: HashMap<Vec<String>, Vec<AggRow>> = HashMap::new();
                for row in main {
                    by_keys.entry(row.keys.clone()).or_default().push(row);
                }
                let mut groups: Vec<GroupResult> = ranking
                    .into_iter()
                    .map(|r| {
                        let rows = by_keys.remove(&r.keys).unwrap_or_default();
                        GroupResult {
                            points: fill(&starts, &rows),
                            totals: Some(r.aggs()),
                            keys: r.keys,
                        }
                    })
                    .collect();
                // A group can enter the top between the two statements (events arriving);
                // keep its series rather than drop data.
                let mut late: Vec<_> = by_keys.into_iter().collect();
                late.sort_by(|a, b| a.0.cmp(&b.0));
                groups.extend(late.into_iter().map(|(keys, rows)| GroupResult {
                    keys,
                    totals: None,
                    points: fill(&starts, &rows),
                }));
                groups
            }
        };
        let other = q.other.then(|| GroupResult {
            keys: vec![],
            totals: q
                .bucket
                .is_none()
                .then(|| other.first().map(AggRow::aggs).unwrap_or_default()),
            points: if q.bucket.is_some() {
                fill(&starts, &other)
            } else {
                vec![]
            },
        });
        Ok(QueryOutput { groups, other })
    }
}

/// Totals (one row per bucket) minus the figures of the groups in `groups` (as many rows per
/// bucket as groups). Saturating: an event committed between the two statements must not
/// make a figure wrap around.
fn subtract_groups(totals: &mut [AggRow], groups: &[AggRow]) {
    for total in totals.iter_mut() {
        for g in groups.iter().filter(|g| g.bucket == total.bucket) {
            total.events = total.events.saturating_sub(g.events);
            total.impressions = total.impressions.saturating_sub(g.impressions);
            total.clicks = total.clicks.saturating_sub(g.clicks);
            total.conversions = total.conversions.saturating_sub(g.conversions);
            total.spend = total.spend.saturating_sub(g.spend);
            total.revenue = total.revenue.saturating_sub(g.revenue);
        }
    }
}

/// Every bucket of `starts` with the figures of `rows` (zeros where there are none). A row in
/// a bucket the sequence lacks is kept in its place rather than dropped.
fn fill(starts: &[DateTime<Utc>], rows: &[AggRow]) -> Vec<(DateTime<Utc>, Aggregates)> {
    let mut points: BTreeMap<i64, Aggregates> = starts
        .iter()
        .map(|s| (s.timestamp(), Aggregates::default()))
        .collect();
    for row in rows {
        let start = i64::from(row.bucket);
        if !points.contains_key(&start) {
            tracing::warn!(
                start,
                "a bucket ClickHouse returned is not in the computed sequence"
            );
        }
        points.entry(start).or_default().add(&row.aggs());
    }
    points
        .into_iter()
        .map(|(s, a)| (DateTime::from_timestamp(s, 0).unwrap_or_default(), a))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_ask_clickhouse_to_stop_them_when_the_service_goes_away() {
        let line = crate::clickhouse::testing::first_request_line(|url| async move {
            let settings = AnalyticsSettings {
                max_range_days: 1,
                max_groups: 1,
                max_points: 1,
                max_execution_ms: 1000,
                max_memory_bytes: 1 << 30,
                export_max_execution_ms: 1000,
                export_settle_ms: 0,
                rollup_refresh: Duration::ZERO,
                rollup_cache_bytes: 0,
            };
            let client = clickhouse::Client::default().with_url(url);
            let analytics = Analytics::new(client, settings, Arc::new(Metrics::default()));
            let mut sql = Sql::new();
            sql.push("SELECT 1");
            analytics.read(&sql, 1000).fetch_all::<u8>().await
        })
        .await;
        // ClickHouse cancels on a closed connection only statements that are read-only.
        for setting in [
            "cancel_http_readonly_queries_on_client_close=1",
            "readonly=2",
        ] {
            assert!(line.contains(setting), "{setting}: {line}");
        }
    }

    #[test]
    fn ratios_are_undefined_without_a_denominator() {
        let a = Aggregates {
            impressions: 0,
            clicks: 0,
            revenue: 5,
            spend: 2,
            ..Default::default()
        };
        assert_eq!(a.metric(Metric::Ctr), MetricValue::Ratio(None));
        assert_eq!(a.metric(Metric::Roas), MetricValue::Ratio(Some(2.5)));
        assert_eq!(a.metric(Metric::Revenue), MetricValue::Count(5));
    }

    #[test]
    fn gaps_are_filled_with_zeros() {
        let starts: Vec<_> = (0..4)
            .map(|h| DateTime::from_timestamp(h * 3600, 0).unwrap())
            .collect();
        let rows = vec![AggRow {
            bucket: 7200,
            keys: vec![],
            events: 3,
            impressions: 0,
            clicks: 0,
            conversions: 0,
            spend: 0,
            revenue: 0,
            users_exact: 0,
            users_approx: 0,
        }];
        let points = fill(&starts, &rows);
        assert_eq!(points.len(), 4);
        assert_eq!(
            points.iter().map(|p| p.1.events).collect::<Vec<_>>(),
            vec![0, 0, 3, 0]
        );
    }
}
