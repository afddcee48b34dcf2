//! The whole decision for one cluster from one observation.
//!
//! [`decide`] is a plain function of `(Observation, Memory)`: it folds the
//! finished node tasks into memory, runs the planner (how many nodes), the
//! rollout bookkeeping (which release) and the fleet diff (what each node
//! needs next), and returns the actions together with the updated memory,
//! the activity entries and the counters to bump. The runtime acts on it;
//! nothing here waits, reads a clock or touches the network, so every
//! scenario is tested directly (`decide/tests.rs`).

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hangar_cloud::{tags, Instance, InstanceState, Phase, TargetHealth, TargetState};
use hangar_crds::ClusterSpec;
use serde::{Deserialize, Serialize};

use crate::core::fleet::{self, Task};
use crate::core::launches::LaunchIntent;
use crate::core::memory::{DecisionRecord, Memory};
use crate::core::observation::{ActionFailure, Observation, Outcome, Reads};
use crate::core::planner;
use crate::core::rollout;

/// One entry of a cluster's activity history (like an ASG's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Activity {
    pub at: DateTime<Utc>,
    /// `launch`, `in-service`, `drain`, `terminate`, `scale`, `rollout`, `rollback`, `error`, …
    pub kind: String,
    pub node: Option<String>,
    pub message: String,
}

impl Activity {
    pub fn new(
        at: DateTime<Utc>,
        kind: &str,
        node: Option<&str>,
        message: impl Into<String>,
    ) -> Activity {
        Activity {
            at,
            kind: kind.to_string(),
            node: node.map(str::to_string),
            message: message.into(),
        }
    }
}

