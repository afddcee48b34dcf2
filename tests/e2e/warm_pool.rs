//! Warm pools on lite nodes: ready nodes kept stopped out of the target
//! group, taken first when the fleet scales out, brought up to date before
//! they serve, and given scale-in victims back — with the operator killed
//! at the delicate moments.
//!
//! One scenario walks issue 16's cases in order on one cloud and one pool
//! fill (CI time), under steady load from the first scale-out on:
//!
//! 1. the pool fills on v1, a rollout to v2 leaves it alone, and a
//!    scale-out takes the stale warm node: started, v2 shipped, health
//!    checked, and only then registered;
//! 2. `reuseOnScaleIn`: a scale-in victim is drained and stopped back into
//!    the pool, same instance (while the fleet rolls to v3: the pool stays
//!    on v2, stale for 3a);
//! 3. kill -9 while a stale warm node is taken out (started, not yet
//!    registered: once before its tag leaves `warm`, once after), and while
//!    a scale-in victim returns to the pool: the restarted operator
//!    converges, with no double launch, no orphan and nothing unsafe.

use std::time::{Duration, Instant};

use hangar::runtime::status::ClusterStatus;
use hangar_cloud::{Instance, InstanceState, Phase};
use hangar_local::artifact::ReleaseKind;

use crate::support::{in_service, Scenario};

