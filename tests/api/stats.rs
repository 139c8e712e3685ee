//! Analytics endpoints: a seeded random data set checked figure by figure against numbers
//! computed here from the generated events (never by ClickHouse); guards; bad input;
//! injection through every parameter.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::*;

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

/// GET with query parameters (encoded by the client: values may hold `|`, `+`, `'`, `\`).
pub async fn get_query(app: &TestApp, path: &str, params: &[(&str, String)]) -> (u16, Value) {
    let resp = app
        .http
        .get(format!("{}{path}", app.base))
        .query(params)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

pub async fn post_query(app: &TestApp, body: &Value) -> (u16, Value) {
    let r = app
        .post_to("/v1/query", body.to_string(), &[("content-type", JSON)])
        .await;
    (r.status, r.json)
}

pub fn rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn ms(s: &str) -> i64 {
    DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
}

/// Another app writing `tenant`'s events into the database of `first`.
pub async fn spawn_tenant(
    first: &TestApp,
    name: &str,
    tenant: &str,
    extra: &[(&str, &str)],
) -> TestApp {
    let mut env = vec![("ADTRACK_CLICKHOUSE_DATABASE", first.database.as_str())];
    env.extend_from_slice(extra);
    spawn_app_for(name, tenant, &env).await
}

// ---------------------------------------------------------------------------------------------
// The data set
// ---------------------------------------------------------------------------------------------

/// SplitMix64: small, seeded, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }

    /// Index in 0..n, weight 1/(i+1): a few big values and a long tail.
    pub fn zipf(&mut self, n: usize) -> usize {
        let total: f64 = (1..=n).map(|i| 1.0 / i as f64).sum();
        let mut x = (self.next() >> 11) as f64 / (1u64 << 53) as f64 * total;
        for i in 0..n {
            x -= 1.0 / (i + 1) as f64;
            if x <= 0.0 {
                return i;
            }
        }
        n - 1
    }

    pub fn uuid(&mut self) -> Uuid {
        uuid::Builder::from_random_bytes(
            [self.next().to_le_bytes(), self.next().to_le_bytes()]
                .concat()
                .try_into()
                .unwrap(),
        )
        .into_uuid()
    }
}

#[derive(Debug, Clone)]
pub struct Ev {
    pub tenant: usize,
    pub id: Uuid,
    pub kind: &'static str,
    pub ts_ms: i64,
    pub campaign: String,
    pub ad: String,
    pub publisher: String,
    pub advertiser: Option<String>,
    pub user: Option<String>,
    pub country: Option<&'static str>,
    pub device: Option<&'static str>,
    pub os: Option<&'static str>,
    pub browser: Option<&'static str>,
    pub cost: u64,
    pub revenue: u64,
    pub attrs: BTreeMap<String, String>,
}

const COUNTRIES: [&str; 10] = ["US", "DE", "FR", "GB", "IN", "BR", "JP", "CA", "AU", "ES"];
const DEVICES: [&str; 5] = ["desktop", "mobile", "tablet", "ctv", "other"];
const OSES: [&str; 5] = ["iOS", "Android", "Windows", "macOS", "Linux"];
const BROWSERS: [&str; 4] = ["Chrome", "Safari", "Firefox", "Edge"];
/// Attribute values with the characters a filter must escape or a query could trip on.
const SOURCES: [&str; 3] = ["news|paper", "mail", "it's"];
pub const NOTE_KEY: &str = "note's=key";
pub const NOTE_VALUE: &str = r"a\b|c'd";

impl Ev {
    pub fn generate(rng: &mut Rng, tenant: usize, from_ms: i64, span_ms: i64) -> Ev {
        let roll = rng.below(100);
        let kind = if roll < 80 {
            "impression"
        } else if roll < 95 {
            "click"
        } else {
            "conversion"
        };
        let c = rng.zipf(12);
        let mut attrs = BTreeMap::new();
        if rng.chance(0.7) {
            attrs.insert(
                "placement".to_string(),
                rng.pick(&["sidebar", "header", "feed"]).to_string(),
            );
        }
        if rng.chance(0.3) {
            attrs.insert("utm:source".to_string(), rng.pick(&SOURCES).to_string());
        }
        if rng.chance(0.05) {
            attrs.insert(NOTE_KEY.to_string(), NOTE_VALUE.to_string());
        }
        Ev {
            tenant,
            id: rng.uuid(),
            kind,
            ts_ms: from_ms + rng.below(span_ms as u64) as i64,
            campaign: format!("t{tenant}.spring:c{c}"),
            ad: format!("ad-{c}-{}", rng.below(8)),
            publisher: format!("pub-{}", rng.zipf(20)),
            advertiser: (!rng.chance(0.2)).then(|| format!("adv-{}", rng.below(5))),
            user: (!rng.chance(0.1)).then(|| format!("u{}", rng.below(4000))),
            country: (!rng.chance(0.1)).then(|| COUNTRIES[rng.zipf(COUNTRIES.len())]),
            device: (!rng.chance(0.1)).then(|| *rng.pick(&DEVICES)),
            os: (!rng.chance(0.2)).then(|| *rng.pick(&OSES)),
            browser: (!rng.chance(0.2)).then(|| *rng.pick(&BROWSERS)),
            cost: match kind {
                "impression" => rng.below(5_000),
                "click" => rng.below(200_000),
                _ => 0,
            },
            revenue: if kind == "conversion" {
                rng.below(50_000_000)
            } else {
                0
            },
            attrs,
        }
    }

    pub fn json(&self) -> Value {
        let mut v = json!({
            "event_id": self.id.to_string(),
            "event_type": self.kind,
            "timestamp": rfc3339(self.ts_ms),
            "campaign_id": self.campaign,
            "ad_id": self.ad,
            "publisher_id": self.publisher,
            "cost_micros": self.cost,
            "revenue_micros": self.revenue,
        });
        let o = v.as_object_mut().unwrap();
        let mut opt = |k: &str, val: Option<&str>| {
            if let Some(val) = val {
                o.insert(k.into(), json!(val));
            }
        };
        opt("advertiser_id", self.advertiser.as_deref());
        opt("user_id", self.user.as_deref());
        opt("country", self.country);
        opt("device", self.device);
        opt("os", self.os);
        opt("browser", self.browser);
        if !self.attrs.is_empty() {
            o.insert("attributes".into(), json!(self.attrs));
        }
        v
    }

    /// The value of a dimension as the API reports it (empty when not given).
    pub fn dim(&self, name: &str) -> String {
        let s = |o: Option<&str>| o.unwrap_or("").to_string();
        match name {
            "campaign_id" => self.campaign.clone(),
            "ad_id" => self.ad.clone(),
            "publisher_id" => self.publisher.clone(),
            "advertiser_id" => s(self.advertiser.as_deref()),
            "user_id" => s(self.user.as_deref()),
            "country" => s(self.country),
            "device" => s(self.device),
            "os" => s(self.os),
            "browser" => s(self.browser),
            "event_type" => self.kind.to_string(),
            other => {
                let key = other.strip_prefix("attributes.").expect("a dimension");
                self.attrs.get(key).cloned().unwrap_or_default()
            }
        }
    }
}

