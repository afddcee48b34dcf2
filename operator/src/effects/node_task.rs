//! Executes a node task: the steps [`lifecycle::steps`] chose, one by one,
//! against the cloud and the node.
//!
//! Between steps the task checks for cancellation (a safe point); long
//! waits (reachability, health, drain) also stop when cancelled. Every
//! error is classified into an [`Outcome`]: retry later, replace the node,
//! or halt the release.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hangar_cloud::{tags, Cloud, CloudError, Instance, InstanceState, Phase, TargetState};
use hangar_crds::{AddressKind, ClusterSpec};
use tokio::time::Instant;

use async_trait::async_trait;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::core::fleet::Task;
use crate::core::lifecycle::{self, NodeFacts, Step};
use crate::core::reachability;
use crate::core::rollout::KnownRelease;
use crate::effects::health::{self, HealthProbe};
use crate::effects::release::{self, Artifact, ReleaseConfig, ReleaseError};
use crate::effects::runbook::{self, Facts, Runbook};
use crate::effects::ssh::{Session, SshError, SshPool, Target};
use crate::effects::tasks::{Outcome, TaskHandle};

/// A node task's window on the cluster's instances: it reads its instance
/// from the runtime's shared inventory (never with a listing of its own:
/// fifty nodes coming up must not cost fifty DescribeInstances a second)
/// and records there what it wrote, so the next pass sees it before EC2's
/// eventually consistent listing does.
#[async_trait]
pub trait InstanceView: Send + Sync {
    async fn get(&self, id: &str) -> Result<Option<Instance>, CloudError>;
    fn wrote_phase(&self, id: &str, phase: Phase, release: Option<&str>, config: Option<&str>);
    /// This task started the instance: reads must not show it stopped
    /// from a listing taken before the start.
    fn started(&self, id: &str);
    /// This task is stopping the instance (undoes [`InstanceView::started`]).
    fn stopping(&self, id: &str);
    fn terminated(&self, id: &str);
}

/// Label of `hangar_ssh_errors_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

/// Everything a task needs, snapshotted when it starts.
#[derive(Clone)]
pub struct NodeContext {
    pub cluster: String,
    pub spec: Arc<ClusterSpec>,
    /// Resolved runbook path (absent for a cluster whose spec was removed:
    /// such a cluster is only drained).
    pub runbook: Option<PathBuf>,
    pub env_file: Option<PathBuf>,
    /// `provision.secretsFrom`, as read for this pass: written with the
    /// env file into `shared/.env` (see [`crate::effects::env_file`]).
    pub secret_env: Option<Arc<crate::effects::env_file::SecretEnv>>,
    pub config_hash: Option<String>,
    /// The release new nodes get (the target).
    pub release: String,
    /// The release to fall back to when `release` fails on an updated node.
    pub fallback_release: Option<String>,
    /// Artifact and sha256 of every release hangar may ship (the spec's and
    /// the ones it remembers), so a node can get the last good release even
    /// after the spec moved on to a failing one.
    pub artifacts: std::collections::BTreeMap<String, KnownRelease>,
    pub cloud: Cloud,
    pub ssh: Arc<SshPool>,
    pub instances: Arc<dyn InstanceView>,
    pub ssh_errors: Family<KindLabel, Counter>,
}

/// Why a step failed, already classified.
#[derive(Debug)]
enum Fail {
    Retry(String),
    Node(String),
    Release(String),
    Cancelled,
    /// The instance no longer exists (terminated behind hangar's back).
    Gone,
}

impl From<CloudError> for Fail {
    fn from(e: CloudError) -> Self {
        // Our own instance listing said the node is ours; anything the cloud
        // refuses now is worth another look later, not a replacement.
        Fail::Retry(e.to_string())
    }
}

/// How long a stopped warm node's task waits for the listing to show it
/// stopping (EC2 lists a state change within seconds).
const STOP_LISTED_DEADLINE: Duration = Duration::from_secs(60);

/// How long one knock at a booting node's SSH port may take, and how often
/// it is repeated: short, so sshd coming up is noticed within a fraction
/// of a second (a knock is one TCP handshake).
const KNOCK_TIMEOUT: Duration = Duration::from_millis(500);
const KNOCK_INTERVAL: Duration = Duration::from_millis(50);

/// How long after sshd first answers a refused login is still taken for
/// a machine whose init has not installed the key yet (cloud-init orders
/// itself before sshd, but an image may not); later it is the spec's key.
const AUTH_GRACE: Duration = Duration::from_secs(10);

