//! One listing of the owner's instances per region, shared by every
//! cluster's reconcile, plus hangar's own writes the listing does not show
//! yet.
//!
//! Listing per cluster would cost one DescribeInstances per cluster per
//! pass — at 1,000 clusters that is far beyond EC2's request budget. So a
//! snapshot serves every reconcile for a short while.
//!
//! EC2's listing is eventually consistent: an instance launched a moment
//! ago, or a tag just written, may be missing from it for seconds. A fresh
//! listing must not undo what hangar itself did — an instance it launched
//! wrong task, a warm node it just started would read as `stopped` and be
//! replaced the moment it served. So hangar's own launches, starts,
//! phase/release/config writes and terminations are kept beside the snapshot, laid over every read, and
//! dropped once a listing confirms them or after [`OWN_WRITES_MAX_AGE`]
//! (after which the listing wins: a write that never shows was undone by
//! someone else, or never happened). A change made behind hangar's back
//! shows up at the next refresh.
//!
//! Each snapshot is indexed by cluster when it is taken, so a reconcile
//! picks its own instances out in O(its instances) rather than scanning
//! the whole region (at 1,000 clusters × 10,000 instances the scan alone
//! was ~20 M comparisons per pass).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hangar_cloud::{tags, CloudError, Compute, Instance, InstanceState, Phase};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::effects::node_task::InstanceView;

/// The snapshot keeps only hangar's own tags: nothing in the operator
/// reads the others, and instances often carry dozens of them (cost
/// centres, CloudFormation and Auto Scaling tags) — at 10,000 instances
/// they were a large share of the operator's memory.
const HANGAR_TAG_PREFIX: &str = "hangar:";

/// How long an own tag write is laid over listings that do not show it.
/// EC2's lag is seconds; minutes mean the write was undone behind
/// hangar's back.
pub const OWN_WRITES_MAX_AGE: Duration = Duration::from_secs(120);

/// How long an own launch is laid over listings that do not show it.
/// Shorter than for tags: the listing leaves out terminated instances, so
/// one terminated before it was ever listed would otherwise linger as
/// `pending` (its node task notices sooner, see `InstanceView::terminated`).
pub const OWN_LAUNCH_MAX_AGE: Duration = Duration::from_secs(30);

/// How long an own start is laid over listings that still show the
/// instance stopped. As short as for launches: a start EC2 could not
/// honour (no capacity) puts the instance back to `stopped`, and that
/// must show.
pub const OWN_START_MAX_AGE: Duration = OWN_LAUNCH_MAX_AGE;

#[derive(Default)]
struct Snapshot {
    taken: Option<Instant>,
    instances: Arc<Vec<Instance>>,
    /// Cluster name → positions in `instances`.
    by_cluster: HashMap<String, Vec<usize>>,
}

impl Snapshot {
    fn replace(&mut self, instances: Vec<Instance>) {
        let mut by_cluster: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, inst) in instances.iter().enumerate() {
            match by_cluster.get_mut(inst.cluster.as_str()) {
                Some(v) => v.push(i),
                None => {
                    by_cluster.insert(inst.cluster.clone(), vec![i]);
                }
            }
        }
        self.by_cluster = by_cluster;
        self.instances = Arc::new(instances);
    }
}

/// hangar's own writes to one instance, newest values.
#[derive(Clone, Debug, Default)]
struct TagWrite {
    phase: Option<Phase>,
    release: Option<String>,
    config: Option<String>,
}

#[derive(Default)]
struct OwnWrites {
    /// Launched instances (as RunInstances answered), by id.
    launched: HashMap<String, (Instance, Instant)>,
    tags: HashMap<String, (TagWrite, Instant)>,
    /// Started (warm) instances, until a listing shows them pending or running.
    started: HashMap<String, Instant>,
    terminated: HashMap<String, Instant>,
}

impl OwnWrites {
    /// Forgets what `listing` confirms and what is too old to keep.
    fn confirm(&mut self, listing: &[Instance], now: Instant) {
        let young = |at: &Instant| now.duration_since(*at) < OWN_WRITES_MAX_AGE;
        let by_id: HashMap<&str, &Instance> = listing.iter().map(|i| (i.id.as_str(), i)).collect();
        self.launched.retain(|id, (_, at)| {
            now.duration_since(*at) < OWN_LAUNCH_MAX_AGE && !by_id.contains_key(id.as_str())
        });
        self.tags
            .retain(|id, (w, at)| young(at) && by_id.get(id.as_str()).is_none_or(|i| !shows(i, w)));
        self.started.retain(|id, at| {
            now.duration_since(*at) < OWN_START_MAX_AGE
                && by_id.get(id.as_str()).is_none_or(|i| {
                    !matches!(i.state, InstanceState::Pending | InstanceState::Running)
                })
        });
        let launched = &self.launched;
        self.terminated.retain(|id, at| {
            young(at)
                && match by_id.get(id.as_str()) {
                    Some(i) => matches!(i.state, InstanceState::Pending | InstanceState::Running),
                    // Launched and terminated before any listing showed it.
                    None => launched.contains_key(id),
                }
        });
    }

