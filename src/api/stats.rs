//! `GET /v1/stats/summary|timeseries|breakdown` and `POST /v1/query`: thin handlers over
//! `analytics::Analytics`. Each GET endpoint is a fixed shape of the query model; `POST
//! /v1/query` takes the whole model as JSON.
//!
//! Every failure is a typed response with a machine-readable body: bad input is a 400 naming
//! the `field` (query parameter or JSON path); a guard stopping an expensive query is a 422.
//! Unknown query parameters are refused too: a misspelt filter would otherwise return
//! unfiltered figures that look right.

use std::{borrow::Cow, collections::BTreeMap};

use chrono::{DateTime, FixedOffset, Utc};
use poem_openapi::{
    error::{ParseParamError, ParseRequestPayloadError},
    param::Query,
    payload::Json,
    registry::{MetaSchema, MetaSchemaRef, Registry},
    types::{MaybeUndefined, ParseError, ParseFromParameter, ParseResult, ToJSON, Type},
    ApiResponse, Enum, Object, OpenApi,
};
use serde::Deserialize;

use super::{
    documented::{unanswered, Documented},
    guard::ApiKey,
    json_body::{Fault, JsonBody},
    types::{DATE_TIME_EXPECTED, RETRY_AFTER_SECS, U32_EXPECTED},
    ApiTags,
};
use crate::analytics::{
    engine::MetricValue, model::parse_time_zone, Aggregates, Analytics, AnalyticsError,
    AnalyticsQuery, Bucket, Dimension, Filter, GroupResult, InvalidInput, Metric, TimeRange,
};

/// An error, machine-readable (`error`) and for a person (`message`).
#[derive(Debug, Clone, Object)]
#[oai(rename = "QueryError")]
pub struct QueryErrorBody {
    /// E.g. `invalid_parameter`, `missing_parameter`, `unknown_parameter`, `invalid_filter`,
    /// `invalid_dimension`, `invalid_time_zone`, `invalid_time_range`, `time_range_too_large`,
    /// `too_many_points`, `invalid_limit`, `invalid_cursor`, `invalid_body` (400);
    /// `unsupported_media_type` (415, a body not sent as `application/json`);
    /// `payload_too_large` (413, a body over 64 KB);
    /// `query_timeout`, `query_memory_limit`, `result_too_large`, `too_many_groups` (422);
    /// `not_found` (404); `clickhouse_unavailable` (503); `internal` (500).
    pub error: String,
    pub message: String,
    /// The query parameter, path parameter or JSON path (`filters[0].op`) at fault.
    #[oai(skip_serializing_if_is_none)]
    pub field: Option<String>,
    /// For limits and guards: the limit in force.
    #[oai(skip_serializing_if_is_none)]
    pub limit: Option<u64>,
}

impl QueryErrorBody {
    fn new(error: &str, message: impl Into<String>) -> Self {
        QueryErrorBody {
            error: error.to_string(),
            message: message.into(),
            field: None,
            limit: None,
        }
    }
}

impl From<InvalidInput> for QueryErrorBody {
    fn from(i: InvalidInput) -> Self {
        QueryErrorBody {
            error: i.code.to_string(),
            message: i.message,
            field: (!i.field.is_empty()).then_some(i.field),
            limit: i.limit,
        }
    }
}