/// Posts `events` through `app` in batches of 10,000 with `?wait=true`.
pub async fn load(app: &TestApp, events: &[Value]) {
    for batch in events.chunks(10_000) {
        let r = app
            .post_and_wait(Value::from(batch.to_vec()).to_string())
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(
            r.json["accepted"].as_u64(),
            Some(batch.len() as u64),
            "{}",
            r.text
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Expected figures, computed from the generated events
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Clone)]
pub struct Exp {
    events: u64,
    impressions: u64,
    clicks: u64,
    conversions: u64,
    spend: u64,
    revenue: u64,
    users: HashSet<String>,
}

impl Exp {
    pub fn of<'a>(evs: impl IntoIterator<Item = &'a Ev>) -> Exp {
        let mut e = Exp::default();
        for ev in evs {
            e.add(ev);
        }
        e
    }

    fn add(&mut self, ev: &Ev) {
        self.events += 1;
        match ev.kind {
            "impression" => self.impressions += 1,
            "click" => self.clicks += 1,
            _ => self.conversions += 1,
        }
        self.spend += ev.cost;
        self.revenue += ev.revenue;
        if let Some(u) = &ev.user {
            self.users.insert(u.clone());
        }
    }

    fn ratio(num: u64, den: u64) -> Option<f64> {
        (den != 0).then(|| num as f64 / den as f64)
    }

    /// A count, or a ratio (`None` = null).
    fn metric(&self, name: &str) -> Result<u64, Option<f64>> {
        match name {
            "events" => Ok(self.events),
            "impressions" => Ok(self.impressions),
            "clicks" => Ok(self.clicks),
            "conversions" => Ok(self.conversions),
            "spend" => Ok(self.spend),
            "revenue" => Ok(self.revenue),
            "unique_users_exact" | "unique_users_approx" => Ok(self.users.len() as u64),
            "ctr" => Err(Self::ratio(self.clicks, self.impressions)),
            "cvr" => Err(Self::ratio(self.conversions, self.clicks)),
            "roas" => Err(Self::ratio(self.revenue, self.spend)),
            other => panic!("unknown metric {other}"),
        }
    }

    /// The ranking value the API documents: the metric, a ratio, or -1 for an undefined one.
    fn rank(&self, name: &str) -> f64 {
        match self.metric(name) {
            Ok(n) => n as f64,
            Err(r) => r.unwrap_or(-1.0),
        }
    }
}

pub const ALL_METRICS: [&str; 11] = [
    "events",
    "impressions",
    "clicks",
    "conversions",
    "ctr",
    "cvr",
    "spend",
    "revenue",
    "roas",
    "unique_users_exact",
    "unique_users_approx",
];

/// Checks every requested metric of `got` (a `Metrics` object) against `exp`, and that no
/// other metric is present.
pub fn check_metrics(ctx: &str, got: &Value, exp: &Exp, metrics: &[&str]) {
    let obj = got
        .as_object()
        .unwrap_or_else(|| panic!("{ctx}: no metrics object in {got}"));
    for name in ALL_METRICS {
        let value = obj.get(name);
        if !metrics.contains(&name) {
            assert!(value.is_none(), "{ctx}: {name} was not asked for: {got}");
            continue;
        }
        let value = value.unwrap_or_else(|| panic!("{ctx}: {name} missing in {got}"));
        match exp.metric(name) {
            Ok(n) if name == "unique_users_approx" => {
                let v = value.as_u64().unwrap() as f64;
                let tolerance = (n as f64 * 0.03).max(2.0);
                assert!(
                    (v - n as f64).abs() <= tolerance,
                    "{ctx}: {name} {v} vs {n}"
                );
            }
            Ok(n) => assert_eq!(value.as_u64(), Some(n), "{ctx}: {name} in {got}"),
            Err(None) => assert!(value.is_null(), "{ctx}: {name} should be null: {got}"),
            Err(Some(r)) => {
                let v = value
                    .as_f64()
                    .unwrap_or_else(|| panic!("{ctx}: {name} {value}"));
                assert!(
                    (v - r).abs() <= 1e-12 * r.abs().max(1.0),
                    "{ctx}: {name} {v} vs {r}"
                );
            }
        }
    }
}

/// The figures of every value of `dim` among `evs`, ranked as the API documents: by
/// `order_by`, highest first, ties by the value.
pub fn rank_groups<'a>(
    evs: impl IntoIterator<Item = &'a Ev>,
    dim: &str,
    order_by: &str,
) -> Vec<(String, Exp)> {
    let mut groups: BTreeMap<String, Vec<&Ev>> = BTreeMap::new();
    for e in evs {
        groups.entry(e.dim(dim)).or_default().push(e);
    }
    let mut ranked: Vec<(String, Exp)> = groups
        .into_iter()
        .map(|(k, evs)| (k, Exp::of(evs)))
        .collect();
    ranked.sort_by(|a, b| {
        b.1.rank(order_by)
            .partial_cmp(&a.1.rank(order_by))
            .unwrap()
            .then_with(|| a.0.cmp(&b.0))
    });
    ranked
}

/// The start of `ms`'s bucket in `tz`, computed here by plain calendar arithmetic.
pub fn bucket_of(bucket: &str, tz: Tz, ms: i64) -> i64 {
    let t = DateTime::<Utc>::from_timestamp_millis(ms).unwrap();
    let local = t.with_timezone(&tz);
    let midnight = |d: NaiveDate| {
        tz.from_local_datetime(&d.and_hms_opt(0, 0, 0).unwrap())
            .earliest()
            .unwrap()
            .timestamp_millis()
    };
    let into_minute = i64::from(local.second()) * 1000 + ms.rem_euclid(1000);
    match bucket {
        "minute" => ms - into_minute,
        "hour" => ms - into_minute - i64::from(local.minute()) * 60_000,
        "day" => midnight(local.date_naive()),
        "week" => midnight(
            local.date_naive() - Duration::days(i64::from(local.weekday().num_days_from_monday())),
        ),
        "month" => midnight(local.date_naive().with_day(1).unwrap()),
        other => panic!("bucket {other}"),
    }
}

/// Every bucket start of `[from, to)`, computed here: step by the bucket's length in local
/// calendar terms, then name the bucket of each step.
pub fn buckets_between(bucket: &str, tz: Tz, from: i64, to: i64) -> Vec<i64> {
    let mut out: Vec<i64> = vec![];
    // Minute steps find every bucket (no bucket is shorter than a minute).
    let mut t = from;
    while t < to {
        let b = bucket_of(bucket, tz, t);
        if out.last() != Some(&b) {
            out.push(b);
        }
        t = (t - t.rem_euclid(60_000)) + 60_000;
    }
    out
}

