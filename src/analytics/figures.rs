//! Answers a query from figures per hour (or day), campaign and event type — the rows of the
//! summaries, held in memory (see `rollup::held`), and the same figures read from raw events —
//! without ClickHouse: filters, buckets, groups, ranking and the top N, as the SQL statements
//! of [`super::sql::aggregate`] would (same rows, same order).

use std::{cmp::Ordering, collections::HashMap, mem::size_of, sync::Arc};

use super::{
    engine::{AggRow, Aggregates, MetricValue},
    model::{Agg, AnalyticsQuery, Dimension, Metric},
};
use crate::domain::event::EventType;

/// The events of one (hour or day, campaign, event type): a summary row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Figure {
    /// Start of the UTC hour or day (or of the query's bucket, for raw figures; Unix seconds).
    pub time: i64,
    /// Empty in summaries without the campaign.
    pub campaign: Arc<str>,
    /// The event type's value in the table's `Enum8` ([`EventType::from_code`]).
    pub event_type: u8,
    pub events: u64,
    pub cost: u64,
    pub revenue: u64,
}

/// The name of the event type with `Enum8` value `code` ("" for none).
fn type_name(code: u8) -> &'static str {
    EventType::from_code(code as i8).map_or("", EventType::as_str)
}

/// Campaign names of one read, each allocated once.
#[derive(Default)]
pub struct Names {
    names: HashMap<String, Arc<str>>,
    /// Estimated bytes of the names.
    pub bytes: usize,
}

impl Names {
    pub fn get(&mut self, name: String) -> Arc<str> {
        if let Some(n) = self.names.get(&name) {
            return n.clone();
        }
        self.bytes += name.len() + 2 * size_of::<usize>();
        let n: Arc<str> = Arc::from(name.as_str());
        self.names.insert(name, n.clone());
        n
    }
}

/// A group: its campaign (an index into `Fold::names`) and event type, each 0 unless grouped
/// by.
type GroupKey = (u32, u8);

/// The statements' rows, as [`super::sql::aggregate`] would return them: the top `n` groups
/// (per bucket when bucketed), their ranking totals (bucketed and grouped only) and the
/// totals per bucket (for the other row, when asked for).
pub struct Rows {
    pub(super) main: Vec<AggRow>,
    pub(super) ranking: Vec<AggRow>,
    pub(super) totals: Vec<AggRow>,
}

/// Sums figures into the buckets and groups of a query.
pub struct Fold<'q, 'f> {
    q: &'q AnalyticsQuery,
    /// Bucket starts (Unix seconds), ascending; empty without buckets.
    starts: Vec<i64>,
    by_campaign: bool,
    by_type: bool,
    /// Campaign names seen, numbered, by the address of their text (the figures of one read
    /// share their names; every figure added outlives the fold, so an address is never
    /// reused meanwhile) and by the text itself.
    names: Vec<Arc<str>>,
    by_address: foldhash::HashMap<usize, u32>,
    by_name: foldhash::HashMap<Arc<str>, u32>,
    per_group: foldhash::HashMap<GroupKey, Aggregates>,
    per_bucket: foldhash::HashMap<i64, Aggregates>,
    /// Grouped and bucketed: every figure added, summed per bucket once the top groups are
    /// known (so the sums kept are those of the top groups, not of every group).
    added: Vec<(GroupKey, &'f Figure)>,
}

impl<'q, 'f> Fold<'q, 'f> {
    /// `starts`: the bucket starts of `q` (empty without buckets); each must be a whole UTC
    /// hour, so that every figure lies in one bucket.
    pub fn new(q: &'q AnalyticsQuery, starts: Vec<i64>) -> Self {
        Fold {
            q,
            starts,
            by_campaign: q.group_by.contains(&Dimension::CampaignId),
            by_type: q.group_by.contains(&Dimension::EventType),
            names: vec![],
            by_address: Default::default(),
            by_name: Default::default(),
            per_group: Default::default(),
            per_bucket: Default::default(),
            added: vec![],
        }
    }

    /// The number of `campaign` (0 unless grouped by campaign).
    fn campaign(&mut self, campaign: &'f Arc<str>) -> u32 {
        if !self.by_campaign {
            return 0;
        }
        let address = Arc::as_ptr(campaign).cast::<u8>() as usize;
        if let Some(&n) = self.by_address.get(&address) {
            return n;
        }
        let n = match self.by_name.get(campaign) {
            Some(&n) => n,
            None => {
                let n = self.names.len() as u32;
                self.names.push(campaign.clone());
                self.by_name.insert(campaign.clone(), n);
                n
            }
        };
        self.by_address.insert(address, n);
        n
    }

