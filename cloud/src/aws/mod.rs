//! The AWS implementation of hangar's cloud traits, on the official SDK.
//!
//! One [`AwsCloud`] per region and owner id implements all four traits;
//! [`AwsCloud::cloud`] bundles it as the operator's [`Cloud`]. Every SDK
//! client it builds shares:
//! - the SDK's *standard* retry strategy, configured by [`RetryPolicy`]
//!   (exponential backoff with full jitter, a retry quota so an outage
//!   does not become a retry storm, throttling errors backed off from a
//!   larger base than other transient errors);
//! - client-side token buckets with AWS's request budgets ([`Budgets`]),
//!   waited on before each call and debited for each retry;
//! - an interceptor counting calls, attempts, retries, throttles and errors
//!   per operation ([`ApiCalls`]).

mod api_calls;
mod artifacts;
mod compute;
mod errors;
mod fence;
mod lease;
mod limiter;
mod load_balancer;
mod metrics;
mod ownership;
mod secrets;
pub mod stacks;

pub use api_calls::{ApiCalls, CallStats, OperationStats};
pub use lease::DynamoTable;
pub use limiter::{BucketSpec, BucketStats, Budgets, TokenBucket};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_config::{BehaviorVersion, SdkConfig};
use aws_smithy_runtime_api::client::interceptors::{Intercept, SharedInterceptor};
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;

use crate::artifact_cache::ArtifactCache;
use crate::error::CloudError;
use crate::lease::{Fence, Unfenced};
use crate::Cloud;
use api_calls::ApiCallInterceptor;
use fence::FenceInterceptor;
use limiter::Limiter;

/// How the SDK retries. The defaults suit a long-running operator: a call
/// that keeps failing for ~a minute is reported, and reconcile requeues.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    /// Backoff base for throttling errors; retry `n` waits a uniformly
    /// random time in `[0, base * 2^n)` ("full jitter"), capped.
    pub throttling_backoff: Duration,
    /// Backoff base for other transient errors (5xx, timeouts, resets).
    pub transient_backoff: Duration,
    pub max_backoff: Duration,
    /// Per-attempt timeout (a hung connection is abandoned and retried).
    pub attempt_timeout: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            throttling_backoff: Duration::from_secs(1),
            transient_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(20),
            attempt_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_millis(3100),
        }
    }
}

impl RetryPolicy {
    fn retry_config(&self) -> RetryConfig {
        RetryConfig::standard()
            .with_max_attempts(self.max_attempts.max(1))
            .with_initial_backoff(self.throttling_backoff)
            .with_max_backoff(self.max_backoff)
            .with_retry_spec(
                aws_smithy_types::retry::RetrySpec::v2_1()
                    .with_non_throttling_initial_backoff(self.transient_backoff),
            )
    }

    fn timeout_config(&self, base: Option<&TimeoutConfig>) -> TimeoutConfig {
        base.map(TimeoutConfig::to_builder)
            .unwrap_or_default()
            .operation_attempt_timeout(self.attempt_timeout)
            .connect_timeout(self.connect_timeout)
            .build()
    }
}

/// Builds an [`AwsCloud`]; see [`AwsCloud::builder`].
pub struct AwsCloudBuilder {
    sdk: SdkConfig,
    owner: String,
    artifact_cache: PathBuf,
    retry: RetryPolicy,
    budgets: Budgets,
    interceptors: Vec<SharedInterceptor>,
    https_client: Option<reqwest::Client>,
    prometheus_client: Option<reqwest::Client>,
    fence: Arc<dyn Fence>,
    template_version_ttl: std::time::Duration,
}

impl AwsCloudBuilder {
    /// How long a `$Latest`/`$Default` launch template version, once
    /// resolved to a number, is believed before `DescribeLaunchTemplates`
    /// is asked again (default a minute): how soon a new template version
    /// starts an instance refresh.
    pub fn template_version_ttl(mut self, ttl: std::time::Duration) -> Self {
        self.template_version_ttl = ttl;
        self
    }

    /// The lease guard: asked right before every mutating call (and each
    /// retry of it) goes out, told of every `hangar:epoch` read, and the
    /// source of the epoch stamped on what is written. Default: unfenced
    /// (a single operator).
    pub fn fence(mut self, fence: Arc<dyn Fence>) -> Self {
        self.fence = fence;
        self
    }

    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn budgets(mut self, budgets: Budgets) -> Self {
        self.budgets = budgets;
        self
    }

    /// An extra SDK interceptor on every client (tests: account headers,
    /// fault injection).
    pub fn interceptor(mut self, interceptor: impl Intercept + 'static) -> Self {
        self.interceptors.push(SharedInterceptor::new(interceptor));
        self
    }

