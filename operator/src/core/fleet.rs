//! What to do with a cluster's nodes right now: launch, advance, update,
//! roll back, drain — given the desired count and what was observed.
//!
//! Pure: instances (from their tags), the tasks already running and the
//! recent failures go in; a list of [`Action`]s comes out. The reconciler
//! executes them. Every rule of DESIGN.md's invariants that is a *decision*
//! lives here, so it is tested without a cloud:
//!
//! - an instance counts toward capacity from the moment it exists;
//! - scale-in takes nodes not yet in service first, never a protected one;
//! - a rollout never takes more in-service nodes out than `maxUnavailable`
//!   allows, and surges extra nodes only when it must (`maxUnavailable: 0`);
//! - a node is replaced when it failed a step, stopped, or stayed unhealthy,
//!   never more than `maxUnhealthy` at once and never the last healthy one.

use std::collections::{BTreeMap, BTreeSet};

/// How the fleet's note on a running instance refresh begins (status's
/// `Degraded` message names a halted one by it).
pub const REFRESH_NOTE: &str = "instance refresh:";

/// How long a node hangar did not stop must be listed `stopped` before it
/// is taken for stopped and replaced. EC2's listing may show a start
/// seconds late, and an operator restarted just after starting a warm node
/// has no memory of that start (its own starts are laid over the listing,
/// see `runtime::inventory`); meanwhile the node gets no new task.
pub const STOPPED_BELIEVED_AFTER: chrono::Duration = chrono::Duration::seconds(10);

/// How long an in-service node must be missing from the target group
/// before it is registered again: longer than EC2's listing lags behind a
/// tag write (see `Memory::missing_from_group`).
pub const MISSING_BELIEVED_AFTER: chrono::Duration = chrono::Duration::seconds(10);

use chrono::{DateTime, Utc};
use hangar_cloud::{InstanceState, Phase};
use hangar_crds::{Rollout, ScaleInPolicy, SelfHealing};
use serde::{Deserialize, Serialize};

use crate::core::warm_pool;

/// Long work hangar runs for one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Task {
    /// Walk the node from its phase to in-service: provision, release,
    /// verify, register.
    Advance,
    /// Take an in-service node out of the target group, re-provision it if
    /// its config is outdated, give it `release`, verify it and put it back.
    Update { release: String },
    /// Swap an in-service node back to `release` in place (emergency:
    /// the release it runs is failing).
    Rollback { release: String },
    /// Deregister, drain, run drain hooks, terminate.
    Drain { reason: String },
    /// Walk a new node up to `releasing` and stop there: provisioned,
    /// ready for a release that may not be activated yet (its `once` hooks
    /// have not run).
    Prepare,
    /// Ship `release` to the node without activating it and run its
    /// `once` hooks there (the node keeps serving what it runs).
    Once { release: String },
    /// Bring the node into the warm pool: ready but not registered (a new
    /// node), or drained out of service (a scale-in victim); then tag it
    /// `warm` and stop it (`stop`) or leave it running.
    Warm { stop: bool },
    /// Take a warm node into service: start it, re-run the runbook, ship
    /// the target release if it lacks it, health-check, register.
    Serve,
    /// Put an in-service node the target group no longer lists (someone
    /// deregistered it behind hangar's back) back: health-check, register.
    Rejoin,
}

impl Task {
    pub fn name(&self) -> &'static str {
        match self {
            Task::Advance => "advance",
            Task::Update { .. } => "update",
            Task::Rollback { .. } => "rollback",
            Task::Drain { .. } => "drain",
            Task::Prepare => "prepare",
            Task::Once { .. } => "once",
            Task::Warm { .. } => "warm",
            Task::Serve => "serve",
            Task::Rejoin => "rejoin",
        }
    }
}

