//! The load driver: one task makes batches at the set rate, `concurrency` tasks send them.
//!
//! Retrying is safe: adtrack is idempotent by `event_id`, so a batch re-sent after a lost
//! answer or a 503 never counts twice. Each attempt carries a fresh `sent_at` (the client's
//! clock at sending), as a real SDK's retry would.

use std::{
    io::Write,
    path::PathBuf,
    sync::{atomic::Ordering::Relaxed, Arc},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use chrono::Utc;
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use serde_json::Value;
use tokio::sync::{mpsc, Mutex};

use crate::{
    generator::{Event, GenConfig, Generator, Kind},
    stats::{Stats, Summary},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A JSON array of events (`application/json`).
    Json,
    /// One event per line (`application/x-ndjson`).
    Ndjson,
}

/// Sends realistic mock ad traffic to adtrack's `POST /v1/events`.
#[derive(Debug, Clone, Parser)]
#[command(name = "adtrack-loader", version)]
pub struct Options {
    /// Base URL of the service (or of the load balancer in front of it).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Events per second; 0 sends as fast as the service answers.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// How long to send, e.g. `30s`, `5m`, `1h` (default 30s unless --events is given).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Stop after this many events (duplicates included).
    #[arg(long)]
    pub events: Option<u64>,
    /// Events per request.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Seed of the generator: the same seed makes the same traffic.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Share of events that are re-sent copies of earlier ones (same event_id).
    #[arg(long, default_value_t = 0.01)]
    pub duplicate_rate: f64,
    /// Share of impressions that happened minutes to hours ago (sent late, with sent_at).
    #[arg(long, default_value_t = 0.02)]
    pub late_rate: f64,
    /// Sent as `Authorization: Bearer <key>`.
    #[arg(long, env = "ADTRACK_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Request body format.
    #[arg(long, value_enum, default_value_t = Format::Json)]
    pub format: Format,
    /// Compress request bodies with gzip.
    #[arg(long)]
    pub gzip: bool,
    /// Retries of a request that got a 429/502/503/504 or no answer, with backoff.
    #[arg(long, default_value_t = 8)]
    pub max_retries: u32,
    /// Timeout of one request, e.g. `10s`.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub timeout: Duration,
    /// Number of campaigns in the generated catalogue.
    #[arg(long, default_value_t = 200)]
    pub campaigns: usize,
    /// Number of publishers in the generated catalogue.
    #[arg(long, default_value_t = 500)]
    pub publishers: usize,
    /// Also write the summary as JSON to this file.
    #[arg(long)]
    pub summary_json: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

/// `250ms`, `30s`, `5m`, `1h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 30s, 5m, 1h, 250ms)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

impl Options {
    fn check(&self) -> anyhow::Result<()> {
        if !(0.0..=1.0).contains(&self.duplicate_rate) || !(0.0..=1.0).contains(&self.late_rate) {
            bail!("--duplicate-rate and --late-rate are shares between 0 and 1");
        }
        if self.batch == 0 || self.concurrency == 0 {
            bail!("--batch and --concurrency must be at least 1");
        }
        if !self.rate.is_finite() || self.rate < 0.0 {
            bail!("--rate must be 0 (unlimited) or positive");
        }
        if self.campaigns == 0 || self.publishers == 0 {
            bail!("--campaigns and --publishers must be at least 1");
        }
        Ok(())
    }

    fn gen_config(&self) -> GenConfig {
        GenConfig {
            seed: self.seed,
            duplicate_rate: self.duplicate_rate,
            late_rate: self.late_rate,
            campaigns: self.campaigns,
            publishers: self.publishers,
            ..GenConfig::default()
        }
    }
}

struct Batch {
    events: Vec<Event>,
}

/// Runs the load until the duration or event count is reached (or Ctrl-C), then sums up.
pub async fn run(opts: Options) -> anyhow::Result<Summary> {
    opts.check()?;
    let duration = match (opts.duration, opts.events) {
        (Some(d), _) => Some(d),
        (None, Some(_)) => None,
        (None, None) => Some(Duration::from_secs(30)),
    };
    let endpoint = format!("{}/v1/events", opts.url.trim_end_matches('/'));
    let http = reqwest::Client::builder()
        .timeout(opts.timeout)
        .pool_max_idle_per_host(opts.concurrency)
        .build()
        .context("HTTP client")?;
    let stats = Arc::new(Stats::default());
    let progress = progress_bar(&opts, duration);

    let (tx, rx) = mpsc::channel::<Batch>(opts.concurrency * 2);
    let rx = Arc::new(Mutex::new(rx));
    let started = Instant::now();
    let workers: Vec<_> = (0..opts.concurrency)
        .map(|_| {
            let (rx, http, stats, opts, endpoint) = (
                rx.clone(),
                http.clone(),
                stats.clone(),
                opts.clone(),
                endpoint.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let next = rx.lock().await.recv().await;
                    let Some(batch) = next else { break };
                    send(&http, &endpoint, &opts, &stats, batch).await;
                }
            })
        })
        .collect();
    let ticker = {
        let (stats, progress) = (stats.clone(), progress.clone());
        let by_events = opts.events.is_some() && duration.is_none();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                update_progress(&progress, &stats, started, by_events);
            }
        })
    };

    let mut generator = Generator::new(opts.gen_config());
    let mut made: u64 = 0;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let elapsed = started.elapsed();
        if duration.is_some_and(|d| elapsed >= d) || opts.events.is_some_and(|n| made >= n) {
            break;
        }
        if opts.rate > 0.0 {
            let due = Duration::from_secs_f64(made as f64 / opts.rate);
            if due > elapsed {
                let sleep = (due - elapsed).min(Duration::from_millis(100));
                tokio::select! {
                    _ = tokio::time::sleep(sleep) => continue,
                    _ = &mut ctrl_c => break,
                }
            }
        }
        let n = opts.events.map_or(opts.batch as u64, |limit| {
            (limit - made).min(opts.batch as u64)
        }) as usize;
        let now = Utc::now();
        let events: Vec<Event> = generator
            .batch(n, now)
            .into_iter()
            .map(|(event, kind)| {
                match kind {
                    Kind::Duplicate => stats.duplicates_sent.fetch_add(1, Relaxed),
                    Kind::Late => stats.late_sent.fetch_add(1, Relaxed),
                    Kind::New => 0,
                };
                event
            })
            .collect();
        made += n as u64;
        tokio::select! {
            sent = tx.send(Batch { events }) => if sent.is_err() { break },
            _ = &mut ctrl_c => break,
        }
    }
    drop(tx);
    for w in workers {
        w.await.context("a sending task panicked")?;
    }
    let elapsed = started.elapsed();
    ticker.abort();
    update_progress(
        &progress,
        &stats,
        started,
        opts.events.is_some() && duration.is_none(),
    );
    progress.finish_and_clear();
    Ok(stats.summary(elapsed))
}

