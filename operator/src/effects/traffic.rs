//! Reading a cluster's traffic for the planner, and its error rate for
//! auto-rollback.

use std::time::Duration;

use chrono::{DateTime, DurationRound, Utc};
use hangar_cloud::{AlbMetric, CloudError, Metrics};
use hangar_crds::{ClusterSpec, MetricSource};

use crate::core::planner::Reading;

/// The cluster's total rate in requests per minute, from its latest
/// complete metric period; `None` when there is no data.
///
/// Both CloudWatch metrics read the target group's `RequestCount` sum.
/// `RequestCountPerTarget` is that sum over the period's healthy
/// targets, so `targetPerNode` means the same for both; turning its
/// average back into a total would need the healthy count of that very
/// period, and the serving count hangar lists lags it (tags are listed
/// late, a node is healthy in the group before it is tagged): while
/// nodes join, average × listed count under- or over-reports the traffic.
pub async fn read_rate(
    metrics: &dyn Metrics,
    spec: &ClusterSpec,
    now: DateTime<Utc>,
) -> Result<Option<Reading>, CloudError> {
    let Some(auto) = &spec.autoscaling else {
        return Ok(None);
    };
    match &auto.metric {
        MetricSource::Prometheus(p) => {
            Ok(metrics
                .prometheus(&p.url, &p.query)
                .await?
                .map(|v| Reading {
                    requests_per_minute: v,
                    observed_at: now,
                }))
        }
        MetricSource::Cloudwatch(cw) => {
            let period = cw.options().period.get().max(Duration::from_secs(1));
            let end = align_down(now, period);
            let start = end - chrono::Duration::from_std(period * 5).unwrap_or_default();
            let points = metrics
                .alb_sums(
                    &spec.load_balancer.target_group_arn,
                    AlbMetric::RequestCount,
                    period,
                    start,
                    end,
                )
                .await?;
            let Some(last) = points.last() else {
                return Ok(None);
            };
            Ok(Some(Reading {
                requests_per_minute: last.value * 60.0 / period.as_secs_f64(),
                observed_at: last.start + chrono::Duration::from_std(period).unwrap_or_default(),
            }))
        }
    }
}

/// 5xx answers and requests of the target group since `since` (whole
/// periods of `period`), for the auto-rollback verdict.
pub async fn read_errors(
    metrics: &dyn Metrics,
    target_group_arn: &str,
    since: DateTime<Utc>,
    now: DateTime<Utc>,
    period: Duration,
) -> Result<(f64, f64), CloudError> {
    let start = align_down(since, period);
    let end = align_down(now, period) + chrono::Duration::from_std(period).unwrap_or_default();
    let sum = |points: Vec<hangar_cloud::Datapoint>| points.iter().map(|p| p.value).sum::<f64>();
    let errors = sum(metrics
        .alb_sums(
            target_group_arn,
            AlbMetric::Target5xxCount,
            period,
            start,
            end,
        )
        .await?);
    let requests = sum(metrics
        .alb_sums(
            target_group_arn,
            AlbMetric::RequestCount,
            period,
            start,
            end,
        )
        .await?);
    Ok((errors, requests))
}

/// The metric period to judge errors with: the autoscaling one if the
/// cluster reads CloudWatch, else ALB's native minute.
pub fn error_period(spec: &ClusterSpec) -> Duration {
    match spec.autoscaling.as_ref().map(|a| &a.metric) {
        Some(MetricSource::Cloudwatch(cw)) => cw.options().period.get(),
        _ => Duration::from_secs(60),
    }
}