    /// `instance` as hangar last made it.
    fn apply(&self, instance: &mut Instance) {
        if let Some((w, _)) = self.tags.get(&instance.id) {
            if let Some(p) = w.phase {
                instance.phase = Some(p);
                instance.tags.insert(tags::PHASE.into(), p.to_string());
            }
            if let Some(r) = &w.release {
                instance.release = Some(r.clone());
                instance.tags.insert(tags::RELEASE.into(), r.clone());
            }
            if let Some(c) = &w.config {
                instance.tags.insert(tags::CONFIG.into(), c.clone());
            }
        }
        if self.started.contains_key(&instance.id)
            && matches!(
                instance.state,
                InstanceState::Stopping | InstanceState::Stopped
            )
        {
            instance.state = InstanceState::Pending;
            // A start assigns a new public IP; the stopped entry's may be
            // someone else's by now (see `core::reachability`).
            instance.public_ip = None;
        }
        if self.terminated.contains_key(&instance.id)
            && matches!(
                instance.state,
                InstanceState::Pending | InstanceState::Running
            )
        {
            instance.state = InstanceState::ShuttingDown;
        }
    }
}

/// Whether a listed instance already carries every value of `w`.
fn shows(i: &Instance, w: &TagWrite) -> bool {
    w.phase.is_none_or(|p| i.phase == Some(p))
        && w.release
            .as_ref()
            .is_none_or(|r| i.release.as_ref() == Some(r))
        && w.config
            .as_ref()
            .is_none_or(|c| i.tags.get(tags::CONFIG) == Some(c))
}

#[derive(Default)]
struct Region {
    snapshot: Mutex<Snapshot>,
    own: std::sync::Mutex<OwnWrites>,
}

impl Region {
    fn own(&self) -> std::sync::MutexGuard<'_, OwnWrites> {
        self.own.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Per-region snapshots and own writes; cheap to clone.
#[derive(Clone)]
pub struct Inventory {
    max_age: Duration,
    regions: Arc<std::sync::Mutex<HashMap<String, Arc<Region>>>>,
}

impl Inventory {
    pub fn new(max_age: Duration) -> Inventory {
        Inventory {
            max_age,
            regions: Arc::default(),
        }
    }

    fn region(&self, region: &str) -> Arc<Region> {
        let mut map = self.regions.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(region.to_string()).or_default().clone()
    }

    /// The region's instances, refreshed if older than the maximum age,
    /// with hangar's own writes laid over them. Concurrent callers wait
    /// for one refresh instead of each listing.
    pub async fn instances(
        &self,
        region: &str,
        compute: &dyn Compute,
    ) -> Result<Vec<Instance>, CloudError> {
        let slot = self.region(region);
        let mut snap = slot.snapshot.lock().await;
        self.refresh_if_stale(&slot, &mut snap, compute).await?;
        let own = slot.own();
        let mut out: Vec<Instance> = snap.instances.iter().cloned().collect();
        out.iter_mut().for_each(|i| own.apply(i));
        out.extend(own.launched.values().map(|(i, _)| {
            let mut i = i.clone();
            own.apply(&mut i);
            i
        }));
        Ok(out)
    }

    /// One cluster's instances from the region's snapshot (refreshed like
    /// [`Inventory::instances`]), in listing order, then its own launches
    /// the listing does not show yet.
    pub async fn cluster_instances(
        &self,
        region: &str,
        compute: &dyn Compute,
        cluster: &str,
    ) -> Result<Vec<Instance>, CloudError> {
        Ok(self.cluster_listing(region, compute, cluster).await?.0)
    }

    /// [`Inventory::cluster_instances`], and the ids among them known only
    /// from hangar's own launch answers.
    pub async fn cluster_listing(
        &self,
        region: &str,
        compute: &dyn Compute,
        cluster: &str,
    ) -> Result<(Vec<Instance>, BTreeSet<String>), CloudError> {
        let slot = self.region(region);
        let mut snap = slot.snapshot.lock().await;
        self.refresh_if_stale(&slot, &mut snap, compute).await?;
        let own = slot.own();
        let mut out: Vec<Instance> = snap
            .by_cluster
            .get(cluster)
            .map(|idx| idx.iter().map(|&i| snap.instances[i].clone()).collect())
            .unwrap_or_default();
        out.iter_mut().for_each(|i| own.apply(i));
        let mut launched: Vec<&Instance> = own
            .launched
            .values()
            .map(|(i, _)| i)
            .filter(|i| i.cluster == cluster)
            .collect();
        launched.sort_by(|a, b| a.id.cmp(&b.id));
        let unlisted = launched.iter().map(|i| i.id.clone()).collect();
        out.extend(launched.into_iter().map(|i| {
            let mut i = i.clone();
            own.apply(&mut i);
            i
        }));
        Ok((out, unlisted))
    }

