//! What a caller can ask for — metrics, dimensions, filters, a time range, buckets in a time
//! zone — and the rules that make a request valid. Nothing here knows SQL: `sql.rs` maps every
//! metric and dimension to a fixed SQL snippet.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use poem_openapi::Enum;
use serde::Deserialize;

use super::InvalidInput;
use crate::domain::{
    country::is_country_code,
    event::{Device, EventType},
};

/// A figure the API can compute. Counts and sums are exact integers; ratios are computed from
/// them (`null` when the denominator is zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Enum, Deserialize)]
#[oai(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Events of every type.
    Events,
    Impressions,
    Clicks,
    Conversions,
    /// clicks / impressions.
    Ctr,
    /// conversions / clicks.
    Cvr,
    /// Sum of `cost_micros` (micro-units of currency).
    Spend,
    /// Sum of `revenue_micros` (micro-units of currency).
    Revenue,
    /// revenue / spend.
    Roas,
    /// Distinct non-empty `user_id`s, exact.
    UniqueUsersExact,
    /// Distinct non-empty `user_id`s, approximate (HyperLogLog-style, within about 2%).
    UniqueUsersApprox,
}

impl Metric {
    pub const ALL: [Metric; 11] = [
        Metric::Events,
        Metric::Impressions,
        Metric::Clicks,
        Metric::Conversions,
        Metric::Ctr,
        Metric::Cvr,
        Metric::Spend,
        Metric::Revenue,
        Metric::Roas,
        Metric::UniqueUsersExact,
        Metric::UniqueUsersApprox,
    ];

    /// What the GET endpoints compute when `metrics` is not given: everything but the
    /// (costlier) distinct-user counts.
    pub const DEFAULT: [Metric; 9] = [
        Metric::Events,
        Metric::Impressions,
        Metric::Clicks,
        Metric::Conversions,
        Metric::Ctr,
        Metric::Cvr,
        Metric::Spend,
        Metric::Revenue,
        Metric::Roas,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Metric::Events => "events",
            Metric::Impressions => "impressions",
            Metric::Clicks => "clicks",
            Metric::Conversions => "conversions",
            Metric::Ctr => "ctr",
            Metric::Cvr => "cvr",
            Metric::Spend => "spend",
            Metric::Revenue => "revenue",
            Metric::Roas => "roas",
            Metric::UniqueUsersExact => "unique_users_exact",
            Metric::UniqueUsersApprox => "unique_users_approx",
        }
    }

    /// For a ratio, its numerator and denominator.
    pub fn ratio(self) -> Option<(Agg, Agg)> {
        match self {
            Metric::Ctr => Some((Agg::Clicks, Agg::Impressions)),
            Metric::Cvr => Some((Agg::Conversions, Agg::Clicks)),
            Metric::Roas => Some((Agg::Revenue, Agg::Spend)),
            _ => None,
        }
    }

    /// The aggregates this metric is computed from.
    pub fn aggs(self) -> AggSet {
        match self.ratio() {
            Some((num, den)) => AggSet::of(&[num, den]),
            None => AggSet::of(&[match self {
                Metric::Events => Agg::Events,
                Metric::Impressions => Agg::Impressions,
                Metric::Clicks => Agg::Clicks,
                Metric::Conversions => Agg::Conversions,
                Metric::Spend => Agg::Spend,
                Metric::Revenue => Agg::Revenue,
                Metric::UniqueUsersExact => Agg::UsersExact,
                _ => Agg::UsersApprox,
            }]),
        }
    }
}

/// One aggregate column of a result row; metrics are computed from these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agg {
    Events,
    Impressions,
    Clicks,
    Conversions,
    Spend,
    Revenue,
    UsersExact,
    UsersApprox,
}