/// The answer of every analytics endpoint.
#[derive(ApiResponse)]
#[oai(bad_request_handler = "bad_request")]
pub enum AnalyticsResponse<T: ToJSON + Send + Sync> {
    /// The figures.
    #[oai(status = 200)]
    Ok(Json<T>),
    /// The request is not valid: `error` says how, `field` names the parameter (or the JSON
    /// path in a body).
    #[oai(status = 400)]
    BadRequest(Json<QueryErrorBody>),
    /// The event does not exist for this tenant.
    #[oai(status = 404)]
    NotFound(Json<QueryErrorBody>),
    /// The JSON body is larger than 64 KB (`payload_too_large`, with `limit`).
    #[oai(status = 413)]
    PayloadTooLarge(Json<QueryErrorBody>),
    /// The body was not sent as `application/json` (`unsupported_media_type`).
    #[oai(status = 415)]
    UnsupportedMediaType(Json<QueryErrorBody>),
    /// The query is valid but a guard stopped it (`query_timeout`, `query_memory_limit`,
    /// `result_too_large`, `too_many_groups`); `limit` is the guard's value. Narrow the
    /// time range, add filters, use a limit or a coarser bucket.
    #[oai(status = 422)]
    TooExpensive(Json<QueryErrorBody>),
    /// ClickHouse is unreachable or overloaded, or did not answer within the time limit and
    /// 5 s (`clickhouse_unavailable`); retry later.
    #[oai(status = 503)]
    Unavailable(Json<QueryErrorBody>, #[oai(header = "Retry-After")] u32),
    /// An unexpected failure; the service log has the cause.
    #[oai(status = 500)]
    Internal(Json<QueryErrorBody>),
}

/// Parameters poem-openapi could not parse become the same 400 body as our own checks.
pub fn bad_request<T: ToJSON + Send + Sync>(err: poem::Error) -> AnalyticsResponse<T> {
    AnalyticsResponse::BadRequest(Json(parse_error_body(&err)))
}

pub fn parse_error_body(err: &poem::Error) -> QueryErrorBody {
    if let Some(e) = err.downcast_ref::<ParseParamError>() {
        let missing = e.reason.contains("expects an input value");
        return QueryErrorBody {
            error: if missing {
                "missing_parameter"
            } else {
                "invalid_parameter"
            }
            .into(),
            message: if missing {
                format!("`{}` is required", e.name)
            } else {
                format!("`{}` {}", e.name, readable(&e.reason))
            },
            field: Some(e.name.to_string()),
            limit: None,
        };
    }
    if let Some(e) = err.downcast_ref::<ParseRequestPayloadError>() {
        return QueryErrorBody::new("invalid_body", e.reason.clone());
    }
    QueryErrorBody::new("invalid_request", err.to_string())
}

/// What a parameter the framework could not parse must be, for a person: the framework words
/// it with its own type names (`failed to parse "integer(uint32)": invalid digit found in
/// string (occurred while parsing "optional_integer(uint32)")`) and does not list the values
/// of an enumeration.
fn readable(reason: &str) -> String {
    let reason = reason
        .split_once(" (occurred while parsing")
        .map_or(reason, |(own, _)| own);
    let Some((type_name, detail)) = reason
        .strip_prefix("failed to parse \"")
        .and_then(|rest| rest.split_once("\": "))
    else {
        return format!("is not valid: {reason}");
    };
    if let Some(values) = enum_values(type_name) {
        return format!("must be one of {}", values.join(", "));
    }
    let expected = match type_name {
        t if t.contains("date-time") => DATE_TIME_EXPECTED,
        "integer(uint8)" => "must be a whole number from 0 to 255",
        "integer(uint16)" => "must be a whole number from 0 to 65535",
        "integer(uint32)" => &format!("must be {U32_EXPECTED}"),
        t if t.starts_with("integer(uint") => "must be a whole number, 0 or more",
        t if t.starts_with("integer") => "must be a whole number",
        "boolean" => "must be `true` or `false`",
        // An enumeration not in `enum_values`: the document lists its values.
        _ if detail == "Expect a valid enumeration value." => {
            return "is not one of its values (listed in /openapi.json)".to_string()
        }
        // Our own parameter types explain themselves.
        _ => return format!("is not valid: {detail}"),
    };
    format!("{expected} ({detail})")
}

/// The values of an enumeration taken as a query parameter, by its name in the document.
fn enum_values(type_name: &str) -> Option<Vec<String>> {
    fn values<T: Type>(type_name: &str) -> Option<Vec<String>> {
        if T::name() != type_name {
            return None;
        }
        let mut registry = Registry::new();
        T::register(&mut registry);
        let schema = registry.schemas.get(type_name)?;
        Some(
            schema
                .enum_items
                .iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect(),
        )
    }
    values::<Bucket>(type_name)
        .or_else(|| values::<Metric>(type_name))
        .or_else(|| values::<super::admin::StatusClass>(type_name))
}

/// How an error is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    BadRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
    NotFound,
    TooExpensive,
    Unavailable,
    Internal,
}

