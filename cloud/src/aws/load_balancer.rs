//! [`LoadBalancer`] on ELBv2 target groups.
//!
//! Register and deregister only ever name instances that EC2 says carry our
//! owner tag (checked right before), so a foreign target sharing the group
//! is never deregistered, whatever ids the caller passes.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_elasticloadbalancingv2::types::{TargetDescription, TargetHealthStateEnum};

use super::errors::from_sdk;
use super::limiter::Budget;
use super::ownership::dedup;
use super::AwsCloud;
use crate::error::CloudError;
use crate::load_balancer::{LoadBalancer, TargetHealth, TargetState};

/// Targets per Register/DeregisterTargets call. ELB takes many per call;
/// hangar registers nodes as they become ready, so batches are small, and
/// a modest cap keeps one bad id from failing a huge batch.
const TARGET_BATCH: usize = 100;
const DEREGISTRATION_DELAY: &str = "deregistration_delay.timeout_seconds";
/// ELB's default, for target types that do not report the attribute.
const DEFAULT_DEREGISTRATION_DELAY: Duration = Duration::from_secs(300);

#[async_trait]
impl LoadBalancer for AwsCloud {
    async fn register(&self, target_group_arn: &str, ids: &[String]) -> Result<(), CloudError> {
        let ids = dedup(ids);
        if ids.is_empty() {
            return Ok(());
        }
        self.verify_owned(&ids).await?;
        for chunk in ids.chunks(TARGET_BATCH) {
            self.inner.limiter.request(Budget::Elb).await;
            self.inner
                .elb
                .register_targets()
                .target_group_arn(target_group_arn)
                .set_targets(Some(targets(chunk)))
                .send()
                .await
                .map_err(|e| from_sdk("elbv2", || target_group(target_group_arn), e))?;
        }
        tracing::info!(target_group = target_group_arn, ids = ?ids, "registered targets");
        Ok(())
    }

    async fn deregister(&self, target_group_arn: &str, ids: &[String]) -> Result<(), CloudError> {
        let ids = dedup(ids);
        if ids.is_empty() {
            return Ok(());
        }
        self.verify_owned(&ids).await?;
        for chunk in ids.chunks(TARGET_BATCH) {
            self.deregister_chunk(target_group_arn, chunk).await?;
        }
        tracing::info!(target_group = target_group_arn, ids = ?ids, "deregistered targets");
        Ok(())
    }

    async fn target_health(&self, target_group_arn: &str) -> Result<Vec<TargetHealth>, CloudError> {
        self.inner.limiter.request(Budget::Elb).await;
        let out = self
            .inner
            .elb
            .describe_target_health()
            .target_group_arn(target_group_arn)
            .send()
            .await
            .map_err(|e| from_sdk("elbv2", || target_group(target_group_arn), e))?;
        Ok(out
            .target_health_descriptions()
            .iter()
            .filter_map(|d| {
                let target = d.target()?;
                let health = d.target_health();
                Some(TargetHealth {
                    id: target.id()?.to_string(),
                    port: target.port().and_then(|p| u16::try_from(p).ok()),
                    state: health
                        .and_then(|h| h.state())
                        .map(target_state)
                        .unwrap_or(TargetState::Unavailable),
                    reason: health
                        .and_then(|h| h.reason())
                        .map(|r| r.as_str().to_string()),
                })
            })
            .collect())
    }

    async fn deregistration_delay(&self, target_group_arn: &str) -> Result<Duration, CloudError> {
        self.inner.limiter.request(Budget::Elb).await;
        let out = self
            .inner
            .elb
            .describe_target_group_attributes()
            .target_group_arn(target_group_arn)
            .send()
            .await
            .map_err(|e| from_sdk("elbv2", || target_group(target_group_arn), e))?;
        let Some(value) = out
            .attributes()
            .iter()
            .find(|a| a.key() == Some(DEREGISTRATION_DELAY))
            .and_then(|a| a.value())
        else {
            return Ok(DEFAULT_DEREGISTRATION_DELAY);
        };
        value
            .trim()
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| CloudError::Service {
                service: "elbv2",
                code: "UnexpectedAttributeValue".into(),
                message: format!("{DEREGISTRATION_DELAY} is {value:?}, not whole seconds"),
            })
    }
}

impl AwsCloud {
    /// Deregistering a target that is not registered is `InvalidTarget` on
    /// moto (and for some states on AWS). The operator retries deregistration
    /// after crashes, so treat it as done: look at what is registered and
    /// deregister only those of `chunk`.
    async fn deregister_chunk(&self, arn: &str, chunk: &[String]) -> Result<(), CloudError> {
        let send = |ids: Vec<String>| async move {
            self.inner.limiter.request(Budget::Elb).await;
            self.inner
                .elb
                .deregister_targets()
                .target_group_arn(arn)
                .set_targets(Some(targets(&ids)))
                .send()
                .await
                .map_err(|e| from_sdk("elbv2", || target_group(arn), e))
        };
        match send(chunk.to_vec()).await {
            Ok(_) => Ok(()),
            Err(err) if err.code() == Some("InvalidTarget") => {
                let registered = self.target_health(arn).await?;
                let still: Vec<String> = chunk
                    .iter()
                    .filter(|id| registered.iter().any(|t| &t.id == *id))
                    .cloned()
                    .collect();
                if still.is_empty() {
                    return Ok(());
                }
                send(still).await.map(|_| ())
            }
            Err(err) => Err(err),
        }
    }
}

fn targets(ids: &[String]) -> Vec<TargetDescription> {
    ids.iter()
        .map(|id| TargetDescription::builder().id(id).build())
        .collect()
}

fn target_group(arn: &str) -> String {
    format!("target group {arn}")
}

fn target_state(s: &TargetHealthStateEnum) -> TargetState {
    match s {
        TargetHealthStateEnum::Initial => TargetState::Initial,
        TargetHealthStateEnum::Healthy => TargetState::Healthy,
        TargetHealthStateEnum::Unhealthy => TargetState::Unhealthy,
        TargetHealthStateEnum::Unused => TargetState::Unused,
        // Deregistered but still finishing connections, either way.
        TargetHealthStateEnum::Draining | TargetHealthStateEnum::UnhealthyDraining => {
            TargetState::Draining
        }
        _ => TargetState::Unavailable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_states_map_conservatively() {
        assert_eq!(
            target_state(&TargetHealthStateEnum::Healthy),
            TargetState::Healthy
        );
        assert_eq!(
            target_state(&TargetHealthStateEnum::UnhealthyDraining),
            TargetState::Draining
        );
        assert_eq!(
            target_state(&TargetHealthStateEnum::from("something-new")),
            TargetState::Unavailable
        );
    }
}
