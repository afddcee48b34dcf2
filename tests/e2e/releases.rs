//! Rolling releases: zero dropped requests, halts and rollbacks.

use std::time::{Duration, Instant};

use hangar::runtime::status::ConditionType;
use hangar_local::artifact::ReleaseKind;
use hangar_local::spec::Yaml;

use crate::support::{settled_on, Scenario};

fn three_nodes_on_v1(s: &mut Scenario) -> hangar_local::spec::ClusterSpec {
    let spec = s.spec().remove("spec.autoscaling").with_capacity(3, 3);
    s.write_spec(&spec);
    s.start_operator();
    s.wait_status(
        "web",
        "3 in service on v1",
        Duration::from_secs(120),
        |st| settled_on(st, 3, "v1"),
    );
    spec
}

#[test]
fn a_rolling_release_under_steady_load_drops_no_request() {
    let mut s = Scenario::start();
    let spec = three_nodes_on_v1(&mut s);
    let v2 = s.cloud.upload_release("v2", ReleaseKind::Good).expect("v2");
    let load = s.cloud.start_load(30.0, None).expect("load");
    s.write_spec(&spec.with_release(&v2));
    let st = s.wait_status("web", "every node on v2", Duration::from_secs(180), |st| {
        settled_on(st, 3, "v2")
    });
    let report = load.stop();
    assert_eq!(
        report.errors, 0,
        "zero failed requests during the rollout: {report:?}"
    );
    assert!(
        report.by_release.contains_key("v1") && report.by_release.contains_key("v2"),
        "{report:?}"
    );
    assert_eq!(st.memory.release.target, "v2");
    assert_eq!(
        s.watcher.report().launched.len(),
        3,
        "updated in place, nothing launched"
    );
    s.watcher.assert_invariants();
}

#[test]
fn a_release_failing_its_health_check_halts_and_its_node_goes_back() {
    let mut s = Scenario::start();
    let spec = three_nodes_on_v1(&mut s);
    let bad = s
        .cloud
        .upload_release("v2-bad", ReleaseKind::FailingHealth)
        .expect("bad release");
    let load = s.cloud.start_load(10.0, None).expect("load");
    s.write_spec(&spec.with_release(&bad));
    let st = s.wait_status(
        "web",
        "the rollout halted",
        Duration::from_secs(180),
        |st| {
            st.condition(ConditionType::Degraded)
                .is_some_and(|c| c.status && c.reason == "ReleaseFailed")
        },
    );
    assert!(
        st.memory.release.failed.contains(&"v2-bad".to_string()),
        "{:?}",
        st.memory.release
    );
    // The node that tried it is back on v1 and serving; nobody else moved.
    let st = s.wait_status(
        "web",
        "every node on v1 again",
        Duration::from_secs(120),
        |st| settled_on(st, 3, "v1"),
    );
    assert_eq!(st.memory.release.target, "v1");
    std::thread::sleep(Duration::from_secs(5));
    let st = s.status("web").expect("status");
    assert!(
        settled_on(&st, 3, "v1"),
        "the halted rollout stays halted: {:?}",
        st.nodes
    );
    let report = load.stop();
    assert_eq!(
        report.errors, 0,
        "the bad release never served a request: {report:?}"
    );
    assert!(!report.by_release.contains_key("v2-bad"), "{report:?}");
    s.watcher.assert_invariants();
}

#[test]
fn a_release_raising_5xx_is_rolled_back_automatically() {
    let mut s = Scenario::start();
    let spec = three_nodes_on_v1(&mut s)
        .set("spec.release.rollback.errorRateAbove", 0.2)
        .set("spec.release.rollback.window", "2m")
        .set("spec.release.rollback.minRequests", 10);
    // The rollback settings make a new spec; v1 is proven already.
    s.write_spec(&spec);
    let v2 = s
        .cloud
        .upload_release("v2-5xx", ReleaseKind::Fail5xx)
        .expect("5xx release");
    let load = s.cloud.start_load(20.0, None).expect("load");
    s.write_spec(&spec.clone().with_release(&v2));
    let st = s.wait_status(
        "web",
        "auto-rollback to v1",
        Duration::from_secs(180),
        |st| st.memory.release.failed.contains(&"v2-5xx".to_string()) && settled_on(st, 3, "v1"),
    );
    assert!(
        st.activities
            .iter()
            .any(|a| a.kind == "rollout" && a.message.contains("rolling back v2-5xx → v1")),
        "{:?}",
        st.activities
    );
    // After the rollback, every answer is good again.
    let before = load.report();
    std::thread::sleep(Duration::from_secs(3));
    let after = load.stop();
    assert!(
        before.by_status.contains_key(&500),
        "v2-5xx did serve errors: {before:?}"
    );
    assert_eq!(
        after.errors, before.errors,
        "no error after the rollback: {after:?}"
    );
    s.watcher.assert_invariants();
}

