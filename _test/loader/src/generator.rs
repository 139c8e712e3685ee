//! Realistic mock ad traffic, deterministic for a seed.
//!
//! A catalogue made from the seed: advertisers, campaigns (each with a few ads, a billing model,
//! a click-through and a conversion rate), publishers, and a population of users who each keep
//! one country and one device. Popularity is Zipf-like: a few campaigns, ads, publishers and
//! users get most of the traffic.
//!
//! The stream is impressions; an impression leads to a click with the campaign's CTR (1–3 %,
//! nudged by device) a few seconds later, and a click to a conversion (with revenue) with the
//! campaign's conversion rate a minute or so later. Follow-ups wait in a queue until their time
//! comes, so they arrive interleaved with later traffic, as they would from real clients.
//!
//! On top of that, at set rates: duplicates (an event already sent, re-sent unchanged: same
//! `event_id`, as a client retrying after a lost answer does) and late events (an impression,
//! and its follow-ups, that happened minutes to hours ago: an SDK flushing an offline queue).
//!
//! Given the same seed and the same sequence of `now` values, the same events come out.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, VecDeque},
};

use chrono::{DateTime, Duration, Utc};
use rand::{distr::weighted::WeightedIndex, prelude::Distribution, Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};
use uuid::Uuid;

/// Countries by share of traffic (ISO 3166-1 alpha-2).
pub const COUNTRIES: &[(&str, f64)] = &[
    ("US", 28.0),
    ("IN", 8.0),
    ("GB", 6.0),
    ("DE", 5.5),
    ("BR", 5.0),
    ("FR", 4.0),
    ("JP", 4.0),
    ("CA", 3.5),
    ("ID", 3.0),
    ("MX", 3.0),
    ("ES", 2.5),
    ("IT", 2.5),
    ("AU", 2.0),
    ("KR", 2.0),
    ("NL", 1.5),
    ("PL", 1.5),
    ("TR", 1.5),
    ("PH", 1.5),
    ("VN", 1.5),
    ("TH", 1.0),
    ("SE", 1.0),
    ("AR", 1.0),
    ("ZA", 1.0),
    ("EG", 1.0),
    ("NG", 1.0),
    ("SA", 1.0),
    ("AE", 0.8),
    ("CH", 0.7),
    ("IE", 0.5),
    ("NZ", 0.5),
];

/// Device kinds by share of traffic, with a CTR multiplier (phones are tapped more, TVs less).
const DEVICES: &[(&str, f64, f64)] = &[
    ("mobile", 58.0, 1.1),
    ("desktop", 32.0, 0.9),
    ("tablet", 6.0, 1.0),
    ("ctv", 3.0, 0.4),
    ("other", 1.0, 0.8),
];

/// Names with weights.
type Weighted = &'static [(&'static str, f64)];

/// Operating systems and browsers per device kind (empty browser: none reported).
const PLATFORMS: &[(&str, Weighted, Weighted)] = &[
    (
        "mobile",
        &[("Android", 70.0), ("iOS", 30.0)],
        &[
            ("Chrome", 60.0),
            ("Safari", 28.0),
            ("Samsung Internet", 8.0),
            ("Firefox", 2.0),
            ("", 2.0),
        ],
    ),
    (
        "desktop",
        &[
            ("Windows", 70.0),
            ("macOS", 20.0),
            ("Linux", 5.0),
            ("ChromeOS", 5.0),
        ],
        &[
            ("Chrome", 64.0),
            ("Edge", 13.0),
            ("Safari", 10.0),
            ("Firefox", 8.0),
            ("Opera", 5.0),
        ],
    ),
    (
        "tablet",
        &[("iPadOS", 55.0), ("Android", 45.0)],
        &[("Safari", 55.0), ("Chrome", 45.0)],
    ),
    (
        "ctv",
        &[
            ("Roku OS", 35.0),
            ("tvOS", 20.0),
            ("Android TV", 25.0),
            ("Tizen", 20.0),
        ],
        &[("", 1.0)],
    ),
    ("other", &[("Linux", 50.0), ("KaiOS", 50.0)], &[("", 1.0)]),
];

