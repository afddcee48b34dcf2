//! One listing of the owner's instances per region, shared by every
//! cluster's reconcile.
//!
//! Listing per cluster would cost one DescribeInstances per cluster per
//! pass — at 1,000 clusters that is far beyond EC2's request budget. So a
//! snapshot serves every reconcile for a short while; hangar's own changes
//! (launches, phase tags, terminations) are written through to it, and a
//! change made behind hangar's back shows up at the next refresh.
//!
//! Each snapshot is indexed by cluster when it is taken or edited, so a
//! reconcile picks its own instances out in O(its instances) rather than
//! scanning the whole region (at 1,000 clusters × 10,000 instances the
//! scan alone was ~20 M comparisons per pass).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hangar_cloud::{CloudError, Compute, Instance, InstanceState, Phase};
use tokio::sync::Mutex;
use tokio::time::Instant;

/// The snapshot keeps only hangar's own tags: nothing in the operator
/// reads the others, and instances often carry dozens of them (cost
/// centres, CloudFormation and Auto Scaling tags) — at 10,000 instances
/// they were a large share of the operator's memory.
const HANGAR_TAG_PREFIX: &str = "hangar:";

#[derive(Default)]
struct Snapshot {
    taken: Option<Instant>,
    instances: Arc<Vec<Instance>>,
    /// Cluster name → positions in `instances`, kept in step with it.
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

/// Per-region snapshots; cheap to clone.
#[derive(Clone)]
pub struct Inventory {
    max_age: Duration,
    regions: Arc<std::sync::Mutex<HashMap<String, Arc<Mutex<Snapshot>>>>>,
}

impl Inventory {
    pub fn new(max_age: Duration) -> Inventory {
        Inventory {
            max_age,
            regions: Arc::default(),
        }
    }

    fn region(&self, region: &str) -> Arc<Mutex<Snapshot>> {
        let mut map = self.regions.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(region.to_string()).or_default().clone()
    }

    /// The region's instances, refreshed if older than the maximum age.
    /// Concurrent callers wait for one refresh instead of each listing.
    pub async fn instances(
        &self,
        region: &str,
        compute: &dyn Compute,
    ) -> Result<Arc<Vec<Instance>>, CloudError> {
        let slot = self.region(region);
        let mut snap = slot.lock().await;
        self.refresh_if_stale(&mut snap, compute).await?;
        Ok(snap.instances.clone())
    }

    /// One cluster's instances from the region's snapshot (refreshed like
    /// [`Inventory::instances`]), in listing order.
    pub async fn cluster_instances(
        &self,
        region: &str,
        compute: &dyn Compute,
        cluster: &str,
    ) -> Result<Vec<Instance>, CloudError> {
        let slot = self.region(region);
        let mut snap = slot.lock().await;
        self.refresh_if_stale(&mut snap, compute).await?;
        Ok(snap
            .by_cluster
            .get(cluster)
            .map(|idx| idx.iter().map(|&i| snap.instances[i].clone()).collect())
            .unwrap_or_default())
    }

    async fn refresh_if_stale(
        &self,
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
            snap.replace(listed);
            snap.taken = Some(Instant::now());
        }
        Ok(())
    }

    /// Forces the next [`Inventory::instances`] call for `region` to list.
    pub async fn invalidate(&self, region: &str) {
        self.region(region).lock().await.taken = None;
    }

    async fn edit(&self, region: &str, f: impl FnOnce(&mut Vec<Instance>)) {
        let slot = self.region(region);
        let mut snap = slot.lock().await;
        let mut list = (*snap.instances).clone();
        f(&mut list);
        snap.replace(list);
    }

    pub async fn launched(&self, region: &str, new: Vec<Instance>) {
        self.edit(region, |list| {
            for i in new {
                if !list.iter().any(|x| x.id == i.id) {
                    list.push(i);
                }
            }
        })
        .await;
    }

    pub async fn set_phase(
        &self,
        region: &str,
        id: &str,
        phase: Phase,
        release: Option<&str>,
        config: Option<&str>,
    ) {
        self.edit(region, |list| {
            if let Some(i) = list.iter_mut().find(|i| i.id == id) {
                i.phase = Some(phase);
                i.tags
                    .insert(hangar_cloud::tags::PHASE.into(), phase.to_string());
                if let Some(r) = release {
                    i.release = Some(r.to_string());
                    i.tags
                        .insert(hangar_cloud::tags::RELEASE.into(), r.to_string());
                }
                if let Some(c) = config {
                    i.tags
                        .insert(hangar_cloud::tags::CONFIG.into(), c.to_string());
                }
            }
        })
        .await;
    }