    /// Whether `f` passes the query's filters (only campaign and event type filters reach
    /// here: see `rollup::hours_for`).
    fn passes(&self, f: &Figure) -> bool {
        self.q.filters.iter().all(|filter| {
            let value: &str = match filter.dimension {
                Dimension::CampaignId => &f.campaign,
                Dimension::EventType => type_name(f.event_type),
                // Never reached: summaries answer only these filters (`rollup::hours_for`).
                _ => return false,
            };
            filter.values.iter().any(|v| v == value) != filter.negate
        })
    }

    fn bucket(&self, time: i64) -> i64 {
        if self.starts.is_empty() {
            return 0;
        }
        match self.starts.partition_point(|&s| s <= time) {
            0 => time,
            i => self.starts[i - 1],
        }
    }

    pub fn add(&mut self, f: &'f Figure) {
        if !self.passes(f) {
            return;
        }
        let key = (
            self.campaign(&f.campaign),
            if self.by_type { f.event_type } else { 0 },
        );
        let bucket = self.bucket(f.time);
        sum_into(self.per_group.entry(key).or_default(), f);
        sum_into(self.per_bucket.entry(bucket).or_default(), f);
        if self.q.bucket.is_some() && !self.q.group_by.is_empty() {
            self.added.push((key, f));
        }
    }

    /// The group's values as strings, in `group_by` order.
    fn keys(&self, &(campaign, event_type): &GroupKey) -> Vec<String> {
        self.q
            .group_by
            .iter()
            .map(|d| match d {
                Dimension::CampaignId => self
                    .names
                    .get(campaign as usize)
                    .map_or("", |n| n)
                    .to_string(),
                Dimension::EventType => type_name(event_type).to_string(),
                _ => String::new(),
            })
            .collect()
    }

