//! Instances: launch, list, tag, stop, start, terminate.

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::error::CloudError;
use crate::model::{Instance, Phase};

/// Launch `count` instances of one cluster into one subnet. The operator
/// decides how a scale-out is spread over subnets (one request each).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchRequest {
    pub cluster: String,
    /// Release the nodes will get; stamped as `hangar:release`.
    pub release: String,
    pub count: u32,
    /// Launch template id (`lt-…`) or name.
    pub launch_template: String,
    /// `$Default`, `$Latest` or a version number.
    pub launch_template_version: String,
    pub instance_type: Option<String>,
    pub subnet: String,
    /// User tags from the spec (never `hangar:*`).
    pub extra_tags: BTreeMap<String, String>,
    /// Idempotency token: the same token on a retried call launches nothing
    /// new on EC2. Derived by the caller from what it observed, so a retry
    /// after a lost response reuses it.
    pub client_token: String,
    /// Hash of the spec's launch settings; stamped as `hangar:launch` (when
    /// not empty) so a later change of them is noticed on every node.
    pub launch_settings: String,
}

#[async_trait]
pub trait Compute: Send + Sync {
    /// The owner id every instance of this handle carries.
    fn owner(&self) -> &str;

    /// Launches instances with hangar's tags set atomically at launch
    /// (`hangar:cluster`, `hangar:owner`, `hangar:phase=launching`,
    /// `hangar:release`).
    async fn launch(&self, req: &LaunchRequest) -> Result<Vec<Instance>, CloudError>;

    /// Instances of this owner that are not terminated, optionally only one
    /// cluster's. One paginated call serves every cluster of the owner.
    async fn list(&self, cluster: Option<&str>) -> Result<Vec<Instance>, CloudError>;

    /// Moves an owned instance to `phase` (and optionally records its release).
    async fn set_phase(
        &self,
        id: &str,
        phase: Phase,
        release: Option<&str>,
    ) -> Result<(), CloudError>;

    /// Records on an owned instance the provisioning config hash it was
    /// provisioned with (`hangar:config`).
    async fn set_config(&self, id: &str, config: &str) -> Result<(), CloudError>;

    /// The version number `version` (`$Latest`, `$Default` or a number)
    /// of launch template `template` (id `lt-…` or name) names now, so a
    /// new template version is noticed without a spec change. A number is
    /// itself; implementations may cache the answer briefly.
    async fn resolve_template_version(
        &self,
        template: &str,
        version: &str,
    ) -> Result<String, CloudError> {
        let _ = template;
        Ok(version.to_string())
    }

    /// Terminates owned instances; refuses the whole call with
    /// [`CloudError::NotOwned`] if any id is not this owner's.
    async fn terminate(&self, ids: &[String]) -> Result<(), CloudError>;

    /// Stops an owned instance, keeping its disk (a warm-pool node).
    /// Stopping a stopped or stopping instance is not an error. Refuses
    /// with [`CloudError::NotOwned`] like [`Compute::terminate`].
    async fn stop(&self, id: &str) -> Result<(), CloudError> {
        Err(CloudError::InvalidInput {
            code: Some("Unsupported".into()),
            message: format!("this cloud cannot stop instance {id}"),
        })
    }

    /// Starts an owned, stopped instance again (same disk). Starting a
    /// running or pending instance is not an error.
    async fn start(&self, id: &str) -> Result<(), CloudError> {
        Err(CloudError::InvalidInput {
            code: Some("Unsupported".into()),
            message: format!("this cloud cannot start instance {id}"),
        })
    }
}