pub async fn run(ctx: NodeContext, instance: Instance, task: Task, handle: TaskHandle) -> Outcome {
    let facts = NodeFacts {
        config_outdated: ctx
            .config_hash
            .as_deref()
            .is_some_and(|c| instance.tags.get(tags::CONFIG).map(String::as_str) != Some(c)),
        warmup: ctx.spec.release.warmup.is_some(),
    };
    let phase = instance.phase.unwrap_or(Phase::Launching);
    let steps = lifecycle::steps(&task, phase, facts);
    let release = match &task {
        Task::Update { release } | Task::Rollback { release } | Task::Once { release } => {
            release.clone()
        }
        // It keeps what it serves.
        Task::Rejoin => instance
            .release
            .clone()
            .unwrap_or_else(|| ctx.release.clone()),
        _ => ctx.release.clone(),
    };
    let mut run = NodeRun {
        ctx,
        instance,
        task: task.clone(),
        handle,
        session: None,
        release,
        deregistered: false,
        started: false,
        confirmed_serving: false,
    };
    for step in &steps {
        if run.handle.cancelled() {
            return Outcome::Cancelled;
        }
        if let Err(fail) = run.step(step).await {
            return run.outcome(fail).await;
        }
        if run.confirmed_serving {
            break;
        }
    }
    Outcome::Done
}

struct NodeRun {
    ctx: NodeContext,
    instance: Instance,
    task: Task,
    handle: TaskHandle,
    /// Held while steps talk to the node; released before long waits so
    /// the pool's concurrency slot goes to nodes with work to do (the
    /// connection itself stays pooled).
    session: Option<Arc<Session>>,
    release: String,
    deregistered: bool,
    /// This task started the instance (a warm node): a `stopped` listing
    /// is stale, not the machine's state.
    started: bool,
    /// [`Step::ConfirmServing`] found the node serving: the task is done.
    confirmed_serving: bool,
}

impl NodeRun {
    fn id(&self) -> &str {
        &self.instance.id
    }

    fn spec(&self) -> &ClusterSpec {
        &self.ctx.spec
    }

    async fn step(&mut self, step: &Step) -> Result<(), Fail> {
        match step {
            Step::AwaitReachable => self.await_reachable().await,
            Step::Provision => self.provision().await,
            Step::LeaveService => self.leave_service().await,
            Step::ConfirmServing => self.confirm_serving().await,
            Step::Ship => self.ship().await,
            Step::Activate => self.activate(false).await,
            Step::EnsureActive => self.activate(true).await,
            Step::Reactivate => self.reactivate().await,
            Step::CheckActive => self.check_active().await,
            Step::HealthCheck => self.health_check().await,
            Step::Warmup => self.warmup().await,
            Step::RunOnce => self.run_once().await,
            Step::Register => self.register().await,
            Step::Deregister => self.drain().await,
            Step::DrainHooks => self.drain_hooks().await,
            Step::Terminate => self.terminate().await,
            Step::StopInstance => self.stop_instance().await,
            Step::StartInstance => self.start_instance().await,
            Step::SetPhase { phase, release } => self.set_phase(*phase, *release).await,
        }
    }

    /// Writes the phase tag (and the release tag when `release`), and
    /// tells the inventory.
    async fn set_phase(&mut self, phase: Phase, release: bool) -> Result<(), Fail> {
        let rel = release.then_some(self.release.as_str());
        match self
            .ctx
            .cloud
            .compute
            .set_phase(self.id(), phase, rel)
            .await
        {
            Ok(()) => {}
            // The cloud saw it terminated. (`InvalidInstanceID.NotFound` is
            // EC2's eventual consistency for an instance launched a moment
            // ago: a retry, below.)
            Err(e) if e.is_terminated() => {
                self.ctx.instances.terminated(&self.instance.id);
                return Err(Fail::Gone);
            }
            Err(e) => return Err(e.into()),
        }
        self.ctx
            .instances
            .wrote_phase(&self.instance.id, phase, rel, None);
        self.instance.phase = Some(phase);
        if phase == Phase::InService {
            self.handle
                .note("in-service", format!("is in service on {}", self.release));
        }
        Ok(())
    }