/// One instance of the cluster, as the diff needs to see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub id: String,
    pub phase: Phase,
    pub state: InstanceState,
    pub release: Option<String>,
    /// Hash of the provisioning config (runbook, vars, env file) it was
    /// last provisioned with (`hangar:config`).
    pub config: Option<String>,
    pub subnet: Option<String>,
    pub launched_at: Option<DateTime<Utc>>,
    pub protected: bool,
    /// The task running for it, if any.
    pub task: Option<Task>,
    /// Set when its last task gave up for good (`Advance` or `Update`):
    /// the node is replaced.
    pub failed: Option<String>,
    /// Chosen to leave by an earlier pass (why), perhaps by an operator
    /// since restarted: it keeps leaving even while the listing shows it
    /// serving.
    pub retire: Option<String>,
    /// Since when its health probe fails (in-service nodes only).
    pub unhealthy_since: Option<DateTime<Utc>>,
    /// Its last task ended in a retry a moment ago: no new task yet.
    pub resting: bool,
    /// Hash of the launch settings it was launched with (`hangar:launch`);
    /// `None` for instances launched before hangar stamped it (taken as
    /// current: upgrading hangar must not replace a fleet).
    pub launch: Option<String>,
    /// Since when the listing shows it `stopped` though hangar did not stop
    /// it (see [`STOPPED_BELIEVED_AFTER`]); `None`: not doubted.
    pub stopped_since: Option<DateTime<Utc>>,
    /// Tagged in service, yet missing from the target group since then
    /// (see `Memory::missing_from_group`): it carries no traffic, whatever
    /// its tags say.
    pub missing_since: Option<DateTime<Utc>>,
}

impl Node {
    /// Listed stopped, and hangar did not stop it (a warm-pool node is
    /// stopped by design).
    pub fn listed_stopped(&self) -> bool {
        matches!(self.state, InstanceState::Stopping | InstanceState::Stopped)
            && !warm_pool::may_be_stopped(self)
    }

    /// How long the node has been listed stopped, while that is less than
    /// [`STOPPED_BELIEVED_AFTER`]: the listing may not show a start yet, so
    /// the node is neither given a task nor replaced.
    pub fn stopped_in_doubt_for(&self, now: DateTime<Utc>) -> Option<chrono::Duration> {
        self.stopped_since
            .map(|since| now - since)
            .filter(|listed_for| *listed_for < STOPPED_BELIEVED_AFTER)
    }

    /// In service and in the target group: what carries traffic.
    fn serves(&self) -> bool {
        self.phase == Phase::InService && self.missing_since.is_none()
    }

    fn is_gone(&self) -> bool {
        matches!(
            self.state,
            InstanceState::ShuttingDown | InstanceState::Terminated
        )
    }

    /// On the target release and config.
    fn is_current(&self, t: &Target<'_>) -> bool {
        self.release.as_deref() == Some(t.release) && self.config.as_deref() == Some(t.config)
    }