/// Asks for the time series of `[from, to)` in `bucket`s of `zone` and checks it against
/// `evs` (all of one tenant): every bucket present, named in the zone's own offset, with the
/// figures of exactly the events in it.
pub async fn check_timeseries<'a>(
    app: &TestApp,
    evs: impl IntoIterator<Item = &'a Ev>,
    bucket: &str,
    zone: &str,
    (from, to): (i64, i64),
    metrics: &str,
    ctx: &str,
) {
    let tz: Tz = zone.parse().unwrap();
    let params = [
        ("from", rfc3339(from)),
        ("to", rfc3339(to)),
        ("bucket", bucket.to_string()),
        ("time_zone", zone.to_string()),
        ("metrics", metrics.to_string()),
    ];
    let (status, body) = get_query(app, "/v1/stats/timeseries", &params).await;
    assert_eq!(status, 200, "{ctx}: {bucket} {zone}: {body}");
    let expected = buckets_between(bucket, tz, from, to);
    let points = body["points"].as_array().unwrap();
    let got: Vec<i64> = points.iter().map(point_ms).collect();
    assert_eq!(got, expected, "{ctx}: {bucket} {zone}: bucket starts");
    let mut per_bucket: HashMap<i64, Vec<&Ev>> = HashMap::new();
    for e in evs.into_iter().filter(|e| e.ts_ms >= from && e.ts_ms < to) {
        per_bucket
            .entry(bucket_of(bucket, tz, e.ts_ms))
            .or_default()
            .push(e);
    }
    let metrics: Vec<&str> = metrics.split(',').collect();
    for p in points {
        let evs = per_bucket.remove(&point_ms(p)).unwrap_or_default();
        let ctx = format!("{ctx}: {bucket} {zone} {}", p["time"]);
        check_metrics(&ctx, &p["metrics"], &Exp::of(evs), &metrics);
        // The bucket is named in the zone's own offset.
        let offset = tz.offset_from_utc_datetime(
            &DateTime::<Utc>::from_timestamp_millis(point_ms(p))
                .unwrap()
                .naive_utc(),
        );
        let shown = DateTime::parse_from_rfc3339(p["time"].as_str().unwrap()).unwrap();
        assert_eq!(
            shown.offset().local_minus_utc(),
            chrono::Offset::fix(&offset).local_minus_utc(),
            "{ctx}"
        );
    }
    assert!(
        per_bucket.is_empty(),
        "{ctx}: {bucket} {zone}: events outside every bucket"
    );
}

fn point_ms(point: &Value) -> i64 {
    ms(point["time"].as_str().unwrap())
}

// ---------------------------------------------------------------------------------------------
// The seeded correctness test
// ---------------------------------------------------------------------------------------------

