use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};

use async_trait::async_trait;
use hangar_cloud::LaunchRequest;

use super::*;

/// A compute whose listing is whatever the test put there last, counted.
#[derive(Default)]
struct Listing {
    calls: AtomicU32,
    shows: std::sync::Mutex<Vec<Instance>>,
}

impl Listing {
    fn with(instances: Vec<Instance>) -> Listing {
        let l = Listing::default();
        l.show(instances);
        l
    }

    fn show(&self, instances: Vec<Instance>) {
        *self.shows.lock().unwrap() = instances;
    }

    fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }
}

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
        client_token: None,
        tags: BTreeMap::new(),
    }
}

fn with_phase(id: &str, phase: Phase) -> Instance {
    let mut i = instance(id);
    i.phase = Some(phase);
    i.tags.insert(tags::PHASE.into(), phase.to_string());
    i
}

#[async_trait]
impl Compute for Listing {
    fn owner(&self) -> &str {
        "test"
    }
    async fn launch(&self, _: &LaunchRequest) -> Result<Vec<Instance>, CloudError> {
        unreachable!()
    }
    async fn list(&self, _: Option<&str>) -> Result<Vec<Instance>, CloudError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(self.shows.lock().unwrap().clone())
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

fn ids(list: &[Instance]) -> Vec<&str> {
    list.iter().map(|i| i.id.as_str()).collect()
}

#[tokio::test(start_paused = true)]
async fn concurrent_reconciles_share_one_listing_until_it_ages() {
    let compute = Arc::new(Listing::with(vec![instance("i-1")]));
    let inv = Inventory::new(Duration::from_secs(5));
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let (inv, c) = (inv.clone(), compute.clone());
            tokio::spawn(async move { inv.instances("eu-west-1", c.as_ref()).await.unwrap().len() })
        })
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap(), 1);
    }
    assert_eq!(compute.calls(), 1);
    tokio::time::advance(Duration::from_secs(6)).await;
    inv.instances("eu-west-1", compute.as_ref()).await.unwrap();
    assert_eq!(compute.calls(), 2);
    // Another region lists on its own.
    inv.instances("us-east-1", compute.as_ref()).await.unwrap();
    assert_eq!(compute.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn own_changes_are_seen_before_the_listing_shows_them() {
    let compute = Listing::with(vec![instance("i-1")]);
    let inv = Inventory::new(Duration::from_secs(60));
    inv.instances("r", &compute).await.unwrap();
    inv.launched("r", vec![instance("i-2")]);
    inv.set_phase("r", "i-1", Phase::InService, Some("v2"), Some("cfg"));
    inv.terminated("r", "i-2");
    let list = inv.instances("r", &compute).await.unwrap();
    assert_eq!(compute.calls(), 1, "served from the snapshot");
    let i1 = list.iter().find(|i| i.id == "i-1").unwrap();
    assert_eq!(
        (i1.phase, i1.release.as_deref()),
        (Some(Phase::InService), Some("v2"))
    );
    assert_eq!(i1.tags.get(tags::CONFIG).map(String::as_str), Some("cfg"));
    assert_eq!(
        list.iter().find(|i| i.id == "i-2").unwrap().state,
        InstanceState::ShuttingDown
    );
}

#[tokio::test(start_paused = true)]
async fn a_launch_survives_a_refresh_that_does_not_show_it_yet() {
    let compute = Listing::with(vec![instance("i-1")]);
    let inv = Inventory::new(Duration::from_secs(1));
    inv.launched("r", vec![instance("i-2")]);
    // The listing lags: i-2 exists but is not listed.
    tokio::time::advance(Duration::from_secs(2)).await;
    let web = inv.cluster_instances("r", &compute, "web").await.unwrap();
    assert_eq!(
        ids(&web),
        ["i-1", "i-2"],
        "a refresh must not lose a launch"
    );
    // Once listed it is the listing's, and only once.
    compute.show(vec![instance("i-1"), instance("i-2")]);
    tokio::time::advance(Duration::from_secs(2)).await;
    let web = inv.cluster_instances("r", &compute, "web").await.unwrap();
    assert_eq!(ids(&web), ["i-1", "i-2"]);
}

#[tokio::test(start_paused = true)]
async fn a_stale_phase_tag_never_overrides_hangars_own_write() {
    let compute = Listing::with(vec![with_phase("i-1", Phase::InService)]);
    let inv = Inventory::new(Duration::from_secs(1));
    inv.instances("r", &compute).await.unwrap();
    inv.set_phase("r", "i-1", Phase::Draining, None, None);
    tokio::time::advance(Duration::from_secs(2)).await;
    let web = inv.cluster_instances("r", &compute, "web").await.unwrap();
    assert_eq!(
        web[0].phase,
        Some(Phase::Draining),
        "listing still says in-service"
    );
    // Confirmed, then forgotten: a later change by someone else shows.
    compute.show(vec![with_phase("i-1", Phase::Draining)]);
    tokio::time::advance(Duration::from_secs(2)).await;
    inv.instances("r", &compute).await.unwrap();
    compute.show(vec![with_phase("i-1", Phase::InService)]);
    tokio::time::advance(Duration::from_secs(2)).await;
    let web = inv.cluster_instances("r", &compute, "web").await.unwrap();
    assert_eq!(web[0].phase, Some(Phase::InService));
}

#[tokio::test(start_paused = true)]
async fn own_writes_that_never_show_give_way_to_the_listing() {
    let compute = Listing::with(vec![with_phase("i-1", Phase::InService)]);
    let inv = Inventory::new(Duration::from_secs(1));
    inv.launched("r", vec![instance("i-9")]);
    inv.set_phase("r", "i-1", Phase::Draining, None, None);
    tokio::time::advance(OWN_WRITES_MAX_AGE + Duration::from_secs(1)).await;
    let web = inv.cluster_instances("r", &compute, "web").await.unwrap();
    assert_eq!(ids(&web), ["i-1"]);
    assert_eq!(web[0].phase, Some(Phase::InService));
}

#[tokio::test(start_paused = true)]
async fn a_cluster_sees_only_its_instances() {
    let compute = Listing::with(vec![instance("i-1")]);
    let inv = Inventory::new(Duration::from_secs(60));
    let web = inv.cluster_instances("r", &compute, "web").await.unwrap();
    assert_eq!(ids(&web), ["i-1"]);
    let mut api = instance("i-2");
    api.cluster = "api".into();
    inv.launched("r", vec![api, instance("i-3")]);
    let web = inv.cluster_instances("r", &compute, "web").await.unwrap();
    assert_eq!(ids(&web), ["i-1", "i-3"]);
    let api = inv.cluster_instances("r", &compute, "api").await.unwrap();
    assert_eq!(ids(&api), ["i-2"]);
    let none = inv.cluster_instances("r", &compute, "nope").await.unwrap();
    assert!(none.is_empty());
    inv.set_phase("r", "i-3", Phase::InService, None, None);
    let web = inv.cluster_instances("r", &compute, "web").await.unwrap();
    assert_eq!(web[1].phase, Some(Phase::InService));
    assert_eq!(compute.calls(), 1, "one listing served all");
}

fn stopped_warm(id: &str) -> Instance {
    let mut i = with_phase(id, Phase::Warm);
    i.state = InstanceState::Stopped;
    i.public_ip = Some("198.51.100.7".parse().unwrap());
    i
}

/// The defect behind a warm-pool e2e failure: a warm node started, served
/// and tagged in service within one snapshot's age read as `stopped` from
/// the snapshot taken before its start — and was drained and replaced
/// 0.1 s after it went into service.
#[tokio::test(start_paused = true)]
async fn a_started_warm_node_is_never_read_stopped_from_a_listing_taken_before_the_start() {
    let compute = Listing::with(vec![stopped_warm("i-1")]);
    let inv = Inventory::new(Duration::from_secs(5));
    inv.instances("r", &compute).await.unwrap();
    inv.started("r", "i-1");
    inv.set_phase("r", "i-1", Phase::InService, Some("v2"), None);
    let web = inv.cluster_instances("r", &compute, "web").await.unwrap();
    assert_eq!(compute.calls(), 1, "served from the snapshot");
    assert_eq!(
        (web[0].phase, web[0].state),
        (Some(Phase::InService), InstanceState::Pending)
    );
    assert_eq!(
        web[0].public_ip, None,
        "a started instance's public IP is the listing's to tell"
    );
    // A refresh that still lags keeps the start.
    tokio::time::advance(Duration::from_secs(6)).await;
    let web = inv.cluster_instances("r", &compute, "web").await.unwrap();
    assert_eq!(web[0].state, InstanceState::Pending);
    // Confirmed, then forgotten: a stop behind hangar's back shows.
    let mut running = with_phase("i-1", Phase::InService);
    running.public_ip = Some("203.0.113.9".parse().unwrap());
    compute.show(vec![running]);
    tokio::time::advance(Duration::from_secs(6)).await;
    let web = inv.cluster_instances("r", &compute, "web").await.unwrap();
    assert_eq!(web[0].state, InstanceState::Running);
    assert_eq!(web[0].public_ip, Some("203.0.113.9".parse().unwrap()));
    compute.show(vec![stopped_warm("i-1")]);
    tokio::time::advance(Duration::from_secs(6)).await;
    let web = inv.cluster_instances("r", &compute, "web").await.unwrap();
    assert_eq!(web[0].state, InstanceState::Stopped);
}

#[tokio::test(start_paused = true)]
async fn a_start_that_never_shows_or_is_followed_by_a_stop_gives_way_to_the_listing() {
    let compute = Listing::with(vec![stopped_warm("i-1"), stopped_warm("i-2")]);
    let inv = Inventory::new(Duration::from_secs(1));
    inv.started("r", "i-1");
    inv.started("r", "i-2");
    inv.stopping("r", "i-2");
    let web = inv.cluster_instances("r", &compute, "web").await.unwrap();
    assert_eq!(web[0].state, InstanceState::Pending);
    assert_eq!(
        web[1].state,
        InstanceState::Stopped,
        "stopped again by hangar"
    );
    // EC2 may put an instance it could not start back to `stopped`.
    tokio::time::advance(OWN_START_MAX_AGE + Duration::from_secs(1)).await;
    let web = inv.cluster_instances("r", &compute, "web").await.unwrap();
    assert_eq!(web[0].state, InstanceState::Stopped);
}