const PLACEMENTS: &[(&str, f64)] = &[
    ("banner_300x250", 35.0),
    ("banner_728x90", 15.0),
    ("native_feed", 25.0),
    ("interstitial", 10.0),
    ("video_preroll", 10.0),
    ("rewarded_video", 5.0),
];

/// What the generator makes; every field has a sensible default.
#[derive(Debug, Clone)]
pub struct GenConfig {
    pub seed: u64,
    /// Share of emitted events that are re-sent copies of earlier ones (0..=1).
    pub duplicate_rate: f64,
    /// Share of new impressions that happened minutes to hours ago (0..=1).
    pub late_rate: f64,
    pub advertisers: usize,
    pub campaigns: usize,
    pub publishers: usize,
    pub users: u64,
}

impl Default for GenConfig {
    fn default() -> Self {
        Self {
            seed: 42,
            duplicate_rate: 0.01,
            late_rate: 0.02,
            advertisers: 40,
            campaigns: 200,
            publishers: 500,
            users: 1_000_000,
        }
    }
}

/// The service's own event types: the loader sends exactly what adtrack accepts.
pub use adtrack::domain::EventType;

/// What was emitted: a new event, or a copy of one emitted before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    New,
    /// A new event whose time is minutes to hours before `now`.
    Late,
    Duplicate,
}

/// One event as it goes on the wire (`sent_at` is added when it is sent).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub event_id: Uuid,
    pub event_type: EventType,
    pub timestamp: DateTime<Utc>,
    pub campaign_id: String,
    pub ad_id: String,
    pub publisher_id: String,
    pub advertiser_id: String,
    pub user_id: String,
    pub country: &'static str,
    pub device: &'static str,
    pub os: &'static str,
    pub browser: &'static str,
    pub cost_micros: u64,
    pub revenue_micros: u64,
    pub placement: &'static str,
    pub order_id: Option<String>,
}

