//! What the operator carries from one pass of a cluster to the next.
//!
//! The cloud is the truth about nodes; [`Memory`] is the truth about
//! *decisions*: the standing desired count and why, the planner's
//! stabilization history, the rollout's state, failure counts and backoff
//! deadlines. [`crate::core::decide()`] reads it and returns it updated; the
//! runtime persists it (inside the cluster's status) so a restart neither
//! scales down early nor retries a halted release.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::core::launches::Launches;
use crate::core::planner::{EffectiveCapacity, History, Reading};
use crate::core::rollout::ReleaseStatus;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Memory {
    /// The standing decision: nodes the cluster should have.
    pub desired: u32,
    pub window: Option<EffectiveCapacity>,
    pub release: ReleaseStatus,
    /// The latest traffic reading the planner used.
    pub last_metric: Option<Reading>,
    /// When metrics were last read: the traffic (evaluations are spaced by
    /// `autoscaling.evaluationInterval`) and, while a new release is
    /// watched for auto-rollback, its 5xx rate.
    pub last_eval_at: Option<DateTime<Utc>>,
    pub last_decision: Option<DecisionRecord>,
    /// Planner memory for stabilization.
    pub history: History,
    /// Consecutive node failures (launch backoff grows with it).
    pub node_failures: u32,
    /// Nodes whose task gave up for good, to be replaced (id → why).
    pub failed_nodes: BTreeMap<String, String>,
    /// Nodes this cluster decided must go (id → why): scale-in victims and
    /// replacements. Which ones go is a decision, and a restarted operator
    /// whose listing does not show their `draining` tags yet must carry it
    /// on rather than choose again from a view that may differ.
    #[serde(default)]
    pub leaving: BTreeMap<String, String>,
    /// The last error seen per node (id → message), shown in status.
    pub node_errors: BTreeMap<String, String>,
    /// Transient failures in a row of a node still coming up (id → count):
    /// a node that never stops failing "transiently" (it hangs, drops every
    /// connection) is given up and replaced, not retried forever.
    #[serde(default)]
    pub node_retries: BTreeMap<String, u32>,
    /// A node whose task ended in a retry gets no new task before then
    /// (id → when): a failure that comes back at once (a lagging listing,
    /// a target the load balancer has not caught up with) must not burn
    /// through the retries in a second.
    #[serde(default)]
    pub retry_after: BTreeMap<String, DateTime<Utc>>,
    /// Nodes listed `stopped` that hangar did not stop, since when this
    /// cluster's listings show them so (id → first seen): believed only
    /// once that lasted [`crate::core::fleet::STOPPED_BELIEVED_AFTER`], as
    /// EC2's listing may show a start seconds late.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub listed_stopped: BTreeMap<String, DateTime<Utc>>,
    /// In-service nodes a read of the target group did not list, since the
    /// first read that found them missing (id → when). They stop counting
    /// as serving at once, and are registered again once that lasted
    /// [`crate::core::fleet::MISSING_BELIEVED_AFTER`]: a restarted
    /// operator's listing may still show `in-service` for a node an update
    /// had taken out, and shows the truth within seconds.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub missing_from_group: BTreeMap<String, DateTime<Utc>>,
    /// Launches wait until then after repeated node failures.
    pub launch_backoff_until: Option<DateTime<Utc>>,
    /// The launch settings (`hangar:launch` stamp) the failures in a row
    /// were earned with: new settings (a fixed template version) start
    /// over, as an Auto Scaling group's next launch does.
    #[serde(default)]
    pub failing_launch: Option<String>,
    /// Launch intents not yet confirmed by the listing, and subnets
    /// launches avoid for now.
    #[serde(default)]
    pub launches: Launches,
    /// This process has planned for the cluster. Never saved: after a
    /// restart it is false, which marks the first pass (see
    /// [`crate::core::planner::Pass::standing`]).
    #[serde(skip)]
    pub planned_here: bool,
}

/// The planner's last decision, with its reason.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DecisionRecord {
    pub at: DateTime<Utc>,
    pub desired: u32,
    pub reason: String,
}

impl Memory {
    /// Whether this process decided for the cluster before: a memory
    /// loaded from disk may predate a crash (nodes launched, the new count
    /// not yet saved), so the first pass plans from what runs.
    pub fn continuing(&self) -> bool {
        self.planned_here
    }
}

impl Memory {
    /// Equal, except perhaps for the latest *readings* when
    /// `ignore_readings`: the traffic metric, the last decision's wording
    /// and time, and the planner history's time stamps (a steady
    /// recommendation is re-stamped on every evaluation). `last_eval_at`
    /// is a time stamp and never counts. Field by field and exhaustive on
    /// purpose: a new field must be placed on one side or the other, or
    /// this won't compile.
    pub fn same_besides(&self, other: &Memory, ignore_readings: bool) -> bool {
        let Memory {
            desired,
            window,
            release,
            last_metric,
            last_eval_at: _,
            last_decision,
            history,
            node_failures,
            failed_nodes,
            leaving,
            node_errors,
            node_retries,
            retry_after,
            listed_stopped,
            missing_from_group,
            launch_backoff_until,
            failing_launch,
            launches,
            planned_here: _,
        } = self;
        let (same_desired, same_reason) = match (last_decision, &other.last_decision) {
            (Some(a), Some(b)) => (a.desired == b.desired, a.reason == b.reason),
            (None, None) => (true, true),
            _ => (false, false),
        };
        let readings_equal = ignore_readings
            || (*last_metric == other.last_metric && *history == other.history && same_reason);
        readings_equal
            && same_desired
            && history.len() == other.history.len()
            && *desired == other.desired
            && *window == other.window
            && *release == other.release
            && *node_failures == other.node_failures
            && *failed_nodes == other.failed_nodes
            && *leaving == other.leaving
            && *node_errors == other.node_errors
            && *node_retries == other.node_retries
            && *retry_after == other.retry_after
            && *listed_stopped == other.listed_stopped
            && *missing_from_group == other.missing_from_group
            && *launch_backoff_until == other.launch_backoff_until
            && *failing_launch == other.failing_launch
            && *launches == other.launches
    }

    /// What clients are shown: without the planner's history.
    pub fn public(&self) -> Memory {
        let Memory {
            desired,
            window,
            release,
            last_metric,
            last_eval_at,
            last_decision,
            history: _,
            node_failures,
            failed_nodes,
            leaving,
            node_errors,
            node_retries,
            retry_after,
            listed_stopped,
            missing_from_group,
            launch_backoff_until,
            failing_launch,
            launches,
            planned_here,
        } = self;
        Memory {
            desired: *desired,
            window: window.clone(),
            release: release.clone(),
            last_metric: *last_metric,
            last_eval_at: *last_eval_at,
            last_decision: last_decision.clone(),
            history: History::default(),
            node_failures: *node_failures,
            failed_nodes: failed_nodes.clone(),
            leaving: leaving.clone(),
            node_errors: node_errors.clone(),
            node_retries: node_retries.clone(),
            retry_after: retry_after.clone(),
            listed_stopped: listed_stopped.clone(),
            missing_from_group: missing_from_group.clone(),
            launch_backoff_until: *launch_backoff_until,
            failing_launch: failing_launch.clone(),
            launches: launches.clone(),
            planned_here: *planned_here,
        }
    }
}
