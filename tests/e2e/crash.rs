//! kill -9 at random moments: the cloud is the source of truth.

use std::time::Duration;

use hangar_local::artifact::ReleaseKind;
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
        "seed {seed}: no double launch: {watch:?}"
    );
    assert_eq!(
        watch.terminated.len(),
        2 * rounds as usize,
        "seed {seed}: {watch:?}"
    );
    eprintln!("seed {seed}: {kills} kills, converged every time");
}
