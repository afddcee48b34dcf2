//! [`Metrics`]: ALB sums from CloudWatch `GetMetricData`, and Prometheus.
//!
//! ALB metrics live in `AWS/ApplicationELB` under the dimensions
//! `LoadBalancer=app/<name>/<id>` and `TargetGroup=targetgroup/<name>/<id>`.
//! The spec names only the target group, so its load balancer is looked up
//! once (`DescribeTargetGroups`) and cached. Dimensions are always sent
//! sorted by name: CloudWatch does not care, moto's `GetMetricData` does.
//! Reads that arrive together share one call ([`crate::metric_batch`]).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_cloudwatch::types::{
    Dimension, Metric, MetricDataQuery, MetricStat, ScanBy, StatusCode,
};
use aws_smithy_types::DateTime as SmithyTime;
use chrono::{DateTime, Utc};

use super::errors::from_sdk;
use super::limiter::Budget;
use super::AwsCloud;
use crate::error::CloudError;
use crate::metric_batch::{AlbAnswer, AlbBatch, AlbQuery};
use crate::metrics::{AlbMetric, Datapoint, Metrics};

const NAMESPACE: &str = "AWS/ApplicationELB";

#[async_trait]
impl Metrics for AwsCloud {
    /// Rides a `GetMetricData` shared with the reads of other clusters in
    /// the region (see [`crate::metric_batch`]).
    async fn alb_sums(
        &self,
        target_group_arn: &str,
        metric: AlbMetric,
        period: Duration,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    ) -> Result<Vec<Datapoint>, CloudError> {
        let query = AlbQuery::new(target_group_arn, metric, period, start, end);
        self.inner.metric_batcher.alb_sums(self, query).await
    }

    async fn prometheus(&self, base_url: &str, query: &str) -> Result<Option<f64>, CloudError> {
        let result =
            crate::prometheus::instant_query(&self.inner.prometheus, base_url, query).await;
        self.inner
            .calls
            .record("prometheus", "query", result.is_ok());
        result
    }
}

#[async_trait]
impl AlbBatch for AwsCloud {
    /// One `GetMetricData` (a page at a time) for every valid query: the
    /// time range is the union of theirs, each answer is cut back to its
    /// own range. An invalid query is answered alone, without a call.
    async fn alb_sums_batch(&self, queries: &[AlbQuery]) -> Vec<AlbAnswer> {
        let mut answers: Vec<Option<AlbAnswer>> = queries.iter().map(|_| None).collect();
        let mut asked = Vec::with_capacity(queries.len());
        for (index, q) in queries.iter().enumerate() {
            match self.metric_data_query(index, q).await {
                Ok(a) => asked.push(a),
                Err(e) => answers[index] = Some(Err(e)),
            }
        }
        if !asked.is_empty() {
            match self.get_metric_data(&asked).await {
                Ok(mut by_index) => {
                    for a in &asked {
                        answers[a.index] = by_index.remove(&a.index);
                    }
                }
                Err(e) => {
                    for a in &asked {
                        answers[a.index] = Some(Err(e.clone()));
                    }
                }
            }
        }
        answers
            .into_iter()
            .map(|a| a.unwrap_or_else(|| Ok(Vec::new())))
            .collect()
    }
}

/// One query of a batch, ready to send.
struct Asked {
    /// Position in the batch; the query id is `q<index>`.
    index: usize,
    query: MetricDataQuery,
    /// `[start, end)` in seconds, start aligned down to the period.
    start_secs: i64,
    end_secs: i64,
    /// "RequestCount of arn:…", for errors.
    what: String,
}

