//! The reconciler: for one cluster, observe the cloud, decide, act.
//!
//! Level-triggered. Each pass reads the instances (by ownership tags, from
//! the shared [`Inventory`]), the tasks running and finished, and the traffic
//! when an evaluation is due; runs the pure core ([`planner`], [`rollout`],
//! [`fleet`]); then starts what is missing — a launch, a node task, a
//! cancel — without waiting for any of it. Status records what it saw and
//! why it acted.
//!
//! [`planner`]: crate::planner
//! [`rollout`]: crate::rollout
//! [`fleet`]: crate::fleet

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use hangar_cloud::{tags, Cloud, CloudError, Instance, InstanceState, LaunchRequest, Phase};
use hangar_crds::{ClusterSpec, DeletionPolicy};
use sha2::{Digest, Sha256};

use crate::controller::{Action, Key, Reconciler, TriggerSender};
use crate::fleet::{self, Task};
use crate::http::{Board, ProblemView};
use crate::inventory::Inventory;
use crate::node_task::{self, NodeContext};
use crate::planner::{self, Observation};
use crate::rollout;
use crate::specs::{ClusterSpecEntry, SpecSet};
use crate::ssh::{Redactor, SshPool, SshSettings};
use crate::status::{ClusterStatus, ConditionType, DecisionRecord, NodeStatus, StatusStore};
use crate::tasks::{Outcome, Tasks};
use crate::telemetry::{PhaseLabels, ResultLabels, Telemetry};

/// Where the operator gets a [`Cloud`] for a region.
#[async_trait]
pub trait CloudProvider: Send + Sync {
    async fn cloud(&self, region: &str) -> Result<Cloud, CloudError>;
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("cloud: {0}")]
    Cloud(#[from] CloudError),
    #[error("ssh settings: {0}")]
    Ssh(String),
}

/// Tunables of the operator loop (not of clusters).
#[derive(Clone, Debug)]
pub struct LoopSettings {
    /// Every cluster is looked at at least this often.
    pub resync: Duration,
    /// How stale the shared instance listing may be.
    pub inventory_max_age: Duration,
    /// While nodes change, look again at least this often.
    pub busy_requeue: Duration,
    pub state_dir: PathBuf,
    pub owner: String,
}

impl LoopSettings {
    pub fn new(state_dir: PathBuf, owner: String) -> LoopSettings {
        LoopSettings {
            resync: Duration::from_secs(15),
            inventory_max_age: Duration::from_secs(5),
            busy_requeue: Duration::from_secs(5),
            state_dir,
            owner,
        }
    }
}

pub struct Operator {
    settings: LoopSettings,
    clouds: Arc<dyn CloudProvider>,
    specs: RwLock<Arc<SpecSet>>,
    /// The latest status of each cluster, shared with the [`Board`].
    statuses: Mutex<HashMap<String, Arc<ClusterStatus>>>,
    store: StatusStore,
    board: Arc<Board>,
    telemetry: Telemetry,
    inventory: Inventory,
    tasks: Tasks,
    ssh_pools: Mutex<HashMap<String, (String, Arc<SshPool>)>>,
    probes: crate::probe::Probes,
    /// When each cluster's status was last written by this process.
    persisted_at: Mutex<HashMap<String, std::time::Instant>>,
    /// Per cluster: the number of nodes serving and since when. Memory
    /// only: after a restart the first metric period is simply skipped.
    serving_counts: Mutex<HashMap<String, (u32, DateTime<Utc>)>>,
}

/// How stale a status file may get while only readings change (the
/// metric, the planner's time stamps): at 1,000 clusters, persisting every
/// evaluation meant 1,000 file writes every 15 s with no decision in them.
/// A crash loses at most this much of the planner's clock, well inside the
/// stabilization windows it serves.
const READINGS_PERSIST_EVERY: Duration = Duration::from_secs(60);

impl Operator {
    pub fn new(
        settings: LoopSettings,
        clouds: Arc<dyn CloudProvider>,
        store: StatusStore,
        board: Arc<Board>,
        telemetry: Telemetry,
        triggers: TriggerSender,
    ) -> Operator {
        let (statuses, errors) = store.load_all();
        for e in errors {
            tracing::warn!(error = %e, "ignoring unreadable status file");
        }
        for s in &statuses {
            board.publish(s);
        }
        Operator {
            inventory: Inventory::new(settings.inventory_max_age),
            tasks: Tasks::new(triggers),
            settings,
            clouds,
            specs: RwLock::new(Arc::new(SpecSet::default())),
            statuses: Mutex::new(
                statuses
                    .into_iter()
                    .map(|s| (s.name.clone(), Arc::new(s)))
                    .collect(),
            ),
            store,
            board,
            telemetry,
            ssh_pools: Mutex::default(),
            probes: crate::probe::Probes::default(),
            persisted_at: Mutex::default(),
            serving_counts: Mutex::default(),
        }
    }

    pub fn tasks(&self) -> &Tasks {
        &self.tasks
    }

