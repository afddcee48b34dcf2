//! Which release the fleet should run, and when to give up on one.
//!
//! Pure bookkeeping over [`ReleaseStatus`]: the spec names the *desired*
//! release; the *target* is what new nodes get and in-service nodes are
//! rolled to. They differ when the desired release failed (a node failed
//! its health check on it, or its 5xx rate triggered an auto-rollback): then
//! the target is the last good release and nothing is rolled until the spec
//! names another release.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use hangar_crds::{ClusterSpec, Rollback};
use serde::{Deserialize, Serialize};

/// The rollout's memory of one cluster (part of [`crate::core::Memory`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseStatus {
    /// The release the spec asks for.
    pub desired: String,
    /// The release new nodes get and the fleet is rolled to (differs from
    /// `desired` after a failed or rolled-back release).
    pub target: String,
    /// Last release that was fully rolled out and healthy.
    pub last_good: Option<String>,
    /// Releases that failed (health or auto-rollback); never rolled again
    /// until the spec names another release.
    pub failed: Vec<String>,
    /// Set while an emergency rollback away from this release runs.
    pub rolling_back_from: Option<String>,
    /// When the target release was first activated on a serving node
    /// (the auto-rollback window starts here).
    pub activated_at: Option<DateTime<Utc>>,
    /// In-service nodes not yet on the target.
    pub outdated: u32,
    /// Artifacts of recent releases, so the last good one can still be
    /// shipped after the spec moved on.
    pub known: BTreeMap<String, KnownRelease>,
    /// Nodes on the target release.
    pub on_target: u32,
    /// Releases rolled back for their error rate: no node may serve them,
    /// also one that reached service after the rollback began (an update
    /// past its last safe point when it was asked to stop).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rolled_back: Vec<String>,
    /// Releases whose `once` hooks succeeded: never run again.
    #[serde(default)]
    pub once_done: Vec<String>,
    /// Where the `once` hooks of the desired release run: that node, and
    /// only that node, until they end — also after an operator restart,
    /// when the run may still be going on there.
    #[serde(default)]
    pub once_running: Option<OnceRun>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OnceRun {
    pub release: String,
    pub node: String,
    pub since: DateTime<Utc>,
}

/// Releases whose once hooks are remembered as done.
const ONCE_DONE_KEPT: usize = 20;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KnownRelease {
    pub artifact: String,
    pub sha256: String,
    pub first_seen: Option<DateTime<Utc>>,
}

/// Something worth an activity entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Started {
        release: String,
    },
    /// Every serving node runs it, and the auto-rollback window (if any) passed.
    Proven {
        release: String,
    },
    Halted {
        release: String,
        reason: String,
    },
    RollingBack {
        from: String,
        to: String,
        reason: String,
    },
    RolledBack {
        from: String,
        to: String,
    },
}

/// The fleet-level facts a rollout decision needs.
#[derive(Clone, Debug)]
pub struct Observed<'a> {
    /// Release of every in-service node (`None`: tag missing).
    pub serving: &'a [Option<&'a str>],
    /// No node is mid-update and none is outdated on config.
    pub settled: bool,
    /// The desired release has `once` hooks.
    pub once_hooks: bool,
    pub now: DateTime<Utc>,
}

