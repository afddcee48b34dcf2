//! One error type for every cloud call, keeping AWS's own error code.

use std::time::Duration;

/// The code of a `NotFound` that means "EC2 reports it terminated" (hangar's
/// own; EC2's `InvalidInstanceID.NotFound` right after a launch is its
/// eventual consistency, not a terminated instance).
pub const TERMINATED: &str = "hangar.InstanceTerminated";

/// `Clone`: one failed call that carried many reads fails each of them.
#[derive(Clone, Debug, thiserror::Error)]
pub enum CloudError {
    /// The API refused for rate reasons and retries ran out.
    #[error("throttled by {service} ({code}): {message}")]
    Throttled {
        service: &'static str,
        code: String,
        message: String,
    },
    /// The caller's role may not do this (IAM, a KMS key policy).
    #[error("access denied to {what} ({code}): {message}")]
    AccessDenied {
        what: String,
        code: String,
        message: String,
    },
    #[error("not found: {what}{}", code.as_ref().map(|c| format!(" ({c})")).unwrap_or_default())]
    NotFound { what: String, code: Option<String> },
    /// hangar refused to act on something it does not own.
    #[error("refusing to touch {resource}: it does not carry hangar:owner={owner}")]
    NotOwned { resource: String, owner: String },
    #[error("invalid input{}: {message}", code.as_ref().map(|c| format!(" ({c})")).unwrap_or_default())]
    InvalidInput {
        code: Option<String>,
        message: String,
    },
    /// Connection, timeout or other failure below the API.
    #[error("transport error talking to {service}: {message}")]
    Transport {
        service: &'static str,
        message: String,
    },
    /// Any other error the service returned.
    #[error("{service} error {code}: {message}")]
    Service {
        service: &'static str,
        code: String,
        message: String,
    },
    #[error("artifact {artifact}: checksum mismatch (expected sha256 {expected}, got {actual})")]
    ChecksumMismatch {
        artifact: String,
        expected: String,
        actual: String,
    },
    #[error("artifact {artifact}: {message}")]
    Artifact { artifact: String, message: String },
    /// This process does not hold the lease (any more): the mutating call
    /// was not sent.
    #[error("{operation} not sent: {reason}")]
    NotLeader { operation: String, reason: String },
}

impl CloudError {
    /// The service's error code (`InvalidInstanceID.NotFound`, …), if any.
    pub fn code(&self) -> Option<&str> {
        match self {
            CloudError::Throttled { code, .. }
            | CloudError::Service { code, .. }
            | CloudError::AccessDenied { code, .. } => Some(code),
            CloudError::NotFound { code, .. } | CloudError::InvalidInput { code, .. } => {
                code.as_deref()
            }
            _ => None,
        }
    }

    /// EC2 reports the instance terminated.
    pub fn is_terminated(&self) -> bool {
        matches!(self, CloudError::NotFound { code: Some(c), .. } if c == TERMINATED)
    }

    /// Whether trying again later can help.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            CloudError::Throttled { .. }
                | CloudError::Transport { .. }
                | CloudError::NotLeader { .. }
        ) || matches!(self, CloudError::Service { code, .. } if is_server_error_code(code))
    }

    /// A short label for metrics (`throttled`, `not_found`, …).
    pub fn kind(&self) -> &'static str {
        match self {
            CloudError::Throttled { .. } => "throttled",
            CloudError::NotFound { .. } => "not_found",
            CloudError::AccessDenied { .. } => "access_denied",
            CloudError::NotOwned { .. } => "not_owned",
            CloudError::InvalidInput { .. } => "invalid_input",
            CloudError::Transport { .. } => "transport",
            CloudError::Service { .. } => "service",
            CloudError::ChecksumMismatch { .. } => "checksum_mismatch",
            CloudError::Artifact { .. } => "artifact",
            CloudError::NotLeader { .. } => "not_leader",
        }
    }
}

fn is_server_error_code(code: &str) -> bool {
    matches!(
        code,
        "InternalError"
            | "InternalFailure"
            | "ServiceUnavailable"
            | "Unavailable"
            | "InternalServerError"
    )
}

/// How long to wait before retry `attempt` (0-based): exponential from
/// `base`, capped, with full jitter so a fleet of callers does not retry in
/// lockstep.
pub fn backoff(attempt: u32, base: Duration, cap: Duration, unit_random: f64) -> Duration {
    let exp = base.saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX));
    exp.min(cap).mul_f64(unit_random.clamp(0.0, 1.0))
}

/// An error and its sources, `: `-separated (reqwest and hyper put the
/// useful part in the sources).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}