#[test]
fn warm_nodes_serve_scale_outs_only_once_current_take_back_scale_in_victims_and_survive_kill_9() {
    let started = Instant::now();
    let mut s = Scenario::start();
    let base = s
        .spec()
        .remove("spec.autoscaling")
        .set("spec.warmPool.size", 1u64);

    // --- the pool fills on v1 -------------------------------------------
    s.write_spec(&base.clone().with_capacity(2, 2));
    s.start_operator();
    let st = s.wait_status(
        "web",
        "2 in service on v1, 1 warm",
        Duration::from_secs(120),
        |st| settled(st, 2, "v1", 1),
    );
    let warm = only(&pool_ids(&st), "the pool");
    // The cloud itself says the pool node is stopped (listing lag: wait).
    wait_stopped_in_pool(&s, std::slice::from_ref(&warm));
    assert_eq!(s.watcher.report().launched.len(), 3, "fleet 2 + pool 1");
    // Stopped once, not once a pass while the listing still said running.
    assert_eq!(api_calls(&s, "StopInstances"), 1.0, "StopInstances calls");
    let filled = started.elapsed();

    // --- 1. a rollout leaves the pool alone; a scale-out takes the stale
    //        warm node, which serves v2 only ------------------------------
    // Both nodes at once, before the load starts: this rollout only makes
    // the pool stale (rollouts under load are releases.rs'), and CI time.
    let v2 = s.cloud.upload_release("v2", ReleaseKind::Good).expect("v2");
    let on_v2 = base.clone().with_release(&v2);
    s.write_spec(
        &on_v2
            .clone()
            .set("spec.release.rollout.maxUnavailable", 2u64)
            .with_capacity(2, 2),
    );
    let st = s.wait_status(
        "web",
        "the fleet on v2, the pool untouched",
        Duration::from_secs(120),
        |st| settled(st, 2, "v2", 1),
    );
    let node = st
        .nodes
        .iter()
        .find(|n| n.id == warm)
        .expect("still listed");
    assert_eq!(
        (node.phase.as_str(), node.release.as_deref()),
        ("warm", Some("v1")),
        "the rollout did not touch the warm node"
    );
    assert_eq!(
        cloud_view(&s, &warm).map(|i| i.state),
        Some(InstanceState::Stopped)
    );
    assert_eq!(api_calls(&s, "StartInstances"), 0.0, "nothing started yet");
    assert_eq!(
        s.watcher.report().launched.len(),
        3,
        "a rollout launches nothing"
    );
    let load = s.cloud.start_load(5.0, None).expect("load");

    s.write_spec(&on_v2.clone().with_capacity(3, 3));
    // The pool refills in the background: step 2 goes on meanwhile.
    let st = s.wait_status(
        "web",
        "3 in service on v2, the warm node among them",
        Duration::from_secs(120),
        |st| fleet_on(st, 3, "v2") && serves(st, &warm),
    );
    assert_eq!(
        registered_on(&s, &warm, 0),
        [Some("v2".to_string())],
        "registered once, answering on v2: never while its `current` was v1"
    );
    assert!(
        runs(&s, &warm).ends_with("/releases/v2"),
        "{}",
        runs(&s, &warm)
    );
    assert_eq!(
        answered_by(&s, &warm, 0, "v1"),
        0,
        "no request reached it on v1"
    );
    // The same disk: v1 is still there, v2 was shipped next to it.
    s.cloud
        .exec_inside(&warm, "test -d /srv/app/releases/v1")
        .ok()
        .filter(|o| o.status.success())
        .expect("the warm node kept its disk (it was really stale)");
    assert!(
        s.watcher.report().launched.len() <= 4,
        "the scale-out launched nothing for itself (the pool refills by one)"
    );
    assert!(s.watcher.report().max_alive <= 4, "max 3 + pool 1");
    s.watcher.assert_invariants();
    let stale_served = started.elapsed();

    // --- 2. reuseOnScaleIn: a scale-in victim goes back to the pool --------
    // With a new release at once: the fleet rolls to v3 while the victim
    // returns to the pool on v2 — stale for 3a, without a rollout of its own.
    let fleet_before: Vec<String> = fleet_ids(&st);
    let v3 = s.cloud.upload_release("v3", ReleaseKind::Good).expect("v3");
    let reuse = base
        .clone()
        .with_release(&v3)
        .set("spec.warmPool.size", 2u64)
        .set("spec.warmPool.reuseOnScaleIn", true);
    s.write_spec(&reuse.clone().with_capacity(2, 2));
    let st = s.wait_status(
        "web",
        "2 in service on v3, a victim back in the pool (2 warm)",
        Duration::from_secs(120),
        |st| settled(st, 2, "v3", 2),
    );
    let victims: Vec<String> = pool_ids(&st)
        .into_iter()
        .filter(|id| fleet_before.contains(id))
        .collect();
    let victim = only(&victims, "the serving node back in the pool");
    assert_eq!(
        release_of(&st, &victim),
        Some("v2"),
        "back in the pool as it served (the rollout leaves the pool alone)"
    );
    wait_stopped_in_pool(&s, &pool_ids(&st));
    let w = s.watcher.report();
    assert!(w.stopped.contains(&victim), "seen stopping: {w:?}");
    assert!(!w.terminated.contains(&victim), "not terminated");
    assert_eq!(w.launched.len(), 4, "nothing launched, nothing replaced");
    assert!(w.max_alive <= 4, "max 2 + pool 2: {}", w.max_alive);
    assert!(!registered(&s, &victim), "out of the target group");
    let report = load.report();
    assert_eq!(report.errors, 0, "drained before it stopped: {report:?}");
    s.watcher.assert_invariants();
    let reused = started.elapsed();

    // --- 3a. kill -9 while a stale warm node is taken out --------------------
    let pool = pool_ids(&st);
    let mark = s.watcher.report().registered_releases.len();
    let seq = s.cloud.lb().next_seq();
    let before = st.clone();
    s.write_spec(&reuse.clone().with_capacity(3, 3));
    // Started (the cloud runs it) but still tagged `warm`.
    let taken = kill_when(&mut s, "a warm node started", |i| {
        pool.contains(&i.id)
            && matches!(i.state, InstanceState::Pending | InstanceState::Running)
            && i.phase == Some(Phase::Warm)
    });
    assert!(
        !registered(&s, &taken),
        "{taken} was killed before it registered"
    );
    // The longest-warm first: the victim of step 2, stale.
    assert_eq!(
        release_of(&before, &taken),
        Some("v2"),
        "a stale node taken"
    );
    s.start_operator();
    // Past `warm`, on its way to v3, not registered yet.
    let again = kill_when(&mut s, "the taken node releasing", |i| {
        i.id == taken && matches!(i.phase, Some(Phase::Releasing | Phase::Verifying))
    });
    let second_before_registration = !registered(&s, &again);
    s.start_operator();
    // The pool refills in the background: 3b goes on meanwhile.
    let st = s.wait_status(
        "web",
        "3 in service on v3, the taken node among them",
        Duration::from_secs(150),
        |st| fleet_on(st, 3, "v3") && serves(st, &taken),
    );
    assert_eq!(
        registered_on(&s, &taken, mark),
        [Some("v3".to_string())],
        "registered once, answering on v3: never on v2"
    );
    assert_eq!(
        answered_by(&s, &taken, seq, "v2"),
        0,
        "no request reached it on v2"
    );
    assert!(
        runs(&s, &taken).ends_with("/releases/v3"),
        "{}",
        runs(&s, &taken)
    );
    s.watcher.assert_invariants();
    let taken_across_kills = started.elapsed();

    // --- 3b. kill -9 while a scale-in victim returns to the pool -------------
    s.write_spec(
        &reuse
            .clone()
            .set("spec.warmPool.size", 3u64)
            .with_capacity(2, 2),
    );
    let victim = kill_when(&mut s, "a scale-in victim draining", |i| {
        i.phase == Some(Phase::Draining)
    });
    assert!(
        fleet_ids(&st).contains(&victim),
        "a serving node was the victim"
    );
    s.start_operator();
    let st = s.wait_status(
        "web",
        "2 in service on v3, 3 warm",
        Duration::from_secs(150),
        |st| settled(st, 2, "v3", 3),
    );
    wait_stopped_in_pool(&s, &pool_ids(&st));
    let w = s.watcher.report();
    // A drain cut by a crash is finished as a termination (README), and
    // the pool refills; had it made it into the pool, nothing launches.
    let back_in_pool = pool_ids(&st).contains(&victim);
    assert!(
        back_in_pool || w.terminated.contains(&victim),
        "{victim} neither in the pool nor terminated: {w:?}"
    );
    let launches = if back_in_pool { 5 } else { 6 };
    assert_eq!(w.launched.len(), launches, "no double launch: {w:?}");
    assert_eq!(s.instances("web").len(), 5, "no orphan: fleet 2 + pool 3");
    assert!(
        w.max_alive <= 5,
        "at most max + size machines: {}",
        w.max_alive
    );
    let report = load.stop();
    assert_eq!(report.errors, 0, "no failed request: {report:?}");
    s.watcher.assert_invariants();
    eprintln!(
        "pool filled at {filled:?}; stale warm node served v2 at {stale_served:?}; \
         victim reused at {reused:?}; taken across 2 kills at {taken_across_kills:?} \
         (second kill before registration: {second_before_registration}); \
         victim {} after a kill; done at {:?}",
        if back_in_pool { "pooled" } else { "terminated" },
        started.elapsed()
    );
}