/// The status class and body of an error; causes go to the log, not to the client.
pub fn error_body(err: AnalyticsError) -> (ErrorKind, QueryErrorBody) {
    match err {
        AnalyticsError::Invalid(i) => {
            let kind = match Fault::of(&i) {
                Fault::UnsupportedMediaType => ErrorKind::UnsupportedMediaType,
                Fault::TooLarge => ErrorKind::PayloadTooLarge,
                Fault::Invalid => ErrorKind::BadRequest,
            };
            (kind, i.into())
        }
        AnalyticsError::Guard {
            code,
            message,
            limit,
        } => (
            ErrorKind::TooExpensive,
            QueryErrorBody {
                error: code.into(),
                message,
                field: None,
                limit,
            },
        ),
        AnalyticsError::NotFound => (
            ErrorKind::NotFound,
            QueryErrorBody::new("not_found", "no event with this id"),
        ),
        AnalyticsError::Unavailable(e) => {
            tracing::warn!(error = %e, "analytics query: ClickHouse unavailable");
            (
                ErrorKind::Unavailable,
                QueryErrorBody::new(
                    "clickhouse_unavailable",
                    "the analytics store is unavailable; retry later",
                ),
            )
        }
        AnalyticsError::Internal(e) => {
            tracing::error!(error = %e, "analytics query failed");
            (
                ErrorKind::Internal,
                QueryErrorBody::new("internal", "the query failed unexpectedly"),
            )
        }
    }
}

impl<T: ToJSON + Send + Sync> From<AnalyticsError> for AnalyticsResponse<T> {
    fn from(err: AnalyticsError) -> Self {
        let (kind, body) = error_body(err);
        let body = Json(body);
        match kind {
            ErrorKind::BadRequest => AnalyticsResponse::BadRequest(body),
            ErrorKind::PayloadTooLarge => AnalyticsResponse::PayloadTooLarge(body),
            ErrorKind::UnsupportedMediaType => AnalyticsResponse::UnsupportedMediaType(body),
            ErrorKind::NotFound => AnalyticsResponse::NotFound(body),
            ErrorKind::TooExpensive => AnalyticsResponse::TooExpensive(body),
            ErrorKind::Unavailable => AnalyticsResponse::Unavailable(body, RETRY_AFTER_SECS),
            ErrorKind::Internal => AnalyticsResponse::Internal(body),
        }
    }
}

impl<T: ToJSON + Send + Sync> From<InvalidInput> for AnalyticsResponse<T> {
    fn from(i: InvalidInput) -> Self {
        AnalyticsResponse::BadRequest(Json(i.into()))
    }
}

/// The figures of the requested metrics; metrics not asked for are absent. Counts and sums
/// are exact; `spend` and `revenue` are in micro-units of currency (like `cost_micros`).
/// Ratios are `null` when their denominator is zero.
#[derive(Debug, Clone, Default, PartialEq, Object)]
#[oai(rename = "Metrics")]
pub struct MetricValues {
    #[oai(skip_serializing_if_is_none)]
    pub events: Option<u64>,
    #[oai(skip_serializing_if_is_none)]
    pub impressions: Option<u64>,
    #[oai(skip_serializing_if_is_none)]
    pub clicks: Option<u64>,
    #[oai(skip_serializing_if_is_none)]
    pub conversions: Option<u64>,
    /// clicks / impressions; `null` when there are no impressions.
    #[oai(nullable)]
    pub ctr: MaybeUndefined<f64>,
    /// conversions / clicks; `null` when there are no clicks.
    #[oai(nullable)]
    pub cvr: MaybeUndefined<f64>,
    /// Sum of `cost_micros`.
    #[oai(skip_serializing_if_is_none)]
    pub spend: Option<u64>,
    /// Sum of `revenue_micros`.
    #[oai(skip_serializing_if_is_none)]
    pub revenue: Option<u64>,
    /// revenue / spend; `null` when there is no spend.
    #[oai(nullable)]
    pub roas: MaybeUndefined<f64>,
    /// Distinct non-empty `user_id`s, exact.
    #[oai(skip_serializing_if_is_none)]
    pub unique_users_exact: Option<u64>,
    /// Distinct non-empty `user_id`s, approximate (about 2%).
    #[oai(skip_serializing_if_is_none)]
    pub unique_users_approx: Option<u64>,
}