impl Agg {
    pub const ALL: [Agg; 8] = [
        Agg::Events,
        Agg::Impressions,
        Agg::Clicks,
        Agg::Conversions,
        Agg::Spend,
        Agg::Revenue,
        Agg::UsersExact,
        Agg::UsersApprox,
    ];

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of aggregates: only those a query needs are computed (each one read column costs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AggSet(u8);

impl AggSet {
    pub fn of(aggs: &[Agg]) -> Self {
        AggSet(aggs.iter().fold(0, |bits, a| bits | a.bit()))
    }

    pub fn contains(self, agg: Agg) -> bool {
        self.0 & agg.bit() != 0
    }

    pub fn union(self, other: AggSet) -> Self {
        AggSet(self.0 | other.0)
    }

    /// Only counts and sums: figures of parts add up to the whole (distinct counts do not).
    pub fn is_additive(self) -> bool {
        !self.contains(Agg::UsersExact) && !self.contains(Agg::UsersApprox)
    }
}

/// A column events can be grouped and filtered by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dimension {
    CampaignId,
    AdId,
    PublisherId,
    AdvertiserId,
    Country,
    Device,
    Os,
    Browser,
    EventType,
    /// `attributes.<key>`: the value of one attribute (empty when the event lacks the key).
    Attribute(String),
}

/// Attribute keys are 1–64 characters at ingest; the same rule applies to queries.
pub const MAX_ATTRIBUTE_KEY_CHARS: usize = 64;
pub const ATTRIBUTE_PREFIX: &str = "attributes.";

impl Dimension {
    pub const FIXED: [Dimension; 9] = [
        Dimension::CampaignId,
        Dimension::AdId,
        Dimension::PublisherId,
        Dimension::AdvertiserId,
        Dimension::Country,
        Dimension::Device,
        Dimension::Os,
        Dimension::Browser,
        Dimension::EventType,
    ];

    pub fn name(&self) -> String {
        match self {
            Dimension::Attribute(key) => format!("{ATTRIBUTE_PREFIX}{key}"),
            fixed => fixed.fixed_name().to_string(),
        }
    }

    fn fixed_name(&self) -> &'static str {
        match self {
            Dimension::CampaignId => "campaign_id",
            Dimension::AdId => "ad_id",
            Dimension::PublisherId => "publisher_id",
            Dimension::AdvertiserId => "advertiser_id",
            Dimension::Country => "country",
            Dimension::Device => "device",
            Dimension::Os => "os",
            Dimension::Browser => "browser",
            Dimension::EventType => "event_type",
            Dimension::Attribute(_) => "attributes",
        }
    }

    /// `campaign_id`, …, `event_type`, or `attributes.<key>` with a 1–64 character key.
    pub fn parse(name: &str, field: &str) -> Result<Self, InvalidInput> {
        if let Some(key) = name.strip_prefix(ATTRIBUTE_PREFIX) {
            let chars = key.chars().count();
            if chars == 0 || chars > MAX_ATTRIBUTE_KEY_CHARS {
                return Err(InvalidInput::new(
                    "invalid_dimension",
                    field,
                    format!("attribute keys are 1-{MAX_ATTRIBUTE_KEY_CHARS} characters"),
                ));
            }
            return Ok(Dimension::Attribute(key.to_string()));
        }
        Self::FIXED
            .into_iter()
            .find(|d| d.fixed_name() == name)
            .ok_or_else(|| {
                InvalidInput::new(
                    "invalid_dimension",
                    field,
                    format!(
                        "unknown dimension {name:?}; use one of {} or attributes.<key>",
                        Self::FIXED.map(|d| d.fixed_name()).join(", ")
                    ),
                )
            })
    }
}

/// Keep events whose dimension is (or, negated, is not) one of `values`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub dimension: Dimension,
    pub negate: bool,
    pub values: Vec<String>,
}

pub const MAX_FILTERS: usize = 20;
pub const MAX_FILTER_VALUES: usize = 100;
pub const MAX_VALUE_CHARS: usize = 256;

