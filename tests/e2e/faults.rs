//! Faults from outside: AWS throttling and failing, nodes dying behind
//! hangar's back, a node that stops answering SSH.

use std::time::{Duration, Instant, SystemTime};

use hangar_cloud::Phase;
use hangar_local::artifact::ReleaseKind;
use hangar_local::eventually;
use hangar_local::faults::{Fault, Rule, Service};

use crate::support::operator::log_tail;
use crate::support::{seed, settled_on, Scenario};

/// Sum of a Prometheus counter family's samples.
fn counter_sum(metrics: &str, family: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn with_aws_throttling_and_failing_a_quarter_of_calls_scale_out_rollout_and_scale_in_converge() {
    let seed = seed();
    let mut s = Scenario::start();
    s.aws_faults(seed);
    let proxy = s.faults();
    // A quarter of EC2 and ELB calls throttled, some 500s and dropped
    // connections everywhere.
    proxy.add(
        Rule::new(Fault::Throttle)
            .service(Service::Ec2)
            .probability(0.25),
    );
    proxy.add(
        Rule::new(Fault::Throttle)
            .service(Service::Elbv2)
            .probability(0.25),
    );
    proxy.add(Rule::new(Fault::ServerError).probability(0.05));
    proxy.add(Rule::new(Fault::Reset).probability(0.03));

    let base = s.spec().remove("spec.autoscaling");
    s.write_spec(&base.clone().with_capacity(2, 2));
    s.start_operator();
    s.wait_status("web", "2 in service", Duration::from_secs(180), |st| {
        settled_on(st, 2, "v1")
    });
    let load = s.cloud.start_load(10.0, None).expect("load");

    s.write_spec(&base.clone().with_capacity(4, 4));
    s.wait_status("web", "scaled out to 4", Duration::from_secs(180), |st| {
        settled_on(st, 4, "v1")
    });

    let v2 = s.cloud.upload_release("v2", ReleaseKind::Good).expect("v2");
    s.write_spec(&base.clone().with_capacity(4, 4).with_release(&v2));
    s.wait_status("web", "rolled out v2", Duration::from_secs(240), |st| {
        settled_on(st, 4, "v2")
    });

    s.write_spec(&base.clone().with_capacity(2, 2).with_release(&v2));
    s.wait_status("web", "scaled in to 2", Duration::from_secs(180), |st| {
        settled_on(st, 2, "v2")
    });
    let report = load.stop();
    assert_eq!(report.errors, 0, "seed {seed}: no request lost: {report:?}");

    s.watcher.assert_invariants();
    let watch = s.watcher.report();
    assert_eq!(
        watch.launched.len(),
        4,
        "seed {seed}: no double launch: {watch:?}"
    );
    assert_eq!(watch.terminated.len(), 2, "seed {seed}: {watch:?}");

    let proxy = s.faults();
    let injected: u64 = proxy.all_stats().values().map(|st| st.injected).sum();
    let ec2 = proxy
        .all_stats()
        .iter()
        .filter(|(c, _)| c.service == Service::Ec2)
        .map(|(_, st)| st.injected)
        .sum::<u64>();
    assert!(ec2 > 0, "EC2 faults were injected: {:?}", proxy.all_stats());
    // The backoff is visible where an operator would look.
    let metrics = s.operator().metrics().expect("metrics");
    let throttles = counter_sum(&metrics, "hangar_cloud_api_throttles_total");
    let retries = counter_sum(&metrics, "hangar_cloud_api_retries_total");
    assert!(throttles > 0.0, "throttles counted: {metrics}");
    assert!(retries > 0.0, "retries counted: {metrics}");
    eprintln!("seed {seed}: {injected} faults injected; operator counted {throttles} throttles, {retries} retries");
}

#[test]
fn nodes_dying_behind_hangars_back_are_replaced_and_the_lb_stops_routing_to_them() {
    let mut s = Scenario::start();
    // A drain hook that takes 3 s keeps a node in `draining` long enough
    // to be caught there.
    let base = s
        .spec()
        .remove("spec.autoscaling")
        .set("spec.selfHealing.unhealthyAfter", "5s")
        .set(
            "spec.drain.hooks",
            hangar_local::spec::Yaml::list(["sleep 3"]),
        );
    s.write_spec(&base.clone().with_capacity(2, 2));
    s.start_operator();
    let st = s.wait_status("web", "2 in service", Duration::from_secs(120), |st| {
        settled_on(st, 2, "v1")
    });
    let load = s.cloud.start_load(10.0, None).expect("load");

    // 1. An in-service node dies.
    let victim = st.nodes[0].id.clone();
    s.watcher.killed_by_test(&victim);
    let killed_at = SystemTime::now();
    s.cloud.terminate(&[victim.as_str()]).expect("terminate");
    s.wait_status(
        "web",
        "the dead node replaced",
        Duration::from_secs(120),
        |st| settled_on(st, 2, "v1") && st.nodes.iter().all(|n| n.id != victim),
    );
    // The LB's health checks (200 ms, 2 failures) take it out of rotation:
    // nothing is sent to it later than a second after it died.
    let late: Vec<_> = s
        .cloud
        .lb()
        .requests()
        .into_iter()
        .filter(|r| r.target.as_deref() == Some(victim.as_str()))
        .filter(|r| {
            r.started
                .duration_since(killed_at)
                .is_ok_and(|d| d > Duration::from_secs(1))
        })
        .collect();
    assert!(late.is_empty(), "routed to a dead node: {late:?}");

    // 2. A node dies while it is being provisioned.
    s.write_spec(&base.clone().with_capacity(3, 3));
    let young = s
        .wait_status("web", "a node coming up", Duration::from_secs(60), |st| {
            st.nodes.iter().any(|n| n.phase != "in-service")
        })
        .nodes
        .into_iter()
        .find(|n| n.phase != "in-service")
        .map(|n| n.id)
        .expect("the node the status showed");
    s.watcher.killed_by_test(&young);
    s.cloud.terminate(&[young.as_str()]).expect("terminate");
    s.wait_status("web", "3 in service", Duration::from_secs(120), |st| {
        settled_on(st, 3, "v1") && st.nodes.iter().all(|n| n.id != young)
    });

    // 3. A node dies while it drains.
    s.write_spec(&base.clone().with_capacity(2, 2));
    // Watched on the instance's phase tag, not in the status: a drain
    // (3 s of hook) can start and end between two reconcile passes.
    let draining = eventually(Duration::from_secs(60), "a node draining", || {
        s.instances("web")
            .into_iter()
            .find(|i| i.phase == Some(Phase::Draining))
            .map(|i| i.id)
    })
    .unwrap_or_else(|e| panic!("{e:?}\noperator log:\n{}", log_tail(&s.log, 60)));
    s.watcher.killed_by_test(&draining);
    s.cloud.terminate(&[draining.as_str()]).expect("terminate");
    s.wait_status("web", "back to 2", Duration::from_secs(120), |st| {
        settled_on(st, 2, "v1") && st.nodes.iter().all(|n| n.id != draining)
    });

    let report = load.stop();
    // Requests in flight on the node at the instant it died may fail, as
    // they would on EC2; nothing else may.
    assert!(
        report.errors <= 3,
        "only requests in flight at a death may fail: {report:?}"
    );
    s.watcher.assert_invariants();
}

#[test]
fn a_node_that_stops_answering_ssh_is_given_up_and_replaced_never_registered() {
    let mut s = Scenario::start();
    s.write_spec(
        &s.spec()
            .remove("spec.autoscaling")
            .with_capacity(1, 1)
            .set("spec.ssh.connectTimeout", "2s")
            .set("spec.ssh.commandTimeout", "5s")
            .set("spec.release.healthCheck.deadline", "20s"),
    );
    s.start_operator();
    // Freeze the first node the moment it exists: every process in it
    // stops (SIGSTOP), so TCP connects but SSH never answers.
    let frozen = eventually(Duration::from_secs(60), "the first node", || {
        s.cloud.nodes().into_iter().next()
    })
    .expect("a node starts");
    let stopped = freeze(&frozen.namespace);
    assert!(stopped > 0, "froze the node's processes");
    let started = Instant::now();

    let st = s.wait_status(
        "web",
        "a replacement in service",
        Duration::from_secs(240),
        |st| settled_on(st, 1, "v1") && st.nodes[0].id != frozen.instance_id,
    );
    eprintln!("hung node replaced after {:?}", started.elapsed());
    assert!(
        st.activities
            .iter()
            .any(|a| a.node.as_deref() == Some(frozen.instance_id.as_str()) && a.kind == "error"),
        "the give-up is recorded: {:?}",
        st.activities
    );
    assert!(
        s.watcher
            .report()
            .registrations
            .iter()
            .all(|(id, _)| *id != frozen.instance_id),
        "the hung node was never registered"
    );
    s.watcher.assert_invariants();
}

/// SIGSTOPs every process in the node's mount namespace (`mnt:[inode]`);
/// returns how many. Terminating the instance later kills them (SIGKILL
/// works on stopped processes).
fn freeze(namespace: &str) -> usize {
    hangar_local::node::pids_in_namespace(namespace)
        .into_iter()
        // SAFETY: kill(2) on a pid read from /proc; at worst ESRCH.
        .filter(|&pid| unsafe { libc::kill(pid as i32, libc::SIGSTOP) } == 0)
        .count()
}
