//! What hangar needs from a cloud, and its AWS implementation.
//!
//! The traits are shaped by the operator's needs, not by the AWS API: launch
//! a few instances for a cluster, list what we own, move a node's phase tag,
//! register and drain targets, read the traffic, fetch a verified artifact.
//! Everything is scoped to one *owner* (the operator id): an implementation
//! never modifies an instance or target that does not carry that owner's
//! tags, and says so with [`CloudError::NotOwned`].
//!
//! [`aws::AwsCloud`] implements all four traits on the official AWS SDK;
//! `AwsCloud::cloud()` gives the operator its [`Cloud`].

/// The AWS configuration crate, for callers that build an [`AwsCloud`].
pub use aws_config;

pub mod artifact_cache;
pub mod artifact_sources;
pub mod artifacts;
pub mod aws;
pub mod compute;
pub mod error;
pub mod lease;
pub mod load_balancer;
pub mod metric_batch;
pub mod metrics;
pub mod model;
pub mod prometheus;
pub mod secrets;

pub use artifacts::{Artifacts, VerifiedArtifact};
pub use aws::{ApiCalls, AwsCloud, AwsCloudBuilder, Budgets, DynamoTable, RetryPolicy};
pub use compute::{Compute, LaunchRequest};
pub use error::CloudError;
pub use lease::{Fence, LeaseRecord, LeaseStore, NotLeader, StateStore, Unfenced};
pub use load_balancer::{LoadBalancer, TargetHealth, TargetState};
pub use metric_batch::{AlbBatch, AlbQuery, MetricBatcher};
pub use metrics::{AlbMetric, Datapoint, Metrics};
pub use model::{tags, Instance, InstanceState, Phase};
pub use secrets::{SecretValue, Secrets, SecretsError};

use std::sync::Arc;

/// Everything the operator uses, bundled per region and owner.
#[derive(Clone)]
pub struct Cloud {
    pub compute: Arc<dyn Compute>,
    pub load_balancer: Arc<dyn LoadBalancer>,
    pub metrics: Arc<dyn Metrics>,
    pub artifacts: Arc<dyn Artifacts>,
    /// `provision.secretsFrom`: SSM Parameter Store and Secrets Manager.
    pub secrets: Arc<dyn Secrets>,
}
