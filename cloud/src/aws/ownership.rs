//! "Is this instance ours?" — checked against EC2 before any mutation.
//!
//! Invariant 4 of the design: hangar never modifies an instance (or its
//! target registration) that does not carry `hangar:owner=<our owner>`. The
//! check is a `DescribeInstances` by id right before the mutating call; in
//! production the IAM policy (`infra/iam/`) enforces the same condition on
//! the AWS side, which also closes the window between check and act.
//!
//! A node coming up gets five or six tag writes within a minute; checking
//! each one again doubled hangar's EC2 Describe calls (a 50-node scale-out:
//! 280 Describe calls, a peak of 30 in one second against a refill of 20).
//! So an instance seen ours — by the check or because hangar launched it —
//! is trusted for [`OWNED_TTL`]; a foreign instance is never cached.

use aws_sdk_ec2::types::Instance as Ec2Instance;

use super::errors::from_sdk;
use super::limiter::Budget;
use super::AwsCloud;
use crate::error::CloudError;
use crate::model::tags;

/// Ids per `DescribeInstances`; keeps each request small.
const DESCRIBE_BATCH: usize = 200;

impl AwsCloud {
    /// The instances with these ids (terminated ones included, while EC2
    /// still reports them). Any unknown id is `NotFound`.
    pub(super) async fn describe_ids(
        &self,
        ids: &[String],
    ) -> Result<Vec<Ec2Instance>, CloudError> {
        let mut found = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(DESCRIBE_BATCH) {
            let what = || format!("instance {}", chunk.join(", "));
            let mut token: Option<String> = None;
            loop {
                self.inner.limiter.request(Budget::Ec2Describe).await;
                let out = self
                    .inner
                    .ec2
                    .describe_instances()
                    .set_instance_ids(Some(chunk.to_vec()))
                    .set_next_token(token.take())
                    .send()
                    .await
                    .map_err(|e| from_sdk("ec2", what, e))?;
                found.extend(
                    out.reservations()
                        .iter()
                        .flat_map(|r| r.instances().iter().cloned()),
                );
                match out.next_token() {
                    Some(t) if !t.is_empty() => token = Some(t.to_string()),
                    _ => break,
                }
            }
        }
        // EC2 fails the whole call for an unknown id; an eventually
        // consistent answer may instead just omit it.
        let missing: Vec<&str> = ids
            .iter()
            .filter(|id| !found.iter().any(|i| i.instance_id() == Some(id.as_str())))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return Err(CloudError::NotFound {
                what: format!("instance {}", missing.join(", ")),
                code: None,
            });
        }
        Ok(found)
    }

    /// The instances not verified within [`OWNED_TTL`], if every one of
    /// them carries our owner tag; else `NotOwned` naming the foreign ones,
    /// and nothing may be touched.
    pub(super) async fn verify_owned(
        &self,
        ids: &[String],
    ) -> Result<Vec<Ec2Instance>, CloudError> {
        let unverified: Vec<String> = {
            let owned = self.inner.owned.lock().unwrap_or_else(|e| e.into_inner());
            ids.iter()
                .filter(|id| owned.get(*id).is_none_or(|at| at.elapsed() > OWNED_TTL))
                .cloned()
                .collect()
        };
        if unverified.is_empty() {
            return Ok(Vec::new());
        }
        let instances = self.describe_ids(&unverified).await?;
        // A newer leader's epoch on any of them stops this one before it
        // mutates (the fence refuses the call that would follow).
        if let Some(max) = instances
            .iter()
            .filter(|i| owner_of(i) == Some(self.owner()))
            .filter_map(epoch_of)
            .max()
        {
            self.inner.fence.observed_epoch(max);
        }
        let foreign: Vec<&str> = instances
            .iter()
            .filter(|i| owner_of(i) != Some(self.owner()))
            .filter_map(|i| i.instance_id())
            .collect();
        if !foreign.is_empty() {
            tracing::warn!(instances = ?foreign, owner = self.owner(), "refusing to touch instances that are not ours");
            return Err(CloudError::NotOwned {
                resource: format!("instance {}", foreign.join(", ")),
                owner: self.owner().to_string(),
            });
        }
        self.trust_owned(instances.iter().filter_map(|i| i.instance_id()));
        Ok(instances)
    }

    /// Remembers instances as ours (checked, or launched by hangar).
    pub(super) fn trust_owned<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let mut owned = self.inner.owned.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        owned.retain(|_, at| at.elapsed() <= OWNED_TTL);
        for id in ids {
            owned.insert(id.to_string(), now);
        }
    }
}

impl AwsCloud {
    /// Forgets instances hangar terminated: a later write must look again
    /// (and learn they are gone).
    pub(super) fn forget_owned(&self, ids: &[String]) {
        let mut owned = self.inner.owned.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            owned.remove(id);
        }
    }
}

/// How long an instance seen carrying our owner tag is trusted without
/// another look. Ownership changes only when someone retags an instance by
/// hand; the IAM policy refuses our mutation of it regardless.
pub const OWNED_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// The value of `hangar:owner`, if tagged.
pub(super) fn owner_of(instance: &Ec2Instance) -> Option<&str> {
    instance
        .tags()
        .iter()
        .find(|t| t.key() == Some(tags::OWNER))
        .and_then(|t| t.value())
}

/// The value of `hangar:epoch`, if tagged with a number.
pub(super) fn epoch_of(instance: &Ec2Instance) -> Option<u64> {
    instance
        .tags()
        .iter()
        .find(|t| t.key() == Some(tags::EPOCH))
        .and_then(|t| t.value())
        .and_then(|v| v.parse().ok())
}

/// `ids` without duplicates, first occurrence kept.
pub(super) fn dedup(ids: &[String]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    ids.iter()
        .filter(|id| seen.insert(id.as_str()))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use aws_sdk_ec2::types::Tag;

    use super::*;

    #[test]
    fn the_owner_comes_from_the_tag() {
        let ours = Ec2Instance::builder()
            .instance_id("i-1")
            .tags(Tag::builder().key("hangar:owner").value("me").build())
            .build();
        let bare = Ec2Instance::builder().instance_id("i-2").build();
        assert_eq!(owner_of(&ours), Some("me"));
        assert_eq!(owner_of(&bare), None);
    }

    #[test]
    fn dedup_keeps_order() {
        let ids: Vec<String> = ["b", "a", "b", "c", "a"].map(String::from).to_vec();
        assert_eq!(dedup(&ids), vec!["b", "a", "c"]);
    }
}
