//! The retry policy every stage uses around Redis, Kafka and MongoDB calls
//! (seed 000: 3 retries, 1 s, 2 s, 4 s, at most 10 s apart).
//!
//! Errors say whether another attempt can help ([`Retryable`]): a broken
//! connection or a timeout is retried; an undecodable profile or a rejected
//! document is not, and goes to the dead-letter queue at once.

use serde::{Deserialize, Serialize};
use std::{fmt::Display, future::Future, time::Duration};
use tokio_util::sync::CancellationToken;

/// Whether another attempt of the failed call can succeed.
pub trait Retryable {
    fn is_retryable(&self) -> bool;
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct RetryConfig {
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// Delay before the first retry.
    #[serde(with = "humantime_serde")]
    pub initial_delay: Duration,
    /// Each delay is the previous one times this.
    pub multiplier: f64,
    /// No delay is longer than this.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Random spread of each delay, as a fraction (0.1 = ±10 %).
    pub jitter: f64,
}

/// A call that failed for good.
#[derive(Debug)]
pub struct GaveUp<E> {
    pub error: E,
    /// Retries made before giving up (0 when the error was permanent).
    pub retries: u32,
}

impl<E: Display> Display for GaveUp<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (after {} retries)", self.error, self.retries)
    }
}

impl RetryConfig {
    /// Problems with the values, each naming its key.
    pub fn validate(&self, p: &mut Vec<String>) {
        if !(self.multiplier >= 1.0 && self.multiplier.is_finite()) {
            p.push("retry.multiplier: must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.jitter) {
            p.push("retry.jitter: must be in [0, 1)".into());
        }
        if self.max_delay < self.initial_delay {
            p.push("retry.max_delay: must be at least retry.initial_delay".into());
        }
    }

    /// The delay before retry number `retry` (0 = the first retry), without
    /// jitter: `initial × multiplier^retry`, capped.
    pub fn base_delay(&self, retry: u32) -> Duration {
        let factor = self.multiplier.powi(retry.min(64) as i32);
        let secs = self.initial_delay.as_secs_f64() * factor;
        Duration::from_secs_f64(secs.min(self.max_delay.as_secs_f64()))
    }

    /// [`base_delay`](Self::base_delay) with the configured random spread.
    pub fn delay(&self, retry: u32) -> Duration {
        let base = self.base_delay(retry);
        if self.jitter == 0.0 {
            return base;
        }
        let spread = rand::random_range(-self.jitter..=self.jitter);
        base.mul_f64(1.0 + spread).min(self.max_delay)
    }

    /// Runs `op` until it succeeds, fails with a permanent error, runs out of
    /// retries, or `cancel` fires (then the last error is returned at once).
    pub async fn run<T, E, F, Fut>(
        &self,
        what: &str,
        cancel: &CancellationToken,
        mut op: F,
    ) -> Result<T, GaveUp<E>>
    where
        E: Retryable + Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut retries = 0;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(error) => {
                    if !error.is_retryable() || retries >= self.max_retries {
                        return Err(GaveUp { error, retries });
                    }
                    let wait = self.delay(retries);
                    tracing::debug!(what, %error, retry = retries + 1, ?wait, "retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return Err(GaveUp { error, retries }),
                        _ = tokio::time::sleep(wait) => {}
                    }
                    retries += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn seed_policy() -> RetryConfig {
        RetryConfig {
            max_retries: 3,
            initial_delay: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(10),
            jitter: 0.0,
        }
    }

    #[derive(Debug)]
    struct E(bool);
    impl Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "e({})", self.0)
        }
    }
    impl Retryable for E {
        fn is_retryable(&self) -> bool {
            self.0
        }
    }

    #[test]
    fn delays_follow_the_seed() {
        let p = seed_policy();
        let d: Vec<u64> = (0..5).map(|i| p.base_delay(i).as_millis() as u64).collect();
        assert_eq!(d, vec![1000, 2000, 4000, 8000, 10000]);
    }

    #[test]
    fn jitter_stays_within_its_spread() {
        let p = RetryConfig {
            jitter: 0.2,
            ..seed_policy()
        };
        for _ in 0..200 {
            let d = p.delay(1).as_secs_f64();
            assert!((1.6..=2.4).contains(&d), "{d}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_transient_errors_then_gives_up() {
        let calls = AtomicU32::new(0);
        let r: Result<(), _> = seed_policy()
            .run("t", &CancellationToken::new(), || async {
                calls.fetch_add(1, Ordering::Relaxed);
                Err(E(true))
            })
            .await;
        let e = r.unwrap_err();
        assert_eq!(e.retries, 3);
        assert_eq!(calls.load(Ordering::Relaxed), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_are_not_retried() {
        let calls = AtomicU32::new(0);
        let r: Result<(), _> = seed_policy()
            .run("t", &CancellationToken::new(), || async {
                calls.fetch_add(1, Ordering::Relaxed);
                Err(E(false))
            })
            .await;
        assert_eq!(r.unwrap_err().retries, 0);
        assert_eq!(calls.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn succeeds_after_a_transient_error() {
        let calls = AtomicU32::new(0);
        let r = seed_policy()
            .run("t", &CancellationToken::new(), || async {
                if calls.fetch_add(1, Ordering::Relaxed) < 2 {
                    Err(E(true))
                } else {
                    Ok(7)
                }
            })
            .await;
        assert_eq!(r.unwrap(), 7);
    }
}
