//! The production [`CloudProvider`]: one AWS client set per region, built
//! from the standard AWS configuration chain (`AWS_REGION`,
//! `AWS_ENDPOINT_URL`, profiles, instance roles) the first time a cluster
//! in that region is reconciled.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use hangar_cloud::aws::AwsCloud;
use hangar_cloud::lease::{Fence, Unfenced};
use hangar_cloud::{ApiCalls, Cloud, CloudError};

use crate::runtime::reconcile::CloudProvider;
use crate::runtime::telemetry::{ApiSample, ApiStats};

pub struct AwsClouds {
    owner: String,
    artifact_cache: PathBuf,
    regions: tokio::sync::Mutex<HashMap<String, AwsCloud>>,
    /// A copy for scrapes, which must not wait on the async lock.
    for_stats: Mutex<Vec<AwsCloud>>,
    /// Asked before every mutating call (the distributed lease).
    fence: Arc<dyn Fence>,
    /// Counters of calls made outside the per-region clouds (the lease
    /// table), exported with theirs.
    extra_calls: Vec<Arc<ApiCalls>>,
    /// `None`: the cloud's default (a minute).
    template_version_ttl: Option<std::time::Duration>,
}

impl AwsClouds {
    pub fn new(owner: &str, state_dir: &std::path::Path) -> AwsClouds {
        AwsClouds {
            owner: owner.to_string(),
            artifact_cache: state_dir.join("artifacts"),
            regions: tokio::sync::Mutex::default(),
            for_stats: Mutex::default(),
            fence: Arc::new(Unfenced),
            extra_calls: Vec::new(),
            template_version_ttl: None,
        }
    }

    /// Every cloud built from now on asks `fence` before each mutating call
    /// and stamps its epoch on what it writes.
    pub fn fenced(mut self, fence: Arc<dyn Fence>) -> AwsClouds {
        self.fence = fence;
        self
    }

    /// How long a resolved `$Latest`/`$Default` is believed (the
    /// `template_version_ttl` setting).
    pub fn template_version_ttl(mut self, ttl: std::time::Duration) -> AwsClouds {
        self.template_version_ttl = Some(ttl);
        self
    }

    /// Also exports `calls` on `/metrics`.
    pub fn with_calls(mut self, calls: Arc<ApiCalls>) -> AwsClouds {
        self.extra_calls.push(calls);
        self
    }
}

#[async_trait]
impl CloudProvider for AwsClouds {
    async fn cloud(&self, region: &str) -> Result<Cloud, CloudError> {
        let mut regions = self.regions.lock().await;
        if let Some(c) = regions.get(region) {
            return Ok(c.cloud());
        }
        let sdk = aws_config_for(region).await;
        let mut c = AwsCloud::builder(&sdk, self.owner.clone(), self.artifact_cache.clone())
            .fence(self.fence.clone());
        if let Some(ttl) = self.template_version_ttl {
            c = c.template_version_ttl(ttl);
        }
        let c = c.build()?;
        regions.insert(region.to_string(), c.clone());
        self.for_stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(c.clone());
        Ok(c.cloud())
    }
}

impl ApiStats for AwsClouds {
    fn sample(&self) -> Vec<ApiSample> {
        let clouds = self
            .for_stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut merged: HashMap<(String, String), ApiSample> = HashMap::new();
        let calls = clouds
            .iter()
            .map(|c| c.api_calls().clone())
            .chain(self.extra_calls.iter().cloned());
        for c in calls {
            for op in c.snapshot() {
                let e = merged
                    .entry((op.service.to_string(), op.operation.clone()))
                    .or_insert_with(|| ApiSample {
                        service: op.service.to_string(),
                        operation: op.operation.clone(),
                        ..ApiSample::default()
                    });
                e.calls += op.stats.calls;
                e.retries += op.stats.retries;
                e.throttles += op.stats.throttles;
                e.errors += op.stats.errors;
            }
        }
        let mut out: Vec<ApiSample> = merged.into_values().collect();
        out.sort_by(|a, b| (&a.service, &a.operation).cmp(&(&b.service, &b.operation)));
        out
    }
}

/// The standard AWS configuration chain, with the region overridden.
async fn aws_config_for(region: &str) -> hangar_cloud::aws_config::SdkConfig {
    hangar_cloud::aws_config::defaults(hangar_cloud::aws_config::BehaviorVersion::latest())
        .region(hangar_cloud::aws_config::Region::new(region.to_string()))
        .load()
        .await
}

/// Both roles of one provider, for `hangar run`.
pub fn aws(owner: &str, state_dir: &std::path::Path) -> Arc<AwsClouds> {
    Arc::new(AwsClouds::new(owner, state_dir))
}