    pub async fn terminated(&self, region: &str, id: &str) {
        self.edit(region, |list| {
            if let Some(i) = list.iter_mut().find(|i| i.id == id) {
                i.state = InstanceState::ShuttingDown;
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU32, Ordering};

    use async_trait::async_trait;
    use hangar_cloud::LaunchRequest;

    use super::*;

    struct Counting(AtomicU32);

    fn instance(id: &str) -> Instance {
        Instance {
            id: id.into(),
            cluster: "web".into(),
            phase: Some(Phase::Launching),
            release: Some("v1".into()),
            state: InstanceState::Running,
            private_ip: None,
            public_ip: None,
            subnet_id: None,
            availability_zone: None,
            launched_at: None,
            protected: false,
            tags: BTreeMap::new(),
        }
    }

    #[async_trait]
    impl Compute for Counting {
        fn owner(&self) -> &str {
            "test"
        }
        async fn launch(&self, _: &LaunchRequest) -> Result<Vec<Instance>, CloudError> {
            unreachable!()
        }
        async fn list(&self, _: Option<&str>) -> Result<Vec<Instance>, CloudError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(vec![instance("i-1")])
        }
        async fn set_phase(&self, _: &str, _: Phase, _: Option<&str>) -> Result<(), CloudError> {
            unreachable!()
        }
        async fn set_config(&self, _: &str, _: &str) -> Result<(), CloudError> {
            unreachable!()
        }
        async fn terminate(&self, _: &[String]) -> Result<(), CloudError> {
            unreachable!()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_reconciles_share_one_listing_until_it_ages() {
        let compute = Arc::new(Counting(AtomicU32::new(0)));
        let inv = Inventory::new(Duration::from_secs(5));
        let calls: Vec<_> = (0..20)
            .map(|_| {
                let (inv, c) = (inv.clone(), compute.clone());
                tokio::spawn(
                    async move { inv.instances("eu-west-1", c.as_ref()).await.unwrap().len() },
                )
            })
            .collect();
        for c in calls {
            assert_eq!(c.await.unwrap(), 1);
        }
        assert_eq!(compute.0.load(Ordering::SeqCst), 1);
        tokio::time::advance(Duration::from_secs(6)).await;
        inv.instances("eu-west-1", compute.as_ref()).await.unwrap();
        assert_eq!(compute.0.load(Ordering::SeqCst), 2);
        // Another region lists on its own.
        inv.instances("us-east-1", compute.as_ref()).await.unwrap();
        assert_eq!(compute.0.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn own_changes_are_written_through() {
        let compute = Counting(AtomicU32::new(0));
        let inv = Inventory::new(Duration::from_secs(60));
        inv.instances("r", &compute).await.unwrap();
        inv.launched("r", vec![instance("i-2")]).await;
        inv.set_phase("r", "i-1", Phase::InService, Some("v2"), Some("cfg"))
            .await;
        inv.terminated("r", "i-2").await;
        let list = inv.instances("r", &compute).await.unwrap();
        assert_eq!(
            compute.0.load(Ordering::SeqCst),
            1,
            "served from the snapshot"
        );
        let i1 = list.iter().find(|i| i.id == "i-1").unwrap();
        assert_eq!(
            (i1.phase, i1.release.as_deref()),
            (Some(Phase::InService), Some("v2"))
        );
        assert_eq!(
            i1.tags.get(hangar_cloud::tags::CONFIG).map(String::as_str),
            Some("cfg")
        );
        assert_eq!(
            list.iter().find(|i| i.id == "i-2").unwrap().state,
            InstanceState::ShuttingDown
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_cluster_sees_only_its_instances_and_the_index_follows_edits() {
        let compute = Counting(AtomicU32::new(0));
        let inv = Inventory::new(Duration::from_secs(60));
        let ids = |list: Vec<Instance>| list.into_iter().map(|i| i.id).collect::<Vec<_>>();
        let web = inv.cluster_instances("r", &compute, "web").await.unwrap();
        assert_eq!(ids(web), ["i-1"]);
        let mut api = instance("i-2");
        api.cluster = "api".into();
        inv.launched("r", vec![api, instance("i-3")]).await;
        let web = inv.cluster_instances("r", &compute, "web").await.unwrap();
        assert_eq!(ids(web), ["i-1", "i-3"]);
        let api = inv.cluster_instances("r", &compute, "api").await.unwrap();
        assert_eq!(ids(api), ["i-2"]);
        let none = inv.cluster_instances("r", &compute, "nope").await.unwrap();
        assert!(none.is_empty());
        inv.set_phase("r", "i-3", Phase::InService, None, None)
            .await;
        let web = inv.cluster_instances("r", &compute, "web").await.unwrap();
        assert_eq!(web[1].phase, Some(Phase::InService));
        assert_eq!(
            compute.0.load(Ordering::SeqCst),
            1,
            "one listing served all"
        );
    }
}
