//! Launch intents and the subnets that refuse launches.
//!
//! Every launch hangar decides on becomes a [`LaunchIntent`] with its own
//! `ClientToken`, made from the cluster, the subnet, the time of the
//! decision and a sequence number — never from what was observed, because
//! EC2 keeps a token for at least 24 hours after its instances terminated:
//! a token derived from the fleet would come back when the fleet looks the
//! same again, and EC2 would answer with the old, terminated reservation
//! (or `IdempotentParameterMismatch` once any parameter differs).
//!
//! The intent is in memory — persisted before the `RunInstances` call — from
//! the moment it is decided until the listing shows its instances (they
//! carry its token), so it counts toward capacity all that time, and a
//! retry after a lost answer or an operator crash reuses its token: EC2
//! then returns the instances it launched instead of launching twice.
//!
//! A subnet whose launch failed for reasons of its own (no capacity in the
//! zone, an instance type it does not offer, …) is avoided for a while,
//! doubling with each failure in a row, and the cluster launches in the
//! other subnets, as an Auto Scaling group does.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use hangar_cloud::{CloudError, Instance};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Launches {
    /// Intents whose instances the listing does not show (all) yet.
    pub pending: Vec<LaunchIntent>,
    /// Subnets launches avoid for now, by subnet id.
    pub avoided: BTreeMap<String, SubnetBackoff>,
    /// Numbers the intents of this cluster, so two decided at the same
    /// instant differ.
    pub seq: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LaunchIntent {
    /// The `ClientToken`: the same for every retry of this intent, never
    /// used for another.
    pub token: String,
    pub subnet: String,
    pub count: u32,
    /// The release the instances are tagged with (a retry must send the
    /// same parameters).
    pub release: String,
    pub decided_at: DateTime<Utc>,
    /// Calls made for it that failed transiently.
    pub attempts: u32,
    /// The last call failed transiently: call again (same token).
    #[serde(default)]
    pub retry: bool,
    /// When an instance of it was first seen, from the listing or from
    /// hangar's own launch answer: it launched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answered_at: Option<DateTime<Utc>>,
    /// Every instance of it seen so far (listing or launch answer).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub seen: BTreeSet<String>,
    /// Those of `seen` that hangar itself terminated: they no longer count
    /// toward capacity even if no listing ever showed them. (One that is
    /// merely gone from view — a restart forgot hangar's launch answer —
    /// still counts until [`LISTING_GRACE`]: it may be running.)
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub ended: BTreeSet<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SubnetBackoff {
    /// Failures in a row.
    pub failures: u32,
    pub until: DateTime<Utc>,
    pub reason: String,
}

/// How a failed `RunInstances` is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaunchFailure {
    /// The subnet cannot launch this now: avoid it, try the others.
    Subnet,
    /// The token was used with other parameters (the spec changed between
    /// a call and its retry): a new intent, with a new token, will do.
    TokenMismatch,
    /// Throttling, 5xx, a lost connection: the same intent is called again.
    Transient,
}

impl LaunchFailure {
    pub fn of(error: &CloudError) -> LaunchFailure {
        match error.code() {
            Some("IdempotentParameterMismatch") => LaunchFailure::TokenMismatch,
            // Capacity is reported as a server error, but retrying the same
            // zone at once does not help: it is the subnet's.
            Some(code) if SUBNET_ERRORS.contains(&code) => LaunchFailure::Subnet,
            _ if error.is_transient() => LaunchFailure::Transient,
            // Anything else (a bad launch template, a quota) would fail the
            // same way at once: back off rather than call every pass.
            _ => LaunchFailure::Subnet,
        }
    }
}

/// Error codes that say a subnet (its zone) cannot take the launch now.
const SUBNET_ERRORS: [&str; 5] = [
    "InsufficientInstanceCapacity",
    "InsufficientFreeAddressesInSubnet",
    "Unsupported",
    "InsufficientHostCapacity",
    "InsufficientCapacityOnHost",
];

/// Transient failures after which an intent is given up (and its subnet
/// avoided) rather than called again.
const MAX_ATTEMPTS: u32 = 5;

/// An intent the listing has not confirmed for this long is dropped: EC2
/// lists a launched instance within seconds, so it never launched.
const INTENT_MAX_AGE: chrono::Duration = chrono::Duration::minutes(10);

/// An intent that launched (its instances were seen, if only in hangar's
/// own launch answer) but is not in the listing this long after: its
/// instances ended before the listing caught up (EC2 lists them only as
/// `terminated` then, which hangar's listing leaves out). Long above EC2's
/// listing lag (seconds), short enough that a node killed at birth is
/// replaced within a minute, not after `INTENT_MAX_AGE`.
const LISTING_GRACE: chrono::Duration = chrono::Duration::seconds(60);