    /// The rows of the top `n` groups (all of them when ungrouped), ranked as the statements
    /// rank them: by the ordering metric, highest first (an undefined ratio last), ties by
    /// the groups' values.
    pub fn finish(self, n: u64) -> Rows {
        let needed = self.q.aggs();
        let row = |bucket: i64, keys: Vec<String>, a: &Aggregates| {
            let get = |agg, value| if needed.contains(agg) { value } else { 0 };
            AggRow {
                bucket: u32::try_from(bucket).unwrap_or(0),
                keys,
                events: get(Agg::Events, a.events),
                impressions: get(Agg::Impressions, a.impressions),
                clicks: get(Agg::Clicks, a.clicks),
                conversions: get(Agg::Conversions, a.conversions),
                spend: get(Agg::Spend, a.spend),
                revenue: get(Agg::Revenue, a.revenue),
                users_exact: 0,
                users_approx: 0,
            }
        };
        let bucketed = self.q.bucket.is_some();
        let mut totals: Vec<AggRow> = self
            .per_bucket
            .iter()
            .map(|(bucket, sum)| row(*bucket, vec![], sum))
            .collect();
        totals.sort_by_key(|r| r.bucket);
        if self.q.group_by.is_empty() {
            return Rows {
                main: totals.clone(),
                ranking: vec![],
                totals,
            };
        }

        let mut ranked: Vec<(Vec<String>, &GroupKey, &Aggregates)> = self
            .per_group
            .iter()
            .map(|(key, sum)| (self.keys(key), key, sum))
            .collect();
        let order_by = self.q.order_by;
        ranked.sort_by(|a, b| by_rank(b.2, a.2, order_by).then_with(|| a.0.cmp(&b.0)));
        ranked.truncate(usize::try_from(n).unwrap_or(usize::MAX));
        let ranking: Vec<AggRow> = ranked
            .iter()
            .map(|(keys, _, sum)| row(0, keys.clone(), sum))
            .collect();
        if !bucketed {
            return Rows {
                main: ranking,
                ranking: vec![],
                totals,
            };
        }
        let top: HashMap<&GroupKey, &Vec<String>> =
            ranked.iter().map(|(keys, key, _)| (*key, keys)).collect();
        let mut sums: HashMap<(i64, &GroupKey), Aggregates> = HashMap::new();
        for (key, f) in &self.added {
            if let Some((key, _)) = top.get_key_value(key) {
                sum_into(sums.entry((self.bucket(f.time), *key)).or_default(), f);
            }
        }
        let main = sums
            .iter()
            .map(|((bucket, key), sum)| row(*bucket, top[key].clone(), sum))
            .collect();
        Rows {
            main,
            ranking,
            totals,
        }
    }
}

/// Adds the events of `f` to `sum`.
fn sum_into(sum: &mut Aggregates, f: &Figure) {
    sum.events += f.events;
    match EventType::from_code(f.event_type as i8) {
        Some(EventType::Impression) => sum.impressions += f.events,
        Some(EventType::Click) => sum.clicks += f.events,
        Some(EventType::Conversion) => sum.conversions += f.events,
        None => {}
    }
    sum.spend += f.cost;
    sum.revenue += f.revenue;
}

/// How `a` compares with `b` by what groups are ranked by (as `sql::rank`): a count, or a
/// ratio (-1 where undefined).
fn by_rank(a: &Aggregates, b: &Aggregates, metric: Metric) -> Ordering {
    match (a.metric(metric), b.metric(metric)) {
        (MetricValue::Count(a), MetricValue::Count(b)) => a.cmp(&b),
        (MetricValue::Ratio(a), MetricValue::Ratio(b)) => a
            .unwrap_or(-1.0)
            .partial_cmp(&b.unwrap_or(-1.0))
            .unwrap_or(Ordering::Equal),
        _ => Ordering::Equal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analytics::model::{Bucket, Filter, TimeRange};

    fn query(group_by: Vec<Dimension>, bucket: Option<Bucket>, order_by: Metric) -> AnalyticsQuery {
        AnalyticsQuery {
            range: TimeRange {
                from_ms: 0,
                to_ms: 86_400_000,
            },
            time_zone: "UTC".parse().unwrap(),
            metrics: vec![order_by, Metric::Clicks],
            group_by,
            bucket,
            filters: vec![],
            order_by,
            limit: None,
            other: false,
        }
    }

    fn figure(time: i64, campaign: &Arc<str>, event_type: u8, events: u64, cost: u64) -> Figure {
        Figure {
            time,
            campaign: campaign.clone(),
            event_type,
            events,
            cost,
            revenue: 0,
        }
    }

    #[test]
    fn groups_are_ranked_as_the_statements_rank_them() {
        let (a, b, c) = (Arc::from("a"), Arc::from("b"), Arc::from("c"));
        // The same name read twice (two summaries) is one group.
        let b_again: Arc<str> = Arc::from("b");
        let figures = [
            figure(0, &c, 1, 10, 0),
            figure(0, &b, 1, 4, 0),
            figure(3_600, &b_again, 1, 6, 0),
            figure(0, &a, 1, 10, 0),
            figure(0, &a, 2, 1, 0),
        ];
        let q = query(vec![Dimension::CampaignId], None, Metric::Impressions);
        let mut fold = Fold::new(&q, vec![]);
        figures.iter().for_each(|f| fold.add(f));
        let rows = fold.finish(2);
        let ranked: Vec<_> = rows
            .main
            .iter()
            .map(|r| (r.keys[0].as_str(), r.impressions, r.clicks, r.events))
            .collect();
        // Ties by the group's value; aggregates no metric needs are 0.
        assert_eq!(ranked, [("a", 10, 1, 0), ("b", 10, 0, 0)]);
        assert_eq!(rows.totals[0].impressions, 30);

        // A ratio: undefined (no impressions) ranks last.
        let figures = [
            figure(0, &a, 2, 1, 0),
            figure(0, &b, 1, 4, 0),
            figure(0, &b, 2, 1, 0),
        ];
        let q = query(vec![Dimension::CampaignId], None, Metric::Ctr);
        let mut fold = Fold::new(&q, vec![]);
        figures.iter().for_each(|f| fold.add(f));
        let keys: Vec<_> = fold.finish(5).main.into_iter().map(|r| r.keys).collect();
        assert_eq!(keys, [vec!["b".to_string()], vec!["a".to_string()]]);
    }

    #[test]
    fn figures_land_in_their_bucket_and_pass_the_filters() {
        let (a, b) = (Arc::from("a"), Arc::from("b"));
        let mut q = query(
            vec![Dimension::EventType, Dimension::CampaignId],
            Some(Bucket::Day),
            Metric::Events,
        );
        q.filters.push(Filter {
            dimension: Dimension::CampaignId,
            negate: true,
            values: vec!["b".into()],
        });
        let figures = [
            figure(0, &a, 1, 1, 0),
            figure(82_800, &a, 1, 2, 0),
            figure(86_400, &a, 3, 4, 0),
            figure(0, &b, 1, 8, 0),
        ];
        let mut fold = Fold::new(&q, vec![0, 86_400]);
        figures.iter().for_each(|f| fold.add(f));
        let rows = fold.finish(10);
        let mut main: Vec<_> = rows
            .main
            .iter()
            .map(|r| (r.bucket, r.keys.clone(), r.events))
            .collect();
        main.sort();
        let keys = |t: &str| vec![t.to_string(), "a".to_string()];
        assert_eq!(
            main,
            [(0, keys("impression"), 3), (86_400, keys("conversion"), 4)]
        );
        assert_eq!(rows.ranking.len(), 2);
        assert_eq!(rows.totals.iter().map(|r| r.events).sum::<u64>(), 7);
    }
}