impl Filter {
    /// Checks the values (count, length, and for `event_type`, `country` and `device` the
    /// values an event can have, since any other could never match: a lower-case country
    /// would silently count nothing).
    pub fn new(
        dimension: Dimension,
        negate: bool,
        values: Vec<String>,
        field: &str,
    ) -> Result<Self, InvalidInput> {
        let invalid = |msg: String| InvalidInput::new("invalid_filter", field, msg);
        if values.is_empty() {
            return Err(invalid("a filter needs at least one value".into()));
        }
        if values.len() > MAX_FILTER_VALUES {
            return Err(invalid(format!(
                "a filter takes at most {MAX_FILTER_VALUES} values"
            )));
        }
        if let Some(v) = values.iter().find(|v| v.chars().count() > MAX_VALUE_CHARS) {
            return Err(invalid(format!(
                "value {:?}… is longer than {MAX_VALUE_CHARS} characters",
                v.chars().take(20).collect::<String>()
            )));
        }
        // What a value must be for an event to have it (empty: sent without one).
        let (can_match, expected): (fn(&str) -> bool, _) = match dimension {
            Dimension::EventType => (
                |v| EventType::parse(v).is_some(),
                format!(
                    "one of {}",
                    EventType::ALL.map(EventType::as_str).join(", ")
                ),
            ),
            Dimension::Country => (
                |v| v.is_empty() || is_country_code(v),
                "an ISO 3166-1 alpha-2 code in capitals (e.g. US), or empty for none".into(),
            ),
            Dimension::Device => (
                |v| v.is_empty() || Device::ALL.iter().any(|d| d.as_str() == v),
                format!(
                    "one of {}, or empty for none",
                    Device::ALL.map(Device::as_str).join(", ")
                ),
            ),
            _ => (|_| true, String::new()),
        };
        if let Some(v) = values.iter().find(|v| !can_match(v)) {
            return Err(invalid(format!(
                "{} {v:?} never matches: it must be {expected}",
                dimension.name()
            )));
        }
        Ok(Filter {
            dimension,
            negate,
            values,
        })
    }

    /// Parses the compact form used in query strings (`filter=`):
    ///
    /// - `country==US` — equals; `country==US|DE` — one of; `device!=ctv` — not (any of);
    /// - `attributes.placement==sidebar` — an attribute's value;
    /// - a backslash makes the next character literal (`\|`, `\\`, `\=`, `\!`), so values and
    ///   attribute keys may contain anything.
    pub fn parse(text: &str, field: &str) -> Result<Self, InvalidInput> {
        let invalid = |msg: &str| {
            InvalidInput::new(
                "invalid_filter",
                field,
                format!("{msg} in filter {text:?}; write <dimension>==<value>[|<value>…] or <dimension>!=<value>[|…]"),
            )
        };
        let chars: Vec<char> = text.chars().collect();
        let mut name = String::new();
        let mut i = 0;
        let negate = loop {
            match chars.get(i) {
                None => return Err(invalid("no `==` or `!=`")),
                Some('\\') => {
                    let c = chars.get(i + 1).ok_or_else(|| invalid("dangling `\\`"))?;
                    name.push(*c);
                    i += 2;
                }
                Some(c @ ('=' | '!')) if chars.get(i + 1) == Some(&'=') => {
                    i += 2;
                    break *c == '!';
                }
                Some(c) => {
                    name.push(*c);
                    i += 1;
                }
            }
        };
        let mut values = vec![String::new()];
        while i < chars.len() {
            match chars[i] {
                '\\' => {
                    let c = chars.get(i + 1).ok_or_else(|| invalid("dangling `\\`"))?;
                    values.last_mut().expect("never empty").push(*c);
                    i += 2;
                }
                '|' => {
                    values.push(String::new());
                    i += 1;
                }
                c => {
                    values.last_mut().expect("never empty").push(c);
                    i += 1;
                }
            }
        }
        let dimension = Dimension::parse(&name, field)?;
        Filter::new(dimension, negate, values, field)
    }
}

/// `[from, to)` on the corrected event time, in whole milliseconds (the column's precision).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeRange {
    pub from_ms: i64,
    pub to_ms: i64,
}

impl TimeRange {
    /// `from` inclusive, `to` exclusive; `to` must be after `from` and the span at most
    /// `max_days` days.
    pub fn new(
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        max_days: u32,
    ) -> Result<Self, InvalidInput> {
        let range = Self::unchecked(from, to);
        if range.to_ms <= range.from_ms {
            return Err(InvalidInput::new(
                "invalid_time_range",
                "to",
                "`to` must be later than `from` (from is inclusive, to exclusive)",
            ));
        }
        let max_ms = i64::from(max_days) * 86_400_000;
        if range.to_ms - range.from_ms > max_ms {
            return Err(InvalidInput::new(
                "time_range_too_large",
                "to",
                format!("the time range spans more than {max_days} days; query a shorter range"),
            )
            .with_limit(u64::from(max_days)));
        }
        Ok(range)
    }