    async fn refresh_if_stale(
        &self,
        region: &Region,
        snap: &mut Snapshot,
        compute: &dyn Compute,
    ) -> Result<(), CloudError> {
        let fresh = snap.taken.is_some_and(|t| t.elapsed() <= self.max_age);
        if !fresh {
            // Let go of the stale copy first: two copies of a 10,000-instance
            // region at once were the memory peak of a pass. (Nobody else
            // can look meanwhile: the region's lock is held.)
            snap.taken = None;
            snap.replace(Vec::new());
            let mut listed = compute.list(None).await?;
            for i in &mut listed {
                i.tags.retain(|k, _| k.starts_with(HANGAR_TAG_PREFIX));
            }
            listed.shrink_to_fit();
            region.own().confirm(&listed, Instant::now());
            snap.replace(listed);
            snap.taken = Some(Instant::now());
        }
        Ok(())
    }

    /// Forces the next read of `region` to list.
    pub async fn invalidate(&self, region: &str) {
        self.region(region).snapshot.lock().await.taken = None;
    }

    pub fn launched(&self, region: &str, new: Vec<Instance>) {
        let slot = self.region(region);
        let mut own = slot.own();
        let now = Instant::now();
        for mut i in new {
            i.tags.retain(|k, _| k.starts_with(HANGAR_TAG_PREFIX));
            own.launched.insert(i.id.clone(), (i, now));
        }
    }

    pub fn set_phase(
        &self,
        region: &str,
        id: &str,
        phase: Phase,
        release: Option<&str>,
        config: Option<&str>,
    ) {
        let slot = self.region(region);
        let mut own = slot.own();
        let entry = own
            .tags
            .entry(id.to_string())
            .or_insert_with(|| (TagWrite::default(), Instant::now()));
        entry.0.phase = Some(phase);
        if let Some(r) = release {
            entry.0.release = Some(r.to_string());
        }
        if let Some(c) = config {
            entry.0.config = Some(c.to_string());
        }
        entry.1 = Instant::now();
    }

    /// hangar started `id` (a warm node): until a listing shows it pending
    /// or running, a `stopped` in the snapshot is the time before the start.
    pub fn started(&self, region: &str, id: &str) {
        self.region(region)
            .own()
            .started
            .insert(id.to_string(), Instant::now());
    }

    /// hangar is stopping `id`: a start it made earlier no longer holds.
    pub fn stopping(&self, region: &str, id: &str) {
        self.region(region).own().started.remove(id);
    }

    pub fn terminated(&self, region: &str, id: &str) {
        self.region(region)
            .own()
            .terminated
            .insert(id.to_string(), Instant::now());
    }

    /// A node task's view of its cluster in `region`.
    pub fn view(&self, region: &str, compute: Arc<dyn Compute>, cluster: &str) -> ClusterView {
        ClusterView {
            inventory: self.clone(),
            region: region.to_string(),
            compute,
            cluster: cluster.to_string(),
        }
    }
}

/// [`InstanceView`] for node tasks: reads through the shared inventory
/// (never a listing of its own) and records the task's writes there.
pub struct ClusterView {
    inventory: Inventory,
    region: String,
    compute: Arc<dyn Compute>,
    cluster: String,
}

#[async_trait]
impl InstanceView for ClusterView {
    async fn get(&self, id: &str) -> Result<Option<Instance>, CloudError> {
        let list = self
            .inventory
            .cluster_instances(&self.region, self.compute.as_ref(), &self.cluster)
            .await?;
        Ok(list.into_iter().find(|i| i.id == id))
    }

    fn wrote_phase(&self, id: &str, phase: Phase, release: Option<&str>, config: Option<&str>) {
        self.inventory
            .set_phase(&self.region, id, phase, release, config);
    }

    fn started(&self, id: &str) {
        self.inventory.started(&self.region, id);
    }

    fn stopping(&self, id: &str) {
        self.inventory.stopping(&self.region, id);
    }

    fn terminated(&self, id: &str) {
        self.inventory.terminated(&self.region, id);
    }
}

#[cfg(test)]
mod tests;
