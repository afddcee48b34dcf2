//! Whole scenarios of `decide`, pass after pass, without a cloud.

use chrono::Duration;
use hangar_cloud::Phase;

use super::fixtures::*;
use super::*;

/// The default spec at capacity `[min, 6]`.
fn with_min(min: u32) -> hangar_crds::ClusterSpec {
    let mut s = spec("");
    s.capacity.min = min;
    s
}

/// `spec` naming release `id` instead.
fn with_release(mut spec: hangar_crds::ClusterSpec, id: &str) -> hangar_crds::ClusterSpec {
    spec.release.id = id.into();
    spec.release.artifact = format!("s3://b/{id}.tar.gz");
    spec.release.sha256 = "b".repeat(64);
    spec
}

fn activity(d: &Decision, kind: &str) -> Vec<String> {
    d.activities
        .iter()
        .filter(|a| a.kind == kind)
        .map(|a| a.message.clone())
        .collect()
}

/// A fleet of `n` nodes serving `v1`, settled.
fn settled_fleet(spec: hangar_crds::ClusterSpec) -> Sim {
    let mut sim = Sim::new(spec);
    sim.settle(10);
    sim
}

#[test]
fn cold_start_launches_min_spread_over_subnets_and_walks_each_node_to_service() {
    let mut sim = Sim::new(spec(""));
    let d = sim.pass();
    assert_eq!(
        launches(d),
        [("subnet-a".to_string(), 1), ("subnet-b".to_string(), 1)]
    );
    assert_eq!(d.memory.desired, 2);
    assert!(
        activity(d, "scale")[0].starts_with("desired 0 → 2: no autoscaling: run at min 2"),
        "{:?}",
        d.activities
    );
    let d = sim.pass();
    assert_eq!(
        starts(d),
        [
            ("i-001".to_string(), "advance"),
            ("i-002".to_string(), "advance")
        ]
    );
    assert!(
        launches(d).is_empty(),
        "launching nodes count toward capacity"
    );
    sim.finish_all("advance", Outcome::Done);
    let d = sim.pass();
    assert!(d.diff.actions.is_empty(), "{:?}", d.diff.actions);
    assert_eq!(sim.serving().len(), 2);
    assert_eq!(sim.memory.release.on_target, 2);
    assert_eq!(sim.memory.release.last_good.as_deref(), Some("v1"));
}

#[test]
fn scales_out_one_step_per_evaluation_and_back_in_after_the_stabilization_window() {
    let mut sim = Sim::new(spec(AUTOSCALING));
    sim.traffic(2000.0);
    sim.settle(10);
    assert_eq!(sim.serving().len(), 2);

    // 6,000/min asks for 6; maxStep 2 per evaluation.
    sim.traffic(6000.0);
    sim.wait(15);
    let d = sim.pass();
    assert_eq!(d.memory.desired, 4, "{:?}", d.memory.last_decision);
    assert_eq!(launches(d).iter().map(|(_, n)| n).sum::<u32>(), 2);
    // A pass before the next evaluation holds, whatever the reading.
    sim.wait(5);
    assert_eq!(sim.pass().memory.desired, 4);
    sim.settle(10);
    sim.wait(15);
    assert_eq!(sim.pass().memory.desired, 6);
    sim.settle(10);
    assert_eq!(sim.serving().len(), 6);

    // Quiet: the scale-down window holds 6 for its whole 60 s.
    sim.traffic(1000.0);
    for _ in 0..3 {
        sim.wait(15);
        let d = sim.pass();
        assert_eq!(d.memory.desired, 6, "{:?}", d.memory.last_decision);
        assert!(starts(d).is_empty());
    }
    sim.wait(20);
    let d = sim.pass();
    assert_eq!(d.memory.desired, 4, "{:?}", d.memory.last_decision);
    let drains: Vec<_> = starts(d)
        .into_iter()
        .filter(|(_, t)| *t == "drain")
        .collect();
    assert_eq!(drains.len(), 2, "{:?}", d.diff.actions);
    // The newest go first (scaleInPolicy: newest).
    assert!(
        drains.iter().all(|(n, _)| n.as_str() >= "i-003"),
        "{drains:?}"
    );
    assert_eq!(activity(d, "drain").len(), 2);
}

#[test]
fn a_schedule_window_moves_the_fleet_even_between_evaluations() {
    let night = "  schedules:
    - name: night
      cron: \"0 22 * * *\"
      until: \"0 6 * * *\"
      capacity: { min: 1, max: 1 }
";
    let mut sim = Sim::new(spec(night));
    sim.settle(10);
    assert_eq!(sim.serving().len(), 2);
    sim.now = t0().date_naive().and_hms_opt(22, 0, 30).unwrap().and_utc();
    let d = sim.pass();
    assert_eq!(d.memory.desired, 1);
    assert_eq!(
        d.memory.window.as_ref().and_then(|w| w.schedule.as_deref()),
        Some("night")
    );
    assert!(
        activity(d, "scale")[0].contains("night schedule active"),
        "{:?}",
        d.activities
    );
    assert_eq!(starts(d).iter().filter(|(_, t)| *t == "drain").count(), 1);
    // Morning: back to min 2.
    sim.settle(10);
    sim.now += Duration::hours(8);
    let d = sim.pass();
    assert_eq!(d.memory.desired, 2);
    assert_eq!(launches(d).len(), 1);
}

#[test]
fn a_rolling_release_updates_one_node_at_a_time_and_is_proven_when_everywhere() {
    let mut sim = settled_fleet(with_min(3));
    assert_eq!(sim.serving().len(), 3);
    sim.spec = with_release(with_min(3), "v2");
    let d = sim.pass();
    assert_eq!(d.memory.release.desired, "v2");
    assert_eq!(activity(d, "rollout"), ["rolling out v2"]);
    let updates: Vec<_> = starts(d)
        .into_iter()
        .filter(|(_, t)| *t == "update")
        .collect();
    assert_eq!(updates.len(), 1, "maxUnavailable 1: {:?}", d.diff.actions);
    for _ in 0..3 {
        // Never two updates at once.
        assert!(
            sim.running
                .values()
                .filter(|t| t.name() == "update")
                .count()
                <= 1
        );
        sim.finish_all("update", Outcome::Done);
        sim.pass();
    }
    assert!(sim
        .serving()
        .iter()
        .all(|i| i.release.as_deref() == Some("v2")));
    let proven: Vec<String> = sim
        .decisions
        .iter()
        .flat_map(|d| activity(d, "rollout"))
        .collect();
    assert!(
        proven.contains(&"v2 is on every serving node and proven good".to_string()),
        "{proven:?}"
    );
    assert_eq!(sim.memory.release.last_good.as_deref(), Some("v2"));
}

#[test]
fn a_release_failing_on_a_node_halts_the_rollout_with_the_old_release_serving() {
    let mut sim = settled_fleet(with_min(3));
    sim.spec = with_release(with_min(3), "v2");
    sim.pass();
    let updating: Vec<String> = sim.running.keys().cloned().collect();
    assert_eq!(updating.len(), 1);
    sim.finish(
        &updating[0],
        Outcome::ReleaseFailed {
            release: "v2".into(),
            reason: "health check failed".into(),
        },
    );
    let d = sim.pass();
    assert!(
        starts(d).is_empty(),
        "no further update: {:?}",
        d.diff.actions
    );
    assert_eq!(d.memory.release.target, "v1");
    assert!(rollout::halted(&d.memory.release));
    assert!(
        activity(d, "rollout")[0].starts_with("rollout of v2 halted"),
        "{:?}",
        d.activities
    );
    // New nodes still get the last good release.
    sim.spec.capacity.min = 4;
    sim.spec.capacity.max = 6;
    sim.pass();
    sim.pass();
    assert_eq!(
        sim.cloud.last().and_then(|i| i.release.as_deref()),
        Some("v1")
    );
}

