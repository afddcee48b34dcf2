//! Traffic and schedules move the node count.

use std::time::{Duration, Instant};

use hangar_local::spec::Yaml;

use crate::support::{in_service, settled_on, Scenario};

#[test]
fn scales_out_on_traffic_and_back_in_draining_each_node_before_termination() {
    let mut s = Scenario::start();
    // 300 requests/minute per node, 2..6 nodes.
    s.write_spec(&s.spec().with_capacity(2, 6));
    s.start_operator();
    s.wait_status("web", "2 in service", Duration::from_secs(120), |st| {
        settled_on(st, 2, "v1")
    });

    // 20 rps = 1,200/minute: 4 nodes' worth.
    let heavy = s.cloud.start_load(20.0, None).expect("load");
    let started = Instant::now();
    let out = s.wait_status("web", "scaled out to 4", Duration::from_secs(120), |st| {
        settled_on(st, 4, "v1")
    });
    let took = started.elapsed();
    assert!(
        out.activities
            .iter()
            .any(|a| a.kind == "scale" && a.message.contains("→ 4")),
        "the decision is recorded: {:?}",
        out.activities
    );
    // The traffic asks for 4, no more and no fewer: the metric periods in
    // which the new nodes joined must move it neither way. 12 s outlasts
    // the 10 s scale-down stabilization, so one misread period would show.
    std::thread::sleep(Duration::from_secs(12));
    let st = s.status("web").expect("status");
    assert_eq!(st.memory.desired, 4, "{:?}", st.memory.last_decision);
    let heavy = heavy.stop();
    assert_eq!(
        heavy.errors, 0,
        "no request failed while scaling out: {heavy:?}"
    );

    // Light traffic (2 rps) while it scales back in: every request still
    // answered, each removed node drained before it is terminated.
    let light = s.cloud.start_load(2.0, None).expect("load");
    let back = s.wait_status("web", "back to 2", Duration::from_secs(180), |st| {
        settled_on(st, 2, "v1")
    });
    let light = light.stop();
    assert_eq!(light.errors, 0, "no request lost while draining: {light:?}");
    assert!(
        back.activities.iter().filter(|a| a.kind == "drain").count() >= 2,
        "{:?}",
        back.activities
    );
    // maxStep is per evaluation (every 1 s in these scenarios), not per
    // pass: the passes that node events trigger in between (a drain
    // starting, a node terminated) must not shed a second node.
    let mut steps_in: Vec<_> = back
        .activities
        .iter()
        .filter(|a| a.kind == "scale")
        .filter_map(|a| Some((a.at, scale_change(&a.message)?)))
        .filter(|(_, (from, to))| to < from)
        .collect();
    steps_in.reverse();
    assert_eq!(
        steps_in.iter().map(|(_, c)| *c).collect::<Vec<_>>(),
        [(4, 3), (3, 2)],
        "one node per step: {:?}",
        back.activities
    );
    let gap = steps_in[1].0 - steps_in[0].0;
    assert!(
        gap >= chrono::Duration::seconds(1),
        "the second step waited for the next evaluation, not {gap}: {:#?}\noperator log:\n{}",
        back.activities,
        crate::support::operator::log_tail(&s.log, 200)
    );

    s.watcher.assert_invariants();
    let report = s.watcher.report();
    assert_eq!(report.launched.len(), 4, "{report:?}");
    assert_eq!(report.terminated.len(), 2, "{report:?}");
    assert!(
        report.max_alive <= 4,
        "never above what the traffic asks: {report:?}"
    );
    eprintln!("scale-out to 4 took {took:?}");
}

/// `(4, 3)` from a scale activity's "desired 4 → 3: …".
fn scale_change(message: &str) -> Option<(u32, u32)> {
    let (change, _) = message.strip_prefix("desired ")?.split_once(':')?;
    let (from, to) = change.split_once(" → ")?;
    Some((from.trim().parse().ok()?, to.trim().parse().ok()?))
}

#[test]
fn capacity_follows_the_schedule_window() {
    let mut s = Scenario::start();
    // A window that opened at the last minute boundary and lasts an hour:
    // open now, whatever the clock says.
    let window = |name: &str, capacity: Yaml| {
        Yaml::list([Yaml::map([
            ("name", Yaml::from(name)),
            ("cron", "* * * * *".into()),
            ("until", "1h".into()),
            ("timezone", "Europe/Dublin".into()),
            ("capacity", capacity),
        ])])
    };
    let base = s.spec().remove("spec.autoscaling").with_capacity(2, 4);
    s.write_spec(
        &base
            .clone()
            .set("spec.schedules", window("peak", Yaml::map([("min", 3)]))),
    );
    s.start_operator();
    let st = s.wait_status(
        "web",
        "the peak window's 3 nodes",
        Duration::from_secs(120),
        |st| settled_on(st, 3, "v1"),
    );
    let w = st.memory.window.expect("window");
    assert_eq!((w.min, w.max, w.schedule.as_deref()), (3, 4, Some("peak")));

    s.write_spec(&base.clone().set(
        "spec.schedules",
        window("night", Yaml::map([("min", 1), ("max", 1)])),
    ));
    let st = s.wait_status(
        "web",
        "the night window's 1 node",
        Duration::from_secs(120),
        |st| settled_on(st, 1, "v1"),
    );
    assert_eq!(
        st.memory.window.and_then(|w| w.schedule).as_deref(),
        Some("night")
    );
    assert!(st
        .memory
        .last_decision
        .is_some_and(|d| d.reason.contains("night schedule active")));

    s.write_spec(&base);
    s.wait_status(
        "web",
        "no window: back to min 2",
        Duration::from_secs(120),
        |st| settled_on(st, 2, "v1") && in_service(st) == 2,
    );
    s.watcher.assert_invariants();
}
