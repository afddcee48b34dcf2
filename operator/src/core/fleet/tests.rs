use chrono::{Duration, TimeZone};
use proptest::prelude::*;

use super::*;

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap()
}

fn node(id: &str, phase: Phase, release: &str, minutes_old: i64) -> Node {
    Node {
        id: id.into(),
        phase,
        state: InstanceState::Running,
        release: Some(release.into()),
        config: Some("cfg1".into()),
        subnet: Some(
            if id.ends_with(['1', '3', '5', '7', '9']) {
                "subnet-a"
            } else {
                "subnet-b"
            }
            .into(),
        ),
        launched_at: Some(now() - Duration::minutes(minutes_old)),
        protected: false,
        task: None,
        failed: None,
        unhealthy_since: None,
        resting: false,
        retire: None,
        launch: Some("ls1".into()),
        stopped_since: None,
        missing_since: None,
    }
}

fn serving(id: &str, release: &str, minutes_old: i64) -> Node {
    node(id, Phase::InService, release, minutes_old)
}

const SUBNETS: [&str; 2] = ["subnet-a", "subnet-b"];

fn target(desired: u32) -> Target<'static> {
    static SUBNETS_OWNED: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    Target {
        desired,
        release: "v2",
        config: "cfg1",
        rollout_halted: false,
        rolling_back_from: None,
        rollout: Rollout {
            max_unavailable: 1,
            max_surge: 1,
        },
        subnets: SUBNETS_OWNED.get_or_init(|| SUBNETS.iter().map(|s| s.to_string()).collect()),
        pending: &[],
        scale_in: ScaleInPolicy::Newest,
        self_healing: SelfHealing::default(),
        launch_allowed: true,
        hold_at_releasing: false,
        launch: Some("ls1"),
        max_lifetime: None,
        warm_pool: None,
        max: 6,
        now: now(),
    }
}

fn launches(d: &Diff) -> Vec<(String, u32)> {
    d.actions
        .iter()
        .filter_map(|a| match a {
            Action::Launch { subnet, count } => Some((subnet.clone(), *count)),
            _ => None,
        })
        .collect()
}

fn started(d: &Diff) -> Vec<(String, &'static str)> {
    d.actions
        .iter()
        .filter_map(|a| match a {
            Action::Start { node, task } => Some((node.clone(), task.name())),
            _ => None,
        })
        .collect()
}

