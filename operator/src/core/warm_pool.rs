//! The warm pool (EC2 Auto Scaling's): nodes launched, provisioned,
//! released and health-checked like any other, then kept out of the target
//! group in phase `warm` — stopped or running, as `warmPool.state` says —
//! so a scale-out starts one instead of waiting for a cold launch.
//!
//! Pure, called from [`crate::core::fleet::diff`]. What counts where:
//!
//! - **Pool members** are nodes tagged `warm` (unless a `Serve` task takes
//!   them into service) and nodes a `Warm` task is bringing in. They are
//!   not capacity: not in the planner's count, not in the fleet diff's
//!   `counted`, never registered, never scale-in victims.
//! - **Scale-out takes members first** (running ones before stopped ones):
//!   a `Serve` task starts the node, re-runs the runbook, ships the target
//!   release if the node lacks it, health-checks and registers it. From
//!   then on it is fleet.
//! - **Refill** happens only while the fleet is settled (every node in
//!   service, no launch in flight), within `max + size` machines: a pool
//!   launch is an ordinary launch whose node, once listed, is the fleet's
//!   surplus — and a surplus node not yet in service goes to the pool
//!   (a `Warm` task) instead of being drained, while the pool has room.
//! - **`reuseOnScaleIn`**: a serving scale-in victim goes to the pool too
//!   (drained and deregistered first), while the pool has room; else it is
//!   terminated as usual.
//! - **Staleness**: a member launched with other launch settings, or older
//!   than `maxLifetime`, is terminated (instance refresh, at once: it
//!   serves nothing) and the pool refills. A member on an old release or
//!   config is kept: `Serve` brings it up to date before it registers.
//!
//! Crash safety is the tags': a restarted operator sees `warm` nodes as
//! members, stops a running one the pool wants stopped, and a node caught
//! half-way into the pool is surplus again and sent on (see
//! [`crate::core::lifecycle`] for the step orders).

use std::collections::BTreeSet;

use hangar_cloud::{InstanceState, Phase};
use hangar_crds::WarmPoolState;

use crate::core::fleet::{spread, Action, Diff, Node, Target, Task};

/// In the pool: tagged `warm` and not being taken into service, or on its
/// way in.
pub fn is_member(n: &Node) -> bool {
    match &n.task {
        Some(Task::Warm { .. }) => true,
        Some(Task::Serve) => false,
        _ => n.phase == Phase::Warm,
    }
}

/// A stopped instance is expected (not a reason to replace it): a warm
/// node, or one a warm-pool task is stopping or starting.
pub fn may_be_stopped(n: &Node) -> bool {
    n.phase == Phase::Warm || matches!(n.task, Some(Task::Warm { .. } | Task::Serve))
}

/// The staying nodes, split into (fleet, pool members).
pub fn split<'n>(staying: &[&'n Node]) -> (Vec<&'n Node>, Vec<&'n Node>) {
    staying.iter().copied().partition(|n| !is_member(n))
}

fn size(t: &Target<'_>) -> u32 {
    t.warm_pool.map_or(0, |p| p.size)
}

fn stop(t: &Target<'_>) -> bool {
    t.warm_pool
        .is_none_or(|p| p.state == WarmPoolState::Stopped)
}

