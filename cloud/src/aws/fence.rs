//! The lease guard inside the SDK: every mutating operation asks the
//! operator's [`Fence`] right before each attempt is transmitted (retries
//! included), after any wait for a token bucket. A process that lost the
//! lease while it waited, or while it was paused, sends nothing.

use std::sync::Arc;

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;

use crate::lease::{Fence, NotLeader};

/// Operations that only read. Everything else is treated as mutating:
/// an operation added later is guarded by default.
pub(crate) fn is_read_only(operation: &str) -> bool {
    const READS: [&str; 7] = [
        "Describe", "Get", "List", "Head", "Query", "Scan", "BatchGet",
    ];
    READS.iter().any(|p| operation.starts_with(p))
}

#[derive(Debug)]
pub(crate) struct FenceInterceptor {
    fence: Arc<dyn Fence>,
}

impl FenceInterceptor {
    pub(crate) fn new(fence: Arc<dyn Fence>) -> FenceInterceptor {
        FenceInterceptor { fence }
    }
}

/// The error an attempt fails with when the fence refuses it; found again
/// in the error's sources by [`super::errors::from_sdk`].
#[derive(Debug, thiserror::Error)]
#[error("{operation} refused by the lease guard: {reason}")]
pub(crate) struct Refused {
    pub operation: String,
    pub reason: NotLeader,
}

impl Intercept for FenceInterceptor {
    fn name(&self) -> &'static str {
        "hangar::FenceInterceptor"
    }

    fn read_before_transmit(
        &self,
        _ctx: &BeforeTransmitInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let operation = cfg
            .load::<Metadata>()
            .map(|m| m.name().to_string())
            .unwrap_or_else(|| "unknown".to_string());
        if is_read_only(&operation) {
            return Ok(());
        }
        match self.fence.authorize() {
            Ok(_) => Ok(()),
            Err(reason) => {
                tracing::warn!(%operation, %reason, "mutating call refused: this process does not hold the lease");
                Err(Box::new(Refused { operation, reason }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_reads_pass_unguarded() {
        for op in [
            "DescribeInstances",
            "DescribeTargetHealth",
            "GetMetricData",
            "GetObject",
            "HeadObject",
            "ListObjectsV2",
        ] {
            assert!(is_read_only(op), "{op}");
        }
        for op in [
            "RunInstances",
            "CreateTags",
            "DeleteTags",
            "TerminateInstances",
            "StopInstances",
            "StartInstances",
            "RegisterTargets",
            "DeregisterTargets",
            "ModifyTargetGroupAttributes",
            "PutMetricData",
            "PutObject",
        ] {
            assert!(!is_read_only(op), "{op}");
        }
    }
}
