//! SQL text built only from fixed snippets and parameter placeholders.
//!
//! [`Sql::push`] takes `&'static str` — text written in this file, never a request's — and
//! every value (tenant, times, filter values, attribute keys, time zone, limits) becomes a
//! server-side query parameter `{pN:Type}` sent beside the query. Metric and dimension names
//! from a request choose among fixed snippets by enum. So no request byte is ever part of the
//! SQL text; `tests::no_request_text_reaches_the_sql` checks it.

use clickhouse::Client;

use super::model::{Agg, AggSet, AnalyticsQuery, Bucket, Dimension, Filter, Metric, TimeRange};

/// A query parameter's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Str(String),
    Strs(Vec<String>),
    I64(i64),
    U64(u64),
}

/// A fragment of SQL: fixed text and placeholders, nothing else (only this module makes one).
#[derive(Debug, Clone)]
pub struct Expr(String);

impl Expr {
    fn fixed(text: &'static str) -> Self {
        Expr(text.to_string())
    }

    fn join(parts: &[Expr], sep: &'static str) -> Expr {
        Expr(
            parts
                .iter()
                .map(|e| e.0.as_str())
                .collect::<Vec<_>>()
                .join(sep),
        )
    }

    fn wrap(open: &'static str, inner: &Expr, close: &'static str) -> Expr {
        Expr(format!("{open}{}{close}", inner.0))
    }
}

/// A statement and its parameters.
#[derive(Debug, Clone, Default)]
pub struct Sql {
    text: String,
    params: Vec<(String, Param)>,
}

impl Sql {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, text: &'static str) -> &mut Self {
        self.text.push_str(text);
        self
    }

    pub fn push_expr(&mut self, expr: &Expr) -> &mut Self {
        self.text.push_str(&expr.0);
        self
    }

    fn bind(&mut self, ty: &'static str, value: Param) -> Expr {
        let name = format!("p{}", self.params.len());
        let placeholder = format!("{{{name}:{ty}}}");
        self.params.push((name, value));
        Expr(placeholder)
    }

    pub fn bind_str(&mut self, value: &str) -> Expr {
        self.bind("String", Param::Str(value.to_string()))
    }

    pub fn bind_strs(&mut self, values: &[String]) -> Expr {
        self.bind("Array(String)", Param::Strs(values.to_vec()))
    }

    pub fn bind_i64(&mut self, value: i64) -> Expr {
        self.bind("Int64", Param::I64(value))
    }

    pub fn bind_u64(&mut self, value: u64) -> Expr {
        self.bind("UInt64", Param::U64(value))
    }

    pub fn bind_uuid(&mut self, value: &uuid::Uuid) -> Expr {
        self.bind("UUID", Param::Str(value.to_string()))
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn params(&self) -> &[(String, Param)] {
        &self.params
    }

    /// The statement as a query of `client`, parameters attached.
    pub fn query(&self, client: &Client) -> clickhouse::query::Query {
        // `query()` treats `?` as a bind marker; the fixed text never contains one.
        debug_assert!(!self.text.contains('?'));
        self.params
            .iter()
            .fold(client.query(&self.text), |q, (name, value)| match value {
                Param::Str(v) => q.param(name, v),
                Param::Strs(v) => q.param(name, v),
                Param::I64(v) => q.param(name, v),
                Param::U64(v) => q.param(name, v),
            })
    }
}

/// The table expression of every read: deduplicated (see the module comment of `analytics`).
pub const FROM_EVENTS: &str = " FROM events FINAL";

/// `tenant = … AND event_time in range AND filters…`.
pub fn where_clause(
    sql: &mut Sql,
    tenant: &str,
    range: Option<TimeRange>,
    filters: &[Filter],
) -> Expr {
    let mut parts = vec![];
    let tenant = sql.bind_str(tenant);
    parts.push(Expr::wrap("tenant = ", &tenant, ""));
    if let Some(range) = range {
        let from = sql.bind_i64(range.from_ms);
        let to = sql.bind_i64(range.to_ms);
        parts.push(Expr::wrap(
            "event_time >= fromUnixTimestamp64Milli(",
            &from,
            ", 'UTC')",
        ));
        parts.push(Expr::wrap(
            "event_time < fromUnixTimestamp64Milli(",
            &to,
            ", 'UTC')",
        ));
    }
    for filter in filters {
        let column = dimension(sql, &filter.dimension).column;
        let values: Vec<Expr> = filter.values.iter().map(|v| sql.bind_str(v)).collect();
        let op = if filter.negate { " NOT IN (" } else { " IN (" };
        parts.push(Expr(format!(
            "{}{op}{})",
            column.0,
            Expr::join(&values, ", ").0
        )));
    }
    Expr::join(&parts, " AND ")
}

