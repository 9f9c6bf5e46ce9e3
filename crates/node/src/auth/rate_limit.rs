//! A token bucket per caller: per principal when authentication is on, per peer address when it
//! is off. Buckets are refilled lazily when a call arrives (nothing runs while the node is
//! idle), and the map is bounded: once it holds `max_tracked` buckets, full ones (which differ
//! in nothing from a new bucket) are dropped, then, if that is not enough, the longest idle.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// `[rate_limit]`: calls per second per caller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained calls per second per caller; 0 turns rate limiting off (the default).
    pub per_second: f64,
    /// Calls a caller may make at once after being idle; 0 means `per_second` (at least 1).
    pub burst: u32,
    /// Most callers tracked at once (memory stays bounded however many callers come and go).
    pub max_tracked: usize,
    /// Per-principal exceptions (`[[rate_limit.overrides]]`).
    pub overrides: Vec<RateOverride>,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            per_second: 0.0,
            burst: 0,
            max_tracked: 100_000,
            overrides: Vec::new(),
        }
    }
}

/// A principal's own rate (`[[rate_limit.overrides]]`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateOverride {
    /// The principal id.
    pub principal: String,
    /// Its calls per second; 0: not limited.
    pub per_second: f64,
    /// Its burst; 0 means its `per_second` (at least 1).
    pub burst: u32,
}

impl RateLimitConfig {
    /// Rejects rates that cannot work.
    pub fn validate(&self) -> Result<(), String> {
        let bad = |rate: f64| !rate.is_finite() || rate < 0.0;
        if bad(self.per_second) {
            return Err("rate_limit.per_second must be a number ≥ 0".into());
        }
        if let Some(o) = self.overrides.iter().find(|o| bad(o.per_second)) {
            return Err(format!(
                "rate_limit.overrides for '{}': per_second must be a number ≥ 0",
                o.principal
            ));
        }
        if self.max_tracked == 0 {
            return Err("rate_limit.max_tracked must be at least 1".into());
        }
        Ok(())
    }

    /// Whether any caller is limited.
    pub fn enabled(&self) -> bool {
        self.per_second > 0.0 || self.overrides.iter().any(|o| o.per_second > 0.0)
    }
}

#[derive(Debug, Clone, Copy)]
struct Rate {
    per_second: f64,
    burst: f64,
}

impl Rate {
    fn new(per_second: f64, burst: u32) -> Option<Self> {
        (per_second > 0.0).then(|| Self {
            per_second,
            burst: if burst == 0 {
                per_second.max(1.0)
            } else {
                f64::from(burst)
            },
        })
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    rate: Rate,
}

/// The buckets of every caller.
#[derive(Debug)]
pub struct RateLimiter {
    default: Option<Rate>,
    overrides: HashMap<String, Option<Rate>>,
    max_tracked: usize,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// The limiter of `config`.
    pub fn new(config: &RateLimitConfig) -> Self {
        Self {
            default: Rate::new(config.per_second, config.burst),
            overrides: config
                .overrides
                .iter()
                .map(|o| (o.principal.clone(), Rate::new(o.per_second, o.burst)))
                .collect(),
            max_tracked: config.max_tracked.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one call from `key`'s bucket (`principal` names the override that applies, if
    /// any); `Err` holds how long until the next call would be allowed.
    pub fn acquire(&self, key: &str, principal: Option<&str>) -> Result<(), Duration> {
        let rate = match principal.and_then(|p| self.overrides.get(p)) {
            Some(rate) => *rate,
            None => self.default,
        };
        let Some(rate) = rate else {
            return Ok(());
        };
        let now = Instant::now();
        let mut buckets = self.buckets.lock();
        if !buckets.contains_key(key) && buckets.len() >= self.max_tracked {
            self.evict(&mut buckets, now);
        }
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: rate.burst,
            at: now,
            rate,
        });
        bucket.rate = rate;
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate.per_second).min(rate.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - bucket.tokens) / rate.per_second;
            Err(Duration::from_secs_f64(wait.max(0.001)))
        }
    }

    /// Callers tracked now.
    pub fn tracked(&self) -> usize {
        self.buckets.lock().len()
    }

    /// Makes room for one more bucket: drops the buckets that have refilled, then, if the map
    /// is still full, the longest idle tenth.
    fn evict(&self, buckets: &mut HashMap<String, Bucket>, now: Instant) {
        let refilled = |bucket: &Bucket| {
            let idle = now.saturating_duration_since(bucket.at).as_secs_f64();
            bucket.tokens + idle * bucket.rate.per_second >= bucket.rate.burst
        };
        buckets.retain(|_, bucket| !refilled(bucket));
        if buckets.len() >= self.max_tracked {
            let mut ages: Vec<Instant> = buckets.values().map(|b| b.at).collect();
            let cut = (buckets.len() / 10).max(1);
            let (_, oldest_kept, _) = ages.select_nth_unstable(cut - 1);
            let oldest_kept = *oldest_kept;
            buckets.retain(|_, bucket| bucket.at > oldest_kept);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_each_caller_apart_with_overrides() {
        let limiter = RateLimiter::new(&RateLimitConfig {
            per_second: 0.001,
            burst: 2,
            overrides: vec![
                RateOverride {
                    principal: "batch".into(),
                    per_second: 0.001,
                    burst: 4,
                },
                RateOverride {
                    principal: "admin".into(),
                    per_second: 0.0,
                    burst: 0,
                },
            ],
            ..Default::default()
        });
        assert!(limiter.acquire("a", Some("a")).is_ok());
        assert!(limiter.acquire("a", Some("a")).is_ok());
        let wait = limiter.acquire("a", Some("a")).unwrap_err();
        assert!(wait > Duration::from_secs(100));
        assert!(limiter.acquire("b", Some("b")).is_ok(), "others unaffected");
        for _ in 0..4 {
            assert!(limiter.acquire("batch", Some("batch")).is_ok());
        }
        assert!(limiter.acquire("batch", Some("batch")).is_err());
        for _ in 0..100 {
            assert!(limiter.acquire("admin", Some("admin")).is_ok());
        }
    }

    #[test]
    fn the_map_stays_bounded() {
        let limiter = RateLimiter::new(&RateLimitConfig {
            per_second: 0.001,
            burst: 1,
            max_tracked: 100,
            ..Default::default()
        });
        for caller in 0..10_000 {
            let _ = limiter.acquire(&caller.to_string(), None);
            assert!(limiter.tracked() <= 100);
        }
        // Refilled buckets go first.
        let fast = RateLimiter::new(&RateLimitConfig {
            per_second: 1e9,
            burst: 1,
            max_tracked: 10,
            ..Default::default()
        });
        for caller in 0..1000 {
            fast.acquire(&caller.to_string(), None).unwrap();
        }
        assert!(fast.tracked() <= 10);
    }
}