    /// Turns a failure into the task's outcome; an update that failed its
    /// health check first puts the node back on the release it had.
    async fn outcome(&mut self, fail: Fail) -> Outcome {
        match fail {
            Fail::Cancelled => Outcome::Cancelled,
            // Whatever the task was for, a drained node that is gone is done.
            Fail::Gone if matches!(self.task, Task::Drain { .. }) => Outcome::Done,
            Fail::Gone => Outcome::NodeFailed(format!("{} is gone", self.id())),
            Fail::Retry(why) => Outcome::Retry(why),
            Fail::Node(why) => Outcome::NodeFailed(why),
            Fail::Release(why) => {
                if matches!(self.task, Task::Update { .. }) {
                    if let Err(e) = self.restore().await {
                        // Could not put it back: it must not serve; replace it.
                        return Outcome::NodeFailed(format!(
                            "{why}; restoring the previous release failed: {e}"
                        ));
                    }
                    return Outcome::ReleaseFailed {
                        release: self.ctx.release.clone(),
                        reason: format!("{}: {why}", self.id()),
                    };
                }
                Outcome::ReleaseFailed {
                    release: self.release.clone(),
                    reason: format!("{}: {why}", self.id()),
                }
            }
        }
    }

    /// After a failed update: previous release back, healthy, registered.
    async fn restore(&mut self) -> Result<(), String> {
        let session = self.session().await.map_err(|e| fail_text(&e))?;
        let config = self.release_config().map_err(|e| fail_text(&e))?;
        let back = match &self.ctx.fallback_release {
            Some(good) => release::activate(&session, &config, good)
                .await
                .map(|r| r.id),
            None => release::rollback(&session, &config).await,
        }
        .map_err(|e| e.to_string())?;
        self.release = back.clone();
        self.handle
            .note("rollback", format!("rolled back to {back}"));
        self.health_check().await.map_err(|e| fail_text(&e))?;
        self.ctx
            .cloud
            .compute
            .set_phase(self.id(), Phase::Verifying, Some(&back))
            .await
            .map_err(|e| e.to_string())?;
        self.ctx
            .instances
            .wrote_phase(&self.instance.id, Phase::Verifying, Some(&back), None);
        self.register().await.map_err(|e| fail_text(&e))?;
        self.ctx
            .cloud
            .compute
            .set_phase(self.id(), Phase::InService, Some(&back))
            .await
            .map_err(|e| e.to_string())?;
        self.ctx
            .instances
            .wrote_phase(&self.instance.id, Phase::InService, Some(&back), None);
        Ok(())
    }

    fn address(&self) -> Option<IpAddr> {
        match self.spec().ssh.address {
            AddressKind::PrivateIp => self.instance.private_ip,
            AddressKind::PublicIp => self.instance.public_ip,
        }
    }

    fn target(&self) -> Result<Target, Fail> {
        let ip = self.address().ok_or_else(|| {
            Fail::Retry(format!(
                "{} has no {:?} address yet",
                self.id(),
                self.spec().ssh.address
            ))
        })?;
        Ok(Target::new(self.id(), ip, self.spec().ssh.port))
    }

    async fn session(&mut self) -> Result<Arc<Session>, Fail> {
        if let Some(s) = &self.session {
            return Ok(s.clone());
        }
        let target = self.target()?;
        self.open_session(&target)
            .await
            .map_err(|e| self.ssh_fail(e))
    }

    async fn open_session(&mut self, target: &Target) -> Result<Arc<Session>, SshError> {
        // Its pool slot is given back before another is asked for.
        self.session = None;
        let s = Arc::new(self.ctx.ssh.session(target).await?);
        self.session = Some(s.clone());
        Ok(s)
    }

    fn ssh_fail(&self, e: SshError) -> Fail {
        self.ctx
            .ssh_errors
            .get_or_create(&KindLabel {
                kind: ssh_kind(&e).into(),
            })
            .inc();
        if matches!(e, SshError::HostKey(_)) {
            // A changed host key is never "retry": it is a possible attack
            // or a reused address, and the node must not be trusted.
            return Fail::Node(e.to_string());
        }
        if e.is_transient() {
            Fail::Retry(e.to_string())
        } else {
            Fail::Node(e.to_string())
        }
    }