impl MetricValues {
    pub fn of(aggs: &Aggregates, metrics: &[Metric]) -> Self {
        let mut out = MetricValues::default();
        for &m in metrics {
            let count = |v: MetricValue| match v {
                MetricValue::Count(c) => Some(c),
                MetricValue::Ratio(_) => None,
            };
            let ratio = |v: MetricValue| match v {
                MetricValue::Ratio(Some(r)) => MaybeUndefined::Value(r),
                _ => MaybeUndefined::Null,
            };
            let v = aggs.metric(m);
            match m {
                Metric::Events => out.events = count(v),
                Metric::Impressions => out.impressions = count(v),
                Metric::Clicks => out.clicks = count(v),
                Metric::Conversions => out.conversions = count(v),
                Metric::Ctr => out.ctr = ratio(v),
                Metric::Cvr => out.cvr = ratio(v),
                Metric::Spend => out.spend = count(v),
                Metric::Revenue => out.revenue = count(v),
                Metric::Roas => out.roas = ratio(v),
                Metric::UniqueUsersExact => out.unique_users_exact = count(v),
                Metric::UniqueUsersApprox => out.unique_users_approx = count(v),
            }
        }
        out
    }
}

#[derive(Debug, Clone, Object)]
pub struct SummaryResult {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub metrics: MetricValues,
}

/// One bucket: `time` is its start in the requested time zone.
#[derive(Debug, Clone, Object)]
pub struct Point {
    pub time: DateTime<FixedOffset>,
    pub metrics: MetricValues,
}

#[derive(Debug, Clone, Object)]
pub struct TimeseriesResult {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub bucket: Bucket,
    pub time_zone: String,
    /// Every bucket from the one containing `from` to the one containing the last instant
    /// before `to`; buckets without events have zero counts.
    pub points: Vec<Point>,
}

#[derive(Debug, Clone, Object)]
pub struct BreakdownRow {
    /// The dimension's value (empty: events without one).
    pub value: String,
    pub metrics: MetricValues,
}

#[derive(Debug, Clone, Object)]
pub struct BreakdownResult {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub dimension: String,
    pub order_by: Metric,
    /// The top `limit` values, highest `order_by` first; ties by value. Values whose ratio
    /// is undefined rank last.
    pub rows: Vec<BreakdownRow>,
    /// Everything outside the top rows (only with `other=true`).
    #[oai(skip_serializing_if_is_none)]
    pub other: Option<MetricValues>,
}

/// One filter of `POST /v1/query`.
#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "QueryFilter", deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct FilterSpec {
    /// `campaign_id`, `ad_id`, `publisher_id`, `advertiser_id`, `country`, `device`, `os`,
    /// `browser`, `event_type`, or `attributes.<key>`.
    pub dimension: String,
    pub op: FilterOp,
    /// One value for `eq`/`neq`, one or more for `in`/`not_in` (at most 100).
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, Deserialize)]
#[oai(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum FilterOp {
    Eq,
    Neq,
    In,
    NotIn,
}

/// The whole query model (`POST /v1/query`).
#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "Query", deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct QueryRequest {
    /// Start of the range on the corrected event time, inclusive (RFC 3339).
    pub from: DateTime<FixedOffset>,
    /// End of the range, exclusive (RFC 3339).
    pub to: DateTime<FixedOffset>,
    pub metrics: Vec<Metric>,
    /// Up to 3 dimensions.
    #[oai(default)]
    #[serde(default)]
    pub group_by: Vec<String>,
    /// Bucket the figures in time; without it, one figure per group over the whole range.
    pub bucket: Option<Bucket>,
    /// IANA time zone of the buckets (default `UTC`).
    pub time_zone: Option<String>,
    #[oai(default)]
    #[serde(default)]
    pub filters: Vec<FilterSpec>,
    /// Metric ranking the groups, highest first (default: the first metric).
    pub order_by: Option<Metric>,
    /// Top-N groups (with `group_by`). Without it, more groups than the maximum is a 422.
    pub limit: Option<u32>,
    /// Also return the figures of all groups outside the top `limit`.
    #[oai(default)]
    #[serde(default)]
    pub other: bool,
}

/// A group of `POST /v1/query`.
#[derive(Debug, Clone, Object)]
#[oai(rename = "QueryGroup")]
pub struct QueryGroupResult {
    /// Dimension name → value (empty without `group_by`, and for the other group).
    pub group: BTreeMap<String, String>,
    /// Figures over the whole range (absent for an ungrouped time series).
    #[oai(skip_serializing_if_is_none)]
    pub totals: Option<MetricValues>,
    /// With a bucket: every bucket of the range, zeros where there were no events.
    #[oai(skip_serializing_if_is_none)]
    pub points: Option<Vec<Point>>,
}

