//! How many nodes a cluster should have right now.
//!
//! Pure: the spec, the time, the latest traffic reading and the recent
//! recommendations go in; a [`Decision`] with a human-readable reason comes
//! out. No I/O and no clock, so every rule here is tested directly.
//!
//! The algorithm is Kubernetes' HPA target tracking, adapted to VMs:
//! 1. the effective `[min, max]` is the spec's capacity, overridden by the
//!    schedule window open at `now` (the most recently opened one wins);
//! 2. the raw recommendation is `ceil(rate / targetPerNode)`, or the current
//!    count when the rate is within `tolerance` of the target;
//! 3. stabilization: scale up to the *lowest* recommendation seen within the
//!    scale-up window, down to the *highest* seen within the scale-down window
//!    (so a brief dip never sheds nodes);
//! 4. at most `maxStep` nodes per evaluation in either direction (between
//!    evaluations [`for_pass`] holds the decision, moved only by the window);
//! 5. clamped to the effective window, which always wins.
//!
//! A missing or stale metric holds the current count (never scale down on
//! missing data), still within the window.

use std::collections::VecDeque;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use hangar_crds::schedule::Window;
use hangar_crds::ClusterSpec;
use serde::{Deserialize, Serialize};

/// A traffic reading: the cluster's total request rate.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    pub requests_per_minute: f64,
    pub observed_at: DateTime<Utc>,
}

/// A past raw recommendation, kept for stabilization.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recommendation {
    pub at: DateTime<Utc>,
    pub nodes: u32,
}

/// The recent recommendations of one cluster, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    recommendations: VecDeque<Recommendation>,
}

impl History {
    /// Records `rec` and forgets what no stabilization window can see anymore.
    ///
    /// Equal consecutive recommendations are kept as one entry stamped with
    /// the latest time: windows only ask "was N recommended after T", so
    /// this is exact, and a steady cluster's history stays one entry long.
    pub fn record(&mut self, rec: Recommendation, spec: &ClusterSpec) {
        match self.recommendations.back_mut() {
            Some(last) if last.nodes == rec.nodes => last.at = last.at.max(rec.at),
            _ => self.recommendations.push_back(rec),
        }
        let horizon = spec
            .autoscaling
            .as_ref()
            .map(|a| {
                a.scale_up
                    .stabilization
                    .max(a.scale_down.stabilization)
                    .get()
            })
            .unwrap_or_default();
        let horizon = chrono::Duration::from_std(horizon).unwrap_or(chrono::Duration::MAX);
        while let Some(oldest) = self.recommendations.front() {
            if rec.at.signed_duration_since(oldest.at) > horizon {
                self.recommendations.pop_front();
            } else {
                break;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.recommendations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.recommendations.is_empty()
    }

    fn since(&self, cutoff: DateTime<Utc>) -> impl Iterator<Item = u32> + '_ {
        self.recommendations
            .iter()
            .filter(move |r| r.at > cutoff)
            .map(|r| r.nodes)
    }
}

/// The capacity bounds in force at some instant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EffectiveCapacity {
    pub min: u32,
    pub max: u32,
    /// The schedule window that set them, if any.
    pub schedule: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Nodes the cluster should have (launching through in-service).
    pub desired: u32,
    pub window: EffectiveCapacity,
    /// To append to the [`History`] (absent when the metric was missing).
    pub recommendation: Option<Recommendation>,
    /// Why, in words a person on call can act on.
    pub reason: String,
}

/// The capacity window in force at `now`.
pub fn effective_capacity(spec: &ClusterSpec, now: DateTime<Utc>) -> EffectiveCapacity {
    let mut best: Option<(DateTime<Utc>, &hangar_crds::Schedule)> = None;
    for schedule in &spec.schedules {
        // Validation guarantees schedules parse; one that does not is ignored
        // rather than taking the cluster down.
        let Ok(window) = Window::parse(schedule) else {
            continue;
        };
        if let Some(opened) = window.open_since(now) {
            if best.is_none_or(|(t, _)| opened > t) {
                best = Some((opened, schedule));
            }
        }
    }
    match best {
        None => EffectiveCapacity {
            min: spec.capacity.min,
            max: spec.capacity.max,
            schedule: None,
        },
        Some((_, s)) => {
            let max = s.capacity.max.unwrap_or(spec.capacity.max);
            let min = s.capacity.min.unwrap_or(spec.capacity.min).min(max);
            EffectiveCapacity {
                min,
                max,
                schedule: Some(s.name.clone()),
            }
        }
    }
}

