//! Token buckets: one for requests and one for events, per key and per instance.
//!
//! A bucket holds up to `burst` tokens and refills at `rate` per second. A request needs one
//! request token; an ingest request also needs one event token per accepted event. A batch may
//! take the bucket below zero (a batch larger than the burst is still possible), and later
//! requests wait until it is positive again, so the long-run rate holds.

use std::{sync::Mutex, time::Instant};

use serde::{Deserialize, Serialize};

/// Limits of one key; a rate of 0 means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimits {
    pub requests_per_sec: u32,
    pub requests_burst: u32,
    pub events_per_sec: u32,
    pub events_burst: u32,
}

/// What a request sees of a bucket, for the `X-RateLimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quota {
    pub limit: u32,
    pub remaining: u64,
    /// Seconds until the bucket is full again.
    pub reset_secs: u64,
}

/// Over the limit: retry after this many seconds (at least 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Exceeded {
    pub quota: Quota,
    pub retry_after_secs: u64,
}

pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub fn new(rate: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(rate).max(1));
        TokenBucket {
            rate: f64::from(rate),
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    pub fn unlimited(&self) -> bool {
        self.rate == 0.0
    }

    /// Takes `n` tokens if at least `min(n, burst)` are there (see the module comment).
    pub fn take(&self, n: u32) -> Result<Quota, Exceeded> {
        self.take_at(n, Instant::now())
    }

    fn take_at(&self, n: u32, now: Instant) -> Result<Quota, Exceeded> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, last) = &mut *state;
        *tokens = (*tokens + now.saturating_duration_since(*last).as_secs_f64() * self.rate)
            .min(self.burst);
        *last = now.max(*last);
        let need = f64::from(n).min(self.burst);
        if self.unlimited() || *tokens >= need {
            if !self.unlimited() {
                *tokens -= f64::from(n);
            }
            return Ok(self.quota(*tokens));
        }
        Err(Exceeded {
            quota: self.quota(*tokens),
            retry_after_secs: (((need - *tokens) / self.rate).ceil() as u64).max(1),
        })
    }

    fn quota(&self, tokens: f64) -> Quota {
        if self.unlimited() {
            return Quota {
                limit: 0,
                remaining: u64::MAX,
                reset_secs: 0,
            };
        }
        Quota {
            limit: self.rate as u32,
            remaining: tokens.max(0.0).floor() as u64,
            reset_secs: ((self.burst - tokens) / self.rate).ceil().max(0.0) as u64,
        }
    }
}

/// The two buckets of one key.
pub struct KeyLimiter {
    pub limits: RateLimits,
    pub requests: TokenBucket,
    pub events: TokenBucket,
}

impl KeyLimiter {
    pub fn new(limits: RateLimits) -> Self {
        KeyLimiter {
            limits,
            requests: TokenBucket::new(limits.requests_per_sec, limits.requests_burst),
            events: TokenBucket::new(limits.events_per_sec, limits.events_burst),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let bucket = TokenBucket::new(10, 20);
        let t0 = Instant::now();
        for _ in 0..20 {
            bucket.take_at(1, t0).unwrap();
        }
        let over = bucket.take_at(1, t0).unwrap_err();
        assert_eq!(over.retry_after_secs, 1);
        assert_eq!(over.quota.remaining, 0);
        // 10 per second: after 0.5 s there are 5 tokens.
        let later = t0 + Duration::from_millis(500);
        for _ in 0..5 {
            bucket.take_at(1, later).unwrap();
        }
        assert!(bucket.take_at(1, later).is_err());
    }

    #[test]
    fn a_batch_larger_than_the_burst_passes_once_then_waits() {
        let bucket = TokenBucket::new(100, 100);
        let t0 = Instant::now();
        bucket.take_at(250, t0).unwrap();
        let over = bucket.take_at(1, t0).unwrap_err();
        // 150 tokens owed plus 1: 2 seconds at 100/s.
        assert_eq!(over.retry_after_secs, 2);
        assert!(bucket.take_at(1, t0 + Duration::from_millis(1600)).is_ok());
    }

    #[test]
    fn rate_zero_is_unlimited() {
        let bucket = TokenBucket::new(0, 0);
        for _ in 0..10_000 {
            bucket.take(1_000).unwrap();
        }
    }

    #[test]
    fn the_quota_reports_what_is_left() {
        let bucket = TokenBucket::new(5, 5);
        let t0 = Instant::now();
        let q = bucket.take_at(2, t0).unwrap();
        assert_eq!((q.limit, q.remaining, q.reset_secs), (5, 3, 1));
    }
}
