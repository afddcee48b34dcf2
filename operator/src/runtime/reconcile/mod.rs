//! The reconcile loop: for one cluster, observe → decide → act.
//!
//! Level-triggered. A pass
//! 1. **observes** (`observe.rs`): the cluster's instances from the shared
//!    [`Inventory`], the node tasks running and finished, the traffic and
//!    5xx readings when due, the health probes' verdicts and what the last
//!    pass's actions reported — one plain [`Observation`];
//! 2. **decides** with [`core::decide()`](crate::core::decide()), a plain
//!    function that returns the actions and the updated [`Memory`](crate::core::Memory);
//! 3. **acts** (`act.rs`): persists the memory, starts and cancels node
//!    tasks and launches — each action on its own, a failure reported into
//!    the next observation instead of skipping the rest — then shows the
//!    result in status.
//!
//! No pass waits for a node: long work runs as a node task
//! ([`crate::effects::tasks`]) that the next pass observes.

mod act;
mod observe;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use hangar_cloud::{Cloud, CloudError, Instance, InstanceState, Phase};
use hangar_crds::{ClusterSpec, DeletionPolicy};

use crate::core::decide::{self, Count, Decision};
use crate::core::fleet;
use crate::core::Observation;
use crate::effects::probe::Probes;
use crate::effects::ssh::{Redactor, SshPool, SshSettings};
use crate::effects::tasks::Tasks;
use crate::runtime::controller::{Action, Key, Reconciler, TriggerSender};
use crate::runtime::http::Board;
use crate::runtime::inventory::Inventory;
use crate::runtime::specs::{ClusterSpecEntry, SpecSet};
use crate::runtime::status::{ClusterStatus, StatusStore};
use crate::runtime::telemetry::{PhaseLabels, ResultLabels, TaskLabels, Telemetry};

pub use crate::core::observation::ActionFailure;

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
    /// How long read secrets (`provision.secretsFrom`) are used before
    /// they are read again.
    pub secrets_refresh: Duration,
    /// How often a cluster's target group is read for in-service nodes it
    /// does not list.
    pub target_group_check: Duration,
}