    /// Waits, up to the health-check deadline, for the instance to answer
    /// SSH (a fresh VM takes a while to boot). It knocks at the node's
    /// address as soon as that can only be this instance's
    /// ([`reachability::may_try_ssh`]), not once the shared listing says
    /// `running`: a listing seconds behind would otherwise be every new
    /// node's wait. Its note says how long that took, and when (or whether
    /// yet) the listing showed the instance running, so a slow start can
    /// be told apart from a slow boot.
    async fn await_reachable(&mut self) -> Result<(), Fail> {
        let started = Instant::now();
        let deadline = started + self.spec().release.health_check.deadline.get();
        let kind = self.spec().ssh.address;
        let mut last;
        let mut listed_running = None;
        let mut first_answer: Option<Instant> = None;
        let mut attempts = 0u32;
        loop {
            if self.handle.cancelled() {
                return Err(Fail::Cancelled);
            }
            if self.instance.state == InstanceState::Running {
                listed_running.get_or_insert_with(|| started.elapsed());
            }
            let may_try = reachability::may_try_ssh(self.instance.state, kind, self.started);
            match self.target() {
                Ok(target) if may_try => {
                    if self.ctx.ssh.answers(&target, KNOCK_TIMEOUT).await {
                        attempts += 1;
                        let answered = *first_answer.get_or_insert_with(Instant::now);
                        match self.open_session(&target).await {
                            // A machine may start sshd a moment before its
                            // init has installed the login key.
                            Err(e @ SshError::AuthFailed { .. })
                                if answered.elapsed() < AUTH_GRACE =>
                            {
                                last = e.to_string();
                            }
                            Err(e) => match self.ssh_fail(e) {
                                Fail::Retry(why) => last = why,
                                other => return Err(other),
                            },
                            Ok(_) => {
                                let listed = match listed_running {
                                    Some(at) => {
                                        format!("listed running after {:.1}s", at.as_secs_f64())
                                    }
                                    None => "not listed running yet".to_string(),
                                };
                                self.handle.note(
                                    "reachable",
                                    format!(
                                        "answers SSH after {:.1}s ({listed}, attempt {attempts})",
                                        started.elapsed().as_secs_f64(),
                                    ),
                                );
                                return Ok(());
                            }
                        }
                    } else {
                        last = format!("nothing accepts at {}:{}", target.ip, target.port);
                    }
                }
                Ok(_) | Err(_) => {
                    last = format!("instance is {:?}", self.instance.state).to_lowercase();
                }
            }
            if self.instance.state != InstanceState::Running || self.address().is_none() {
                self.refresh_instance().await?;
            }
            if Instant::now() >= deadline {
                return Err(Fail::Node(format!(
                    "not reachable over SSH in time; last: {last}"
                )));
            }
            self.pause(KNOCK_INTERVAL).await?;
        }
    }

    /// The instance as the shared inventory sees it now: its state and
    /// addresses change while it boots. Gone from the inventory means
    /// terminated (the listing leaves those out).
    async fn refresh_instance(&mut self) -> Result<(), Fail> {
        match self.ctx.instances.get(&self.instance.id).await {
            Ok(Some(i)) => self.instance = i,
            Ok(None) => return Err(Fail::Gone),
            Err(_) => {}
        }
        Ok(())
    }

    async fn pause(&mut self, d: Duration) -> Result<(), Fail> {
        self.session = None;
        tokio::select! {
            _ = self.handle.cancel.cancelled() => Err(Fail::Cancelled),
            _ = tokio::time::sleep(d) => Ok(()),
        }
    }

    async fn provision(&mut self) -> Result<(), Fail> {
        let Some(path) = self.ctx.runbook.clone() else {
            return Err(Fail::Retry(
                "the cluster's spec is gone: cannot provision".into(),
            ));
        };
        // A runbook that does not load is the spec's problem, not the node's.
        let runbook = Runbook::load(&path).map_err(|e| Fail::Retry(e.to_string()))?;
        let ip = self.address().map(|ip| ip.to_string()).unwrap_or_default();
        let facts = Facts::for_node(self.spec(), self.id(), &ip);
        let plan = runbook
            .plan(&self.spec().provision.vars, &facts)
            .map_err(|e| Fail::Retry(e.to_string()))?;
        let session = self.session().await?;
        let report = runbook::apply(&session, &plan).await;
        let summary = report.to_string();
        if let Some(failed) = report.failure() {
            let why = format!("provisioning failed at `{}`: {summary}", failed.name);
            // A dropped connection is worth a retry; a failing step is not.
            if session.run("true").await.is_err() {
                self.session = None;
                return Err(Fail::Retry(why));
            }
            return Err(Fail::Node(why));
        }
        if self.ctx.env_file.is_some() || self.ctx.secret_env.is_some() {
            let base = match &self.ctx.env_file {
                Some(env) => {
                    Some(release::read_env_file(env).map_err(|e| Fail::Retry(e.to_string()))?)
                }
                None => None,
            };
            let contents =
                crate::effects::env_file::render(base.as_deref(), self.ctx.secret_env.as_deref());
            let config = self.release_config()?;
            release::place_env_file(&session, &config, &contents)
                .await
                .map_err(|e| self.release_fail(e, false))?;
        }
        if let Some(hash) = &self.ctx.config_hash {
            self.ctx.cloud.compute.set_config(self.id(), hash).await?;
            self.ctx.instances.wrote_phase(
                &self.instance.id,
                self.instance.phase.unwrap_or(Phase::Provisioning),
                None,
                Some(hash),
            );
        }
        self.handle.note(
            "provision",
            format!(
                "provisioned: {}",
                summary.lines().last().unwrap_or_default()
            ),
        );
        Ok(())
    }

