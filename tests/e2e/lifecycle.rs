//! Cold start: from a spec to serving nodes.

use std::time::Duration;

use hangar::runtime::status::ConditionType;

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

/// A serving node someone deregistered behind hangar's back (the console,
/// another tool) carries no traffic, whatever its tags say. hangar finds it
/// missing at its next read of the target group, health-checks it and
/// registers the same machine again: no launch, no request failed, the
/// re-registration as healthy as the first.
#[test]
fn a_node_deregistered_behind_hangars_back_is_health_checked_and_registered_again() {
    let mut s = Scenario::start();
    s.write_spec(&s.spec().remove("spec.autoscaling"));
    s.operator_settings
        .push(("HANGAR_TARGET_GROUP_CHECK_INTERVAL".into(), "2s".into()));
    s.start_operator();
    s.wait_status(
        "web",
        "2 nodes in service on v1",
        Duration::from_secs(120),
        |st| settled_on(st, 2, "v1"),
    );
    let mut ids: Vec<String> = s.instances("web").into_iter().map(|i| i.id).collect();
    ids.sort();
    let out = ids[0].clone();
    let load = s.cloud.start_load(10.0, None).expect("load");

    s.cloud.deregister(&[&out]).expect("deregister by hand");
    let registered = |id: &str| {
        s.cloud
            .lb()
            .targets()
            .into_iter()
            .any(|t| t.instance_id == id && t.registered)
    };
    assert!(!registered(&out), "out of the target group");
    hangar_local::harness::eventually(Duration::from_secs(60), "registered again", || {
        registered(&out).then_some(())
    })
    .expect("hangar put the node back");
    let status = s.wait_status(
        "web",
        "both nodes serving again",
        Duration::from_secs(30),
        |st| settled_on(st, 2, "v1"),
    );
    let report = load.stop();
    assert_eq!(report.errors, 0, "{report:?}");

    let mut now: Vec<String> = status.nodes.iter().map(|n| n.id.clone()).collect();
    now.sort();
    assert_eq!(now, ids, "the same machines serve");
    let watch = s.watcher.report();
    assert_eq!(watch.launched.len(), 2, "no launch: {watch:?}");
    assert_eq!(
        watch
            .registrations
            .iter()
            .filter(|(id, _)| *id == out)
            .count(),
        2,
        "registered twice: {watch:?}"
    );
    s.watcher.assert_invariants();
    assert!(
        status
            .activities
            .iter()
            .any(|a| a.node.as_deref() == Some(out.as_str()) && a.kind == "register"),
        "{:#?}",
        status.activities
    );
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

/// ASG's instance refresh with no spec change at all: the spec says
/// `$Latest`, and a new version of the launch template (a patched AMI)
/// appears. Every machine is replaced — each new one serving before an old
/// one is drained, at most desired + maxSurge machines at once, the load
/// balancer never routing to fewer than min, no request dropped — and each
/// new one is launched from, and stamped with, the version `$Latest`
/// resolved to. (Another instance type takes the same path in `decide`:
/// `a_change_of_launch_settings_replaces_every_node_surge_first_never_below_desired`.)
#[test]
fn a_new_launch_template_version_on_latest_replaces_every_node_surge_first_dropping_no_request() {
    let mut s = Scenario::start();
    let spec = s
        .spec()
        .remove("spec.autoscaling")
        .with_capacity(2, 2)
        .set("spec.instances.launchTemplateVersion", "$Latest");
    let stamp = launch_stamps(&s.write_spec(&spec));
    s.operator_settings.push(fast_latest());
    let old = start_serving_two(&mut s);
    assert!(
        s.instances("web")
            .iter()
            .all(|i| i.tags.get(hangar_cloud::tags::LAUNCH) == Some(&stamp("1"))),
        "launched from version 1, which `$Latest` named"
    );
    let load = s.cloud.start_load(20.0, None).expect("load");
    s.watcher.track_serving();
    let version = s
        .cloud
        .new_template_version(PATCHED_AMI)
        .expect("a new template version");
    assert_eq!(version, 2);
    s.wait_status(
        "web",
        "2 new machines in service",
        Duration::from_secs(240),
        |st| settled_on(st, 2, "v1") && st.nodes.iter().all(|n| !old.contains(&n.id)),
    );
    no_failed_request(&s, &load.stop());
    let now = s.instances("web");
    assert_eq!(now.len(), 2, "no orphan: {now:?}");
    for i in &now {
        assert_eq!(
            i.tags.get(hangar_cloud::tags::LAUNCH),
            Some(&stamp("2")),
            "{} stamped with version 2: {:?}",
            i.id,
            i.tags
        );
    }
    let booted = s.cloud.hosts().directory().borrow().clone();
    for i in &now {
        assert_eq!(
            booted.get(&i.id).and_then(|b| b.image_id.as_deref()),
            Some(PATCHED_AMI),
            "{} booted from version 2's image",
            i.id
        );
    }
    let w = s.watcher.report();
    assert_eq!(w.launched.len(), 4, "one new machine per old one: {w:?}");
    replaced_one_at_a_time_never_below_min(&s);
}

/// `instances.maxLifetime`: once the fleet is older than it (the local
/// cloud lists both nodes as launched two hours ago against a one-hour
/// lifetime), every node is replaced the instance-refresh way — a new one
/// serving before an old one drains, one at a time, the load balancer never
/// routing to fewer than min, no request dropped — across a `kill -9` of
/// the operator while the first replacement comes up; the new nodes, young,
/// are left alone.
#[test]
fn nodes_older_than_max_lifetime_are_replaced_one_at_a_time_across_a_kill_9_dropping_no_request() {
    let mut s = Scenario::start();
    let spec = s
        .spec()
        .remove("spec.autoscaling")
        .with_capacity(2, 2)
        .set("spec.instances.maxLifetime", "1h");
    s.write_spec(&spec);
    let old = start_serving_two(&mut s);
    let load = s.cloud.start_load(20.0, None).expect("load");
    s.watcher.track_serving();
    for id in &old {
        s.cloud
            .gateway()
            .age_instance(id, Duration::from_secs(2 * 3600));
    }

    kill_9_while_a_replacement_comes_up(&mut s, |i| !old.contains(&i.id));
    let done = s.wait_status(
        "web",
        "both old nodes replaced",
        Duration::from_secs(240),
        |st| settled_on(st, 2, "v1") && st.nodes.iter().all(|n| !old.contains(&n.id)),
    );
    no_failed_request(&s, &load.stop());
    let now = s.instances("web");
    assert_eq!(now.len(), 2, "no orphan: {now:?}");
    let w = s.watcher.report();
    assert_eq!(w.launched.len(), 4, "one new machine per old one: {w:?}");
    replaced_one_at_a_time_never_below_min(&s);

    // The young nodes stay: a later pass launches nothing.
    s.wait_status(
        "web",
        "a pass after the replacement",
        Duration::from_secs(60),
        |st| st.updated_at > done.updated_at && settled_on(st, 2, "v1"),
    );
    assert_eq!(
        s.watcher.report().launched.len(),
        4,
        "nothing more replaced"
    );
}

/// Starts the operator on a 2-node spec; the ids of the two nodes once
/// both are in service.
fn start_serving_two(s: &mut Scenario) -> Vec<String> {
    s.start_operator();
    s.wait_status(
        "web",
        "2 in service on v1",
        Duration::from_secs(120),
        |st| settled_on(st, 2, "v1"),
    );
    s.instances("web").iter().map(|i| i.id.clone()).collect()
}

/// Waits for a machine `is_replacement` says is new and not yet serving,
/// then kills the operator (`kill -9`) and starts it again.
fn kill_9_while_a_replacement_comes_up(
    s: &mut Scenario,
    is_replacement: impl Fn(&hangar_cloud::Instance) -> bool,
) {
    let fresh = hangar_local::eventually(
        Duration::from_secs(180),
        "a replacement launched, not yet serving",
        || {
            s.instances("web")
                .into_iter()
                .find(|i| {
                    is_replacement(i)
                        && i.tags.get(hangar_cloud::tags::PHASE).map(String::as_str)
                            != Some("in-service")
                })
                .map(|i| i.id)
        },
    )
    .expect("a replacement is launched");
    s.crash_operator();
    eprintln!("kill -9 while {fresh} comes up");
    s.watcher.assert_invariants();
    s.start_operator();
}

/// A refresh of a 2-node fleet with maxSurge 1: at most 3 machines at once,
/// the load balancer never routing to fewer than min = 2, the invariants.
fn replaced_one_at_a_time_never_below_min(s: &Scenario) {
    let w = s.watcher.report();
    assert!(w.max_alive <= 3, "desired 2 + maxSurge 1: {}", w.max_alive);
    assert!(
        w.min_serving.is_some_and(|n| n >= 2),
        "the LB always had min = 2 targets to route to: {:?}",
        w.min_serving
    );
    s.watcher.assert_invariants();
}

/// The `hangar:launch` stamp of a node launched from the spec in `file`
/// with a given template version number.
fn launch_stamps(file: &std::path::Path) -> impl Fn(&str) -> String {
    let report = hangar_crds::load::load_file(file);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let cluster = report.clusters[0].cluster.clone();
    move |version| hangar::core::launches::settings_hash(&cluster.spec.instances, version)
}

/// Zero failed requests; else the failed ones as the LB logged them (why
/// it answered itself), the fewest targets it could route to, and what the
/// operator did.
fn no_failed_request(s: &Scenario, report: &hangar_local::load::LoadReport) {
    assert_eq!(
        report.errors,
        0,
        "{report:?}\nfewest routable: {:?}\nfailed: {:#?}\nactivities: {:#?}",
        s.watcher.report().min_serving,
        s.cloud
            .lb()
            .requests()
            .into_iter()
            .filter(|r| !r.ok())
            .collect::<Vec<_>>(),
        s.status("web").map(|st| st.activities)
    );
}

/// `$Latest` read again every 2 s, not every minute: a new template
/// version is acted on at the next pass (at most 15 s for an idle cluster).
fn fast_latest() -> (String, String) {
    ("HANGAR_TEMPLATE_VERSION_TTL".into(), "2s".into())
}

/// The AMI of a launch template's second version: any id but the seeded one.
const PATCHED_AMI: &str = "ami-0a1b2c3d4e5f60719";

/// A new template version whose machines boot, take SSH, the runbook and
/// the release, but never answer healthy (the local cloud's
/// `UNHEALTHY_AMI`) halts the refresh: the old nodes keep serving (none is
/// drained for a broken machine, the load balancer never routes to fewer
/// than min), at most the surge's one broken machine exists at a time,
/// launches back off instead of looping, and status says `Degraded` with a
/// reason a person can read. A fixed version then completes the refresh —
/// across a `kill -9` of the operator while a replacement is launched but
/// not yet serving, with no double launch, no orphan, nothing registered
/// before its health check and nothing terminated while registered.
#[test]
fn a_template_version_that_never_gets_healthy_halts_the_refresh_and_a_fixed_one_completes_it_across_a_kill_9(
) {
    let mut s = Scenario::start();
    let spec = s
        .spec()
        .remove("spec.autoscaling")
        .with_capacity(2, 2)
        .set("spec.instances.launchTemplateVersion", "$Latest")
        // A machine that never answers is given up on in seconds, not a minute.
        .set("spec.release.healthCheck.deadline", "6s");
    let stamp = launch_stamps(&s.write_spec(&spec));
    s.operator_settings.push(fast_latest());
    s.start_operator();
    let before = s.wait_status(
        "web",
        "2 in service on v1",
        Duration::from_secs(120),
        |st| settled_on(st, 2, "v1"),
    );
    let old: Vec<String> = before.nodes.iter().map(|n| n.id.clone()).collect();
    let load = s.cloud.start_load(20.0, None).expect("load");
    s.watcher.track_serving();

    let broken = s
        .cloud
        .new_template_version(hangar_local::seed::UNHEALTHY_AMI)
        .expect("the broken version");
    let degraded = s.wait_status(
        "web",
        "Degraded: the new version's machines never get healthy",
        Duration::from_secs(240),
        |st| {
            st.condition(ConditionType::Degraded)
                .is_some_and(|c| c.status)
        },
    );
    let why = degraded
        .condition(ConditionType::Degraded)
        .expect("Degraded");
    eprintln!("degraded: {}: {}", why.reason, why.message);
    assert!(why.message.contains("failed"), "a readable reason: {why:?}");
    let in_service: std::collections::BTreeSet<&str> = degraded
        .nodes
        .iter()
        .filter(|n| n.phase == "in-service")
        .map(|n| n.id.as_str())
        .collect();
    assert_eq!(
        in_service,
        old.iter().map(String::as_str).collect(),
        "the old nodes serve on: {degraded:?}"
    );

    // Halted, not looping: over the next 20 s (launches wait 30 s once
    // three machines in a row failed) nothing new is launched, and the old
    // nodes serve throughout.
    let halted = s.watcher.report().launched.len();
    let window = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < window {
        let live: Vec<String> = s.instances("web").iter().map(|i| i.id.clone()).collect();
        assert!(
            old.iter().all(|id| live.contains(id)),
            "{old:?} live: {live:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let w = s.watcher.report();
    let tried = w.launched.len() - old.len();
    assert!(
        w.launched.len() <= halted + 1 && tried <= 5,
        "launches bounded: {halted} at the halt, {} now",
        w.launched.len()
    );
    assert!(
        w.launch_stamps
            .iter()
            .filter(|(id, _)| !old.contains(id))
            .all(|(_, st)| *st == stamp(&broken.to_string())),
        "every new machine so far from the broken version: {:?}",
        w.launch_stamps
    );
    assert!(
        old.iter().all(|id| !w.terminated.contains(id)),
        "no old node drained for a broken one: {w:?}"
    );
    assert!(w.max_alive <= 3, "desired 2 + maxSurge 1: {}", w.max_alive);
    s.watcher.assert_invariants();

    // A fixed version; the operator is killed once a machine of it exists
    // but does not serve yet.
    let fixed = s
        .cloud
        .new_template_version(PATCHED_AMI)
        .expect("the fixed version")
        .to_string();
    kill_9_while_a_replacement_comes_up(&mut s, |i| {
        i.tags.get(hangar_cloud::tags::LAUNCH) == Some(&stamp(&fixed))
    });
    s.wait_status(
        "web",
        "the refresh completes on the fixed version",
        Duration::from_secs(240),
        |st| settled_on(st, 2, "v1") && st.nodes.iter().all(|n| !old.contains(&n.id)),
    );
    no_failed_request(&s, &load.stop());
    let now = s.instances("web");
    assert_eq!(now.len(), 2, "no orphan: {now:?}");
    assert!(
        now.iter()
            .all(|i| i.tags.get(hangar_cloud::tags::LAUNCH) == Some(&stamp(&fixed))),
        "{now:?}"
    );
    let w = s.watcher.report();
    let of_fixed = w
        .launch_stamps
        .values()
        .filter(|st| **st == stamp(&fixed))
        .count();
    assert_eq!(
        of_fixed, 2,
        "one fixed machine per old node, none twice: {w:?}"
    );
    replaced_one_at_a_time_never_below_min(&s);
    let after = s.status("web").expect("status");
    assert!(
        !after
            .condition(ConditionType::Degraded)
            .is_some_and(|c| c.status),
        "no longer degraded: {:?}",
        after.conditions
    );
}