impl LoopSettings {
    pub fn new(state_dir: PathBuf, owner: String) -> LoopSettings {
        LoopSettings {
            resync: Duration::from_secs(15),
            inventory_max_age: Duration::from_secs(5),
            busy_requeue: Duration::from_secs(5),
            state_dir,
            owner,
            secrets_refresh: crate::runtime::secrets::TTL,
            target_group_check: Duration::from_secs(30),
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
    probes: Probes,
    /// When each cluster's status was last written by this process.
    persisted_at: Mutex<HashMap<String, std::time::Instant>>,
    /// Per cluster: what the last pass's actions reported, for the next
    /// observation.
    failures: Mutex<HashMap<String, Vec<ActionFailure>>>,
    /// `provision.secretsFrom`, read at most once a minute per cluster.
    secrets: crate::runtime::secrets::SecretCache,
    /// When each cluster's target group was last read (`observe`).
    target_group_read_at: Mutex<HashMap<String, std::time::Instant>>,
}

/// How stale a status file may get while only readings change (the
/// metric, the planner's time stamps): at 1,000 clusters, persisting every
/// evaluation meant 1,000 file writes every 15 s with no decision in them.
/// A crash loses at most this much of the planner's clock, well inside the
/// stabilization windows it serves.
const READINGS_PERSIST_EVERY: Duration = Duration::from_secs(60);

/// How soon a cluster whose launch failed is looked at again: the next
/// pass launches in another subnet (or retries a transient failure).
const LAUNCH_FAILED_REQUEUE: Duration = Duration::from_secs(1);

/// The result of [`Operator::preview`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct Preview {
    pub status: ClusterStatus,
    pub diff: fleet::Diff,
}

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
            tasks: Tasks::new(move |cluster| triggers.now(cluster)),
            secrets: crate::runtime::secrets::SecretCache::new(settings.secrets_refresh),
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
            probes: Probes::default(),
            persisted_at: Mutex::default(),
            failures: Mutex::default(),
            target_group_read_at: Mutex::default(),
        }
    }

    pub fn tasks(&self) -> &Tasks {
        &self.tasks
    }

    /// The self-healing probes (the control-plane benchmark reads them).
    pub fn probes(&self) -> &Probes {
        &self.probes
    }

    /// Every cluster known from specs or from stored status.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.specs().clusters.keys().cloned().collect();
        keys.extend(lock(&self.statuses).keys().cloned());
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
        let views = set.problem_views();
        for p in &views {
            tracing::warn!(problem = %p.text, "spec problem; other clusters keep reconciling");
        }
        self.board.set_problems(views);
        *self.specs.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
        changed
    }

    fn status(&self, key: &str) -> Option<ClusterStatus> {
        lock(&self.statuses).get(key).map(|s| (**s).clone())
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
            Some(_) => lock(&self.persisted_at)
                .get(&status.name)
                .is_none_or(|t| t.elapsed() >= READINGS_PERSIST_EVERY),
        };
        if write {
            let _ = self.persist(&status);
        }
        self.install(status);
    }

    /// Writes `status` to disk now (and, with a distributed lease, to the
    /// shared store). Whether it was stored: a launch is only made once its
    /// intent is.
    fn persist(&self, status: &ClusterStatus) -> bool {
        match self.store.save(status) {
            Ok(()) => {
                lock(&self.persisted_at).insert(status.name.clone(), std::time::Instant::now());
                true
            }
            Err(e) => {
                tracing::error!(cluster = %status.name, error = %e, "cannot persist status");
                false
            }
        }
    }

    /// Makes `status` the one this process reads and serves.
    fn install(&self, status: ClusterStatus) {
        let status = Arc::new(status);
        self.board.publish_shared(status.clone());
        lock(&self.statuses).insert(status.name.clone(), status);
    }

    fn forget(&self, key: &str) {
        if let Err(e) = self.store.remove(key) {
            tracing::error!(cluster = %key, error = %e, "cannot remove status");
        }
        self.board.forget(key);
        self.telemetry.forget_cluster(key);
        lock(&self.persisted_at).remove(key);
        lock(&self.failures).remove(key);
        lock(&self.statuses).remove(key);
        self.secrets.forget(key);
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
        // secretsFrom: their values are masked too; a rotation makes a new pool.
        let (redactor, secrets_key) = self.secrets.redactor(name, redactor);
        let key = format!("{:?}|{:?}|{secrets_key}", ssh, spec.provision.secrets);
        let mut pools = lock(&self.ssh_pools);
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
    /// `READINGS_PERSIST_EVERY` survive a graceful stop.
    pub async fn shutdown(&self) {
        self.tasks.shutdown().await;
        let statuses: Vec<Arc<ClusterStatus>> = lock(&self.statuses).values().cloned().collect();
        for s in statuses {
            if let Err(e) = self.store.save(&s) {
                tracing::error!(cluster = %s.name, error = %e, "cannot persist status");
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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

impl Operator {
    async fn reconcile_cluster(&self, entry: &ClusterSpecEntry) -> Result<Action, ReconcileError> {
        let name = entry.name();
        let spec = &entry.loaded.cluster.spec;
        let now = Utc::now();
        let cloud = self.clouds.cloud(&spec.region).await?;
        let before = self.status(name);
        // secretsFrom (runtime/secrets.rs): unreadable secrets hold the
        // cluster as it is; read ones join the config hash.
        let effective;
        let entry = match self.read_secrets(entry, &cloud).await {
            Ok(Some(e)) => {
                effective = e;
                &effective
            }
            Ok(None) => entry,
            Err(error) => {
                let mut status = before.clone().unwrap_or_else(|| ClusterStatus::new(name));
                crate::runtime::secrets::hold(&mut status, &error, now);
                self.save_status(before.as_ref(), status);
                return Ok(Action::requeue(self.settings.resync));
            }
        };
        let memory = before
            .as_ref()
            .map(|s| s.memory.clone())
            .unwrap_or_default();
        let obs = self
            .observe(entry, &cloud, &memory, now, observe::Mode::Live)
            .await?;
        let decision = decide::decide(&obs, &memory);
        if decision.memory.last_eval_at != memory.last_eval_at {
            // Why the count is what it is, every evaluation (INFO has only
            // the changes).
            tracing::debug!(
                cluster = %name,
                read = ?obs.traffic,
                decided = ?decision.memory.last_decision.as_ref().map(|d| &d.reason),
                "evaluated"
            );
        }

        let mut status = before.clone().unwrap_or_else(|| ClusterStatus::new(name));
        self.adopt_spec(&mut status, entry, &obs);
        self.apply(&mut status, &decision);
        let acted = !decision.diff.actions.is_empty();
        let acted_on = self.act(entry, &cloud, &obs, &decision, &mut status).await;

        let serving: Vec<&Instance> = obs
            .instances
            .iter()
            .filter(|i| i.phase == Some(Phase::InService) && i.state == InstanceState::Running)
            .collect();
        self.probes.maybe_probe(name, spec, &serving, now);

        // Status. After acting, look again to show what the actions
        // started; a pass that did nothing shows what it saw.
        let (instances, running) = if acted {
            self.look(name, &spec.region, &cloud).await?
        } else {
            (obs.instances, obs.running)
        };
        status.show_fleet(&instances, &running, &decision.diff.notes, now);
        self.export_metrics(name, &status);
        let busy = acted
            || !running.is_empty()
            || status.memory.release.outdated > 0
            || decision.diff.counted != status.memory.desired
            // Looked at again soon: registered again once it lasted.
            || !status.memory.missing_from_group.is_empty();
        self.save_status(before.as_ref(), status);
        let mut next = if acted_on.launch_failed {
            LAUNCH_FAILED_REQUEUE
        } else if busy {
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
        let spec = &entry.loaded.cluster.spec;
        let now = Utc::now();
        let cloud = self.clouds.cloud(&spec.region).await?;
        let before = self.status(name);
        let effective;
        let entry = match self.read_secrets(entry, &cloud).await {
            Ok(Some(e)) => {
                effective = e;
                &effective
            }
            _ => entry,
        };
        let memory = before
            .as_ref()
            .map(|s| s.memory.clone())
            .unwrap_or_default();
        let obs = self
            .observe(entry, &cloud, &memory, now, observe::Mode::Preview)
            .await?;
        let decision = decide::decide(&obs, &memory);
        let mut status = before.unwrap_or_else(|| ClusterStatus::new(name));
        self.adopt_spec(&mut status, entry, &obs);
        status.memory = decision.memory;
        status.show_fleet(&obs.instances, &obs.running, &decision.diff.notes, now);
        Ok(Some(Preview {
            status,
            diff: decision.diff,
        }))
    }

    /// The spec is gone: retain (default) leaves the fleet alone; delete
    /// drains and terminates it, then forgets the cluster. A spec that is
    /// still there but no longer loads holds the fleet as it is.
    async fn reconcile_removed(&self, key: &str) -> Result<Action, ReconcileError> {
        let Some(before) = self.status(key) else {
            return Ok(Action::await_change());
        };
        let now = Utc::now();
        let specs = self.specs();
        let broken = before
            .file
            .as_ref()
            .and_then(|f| specs.problems.iter().find(|p| &p.file == f));
        if let Some(problem) = broken {
            let mut status = before.clone();
            status.hold_broken_spec(&problem.to_string(), now);
            self.save_status(Some(&before), status);
            return Ok(Action::await_change());
        }
        let Some(spec) = before.spec.clone() else {
            self.forget(key);
            return Ok(Action::await_change());
        };
        let mut status = before.clone();
        status.mark_spec_removed(now);
        if spec.deletion_policy == DeletionPolicy::Retain {
            self.save_status(Some(&before), status);
            return Ok(Action::await_change());
        }
        let cloud = self.clouds.cloud(&spec.region).await?;
        let obs = self.observe_removed(key, spec, &cloud, now).await?;
        let decision = decide::decide_removed(&obs, &before.memory);
        self.apply(&mut status, &decision);
        if decision.forget {
            self.forget(key);
            return Ok(Action::await_change());
        }
        self.act_removed(key, &cloud, &obs, &decision);
        status.show_fleet(&obs.instances, &obs.running, &decision.diff.notes, now);
        self.save_status(Some(&before), status);
        Ok(Action::requeue(self.settings.busy_requeue))
    }

    /// `entry` with the config hash its secrets make (`None`: it names
    /// none), or why they cannot be read.
    async fn read_secrets(
        &self,
        entry: &ClusterSpecEntry,
        cloud: &Cloud,
    ) -> Result<Option<ClusterSpecEntry>, hangar_cloud::SecretsError> {
        use crate::runtime::secrets::{with_secrets, SecretsRead};
        let sources = &entry.loaded.cluster.spec.provision.secrets_from;
        match self
            .secrets
            .read(entry.name(), sources, cloud.secrets.as_ref())
            .await
        {
            SecretsRead::None => Ok(None),
            SecretsRead::Ready(env) => Ok(Some(with_secrets(entry, &env))),
            SecretsRead::Unreadable(e) => Err(e),
        }
    }

    /// The spec's identity in status; a spec that came back after being
    /// removed is managed again.
    fn adopt_spec(&self, status: &mut ClusterStatus, entry: &ClusterSpecEntry, obs: &Observation) {
        status.file = Some(entry.loaded.file.clone());
        status.region = obs.spec.region.clone();
        status.observed_spec_hash = entry.spec_hash.clone();
        status.spec = Some(obs.spec.clone());
        if let Some(commit) = &entry.commit {
            if status.commit.as_ref().map(|c| &c.sha) != Some(&commit.sha) {
                let rewritten = self
                    .specs()
                    .origin
                    .as_ref()
                    .and_then(|o| o.rewritten.clone())
                    .map(|old| {
                        format!(
                            " (the branch was force-pushed; {} is gone from it)",
                            &old[..old.len().min(7)]
                        )
                    })
                    .unwrap_or_default();
                status.record(
                    obs.now,
                    "commit",
                    None,
                    format!(
                        "applied commit {} {:?} by {}{rewritten}",
                        commit.short(),
                        commit.subject,
                        commit.author
                    ),
                );
                status.commit = Some((**commit).clone());
            }
        }
        if status.spec_removed {
            status.spec_removed = false;
            status.record(
                obs.now,
                "spec",
                None,
                "spec is back; managing the cluster again",
            );
        }
    }

    /// Takes the decision's memory and entries into status (in this
    /// process at once: nothing an action does later can lose them), and
    /// counts and logs what it decided.
    fn apply(&self, status: &mut ClusterStatus, decision: &Decision) {
        let name = status.name.clone();
        status.memory = decision.memory.clone();
        for a in &decision.task_notes {
            status.record(a.at, &a.kind, a.node.as_deref(), a.message.clone());
        }
        for a in &decision.activities {
            tracing::info!(cluster = %name, node = a.node.as_deref().unwrap_or(""), kind = %a.kind, "{}", a.message);
            status.record(a.at, &a.kind, a.node.as_deref(), a.message.clone());
        }
        for c in &decision.counts {
            match c {
                Count::Scaled(direction) => self
                    .telemetry
                    .scaling_actions
                    .get_or_create(&ResultLabels {
                        cluster: name.clone(),
                        result: direction.to_string(),
                    })
                    .inc(),
                Count::Rollout(result) => self
                    .telemetry
                    .rollouts
                    .get_or_create(&ResultLabels {
                        cluster: name.clone(),
                        result: result.to_string(),
                    })
                    .inc(),
                Count::TaskFinished { task, result } => self
                    .telemetry
                    .node_tasks
                    .get_or_create(&TaskLabels {
                        task: task.to_string(),
                        result: result.to_string(),
                    })
                    .inc(),
            };
        }
    }

    fn export_metrics(&self, name: &str, status: &ClusterStatus) {
        self.telemetry
            .desired_nodes
            .get_or_create(&Telemetry::cluster(name))
            .set(status.memory.desired.into());
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
