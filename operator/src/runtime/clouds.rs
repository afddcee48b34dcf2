//! The production [`CloudProvider`]: one AWS client set per region, built
//! from the standard AWS configuration chain (`AWS_REGION`,
//! `AWS_ENDPOINT_URL`, profiles, instance roles) the first time a cluster
//! in that region is reconciled.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use hangar_cloud::aws::AwsCloud;
use hangar_cloud::{Cloud, CloudError};

use crate::runtime::reconcile::CloudProvider;
use crate::runtime::telemetry::{ApiSample, ApiStats};

pub struct AwsClouds {
    owner: String,
    artifact_cache: PathBuf,
    regions: tokio::sync::Mutex<HashMap<String, AwsCloud>>,
    /// A copy for scrapes, which must not wait on the async lock.
    for_stats: Mutex<Vec<AwsCloud>>,
}

impl AwsClouds {
    pub fn new(owner: &str, state_dir: &std::path::Path) -> AwsClouds {
        AwsClouds {
            owner: owner.to_string(),
            artifact_cache: state_dir.join("artifacts"),
            regions: tokio::sync::Mutex::default(),
            for_stats: Mutex::default(),
        }
    }
}

#[async_trait]
impl CloudProvider for AwsClouds {
    async fn cloud(&self, region: &str) -> Result<Cloud, CloudError> {
        let mut regions = self.regions.lock().await;
        if let Some(c) = regions.get(region) {
            return Ok(c.cloud());
        }
        let c = AwsCloud::from_env(
            Some(region),
            self.owner.clone(),
            self.artifact_cache.clone(),
        )
        .await?;
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
        for c in clouds {
            for op in c.api_calls().snapshot() {
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

/// Both roles of one provider, for `hangar run`.
pub fn aws(owner: &str, state_dir: &std::path::Path) -> Arc<AwsClouds> {
    Arc::new(AwsClouds::new(owner, state_dir))
}