#[derive(Debug, Clone, Object)]
pub struct QueryResult {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub time_zone: String,
    #[oai(skip_serializing_if_is_none)]
    pub bucket: Option<Bucket>,
    pub group_by: Vec<String>,
    /// Ranked by `order_by`, highest first.
    pub groups: Vec<QueryGroupResult>,
    #[oai(skip_serializing_if_is_none)]
    pub other: Option<QueryGroupResult>,
}

/// `metrics=impressions,clicks` (or repeated `metrics=`): metric names.
#[derive(Debug, Clone, Default)]
pub struct MetricList(pub Vec<Metric>);

impl Type for MetricList {
    const IS_REQUIRED: bool = false;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> Cow<'static, str> {
        "MetricList".into()
    }

    fn schema_ref() -> MetaSchemaRef {
        MetaSchemaRef::Inline(Box::new(MetaSchema {
            items: Some(Box::new(Metric::schema_ref())),
            ..MetaSchema::new("array")
        }))
    }

    fn register(registry: &mut Registry) {
        Metric::register(registry);
    }

    fn as_raw_value(&self) -> Option<&Self::RawValueType> {
        Some(self)
    }

    fn raw_element_iter<'a>(
        &'a self,
    ) -> Box<dyn Iterator<Item = &'a Self::RawElementValueType> + 'a> {
        Box::new(std::iter::once(self))
    }
}

impl ParseFromParameter for MetricList {
    fn parse_from_parameter(value: &str) -> ParseResult<Self> {
        Self::parse_from_parameters(std::iter::once(value))
    }

    fn parse_from_parameters<I: IntoIterator<Item = A>, A: AsRef<str>>(
        iter: I,
    ) -> ParseResult<Self> {
        let mut out = Vec::new();
        for value in iter {
            for name in value.as_ref().split(',').map(str::trim) {
                let metric = Metric::ALL
                    .into_iter()
                    .find(|m| m.name() == name)
                    .ok_or_else(|| {
                        ParseError::custom(format!(
                            "unknown metric {name:?}; use one of {}",
                            Metric::ALL.map(Metric::name).join(", ")
                        ))
                    })?;
                if !out.contains(&metric) {
                    out.push(metric);
                }
            }
        }
        Ok(MetricList(out))
    }
}

pub fn parse_filters(filters: &[String]) -> Result<Vec<Filter>, InvalidInput> {
    filters.iter().map(|f| Filter::parse(f, "filter")).collect()
}

fn metrics_or_default(list: MetricList) -> Vec<Metric> {
    if list.0.is_empty() {
        Metric::DEFAULT.to_vec()
    } else {
        list.0
    }
}

pub struct StatsApi {
    pub analytics: Analytics,
}

/// An operation's answer, documented with the statuses it can give (see [`Documented`]).
pub type Answer<T, S> = Documented<AnalyticsResponse<T>, S>;

unanswered!(
    /// Operations driven by query parameters (figures, lists of events): no body (413, 415),
    /// nothing looked up that could be missing (404).
    pub ByParams: 404, 413, 415
);
unanswered!(
    /// `GET /v1/events/{event_id}`: no body (413, 415).
    pub ById: 413, 415
);
unanswered!(
    /// `POST /v1/query`: nothing looked up that could be missing (404).
    ByBody: 404
);

#[OpenApi]
impl StatsApi {
    /// Summary
    ///
    /// The metrics over a time range, with filters.
    #[oai(path = "/v1/stats/summary", method = "get", tag = "ApiTags::Analytics")]
    #[tracing::instrument(skip_all, name = "stats.summary")]
    async fn summary(
        &self,
        auth: ApiKey,
        /// Start of the range on the corrected event time, inclusive (RFC 3339).
        from: Query<DateTime<FixedOffset>>,
        /// End of the range, exclusive (RFC 3339).
        to: Query<DateTime<FixedOffset>>,
        /// Metrics, comma-separated or repeated (default: all but the distinct-user counts).
        metrics: Query<MetricList>,
        /// Repeatable; all must hold. `dimension==value`, `dimension==a|b` (one of),
        /// `dimension!=a|b` (none of); dimensions: `campaign_id`, `ad_id`, `publisher_id`,
        /// `advertiser_id`, `country`, `device`, `os`, `browser`, `event_type`,
        /// `attributes.<key>`. `\` makes the next character literal (`\|`, `\\`, `\=`).
        filter: Query<Option<Vec<String>>>,
    ) -> Answer<SummaryResult, ByParams> {
        let run = async {
            let q = self.base_query(from.0, to.0, metrics.0, filter.0)?;
            let out = self.analytics.run(auth.tenant(), &q).await?;
            let totals = out
                .groups
                .first()
                .and_then(|g| g.totals)
                .unwrap_or_default();
            Ok::<_, AnalyticsError>(SummaryResult {
                from: q.range.from(),
                to: q.range.to(),
                metrics: MetricValues::of(&totals, &q.metrics),
            })
        };
        respond(run.await)
    }