    /// Every cluster known from specs or from stored status.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.specs().clusters.keys().cloned().collect();
        keys.extend(
            self.statuses
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .keys()
                .cloned(),
        );
        keys.sort();
        keys.dedup();
        keys
    }

    /// The spec set in force (what a reload starts from).
    pub fn specs(&self) -> Arc<SpecSet> {
        self.specs.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Installs a freshly loaded spec set; returns the clusters it changed.
    pub fn set_specs(&self, set: SpecSet) -> Vec<String> {
        let changed = self.specs().changed(&set);
        self.telemetry.spec_problems.set(set.problems.len() as i64);
        self.board
            .set_problems(set.problems.iter().map(ProblemView::from).collect());
        for p in &set.problems {
            tracing::warn!(problem = %p, "spec problem; other clusters keep reconciling");
        }
        *self.specs.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
        changed
    }

    fn status(&self, key: &str) -> Option<ClusterStatus> {
        self.statuses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .map(|s| (**s).clone())
    }

    /// Whether this process has looked at `cluster`'s serving nodes before.
    fn serving_counted(&self, cluster: &str) -> bool {
        self.serving_counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(cluster)
    }

    /// When the number of nodes serving `cluster` last changed (now, if it
    /// just did or was never seen).
    fn serving_changed_at(&self, cluster: &str, serving: u32, now: DateTime<Utc>) -> DateTime<Utc> {
        let mut map = self
            .serving_counts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match map.get(cluster) {
            Some(&(n, since)) if n == serving => since,
            _ => {
                map.insert(cluster.to_string(), (serving, now));
                now
            }
        }
    }

    /// Persists only when something besides timestamps changed: a
    /// thousand idle clusters must not rewrite a thousand files per pass.
    /// A change of decisions is written at once; new readings alone (see
    /// [`ClusterStatus::same_decisions`]) at most every
    /// [`READINGS_PERSIST_EVERY`].
    fn save_status(&self, before: Option<&ClusterStatus>, status: ClusterStatus) {
        let write = match before {
            None => true,
            Some(b) if !b.same_decisions(&status) => true,
            Some(b) if b.same_content(&status) => false,
            Some(_) => self
                .persisted_at
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&status.name)
                .is_none_or(|t| t.elapsed() >= READINGS_PERSIST_EVERY),
        };
        if write {
            match self.store.save(&status) {
                Ok(()) => {
                    self.persisted_at
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(status.name.clone(), std::time::Instant::now());
                }
                Err(e) => {
                    tracing::error!(cluster = %status.name, error = %e, "cannot persist status")
                }
            }
        }
        let status = Arc::new(status);
        self.board.publish_shared(status.clone());
        self.statuses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(status.name.clone(), status);
    }

    fn forget(&self, key: &str) {
        if let Err(e) = self.store.remove(key) {
            tracing::error!(cluster = %key, error = %e, "cannot remove status");
        }
        self.board.forget(key);
        self.persisted_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        self.statuses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    fn ssh_pool(
        &self,
        name: &str,
        spec: &ClusterSpec,
        spec_dir: Option<&std::path::Path>,
    ) -> Result<Arc<SshPool>, ReconcileError> {
        let mut ssh = spec.ssh.clone();
        if let Some(dir) = spec_dir {
            ssh.private_key_file = dir.join(&ssh.private_key_file);
            ssh.known_hosts_file = ssh.known_hosts_file.map(|f| dir.join(f));
        }
        let redactor = redactor(spec, spec_dir);
        let key = format!("{:?}|{:?}", ssh, spec.provision.secrets);
        let mut pools = self.ssh_pools.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((k, pool)) = pools.get(name) {
            if *k == key {
                return Ok(pool.clone());
            }
        }
        let settings = SshSettings::from_spec(&ssh, &self.settings.state_dir)
            .map_err(|e| ReconcileError::Ssh(e.to_string()))?;
        let pool = Arc::new(SshPool::new(settings, redactor));
        pools.insert(name.to_string(), (key, pool.clone()));
        Ok(pool)
    }

    /// Cancels every node task and waits for each to reach a safe point,
    /// then writes every status, so readings held back by
    /// [`READINGS_PERSIST_EVERY`] survive a graceful stop.
    pub async fn shutdown(&self) {
        self.tasks.shutdown().await;
        let statuses: Vec<Arc<ClusterStatus>> = self
            .statuses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for s in statuses {
            if let Err(e) = self.store.save(&s) {
                tracing::error!(cluster = %s.name, error = %e, "cannot persist status");
            }
        }
    }
}

/// Secrets a cluster's logs must never show: secret vars and the env file.
fn redactor(spec: &ClusterSpec, spec_dir: Option<&std::path::Path>) -> Redactor {
    let r = Redactor::from_vars(&spec.provision.vars, &spec.provision.secrets);
    match (&spec.provision.env_file, spec_dir) {
        (Some(f), Some(dir)) => match std::fs::read_to_string(dir.join(f)) {
            Ok(text) => r.with_env_file(&text),
            Err(_) => r,
        },
        _ => r,
    }
}

#[async_trait]
impl Reconciler for Operator {
    type Error = ReconcileError;

    async fn reconcile(&self, key: &Key) -> Result<Action, ReconcileError> {
        let specs = self.specs();
        match specs.get(key) {
            Some(entry) => self.reconcile_cluster(entry).await,
            None => self.reconcile_removed(key).await,
        }
    }

