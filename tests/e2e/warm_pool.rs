//! Warm pools on lite nodes: a ready node kept stopped out of the target
//! group, taken first when the fleet scales out.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use hangar_cloud::{InstanceState, Phase};

use crate::support::{in_service, Scenario};

#[test]
fn scale_out_takes_the_stopped_warm_node_first_and_it_serves_the_current_release() {
    let started = Instant::now();
    let mut s = Scenario::start();
    let spec = s
        .spec()
        .remove("spec.autoscaling")
        .with_capacity(1, 2)
        .set("spec.warmPool.size", 1u64);
    s.write_spec(&spec);
    s.start_operator();
    s.wait_status(
        "web",
        "1 in service, 1 warm",
        Duration::from_secs(60),
        |st| {
            in_service(st) == 1
                && st.phases.get("warm") == Some(&1)
                && st.nodes.iter().all(|n| n.task.is_none())
        },
    );
    // The cloud itself says the pool node is stopped (listing lag: wait).
    let deadline = Instant::now() + Duration::from_secs(15);
    let warm = loop {
        let w: Vec<_> = s
            .instances("web")
            .into_iter()
            .filter(|i| i.phase == Some(Phase::Warm))
            .collect();
        if w.len() == 1 && w[0].state == InstanceState::Stopped {
            break w[0].id.clone();
        }
        assert!(Instant::now() < deadline, "no stopped warm node: {w:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(s.watcher.report().launched.len(), 2, "fleet 1 + pool 1");
    // Stopped once, not once a pass while the listing still said running.
    let metrics = s.operator().metrics().expect("metrics");
    let stops = metrics
        .lines()
        .find(|l| {
            l.starts_with("hangar_cloud_api_calls_total{")
                && l.contains("operation=\"StopInstances\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok());
    assert_eq!(stops, Some(1.0), "StopInstances calls");
    let filled = started.elapsed();

    s.write_spec(&spec.clone().with_capacity(2, 2));
    let st = s.wait_status(
        "web",
        "2 in service, the warm node among them",
        Duration::from_secs(45),
        |st| {
            in_service(st) == 2
                && st
                    .nodes
                    .iter()
                    .any(|n| n.id == warm && n.phase == "in-service" && n.task.is_none())
        },
    );
    let node = st.nodes.iter().find(|n| n.id == warm).expect("listed");
    assert_eq!(node.release.as_deref(), Some("v1"));
    assert_eq!(node.state, "running");
    // It answers on the release it was registered with.
    let addr = node.address.clone().expect("address");
    let mut conn = std::net::TcpStream::connect((addr.as_str(), 80)).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    conn.write_all(b"GET /health HTTP/1.0\r\n\r\n")
        .expect("request");
    let mut answer = String::new();
    let _ = conn.read_to_string(&mut answer);
    assert!(
        answer.starts_with("HTTP/1.") && answer.contains(" 200 "),
        "{answer}"
    );
    assert!(
        answer.to_ascii_lowercase().contains("x-release: v1\r\n"),
        "{answer}"
    );
    let launched = s.watcher.report().launched.len();
    assert!(
        launched <= 3,
        "the scale-out launched nothing for itself (the pool refills): {launched}"
    );
    s.watcher.assert_invariants();
    eprintln!(
        "pool filled in {filled:?}; scale-out from the pool served at {:?}",
        started.elapsed()
    );
}