#[test]
fn a_release_raising_5xx_is_rolled_back_on_every_node_at_once() {
    let mut sim = settled_fleet(with_min(3));
    sim.spec = with_release(with_min(3), "v2");
    sim.spec.release.rollback = Some(
        serde_saphyr::from_str("{ errorRateAbove: 0.05, window: 5m, minRequests: 20 }")
            .expect("rollback parses"),
    );
    sim.settle(10);
    assert!(sim
        .serving()
        .iter()
        .all(|i| i.release.as_deref() == Some("v2")));
    assert!(sim.memory.release.activated_at.is_some(), "watched");
    sim.errors(30.0, 100.0);
    sim.wait(15);
    let d = sim.pass();
    assert_eq!(d.memory.release.rolling_back_from.as_deref(), Some("v2"));
    assert_eq!(d.memory.release.target, "v1");
    let rollbacks: Vec<_> = starts(d)
        .into_iter()
        .filter(|(_, t)| *t == "rollback")
        .collect();
    assert_eq!(
        rollbacks.len(),
        3,
        "every v2 node at once: {:?}",
        d.diff.actions
    );
    sim.finish_all("rollback", Outcome::Done);
    let d = sim.pass();
    assert!(
        activity(d, "rollout").contains(&"rollback v2 → v1 complete".to_string()),
        "{:?}",
        d.activities
    );
}

#[test]
fn a_node_unhealthy_for_too_long_is_drained_and_replaced() {
    let mut sim = settled_fleet(spec(""));
    let sick = sim.serving()[0].id.clone();
    sim.unhealthy(&sick);
    let d = sim.pass();
    assert!(starts(d).is_empty(), "not yet: unhealthyAfter is 1m");
    sim.wait(61);
    let d = sim.pass();
    assert_eq!(starts(d), [(sick.clone(), "drain")]);
    assert_eq!(
        launches(d).len(),
        1,
        "its replacement: {:?}",
        d.diff.actions
    );
}

#[test]
fn a_node_that_fails_is_replaced_and_repeated_failures_back_launches_off() {
    let mut sim = Sim::new(spec(""));
    sim.pass();
    sim.pass();
    // Two nodes fail: drained, and replaced at once.
    sim.finish_all("advance", Outcome::NodeFailed("runbook failed".into()));
    let d = sim.pass();
    assert_eq!(starts(d).iter().filter(|(_, t)| *t == "drain").count(), 2);
    assert_eq!(launches(d).iter().map(|(_, n)| n).sum::<u32>(), 2);
    sim.finish_all("drain", Outcome::Done);
    sim.pass();
    // Their replacements fail too: 4 in a row, launches wait.
    sim.finish_all("advance", Outcome::NodeFailed("runbook failed".into()));
    let d = sim.pass();
    assert!(launches(d).is_empty(), "{:?}", d.diff.actions);
    assert_eq!(sim.memory.node_failures, 4);
    assert!(sim.memory.launch_backoff_until.is_some_and(|t| t > sim.now));
}

/// An Auto Scaling group retries at once when its launch template
/// changes: the backoff was earned by the old launch settings, and a
/// fixed template version must not wait it out.
#[test]
fn new_launch_settings_end_the_backoff_the_old_ones_earned() {
    let mut sim = Sim::new(spec(""));
    let broken = Outcome::NodeFailed("never answered SSH".into());
    sim.pass();
    sim.pass();
    sim.finish_all("advance", broken.clone());
    sim.pass();
    sim.finish_all("drain", Outcome::Done);
    sim.pass();
    sim.finish_all("advance", broken);
    let d = sim.pass();
    assert!(launches(d).is_empty(), "backing off: {:?}", d.diff.actions);
    assert!(sim.memory.launch_backoff_until.is_some_and(|t| t > sim.now));
    // The same settings keep waiting.
    sim.wait(5);
    assert!(launches(sim.pass()).is_empty());
    sim.template_version = Some("2".into());
    let d = sim.pass();
    assert_eq!(
        launches(d).iter().map(|(_, n)| n).sum::<u32>(),
        2,
        "launched on the new settings at once: {:?}",
        d.diff.actions
    );
    assert_eq!(sim.memory.node_failures, 0);
    assert!(sim.memory.launch_backoff_until.is_none());
    assert!(
        sim.decisions.last().is_some_and(|d| d
            .activities
            .iter()
            .any(|a| a.message.contains("launch settings changed"))),
        "said so"
    );
}

#[test]
fn a_node_still_coming_up_that_only_ever_fails_transiently_is_given_up() {
    let mut memory = Memory::default();
    let retry = Outcome::Retry("connect timed out".into());
    for _ in 1..MAX_ADVANCE_RETRIES {
        let o = give_up_after_retries(&mut memory, "i-1", &Task::Advance, &retry);
        assert_eq!(o, retry);
    }
    let o = give_up_after_retries(&mut memory, "i-1", &Task::Advance, &retry);
    assert!(
        matches!(&o, Outcome::NodeFailed(why) if why.contains("gave up after 5 attempts")),
        "{o:?}"
    );
    // A serving node's drain keeps retrying: replacing it is not this
    // rule's call.
    let drain = Task::Drain {
        reason: "scale in".into(),
    };
    assert_eq!(
        give_up_after_retries(&mut memory, "i-2", &drain, &retry),
        retry
    );
    assert!(!memory.node_retries.contains_key("i-2"));
}

#[test]
fn a_restarted_operator_plans_from_what_runs_not_from_a_saved_count() {
    // Saved memory says 2, but 4 nodes run (launched before a crash).
    let mut memory = Memory {
        desired: 2,
        ..Memory::default()
    };
    memory.last_decision = Some(crate::core::memory::DecisionRecord {
        at: t0(),
        desired: 2,
        reason: "saved".into(),
    });
    let obs = Observation::test()
        .with_spec(spec(AUTOSCALING))
        .with_nodes((1..=4).map(|i| node(&format!("i-{i}")).serving("v1")))
        .traffic(4000.0);
    let d = decide(&obs, &memory);
    assert_eq!(d.memory.desired, 4, "{:?}", d.memory.last_decision);
    assert!(
        starts(&d).is_empty(),
        "nothing drained: {:?}",
        d.diff.actions
    );
    assert!(d.memory.continuing());
}

#[test]
fn reads_ask_for_traffic_only_when_an_evaluation_is_due() {
    let memory = Memory {
        last_eval_at: Some(t0()),
        ..Memory::default()
    };
    let obs = Observation::test().with_spec(spec(AUTOSCALING));
    assert!(!reads(&obs.clone().at(t0() + Duration::seconds(14)), &memory).traffic);
    assert!(reads(&obs.clone().at(t0() + Duration::seconds(15)), &memory).traffic);
    // Without autoscaling, nothing to read (and no rollback watched).
    let plain = Observation::test().at(t0() + Duration::seconds(15));
    assert_eq!(reads(&plain, &memory), Reads::default());
}

#[test]
fn a_node_phase_is_taken_from_its_tag_and_a_missing_tag_starts_over() {
    let mut untagged = node("i-1");
    untagged.phase = None;
    let obs = Observation::test().with_nodes([untagged, node("i-2").phase(Phase::Provisioning)]);
    let d = decide(&obs, &Memory::default());
    assert_eq!(
        starts(&d),
        [
            ("i-1".to_string(), "advance"),
            ("i-2".to_string(), "advance")
        ]
    );
}

