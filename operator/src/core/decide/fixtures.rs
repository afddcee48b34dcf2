//! Builders for `decide`'s scenario tests, in the spirit of kube-rs
//! controller-rs's fixtures: an [`Observation`] built field by field for a
//! single pass, and a [`Sim`] — a pretend cloud and task registry — that
//! drives whole scenarios pass after pass, applying each decision the way
//! the runtime would (launches become instances, started tasks run until
//! the test finishes them).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use hangar_cloud::{tags, CloudError, Instance, InstanceState, Phase};
use hangar_crds::ClusterSpec;

use crate::core::decide::{decide, Decision};
use crate::core::fleet::{Action, Task};
use crate::core::launches::LaunchIntent;
use crate::core::memory::Memory;
use crate::core::observation::{ActionFailure, ErrorCounts, Finished, Observation, Outcome};
use crate::core::planner::Reading;

pub const CONFIG: &str = "cfg1";

/// 2026-11-23 12:00 UTC, a Monday.
pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap()
}

/// A cluster over two subnets, capacity 2–6, release `v1`; `extra` is
/// YAML appended under `spec:` (two-space indent).
pub fn spec(extra: &str) -> ClusterSpec {
    let yaml = format!(
        r#"
apiVersion: hangar/v1alpha1
kind: Cluster
metadata: {{ name: web }}
spec:
  region: eu-west-1
  instances: {{ launchTemplate: lt-1, subnets: [subnet-a, subnet-b] }}
  loadBalancer: {{ targetGroupArn: "arn:aws:elasticloadbalancing:eu-west-1:1:targetgroup/web/1" }}
  capacity: {{ min: 2, max: 6 }}
  ssh: {{ user: deploy, privateKeyFile: /k }}
  provision: {{ runbook: r.yaml }}
  release: {{ id: v1, artifact: "s3://b/v1.tar.gz", sha256: "{sha}" }}
{extra}"#,
        sha = "a".repeat(64)
    );
    serde_saphyr::from_str::<hangar_crds::Cluster>(&yaml)
        .expect("test spec parses")
        .spec
}

/// Autoscaling on the ALB's per-target count: 1,000 requests/min a node,
/// evaluated every 15 s, scale-down after 60 s, at most 2 nodes a step.
pub const AUTOSCALING: &str = "  autoscaling:
    metric: { cloudwatch: { requestCount: {} } }
    targetPerNode: 1000
    evaluationInterval: 15s
    scaleDown: { stabilization: 60s, maxStep: 2 }
    scaleUp: { stabilization: 0s, maxStep: 2 }
";

/// An instance of cluster `web`, running, just launched, phase `launching`.
pub fn node(id: &str) -> Instance {
    Instance {
        id: id.into(),
        cluster: "web".into(),
        phase: Some(Phase::Launching),
        release: Some("v1".into()),
        state: InstanceState::Running,
        private_ip: None,
        public_ip: None,
        subnet_id: Some("subnet-a".into()),
        availability_zone: None,
        launched_at: Some(t0()),
        protected: false,
        client_token: None,
        tags: BTreeMap::new(),
    }
    .phase(Phase::Launching)
}

/// Builder methods on instances.
pub trait NodeExt: Sized {
    fn phase(self, phase: Phase) -> Self;
    fn on(self, release: &str) -> Self;
    fn in_subnet(self, subnet: &str) -> Self;
    fn state(self, state: InstanceState) -> Self;
    fn launched(self, at: DateTime<Utc>) -> Self;
    /// In service on `release`, provisioned with [`CONFIG`].
    fn serving(self, release: &str) -> Self {
        self.phase(Phase::InService).on(release).configured(CONFIG)
    }
    fn configured(self, config: &str) -> Self;
}

impl NodeExt for Instance {
    fn phase(mut self, phase: Phase) -> Self {
        self.phase = Some(phase);
        self.tags.insert(tags::PHASE.into(), phase.to_string());
        self
    }
    fn on(mut self, release: &str) -> Self {
        self.release = Some(release.into());
        self.tags.insert(tags::RELEASE.into(), release.into());
        self
    }
    fn in_subnet(mut self, subnet: &str) -> Self {
        self.subnet_id = Some(subnet.into());
        self
    }
    fn state(mut self, state: InstanceState) -> Self {
        self.state = state;
        self
    }
    fn launched(mut self, at: DateTime<Utc>) -> Self {
        self.launched_at = Some(at);
        self
    }
    fn configured(mut self, config: &str) -> Self {
        self.tags.insert(tags::CONFIG.into(), config.into());
        self
    }
}