    fn release_config(&self) -> Result<ReleaseConfig, Fail> {
        ReleaseConfig::from_spec(&self.spec().release).map_err(|e| Fail::Retry(e.to_string()))
    }

    /// Classifies a release error: connection trouble retries; a hook or
    /// health failure of a release not yet proven is the release's fault.
    fn release_fail(&self, e: ReleaseError, release_fault: bool) -> Fail {
        match e {
            ReleaseError::Ssh(s) => self.ssh_fail(s),
            ReleaseError::ChecksumMismatch { .. } => Fail::Retry(e.to_string()),
            ReleaseError::Artifact { .. } | ReleaseError::Invalid(_) => Fail::Retry(e.to_string()),
            ReleaseError::HookFailed { .. } if release_fault => Fail::Release(e.to_string()),
            _ => Fail::Node(e.to_string()),
        }
    }

    /// A failure of the release on this node counts against the release
    /// unless that release is already proven on the fleet.
    fn release_unproven(&self) -> bool {
        self.ctx.fallback_release.as_deref() != Some(self.release.as_str())
    }

    async fn ship(&mut self) -> Result<(), Fail> {
        let known = self.ctx.artifacts.get(&self.release).ok_or_else(|| {
            Fail::Retry(format!(
                "hangar does not know the artifact of release {}",
                self.release
            ))
        })?;
        let source = known
            .artifact
            .parse::<hangar_crds::ArtifactSource>()
            .map_err(|e| Fail::Retry(e.to_string()))?;
        let artifact = self
            .ctx
            .cloud
            .artifacts
            .fetch(&source, &known.sha256)
            .await
            .map_err(|e| Fail::Retry(e.to_string()))?;
        let session = self.session().await?;
        let config = self.release_config()?;
        let report = release::ship(
            &session,
            &config,
            &self.release,
            &Artifact::new(&artifact.path, &artifact.sha256),
        )
        .await
        .map_err(|e| self.release_fail(e, false))?;
        if report.uploaded {
            self.handle.note(
                "ship",
                format!(
                    "got release {} ({} bytes in {:.1}s)",
                    report.id,
                    report.bytes,
                    report.elapsed.as_secs_f64()
                ),
            );
        }
        Ok(())
    }

    /// [`Step::Activate`], or [`Step::EnsureActive`] when `unless_active`.
    async fn activate(&mut self, unless_active: bool) -> Result<(), Fail> {
        let session = self.session().await?;
        let config = self.release_config()?;
        let unproven = self.release_unproven();
        let report = if unless_active {
            release::ensure_active(&session, &config, &self.release).await
        } else {
            release::activate(&session, &config, &self.release)
                .await
                .map(Some)
        }
        .map_err(|e| self.release_fail(e, unproven))?;
        let said = match report {
            Some(r) => format!("activated {} (was {:?})", r.id, r.replaced),
            None => format!("{} is active already", self.release),
        };
        self.handle.note("activate", said);
        Ok(())
    }

    /// Emergency rollback in place: the target release is on the node from
    /// before (shipping it is then a check of its artifact), else it is
    /// shipped again.
    async fn reactivate(&mut self) -> Result<(), Fail> {
        self.ship().await?;
        let session = self.session().await?;
        let config = self.release_config()?;
        let report = release::activate(&session, &config, &self.release)
            .await
            .map_err(|e| self.release_fail(e, false))?;
        self.handle.note(
            "rollback",
            format!("swapped back to {} (from {:?})", report.id, report.replaced),
        );
        Ok(())
    }

