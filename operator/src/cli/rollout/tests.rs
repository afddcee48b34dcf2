use std::path::PathBuf;

use chrono::{TimeZone, Utc};
use hangar::runtime::status::Activity;

use super::*;

fn node(id: &str, phase: &str, release: &str) -> NodeStatus {
    NodeStatus {
        id: id.into(),
        phase: phase.into(),
        state: "running".into(),
        release: Some(release.into()),
        ..NodeStatus::default()
    }
}

/// `web` with five desired nodes rolling v1 → v2: three done, one being
/// updated, one still on v1.
fn rolling() -> ClusterStatus {
    let mut c = ClusterStatus::new("web");
    c.file = Some(PathBuf::from("/specs/web.yaml"));
    c.memory.desired = 5;
    let r = &mut c.memory.release;
    r.desired = "v2".into();
    r.target = "v2".into();
    r.last_good = Some("v1".into());
    c.nodes = vec![
        node("i-01", "in-service", "v2"),
        node("i-02", "in-service", "v2"),
        node("i-03", "in-service", "v2"),
        NodeStatus {
            task: Some("update".into()),
            ..node("i-04", "verifying", "v2")
        },
        node("i-05", "in-service", "v1"),
    ];
    c
}

fn done() -> ClusterStatus {
    let mut c = rolling();
    c.nodes = (1..=5)
        .map(|i| node(&format!("i-0{i}"), "in-service", "v2"))
        .collect();
    c
}

#[test]
fn a_rollout_in_progress_names_the_count_and_the_node_being_updated() {
    let p = assess(&rolling(), &[], None);
    assert_eq!(p.state, State::Progressing);
    assert_eq!(
        p.line,
        "web: release v2: 3/5 nodes, updating i-04 (update: verifying)"
    );
}

#[test]
fn every_serving_node_on_the_release_is_done() {
    let p = assess(&done(), &[], None);
    assert_eq!(
        p,
        Progress {
            state: State::Done,
            line: "web: release v2: 5/5 nodes, rolled out".into()
        }
    );
    // Draining leftovers of a scale-in do not hold it up.
    let mut c = done();
    c.nodes.push(node("i-06", "draining", "v1"));
    assert_eq!(assess(&c, &[], None).state, State::Done);
}

#[test]
fn too_few_nodes_in_service_is_not_done_yet() {
    let mut c = done();
    c.nodes.pop();
    c.nodes.push(NodeStatus {
        task: Some("advance".into()),
        ..node("i-09", "provisioning", "v2")
    });
    let p = assess(&c, &[], None);
    assert_eq!(p.state, State::Progressing);
    assert_eq!(
        p.line,
        "web: release v2: 4/5 nodes, updating i-09 (advance: provisioning)"
    );
    // And with nobody busy but one short (a launch held back), still not done.
    let mut c = done();
    c.nodes.pop();
    assert_eq!(assess(&c, &[], None).state, State::Progressing);
}

#[test]
fn a_halted_rollout_fails_with_the_reason_from_the_activity() {
    let mut c = rolling();
    c.memory.release.target = "v1".into();
    c.memory.release.failed = vec!["v2".into()];
    c.activities.push_front(Activity::new(
        Utc.with_ymd_and_hms(2025, 5, 1, 12, 0, 0).unwrap(),
        "rollout",
        None,
        "rollout of v2 halted: i-04: health check failed: HTTP 500",
    ));
    let p = assess(&c, &[], None);
    assert_eq!(p.state, State::Failed);
    assert_eq!(
        p.line,
        "web: release v2: halted: rollout of v2 halted: i-04: health check failed: HTTP 500"
    );
    // Without an activity (trimmed history) the memory still tells.
    c.activities.clear();
    assert_eq!(
        assess(&c, &[], None).line,
        "web: release v2: halted: failed; serving v1"
    );
}

#[test]
fn a_rollback_fails_while_it_runs_and_after_it_ended() {
    let mut c = rolling();
    c.memory.release.target = "v1".into();
    c.memory.release.rolling_back_from = Some("v2".into());
    let p = assess(&c, &[], None);
    assert_eq!(p.state, State::Failed);
    assert!(p.line.contains("rolled back"), "{}", p.line);

    c.memory.release.rolling_back_from = None;
    c.memory.release.failed = vec!["v2".into()];
    c.memory.release.rolled_back = vec!["v2".into()];
    c.nodes = (1..=5)
        .map(|i| node(&format!("i-0{i}"), "in-service", "v1"))
        .collect();
    assert_eq!(assess(&c, &[], None).state, State::Failed);
}

#[test]
fn a_broken_spec_of_this_cluster_fails_others_do_not() {
    let problem = |file: &str| ProblemView {
        file: file.into(),
        line: Some(12),
        column: Some(5),
        path: "spec.release.sha256".into(),
        message: "not a sha256".into(),
        text: format!("{file}:12:5: spec.release.sha256: not a sha256"),
    };
    let p = assess(&done(), &[problem("/specs/web.yaml")], None);
    assert_eq!(p.state, State::Failed);
    assert_eq!(
        p.line,
        "web: release v2: the spec is broken: /specs/web.yaml:12:5: spec.release.sha256: not a sha256"
    );
    assert_eq!(
        assess(&done(), &[problem("/specs/api.yaml")], None).state,
        State::Done
    );
}

#[test]
fn a_removed_spec_fails() {
    let mut c = done();
    c.spec_removed = true;
    assert_eq!(assess(&c, &[], None).state, State::Failed);
}

#[test]
fn waiting_for_a_named_release_ignores_the_old_one_being_everywhere() {
    let mut c = done();
    c.memory.release.desired = "v1".into();
    c.memory.release.target = "v1".into();
    for n in &mut c.nodes {
        n.release = Some("v1".into());
    }
    let p = assess(&c, &[], Some("v2"));
    assert_eq!(p.state, State::Progressing);
    assert_eq!(
        p.line,
        "web: release v2: waiting for the operator to apply it (its spec names v1)"
    );
    assert_eq!(assess(&c, &[], Some("v1")).state, State::Done);
}

#[test]
fn before_the_first_pass_it_waits() {
    let c = ClusterStatus::new("web");
    let p = assess(&c, &[], None);
    assert_eq!(p.state, State::Progressing);
    assert!(p.line.contains("first pass"), "{}", p.line);
}

#[test]
fn a_node_error_is_shown_on_the_line() {
    let mut c = rolling();
    c.nodes[3].last_error = Some("ssh: connection refused".into());
    let p = assess(&c, &[], None);
    assert!(
        p.line.ends_with(" — last error: ssh: connection refused"),
        "{}",
        p.line
    );
}

#[test]
fn the_status_survives_its_json_round_trip() {
    // What the CLI reads is what the operator serves: assess the JSON form.
    let c = rolling();
    let json = serde_json::to_vec(&c).unwrap();
    let back: ClusterStatus = serde_json::from_slice(&json).unwrap();
    assert_eq!(assess(&back, &[], None), assess(&c, &[], None));
}
