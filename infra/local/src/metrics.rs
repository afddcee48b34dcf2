//! Publishes the LB's request counts to the emulated CloudWatch, as an ALB
//! does to `AWS/ApplicationELB`.
//!
//! Every `interval` (aligned to multiples of it since the epoch, so one
//! datapoint never straddles two of the operator's aligned periods as long
//! as the interval divides the period) it puts, timestamped with the
//! interval's *start*:
//! - with dimensions `LoadBalancer=app/<name>/<id>`, `TargetGroup=targetgroup/<name>/<id>`
//!   (always in that order — sorted by name — which moto's `GetMetricData`
//!   needs): `RequestCount`, `RequestCountPerTarget` (requests / mean healthy
//!   registered targets over the interval), `HTTPCode_Target_{2,3,4,5}XX_Count`,
//!   `HealthyHostCount`, `UnHealthyHostCount`;
//! - with `LoadBalancer` only: `RequestCount`, `HTTPCode_ELB_5XX_Count`.
//!
//! Idle intervals are published as zeros. A real ALB omits datapoints for
//! intervals without requests, so "no data" there can mean "idle"; here it
//! only ever means "the LB is not running".

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_sdk_cloudwatch::primitives::DateTime;
use aws_sdk_cloudwatch::types::{Dimension, MetricDatum, StandardUnit};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::aws::error_chain;
use crate::lb::{Counters, Lb};

pub const NAMESPACE: &str = "AWS/ApplicationELB";

#[derive(Clone, Debug)]
pub struct MetricsOptions {
    /// Whole seconds, at least 1. Make it divide the spec's metric period.
    pub interval: Duration,
    /// `app/<name>/<id>`.
    pub load_balancer: String,
    /// `targetgroup/<name>/<id>`.
    pub target_group: String,
}

/// What the last publish sent (for `status` and tests).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Published {
    /// Start of the interval, seconds since the epoch.
    pub period_start: i64,
    pub interval_secs: u64,
    pub counters: Counters,
    pub request_count_per_target: f64,
    /// Why the put failed, if it did.
    pub error: Option<String>,
}

/// Handle to the publisher's last result; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Publisher {
    last: Arc<Mutex<Option<Published>>>,
    total: Arc<Mutex<u64>>,
}

impl Publisher {
    pub fn last(&self) -> Option<Published> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Intervals published so far (tests wait for "one more").
    pub fn published(&self) -> u64 {
        *self.total.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes every interval until `cancel`.
    pub async fn run(
        self,
        lb: Lb,
        cloudwatch: aws_sdk_cloudwatch::Client,
        options: MetricsOptions,
        cancel: CancellationToken,
    ) {
        let interval = options.interval.as_secs().max(1);
        // Counts from before the first boundary belong to that first interval.
        let _ = lb.take_counters();
        loop {
            let now = unix_now();
            let next = (now.as_secs() / interval + 1) * interval;
            let wait = Duration::from_secs(next).saturating_sub(now);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let counters = lb.take_counters();
            let start = next.saturating_sub(interval) as i64;
            let per_target = per_target(&counters);
            let data = datums(&options, start, interval, &counters, per_target);
            let result = cloudwatch
                .put_metric_data()
                .namespace(NAMESPACE)
                .set_metric_data(Some(data))
                .send()
                .await;
            let error = result.err().map(|e| error_chain(&e));
            if let Some(e) = &error {
                tracing::warn!(error = %e, "publishing ALB metrics failed");
            }
            *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(Published {
                period_start: start,
                interval_secs: interval,
                counters,
                request_count_per_target: per_target,
                error,
            });
            *self.total.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        }
    }
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
}

/// Requests per healthy target; a request always had a healthy target,
/// so requests without healthy samples (a target that turned healthy and
/// unhealthy between two samples) count against one.
fn per_target(c: &Counters) -> f64 {
    let healthy = c.mean_healthy();
    if healthy > 0.0 {
        c.requests as f64 / healthy
    } else {
        c.requests as f64
    }
}

fn datums(
    options: &MetricsOptions,
    start: i64,
    interval: u64,
    c: &Counters,
    per_target: f64,
) -> Vec<MetricDatum> {
    let lb = Dimension::builder()
        .name("LoadBalancer")
        .value(&options.load_balancer)
        .build();
    let tg = Dimension::builder()
        .name("TargetGroup")
        .value(&options.target_group)
        .build();
    let datum = |name: &str, dims: Vec<Dimension>, value: f64, unit: StandardUnit| {
        let mut b = MetricDatum::builder()
            .metric_name(name)
            .set_dimensions(Some(dims))
            .timestamp(DateTime::from_secs(start))
            .value(value)
            .unit(unit);
        if interval < 60 {
            b = b.storage_resolution(1);
        }
        b.build()
    };
    let both = || vec![lb.clone(), tg.clone()];
    let count = StandardUnit::Count;
    vec![
        datum("RequestCount", both(), c.requests as f64, count.clone()),
        datum("RequestCountPerTarget", both(), per_target, count.clone()),
        datum(
            "HTTPCode_Target_2XX_Count",
            both(),
            c.target_2xx as f64,
            count.clone(),
        ),
        datum(
            "HTTPCode_Target_3XX_Count",
            both(),
            c.target_3xx as f64,
            count.clone(),
        ),
        datum(
            "HTTPCode_Target_4XX_Count",
            both(),
            c.target_4xx as f64,
            count.clone(),
        ),
        datum(
            "HTTPCode_Target_5XX_Count",
            both(),
            c.target_5xx as f64,
            count.clone(),
        ),
        datum("HealthyHostCount", both(), c.mean_healthy(), count.clone()),
        datum(
            "UnHealthyHostCount",
            both(),
            c.mean_unhealthy(),
            count.clone(),
        ),
        datum(
            "RequestCount",
            vec![lb.clone()],
            c.requests as f64,
            count.clone(),
        ),
        datum(
            "HTTPCode_ELB_5XX_Count",
            vec![lb.clone()],
            c.elb_5xx as f64,
            count,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_target_divides_by_mean_healthy() {
        let c = Counters {
            requests: 30,
            healthy_sum: 6,
            samples: 2,
            ..Counters::default()
        };
        assert_eq!(per_target(&c), 10.0);
        assert_eq!(per_target(&Counters::default()), 0.0);
    }

    #[test]
    fn dimensions_are_sorted_by_name_and_stamped_with_the_interval_start() {
        let options = MetricsOptions {
            interval: Duration::from_secs(10),
            load_balancer: "app/web/1".into(),
            target_group: "targetgroup/web/2".into(),
        };
        let data = datums(&options, 1_700_000_000, 10, &Counters::default(), 0.0);
        for d in &data {
            let names: Vec<_> = d.dimensions().iter().filter_map(|d| d.name()).collect();
            let mut sorted = names.clone();
            sorted.sort_unstable();
            assert_eq!(names, sorted);
            assert_eq!(d.timestamp().map(|t| t.secs()), Some(1_700_000_000));
            assert_eq!(d.value(), Some(0.0), "idle intervals publish zeros");
        }
        assert!(data
            .iter()
            .any(|d| d.metric_name() == Some("RequestCountPerTarget")));
    }
}
