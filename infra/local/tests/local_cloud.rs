//! The local cloud, end to end: real moto, real sshd nodes, the real LB.
//!
//! Each test starts its own [`LocalCloud`] on its own slot (addresses), so
//! they run in parallel; each cloud is torn down on drop, panics included.
//! Waiting is always "poll a condition until a deadline", never a bare sleep.
//!
//! Targets are small HTTP servers run by the test itself on the instances'
//! private IPs (port 80): the test decides exactly how each answers
//! (healthy or not, slow until released, 500) and counts what it receives.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_cloudwatch::primitives::DateTime;
use aws_sdk_cloudwatch::types::{Dimension, Metric, MetricDataQuery, MetricStat};
use bytes::Bytes;
use hangar_local::lb::TARGET_HEADER;
use hangar_local::{eventually, LocalCloud, LocalCloudOptions};
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(20);

fn start_cloud(options: LocalCloudOptions) -> LocalCloud {
    hangar_local::init_test_logging();
    LocalCloud::start(options).expect("local cloud starts (run `sudo infra/local/setup` once)")
}

/// `ssh root@ip hostname` with the cloud's key; `None` unless it worked.
fn ssh_hostname(cloud: &LocalCloud, ip: Ipv4Addr) -> Option<String> {
    let out = Command::new("ssh")
        .args([
            "-q",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=1",
            "-i",
        ])
        .arg(cloud.key_path())
        .arg(format!("root@{ip}"))
        .arg("hostname")
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn launched_instances_are_ssh_nodes_within_2s_each_with_its_own_host_key() {
    let cloud = start_cloud(LocalCloudOptions::default());
    for batch in [1, 5] {
        let launched = cloud.launch(batch).expect("RunInstances");
        let started = Instant::now();
        assert_eq!(launched.len(), batch as usize);
        // All at once, as hangar would provision them.
        std::thread::scope(|scope| {
            for instance in &launched {
                let cloud = &cloud;
                scope.spawn(move || {
                    assert!(cloud.slot().contains(instance.private_ip), "{instance:?}");
                    // Fails (instead of hanging) at the 2 s budget.
                    let budget = Duration::from_secs(2).saturating_sub(started.elapsed());
                    let hostname =
                        eventually(budget, "ssh", || ssh_hostname(cloud, instance.private_ip))
                            .unwrap_or_else(|e| {
                                panic!("{} not reachable over SSH: {e}", instance.id)
                            });
                    assert_eq!(
                        hostname, instance.id,
                        "the node's hostname is its instance id"
                    );
                });
            }
        });
        eprintln!(
            "{batch} instance(s) reachable over SSH {:?} after launch",
            started.elapsed()
        );
    }
    let nodes = cloud.nodes();
    assert_eq!(nodes.len(), 6);
    let namespaces: BTreeSet<_> = nodes.iter().map(|n| n.namespace.clone()).collect();
    assert_eq!(namespaces.len(), 6, "each node has its own mount namespace");
    let host_keys: BTreeSet<String> = nodes
        .iter()
        .map(|n| std::fs::read_to_string(n.state_dir.join("ssh_host_ed25519_key.pub")).unwrap())
        .collect();
    assert_eq!(host_keys.len(), 6, "each node has its own host key");
    // Private filesystems: what one node writes, another does not see.
    let (a, b) = (&nodes[0].instance_id, &nodes[1].instance_id);
    assert!(cloud
        .exec_inside(a, "echo mine > /srv/who")
        .unwrap()
        .status
        .success());
    assert!(!cloud
        .exec_inside(b, "cat /srv/who")
        .unwrap()
        .status
        .success());
}

#[test]
fn a_terminated_instance_leaves_no_process_behind() {
    let cloud = start_cloud(LocalCloudOptions::default());
    let instance = cloud.launch(1).unwrap().remove(0);
    let node = cloud.wait_for_node(&instance.id, WAIT).unwrap();
    // A daemon a runbook could have left running, outliving its session.
    let out = cloud
        .exec_inside(
            &instance.id,
            "setsid sleep 600 </dev/null >/dev/null 2>&1 &",
        )
        .unwrap();
    assert!(out.status.success());
    eventually(WAIT, "the daemon inside the node", || {
        (hangar_local::node::pids_in_namespace(&node.namespace).len() >= 2).then_some(())
    })
    .unwrap();

    cloud.terminate(&[&instance.id]).unwrap();
    eventually(WAIT, "the node to be stopped", || {
        cloud.node(&instance.id).is_none().then_some(())
    })
    .unwrap();
    eventually(WAIT, "every process in the node to be gone", || {
        hangar_local::node::pids_in_namespace(&node.namespace)
            .is_empty()
            .then_some(())
    })
    .unwrap();
    // A killed process leaves its namespace a moment before the kernel has
    // closed its sockets: poll, briefly.
    eventually(Duration::from_secs(2), "sshd to stop listening", || {
        TcpStream::connect_timeout(
            &SocketAddr::from((instance.private_ip, 22)),
            Duration::from_millis(300),
        )
        .is_err()
        .then_some(())
    })
    .unwrap();
    eventually(WAIT, "the node's state to be removed", || {
        (!node.state_dir.exists()).then_some(())
    })
    .unwrap();
    assert!(cloud.node(&instance.id).is_none(), "a node came back");
}

#[test]
fn the_lb_routes_only_to_registered_healthy_targets() {
    let cloud = start_cloud(LocalCloudOptions::default());
    let rt = test_runtime();
    let lb = cloud.lb_url();

    // Nothing registered yet: the LB answers by itself.
    let (status, target) = get(&lb, "/");
    assert_eq!((status, target), (502, None));
    assert_eq!(
        cloud.lb().requests()[0].error.as_deref(),
        Some("no healthy target")
    );

    let launched = cloud.launch(3).unwrap();
    let (good, sick, foreign) = (&launched[0], &launched[1], &launched[2]);
    let good_app = Backend::start(&rt, good.private_ip, 200);
    let sick_app = Backend::start(&rt, sick.private_ip, 500);
    let foreign_app = Backend::start(&rt, foreign.private_ip, 200);
    cloud.register(&[&good.id, &sick.id]).unwrap();
    // Through the AWS endpoint hangar uses, target health is the LB's own
    // verdict, not moto's instant `healthy`: the sick one is `initial`
    // until its second failed check, 200 ms after the first.
    let states = target_states(&cloud);
    assert_eq!(
        states.get(&sick.id).map(String::as_str),
        Some("initial"),
        "{states:?}"
    );

    eventually(WAIT, "the good target to be routable", || {
        (cloud.lb().routable() == vec![good.id.clone()]).then_some(())
    })
    .unwrap();
    // The sick one has failed its checks by now: it is checked, never routed.
    eventually(WAIT, "the sick target to be marked unhealthy", || {
        cloud
            .lb()
            .targets()
            .iter()
            .any(|t| t.instance_id == sick.id && t.health == hangar_local::lb::Health::Unhealthy)
            .then_some(())
    })
    .unwrap();
    let states = target_states(&cloud);
    assert_eq!(states.get(&good.id).map(String::as_str), Some("healthy"));
    assert_eq!(states.get(&sick.id).map(String::as_str), Some("unhealthy"));
    assert!(!states.contains_key(&foreign.id));

    let from = cloud.lb().next_seq();
    for _ in 0..30 {
        let (status, target) = get(&lb, "/");
        assert_eq!(status, 200);
        assert_eq!(target.as_deref(), Some(good.id.as_str()));
    }
    let log = cloud.lb().requests_since(from);
    assert_eq!(log.len(), 30);
    assert!(log
        .iter()
        .all(|r| r.target.as_deref() == Some(&good.id) && r.status == 200 && r.ok()));
    assert!(log
        .iter()
        .all(|r| r.release.as_deref() == Some(&format!("test-{}", good.private_ip)[..])));
    assert_eq!(good_app.requests(), 30);
    assert_eq!(sick_app.requests(), 0, "an unhealthy target got traffic");
    assert!(
        sick_app.health_checks() >= 2,
        "the sick target was health-checked"
    );
    assert_eq!(
        foreign_app.requests(),
        0,
        "an unregistered instance got traffic"
    );
    assert_eq!(
        foreign_app.health_checks(),
        0,
        "an unregistered instance was health-checked"
    );
    assert!(
        cloud.nodes().len() == 3,
        "the foreign instance is still a node"
    );
}

#[test]
fn a_deregistered_target_gets_no_new_request_while_its_in_flight_one_completes() {
    let cloud = start_cloud(LocalCloudOptions {
        // Off: this test reads the data plane's drain completing through
        // DescribeTargetHealth. An ALB keeps showing `draining` for the
        // whole 20 s delay; aws_semantics.rs tests that display.
        draining_for_whole_delay: false,
        ..LocalCloudOptions::default()
    });
    let rt = test_runtime();
    let lb = cloud.lb_url();
    let launched = cloud.launch(2).unwrap();
    let apps: Vec<Backend> = launched
        .iter()
        .map(|i| Backend::start(&rt, i.private_ip, 200))
        .collect();
    let ids: Vec<&str> = launched.iter().map(|i| i.id.as_str()).collect();
    cloud.register(&ids).unwrap();
    eventually(WAIT, "both targets routable", || {
        (cloud.lb().routable().len() == 2).then_some(())
    })
    .unwrap();

    // A slow request lands on one of them and stays in flight.
    let slow = {
        let lb = lb.clone();
        std::thread::spawn(move || get(&lb, "/slow"))
    };
    let (busy, busy_app, other) = eventually(WAIT, "the slow request in flight", || {
        (0..2)
            .find(|&i| cloud.lb().in_flight(ids[i]) == 1)
            .map(|i| (ids[i], &apps[i], ids[1 - i]))
    })
    .unwrap();

    cloud.deregister(&[busy]).unwrap();
    // No polling lag: once DeregisterTargets has returned, nothing new goes there.
    assert_eq!(cloud.lb().routable(), vec![other.to_string()]);
    assert_eq!(
        target_states(&cloud).get(busy).map(String::as_str),
        Some("draining")
    );
    let busy_before = busy_app.requests();
    for _ in 0..20 {
        let (status, target) = get(&lb, "/");
        assert_eq!(status, 200);
        assert_eq!(
            target.as_deref(),
            Some(other),
            "a new request went to the draining target"
        );
    }
    assert_eq!(
        busy_app.requests(),
        busy_before,
        "the draining target received a new request"
    );
    assert_eq!(
        cloud.lb().in_flight(busy),
        1,
        "the in-flight request was dropped"
    );
    let draining = cloud
        .lb()
        .targets()
        .into_iter()
        .find(|t| t.instance_id == busy)
        .unwrap();
    assert!(!draining.registered);

    busy_app.release_slow();
    let (status, target) = slow.join().unwrap();
    assert_eq!(status, 200, "the in-flight request did not complete");
    assert_eq!(target.as_deref(), Some(busy));
    eventually(WAIT, "the drained target to be forgotten", || {
        cloud
            .lb()
            .targets()
            .iter()
            .all(|t| t.instance_id != busy)
            .then_some(())
    })
    .unwrap();
    let states = target_states(&cloud);
    assert!(
        !states.contains_key(busy),
        "still reported after draining: {states:?}"
    );
    assert_eq!(states.get(other).map(String::as_str), Some("healthy"));
    let record = cloud
        .lb()
        .requests()
        .into_iter()
        .find(|r| r.path == "/slow")
        .unwrap();
    assert_eq!((record.status, record.target.as_deref()), (200, Some(busy)));
}

#[test]
fn an_in_flight_request_outliving_the_deregistration_delay_is_cut_off() {
    let cloud = start_cloud(LocalCloudOptions {
        deregistration_delay: Duration::from_secs(1),
        ..LocalCloudOptions::default()
    });
    let rt = test_runtime();
    let instance = cloud.launch(1).unwrap().remove(0);
    let app = Backend::start(&rt, instance.private_ip, 200);
    cloud.register(&[&instance.id]).unwrap();
    eventually(WAIT, "routable", || {
        (cloud.lb().routable().len() == 1).then_some(())
    })
    .unwrap();
    let lb = cloud.lb_url();
    let slow = std::thread::spawn(move || get(&lb, "/slow"));
    eventually(WAIT, "in flight", || {
        (cloud.lb().in_flight(&instance.id) == 1).then_some(())
    })
    .unwrap();
    let deregistered = Instant::now();
    cloud.deregister(&[&instance.id]).unwrap();
    let (status, _) = slow.join().unwrap();
    assert_eq!(status, 502);
    assert!(
        deregistered.elapsed() >= Duration::from_secs(1),
        "cut off before the delay"
    );
    let record = cloud
        .lb()
        .requests()
        .into_iter()
        .find(|r| r.path == "/slow")
        .unwrap();
    assert!(record.error.unwrap().contains("deregistration delay"));
    app.release_slow();
}

#[test]
fn metrics_reach_cloudwatch_with_the_right_sums() {
    let cloud = start_cloud(LocalCloudOptions::default());
    let rt = test_runtime();
    let launched = cloud.launch(2).unwrap();
    let _apps: Vec<Backend> = launched
        .iter()
        .map(|i| Backend::start(&rt, i.private_ip, 200))
        .collect();
    let ids: Vec<&str> = launched.iter().map(|i| i.id.as_str()).collect();
    cloud.register(&ids).unwrap();
    eventually(WAIT, "both targets routable", || {
        (cloud.lb().routable().len() == 2).then_some(())
    })
    .unwrap();
    // Start on a fresh interval in which both targets are healthy throughout.
    let published = cloud.metrics().published();
    eventually(WAIT, "an interval boundary", || {
        (cloud.metrics().published() > published).then_some(())
    })
    .unwrap();
    let first = cloud.metrics().last().unwrap().period_start + 1;

    let lb = cloud.lb_url();
    for _ in 0..40 {
        assert_eq!(get(&lb, "/").0, 200);
    }
    for _ in 0..10 {
        assert_eq!(get(&lb, "/fail").0, 500);
    }
    let done = unix_now();
    eventually(WAIT, "the last request's interval to be published", || {
        cloud
            .metrics()
            .last()
            .filter(|m| m.period_start > done)
            .map(|_| ())
    })
    .unwrap();
    // And at least one idle interval after it, published as zeros.
    let last = cloud.metrics().last().unwrap();
    assert_eq!(last.counters.requests, 0);
    assert!(last.error.is_none(), "{:?}", last.error);

    let sums = |name: &str| -> (f64, usize) {
        let points = get_metric(&cloud, name, first, last.period_start + 1);
        (points.iter().sum(), points.len())
    };
    let (requests, intervals) = sums("RequestCount");
    assert_eq!(requests, 50.0);
    assert!(
        intervals as i64 >= last.period_start + 1 - first,
        "idle intervals publish zeros too"
    );
    assert_eq!(sums("HTTPCode_Target_5XX_Count").0, 10.0);
    assert_eq!(sums("HTTPCode_Target_2XX_Count").0, 40.0);
    assert_eq!(
        sums("RequestCountPerTarget").0,
        25.0,
        "requests / 2 healthy targets"
    );
}

/// Async tests can own a cloud too: nothing in it blocks on or drops a
/// runtime inside theirs.
#[tokio::test(flavor = "current_thread")]
async fn an_async_test_can_start_use_and_drop_a_cloud() {
    let cloud = start_cloud(LocalCloudOptions::default());
    let dir = cloud.state_dir().join("specs-under-test");
    let v2 = cloud
        .upload_release("v2", hangar_local::ReleaseKind::Fail5xx)
        .unwrap();
    assert!(v2.url.ends_with("/v2.tar.gz"));
    let path = cloud
        .spec()
        .with_release(&v2)
        .set("spec.capacity.min", 3)
        .write(&dir)
        .unwrap();
    let yaml = std::fs::read_to_string(&path).unwrap();
    assert!(yaml.contains(cloud.target_group_arn()));
    assert!(yaml.contains(&format!("sha256: {}", v2.sha256)));
    assert!(yaml.contains("    min: 3\n"));
    // The artifact is where the spec says, with that checksum.
    let s3 = cloud.clients().s3.clone();
    let key = v2
        .url
        .trim_start_matches(&format!("s3://{}/", cloud.seeded().bucket))
        .to_string();
    let bucket = cloud.seeded().bucket.clone();
    let bytes = s3
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes();
    use sha2::Digest;
    assert_eq!(hex::encode(sha2::Sha256::digest(&bytes)), v2.sha256);
    let env: std::collections::BTreeMap<_, _> = cloud.env().into_iter().collect();
    assert_eq!(env["AWS_ENDPOINT_URL"], cloud.endpoint());
    assert_eq!(env["HANGAR_LOCAL_LB_URL"], cloud.lb_url());
    drop(cloud);
}

// ---- helpers ----------------------------------------------------------

/// `DescribeTargetHealth` through the cloud's AWS endpoint: id → state.
fn target_states(cloud: &LocalCloud) -> std::collections::BTreeMap<String, String> {
    let elb = cloud.clients().elb.clone();
    let arn = cloud.target_group_arn().to_string();
    let out = cloud
        .block_on(async move {
            elb.describe_target_health()
                .target_group_arn(arn)
                .send()
                .await
        })
        .expect("DescribeTargetHealth");
    out.target_health_descriptions()
        .iter()
        .filter_map(|d| {
            Some((
                d.target()?.id()?.to_string(),
                d.target_health()?.state()?.as_str().to_string(),
            ))
        })
        .collect()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// One-second sums of an ALB metric for `[from, to)`, as the operator
/// queries them: dimensions sorted by name, start aligned to the period.
fn get_metric(cloud: &LocalCloud, name: &str, from: i64, to: i64) -> Vec<f64> {
    let seeded = cloud.seeded();
    let query = MetricDataQuery::builder()
        .id("m")
        .metric_stat(
            MetricStat::builder()
                .metric(
                    Metric::builder()
                        .namespace("AWS/ApplicationELB")
                        .metric_name(name)
                        .dimensions(
                            Dimension::builder()
                                .name("LoadBalancer")
                                .value(seeded.load_balancer_dimension().unwrap())
                                .build(),
                        )
                        .dimensions(
                            Dimension::builder()
                                .name("TargetGroup")
                                .value(seeded.target_group_dimension().unwrap())
                                .build(),
                        )
                        .build(),
                )
                .period(1)
                .stat("Sum")
                .build(),
        )
        .build();
    let cw = cloud.clients().cloudwatch.clone();
    let out = cloud
        .block_on(async move {
            cw.get_metric_data()
                .metric_data_queries(query)
                .start_time(DateTime::from_secs(from))
                .end_time(DateTime::from_secs(to))
                .send()
                .await
        })
        .expect("GetMetricData");
    out.metric_data_results()
        .iter()
        .flat_map(|r| r.values().to_vec())
        .collect()
}

fn test_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// `GET path` through the LB on a fresh connection: status and the target header.
fn get(base: &str, path: &str) -> (u16, Option<String>) {
    let addr: SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"));
    let target = response
        .lines()
        .take_while(|l| !l.is_empty())
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(TARGET_HEADER)
                .then(|| v.trim().to_string())
        });
    (status, target)
}