/// First backoff of a subnet; doubles with each failure in a row.
const SUBNET_BACKOFF: chrono::Duration = chrono::Duration::seconds(30);
const SUBNET_BACKOFF_MAX: chrono::Duration = chrono::Duration::minutes(10);

impl Launches {
    /// Instances of pending intents not among `instances` at all (not even
    /// from hangar's own launch answers) and not terminated by hangar:
    /// they count toward capacity.
    pub fn unseen(&self, instances: &[Instance]) -> Vec<(String, u32)> {
        self.pending
            .iter()
            .map(|i| {
                let mut seen: BTreeSet<&str> = i.ended.iter().map(String::as_str).collect();
                seen.extend(of_intent(instances.iter(), &i.token).map(|x| x.id.as_str()));
                (i.subnet.clone(), i.count.saturating_sub(seen.len() as u32))
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Forgets intents the listing shows in full (and the backoff of their
    /// subnets: a launch there worked), intents too old to be real, and
    /// backoffs that ran out long ago. Only the listing confirms: instances
    /// known from hangar's own launch answers (`unlisted`) are forgotten by
    /// a crash, and the intent must still be on disk then.
    /// Returns what to tell about it.
    pub fn confirm(
        &mut self,
        instances: &[Instance],
        unlisted: &BTreeSet<String>,
        now: DateTime<Utc>,
    ) -> Vec<String> {
        let mut said = Vec::new();
        // A failure long past says nothing about the subnet today.
        self.avoided
            .retain(|_, b| now - b.until < SUBNET_BACKOFF_MAX);
        let avoided = &mut self.avoided;
        let listed = || instances.iter().filter(|i| !unlisted.contains(&i.id));
        self.pending.retain_mut(|intent| {
            let seen = carrying(listed(), &intent.token);
            if seen > 0 {
                avoided.remove(&intent.subnet);
            }
            if seen >= intent.count {
                return false;
            }
            intent
                .seen
                .extend(of_intent(instances.iter(), &intent.token).map(|i| i.id.clone()));
            if intent.answered_at.is_none() && !intent.seen.is_empty() {
                intent.answered_at = Some(now);
            }
            if intent.answered_at.is_some_and(|at| now - at > LISTING_GRACE) {
                said.push(format!(
                    "launch of {} in {} ({}) answered, but {} of its instances never showed in the listing (ended before it caught up?); no longer counted",
                    intent.count,
                    intent.subnet,
                    intent.token,
                    intent.count - seen
                ));
                return false;
            }
            if now - intent.decided_at > INTENT_MAX_AGE {
                said.push(format!(
                    "launch of {} in {} ({}) never showed up; dropped",
                    intent.count, intent.subnet, intent.token
                ));
                return false;
            }
            true
        });
        said
    }

    /// Takes in that hangar terminated `node` (its drain finished).
    pub fn ended(&mut self, node: &str) {
        if let Some(intent) = self.pending.iter_mut().find(|i| i.seen.contains(node)) {
            intent.ended.insert(node.to_string());
        }
    }

    /// Takes in that the call for `token` failed with `error`.
    pub fn failed(&mut self, token: &str, error: &CloudError, now: DateTime<Utc>) -> String {
        let Some(pos) = self.pending.iter().position(|i| i.token == token) else {
            return format!("launch {token} failed: {error}");
        };
        let kind = LaunchFailure::of(error);
        let intent = &mut self.pending[pos];
        if kind == LaunchFailure::Transient {
            intent.attempts += 1;
            if intent.attempts < MAX_ATTEMPTS {
                intent.retry = true;
                return format!(
                    "launching {} in {} failed ({error}); trying again with the same token",
                    intent.count, intent.subnet
                );
            }
        }
        let intent = self.pending.remove(pos);
        if kind == LaunchFailure::TokenMismatch {
            return format!(
                "launching {} in {}: {error}; deciding again with a new token",
                intent.count, intent.subnet
            );
        }
        let backoff = self.avoid(&intent.subnet, &error.to_string(), now);
        format!(
            "launching {} in {} failed: {error}; avoiding {} for {}s",
            intent.count,
            intent.subnet,
            intent.subnet,
            backoff.num_seconds()
        )
    }

    fn avoid(&mut self, subnet: &str, reason: &str, now: DateTime<Utc>) -> chrono::Duration {
        let entry = self
            .avoided
            .entry(subnet.to_string())
            .or_insert(SubnetBackoff {
                failures: 0,
                until: now,
                reason: String::new(),
            });
        entry.failures += 1;
        let wait = SUBNET_BACKOFF
            .checked_mul(1 << (entry.failures - 1).min(10))
            .unwrap_or(SUBNET_BACKOFF_MAX)
            .min(SUBNET_BACKOFF_MAX);
        entry.until = now + wait;
        entry.reason = reason.to_string();
        wait
    }

    /// The subnets new launches may use now, in spec order.
    pub fn usable<'s>(&self, subnets: &'s [String], now: DateTime<Utc>) -> Vec<&'s String> {
        subnets
            .iter()
            .filter(|s| self.avoided.get(*s).is_none_or(|b| b.until <= now))
            .collect()
    }

    /// A new intent for `count` instances in `subnet`, with a fresh token.
    pub fn intend(
        &mut self,
        cluster: &str,
        subnet: &str,
        count: u32,
        release: &str,
        now: DateTime<Utc>,
    ) -> LaunchIntent {
        self.seq += 1;
        let intent = LaunchIntent {
            token: token(cluster, subnet, count, now, self.seq),
            subnet: subnet.to_string(),
            count,
            release: release.to_string(),
            decided_at: now,
            attempts: 0,
            retry: false,
            answered_at: None,
            seen: BTreeSet::new(),
            ended: BTreeSet::new(),
        };
        self.pending.push(intent.clone());
        intent
    }

    /// Intents to call (again) now: those whose last call failed
    /// transiently, and — on the first pass of a process, when a call may
    /// have been cut short by a crash — every one the listing shows
    /// nothing of. Their flags are cleared: each call is made once a pass.
    pub fn retries(&mut self, instances: &[Instance], first_pass: bool) -> Vec<LaunchIntent> {
        let mut out = Vec::new();
        for intent in &mut self.pending {
            let unseen = carrying(instances.iter(), &intent.token) == 0;
            if intent.retry || (first_pass && unseen) {
                intent.retry = false;
                out.push(intent.clone());
            }
        }
        out
    }

    /// Why some subnets are avoided, for status.
    pub fn describe_avoided(&self, now: DateTime<Utc>) -> Option<String> {
        let mut out = String::new();
        for (subnet, b) in self.avoided.iter().filter(|(_, b)| b.until > now) {
            if !out.is_empty() {
                out.push_str("; ");
            }
            let _ = write!(
                out,
                "{subnet} avoided for {}s more ({})",
                (b.until - now).num_seconds(),
                b.reason
            );
        }
        (!out.is_empty()).then_some(out)
    }
}

/// The instances launched with `token`.
fn of_intent<'i, 't>(
    instances: impl Iterator<Item = &'i Instance> + 't,
    token: &'t str,
) -> impl Iterator<Item = &'i Instance> + 't {
    instances.filter(move |i| i.client_token.as_deref() == Some(token))
}

fn carrying<'i>(instances: impl Iterator<Item = &'i Instance>, token: &str) -> u32 {
    of_intent(instances, token).count() as u32
}

/// `hangar-` + 40 hex digits: within EC2's 64 ASCII characters, unique per
/// cluster, subnet, instant and sequence number.
fn token(cluster: &str, subnet: &str, count: u32, now: DateTime<Utc>, seq: u64) -> String {
    let mut h = Sha256::new();
    h.update(format!(
        "{cluster}|{subnet}|{count}|{}|{seq}",
        now.timestamp_nanos_opt().unwrap_or(now.timestamp())
    ));
    let mut token = hex::encode(h.finalize());
    token.truncate(40);
    format!("hangar-{token}")
}

/// The hash stamped on an instance at launch (`hangar:launch`): what
/// `RunInstances` would do differently for it today (template, version,
/// instance type, user tags). A node whose hash differs is replaced;
/// subnets are not in it (adding one must not replace the fleet).
/// `version` is the template version number `launchTemplateVersion`
/// names now (`$Latest` and `$Default` resolved).
pub fn settings_hash(instances: &hangar_crds::Instances, version: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"launch-settings-v1\0");
    for part in [
        instances.launch_template.as_str(),
        version,
        instances.instance_type.as_deref().unwrap_or(""),
    ] {
        h.update(part.as_bytes());
        h.update(b"\0");
    }
    for (k, v) in &instances.tags {
        h.update(k.as_bytes());
        h.update(b"=");
        h.update(v.as_bytes());
        h.update(b"\0");
    }
    hex::encode(&h.finalize()[..8])
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap()
    }

    fn error(code: &str) -> CloudError {
        CloudError::Service {
            service: "ec2",
            code: code.into(),
            message: "…".into(),
        }
    }

    #[test]
    fn a_token_is_never_made_twice_and_fits_ec2() {
        let mut l = Launches::default();
        let a = l.intend("web", "subnet-a", 1, "v1", t0());
        let b = l.intend("web", "subnet-a", 1, "v1", t0());
        let c = Launches::default().intend(
            "web",
            "subnet-a",
            1,
            "v1",
            t0() + chrono::Duration::hours(2),
        );
        assert_ne!(a.token, b.token, "same instant, same everything");
        assert_ne!(a.token, c.token, "the same fleet again, later");
        assert!(a.token.len() <= 64 && a.token.is_ascii());
    }

    #[test]
    fn failures_are_sorted_by_what_helps() {
        assert_eq!(
            LaunchFailure::of(&error("InsufficientInstanceCapacity")),
            LaunchFailure::Subnet
        );
        assert_eq!(
            LaunchFailure::of(&error("Unsupported")),
            LaunchFailure::Subnet
        );
        assert_eq!(
            LaunchFailure::of(&error("IdempotentParameterMismatch")),
            LaunchFailure::TokenMismatch
        );
        assert_eq!(
            LaunchFailure::of(&error("InternalError")),
            LaunchFailure::Transient
        );
        let throttled = CloudError::Throttled {
            service: "ec2",
            code: "RequestLimitExceeded".into(),
            message: "…".into(),
        };
        assert_eq!(LaunchFailure::of(&throttled), LaunchFailure::Transient);
        assert_eq!(
            LaunchFailure::of(&error("InvalidLaunchTemplateId.NotFound")),
            LaunchFailure::Subnet
        );
    }

    #[test]
    fn a_subnet_is_avoided_longer_with_each_failure_in_a_row() {
        let mut l = Launches::default();
        let subnets = ["subnet-a".to_string(), "subnet-b".to_string()];
        let i = l.intend("web", "subnet-a", 1, "v1", t0());
        l.failed(&i.token, &error("InsufficientInstanceCapacity"), t0());
        assert!(l.pending.is_empty());
        assert_eq!(l.usable(&subnets, t0()), [&subnets[1]]);
        assert_eq!(
            l.usable(&subnets, t0() + chrono::Duration::seconds(30))
                .len(),
            2
        );
        let i = l.intend(
            "web",
            "subnet-a",
            1,
            "v1",
            t0() + chrono::Duration::seconds(30),
        );
        l.failed(
            &i.token,
            &error("InsufficientInstanceCapacity"),
            t0() + chrono::Duration::seconds(30),
        );
        assert_eq!(
            l.avoided["subnet-a"].until,
            t0() + chrono::Duration::seconds(90)
        );
        assert!(l
            .describe_avoided(t0() + chrono::Duration::seconds(31))
            .is_some_and(|s| s.contains("subnet-a avoided for 59s more")));
    }

    #[test]
    fn a_transient_failure_keeps_the_intent_and_its_token_until_it_gives_up() {
        let mut l = Launches::default();
        let i = l.intend("web", "subnet-a", 2, "v1", t0());
        for _ in 1..MAX_ATTEMPTS {
            l.failed(&i.token, &error("InternalError"), t0());
            let again = l.retries(&[], false);
            assert_eq!(again.len(), 1);
            assert_eq!(again[0].token, i.token);
            assert!(l.retries(&[], false).is_empty(), "once a pass");
        }
        l.failed(&i.token, &error("InternalError"), t0());
        assert!(l.pending.is_empty());
        assert!(l.avoided.contains_key("subnet-a"));
    }

    /// Seen on the local cloud's listing lag: a node launched and scaled
    /// in within a second, never listed, kept counting as capacity for the
    /// whole `LISTING_GRACE`, and the next scale-out launched nothing for
    /// 27 s of a traffic breach.
    #[test]
    fn an_instance_that_ended_before_the_listing_showed_it_is_no_capacity() {
        let at = |s: i64| t0() + chrono::Duration::seconds(s);
        let mut l = Launches::default();
        let intent = l.intend("web", "subnet-a", 2, "v1", at(0));
        assert_eq!(l.unseen(&[]), vec![("subnet-a".to_string(), 2)]);
        // The launch answered one of the two so far; only hangar knows it.
        let mut answered = crate::core::decide::fixtures::node("i-1");
        answered.client_token = Some(intent.token.clone());
        let unlisted = BTreeSet::from(["i-1".to_string()]);
        l.confirm(std::slice::from_ref(&answered), &unlisted, at(1));
        assert_eq!(
            l.unseen(std::slice::from_ref(&answered)),
            vec![("subnet-a".to_string(), 1)]
        );
        // Gone from view (a restart forgot the launch answer): it may be
        // running, so it still counts.
        l.confirm(&[], &BTreeSet::new(), at(2));
        assert_eq!(l.unseen(&[]), vec![("subnet-a".to_string(), 2)]);
        // hangar drained and terminated it before any listing showed it.
        l.ended("i-1");
        l.confirm(&[], &BTreeSet::new(), at(3));
        assert_eq!(
            l.unseen(&[]),
            vec![("subnet-a".to_string(), 1)],
            "only the instance never seen still counts"
        );
        assert_eq!(
            l.pending.len(),
            1,
            "the intent is kept until the grace ends"
        );
    }
}