    /// Time series
    ///
    /// The metrics per time bucket in a time zone; every bucket of the range is present
    /// (zeros where there were no events), so charts have no gaps.
    #[oai(
        path = "/v1/stats/timeseries",
        method = "get",
        tag = "ApiTags::Analytics"
    )]
    #[tracing::instrument(skip_all, name = "stats.timeseries")]
    #[allow(clippy::too_many_arguments)]
    async fn timeseries(
        &self,
        auth: ApiKey,
        /// Start of the range, inclusive (RFC 3339).
        from: Query<DateTime<FixedOffset>>,
        /// End of the range, exclusive (RFC 3339).
        to: Query<DateTime<FixedOffset>>,
        /// Bucket width. Day, week (from Monday) and month start at local midnight.
        bucket: Query<Bucket>,
        /// IANA time zone of the buckets, e.g. `Europe/Berlin` (default `UTC`).
        time_zone: Query<Option<String>>,
        /// Metrics, comma-separated or repeated (default: all but the distinct-user counts).
        metrics: Query<MetricList>,
        /// Repeatable filter, as in the summary.
        filter: Query<Option<Vec<String>>>,
    ) -> Answer<TimeseriesResult, ByParams> {
        let run = async {
            let mut q = self.base_query(from.0, to.0, metrics.0, filter.0)?;
            q.bucket = Some(bucket.0);
            if let Some(tz) = &time_zone.0 {
                q.time_zone = parse_time_zone(tz, "time_zone")?;
            }
            let out = self.analytics.run(auth.tenant(), &q).await?;
            let points = out
                .groups
                .first()
                .map(|g| points(g, &q))
                .unwrap_or_default();
            Ok::<_, AnalyticsError>(TimeseriesResult {
                from: q.range.from(),
                to: q.range.to(),
                bucket: bucket.0,
                time_zone: q.time_zone.name().to_string(),
                points,
            })
        };
        respond(run.await)
    }

    /// Breakdown
    ///
    /// The top values of one dimension by a metric, optionally with an `other` row that sums
    /// all the remaining values.
    #[oai(
        path = "/v1/stats/breakdown",
        method = "get",
        tag = "ApiTags::Analytics"
    )]
    #[tracing::instrument(skip_all, name = "stats.breakdown")]
    #[allow(clippy::too_many_arguments)]
    async fn breakdown(
        &self,
        auth: ApiKey,
        /// Start of the range, inclusive (RFC 3339).
        from: Query<DateTime<FixedOffset>>,
        /// End of the range, exclusive (RFC 3339).
        to: Query<DateTime<FixedOffset>>,
        /// The dimension: `campaign_id`, `ad_id`, `publisher_id`, `advertiser_id`, `country`,
        /// `device`, `os`, `browser`, `event_type`, or `attributes.<key>`.
        group_by: Query<String>,
        /// Metrics, comma-separated or repeated (default: all but the distinct-user counts).
        metrics: Query<MetricList>,
        /// Ranking metric, highest first (default: the first metric).
        order_by: Query<Option<Metric>>,
        /// How many values (default 10; at most the configured maximum of groups).
        limit: Query<Option<u32>>,
        /// Also return an `other` row summing every value outside the top `limit`.
        other: Query<Option<bool>>,
        /// Repeatable filter, as in the summary.
        filter: Query<Option<Vec<String>>>,
    ) -> Answer<BreakdownResult, ByParams> {
        let run = async {
            let mut q = self.base_query(from.0, to.0, metrics.0, filter.0)?;
            let dimension = Dimension::parse(&group_by.0, "group_by")?;
            q.group_by = vec![dimension.clone()];
            q.order_by = order_by.0.unwrap_or(q.metrics[0]);
            q.limit = Some(limit.0.unwrap_or(10));
            q.other = other.0.unwrap_or(false);
            let out = self.analytics.run(auth.tenant(), &q).await?;
            Ok::<_, AnalyticsError>(BreakdownResult {
                from: q.range.from(),
                to: q.range.to(),
                dimension: dimension.name(),
                order_by: q.order_by,
                rows: out
                    .groups
                    .iter()
                    .map(|g| BreakdownRow {
                        value: g.keys.first().cloned().unwrap_or_default(),
                        metrics: MetricValues::of(&g.totals.unwrap_or_default(), &q.metrics),
                    })
                    .collect(),
                other: out
                    .other
                    .map(|o| MetricValues::of(&o.totals.unwrap_or_default(), &q.metrics)),
            })
        };
        respond(run.await)
    }

    /// Query
    ///
    /// The whole query model in one request: metrics, up to three dimensions, filters, a
    /// time range, optional buckets in a time zone, top-N groups and an other group.
    #[oai(path = "/v1/query", method = "post", tag = "ApiTags::Analytics")]
    #[tracing::instrument(skip_all, name = "stats.query")]
    async fn query(
        &self,
        auth: ApiKey,
        body: JsonBody<QueryRequest>,
    ) -> Answer<QueryResult, ByBody> {
        let run = async {
            let request = body.0?;
            let q = self.model_of(&request)?;
            let out = self.analytics.run(auth.tenant(), &q).await?;
            let names: Vec<String> = q.group_by.iter().map(Dimension::name).collect();
            let group = |g: &GroupResult| QueryGroupResult {
                group: names.iter().cloned().zip(g.keys.iter().cloned()).collect(),
                totals: g.totals.map(|t| MetricValues::of(&t, &q.metrics)),
                points: q.bucket.map(|_| points(g, &q)),
            };
            Ok::<_, AnalyticsError>(QueryResult {
                from: q.range.from(),
                to: q.range.to(),
                time_zone: q.time_zone.name().to_string(),
                bucket: q.bucket,
                groups: out.groups.iter().map(group).collect(),
                other: out.other.as_ref().map(group),
                group_by: names.clone(),
            })
        };
        respond(run.await)
    }
}