fn cancelled(d: &Diff) -> Vec<String> {
    d.actions
        .iter()
        .filter_map(|a| match a {
            Action::Cancel { node, .. } => Some(node.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn cold_start_launches_the_desired_count_spread_over_subnets() {
    let d = diff(&[], &target(3));
    assert_eq!(
        launches(&d),
        [("subnet-a".into(), 2), ("subnet-b".into(), 1)]
    );
    assert_eq!(d.counted, 0);
}

#[test]
fn a_launching_instance_counts_so_nothing_is_launched_twice() {
    let nodes = [
        node("i-1", Phase::Launching, "v2", 0),
        node("i-2", Phase::Provisioning, "v2", 1),
    ];
    let d = diff(&nodes, &target(2));
    assert!(launches(&d).is_empty(), "{d:?}");
    assert_eq!(
        started(&d),
        [("i-1".into(), "advance"), ("i-2".into(), "advance")]
    );
}

#[test]
fn running_tasks_are_left_alone() {
    let mut n = node("i-1", Phase::Provisioning, "v2", 1);
    n.task = Some(Task::Advance);
    let d = diff(&[n], &target(1));
    assert!(d.actions.is_empty(), "{d:?}");
}

#[test]
fn scale_in_takes_nodes_not_yet_serving_first_then_the_newest() {
    let mut booting = node("i-9", Phase::Provisioning, "v2", 1);
    booting.task = Some(Task::Advance);
    let nodes = [
        serving("i-1", "v2", 300),
        serving("i-2", "v2", 200),
        serving("i-3", "v2", 100),
        booting,
    ];
    let d = diff(&nodes, &target(2));
    assert_eq!(
        cancelled(&d),
        ["i-9"],
        "the booting node's task is stopped first"
    );
    assert_eq!(
        started(&d),
        [("i-3".into(), "drain")],
        "then the newest serving node drains"
    );
}

#[test]
fn scale_in_oldest_policy_and_protection() {
    let mut t = target(1);
    t.scale_in = ScaleInPolicy::Oldest;
    let mut oldest = serving("i-1", "v2", 300);
    oldest.protected = true;
    let nodes = [oldest, serving("i-2", "v2", 200), serving("i-3", "v2", 100)];
    let d = diff(&nodes, &t);
    let drained: Vec<_> = started(&d).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        drained,
        ["i-2", "i-3"],
        "oldest first, the protected one never"
    );
}

#[test]
fn only_protected_nodes_left_is_reported_not_forced() {
    let mut a = serving("i-1", "v2", 10);
    a.protected = true;
    let mut b = serving("i-2", "v2", 10);
    b.protected = true;
    let d = diff(&[a, b], &target(1));
    assert!(d.actions.is_empty());
    assert!(
        d.notes.iter().any(|n| n.contains("protected")),
        "{:?}",
        d.notes
    );
}

#[test]
fn draining_nodes_do_not_count_and_resume_their_drain() {
    let nodes = [
        node("i-1", Phase::Draining, "v2", 10),
        serving("i-2", "v2", 10),
    ];
    let d = diff(&nodes, &target(2));
    assert_eq!(d.counted, 1);
    assert_eq!(started(&d), [("i-1".into(), "drain")]);
    assert_eq!(launches(&d), [("subnet-a".into(), 1)]);
}

#[test]
fn terminated_instances_are_ignored() {
    let mut gone = serving("i-1", "v2", 10);
    gone.state = InstanceState::Terminated;
    let d = diff(&[gone], &target(1));
    assert_eq!(d.counted, 0);
    assert_eq!(launches(&d).len(), 1);
    assert!(started(&d).is_empty());
}

#[test]
fn stopped_and_failed_nodes_are_replaced() {
    let mut stopped = serving("i-1", "v2", 10);
    stopped.state = InstanceState::Stopped;
    let mut failed = node("i-2", Phase::Provisioning, "v2", 3);
    failed.failed = Some("runbook step `install` failed".into());
    let d = diff(&[stopped, failed], &target(2));
    assert_eq!(
        started(&d),
        [("i-1".into(), "drain"), ("i-2".into(), "drain")]
    );
    assert_eq!(launches(&d).iter().map(|(_, n)| n).sum::<u32>(), 2);
}

#[test]
fn a_node_listed_stopped_for_less_than_the_listing_lag_is_left_alone_not_replaced() {
    let mut doubted = serving("i-1", "v2", 10);
    doubted.state = InstanceState::Stopped;
    doubted.stopped_since = Some(now() - Duration::seconds(3));
    doubted.resting = true;
    let d = diff(&[doubted.clone(), serving("i-2", "v2", 10)], &target(2));
    assert!(d.actions.is_empty(), "{d:?}");
    assert!(d.leaving.is_empty());
    assert!(
        d.notes
            .iter()
            .any(|n| n.contains("i-1 listed Stopped for 3s")),
        "{:?}",
        d.notes
    );
    // Listed stopped long enough: believed.
    doubted.stopped_since = Some(now() - STOPPED_BELIEVED_AFTER);
    doubted.resting = false;
    let d = diff(&[doubted, serving("i-2", "v2", 10)], &target(2));
    assert_eq!(started(&d), [("i-1".into(), "drain")]);
    assert_eq!(launches(&d).iter().map(|(_, n)| n).sum::<u32>(), 1);
}

#[test]
fn unhealthy_nodes_are_replaced_one_at_a_time_and_never_the_last_healthy() {
    let sick_since = Some(now() - Duration::minutes(5));
    let mut a = serving("i-1", "v2", 10);
    a.unhealthy_since = sick_since;
    let mut b = serving("i-2", "v2", 10);
    b.unhealthy_since = sick_since;
    let c = serving("i-3", "v2", 10);
    let d = diff(&[a.clone(), b.clone(), c], &target(3));
    assert_eq!(started(&d), [("i-1".into(), "drain")], "maxUnhealthy is 1");
    assert_eq!(launches(&d).iter().map(|(_, n)| n).sum::<u32>(), 1);

    // Nobody healthy: it's the application, not the nodes.
    let d = diff(&[a, b], &target(2));
    assert!(started(&d).is_empty(), "{d:?}");

    // Recently unhealthy: not yet.
    let mut fresh = serving("i-4", "v2", 10);
    fresh.unhealthy_since = Some(now() - Duration::seconds(10));
    let d = diff(&[fresh, serving("i-5", "v2", 10)], &target(2));
    assert!(d.actions.is_empty(), "{d:?}");
}

#[test]
fn rollout_updates_within_max_unavailable_oldest_first() {
    let nodes = [
        serving("i-1", "v1", 10),
        serving("i-2", "v1", 30),
        serving("i-3", "v1", 20),
        serving("i-4", "v1", 40),
    ];
    let d = diff(&nodes, &target(4));
    assert_eq!(started(&d), [("i-4".into(), "update")]);
    assert_eq!(d.outdated, 4);
    assert_eq!(d.surge, 0, "maxUnavailable > 0: update in place, no surge");

    let mut busy = nodes.clone();
    busy[3].task = Some(Task::Update {
        release: "v2".into(),
    });
    busy[3].phase = Phase::Releasing;
    let d = diff(&busy, &target(4));
    assert!(
        started(&d).is_empty(),
        "one update in flight is the budget: {d:?}"
    );
}

#[test]
fn rollout_with_no_unavailability_surges_first() {
    let mut t = target(2);
    t.rollout = Rollout {
        max_unavailable: 0,
        max_surge: 1,
    };
    let nodes = [serving("i-1", "v1", 10), serving("i-2", "v1", 20)];
    let d = diff(&nodes, &t);
    assert_eq!(d.surge, 1);
    assert_eq!(launches(&d).iter().map(|(_, n)| n).sum::<u32>(), 1);
    assert!(
        started(&d).is_empty(),
        "no node leaves service before the surge node serves"
    );

    let with_surge = [
        serving("i-1", "v1", 10),
        serving("i-2", "v1", 20),
        serving("i-3", "v2", 1),
    ];
    let d = diff(&with_surge, &t);
    assert_eq!(started(&d), [("i-2".into(), "update")]);
    assert!(launches(&d).is_empty());

    // Done: the surge node is surplus and goes.
    let done = [
        serving("i-1", "v2", 10),
        serving("i-2", "v2", 20),
        serving("i-3", "v2", 1),
    ];
    let d = diff(&done, &t);
    assert_eq!(d.surge, 0);
    assert_eq!(started(&d), [("i-3".into(), "drain")]);
}

#[test]
fn a_config_change_rolls_like_a_release() {
    let mut old_config = serving("i-1", "v2", 10);
    old_config.config = Some("cfg0".into());
    let d = diff(&[old_config, serving("i-2", "v2", 20)], &target(2));
    assert_eq!(d.outdated, 1);
    assert_eq!(started(&d), [("i-1".into(), "update")]);
}

#[test]
fn halted_rollout_updates_nothing() {
    let mut t = target(2);
    t.rollout_halted = true;
    let d = diff(&[serving("i-1", "v1", 10), serving("i-2", "v1", 20)], &t);
    assert!(d.actions.is_empty(), "{d:?}");
    assert!(d.notes.iter().any(|n| n.contains("halted")));
}

#[test]
fn auto_rollback_swaps_every_bad_node_at_once_and_stops_updates_to_it() {
    let mut t = target(3);
    t.release = "v1";
    t.rolling_back_from = Some("v2");
    let mut updating = serving("i-3", "v2", 30);
    updating.phase = Phase::Verifying;
    updating.task = Some(Task::Update {
        release: "v2".into(),
    });
    let nodes = [serving("i-1", "v2", 10), serving("i-2", "v2", 20), updating];
    let d = diff(&nodes, &t);
    assert_eq!(
        started(&d),
        [("i-1".into(), "rollback"), ("i-2".into(), "rollback")]
    );
    assert_eq!(cancelled(&d), ["i-3"]);
}

#[test]
fn launches_back_off_after_failures() {
    let mut t = target(2);
    t.launch_allowed = false;
    let d = diff(&[], &t);
    assert!(launches(&d).is_empty());
    assert!(d.notes.iter().any(|n| n.contains("backing off")));
}

#[test]
fn spread_fills_the_emptiest_subnet_first() {
    let subnets: Vec<String> = ["subnet-a", "subnet-b", "subnet-c"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let a = serving("i-1", "v2", 1);
    let a2 = serving("i-3", "v2", 1);
    let existing = [&a, &a2];
    assert_eq!(
        spread(3, &subnets, &existing, &[]),
        [("subnet-b".into(), 2), ("subnet-c".into(), 1)]
    );
    assert!(spread(2, &[], &existing, &[]).is_empty());
}

fn arb_node() -> impl Strategy<Value = Node> {
    let phases = prop::sample::select(Phase::ALL.to_vec());
    let states = prop::sample::select(vec![
        InstanceState::Pending,
        InstanceState::Running,
        InstanceState::Running,
        InstanceState::Running,
        InstanceState::Stopped,
        InstanceState::Terminated,
    ]);
    (
        0u32..1000,
        phases,
        states,
        prop::bool::ANY,
        prop::bool::weighted(0.2),
        0i64..500,
        prop::option::weighted(0.3, 0u8..4),
    )
        .prop_map(|(id, phase, state, on_v2, protected, age, task)| Node {
            id: format!("i-{id}"),
            phase,
            state,
            release: Some(if on_v2 { "v2" } else { "v1" }.into()),
            config: Some("cfg1".into()),
            subnet: Some(if id % 2 == 0 { "subnet-a" } else { "subnet-b" }.into()),
            launched_at: Some(now() - Duration::minutes(age)),
            protected,
            task: task.map(|k| match k {
                0 => Task::Advance,
                1 => Task::Update {
                    release: "v2".into(),
                },
                2 => Task::Drain { reason: "x".into() },
                _ => Task::Rollback {
                    release: "v2".into(),
                },
            }),
            failed: None,
            unhealthy_since: None,
            resting: false,
            retire: None,
            launch: None,
            stopped_since: None,
            missing_since: None,
        })
}

proptest! {
    #[test]
    fn decisions_respect_the_invariants(
        nodes in prop::collection::btree_map(0u32..1000, arb_node(), 0..12)
            .prop_map(|m| m.into_iter().map(|(k, mut n)| { n.id = format!("i-{k}"); n }).collect::<Vec<_>>()),
        desired in 0u32..10,
        (max_unavailable, max_surge) in (0u32..3, 0u32..3).prop_map(|(u, s)| if u + s == 0 { (0, 1) } else { (u, s) }),
    ) {
        let mut t = target(desired);
        t.rollout = Rollout { max_unavailable, max_surge };
        let d = diff(&nodes, &t);
        let by_id: BTreeMap<&str, &Node> = nodes.iter().map(|n| (n.id.as_str(), n)).collect();
        let mut touched = BTreeSet::new();
        for a in &d.actions {
            match a {
                Action::Start { node, task } => {
                    let n = by_id[node.as_str()];
                    prop_assert!(n.task.is_none(), "started a second task on {node}");
                    prop_assert!(touched.insert(node.clone()), "two actions for {node}");
                    prop_assert!(!matches!(n.state, InstanceState::Terminated | InstanceState::ShuttingDown));
                    if matches!(task, Task::Drain { reason } if reason == "scale-in") {
                        prop_assert!(!n.protected, "drained protected {node}");
                    }
                }
                Action::Cancel { node, .. } => {
                    prop_assert!(by_id[node.as_str()].task.is_some());
                }
                Action::Launch { count, .. } => prop_assert!(*count > 0),
            }
        }
        let launched: u32 = launches(&d).iter().map(|(_, n)| n).sum();
        let want = desired + d.surge;
        // Never launch beyond what is wanted, and launch exactly the gap.
        prop_assert_eq!(launched, want.saturating_sub(d.counted));
        prop_assert!(d.surge <= max_surge);
        // In-flight updates never exceed the rollout budget.
        let in_flight = nodes.iter().filter(|n| matches!(n.task, Some(Task::Update { .. }))).count() as u32;
        let new_updates = d.actions.iter().filter(|a| matches!(a, Action::Start { task: Task::Update { .. }, .. })).count() as u32;
        if new_updates > 0 {
            prop_assert!(in_flight + new_updates <= max_unavailable + d.surge);
        }
    }
}

#[test]
fn launches_in_flight_count_toward_capacity_and_toward_their_subnet() {
    let mut t = target(4);
    let pending = [("subnet-a".to_string(), 1)];
    t.pending = &pending;
    let d = diff(&[serving("i-2", "v2", 1)], &t);
    assert_eq!(d.counted, 2);
    assert_eq!(
        launches(&d),
        [("subnet-a".into(), 1), ("subnet-b".into(), 1)]
    );
    // In flight and too many: nothing listed is drained for them.
    let mut t = target(1);
    let pending = [("subnet-a".to_string(), 1)];
    t.pending = &pending;
    let d = diff(&[serving("i-2", "v2", 1)], &t);
    assert!(d.actions.is_empty(), "{:?}", d.actions);
}

#[test]
fn with_every_subnet_avoided_nothing_launches_and_status_says_why() {
    let mut t = target(2);
    t.subnets = &[];
    let d = diff(&[], &t);
    assert!(launches(&d).is_empty());
    assert!(
        d.notes.iter().any(|n| n.contains("every subnet refused")),
        "{:?}",
        d.notes
    );
}

#[test]
fn a_node_resting_after_a_retry_gets_no_new_task_until_it_has_rested() {
    let mut resting = node("i-1", Phase::Provisioning, "v2", 1);
    resting.resting = true;
    let d = diff(
        &[resting.clone(), node("i-2", Phase::Provisioning, "v2", 1)],
        &target(2),
    );
    assert_eq!(started(&d), [("i-2".to_string(), "advance")]);
    assert!(
        d.notes
            .iter()
            .any(|n| n.contains("i-1: advance retried shortly")),
        "{:?}",
        d.notes
    );
    // It still counts toward capacity: nothing is launched for it.
    assert!(launches(&d).is_empty());
}

#[test]
fn while_a_release_is_held_new_nodes_are_prepared_up_to_releasing_and_wait() {
    let mut t = target(3);
    t.hold_at_releasing = true;
    let nodes = [
        node("i-1", Phase::Launching, "v2", 1),
        node("i-2", Phase::Releasing, "v2", 1),
        node("i-3", Phase::Verifying, "v2", 1),
    ];
    let d = diff(&nodes, &t);
    assert_eq!(
        started(&d),
        [
            ("i-1".to_string(), "prepare"),
            ("i-3".to_string(), "advance")
        ]
    );
    assert!(
        d.notes
            .iter()
            .any(|n| n.contains("1 node(s) ready at releasing")),
        "{:?}",
        d.notes
    );
}