/// A dimension as a column to filter and group by, and as a `String` for the result.
pub struct DimensionSql {
    pub column: Expr,
    pub string: Expr,
}

pub fn dimension(sql: &mut Sql, d: &Dimension) -> DimensionSql {
    let fixed = |column: &'static str, string: &'static str| DimensionSql {
        column: Expr::fixed(column),
        string: Expr::fixed(string),
    };
    match d {
        Dimension::CampaignId => fixed("campaign_id", "CAST(campaign_id AS String)"),
        Dimension::AdId => fixed("ad_id", "ad_id"),
        Dimension::PublisherId => fixed("publisher_id", "CAST(publisher_id AS String)"),
        Dimension::AdvertiserId => fixed("advertiser_id", "CAST(advertiser_id AS String)"),
        Dimension::Country => fixed("country", "CAST(country AS String)"),
        Dimension::Device => fixed("device", "CAST(device AS String)"),
        Dimension::Os => fixed("os", "CAST(os AS String)"),
        Dimension::Browser => fixed("browser", "CAST(browser AS String)"),
        Dimension::EventType => fixed("event_type", "CAST(event_type AS String)"),
        Dimension::Attribute(key) => {
            let key = sql.bind_str(key);
            let expr = Expr::wrap("attributes[", &key, "]");
            DimensionSql {
                column: expr.clone(),
                string: expr,
            }
        }
    }
}

/// The SQL of one aggregate; result columns are named as in [`AGG_COLUMNS`].
fn agg_sql(agg: Agg) -> &'static str {
    match agg {
        Agg::Events => "count()",
        Agg::Impressions => "countIf(event_type = 'impression')",
        Agg::Clicks => "countIf(event_type = 'click')",
        Agg::Conversions => "countIf(event_type = 'conversion')",
        Agg::Spend => "sum(cost_micros)",
        Agg::Revenue => "sum(revenue_micros)",
        Agg::UsersExact => "uniqExactIf(user_id, user_id != '')",
        Agg::UsersApprox => "uniqIf(user_id, user_id != '')",
    }
}

pub const AGG_COLUMNS: [&str; 8] = [
    "events",
    "impressions",
    "clicks",
    "conversions",
    "spend",
    "revenue",
    "users_exact",
    "users_approx",
];

/// Every aggregate column, in [`AGG_COLUMNS`] order; those not needed are a constant 0 (so
/// the row type is always the same, and unneeded columns are never read).
fn aggregates(sql: &mut Sql, needed: AggSet) {
    for (agg, name) in Agg::ALL.iter().zip(AGG_COLUMNS) {
        sql.push(", ");
        if needed.contains(*agg) {
            sql.push(agg_sql(*agg));
        } else {
            sql.push("toUInt64(0)");
        }
        sql.push(" AS ").push(name);
    }
}

/// What groups are ranked by: the metric itself, a ratio (-1 where it is undefined, so such
/// groups come last), highest first.
fn rank(metric: Metric) -> Expr {
    match metric.ratio() {
        Some((num, den)) => Expr(format!(
            "if({den} = 0, -1., {num} / {den})",
            num = agg_sql(num),
            den = agg_sql(den)
        )),
        None => {
            let agg = Agg::ALL
                .into_iter()
                .find(|a| metric.aggs().contains(*a))
                .expect("a metric has an aggregate");
            Expr::fixed(agg_sql(agg))
        }
    }
}

/// The start of an event's bucket in the zone, as Unix seconds (UInt32).
fn bucket_expr(sql: &mut Sql, bucket: Bucket, tz: &str) -> Expr {
    let tz = sql.bind_str(tz);
    let local = format!("toDateTime(event_time, {})", tz.0);
    Expr(match bucket {
        Bucket::Minute => format!("toUnixTimestamp(toStartOfMinute({local}))"),
        Bucket::Hour => format!("toUnixTimestamp(toStartOfHour({local}))"),
        Bucket::Day => format!("toUnixTimestamp(toStartOfDay({local}))"),
        Bucket::Week => format!("toUnixTimestamp(toDateTime(toMonday({local}), {}))", tz.0),
        Bucket::Month => format!(
            "toUnixTimestamp(toDateTime(toStartOfMonth({local}), {}))",
            tz.0
        ),
    })
}

