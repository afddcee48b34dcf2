//! Per-cluster exponential backoff with jitter, reset on success.

use std::collections::HashMap;
use std::time::Duration;

use super::Key;

#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: HashMap<Key, u32>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Duration::from_secs(1), Duration::from_secs(300))
    }
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            failures: HashMap::new(),
        }
    }

    /// Records a failure of `key` and returns how long to wait. `unit_random`
    /// in [0, 1) draws the jitter: the delay is in [½·d, d] so clusters that
    /// failed together do not retry together, yet never retry too early.
    pub fn failed(&mut self, key: &Key, unit_random: f64) -> Duration {
        let n = self.failures.entry(key.clone()).or_insert(0);
        let exp = self
            .base
            .saturating_mul(1u32.checked_shl((*n).min(31)).unwrap_or(u32::MAX));
        *n = n.saturating_add(1);
        let d = exp.min(self.cap);
        d.mul_f64(0.5 + 0.5 * unit_random.clamp(0.0, 1.0))
    }

    pub fn succeeded(&mut self, key: &Key) {
        self.failures.remove(key);
    }

    pub fn failures(&self, key: &Key) -> u32 {
        self.failures.get(key).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        let k = "web".to_string();
        let full: Vec<u64> = (0..6).map(|_| b.failed(&k, 1.0).as_secs()).collect();
        assert_eq!(full, [1, 2, 4, 8, 10, 10]);
        assert_eq!(b.failures(&k), 6);
        b.succeeded(&k);
        assert_eq!(b.failed(&k, 1.0), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_within_half_to_full() {
        let mut b = Backoff::new(Duration::from_secs(8), Duration::from_secs(8));
        let k = "web".to_string();
        assert_eq!(b.failed(&k, 0.0), Duration::from_secs(4));
        assert_eq!(b.failed(&k, 0.5), Duration::from_secs(6));
    }

    #[test]
    fn clusters_back_off_independently() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let (a, c) = ("a".to_string(), "c".to_string());
        for _ in 0..5 {
            b.failed(&a, 1.0);
        }
        assert_eq!(b.failed(&c, 1.0), Duration::from_secs(1));
    }
}