/// A counter the runtime bumps for a decision (Prometheus).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Count {
    /// The desired count moved (`out` or `in`).
    Scaled(&'static str),
    /// A rollout event: `started`, `completed`, `halted`, `rolled-back`, `rollback-done`.
    Rollout(&'static str),
    /// A node task ended.
    TaskFinished {
        task: &'static str,
        result: &'static str,
    },
}

#[derive(Clone, Debug)]
pub struct Decision {
    /// The memory to carry to the next pass.
    pub memory: Memory,
    /// What to do with the nodes (its `actions`) and what status shows of it.
    pub diff: fleet::Diff,
    /// `RunInstances` calls to make: new intents (the diff's launches) and
    /// retries of earlier ones, each with its own token. The runtime
    /// persists the memory holding them before it calls.
    pub launches: Vec<LaunchIntent>,
    /// The memory must reach the disk before anything is acted on: it
    /// holds launch intents (their tokens), the node a `once` run was
    /// given to, or nodes newly chosen to leave.
    pub persist_first: bool,
    /// Notes node tasks left (already logged by them), oldest first.
    pub task_notes: Vec<Activity>,
    /// What this decision did, oldest first.
    pub activities: Vec<Activity>,
    pub counts: Vec<Count>,
    /// A removed cluster whose every node is gone: forget it.
    pub forget: bool,
}

/// How often the 5xx rate of a watched release is read when the cluster
/// has no autoscaling (whose `evaluationInterval` sets it otherwise).
const ERRORS_EVALUATION_INTERVAL: Duration = Duration::from_secs(15);

/// How long a node rests after its task ended in a retry, doubling with
/// each retry in a row of a node coming up.
const RETRY_REST: Duration = Duration::from_secs(2);
const RETRY_REST_MAX: Duration = Duration::from_secs(30);

/// Transient failures in a row after which a node still coming up is
/// given up and replaced: at the default timeouts that is several minutes
/// of a node hanging or dropping every connection.
pub const MAX_ADVANCE_RETRIES: u32 = 5;

/// Decides a pass for a cluster whose spec is loaded.
pub fn decide(obs: &Observation, memory: &Memory) -> Decision {
    let mut pass = Pass::new(obs, memory);
    pass.absorb_tasks();
    let serving: Vec<&Instance> = obs.instances.iter().filter(|i| serves(i)).collect();
    let evaluation_due = pass.plan_capacity();
    pass.follow_release(&serving, evaluation_due);
    let mut diff = pass.fleet_diff();
    pass.run_once_hooks(&mut diff);
    pass.finish(diff)
}

/// Decides a pass for a cluster whose spec is gone with `deletionPolicy:
/// delete`: drain every node, launch nothing, forget the cluster once
/// every node is gone. `obs.spec` is the last spec applied.
pub fn decide_removed(obs: &Observation, memory: &Memory) -> Decision {
    let mut pass = Pass::new(obs, memory);
    pass.absorb_tasks();
    let live = obs.instances.iter().any(|i| {
        !matches!(
            i.state,
            InstanceState::Terminated | InstanceState::ShuttingDown
        )
    });
    if !live && obs.running.is_empty() {
        pass.record(
            "spec",
            None,
            "every node terminated; forgetting the cluster",
        );
        let mut d = pass.finish(fleet::Diff::default());
        d.forget = true;
        return d;
    }
    let spec = &obs.spec;
    let nodes: Vec<fleet::Node> = obs
        .instances
        .iter()
        .map(|i| fleet_node(i, &obs.running, &pass.memory, &HashMap::new(), obs.now))
        .collect();
    let target = fleet::Target {
        desired: 0,
        release: &pass.memory.release.target,
        config: "",
        rollout_halted: true,
        rolling_back_from: None,
        rollout: spec.release.rollout,
        subnets: &spec.instances.subnets,
        pending: &[],
        scale_in: spec.scale_in_policy,
        self_healing: spec.self_healing,
        launch_allowed: false,
        hold_at_releasing: false,
        launch: None,
        max_lifetime: None,
        now: obs.now,
        warm_pool: None,
        max: 0,
    };
    // Launches a deleted cluster intended are not made any more; if any
    // were, their instances are drained once listed.
    pass.memory.launches.pending.clear();
    let mut diff = fleet::diff(&nodes, &target);
    diff.actions.retain(|a| {
        matches!(
            a,
            fleet::Action::Start {
                task: Task::Drain { .. },
                ..
            } | fleet::Action::Cancel { .. }
        )
    });
    pass.finish(diff)
}

/// What `observe` must read for this pass: the traffic when an evaluation
/// is due, the 5xx rate while a new release is watched. Computed from the
/// memory before this pass and the instances seen, exactly as [`decide`]
/// will see them (a release failure among the finished tasks can only
/// close the watch, so reading the errors then is merely unused).
pub fn reads(obs: &Observation, memory: &Memory) -> Reads {
    let spec = &obs.spec;
    let due = evaluation_due(spec, memory, obs.now);
    let errors_since = if due {
        let mut release = memory.release.clone();
        rollout::remember(&mut release, spec, obs.now);
        let serving: Vec<Option<&str>> = obs
            .instances
            .iter()
            .filter(|i| serves(i))
            .map(|i| i.release.as_deref())
            .collect();
        rollout::observe(
            &mut release,
            &spec.release.id,
            spec.release.rollback.as_ref(),
            &rollout::Observed {
                serving: &serving,
                settled: settled(&obs.running),
                once_hooks: !spec.release.hooks.once.is_empty(),
                now: obs.now,
            },
        );
        rollout::watching(&release, spec.release.rollback.as_ref(), obs.now)
    } else {
        None
    };
    Reads {
        traffic: due && spec.autoscaling.is_some(),
        errors_since,
    }
}

/// The pass in progress: the observation, the memory being updated and
/// what the decision has to say so far.
struct Pass<'o> {
    obs: &'o Observation,
    /// This process has not decided for the cluster before.
    first_pass: bool,
    /// A `once` run was given to a node this pass.
    once_started: bool,
    memory: Memory,
    task_notes: Vec<Activity>,
    activities: Vec<Activity>,
    counts: Vec<Count>,
}

