//! One deadline per cluster; the earliest wins.
//!
//! A plain data structure (no clock inside): the runner passes `now`, so
//! the merging rules are tested without time.

use std::collections::{BTreeSet, HashMap};

use tokio::time::Instant;

use super::Key;

#[derive(Debug, Default)]
pub struct Scheduler {
    deadlines: HashMap<Key, Instant>,
    queue: BTreeSet<(Instant, Key)>,
}

impl Scheduler {
    /// Asks for `key` to run at `at`; an earlier request already queued wins.
    pub fn schedule(&mut self, key: Key, at: Instant) {
        match self.deadlines.get(&key) {
            Some(&existing) if existing <= at => {}
            Some(&existing) => {
                self.queue.remove(&(existing, key.clone()));
                self.queue.insert((at, key.clone()));
                self.deadlines.insert(key, at);
            }
            None => {
                self.queue.insert((at, key.clone()));
                self.deadlines.insert(key, at);
            }
        }
    }

    /// Removes and returns up to `limit` keys due at `now`, earliest first.
    pub fn pop_due(&mut self, now: Instant, limit: usize) -> Vec<Key> {
        let mut out = Vec::new();
        while out.len() < limit {
            match self.queue.first() {
                Some((at, _)) if *at <= now => {
                    let (_, key) = self.queue.pop_first().expect("first exists");
                    self.deadlines.remove(&key);
                    out.push(key);
                }
                _ => break,
            }
        }
        out
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.queue.first().map(|(at, _)| *at)
    }

    pub fn forget(&mut self, key: &Key) {
        if let Some(at) = self.deadlines.remove(key) {
            self.queue.remove(&(at, key.clone()));
        }
    }

    pub fn len(&self) -> usize {
        self.deadlines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.deadlines.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn earliest_deadline_wins_and_duplicates_merge() {
        let t0 = Instant::now();
        let mut s = Scheduler::default();
        s.schedule("web".into(), t0 + Duration::from_secs(10));
        s.schedule("web".into(), t0 + Duration::from_secs(2));
        s.schedule("web".into(), t0 + Duration::from_secs(5));
        s.schedule("api".into(), t0 + Duration::from_secs(3));
        assert_eq!(s.len(), 2);
        assert_eq!(s.next_deadline(), Some(t0 + Duration::from_secs(2)));
        assert!(s.pop_due(t0 + Duration::from_secs(1), 10).is_empty());
        assert_eq!(s.pop_due(t0 + Duration::from_secs(4), 10), ["web", "api"]);
        assert!(s.is_empty());
    }

    #[test]
    fn pop_respects_the_limit_and_keeps_the_rest() {
        let t0 = Instant::now();
        let mut s = Scheduler::default();
        for (i, k) in ["a", "b", "c"].iter().enumerate() {
            s.schedule(k.to_string(), t0 + Duration::from_millis(i as u64));
        }
        assert_eq!(s.pop_due(t0 + Duration::from_secs(1), 2), ["a", "b"]);
        assert_eq!(s.pop_due(t0 + Duration::from_secs(1), 2), ["c"]);
    }

    #[test]
    fn forget_removes_a_key() {
        let t0 = Instant::now();
        let mut s = Scheduler::default();
        s.schedule("a".into(), t0);
        s.forget(&"a".to_string());
        assert!(s.pop_due(t0, 10).is_empty());
    }
}