pub fn respond<T: ToJSON + Send + Sync, S>(result: Result<T, AnalyticsError>) -> Answer<T, S> {
    match result {
        Ok(v) => AnalyticsResponse::Ok(Json(v)),
        Err(e) => e.into(),
    }
    .into()
}

fn points(g: &GroupResult, q: &AnalyticsQuery) -> Vec<Point> {
    g.points
        .iter()
        .map(|(start, aggs)| Point {
            time: start.with_timezone(&q.time_zone).fixed_offset(),
            metrics: MetricValues::of(aggs, &q.metrics),
        })
        .collect()
}

impl StatsApi {
    fn base_query(
        &self,
        from: DateTime<FixedOffset>,
        to: DateTime<FixedOffset>,
        metrics: MetricList,
        filters: Option<Vec<String>>,
    ) -> Result<AnalyticsQuery, InvalidInput> {
        let metrics = metrics_or_default(metrics);
        Ok(AnalyticsQuery {
            range: TimeRange::new(
                from.to_utc(),
                to.to_utc(),
                self.analytics.settings().max_range_days,
            )?,
            time_zone: chrono_tz::UTC,
            order_by: metrics[0],
            metrics,
            group_by: vec![],
            bucket: None,
            filters: parse_filters(&filters.unwrap_or_default())?,
            limit: None,
            other: false,
        })
    }