    /// See [`Step::ConfirmServing`]. Anything short of certainty (not
    /// healthy in the target group, another release active, the load
    /// balancer not answering) leaves the task on its usual path: a new
    /// node's bring-up does not wait out an ELB error here, and the path
    /// asks the target group again before it takes a node out of service.
    async fn confirm_serving(&mut self) -> Result<(), Fail> {
        match self.target_state().await {
            Ok(Some(TargetState::Healthy)) => {}
            Ok(_) => return Ok(()),
            Err(e) => {
                tracing::debug!(node = %self.instance.id, error = ?e, "target health unknown: not confirmed serving");
                return Ok(());
            }
        }
        let session = self.session().await?;
        let config = self.release_config()?;
        let state = release::read_state(&session, &config)
            .await
            .map_err(|e| self.release_fail(e, false))?;
        if state.active.as_deref() != Some(self.release.as_str()) {
            return Ok(());
        }
        self.set_phase(Phase::InService, true).await?;
        self.handle.note(
            "resume",
            format!(
                "listed releasing, but healthy in the target group on {}: kept in service",
                self.release
            ),
        );
        self.confirmed_serving = true;
        Ok(())
    }

    /// See [`Step::CheckActive`].
    async fn check_active(&mut self) -> Result<(), Fail> {
        let session = self.session().await?;
        let config = self.release_config()?;
        let state = release::read_state(&session, &config)
            .await
            .map_err(|e| self.release_fail(e, false))?;
        let Some(active) = state.active else {
            return Err(Fail::Node(
                "tagged verifying, but no release is active on it".into(),
            ));
        };
        if self.instance.release.as_deref() != Some(active.as_str()) {
            self.handle.note(
                "release",
                format!(
                    "runs {active}, not {} as tagged: tag corrected",
                    self.instance.release.as_deref().unwrap_or("(none)")
                ),
            );
            self.release = active;
            self.set_phase(Phase::Verifying, true).await?;
            self.instance.release = Some(self.release.clone());
        } else {
            self.release = active;
        }
        Ok(())
    }

    async fn health_check(&mut self) -> Result<(), Fail> {
        let ip = self
            .address()
            .ok_or_else(|| Fail::Retry("no address".into()))?;
        let probe = HealthProbe::for_node(ip, &self.spec().release.health_check);
        self.session = None;
        let result = tokio::select! {
            _ = self.handle.cancel.cancelled() => return Err(Fail::Cancelled),
            r = health::wait_healthy(&probe) => r,
        };
        match result {
            Ok(h) => {
                self.handle.note(
                    "healthy",
                    format!(
                        "healthy on {} after {} attempt(s)",
                        self.release, h.attempts
                    ),
                );
                Ok(())
            }
            // A node that served this release until it was taken out of the
            // target group says nothing about the release by failing now.
            Err(e) if self.release_unproven() && self.task != Task::Rejoin => {
                Err(Fail::Release(e.to_string()))
            }
            Err(e) => Err(Fail::Node(e.to_string())),
        }
    }

    /// See [`Step::Warmup`]. Best effort: the node passed its health
    /// check, so a warm-up that runs out of time never keeps it out of
    /// service; it says so.
    async fn warmup(&mut self) -> Result<(), Fail> {
        let Some(w) = self.spec().release.warmup.clone() else {
            return Ok(());
        };
        let ip = self
            .address()
            .ok_or_else(|| Fail::Retry("no address".into()))?;
        let port = self.spec().release.health_check.port;
        let timeout = self.spec().release.health_check.timeout.get();
        self.session = None;
        let result = tokio::select! {
            _ = self.handle.cancel.cancelled() => return Err(Fail::Cancelled),
            r = health::warm_up(ip, port, &w.paths, w.requests, timeout, w.deadline.get()) => r,
        };
        let message = match result {
            Ok(w) => format!(
                "warmed up: {} request(s) in {:.1}s",
                w.answered,
                w.elapsed.as_secs_f64()
            ),
            Err(e) => format!("warm-up incomplete, registering anyway: {e}"),
        };
        self.handle.note("warmup", message);
        Ok(())
    }

