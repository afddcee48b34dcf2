//! The invariant checker: watches the cloud and the load balancer for the
//! whole scenario, independently of the operator, and records every
//! breach of DESIGN.md's invariants it sees.
//!
//! - **No orphan, no double launch**: every instance it ever saw (to count
//!   launches) carries hangar's cluster, owner and phase tags.
//! - **Nothing unready serves traffic**: the moment a target appears in the
//!   load balancer, its node must already answer its health check.
//! - **Nothing serving is killed**: an instance seen terminating must no
//!   longer be a registered target with requests in flight.
//! - **Nothing serving is stopped**: the same for an instance seen stopping
//!   (a scale-in victim going back to the warm pool), which must also be
//!   past the ALB's deregistration delay (drained, not just deregistered).
//! - **Capacity stays within bounds**: the most instances ever alive at once,
//!   and, once [`Watcher::track_serving`] is called, the fewest targets the
//!   load balancer could route to (sampled every 50 ms).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hangar_cloud::aws::AwsCloud;
use hangar_cloud::{Compute, InstanceState};
use hangar_local::harness::LocalCloud;
use hangar_local::lb::Lb;

#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Every instance of ours ever seen (ids).
    pub launched: BTreeSet<String>,
    /// The `hangar:launch` stamp (launch settings hash) of each instance
    /// seen, as first seen: which launches were for which template version.
    pub launch_stamps: BTreeMap<String, String>,
    /// Targets as they appeared in the LB, with whether their node answered
    /// its health check at that moment.
    pub registrations: Vec<(String, bool)>,
    /// The same registrations with the release the node's health answer
    /// named (`X-Release`: where its `current` pointed at that moment).
    pub registered_releases: Vec<(String, Option<String>)>,
    /// Instances seen terminating.
    pub terminated: BTreeSet<String>,
    /// Instances seen stopping or stopped (each once per stop).
    pub stopped: Vec<String>,
    /// The most of our instances alive at once (not terminating).
    pub max_alive: usize,
    /// Instances the scenario itself terminates (a node dying behind
    /// hangar's back): no drain is owed for them.
    pub killed_by_test: BTreeSet<String>,
    /// The fewest routable (registered, healthy) targets seen since
    /// [`Watcher::track_serving`]; `None` before it.
    pub min_serving: Option<usize>,
    pub violations: Vec<String>,
}