impl Observation {
    /// A pass at [`t0`] of [`spec`]`("")` that saw nothing.
    pub fn test() -> Observation {
        Observation {
            cluster: "web".into(),
            spec: Arc::new(spec("")),
            config_hash: CONFIG.into(),
            now: t0(),
            instances: Vec::new(),
            unlisted: Default::default(),
            running: HashMap::new(),
            finished: Vec::new(),
            notes: Vec::new(),
            traffic: None,
            errors: None,
            unhealthy: HashMap::new(),
            failures: Vec::new(),
            launch_version: Some("1".into()),
            target_group: None,
        }
    }

    /// The target group, read this pass, lists these nodes (healthy).
    pub fn target_group(mut self, members: &[&str]) -> Self {
        self.target_group = Some(Ok(members
            .iter()
            .map(|id| hangar_cloud::TargetHealth {
                id: (*id).into(),
                port: None,
                state: hangar_cloud::TargetState::Healthy,
                reason: None,
            })
            .collect()));
        self
    }

    pub fn with_spec(mut self, spec: ClusterSpec) -> Self {
        self.spec = Arc::new(spec);
        self
    }

    pub fn at(mut self, now: DateTime<Utc>) -> Self {
        self.now = now;
        self
    }

    pub fn with_nodes(mut self, nodes: impl IntoIterator<Item = Instance>) -> Self {
        self.instances.extend(nodes);
        self
    }

    pub fn running(mut self, node: &str, task: Task) -> Self {
        self.running.insert(node.into(), task);
        self
    }

    pub fn finished(mut self, node: &str, task: Task, outcome: Outcome) -> Self {
        self.finished.push(Finished {
            node: node.into(),
            task,
            outcome,
            at: self.now,
        });
        self
    }

    /// The cluster's traffic read this pass, in requests per minute.
    pub fn traffic(mut self, per_minute: f64) -> Self {
        self.traffic = Some(Ok(Some(Reading {
            requests_per_minute: per_minute,
            observed_at: self.now,
        })));
        self
    }

    pub fn errors(mut self, errors_5xx: f64, requests: f64) -> Self {
        self.errors = Some(Ok(ErrorCounts {
            errors_5xx,
            requests,
        }));
        self
    }

    pub fn unhealthy(mut self, node: &str, since: DateTime<Utc>) -> Self {
        self.unhealthy.insert(node.into(), since);
        self
    }

    /// The last pass's launch in `subnet` was refused for capacity.
    pub fn launch_failed_in(mut self, subnet: &str) -> Self {
        self.failures.push(ActionFailure::Launch {
            token: String::new(),
            subnet: subnet.into(),
            count: 1,
            error: insufficient_capacity(),
            at: self.now,
        });
        self
    }
}

pub fn insufficient_capacity() -> CloudError {
    CloudError::Service {
        service: "ec2",
        code: "InsufficientInstanceCapacity".into(),
        message:
            "We currently do not have sufficient capacity in the Availability Zone you requested."
                .into(),
    }
}

/// The launches a decision makes, as `(subnet, count)`.
pub fn launches(d: &Decision) -> Vec<(String, u32)> {
    d.launches
        .iter()
        .map(|l| (l.subnet.clone(), l.count))
        .collect()
}

/// The node tasks a decision starts, as `(node, task name)`, sorted.
pub fn starts(d: &Decision) -> Vec<(String, &'static str)> {
    let mut out: Vec<(String, &'static str)> = d
        .diff
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Start { node, task } => Some((node.clone(), task.name())),
            _ => None,
        })
        .collect();
    out.sort();
    out
}

