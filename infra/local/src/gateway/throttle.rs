//! AWS's API token buckets, per access key id and API family.
//!
//! A call takes one token from every bucket its action draws from (an
//! ELBv2 call: its family's bucket and the account-wide one), or from none
//! when any of them is empty: then it is throttled. Buckets start full and
//! refill continuously at their rate, up to their burst size, as AWS
//! describes its token buckets.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use super::semantics::{Bucket, ThrottleLimits};

/// One API family's bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BucketId {
    Ec2Describe,
    Ec2RunInstances,
    Ec2TerminateInstances,
    Ec2CreateTags,
    Ec2Mutating,
    ElbRegisterDeregister,
    ElbDescribe,
    ElbAccount,
}

impl BucketId {
    /// The buckets a call draws from; empty: not throttled (S3, CloudWatch,
    /// DynamoDB and unsigned calls).
    pub fn for_call(service: &str, action: &str) -> &'static [BucketId] {
        match service {
            "ec2" => match action {
                "RunInstances" => &[BucketId::Ec2RunInstances],
                "TerminateInstances" => &[BucketId::Ec2TerminateInstances],
                "CreateTags" => &[BucketId::Ec2CreateTags],
                a if a.starts_with("Describe") || a.starts_with("Get") => &[BucketId::Ec2Describe],
                _ => &[BucketId::Ec2Mutating],
            },
            "elasticloadbalancing" => match action {
                "RegisterTargets" | "DeregisterTargets" => {
                    &[BucketId::ElbRegisterDeregister, BucketId::ElbAccount]
                }
                a if a.starts_with("Describe") => &[BucketId::ElbDescribe, BucketId::ElbAccount],
                _ => &[BucketId::ElbAccount],
            },
            _ => &[],
        }
    }

    fn spec(self, limits: &ThrottleLimits) -> Bucket {
        match self {
            BucketId::Ec2Describe => limits.ec2_describe,
            BucketId::Ec2RunInstances => limits.ec2_run_instances,
            BucketId::Ec2TerminateInstances => limits.ec2_terminate_instances,
            BucketId::Ec2CreateTags => limits.ec2_create_tags,
            BucketId::Ec2Mutating => limits.ec2_mutating,
            BucketId::ElbRegisterDeregister => limits.elb_register_deregister,
            BucketId::ElbDescribe => limits.elb_describe,
            BucketId::ElbAccount => limits.elb_account,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Level {
    tokens: f64,
    at: Instant,
}

/// Every caller's buckets.
#[derive(Debug)]
pub struct Throttle {
    limits: ThrottleLimits,
    levels: Mutex<HashMap<(String, BucketId), Level>>,
}

impl Throttle {
    pub fn new(limits: ThrottleLimits) -> Throttle {
        Throttle {
            limits,
            levels: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token from each of `buckets` for `key`, all or none; `Err`
    /// names the first empty bucket.
    pub fn admit(&self, key: &str, buckets: &[BucketId], now: Instant) -> Result<(), BucketId> {
        if buckets.is_empty() {
            return Ok(());
        }
        let mut levels = self.levels.lock().unwrap_or_else(|p| p.into_inner());
        let mut refilled = [0.0f64; 2];
        for (i, id) in buckets.iter().enumerate() {
            let spec = id.spec(&self.limits);
            let level = levels
                .get(&(key.to_string(), *id))
                .copied()
                .unwrap_or(Level {
                    tokens: spec.burst,
                    at: now,
                });
            let elapsed = now.saturating_duration_since(level.at).as_secs_f64();
            let tokens = (level.tokens + elapsed * spec.refill).min(spec.burst);
            if tokens < 1.0 {
                return Err(*id);
            }
            if let Some(slot) = refilled.get_mut(i) {
                *slot = tokens;
            }
        }
        for (id, tokens) in buckets.iter().zip(refilled) {
            levels.insert(
                (key.to_string(), *id),
                Level {
                    tokens: tokens - 1.0,
                    at: now,
                },
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn run_instances_bursts_five_then_refills_two_per_second() {
        let t = Throttle::new(ThrottleLimits::default());
        let run = BucketId::for_call("ec2", "RunInstances");
        let t0 = Instant::now();
        for i in 0..5 {
            assert_eq!(t.admit("k", run, t0), Ok(()), "call {i}");
        }
        assert_eq!(t.admit("k", run, t0), Err(BucketId::Ec2RunInstances));
        // Another key has its own bucket.
        assert_eq!(t.admit("other", run, t0), Ok(()));
        assert_eq!(
            t.admit("k", run, t0 + Duration::from_millis(400)),
            Err(BucketId::Ec2RunInstances)
        );
        assert_eq!(t.admit("k", run, t0 + Duration::from_millis(500)), Ok(()));
        assert_eq!(
            t.admit("k", run, t0 + Duration::from_millis(600)),
            Err(BucketId::Ec2RunInstances)
        );
        // Never more than the burst, however long it rested.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..5 {
            assert_eq!(t.admit("k", run, later), Ok(()));
        }
        assert!(t.admit("k", run, later).is_err());
    }

    #[test]
    fn elb_calls_also_draw_from_the_account_bucket_all_or_nothing() {
        let t = Throttle::new(ThrottleLimits::default());
        let now = Instant::now();
        let register = BucketId::for_call("elasticloadbalancing", "RegisterTargets");
        let describe = BucketId::for_call("elasticloadbalancing", "DescribeTargetHealth");
        for _ in 0..20 {
            assert_eq!(t.admit("k", register, now), Ok(()));
        }
        assert_eq!(
            t.admit("k", register, now),
            Err(BucketId::ElbRegisterDeregister)
        );
        // 20 account tokens left for describes, then the account bucket is dry.
        for _ in 0..20 {
            assert_eq!(t.admit("k", describe, now), Ok(()));
        }
        assert_eq!(t.admit("k", describe, now), Err(BucketId::ElbAccount));
        assert_eq!(
            t.admit(
                "k",
                BucketId::for_call("elasticloadbalancing", "ModifyTargetGroup"),
                now
            ),
            Err(BucketId::ElbAccount)
        );
    }

    #[test]
    fn families() {
        assert_eq!(
            BucketId::for_call("ec2", "DescribeInstances"),
            &[BucketId::Ec2Describe]
        );
        assert_eq!(
            BucketId::for_call("ec2", "DeleteTags"),
            &[BucketId::Ec2Mutating]
        );
        assert!(BucketId::for_call("s3", "GetObject").is_empty());
        assert!(BucketId::for_call("dynamodb", "PutItem").is_empty());
    }
}