    /// Why this machine must be replaced by a new one, if it must: it was
    /// launched with other settings, or it lived past its lifetime (each
    /// node a little earlier than the last tenth of it, by its id, so a
    /// fleet launched together is replaced over time).
    pub(crate) fn stale(&self, t: &Target<'_>) -> Option<&'static str> {
        if let (Some(have), Some(want)) = (self.launch.as_deref(), t.launch) {
            if have != want {
                return Some("launch settings changed");
            }
        }
        let (Some(life), Some(at)) = (t.max_lifetime, self.launched_at) else {
            return None;
        };
        let spread = life / 10 * i32::from(id_byte(&self.id)) / 255;
        (t.now - at >= life - spread).then_some("older than maxLifetime")
    }

    fn is_leaving(&self) -> bool {
        // A `Warm` task drains a serving node back into the warm pool.
        (matches!(self.phase, Phase::Draining | Phase::Terminating)
            && !matches!(self.task, Some(Task::Warm { .. })))
            || matches!(self.task, Some(Task::Drain { .. }))
            || self.retire.is_some()
    }
}

/// The fleet-level facts the diff needs besides the nodes.
#[derive(Clone, Debug)]
pub struct Target<'a> {
    /// Nodes the planner wants (launching through in-service).
    pub desired: u32,
    /// The release new nodes get and in-service nodes are rolled to.
    pub release: &'a str,
    /// The provisioning config hash every node should have; a change
    /// re-provisions in-service nodes with the same rolling bounds.
    pub config: &'a str,
    /// Updates of in-service nodes are paused (the release failed).
    pub rollout_halted: bool,
    /// In-service nodes running this release are swapped back to
    /// [`Target::release`] in place (auto-rollback in progress).
    pub rolling_back_from: Option<&'a str>,
    pub rollout: Rollout,
    /// Subnets new nodes may be launched in now (the spec's, less those
    /// that refused launches recently), in spec order.
    pub subnets: &'a [String],
    /// Launched instances the listing does not show yet, per subnet: they
    /// count toward capacity and toward their subnet's share.
    pub pending: &'a [(String, u32)],
    pub scale_in: ScaleInPolicy,
    pub self_healing: SelfHealing,
    /// False while launches back off after repeated node failures.
    pub launch_allowed: bool,
    /// The target release may not be activated yet (its `once` hooks have
    /// not run and there is no earlier release): new nodes stop at
    /// `releasing`.
    pub hold_at_releasing: bool,
    /// The spec's launch settings hash; nodes launched with another are
    /// replaced (instance refresh). `None`: unknown this pass.
    pub launch: Option<&'a str>,
    /// `instances.maxLifetime`.
    pub max_lifetime: Option<chrono::Duration>,
    pub now: DateTime<Utc>,
    /// `warmPool`; `None`: no pool (warm nodes left over are terminated).
    pub warm_pool: Option<hangar_crds::WarmPool>,
    /// The effective `capacity.max`: the pool refills within `max + size`
    /// machines.
    pub max: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Action {
    Launch {
        subnet: String,
        count: u32,
    },
    Start {
        node: String,
        task: Task,
    },
    /// Ask a running task to stop at its next safe point (its node was
    /// chosen for something else, e.g. scale-in).
    Cancel {
        node: String,
        reason: String,
    },
}

/// The actions, plus the counts and words status shows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diff {
    pub actions: Vec<Action>,
    /// Nodes counting toward capacity (launching through in-service, not leaving).
    pub counted: u32,
    /// In-service nodes on another release or config than the target.
    pub outdated: u32,
    /// Extra nodes allowed above `desired` for the rollout.
    pub surge: u32,
    /// Nodes to be replaced by new machines (launch settings changed, or
    /// older than `maxLifetime`), not yet leaving.
    pub stale: u32,
    /// Warm-pool nodes ready (tagged `warm`, no task): not counted.
    #[serde(default)]
    pub warm: u32,
    /// Nodes this pass chose to leave (id → why), for the memory.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub leaving: BTreeMap<String, String>,
    pub notes: Vec<String>,
}

/// Instances that count toward capacity: alive and not on their way out.
pub fn count_toward_capacity(instances: &[hangar_cloud::Instance]) -> u32 {
    instances
        .iter()
        .filter(|i| matches!(i.state, InstanceState::Pending | InstanceState::Running))
        .filter(|i| !matches!(i.phase, Some(Phase::Draining | Phase::Terminating)))
        // Warm-pool nodes are not capacity.
        .filter(|i| i.phase != Some(Phase::Warm))
        .count() as u32
}

pub fn diff(nodes: &[Node], t: &Target<'_>) -> Diff {
    let mut out = Diff::default();
    let live: Vec<&Node> = nodes.iter().filter(|n| !n.is_gone()).collect();
    let mut leaving = out.keep_leaving(&live, t);
    out.heal(&live, &mut leaving, t);
    out.refresh(&live, &mut leaving, t);
    let staying: Vec<&Node> = live
        .iter()
        .copied()
        .filter(|n| !leaving.contains(n.id.as_str()))
        .collect();
    // Warm-pool members are not the fleet's (see `warm_pool`).
    let (staying, pool) = warm_pool::split(&staying);
    let rollout = out.rollout_accounting(nodes, &staying, t);
    // A refresh surges by `maxSurge` (at least 1) machines above desired,
    // counting those still on their way out: at most desired + maxSurge
    // machines run at once.
    let refresh_surge = (t.rollout.max_surge.max(1))
        .saturating_sub(leaving.len() as u32)
        .min(out.stale);
    out.surge = out.surge.max(refresh_surge);
    let served = warm_pool::serve_first(&mut out, &staying, &pool, t);
    let mut room = warm_pool::room(&pool, served.len(), t);
    let chosen = out.capacity(&staying, served.len() as u32, &mut room, t);
    warm_pool::tend(&mut out, &staying, &pool, leaving.len(), &served, room, t);
    out.emergency_rollback(&rollout, &chosen, t);
    out.rolling_update(&staying, &rollout, &chosen, t);
    out.rejoin(&staying, &chosen, t);
    // Every other node that is not yet in service keeps walking (up to
    // `releasing` only, while the release is held).
    let mut held = 0;
    for n in &staying {
        if n.phase == Phase::InService || n.task.is_some() || chosen.contains(n.id.as_str()) {
            continue;
        }
        match (t.hold_at_releasing, n.phase) {
            (true, Phase::Launching | Phase::Provisioning) => out.start(n, Task::Prepare),
            (true, Phase::Releasing) => held += 1,
            _ => out.start(n, Task::Advance),
        }
    }
    if held > 0 {
        out.notes.push(format!(
            "{held} node(s) ready at releasing, waiting for the once hooks of {}",
            t.release
        ));
    }
    out
}