    fn model_of(&self, r: &QueryRequest) -> Result<AnalyticsQuery, InvalidInput> {
        let range = TimeRange::new(
            r.from.to_utc(),
            r.to.to_utc(),
            self.analytics.settings().max_range_days,
        )?;
        let time_zone = match &r.time_zone {
            Some(tz) => parse_time_zone(tz, "time_zone")?,
            None => chrono_tz::UTC,
        };
        let group_by = r
            .group_by
            .iter()
            .enumerate()
            .map(|(i, d)| Dimension::parse(d, &format!("group_by[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let filters = r
            .filters
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let field = format!("filters[{i}]");
                let dimension = Dimension::parse(&f.dimension, &format!("{field}.dimension"))?;
                if matches!(f.op, FilterOp::Eq | FilterOp::Neq) && f.values.len() != 1 {
                    return Err(InvalidInput::new(
                        "invalid_filter",
                        &format!("{field}.values"),
                        "`eq` and `neq` take exactly one value; use `in`/`not_in` for lists",
                    ));
                }
                let negate = matches!(f.op, FilterOp::Neq | FilterOp::NotIn);
                Filter::new(
                    dimension,
                    negate,
                    f.values.clone(),
                    &format!("{field}.values"),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut metrics = Vec::new();
        for m in &r.metrics {
            if !metrics.contains(m) {
                metrics.push(*m);
            }
        }
        Ok(AnalyticsQuery {
            range,
            time_zone,
            order_by: r
                .order_by
                .or_else(|| metrics.first().copied())
                .unwrap_or(Metric::Events),
            metrics,
            group_by,
            bucket: r.bucket,
            filters,
            limit: r.limit,
            other: r.other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reason the framework gives when `raw` does not parse as a `T` parameter.
    fn reason<T: ParseFromParameter>(raw: &str) -> String {
        let err = T::parse_from_parameters([raw])
            .err()
            .expect("does not parse");
        let reason = err.into_message();
        assert!(reason.starts_with("failed to parse"), "{reason}");
        readable(&reason)
    }

    #[test]
    fn unparsable_parameters_say_what_they_must_be() {
        assert_eq!(
            reason::<Option<u32>>("-5"),
            "must be a whole number from 0 to 4294967295 (invalid digit found in string)"
        );
        assert!(reason::<Option<u32>>("99999999999")
            .starts_with("must be a whole number from 0 to 4294967295 (number too large"));
        assert_eq!(
            reason::<Option<bool>>("maybe"),
            "must be `true` or `false` (provided string was not `true` or `false`)"
        );
        assert!(reason::<DateTime<Utc>>("2026-12-01")
            .starts_with("must be an RFC 3339 date-time with a zone, e.g."));
        assert_eq!(
            reason::<Bucket>("fortnight"),
            "must be one of minute, hour, day, week, month"
        );
        assert!(reason::<Option<Metric>>("likes").starts_with("must be one of events, impressions"));
        assert_eq!(
            reason::<Option<super::super::admin::StatusClass>>("7xx"),
            "must be one of 2xx, 3xx, 4xx, 5xx"
        );
        // An enumeration `enum_values` does not know.
        assert_eq!(
            reason::<super::super::types::DeviceDoc>("fridge"),
            "is not one of its values (listed in /openapi.json)"
        );
        // Our own types word their errors already.
        assert!(reason::<MetricList>("likes").starts_with("is not valid: unknown metric \"likes\""));
    }

    #[test]
    fn metric_lists_take_commas_and_repeats() {
        let list = MetricList::parse_from_parameters(["clicks,ctr", "clicks", "spend"]).unwrap();
        assert_eq!(list.0, vec![Metric::Clicks, Metric::Ctr, Metric::Spend]);
        assert!(MetricList::parse_from_parameters(["clicks,nope"]).is_err());
        assert!(MetricList::parse_from_parameters(Vec::<String>::new())
            .unwrap()
            .0
            .is_empty());
    }

    #[test]
    fn values_show_only_requested_metrics_and_null_ratios() {
        let aggs = Aggregates {
            clicks: 3,
            ..Default::default()
        };
        let v = MetricValues::of(&aggs, &[Metric::Clicks, Metric::Ctr]);
        let json = v.to_json().unwrap();
        assert_eq!(json, serde_json::json!({"clicks": 3, "ctr": null}));
    }

    #[test]
    fn query_bodies_name_the_bad_field() {
        let parse = |s: &str| -> Result<QueryRequest, String> {
            let de = &mut serde_json::Deserializer::from_str(s);
            serde_path_to_error::deserialize(de).map_err(|e| e.path().to_string())
        };
        let ok = r#"{"from":"2025-10-01T00:00:00Z","to":"2025-10-02T00:00:00+02:00","metrics":["clicks"],
                    "filters":[{"dimension":"country","op":"in","values":["US"]}]}"#;
        assert!(parse(ok).is_ok());
        let bad = r#"{"from":"2025-10-01T00:00:00Z","to":"2025-10-02T00:00:00Z","metrics":["clicks"],
                     "filters":[{"dimension":"country","op":"like","values":["US"]}]}"#;
        assert_eq!(parse(bad).unwrap_err(), "filters[0].op");
        let bad = r#"{"from":"yesterday","to":"2025-10-02T00:00:00Z","metrics":[]}"#;
        assert_eq!(parse(bad).unwrap_err(), "from");
        let bad =
            r#"{"from":"2025-10-01T00:00:00Z","to":"2025-10-02T00:00:00Z","metrics":[],"sql":"x"}"#;
        assert!(parse(bad).is_err());
    }
}
