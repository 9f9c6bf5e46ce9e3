//! A circuit breaker: closed → open after consecutive failures or a failure
//! rate over a window → half-open with a few probes → closed.

use std::time::Duration;

// tokio's clock: the same as std's outside tests, and paused and advanced by hand in them.
use tokio::time::Instant;

use parking_lot::Mutex;

/// When a breaker trips and how it recovers.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub consecutive_failures: u32,
    /// Failure rate (0–1) over `window` that opens it, once `min_calls` were made.
    pub failure_rate: f64,
    /// Window over which the failure rate is measured.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Calls needed in a window before the rate counts.
    pub min_calls: u32,
    /// How long the breaker stays open before probing.
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
    /// Probe calls let through while half-open; all must succeed to close.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            failure_rate: 0.5,
            window: Duration::from_secs(10),
            min_calls: 20,
            open_for: Duration::from_secs(5),
            half_open_probes: 1,
        }
    }
}

/// The state a breaker reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls flow.
    Closed,
    /// Calls fail fast until the probe time.
    Open,
    /// A few probe calls are let through.
    HalfOpen,
}

/// Returned when the breaker refuses a call.
#[derive(Debug, Clone, Copy)]
pub struct BreakerOpen {
    /// When the breaker will let a probe through.
    pub probe_at: Instant,
}

impl BreakerOpen {
    /// Time until the next probe.
    pub fn retry_after(&self) -> Duration {
        self.probe_at.saturating_duration_since(Instant::now())
    }
}

#[derive(Debug)]
enum State {
    Closed {
        consecutive: u32,
        calls: u32,
        failures: u32,
        window_start: Instant,
    },
    Open {
        until: Instant,
    },
    HalfOpen {
        in_flight: u32,
        succeeded: u32,
    },
}

/// One circuit breaker. Cheap: a mutex around a few counters.
#[derive(Debug)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    state: Mutex<State>,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            state: Mutex::new(State::Closed {
                consecutive: 0,
                calls: 0,
                failures: 0,
                window_start: Instant::now(),
            }),
        }
    }

    /// The current state (an open breaker past its time reports half-open).
    pub fn state(&self) -> BreakerState {
        match &*self.state.lock() {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { until } if Instant::now() >= *until => BreakerState::HalfOpen,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Whether a call could be let through now (without taking a probe slot).
    pub fn would_allow(&self) -> bool {
        match &*self.state.lock() {
            State::Closed { .. } => true,
            State::Open { until } => Instant::now() >= *until,
            State::HalfOpen { in_flight, .. } => *in_flight < self.config.half_open_probes,
        }
    }

    /// Asks to make a call. On `Ok`, report the outcome with
    /// [`CircuitBreaker::record`].
    pub fn try_acquire(&self) -> Result<(), BreakerOpen> {
        let mut state = self.state.lock();
        let now = Instant::now();
        match &mut *state {
            State::Closed { .. } => Ok(()),
            State::Open { until } if now >= *until => {
                *state = State::HalfOpen {
                    in_flight: 1,
                    succeeded: 0,
                };
                Ok(())
            }
            State::Open { until } => Err(BreakerOpen { probe_at: *until }),
            State::HalfOpen { in_flight, .. } => {
                if *in_flight < self.config.half_open_probes {
                    *in_flight += 1;
                    Ok(())
                } else {
                    Err(BreakerOpen {
                        probe_at: now + Duration::from_millis(10),
                    })
                }
            }
        }
    }

    /// Reports the outcome of a call let through by `try_acquire`.
    pub fn record(&self, success: bool) {
        let mut state = self.state.lock();
        let now = Instant::now();
        let config = &self.config;
        let open = State::Open {
            until: now + config.open_for,
        };
        match &mut *state {
            State::Closed {
                consecutive,
                calls,
                failures,
                window_start,
            } => {
                if now.duration_since(*window_start) > config.window {
                    *calls = 0;
                    *failures = 0;
                    *window_start = now;
                }
                *calls += 1;
                if success {
                    *consecutive = 0;
                } else {
                    *consecutive += 1;
                    *failures += 1;
                }
                let rate_tripped = *calls >= config.min_calls
                    && (*failures as f64) / (*calls as f64) >= config.failure_rate;
                if *consecutive >= config.consecutive_failures || rate_tripped {
                    *state = open;
                }
            }
            State::HalfOpen {
                in_flight,
                succeeded,
            } => {
                *in_flight = in_flight.saturating_sub(1);
                if !success {
                    *state = open;
                } else {
                    *succeeded += 1;
                    if *succeeded >= config.half_open_probes {
                        *state = State::Closed {
                            consecutive: 0,
                            calls: 0,
                            failures: 0,
                            window_start: now,
                        };
                    }
                }
            }
            // A call that started before the breaker opened; its outcome changes nothing.
            State::Open { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 3,
            open_for: Duration::from_millis(50),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_recovers_through_a_probe() {
        let breaker = CircuitBreaker::new(quick());
        for _ in 0..3 {
            breaker.try_acquire().unwrap();
            breaker.record(false);
        }
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(breaker.try_acquire().is_err());
        tokio::time::advance(Duration::from_millis(49)).await;
        assert!(breaker.try_acquire().is_err(), "still open before open_for");
        tokio::time::advance(Duration::from_millis(1)).await;
        breaker.try_acquire().unwrap();
        assert!(breaker.try_acquire().is_err(), "one probe at a time");
        breaker.record(true);
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_opens_again() {
        let breaker = CircuitBreaker::new(quick());
        for _ in 0..3 {
            breaker.try_acquire().unwrap();
            breaker.record(false);
        }
        tokio::time::advance(Duration::from_millis(50)).await;
        breaker.try_acquire().unwrap();
        breaker.record(false);
        assert_eq!(breaker.state(), BreakerState::Open);
    }

    #[test]
    fn opens_on_failure_rate() {
        let breaker = CircuitBreaker::new(BreakerConfig {
            consecutive_failures: 100,
            min_calls: 10,
            failure_rate: 0.5,
            ..quick()
        });
        for i in 0..10 {
            breaker.try_acquire().unwrap();
            breaker.record(i % 2 == 0);
        }
        assert_eq!(breaker.state(), BreakerState::Open);
    }
}