    /// The client for `https://` artifacts (e.g. with a private CA). It
    /// should refuse plain HTTP (`https_only(true)`).
    pub fn https_client(mut self, client: reqwest::Client) -> Self {
        self.https_client = Some(client);
        self
    }

    /// The client for Prometheus queries.
    pub fn prometheus_client(mut self, client: reqwest::Client) -> Self {
        self.prometheus_client = Some(client);
        self
    }

    pub fn build(self) -> Result<AwsCloud, CloudError> {
        validate_owner(&self.owner)?;
        let calls = Arc::new(ApiCalls::default());
        let limiter = Arc::new(Limiter::new(&self.budgets));
        let retry_config = self.retry.retry_config();
        let timeout_config = self.retry.timeout_config(self.sdk.timeout_config());
        let counting = |service: &'static str| {
            SharedInterceptor::new(ApiCallInterceptor::new(
                service,
                calls.clone(),
                limiter.clone(),
            ))
        };

        // Each service config starts from the shared SdkConfig (region,
        // credentials, endpoint override) and adds hangar's policy.
        macro_rules! config {
            ($sdk:ident, $service:literal) => {{
                let mut b = $sdk::config::Builder::from(&self.sdk)
                    .retry_config(retry_config.clone())
                    .timeout_config(timeout_config.clone());
                b.push_interceptor(counting($service));
                b.push_interceptor(SharedInterceptor::new(FenceInterceptor::new(
                    self.fence.clone(),
                )));
                for i in &self.interceptors {
                    b.push_interceptor(i.clone());
                }
                b
            }};
        }
        let ec2 = aws_sdk_ec2::Client::from_conf(config!(aws_sdk_ec2, "ec2").build());
        let elb = aws_sdk_elasticloadbalancingv2::Client::from_conf(
            config!(aws_sdk_elasticloadbalancingv2, "elbv2").build(),
        );
        let cloudwatch = aws_sdk_cloudwatch::Client::from_conf(
            config!(aws_sdk_cloudwatch, "cloudwatch").build(),
        );
        // An endpoint override means an emulator (moto) or a private
        // gateway: virtual-hosted buckets (`bucket.127.0.0.1`) cannot
        // resolve there, so address buckets by path.
        let path_style = self.sdk.endpoint_url().is_some();
        let s3 = aws_sdk_s3::Client::from_conf(
            config!(aws_sdk_s3, "s3")
                .force_path_style(path_style)
                .build(),
        );
        let ssm = aws_sdk_ssm::Client::from_conf(config!(aws_sdk_ssm, "ssm").build());
        let secrets_manager = aws_sdk_secretsmanager::Client::from_conf(
            config!(aws_sdk_secretsmanager, "secretsmanager").build(),
        );

        let https = match self.https_client {
            Some(client) => client,
            None => reqwest::Client::builder()
                .https_only(true)
                .connect_timeout(Duration::from_secs(10))
                .read_timeout(Duration::from_secs(60))
                .build()
                .map_err(|e| CloudError::Transport {
                    service: "https",
                    message: format!("building the HTTPS client: {e}"),
                })?,
        };
        let prometheus = match self.prometheus_client {
            Some(client) => client,
            None => reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(30))
                .build()
                .map_err(|e| CloudError::Transport {
                    service: "prometheus",
                    message: format!("building the HTTP client: {e}"),
                })?,
        };

        Ok(AwsCloud {
            inner: Arc::new(Inner {
                owner: self.owner,
                ec2,
                elb,
                cloudwatch,
                s3,
                ssm,
                secrets_manager,
                limiter,
                calls,
                cache: ArtifactCache::new(self.artifact_cache),
                https,
                prometheus,
                load_balancer_of: Mutex::new(HashMap::new()),
                owned: Mutex::new(HashMap::new()),
                template_versions: Mutex::new(HashMap::new()),
                template_version_ttl: self.template_version_ttl,
                metric_batcher: Arc::default(),
                fence: self.fence,
            }),
        })
    }
}

/// hangar's AWS cloud for one region and owner id. Cheap to clone.
#[derive(Clone)]
pub struct AwsCloud {
    inner: Arc<Inner>,
}

struct Inner {
    owner: String,
    ec2: aws_sdk_ec2::Client,
    elb: aws_sdk_elasticloadbalancingv2::Client,
    cloudwatch: aws_sdk_cloudwatch::Client,
    s3: aws_sdk_s3::Client,
    ssm: aws_sdk_ssm::Client,
    secrets_manager: aws_sdk_secretsmanager::Client,
    limiter: Arc<Limiter>,
    calls: Arc<ApiCalls>,
    cache: ArtifactCache,
    https: reqwest::Client,
    prometheus: reqwest::Client,
    /// Target group ARN → CloudWatch `LoadBalancer` dimension value. A
    /// target group's load balancer changes rarely enough to cache forever.
    load_balancer_of: Mutex<HashMap<String, String>>,
    /// Instances seen ours, and when (see `ownership::OWNED_TTL`).
    owned: Mutex<HashMap<String, std::time::Instant>>,
    /// (template, `$Latest`/`$Default`) → (when asked, version number).
    template_versions: Mutex<HashMap<(String, String), (std::time::Instant, String)>>,
    template_version_ttl: std::time::Duration,
    /// ALB metric reads of this region, sharing `GetMetricData` calls.
    metric_batcher: Arc<crate::metric_batch::MetricBatcher>,
    fence: Arc<dyn Fence>,
}

