//! EC2's eventual consistency for `DescribeInstances`: a new instance, each
//! tag change and each state change (`StartInstances`, `StopInstances`,
//! `TerminateInstances`) becomes visible only after its own lag; until then
//! the listing shows the old view (no instance; the old tag values; the
//! state before the call).
//!
//! Only what is still pending is kept: the gateway takes moto's current
//! answer and undoes the changes not yet visible. Tag changes of one
//! instance become visible in the order they were made (a later change is
//! never visible before an earlier one), so "undo the pending suffix,
//! newest first" is always a state the instance really had.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use super::semantics::Lag;
use crate::faults::SplitMix64;

/// One tag key's change: `before` → `after` (`None`: no such tag).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagChange {
    pub key: String,
    pub before: Option<String>,
    pub after: Option<String>,
}

#[derive(Clone, Debug)]
struct PendingChange {
    visible_at: Instant,
    change: TagChange,
}

/// An instance's state as a listing shows it (`instanceState`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateShown {
    pub code: String,
    pub name: String,
}

#[derive(Clone, Debug)]
struct PendingState {
    visible_at: Instant,
    /// The state before the call: shown until the change is visible.
    before: StateShown,
}

/// What is not visible yet.
#[derive(Debug)]
pub struct Consistency {
    lag: Lag,
    rng: SplitMix64,
    /// Instance id → when it appears in listings.
    appearing: HashMap<String, Instant>,
    /// Instance id → its pending tag changes, oldest first.
    tags: HashMap<String, Vec<PendingChange>>,
    /// Instance id → its pending state changes, oldest first.
    states: HashMap<String, Vec<PendingState>>,
}

impl Consistency {
    pub fn new(lag: Lag, seed: u64) -> Consistency {
        Consistency {
            lag,
            rng: SplitMix64::new(seed),
            appearing: HashMap::new(),
            tags: HashMap::new(),
            states: HashMap::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        !self.lag.is_none()
    }

    fn draw(&mut self) -> Duration {
        let unit = self.rng.next_f64();
        self.lag.draw(unit)
    }

    /// A launched instance: it appears after one lag, the tags it was
    /// launched with after another.
    pub fn launched(&mut self, now: Instant, instance_id: &str, tags: &[(String, String)]) {
        if !self.enabled() {
            return;
        }
        let appears = now + self.draw();
        self.appearing.insert(instance_id.to_string(), appears);
        let changes = tags
            .iter()
            .map(|(k, v)| TagChange {
                key: k.clone(),
                before: None,
                after: Some(v.clone()),
            })
            .collect();
        self.tags_changed(now, instance_id, changes);
    }

    /// `CreateTags`/`DeleteTags` on one instance (changes of one call
    /// become visible together).
    pub fn tags_changed(&mut self, now: Instant, instance_id: &str, changes: Vec<TagChange>) {
        if !self.enabled() || changes.is_empty() {
            return;
        }
        let mut visible_at = now + self.draw();
        let pending = self.tags.entry(instance_id.to_string()).or_default();
        if let Some(last) = pending.last() {
            visible_at = visible_at.max(last.visible_at);
        }
        pending.extend(
            changes
                .into_iter()
                .map(|change| PendingChange { visible_at, change }),
        );
    }

    /// A state change of one instance (`before` is what it was). Changes
    /// of one instance become visible in the order they were made.
    pub fn state_changed(&mut self, now: Instant, instance_id: &str, before: StateShown) {
        if !self.enabled() {
            return;
        }
        let mut visible_at = now + self.draw();
        let pending = self.states.entry(instance_id.to_string()).or_default();
        if let Some(last) = pending.last() {
            visible_at = visible_at.max(last.visible_at);
        }
        pending.push(PendingState { visible_at, before });
    }

    /// What is pending at `now` (and forgets what no longer is).
    pub fn view(&mut self, now: Instant) -> View {
        self.appearing.retain(|_, at| *at > now);
        self.tags.retain(|_, changes| {
            changes.retain(|c| c.visible_at > now);
            !changes.is_empty()
        });
        self.states.retain(|_, changes| {
            changes.retain(|c| c.visible_at > now);
            !changes.is_empty()
        });
        View {
            states: self
                .states
                .iter()
                .filter_map(|(id, changes)| Some((id.clone(), changes.first()?.before.clone())))
                .collect(),
            hidden: self.appearing.keys().cloned().collect(),
            undo: self
                .tags
                .iter()
                .map(|(id, changes)| {
                    (
                        id.clone(),
                        changes.iter().map(|c| c.change.clone()).collect(),
                    )
                })
                .collect(),
        }
    }
}

/// The pending changes at one moment.
#[derive(Clone, Debug, Default)]
pub struct View {
    hidden: std::collections::HashSet<String>,
    /// Instance id → its invisible tag changes, oldest first.
    undo: HashMap<String, Vec<TagChange>>,
    /// Instance id → the state a listing still shows.
    states: HashMap<String, StateShown>,
}

impl View {
    /// Nothing is pending: moto's answer is the listing.
    pub fn is_empty(&self) -> bool {
        self.hidden.is_empty() && self.undo.is_empty() && self.states.is_empty()
    }

    /// Some state change is pending (state filters must be evaluated here).
    pub fn has_state_changes(&self) -> bool {
        !self.states.is_empty()
    }