/// Scale-out takes warm nodes first: up to `missing` members that are
/// ready now (tagged `warm`, no task, not resting), running ones first
/// (no boot to wait for), then the longest-warm. Starts a `Serve` task on
/// each and returns them.
pub fn serve_first<'n>(
    diff: &mut Diff,
    fleet: &[&Node],
    pool: &[&'n Node],
    t: &Target<'_>,
) -> Vec<&'n Node> {
    let pending: u32 = t.pending.iter().map(|(_, n)| n).sum();
    let counted = fleet.len() as u32 + pending;
    let want = t.desired + diff.surge;
    // Held at `releasing`, nothing may be activated: cold launches only.
    if counted >= want || t.hold_at_releasing {
        return Vec::new();
    }
    let mut ready: Vec<&'n Node> = pool
        .iter()
        .copied()
        .filter(|n| n.phase == Phase::Warm && n.task.is_none() && !n.resting)
        .collect();
    ready.sort_by_key(|n| {
        (
            n.state != InstanceState::Running,
            n.launched_at,
            n.id.clone(),
        )
    });
    ready.truncate((want - counted) as usize);
    for n in &ready {
        diff.actions.push(Action::Start {
            node: n.id.clone(),
            task: Task::Serve,
        });
    }
    if !ready.is_empty() {
        diff.notes.push(format!(
            "taking {} node(s) from the warm pool: {}",
            ready.len(),
            ready
                .iter()
                .map(|n| n.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    ready
}

/// Room left in the pool once `served` members leave it for service.
pub fn room(pool: &[&Node], served: usize, t: &Target<'_>) -> u32 {
    size(t).saturating_sub(pool.len().saturating_sub(served) as u32)
}

/// The task for a scale-in victim when the pool takes it (and uses up a
/// place of `room`): a node not yet in service always, a serving one only
/// with `reuseOnScaleIn`. `None`: drain and terminate it.
pub fn take_victim(n: &Node, room: &mut u32, t: &Target<'_>) -> Option<Task> {
    let pool = t.warm_pool?;
    if *room == 0 || t.hold_at_releasing || n.protected {
        return None;
    }
    let serving = n.phase == Phase::InService;
    if serving && !pool.reuse_on_scale_in {
        return None;
    }
    // A machine to be replaced anyway is no pool material.
    if n.stale(t).is_some() {
        return None;
    }
    *room -= 1;
    Some(Task::Warm { stop: stop(t) })
}

/// The pool's own upkeep, after the fleet's capacity was decided: members
/// kept in the pool's state, the pool trimmed to `size`, and refilled
/// (while the fleet is settled) within `max + size` machines — counting
/// the `leaving` ones, which are machines until they are gone.
pub fn tend(
    diff: &mut Diff,
    fleet: &[&Node],
    pool: &[&Node],
    leaving: usize,
    served: &[&Node],
    room: u32,
    t: &Target<'_>,
) {
    let served: BTreeSet<&str> = served.iter().map(|n| n.id.as_str()).collect();
    let members: Vec<&Node> = pool
        .iter()
        .copied()
        .filter(|n| !served.contains(n.id.as_str()))
        .collect();
    let size = size(t);
    let stop = stop(t);
    // Trim: the pool shrank or went away.
    let mut extra = (members.len() as u32).saturating_sub(size) as usize;
    let mut by_cost: Vec<&Node> = members.clone();
    by_cost.sort_by_key(|n| (n.task.is_some(), std::cmp::Reverse(n.launched_at)));
    let mut trimmed = BTreeSet::new();
    for n in by_cost {
        if extra == 0 {
            break;
        }
        extra -= 1;
        trimmed.insert(n.id.as_str());
        match &n.task {
            None => diff.start(
                n,
                Task::Drain {
                    reason: format!("warm pool above its size ({size})"),
                },
            ),
            Some(Task::Drain { .. }) => {}
            Some(_) => diff.actions.push(Action::Cancel {
                node: n.id.clone(),
                reason: "warm pool above its size".into(),
            }),
        }
    }
    // Keep each member in the pool's state.
    for n in &members {
        if n.task.is_some() || trimmed.contains(n.id.as_str()) || n.phase != Phase::Warm {
            continue;
        }
        let wrong = match n.state {
            InstanceState::Running | InstanceState::Pending => stop,
            InstanceState::Stopped => !stop,
            _ => false,
        };
        if wrong {
            diff.start(n, Task::Warm { stop });
        }
    }
    let ready = members
        .iter()
        .filter(|n| n.phase == Phase::Warm && n.task.is_none())
        .count() as u32;
    diff.warm = ready;
    if size == 0 {
        return;
    }
    // Refill, in the background: only a settled fleet gets pool launches.
    let pending: u32 = t.pending.iter().map(|(_, n)| n).sum();
    let settled = pending == 0
        && fleet.len() as u32 >= t.desired + diff.surge
        && fleet.iter().all(|n| n.phase == Phase::InService);
    let machines = (fleet.len() + pool.len() + leaving) as u32;
    let cap = (t.max + size).saturating_sub(machines);
    let launch = room.min(cap);
    if settled && launch > 0 && t.launch_allowed && !t.hold_at_releasing {
        let all: Vec<&Node> = fleet.iter().chain(pool.iter()).copied().collect();
        for (subnet, count) in spread(launch, t.subnets, &all, t.pending) {
            diff.actions.push(Action::Launch { subnet, count });
        }
        diff.notes
            .push(format!("launching {launch} for the warm pool"));
    }
    let state = if stop { "stopped" } else { "running" };
    diff.notes.push(format!(
        "warm pool: {ready} of {size} ready ({state}), {} on the way",
        (members.len() as u32).saturating_sub(ready)
    ));
}
