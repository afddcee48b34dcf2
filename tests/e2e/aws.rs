//! Where AWS is less kind than moto: the local cloud keeps EC2's promises
//! (ClientToken idempotency for 24 h, an eventually consistent listing,
//! capacity errors per subnet, token buckets), and hangar holds up.

use std::time::Duration;

use hangar_local::artifact::ReleaseKind;
use hangar_local::Capacity;

use crate::support::{settled_on, Scenario};

fn fixed(s: &Scenario, n: u32) -> hangar_local::spec::ClusterSpec {
    s.spec().remove("spec.autoscaling").with_capacity(n, n)
}

/// EC2 keeps a ClientToken for 24 h after its instances terminated: a
/// token derived from the fleet comes back when the fleet looks the same
/// again (here: two nodes, after a third came and went), and EC2 answers
/// with the terminated reservation — or, once the release tag differs,
/// `IdempotentParameterMismatch` on every pass.
#[test]
fn scales_out_again_after_the_fleet_looked_the_same_before_with_a_new_token() {
    let mut s = Scenario::start();
    s.write_spec(&fixed(&s, 2));
    s.start_operator();
    s.wait_status("web", "2 in service", Duration::from_secs(120), |st| {
        settled_on(st, 2, "v1")
    });
    s.write_spec(&fixed(&s, 3));
    s.wait_status("web", "3 in service", Duration::from_secs(120), |st| {
        settled_on(st, 3, "v1")
    });
    s.write_spec(&fixed(&s, 2));
    s.wait_status("web", "back to 2", Duration::from_secs(120), |st| {
        settled_on(st, 2, "v1")
    });
    let v2 = s.cloud.upload_release("v2", ReleaseKind::Good).expect("v2");
    s.write_spec(&fixed(&s, 2).with_release(&v2));
    s.wait_status("web", "2 on v2", Duration::from_secs(120), |st| {
        settled_on(st, 2, "v2")
    });
    s.write_spec(&fixed(&s, 3).with_release(&v2));
    s.wait_status(
        "web",
        "3 in service on v2",
        Duration::from_secs(120),
        |st| settled_on(st, 3, "v2"),
    );
    assert_eq!(s.watcher.report().launched.len(), 4, "one launch per node");
    s.watcher.assert_invariants();
}

/// One zone out of capacity must not stop scale-out in the others (an
/// Auto Scaling group tries the next zone).
#[test]
fn a_subnet_out_of_capacity_is_avoided_and_the_cluster_launches_in_the_other() {
    let mut s = Scenario::start();
    let (full, open) = (s.cloud.subnets()[0].clone(), s.cloud.subnets()[1].clone());
    s.cloud.set_subnet_capacity(&full, Capacity::Insufficient);
    s.write_spec(&fixed(&s, 2));
    s.start_operator();
    let st = s.wait_status(
        "web",
        "2 in service in the open subnet",
        Duration::from_secs(120),
        |st| settled_on(st, 2, "v1"),
    );
    assert!(
        st.nodes
            .iter()
            .all(|n| n.subnet.as_deref() == Some(open.as_str())),
        "{:?}",
        st.nodes
    );
    assert!(
        st.activities
            .iter()
            .any(|a| a.message.contains("InsufficientInstanceCapacity")
                && a.message.contains(&format!("avoiding {full}"))),
        "status tells: {:?}",
        st.activities
    );
    // Capacity is back. Once the subnet's backoff ran out, the next node
    // goes to the emptier subnet again.
    s.cloud.set_subnet_capacity(&full, Capacity::Available);
    let until = st.memory.launches.avoided[&full].until;
    let wait = (until - chrono::Utc::now()).to_std().unwrap_or_default();
    std::thread::sleep(wait + Duration::from_secs(1));
    s.write_spec(&fixed(&s, 3));
    let st = s.wait_status("web", "3 in service", Duration::from_secs(150), |st| {
        settled_on(st, 3, "v1")
    });
    assert!(
        st.nodes
            .iter()
            .any(|n| n.subnet.as_deref() == Some(full.as_str())),
        "{:?}",
        st.nodes
    );
    s.watcher.assert_invariants();
}

/// Tried as a new user would: a first release that never passes its
/// health check used to launch and terminate instances in a loop (34 in
/// 150 s for min 2). Every node that never came up counts toward the
/// launch backoff.
#[test]
fn a_first_release_that_never_gets_healthy_does_not_launch_in_a_loop() {
    let mut s = Scenario::start();
    let bad = s
        .cloud
        .upload_release("v1-bad", ReleaseKind::FailingHealth)
        .expect("bad release");
    // Nodes come up, get the release, and fail its health check (404)
    // after 8 s.
    let spec = fixed(&s, 2)
        .with_release(&bad)
        .set("spec.release.healthCheck.deadline", "8s");
    s.write_spec(&spec);
    let started = std::time::Instant::now();
    s.start_operator();
    let st = s.wait_status(
        "web",
        "launches backing off",
        Duration::from_secs(120),
        |st| st.memory.launch_backoff_until.is_some(),
    );
    assert!(
        st.activities
            .iter()
            .any(|a| a.kind == "error" || a.message.contains("HTTP 404")),
        "{:?}",
        st.activities
    );
    // Observed over the first minute: two pairs fail (~25 s), the backoff
    // (30 s after the third failure, doubling) lets at most a third pair
    // launch, so 6 at most; the loop it replaced launched ~14 a minute.
    let window = Duration::from_secs(60);
    std::thread::sleep(window.saturating_sub(started.elapsed()));
    let launched = s.watcher.report().launched.len();
    assert!(
        launched <= 7,
        "{launched} instances launched in a minute for min 2 with a release that never gets healthy"
    );
    let st = s.status("web").expect("status");
    assert!(
        st.conditions
            .iter()
            .any(|c| c.status && (c.reason == "NodesFailing" || c.reason == "ReleaseFailed")),
        "{:?}",
        st.conditions
    );
    s.watcher.assert_invariants();
}
