//! What is not hangar's stays untouched; a broken spec stays contained.

use std::time::Duration;

use hangar::runtime::status::ConditionType;

use crate::support::{settled_on, Scenario};

#[test]
fn a_foreign_instance_in_the_same_subnet_and_target_group_is_never_touched() {
    let mut s = Scenario::start();
    let foreign = s.cloud.launch(1).expect("foreign instance").remove(0);
    s.cloud
        .wait_for_node(&foreign.id, Duration::from_secs(10))
        .expect("foreign node up");
    s.cloud
        .register(&[foreign.id.as_str()])
        .expect("foreign target registered");

    // Scale out to 3 then back in to 1: hangar drains and terminates its own
    // nodes, right next to the foreign one.
    s.write_spec(&s.spec().remove("spec.autoscaling").with_capacity(3, 3));
    s.start_operator();
    s.wait_status("web", "3 in service", Duration::from_secs(120), |st| {
        settled_on(st, 3, "v1")
    });
    s.write_spec(&s.spec().remove("spec.autoscaling").with_capacity(1, 1));
    s.wait_status("web", "scaled in to 1", Duration::from_secs(120), |st| {
        settled_on(st, 1, "v1")
    });

    let targets = s.cloud.lb().targets();
    let f = targets
        .iter()
        .find(|t| t.instance_id == foreign.id)
        .expect("foreign target still in the group");
    assert!(f.registered, "foreign target still registered: {f:?}");
    assert!(
        s.cloud.node(&foreign.id).is_some(),
        "foreign instance still running"
    );
    let status = s.status("web").expect("status");
    assert!(
        status.nodes.iter().all(|n| n.id != foreign.id),
        "foreign instance never adopted"
    );
    s.watcher.assert_invariants();
}

#[test]
fn a_broken_spec_is_reported_while_other_clusters_keep_reconciling() {
    let mut s = Scenario::start();
    let web = s
        .spec()
        .remove("spec.autoscaling")
        .set("spec.deletionPolicy", "delete");
    s.write_spec(&web);
    let broken = s.specs.join("broken.yaml");
    std::fs::write(
        &broken,
        "apiVersion: hangar/v1alpha1\nkind: Cluster\nmetadata: { name: broken }\nspec:\n  region: us-east-1\n  capacity: { min: 3, max: 1 }\n",
    )
    .unwrap();
    s.start_operator();
    s.wait_status("web", "web in service", Duration::from_secs(120), |st| {
        settled_on(st, 2, "v1")
    });
    let problems = s.operator().problems().expect("problems endpoint");
    let p = problems
        .iter()
        .find(|p| p.file.ends_with("broken.yaml"))
        .expect("broken.yaml reported");
    assert!(p.line.is_some(), "{p:?}");
    assert!(p.text.contains("broken.yaml:"), "{p:?}");
    assert!(
        s.status("broken").is_none(),
        "a broken spec is not reconciled"
    );
    let metrics = s.operator().metrics().expect("metrics");
    assert!(metrics.contains("hangar_spec_problems 1"), "{metrics}");

    // Fixing the file is picked up without a restart.
    std::fs::write(
        &broken,
        s.spec()
            .remove("spec.autoscaling")
            .with_name("broken")
            .with_capacity(0, 1)
            .to_yaml(&s.specs),
    )
    .unwrap();
    s.wait_status(
        "broken",
        "the fixed spec reconciled",
        Duration::from_secs(60),
        |st| st.memory.desired == 0,
    );
    assert!(s.operator().problems().expect("problems").is_empty());

    // A typo in a running cluster's spec is not its removal: even with
    // `deletionPolicy: delete`, its nodes keep serving as they are.
    s.write_spec(&web.clone().with_capacity(3, 1));
    let st = s.wait_status("web", "web held as it is", Duration::from_secs(30), |st| {
        st.condition(ConditionType::Degraded)
            .is_some_and(|c| c.status && c.reason == "SpecInvalid")
    });
    assert!(!st.spec_removed, "{st:?}");
    let held_since = std::time::Instant::now();
    while held_since.elapsed() < Duration::from_secs(5) {
        assert_eq!(s.instances("web").len(), 2, "nothing terminated");
        let registered = s
            .cloud
            .lb()
            .targets()
            .iter()
            .filter(|t| t.registered)
            .count();
        assert_eq!(registered, 2, "nothing deregistered");
        std::thread::sleep(Duration::from_millis(500));
    }
    s.write_spec(&web);
    s.wait_status("web", "web managed again", Duration::from_secs(30), |st| {
        settled_on(st, 2, "v1")
            && st
                .condition(ConditionType::Degraded)
                .is_some_and(|c| !c.status)
    });
    s.watcher.assert_invariants();
}