impl Event {
    /// The wire form; `sent_at` is the client's clock when the request goes out.
    pub fn to_json(&self, sent_at: Option<DateTime<Utc>>) -> Value {
        let mut m = Map::new();
        m.insert("event_id".into(), json!(self.event_id.to_string()));
        m.insert("event_type".into(), json!(self.event_type.as_str()));
        m.insert("timestamp".into(), json!(rfc3339(self.timestamp)));
        if let Some(sent_at) = sent_at {
            m.insert("sent_at".into(), json!(rfc3339(sent_at)));
        }
        m.insert("campaign_id".into(), json!(self.campaign_id));
        m.insert("ad_id".into(), json!(self.ad_id));
        m.insert("publisher_id".into(), json!(self.publisher_id));
        m.insert("advertiser_id".into(), json!(self.advertiser_id));
        m.insert("user_id".into(), json!(self.user_id));
        m.insert("country".into(), json!(self.country));
        m.insert("device".into(), json!(self.device));
        m.insert("os".into(), json!(self.os));
        if !self.browser.is_empty() {
            m.insert("browser".into(), json!(self.browser));
        }
        if self.cost_micros > 0 {
            m.insert("cost_micros".into(), json!(self.cost_micros));
        }
        if self.revenue_micros > 0 {
            m.insert("revenue_micros".into(), json!(self.revenue_micros));
        }
        let mut attributes = Map::new();
        attributes.insert("placement".into(), json!(self.placement));
        if let Some(order) = &self.order_id {
            attributes.insert("order_id".into(), json!(order));
        }
        m.insert("attributes".into(), Value::Object(attributes));
        Value::Object(m)
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Billing {
    /// Cost on every impression (price per thousand).
    Cpm,
    /// Cost on every click.
    Cpc,
}

#[derive(Debug, Clone)]
struct Campaign {
    id: String,
    advertiser_id: String,
    ads: Vec<String>,
    ad_pick: WeightedIndex<f64>,
    billing: Billing,
    /// Price per thousand impressions (CPM) or per click (CPC), in micros.
    price_micros: u64,
    ctr: f64,
    /// Conversions per click.
    cvr: f64,
    /// Mean order value, in micros.
    order_value_micros: f64,
}

/// Everything that stays fixed for a seed.
#[derive(Debug, Clone)]
struct Catalog {
    campaigns: Vec<Campaign>,
    campaign_pick: WeightedIndex<f64>,
    publishers: Vec<String>,
    publisher_pick: WeightedIndex<f64>,
    country_pick: WeightedIndex<f64>,
    device_pick: WeightedIndex<f64>,
    os_picks: Vec<WeightedIndex<f64>>,
    browser_picks: Vec<WeightedIndex<f64>>,
    placement_pick: WeightedIndex<f64>,
    users: u64,
    seed: u64,
}

/// Zipf weights 1/k^s for ranks 1..=n.
fn zipf(n: usize, s: f64) -> WeightedIndex<f64> {
    WeightedIndex::new((1..=n).map(|k| 1.0 / (k as f64).powf(s))).expect("n > 0")
}

fn weights<T>(items: &[(T, f64)]) -> WeightedIndex<f64> {
    WeightedIndex::new(items.iter().map(|(_, w)| *w)).expect("positive weights")
}

impl Catalog {
    fn new(cfg: &GenConfig, rng: &mut ChaCha8Rng) -> Catalog {
        let advertiser_pick = zipf(cfg.advertisers.max(1), 0.9);
        let campaigns: Vec<Campaign> = (0..cfg.campaigns.max(1))
            .map(|c| {
                let n_ads = rng.random_range(1..=8);
                let billing = if rng.random_bool(0.3) {
                    Billing::Cpc
                } else {
                    Billing::Cpm
                };
                let price_micros = match billing {
                    // $0.50–$12 per thousand impressions, skewed low.
                    Billing::Cpm => 500_000 + (11_500_000.0 * rng.random::<f64>().powi(2)) as u64,
                    // $0.10–$2.50 per click.
                    Billing::Cpc => 100_000 + (2_400_000.0 * rng.random::<f64>().powi(2)) as u64,
                };
                Campaign {
                    id: format!("cmp-{c:04}"),
                    advertiser_id: format!("adv-{:03}", advertiser_pick.sample(rng)),
                    ads: (0..n_ads).map(|a| format!("cmp-{c:04}-ad-{a}")).collect(),
                    ad_pick: zipf(n_ads, 0.8),
                    billing,
                    price_micros,
                    ctr: rng.random_range(0.012..0.026),
                    cvr: rng.random_range(0.02..0.12),
                    order_value_micros: rng.random_range(5.0..150.0) * 1e6,
                }
            })
            .collect();
        let publishers = (0..cfg.publishers.max(1))
            .map(|p| match p % 3 {
                0 => format!("news{p:03}.example.com"),
                1 => format!("com.example.app{p:03}"),
                _ => format!("pub-{p:04}"),
            })
            .collect();
        let os_picks = PLATFORMS.iter().map(|(_, os, _)| weights(os)).collect();
        let browser_picks = PLATFORMS.iter().map(|(_, _, b)| weights(b)).collect();
        Catalog {
            campaign_pick: zipf(campaigns.len(), 1.1),
            campaigns,
            publisher_pick: zipf(cfg.publishers.max(1), 1.0),
            publishers,
            country_pick: weights(COUNTRIES),
            device_pick: WeightedIndex::new(DEVICES.iter().map(|d| d.1)).expect("weights"),
            os_picks,
            browser_picks,
            placement_pick: weights(PLACEMENTS),
            users: cfg.users.max(1),
            seed: cfg.seed,
        }
    }

    /// A user and what stays fixed for them: country, device, OS and browser.
    fn user(&self, rng: &mut ChaCha8Rng) -> User {
        // Heavy users: index = N·u³ puts most of the traffic on the low indices.
        let index = ((self.users as f64) * rng.random::<f64>().powi(3)) as u64;
        // The user's own attributes come from a generator seeded by the user, not the stream.
        let mut own =
            ChaCha8Rng::seed_from_u64(self.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let device = self.device_pick.sample(&mut own);
        User {
            id: format!("u-{index:07}"),
            country: COUNTRIES[self.country_pick.sample(&mut own)].0,
            device,
            os: PLATFORMS[device].1[self.os_picks[device].sample(&mut own)].0,
            browser: PLATFORMS[device].2[self.browser_picks[device].sample(&mut own)].0,
        }
    }
}

struct User {
    id: String,
    country: &'static str,
    device: usize,
    os: &'static str,
    browser: &'static str,
}

/// A click or conversion waiting for its time.
#[derive(Debug, Clone)]
struct Pending {
    due: DateTime<Utc>,
    seq: u64,
    event: Event,
    /// Index of the campaign, for the next step of the funnel.
    campaign: usize,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

/// How many of each were emitted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GenCounts {
    pub impressions: u64,
    pub clicks: u64,
    pub conversions: u64,
    /// New events whose time is in the past (counted in the three above too).
    pub late: u64,
    /// Re-sent copies (not counted above).
    pub duplicates: u64,
}

impl GenCounts {
    /// Distinct events emitted.
    pub fn unique(&self) -> u64 {
        self.impressions + self.clicks + self.conversions
    }

    pub fn total(&self) -> u64 {
        self.unique() + self.duplicates
    }
}

/// Recent events kept for re-sending as duplicates.
const RECENT: usize = 4096;

pub struct Generator {
    cfg: GenConfig,
    rng: ChaCha8Rng,
    catalog: Catalog,
    pending: BinaryHeap<Reverse<Pending>>,
    recent: VecDeque<Event>,
    seq: u64,
    pub counts: GenCounts,
}

impl Generator {
    pub fn new(cfg: GenConfig) -> Generator {
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let catalog = Catalog::new(&cfg, &mut rng);
        Generator {
            cfg,
            rng,
            catalog,
            pending: BinaryHeap::new(),
            recent: VecDeque::with_capacity(RECENT),
            seq: 0,
            counts: GenCounts::default(),
        }
    }

    /// The next event to send at `now`.
    pub fn next_event(&mut self, now: DateTime<Utc>) -> (Event, Kind) {
        if !self.recent.is_empty()
            && self
                .rng
                .random_bool(self.cfg.duplicate_rate.clamp(0.0, 1.0))
        {
            // Mostly very recent events (a retry after a timeout), sometimes older ones.
            let back = ((self.recent.len() as f64) * self.rng.random::<f64>().powi(4)) as usize;
            let event = self.recent[self.recent.len() - 1 - back].clone();
            self.counts.duplicates += 1;
            return (event, Kind::Duplicate);
        }
        let due = matches!(self.pending.peek(), Some(Reverse(p)) if p.due <= now);
        let (event, kind) = if due {
            let Reverse(p) = self.pending.pop().expect("peeked");
            let late = now - p.event.timestamp > Duration::minutes(1);
            if p.event.event_type == EventType::Click {
                self.maybe_convert(&p.event, p.campaign);
            }
            (p.event, if late { Kind::Late } else { Kind::New })
        } else if self.rng.random_bool(self.cfg.late_rate.clamp(0.0, 1.0)) {
            // Between 2 minutes and 6 hours ago.
            let ago = self.rng.random_range(120_000..6 * 3_600_000);
            (
                self.impression(now - Duration::milliseconds(ago)),
                Kind::Late,
            )
        } else {
            (self.impression(now), Kind::New)
        };
        match event.event_type {
            EventType::Impression => self.counts.impressions += 1,
            EventType::Click => self.counts.clicks += 1,
            EventType::Conversion => self.counts.conversions += 1,
        }
        if kind == Kind::Late {
            self.counts.late += 1;
        }
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(event.clone());
        (event, kind)
    }

    /// `n` events at `now`.
    pub fn batch(&mut self, n: usize, now: DateTime<Utc>) -> Vec<(Event, Kind)> {
        (0..n).map(|_| self.next_event(now)).collect()
    }

    /// Clicks and conversions still waiting for their time.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    fn id(&mut self) -> Uuid {
        uuid::Builder::from_random_bytes(self.rng.random()).into_uuid()
    }

    /// A mean-`mean_ms` exponential delay, capped.
    fn delay(&mut self, mean_ms: f64, cap_ms: f64) -> Duration {
        let u: f64 = self.rng.random();
        Duration::milliseconds((-mean_ms * (1.0 - u).ln()).min(cap_ms) as i64 + 200)
    }

    fn schedule(&mut self, event: Event, campaign: usize) {
        // Sent once its time has come: at once for a follow-up of a late event.
        let due = event.timestamp;
        self.seq += 1;
        self.pending.push(Reverse(Pending {
            due,
            seq: self.seq,
            event,
            campaign,
        }));
    }

    /// A new impression at `at` (now, or in the past for a late one); schedules its click.
    fn impression(&mut self, at: DateTime<Utc>) -> Event {
        let c = self.catalog.campaign_pick.sample(&mut self.rng);
        let ad = self.catalog.campaigns[c].ad_pick.sample(&mut self.rng);
        let publisher = self.catalog.publisher_pick.sample(&mut self.rng);
        let user = self.catalog.user(&mut self.rng);
        let placement = PLACEMENTS[self.catalog.placement_pick.sample(&mut self.rng)].0;
        let campaign = &self.catalog.campaigns[c];
        let (billing, price, ctr) = (campaign.billing, campaign.price_micros, campaign.ctr);
        let jitter = self.rng.random_range(0.8..1.2);
        let cost_micros = match billing {
            Billing::Cpm => ((price as f64 / 1000.0) * jitter) as u64,
            Billing::Cpc => 0,
        };
        let event_id = self.id();
        let campaign = &self.catalog.campaigns[c];
        let event = Event {
            event_id,
            event_type: EventType::Impression,
            timestamp: at,
            campaign_id: campaign.id.clone(),
            ad_id: campaign.ads[ad].clone(),
            publisher_id: self.catalog.publishers[publisher].clone(),
            advertiser_id: campaign.advertiser_id.clone(),
            user_id: user.id,
            country: user.country,
            device: DEVICES[user.device].0,
            os: user.os,
            browser: user.browser,
            cost_micros,
            revenue_micros: 0,
            placement,
            order_id: None,
        };
        if self
            .rng
            .random_bool((ctr * DEVICES[user.device].2).min(1.0))
        {
            let mut click = event.clone();
            click.event_id = self.id();
            click.event_type = EventType::Click;
            click.timestamp = at + self.delay(8_000.0, 120_000.0);
            click.cost_micros = match billing {
                Billing::Cpm => 0,
                Billing::Cpc => (price as f64 * self.rng.random_range(0.8..1.0)) as u64,
            };
            self.schedule(click, c);
        }
        event
    }

    fn maybe_convert(&mut self, click: &Event, campaign: usize) {
        let (cvr, order_value) = {
            let c = &self.catalog.campaigns[campaign];
            (c.cvr, c.order_value_micros)
        };
        if !self.rng.random_bool(cvr) {
            return;
        }
        let mut conversion = click.clone();
        conversion.event_id = self.id();
        conversion.event_type = EventType::Conversion;
        conversion.timestamp = click.timestamp + self.delay(60_000.0, 600_000.0);
        conversion.cost_micros = 0;
        // Order values vary around the campaign's mean (0.3×–2×).
        conversion.revenue_micros = (order_value * self.rng.random_range(0.3..2.0)) as u64;
        conversion.order_id = Some(format!("ord-{}", self.id().simple()));
        self.schedule(conversion, campaign);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-06-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    /// `n` events, 1,000 per simulated second.
    fn run(cfg: GenConfig, n: usize) -> (Vec<(Event, Kind)>, GenCounts) {
        let mut g = Generator::new(cfg);
        let t0 = start();
        let events = (0..n)
            .map(|i| g.next_event(t0 + Duration::milliseconds(i as i64)))
            .collect();
        (events, g.counts.clone())
    }

    #[test]
    fn click_through_rate_is_between_1_and_3_percent() {
        for seed in [1, 7, 42] {
            let cfg = GenConfig {
                seed,
                ..GenConfig::default()
            };
            let (_, c) = run(cfg, 200_000);
            let ctr = c.clicks as f64 / c.impressions as f64;
            assert!((0.01..=0.03).contains(&ctr), "seed {seed}: CTR {ctr}");
            let cvr = c.conversions as f64 / c.clicks as f64;
            assert!(
                (0.01..=0.15).contains(&cvr),
                "seed {seed}: conversions/click {cvr}"
            );
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_events_and_another_seed_others() {
        let cfg = |seed| GenConfig {
            seed,
            ..GenConfig::default()
        };
        let (a, _) = run(cfg(9), 20_000);
        let (b, _) = run(cfg(9), 20_000);
        let (c, _) = run(cfg(10), 20_000);
        assert_eq!(a, b);
        assert_ne!(a[..100], c[..100]);
    }

    #[test]
    fn duplicates_are_re_sent_events_at_the_set_rate() {
        let cfg = GenConfig {
            seed: 3,
            duplicate_rate: 0.05,
            ..GenConfig::default()
        };
        let (events, counts) = run(cfg, 100_000);
        let dups: Vec<&Event> = events
            .iter()
            .filter(|(_, k)| *k == Kind::Duplicate)
            .map(|(e, _)| e)
            .collect();
        let rate = dups.len() as f64 / events.len() as f64;
        assert!((0.045..=0.055).contains(&rate), "duplicate rate {rate}");
        assert_eq!(counts.duplicates as usize, dups.len());
        // Every duplicate is an identical copy of an event emitted before it.
        let mut seen = std::collections::HashMap::new();
        for (e, kind) in &events {
            if *kind == Kind::Duplicate {
                assert_eq!(
                    seen.get(&e.event_id),
                    Some(&e),
                    "a duplicate of an unseen event"
                );
            } else {
                assert!(
                    seen.insert(e.event_id, e).is_none(),
                    "a new event reused an id"
                );
            }
        }
        assert_eq!(seen.len() as u64, counts.unique());
    }

    #[test]
    fn late_events_are_minutes_to_hours_old_at_the_set_rate() {
        let cfg = GenConfig {
            seed: 5,
            late_rate: 0.1,
            duplicate_rate: 0.0,
            ..GenConfig::default()
        };
        let mut g = Generator::new(cfg);
        let t0 = start();
        let mut late_impressions = 0;
        for i in 0..50_000 {
            let now = t0 + Duration::milliseconds(i);
            let (e, kind) = g.next_event(now);
            assert!(e.timestamp <= now, "an event from the future");
            if kind == Kind::Late {
                let age = now - e.timestamp;
                assert!(
                    age >= Duration::minutes(1) && age <= Duration::hours(7),
                    "{age}"
                );
                late_impressions += (e.event_type == EventType::Impression) as u32;
            }
        }
        let rate = late_impressions as f64 / g.counts.impressions as f64;
        assert!((0.09..=0.11).contains(&rate), "late rate {rate}");
    }

    #[test]
    fn popularity_is_skewed_and_values_are_plausible() {
        let (events, _) = run(GenConfig::default(), 50_000);
        let mut by_campaign = std::collections::HashMap::<&str, usize>::new();
        for (e, _) in &events {
            *by_campaign.entry(&e.campaign_id).or_default() += 1;
            assert!(COUNTRIES.iter().any(|(c, _)| *c == e.country));
            let json = e.to_json(Some(start()));
            assert!(json["event_id"].is_string() && json["timestamp"].is_string());
            match e.event_type {
                EventType::Impression => assert!(e.cost_micros < 20_000),
                EventType::Conversion => assert!(e.revenue_micros > 0),
                EventType::Click => assert_eq!(e.revenue_micros, 0),
            }
        }
        let mut counts: Vec<usize> = by_campaign.into_values().collect();
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let top10: usize = counts.iter().take(10).sum();
        assert!(
            top10 * 3 > events.len(),
            "the top 10 campaigns get over a third"
        );
        let us = events.iter().filter(|(e, _)| e.country == "US").count();
        assert!((0.2..0.36).contains(&(us as f64 / events.len() as f64)));
    }
}
