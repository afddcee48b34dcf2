//! Which of AWS's promises and failure modes the gateway adds to moto, and
//! with what numbers. [`Semantics::default`] is AWS's documented behaviour
//! (see `infra/local/README.md`, "AWS behaviours"); a test switches one off
//! only with a comment saying why.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Every behaviour the gateway emulates, one field each.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Semantics {
    /// `RunInstances` with a `ClientToken` launches at most once: a repeat
    /// with the same parameters answers with the first reservation, a
    /// repeat with other parameters is `IdempotentParameterMismatch`.
    /// `None`: off (moto launches again). Default: tokens kept 24 h after
    /// their last use (AWS: "at least 24 hours after the termination").
    pub client_token_ttl: Option<Duration>,
    /// How late `DescribeInstances` shows a new instance, each tag change
    /// and each state change. Default: uniform 0.5–3 s per change.
    pub listing_lag: Lag,
    /// AWS's API token buckets per access key. `None`: no throttling.
    pub throttling: Option<ThrottleLimits>,
    /// `DescribeTargetHealth` keeps reporting a deregistered target as
    /// `draining` until the deregistration delay has passed, even when it
    /// drained sooner (as an ALB does; the data plane forgets it at once).
    /// `false`: it vanishes as soon as nothing is in flight to it.
    pub draining_for_whole_delay: bool,
}

impl Default for Semantics {
    fn default() -> Self {
        Semantics {
            client_token_ttl: Some(Duration::from_secs(24 * 3600)),
            listing_lag: Lag::default(),
            throttling: Some(ThrottleLimits::default()),
            draining_for_whole_delay: true,
        }
    }
}

impl Semantics {
    /// moto as it is: no idempotency, no lag, no throttling, no long drain
    /// display. For comparisons only.
    pub fn none() -> Semantics {
        Semantics {
            client_token_ttl: None,
            listing_lag: Lag::None,
            throttling: None,
            draining_for_whole_delay: false,
        }
    }
}

/// Eventual-consistency lag of one change.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Lag {
    /// Visible at once.
    None,
    /// Always this long.
    Fixed(Duration),
    /// Drawn uniformly from `[min, max]`, independently per change.
    Uniform { min: Duration, max: Duration },
}

impl Default for Lag {
    fn default() -> Self {
        Lag::Uniform {
            min: Duration::from_millis(500),
            max: Duration::from_secs(3),
        }
    }
}

impl Lag {
    pub fn is_none(&self) -> bool {
        match self {
            Lag::None => true,
            Lag::Fixed(d) => d.is_zero(),
            Lag::Uniform { max, .. } => max.is_zero(),
        }
    }

    /// One draw; `unit` is uniform in `[0, 1)`.
    pub fn draw(&self, unit: f64) -> Duration {
        match *self {
            Lag::None => Duration::ZERO,
            Lag::Fixed(d) => d,
            Lag::Uniform { min, max } => {
                let (lo, hi) = if min <= max { (min, max) } else { (max, min) };
                lo + (hi - lo).mul_f64(unit.clamp(0.0, 1.0))
            }
        }
    }

    /// `0`, `2s`, `500ms-3s` (what `infra/local/cloud up --listing-lag` takes).
    pub fn parse(s: &str) -> Result<Lag, String> {
        let one = |t: &str| {
            let t = t.trim();
            if t == "0" {
                return Ok(Duration::ZERO);
            }
            humantime::parse_duration(t).map_err(|e| format!("`{t}`: {e}"))
        };
        match s.split_once('-') {
            Some((lo, hi)) => Ok(Lag::Uniform {
                min: one(lo)?,
                max: one(hi)?,
            }),
            None => match one(s)? {
                d if d.is_zero() => Ok(Lag::None),
                d => Ok(Lag::Fixed(d)),
            },
        }
    }
}

/// What a subnet answers `RunInstances` with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Capacity {
    /// Launches (moto decides).
    #[default]
    Available,
    /// HTTP 500 `InsufficientInstanceCapacity`: the zone has none of the
    /// instance type now; retry later or elsewhere.
    Insufficient,
    /// HTTP 400 `Unsupported`: the configuration is not offered there.
    Unsupported,
}

impl Capacity {
    /// `available`/`on`, `insufficient`/`off`, `unsupported`.
    pub fn parse(s: &str) -> Option<Capacity> {
        match s.to_ascii_lowercase().as_str() {
            "available" | "on" => Some(Capacity::Available),
            "insufficient" | "off" => Some(Capacity::Insufficient),
            "unsupported" => Some(Capacity::Unsupported),
            _ => None,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Capacity::Available => "available",
            Capacity::Insufficient => "insufficient",
            Capacity::Unsupported => "unsupported",
        }
    }
}

/// A token bucket: `burst` tokens at most, `refill` tokens added per second.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    pub burst: f64,
    pub refill: f64,
}

impl Bucket {
    pub const fn new(burst: f64, refill: f64) -> Bucket {
        Bucket { burst, refill }
    }
}

/// The buckets, per access key id (AWS: per account and region; every key
/// of a local cloud is one account, so a key stands for a caller here).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ThrottleLimits {
    /// EC2 non-mutating actions (`Describe*`, `Get*`).
    pub ec2_describe: Bucket,
    pub ec2_run_instances: Bucket,
    pub ec2_terminate_instances: Bucket,
    pub ec2_create_tags: Bucket,
    /// Every other EC2 action (mutating: `DeleteTags`, `StopInstances`, …).
    pub ec2_mutating: Bucket,
    /// ELBv2 `RegisterTargets` and `DeregisterTargets`, together.
    pub elb_register_deregister: Bucket,
    /// ELBv2 `Describe*`.
    pub elb_describe: Bucket,
    /// Every ELBv2 call also takes a token from this account-wide bucket.
    pub elb_account: Bucket,
}

impl Default for ThrottleLimits {
    fn default() -> Self {
        ThrottleLimits {
            ec2_describe: Bucket::new(100.0, 20.0),
            ec2_run_instances: Bucket::new(5.0, 2.0),
            ec2_terminate_instances: Bucket::new(100.0, 5.0),
            ec2_create_tags: Bucket::new(100.0, 10.0),
            ec2_mutating: Bucket::new(50.0, 5.0),
            elb_register_deregister: Bucket::new(20.0, 4.0),
            elb_describe: Bucket::new(40.0, 10.0),
            elb_account: Bucket::new(40.0, 10.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lags_parse_and_draw_within_bounds() {
        assert_eq!(Lag::parse("0").unwrap(), Lag::None);
        assert_eq!(
            Lag::parse("2s").unwrap(),
            Lag::Fixed(Duration::from_secs(2))
        );
        let lag = Lag::parse("500ms-3s").unwrap();
        assert_eq!(lag, Lag::default());
        assert_eq!(lag.draw(0.0), Duration::from_millis(500));
        let top = lag.draw(0.999_999);
        assert!(top > Duration::from_millis(2990) && top <= Duration::from_secs(3));
        assert!(Lag::parse("soon").is_err());
        assert!(Lag::Fixed(Duration::ZERO).is_none());
    }

    #[test]
    fn capacity_words() {
        assert_eq!(Capacity::parse("off"), Some(Capacity::Insufficient));
        assert_eq!(Capacity::parse("ON"), Some(Capacity::Available));
        assert_eq!(Capacity::parse("unsupported"), Some(Capacity::Unsupported));
        assert_eq!(Capacity::parse("maybe"), None);
    }
}