#[test]
fn a_launch_failing_in_one_subnet_falls_back_to_the_others_and_avoids_that_subnet() {
    let mut sim = Sim::new(spec(""));
    sim.full.push("subnet-a".into());
    sim.pass();
    assert_eq!(
        sim.launched,
        [("subnet-b".to_string(), 1)],
        "subnet-a refused"
    );
    // The next pass takes the failure in: subnet-a is avoided, the missing
    // node goes to subnet-b.
    let d = sim.pass();
    assert_eq!(launches(d), [("subnet-b".to_string(), 1)]);
    let said = &activity(d, "launch")[0];
    assert!(
        said.contains("InsufficientInstanceCapacity") && said.contains("avoiding subnet-a for 30s"),
        "{said}"
    );
    assert!(
        d.diff.notes.iter().any(|n| n.contains("subnet-a avoided")),
        "status says why: {:?}",
        d.diff.notes
    );
    sim.settle(10);
    assert_eq!(sim.serving().len(), 2);
    assert!(sim
        .serving()
        .iter()
        .all(|i| i.subnet_id.as_deref() == Some("subnet-b")));
    // Once the backoff ran out subnet-a is tried again; a second refusal
    // avoids it twice as long.
    sim.wait(31);
    sim.spec.capacity.min = 3;
    sim.pass();
    sim.pass();
    assert_eq!(
        sim.memory.launches.avoided["subnet-a"].until,
        sim.now + Duration::seconds(60)
    );
    assert_eq!(
        sim.launched.iter().filter(|(s, _)| s == "subnet-a").count(),
        0
    );
    // Capacity comes back: the next launch goes to the emptiest subnet,
    // works, and the subnet's backoff is forgotten.
    sim.full.clear();
    sim.wait(61);
    sim.spec.capacity.min = 4;
    sim.settle(10);
    assert!(sim.memory.launches.avoided.is_empty());
    assert_eq!(sim.serving().len(), 4);
    let in_a = sim
        .serving()
        .iter()
        .filter(|i| i.subnet_id.as_deref() == Some("subnet-a"))
        .count();
    assert_eq!(in_a, 1);
}

#[test]
fn every_other_action_runs_when_a_launch_fails() {
    let mut sim = settled_fleet(with_min(2));
    sim.full = vec!["subnet-a".into(), "subnet-b".into()];
    let sick = sim.serving()[0].id.clone();
    sim.unhealthy(&sick);
    sim.wait(61);
    let d = sim.pass();
    assert_eq!(
        starts(d),
        [(sick, "drain")],
        "the drain starts though the launch fails"
    );
    assert_eq!(launches(d).len(), 1);
    let d = sim.pass();
    assert_eq!(launches(d).len(), 1, "the other subnet is tried");
    let d = sim.pass();
    assert!(launches(d).is_empty(), "both subnets avoided now");
    assert!(
        d.diff
            .notes
            .iter()
            .any(|n| n.contains("every subnet refused")),
        "{:?}",
        d.diff.notes
    );
}

#[test]
fn a_first_release_that_never_gets_healthy_backs_launches_off_instead_of_looping() {
    let mut sim = Sim::new(spec(""));
    let bad = Outcome::ReleaseFailed {
        release: "v1".into(),
        reason: "health check: 503".into(),
    };
    // Five minutes of passes, every new node failing its first health check.
    for _ in 0..60 {
        sim.pass();
        sim.finish_all("advance", bad.clone());
        sim.finish_all("drain", Outcome::Done);
        sim.wait(5);
    }
    let launched: u32 = sim.launched.iter().map(|(_, n)| n).sum();
    assert!(
        launched <= 10,
        "{launched} instances launched in 5 minutes for min 2"
    );
    assert!(sim.memory.node_failures >= 3);
    assert!(sim.memory.launch_backoff_until.is_some());
}

#[test]
fn a_launch_the_listing_does_not_show_yet_is_not_launched_again() {
    let mut sim = Sim::new(spec(""));
    sim.pass();
    assert_eq!(sim.launched.len(), 2);
    // EC2's listing lags: the new instances are not in it for a while.
    sim.hidden = sim.cloud.iter().map(|i| i.id.clone()).collect();
    for _ in 0..3 {
        let d = sim.pass();
        assert!(launches(d).is_empty(), "{:?}", d.launches);
        assert_eq!(d.diff.counted, 2, "the intents count toward capacity");
    }
    sim.catch_up();
    let d = sim.pass();
    assert_eq!(starts(d).len(), 2);
    assert!(
        sim.memory.launches.pending.is_empty(),
        "confirmed by the listing"
    );
}

#[test]
fn a_launch_retried_after_a_lost_answer_or_a_restart_reuses_its_token() {
    // A throttled call keeps its intent and token.
    let mut sim = Sim::new(spec(""));
    let first = sim.pass().launches.clone();
    let throttled = hangar_cloud::CloudError::Throttled {
        service: "ec2",
        code: "RequestLimitExceeded".into(),
        message: "Request limit exceeded.".into(),
    };
    // Pretend the call for subnet-b never reached EC2 and came back throttled.
    let lost = first
        .iter()
        .find(|i| i.subnet == "subnet-b")
        .unwrap()
        .clone();
    sim.cloud
        .retain(|i| i.client_token.as_deref() != Some(lost.token.as_str()));
    let obs = sim.observation();
    let mut obs = obs;
    obs.failures.push(ActionFailure::Launch {
        token: lost.token.clone(),
        subnet: lost.subnet.clone(),
        count: 1,
        error: throttled,
        at: sim.now,
    });
    let d = decide(&obs, &sim.memory);
    assert_eq!(d.launches.len(), 1);
    assert_eq!(d.launches[0].token, lost.token, "same intent, same token");

    // A restart: the memory on disk holds an intent the listing does not
    // show; the first pass calls again with its token (EC2 answers with
    // what it launched, if it did).
    let mut restarted = d.memory.clone();
    restarted.planned_here = false;
    let d = decide(&obs_without_failures(obs), &restarted);
    assert_eq!(
        d.launches
            .iter()
            .map(|i| i.token.as_str())
            .collect::<Vec<_>>(),
        [lost.token.as_str()]
    );
}

fn obs_without_failures(mut obs: Observation) -> Observation {
    obs.failures.clear();
    obs
}

#[test]
fn the_same_fleet_seen_again_later_gets_a_new_token() {
    let mut sim = settled_fleet(with_min(2));
    sim.spec.capacity.min = 3;
    sim.pass();
    let first = sim.memory.launches.pending[0].token.clone();
    sim.settle(10);
    sim.spec.capacity.min = 2;
    sim.spec.capacity.max = 2;
    sim.settle(10);
    assert_eq!(sim.serving().len(), 2);
    sim.wait(60);
    sim.spec.capacity.max = 6;
    sim.spec.capacity.min = 3;
    sim.pass();
    let second = &sim.last_launch().token;
    assert_ne!(
        &first, second,
        "EC2 would answer with the terminated reservation"
    );
    sim.settle(10);
    assert_eq!(sim.serving().len(), 3);
}

#[test]
fn a_crash_before_the_listing_confirms_a_launch_retries_its_token_and_launches_nothing_twice() {
    let mut sim = Sim::new(spec(""));
    sim.lagging = true;
    sim.pass();
    let tokens: Vec<String> = sim
        .memory
        .launches
        .pending
        .iter()
        .map(|i| i.token.clone())
        .collect();
    assert_eq!(tokens.len(), 2);
    // Known from the launch answers only: counted, not confirmed.
    let d = sim.pass();
    assert!(launches(d).is_empty());
    assert_eq!(
        d.memory.launches.pending.len(),
        2,
        "only the listing confirms"
    );
    sim.crash();
    let d = sim.pass();
    let retried: Vec<&str> = d.launches.iter().map(|i| i.token.as_str()).collect();
    assert_eq!(
        retried,
        tokens.iter().map(String::as_str).collect::<Vec<_>>()
    );
    sim.catch_up();
    sim.settle(10);
    assert_eq!(sim.launched.len(), 2, "EC2 recognised the retried tokens");
    assert_eq!(sim.serving().len(), 2);
    assert!(sim.memory.launches.pending.is_empty());
}

