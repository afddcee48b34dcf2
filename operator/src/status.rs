//! What hangar knows and did, per cluster: for people (`hangar status`),
//! for machines (`/api/v1/clusters`, `--output json`) and for hangar itself
//! after a restart (scaling history, rollout memory, the last applied spec).
//!
//! The cloud stays the source of truth for nodes; this is the memory of
//! *decisions*, persisted under the state directory with atomic renames.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use hangar_crds::ClusterSpec;
use serde::{Deserialize, Serialize};

use crate::planner::{EffectiveCapacity, History, Observation};

/// How many activities a cluster remembers (like an ASG's activity history).
pub const MAX_ACTIVITIES: usize = 100;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    pub name: String,
    /// Spec file it was loaded from.
    pub file: Option<PathBuf>,
    pub region: String,
    /// sha256 of the applied spec (as JSON), to tell which spec a status reflects.
    pub observed_spec_hash: String,
    pub updated_at: Option<DateTime<Utc>>,
    pub desired: u32,
    pub window: Option<EffectiveCapacity>,
    /// Node count by phase (`in-service`, `draining`, …).
    pub phases: BTreeMap<String, u32>,
    pub nodes: Vec<NodeStatus>,
    pub release: ReleaseStatus,
    pub last_metric: Option<Observation>,
    /// When metrics were last read: the traffic (evaluations are spaced by
    /// `autoscaling.evaluationInterval`) and, while a new release is
    /// watched for auto-rollback, its 5xx rate.
    pub last_eval_at: Option<DateTime<Utc>>,
    pub last_decision: Option<DecisionRecord>,
    pub conditions: Vec<Condition>,
    pub activities: VecDeque<Activity>,
    /// Planner memory for stabilization.
    pub history: History,
    /// Consecutive node failures (launch backoff grows with it).
    pub node_failures: u32,
    /// Nodes whose task gave up for good, to be replaced (id → why).
    pub failed_nodes: BTreeMap<String, String>,
    /// The last error seen per node (id → message), shown in status.
    pub node_errors: BTreeMap<String, String>,
    /// Transient failures in a row of a node still coming up (id → count):
    /// a node that never stops failing "transiently" (it hangs, drops every
    /// connection) is given up and replaced, not retried forever.
    #[serde(default)]
    pub node_retries: BTreeMap<String, u32>,
    /// Launches wait until then after repeated node failures.
    pub launch_backoff_until: Option<DateTime<Utc>>,
    /// The last spec applied, so a deleted spec's deletion policy is known.
    pub spec: Option<ClusterSpec>,
    /// The spec is gone from the spec directory.
    pub spec_removed: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub id: String,
    pub phase: String,
    pub state: String,
    pub release: Option<String>,
    pub address: Option<String>,
    pub subnet: Option<String>,
    pub task: Option<String>,
    pub protected: bool,
    pub launched_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseStatus {
    /// The release the spec asks for.
    pub desired: String,
    /// The release new nodes get and the fleet is rolled to (differs from
    /// `desired` after a failed or rolled-back release).
    pub target: String,
    /// Last release that was fully rolled out and healthy.
    pub last_good: Option<String>,
    /// Releases that failed (health or auto-rollback); never rolled again
    /// until the spec names another release.
    pub failed: Vec<String>,
    /// Set while an emergency rollback away from this release runs.
    pub rolling_back_from: Option<String>,
    /// When the target release was first activated on a serving node
    /// (the auto-rollback window starts here).
    pub activated_at: Option<DateTime<Utc>>,
    /// In-service nodes not yet on the target.
    pub outdated: u32,
    /// Artifacts of recent releases, so the last good one can still be
    /// shipped after the spec moved on.
    pub known: BTreeMap<String, KnownRelease>,
    /// Nodes on the target release.
    pub on_target: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KnownRelease {
    pub artifact: String,
    pub sha256: String,
    pub first_seen: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DecisionRecord {
    pub at: DateTime<Utc>,
    pub desired: u32,
    pub reason: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ConditionType {
    /// Every desired node is in service on the target release.
    Ready,
    /// Nodes are being launched, updated or drained.
    Progressing,
    /// Something needs a person: failing nodes, a failed release, a broken spec.
    Degraded,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub kind: ConditionType,
    pub status: bool,
    pub reason: String,
    pub message: String,
    pub since: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Activity {
    pub at: DateTime<Utc>,
    /// `launch`, `in-service`, `drain`, `terminate`, `scale`, `rollout`, `rollback`, `error`, …
    pub kind: String,
    pub node: Option<String>,
    pub message: String,
}

impl ClusterStatus {
    pub fn new(name: &str) -> ClusterStatus {
        ClusterStatus {
            name: name.to_string(),
            ..ClusterStatus::default()
        }
    }

    pub fn record(
        &mut self,
        at: DateTime<Utc>,
        kind: &str,
        node: Option<&str>,
        message: impl Into<String>,
    ) {
        self.activities.push_front(Activity {
            at,
            kind: kind.to_string(),
            node: node.map(str::to_string),
            message: message.into(),
        });
        self.activities.truncate(MAX_ACTIVITIES);
    }

    /// Sets a condition, keeping `since` when nothing about it changed.
    pub fn set_condition(
        &mut self,
        kind: ConditionType,
        status: bool,
        reason: &str,
        message: impl Into<String>,
        now: DateTime<Utc>,
    ) {
        let message = message.into();
        match self.conditions.iter_mut().find(|c| c.kind == kind) {
            Some(c) if c.status == status && c.reason == reason => c.message = message,
            Some(c) => {
                *c = Condition {
                    kind,
                    status,
                    reason: reason.to_string(),
                    message,
                    since: now,
                }
            }
            None => {
                self.conditions.push(Condition {
                    kind,
                    status,
                    reason: reason.to_string(),
                    message,
                    since: now,
                });
                self.conditions.sort_by_key(|c| c.kind);
            }
        }
    }

    pub fn condition(&self, kind: ConditionType) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.kind == kind)
    }

    /// Equal but for the time of the last look (what is worth persisting).
    pub fn same_content(&self, other: &ClusterStatus) -> bool {
        self.same_besides(other, false)
    }

    /// Equal but for the time of the last look and the latest *readings*:
    /// the traffic metric, the last decision's wording and time, and the
    /// planner memory's time stamps (a steady recommendation is re-stamped
    /// on every evaluation). A change here is a change of *decisions* —
    /// desired count, nodes, release, conditions, activities, the number
    /// of distinct recommendations — and is persisted at once; readings
    /// alone can wait (see `Operator::save_status`).
    pub fn same_decisions(&self, other: &ClusterStatus) -> bool {
        self.same_besides(other, true)
    }

    /// Field by field, without cloning (this runs for every cluster on
    /// every pass). The destructuring is exhaustive on purpose: a new field
    /// must be placed on one side or the other here, or this won't compile.
    fn same_besides(&self, other: &ClusterStatus, ignore_readings: bool) -> bool {
        let ClusterStatus {
            name,
            file,
            region,
            observed_spec_hash,
            updated_at: _,
            desired,
            window,
            phases,
            nodes,
            release,
            last_metric,
            last_eval_at: _,
            last_decision,
            conditions,
            activities,
            history,
            node_failures,
            failed_nodes,
            node_errors,
            node_retries,
            launch_backoff_until,
            spec,
            spec_removed,
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
            && *name == other.name
            && *file == other.file
            && *region == other.region
            && *observed_spec_hash == other.observed_spec_hash
            && *desired == other.desired
            && *window == other.window
            && *phases == other.phases
            && *nodes == other.nodes
            && *release == other.release
            && *conditions == other.conditions
            && *activities == other.activities
            && *node_failures == other.node_failures
            && *failed_nodes == other.failed_nodes
            && *node_errors == other.node_errors
            && *node_retries == other.node_retries
            && *launch_backoff_until == other.launch_backoff_until
            && *spec_removed == other.spec_removed
            && *spec == other.spec
    }

    /// The view served to clients: without the internal planner memory and spec copy.
    pub fn public(&self) -> ClusterStatus {
        // Built without cloning the spec and history only to drop them:
        // this runs for every cluster on every pass.
        let ClusterStatus {
            name,
            file,
            region,
            observed_spec_hash,
            updated_at,
            desired,
            window,
            phases,
            nodes,
            release,
            last_metric,
            last_eval_at,
            last_decision,
            conditions,
            activities,
            history: _,
            node_failures,
            failed_nodes,
            node_errors,
            node_retries,
            launch_backoff_until,
            spec: _,
            spec_removed,
        } = self;
        ClusterStatus {
            name: name.clone(),
            file: file.clone(),
            region: region.clone(),
            observed_spec_hash: observed_spec_hash.clone(),
            updated_at: *updated_at,
            desired: *desired,
            window: window.clone(),
            phases: phases.clone(),
            nodes: nodes.clone(),
            release: release.clone(),
            last_metric: *last_metric,
            last_eval_at: *last_eval_at,
            last_decision: last_decision.clone(),
            conditions: conditions.clone(),
            activities: activities.clone(),
            history: History::default(),
            node_failures: *node_failures,
            failed_nodes: failed_nodes.clone(),
            node_errors: node_errors.clone(),
            node_retries: node_retries.clone(),
            launch_backoff_until: *launch_backoff_until,
            spec: None,
            spec_removed: *spec_removed,
        }
    }
}

/// Statuses on disk: `<state>/clusters/<name>.json`.
#[derive(Clone, Debug)]
pub struct StatusStore {
    dir: PathBuf,
    read_only: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("status store {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("status file {}: {source}", path.display())]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

impl StatusStore {
    pub fn open(state_dir: &Path) -> Result<StatusStore, StoreError> {
        let dir = state_dir.join("clusters");
        std::fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(StatusStore {
            dir,
            read_only: false,
        })
    }

    /// A store that can be read but is never written (for `hangar plan`,
    /// which may run beside the operator that owns the state directory).
    pub fn read_only(state_dir: &Path) -> StatusStore {
        StatusStore {
            dir: state_dir.join("clusters"),
            read_only: true,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// Every stored status. A corrupt file is reported and skipped: it
    /// costs history, not nodes (the cloud is the truth).
    pub fn load_all(&self) -> (Vec<ClusterStatus>, Vec<StoreError>) {
        let mut out = Vec::new();
        let mut errors = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(source) => {
                errors.push(StoreError::Io {
                    path: self.dir.clone(),
                    source,
                });
                return (out, errors);
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match std::fs::read(&path) {
                Ok(bytes) => match serde_json::from_slice(&bytes) {
                    Ok(s) => out.push(s),
                    Err(source) => errors.push(StoreError::Corrupt { path, source }),
                },
                Err(source) => errors.push(StoreError::Io { path, source }),
            }
        }
        out.sort_by(|a: &ClusterStatus, b| a.name.cmp(&b.name));
        (out, errors)
    }

    /// Writes atomically: a crash leaves the old or the new file, never half.
    pub fn save(&self, status: &ClusterStatus) -> Result<(), StoreError> {
        if self.read_only {
            return Ok(());
        }
        let path = self.path(&status.name);
        let tmp = self.dir.join(format!(".{}.json.tmp", status.name));
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(status).map_err(|source| StoreError::Corrupt {
            path: path.clone(),
            source,
        })?;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        // No fsync: status is memory of decisions, rebuilt from the cloud if
        // lost, and a thousand clusters must not cost a thousand fsyncs.
        f.write_all(&bytes).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        Ok(())
    }

    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        if self.read_only {
            return Ok(());
        }
        let path = self.path(name);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(StoreError::Io { path, source: e })
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn conditions_keep_their_since_until_they_change() {
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let t1 = t0 + chrono::Duration::minutes(1);
        let mut s = ClusterStatus::new("web");
        s.set_condition(ConditionType::Ready, false, "Scaling", "1/2 in service", t0);
        s.set_condition(ConditionType::Ready, false, "Scaling", "still 1/2", t1);
        assert_eq!(s.condition(ConditionType::Ready).unwrap().since, t0);
        assert_eq!(
            s.condition(ConditionType::Ready).unwrap().message,
            "still 1/2"
        );
        s.set_condition(ConditionType::Ready, true, "AllInService", "2/2", t1);
        assert_eq!(s.condition(ConditionType::Ready).unwrap().since, t1);
    }

    #[test]
    fn readings_alone_are_not_a_change_of_decisions() {
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let t1 = t0 + chrono::Duration::seconds(15);
        let mut a = ClusterStatus::new("web");
        a.desired = 3;
        a.last_decision = Some(DecisionRecord {
            at: t0,
            desired: 3,
            reason: "rate 2900/min".into(),
        });
        let mut b = a.clone();
        b.updated_at = Some(t1);
        b.last_eval_at = Some(t1);
        assert!(a.same_content(&b), "the time of the look is never content");
        b.last_metric = Some(Observation {
            requests_per_minute: 3100.0,
            observed_at: t1,
        });
        b.last_decision = Some(DecisionRecord {
            at: t1,
            desired: 3,
            reason: "rate 3100/min".into(),
        });
        assert!(!a.same_content(&b));
        assert!(a.same_decisions(&b), "a new reading alone");
        b.last_decision = Some(DecisionRecord {
            at: t1,
            desired: 4,
            reason: "rate 3100/min".into(),
        });
        assert!(!a.same_decisions(&b), "a new decision");
        let mut c = a.clone();
        c.record(t1, "scale", None, "desired 3 → 4");
        assert!(!a.same_decisions(&c), "an activity");
    }

    #[test]
    fn activities_are_bounded_newest_first() {
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let mut s = ClusterStatus::new("web");
        for i in 0..(MAX_ACTIVITIES + 10) {
            s.record(t0, "scale", None, format!("#{i}"));
        }
        assert_eq!(s.activities.len(), MAX_ACTIVITIES);
        assert_eq!(s.activities[0].message, format!("#{}", MAX_ACTIVITIES + 9));
    }

    #[test]
    fn store_round_trips_and_survives_a_corrupt_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = StatusStore::open(dir.path()).unwrap();
        let mut s = ClusterStatus::new("web");
        s.desired = 3;
        store.save(&s).unwrap();
        std::fs::write(dir.path().join("clusters/broken.json"), "{not json").unwrap();
        let (all, errors) = store.load_all();
        assert_eq!(all, vec![s]);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("broken.json"));
        store.remove("web").unwrap();
        store.remove("web").unwrap();
        assert!(store.load_all().0.is_empty());
    }
}