/// Brings `state` up to date with the spec and the fleet; returns what happened.
pub fn observe(
    state: &mut ReleaseStatus,
    desired: &str,
    rollback: Option<&Rollback>,
    seen: &Observed<'_>,
) -> Vec<Event> {
    let mut events = Vec::new();
    if state.last_good.is_none() {
        state.last_good = infer_last_good(desired, seen.serving);
    }
    if state.desired != desired {
        if !state.desired.is_empty() {
            events.push(Event::Started {
                release: desired.to_string(),
            });
        }
        state.desired = desired.to_string();
        state.activated_at = None;
    }
    // A release that failed is not retried until the spec names another;
    // naming it again later (a fixed build reusing the id) is on the user.
    let failed = state.failed.iter().any(|r| r == desired);
    // Until its once hooks ran, no node activates a release: the fleet
    // stays on the last good one (a first release holds its nodes before
    // activation instead, see `once_gated`).
    let gated = once_gated(state, desired, seen.once_hooks);
    state.target = if failed || gated {
        state
            .last_good
            .clone()
            .unwrap_or_else(|| desired.to_string())
    } else {
        desired.to_string()
    };

    if state.rolling_back_from.is_none() {
        // A node serving a rolled-back release again: roll it back too.
        state.rolling_back_from = state
            .rolled_back
            .iter()
            .find(|bad| **bad != state.target && seen.serving.contains(&Some(bad.as_str())))
            .cloned();
    }
    if let Some(bad) = state.rolling_back_from.clone() {
        if !seen.serving.contains(&Some(bad.as_str())) {
            state.rolling_back_from = None;
            events.push(Event::RolledBack {
                from: bad,
                to: state.target.clone(),
            });
        }
    }

    let on_target = seen
        .serving
        .iter()
        .filter(|r| **r == Some(state.target.as_str()))
        .count() as u32;
    state.on_target = on_target;
    state.outdated = seen.serving.len() as u32 - on_target;
    // Only the desired release itself is activated or proven: a fleet held
    // on the last good one (failed, or waiting for once hooks) proves
    // nothing about it.
    let on_desired = !failed && state.target == desired;
    if on_desired
        && on_target > 0
        && state.activated_at.is_none()
        && state.last_good.as_deref() != Some(desired)
    {
        state.activated_at = Some(seen.now);
    }

    let complete = on_desired && state.outdated == 0 && on_target > 0 && seen.settled;
    if complete && state.last_good.as_deref() != Some(desired) {
        let window_over = match (rollback, state.activated_at) {
            (Some(rb), Some(at)) => {
                seen.now >= at + chrono::Duration::from_std(rb.window.get()).unwrap_or_default()
            }
            _ => true,
        };
        if window_over {
            state.last_good = Some(desired.to_string());
            state.activated_at = None;
            events.push(Event::Proven {
                release: desired.to_string(),
            });
        }
    }
    events
}

/// Whether the auto-rollback window is open for the target release (the
/// caller then fetches the 5xx and request counts since `activated_at`).
pub fn watching(
    state: &ReleaseStatus,
    rollback: Option<&Rollback>,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let rb = rollback?;
    let at = state.activated_at?;
    let open = state.rolling_back_from.is_none()
        && state.target == state.desired
        && state
            .last_good
            .as_deref()
            .is_some_and(|g| g != state.target)
        && now < at + chrono::Duration::from_std(rb.window.get()).unwrap_or_default();
    open.then_some(at)
}

/// Decides on the error counts seen since activation; starts a rollback
/// when they are over the threshold.
pub fn judge(
    state: &mut ReleaseStatus,
    rollback: &Rollback,
    errors_5xx: f64,
    requests: f64,
) -> Option<Event> {
    if requests < rollback.min_requests as f64 || requests <= 0.0 {
        return None;
    }
    let rate = errors_5xx / requests;
    if rate <= rollback.error_rate_above {
        return None;
    }
    let good = state.last_good.clone()?;
    let bad = state.target.clone();
    let reason = format!(
        "5xx rate {:.1}% over {requests:.0} requests is above {:.1}%",
        rate * 100.0,
        rollback.error_rate_above * 100.0
    );
    state.failed.push(bad.clone());
    if !state.rolled_back.contains(&bad) {
        state.rolled_back.push(bad.clone());
        let excess = state.rolled_back.len().saturating_sub(ONCE_DONE_KEPT);
        state.rolled_back.drain(..excess);
    }
    state.rolling_back_from = Some(bad.clone());
    state.target = good.clone();
    state.activated_at = None;
    Some(Event::RollingBack {
        from: bad,
        to: good,
        reason,
    })
}

/// A node failed its health check on `release`: halt the rollout.
pub fn fail(state: &mut ReleaseStatus, release: &str, reason: &str) -> Option<Event> {
    if state.failed.iter().any(|r| r == release) {
        return None;
    }
    state.failed.push(release.to_string());
    if state.target == release {
        if let Some(good) = &state.last_good {
            state.target = good.clone();
        }
    }
    state.activated_at = None;
    Some(Event::Halted {
        release: release.to_string(),
        reason: reason.to_string(),
    })
}