/// Which nodes go on a scale-in is a decision, not a fact of the listing:
/// an operator restarted before the listing shows the first one's drains
/// (and showing another node differently: a tag from before catching up)
/// carries those drains on instead of choosing victims of its own.
#[test]
fn a_restart_before_the_listing_shows_its_drains_picks_no_further_scale_in_victims() {
    let mut sim = settled_fleet(with_min(4));
    assert_eq!(sim.serving().len(), 4);
    let launched = sim.launched.len();
    sim.spec.capacity.min = 2;
    // The listing still shows i-004's `releasing` from before it was
    // tagged in service: to this operator it is the cheapest victim.
    let real = sim.cloud[3].clone();
    sim.cloud[3] = real.clone().phase(Phase::Releasing);
    let first: Vec<String> = drains(sim.pass());
    assert_eq!(first.len(), 2, "{first:?}");
    sim.crash();
    // The next operator sees i-004 in service, and none of the drains yet.
    sim.cloud[3] = real;
    let mut drained: std::collections::BTreeSet<String> = first.into_iter().collect();
    for _ in 0..10 {
        drained.extend(drains(sim.pass()));
        let names: Vec<&'static str> = sim.running.values().map(Task::name).collect();
        for name in names {
            sim.finish_all(name, Outcome::Done);
        }
    }
    assert_eq!(drained.len(), 2, "only the first victims go: {drained:?}");
    assert_eq!(sim.serving().len(), 2);
    assert_eq!(sim.launched.len(), launched, "nothing relaunched");
}

fn drains(d: &Decision) -> Vec<String> {
    starts(d)
        .into_iter()
        .filter(|(_, task)| *task == "drain")
        .map(|(node, _)| node)
        .collect()
}

#[test]
fn a_task_that_ends_in_a_retry_is_started_again_only_after_a_rest_that_grows() {
    let mut sim = Sim::new(spec(""));
    sim.spec.capacity.min = 1;
    sim.spec.capacity.max = 1;
    sim.pass();
    sim.pass();
    let node = sim.running.keys().next().cloned().expect("advance started");
    let mut rests = Vec::new();
    for _ in 0..3 {
        sim.finish(&node, Outcome::Retry("target not found yet".into()));
        let d = sim.pass();
        assert!(starts(d).is_empty(), "not at once: {:?}", d.diff.actions);
        let until = sim.memory.retry_after[&node];
        rests.push((until - sim.now).num_seconds());
        sim.now = until;
        assert_eq!(starts(sim.pass()), [(node.clone(), "advance")]);
    }
    assert_eq!(rests, [2, 4, 8]);
}

// ---- once hooks --------------------------------------------------------------

/// `spec` with `release.hooks.once` (a migration).
fn with_once(mut spec: hangar_crds::ClusterSpec) -> hangar_crds::ClusterSpec {
    spec.release.hooks.once = vec!["php artisan migrate --force".into()];
    spec
}

fn running(sim: &Sim, task: &str) -> Vec<String> {
    let mut nodes: Vec<String> = sim
        .running
        .iter()
        .filter(|(_, t)| t.name() == task)
        .map(|(n, _)| n.clone())
        .collect();
    nodes.sort();
    nodes
}

#[test]
fn once_hooks_run_on_exactly_one_node_before_any_node_activates_the_release() {
    let mut sim = settled_fleet(with_min(3));
    sim.spec = with_once(with_release(with_min(3), "v2"));
    let d = sim.pass();
    assert_eq!(d.memory.release.target, "v1", "v2 waits for its once hooks");
    assert!(d.persist_first, "the node given the run is on disk first");
    assert_eq!(
        starts(d),
        [("i-001".to_string(), "once")],
        "the oldest serving node, and only it"
    );
    for _ in 0..3 {
        let d = sim.pass();
        assert!(starts(d).is_empty(), "{:?}", d.diff.actions);
        assert_eq!(running(&sim, "once"), ["i-001"]);
    }
    sim.finish("i-001", Outcome::Done);
    let d = sim.pass();
    assert_eq!(d.memory.release.target, "v2");
    assert_eq!(d.memory.release.once_done, ["v2"]);
    assert_eq!(
        activity(d, "once"),
        ["the once hooks of v2 succeeded".to_string()]
    );
    sim.settle(20);
    assert!(sim
        .serving()
        .iter()
        .all(|i| i.release.as_deref() == Some("v2")));
    let onces = sim
        .decisions
        .iter()
        .flat_map(|d| starts(d))
        .filter(|(_, t)| *t == "once")
        .count();
    assert_eq!(onces, 1, "never run again after they succeeded");
}

#[test]
fn a_restarted_operator_asks_the_node_running_the_once_hooks_again_and_no_other() {
    let mut sim = settled_fleet(with_min(3));
    sim.spec = with_once(with_release(with_min(3), "v2"));
    sim.pass();
    assert_eq!(running(&sim, "once"), ["i-001"]);
    sim.crash();
    // The oldest node is not the obvious choice any more: it is busy
    // in the eyes of no one, and another node would do as well.
    let d = sim.pass();
    assert_eq!(starts(d), [("i-001".to_string(), "once")]);
    sim.crash();
    sim.cloud[0] = sim.cloud[0].clone().launched(t0() + Duration::hours(1));
    let d = sim.pass();
    assert_eq!(
        starts(d),
        [("i-001".to_string(), "once")],
        "the recorded node, not the oldest one now"
    );
}

#[test]
fn a_failing_once_hook_halts_the_rollout_with_the_old_release_serving() {
    let mut sim = settled_fleet(with_min(3));
    sim.spec = with_once(with_release(with_min(3), "v2"));
    sim.pass();
    sim.finish(
        "i-001",
        Outcome::ReleaseFailed {
            release: "v2".into(),
            reason: "hook `php artisan migrate --force` failed: exit status 1".into(),
        },
    );
    let d = sim.pass();
    assert!(rollout::halted(&d.memory.release));
    assert_eq!(d.memory.release.target, "v1");
    assert!(d.memory.release.once_running.is_none());
    for _ in 0..5 {
        let d = sim.pass();
        assert!(starts(d).is_empty(), "{:?}", d.diff.actions);
    }
    assert!(sim
        .serving()
        .iter()
        .all(|i| i.release.as_deref() == Some("v1")));
}

#[test]
fn once_hooks_interrupted_by_a_lost_connection_are_asked_again_on_the_same_node() {
    let mut sim = settled_fleet(with_min(3));
    sim.spec = with_once(with_release(with_min(3), "v2"));
    sim.pass();
    sim.finish("i-001", Outcome::Retry("connection reset".into()));
    let d = sim.pass();
    assert!(starts(d).is_empty(), "it rests first: {:?}", d.diff.actions);
    sim.wait(5);
    let d = sim.pass();
    assert_eq!(starts(d), [("i-001".to_string(), "once")]);
}

#[test]
fn once_hooks_whose_node_is_gone_are_given_to_another_node() {
    let mut sim = settled_fleet(with_min(3));
    sim.spec = with_once(with_release(with_min(3), "v2"));
    sim.pass();
    sim.running.clear();
    sim.cloud[0] = sim.cloud[0].clone().state(InstanceState::Terminated);
    let d = sim.pass();
    assert!(
        activity(d, "once")[0].starts_with("i-001 is gone"),
        "{:?}",
        d.activities
    );
    let d = sim.pass();
    let onces: Vec<_> = starts(d)
        .into_iter()
        .filter(|(_, t)| *t == "once")
        .collect();
    assert_eq!(onces, [("i-002".to_string(), "once")]);
}

