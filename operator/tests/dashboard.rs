//! The Grafana dashboard (`infra/grafana/hangar.json`) against what an
//! operator's `/metrics` really serves once every family has a series (a
//! family with none — no rollout yet, no SSH error yet — is not in a
//! scrape at all). The live version of this check runs in the
//! status-page scenario (`tests/e2e/page.rs`).

#[path = "../../tests/e2e/support/dashboard.rs"]
mod dashboard;

use std::sync::Arc;

use hangar::runtime::http::{router, Board};
use hangar::runtime::telemetry::{
    ApiSample, ApiStats, KindLabel, PhaseLabels, ResultLabels, TaskLabels, Telemetry,
};
use tower::ServiceExt as _;

struct OneCall;
impl ApiStats for OneCall {
    fn sample(&self) -> Vec<ApiSample> {
        vec![ApiSample {
            service: "ec2".into(),
            operation: "DescribeInstances".into(),
            calls: 1,
            ..ApiSample::default()
        }]
    }
}

#[tokio::test]
async fn every_dashboard_query_names_a_metric_metrics_serves() {
    let telemetry = Telemetry::new();
    telemetry.set_api_stats(Arc::new(OneCall));
    // One series in every family, through the same handles reconcile uses.
    let web = Telemetry::cluster("web");
    telemetry.desired_nodes.get_or_create(&web).set(2);
    telemetry.reconcile_errors.get_or_create(&web).inc();
    telemetry.reconcile_duration.observe(0.01);
    telemetry
        .nodes
        .get_or_create(&PhaseLabels {
            cluster: "web".into(),
            phase: "in-service".into(),
        })
        .set(2);
    let result = |r: &str| ResultLabels {
        cluster: "web".into(),
        result: r.into(),
    };
    telemetry
        .scaling_actions
        .get_or_create(&result("out"))
        .inc();
    telemetry.rollouts.get_or_create(&result("started")).inc();
    telemetry
        .node_tasks
        .get_or_create(&TaskLabels {
            task: "advance".into(),
            result: "ok".into(),
        })
        .inc();
    telemetry
        .ssh_errors
        .get_or_create(&KindLabel {
            kind: "connect".into(),
        })
        .inc();
    telemetry.spec_problems.set(0);
    let app = router(Arc::new(Board::default()), telemetry);
    let req = axum::http::Request::builder()
        .uri("/metrics")
        .body(axum::body::Body::empty())
        .expect("request");
    let resp = app.oneshot(req).await.expect("answer");
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("body");
    let metrics = String::from_utf8_lossy(&body);
    let text = std::fs::read_to_string(dashboard::dashboard_path()).expect("dashboard file");
    let (problems, used) = dashboard::problems(&text, &metrics);
    assert!(problems.is_empty(), "{problems:#?}\nscrape:\n{metrics}");
    // What the issue asks the dashboard to show.
    for m in [
        "hangar_nodes",
        "hangar_desired_nodes",
        "hangar_scaling_actions_total",
        "hangar_rollouts_total",
        "hangar_reconcile_duration_seconds_bucket",
        "hangar_cloud_api_calls_total",
        "hangar_cloud_api_throttles_total",
    ] {
        assert!(used.contains(m), "the dashboard does not chart {m}");
    }
}

#[test]
fn a_query_on_a_metric_that_does_not_exist_is_caught() {
    let metrics =
        "# TYPE hangar_nodes gauge\nhangar_nodes{cluster=\"web\",phase=\"in-service\"} 2\n";
    let dash = r#"{"uid":"u","title":"t","schemaVersion":39,"panels":[{"id":1,"title":"x","type":"timeseries",
        "gridPos":{"x":0,"y":0,"w":1,"h":1},
        "targets":[{"refId":"A","datasource":{"uid":"${datasource}"},"expr":"sum(hangar_nodez)"}]}]}"#;
    let (problems, _) = dashboard::problems(dash, metrics);
    assert_eq!(problems, ["panel `x`: `hangar_nodez` is not exported"]);
    assert_eq!(
        dashboard::metric_names("rate(hangar_a_total[5m]) / not_hangar_b"),
        ["hangar_a_total"]
    );
}