/// `n` in service on `release`, `warm` in the pool, nothing else, no task.
fn settled(st: &ClusterStatus, n: u32, release: &str, warm: u32) -> bool {
    in_service(st) == n
        && st.phases.get("warm").copied().unwrap_or(0) == warm
        && st.nodes.len() == (n + warm) as usize
        && st.nodes.iter().all(|x| x.task.is_none())
        && st
            .nodes
            .iter()
            .filter(|x| x.phase == "in-service")
            .all(|x| x.release.as_deref() == Some(release))
}

/// `n` in service on `release`, no node on its way in or out of service
/// (the pool may still be filling).
fn fleet_on(st: &ClusterStatus, n: u32, release: &str) -> bool {
    in_service(st) == n
        && st.nodes.iter().all(|x| match x.phase.as_str() {
            "in-service" => x.task.is_none() && x.release.as_deref() == Some(release),
            // The pool, or a pool launch walking in (task `warm`).
            _ => matches!(x.task.as_deref(), None | Some("warm")) && x.phase != "draining",
        })
}

fn release_of<'s>(st: &'s ClusterStatus, id: &str) -> Option<&'s str> {
    st.nodes
        .iter()
        .find(|n| n.id == id)
        .and_then(|n| n.release.as_deref())
}

fn serves(st: &ClusterStatus, id: &str) -> bool {
    st.nodes
        .iter()
        .any(|n| n.id == id && n.phase == "in-service")
}