/// Which events a filter keeps.
type Keep = Box<dyn Fn(&Ev) -> bool>;
/// dimension, order_by, metrics, limit, other, filters.
type BreakdownCase = (
    &'static str,
    &'static str,
    &'static str,
    usize,
    bool,
    Vec<String>,
);
/// path, params, error, field.
type BadCase = (
    &'static str,
    Vec<(&'static str, String)>,
    &'static str,
    &'static str,
);

const WINDOW_FROM: &str = "2025-10-08T00:00:00Z";
const WINDOW_TO: &str = "2025-11-07T00:00:00Z";
const TENANTS: [&str; 3] = ["default", "t2", "t3"];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_endpoint_matches_figures_computed_from_a_seeded_data_set() {
    // Events from a fixed window (so DST changes of Europe/Berlin and America/New_York are
    // in it whatever the date), accepted thanks to a long retention.
    let old = [("ADTRACK_RETENTION_DAYS", "3650")];
    let app = spawn_app_with("seeded", &old).await;
    let t2 = spawn_tenant(&app, "seeded_t2", "t2", &old).await;
    let t3 = spawn_tenant(&app, "seeded_t3", "t3", &old).await;
    let apps = [&app, &t2, &t3];

    let (from, to) = (ms(WINDOW_FROM), ms(WINDOW_TO));
    let mut rng = Rng::new(0x5eed_4a11);
    let mut events: Vec<Ev> = Vec::with_capacity(110_000);
    for _ in 0..110_000 {
        let roll = rng.below(100);
        let tenant = if roll < 60 {
            0
        } else if roll < 85 {
            1
        } else {
            2
        };
        events.push(Ev::generate(&mut rng, tenant, from, to - from));
    }
    // Every tenant's events, with about 5% sent twice (identical copies, in random order).
    let mut sends: Vec<Vec<Value>> = vec![vec![]; TENANTS.len()];
    for ev in &events {
        sends[ev.tenant].push(ev.json());
        if rng.chance(0.05) {
            sends[ev.tenant].push(ev.json());
        }
    }
    for list in &mut sends {
        for i in (1..list.len()).rev() {
            list.swap(i, rng.below(i as u64 + 1) as usize);
        }
    }
    let duplicates: usize = sends.iter().map(Vec::len).sum::<usize>() - events.len();
    assert!(duplicates > 4_000, "{duplicates} duplicates");
    tokio::join!(
        load(&app, &sends[0]),
        load(&t2, &sends[1]),
        load(&t3, &sends[2])
    );

    let of = |tenant: usize| events.iter().filter(move |e| e.tenant == tenant);
    let window = [("from", rfc3339(from)), ("to", rfc3339(to))];
    let all = ALL_METRICS.join(",");

    // Summary, every tenant, every metric.
    for (t, a) in apps.iter().enumerate() {
        let mut params = window.to_vec();
        params.push(("metrics", all.clone()));
        let (status, body) = get_query(a, "/v1/stats/summary", &params).await;
        assert_eq!(status, 200, "{body}");
        check_metrics(
            &format!("summary {}", TENANTS[t]),
            &body["metrics"],
            &Exp::of(of(t)),
            &ALL_METRICS,
        );
    }

    // Summary over an odd sub-range (millisecond bounds) with filters of every kind.
    let (sub_from, sub_to) = (
        from + 3 * 86_400_000 + 43_200_123,
        from + 17 * 86_400_000 + 7,
    );
    let campaigns = ["t0.spring:c1", "t0.spring:c4"];
    let cases: Vec<(Vec<String>, Keep)> = vec![
        (vec![], Box::new(|_| true)),
        (
            vec![format!("campaign_id=={}|{}", campaigns[0], campaigns[1])],
            Box::new(move |e: &Ev| campaigns.contains(&e.campaign.as_str())),
        ),
        (
            vec!["country!=US|DE".into(), "device==mobile".into()],
            Box::new(|e: &Ev| {
                !matches!(e.country, Some("US" | "DE")) && e.device == Some("mobile")
            }),
        ),
        (
            vec![
                "event_type==click|conversion".into(),
                "advertiser_id==".into(),
            ],
            Box::new(|e: &Ev| e.kind != "impression" && e.advertiser.is_none()),
        ),
        (
            vec!["attributes.placement==sidebar".into(), "os!=iOS".into()],
            Box::new(|e: &Ev| e.dim("attributes.placement") == "sidebar" && e.os != Some("iOS")),
        ),
        (
            vec![r"attributes.utm:source==news\|paper|it's".into()],
            Box::new(|e: &Ev| {
                matches!(
                    e.dim("attributes.utm:source").as_str(),
                    "news|paper" | "it's"
                )
            }),
        ),
        (
            vec![format!(
                r"attributes.note's\=key=={}",
                NOTE_VALUE.replace('\\', r"\\").replace('|', r"\|")
            )],
            Box::new(|e: &Ev| e.dim(&format!("attributes.{NOTE_KEY}")) == NOTE_VALUE),
        ),
        (
            vec![
                "browser==".into(),
                "publisher_id!=pub-0".into(),
                "ad_id!=ad-0-1".into(),
            ],
            Box::new(|e: &Ev| e.browser.is_none() && e.publisher != "pub-0" && e.ad != "ad-0-1"),
        ),
    ];
    for (filters, keep) in &cases {
        let mut params = vec![
            ("from", rfc3339(sub_from)),
            ("to", rfc3339(sub_to)),
            ("metrics", all.clone()),
        ];
        params.extend(filters.iter().map(|f| ("filter", f.clone())));
        let (status, body) = get_query(&app, "/v1/stats/summary", &params).await;
        assert_eq!(status, 200, "{filters:?}: {body}");
        let exp = Exp::of(of(0).filter(|e| e.ts_ms >= sub_from && e.ts_ms < sub_to && keep(e)));
        assert!(exp.events > 0, "{filters:?} selects nothing");
        check_metrics(
            &format!("summary {filters:?}"),
            &body["metrics"],
            &exp,
            &ALL_METRICS,
        );
    }

    // Time series: buckets in several zones, DST days included, gaps filled.
    let series_cases = [
        (
            "day",
            "UTC",
            from,
            to,
            "events,clicks,spend,ctr,unique_users_exact",
        ),
        (
            "day",
            "Europe/Berlin",
            from,
            to,
            "impressions,cvr,revenue,roas",
        ),
        (
            "hour",
            "America/New_York",
            ms("2025-10-30T00:00:00Z"),
            ms("2025-11-06T00:00:00Z"),
            "events,ctr",
        ),
        (
            "hour",
            "Asia/Kolkata",
            ms("2025-10-20T00:00:00Z"),
            ms("2025-10-22T00:00:00Z"),
            "events,spend",
        ),
        (
            "minute",
            "UTC",
            ms("2025-10-12T10:00:00Z"),
            ms("2025-10-12T12:30:00Z"),
            "events",
        ),
        (
            "week",
            "Asia/Kolkata",
            from,
            to,
            "events,unique_users_exact",
        ),
        ("month", "America/New_York", from, to, "events,revenue"),
    ];
    for (bucket, zone, s_from, s_to, metrics) in series_cases {
        check_timeseries(&app, of(0), bucket, zone, (s_from, s_to), metrics, "seeded").await;
    }
    // The DST days really are in the window: Berlin's 2025-10-26 lasts 25 hours.
    let berlin: Tz = "Europe/Berlin".parse().unwrap();
    let days = buckets_between("day", berlin, from, to);
    assert!(days.windows(2).any(|w| w[1] - w[0] == 25 * 3_600_000));

    // Breakdown: top N with the other row, every kind of dimension and ranking.
    let breakdowns: [BreakdownCase; 6] = [
        (
            "campaign_id",
            "impressions",
            "impressions,clicks,ctr,spend,unique_users_exact",
            5,
            true,
            vec![],
        ),
        (
            "country",
            "clicks",
            "clicks,events",
            3,
            true,
            vec!["device==mobile".into()],
        ),
        (
            "attributes.placement",
            "events",
            "events,revenue",
            10,
            false,
            vec![],
        ),
        ("ad_id", "ctr", "ctr,impressions,clicks", 4, true, vec![]),
        ("event_type", "events", "events,spend", 10, true, vec![]),
        (
            "attributes.utm:source",
            "spend",
            "spend,roas,unique_users_exact",
            2,
            true,
            vec![],
        ),
    ];
    for (dim, order_by, metrics, limit, other, filters) in &breakdowns {
        let mut params = window.to_vec();
        params.extend([
            ("group_by", dim.to_string()),
            ("order_by", order_by.to_string()),
            ("metrics", metrics.to_string()),
            ("limit", limit.to_string()),
            ("other", other.to_string()),
        ]);
        params.extend(filters.iter().map(|f| ("filter", f.clone())));
        let (status, body) = get_query(&app, "/v1/stats/breakdown", &params).await;
        assert_eq!(status, 200, "{dim}: {body}");
        let keep = |e: &&Ev| filters.is_empty() || e.device == Some("mobile");
        let ranked = rank_groups(of(0).filter(keep), dim, order_by);
        let rows = body["rows"].as_array().unwrap();
        let metrics: Vec<&str> = metrics.split(',').collect();
        assert_eq!(rows.len(), ranked.len().min(*limit), "{dim}");
        for (row, (value, exp)) in rows.iter().zip(&ranked) {
            assert_eq!(row["value"], json!(value), "{dim}: ranking");
            check_metrics(&format!("{dim}={value}"), &row["metrics"], exp, &metrics);
        }
        if *other {
            let top: HashSet<&String> = ranked.iter().take(*limit).map(|(k, _)| k).collect();
            let rest = Exp::of(of(0).filter(keep).filter(|e| !top.contains(&e.dim(dim))));
            check_metrics(&format!("{dim} other"), &body["other"], &rest, &metrics);
        } else {
            assert!(body.get("other").is_none(), "{body}");
        }
    }

    // The whole model: two dimensions, day buckets in Berlin, top 3 with other, a filter.
    let request = json!({
        "from": rfc3339(from), "to": rfc3339(to),
        "metrics": ["events", "revenue", "roas", "unique_users_exact"],
        "group_by": ["device", "attributes.placement"],
        "bucket": "day", "time_zone": "Europe/Berlin",
        "filters": [{"dimension": "country", "op": "in", "values": ["US", "GB", "IN"]},
                    {"dimension": "event_type", "op": "neq", "values": ["impression"]}],
        "order_by": "events", "limit": 3, "other": true
    });
    let (status, body) = post_query(&app, &request).await;
    assert_eq!(status, 200, "{body}");
    let metrics = ["events", "revenue", "roas", "unique_users_exact"];
    let keep = |e: &&Ev| matches!(e.country, Some("US" | "GB" | "IN")) && e.kind != "impression";
    let key = |e: &Ev| (e.dim("device"), e.dim("attributes.placement"));
    let mut groups: BTreeMap<(String, String), Vec<&Ev>> = BTreeMap::new();
    for e in of(0).filter(keep) {
        groups.entry(key(e)).or_default().push(e);
    }
    let mut ranked: Vec<_> = groups.iter().collect();
    // Ties by the values in group_by order, as strings.
    ranked.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then_with(|| a.0.cmp(b.0)));
    let day_starts = buckets_between("day", berlin, from, to);
    let check_series = |ctx: &str, group: &Value, evs: &[&Ev]| {
        let points = group["points"].as_array().unwrap();
        assert_eq!(
            points.iter().map(point_ms).collect::<Vec<_>>(),
            day_starts,
            "{ctx}"
        );
        for p in points {
            let start = point_ms(p);
            let in_bucket = evs
                .iter()
                .copied()
                .filter(|e| bucket_of("day", berlin, e.ts_ms) == start);
            check_metrics(
                &format!("{ctx} {}", p["time"]),
                &p["metrics"],
                &Exp::of(in_bucket),
                &metrics,
            );
        }
    };
    let got = body["groups"].as_array().unwrap();
    assert_eq!(got.len(), 3);
    for (g, ((device, placement), evs)) in got.iter().zip(&ranked) {
        assert_eq!(
            g["group"],
            json!({"device": device, "attributes.placement": placement})
        );
        check_metrics(
            "query totals",
            &g["totals"],
            &Exp::of(evs.iter().copied()),
            &metrics,
        );
        check_series(&format!("query {device}/{placement}"), g, evs);
    }
    let top: HashSet<_> = ranked.iter().take(3).map(|(k, _)| (*k).clone()).collect();
    let rest: Vec<&Ev> = of(0)
        .filter(keep)
        .filter(|e| !top.contains(&key(e)))
        .collect();
    assert_eq!(body["other"]["group"], json!({}));
    check_series("query other", &body["other"], &rest);

    // The whole model without groups or buckets is the summary.
    let (status, body) = post_query(
        &t2,
        &json!({"from": rfc3339(from), "to": rfc3339(to), "metrics": ALL_METRICS}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    check_metrics(
        "query t2",
        &body["groups"][0]["totals"],
        &Exp::of(of(1)),
        &ALL_METRICS,
    );

    // Other tenants' events never leak into a tenant's figures.
    let mut params = window.to_vec();
    params.extend([
        ("group_by", "campaign_id".to_string()),
        ("limit", "1000".to_string()),
    ]);
    let (_, body) = get_query(&t3, "/v1/stats/breakdown", &params).await;
    for row in body["rows"].as_array().unwrap() {
        assert!(row["value"].as_str().unwrap().starts_with("t2."), "{row}");
    }
}

// ---------------------------------------------------------------------------------------------
// Duplicates, guards, bad input, injection
// ---------------------------------------------------------------------------------------------

fn now_window() -> [(&'static str, String); 2] {
    let now = Utc::now().timestamp_millis();
    [
        ("from", rfc3339(now - 86_400_000)),
        ("to", rfc3339(now + 3_600_000)),
    ]
}

/// Events of the last hour, as `Ev`s (tenant 0).
fn recent(rng: &mut Rng, n: usize) -> Vec<Ev> {
    let now = Utc::now().timestamp_millis();
    (0..n)
        .map(|_| Ev::generate(rng, 0, now - 3_600_000, 3_500_000))
        .collect()
}

#[tokio::test]
async fn re_sent_events_never_change_a_figure() {
    let app = spawn_app("stats_dups").await;
    let mut rng = Rng::new(7);
    let evs = recent(&mut rng, 2_000);
    let json: Vec<Value> = evs.iter().map(Ev::json).collect();
    load(&app, &json).await;
    // The same events again, twice (one batch re-sent whole, then a shuffled half).
    load(&app, &json).await;
    load(&app, &json[..1000]).await;
    let mut params = now_window().to_vec();
    params.push(("metrics", ALL_METRICS.join(",")));
    let (status, body) = get_query(&app, "/v1/stats/summary", &params).await;
    assert_eq!(status, 200, "{body}");
    check_metrics("dups", &body["metrics"], &Exp::of(&evs), &ALL_METRICS);
    let mut params = now_window().to_vec();
    params.extend([
        ("group_by", "campaign_id".to_string()),
        ("metrics", "events,spend".to_string()),
        ("limit", "3".to_string()),
        ("other", "true".to_string()),
    ]);
    let (_, body) = get_query(&app, "/v1/stats/breakdown", &params).await;
    let listed: u64 = body["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["metrics"]["events"].as_u64().unwrap())
        .sum::<u64>()
        + body["other"]["events"].as_u64().unwrap();
    assert_eq!(listed, 2_000);
}

#[tokio::test]
async fn bad_input_is_a_precise_400() {
    let app = spawn_app("stats_bad").await;
    let [from, to] = now_window();
    let base = |extra: &[(&'static str, &str)]| {
        let mut p = vec![from.clone(), to.clone()];
        p.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        p
    };
    let cases: Vec<BadCase> = vec![
        (
            "/v1/stats/summary",
            vec![to.clone()],
            "missing_parameter",
            "from",
        ),
        (
            "/v1/stats/summary",
            vec![("from", "yesterday".into()), to.clone()],
            "invalid_parameter",
            "from",
        ),
        (
            "/v1/stats/summary",
            base(&[("metrics", "clicks,views")]),
            "invalid_parameter",
            "metrics",
        ),
        (
            "/v1/stats/summary",
            base(&[("metric", "clicks")]),
            "unknown_parameter",
            "metric",
        ),
        (
            "/v1/stats/summary",
            base(&[("to", &from.1)]),
            "invalid_parameter",
            "to",
        ),
        (
            "/v1/stats/breakdown",
            base(&[("group_by", "os"), ("limit", "5"), ("group_by", "country")]),
            "invalid_parameter",
            "group_by",
        ),
        (
            "/v1/events",
            vec![("limit", "1".into()), ("limit", "2".into())],
            "invalid_parameter",
            "limit",
        ),
        (
            "/v1/stats/summary",
            base(&[("filter", "country=US")]),
            "invalid_filter",
            "filter",
        ),
        // Values no event can have would silently count nothing.
        (
            "/v1/stats/summary",
            base(&[("filter", "country==us")]),
            "invalid_filter",
            "filter",
        ),
        (
            "/v1/stats/summary",
            base(&[("filter", "device!=phone")]),
            "invalid_filter",
            "filter",
        ),
        (
            "/v1/stats/summary",
            base(&[("filter", "region==EU")]),
            "invalid_dimension",
            "filter",
        ),
        (
            "/v1/stats/summary",
            base(&[("filter", "event_type==view")]),
            "invalid_filter",
            "filter",
        ),
        (
            "/v1/stats/summary",
            vec![
                ("from", "2025-01-01T00:00:00Z".into()),
                ("to", "2025-06-01T00:00:00Z".into()),
            ],
            "time_range_too_large",
            "to",
        ),
        (
            "/v1/stats/summary",
            vec![("from", to.1.clone()), ("to", from.1.clone())],
            "invalid_time_range",
            "to",
        ),
        (
            "/v1/stats/timeseries",
            base(&[]),
            "missing_parameter",
            "bucket",
        ),
        (
            "/v1/stats/timeseries",
            base(&[("bucket", "decade")]),
            "invalid_parameter",
            "bucket",
        ),
        (
            "/v1/stats/timeseries",
            base(&[("bucket", "day"), ("time_zone", "Mars/Phobos")]),
            "invalid_time_zone",
            "time_zone",
        ),
        (
            "/v1/stats/timeseries",
            vec![
                ("from", "2025-01-01T00:00:00Z".into()),
                ("to", "2025-03-31T00:00:00Z".into()),
                ("bucket", "minute".into()),
            ],
            "too_many_points",
            "bucket",
        ),
        (
            "/v1/stats/breakdown",
            base(&[]),
            "missing_parameter",
            "group_by",
        ),
        (
            "/v1/stats/breakdown",
            base(&[("group_by", "tenant")]),
            "invalid_dimension",
            "group_by",
        ),
        (
            "/v1/stats/breakdown",
            base(&[("group_by", "os"), ("limit", "0")]),
            "invalid_limit",
            "limit",
        ),
        (
            "/v1/stats/breakdown",
            base(&[("group_by", "os"), ("limit", "100000")]),
            "invalid_limit",
            "limit",
        ),
        (
            "/v1/stats/breakdown",
            base(&[("group_by", "os"), ("limit", "ten")]),
            "invalid_parameter",
            "limit",
        ),
        (
            "/v1/stats/breakdown",
            base(&[("group_by", "os"), ("order_by", "best")]),
            "invalid_parameter",
            "order_by",
        ),
        (
            "/v1/stats/breakdown",
            base(&[("group_by", "os"), ("other", "maybe")]),
            "invalid_parameter",
            "other",
        ),
    ];
    for (path, params, error, field) in cases {
        let (status, body) = get_query(&app, path, &params).await;
        assert_eq!(status, 400, "{path} {params:?}: {body}");
        assert_eq!(body["error"], json!(error), "{path} {params:?}: {body}");
        assert_eq!(body["field"], json!(field), "{path} {params:?}: {body}");
        let message = body["message"].as_str().unwrap();
        // Worded for a person, not in the framework's type names.
        assert!(
            !message.is_empty() && !message.contains("failed to parse"),
            "{path} {params:?}: {body}"
        );
    }
    let (_, body) = get_query(&app, "/v1/stats/timeseries", &base(&[("bucket", "decade")])).await;
    assert_eq!(
        body["message"],
        "`bucket` must be one of minute, hour, day, week, month"
    );
    let (_, body) = get_query(
        &app,
        "/v1/stats/summary",
        &[("from", "yesterday".into()), to.clone()],
    )
    .await;
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("`from` must be an RFC 3339 date-time with a zone"),
        "{body}"
    );

    let ok = json!({"from": from.1, "to": to.1, "metrics": ["events"]});
    let with = |k: &str, v: Value| {
        let mut b = ok.clone();
        b[k] = v;
        b
    };
    let bodies = [
        (
            with("metrics", json!(["events", "views"])),
            "invalid_body",
            "metrics[1]",
        ),
        (
            with(
                "filters",
                json!([{"dimension": "country", "op": "like", "values": ["US"]}]),
            ),
            "invalid_body",
            "filters[0].op",
        ),
        (
            with(
                "filters",
                json!([{"dimension": "country", "op": "eq", "values": ["US", "DE"]}]),
            ),
            "invalid_filter",
            "filters[0].values",
        ),
        (
            with(
                "filters",
                json!([{"dimension": "x", "op": "eq", "values": ["US"]}]),
            ),
            "invalid_dimension",
            "filters[0].dimension",
        ),
        (
            with("group_by", json!(["os", "os"])),
            "invalid_dimension",
            "group_by",
        ),
        (
            with("group_by", json!(["os", "country", "device", "browser"])),
            "too_many_dimensions",
            "group_by",
        ),
        (with("other", json!(true)), "invalid_other", "other"),
        (with("limit", json!(5)), "invalid_limit", "limit"),
        (
            with("time_zone", json!("Europe/Nowhere")),
            "invalid_time_zone",
            "time_zone",
        ),
        (with("sql", json!("SELECT 1")), "invalid_body", "sql"),
        (with("from", json!("2025-13-01")), "invalid_body", "from"),
    ];
    for (body, error, field) in bodies {
        let (status, got) = post_query(&app, &body).await;
        assert_eq!(status, 400, "{body}: {got}");
        assert_eq!(
            (got["error"].as_str(), got["field"].as_str()),
            (Some(error), Some(field)),
            "{body}: {got}"
        );
    }
    let (_, got) = post_query(&app, &with("from", json!("2026-12-01"))).await;
    assert!(
        got["message"]
            .as_str()
            .unwrap()
            .starts_with("must be an RFC 3339 date-time with a zone"),
        "{got}"
    );
    // Broken JSON concerns the body as a whole (no field); a body not sent as JSON is a 415.
    let r = app
        .post_to("/v1/query", "{", &[("content-type", JSON)])
        .await;
    assert_eq!(
        (r.status, r.json["error"].as_str(), r.json.get("field")),
        (400, Some("invalid_body"), None),
        "{}",
        r.text
    );
    let r = app
        .post_to(
            "/v1/query",
            ok.to_string(),
            &[("content-type", "text/plain")],
        )
        .await;
    assert_eq!(
        (r.status, r.json["error"].as_str(), r.json.get("field")),
        (415, Some("unsupported_media_type"), None),
        "{}",
        r.text
    );
    // Compressed: only the ingest endpoint takes that.
    let r = app
        .post_to(
            "/v1/query",
            gzip(ok.to_string().as_bytes()),
            &[("content-type", JSON), ("content-encoding", "gzip")],
        )
        .await;
    assert_eq!(
        (r.status, r.json["error"].as_str()),
        (415, Some("unsupported_media_type")),
        "{}",
        r.text
    );
    assert!(
        r.json["message"].as_str().unwrap().contains("gzip"),
        "{}",
        r.text
    );
    // Over 64 KB (here a long filter value): 413, as an oversized ingest body.
    let mut large = ok.clone();
    large["filters"] =
        json!([{"dimension": "campaign_id", "op": "in", "values": ["c".repeat(70_000)]}]);
    let (status, got) = post_query(&app, &large).await;
    assert_eq!(
        (status, got["error"].as_str(), got["limit"].as_u64()),
        (413, Some("payload_too_large"), Some(65_536)),
        "{got}"
    );
    let mut no_from = ok.clone();
    no_from.as_object_mut().unwrap().remove("from");
    let (status, got) = post_query(&app, &no_from).await;
    assert_eq!(
        (status, got["error"].as_str(), got["field"].as_str()),
        (400, Some("invalid_body"), Some("from")),
        "{got}"
    );
}

#[tokio::test]
async fn guards_stop_expensive_queries_with_a_4xx() {
    let app = spawn_app("stats_guards").await;
    let mut rng = Rng::new(11);
    let evs = recent(&mut rng, 5_000);
    load(&app, &evs.iter().map(Ev::json).collect::<Vec<_>>()).await;
    let tight = |name: &'static str, vars: &'static [(&'static str, &'static str)]| {
        let db = app.database.clone();
        async move {
            let mut env = vec![("ADTRACK_CLICKHOUSE_DATABASE", db.as_str())];
            env.extend_from_slice(vars);
            spawn_app_with(name, &env).await
        }
    };
    let mut params = now_window().to_vec();
    params.push(("metrics", "unique_users_exact,events".to_string()));

    let slow = tight(
        "stats_guard_time",
        &[("ADTRACK_ANALYTICS_MAX_EXECUTION_MS", "1")],
    )
    .await;
    let (status, body) = get_query(&slow, "/v1/stats/summary", &params).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (422, Some("query_timeout")),
        "{body}"
    );
    assert_eq!(body["limit"], json!(1));

    let small = tight(
        "stats_guard_mem",
        &[("ADTRACK_ANALYTICS_MAX_MEMORY_BYTES", "1000")],
    )
    .await;
    let (status, body) = get_query(&small, "/v1/stats/summary", &params).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (422, Some("query_memory_limit")),
        "{body}"
    );

    let few = tight(
        "stats_guard_groups",
        &[("ADTRACK_ANALYTICS_MAX_GROUPS", "5")],
    )
    .await;
    let [from, to] = now_window();
    let (status, body) = post_query(
        &few,
        &json!({"from": from.1, "to": to.1, "metrics": ["events"], "group_by": ["ad_id"]}),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (422, Some("too_many_groups")),
        "{body}"
    );
    let (status, body) = post_query(
        &few,
        &json!({"from": from.1, "to": to.1, "metrics": ["events"], "group_by": ["ad_id"], "limit": 5}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["groups"].as_array().unwrap().len(), 5);
}

#[tokio::test]
async fn injection_through_any_parameter_is_inert() {
    let app = spawn_app("stats_inject").await;
    let mut rng = Rng::new(13);
    let evs = recent(&mut rng, 300);
    load(&app, &evs.iter().map(Ev::json).collect::<Vec<_>>()).await;
    let total = app.count_final().await;
    const EVIL: [&str; 6] = [
        "x' OR 1=1 --",
        "'); DROP TABLE events; --",
        r"\'; SELECT 1; --",
        "{p0:String}",
        "` OR `1`=`1",
        "US' UNION SELECT * FROM system.tables --",
    ];
    let [from, to] = now_window();
    for evil in EVIL {
        let param_cases: Vec<(&str, Vec<(&str, String)>)> = vec![
            (
                "/v1/stats/summary",
                vec![
                    from.clone(),
                    to.clone(),
                    ("filter", format!("country=={evil}")),
                ],
            ),
            (
                "/v1/stats/summary",
                vec![
                    from.clone(),
                    to.clone(),
                    ("filter", format!("attributes.{evil}=={evil}")),
                ],
            ),
            (
                "/v1/stats/summary",
                vec![from.clone(), to.clone(), ("filter", format!("{evil}==x"))],
            ),
            (
                "/v1/stats/summary",
                vec![from.clone(), to.clone(), ("metrics", evil.to_string())],
            ),
            (
                "/v1/stats/summary",
                vec![("from", evil.to_string()), to.clone()],
            ),
            (
                "/v1/stats/summary",
                vec![from.clone(), ("to", evil.to_string())],
            ),
            (
                "/v1/stats/summary",
                vec![from.clone(), to.clone(), (evil, "1".into())],
            ),
            (
                "/v1/stats/timeseries",
                vec![from.clone(), to.clone(), ("bucket", evil.to_string())],
            ),
            (
                "/v1/stats/timeseries",
                vec![
                    from.clone(),
                    to.clone(),
                    ("bucket", "hour".into()),
                    ("time_zone", evil.to_string()),
                ],
            ),
            (
                "/v1/stats/breakdown",
                vec![from.clone(), to.clone(), ("group_by", evil.to_string())],
            ),
            (
                "/v1/stats/breakdown",
                vec![
                    from.clone(),
                    to.clone(),
                    ("group_by", format!("attributes.{evil}")),
                ],
            ),
            (
                "/v1/stats/breakdown",
                vec![
                    from.clone(),
                    to.clone(),
                    ("group_by", "os".into()),
                    ("order_by", evil.to_string()),
                ],
            ),
            (
                "/v1/stats/breakdown",
                vec![
                    from.clone(),
                    to.clone(),
                    ("group_by", "os".into()),
                    ("limit", evil.to_string()),
                ],
            ),
            (
                "/v1/stats/breakdown",
                vec![
                    from.clone(),
                    to.clone(),
                    ("group_by", "os".into()),
                    ("other", evil.to_string()),
                ],
            ),
            (
                "/v1/events",
                vec![("filter", format!("campaign_id!={evil}"))],
            ),
            ("/v1/events", vec![("cursor", evil.to_string())]),
            ("/v1/events", vec![("limit", evil.to_string())]),
            ("/v1/events", vec![("from", evil.to_string())]),
            ("/v1/events/export", vec![("cursor", evil.to_string())]),
            (
                "/v1/events/export",
                vec![("filter", format!("attributes.{evil}!={evil}"))],
            ),
            ("/v1/events/export", vec![("to", evil.to_string())]),
            ("/v1/events/export", vec![("limit", evil.to_string())]),
        ];
        for (path, params) in param_cases {
            let (status, body) = get_query(&app, path, &params).await;
            assert!(
                status == 200 || status == 400,
                "{path} {params:?}: {status} {body}"
            );
            if status == 200 && path == "/v1/stats/summary" {
                // A value that matches nothing: never everything.
                assert_eq!(body["metrics"]["events"], json!(0), "{params:?}: {body}");
            }
        }
        let (status, _) = get_query(&app, &format!("/v1/events/{}", urlencode(evil)), &[]).await;
        assert_eq!(status, 400);
        let bodies = [
            json!({"from": from.1, "to": to.1, "metrics": ["events"], "group_by": [format!("attributes.{evil}")]}),
            json!({"from": from.1, "to": to.1, "metrics": ["events"], "group_by": [evil]}),
            json!({"from": from.1, "to": to.1, "metrics": [evil]}),
            json!({"from": from.1, "to": to.1, "metrics": ["events"], "time_zone": evil}),
            json!({"from": from.1, "to": to.1, "metrics": ["events"], "bucket": evil}),
            json!({"from": from.1, "to": to.1, "metrics": ["events"], "order_by": evil}),
            json!({"from": from.1, "to": to.1, "metrics": ["events"],
                   "filters": [{"dimension": "device", "op": "not_in", "values": [evil, "x"]}]}),
            json!({"from": from.1, "to": to.1, "metrics": ["events"],
                   "filters": [{"dimension": evil, "op": "eq", "values": ["x"]}]}),
            json!({"from": evil, "to": to.1, "metrics": ["events"]}),
        ];
        for body in bodies {
            let (status, got) = post_query(&app, &body).await;
            assert!(status == 200 || status == 400, "{body}: {status} {got}");
        }
    }
    // Values holding quotes and backslashes match exactly what was stored.
    let (status, body) = get_query(
        &app,
        "/v1/stats/summary",
        &[
            from.clone(),
            to.clone(),
            (
                "filter",
                format!(
                    r"attributes.note's\=key=={}",
                    NOTE_VALUE.replace('\\', r"\\").replace('|', r"\|")
                ),
            ),
        ],
    )
    .await;
    assert_eq!(status, 200);
    let expected = evs
        .iter()
        .filter(|e| e.attrs.contains_key(NOTE_KEY))
        .count();
    assert_eq!(body["metrics"]["events"], json!(expected));
    // Nothing was dropped or changed.
    assert_eq!(app.count_final().await, total);
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Where `value` breaks `schema` (of `doc`) as OpenAPI 3.0 reads it: types, `nullable`,
/// `required`, `properties`, `items`, `anyOf`, `allOf`, `$ref`.
fn mismatch(doc: &Value, schema: &Value, value: &Value, at: &str) -> Option<String> {
    if let Some(name) = schema["$ref"].as_str().and_then(|r| r.rsplit('/').next()) {
        return mismatch(doc, &doc["components"]["schemas"][name], value, at);
    }
    if value.is_null() {
        return (schema["nullable"] != true).then(|| format!("{at}: null, not allowed"));
    }
    for part in schema["allOf"].as_array().into_iter().flatten() {
        if let Some(found) = mismatch(doc, part, value, at) {
            return Some(found);
        }
    }
    if let Some(any) = schema["anyOf"].as_array() {
        if any.iter().all(|s| mismatch(doc, s, value, at).is_some()) {
            return Some(format!("{at}: matches none of anyOf"));
        }
    }
    let typed = match schema["type"].as_str() {
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        _ => true,
    };
    if !typed {
        return Some(format!("{at}: {value} is not a {}", schema["type"]));
    }
    if let Some(object) = value.as_object() {
        for name in schema["required"].as_array().into_iter().flatten() {
            if !object.contains_key(name.as_str().unwrap()) {
                return Some(format!("{at}: {name} is missing"));
            }
        }
        for (name, v) in object {
            let property = match schema["properties"].get(name) {
                Some(property) => property,
                None if schema["additionalProperties"].is_object() => {
                    &schema["additionalProperties"]
                }
                None if schema["properties"].is_object() => {
                    return Some(format!("{at}.{name} is not in the document"));
                }
                None => continue,
            };
            if let Some(found) = mismatch(doc, property, v, &format!("{at}.{name}")) {
                return Some(found);
            }
        }
    }
    for (i, v) in value.as_array().into_iter().flatten().enumerate() {
        if let Some(found) = mismatch(doc, &schema["items"], v, &format!("{at}[{i}]")) {
            return Some(found);
        }
    }
    None
}

#[tokio::test]
async fn requests_and_answers_match_the_document() {
    let app = spawn_app("stats_document_shapes").await;
    let doc = app.get("/openapi.json").await.json;
    let json_schema = |op: &Value| {
        let content = op["content"].as_object().unwrap();
        let (_, media) = content
            .iter()
            .find(|(media, _)| media.starts_with("application/json"))
            .unwrap();
        media["schema"].clone()
    };
    let answer =
        |path: &str, method: &str| json_schema(&doc["paths"][path][method]["responses"]["200"]);

    // The ingest body: an event, or an array of them.
    let body = json_schema(&doc["paths"]["/v1/events"]["post"]["requestBody"]);
    for sent in [event(), json!([event(), event()])] {
        assert_eq!(mismatch(&doc, &body, &sent, "body"), None, "{sent}");
    }
    assert!(mismatch(&doc, &body, &json!(42), "body").is_some());

    // Ratios without a denominator are null.
    let [from, to] = now_window();
    let (status, summary) = get_query(
        &app,
        "/v1/stats/summary",
        &[from, to, ("metrics", "clicks,ctr,cvr,roas".into())],
    )
    .await;
    assert_eq!(status, 200, "{summary}");
    assert!(summary["metrics"]["ctr"].is_null(), "{summary}");
    let schema = answer("/v1/stats/summary", "get");
    assert_eq!(mismatch(&doc, &schema, &summary, "summary"), None);

    // A key created without limits lists them as null (the deployment's defaults).
    create_key(&app.base, &app.tenant, &["read"], json!({})).await;
    let r = app.get("/v1/admin/keys").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.text.contains("\"events_per_sec\":null"), "{}", r.text);
    let schema = answer("/v1/admin/keys", "get");
    assert_eq!(mismatch(&doc, &schema, &r.json, "keys"), None);
}

#[tokio::test]
async fn the_openapi_document_types_every_analytics_operation() {
    let app = spawn_app("stats_openapi").await;
    let doc = app.get("/openapi.json").await.json;
    let paths = &doc["paths"];
    for (path, method) in [
        ("/v1/events", "post"),
        ("/v1/events", "get"),
        ("/v1/events/export", "get"),
        ("/v1/events/{event_id}", "get"),
        ("/v1/stats/summary", "get"),
        ("/v1/stats/timeseries", "get"),
        ("/v1/stats/breakdown", "get"),
        ("/v1/query", "post"),
    ] {
        let op = &paths[path][method];
        assert!(op.is_object(), "{method} {path} missing");
        for status in ["200", "400"] {
            assert!(
                op["responses"][status].is_object(),
                "{method} {path} {status}"
            );
        }
    }
    let schemas = &doc["components"]["schemas"];
    for name in [
        "Metrics",
        "Query",
        "QueryFilter",
        "QueryError",
        "StoredEvent",
        "Metric",
        "Bucket",
    ] {
        assert!(schemas[name].is_object(), "schema {name} missing");
    }
    assert_eq!(
        paths["/v1/events/export"]["get"]["responses"]["200"]["content"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        vec!["application/x-ndjson"]
    );
}

#[tokio::test]
async fn no_operation_documents_a_status_it_never_answers() {
    let app = spawn_app("stats_openapi_statuses").await;
    let doc = app.get("/openapi.json").await.json;
    // (operation, statuses it documents, statuses it must not: it never answers them)
    let table = [
        ("/v1/stats/summary", "get", "200 400 422 503", "404 413 415"),
        ("/v1/stats/timeseries", "get", "200 400 422", "404 413 415"),
        ("/v1/stats/breakdown", "get", "200 400 422", "404 413 415"),
        ("/v1/events", "get", "200 400", "404 413 415"),
        ("/v1/events/{event_id}", "get", "200 404", "413 415"),
        ("/v1/query", "post", "200 400 413 415 422", "404"),
        (
            "/v1/admin/tenants",
            "post",
            "201 403 409 413 415",
            "200 404 422",
        ),
        (
            "/v1/admin/tenants",
            "get",
            "200 403",
            "201 404 409 413 415 422",
        ),
        ("/v1/admin/keys", "post", "201 404 413 415", "200 409 422"),
        (
            "/v1/admin/keys",
            "get",
            "200 400 403",
            "201 404 409 413 415 422",
        ),
        (
            "/v1/admin/keys/{key_id}",
            "delete",
            "200 404",
            "201 409 413 415 422",
        ),
        (
            "/v1/admin/usage",
            "get",
            "200 400 422",
            "201 404 409 413 415",
        ),
        (
            "/v1/admin/usage/hourly",
            "get",
            "200 400 422",
            "201 404 409 413 415",
        ),
        (
            "/v1/users/{user_id}/events",
            "delete",
            "200 503",
            "201 404 409 413 415 422",
        ),
    ];
    for (path, method, documented, never) in table {
        let responses = &doc["paths"][path][method]["responses"];
        assert!(responses.is_object(), "{method} {path} missing");
        for status in documented.split(' ') {
            let found = responses[status].is_object();
            assert!(found, "{method} {path} lacks {status}");
        }
        for status in never.split(' ') {
            let found = responses[status].is_object();
            assert!(!found, "{method} {path} documents {status}");
        }
    }
}
