//! ALB target groups: register, deregister, observe.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::CloudError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetState {
    Initial,
    Healthy,
    Unhealthy,
    Unused,
    Draining,
    Unavailable,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetHealth {
    /// Instance id.
    pub id: String,
    pub port: Option<u16>,
    pub state: TargetState,
    /// AWS's reason code (`Target.DeregistrationInProgress`, …).
    pub reason: Option<String>,
}

#[async_trait]
pub trait LoadBalancer: Send + Sync {
    /// Registers owned instances (batched). Registering a registered target
    /// is a no-op.
    async fn register(&self, target_group_arn: &str, ids: &[String]) -> Result<(), CloudError>;

    /// Deregisters owned instances (batched); refuses with
    /// [`CloudError::NotOwned`] if any is not this owner's, without
    /// deregistering any of them.
    async fn deregister(&self, target_group_arn: &str, ids: &[String]) -> Result<(), CloudError>;

    /// Every target of the group, owned or not.
    async fn target_health(&self, target_group_arn: &str) -> Result<Vec<TargetHealth>, CloudError>;

    /// The group's `deregistration_delay.timeout_seconds`.
    async fn deregistration_delay(&self, target_group_arn: &str) -> Result<Duration, CloudError>;
}