    fn observe(&self, key: &Key, outcome: Result<&Action, &ReconcileError>, took: Duration) {
        self.telemetry
            .reconcile_duration
            .observe(took.as_secs_f64());
        if outcome.is_err() {
            self.telemetry
                .reconcile_errors
                .get_or_create(&Telemetry::cluster(key))
                .inc();
        }
    }
}

/// A pass, decided but not acted on.
struct Decided {
    cloud: Cloud,
    seen: Observed,
    before: Option<ClusterStatus>,
    status: ClusterStatus,
    diff: fleet::Diff,
    serving: Vec<Instance>,
}

/// The result of [`Operator::preview`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct Preview {
    pub status: ClusterStatus,
    pub diff: fleet::Diff,
}

/// What one pass saw, before deciding.
struct Observed {
    instances: Vec<Instance>,
    running: HashMap<String, Task>,
}

impl Operator {
    async fn observe_cluster(
        &self,
        name: &str,
        region: &str,
        cloud: &Cloud,
    ) -> Result<Observed, ReconcileError> {
        // Only this cluster's instances, through the snapshot's index.
        let instances = self
            .inventory
            .cluster_instances(region, cloud.compute.as_ref(), name)
            .await?;
        Ok(Observed {
            instances,
            running: self.tasks.running(name),
        })
    }

    /// Observes a cluster and runs the pure core on it: everything a pass
    /// does except acting. `live` folds in finished node tasks; a preview
    /// (`hangar plan`) leaves them alone.
    async fn decide(
        &self,
        entry: &ClusterSpecEntry,
        now: DateTime<Utc>,
        live: bool,
    ) -> Result<Decided, ReconcileError> {
        let name = entry.name().to_string();
        let spec = &entry.loaded.cluster.spec;
        let cloud = self.clouds.cloud(&spec.region).await?;
        let seen = self.observe_cluster(&name, &spec.region, &cloud).await?;
        let before = self.status(&name);
        let mut status = before.clone().unwrap_or_else(|| ClusterStatus::new(&name));
        status.file = Some(entry.loaded.file.clone());
        status.region = spec.region.clone();
        status.observed_spec_hash = entry.spec_hash.clone();
        status.spec = Some(spec.clone());
        if status.spec_removed {
            status.spec_removed = false;
            status.record(
                now,
                "spec",
                None,
                "spec is back; managing the cluster again",
            );
        }

        if live {
            self.absorb_task_results(&mut status, spec, now);
        }
        let counted = count_toward_capacity(&seen.instances);
        let serving: Vec<&Instance> = seen
            .instances
            .iter()
            .filter(|i| i.phase == Some(Phase::InService) && i.state == InstanceState::Running)
            .collect();

        // Traffic and the planner.
        // Metrics are read every evaluation interval: the traffic for the
        // planner (with autoscaling), the 5xx rate while a release is
        // watched for auto-rollback (with or without autoscaling).
        let eval_every = spec
            .autoscaling
            .as_ref()
            .map_or(ERRORS_EVALUATION_INTERVAL, |a| a.evaluation_interval.get());
        // See `planner::Pass::standing`.
        let continuing = before.is_some() && self.serving_counted(&name);
        let serving_changed_at = self.serving_changed_at(&name, serving.len() as u32, now);
        let eval_due = status.last_eval_at.is_none_or(|t| {
            now.signed_duration_since(t).to_std().unwrap_or_default() >= eval_every
        });
        if eval_due {
            status.last_eval_at = Some(now);
        }
        if eval_due && spec.autoscaling.is_some() {
            match crate::traffic::read_rate(cloud.metrics.as_ref(), spec, serving.len() as u32, now)
                .await
            {
                // A per-target average over a period in which the serving
                // count changed was taken over other nodes than serve now;
                // times today's count it misreports the traffic (while nodes
                // join: too high, feeding a runaway scale-out). Wait for a
                // period that starts after the change.
                Ok(Some(obs))
                    if per_target_metric(spec)
                        .is_some_and(|period| obs.observed_at - period < serving_changed_at) => {}
                Ok(Some(obs)) => status.last_metric = Some(obs),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(cluster = %name, error = %e, "cannot read traffic metric; holding")
                }
            }
        }
        let metric: Option<Observation> = status.last_metric;
        let pass = planner::Pass {
            standing: continuing.then_some(status.desired),
            counted,
            evaluation_due: eval_due,
        };
        let evaluated = pass.evaluates(spec);
        let decision = planner::for_pass(spec, now, &pass, metric, &status.history);
        if eval_due {
            if let Some(rec) = decision.recommendation {
                status.history.record(rec, spec);
            }
        }
        if decision.desired != status.desired || before.is_none() {
            let direction = if decision.desired > status.desired {
                "out"
            } else {
                "in"
            };
            if before.is_some() {
                self.telemetry
                    .scaling_actions
                    .get_or_create(&ResultLabels {
                        cluster: name.clone(),
                        result: direction.into(),
                    })
                    .inc();
            }
            status.record(
                now,
                "scale",
                None,
                format!(
                    "desired {} → {}: {}",
                    status.desired, decision.desired, decision.reason
                ),
            );
            tracing::info!(cluster = %name, desired = decision.desired, "{}", decision.reason);
        }
        // A hold keeps the last evaluation's reason on show.
        if evaluated || decision.desired != status.desired {
            status.last_decision = Some(DecisionRecord {
                at: now,
                desired: decision.desired,
                reason: decision.reason.clone(),
            });
        }
        status.desired = decision.desired;
        status.window = Some(decision.window.clone());

