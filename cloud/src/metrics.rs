//! Traffic readings: ALB metrics from CloudWatch, or a Prometheus query.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::CloudError;

/// ALB metrics hangar reads, per target group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AlbMetric {
    RequestCount,
    RequestCountPerTarget,
    #[serde(rename = "HTTPCode_Target_5XX_Count")]
    Target5xxCount,
}

impl AlbMetric {
    /// The CloudWatch metric name in `AWS/ApplicationELB`.
    pub fn name(self) -> &'static str {
        match self {
            AlbMetric::RequestCount => "RequestCount",
            AlbMetric::RequestCountPerTarget => "RequestCountPerTarget",
            AlbMetric::Target5xxCount => "HTTPCode_Target_5XX_Count",
        }
    }
}

/// One aggregated value: the `Sum` over the period starting at `start`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Datapoint {
    pub start: DateTime<Utc>,
    pub value: f64,
}

#[async_trait]
pub trait Metrics: Send + Sync {
    /// `Sum` of `metric` for the target group in each `period` of
    /// `[start, end)`, oldest first. Periods without data are absent: "no
    /// data" is an empty list, never a zero.
    async fn alb_sums(
        &self,
        target_group_arn: &str,
        metric: AlbMetric,
        period: Duration,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    ) -> Result<Vec<Datapoint>, CloudError>;

    /// A Prometheus instant query (`/api/v1/query`) expected to return one
    /// sample; `None` when the result is empty.
    async fn prometheus(&self, base_url: &str, query: &str) -> Result<Option<f64>, CloudError>;
}