#[test]
fn a_provisioning_change_is_pushed_to_serving_nodes_in_a_rolling_way_without_a_release() {
    let mut s = Scenario::start();
    let spec = three_nodes_on_v1(&mut s);
    let config_of = |s: &Scenario| -> Vec<String> {
        s.instances("web")
            .iter()
            .map(|i| {
                i.tags
                    .get(hangar_cloud::tags::CONFIG)
                    .cloned()
                    .unwrap_or_default()
            })
            .collect()
    };
    let old = config_of(&s);
    assert!(old.iter().all(|c| !c.is_empty() && *c == old[0]), "{old:?}");

    let load = s.cloud.start_load(20.0, None).expect("load");
    s.write_spec(&spec.set("spec.provision.vars.motd", "config push"));
    s.wait_status(
        "web",
        "every node re-provisioned",
        Duration::from_secs(180),
        |st| settled_on(st, 3, "v1") && config_of(&s).iter().all(|c| *c != old[0]),
    );
    let report = load.stop();
    assert_eq!(report.errors, 0, "zero failed requests: {report:?}");
    assert_eq!(
        s.watcher.report().launched.len(),
        3,
        "pushed in place, nothing launched"
    );
    s.watcher.assert_invariants();
}

/// Capistrano's `migration_role`, Deployer's `once()`: the migration runs
/// on one node, before any node activates the release — and a crash of the
/// operator while it runs neither starts a second run nor lets the release
/// through early.
#[test]
fn once_hooks_run_on_one_node_before_any_node_activates_even_across_a_crash() {
    let mut s = Scenario::start();
    let spec = three_nodes_on_v1(&mut s);
    // Not under /tmp: a lite node's /tmp is its own.
    let shared = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("shared dir");
    let log = shared.path().join("migrations.log");
    let migrate = format!(
        "echo \"start $RELEASE_ID\" >> {log}; sleep 4; echo \"end $RELEASE_ID\" >> {log}",
        log = log.display()
    );
    let runs = || std::fs::read_to_string(&log).unwrap_or_default();
    let v2 = s.cloud.upload_release("v2", ReleaseKind::Good).expect("v2");
    let load = s.cloud.start_load(20.0, None).expect("load");
    s.write_spec(
        &spec
            .with_release(&v2)
            .set("spec.release.hooks.once", Yaml::list([migrate.as_str()]))
            .set("spec.release.warmup.paths", Yaml::list(["/", "/health"])),
    );
    let until = Instant::now() + Duration::from_secs(120);
    while !runs().contains("start v2") {
        assert!(Instant::now() < until, "the once hooks never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    s.crash_operator();
    let on_v2 = |s: &Scenario| {
        s.instances("web")
            .iter()
            .filter(|i| i.release.as_deref() == Some("v2"))
            .count()
    };
    assert_eq!(on_v2(&s), 0, "nothing activates v2 before its migration");
    s.start_operator();
    let st = s.wait_status("web", "every node on v2", Duration::from_secs(180), |st| {
        settled_on(st, 3, "v2")
    });
    assert_eq!(runs(), "start v2\nend v2\n", "exactly one run, to its end");
    assert!(st.memory.release.once_done.contains(&"v2".to_string()));
    let warmed = st
        .activities
        .iter()
        .filter(|a| a.kind == "warmup" && a.message.starts_with("warmed up: 6 request(s)"))
        .count();
    assert!(
        warmed >= 3,
        "each node warmed before it rejoined: {:?}",
        st.activities
    );
    let report = load.stop();
    assert_eq!(report.errors, 0, "{report:?}");
    s.watcher.assert_invariants();
}