/// Figures per bucket of `q` (start as Unix seconds, 0 without buckets), campaign (`''`
/// unless `by_campaign`) and event type over `q`'s range and filters, from the raw events of
/// `partitions` (with `FINAL`): rows shaped like the summaries' (see `figures::Figure`), for
/// the partitions without a current summary.
pub fn raw_figures(
    q: &AnalyticsQuery,
    tenant: &str,
    partitions: &[String],
    by_campaign: bool,
) -> Sql {
    let mut sql = Sql::new();
    let bucket = q
        .bucket
        .map(|b| bucket_expr(&mut sql, b, q.time_zone.name()));
    let filter = where_clause(&mut sql, tenant, Some(q.range), &q.filters);
    let partitions = sql.bind_strs(partitions);
    sql.push("SELECT ");
    match &bucket {
        Some(b) => sql.push_expr(b),
        None => sql.push("toUInt32(0)"),
    };
    sql.push(" AS bucket, ")
        .push(match by_campaign {
            true => "CAST(campaign_id AS String)",
            false => "''",
        })
        .push(" AS campaign, toUInt8(event_type) AS type, count(), sum(cost_micros), sum(revenue_micros)")
        .push(FROM_EVENTS)
        .push(" WHERE ")
        .push_expr(&filter)
        .push(" AND _partition_id IN ")
        .push_expr(&partitions)
        .push(" GROUP BY bucket, campaign, type");
    sql
}

/// Which groups a statement covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The top `n` groups by the ranking metric (all the query's groups when ungrouped).
    Top(u64),
    /// Every group outside the top `n`, summed into one.
    Other(u64),
}