/// A pretend cloud and task registry around [`decide`]: each
/// [`Sim::pass`] observes the simulated fleet, decides, and applies the
/// decision as the runtime would, without finishing any node task — the
/// test does that with [`Sim::finish`], choosing each outcome.
pub struct Sim {
    pub spec: ClusterSpec,
    pub now: DateTime<Utc>,
    pub memory: Memory,
    /// What exists in the cloud.
    pub cloud: Vec<Instance>,
    /// Instances the listing does not show yet (eventual consistency) and
    /// hangar does not know of either (it restarted since it launched them).
    pub hidden: Vec<String>,
    /// Instances the listing does not show yet, known from hangar's own
    /// launch answers (the runtime's inventory lays those over).
    pub own: Vec<String>,
    /// Launches stay out of the listing until [`Sim::catch_up`].
    pub lagging: bool,
    pub running: HashMap<String, Task>,
    finished: Vec<Finished>,
    failures: Vec<ActionFailure>,
    /// Subnets whose launches fail for capacity.
    pub full: Vec<String>,
    traffic: Option<f64>,
    errors: Option<(f64, f64)>,
    unhealthy: HashMap<String, DateTime<Utc>>,
    next_id: u32,
    /// Every decision so far.
    pub decisions: Vec<Decision>,
    /// Every launch that reached the cloud, as `(subnet, count)`.
    pub launched: Vec<(String, u32)>,
    /// The version the spec's launch template version names now
    /// (`None`: it could not be read).
    pub template_version: Option<String>,
    /// The target group's members, read every pass when set (`None`: not
    /// read, as between the runtime's checks).
    pub target_group: Option<Vec<String>>,
}

impl Sim {
    pub fn new(spec: ClusterSpec) -> Sim {
        Sim {
            spec,
            now: t0(),
            memory: Memory::default(),
            cloud: Vec::new(),
            hidden: Vec::new(),
            own: Vec::new(),
            lagging: false,
            running: HashMap::new(),
            finished: Vec::new(),
            failures: Vec::new(),
            full: Vec::new(),
            traffic: None,
            errors: None,
            unhealthy: HashMap::new(),
            next_id: 1,
            decisions: Vec::new(),
            launched: Vec::new(),
            template_version: Some("1".into()),
            target_group: None,
        }
    }

    pub fn wait(&mut self, seconds: i64) {
        self.now += Duration::seconds(seconds);
    }

    /// The traffic every following pass reads (requests per minute).
    pub fn traffic(&mut self, per_minute: f64) {
        self.traffic = Some(per_minute);
    }

    pub fn errors(&mut self, errors_5xx: f64, requests: f64) {
        self.errors = Some((errors_5xx, requests));
    }

    pub fn unhealthy(&mut self, node: &str) {
        self.unhealthy.insert(node.into(), self.now);
    }

    pub fn observation(&self) -> Observation {
        let mut obs = Observation::test()
            .with_spec(self.spec.clone())
            .at(self.now);
        obs.instances = self
            .cloud
            .iter()
            .filter(|i| !self.hidden.contains(&i.id))
            .filter(|i| i.state != InstanceState::Terminated)
            .cloned()
            .collect();
        obs.unlisted = self.own.iter().cloned().collect();
        obs.running = self.running.clone();
        obs.finished = self.finished.clone();
        obs.failures = self.failures.clone();
        obs.unhealthy = self.unhealthy.clone();
        obs.launch_version = self.template_version.clone();
        if let Some(members) = &self.target_group {
            obs = obs.target_group(&members.iter().map(String::as_str).collect::<Vec<_>>());
        }
        let reads = super::reads(&obs, &self.memory);
        if reads.traffic {
            if let Some(rate) = self.traffic {
                obs = obs.traffic(rate);
            }
        }
        if reads.errors_since.is_some() {
            if let Some((e, r)) = self.errors {
                obs = obs.errors(e, r);
            }
        }
        obs
    }

    /// One reconcile pass: observe, decide, act.
    pub fn pass(&mut self) -> &Decision {
        let obs = self.observation();
        let d = decide(&obs, &self.memory);
        self.finished.clear();
        self.failures.clear();
        self.memory = d.memory.clone();
        for action in &d.diff.actions {
            match action {
                Action::Start { node, task } => {
                    self.running.insert(node.clone(), task.clone());
                }
                Action::Cancel { node, .. } => {
                    if let Some(task) = self.running.remove(node) {
                        self.finished.push(Finished {
                            node: node.clone(),
                            task,
                            outcome: Outcome::Cancelled,
                            at: self.now,
                        });
                    }
                }
                Action::Launch { .. } => {}
            }
        }
        for intent in d.launches.clone() {
            self.launch(&intent);
        }
        self.decisions.push(d);
        self.decisions.last().expect("just pushed")
    }