impl AwsCloud {
    async fn metric_data_query(&self, index: usize, q: &AlbQuery) -> Result<Asked, CloudError> {
        let period_secs = validate_period(q.period)?;
        if q.end <= q.start {
            return Err(invalid(format!(
                "empty time range {} .. {}",
                q.start, q.end
            )));
        }
        let target_group = target_group_dimension(&q.target_group_arn)?;
        let load_balancer = self.load_balancer_dimension(&q.target_group_arn).await?;
        // Whole periods: CloudWatch answers faster, and moto only matches
        // aligned buckets.
        let start = q.start.timestamp();
        let start_secs = start - start.rem_euclid(i64::from(period_secs));
        let query = MetricDataQuery::builder()
            .id(format!("q{index}"))
            .return_data(true)
            .metric_stat(
                MetricStat::builder()
                    .metric(
                        Metric::builder()
                            .namespace(NAMESPACE)
                            .metric_name(q.metric.name())
                            // Sorted by name.
                            .dimensions(dimension("LoadBalancer", &load_balancer))
                            .dimensions(dimension("TargetGroup", &target_group))
                            .build(),
                    )
                    .period(period_secs)
                    .stat("Sum")
                    .build(),
            )
            .build();
        Ok(Asked {
            index,
            query,
            start_secs,
            end_secs: q.end.timestamp(),
            what: format!("{} of {}", q.metric.name(), q.target_group_arn),
        })
    }