/// Where the rollout stands, for the steps that move it.
struct RolloutState<'n> {
    /// In service and staying.
    serving: Vec<&'n Node>,
    /// Of those, on another release or config and not being moved.
    outdated: Vec<&'n Node>,
    /// Updates in flight.
    updating: u32,
    /// Updates may start (not halted, no emergency rollback, work to do).
    rolling: bool,
}

impl Diff {
    /// Step 1: nodes already leaving keep leaving; stopped and failed ones
    /// start to. Returns every node that leaves.
    fn keep_leaving<'n>(&mut self, live: &[&'n Node], t: &Target<'_>) -> BTreeSet<&'n str> {
        let mut leaving = BTreeSet::new();
        for n in live {
            if n.is_leaving() {
                leaving.insert(n.id.as_str());
                if n.task.is_none() {
                    let reason = n.retire.clone().unwrap_or_else(|| "resume drain".into());
                    self.start(n, Task::Drain { reason });
                }
            } else if n.listed_stopped() {
                if let Some(listed_for) = n.stopped_in_doubt_for(t.now) {
                    self.notes.push(format!(
                        "{} listed {:?} for {}s: replaced if that lasts {}s (a start may not show yet)",
                        n.id,
                        n.state,
                        listed_for.num_seconds(),
                        STOPPED_BELIEVED_AFTER.num_seconds()
                    ));
                } else {
                    leaving.insert(n.id.as_str());
                    self.replace(n, format!("instance is {:?}", n.state).to_lowercase());
                }
            } else if let Some(why) = &n.failed {
                leaving.insert(n.id.as_str());
                self.replace(n, format!("failed: {why}"));
            }
        }
        leaving
    }

    /// Step 2, self-healing: in-service nodes unhealthy for too long, a few
    /// at a time, never the last healthy one.
    fn heal<'n>(&mut self, live: &[&'n Node], leaving: &mut BTreeSet<&'n str>, t: &Target<'_>) {
        let in_service: Vec<&'n Node> = live
            .iter()
            .copied()
            .filter(|n| n.phase == Phase::InService && !leaving.contains(n.id.as_str()))
            .collect();
        let healthy_in_service = in_service
            .iter()
            .filter(|n| n.unhealthy_since.is_none())
            .count();
        let already_healing = live
            .iter()
            .filter(
                |n| matches!(&n.task, Some(Task::Drain { reason }) if reason.starts_with("unhealthy")),
            )
            .count() as u32;
        let mut heal_budget = t.self_healing.max_unhealthy.saturating_sub(already_healing);
        let after = chrono::Duration::from_std(t.self_healing.unhealthy_after.get())
            .unwrap_or(chrono::Duration::MAX);
        let mut sick: Vec<&'n Node> = in_service
            .into_iter()
            .filter(|n| {
                n.unhealthy_since
                    .is_some_and(|s| t.now.signed_duration_since(s) >= after)
            })
            .collect();
        sick.sort_by_key(|n| n.unhealthy_since);
        for n in sick {
            if healthy_in_service == 0 {
                self.notes.push(format!(
                    "{} unhealthy but no node is healthy: not replacing (likely the application, not the node)",
                    n.id
                ));
                break;
            }
            if heal_budget == 0 {
                self.notes.push(format!(
                    "{} unhealthy: waiting, maxUnhealthy replacements in progress",
                    n.id
                ));
                continue;
            }
            heal_budget -= 1;
            leaving.insert(n.id.as_str());
            self.replace(n, "unhealthy".to_string());
        }
    }

    /// Step 2b, instance refresh (ASG's, surge first): a stale machine not
    /// yet serving is replaced at once; a serving one only while the
    /// in-service count stays at `desired` or above without it — the surge
    /// nodes launched for the refresh (see `diff`) come up first.
    fn refresh<'n>(&mut self, live: &[&'n Node], leaving: &mut BTreeSet<&'n str>, t: &Target<'_>) {
        let staying = |n: &&&'n Node| !leaving.contains(n.id.as_str());
        let stale: Vec<(&'n Node, &'static str)> = live
            .iter()
            .filter(staying)
            .filter(|n| !n.protected)
            .filter_map(|n| n.stale(t).map(|why| (*n, why)))
            .collect();
        let mut in_service = live.iter().filter(staying).filter(|n| n.serves()).count() as u32;
        let mut serving_stale: Vec<(&'n Node, &'static str)> = Vec::new();
        for (n, why) in stale {
            if n.phase == Phase::InService {
                serving_stale.push((n, why));
            } else {
                leaving.insert(n.id.as_str());
                self.replace(n, format!("refresh: {why}"));
            }
        }
        serving_stale.sort_by_key(|(n, _)| (n.launched_at, n.id.clone()));
        self.stale = serving_stale.len() as u32;
        for (n, why) in serving_stale {
            if in_service <= t.desired {
                break;
            }
            in_service -= 1;
            self.stale -= 1;
            leaving.insert(n.id.as_str());
            self.replace(n, format!("refresh: {why}"));
        }
        if self.stale > 0 {
            // Progress as status shows it: serving machines already on the
            // spec's settings, of those plus the ones still to replace.
            let fresh = live
                .iter()
                .filter(|n| !leaving.contains(n.id.as_str()))
                .filter(|n| n.phase == Phase::InService && n.stale(t).is_none())
                .count() as u32;
            self.notes.push(format!(
                "{REFRESH_NOTE} {fresh} of {} replaced, surge first",
                fresh + self.stale
            ));
        }
    }

    /// In-service nodes missing from the target group go back into it,
    /// health-checked first, once that lasted [`MISSING_BELIEVED_AFTER`];
    /// the rollout and the refresh do not count them as serving meanwhile.
    fn rejoin(&mut self, staying: &[&Node], chosen: &BTreeSet<&str>, t: &Target<'_>) {
        for n in staying {
            let Some(since) = n.missing_since else {
                continue;
            };
            if n.phase != Phase::InService || n.task.is_some() || chosen.contains(n.id.as_str()) {
                continue;
            }
            let missing_for = t.now - since;
            if missing_for < MISSING_BELIEVED_AFTER {
                self.notes.push(format!(
                    "{} is tagged in service but the target group has not listed it for {}s: registered again if that lasts {}s",
                    n.id,
                    missing_for.num_seconds(),
                    MISSING_BELIEVED_AFTER.num_seconds()
                ));
                continue;
            }
            self.notes.push(format!(
                "{} is tagged in service but the target group does not list it: registering it again after its health check",
                n.id
            ));
            self.start(n, Task::Rejoin);
        }
    }

    /// Step 3: which serving nodes are outdated, and whether (and how far
    /// above `desired`) the rollout may surge.
    fn rollout_accounting<'n>(
        &mut self,
        nodes: &[Node],
        staying: &[&'n Node],
        t: &Target<'_>,
    ) -> RolloutState<'n> {
        let serving: Vec<&Node> = staying
            .iter()
            .copied()
            .filter(|n| n.phase == Phase::InService)
            .collect();
        let outdated: Vec<&Node> = serving
            .iter()
            .copied()
            .filter(|n| {
                !n.is_current(t)
                    && !matches!(n.task, Some(Task::Update { .. } | Task::Rollback { .. }))
            })
            .collect();
        // Every update in flight uses the budget, whatever happened to its node since.
        let updating = nodes
            .iter()
            .filter(|n| matches!(n.task, Some(Task::Update { .. })))
            .count() as u32;
        self.outdated = outdated.len() as u32;
        let rolling = !t.rollout_halted
            && t.rolling_back_from.is_none()
            && (self.outdated > 0 || updating > 0);
        self.surge = if rolling && t.rollout.max_unavailable == 0 {
            t.rollout.max_surge.min(self.outdated + updating)
        } else {
            0
        };
        RolloutState {
            serving,
            outdated,
            updating,
            rolling,
        }
    }

    /// Step 4, capacity: launch the missing, drain the surplus. Returns the
    /// nodes chosen for scale-in.
    /// `served` warm-pool nodes are on their way into service and count;
    /// a victim the pool has `room` for goes there instead of being drained.
    fn capacity<'n>(
        &mut self,
        staying: &[&'n Node],
        served: u32,
        room: &mut u32,
        t: &Target<'_>,
    ) -> BTreeSet<&'n str> {
        let pending: u32 = t.pending.iter().map(|(_, n)| n).sum();
        self.counted = staying.len() as u32 + pending + served;
        let want = t.desired + self.surge;
        if self.counted < want {
            let missing = want - self.counted;
            if t.launch_allowed && t.subnets.is_empty() {
                self.notes.push(format!(
                    "{missing} missing, but every subnet refused launches recently"
                ));
            } else if t.launch_allowed {
                for (subnet, count) in spread(missing, t.subnets, staying, t.pending) {
                    self.actions.push(Action::Launch { subnet, count });
                }
                self.notes.push(format!(
                    "launching {missing} (have {}, want {want})",
                    self.counted
                ));
            } else {
                self.notes.push(format!(
                    "{missing} missing, but launches are backing off after failures"
                ));
            }
        }
        let mut chosen = BTreeSet::new();
        // Launches in flight are not for scale-in to pick: their instances
        // are drained once listed, if still too many.
        let listed = self.counted - pending - served;
        if listed > want {
            let surplus = listed - want;
            let victims = pick_victims(staying, surplus as usize, t);
            if (victims.len() as u32) < surplus {
                self.notes.push(format!(
                    "{surplus} too many, but only {} can go (the rest are protected)",
                    victims.len()
                ));
            }
            for n in victims {
                chosen.insert(n.id.as_str());
                if n.task.is_some() && !matches!(n.task, Some(Task::Drain { .. })) {
                    self.leaving.insert(n.id.clone(), "scale-in".into());
                    self.actions.push(Action::Cancel {
                        node: n.id.clone(),
                        reason: "scale-in".into(),
                    });
                } else if n.task.is_none() {
                    let task = match warm_pool::take_victim(n, room, t) {
                        Some(task) => {
                            // Into the pool: no longer capacity.
                            self.counted -= 1;
                            task
                        }
                        None => {
                            self.leaving.insert(n.id.clone(), "scale-in".into());
                            Task::Drain {
                                reason: "scale-in".into(),
                            }
                        }
                    };
                    self.start(n, task);
                }
            }
        }
        chosen
    }

    /// Step 5, emergency rollback: every in-service node on the bad
    /// release, at once.
    fn emergency_rollback(
        &mut self,
        rollout: &RolloutState<'_>,
        chosen: &BTreeSet<&str>,
        t: &Target<'_>,
    ) {
        let Some(bad) = t.rolling_back_from else {
            return;
        };
        for n in rollout
            .serving
            .iter()
            .filter(|n| !chosen.contains(n.id.as_str()))
        {
            if n.release.as_deref() == Some(bad) && n.task.is_none() {
                self.start(
                    n,
                    Task::Rollback {
                        release: t.release.to_string(),
                    },
                );
            }
        }
    }

    /// Step 6, rolling update within the availability budget: keep at least
    /// `desired - maxUnavailable` nodes serving, and never have more than
    /// `maxUnavailable + surge` updates in flight.
    fn rolling_update(
        &mut self,
        staying: &[&Node],
        rollout: &RolloutState<'_>,
        chosen: &BTreeSet<&str>,
        t: &Target<'_>,
    ) {
        for n in staying {
            if let Some(Task::Update { release }) = &n.task {
                if release != t.release {
                    self.actions.push(Action::Cancel {
                        node: n.id.clone(),
                        reason: format!("target release is now {}", t.release),
                    });
                }
            }
        }
        if !rollout.rolling {
            if t.rollout_halted && self.outdated > 0 {
                self.notes.push(format!(
                    "rollout halted: {} node(s) not on {}",
                    self.outdated, t.release
                ));
            }
            return;
        }
        let available = rollout
            .serving
            .iter()
            .filter(|n| n.serves() && n.task.is_none() && !chosen.contains(n.id.as_str()))
            .count() as u32;
        let min_available = t.desired.saturating_sub(t.rollout.max_unavailable);
        let in_flight_cap =
            (t.rollout.max_unavailable + self.surge).saturating_sub(rollout.updating);
        let budget = available.saturating_sub(min_available).min(in_flight_cap);
        let mut candidates: Vec<&Node> = rollout
            .outdated
            .iter()
            .copied()
            .filter(|n| n.serves() && n.task.is_none() && !chosen.contains(n.id.as_str()))
            .collect();
        candidates.sort_by_key(|n| (n.launched_at, n.id.clone()));
        for n in candidates.into_iter().take(budget as usize) {
            self.start(
                n,
                Task::Update {
                    release: t.release.to_string(),
                },
            );
        }
        if self.outdated > 0 {
            self.notes.push(format!(
                "rollout of {}: {} node(s) to go",
                t.release, self.outdated
            ));
        }
    }

    /// Starts `task` unless the node rests after a retry (a later pass
    /// starts it).
    pub(crate) fn start(&mut self, node: &Node, task: Task) {
        if node.resting {
            self.notes
                .push(format!("{}: {} retried shortly", node.id, task.name()));
            return;
        }
        self.actions.push(Action::Start {
            node: node.id.clone(),
            task,
        });
    }

    /// Drains a node that must go; a task still running for it is asked to
    /// stop first (the drain starts on a later pass, once it has).
    fn replace(&mut self, node: &Node, reason: String) {
        self.notes.push(format!("replacing {}: {reason}", node.id));
        self.leaving.insert(node.id.clone(), reason.clone());
        match &node.task {
            None => self.start(node, Task::Drain { reason }),
            Some(Task::Drain { .. }) => {}
            Some(_) => self.actions.push(Action::Cancel {
                node: node.id.clone(),
                reason,
            }),
        }
    }
}