fn progress_bar(opts: &Options, duration: Option<Duration>) -> ProgressBar {
    if opts.quiet {
        return ProgressBar::hidden();
    }
    let (len, template) = match (duration, opts.events) {
        (None, Some(n)) => (
            n,
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} events  {msg}",
        ),
        (d, _) => (
            d.unwrap_or_default().as_millis() as u64,
            "{spinner} [{elapsed_precise}/{duration_precise}] {wide_bar}  {msg}",
        ),
    };
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

fn update_progress(bar: &ProgressBar, stats: &Stats, started: Instant, by_events: bool) {
    let sent = stats.events_sent.load(Relaxed);
    let elapsed = started.elapsed();
    if by_events {
        bar.set_position(sent);
    } else {
        bar.set_position((elapsed.as_millis() as u64).min(bar.length().unwrap_or(0)));
    }
    bar.set_message(format!(
        "{sent} sent  {} accepted  {} rejected  {} retries  {:.0}/s",
        stats.accepted.load(Relaxed),
        stats.rejected.load(Relaxed),
        stats.retries.load(Relaxed),
        sent as f64 / elapsed.as_secs_f64().max(1e-3)
    ));
}

fn encode(events: &[Event], format: Format, gzip: bool) -> Vec<u8> {
    let sent_at = Some(Utc::now());
    let mut body = Vec::with_capacity(events.len() * 512);
    match format {
        Format::Json => {
            let all: Vec<Value> = events.iter().map(|e| e.to_json(sent_at)).collect();
            serde_json::to_writer(&mut body, &all).expect("JSON to memory");
        }
        Format::Ndjson => {
            for e in events {
                serde_json::to_writer(&mut body, &e.to_json(sent_at)).expect("JSON to memory");
                body.push(b'\n');
            }
        }
    }
    if !gzip {
        return body;
    }
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&body).expect("gzip to memory");
    enc.finish().expect("gzip to memory")
}

