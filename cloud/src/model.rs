//! The state hangar keeps in the cloud: instances and their tags.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Tag keys hangar reads and writes. Set atomically at launch
/// (`TagSpecifications`), so an instance is never ownerless.
pub mod tags {
    pub const CLUSTER: &str = "hangar:cluster";
    pub const OWNER: &str = "hangar:owner";
    pub const PHASE: &str = "hangar:phase";
    pub const RELEASE: &str = "hangar:release";
    /// Hash of the provisioning config (runbook, vars, env file) the node
    /// was last provisioned with; a change re-provisions it.
    pub const CONFIG: &str = "hangar:config";
    /// Hash of the launch settings (template, version, instance type, user
    /// tags) the instance was launched with; a change replaces it.
    pub const LAUNCH: &str = "hangar:launch";
    /// Set by people (value `true`) to exempt a node from scale-in.
    pub const PROTECTED: &str = "hangar:protected";
    /// The lease fence of the leader that launched the instance or last
    /// moved its phase (with a distributed lease only): a leader that reads
    /// a higher one than its own has been replaced and stops.
    pub const EPOCH: &str = "hangar:epoch";
}

/// Where a node is in its life. Stored in the `hangar:phase` tag and
/// advanced only after the step it names has completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Launching,
    Provisioning,
    Releasing,
    Verifying,
    InService,
    Draining,
    Terminating,
    /// Ready (provisioned, released, health-checked) but kept out of the
    /// target group and out of the counted capacity: a warm-pool node,
    /// stopped or running as the pool's `state` says.
    Warm,
}

impl Phase {
    pub const ALL: [Phase; 8] = [
        Phase::Launching,
        Phase::Provisioning,
        Phase::Releasing,
        Phase::Verifying,
        Phase::InService,
        Phase::Draining,
        Phase::Terminating,
        Phase::Warm,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Launching => "launching",
            Phase::Provisioning => "provisioning",
            Phase::Releasing => "releasing",
            Phase::Verifying => "verifying",
            Phase::InService => "in-service",
            Phase::Draining => "draining",
            Phase::Terminating => "terminating",
            Phase::Warm => "warm",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Phase {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Phase::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown phase `{s}`"))
    }
}

/// EC2 instance state, reduced to what decisions depend on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    Pending,
    Running,
    ShuttingDown,
    Terminated,
    Stopping,
    Stopped,
}

/// One instance as hangar sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub id: String,
    /// `hangar:cluster`.
    pub cluster: String,
    /// `hangar:phase`; `None` when the tag is missing or unreadable.
    pub phase: Option<Phase>,
    /// `hangar:release`: the release the node was launched with or last
    /// activated.
    pub release: Option<String>,
    pub state: InstanceState,
    pub private_ip: Option<IpAddr>,
    pub public_ip: Option<IpAddr>,
    pub subnet_id: Option<String>,
    pub availability_zone: Option<String>,
    pub launched_at: Option<DateTime<Utc>>,
    /// `hangar:protected=true`: never chosen for scale-in.
    pub protected: bool,
    /// The `ClientToken` of the `RunInstances` call that launched it: tells
    /// hangar which of its launch intents an instance fulfils.
    pub client_token: Option<String>,
    /// Every tag, including the ones above.
    pub tags: BTreeMap<String, String>,
}

impl Instance {
    /// `hangar:epoch`: the fence of the leader that last wrote this
    /// instance's tags, when a fenced leader did.
    pub fn epoch(&self) -> Option<u64> {
        self.tags.get(tags::EPOCH).and_then(|e| e.parse().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_round_trip_through_their_tag_value() {
        for p in Phase::ALL {
            assert_eq!(p.as_str().parse::<Phase>(), Ok(p));
            assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{p}\""));
        }
        assert!("in_service".parse::<Phase>().is_err());
    }
}