    /// Sub-millisecond parts round up: `event_time >= from` holds for a stored millisecond
    /// exactly when it is at or after the rounded-up `from` (and likewise for `to`).
    pub fn unchecked(from: DateTime<Utc>, to: DateTime<Utc>) -> Self {
        TimeRange {
            from_ms: ceil_ms(from),
            to_ms: ceil_ms(to),
        }
    }

    pub fn from(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.from_ms).unwrap_or_default()
    }

    pub fn to(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.to_ms).unwrap_or_default()
    }
}

pub fn ceil_ms(t: DateTime<Utc>) -> i64 {
    let ms = t.timestamp_millis();
    if t.timestamp_subsec_nanos().is_multiple_of(1_000_000) {
        ms
    } else {
        ms + 1
    }
}

/// The width of a time bucket. Day, week (Monday to Monday) and month boundaries are local
/// midnights in the request's time zone, so a DST day is 23 or 25 hours long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, Deserialize)]
#[oai(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Bucket {
    Minute,
    Hour,
    Day,
    Week,
    Month,
}

/// An IANA time zone name, e.g. `Europe/Berlin`.
pub fn parse_time_zone(name: &str, field: &str) -> Result<Tz, InvalidInput> {
    Tz::from_str(name).map_err(|_| {
        InvalidInput::new(
            "invalid_time_zone",
            field,
            format!("{name:?} is not an IANA time zone name (e.g. UTC, Europe/Berlin)"),
        )
    })
}

/// The whole query model, validated. `POST /v1/query` takes it as JSON; the GET endpoints are
/// fixed shapes of it.
#[derive(Debug, Clone)]
pub struct AnalyticsQuery {
    pub range: TimeRange,
    pub time_zone: Tz,
    pub metrics: Vec<Metric>,
    pub group_by: Vec<Dimension>,
    pub bucket: Option<Bucket>,
    pub filters: Vec<Filter>,
    /// Groups are ranked by this metric, highest first (ties by group values).
    pub order_by: Metric,
    /// Top-N groups; the rest are left out (or summed into `other`).
    pub limit: Option<u32>,
    /// Also compute the figures of every group outside the top `limit`.
    pub other: bool,
}

pub const MAX_GROUP_BY: usize = 3;

impl AnalyticsQuery {
    /// Cross-field rules: the per-field ones are checked where each field is parsed.
    pub fn check(&self, max_groups: u32) -> Result<(), InvalidInput> {
        if self.metrics.is_empty() {
            return Err(InvalidInput::new(
                "invalid_metrics",
                "metrics",
                "ask for at least one metric",
            ));
        }
        if self.group_by.len() > MAX_GROUP_BY {
            return Err(InvalidInput::new(
                "too_many_dimensions",
                "group_by",
                format!("group by at most {MAX_GROUP_BY} dimensions"),
            )
            .with_limit(MAX_GROUP_BY as u64));
        }
        if let Some(d) = self
            .group_by
            .iter()
            .enumerate()
            .find(|(i, d)| self.group_by[..*i].contains(d))
        {
            return Err(InvalidInput::new(
                "invalid_dimension",
                "group_by",
                format!("{} is listed twice", d.1.name()),
            ));
        }
        if self.filters.len() > MAX_FILTERS {
            return Err(InvalidInput::new(
                "too_many_filters",
                "filters",
                format!("at most {MAX_FILTERS} filters"),
            )
            .with_limit(MAX_FILTERS as u64));
        }
        if let Some(limit) = self.limit {
            if limit == 0 || limit > max_groups {
                return Err(InvalidInput::new(
                    "invalid_limit",
                    "limit",
                    format!("limit must be 1-{max_groups}"),
                )
                .with_limit(u64::from(max_groups)));
            }
            if self.group_by.is_empty() {
                return Err(InvalidInput::new(
                    "invalid_limit",
                    "limit",
                    "limit applies to groups: give group_by too",
                ));
            }
        }
        if self.other && (self.group_by.is_empty() || self.limit.is_none()) {
            return Err(InvalidInput::new(
                "invalid_other",
                "other",
                "the other row sums the groups outside the top `limit`: give group_by and limit",
            ));
        }
        Ok(())
    }