    /// See [`Step::RunOnce`]: the release was shipped by the step before.
    async fn run_once(&mut self) -> Result<(), Fail> {
        let session = self.session().await?;
        let config = self.release_config()?;
        let hooks = &self.spec().release.hooks;
        let (commands, timeout) = (hooks.once.clone(), hooks.once_timeout.get());
        let id = self.release.clone();
        let cancel = self.handle.cancel.clone();
        let ran = release::run_once(&session, &config, &id, &commands, timeout, &cancel)
            .await
            .map_err(|e| match e {
                ReleaseError::HookFailed { .. } | ReleaseError::Timeout { .. } => {
                    Fail::Release(e.to_string())
                }
                ReleaseError::Cancelled => Fail::Cancelled,
                other => self.release_fail(other, false),
            })?;
        self.handle.note(
            "once",
            match ran {
                release::OnceRun::Ran { elapsed } => format!(
                    "once hooks of {id} succeeded in {:.1}s",
                    elapsed.as_secs_f64()
                ),
                release::OnceRun::AlreadyDone => {
                    format!("once hooks of {id} had already succeeded here")
                }
            },
        );
        Ok(())
    }

    fn target_group(&self) -> String {
        self.spec().load_balancer.target_group_arn.clone()
    }

    async fn target_state(&self) -> Result<Option<TargetState>, Fail> {
        let health = self
            .ctx
            .cloud
            .load_balancer
            .target_health(&self.target_group())
            .await?;
        Ok(health
            .into_iter()
            .find(|t| t.id == self.instance.id)
            .map(|t| t.state))
    }

    /// Registers, then waits (up to the health deadline) for the ALB to
    /// call the target healthy: only then does it count as serving.
    async fn register(&mut self) -> Result<(), Fail> {
        let tg = self.target_group();
        self.ctx
            .cloud
            .load_balancer
            .register(&tg, std::slice::from_ref(&self.instance.id))
            .await?;
        let deadline = Instant::now() + self.spec().release.health_check.deadline.get();
        loop {
            match self.target_state().await? {
                Some(TargetState::Healthy) => break,
                state if Instant::now() >= deadline => {
                    return Err(Fail::Node(format!(
                        "the load balancer never saw it healthy (last state: {state:?}); check the target group's health check"
                    )))
                }
                _ => self.pause(Duration::from_secs(2)).await?,
            }
        }
        self.handle.note(
            "register",
            "registered in the target group, healthy there".to_string(),
        );
        Ok(())
    }

    /// Out of the target group and drained, for an update.
    async fn leave_service(&mut self) -> Result<(), Fail> {
        match self.target_state().await? {
            None | Some(TargetState::Unused) => Ok(()),
            Some(_) => self.drain().await,
        }
    }