/// A target application: `/health` answers `health_status`, `/slow` waits
/// until released, `/fail` answers 500, anything else 200. Counts requests.
struct Backend {
    requests: Arc<AtomicUsize>,
    health_checks: Arc<AtomicUsize>,
    release: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    fn start(rt: &tokio::runtime::Runtime, ip: Ipv4Addr, health_status: u16) -> Backend {
        let requests = Arc::new(AtomicUsize::new(0));
        let health_checks = Arc::new(AtomicUsize::new(0));
        let (release, released) = watch::channel(false);
        let listener = rt
            .block_on(tokio::net::TcpListener::bind((ip, 80)))
            .unwrap_or_else(|e| panic!("binding {ip}:80: {e}"));
        let (req_count, hc_count) = (requests.clone(), health_checks.clone());
        let task = rt.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (req_count, hc_count, released) =
                    (req_count.clone(), hc_count.clone(), released.clone());
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let (req_count, hc_count, mut released) =
                                (req_count.clone(), hc_count.clone(), released.clone());
                            async move {
                                let path = req.uri().path().to_string();
                                let status = if path == "/health" {
                                    hc_count.fetch_add(1, Ordering::SeqCst);
                                    health_status
                                } else {
                                    req_count.fetch_add(1, Ordering::SeqCst);
                                    match path.as_str() {
                                        "/slow" => {
                                            let _ = released.wait_for(|r| *r).await;
                                            200
                                        }
                                        "/fail" => 500,
                                        _ => 200,
                                    }
                                };
                                Response::builder()
                                    .status(status)
                                    .header("x-release", format!("test-{ip}"))
                                    .body(Full::new(Bytes::from(format!("{ip} {path}\n"))))
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Backend {
            requests,
            health_checks,
            release,
            task,
        }
    }

    /// Requests other than health checks.
    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    fn health_checks(&self) -> usize {
        self.health_checks.load(Ordering::SeqCst)
    }

    fn release_slow(&self) {
        self.release.send_replace(true);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.release.send_replace(true);
        self.task.abort();
    }
}