/// A byte of the node's id, to spread per-node deadlines: the first of
/// its SHA-256, so ids differing only in their last character (one batch
/// of launches) land far apart — a `* 31 + b` fold put them on adjacent
/// bytes, i.e. due within seconds of each other.
fn id_byte(id: &str) -> u8 {
    use sha2::Digest;
    sha2::Sha256::digest(id.as_bytes())[0]
}

/// Scale-in order: not-yet-in-service nodes first (the ones that started
/// last go first), then serving nodes on an outdated release, then serving
/// nodes by policy; protected nodes never.
fn pick_victims<'n>(staying: &[&'n Node], count: usize, t: &Target<'_>) -> Vec<&'n Node> {
    let mut candidates: Vec<&Node> = staying.iter().copied().filter(|n| !n.protected).collect();
    candidates.sort_by_key(|n| {
        let serving = n.phase == Phase::InService;
        let current = n.is_current(t) && n.stale(t).is_none();
        // Earlier phases are further from serving: cheapest to give up.
        let phase_rank = Phase::ALL.iter().position(|p| *p == n.phase).unwrap_or(0);
        let launched = n.launched_at.map(|at| at.timestamp_millis()).unwrap_or(0);
        let age_rank = match t.scale_in {
            ScaleInPolicy::Newest => -launched,
            ScaleInPolicy::Oldest => launched,
        };
        (serving, current, phase_rank, age_rank, n.id.clone())
    });
    candidates.truncate(count);
    candidates
}

/// Splits `count` new nodes over subnets so the fleet stays balanced
/// across them (fewest nodes first, launches in flight included; ties in
/// spec order).
pub fn spread(
    count: u32,
    subnets: &[String],
    staying: &[&Node],
    pending: &[(String, u32)],
) -> Vec<(String, u32)> {
    if subnets.is_empty() {
        return Vec::new();
    }
    let mut load: Vec<u32> = subnets
        .iter()
        .map(|s| {
            let listed = staying
                .iter()
                .filter(|n| n.subnet.as_deref() == Some(s))
                .count() as u32;
            let launching: u32 = pending.iter().filter(|(p, _)| p == s).map(|(_, n)| n).sum();
            listed + launching
        })
        .collect();
    let mut add: BTreeMap<usize, u32> = BTreeMap::new();
    for _ in 0..count {
        let (i, _) = load
            .iter()
            .enumerate()
            .min_by_key(|(i, l)| (**l, *i))
            .expect("subnets is not empty");
        load[i] += 1;
        *add.entry(i).or_default() += 1;
    }
    add.into_iter()
        .map(|(i, n)| (subnets[i].clone(), n))
        .collect()
}

#[cfg(test)]
mod tests;