fn align_down(t: DateTime<Utc>, period: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(period)
        .ok()
        .and_then(|p| t.duration_trunc(p).ok())
        .unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use chrono::TimeZone;
    use hangar_cloud::Datapoint;

    use super::*;

    type Asked = (AlbMetric, DateTime<Utc>, DateTime<Utc>);

    /// Records the queries and answers with canned sums: `points` for
    /// every metric not in `by_metric`.
    #[derive(Default)]
    struct Canned {
        points: Vec<Datapoint>,
        by_metric: Vec<(AlbMetric, Vec<Datapoint>)>,
        asked: Mutex<Vec<Asked>>,
    }

    #[async_trait]
    impl Metrics for Canned {
        async fn alb_sums(
            &self,
            _: &str,
            metric: AlbMetric,
            _: Duration,
            start: DateTime<Utc>,
            end: DateTime<Utc>,
        ) -> Result<Vec<Datapoint>, CloudError> {
            self.asked.lock().unwrap().push((metric, start, end));
            let own = self.by_metric.iter().find(|(m, _)| *m == metric);
            Ok(own.map_or(&self.points, |(_, p)| p).clone())
        }
        async fn prometheus(&self, _: &str, _: &str) -> Result<Option<f64>, CloudError> {
            Ok(Some(42.0))
        }
    }

    fn spec(metric: &str) -> ClusterSpec {
        let yaml = format!(
            r#"
apiVersion: hangar/v1alpha1
kind: Cluster
metadata: {{ name: web }}
spec:
  region: eu-west-1
  instances: {{ launchTemplate: lt-1, subnets: [subnet-1] }}
  loadBalancer: {{ targetGroupArn: "arn:aws:elasticloadbalancing:eu-west-1:1:targetgroup/web/1" }}
  capacity: {{ min: 1, max: 5 }}
  autoscaling: {{ metric: {metric}, targetPerNode: 100 }}
  ssh: {{ user: deploy, privateKeyFile: /k }}
  provision: {{ runbook: r.yaml }}
  release: {{ id: v1, artifact: "s3://b/k", sha256: "{sha}" }}
"#,
            sha = "a".repeat(64)
        );
        serde_saphyr::from_str::<hangar_crds::Cluster>(&yaml)
            .unwrap()
            .spec
    }

    fn t(s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap() + chrono::Duration::seconds(s.into())
    }

    #[tokio::test]
    async fn the_latest_complete_period_becomes_a_rate_per_minute() {
        let m = Canned {
            points: vec![
                Datapoint {
                    start: t(0),
                    value: 10.0,
                },
                Datapoint {
                    start: t(10),
                    value: 50.0,
                },
            ],
            ..Canned::default()
        };
        let s = spec("{ cloudwatch: { requestCountPerTarget: { period: 10s } } }");
        let obs = read_rate(&m, &s, t(27)).await.unwrap().unwrap();
        // 50 requests in 10 s.
        assert_eq!(obs.requests_per_minute, 300.0);
        assert_eq!(obs.observed_at, t(20));
        let asked = m.asked.lock().unwrap();
        assert_eq!(asked[0].0, AlbMetric::RequestCount);
        assert_eq!(asked[0].2, t(20), "only complete periods are asked for");
    }

    /// Seen in e2e: two nodes joined during the period, so the ALB's
    /// per-target average was taken over 2 to 4 healthy targets, while the
    /// instance listing (tags lag) still showed 2 serving. Average × 2
    /// read 973/min for 1,200/min of traffic, and the next clean period
    /// came only after the scale-down stabilization had seen it.
    #[tokio::test]
    async fn a_period_in_which_nodes_joined_reads_as_its_total_whatever_the_listing_shows() {
        let point = |value| {
            vec![Datapoint {
                start: t(10),
                value,
            }]
        };
        let m = Canned {
            by_metric: vec![
                (AlbMetric::RequestCount, point(200.0)),
                (AlbMetric::RequestCountPerTarget, point(81.1)),
            ],
            ..Canned::default()
        };
        let s = spec("{ cloudwatch: { requestCountPerTarget: { period: 10s } } }");
        let obs = read_rate(&m, &s, t(27)).await.unwrap().unwrap();
        assert_eq!(obs.requests_per_minute, 1200.0);
    }

    #[tokio::test]
    async fn no_datapoint_is_no_data_not_zero() {
        let m = Canned {
            points: vec![],
            ..Canned::default()
        };
        let s = spec("{ cloudwatch: { requestCount: {} } }");
        assert_eq!(read_rate(&m, &s, t(0)).await.unwrap(), None);
    }

    #[tokio::test]
    async fn prometheus_is_taken_as_the_total() {
        let m = Canned {
            points: vec![],
            ..Canned::default()
        };
        let s =
            spec("{ prometheus: { url: \"http://127.0.0.1:9\", query: \"sum(rate(x[1m]))*60\" } }");
        let obs = read_rate(&m, &s, t(0)).await.unwrap().unwrap();
        assert_eq!(obs.requests_per_minute, 42.0);
    }

    #[tokio::test]
    async fn error_counts_cover_the_window_since_activation() {
        let m = Canned {
            points: vec![
                Datapoint {
                    start: t(0),
                    value: 4.0,
                },
                Datapoint {
                    start: t(10),
                    value: 6.0,
                },
            ],
            ..Canned::default()
        };
        let (errors, requests) = read_errors(&m, "tg", t(3), t(25), Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!((errors, requests), (10.0, 10.0));
        let asked = m.asked.lock().unwrap();
        assert_eq!(asked[0], (AlbMetric::Target5xxCount, t(0), t(30)));
        assert_eq!(asked[1].0, AlbMetric::RequestCount);
    }
}