/// How many releases' artifacts [`remember`] keeps.
const KNOWN_RELEASES: usize = 10;

/// Keeps the artifact of every recent release, so the last good one can
/// be shipped to new nodes even after the spec names a failing one.
pub fn remember(state: &mut ReleaseStatus, spec: &ClusterSpec, now: DateTime<Utc>) {
    let r = &spec.release;
    let entry = state.known.entry(r.id.clone()).or_default();
    if entry.artifact != r.artifact || entry.sha256 != r.sha256 {
        *entry = KnownRelease {
            artifact: r.artifact.clone(),
            sha256: r.sha256.clone(),
            first_seen: Some(now),
        };
    }
    while state.known.len() > KNOWN_RELEASES {
        let keep = [
            Some(r.id.as_str()),
            state.last_good.as_deref(),
            Some(state.target.as_str()),
        ];
        let oldest = state
            .known
            .iter()
            .filter(|(id, _)| !keep.contains(&Some(id.as_str())))
            .min_by_key(|(_, k)| k.first_seen)
            .map(|(id, _)| id.clone());
        match oldest {
            Some(id) => state.known.remove(&id),
            None => break,
        };
    }
}

/// The desired release has `once` hooks that have not succeeded yet (and
/// it has not failed).
pub fn once_gated(state: &ReleaseStatus, desired: &str, once_hooks: bool) -> bool {
    once_hooks
        && !state.once_done.iter().any(|r| r == desired)
        && !state.failed.iter().any(|r| r == desired)
}

/// The once hooks of `release` succeeded.
pub fn once_succeeded(state: &mut ReleaseStatus, release: &str) {
    state.once_running = None;
    if !state.once_done.iter().any(|r| r == release) {
        state.once_done.push(release.to_string());
    }
    let excess = state.once_done.len().saturating_sub(ONCE_DONE_KEPT);
    state.once_done.drain(..excess);
}

/// Updates of serving nodes are paused: the desired release failed and no
/// emergency rollback is running.
pub fn halted(state: &ReleaseStatus) -> bool {
    state.failed.contains(&state.desired) && state.rolling_back_from.is_none()
}

