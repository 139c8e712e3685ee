//! What a run did, counted while it runs and summed up at the end.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Mutex,
    },
    time::Duration,
};

use serde_json::{json, Value};

/// Shared by the sending tasks.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests that got a final answer (after retries), and their events.
    pub requests: AtomicU64,
    pub events_sent: AtomicU64,
    pub duplicates_sent: AtomicU64,
    pub late_sent: AtomicU64,
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    /// Events of requests that failed for good (not retriable, or out of retries).
    pub failed: AtomicU64,
    pub retries: AtomicU64,
    /// Every answer, retried ones included; 0 = no answer (connection error, timeout).
    statuses: Mutex<BTreeMap<u16, u64>>,
    /// Latency of every answered attempt, in microseconds.
    latencies_us: Mutex<Vec<u32>>,
    /// The first few errors, to show what went wrong.
    errors: Mutex<Vec<String>>,
}

/// Errors kept for the summary.
const ERRORS_KEPT: usize = 5;

impl Stats {
    pub fn record_attempt(&self, status: u16, latency: Duration) {
        *self.statuses.lock().unwrap().entry(status).or_default() += 1;
        if status != 0 {
            let us = latency.as_micros().min(u32::MAX as u128) as u32;
            self.latencies_us.lock().unwrap().push(us);
        }
    }

    pub fn note_error(&self, error: String) {
        let mut errors = self.errors.lock().unwrap();
        if errors.len() < ERRORS_KEPT {
            errors.push(error);
        }
    }

    pub fn summary(&self, elapsed: Duration) -> Summary {
        let mut latencies = self.latencies_us.lock().unwrap().clone();
        latencies.sort_unstable();
        let events_sent = self.events_sent.load(Relaxed);
        let secs = elapsed.as_secs_f64().max(1e-9);
        Summary {
            elapsed,
            requests: self.requests.load(Relaxed),
            events_sent,
            duplicates_sent: self.duplicates_sent.load(Relaxed),
            late_sent: self.late_sent.load(Relaxed),
            accepted: self.accepted.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            failed: self.failed.load(Relaxed),
            retries: self.retries.load(Relaxed),
            statuses: self.statuses.lock().unwrap().clone(),
            rate: events_sent as f64 / secs,
            p50: percentile(&latencies, 0.50),
            p99: percentile(&latencies, 0.99),
            max: latencies.last().map(|us| Duration::from_micros(*us as u64)),
            errors: self.errors.lock().unwrap().clone(),
        }
    }
}

/// The `q`-quantile (nearest rank) of sorted microsecond values.
pub fn percentile(sorted_us: &[u32], q: f64) -> Option<Duration> {
    if sorted_us.is_empty() {
        return None;
    }
    let rank = ((q * sorted_us.len() as f64).ceil() as usize).clamp(1, sorted_us.len());
    Some(Duration::from_micros(sorted_us[rank - 1] as u64))
}

#[derive(Debug, Clone)]
pub struct Summary {
    pub elapsed: Duration,
    pub requests: u64,
    pub events_sent: u64,
    pub duplicates_sent: u64,
    pub late_sent: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub failed: u64,
    pub retries: u64,
    pub statuses: BTreeMap<u16, u64>,
    /// Events sent per second, over the whole run.
    pub rate: f64,
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
    pub max: Option<Duration>,
    /// The first few errors and rejections.
    pub errors: Vec<String>,
}

fn ms(d: Option<Duration>) -> Value {
    d.map_or(Value::Null, |d| json!(d.as_secs_f64() * 1000.0))
}

impl Summary {
    pub fn to_json(&self) -> Value {
        json!({
            "elapsed_s": self.elapsed.as_secs_f64(),
            "requests": self.requests,
            "events_sent": self.events_sent,
            "unique_events_sent": self.events_sent - self.duplicates_sent,
            "duplicates_sent": self.duplicates_sent,
            "late_sent": self.late_sent,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "failed": self.failed,
            "retries": self.retries,
            "statuses": self.statuses.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "rate_per_s": self.rate,
            "latency_ms": { "p50": ms(self.p50), "p99": ms(self.p99), "max": ms(self.max) },
            "errors": self.errors,
        })
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Option<Duration>| {
            d.map_or("-".to_string(), |d| {
                format!("{:.1} ms", d.as_secs_f64() * 1000.0)
            })
        };
        let statuses: Vec<String> = self
            .statuses
            .iter()
            .map(|(s, n)| {
                if *s == 0 {
                    format!("no answer: {n}")
                } else {
                    format!("{s}: {n}")
                }
            })
            .collect();
        writeln!(f, "elapsed        {:.1} s", self.elapsed.as_secs_f64())?;
        writeln!(
            f,
            "sent           {} events in {} requests ({} unique, {} duplicates, {} late)",
            self.events_sent,
            self.requests,
            self.events_sent - self.duplicates_sent,
            self.duplicates_sent,
            self.late_sent
        )?;
        writeln!(
            f,
            "answers        {} accepted, {} rejected, {} failed",
            self.accepted, self.rejected, self.failed
        )?;
        writeln!(f, "retries        {}", self.retries)?;
        writeln!(f, "statuses       {}", statuses.join(", "))?;
        writeln!(f, "achieved rate  {:.0} events/s", self.rate)?;
        write!(
            f,
            "latency        p50 {}, p99 {}, max {}",
            ms(self.p50),
            ms(self.p99),
            ms(self.max)
        )?;
        for e in &self.errors {
            write!(f, "\nerror          {e}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), Some(Duration::from_micros(50)));
        assert_eq!(percentile(&v, 0.99), Some(Duration::from_micros(99)));
        assert_eq!(percentile(&v, 1.0), Some(Duration::from_micros(100)));
        assert_eq!(percentile(&[7], 0.99), Some(Duration::from_micros(7)));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn the_summary_counts_answers_and_rate() {
        let stats = Stats::default();
        stats.events_sent.store(1000, Relaxed);
        stats.duplicates_sent.store(10, Relaxed);
        stats.record_attempt(202, Duration::from_millis(3));
        stats.record_attempt(503, Duration::from_millis(1));
        stats.record_attempt(0, Duration::from_secs(10));
        let s = stats.summary(Duration::from_secs(2));
        assert_eq!(s.rate, 500.0);
        assert_eq!(s.statuses.get(&0), Some(&1));
        assert_eq!(
            s.max,
            Some(Duration::from_millis(3)),
            "no answer, no latency"
        );
        let text = s.to_string();
        assert!(
            text.contains("990 unique") && text.contains("no answer: 1"),
            "{text}"
        );
        assert_eq!(s.to_json()["unique_events_sent"], 990);
    }
}