    /// Sends `asked` (at most [`crate::metric_batch::MAX_QUERIES_PER_CALL`])
    /// and sorts the datapoints back to their queries, oldest first.
    async fn get_metric_data(
        &self,
        asked: &[Asked],
    ) -> Result<HashMap<usize, AlbAnswer>, CloudError> {
        let start = asked.iter().map(|a| a.start_secs).min().unwrap_or_default();
        let end = asked.iter().map(|a| a.end_secs).max().unwrap_or_default();
        let queries: Vec<MetricDataQuery> = asked.iter().map(|a| a.query.clone()).collect();
        let describe = || match asked {
            [one] => one.what.clone(),
            many => format!("{} metric queries", many.len()),
        };
        let mut points: HashMap<usize, Vec<Datapoint>> = HashMap::new();
        let mut forbidden: HashSet<usize> = HashSet::new();
        let mut token: Option<String> = None;
        loop {
            self.inner
                .limiter
                .request(Budget::CloudWatchGetMetricData)
                .await;
            let out = self
                .inner
                .cloudwatch
                .get_metric_data()
                .set_metric_data_queries(Some(queries.clone()))
                .start_time(SmithyTime::from_secs(start))
                .end_time(SmithyTime::from_secs(end))
                .scan_by(ScanBy::TimestampAscending)
                .set_next_token(token.take())
                .send()
                .await
                .map_err(|e| from_sdk("cloudwatch", describe, e))?;
            for result in out.metric_data_results() {
                let Some(index) = result
                    .id()
                    .and_then(|id| id.strip_prefix('q'))
                    .and_then(|n| n.parse::<usize>().ok())
                else {
                    continue;
                };
                if result.status_code() == Some(&StatusCode::Forbidden) {
                    forbidden.insert(index);
                }
                let mine = points.entry(index).or_default();
                for (t, v) in result.timestamps().iter().zip(result.values()) {
                    if let Some(start) = DateTime::from_timestamp(t.secs(), t.subsec_nanos()) {
                        mine.push(Datapoint { start, value: *v });
                    }
                }
            }
            match out.next_token() {
                Some(t) if !t.is_empty() => token = Some(t.to_string()),
                _ => break,
            }
        }
        Ok(asked
            .iter()
            .map(|a| {
                let answer = if forbidden.contains(&a.index) {
                    Err(CloudError::Service {
                        service: "cloudwatch",
                        code: "Forbidden".into(),
                        message: format!("not allowed to read {}", a.what),
                    })
                } else {
                    // The shared range is wider than this query's own.
                    let mut mine: Vec<Datapoint> = points
                        .remove(&a.index)
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|p| (a.start_secs..a.end_secs).contains(&p.start.timestamp()))
                        .collect();
                    mine.sort_by_key(|p| p.start);
                    Ok(mine)
                };
                (a.index, answer)
            })
            .collect())
    }

    /// `app/<name>/<id>` of the load balancer in front of the target group.
    async fn load_balancer_dimension(&self, target_group_arn: &str) -> Result<String, CloudError> {
        if let Some(hit) = self.lock_lb_cache().get(target_group_arn) {
            return Ok(hit.clone());
        }
        self.inner.limiter.request(Budget::Elb).await;
        let out = self
            .inner
            .elb
            .describe_target_groups()
            .target_group_arns(target_group_arn)
            .send()
            .await
            .map_err(|e| from_sdk("elbv2", || format!("target group {target_group_arn}"), e))?;
        let lb_arns: Vec<&str> = out
            .target_groups()
            .iter()
            .flat_map(|tg| tg.load_balancer_arns())
            .map(String::as_str)
            .collect();
        let dimension = lb_arns
            .iter()
            .find_map(|arn| load_balancer_dimension(arn))
            .ok_or_else(|| {
                invalid(format!(
                    "target group {target_group_arn} is not behind an application load balancer (load balancers: {lb_arns:?}); ALB metrics need one"
                ))
            })?;
        self.lock_lb_cache()
            .insert(target_group_arn.to_string(), dimension.clone());
        Ok(dimension)
    }

    fn lock_lb_cache(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, String>> {
        self.inner
            .load_balancer_of
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

/// CloudWatch periods: 1, 5, 10, 30 s (high resolution) or whole minutes.
fn validate_period(period: Duration) -> Result<i32, CloudError> {
    let secs = period.as_secs();
    let ok = period.subsec_nanos() == 0
        && (matches!(secs, 1 | 5 | 10 | 30) || (secs >= 60 && secs.is_multiple_of(60)));
    let secs = i32::try_from(secs).ok().filter(|_| ok);
    secs.ok_or_else(|| {
        invalid(format!(
            "period {period:?}: CloudWatch wants 1, 5, 10, 30 seconds or a multiple of 60"
        ))
    })
}

/// `arn:aws:elasticloadbalancing:R:A:targetgroup/N/ID` → `targetgroup/N/ID`.
fn target_group_dimension(arn: &str) -> Result<String, CloudError> {
    arn_resource(arn)
        .filter(|r| r.starts_with("targetgroup/") && r.split('/').count() == 3)
        .map(str::to_string)
        .ok_or_else(|| invalid(format!("`{arn}` is not a target group ARN")))
}

/// `arn:aws:elasticloadbalancing:R:A:loadbalancer/app/N/ID` → `app/N/ID`;
/// `None` for network/gateway load balancers.
fn load_balancer_dimension(arn: &str) -> Option<String> {
    let resource = arn_resource(arn)?.strip_prefix("loadbalancer/")?;
    (resource.starts_with("app/") && resource.split('/').count() == 3).then(|| resource.to_string())
}

fn arn_resource(arn: &str) -> Option<&str> {
    let mut parts = arn.splitn(6, ':');
    (parts.next()? == "arn").then_some(())?;
    parts.nth(4)
}

fn dimension(name: &str, value: &str) -> Dimension {
    Dimension::builder().name(name).value(value).build()
}

fn invalid(message: String) -> CloudError {
    CloudError::InvalidInput {
        code: None,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dimensions_come_from_the_arns() {
        assert_eq!(
            target_group_dimension(
                "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web/6bc41b821c4fd631"
            )
            .unwrap(),
            "targetgroup/web/6bc41b821c4fd631"
        );
        assert!(target_group_dimension("targetgroup/web/1").is_err());
        assert!(target_group_dimension(
            "arn:aws:elasticloadbalancing:us-east-1:1:loadbalancer/app/web/1"
        )
        .is_err());
        assert_eq!(
            load_balancer_dimension(
                "arn:aws:elasticloadbalancing:us-east-1:123456789012:loadbalancer/app/web/f9ac4c16660b9a6c"
            )
            .as_deref(),
            Some("app/web/f9ac4c16660b9a6c")
        );
        assert_eq!(
            load_balancer_dimension(
                "arn:aws:elasticloadbalancing:us-east-1:1:loadbalancer/net/web/1"
            ),
            None
        );
    }

    #[test]
    fn periods_are_what_cloudwatch_accepts() {
        assert_eq!(validate_period(Duration::from_secs(60)).unwrap(), 60);
        assert_eq!(validate_period(Duration::from_secs(300)).unwrap(), 300);
        assert_eq!(validate_period(Duration::from_secs(10)).unwrap(), 10);
        for bad in [0, 7, 90] {
            assert!(validate_period(Duration::from_secs(bad)).is_err(), "{bad}");
        }
        assert!(validate_period(Duration::from_millis(60_500)).is_err());
    }
}