impl<'o> Pass<'o> {
    fn new(obs: &'o Observation, memory: &Memory) -> Pass<'o> {
        Pass {
            obs,
            first_pass: !memory.continuing(),
            once_started: false,
            memory: memory.clone(),
            task_notes: Vec::new(),
            activities: Vec::new(),
            counts: Vec::new(),
        }
    }

    fn record(&mut self, kind: &str, node: Option<&str>, message: impl Into<String>) {
        self.activities
            .push(Activity::new(self.obs.now, kind, node, message));
    }

    /// Folds finished node tasks, their notes and the last pass's failed
    /// actions into memory.
    fn absorb_tasks(&mut self) {
        for f in &self.obs.failures {
            match f {
                ActionFailure::Start {
                    node,
                    task,
                    error,
                    at,
                } => {
                    self.memory.node_errors.insert(node.clone(), error.clone());
                    let message = format!("cannot start {}: {error}", task.name());
                    self.activities
                        .push(Activity::new(*at, "error", Some(node), message));
                }
                ActionFailure::Launch {
                    token, error, at, ..
                } => {
                    let message = self.memory.launches.failed(token, error, *at);
                    self.activities
                        .push(Activity::new(*at, "launch", None, message));
                }
            }
        }
        for f in &self.obs.finished {
            if matches!(f.task, Task::Drain { .. }) && f.outcome == Outcome::Done {
                self.memory.launches.ended(&f.node);
            }
        }
        for said in
            self.memory
                .launches
                .confirm(&self.obs.instances, &self.obs.unlisted, self.obs.now)
        {
            self.record("launch", None, said);
        }
        for n in &self.obs.notes {
            self.task_notes.push(Activity::new(
                n.at,
                &n.kind,
                Some(&n.node),
                n.message.clone(),
            ));
        }
        for f in &self.obs.finished {
            self.counts.push(Count::TaskFinished {
                task: f.task.name(),
                result: f.outcome.label(),
            });
            if let Task::Once { release } = &f.task {
                self.once_finished(&f.node, release, &f.outcome, f.at);
                continue;
            }
            let m = &mut self.memory;
            let outcome = give_up_after_retries(m, &f.node, &f.task, &f.outcome);
            match &outcome {
                Outcome::Done => {
                    m.node_errors.remove(&f.node);
                    m.node_retries.remove(&f.node);
                    m.retry_after.remove(&f.node);
                    if brings_up(&f.task) {
                        m.node_failures = 0;
                        m.launch_backoff_until = None;
                        m.failing_launch = None;
                    }
                }
                Outcome::Cancelled => {}
                Outcome::Retry(why) => {
                    m.node_errors.insert(f.node.clone(), why.clone());
                    let n = m.node_retries.get(&f.node).copied().unwrap_or(1).max(1);
                    let rest = RETRY_REST
                        .saturating_mul(1 << (n - 1).min(4))
                        .min(RETRY_REST_MAX);
                    m.retry_after.insert(
                        f.node.clone(),
                        f.at + chrono::Duration::from_std(rest).unwrap_or_default(),
                    );
                    let message = format!("{}: {why} (will retry)", f.task.name());
                    self.activities
                        .push(Activity::new(f.at, "retry", Some(&f.node), message));
                }
                Outcome::NodeFailed(why) => {
                    m.failed_nodes.insert(f.node.clone(), why.clone());
                    m.node_errors.insert(f.node.clone(), why.clone());
                    let message = format!("{} failed: {why}; replacing the node", f.task.name());
                    self.activities
                        .push(Activity::new(f.at, "error", Some(&f.node), message));
                    self.count_node_failure(&f.node);
                }
                Outcome::ReleaseFailed { release, reason } => {
                    m.node_errors.insert(f.node.clone(), reason.clone());
                    // A new node that failed on the release is not serving
                    // anything: replace it (an updated node was restored).
                    // Like any node that never came up, it counts toward the
                    // launch backoff: a first release that never gets
                    // healthy must not launch and terminate in a loop.
                    let new_node = brings_up(&f.task);
                    if new_node {
                        m.failed_nodes.insert(f.node.clone(), reason.clone());
                    }
                    if let Some(ev) = rollout::fail(&mut m.release, release, reason) {
                        self.rollout_events(vec![ev]);
                    }
                    if new_node {
                        self.count_node_failure(&f.node);
                    }
                }
            }
        }
    }

    /// A `once` run ended (or stopped): done, failed (the rollout halts,
    /// the old release keeps serving) or to be asked again on its node.
    fn once_finished(&mut self, node: &str, release: &str, outcome: &Outcome, at: DateTime<Utc>) {
        let m = &mut self.memory;
        match outcome {
            Outcome::Done => {
                rollout::once_succeeded(&mut m.release, release);
                m.node_errors.remove(node);
                self.activities.push(Activity::new(
                    at,
                    "once",
                    Some(node),
                    format!("the once hooks of {release} succeeded"),
                ));
            }
            Outcome::ReleaseFailed { reason, .. } | Outcome::NodeFailed(reason) => {
                m.release.once_running = None;
                m.node_errors.insert(node.to_string(), reason.clone());
                let why = format!("once hooks: {reason}");
                if let Some(ev) = rollout::fail(&mut m.release, release, &why) {
                    self.rollout_events(vec![ev]);
                }
            }
            Outcome::Retry(why) => {
                m.node_errors.insert(node.to_string(), why.clone());
                m.retry_after.insert(
                    node.to_string(),
                    at + chrono::Duration::from_std(RETRY_REST).unwrap_or_default(),
                );
            }
            Outcome::Cancelled => {}
        }
    }

    /// One more node in a row that never came up; from the third on,
    /// launches back off (30 s, doubling, at most 10 min).
    fn count_node_failure(&mut self, node: &str) {
        let now = self.obs.now;
        let stamp = self
            .obs
            .instances
            .iter()
            .find(|i| i.id == node)
            .and_then(|i| i.tags.get(tags::LAUNCH).cloned())
            .or_else(|| self.obs.launch_stamp());
        let m = &mut self.memory;
        if stamp.is_some() {
            m.failing_launch = stamp;
        }
        m.node_failures += 1;
        if m.node_failures >= 3 {
            let exp = 30u64.saturating_mul(1 << (m.node_failures - 3).min(5));
            let wait = chrono::Duration::seconds(exp.min(600) as i64);
            m.launch_backoff_until = Some(now + wait);
            let message = format!(
                "{} nodes failed in a row: launches wait {}s",
                m.node_failures,
                wait.num_seconds()
            );
            self.record("backoff", None, message);
        }
    }

    /// The planner's part: the desired count, evaluated when due and held
    /// in between. Returns whether an evaluation was due.
    fn plan_capacity(&mut self) -> bool {
        let (obs, spec, now) = (self.obs, &*self.obs.spec, self.obs.now);
        let first_ever = self.memory.last_decision.is_none();
        let m = &mut self.memory;
        let continuing = m.continuing();
        m.planned_here = true;
        let due = evaluation_due(spec, m, now);
        if due {
            m.last_eval_at = Some(now);
            if let Some(Ok(Some(reading))) = &obs.traffic {
                m.last_metric = Some(*reading);
            }
        }
        let unseen: u32 = m
            .launches
            .unseen(&obs.instances)
            .iter()
            .map(|(_, n)| n)
            .sum();
        let pass = planner::Pass {
            standing: continuing.then_some(m.desired),
            counted: fleet::count_toward_capacity(&obs.instances) + unseen,
            evaluation_due: due,
        };
        let evaluated = pass.evaluates(spec);
        let decision = planner::for_pass(spec, now, &pass, m.last_metric, &m.history);
        if due {
            if let Some(rec) = decision.recommendation {
                m.history.record(rec, spec);
            }
        }
        if decision.desired != m.desired || first_ever {
            if !first_ever {
                let direction = if decision.desired > m.desired {
                    "out"
                } else {
                    "in"
                };
                self.counts.push(Count::Scaled(direction));
            }
            let message = format!(
                "desired {} → {}: {}",
                m.desired, decision.desired, decision.reason
            );
            self.activities
                .push(Activity::new(now, "scale", None, message));
        }
        let m = &mut self.memory;
        // A hold keeps the last evaluation's reason on show.
        if evaluated || decision.desired != m.desired {
            m.last_decision = Some(DecisionRecord {
                at: now,
                desired: decision.desired,
                reason: decision.reason,
            });
        }
        m.desired = decision.desired;
        m.window = Some(decision.window);
        due
    }

    /// The rollout's part: which release is the target, whether the new one
    /// is proven, and the auto-rollback verdict while it is watched.
    fn follow_release(&mut self, serving: &[&Instance], evaluation_due: bool) {
        let (obs, spec, now) = (self.obs, &*self.obs.spec, self.obs.now);
        let release = &mut self.memory.release;
        rollout::remember(release, spec, now);
        let serving_releases: Vec<Option<&str>> =
            serving.iter().map(|i| i.release.as_deref()).collect();
        let events = rollout::observe(
            release,
            &spec.release.id,
            spec.release.rollback.as_ref(),
            &rollout::Observed {
                serving: &serving_releases,
                settled: settled(&obs.running),
                once_hooks: !spec.release.hooks.once.is_empty(),
                now,
            },
        );
        self.rollout_events(events);
        let release = &mut self.memory.release;
        let watched = rollout::watching(release, spec.release.rollback.as_ref(), now).is_some();
        if let (true, true, Some(Ok(counts)), Some(rb)) =
            (evaluation_due, watched, &obs.errors, &spec.release.rollback)
        {
            if let Some(ev) = rollout::judge(release, rb, counts.errors_5xx, counts.requests) {
                self.rollout_events(vec![ev]);
            }
        }
    }

    /// The backoff was earned by the launch settings the failing nodes
    /// had; with new ones (a fixed template version, another AMI or
    /// instance type) launches start over at once.
    fn forget_backoff_of_old_launch_settings(&mut self, launch: Option<&str>) {
        let m = &mut self.memory;
        let (Some(failed), Some(now)) = (m.failing_launch.as_deref(), launch) else {
            return;
        };
        if failed == now {
            return;
        }
        let waited = m.launch_backoff_until.is_some();
        m.node_failures = 0;
        m.launch_backoff_until = None;
        m.failing_launch = None;
        if waited {
            self.record(
                "backoff",
                None,
                "launch settings changed since the failures: launches no longer wait",
            );
        }
    }

    fn fleet_diff(&mut self) -> fleet::Diff {
        let launch = self.obs.launch_stamp();
        self.forget_backoff_of_old_launch_settings(launch.as_deref());
        let (obs, spec, now) = (self.obs, &*self.obs.spec, self.obs.now);
        let mut nodes: Vec<fleet::Node> = obs
            .instances
            .iter()
            .map(|i| fleet_node(i, &obs.running, &self.memory, &obs.unhealthy, now))
            .collect();
        doubt_stopped_listings(&mut nodes, &mut self.memory.listed_stopped, now);
        date_missing_from_group(
            &mut nodes,
            obs.target_group.as_ref(),
            &mut self.memory.missing_from_group,
            now,
        );
        let m = &self.memory;
        let pending = m.launches.unseen(&obs.instances);
        let usable: Vec<String> = m
            .launches
            .usable(&spec.instances.subnets, now)
            .into_iter()
            .cloned()
            .collect();
        let target = fleet::Target {
            desired: m.desired,
            release: &m.release.target,
            config: &obs.config_hash,
            rollout_halted: rollout::halted(&m.release),
            rolling_back_from: m.release.rolling_back_from.as_deref(),
            rollout: spec.release.rollout,
            subnets: &usable,
            pending: &pending,
            scale_in: spec.scale_in_policy,
            self_healing: spec.self_healing,
            launch_allowed: m.launch_backoff_until.is_none_or(|t| t <= now),
            hold_at_releasing: self.once_gated() && m.release.target == spec.release.id,
            launch: launch.as_deref(),
            max_lifetime: spec
                .instances
                .max_lifetime
                .and_then(|d| chrono::Duration::from_std(d.get()).ok()),
            now,
            warm_pool: spec.warm_pool,
            max: m.window.as_ref().map_or(spec.capacity.max, |w| w.max),
        };
        let mut diff = fleet::diff(&nodes, &target);
        if let Some(why) = m.launches.describe_avoided(now) {
            diff.notes.push(why);
        }
        diff
    }

    /// The launches to make: retries of earlier intents first (same
    /// tokens), then one new intent per launch the diff asks for.
    fn launches(&mut self, diff: &fleet::Diff) -> Vec<LaunchIntent> {
        let (obs, now) = (self.obs, self.obs.now);
        let launches = &mut self.memory.launches;
        let mut out = launches.retries(&obs.instances, self.first_pass);
        for action in &diff.actions {
            if let fleet::Action::Launch { subnet, count } = action {
                let release = self.memory.release.target.clone();
                out.push(launches.intend(&obs.cluster, subnet, *count, &release, now));
            }
        }
        out
    }

    /// The desired release waits for its `once` hooks.
    fn once_gated(&self) -> bool {
        let spec = &self.obs.spec;
        rollout::once_gated(
            &self.memory.release,
            &spec.release.id,
            !spec.release.hooks.once.is_empty(),
        )
    }

    /// Gives the desired release's `once` hooks to exactly one node, and
    /// keeps them there: the run recorded in memory (persisted before the
    /// task starts) names its node until it ends, so a restarted operator
    /// asks that node again instead of starting a second run elsewhere.
    fn run_once_hooks(&mut self, diff: &mut fleet::Diff) {
        let (obs, now) = (self.obs, self.obs.now);
        let desired = obs.spec.release.id.clone();
        let gated = self.once_gated();
        let release = &mut self.memory.release;
        if release
            .once_running
            .as_ref()
            .is_some_and(|r| r.release != desired || !gated)
        {
            release.once_running = None;
        }
        if !gated {
            return;
        }
        let alive = |id: &str| {
            obs.instances.iter().any(|i| {
                i.id == id && matches!(i.state, InstanceState::Pending | InstanceState::Running)
            })
        };
        if let Some(run) = &release.once_running {
            if !alive(&run.node) {
                // Gone with its node: nothing runs there any more.
                let message = format!(
                    "{} is gone: its once run of {desired} is given to another node",
                    run.node
                );
                release.once_running = None;
                self.record("once", None, message);
                return;
            }
        }
        let chosen = match &release.once_running {
            Some(run) => Some(run.node.clone()),
            None => once_candidate(obs, &self.memory),
        };
        let Some(node) = chosen else {
            diff.notes.push(format!(
                "the once hooks of {desired} wait for a provisioned node"
            ));
            return;
        };
        if obs.running.contains_key(&node)
            || diff.actions.iter().any(|a| matches!(a, fleet::Action::Start { node: n, .. } | fleet::Action::Cancel { node: n, .. } if *n == node))
        {
            diff.notes.push(format!("the once hooks of {desired} run on {node}"));
            return;
        }
        if self.memory.retry_after.get(&node).is_some_and(|t| *t > now) {
            return;
        }
        let release = &mut self.memory.release;
        if release.once_running.is_none() {
            release.once_running = Some(rollout::OnceRun {
                release: desired.clone(),
                node: node.clone(),
                since: now,
            });
            self.record(
                "once",
                Some(&node),
                format!("running the once hooks of {desired}"),
            );
        }
        self.once_started = true;
        diff.actions.push(fleet::Action::Start {
            node,
            task: Task::Once { release: desired },
        });
    }

    fn rollout_events(&mut self, events: Vec<rollout::Event>) {
        for ev in events {
            let (result, message) = match &ev {
                rollout::Event::Started { release } => {
                    ("started", format!("rolling out {release}"))
                }
                rollout::Event::Proven { release } => (
                    "completed",
                    format!("{release} is on every serving node and proven good"),
                ),
                rollout::Event::Halted { release, reason } => {
                    ("halted", format!("rollout of {release} halted: {reason}"))
                }
                rollout::Event::RollingBack { from, to, reason } => (
                    "rolled-back",
                    format!("rolling back {from} → {to}: {reason}"),
                ),
                rollout::Event::RolledBack { from, to } => {
                    ("rollback-done", format!("rollback {from} → {to} complete"))
                }
            };
            self.counts.push(Count::Rollout(result));
            self.record("rollout", None, message);
        }
    }

    fn finish(mut self, diff: fleet::Diff) -> Decision {
        let launches = self.launches(&diff);
        for action in &diff.actions {
            if let fleet::Action::Start {
                node,
                task: Task::Drain { reason },
            } = action
            {
                self.record("drain", Some(node), format!("draining: {reason}"));
            }
        }
        // A drain decided is written down before it starts, like a launch.
        let mut newly_leaving = false;
        for (node, why) in &diff.leaving {
            newly_leaving |= self
                .memory
                .leaving
                .insert(node.clone(), why.clone())
                .is_none();
        }
        let persist_first = !launches.is_empty() || self.once_started || newly_leaving;
        Decision {
            memory: self.memory,
            diff,
            launches,
            persist_first,
            task_notes: self.task_notes,
            activities: self.activities,
            counts: self.counts,
            forget: false,
        }
    }
}

/// The node to run `once` hooks on: provisioned, running, not leaving, no
/// task — in service first (oldest), else one held at `releasing`.
fn once_candidate(obs: &Observation, memory: &Memory) -> Option<String> {
    let mut candidates: Vec<&Instance> = obs
        .instances
        .iter()
        .filter(|i| i.state == InstanceState::Running)
        .filter(|i| matches!(i.phase, Some(Phase::InService | Phase::Releasing)))
        .filter(|i| !obs.running.contains_key(&i.id))
        .filter(|i| !memory.failed_nodes.contains_key(&i.id))
        .collect();
    candidates.sort_by_key(|i| {
        (
            i.phase != Some(Phase::InService),
            i.launched_at,
            i.id.clone(),
        )
    });
    candidates.first().map(|i| i.id.clone())
}

/// In service and running: what carries traffic.
fn serves(i: &Instance) -> bool {
    i.phase == Some(Phase::InService) && i.state == InstanceState::Running
}

/// No node is being updated or rolled back.
fn settled(running: &HashMap<String, Task>) -> bool {
    !running
        .values()
        .any(|t| matches!(t, Task::Update { .. } | Task::Rollback { .. }))
}

/// Metrics are read every evaluation interval: the traffic for the
/// planner (with autoscaling), the 5xx rate while a release is watched
/// for auto-rollback (with or without autoscaling).
fn evaluation_due(spec: &ClusterSpec, memory: &Memory, now: DateTime<Utc>) -> bool {
    let every = spec
        .autoscaling
        .as_ref()
        .map_or(ERRORS_EVALUATION_INTERVAL, |a| a.evaluation_interval.get());
    memory
        .last_eval_at
        .is_none_or(|t| now.signed_duration_since(t).to_std().unwrap_or_default() >= every)
}

fn fleet_node(
    i: &Instance,
    running: &HashMap<String, Task>,
    memory: &Memory,
    unhealthy: &HashMap<String, DateTime<Utc>>,
    now: DateTime<Utc>,
) -> fleet::Node {
    fleet::Node {
        id: i.id.clone(),
        // A missing phase tag means someone removed it: start over safely.
        phase: i.phase.unwrap_or(Phase::Launching),
        state: i.state,
        release: i.release.clone(),
        config: i.tags.get(tags::CONFIG).cloned(),
        subnet: i.subnet_id.clone(),
        launched_at: i.launched_at,
        protected: i.protected,
        task: running.get(&i.id).cloned(),
        failed: memory.failed_nodes.get(&i.id).cloned(),
        retire: memory.leaving.get(&i.id).cloned(),
        unhealthy_since: unhealthy.get(&i.id).copied(),
        resting: memory.retry_after.get(&i.id).is_some_and(|t| *t > now),
        launch: i.tags.get(tags::LAUNCH).cloned(),
        stopped_since: None,
        missing_since: None,
    }
}

/// Dates each node listed stopped that hangar did not stop from its first
/// such listing (kept in `listed_stopped`, forgotten once it is listed
/// otherwise); until that is [`fleet::STOPPED_BELIEVED_AFTER`] old the node
/// rests: no task, no replacement.
fn doubt_stopped_listings(
    nodes: &mut [fleet::Node],
    listed_stopped: &mut std::collections::BTreeMap<String, DateTime<Utc>>,
    now: DateTime<Utc>,
) {
    listed_stopped.retain(|id, _| nodes.iter().any(|n| n.id == *id && n.listed_stopped()));
    for n in nodes.iter_mut().filter(|n| n.listed_stopped()) {
        let since = *listed_stopped.entry(n.id.clone()).or_insert(now);
        n.stopped_since = Some(since);
        n.resting |= n.stopped_in_doubt_for(now).is_some();
    }
}

/// Dates each in-service node with no task moving it that the target
/// group does not list as a member — absent, `unused`, or `draining` though
/// hangar is not draining it — from the first read that found it so (kept
/// in `missing`; between reads, the last read's word holds). Someone took
/// it out behind hangar's back (the console, another tool): it carries no
/// traffic whatever its tags say, and goes back in ([`fleet::Task::Rejoin`]).
fn date_missing_from_group(
    nodes: &mut [fleet::Node],
    group: Option<&Result<Vec<TargetHealth>, String>>,
    missing: &mut std::collections::BTreeMap<String, DateTime<Utc>>,
    now: DateTime<Utc>,
) {
    let idle_in_service = |n: &fleet::Node| {
        n.phase == Phase::InService && n.state == InstanceState::Running && n.task.is_none()
    };
    missing.retain(|id, _| nodes.iter().any(|n| n.id == *id && idle_in_service(n)));
    if let Some(Ok(targets)) = group {
        let members: std::collections::BTreeSet<&str> = targets
            .iter()
            .filter(|t| !matches!(t.state, TargetState::Unused | TargetState::Draining))
            .map(|t| t.id.as_str())
            .collect();
        missing.retain(|id, _| !members.contains(id.as_str()));
        for n in nodes.iter().filter(|n| idle_in_service(n)) {
            if !members.contains(n.id.as_str()) {
                missing.entry(n.id.clone()).or_insert(now);
            }
        }
    }
    for n in nodes.iter_mut() {
        n.missing_since = missing.get(&n.id).copied();
    }
}

/// A task bringing a node up that serves nothing yet: a new node, one
/// going into the warm pool, or one taken out of it. Its failures are the
/// node's (it is replaced), never the serving fleet's.
fn brings_up(task: &Task) -> bool {
    matches!(task, Task::Advance | Task::Warm { .. } | Task::Serve)
}

/// Counts a node's retried `Advance` attempts and turns the one that
/// reaches [`MAX_ADVANCE_RETRIES`] into a node failure. Updates, drains and
/// rollbacks of nodes that are (or were) serving keep retrying: replacing
/// those is the job of self-healing, which knows about minimum capacity.
fn give_up_after_retries(
    memory: &mut Memory,
    node: &str,
    task: &Task,
    outcome: &Outcome,
) -> Outcome {
    match outcome {
        Outcome::Retry(why) if brings_up(task) => {
            let n = memory.node_retries.entry(node.to_string()).or_default();
            *n += 1;
            if *n >= MAX_ADVANCE_RETRIES {
                Outcome::NodeFailed(format!("gave up after {n} attempts; last: {why}"))
            } else {
                outcome.clone()
            }
        }
        _ => outcome.clone(),
    }
}

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod tests;
