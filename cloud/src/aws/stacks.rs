//! Reading a CloudFormation stack's outputs: `hangar init --from-stack`
//! turns the prerequisites stack (`infra/aws/hangar-prerequisites.yaml`)
//! into a starter Cluster spec. Read-only: `DescribeStacks` is the only call.

use std::collections::BTreeMap;

use aws_config::SdkConfig;

use super::errors::from_sdk;
use crate::error::CloudError;

/// A stack as `hangar init` needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StackOutputs {
    pub name: String,
    /// `CREATE_COMPLETE`, `UPDATE_COMPLETE`, …
    pub status: String,
    /// Output key → value.
    pub outputs: BTreeMap<String, String>,
}

impl StackOutputs {
    /// Whether the stack's resources exist as its template says (a stack
    /// still creating, rolled back or being deleted has no usable outputs).
    pub fn complete(&self) -> bool {
        matches!(
            self.status.as_str(),
            "CREATE_COMPLETE" | "UPDATE_COMPLETE" | "UPDATE_ROLLBACK_COMPLETE" | "IMPORT_COMPLETE"
        )
    }
}

/// `DescribeStacks` for one stack name (or id).
pub async fn stack_outputs(sdk: &SdkConfig, name: &str) -> Result<StackOutputs, CloudError> {
    let client = aws_sdk_cloudformation::Client::new(sdk);
    let out = client
        .describe_stacks()
        .stack_name(name)
        .send()
        .await
        .map_err(|e| from_sdk("cloudformation", || format!("stack {name}"), e))?;
    let Some(stack) = out.stacks().first() else {
        return Err(CloudError::NotFound {
            what: format!("stack {name}"),
            code: None,
        });
    };
    let outputs = stack
        .outputs()
        .iter()
        .filter_map(|o| Some((o.output_key()?.to_string(), o.output_value()?.to_string())))
        .collect();
    Ok(StackOutputs {
        name: stack.stack_name().unwrap_or(name).to_string(),
        status: stack
            .stack_status()
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        outputs,
    })
}

/// [`stack_outputs`] with the standard AWS configuration chain
/// (environment, profiles, instance role; `AWS_ENDPOINT_URL` honoured),
/// the region overridden when given.
pub async fn stack_outputs_from_env(
    region: Option<&str>,
    name: &str,
) -> Result<StackOutputs, CloudError> {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(region) = region {
        loader = loader.region(aws_config::Region::new(region.to_string()));
    }
    stack_outputs(&loader.load().await, name).await
}