    /// The state a listing shows for `instance_id` while its change is
    /// pending; `None`: moto's.
    pub fn visible_state(&self, instance_id: &str) -> Option<&StateShown> {
        self.states.get(instance_id)
    }

    /// Some tag change is pending (tag filters must be evaluated here).
    pub fn has_tag_changes(&self) -> bool {
        !self.undo.is_empty()
    }

    pub fn is_hidden(&self, instance_id: &str) -> bool {
        self.hidden.contains(instance_id)
    }

    pub fn has_pending_tags(&self, instance_id: &str) -> bool {
        self.undo.contains_key(instance_id)
    }

    /// The tags a listing shows for `instance_id`, given moto's `current`.
    pub fn visible_tags(
        &self,
        instance_id: &str,
        mut current: BTreeMap<String, String>,
    ) -> BTreeMap<String, String> {
        if let Some(changes) = self.undo.get(instance_id) {
            for c in changes.iter().rev() {
                match &c.before {
                    Some(v) => {
                        current.insert(c.key.clone(), v.clone());
                    }
                    None => {
                        current.remove(&c.key);
                    }
                }
            }
        }
        current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn set(key: &str, before: Option<&str>, after: Option<&str>) -> TagChange {
        TagChange {
            key: key.into(),
            before: before.map(Into::into),
            after: after.map(Into::into),
        }
    }

    #[test]
    fn an_instance_and_its_launch_tags_appear_after_their_lag() {
        let mut c = Consistency::new(Lag::Fixed(Duration::from_secs(2)), 1);
        let t0 = Instant::now();
        c.launched(t0, "i-1", &[("Name".into(), "web".into())]);
        let v = c.view(t0 + Duration::from_secs(1));
        assert!(v.is_hidden("i-1"));
        assert_eq!(v.visible_tags("i-1", tags(&[("Name", "web")])), tags(&[]));
        let v = c.view(t0 + Duration::from_secs(2));
        assert!(v.is_empty(), "{v:?}");
    }

    #[test]
    fn pending_tag_changes_are_undone_newest_first_and_land_in_order() {
        let mut c = Consistency::new(
            Lag::Uniform {
                min: Duration::ZERO,
                max: Duration::from_secs(3),
            },
            7,
        );
        let t0 = Instant::now();
        c.tags_changed(
            t0,
            "i-1",
            vec![set("phase", Some("serving"), Some("draining"))],
        );
        c.tags_changed(
            t0,
            "i-1",
            vec![
                set("phase", Some("draining"), Some("gone")),
                set("x", None, Some("1")),
            ],
        );
        let now = tags(&[("phase", "gone"), ("x", "1"), ("keep", "k")]);
        let v = c.view(t0);
        assert_eq!(
            v.visible_tags("i-1", now.clone()),
            tags(&[("phase", "serving"), ("keep", "k")])
        );
        // Whatever the draws, an earlier change is never hidden behind a
        // later visible one.
        for ms in (0..3200).step_by(50) {
            let shown = c
                .view(t0 + Duration::from_millis(ms))
                .visible_tags("i-1", now.clone());
            let phase = shown.get("phase").map(String::as_str);
            assert!(
                matches!(phase, Some("serving" | "draining" | "gone")),
                "{shown:?}"
            );
            if phase == Some("gone") {
                assert_eq!(shown.get("x").map(String::as_str), Some("1"));
            }
        }
        assert!(c.view(t0 + Duration::from_secs(4)).is_empty());
    }

    #[test]
    fn a_state_change_shows_the_state_before_it_until_its_lag_and_in_order() {
        let mut c = Consistency::new(
            Lag::Uniform {
                min: Duration::from_millis(500),
                max: Duration::from_secs(3),
            },
            3,
        );
        let t0 = Instant::now();
        let shown = |code: &str, name: &str| StateShown {
            code: code.into(),
            name: name.into(),
        };
        c.state_changed(t0, "i-1", shown("80", "stopped"));
        c.state_changed(t0, "i-1", shown("16", "running"));
        let v = c.view(t0 + Duration::from_millis(100));
        assert!(v.has_state_changes());
        assert_eq!(v.visible_state("i-1"), Some(&shown("80", "stopped")));
        assert_eq!(v.visible_state("i-2"), None);
        // Started, then stopped: never shown stopped after the start shows
        // and before the stop does in the wrong order.
        let mut seen = Vec::new();
        for ms in (0..3200).step_by(50) {
            let name = c
                .view(t0 + Duration::from_millis(ms))
                .visible_state("i-1")
                .map(|s| s.name.clone());
            if seen.last() != Some(&name) {
                seen.push(name);
            }
        }
        assert!(
            matches!(
                seen.as_slice(),
                [Some(a), Some(b), None] if a == "stopped" && b == "running"
            ) || matches!(seen.as_slice(), [Some(a), None] if a == "stopped"),
            "{seen:?}"
        );
        assert!(c.view(t0 + Duration::from_secs(4)).is_empty());
    }

    #[test]
    fn no_lag_records_nothing() {
        let mut c = Consistency::new(Lag::None, 1);
        let t0 = Instant::now();
        c.launched(t0, "i-1", &[("a".into(), "b".into())]);
        c.state_changed(
            t0,
            "i-1",
            StateShown {
                code: "16".into(),
                name: "running".into(),
            },
        );
        assert!(c.view(t0).is_empty());
    }
}