        // Releases.
        remember_release(&mut status, spec, now);
        let serving_releases: Vec<Option<&str>> =
            serving.iter().map(|i| i.release.as_deref()).collect();
        let settled = !seen
            .running
            .values()
            .any(|t| matches!(t, Task::Update { .. } | Task::Rollback { .. }));
        let events = rollout::observe(
            &mut status.release,
            &spec.release.id,
            spec.release.rollback.as_ref(),
            &rollout::Observed {
                serving: &serving_releases,
                settled,
                now,
            },
        );
        self.record_rollout(&mut status, &name, events, now);
        if let (true, Some(since)) = (
            eval_due,
            rollout::watching(&status.release, spec.release.rollback.as_ref(), now),
        ) {
            let period = crate::traffic::error_period(spec);
            match crate::traffic::read_errors(
                cloud.metrics.as_ref(),
                &spec.load_balancer.target_group_arn,
                since,
                now,
                period,
            )
            .await
            {
                Ok((errors, requests)) => {
                    if let Some(rb) = &spec.release.rollback {
                        if let Some(ev) = rollout::judge(&mut status.release, rb, errors, requests)
                        {
                            self.record_rollout(&mut status, &name, vec![ev], now);
                        }
                    }
                }
                Err(e) => tracing::warn!(cluster = %name, error = %e, "cannot read the error rate"),
            }
        }

