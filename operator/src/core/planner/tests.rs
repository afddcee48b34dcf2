use chrono::{Duration, TimeZone, Utc};
use hangar_crds::schedule::local_time;
use proptest::prelude::*;

use super::*;

fn spec(extra: &str) -> ClusterSpec {
    let yaml = format!(
        r#"
apiVersion: hangar/v1alpha1
kind: Cluster
metadata: {{ name: web }}
spec:
  region: eu-west-1
  instances: {{ launchTemplate: lt-1, subnets: [subnet-1] }}
  loadBalancer: {{ targetGroupArn: "arn:aws:elasticloadbalancing:eu-west-1:1:targetgroup/web/1" }}
  capacity: {{ min: 2, max: 20 }}
  ssh: {{ user: deploy, privateKeyFile: /k }}
  provision: {{ runbook: r.yaml }}
  release: {{ id: v1, artifact: "s3://b/k", sha256: "{sha}" }}
{extra}"#,
        sha = "a".repeat(64)
    );
    serde_saphyr::from_str::<hangar_crds::Cluster>(&yaml)
        .expect("test spec parses")
        .spec
}

const AUTOSCALING: &str = "  autoscaling:
    metric: { cloudwatch: { requestCountPerTarget: {} } }
    targetPerNode: 1000
";

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap()
}

fn obs(rate: f64, at: DateTime<Utc>) -> Option<Reading> {
    Some(Reading {
        requests_per_minute: rate,
        observed_at: at,
    })
}

#[test]
fn without_autoscaling_the_cluster_runs_at_min() {
    let d = plan(&spec(""), t0(), 5, None, &History::default());
    assert_eq!(d.desired, 2);
    assert!(d.reason.contains("no autoscaling"), "{}", d.reason);
}

#[test]
fn scales_out_to_cover_the_rate() {
    let s = spec(AUTOSCALING);
    let d = plan(&s, t0(), 3, obs(5400.0, t0()), &History::default());
    assert_eq!(d.desired, 6);
    assert!(
        d.reason
            .contains("rate 5400/min over 3 nodes > target 1000: 6 needed"),
        "{}",
        d.reason
    );
    assert!(d.reason.ends_with("6 (+3)"), "{}", d.reason);
    assert_eq!(
        d.recommendation,
        Some(Recommendation { at: t0(), nodes: 6 })
    );
}

#[test]
fn holds_within_tolerance() {
    let s = spec(AUTOSCALING);
    let d = plan(&s, t0(), 2, obs(2150.0, t0()), &History::default());
    assert_eq!(d.desired, 2);
    assert!(d.reason.contains("within 10% of target"), "{}", d.reason);
    let d = plan(&s, t0(), 2, obs(2250.0, t0()), &History::default());
    assert_eq!(
        d.desired, 3,
        "12.5% over target is outside the 10% tolerance"
    );
}

#[test]
fn scale_up_is_limited_to_max_step() {
    let s = spec(AUTOSCALING);
    let d = plan(&s, t0(), 2, obs(15_000.0, t0()), &History::default());
    assert_eq!(d.desired, 6);
    assert!(d.reason.contains("step limited to +4"), "{}", d.reason);
}

#[test]
fn missing_or_stale_metric_never_scales_down() {
    let s = spec(AUTOSCALING);
    let d = plan(&s, t0(), 7, None, &History::default());
    assert_eq!(d.desired, 7);
    assert!(
        d.reason.contains("no traffic metric: hold 7"),
        "{}",
        d.reason
    );
    assert_eq!(d.recommendation, None);
    let old = obs(10.0, t0() - Duration::minutes(10));
    let d = plan(&s, t0(), 7, old, &History::default());
    assert_eq!(d.desired, 7);
    assert!(d.reason.contains("stale"), "{}", d.reason);
}

#[test]
fn missing_metric_still_obeys_the_window() {
    let s = spec(AUTOSCALING);
    let d = plan(&s, t0(), 25, None, &History::default());
    assert_eq!(d.desired, 20);
    assert!(d.reason.contains("capacity: max 20"), "{}", d.reason);
}

#[test]
fn scale_down_waits_for_its_stabilization_window() {
    let s = spec(AUTOSCALING);
    let mut h = History::default();
    // Traffic for 6 nodes a minute ago, then it drops to 2 nodes' worth.
    h.record(
        Recommendation {
            at: t0() - Duration::seconds(60),
            nodes: 6,
        },
        &s,
    );
    let d = plan(&s, t0(), 6, obs(2000.0, t0()), &h);
    assert_eq!(d.desired, 6);
    assert!(
        d.reason
            .contains("scale-down stabilization (5m) holds at 6"),
        "{}",
        d.reason
    );
    // Five minutes of low traffic later it sheds one node per decision.
    let later = t0() + Duration::seconds(301);
    h.record(d.recommendation.unwrap(), &s);
    let d = plan(&s, later, 6, obs(2000.0, later), &h);
    assert_eq!(d.desired, 5);
    assert!(d.reason.contains("step limited to -1"), "{}", d.reason);
}