/// Without memory (first start, lost state dir) the release most serving
/// nodes run is taken as good, unless it is the one being rolled out.
fn infer_last_good(desired: &str, serving: &[Option<&str>]) -> Option<String> {
    let mut counts: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for r in serving.iter().flatten() {
        *counts.entry(r).or_default() += 1;
    }
    if counts.len() == 1 {
        return counts.keys().next().map(|r| r.to_string());
    }
    counts
        .into_iter()
        .filter(|(r, _)| *r != desired)
        .max_by_key(|(_, n)| *n)
        .map(|(r, _)| r.to_string())
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn t(min: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap() + chrono::Duration::minutes(min)
    }

    fn rb() -> Rollback {
        Rollback {
            error_rate_above: 0.05,
            window: "5m".parse().unwrap(),
            min_requests: 20,
        }
    }

    fn seen<'a>(serving: &'a [Option<&'a str>], now: DateTime<Utc>) -> Observed<'a> {
        Observed {
            serving,
            settled: true,
            once_hooks: false,
            now,
        }
    }

    #[test]
    fn a_rollout_completes_then_is_proven_after_the_window() {
        let mut s = ReleaseStatus::default();
        observe(
            &mut s,
            "v1",
            Some(&rb()),
            &seen(&[Some("v1"), Some("v1")], t(0)),
        );
        assert_eq!(
            s.last_good.as_deref(),
            Some("v1"),
            "inferred from the fleet"
        );

        let ev = observe(
            &mut s,
            "v2",
            Some(&rb()),
            &seen(&[Some("v1"), Some("v1")], t(1)),
        );
        assert_eq!(
            ev,
            [Event::Started {
                release: "v2".into()
            }]
        );
        assert_eq!((s.target.as_str(), s.outdated), ("v2", 2));

        observe(
            &mut s,
            "v2",
            Some(&rb()),
            &seen(&[Some("v2"), Some("v1")], t(2)),
        );
        assert_eq!(s.activated_at, Some(t(2)));
        assert_eq!(watching(&s, Some(&rb()), t(3)), Some(t(2)));

        observe(
            &mut s,
            "v2",
            Some(&rb()),
            &seen(&[Some("v2"), Some("v2")], t(3)),
        );
        assert_eq!(
            s.last_good.as_deref(),
            Some("v1"),
            "not proven inside the window"
        );
        let ev = observe(
            &mut s,
            "v2",
            Some(&rb()),
            &seen(&[Some("v2"), Some("v2")], t(8)),
        );
        assert_eq!(
            ev,
            [Event::Proven {
                release: "v2".into()
            }]
        );
        assert_eq!(s.last_good.as_deref(), Some("v2"));
        assert_eq!(watching(&s, Some(&rb()), t(9)), None);
    }

    #[test]
    fn a_5xx_spike_rolls_the_fleet_back() {
        let mut s = ReleaseStatus::default();
        observe(&mut s, "v1", Some(&rb()), &seen(&[Some("v1")], t(0)));
        observe(&mut s, "v2", Some(&rb()), &seen(&[Some("v2")], t(1)));
        assert!(watching(&s, Some(&rb()), t(2)).is_some());
        assert_eq!(
            judge(&mut s, &rb(), 1.0, 10.0),
            None,
            "too few requests to judge"
        );
        assert_eq!(judge(&mut s, &rb(), 2.0, 100.0), None, "2% is under 5%");
        let ev = judge(&mut s, &rb(), 30.0, 100.0).unwrap();
        assert!(
            matches!(&ev, Event::RollingBack { from, to, .. } if from == "v2" && to == "v1"),
            "{ev:?}"
        );
        assert_eq!(s.target, "v1");
        assert_eq!(s.rolling_back_from.as_deref(), Some("v2"));
        assert!(!halted(&s), "a rollback is running, not a halt");

        // Once no serving node runs v2 any more, the rollback is done; v2 stays failed.
        let ev = observe(&mut s, "v2", Some(&rb()), &seen(&[Some("v1")], t(3)));
        assert_eq!(
            ev,
            [Event::RolledBack {
                from: "v2".into(),
                to: "v1".into()
            }]
        );
        assert_eq!(s.target, "v1");
        assert!(halted(&s));
        // A new release in the spec moves on.
        observe(&mut s, "v3", Some(&rb()), &seen(&[Some("v1")], t(4)));
        assert_eq!(s.target, "v3");
        assert!(!halted(&s));
    }

    #[test]
    fn a_node_failing_the_release_halts_the_rollout() {
        let mut s = ReleaseStatus::default();
        observe(&mut s, "v1", None, &seen(&[Some("v1"), Some("v1")], t(0)));
        observe(&mut s, "v2", None, &seen(&[Some("v1"), Some("v1")], t(1)));
        let ev = fail(&mut s, "v2", "health check failed on i-1").unwrap();
        assert!(matches!(ev, Event::Halted { .. }));
        assert!(fail(&mut s, "v2", "again").is_none(), "reported once");
        observe(&mut s, "v2", None, &seen(&[Some("v1"), Some("v1")], t(2)));
        assert!(halted(&s));
        assert_eq!(s.target, "v1", "new nodes get the last good release");
    }

    #[test]
    fn the_first_release_ever_has_nothing_to_fall_back_to() {
        let mut s = ReleaseStatus::default();
        observe(&mut s, "v1", Some(&rb()), &seen(&[], t(0)));
        fail(&mut s, "v1", "health");
        observe(&mut s, "v1", Some(&rb()), &seen(&[], t(1)));
        assert_eq!(s.target, "v1");
        assert!(halted(&s));
        assert_eq!(
            judge(&mut s, &rb(), 100.0, 100.0),
            None,
            "no good release to roll back to"
        );
    }

    #[test]
    fn inference_prefers_the_majority_that_is_not_being_rolled_out() {
        assert_eq!(
            infer_last_good("v3", &[Some("v2"), Some("v3"), Some("v2")]),
            Some("v2".into())
        );
        assert_eq!(infer_last_good("v3", &[Some("v3")]), Some("v3".into()));
        assert_eq!(infer_last_good("v3", &[]), None);
    }
}