/// The aggregate statement of `q` for `scope`. Result rows: `bucket` (Unix seconds, 0 without
/// buckets), `keys` (group values as strings, in `group_by` order), then [`AGG_COLUMNS`].
///
/// - no `group_by`: one row (no bucket) or one row per bucket;
/// - `group_by`, no bucket: the top `n` groups, ranked, ties by their values;
/// - `group_by` and bucket: one row per (bucket, group) of the top `n` groups;
/// - [`Scope::Other`]: one row (per bucket) for every event outside the top `n` groups.
pub fn aggregate(q: &AnalyticsQuery, tenant: &str, scope: Scope, with_buckets: bool) -> Sql {
    let mut sql = Sql::new();
    let from = Expr::fixed(FROM_EVENTS);
    let bucket = q
        .bucket
        .filter(|_| with_buckets)
        .map(|b| bucket_expr(&mut sql, b, q.time_zone.name()));
    let dims: Vec<DimensionSql> = q.group_by.iter().map(|d| dimension(&mut sql, d)).collect();
    let columns = Expr::join(
        &dims.iter().map(|d| d.column.clone()).collect::<Vec<_>>(),
        ", ",
    );
    let strings = Expr::wrap(
        "[",
        &Expr::join(
            &dims.iter().map(|d| d.string.clone()).collect::<Vec<_>>(),
            ", ",
        ),
        "]",
    );
    let filter = where_clause(&mut sql, tenant, Some(q.range), &q.filters);
    let grouped = !dims.is_empty();
    let order = rank(q.order_by);

    sql.push("SELECT ");
    match &bucket {
        Some(b) => sql.push_expr(b),
        None => sql.push("toUInt32(0)"),
    };
    sql.push(" AS bucket, ");
    match (grouped, scope) {
        (true, Scope::Top(_)) => sql
            .push("CAST(")
            .push_expr(&strings)
            .push(" AS Array(String))"),
        _ => sql.push("emptyArrayString()"),
    };
    sql.push(" AS keys");
    aggregates(&mut sql, q.aggs());
    sql.push_expr(&from).push(" WHERE ").push_expr(&filter);

    // Bucketed groups and the other row both need "the top n groups" as a set.
    let top_set = |sql: &mut Sql, n: u64| {
        let n = sql.bind_u64(n);
        Expr(format!(
            "(SELECT {cols}{from} WHERE {filter} GROUP BY {cols} ORDER BY {rank} DESC, {strings} ASC LIMIT {n})",
            cols = columns.0,
            from = from.0,
            filter = filter.0,
            rank = order.0,
            strings = strings.0,
            n = n.0,
        ))
    };
    match scope {
        Scope::Top(n) if grouped && bucket.is_some() => {
            let set = top_set(&mut sql, n);
            sql.push(" AND (")
                .push_expr(&columns)
                .push(") IN ")
                .push_expr(&set);
        }
        Scope::Other(n) if grouped => {
            let set = top_set(&mut sql, n);
            sql.push(" AND (")
                .push_expr(&columns)
                .push(") NOT IN ")
                .push_expr(&set);
        }
        _ => {}
    }

    let group_by: Vec<Expr> = bucket
        .iter()
        .map(|_| Expr::fixed("bucket"))
        .chain((grouped && matches!(scope, Scope::Top(_))).then(|| columns.clone()))
        .collect();
    if !group_by.is_empty() {
        sql.push(" GROUP BY ")
            .push_expr(&Expr::join(&group_by, ", "));
    }
    if let (true, None, Scope::Top(n)) = (grouped, &bucket, scope) {
        let n = sql.bind_u64(n);
        sql.push(" ORDER BY ")
            .push_expr(&order)
            .push(" DESC, keys ASC LIMIT ")
            .push_expr(&n);
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analytics::model::TimeRange;

    const EVIL: &str = "x'); DROP TABLE events; --";

    fn query(group_by: Vec<Dimension>, bucket: Option<Bucket>) -> AnalyticsQuery {
        AnalyticsQuery {
            range: TimeRange {
                from_ms: 0,
                to_ms: 86_400_000,
            },
            time_zone: "Europe/Berlin".parse().unwrap(),
            metrics: vec![Metric::Ctr, Metric::UniqueUsersExact],
            group_by,
            bucket,
            filters: vec![
                Filter {
                    dimension: Dimension::Country,
                    negate: true,
                    values: vec![EVIL.into(), "DE".into()],
                },
                Filter {
                    dimension: Dimension::Attribute(EVIL.into()),
                    negate: false,
                    values: vec![EVIL.into()],
                },
            ],
            order_by: Metric::Ctr,
            limit: Some(5),
            other: true,
        }
    }

    #[test]
    fn no_request_text_reaches_the_sql() {
        for (group_by, bucket) in [
            (vec![], None),
            (vec![], Some(Bucket::Day)),
            (vec![Dimension::Attribute(EVIL.into())], None),
            (
                vec![Dimension::CampaignId, Dimension::Attribute(EVIL.into())],
                Some(Bucket::Week),
            ),
        ] {
            let q = query(group_by, bucket);
            for scope in [Scope::Top(5), Scope::Other(5)] {
                let sql = aggregate(&q, EVIL, scope, true);
                assert!(!sql.text().contains("DROP"), "{}", sql.text());
                assert!(!sql.text().contains("Berlin"), "{}", sql.text());
                assert!(!sql.text().contains('?'));
                assert!(sql
                    .params()
                    .iter()
                    .any(|(_, v)| *v == Param::Str(EVIL.into())));
            }
        }
    }

    #[test]
    fn every_read_is_final_and_scoped_to_the_tenant() {
        let q = query(vec![Dimension::CampaignId], Some(Bucket::Hour));
        for scope in [Scope::Top(5), Scope::Other(5)] {
            let sql = aggregate(&q, "t1", scope, true);
            let text = sql.text();
            // The outer read and the ranking subquery.
            assert_eq!(text.matches("FROM events FINAL").count(), 2, "{text}");
            assert_eq!(text.matches("tenant = {p").count(), 2, "{text}");
        }
    }

    #[test]
    fn the_shapes_of_the_statements() {
        let q = query(vec![], None);
        let text = aggregate(&q, "t", Scope::Top(0), false).text().to_string();
        assert!(!text.contains("GROUP BY"), "{text}");
        assert!(text.contains("uniqExactIf(user_id"), "{text}");
        assert!(!text.contains("sum(cost_micros)"), "{text}");

        let q = query(vec![Dimension::EventType], None);
        let text = aggregate(&q, "t", Scope::Top(5), false).text().to_string();
        assert!(text.contains("GROUP BY event_type ORDER BY if("), "{text}");
        assert!(text.contains("DESC, keys ASC LIMIT {p"), "{text}");
    }

    #[test]
    fn figures_of_unsummarized_partitions_are_read_raw_and_deduplicated() {
        let mut q = query(vec![Dimension::CampaignId], Some(Bucket::Hour));
        q.filters.truncate(1);
        let partitions = vec!["19700102".to_string()];
        for by_campaign in [true, false] {
            let sql = raw_figures(&q, EVIL, &partitions, by_campaign);
            let text = sql.text();
            assert!(!text.contains("DROP") && !text.contains("1970"), "{text}");
            assert!(
                text.contains("FROM events FINAL WHERE tenant = {p"),
                "{text}"
            );
            assert!(
                text.contains("toStartOfHour(toDateTime(event_time, {p"),
                "{text}"
            );
            assert!(text.contains("country NOT IN ({p"), "{text}");
            assert_eq!(text.contains("CAST(campaign_id"), by_campaign, "{text}");
            assert!(sql
                .params()
                .iter()
                .any(|(_, v)| *v == Param::Strs(partitions.clone())));
        }
    }
}