#[test]
fn a_steady_recommendation_is_one_history_entry() {
    let s = spec(AUTOSCALING);
    let mut h = History::default();
    for i in 0..100 {
        h.record(
            Recommendation {
                at: t0() + Duration::seconds(15 * i),
                nodes: 3,
            },
            &s,
        );
    }
    assert_eq!(h.len(), 1);
    h.record(
        Recommendation {
            at: t0() + Duration::seconds(1500),
            nodes: 4,
        },
        &s,
    );
    assert_eq!(h.len(), 2);
}

#[test]
fn a_brief_dip_sheds_nothing() {
    let s = spec(AUTOSCALING);
    let mut h = History::default();
    let mut current = 5;
    for i in 0..40 {
        let now = t0() + Duration::seconds(15 * i);
        let rate = if i == 20 { 500.0 } else { 5000.0 };
        let d = plan(&s, now, current, obs(rate, now), &h);
        if let Some(r) = d.recommendation {
            h.record(r, &s);
        }
        current = d.desired;
        assert_eq!(current, 5, "step {i}: {}", d.reason);
    }
}

#[test]
fn schedule_overrides_the_window() {
    let s = spec(&format!(
        "{AUTOSCALING}  schedules:
    - {{ name: night, cron: \"0 22 * * *\", until: \"0 7 * * *\", timezone: Europe/Dublin, capacity: {{ min: 1, max: 3 }} }}
    - {{ name: morning-peak, cron: \"30 7 * * 1-5\", until: 3h, timezone: Europe/Dublin, capacity: {{ min: 6 }} }}
"
    ));
    let tz: chrono_tz::Tz = "Europe/Dublin".parse().unwrap();
    let night = local_time(tz, 2026, 11, 23, 23, 0).unwrap();
    let d = plan(&s, night, 10, obs(9000.0, night), &History::default());
    assert_eq!(d.desired, 3);
    assert_eq!(d.window.schedule.as_deref(), Some("night"));
    assert!(
        d.reason.contains("night schedule active: max 3"),
        "{}",
        d.reason
    );

    let peak = local_time(tz, 2026, 11, 24, 8, 0).unwrap(); // a Tuesday
    let d = plan(&s, peak, 2, obs(100.0, peak), &History::default());
    assert_eq!(d.desired, 6);
    assert_eq!(
        d.window,
        EffectiveCapacity {
            min: 6,
            max: 20,
            schedule: Some("morning-peak".into())
        }
    );
    assert!(
        d.reason.contains("morning-peak schedule active: min 6"),
        "{}",
        d.reason
    );

    let noon = local_time(tz, 2026, 11, 24, 12, 0).unwrap();
    assert_eq!(
        effective_capacity(&s, noon),
        EffectiveCapacity {
            min: 2,
            max: 20,
            schedule: None
        }
    );
}

#[test]
fn between_evaluations_the_decision_holds_and_only_the_window_moves_it() {
    let s = spec(&format!(
        "{AUTOSCALING}  schedules:
    - {{ name: night, cron: \"0 22 * * *\", until: \"0 7 * * *\", timezone: Europe/Dublin, capacity: {{ min: 1, max: 3 }} }}
"
    ));
    let tz: chrono_tz::Tz = "Europe/Dublin".parse().unwrap();
    let day = local_time(tz, 2026, 11, 23, 21, 0).unwrap();
    let d = hold(&s, day, 5);
    assert_eq!((d.desired, d.recommendation), (5, None));
    assert!(d.reason.contains("hold 5"), "{}", d.reason);

    let night = local_time(tz, 2026, 11, 23, 22, 0).unwrap();
    let d = hold(&s, night, 5);
    assert_eq!(d.desired, 3);
    assert!(
        d.reason.contains("night schedule active: max 3"),
        "{}",
        d.reason
    );
}

/// Scale-in by one per evaluation, acting at once (no stabilization).
fn scale_in_one_at_a_time() -> ClusterSpec {
    spec(&format!(
        "{AUTOSCALING}    scaleDown: {{ stabilization: 0s, maxStep: 1 }}
"
    ))
}

#[test]
fn a_pass_between_evaluations_never_steps_again_on_the_same_reading() {
    let s = scale_in_one_at_a_time();
    let quiet = obs(500.0, t0()); // one node's worth; min is 2
    let h = History::default();
    let evaluation = |standing, at| Pass {
        standing: Some(standing),
        counted: standing,
        evaluation_due: at,
    };
    let d = for_pass(&s, t0(), &evaluation(4, true), quiet, &h);
    assert_eq!(d.desired, 3, "{}", d.reason);

    // 100 ms later a node event (the drain started) triggers a pass: the
    // reading is the same, no evaluation is due, nothing moves.
    let soon = t0() + Duration::milliseconds(100);
    let d = for_pass(&s, soon, &evaluation(3, false), quiet, &h);
    assert_eq!(d.desired, 3, "{}", d.reason);
    assert!(
        d.reason.contains("until the next evaluation"),
        "{}",
        d.reason
    );
    assert_eq!(d.recommendation, None);

    // The next evaluation takes the next step.
    let later = t0() + Duration::seconds(15);
    let d = for_pass(&s, later, &evaluation(3, true), obs(500.0, later), &h);
    assert_eq!(d.desired, 2, "{}", d.reason);
}

#[test]
fn a_node_that_died_is_replaced_not_voted_away() {
    let s = spec(AUTOSCALING);
    // 4 nodes' worth of traffic; one of the 4 died, 3 are counted.
    let pass = Pass {
        standing: Some(4),
        counted: 3,
        evaluation_due: true,
    };
    let d = for_pass(&s, t0(), &pass, obs(3900.0, t0()), &History::default());
    assert_eq!(d.desired, 4, "{}", d.reason);
    // With the metric missing the standing decision holds too.
    let d = for_pass(&s, t0(), &pass, None, &History::default());
    assert_eq!(d.desired, 4, "{}", d.reason);
}

#[test]
fn the_first_pass_of_a_process_plans_from_what_runs() {
    let s = spec(AUTOSCALING);
    // Restarted after launching to 6 but before saving the decision: the
    // metric is missing, so the count that runs is held.
    let pass = Pass {
        standing: None,
        counted: 6,
        evaluation_due: false,
    };
    assert!(pass.evaluates(&s));
    let d = for_pass(&s, t0(), &pass, None, &History::default());
    assert_eq!(d.desired, 6, "{}", d.reason);
}

#[test]
fn schedule_follows_local_time_across_dst() {
    let s = spec(
        "  schedules:
    - { name: night, cron: \"0 22 * * *\", until: \"0 7 * * *\", timezone: Europe/Dublin, capacity: { min: 1, max: 1 } }
",
    );
    // Summer: 22:00 in Dublin is 21:00 UTC; winter: 22:00 UTC.
    let summer_2130_utc = Utc.with_ymd_and_hms(2026, 7, 1, 21, 30, 0).unwrap();
    let winter_2130_utc = Utc.with_ymd_and_hms(2026, 12, 1, 21, 30, 0).unwrap();
    assert_eq!(
        effective_capacity(&s, summer_2130_utc).schedule.as_deref(),
        Some("night")
    );
    assert_eq!(effective_capacity(&s, winter_2130_utc).schedule, None);
}

#[test]
fn the_most_recently_opened_window_wins() {
    let s = spec(
        "  schedules:
    - { name: weekend, cron: \"0 0 * * 6\", until: 48h, capacity: { max: 4 } }
    - { name: saturday-sale, cron: \"0 10 * * 6\", until: 4h, capacity: { min: 8, max: 12 } }
",
    );
    let sat_11 = Utc.with_ymd_and_hms(2026, 11, 28, 11, 0, 0).unwrap();
    assert_eq!(
        effective_capacity(&s, sat_11).schedule.as_deref(),
        Some("saturday-sale")
    );
    let sat_15 = Utc.with_ymd_and_hms(2026, 11, 28, 15, 0, 0).unwrap();
    assert_eq!(
        effective_capacity(&s, sat_15).schedule.as_deref(),
        Some("weekend")
    );
}

proptest! {
    #[test]
    fn desired_is_always_within_the_effective_window(
        current in 0u32..60,
        rate in prop::option::of(0.0f64..200_000.0),
        minutes in 0i64..(7 * 24 * 60),
        past in prop::collection::vec((0i64..600, 0u32..60), 0..10),
    ) {
        let s = spec(&format!("{AUTOSCALING}  schedules:
    - {{ name: night, cron: \"0 22 * * *\", until: \"0 7 * * *\", timezone: Europe/Dublin, capacity: {{ min: 1, max: 3 }} }}
"));
        let now = t0() + Duration::minutes(minutes);
        let mut h = History::default();
        let mut past = past;
        past.sort_by_key(|(ago, _)| -ago);
        for (ago, nodes) in past {
            h.record(Recommendation { at: now - Duration::seconds(ago), nodes }, &s);
        }
        let d = plan(&s, now, current, rate.and_then(|r| obs(r, now)), &h);
        prop_assert!(d.window.min <= d.desired && d.desired <= d.window.max, "{d:?}");
    }

    #[test]
    fn a_constant_metric_converges_and_never_oscillates(rate in 0.0f64..30_000.0, start in 0u32..25) {
        let s = spec(AUTOSCALING);
        let mut h = History::default();
        let mut counts = vec![start];
        for i in 0..200 {
            let now = t0() + Duration::seconds(15 * i);
            let current = *counts.last().unwrap();
            let d = plan(&s, now, current, obs(rate, now), &h);
            if let Some(r) = d.recommendation { h.record(r, &s); }
            counts.push(d.desired);
        }
        // Monotone: the count moves in one direction only, then stays.
        let ups = counts.windows(2).any(|w| w[1] > w[0]);
        let downs = counts.windows(2).any(|w| w[1] < w[0]);
        prop_assert!(!(ups && downs), "oscillated: {counts:?}");
        // And it has settled well within 50 minutes of the same traffic.
        let tail = &counts[150..];
        prop_assert!(tail.iter().all(|&c| c == tail[0]), "still moving: {tail:?}");
    }
}