/// Answers worth retrying: the service (or the balancer) cannot take events right now.
fn retriable(status: u16) -> bool {
    matches!(status, 0 | 429 | 502 | 503 | 504)
}

/// Exponential backoff with jitter, at least what `Retry-After` asks (capped at 5 s).
fn backoff(attempt: u32, retry_after: Option<u64>) -> Duration {
    let base = Duration::from_millis(100u64.saturating_mul(1 << attempt.min(6)))
        .min(Duration::from_secs(5));
    let jittered = base.mul_f64(rand::rng().random_range(0.5..1.0));
    let asked = Duration::from_secs(retry_after.unwrap_or(0).min(5));
    jittered.max(asked)
}

async fn send(http: &reqwest::Client, endpoint: &str, opts: &Options, stats: &Stats, batch: Batch) {
    let n = batch.events.len() as u64;
    stats.events_sent.fetch_add(n, Relaxed);
    stats.requests.fetch_add(1, Relaxed);
    let content_type = match opts.format {
        Format::Json => "application/json",
        Format::Ndjson => "application/x-ndjson",
    };
    let mut attempt = 0;
    loop {
        let mut req = http
            .post(endpoint)
            .header("content-type", content_type)
            .body(encode(&batch.events, opts.format, opts.gzip));
        if opts.gzip {
            req = req.header("content-encoding", "gzip");
        }
        if let Some(key) = &opts.api_key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        let t = Instant::now();
        let (status, retry_after, body) = match req.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let retry_after = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok());
                match resp.text().await {
                    Ok(body) => (status, retry_after, body),
                    Err(e) => (0, None, e.to_string()),
                }
            }
            Err(e) => (0, None, e.to_string()),
        };
        stats.record_attempt(status, t.elapsed());
        match status {
            200 | 202 | 422 => {
                let answer: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                let accepted = answer["accepted"].as_u64().unwrap_or(0);
                let rejected = answer["rejected"].as_array().map_or(0, |r| r.len() as u64);
                stats.accepted.fetch_add(accepted, Relaxed);
                stats.rejected.fetch_add(rejected, Relaxed);
                if rejected > 0 {
                    stats.note_error(format!("{status}: {}", truncate(&body)));
                }
                return;
            }
            s if retriable(s) && attempt < opts.max_retries => {
                stats.retries.fetch_add(1, Relaxed);
                tokio::time::sleep(backoff(attempt, retry_after)).await;
                attempt += 1;
            }
            s => {
                stats.failed.fetch_add(n, Relaxed);
                let what = if s == 0 {
                    format!("no answer: {body}")
                } else {
                    format!("{s}: {}", truncate(&body))
                };
                stats.note_error(what);
                return;
            }
        }
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(300) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("3 days").is_err());
    }

    #[test]
    fn backoff_grows_is_capped_and_honours_retry_after() {
        assert!(backoff(0, None) <= Duration::from_millis(100));
        assert!(backoff(3, None) >= Duration::from_millis(400));
        assert!(backoff(30, None) <= Duration::from_secs(5));
        assert!(backoff(0, Some(2)) >= Duration::from_secs(2));
        assert!(backoff(0, Some(3600)) <= Duration::from_secs(5));
    }

    #[test]
    fn bodies_are_json_arrays_or_ndjson_with_sent_at() {
        let mut g = Generator::new(GenConfig::default());
        let events: Vec<Event> = g.batch(3, Utc::now()).into_iter().map(|(e, _)| e).collect();
        let json: Value = serde_json::from_slice(&encode(&events, Format::Json, false)).unwrap();
        assert_eq!(json.as_array().unwrap().len(), 3);
        assert!(json[0]["sent_at"].is_string());
        let ndjson = String::from_utf8(encode(&events, Format::Ndjson, false)).unwrap();
        assert_eq!(ndjson.lines().count(), 3);
        let gz = encode(&events, Format::Ndjson, true);
        assert_eq!(&gz[..2], &[0x1f, 0x8b]);
    }

    #[test]
    fn options_have_the_documented_defaults() {
        let o = Options::parse_from(["adtrack-loader"]);
        assert_eq!(o.url, "http://127.0.0.1:8080");
        assert_eq!(o.batch, 100);
        assert!(o.api_key.is_none() || std::env::var("ADTRACK_API_KEY").is_ok());
        let o = Options::parse_from(["adtrack-loader", "--duration", "2m", "--api-key", "k"]);
        assert_eq!(o.duration, Some(Duration::from_secs(120)));
        assert_eq!(o.api_key.as_deref(), Some("k"));
    }
}