        // The fleet.
        let unhealthy = self.probes.unhealthy(&name);
        let nodes: Vec<fleet::Node> = seen
            .instances
            .iter()
            .map(|i| fleet_node(i, &seen.running, &status, &unhealthy))
            .collect();
        let target = fleet::Target {
            desired: status.desired,
            release: &status.release.target.clone(),
            config: &entry.config_hash,
            rollout_halted: rollout::halted(&status.release),
            rolling_back_from: status.release.rolling_back_from.as_deref(),
            rollout: spec.release.rollout,
            subnets: &spec.instances.subnets,
            scale_in: spec.scale_in_policy,
            self_healing: spec.self_healing,
            launch_allowed: status.launch_backoff_until.is_none_or(|t| t <= now),
            now,
        };
        let diff = fleet::diff(&nodes, &target);
        let serving = serving.into_iter().cloned().collect();
        Ok(Decided {
            cloud,
            seen,
            before,
            status,
            diff,
            serving,
        })
    }

    async fn reconcile_cluster(&self, entry: &ClusterSpecEntry) -> Result<Action, ReconcileError> {
        let name = entry.name().to_string();
        let spec = &entry.loaded.cluster.spec;
        let now = Utc::now();
        let Decided {
            cloud,
            seen,
            before,
            mut status,
            diff,
            serving,
        } = self.decide(entry, now, true).await?;
        let serving: Vec<&Instance> = serving.iter().collect();
        let acted = !diff.actions.is_empty();
        for action in diff.actions {
            self.act(action, entry, spec, &cloud, &seen, &mut status, now)
                .await?;
        }

        // Health probes of serving nodes, off the reconcile path.
        self.probes.maybe_probe(&name, spec, &serving, now);

        // Status. After acting, look again to show what the actions
        // started; a pass that did nothing shows what it saw.
        let seen_after = if acted {
            self.observe_cluster(&name, &spec.region, &cloud).await?
        } else {
            seen
        };
        self.fill_status(&mut status, &seen_after, &diff.notes, now);
        self.export_metrics(&name, &status);
        let busy = acted
            || !seen_after.running.is_empty()
            || status.release.outdated > 0
            || diff.counted != status.desired;
        self.save_status(before.as_ref(), status);

        let mut next = if busy {
            self.settings.busy_requeue
        } else {
            self.settings.resync
        };
        if let Some(a) = &spec.autoscaling {
            next = next.min(a.evaluation_interval.get());
        }
        Ok(Action::requeue(next))
    }

    /// What a pass would do now, without doing any of it (`hangar plan`):
    /// only reads (instance listing, metrics), never a mutating call.
    pub async fn preview(&self, name: &str) -> Result<Option<Preview>, ReconcileError> {
        let specs = self.specs();
        let Some(entry) = specs.get(name) else {
            return Ok(None);
        };
        let now = Utc::now();
        let mut d = self.decide(entry, now, false).await?;
        self.fill_status(&mut d.status, &d.seen, &d.diff.notes, now);
        Ok(Some(Preview {
            status: d.status,
            diff: d.diff,
        }))
    }

    /// The spec is gone: retain (default) leaves the fleet alone; delete
    /// drains and terminates it, then forgets the cluster.
    async fn reconcile_removed(&self, key: &str) -> Result<Action, ReconcileError> {
        let Some(before) = self.status(key) else {
            return Ok(Action::await_change());
        };
        // A cluster whose file is still there but no longer loads is broken,
        // not removed: whatever its deletion policy, its nodes keep serving
        // exactly as they are until the file is fixed.
        let specs = self.specs();
        let broken = before
            .file
            .as_ref()
            .and_then(|f| specs.problems.iter().find(|p| &p.file == f));
        if let Some(problem) = broken {
            let now = Utc::now();
            let mut status = before.clone();
            let already = before
                .condition(ConditionType::Degraded)
                .is_some_and(|c| c.status && c.reason == "SpecInvalid");
            if !already {
                status.record(
                    now,
                    "spec",
                    None,
                    format!("spec does not load; holding every node as it is: {problem}"),
                );
                tracing::warn!(cluster = %key, %problem, "spec does not load; holding every node as it is");
            }
            status.set_condition(
                ConditionType::Degraded,
                true,
                "SpecInvalid",
                problem.to_string(),
                now,
            );
            status.set_condition(ConditionType::Progressing, false, "SpecInvalid", "", now);
            self.save_status(Some(&before), status);
            return Ok(Action::await_change());
        }
        let Some(spec) = before.spec.clone() else {
            self.forget(key);
            return Ok(Action::await_change());
        };
        let now = Utc::now();
        let mut status = before.clone();
        if !status.spec_removed {
            status.spec_removed = true;
            let what = match spec.deletion_policy {
                DeletionPolicy::Retain => "deletionPolicy retain: nodes keep running, unmanaged",
                DeletionPolicy::Delete => {
                    "deletionPolicy delete: draining and terminating every node"
                }
            };
            status.record(now, "spec", None, format!("spec removed; {what}"));
            tracing::warn!(cluster = %key, "spec removed; {what}");
        }
        if spec.deletion_policy == DeletionPolicy::Retain {
            status.set_condition(
                ConditionType::Ready,
                false,
                "SpecRemoved",
                "spec removed; nodes retained, unmanaged",
                now,
            );
            status.set_condition(ConditionType::Progressing, false, "SpecRemoved", "", now);
            self.save_status(Some(&before), status);
            return Ok(Action::await_change());
        }
        let cloud = self.clouds.cloud(&spec.region).await?;
        let seen = self.observe_cluster(key, &spec.region, &cloud).await?;
        self.absorb_task_results(&mut status, &spec, now);
        let live: Vec<&Instance> = seen
            .instances
            .iter()
            .filter(|i| {
                !matches!(
                    i.state,
                    InstanceState::Terminated | InstanceState::ShuttingDown
                )
            })
            .collect();
        if live.is_empty() && seen.running.is_empty() {
            status.record(
                now,
                "spec",
                None,
                "every node terminated; forgetting the cluster",
            );
            self.forget(key);
            return Ok(Action::await_change());
        }
        let nodes: Vec<fleet::Node> = seen
            .instances
            .iter()
            .map(|i| fleet_node(i, &seen.running, &status, &HashMap::new()))
            .collect();
        let target_release = status.release.target.clone();
        let target = fleet::Target {
            desired: 0,
            release: &target_release,
            config: "",
            rollout_halted: true,
            rolling_back_from: None,
            rollout: spec.release.rollout,
            subnets: &spec.instances.subnets,
            scale_in: spec.scale_in_policy,
            self_healing: spec.self_healing,
            launch_allowed: false,
            now,
        };
        let diff = fleet::diff(&nodes, &target);
        for action in diff.actions {
            if let fleet::Action::Start {
                node,
                task: task @ Task::Drain { .. },
            } = action
            {
                if let Some(inst) = seen.instances.iter().find(|i| i.id == node) {
                    if let Err(e) =
                        self.start_task(key, None, &spec, &cloud, inst, task, &status.release)
                    {
                        status.record(now, "error", Some(&node), e.to_string());
                    }
                }
            } else if let fleet::Action::Cancel { node, .. } = action {
                self.tasks.cancel(&node);
            }
        }
        self.fill_status(&mut status, &seen, &diff.notes, now);
        self.save_status(Some(&before), status);
        Ok(Action::requeue(self.settings.busy_requeue))
    }

    #[allow(clippy::too_many_arguments)]
    async fn act(
        &self,
        action: fleet::Action,
        entry: &ClusterSpecEntry,
        spec: &ClusterSpec,
        cloud: &Cloud,
        seen: &Observed,
        status: &mut ClusterStatus,
        now: DateTime<Utc>,
    ) -> Result<(), ReconcileError> {
        let name = entry.name();
        let release = status.release.target.clone();
        match action {
            fleet::Action::Launch { subnet, count } => {
                let req = LaunchRequest {
                    cluster: name.to_string(),
                    release: release.clone(),
                    count,
                    launch_template: spec.instances.launch_template.clone(),
                    launch_template_version: spec.instances.launch_template_version.clone(),
                    instance_type: spec.instances.instance_type.clone(),
                    subnet: subnet.clone(),
                    extra_tags: spec.instances.tags.clone(),
                    client_token: client_token(name, &subnet, count, &seen.instances),
                };
                let launched = cloud.compute.launch(&req).await?;
                let ids: Vec<&str> = launched.iter().map(|i| i.id.as_str()).collect();
                status.record(
                    now,
                    "launch",
                    None,
                    format!("launched {} in {subnet}: {}", ids.len(), ids.join(", ")),
                );
                tracing::info!(cluster = %name, subnet = %subnet, instances = ?ids, "launched");
                self.inventory.launched(&spec.region, launched).await;
            }
            fleet::Action::Start { node, task } => {
                if let Some(inst) = seen.instances.iter().find(|i| i.id == node) {
                    if let Task::Drain { reason } = &task {
                        status.record(now, "drain", Some(&node), format!("draining: {reason}"));
                    }
                    // A cluster whose SSH settings are broken (missing key
                    // file…) cannot start node work; say so, keep going.
                    if let Err(e) =
                        self.start_task(name, Some(entry), spec, cloud, inst, task, &status.release)
                    {
                        status.node_errors.insert(node.clone(), e.to_string());
                        tracing::warn!(cluster = %name, node = %node, error = %e, "cannot start node task");
                    }
                }
            }
            fleet::Action::Cancel { node, reason } => {
                tracing::info!(cluster = %name, node = %node, reason = %reason, "cancelling node task");
                self.tasks.cancel(&node);
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn start_task(
        &self,
        cluster: &str,
        entry: Option<&ClusterSpecEntry>,
        spec: &ClusterSpec,
        cloud: &Cloud,
        instance: &Instance,
        task: Task,
        releases: &crate::status::ReleaseStatus,
    ) -> Result<(), ReconcileError> {
        let spec_dir = entry.map(|e| e.loaded.spec_dir().to_path_buf());
        let ssh = self.ssh_pool(cluster, spec, spec_dir.as_deref())?;
        let ctx = NodeContext {
            cluster: cluster.to_string(),
            spec: Arc::new(spec.clone()),
            runbook: entry.map(|e| e.loaded.runbook_path()),
            env_file: entry.and_then(|e| e.loaded.env_file_path()),
            config_hash: entry.map(|e| e.config_hash.clone()),
            release: releases.target.clone(),
            fallback_release: releases.last_good.clone(),
            artifacts: releases.known.clone(),
            cloud: cloud.clone(),
            ssh,
            inventory: self.inventory.clone(),
            telemetry: self.telemetry.clone(),
        };
        let instance = instance.clone();
        let node = instance.id.clone();
        let task_for_run = task.clone();
        self.tasks.start(cluster, &node, task, move |handle| {
            node_task::run(ctx, instance, task_for_run, handle)
        });
        Ok(())
    }

    /// Folds finished tasks and their notes into status.
    fn absorb_task_results(
        &self,
        status: &mut ClusterStatus,
        spec: &ClusterSpec,
        now: DateTime<Utc>,
    ) {
        let (finished, notes) = self.tasks.drain(&status.name);
        for n in notes {
            status.record(n.at, &n.kind, Some(&n.node), n.message);
        }
        for f in finished {
            self.telemetry
                .node_tasks
                .get_or_create(&crate::telemetry::TaskLabels {
                    task: f.task.name().into(),
                    result: f.outcome.label().into(),
                })
                .inc();
            let outcome = give_up_after_retries(status, &f.node, &f.task, &f.outcome);
            match &outcome {
                Outcome::Done => {
                    status.node_errors.remove(&f.node);
                    status.node_retries.remove(&f.node);
                    if matches!(f.task, Task::Advance) {
                        status.node_failures = 0;
                        status.launch_backoff_until = None;
                    }
                }
                Outcome::Cancelled => {}
                Outcome::Retry(why) => {
                    status.node_errors.insert(f.node.clone(), why.clone());
                    status.record(
                        f.at,
                        "retry",
                        Some(&f.node),
                        format!("{}: {why} (will retry)", f.task.name()),
                    );
                }
                Outcome::NodeFailed(why) => {
                    status.failed_nodes.insert(f.node.clone(), why.clone());
                    status.node_errors.insert(f.node.clone(), why.clone());
                    status.node_failures += 1;
                    status.record(
                        f.at,
                        "error",
                        Some(&f.node),
                        format!("{} failed: {why}; replacing the node", f.task.name()),
                    );
                    if status.node_failures >= 3 {
                        let exp = 30u64.saturating_mul(1 << (status.node_failures - 3).min(5));
                        let wait = chrono::Duration::seconds(exp.min(600) as i64);
                        status.launch_backoff_until = Some(now + wait);
                        status.record(
                            now,
                            "backoff",
                            None,
                            format!(
                                "{} nodes failed in a row: launches wait {}s",
                                status.node_failures,
                                wait.num_seconds()
                            ),
                        );
                    }
                }
                Outcome::ReleaseFailed { release, reason } => {
                    status.node_errors.insert(f.node.clone(), reason.clone());
                    // A new node that failed on the release is not serving
                    // anything: replace it (an updated node was restored).
                    if matches!(f.task, Task::Advance) {
                        status.failed_nodes.insert(f.node.clone(), reason.clone());
                    }
                    if let Some(ev) = rollout::fail(&mut status.release, release, reason) {
                        let name = status.name.clone();
                        self.record_rollout(status, &name, vec![ev], now);
                    }
                }
            }
        }
        let _ = spec;
    }

    fn record_rollout(
        &self,
        status: &mut ClusterStatus,
        name: &str,
        events: Vec<rollout::Event>,
        now: DateTime<Utc>,
    ) {
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
            self.telemetry
                .rollouts
                .get_or_create(&ResultLabels {
                    cluster: name.to_string(),
                    result: result.into(),
                })
                .inc();
            tracing::info!(cluster = %name, "{message}");
            status.record(now, "rollout", None, message);
        }
    }

    fn fill_status(
        &self,
        status: &mut ClusterStatus,
        seen: &Observed,
        notes: &[String],
        now: DateTime<Utc>,
    ) {
        status.updated_at = Some(now);
        let live: Vec<&Instance> = seen
            .instances
            .iter()
            .filter(|i| !matches!(i.state, InstanceState::Terminated))
            .collect();
        status
            .failed_nodes
            .retain(|id, _| live.iter().any(|i| i.id == *id));
        status
            .node_errors
            .retain(|id, _| live.iter().any(|i| i.id == *id));
        status
            .node_retries
            .retain(|id, _| live.iter().any(|i| i.id == *id));
        let mut phases: BTreeMap<String, u32> = BTreeMap::new();
        for i in &live {
            *phases.entry(phase_label(i)).or_default() += 1;
        }
        status.phases = phases;
        status.nodes = live
            .iter()
            .map(|i| NodeStatus {
                id: i.id.clone(),
                phase: phase_label(i),
                state: format!("{:?}", i.state).to_lowercase(),
                release: i.release.clone(),
                address: i.private_ip.map(|ip| ip.to_string()),
                subnet: i.subnet_id.clone(),
                task: seen.running.get(&i.id).map(|t| t.name().to_string()),
                protected: i.protected,
                launched_at: i.launched_at,
                last_error: status.node_errors.get(&i.id).cloned(),
            })
            .collect();
        let in_service = status.phases.get("in-service").copied().unwrap_or(0);
        let on_target = status.release.on_target;
        let ready =
            in_service == status.desired && on_target == in_service && status.release.outdated == 0;
        let msg = format!(
            "{in_service}/{} in service on {}",
            status.desired, status.release.target
        );
        if ready {
            status.set_condition(ConditionType::Ready, true, "AllInService", msg, now);
        } else {
            status.set_condition(ConditionType::Ready, false, "Converging", msg, now);
        }
        let progressing = !seen.running.is_empty() || !ready;
        let why = if notes.is_empty() {
            String::new()
        } else {
            notes.join("; ")
        };
        status.set_condition(
            ConditionType::Progressing,
            progressing,
            if progressing { "Working" } else { "Idle" },
            why,
            now,
        );
        let degraded = if rollout::halted(&status.release) {
            Some((
                "ReleaseFailed",
                format!(
                    "release {} failed; serving {}",
                    status.release.desired, status.release.target
                ),
            ))
        } else if status.release.rolling_back_from.is_some() {
            Some((
                "RollingBack",
                format!(
                    "rolling back from {}",
                    status.release.rolling_back_from.clone().unwrap_or_default()
                ),
            ))
        } else if status.node_failures >= 3 {
            Some((
                "NodesFailing",
                format!("{} nodes in a row failed to come up", status.node_failures),
            ))
        } else {
            None
        };
        match degraded {
            Some((reason, message)) => {
                status.set_condition(ConditionType::Degraded, true, reason, message, now)
            }
            None => status.set_condition(ConditionType::Degraded, false, "AsExpected", "", now),
        }
    }

    fn export_metrics(&self, name: &str, status: &ClusterStatus) {
        self.telemetry
            .desired_nodes
            .get_or_create(&Telemetry::cluster(name))
            .set(status.desired.into());
        for phase in Phase::ALL {
            let n = status.phases.get(phase.as_str()).copied().unwrap_or(0);
            self.telemetry
                .nodes
                .get_or_create(&PhaseLabels {
                    cluster: name.to_string(),
                    phase: phase.to_string(),
                })
                .set(n.into());
        }
    }
}

/// Keeps the artifact of every recent release, so the last good one can
/// be shipped to new nodes even after the spec names a failing one.
fn remember_release(status: &mut ClusterStatus, spec: &ClusterSpec, now: DateTime<Utc>) {
    const KEEP: usize = 10;
    let r = &spec.release;
    let known = &mut status.release.known;
    let entry = known.entry(r.id.clone()).or_default();
    if entry.artifact != r.artifact || entry.sha256 != r.sha256 {
        *entry = crate::status::KnownRelease {
            artifact: r.artifact.clone(),
            sha256: r.sha256.clone(),
            first_seen: Some(now),
        };
    }
    while known.len() > KEEP {
        let keep = [
            Some(r.id.as_str()),
            status.release.last_good.as_deref(),
            Some(status.release.target.as_str()),
        ];
        let oldest = known
            .iter()
            .filter(|(id, _)| !keep.contains(&Some(id.as_str())))
            .min_by_key(|(_, k)| k.first_seen)
            .map(|(id, _)| id.clone());
        match oldest {
            Some(id) => known.remove(&id),
            None => break,
        };
    }
}

fn phase_label(i: &Instance) -> String {
    match i.state {
        InstanceState::Stopped | InstanceState::Stopping => "stopped".into(),
        InstanceState::ShuttingDown => "terminating".into(),
        _ => i.phase.unwrap_or(Phase::Launching).to_string(),
    }
}

/// Instances that count toward capacity: alive and not on their way out.
pub fn count_toward_capacity(instances: &[Instance]) -> u32 {
    instances
        .iter()
        .filter(|i| matches!(i.state, InstanceState::Pending | InstanceState::Running))
        .filter(|i| !matches!(i.phase, Some(Phase::Draining | Phase::Terminating)))
        .count() as u32
}

fn fleet_node(
    i: &Instance,
    running: &HashMap<String, Task>,
    status: &ClusterStatus,
    unhealthy: &HashMap<String, DateTime<Utc>>,
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
        failed: status.failed_nodes.get(&i.id).cloned(),
        unhealthy_since: unhealthy.get(&i.id).copied(),
    }
}