/// Decides the desired node count. `current` is the number of nodes that
/// count toward capacity now (launching through in-service). `metric` is
/// the cluster's total rate; turning a per-target metric into a total is
/// the caller's job, over the nodes actually in service (warming nodes
/// carry no traffic yet).
pub fn plan(
    spec: &ClusterSpec,
    now: DateTime<Utc>,
    current: u32,
    metric: Option<Reading>,
    history: &History,
) -> Decision {
    let window = effective_capacity(spec, now);
    let mut reason = String::new();
    let (wanted, recommendation) = match &spec.autoscaling {
        None => {
            let _ = write!(reason, "no autoscaling: run at min {}", window.min);
            (window.min, None)
        }
        Some(auto) => match fresh(metric, now, auto.metric_max_age.get()) {
            Err(why) => {
                let _ = write!(reason, "{why}: hold {current}");
                (current, None)
            }
            Ok(obs) => {
                let raw = recommend(
                    obs.requests_per_minute,
                    auto.target_per_node,
                    auto.tolerance,
                    current,
                    &mut reason,
                );
                let rec = Recommendation {
                    at: now,
                    nodes: raw,
                };
                let stabilized = stabilize(raw, current, now, auto, history, &mut reason);
                (
                    limit_step(stabilized, current, auto, &mut reason),
                    Some(rec),
                )
            }
        },
    };
    finish(window, wanted, current, recommendation, reason)
}

/// What a reconcile pass knows when it asks for a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pass {
    /// The decision in force, made by this process; `None` on its first
    /// pass, when a decision loaded from disk may predate a crash (nodes
    /// launched, the new count not yet saved).
    pub standing: Option<u32>,
    /// Nodes that count toward capacity now (launching through in-service).
    pub counted: u32,
    /// An `evaluationInterval` has passed since the last evaluation.
    pub evaluation_due: bool,
}

impl Pass {
    /// Whether this pass runs the planner (rather than [`hold`]).
    pub fn evaluates(&self, spec: &ClusterSpec) -> bool {
        self.standing.is_none() || self.evaluation_due || spec.autoscaling.is_none()
    }
}

/// The decision of one reconcile pass. Reconcile runs on every node event,
/// not only on evaluation ticks: re-planning on each would apply `maxStep`
/// again to the same reading (4 → 3 → 2 within a second instead of one
/// step per `evaluationInterval`), so between evaluations the decision
/// holds. The planner starts from the standing decision, not the nodes
/// counted: a node that died is replaced, not voted away.
pub fn for_pass(
    spec: &ClusterSpec,
    now: DateTime<Utc>,
    pass: &Pass,
    metric: Option<Reading>,
    history: &History,
) -> Decision {
    let current = pass.standing.unwrap_or(pass.counted);
    if pass.evaluates(spec) {
        plan(spec, now, current, metric, history)
    } else {
        hold(spec, now, current)
    }
}

/// What a pass between two evaluations decides: `desired` stands, moved
/// only by the capacity window.
pub fn hold(spec: &ClusterSpec, now: DateTime<Utc>, desired: u32) -> Decision {
    let window = effective_capacity(spec, now);
    let reason = format!("until the next evaluation: hold {desired}");
    finish(window, desired, desired, None, reason)
}