    /// `RunInstances` as EC2 answers it: a token seen before returns its
    /// instances and launches nothing.
    fn launch(&mut self, intent: &LaunchIntent) {
        if self.full.contains(&intent.subnet) {
            self.failures.push(ActionFailure::Launch {
                token: intent.token.clone(),
                subnet: intent.subnet.clone(),
                count: intent.count,
                error: insufficient_capacity(),
                at: self.now,
            });
            return;
        }
        let known = self
            .cloud
            .iter()
            .any(|i| i.client_token.as_deref() == Some(intent.token.as_str()));
        if known {
            return;
        }
        self.launched.push((intent.subnet.clone(), intent.count));
        for _ in 0..intent.count {
            let id = format!("i-{:03}", self.next_id);
            self.next_id += 1;
            let mut i = node(&id)
                .in_subnet(&intent.subnet)
                .on(&intent.release)
                .launched(self.now);
            i.client_token = Some(intent.token.clone());
            if let Some(v) = &self.template_version {
                i.tags.insert(
                    tags::LAUNCH.into(),
                    crate::core::launches::settings_hash(&self.spec.instances, v),
                );
            }
            if self.lagging {
                self.own.push(id);
            }
            self.cloud.push(i);
        }
    }

    /// Ends `node`'s running task with `outcome`, moving the node the way
    /// the task would have on success.
    pub fn finish(&mut self, node: &str, outcome: Outcome) {
        let task = self
            .running
            .remove(node)
            .unwrap_or_else(|| panic!("no task runs for {node}"));
        if outcome == Outcome::Done {
            let target = self.memory.release.target.clone();
            if let Some(i) = self.cloud.iter_mut().find(|i| i.id == node) {
                let moved = i.clone();
                *i = match &task {
                    Task::Advance => moved.serving(&target),
                    Task::Update { release } | Task::Rollback { release } => moved.serving(release),
                    Task::Drain { .. } => moved
                        .phase(Phase::Terminating)
                        .state(InstanceState::Terminated),
                    Task::Prepare => moved.phase(Phase::Releasing).configured(CONFIG),
                    // Shipped, hooks run: the node serves what it served.
                    Task::Once { .. } => moved,
                    Task::Warm { stop } => {
                        let released = if moved.phase == Some(Phase::InService) {
                            moved.release.clone().unwrap_or_default()
                        } else {
                            target.clone()
                        };
                        let state = if *stop {
                            InstanceState::Stopped
                        } else {
                            InstanceState::Running
                        };
                        moved
                            .phase(Phase::Warm)
                            .on(&released)
                            .configured(CONFIG)
                            .state(state)
                    }
                    Task::Serve => moved.serving(&target).state(InstanceState::Running),
                    Task::Rejoin => moved,
                };
            }
        }
        self.finished.push(Finished {
            node: node.into(),
            task,
            outcome,
            at: self.now,
        });
    }

    /// Ends every running task named `task` (e.g. `"advance"`) with `outcome`.
    pub fn finish_all(&mut self, task: &str, outcome: Outcome) {
        let mut nodes: Vec<String> = self
            .running
            .iter()
            .filter(|(_, t)| t.name() == task)
            .map(|(n, _)| n.clone())
            .collect();
        nodes.sort();
        for n in nodes {
            self.finish(&n, outcome.clone());
        }
    }

    /// Passes until no new task starts and every task is finished with
    /// `Done` (at most `passes`); a fleet settling.
    pub fn settle(&mut self, passes: usize) {
        for _ in 0..passes {
            let d = self.pass();
            let quiet = d.diff.actions.is_empty();
            let names: Vec<&'static str> = self.running.values().map(Task::name).collect();
            for name in names {
                self.finish_all(name, Outcome::Done);
            }
            if quiet && self.running.is_empty() && self.finished.is_empty() {
                return;
            }
        }
    }

    /// The operator is killed and starts again: running tasks are gone,
    /// and so is what it knew of its own launches — until the listing
    /// catches up, they are not seen at all.
    pub fn crash(&mut self) {
        self.memory.planned_here = false;
        self.running.clear();
        self.hidden.append(&mut self.own);
    }

    /// The listing shows everything.
    pub fn catch_up(&mut self) {
        self.hidden.clear();
        self.own.clear();
    }

    /// The last launch decided.
    pub fn last_launch(&self) -> &LaunchIntent {
        self.decisions
            .iter()
            .rev()
            .find_map(|d| d.launches.last())
            .expect("a launch was decided")
    }

    /// Instances serving now.
    pub fn serving(&self) -> Vec<&Instance> {
        self.cloud
            .iter()
            .filter(|i| i.phase == Some(Phase::InService) && i.state == InstanceState::Running)
            .collect()
    }
}