#[test]
fn a_first_release_with_once_hooks_holds_new_nodes_before_activation_until_they_ran() {
    let mut sim = Sim::new(with_once(spec("")));
    sim.pass();
    let d = sim.pass();
    assert_eq!(
        starts(d),
        [
            ("i-001".to_string(), "prepare"),
            ("i-002".to_string(), "prepare")
        ],
        "provisioned, but not given a release to activate"
    );
    sim.finish_all("prepare", Outcome::Done);
    let d = sim.pass();
    assert_eq!(starts(d), [("i-001".to_string(), "once")]);
    assert!(
        d.diff
            .notes
            .iter()
            .any(|n| n.contains("waiting for the once hooks of v1")),
        "{:?}",
        d.diff.notes
    );
    assert!(sim.serving().is_empty());
    sim.finish("i-001", Outcome::Done);
    let d = sim.pass();
    assert_eq!(
        starts(d),
        [
            ("i-001".to_string(), "advance"),
            ("i-002".to_string(), "advance")
        ]
    );
    sim.finish_all("advance", Outcome::Done);
    sim.pass();
    assert_eq!(sim.serving().len(), 2);
}

// ---- instance refresh ----------------------------------------------------------

/// Passes until nothing is left to do, finishing every task with `Done`,
/// and checks after each pass that the fleet never served with fewer than
/// `floor` nodes nor ran more than `ceiling` machines.
fn refresh_within(sim: &mut Sim, floor: usize, ceiling: usize, passes: usize) {
    for _ in 0..passes {
        let quiet = sim.pass().diff.actions.is_empty();
        let alive = sim
            .cloud
            .iter()
            .filter(|i| i.state != InstanceState::Terminated)
            .count();
        assert!(
            sim.serving().len() >= floor,
            "{} serving",
            sim.serving().len()
        );
        assert!(alive <= ceiling, "{alive} machines");
        let names: Vec<&'static str> = sim.running.values().map(Task::name).collect();
        for name in names {
            sim.finish_all(name, Outcome::Done);
        }
        if quiet && sim.running.is_empty() {
            return;
        }
    }
    panic!("no end to the refresh after {passes} passes");
}

#[test]
fn a_change_of_launch_settings_replaces_every_node_surge_first_never_below_desired() {
    let mut sim = settled_fleet(with_min(3));
    let old: Vec<String> = sim.serving().iter().map(|i| i.id.clone()).collect();
    sim.spec.instances.instance_type = Some("m7i.large".into());
    let d = sim.pass();
    assert_eq!(launches(d).len(), 1, "one surge node first: {:?}", d.diff);
    assert!(starts(d).is_empty(), "nothing drained before it serves");
    assert!(
        d.diff
            .notes
            .iter()
            .any(|n| n == "instance refresh: 0 of 3 replaced, surge first"),
        "{:?}",
        d.diff.notes
    );
    refresh_within(&mut sim, 3, 4, 60);
    let now: Vec<String> = sim.serving().iter().map(|i| i.id.clone()).collect();
    assert_eq!(now.len(), 3);
    assert!(now.iter().all(|id| !old.contains(id)), "{old:?} → {now:?}");
    let hash = crate::core::launches::settings_hash(&sim.spec.instances, "1");
    assert!(sim
        .serving()
        .iter()
        .all(|i| i.tags.get(tags::LAUNCH) == Some(&hash)));
    assert_eq!(sim.launched.len(), 2 + 3, "cold start, then one per node");
}

#[test]
fn nodes_older_than_max_lifetime_are_replaced_one_at_a_time_and_the_new_ones_stay() {
    let mut s = with_min(3);
    s.instances.max_lifetime = Some(hangar_crds::Duration::from_secs(24 * 3600));
    let mut sim = settled_fleet(s);
    let old: Vec<String> = sim.serving().iter().map(|i| i.id.clone()).collect();
    let launched = sim.launched.len();
    sim.wait(20 * 3600);
    let d = sim.pass();
    assert!(d.diff.actions.is_empty(), "young enough: {:?}", d.diff);
    assert_eq!(sim.launched.len(), launched);
    sim.wait(5 * 3600);
    refresh_within(&mut sim, 3, 4, 60);
    let now: Vec<String> = sim.serving().iter().map(|i| i.id.clone()).collect();
    assert!(now.iter().all(|id| !old.contains(id)), "{old:?} → {now:?}");
    // The new nodes are young: a pass later nothing moves.
    sim.wait(60);
    assert!(sim.pass().diff.actions.is_empty());
}

/// A fleet launched at once reaches its lifetime at once; each node is
/// due a little earlier within the lifetime's last tenth, so the
/// replacements are spread over hours instead of one after the other.
#[test]
fn a_fleet_launched_together_reaching_max_lifetime_is_replaced_spread_over_its_last_tenth() {
    let mut s = with_min(3);
    s.instances.max_lifetime = Some(hangar_crds::Duration::from_secs(24 * 3600));
    let mut sim = settled_fleet(s);
    let start = sim.now;
    let old: Vec<String> = sim.serving().iter().map(|i| i.id.clone()).collect();
    assert_eq!(old.len(), 3);
    // Minutes after the launch at which each old node left service.
    let mut replaced_at = std::collections::BTreeMap::<String, i64>::new();
    sim.wait(21 * 3600);
    // Every 5 minutes, from 21 h to 24 h: the fleet settles, one batch at a time.
    for _ in 0..=36 {
        refresh_within(&mut sim, 3, 4, 60);
        let minutes = (sim.now - start).num_minutes();
        for id in &old {
            if !sim.serving().iter().any(|i| &i.id == id) {
                replaced_at.entry(id.clone()).or_insert(minutes);
            }
        }
        sim.wait(300);
    }
    assert_eq!(
        replaced_at.len(),
        3,
        "all replaced by 24 h: {replaced_at:?}"
    );
    assert!(
        replaced_at.values().all(|m| *m >= 21 * 60 + 36),
        "none before the last tenth (21 h 36 m): {replaced_at:?}"
    );
    let first = replaced_at.values().min().copied().unwrap_or_default();
    let last = replaced_at.values().max().copied().unwrap_or_default();
    assert!(
        last - first >= 30,
        "spread out, not one right after the other: {replaced_at:?}"
    );
}

/// Two nodes settled, then a third launched under a lagging listing: known
/// from hangar's launch answer only, its task started.
fn a_third_node_only_hangar_knows() -> (Sim, String) {
    let mut sim = settled_fleet(with_min(2));
    sim.lagging = true;
    sim.spec.capacity.min = 3;
    sim.pass();
    assert_eq!(sim.launched.len(), 3, "the third node");
    let young = sim
        .own
        .last()
        .cloned()
        .expect("known from the launch answer");
    sim.pass();
    (sim, young)
}

#[test]
fn a_launched_node_that_dies_before_the_listing_shows_it_is_replaced_within_a_minute() {
    let (mut sim, young) = a_third_node_only_hangar_knows();
    // Terminated behind hangar's back before any listing showed it: EC2
    // then lists it only as `terminated`, which hangar's listing leaves out.
    let i = sim.cloud.iter_mut().find(|i| i.id == young).unwrap();
    i.state = InstanceState::Terminated;
    sim.own.clear();
    sim.running.clear();
    sim.wait(20);
    sim.pass();
    assert_eq!(sim.launched.len(), 3, "a listing may still be catching up");
    sim.wait(60);
    sim.pass();
    assert_eq!(sim.launched.len(), 4, "replaced, not waiting for minutes");
}

