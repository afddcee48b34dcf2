//! What hangar knows and did, per cluster: for people (`hangar status`),
//! for machines (`/api/v1/clusters`, `--output json`) and for hangar itself
//! after a restart (scaling history, rollout memory, the last applied spec).
//!
//! The cloud stays the source of truth for nodes; this is the memory of
//! *decisions*, persisted under the state directory with atomic renames.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use hangar_cloud::{Instance, InstanceState, Phase};
use hangar_crds::{ClusterSpec, DeletionPolicy};
use serde::{Deserialize, Serialize};

use std::sync::Arc;

use crate::core::conditions::{self, FleetView};
use crate::core::fleet::Task;

pub use crate::core::conditions::ConditionType;
pub use crate::core::decide::Activity;
pub use crate::core::memory::{DecisionRecord, Memory};
pub use crate::core::rollout::{KnownRelease, ReleaseStatus};

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
    /// The decisions' memory, flattened so the file and the API show its
    /// fields (`desired`, `release`, …) at the top level.
    #[serde(flatten)]
    pub memory: Memory,
    /// Node count by phase (`in-service`, `draining`, …).
    pub phases: BTreeMap<String, u32>,
    pub nodes: Vec<NodeStatus>,
    pub conditions: Vec<Condition>,
    pub activities: VecDeque<Activity>,
    /// The last spec applied, so a deleted spec's deletion policy is known.
    pub spec: Option<Arc<ClusterSpec>>,
    /// The spec is gone from the spec directory.
    pub spec_removed: bool,
    /// The commit of the git source the spec was last applied from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<crate::effects::git::CommitInfo>,
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
        self.activities
            .push_front(Activity::new(at, kind, node, message));
        self.activities.truncate(MAX_ACTIVITIES);
    }

    /// Shows the fleet as it is after a pass: its nodes, the count per
    /// phase and the conditions. Memory about nodes that are gone is
    /// dropped here.
    pub fn show_fleet(
        &mut self,
        instances: &[Instance],
        running: &HashMap<String, Task>,
        notes: &[String],
        now: DateTime<Utc>,
    ) {
        self.updated_at = Some(now);
        let live: Vec<&Instance> = instances
            .iter()
            .filter(|i| !matches!(i.state, InstanceState::Terminated))
            .collect();
        let alive = |id: &String| live.iter().any(|i| i.id == *id);
        let m = &mut self.memory;
        m.failed_nodes.retain(|id, _| alive(id));
        m.leaving.retain(|id, _| alive(id));
        m.node_errors.retain(|id, _| alive(id));
        m.node_retries.retain(|id, _| alive(id));
        m.retry_after.retain(|id, _| alive(id));
        m.listed_stopped.retain(|id, _| alive(id));
        m.missing_from_group.retain(|id, _| alive(id));
        let mut phases: BTreeMap<String, u32> = BTreeMap::new();
        for i in &live {
            *phases.entry(phase_label(i)).or_default() += 1;
        }
        self.phases = phases;
        self.nodes = live
            .iter()
            .map(|i| NodeStatus {
                id: i.id.clone(),
                phase: phase_label(i),
                state: format!("{:?}", i.state).to_lowercase(),
                release: i.release.clone(),
                address: i.private_ip.map(|ip| ip.to_string()),
                subnet: i.subnet_id.clone(),
                task: running.get(&i.id).map(|t| t.name().to_string()),
                protected: i.protected,
                launched_at: i.launched_at,
                last_error: self.memory.node_errors.get(&i.id).cloned(),
            })
            .collect();
        let fleet = FleetView {
            in_service: self.phases.get("in-service").copied().unwrap_or(0),
            busy: !running.is_empty(),
            notes,
        };
        for v in conditions::verdicts(&self.memory, &fleet) {
            self.set_condition(v.kind, v.status, v.reason, v.message, now);
        }
    }

    /// The spec file is still there but does not load: whatever its
    /// deletion policy, its nodes keep serving exactly as they are.
    pub fn hold_broken_spec(&mut self, problem: &str, now: DateTime<Utc>) {
        let already = self
            .condition(ConditionType::Degraded)
            .is_some_and(|c| c.status && c.reason == "SpecInvalid");
        if !already {
            self.record(
                now,
                "spec",
                None,
                format!("spec does not load; holding every node as it is: {problem}"),
            );
            tracing::warn!(cluster = %self.name, %problem, "spec does not load; holding every node as it is");
        }
        self.set_condition(ConditionType::Degraded, true, "SpecInvalid", problem, now);
        self.set_condition(ConditionType::Progressing, false, "SpecInvalid", "", now);
    }

    /// The spec is gone from the spec directory; with `retain` the nodes
    /// keep running, unmanaged.
    pub fn mark_spec_removed(&mut self, now: DateTime<Utc>) {
        let Some(policy) = self.spec.as_ref().map(|s| s.deletion_policy) else {
            return;
        };
        if !self.spec_removed {
            self.spec_removed = true;
            let what = match policy {
                DeletionPolicy::Retain => "deletionPolicy retain: nodes keep running, unmanaged",
                DeletionPolicy::Delete => {
                    "deletionPolicy delete: draining and terminating every node"
                }
            };
            self.record(now, "spec", None, format!("spec removed; {what}"));
            tracing::warn!(cluster = %self.name, "spec removed; {what}");
        }
        if policy == DeletionPolicy::Retain {
            self.set_condition(
                ConditionType::Ready,
                false,
                "SpecRemoved",
                "spec removed; nodes retained, unmanaged",
                now,
            );
            self.set_condition(ConditionType::Progressing, false, "SpecRemoved", "", now);
        }
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
            memory,
            phases,
            nodes,
            conditions,
            activities,
            spec,
            spec_removed,
            commit,
        } = self;
        memory.same_besides(&other.memory, ignore_readings)
            && *name == other.name
            && *file == other.file
            && *region == other.region
            && *observed_spec_hash == other.observed_spec_hash
            && *phases == other.phases
            && *nodes == other.nodes
            && *conditions == other.conditions
            && *activities == other.activities
            && *spec_removed == other.spec_removed
            && *spec == other.spec
            && *commit == other.commit
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
            memory,
            phases,
            nodes,
            conditions,
            activities,
            spec: _,
            spec_removed,
            commit,
        } = self;
        ClusterStatus {
            name: name.clone(),
            file: file.clone(),
            region: region.clone(),
            observed_spec_hash: observed_spec_hash.clone(),
            updated_at: *updated_at,
            memory: memory.public(),
            phases: phases.clone(),
            nodes: nodes.clone(),
            conditions: conditions.clone(),
            activities: activities.clone(),
            spec: None,
            spec_removed: *spec_removed,
            commit: commit.clone(),
        }
    }
}

