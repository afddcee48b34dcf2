//! Cold start: from a spec to serving nodes.

use std::time::Duration;

use crate::support::{settled_on, Scenario};

#[test]
fn cold_start_brings_min_nodes_into_service_registering_none_before_its_health_check() {
    let mut s = Scenario::start();
    s.write_spec(&s.spec().remove("spec.autoscaling"));
    s.start_operator();

    let status = s.wait_status(
        "web",
        "2 nodes in service on v1",
        Duration::from_secs(120),
        |st| settled_on(st, 2, "v1"),
    );
    assert_eq!(status.memory.desired, 2);
    assert!(status
        .condition(hangar::runtime::status::ConditionType::Ready)
        .is_some_and(|c| c.status));

    // Both nodes serve real traffic through the load balancer.
    let load = s
        .cloud
        .start_load(20.0, Some(Duration::from_secs(3)))
        .expect("load")
        .wait();
    assert_eq!(load.errors, 0, "{load:?}");
    assert!(load.ok >= 40, "{load:?}");
    assert_eq!(load.by_target.len(), 2, "both nodes served: {load:?}");
    assert_eq!(load.by_release.keys().collect::<Vec<_>>(), ["v1"]);

    s.watcher.assert_invariants();
    let report = s.watcher.report();
    assert_eq!(report.launched.len(), 2, "exactly two launches: {report:?}");
    assert_eq!(report.registrations.len(), 2, "{report:?}");

    // Every node carries the config it was provisioned with.
    for i in s.instances("web") {
        assert!(
            i.tags.contains_key(hangar_cloud::tags::CONFIG),
            "{:?}",
            i.tags
        );
        assert_eq!(i.release.as_deref(), Some("v1"));
    }

    // A restarted operator finds everything in place: nothing launched,
    // nothing re-provisioned, nothing moves.
    assert!(
        s.stop_operator().is_some_and(|e| e.success()),
        "clean exit on SIGTERM"
    );
    s.start_operator();
    let after = s.wait_status(
        "web",
        "a reconcile after restart",
        Duration::from_secs(30),
        |st| st.updated_at > status.updated_at && settled_on(st, 2, "v1"),
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        s.watcher.report().launched.len(),
        2,
        "no launch after restart"
    );
    let ids = |st: &hangar::runtime::status::ClusterStatus| {
        st.nodes.iter().map(|n| n.id.clone()).collect::<Vec<_>>()
    };
    assert_eq!(ids(&after), ids(&status));
}

#[test]
fn hangar_plan_reads_the_cloud_and_never_changes_it() {
    let mut s = Scenario::start();
    let spec = s.spec().remove("spec.autoscaling");
    s.write_spec(&spec);
    s.start_operator();
    s.wait_status("web", "2 in service", Duration::from_secs(120), |st| {
        settled_on(st, 2, "v1")
    });
    assert!(s.stop_operator().is_some_and(|e| e.success()));

    // The spec now asks for 3; `hangar plan` says so, through a proxy that
    // counts every AWS call it makes.
    s.write_spec(&spec.with_capacity(3, 3));
    s.aws_faults(crate::support::seed());
    let out = std::process::Command::new(crate::support::operator::hangar_bin())
        .arg("plan")
        .arg("--specs")
        .arg(&s.specs)
        .arg("--state-dir")
        .arg(&s.state)
        .args(["--owner", crate::support::OWNER])
        .envs(s.operator_env())
        .env("NO_COLOR", "1")
        .output()
        .expect("hangar plan runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("desired 3"), "{stdout}");
    assert!(stdout.contains("would launch 1"), "{stdout}");

    let calls = s.faults().all_stats();
    assert!(
        calls.keys().any(|c| c.operation == "DescribeInstances"),
        "it looked at the cloud: {calls:?}"
    );
    for call in calls.keys() {
        assert!(
            ["Describe", "Get", "List", "Head"]
                .iter()
                .any(|read| call.operation.starts_with(read)),
            "a mutating call from `hangar plan`: {call:?}"
        );
    }
    assert_eq!(s.instances("web").len(), 2, "nothing launched");
}

/// ASG's instance refresh: a spec naming another instance type replaces
/// every machine — each new one serving before an old one is drained, at
/// most desired + maxSurge machines at once, no request dropped.
#[test]
fn a_new_instance_type_replaces_every_node_surge_first_dropping_no_request() {
    let mut s = Scenario::start();
    let spec = s.spec().remove("spec.autoscaling").with_capacity(2, 2);
    s.write_spec(&spec);
    s.start_operator();
    s.wait_status(
        "web",
        "2 in service on v1",
        Duration::from_secs(120),
        |st| settled_on(st, 2, "v1"),
    );
    let old: Vec<String> = s.instances("web").iter().map(|i| i.id.clone()).collect();
    let load = s.cloud.start_load(20.0, None).expect("load");
    s.write_spec(&spec.set("spec.instances.instanceType", "t3.small"));
    s.wait_status(
        "web",
        "2 new machines in service",
        Duration::from_secs(240),
        |st| settled_on(st, 2, "v1") && st.nodes.iter().all(|n| !old.contains(&n.id)),
    );
    let report = load.stop();
    assert_eq!(report.errors, 0, "{report:?}");
    let launches: Vec<String> = s
        .instances("web")
        .iter()
        .filter_map(|i| i.tags.get(hangar_cloud::tags::LAUNCH).cloned())
        .collect();
    assert_eq!(launches.len(), 2, "both stamped with the new settings");
    let w = s.watcher.report();
    assert_eq!(w.launched.len(), 4, "one new machine per old one");
    assert!(w.max_alive <= 3, "desired 2 + maxSurge 1: {}", w.max_alive);
    s.watcher.assert_invariants();
}