impl std::fmt::Debug for AwsCloud {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsCloud")
            .field("owner", &self.inner.owner)
            .field("artifact_cache", &self.inner.cache.dir())
            .finish()
    }
}

impl AwsCloud {
    /// Starts a builder. `sdk` carries region, credentials and any endpoint
    /// override; `owner` is the operator id stamped on (and required of)
    /// everything hangar touches; artifacts are cached in `artifact_cache`.
    pub fn builder(
        sdk: &SdkConfig,
        owner: impl Into<String>,
        artifact_cache: impl Into<PathBuf>,
    ) -> AwsCloudBuilder {
        AwsCloudBuilder {
            sdk: sdk.clone(),
            owner: owner.into(),
            artifact_cache: artifact_cache.into(),
            retry: RetryPolicy::default(),
            budgets: Budgets::default(),
            interceptors: Vec::new(),
            https_client: None,
            prometheus_client: None,
            fence: Arc::new(Unfenced),
            template_version_ttl: compute::TEMPLATE_VERSION_TTL,
        }
    }

    /// With the default retry policy and budgets.
    pub fn new(
        sdk: &SdkConfig,
        owner: impl Into<String>,
        artifact_cache: impl Into<PathBuf>,
    ) -> Result<AwsCloud, CloudError> {
        AwsCloud::builder(sdk, owner, artifact_cache).build()
    }

    /// From the standard AWS configuration chain (environment incl.
    /// `AWS_REGION` and `AWS_ENDPOINT_URL`, profiles, instance role), with
    /// the region overridden when given.
    pub async fn from_env(
        region: Option<&str>,
        owner: impl Into<String>,
        artifact_cache: impl Into<PathBuf>,
    ) -> Result<AwsCloud, CloudError> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(region) = region {
            loader = loader.region(aws_config::Region::new(region.to_string()));
        }
        let sdk = loader.load().await;
        AwsCloud::new(&sdk, owner, artifact_cache)
    }

    /// The traits, as the operator consumes them.
    pub fn cloud(&self) -> Cloud {
        let me = Arc::new(self.clone());
        Cloud {
            compute: me.clone(),
            load_balancer: me.clone(),
            metrics: me.clone(),
            artifacts: me.clone(),
            secrets: me,
        }
    }

    pub fn owner(&self) -> &str {
        &self.inner.owner
    }

    /// Calls, attempts, retries, throttles and errors per operation.
    pub fn api_calls(&self) -> &Arc<ApiCalls> {
        &self.inner.calls
    }

    /// The epoch to stamp on a write, or why no write may be made now.
    pub(crate) fn authorize(&self, operation: &str) -> Result<Option<u64>, CloudError> {
        self.inner
            .fence
            .authorize()
            .map_err(|e| CloudError::NotLeader {
                operation: operation.to_string(),
                reason: e.0,
            })
    }

    /// Tells the fence of the highest `hangar:epoch` among `instances`.
    pub(crate) fn observe_epochs<'i>(
        &self,
        instances: impl IntoIterator<Item = &'i crate::Instance>,
    ) {
        if let Some(max) = instances
            .into_iter()
            .filter_map(crate::Instance::epoch)
            .max()
        {
            self.inner.fence.observed_epoch(max);
        }
    }

    /// The client-side token buckets: tokens taken, time waited, balance.
    pub fn limiter_stats(&self) -> Vec<BucketStats> {
        self.inner.limiter.stats()
    }
}

/// The owner id becomes a tag value and an IAM condition value.
fn validate_owner(owner: &str) -> Result<(), CloudError> {
    let ok = !owner.is_empty()
        && owner.len() <= 128
        && owner
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/@".contains(c));
    if ok {
        Ok(())
    } else {
        Err(CloudError::InvalidInput {
            code: None,
            message: format!("owner id `{owner}` must be 1-128 characters of [A-Za-z0-9-_.:/@]"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_ids_are_tag_safe() {
        assert!(validate_owner("hangar-prod-1").is_ok());
        assert!(validate_owner("").is_err());
        assert!(validate_owner("has space").is_err());
        assert!(validate_owner(&"x".repeat(129)).is_err());
    }
}
