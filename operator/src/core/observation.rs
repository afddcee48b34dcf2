//! Everything one reconcile pass saw of a cluster, as one plain value.
//!
//! The runtime's `observe` fills it (inventory, task registry, metric
//! reads, probe results, the spec, the clock); [`crate::core::decide()`]
//! reads nothing else.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use hangar_cloud::{CloudError, Instance, TargetHealth};
use hangar_crds::ClusterSpec;

use crate::core::fleet::Task;
use crate::core::planner::Reading;

#[derive(Clone, Debug)]
pub struct Observation {
    pub cluster: String,
    pub spec: Arc<ClusterSpec>,
    /// The provisioning config hash every node should carry
    /// (`hangar:config`); empty when the spec is gone.
    pub config_hash: String,
    pub now: DateTime<Utc>,
    /// The cluster's instances: the shared listing, plus hangar's own
    /// launches and tag writes it does not show yet.
    pub instances: Vec<Instance>,
    /// Of those, the ones known only from hangar's own launch answers (the
    /// listing does not show them yet).
    pub unlisted: BTreeSet<String>,
    /// Node tasks running now, by node.
    pub running: HashMap<String, Task>,
    /// Node tasks that ended since the last pass, and the notes they left.
    pub finished: Vec<Finished>,
    pub notes: Vec<Note>,
    /// The traffic metric, when this pass read it ([`Reads::traffic`]).
    pub traffic: Option<Result<Option<Reading>, String>>,
    /// 5xx answers and requests since activation, when this pass read
    /// them ([`Reads::errors_since`]).
    pub errors: Option<Result<ErrorCounts, String>>,
    /// In-service nodes whose background health probe fails, since when.
    pub unhealthy: HashMap<String, DateTime<Utc>>,
    /// What the last pass's actions reported back.
    pub failures: Vec<ActionFailure>,
    /// The launch template version the spec's `launchTemplateVersion`
    /// names now (`$Latest`/`$Default` resolved); `None` when it could not
    /// be read this pass — then no node is judged on its launch settings.
    pub launch_version: Option<String>,
    /// The target group's targets, when this pass read them (the runtime
    /// does every `target_group_check_interval`, after the listing and the
    /// running tasks): an in-service node it does not list is put back.
    pub target_group: Option<Result<Vec<TargetHealth>, String>>,
}

impl Observation {
    /// The `hangar:launch` stamp a node launched now gets: the spec's
    /// launch settings with the template version resolved (`None` when
    /// the version could not be read this pass).
    pub fn launch_stamp(&self) -> Option<String> {
        self.launch_version
            .as_deref()
            .map(|v| crate::core::launches::settings_hash(&self.spec.instances, v))
    }
}

/// An action of an earlier pass that failed.
#[derive(Clone, Debug)]
pub enum ActionFailure {
    /// A node task could not be started (say, the cluster's SSH key file
    /// is missing).
    Start {
        node: String,
        task: Task,
        error: String,
        at: DateTime<Utc>,
    },
    /// A `RunInstances` call for the launch intent with this token.
    Launch {
        token: String,
        subnet: String,
        count: u32,
        error: CloudError,
        at: DateTime<Utc>,
    },
}

/// What a pass must read besides the instances: decided by
/// [`crate::core::decide::reads`] so observe reads only what decide uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reads {
    pub traffic: bool,
    /// Read the 5xx rate since then (the auto-rollback window is open).
    pub errors_since: Option<DateTime<Utc>>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ErrorCounts {
    pub errors_5xx: f64,
    pub requests: f64,
}

/// How a node task ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// Stopped at a safe point because it was asked to.
    Cancelled,
    /// Could not finish now (network, throttling); the next pass retries.
    Retry(String),
    /// The node cannot be made to work: replace it.
    NodeFailed(String),
    /// The release failed its health check on this node (which was rolled
    /// back): halt the rollout.
    ReleaseFailed {
        release: String,
        reason: String,
    },
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Done => "ok",
            Outcome::Cancelled => "cancelled",
            Outcome::Retry(_) => "retry",
            Outcome::NodeFailed(_) => "failed",
            Outcome::ReleaseFailed { .. } => "release-failed",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Finished {
    pub node: String,
    pub task: Task,
    pub outcome: Outcome,
    pub at: DateTime<Utc>,
}

/// A line for the cluster's activity history, emitted while a task runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub at: DateTime<Utc>,
    pub node: String,
    pub kind: String,
    pub message: String,
}