/// Seen on the local cloud: a node launched, then scaled in within a
/// second, before any listing showed it. Its launch intent kept counting it
/// as capacity coming, and the next scale-out launched nothing until the
/// intent's grace ran out.
#[test]
fn a_node_scaled_in_before_the_listing_showed_it_leaves_no_phantom_capacity() {
    let (mut sim, young) = a_third_node_only_hangar_knows();
    sim.spec.capacity.min = 2;
    // Its bring-up is cancelled, then it is drained.
    let drained = (0..3).any(|_| {
        sim.wait(1);
        let d = sim.pass();
        starts(d).contains(&(young.clone(), "drain"))
    });
    assert!(drained, "the node not yet serving is the one to go");
    sim.finish(&young, Outcome::Done);
    sim.pass();
    sim.spec.capacity.min = 3;
    sim.wait(1);
    sim.pass();
    assert_eq!(
        sim.launched.len(),
        4,
        "the terminated node is not counted as coming: a new one is launched at once"
    );
}

#[test]
fn a_new_latest_template_version_replaces_the_fleet_without_a_spec_change() {
    let mut sim = settled_fleet(with_min(2));
    // The version cannot be read for a pass: nothing is judged on it.
    sim.template_version = None;
    assert!(sim.pass().diff.actions.is_empty());
    // `$Latest` now names version 2 (a patched AMI).
    sim.template_version = Some("2".into());
    let d = sim.pass();
    assert_eq!(launches(d).len(), 1, "{:?}", d.diff);
    refresh_within(&mut sim, 2, 3, 60);
    let hash = crate::core::launches::settings_hash(&sim.spec.instances, "2");
    assert!(sim
        .serving()
        .iter()
        .all(|i| i.tags.get(tags::LAUNCH) == Some(&hash)));
}

#[test]
fn an_update_still_running_when_an_auto_rollback_starts_is_rolled_back_too() {
    let mut sim = settled_fleet(with_min(3));
    sim.spec = with_release(with_min(3), "v2");
    sim.spec.release.rollback = Some(
        serde_saphyr::from_str("{ errorRateAbove: 0.05, window: 5m, minRequests: 20 }")
            .expect("rollback parses"),
    );
    // The first node is updated and serves v2; the second's update runs.
    sim.pass();
    sim.finish_all("update", Outcome::Done);
    sim.pass();
    let updating = running(&sim, "update");
    assert_eq!(updating.len(), 1, "{:?}", sim.running);
    // v2 raises 5xx: the one node serving it goes back at once…
    sim.errors(30.0, 100.0);
    sim.wait(15);
    let d = sim.pass();
    assert_eq!(d.memory.release.rolling_back_from.as_deref(), Some("v2"));
    sim.finish_all("rollback", Outcome::Done);
    sim.pass();
    // …and the update that was under way when the rollback began was
    // asked to stop, but past its last safe point: it ends on v2, serving.
    // It must go back as well, not stay on the bad release.
    let late = sim.cloud.iter_mut().find(|i| i.id == updating[0]).unwrap();
    *late = late.clone().serving("v2");
    sim.settle(10);
    assert!(
        sim.serving()
            .iter()
            .all(|i| i.release.as_deref() == Some("v1")),
        "{:?}",
        sim.serving()
            .iter()
            .map(|i| (&i.id, &i.release))
            .collect::<Vec<_>>()
    );
}

// --- warm pool -------------------------------------------------------------

/// Capacity `[min, max]` with a warm pool of `size` (`extra`: more
/// `warmPool` fields, e.g. `reuseOnScaleIn: true`).
fn with_pool(min: u32, max: u32, size: u32, extra: &str) -> hangar_crds::ClusterSpec {
    let mut s = spec(&format!("  warmPool: {{ size: {size}{extra} }}\n"));
    s.capacity.min = min;
    s.capacity.max = max;
    s
}

fn warm(sim: &Sim) -> Vec<&Instance> {
    sim.cloud
        .iter()
        .filter(|i| i.phase == Some(Phase::Warm) && i.state != InstanceState::Terminated)
        .collect()
}

fn machines(sim: &Sim) -> usize {
    sim.cloud
        .iter()
        .filter(|i| i.state != InstanceState::Terminated)
        .count()
}

/// Passes (finishing every task with `Done`) until nothing moves, checking
/// after each that at most `ceiling` machines exist, at least `floor`
/// serve, and no pool node is counted or serving.
fn pool_within(sim: &mut Sim, floor: usize, ceiling: usize, passes: usize) {
    for _ in 0..passes {
        let d = sim.pass();
        let quiet = d.diff.actions.is_empty();
        let counted = d.diff.counted;
        let desired = d.memory.desired;
        assert!(machines(sim) <= ceiling, "{} machines", machines(sim));
        assert!(
            sim.serving().len() >= floor,
            "{} serving",
            sim.serving().len()
        );
        assert!(
            counted <= desired + 1,
            "counted {counted}, desired {desired}"
        );
        for i in warm(sim) {
            assert!(!sim.serving().iter().any(|s| s.id == i.id));
        }
        if quiet && sim.running.is_empty() {
            return;
        }
        let names: Vec<&'static str> = sim.running.values().map(Task::name).collect();
        for name in names {
            sim.finish_all(name, Outcome::Done);
        }
    }
    panic!("not settled after {passes} passes");
}

#[test]
fn the_warm_pool_fills_after_the_fleet_is_in_service_and_never_exceeds_max_plus_size() {
    let mut sim = Sim::new(with_pool(3, 3, 2, ""));
    let d = sim.pass();
    let first: u32 = launches(d).iter().map(|(_, n)| n).sum();
    assert_eq!(first, 3, "the fleet first, the pool later");
    sim.pass();
    sim.finish_all("advance", Outcome::Done);
    assert_eq!(sim.serving().len(), 3);
    let d = sim.pass();
    let pool: u32 = launches(d).iter().map(|(_, n)| n).sum();
    assert_eq!(pool, 2, "{:?}", d.diff.notes);
    // Listed: the pool nodes go to the pool, not into service.
    let d = sim.pass();
    assert_eq!(
        starts(d),
        [("i-004".to_string(), "warm"), ("i-005".to_string(), "warm")]
    );
    assert_eq!(d.diff.counted, 3, "pool nodes are not capacity");
    pool_within(&mut sim, 3, 5, 20);
    assert_eq!(sim.serving().len(), 3);
    let w = warm(&sim);
    assert_eq!(w.len(), 2);
    assert!(w.iter().all(|i| i.state == InstanceState::Stopped));
    let d = sim.pass();
    assert!(d.diff.actions.is_empty(), "{:?}", d.diff);
    assert_eq!((d.diff.counted, d.diff.warm), (3, 2));
    assert!(
        d.diff
            .notes
            .iter()
            .any(|n| n == "warm pool: 2 of 2 ready (stopped), 0 on the way"),
        "{:?}",
        d.diff.notes
    );
    assert_eq!(sim.launched.iter().map(|(_, n)| n).sum::<u32>(), 5);
}

#[test]
fn scale_out_takes_warm_nodes_before_launching_then_refills_the_pool() {
    let mut sim = Sim::new(with_pool(2, 4, 2, ""));
    pool_within(&mut sim, 0, 4, 20);
    let pooled: Vec<String> = warm(&sim).iter().map(|i| i.id.clone()).collect();
    let launched = sim.launched.len();
    sim.spec.capacity.min = 4;
    let d = sim.pass();
    assert!(launches(d).is_empty(), "no cold launch: {:?}", d.diff);
    let mut want: Vec<(String, &str)> = pooled.iter().map(|id| (id.clone(), "serve")).collect();
    want.sort();
    assert_eq!(starts(d), want);
    sim.finish_all("serve", Outcome::Done);
    assert!(pooled
        .iter()
        .all(|id| sim.serving().iter().any(|s| &s.id == id)));
    assert_eq!(sim.launched.len(), launched);
    // Then the pool refills, within max + size.
    pool_within(&mut sim, 4, 6, 20);
    assert_eq!((sim.serving().len(), warm(&sim).len()), (4, 2));
}