fn phase_label(i: &Instance) -> String {
    match i.state {
        // A warm-pool node is stopped on purpose: it counts as `warm`.
        InstanceState::Stopped | InstanceState::Stopping if i.phase != Some(Phase::Warm) => {
            "stopped".into()
        }
        InstanceState::ShuttingDown => "terminating".into(),
        _ => i.phase.unwrap_or(Phase::Launching).to_string(),
    }
}

/// Statuses on disk: `<state>/clusters/<name>.json`; with a distributed
/// lease also in a store every operator of the owner id reads
/// ([`SharedStatuses`]), the local files then being a cache.
#[derive(Clone, Debug)]
pub struct StatusStore {
    dir: PathBuf,
    read_only: bool,
    shared: Option<Shared>,
}

/// Where the leader also writes each status, so that whoever leads next
/// neither scales down early nor retries a halted release. Only the leader
/// of the current term can write there (the writes are fenced).
pub trait SharedStatuses: Send + Sync {
    /// Stores `status` before returning; `Err` when it was not stored
    /// (then nothing may rely on it: a launch whose intent is not stored
    /// is not made).
    fn save(&self, status: &ClusterStatus) -> Result<(), String>;
    fn remove(&self, name: &str) -> Result<(), String>;
}

#[derive(Clone)]
struct Shared {
    store: Arc<dyn SharedStatuses>,
    /// What the shared store held when this term began.
    loaded: Arc<Vec<ClusterStatus>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("loaded", &self.loaded.len())
            .finish()
    }
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
    #[error("shared status of {name}: {message}")]
    Shared { name: String, message: String },
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
            shared: None,
        })
    }

    /// Writes go to `store` too, and statuses are loaded from what it held
    /// when the term began (`loaded`); only when it held nothing yet (the
    /// first start with a distributed lease) from the local files.
    pub fn with_shared(
        mut self,
        store: Arc<dyn SharedStatuses>,
        loaded: Vec<ClusterStatus>,
    ) -> Self {
        self.shared = Some(Shared {
            store,
            loaded: Arc::new(loaded),
        });
        self
    }

    /// A store that can be read but is never written (for `hangar plan`,
    /// which may run beside the operator that owns the state directory).
    pub fn read_only(state_dir: &Path) -> StatusStore {
        StatusStore {
            dir: state_dir.join("clusters"),
            read_only: true,
            shared: None,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// Every stored status. A corrupt file is reported and skipped: it
    /// costs history, not nodes (the cloud is the truth).
    pub fn load_all(&self) -> (Vec<ClusterStatus>, Vec<StoreError>) {
        if let Some(shared) = self.shared.as_ref().filter(|s| !s.loaded.is_empty()) {
            return (shared.loaded.as_ref().clone(), Vec::new());
        }
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

    /// Writes atomically: a crash leaves the old or the new file, never
    /// half; then to the shared store, if any. An error from either is an
    /// error (the shared store's first).
    pub fn save(&self, status: &ClusterStatus) -> Result<(), StoreError> {
        if self.read_only {
            return Ok(());
        }
        let local = self.save_local(status);
        if let Some(shared) = &self.shared {
            shared
                .store
                .save(status)
                .map_err(|message| StoreError::Shared {
                    name: status.name.clone(),
                    message,
                })?;
        }
        local
    }

    fn save_local(&self, status: &ClusterStatus) -> Result<(), StoreError> {
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
        if let Some(shared) = &self.shared {
            shared
                .store
                .remove(name)
                .map_err(|message| StoreError::Shared {
                    name: name.to_string(),
                    message,
                })?;
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
    use crate::core::planner::Reading;

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
        a.memory.desired = 3;
        a.memory.last_decision = Some(DecisionRecord {
            at: t0,
            desired: 3,
            reason: "rate 2900/min".into(),
        });
        let mut b = a.clone();
        b.updated_at = Some(t1);
        b.memory.last_eval_at = Some(t1);
        assert!(a.same_content(&b), "the time of the look is never content");
        b.memory.last_metric = Some(Reading {
            requests_per_minute: 3100.0,
            observed_at: t1,
        });
        b.memory.last_decision = Some(DecisionRecord {
            at: t1,
            desired: 3,
            reason: "rate 3100/min".into(),
        });
        assert!(!a.same_content(&b));
        assert!(a.same_decisions(&b), "a new reading alone");
        b.memory.last_decision = Some(DecisionRecord {
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
        s.memory.desired = 3;
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

    #[derive(Default)]
    struct Recorder {
        saved: std::sync::Mutex<Vec<String>>,
        refuse: bool,
    }

    impl SharedStatuses for Recorder {
        fn save(&self, status: &ClusterStatus) -> Result<(), String> {
            if self.refuse {
                return Err("fenced out".into());
            }
            self.saved.lock().unwrap().push(status.name.clone());
            Ok(())
        }
        fn remove(&self, _name: &str) -> Result<(), String> {
            Ok(())
        }
    }

    #[test]
    fn a_shared_store_is_written_too_and_wins_over_the_local_cache() {
        let dir = tempfile::tempdir().unwrap();
        let mut local = ClusterStatus::new("web");
        local.memory.desired = 2;
        StatusStore::open(dir.path()).unwrap().save(&local).unwrap();
        let mut remote = ClusterStatus::new("web");
        remote.memory.desired = 5;
        let rec = Arc::new(Recorder::default());
        let store = StatusStore::open(dir.path())
            .unwrap()
            .with_shared(rec.clone(), vec![remote.clone()]);
        assert_eq!(
            store.load_all().0,
            vec![remote.clone()],
            "the shared copy wins"
        );
        store.save(&remote).unwrap();
        assert_eq!(*rec.saved.lock().unwrap(), vec!["web".to_string()]);
        // Nothing shared yet (first start with a distributed lease): the cache.
        let store = StatusStore::open(dir.path())
            .unwrap()
            .with_shared(rec.clone(), Vec::new());
        assert_eq!(
            store.load_all().0[0].memory.desired,
            5,
            "the cache, as last written"
        );
        // A refused shared write is an error, though the cache was written.
        let refusing = Arc::new(Recorder {
            refuse: true,
            ..Recorder::default()
        });
        let store = StatusStore::open(dir.path())
            .unwrap()
            .with_shared(refusing, Vec::new());
        let err = store.save(&local).unwrap_err();
        assert!(err.to_string().contains("fenced out"), "{err}");
    }
}
