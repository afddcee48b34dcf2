//! Who called what: per access key id and action, how many calls, how many
//! were throttled, answered with an error, or cut off by a block.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Counts for one (access key, action).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallCounts {
    /// Every request received, whatever became of it.
    pub calls: u64,
    /// Answered with the service's throttling error by a token bucket.
    pub throttled: u64,
    /// Answered with HTTP 4xx/5xx for any other reason (by moto or the
    /// gateway: capacity, `IdempotentParameterMismatch`, …).
    pub errors: u64,
    /// Connection reset because the caller's service was blocked.
    pub blocked: u64,
}

impl CallCounts {
    fn add(&mut self, other: &CallCounts) {
        self.calls += other.calls;
        self.throttled += other.throttled;
        self.errors += other.errors;
        self.blocked += other.blocked;
    }
}

/// Every count, by access key id, then by `service:Action` (the SigV4
/// signing name: `ec2:RunInstances`, `elasticloadbalancing:RegisterTargets`,
/// `dynamodb:PutItem`, `s3:GetObject`, `monitoring:GetMetricData`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ApiCalls {
    pub by_key: BTreeMap<String, BTreeMap<String, CallCounts>>,
}

impl ApiCalls {
    /// Counts of one action of one service for one key.
    pub fn get(&self, access_key_id: &str, service: &str, action: &str) -> CallCounts {
        self.by_key
            .get(access_key_id)
            .and_then(|a| a.get(&format!("{}:{action}", canonical_service(service))))
            .copied()
            .unwrap_or_default()
    }

    /// Counts of `action` for one key, whichever service.
    pub fn action(&self, access_key_id: &str, action: &str) -> CallCounts {
        self.sum(access_key_id, |k| {
            k.split_once(':').is_some_and(|(_, a)| a == action)
        })
    }

    /// Every call of one service for one key.
    pub fn service(&self, access_key_id: &str, service: &str) -> CallCounts {
        let service = canonical_service(service);
        self.sum(access_key_id, |k| {
            k.split_once(':').is_some_and(|(s, _)| s == service)
        })
    }

    /// Every call of one key.
    pub fn total(&self, access_key_id: &str) -> CallCounts {
        self.sum(access_key_id, |_| true)
    }

    fn sum(&self, access_key_id: &str, pick: impl Fn(&str) -> bool) -> CallCounts {
        let mut total = CallCounts::default();
        for (k, c) in self.by_key.get(access_key_id).into_iter().flatten() {
            if pick(k) {
                total.add(c);
            }
        }
        total
    }
}

/// The signing name for the names people use (`elbv2`, `cloudwatch`).
pub fn canonical_service(service: &str) -> String {
    match service.to_ascii_lowercase().as_str() {
        "elbv2" | "elb" => "elasticloadbalancing".into(),
        "cloudwatch" => "monitoring".into(),
        other => other.to_string(),
    }
}

/// What happened to one call, for [`Accounting::record`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answered with this HTTP status.
    Answered(u16),
    Throttled,
    Blocked,
}

/// Counters and blocks, shared by every connection.
#[derive(Debug, Default)]
pub struct Accounting {
    calls: Mutex<ApiCalls>,
    blocks: Mutex<BTreeSet<(String, String)>>,
}

impl Accounting {
    pub fn record(&self, access_key_id: &str, service: &str, action: &str, outcome: Outcome) {
        let mut calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        let counts = calls
            .by_key
            .entry(access_key_id.to_string())
            .or_default()
            .entry(format!("{service}:{action}"))
            .or_default();
        counts.calls += 1;
        match outcome {
            Outcome::Answered(status) if status >= 400 => counts.errors += 1,
            Outcome::Answered(_) => {}
            Outcome::Throttled => counts.throttled += 1,
            Outcome::Blocked => counts.blocked += 1,
        }
    }

    pub fn snapshot(&self) -> ApiCalls {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn reset(&self) {
        *self.calls.lock().unwrap_or_else(|p| p.into_inner()) = ApiCalls::default();
    }

    /// From now on, `service` calls signed with `access_key_id` get their
    /// connection reset.
    pub fn block(&self, access_key_id: &str, service: &str) {
        self.blocks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((access_key_id.to_string(), canonical_service(service)));
    }

    pub fn unblock(&self, access_key_id: &str, service: &str) {
        self.blocks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(access_key_id.to_string(), canonical_service(service)));
    }

    pub fn is_blocked(&self, access_key_id: &str, service: &str) -> bool {
        let blocks = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        !blocks.is_empty() && blocks.contains(&(access_key_id.to_string(), service.to_string()))
    }

    /// `(access key id, service)` pairs blocked now.
    pub fn blocks(&self) -> Vec<(String, String)> {
        self.blocks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_key_and_action() {
        let a = Accounting::default();
        a.record("k1", "ec2", "RunInstances", Outcome::Answered(200));
        a.record("k1", "ec2", "RunInstances", Outcome::Throttled);
        a.record("k1", "ec2", "RunInstances", Outcome::Answered(500));
        a.record("k1", "dynamodb", "GetItem", Outcome::Blocked);
        a.record("k2", "ec2", "RunInstances", Outcome::Answered(200));
        let calls = a.snapshot();
        assert_eq!(
            calls.get("k1", "ec2", "RunInstances"),
            CallCounts {
                calls: 3,
                throttled: 1,
                errors: 1,
                blocked: 0
            }
        );
        assert_eq!(calls.action("k2", "RunInstances").calls, 1);
        assert_eq!(calls.service("k1", "dynamodb").blocked, 1);
        assert_eq!(calls.total("k1").calls, 4);
        assert_eq!(calls.total("nobody"), CallCounts::default());
        let json = serde_json::to_value(&calls).unwrap();
        assert_eq!(json["k1"]["ec2:RunInstances"]["throttled"], 1);
    }

    #[test]
    fn blocks_name_the_service_by_its_signing_name() {
        let a = Accounting::default();
        a.block("k", "elbv2");
        assert!(a.is_blocked("k", "elasticloadbalancing"));
        assert!(!a.is_blocked("other", "elasticloadbalancing"));
        a.unblock("k", "elasticloadbalancing");
        assert!(!a.is_blocked("k", "elasticloadbalancing"));
    }
}