#[test]
fn a_warm_node_on_an_old_release_is_left_alone_by_the_rollout_and_updated_when_it_serves() {
    let mut sim = Sim::new(with_pool(2, 4, 1, ""));
    pool_within(&mut sim, 0, 5, 20);
    let pooled = warm(&sim)[0].id.clone();
    sim.spec = with_release(sim.spec.clone(), "v2");
    pool_within(&mut sim, 1, 5, 40);
    assert!(sim
        .serving()
        .iter()
        .all(|i| i.release.as_deref() == Some("v2")));
    let w = warm(&sim);
    assert_eq!(w[0].id, pooled, "the rollout does not touch the pool");
    assert_eq!(w[0].release.as_deref(), Some("v1"));
    sim.spec.capacity.min = 3;
    let d = sim.pass();
    assert_eq!(starts(d), [(pooled.clone(), "serve")]);
    // It serves the target release, shipped by the task before it registers.
    assert_eq!(d.memory.release.target, "v2");
    let steps = crate::core::lifecycle::steps(
        &Task::Serve,
        Phase::Warm,
        crate::core::lifecycle::NodeFacts {
            config_outdated: true,
            warmup: false,
        },
    );
    use crate::core::lifecycle::Step;
    let at = |s: &Step| steps.iter().position(|x| x == s).expect("present");
    assert!(at(&Step::Provision) < at(&Step::Activate));
    assert!(at(&Step::Ship) < at(&Step::HealthCheck));
    assert!(at(&Step::HealthCheck) < at(&Step::Register));
    sim.finish(&pooled, Outcome::Done);
    assert!(sim
        .serving()
        .iter()
        .any(|i| i.id == pooled && i.release.as_deref() == Some("v2")));
}

#[test]
fn reuse_on_scale_in_returns_a_drained_victim_to_the_pool_and_terminates_it_when_the_pool_is_full()
{
    let mut sim = Sim::new(with_pool(3, 4, 2, ", reuseOnScaleIn: true"));
    pool_within(&mut sim, 0, 6, 20);
    // One warm node goes into service; before the pool refills, traffic falls.
    sim.spec.capacity.min = 4;
    sim.pass();
    sim.finish_all("serve", Outcome::Done);
    assert_eq!((sim.serving().len(), warm(&sim).len()), (4, 1));
    sim.spec.capacity.min = 3;
    let d = sim.pass();
    assert!(launches(d).is_empty());
    let back: Vec<(String, &str)> = starts(d);
    assert_eq!(back.len(), 1);
    assert_eq!(
        back[0].1, "warm",
        "drained back into the pool: {:?}",
        d.diff
    );
    let victim = back[0].0.clone();
    assert!(matches!(
        sim.running.get(&victim),
        Some(Task::Warm { stop: true })
    ));
    // Drained first: the Warm task from in-service deregisters before the stop.
    let steps = crate::core::lifecycle::steps(
        &Task::Warm { stop: true },
        Phase::InService,
        Default::default(),
    );
    use crate::core::lifecycle::Step;
    let at = |s: &Step| steps.iter().position(|x| x == s).expect("present");
    assert!(at(&Step::Deregister) < at(&Step::StopInstance));
    sim.finish(&victim, Outcome::Done);
    assert_eq!((sim.serving().len(), warm(&sim).len()), (3, 2));
    // The pool is full now: the next victim is terminated.
    sim.spec.capacity.min = 2;
    let d = sim.pass();
    let gone = starts(d);
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0].1, "drain", "{:?}", d.diff);
    pool_within(&mut sim, 2, 6, 20);
    assert_eq!((sim.serving().len(), warm(&sim).len()), (2, 2));
}

/// Seen in e2e `warm_nodes_serve_scale_outs_…_survive_kill_9` once the local
/// LB registered targets as fast as an ALB: an operator killed while a
/// scale-in victim drained into a pool that had room came back, finished
/// the drain as a termination, and refilled the pool while the victim was
/// still there — max + size + 1 machines.
#[test]
fn the_pool_refills_within_max_plus_size_counting_a_node_still_leaving() {
    let mut sim = Sim::new(with_pool(3, 3, 2, ", reuseOnScaleIn: true"));
    pool_within(&mut sim, 0, 5, 20);
    assert_eq!((sim.serving().len(), warm(&sim).len()), (3, 2));
    // Fewer nodes and a bigger pool: a victim drains back into the pool…
    sim.spec.capacity.min = 2;
    sim.spec.capacity.max = 2;
    if let Some(p) = sim.spec.warm_pool.as_mut() {
        p.size = 3;
    }
    let d = sim.pass();
    let back: Vec<(String, &str)> = starts(d);
    assert_eq!(back.len(), 1, "{:?}", d.diff);
    let victim = back[0].0.clone();
    // …and the operator is killed while it drains.
    if let Some(i) = sim.cloud.iter_mut().find(|i| i.id == victim) {
        i.phase = Some(Phase::Draining);
    }
    sim.crash();
    let d = sim.pass();
    assert!(
        starts(d).contains(&(victim.clone(), "drain")),
        "the cut drain is finished as a termination: {:?}",
        d.diff
    );
    assert!(
        launches(d).is_empty(),
        "no pool launch while the victim is still there: {:?}",
        d.diff.notes
    );
    assert!(machines(&sim) <= 5);
    pool_within(&mut sim, 2, 5, 20);
    assert_eq!((sim.serving().len(), warm(&sim).len()), (2, 3));
}

#[test]
fn crashes_on_the_way_into_and_out_of_the_pool_converge() {
    let mut sim = Sim::new(with_pool(2, 3, 2, ""));
    sim.pass();
    sim.pass();
    sim.finish_all("advance", Outcome::Done);
    sim.pass(); // pool launches
    sim.pass(); // Warm tasks start
    assert_eq!(running(&sim, "warm").len(), 2);
    // Killed while bringing nodes into the pool: the tasks are gone, the
    // nodes are surplus again and sent on to the pool.
    sim.crash();
    sim.catch_up();
    let d = sim.pass();
    assert_eq!(starts(d).iter().filter(|(_, t)| *t == "warm").count(), 2);
    assert!(launches(d).is_empty());
    pool_within(&mut sim, 2, 5, 20);
    // Killed between the `warm` tag and the stop: the next pass stops it.
    let id = warm(&sim)[0].id.clone();
    if let Some(i) = sim.cloud.iter_mut().find(|i| i.id == id) {
        i.state = InstanceState::Running;
    }
    sim.crash();
    let d = sim.pass();
    assert_eq!(starts(d), [(id.clone(), "warm")]);
    pool_within(&mut sim, 2, 5, 20);
    // Killed while taking a warm node into service (it was started): the
    // same node is taken again, nothing is launched for it.
    sim.spec.capacity.min = 3;
    let d = sim.pass();
    let served = starts(d);
    assert_eq!(served.len(), 1);
    let node = served[0].0.clone();
    if let Some(i) = sim.cloud.iter_mut().find(|i| i.id == node) {
        i.state = InstanceState::Running;
    }
    let launched = sim.launched.len();
    sim.crash();
    let d = sim.pass();
    assert_eq!(starts(d), [(node, "serve")]);
    assert!(launches(d).is_empty());
    assert_eq!(sim.launched.len(), launched);
    pool_within(&mut sim, 2, 5, 20);
    assert_eq!((sim.serving().len(), warm(&sim).len()), (3, 2));
}