    /// Deregisters, then waits until the ALB stops reporting the target as
    /// draining and the node has no open connection on the application
    /// port — or the drain timeout passes.
    async fn drain(&mut self) -> Result<(), Fail> {
        if !self.deregistered {
            let tg = self.target_group();
            match self
                .ctx
                .cloud
                .load_balancer
                .deregister(&tg, std::slice::from_ref(&self.instance.id))
                .await
            {
                Ok(()) | Err(CloudError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            self.deregistered = true;
        }
        let started = Instant::now();
        let timeout = self.spec().load_balancer.drain_timeout.get();
        let port = self.spec().release.health_check.port;
        let mut lb_done = false;
        let mut last_lb_check: Option<Instant> = None;
        loop {
            // The ELB budget is account-wide: ask it every 2 s at most.
            if !lb_done && last_lb_check.is_none_or(|t| t.elapsed() >= Duration::from_secs(2)) {
                lb_done = !matches!(self.target_state().await?, Some(TargetState::Draining));
                last_lb_check = Some(Instant::now());
            }
            let open = if lb_done {
                self.open_connections(port).await
            } else {
                None
            };
            if lb_done && open.unwrap_or(0) == 0 {
                self.handle.note(
                    "drained",
                    format!("drained in {:.1}s", started.elapsed().as_secs_f64()),
                );
                return Ok(());
            }
            if started.elapsed() >= timeout {
                self.handle.note(
                    "drained",
                    format!(
                        "drain timeout ({}s) reached with {:?} connection(s) open",
                        timeout.as_secs(),
                        open
                    ),
                );
                return Ok(());
            }
            self.pause(Duration::from_millis(500)).await?;
        }
    }

    /// Established connections to `port` on the node; `None` if the node
    /// cannot be asked (then only the drain timeout protects in-flight work).
    async fn open_connections(&mut self, port: u16) -> Option<u32> {
        if self.instance.state != InstanceState::Running {
            return Some(0);
        }
        let session = self.session().await.ok()?;
        // Only connections to this node's own address: a host may carry
        // other listeners on the port (other containers, or in the local
        // cloud other nodes sharing the network namespace).
        let cmd = match self.instance.private_ip {
            Some(ip) => format!("ss -Htn state established '( sport = :{port} )' src {ip} | wc -l"),
            None => format!("ss -Htn state established '( sport = :{port} )' | wc -l"),
        };
        let out = session.run(&cmd).await.ok()?;
        out.stdout_lossy().trim().parse().ok()
    }

    async fn drain_hooks(&mut self) -> Result<(), Fail> {
        let hooks = self.spec().drain.hooks.clone();
        if hooks.is_empty() || self.instance.state != InstanceState::Running {
            return Ok(());
        }
        let timeout = self.spec().drain.timeout.get();
        let Ok(session) = self.session().await else {
            self.handle.note(
                "drain-hooks",
                "unreachable: drain hooks skipped".to_string(),
            );
            return Ok(());
        };
        let started = Instant::now();
        for hook in &hooks {
            let left = timeout.saturating_sub(started.elapsed());
            let outcome = session
                .exec(hook, crate::effects::ssh::Stdin::Null, left)
                .await;
            match outcome {
                Ok(out) if out.success() => {}
                // A hook failing must not keep a node alive forever: say so and go on.
                Ok(out) => self.handle.note(
                    "drain-hooks",
                    format!("drain hook `{hook}` exited {}", out.status),
                ),
                Err(e) => self
                    .handle
                    .note("drain-hooks", format!("drain hook `{hook}`: {e}")),
            }
        }
        Ok(())
    }

    /// Stops the instance into the warm pool; its SSH connection goes
    /// (the next session after a start is a new one).
    async fn stop_instance(&mut self) -> Result<(), Fail> {
        self.session = None;
        if let Ok(t) = self.target() {
            self.ctx.ssh.forget(&t).await;
        }
        self.ctx.instances.stopping(&self.instance.id);
        match self.ctx.cloud.compute.stop(&self.instance.id).await {
            Ok(()) => {}
            Err(e) if e.is_terminated() => return Err(Fail::Gone),
            Err(e) => return Err(e.into()),
        }
        // Done only once the shared listing shows it: until then every
        // pass would see a running warm node and stop it again.
        let deadline = Instant::now() + STOP_LISTED_DEADLINE;
        while !matches!(
            self.instance.state,
            InstanceState::Stopping | InstanceState::Stopped
        ) {
            if Instant::now() >= deadline {
                return Err(Fail::Retry(
                    "stopped, but the listing does not show it yet".to_string(),
                ));
            }
            self.pause(Duration::from_millis(500)).await?;
            self.refresh_instance().await?;
        }
        self.handle
            .note("stop", "stopped into the warm pool".to_string());
        Ok(())
    }

    /// Starts a warm node; the next step waits until it runs and answers SSH.
    async fn start_instance(&mut self) -> Result<(), Fail> {
        match self.ctx.cloud.compute.start(&self.instance.id).await {
            Ok(()) => {}
            Err(e) if e.is_terminated() => return Err(Fail::Gone),
            Err(e) => return Err(e.into()),
        }
        self.ctx.instances.started(&self.instance.id);
        if self.instance.state != InstanceState::Running {
            self.instance.state = InstanceState::Pending;
            // Its public IP is new and only a listing carries it.
            self.instance.public_ip = None;
        }
        self.started = true;
        self.handle
            .note("start", "started from the warm pool".to_string());
        Ok(())
    }

    async fn terminate(&mut self) -> Result<(), Fail> {
        self.session = None;
        if let Ok(t) = self.target() {
            self.ctx.ssh.forget(&t).await;
        }
        match self
            .ctx
            .cloud
            .compute
            .terminate(std::slice::from_ref(&self.instance.id))
            .await
        {
            Ok(()) | Err(CloudError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        self.ctx.instances.terminated(&self.instance.id);
        self.handle.note("terminate", "terminated".to_string());
        Ok(())
    }
}

fn fail_text(f: &Fail) -> String {
    match f {
        Fail::Retry(s) | Fail::Node(s) | Fail::Release(s) => s.clone(),
        Fail::Cancelled => "cancelled".into(),
        Fail::Gone => "the instance is gone".into(),
    }
}

fn ssh_kind(e: &SshError) -> &'static str {
    match e {
        SshError::HostKey(_) => "host_key",
        _ if e.is_transient() => "transient",
        _ => "other",
    }
}