/// The same observation yields the same token, so a launch retried after a
/// lost response is recognised by EC2 instead of launching twice.
fn client_token(cluster: &str, subnet: &str, count: u32, instances: &[Instance]) -> String {
    let mut ids: Vec<&str> = instances.iter().map(|i| i.id.as_str()).collect();
    ids.sort_unstable();
    let mut h = Sha256::new();
    h.update(format!("{cluster}|{subnet}|{count}|{}", ids.join(",")));
    let mut token = hex::encode(h.finalize());
    token.truncate(40);
    format!("hangar-{token}")
}

/// The metric period when the cluster scales on the ALB's per-target
/// request count (an average over the period's healthy targets).
fn per_target_metric(spec: &ClusterSpec) -> Option<chrono::Duration> {
    match spec.autoscaling.as_ref().map(|a| &a.metric) {
        Some(hangar_crds::MetricSource::Cloudwatch(
            cw @ hangar_crds::CloudwatchMetric::RequestCountPerTarget(_),
        )) => chrono::Duration::from_std(cw.options().period.get()).ok(),
        _ => None,
    }
}

/// How often the 5xx rate of a watched release is read when the cluster
/// has no autoscaling (whose `evaluationInterval` sets it otherwise).
const ERRORS_EVALUATION_INTERVAL: Duration = Duration::from_secs(15);