pub struct Watcher {
    report: Arc<Mutex<Report>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    pub fn start(cloud: &LocalCloud, owner: &str) -> Watcher {
        let report = Arc::new(Mutex::new(Report::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let lb = cloud.lb().clone();
        // moto itself, not the gateway: the watcher sees what exists, not
        // EC2's eventually consistent listing of it.
        let reader = AwsCloud::new(
            &cloud.moto_clients().sdk,
            owner,
            std::env::temp_dir().join("hangar-e2e-watcher"),
        )
        .expect("watcher cloud reader");
        let thread = {
            let (report, stop) = (report.clone(), stop.clone());
            std::thread::spawn(move || watch(lb, reader, report, stop))
        };
        Watcher {
            report,
            stop,
            thread: Some(thread),
        }
    }

    pub fn report(&self) -> Report {
        self.report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Marks an instance the scenario is about to terminate behind
    /// hangar's back.
    pub fn killed_by_test(&self, id: &str) {
        lock(&self.report).killed_by_test.insert(id.to_string());
    }

    /// From now on, records the fewest targets the load balancer can route
    /// to (a refresh must never serve with fewer than min).
    pub fn track_serving(&self) {
        lock(&self.report).min_serving = Some(usize::MAX);
    }

    /// Panics listing every violation seen so far. Only our instances are
    /// judged: a foreign target in the same group is none of hangar's doing.
    pub fn assert_invariants(&self) {
        let r = self.report();
        assert!(
            r.violations.is_empty(),
            "invariants violated:\n{}",
            r.violations.join("\n")
        );
        for (id, healthy) in &r.registrations {
            assert!(
                *healthy || !r.launched.contains(id),
                "{id} was registered before its health check passed"
            );
        }
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop();
    }
}

fn watch(lb: Lb, reader: AwsCloud, report: Arc<Mutex<Report>>, stop: Arc<AtomicBool>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("watcher runtime");
    // No idle keep-alive connection left on a node: hangar's drain counts
    // open connections, and nginx would keep the watcher's for 65 s.
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .expect("http client");
    // Registered at the last look. A drained target leaves the LB's list
    // at once, so "registered now and not at the last look" is what tells
    // a new registration — also a node's second one (back from the pool).
    let mut known_targets: BTreeSet<String> = BTreeSet::new();
    let mut alive: BTreeSet<String> = BTreeSet::new();
    let mut running: BTreeSet<String> = BTreeSet::new();
    let mut tick = 0u64;
    while !stop.load(Ordering::SeqCst) {
        // The LB is in-process: look often, so a registration is seen at once.
        let mut registered_now: BTreeSet<String> = BTreeSet::new();
        let routable = lb.routable().len();
        if let Some(low) = lock(&report).min_serving.as_mut() {
            *low = (*low).min(routable);
        }
        for t in lb.targets() {
            if t.registered {
                registered_now.insert(t.instance_id.clone());
            }
            if t.registered && !known_targets.contains(&t.instance_id) {
                let (healthy, release) = match t.addr {
                    Some(addr) => rt.block_on(async {
                        let url = format!("http://{}/health", addr);
                        match http.get(&url).timeout(Duration::from_secs(2)).send().await {
                            Ok(r) => (
                                r.status().is_success(),
                                r.headers()
                                    .get("x-release")
                                    .and_then(|v| v.to_str().ok())
                                    .map(str::to_string),
                            ),
                            Err(_) => (false, None),
                        }
                    }),
                    None => (false, None),
                };
                let mut r = lock(&report);
                r.registrations.push((t.instance_id.clone(), healthy));
                r.registered_releases.push((t.instance_id.clone(), release));
            }
        }
        known_targets = registered_now;
        // The cloud costs moto CPU: every 250 ms.
        if tick.is_multiple_of(5) {
            if let Ok(list) = rt.block_on(reader.list(None)) {
                let targets: BTreeMap<String, _> = lb
                    .targets()
                    .into_iter()
                    .map(|t| (t.instance_id.clone(), t))
                    .collect();
                let lingering: BTreeSet<String> =
                    lb.lingering().into_iter().map(|(id, _)| id).collect();
                let mut r = lock(&report);
                let mut now_alive: BTreeSet<String> = BTreeSet::new();
                let mut now_running: BTreeSet<String> = BTreeSet::new();
                for i in &list {
                    r.launched.insert(i.id.clone());
                    if let Some(stamp) = i.tags.get(hangar_cloud::tags::LAUNCH) {
                        r.launch_stamps
                            .entry(i.id.clone())
                            .or_insert_with(|| stamp.clone());
                    }
                    if i.cluster.is_empty() || i.phase.is_none() {
                        r.violations
                            .push(format!("{} lacks hangar's tags: {:?}", i.id, i.tags));
                    }
                    if !matches!(
                        i.state,
                        InstanceState::ShuttingDown | InstanceState::Terminated
                    ) {
                        now_alive.insert(i.id.clone());
                    }
                    match i.state {
                        InstanceState::Pending | InstanceState::Running => {
                            now_running.insert(i.id.clone());
                        }
                        // Stopped since the last look: it must have left
                        // the target group first and drained — nothing in
                        // flight, and no longer `draining` to the ALB (a
                        // drain waits out the deregistration delay).
                        InstanceState::Stopping | InstanceState::Stopped
                            if running.contains(&i.id) =>
                        {
                            r.stopped.push(i.id.clone());
                            let ours = !r.killed_by_test.contains(&i.id);
                            if let Some(t) = targets.get(&i.id).filter(|_| ours) {
                                if t.registered || t.in_flight > 0 {
                                    r.violations.push(format!(
                                        "{} stopped while registered={} with {} request(s) in flight",
                                        i.id, t.registered, t.in_flight
                                    ));
                                }
                            }
                            if ours && lingering.contains(&i.id) {
                                r.violations.push(format!(
                                    "{} stopped while the ALB still drained it (deregistered less than the deregistration delay ago)",
                                    i.id
                                ));
                            }
                        }
                        _ => {}
                    }
                }
                running = now_running;
                // Gone from the listing or shutting down: terminated now.
                // It must have left the target group, with nothing in flight.
                for id in alive.difference(&now_alive) {
                    r.terminated.insert(id.clone());
                    if let Some(t) = targets.get(id).filter(|_| !r.killed_by_test.contains(id)) {
                        if t.registered || t.in_flight > 0 {
                            r.violations.push(format!(
                                "{id} terminated while registered={} with {} request(s) in flight",
                                t.registered, t.in_flight
                            ));
                        }
                    }
                }
                alive = now_alive;
                r.max_alive = r.max_alive.max(alive.len());
            }
        }
        tick += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn lock(m: &Mutex<Report>) -> std::sync::MutexGuard<'_, Report> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
