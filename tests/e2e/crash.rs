//! kill -9 at random moments: the cloud is the source of truth.

use std::time::Duration;

use hangar_local::artifact::ReleaseKind;
use hangar_local::spec::ClusterSpec;
use rand::{RngExt, SeedableRng};

use crate::support::{seed, settled_on, Scenario};

/// Rounds of (scale out, scale in, roll out a new release), three kills
/// in each: `HANGAR_E2E_CRASH_ROUNDS=6` makes the 54-kill storm of
/// RELIABILITY.md; the default single round keeps `make test` short.
fn rounds() -> u32 {
    std::env::var("HANGAR_E2E_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

#[test]
fn killed_at_random_moments_it_converges_with_no_orphan_double_launch_or_unsafe_step() {
    let seed = seed();
    let rounds = rounds();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut s = Scenario::start();
    let base = s.spec().remove("spec.autoscaling");
    let mut release = s.cloud.first_release().clone();
    // Two nodes serving before the traffic starts (an empty target group
    // answers 502), then every kill happens under load.
    s.write_spec(&base.clone().with_capacity(2, 2));
    s.start_operator();
    s.wait_status("web", "2 in service", Duration::from_secs(120), |st| {
        settled_on(st, 2, &release.id)
    });
    s.crash_operator();
    let load = s.cloud.start_load(5.0, None).expect("load");
    let mut kills = 0;

    for round in 0..rounds {
        let next = s
            .cloud
            .upload_release(&format!("v{}", round + 2), ReleaseKind::Good)
            .expect("release");
        // Each phase: set the spec, crash the operator three times at
        // random moments while it works, check the invariants after each
        // crash, then let it finish.
        let phases = [
            (
                "scale out to 4",
                base.clone().with_release(&release).with_capacity(4, 4),
                4,
            ),
            (
                "scale in to 2",
                base.clone().with_release(&release).with_capacity(2, 2),
                2,
            ),
            (
                "roll out",
                base.clone().with_release(&next).with_capacity(2, 2),
                2,
            ),
        ];
        for (i, (what, spec, nodes)) in phases.into_iter().enumerate() {
            if i == 2 {
                release = next.clone();
            }
            s.write_spec(&spec);
            for _ in 0..3 {
                s.start_operator();
                let after = Duration::from_millis(rng.random_range(300..4000));
                std::thread::sleep(after);
                kills += 1;
                eprintln!("seed {seed}: round {round}: {what}: kill -9 #{kills} after {after:?}");
                s.crash_operator();
                s.watcher.assert_invariants();
            }
            s.start_operator();
            s.wait_status("web", what, Duration::from_secs(180), |st| {
                settled_on(st, nodes, &release.id)
            });
            assert_eq!(
                s.instances("web").len(),
                nodes as usize,
                "{what}: no orphan (seed {seed}, round {round})"
            );
            s.crash_operator();
            s.watcher.assert_invariants();
        }
    }
    let report = load.stop();
    assert_eq!(
        report.errors, 0,
        "seed {seed}: no request lost across {kills} crashes: {report:?}"
    );
    s.watcher.assert_invariants();
    let watch = s.watcher.report();
    assert_eq!(
        watch.launched.len(),
        2 + 2 * rounds as usize,
        "seed {seed}: no double launch: {watch:?}\nlaunches in the operator log:\n{}",
        crate::support::operator::log_lines(&s.log, &["launch", "hangar starting"])
    );
    assert_eq!(
        watch.terminated.len(),
        2 * rounds as usize,
        "seed {seed}: {watch:?}"
    );
    eprintln!("seed {seed}: {kills} kills, converged every time");
}

/// EC2's listing can show a node's `releasing` for seconds after it was
/// tagged `in-service`. An operator restarted in that window must not take
/// the serving node out of the target group to ship it the release it
/// already runs: with one node, that is an outage.
#[test]
fn a_restart_keeps_a_serving_node_in_service_while_the_listing_still_says_releasing() {
    let (mut s, _, node) = one_node_serving_v1();
    s.crash_operator();
    let load = s.cloud.start_load(10.0, None).expect("load");
    s.watcher.track_serving();
    // What a lagging listing shows the next operator: the earlier tag.
    tag_and_wait_listed(&s, &node, &[("hangar:phase", "releasing")]);
    let listed = |s: &Scenario, phase: &str| listed_phase(s, &node).as_deref() == Some(phase);
    s.start_operator();
    s.wait_status(
        "web",
        "tagged in service again",
        Duration::from_secs(60),
        |st| settled_on(st, 1, "v1") && listed(&s, "in-service"),
    );
    let report = load.stop();
    assert_eq!(report.errors, 0, "no request lost: {report:?}");
    let watch = s.watcher.report();
    assert_eq!(
        watch.min_serving,
        Some(1),
        "never out of service: {watch:?}"
    );
    assert_eq!(
        watch
            .registrations
            .iter()
            .filter(|(id, _)| *id == node)
            .count(),
        1,
        "registered once, never re-registered: {watch:?}"
    );
    let st = s.status("web").expect("status");
    assert!(
        st.activities
            .iter()
            .any(|a| a.message.contains("kept in service")),
        "{:?}",
        st.activities
    );
    s.watcher.assert_invariants();
}

/// A crash inside a failed update's restore can leave a node serving the
/// old release while its tags say `verifying` on the new one. A restarted
/// operator must believe the node, not the tag: else the node joins the
/// target group counted as on the new release, and the fleet silently
/// mixes two releases.
#[test]
fn a_restart_reads_what_a_verifying_node_really_runs_not_its_tag() {
    let (mut s, spec, node) = one_node_serving_v1();
    let v2 = s.cloud.upload_release("v2", ReleaseKind::Good).expect("v2");
    s.crash_operator();
    // What the crash left: the tags of an activation of v2 that never ran.
    tag_and_wait_listed(
        &s,
        &node,
        &[("hangar:phase", "verifying"), ("hangar:release", "v2")],
    );
    s.write_spec(&spec.with_release(&v2));
    s.start_operator();
    let runs = |s: &Scenario| {
        s.cloud
            .exec_inside(&node, "readlink /srv/app/current")
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    s.wait_status(
        "web",
        "the node really on v2",
        Duration::from_secs(120),
        |st| settled_on(st, 1, "v2") && runs(&s).ends_with("/releases/v2"),
    );
    let st = s.status("web").expect("status");
    assert!(
        st.activities
            .iter()
            .any(|a| a.message.contains("runs v1, not v2 as tagged")),
        "{:?}",
        st.activities
    );
    s.watcher.assert_invariants();
}

/// One node in service on v1 and the operator stopped: what a restart
/// finds, before the scenario changes it.
fn one_node_serving_v1() -> (Scenario, ClusterSpec, String) {
    let mut s = Scenario::start();
    let spec = s.spec().remove("spec.autoscaling").with_capacity(1, 1);
    s.write_spec(&spec);
    s.start_operator();
    let st = s.wait_status(
        "web",
        "1 in service on v1",
        Duration::from_secs(120),
        |st| settled_on(st, 1, "v1"),
    );
    let node = st.nodes[0].id.clone();
    // Every tag the operator wrote listed first: else a phase the scenario
    // waits to see listed may be one of the operator's older ones (EC2
    // shows one instance's tag changes in order, each late).
    hangar_local::eventually(Duration::from_secs(10), "in-service listed", || {
        (listed_phase(&s, &node).as_deref() == Some("in-service")).then_some(())
    })
    .expect("the listing shows the node in service");
    (s, spec, node)
}

/// Tags `node` behind the operator's back, then waits until EC2's
/// listing (which shows a tag change late) shows the phase written.
fn tag_and_wait_listed(s: &Scenario, node: &str, tags: &[(&str, &str)]) {
    s.cloud.tag_instance(node, tags).expect("tag the node");
    let phase = tags
        .iter()
        .find(|(k, _)| *k == "hangar:phase")
        .map(|(_, v)| v.to_string());
    hangar_local::eventually(Duration::from_secs(10), "the tags listed", || {
        (listed_phase(s, node) == phase).then_some(())
    })
    .expect("the listing shows the tags");
}

fn listed_phase(s: &Scenario, node: &str) -> Option<String> {
    let tags = s.cloud.listed_tags(node).ok().flatten()?;
    tags.get("hangar:phase").cloned()
}