/// Transient failures in a row after which a node still coming up is
/// given up and replaced: at the default timeouts that is several minutes
/// of a node hanging or dropping every connection.
const MAX_ADVANCE_RETRIES: u32 = 5;

/// Counts a node's retried `Advance` attempts and turns the one that
/// reaches [`MAX_ADVANCE_RETRIES`] into a node failure. Updates, drains and
/// rollbacks of nodes that are (or were) serving keep retrying: replacing
/// those is the job of self-healing, which knows about minimum capacity.
fn give_up_after_retries(
    status: &mut ClusterStatus,
    node: &str,
    task: &Task,
    outcome: &Outcome,
) -> Outcome {
    match outcome {
        Outcome::Retry(why) if matches!(task, Task::Advance) => {
            let n = status.node_retries.entry(node.to_string()).or_default();
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
mod tests {
    use super::*;

    #[test]
    fn a_node_coming_up_that_only_ever_fails_transiently_is_given_up() {
        let mut status = ClusterStatus::new("web");
        let retry = Outcome::Retry("connect timed out".into());
        for _ in 1..MAX_ADVANCE_RETRIES {
            let o = give_up_after_retries(&mut status, "i-1", &Task::Advance, &retry);
            assert_eq!(o, retry);
        }
        let o = give_up_after_retries(&mut status, "i-1", &Task::Advance, &retry);
        assert!(
            matches!(&o, Outcome::NodeFailed(why) if why.contains("gave up after 5 attempts")),
            "{o:?}"
        );
        // A serving node's drain keeps retrying: replacing it is not this
        // rule's call.
        let o = give_up_after_retries(
            &mut status,
            "i-2",
            &Task::Drain {
                reason: "scale in".into(),
            },
            &retry,
        );
        assert_eq!(o, retry);
        assert!(!status.node_retries.contains_key("i-2"));
    }

    fn inst(id: &str, phase: Option<Phase>, state: InstanceState) -> Instance {
        Instance {
            id: id.into(),
            cluster: "web".into(),
            phase,
            release: None,
            state,
            private_ip: None,
            public_ip: None,
            subnet_id: None,
            availability_zone: None,
            launched_at: None,
            protected: false,
            tags: Default::default(),
        }
    }

    #[test]
    fn an_instance_counts_from_the_moment_it_exists() {
        let list = [
            inst("i-1", Some(Phase::Launching), InstanceState::Pending),
            inst("i-2", None, InstanceState::Running),
            inst("i-3", Some(Phase::InService), InstanceState::Running),
            inst("i-4", Some(Phase::Draining), InstanceState::Running),
            inst("i-5", Some(Phase::InService), InstanceState::Stopped),
            inst("i-6", Some(Phase::InService), InstanceState::ShuttingDown),
        ];
        assert_eq!(count_toward_capacity(&list), 3);
    }

    #[test]
    fn client_tokens_are_stable_for_one_observation_and_fit_ec2() {
        let a = [
            inst("i-2", None, InstanceState::Running),
            inst("i-1", None, InstanceState::Running),
        ];
        let b = [
            inst("i-1", None, InstanceState::Running),
            inst("i-2", None, InstanceState::Running),
        ];
        let t = client_token("web", "subnet-a", 2, &a);
        assert_eq!(t, client_token("web", "subnet-a", 2, &b));
        assert_ne!(t, client_token("web", "subnet-b", 2, &a));
        assert_ne!(t, client_token("web", "subnet-a", 2, &a[..1]));
        assert!(t.len() <= 64 && t.is_ascii());
    }
}