    /// The aggregates to compute: those of the requested metrics and of the ranking metric.
    pub fn aggs(&self) -> AggSet {
        let ranked = if self.group_by.is_empty() {
            AggSet::default()
        } else {
            self.order_by.aggs()
        };
        self.metrics
            .iter()
            .fold(ranked, |set, m| set.union(m.aggs()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(text: &str) -> Result<Filter, InvalidInput> {
        Filter::parse(text, "filter")
    }

    #[test]
    fn filters_parse_equals_lists_and_negation() {
        assert_eq!(
            filter("country==US").unwrap(),
            Filter {
                dimension: Dimension::Country,
                negate: false,
                values: vec!["US".into()]
            }
        );
        let f = filter("campaign_id==spring:2026|fall.x").unwrap();
        assert_eq!(f.values, vec!["spring:2026", "fall.x"]);
        let f = filter("device!=ctv|tablet").unwrap();
        assert!(f.negate);
        assert_eq!(f.values, vec!["ctv", "tablet"]);
        let f = filter("advertiser_id==").unwrap();
        assert_eq!(f.values, vec![""]);
    }

    #[test]
    fn filter_escapes_allow_any_character() {
        let f = filter(r"attributes.a\=b\!==x\|y|it's \\ ok").unwrap();
        assert_eq!(f.dimension, Dimension::Attribute("a=b!".into()));
        assert_eq!(f.values, vec!["x|y", r"it's \ ok"]);
        let f = filter("attributes.utm:source==news=paper").unwrap();
        assert_eq!(f.dimension, Dimension::Attribute("utm:source".into()));
        assert_eq!(f.values, vec!["news=paper"]);
    }

    #[test]
    fn bad_filters_say_what_is_wrong() {
        for bad in [
            "country",
            "country=US",
            "nope==1",
            "event_type==view",
            "attributes.==x",
            r"country==US\",
            "campaign_id'; DROP TABLE events; --==x",
        ] {
            let err = filter(bad).unwrap_err();
            assert_eq!(err.field, "filter", "{bad}");
        }
        let long = format!("country=={}", "x".repeat(300));
        assert!(filter(&long).is_err());
    }

    #[test]
    fn dimensions_come_from_a_fixed_list_or_are_attributes() {
        assert_eq!(Dimension::parse("os", "group_by").unwrap(), Dimension::Os);
        assert_eq!(
            Dimension::parse("attributes.x y", "group_by").unwrap(),
            Dimension::Attribute("x y".into())
        );
        assert!(Dimension::parse("OS", "group_by").is_err());
        assert!(Dimension::parse("tenant", "group_by").is_err());
        assert!(Dimension::parse(&format!("attributes.{}", "k".repeat(65)), "g").is_err());
    }

    #[test]
    fn time_ranges_round_up_to_milliseconds_and_are_bounded() {
        let t = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().to_utc();
        let r = TimeRange::new(
            t("2025-01-01T00:00:00.0005Z"),
            t("2025-01-02T00:00:00Z"),
            92,
        )
        .unwrap();
        assert_eq!(r.from_ms, t("2025-01-01T00:00:00.001Z").timestamp_millis());
        let err =
            TimeRange::new(t("2025-01-02T00:00:00Z"), t("2025-01-01T00:00:00Z"), 92).unwrap_err();
        assert_eq!(err.code, "invalid_time_range");
        let err =
            TimeRange::new(t("2025-01-01T00:00:00Z"), t("2025-06-01T00:00:00Z"), 92).unwrap_err();
        assert_eq!((err.code, err.limit), ("time_range_too_large", Some(92)));
    }

    #[test]
    fn time_zones_are_iana_names() {
        assert!(parse_time_zone("Europe/Berlin", "time_zone").is_ok());
        assert!(parse_time_zone("UTC", "time_zone").is_ok());
        let err = parse_time_zone("Mars/Phobos", "time_zone").unwrap_err();
        assert_eq!(
            (err.code, err.field),
            ("invalid_time_zone", "time_zone".into())
        );
        assert!(parse_time_zone("UTC'); DROP TABLE events; --", "time_zone").is_err());
    }

    #[test]
    fn ratios_need_their_parts() {
        let set = Metric::Ctr.aggs();
        assert!(set.contains(Agg::Clicks) && set.contains(Agg::Impressions));
        assert!(!set.contains(Agg::Spend));
        for m in Metric::ALL {
            assert_ne!(m.aggs(), AggSet::default(), "{m:?}");
        }
    }
}