/// Clamps `wanted` to the window, which always wins, and says so.
fn finish(
    window: EffectiveCapacity,
    wanted: u32,
    current: u32,
    recommendation: Option<Recommendation>,
    mut reason: String,
) -> Decision {
    let desired = wanted.clamp(window.min, window.max);
    if desired != wanted || window.schedule.is_some() {
        let bound = if wanted > window.max {
            format!("max {}", window.max)
        } else if wanted < window.min {
            format!("min {}", window.min)
        } else {
            format!("window [{}, {}]", window.min, window.max)
        };
        let who = match &window.schedule {
            Some(name) => format!("{name} schedule active"),
            None => "capacity".to_string(),
        };
        let _ = write!(reason, "; {who}: {bound}");
    }
    let _ = write!(reason, " → {}", change(current, desired));
    Decision {
        desired,
        window,
        recommendation,
        reason,
    }
}

fn fresh(
    metric: Option<Reading>,
    now: DateTime<Utc>,
    max_age: std::time::Duration,
) -> Result<Reading, String> {
    let obs = metric.ok_or_else(|| "no traffic metric".to_string())?;
    let age = now
        .signed_duration_since(obs.observed_at)
        .to_std()
        .unwrap_or_default();
    if age > max_age {
        return Err(format!("traffic metric is {}s old (stale)", age.as_secs()));
    }
    if !obs.requests_per_minute.is_finite() || obs.requests_per_minute < 0.0 {
        return Err(format!(
            "traffic metric {} is not a rate",
            obs.requests_per_minute
        ));
    }
    Ok(obs)
}

/// Target tracking: `ceil(rate / target)`, unless within tolerance.
fn recommend(rate: f64, target: f64, tolerance: f64, current: u32, reason: &mut String) -> u32 {
    let ratio = rate / (f64::from(current.max(1)) * target);
    if current > 0 && (ratio - 1.0).abs() <= tolerance {
        let _ = write!(
            reason,
            "rate {rate:.0}/min over {current} nodes is within {:.0}% of target {target:.0}",
            tolerance * 100.0
        );
        return current;
    }
    let raw = (rate / target).ceil();
    let raw = if raw >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        raw as u32
    };
    let cmp = if ratio > 1.0 { ">" } else { "<" };
    let _ = write!(
        reason,
        "rate {rate:.0}/min over {current} nodes {cmp} target {target:.0}: {raw} needed"
    );
    raw
}

fn stabilize(
    raw: u32,
    current: u32,
    now: DateTime<Utc>,
    auto: &hangar_crds::Autoscaling,
    history: &History,
    reason: &mut String,
) -> u32 {
    let cutoff = |d: hangar_crds::Duration| {
        now - chrono::Duration::from_std(d.get()).unwrap_or(chrono::Duration::MAX)
    };
    let up = history
        .since(cutoff(auto.scale_up.stabilization))
        .fold(raw, u32::min);
    let down = history
        .since(cutoff(auto.scale_down.stabilization))
        .fold(raw, u32::max);
    let mut target = current;
    if target < up {
        target = up;
    }
    if target > down {
        target = down;
    }
    if raw > current && target < raw {
        let _ = write!(
            reason,
            "; scale-up stabilization ({}) holds at {target}",
            auto.scale_up.stabilization
        );
    } else if raw < current && target > raw {
        let _ = write!(
            reason,
            "; scale-down stabilization ({}) holds at {target}",
            auto.scale_down.stabilization
        );
    }
    target
}

fn limit_step(
    target: u32,
    current: u32,
    auto: &hangar_crds::Autoscaling,
    reason: &mut String,
) -> u32 {
    if target > current && target - current > auto.scale_up.max_step {
        let _ = write!(reason, "; step limited to +{}", auto.scale_up.max_step);
        current + auto.scale_up.max_step
    } else if target < current && current - target > auto.scale_down.max_step {
        let _ = write!(reason, "; step limited to -{}", auto.scale_down.max_step);
        current - auto.scale_down.max_step
    } else {
        target
    }
}

fn change(current: u32, desired: u32) -> String {
    match desired.cmp(&current) {
        std::cmp::Ordering::Greater => format!("{desired} (+{})", desired - current),
        std::cmp::Ordering::Less => format!("{desired} (-{})", current - desired),
        std::cmp::Ordering::Equal => format!("{desired} (no change)"),
    }
}

#[cfg(test)]
mod tests;
