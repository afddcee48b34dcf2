//! Two operators, one leader: a DynamoDB lease with fencing, and a standby
//! that takes over. Every scenario runs two `hangar run` processes for the
//! same owner id against the local cloud, each signing with its own access
//! key (a restarted one with a new key), while the invariant watcher looks
//! at the cloud and the load balancer throughout.

use std::time::{Duration, Instant};

use hangar_local::artifact::ReleaseKind;
use rand::{RngExt, SeedableRng};

use crate::support::ha::{mutating_calls, percentiles, HaOperators, LeaseTiming};
use crate::support::operator::log_lines;
use crate::support::{seed, settled_on, Scenario};

/// Kills per phase (scale out, scale in, roll out): 7 makes the default
/// run's 21; `HANGAR_E2E_FAILOVER_KILLS=N` for more.
fn kills_per_phase() -> u32 {
    std::env::var("HANGAR_E2E_FAILOVER_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7)
}

/// Starts a leader, then a standby; returns the leader's index.
fn leader_and_standby(s: &Scenario, ops: &mut HaOperators) -> usize {
    let first = ops.start(s);
    let (leader, _) = ops.wait_leader(Duration::from_secs(30));
    assert_eq!(leader, first);
    let second = ops.start(s);
    ops.wait_standby(second, Duration::from_secs(30));
    leader
}

#[test]
fn killed_leaders_are_replaced_within_the_lease_and_nothing_is_launched_twice_or_cut_off() {
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let s = Scenario::start();
    let timing = LeaseTiming::brisk();
    let mut ops = HaOperators::new(timing);
    let base = s.spec().remove("spec.autoscaling");
    let v1 = s.cloud.first_release().clone();
    s.write_spec(&base.clone().with_capacity(2, 2));
    leader_and_standby(&s, &mut ops);
    ops.wait_status("web", "2 in service", Duration::from_secs(120), |st| {
        settled_on(st, 2, &v1.id)
    });
    let load = s.cloud.start_load(5.0, None).expect("load");
    let v2 = s.cloud.upload_release("v2", ReleaseKind::Good).expect("v2");
    let phases = [
        (
            "scale out to 4",
            base.clone().with_release(&v1).with_capacity(4, 4),
            4,
            &v1,
        ),
        (
            "scale in to 2",
            base.clone().with_release(&v1).with_capacity(2, 2),
            2,
            &v1,
        ),
        (
            "roll out v2",
            base.clone().with_release(&v2).with_capacity(2, 2),
            2,
            &v2,
        ),
    ];
    let mut takeovers = Vec::new();
    let started = Instant::now();
    for (what, spec, nodes, release) in phases {
        s.write_spec(&spec);
        for _ in 0..kills_per_phase() {
            let after = Duration::from_millis(rng.random_range(200..2500));
            std::thread::sleep(after);
            let (leader, _) = ops.wait_leader(timing.takeover_bound());
            let killed = ops.kill(leader);
            let at = Instant::now();
            // The replacement starts while the standby waits out the lease,
            // so the next kill finds it ready. Either may win: each takes
            // over once it has itself seen the record unrenewed for a
            // whole lease.
            ops.start(&s);
            let (next, _) = ops.wait_leader(timing.takeover_bound());
            let took = at.elapsed();
            takeovers.push(took);
            eprintln!(
                "seed {seed}: {what}: kill -9 {killed} #{} after {after:?}: {} took over in {took:?}",
                takeovers.len(),
                ops.ops[next].name
            );
            assert!(
                at.elapsed() <= timing.takeover_bound(),
                "seed {seed}: takeover within lease + 5 s"
            );
            for other in (0..ops.ops.len()).filter(|&i| i != next) {
                ops.wait_standby(other, Duration::from_secs(10));
            }
            s.watcher.assert_invariants();
        }
        ops.wait_status("web", what, Duration::from_secs(180), |st| {
            settled_on(st, nodes, &release.id)
        });
        assert_eq!(
            s.instances("web").len(),
            nodes as usize,
            "{what}: no orphan (seed {seed})"
        );
        s.watcher.assert_invariants();
    }
    let report = load.stop();
    let wall = started.elapsed();
    assert_eq!(
        report.errors,
        0,
        "seed {seed}: no request lost across {} failovers: {report:?}",
        takeovers.len()
    );
    s.watcher.assert_invariants();
    let watch = s.watcher.report();
    let log_of = |ops: &HaOperators| {
        ops.ops
            .iter()
            .map(|o| log_lines(&o.log, &["launch", "leading"]))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        watch.launched.len(),
        4,
        "seed {seed}: no double launch: {watch:?}\n{}",
        log_of(&ops)
    );
    assert_eq!(watch.terminated.len(), 2, "seed {seed}: {watch:?}");
    // Only ever one actor: a process that never led made no mutating call
    // but the lease's own conditional PutItem (a standby started during a
    // takeover may try for the lease and lose the race; the condition
    // decides, and nothing else follows).
    let calls = s.cloud.api_calls();
    for op in &ops.ops {
        if op.leads() {
            continue;
        }
        let mut made = mutating_calls(&calls, &op.name);
        made.remove("dynamodb:PutItem");
        assert!(
            made.is_empty(),
            "the standby {} made mutating calls: {made:?}",
            op.name
        );
    }
    let (p50, p95, max) = percentiles(&takeovers);
    eprintln!(
        "seed {seed}: {} kills, takeover p50 {p50:?} p95 {p95:?} max {max:?}, {} requests / 0 failed, \
         4 launches, 2 terminations, 0 breaches, {wall:?} from the first kill",
        takeovers.len(),
        report.sent
    );
    assert!(takeovers.len() >= 21);
}

#[test]
fn a_paused_leader_wakes_as_a_standby_without_a_single_mutating_call() {
    let s = Scenario::start();
    let timing = LeaseTiming::fast();
    let mut ops = HaOperators::new(timing);
    let base = s.spec().remove("spec.autoscaling");
    s.write_spec(&base.clone().with_capacity(2, 2));
    let leader = leader_and_standby(&s, &mut ops);
    ops.wait_status("web", "2 in service", Duration::from_secs(120), |st| {
        settled_on(st, 2, "v1")
    });
    // Busy: two nodes coming up when the leader is frozen.
    s.write_spec(&base.clone().with_capacity(4, 4));
    let old = ops.ops[leader].name.clone();
    ops.wait_status(
        "web",
        "the scale-out under way",
        Duration::from_secs(30),
        |st| st.nodes.iter().any(|n| n.task.is_some()),
    );
    ops.ops[leader].pause();
    let stopped = Instant::now();
    let (next, took) = ops.wait_leader(timing.takeover_bound());
    assert_ne!(next, leader);
    eprintln!(
        "{old} stopped; {} took over in {took:?}",
        ops.ops[next].name
    );
    // Stopped well past its lease; the new leader acts meanwhile.
    while stopped.elapsed() < timing.lease * 2 {
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = mutating_calls(&s.cloud.api_calls(), &old);
    ops.ops[leader].resume();
    let woke = Instant::now();
    // It knows at once that its term is over, then reads who leads now.
    let noticed = ops.wait_standby(leader, Duration::from_secs(10));
    let successor = ops.ops[next].name.clone();
    hangar_local::eventually(
        Duration::from_secs(10),
        "the woken one names its successor",
        || {
            let view = ops.ops[leader].leader_view()?;
            (view.leader.as_deref() == Some(successor.as_str())).then_some(())
        },
    )
    .expect("it reads the new leader");
    // Give whatever it had in flight every chance to go out.
    std::thread::sleep(Duration::from_secs(3));
    let after = mutating_calls(&s.cloud.api_calls(), &old);
    assert_eq!(
        before,
        after,
        "{old} made mutating calls after waking:\n{}",
        crate::support::operator::log_tail(&ops.ops[leader].log, 80)
    );
    let refused = log_lines(&ops.ops[leader].log, &["refused", "not run", "not started"]);
    eprintln!(
        "{old}: standby {noticed:?} after SIGCONT ({:?}); mutating calls before = after = {}; \
         what it held back:\n{refused}",
        woke.elapsed(),
        before.values().sum::<u64>()
    );
    ops.wait_status("web", "4 in service", Duration::from_secs(120), |st| {
        settled_on(st, 4, "v1")
    });
    s.watcher.assert_invariants();
    assert_eq!(s.watcher.report().launched.len(), 4, "no double launch");
    assert!(ops.ops[leader].is_standby(), "still a standby");
}

#[test]
fn a_leader_cut_off_from_dynamodb_stops_acting_within_the_renew_deadline() {
    let s = Scenario::start();
    let timing = LeaseTiming::fast();
    let mut ops = HaOperators::new(timing);
    let base = s.spec().remove("spec.autoscaling");
    s.write_spec(&base.clone().with_capacity(2, 2));
    let leader = leader_and_standby(&s, &mut ops);
    ops.wait_status("web", "2 in service", Duration::from_secs(120), |st| {
        settled_on(st, 2, "v1")
    });
    s.write_spec(&base.clone().with_capacity(4, 4));
    ops.wait_status(
        "web",
        "the scale-out under way",
        Duration::from_secs(30),
        |st| st.nodes.iter().any(|n| n.task.is_some()),
    );
    let old = ops.ops[leader].name.clone();
    s.cloud.block(&old, "dynamodb");
    let cut = Instant::now();
    let stopped = ops.wait_standby(leader, timing.renew_deadline + Duration::from_secs(2));
    eprintln!("{old} cut off from DynamoDB: stopped acting after {stopped:?}");
    assert!(
        stopped <= timing.renew_deadline + Duration::from_millis(200),
        "stopped {stopped:?} after the cut, renew deadline {:?}",
        timing.renew_deadline
    );
    // EC2 still answers it: it must not use it.
    let quiet_from = mutating_calls(&s.cloud.api_calls(), &old);
    let (next, _) = ops.wait_leader(timing.takeover_bound());
    let took = cut.elapsed();
    assert_ne!(next, leader);
    eprintln!("{} took over {took:?} after the cut", ops.ops[next].name);
    assert!(took <= timing.takeover_bound());
    std::thread::sleep(Duration::from_secs(3));
    s.cloud.unblock(&old, "dynamodb");
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        ops.ops[leader].is_standby(),
        "back online, it stays a standby"
    );
    let quiet_to = mutating_calls(&s.cloud.api_calls(), &old);
    assert_eq!(
        quiet_from,
        quiet_to,
        "{old} acted after its deadline:\n{}",
        crate::support::operator::log_tail(&ops.ops[leader].log, 80)
    );
    ops.wait_status("web", "4 in service", Duration::from_secs(120), |st| {
        settled_on(st, 4, "v1")
    });
    s.watcher.assert_invariants();
    assert_eq!(s.watcher.report().launched.len(), 4, "no double launch");
    let m = ops.ops[leader].metrics().unwrap_or_default();
    assert!(m.contains("hangar_leader 0"), "{m}");
    let m = ops.ops[next].metrics().unwrap_or_default();
    assert!(m.contains("hangar_leader 1"), "{m}");
}

#[test]
fn a_failover_in_the_middle_of_a_scale_down_window_does_not_shorten_it() {
    let s = Scenario::start();
    let timing = LeaseTiming::fast();
    let mut ops = HaOperators::new(timing);
    let window = Duration::from_secs(30);
    let spec = s
        .spec()
        .with_capacity(2, 4)
        .set("spec.autoscaling.scaleDown.stabilization", "30s");
    s.write_spec(&spec);
    leader_and_standby(&s, &mut ops);
    ops.wait_status("web", "2 in service", Duration::from_secs(120), |st| {
        settled_on(st, 2, "v1")
    });
    // 20 rps = 1,200/minute: 4 nodes' worth.
    let heavy = s.cloud.start_load(20.0, None).expect("load");
    ops.wait_status("web", "scaled out to 4", Duration::from_secs(120), |st| {
        settled_on(st, 4, "v1")
    });
    let heavy = heavy.stop();
    assert_eq!(heavy.errors, 0, "{heavy:?}");
    let quiet = chrono::Utc::now();
    let light = s.cloud.start_load(2.0, None).expect("load");
    // The planner wants fewer nodes; the window holds it at 4.
    let held = ops.wait_status(
        "web",
        "the scale-down window holding",
        Duration::from_secs(60),
        |st| {
            st.memory
                .last_decision
                .as_ref()
                .is_some_and(|d| d.reason.contains("scale-down stabilization"))
        },
    );
    assert_eq!(held.memory.desired, 4);
    let (leader, _) = ops.wait_leader(timing.takeover_bound());
    let killed = ops.kill(leader);
    let (next, took) = ops.wait_leader(timing.takeover_bound());
    eprintln!(
        "{killed} killed {:?} after the traffic fell; {} took over in {took:?}",
        (chrono::Utc::now() - quiet).to_std().unwrap_or_default(),
        ops.ops[next].name
    );
    ops.start(&s);
    let back = ops.wait_status("web", "back to 2", Duration::from_secs(120), |st| {
        settled_on(st, 2, "v1")
    });
    let light = light.stop();
    assert_eq!(light.errors, 0, "{light:?}");
    let first_in = back
        .activities
        .iter()
        .filter(|a| a.kind == "scale" && a.message.contains("desired 4 → 3"))
        .map(|a| a.at)
        .min()
        .expect("the scale-in is recorded");
    let waited = (first_in - quiet).to_std().unwrap_or_default();
    eprintln!("first scale-in {waited:?} after the traffic fell (window {window:?})");
    assert!(
        waited >= window,
        "the new leader scaled in {waited:?} after the traffic fell, inside the {window:?} window:\n{:#?}",
        back.activities
    );
    s.watcher.assert_invariants();
}

#[test]
fn with_the_default_lease_a_standby_takes_over_within_lease_plus_5s() {
    let s = Scenario::start();
    let mut ops = HaOperators::with_defaults();
    let timing = ops.timing();
    s.write_spec(&s.spec().remove("spec.autoscaling").with_capacity(1, 1));
    let leader = leader_and_standby(&s, &mut ops);
    ops.wait_status("web", "1 in service", Duration::from_secs(120), |st| {
        settled_on(st, 1, "v1")
    });
    let standby = ops.ops[1 - leader].name.clone();
    let (code, body) = ops.ops[1 - leader].readyz().expect("readyz");
    assert_eq!((code, body.trim()), (503, "standby"));
    let m = ops.ops[1 - leader].metrics().unwrap_or_default();
    assert!(m.contains("hangar_leader 0"), "{m}");
    let (code, _) = ops.ops[leader].readyz().expect("readyz");
    assert_eq!(code, 200);
    ops.kill(leader);
    let (next, took) = ops.wait_leader(timing.takeover_bound());
    assert_eq!(ops.ops[next].name, standby);
    eprintln!("default lease: {standby} took over in {took:?}");
    assert!(took <= timing.takeover_bound(), "took {took:?}");
    assert!(
        took >= timing.lease - timing.retry,
        "not before the lease ran out: {took:?}"
    );
    // `hangar status` says who leads.
    let out = std::process::Command::new(crate::support::operator::hangar_bin())
        .args(["status", "--server"])
        .arg(format!("http://{}", ops.ops[next].process.listen))
        .output()
        .expect("hangar status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("leader: {standby}")) && text.contains("this operator leads"),
        "{text}"
    );
    ops.wait_status("web", "still 1 in service", Duration::from_secs(60), |st| {
        settled_on(st, 1, "v1")
    });
    s.watcher.assert_invariants();
    assert_eq!(s.watcher.report().launched.len(), 1);
}