#[test]
fn a_warm_node_stale_by_launch_settings_is_terminated_and_the_pool_refills() {
    let mut sim = Sim::new(with_pool(2, 3, 1, ""));
    pool_within(&mut sim, 0, 4, 20);
    let old = warm(&sim)[0].id.clone();
    sim.spec.instances.instance_type = Some("m7i.large".into());
    pool_within(&mut sim, 2, 5, 80);
    let w = warm(&sim);
    assert_eq!(w.len(), 1);
    assert_ne!(w[0].id, old);
    assert!(sim
        .cloud
        .iter()
        .any(|i| i.id == old && i.state == InstanceState::Terminated));
}

#[test]
fn without_a_pool_leftover_warm_nodes_are_terminated() {
    let mut sim = Sim::new(with_pool(2, 3, 2, ""));
    pool_within(&mut sim, 0, 5, 20);
    sim.spec.warm_pool = None;
    let d = sim.pass();
    assert_eq!(starts(d).iter().filter(|(_, t)| *t == "drain").count(), 2);
    pool_within(&mut sim, 2, 5, 20);
    assert!(warm(&sim).is_empty());
    assert_eq!(sim.serving().len(), 2);
}

#[test]
fn a_restarted_operator_whose_listing_still_shows_a_served_warm_node_stopped_leaves_it_serving() {
    let mut sim = Sim::new(with_pool(2, 4, 1, ""));
    pool_within(&mut sim, 0, 3, 20);
    let pooled = warm(&sim)[0].id.clone();
    sim.spec.capacity.min = 3;
    let d = sim.pass();
    assert_eq!(starts(d), [(pooled.clone(), "serve")]);
    sim.finish_all("serve", Outcome::Done);
    pool_within(&mut sim, 3, 4, 20);
    sim.crash();
    // EC2's listing shows the start late: in service, yet `stopped`.
    let set_state = |sim: &mut Sim, state| {
        sim.cloud
            .iter_mut()
            .find(|i| i.id == pooled)
            .expect("listed")
            .state = state;
    };
    set_state(&mut sim, InstanceState::Stopped);
    let launched = sim.launched.len();
    for _ in 0..3 {
        let d = sim.pass();
        assert!(d.diff.actions.is_empty(), "{:?}", d.diff);
        assert!(d.memory.listed_stopped.contains_key(&pooled));
        sim.wait(3);
    }
    set_state(&mut sim, InstanceState::Running);
    let d = sim.pass();
    assert!(d.diff.actions.is_empty(), "{:?}", d.diff);
    assert!(
        d.memory.listed_stopped.is_empty(),
        "forgotten once listed running"
    );
    assert_eq!(sim.launched.len(), launched, "nothing replaced it");

    // Really stopped (behind hangar's back): replaced once that lasted.
    set_state(&mut sim, InstanceState::Stopped);
    assert!(drains(sim.pass()).is_empty());
    sim.wait(fleet::STOPPED_BELIEVED_AFTER.num_seconds());
    assert_eq!(drains(sim.pass()), [pooled]);
}

/// The ids of the nodes serving now, oldest first.
fn serving_ids(sim: &Sim) -> Vec<String> {
    let mut ids: Vec<String> = sim.serving().iter().map(|i| i.id.clone()).collect();
    ids.sort();
    ids
}

#[test]
fn a_serving_node_taken_out_of_the_target_group_behind_hangars_back_is_registered_again() {
    let mut sim = settled_fleet(with_min(2));
    let ids = serving_ids(&sim);
    // Someone deregistered the first node: the group lists only the second.
    sim.target_group = Some(vec![ids[1].clone()]);
    let d = sim.pass();
    assert!(
        starts(d).is_empty(),
        "not at the first read: {:?}",
        d.diff.actions
    );
    assert!(
        d.diff.notes.iter().any(|n| n.starts_with(&format!(
            "{} is tagged in service but the target group has not listed it for 0s",
            ids[0]
        ))),
        "{:?}",
        d.diff.notes
    );
    sim.wait(10);
    let d = sim.pass();
    assert_eq!(starts(d), [(ids[0].clone(), "rejoin")]);
    assert!(launches(d).is_empty(), "no new machine for it");
    // While its task runs, nothing else is started for it.
    assert!(starts(sim.pass()).is_empty());
    sim.finish_all("rejoin", Outcome::Done);
    sim.target_group = Some(ids.clone());
    let d = sim.pass();
    assert!(starts(d).is_empty(), "{:?}", d.diff.actions);
    assert!(d.memory.missing_from_group.is_empty());
    assert_eq!(serving_ids(&sim), ids, "the same machines serve");
}

#[test]
fn a_node_that_fails_its_health_check_on_the_way_back_is_replaced() {
    let mut sim = settled_fleet(with_min(2));
    let ids = serving_ids(&sim);
    sim.target_group = Some(vec![ids[1].clone()]);
    sim.pass();
    sim.wait(10);
    sim.pass();
    sim.finish_all(
        "rejoin",
        Outcome::NodeFailed("health check: connection refused".into()),
    );
    let d = sim.pass();
    assert_eq!(starts(d), [(ids[0].clone(), "drain")]);
    assert_eq!(launches(d).len(), 1, "{:?}", d.diff.actions);
}

#[test]
fn only_an_idle_in_service_node_missing_from_a_group_read_is_rejoined() {
    // Never read: nothing is known to be missing.
    let mut sim = settled_fleet(with_min(2));
    let ids = serving_ids(&sim);
    sim.wait(10);
    assert!(starts(sim.pass()).is_empty());
    // A node with a task of its own (here an update, which deregisters it
    // on purpose) is that task's business.
    sim.running.insert(
        ids[0].clone(),
        Task::Update {
            release: "v1".into(),
        },
    );
    sim.target_group = Some(Vec::new());
    sim.pass();
    sim.wait(10);
    let d = sim.pass();
    assert_eq!(starts(d), [(ids[1].clone(), "rejoin")]);
}

#[test]
fn a_node_missing_from_the_group_whose_listing_then_shows_an_earlier_phase_is_not_rejoined() {
    // A restarted operator's listing still shows `in-service` for a node an
    // update had taken out and tagged `releasing` before the crash.
    let mut sim = settled_fleet(with_min(2));
    let ids = serving_ids(&sim);
    sim.target_group = Some(vec![ids[1].clone()]);
    sim.pass();
    // Seconds later the listing shows the truth.
    if let Some(i) = sim.cloud.iter_mut().find(|i| i.id == ids[0]) {
        *i = i.clone().phase(Phase::Releasing);
    }
    sim.wait(10);
    let d = sim.pass();
    assert_eq!(
        starts(d),
        [(ids[0].clone(), "advance")],
        "the usual path from releasing, which asks the group itself: {:?}",
        d.diff.actions
    );
    assert!(d.memory.missing_from_group.is_empty());
}

#[test]
fn a_rollout_counts_a_node_missing_from_the_target_group_as_unavailable() {
    let mut sim = settled_fleet(with_min(2));
    let ids = serving_ids(&sim);
    sim.target_group = Some(vec![ids[1].clone()]);
    sim.spec = with_release(with_min(2), "v2");
    let d = sim.pass();
    // maxUnavailable 1, and one node is out already: updating the other
    // would leave the load balancer nothing to route to.
    assert!(starts(d).is_empty(), "{:?}", d.diff.actions);
    sim.wait(10);
    let d = sim.pass();
    assert_eq!(
        starts(d),
        [(ids[0].clone(), "rejoin")],
        "{:?}",
        d.diff.actions
    );
    sim.finish_all("rejoin", Outcome::Done);
    sim.target_group = Some(ids.clone());
    let d = sim.pass();
    assert_eq!(
        starts(d).iter().filter(|(_, t)| *t == "update").count(),
        1,
        "back in: the rollout goes on, one at a time: {:?}",
        d.diff.actions
    );
}