fn pool_ids(st: &ClusterStatus) -> Vec<String> {
    ids(st, "warm")
}

fn fleet_ids(st: &ClusterStatus) -> Vec<String> {
    ids(st, "in-service")
}

fn ids(st: &ClusterStatus, phase: &str) -> Vec<String> {
    st.nodes
        .iter()
        .filter(|n| n.phase == phase)
        .map(|n| n.id.clone())
        .collect()
}

fn only(ids: &[String], what: &str) -> String {
    assert_eq!(ids.len(), 1, "{what}: {ids:?}");
    ids[0].clone()
}

/// What the cloud itself (moto) says about `id`.
fn cloud_view(s: &Scenario, id: &str) -> Option<Instance> {
    s.instances("web").into_iter().find(|i| i.id == id)
}

/// Waits until the cloud lists exactly `ids` as the pool, all stopped.
fn wait_stopped_in_pool(s: &Scenario, ids: &[String]) {
    hangar_local::eventually(Duration::from_secs(20), "the pool stopped", || {
        let mut pool: Vec<String> = s
            .instances("web")
            .into_iter()
            .filter(|i| i.phase == Some(Phase::Warm) && i.state == InstanceState::Stopped)
            .map(|i| i.id)
            .collect();
        pool.sort();
        let mut want = ids.to_vec();
        want.sort();
        (pool == want).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", s.instances("web")));
}

/// `kill -9`s the operator as soon as the cloud shows an instance matching
/// `at` (read straight from moto, every ~50 ms); returns its id.
fn kill_when(s: &mut Scenario, what: &str, at: impl Fn(&Instance) -> bool) -> String {
    let id = hangar_local::eventually(Duration::from_secs(90), what, || {
        let hit = s.instances("web").into_iter().find(|i| at(i)).map(|i| i.id);
        if hit.is_none() {
            std::thread::sleep(Duration::from_millis(50));
        }
        hit
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}\noperator log:\n{}",
            crate::support::operator::log_tail(&s.log, 60)
        )
    });
    s.crash_operator();
    eprintln!("kill -9 at {what}: {id}");
    s.watcher.assert_invariants();
    id
}

/// Registered in the load balancer's target group right now.
fn registered(s: &Scenario, id: &str) -> bool {
    s.cloud
        .lb()
        .targets()
        .iter()
        .any(|t| t.instance_id == id && t.registered)
}

/// The releases `id` answered on each time it joined the target group,
/// from the watcher's `mark`-th registration on.
fn registered_on(s: &Scenario, id: &str, mark: usize) -> Vec<Option<String>> {
    s.watcher.report().registered_releases[mark..]
        .iter()
        .filter(|(i, _)| i == id)
        .map(|(_, r)| r.clone())
        .collect()
}

/// Requests from `seq` on that the LB sent to `id` and that came back
/// from `release` (its `X-Release`).
fn answered_by(s: &Scenario, id: &str, seq: u64, release: &str) -> usize {
    s.cloud
        .lb()
        .requests_since(seq)
        .iter()
        .filter(|r| r.target.as_deref() == Some(id) && r.release.as_deref() == Some(release))
        .count()
}

/// Where the node's `current` points (read inside it, not over hangar).
fn runs(s: &Scenario, id: &str) -> String {
    s.cloud
        .exec_inside(id, "readlink /srv/app/current")
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The operator's count of `operation` calls to EC2 (0 when never made).
fn api_calls(s: &Scenario, operation: &str) -> f64 {
    let metrics = s.operator().metrics().expect("metrics");
    let needle = format!("operation=\"{operation}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("hangar_cloud_api_calls_total{") && l.contains(&needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
