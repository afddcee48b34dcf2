//! SSM Parameter Store and Secrets Manager (AWS JSON 1.1:
//! `X-Amz-Target: AmazonSSM.*` / `secretsmanager.*`), forwarded to moto.
//!
//! moto serves both but does not evaluate IAM, so the gateway plays the
//! role's policy: [`Gateway::deny_secret`](super::Gateway::deny_secret)
//! makes every read of a parameter (or a path, or a secret) answer AWS's
//! own `AccessDeniedException`, the way a least-privilege role that does
//! not name it would. Nothing is seeded: tests create their parameters and
//! secrets through the SDK.

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;

use super::{Caller, Shared};
use crate::faults;

/// A resource the caller's "role" may not read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Denial {
    /// `ssm` or `secretsmanager`.
    pub service: String,
    /// A parameter name, a path (ending in `/`: everything under it), or a
    /// secret's name or ARN.
    pub resource: String,
}

impl Denial {
    fn covers(&self, service: &str, resource: &str) -> bool {
        self.service == service
            && (self.resource == resource
                || (self.resource.ends_with('/') && resource.starts_with(&self.resource))
                || (resource.ends_with('/') && self.resource.starts_with(resource)))
    }
}

/// The resource a read names (`Name`, `Path`, `SecretId` of the JSON body).
fn resource(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    ["Name", "Path", "SecretId"]
        .iter()
        .find_map(|k| v.get(*k).and_then(|s| s.as_str()))
        .map(str::to_string)
}

pub(super) async fn handle(
    shared: &Shared,
    caller: &Caller,
    parts: hyper::http::request::Parts,
    body: Bytes,
) -> Response<Full<Bytes>> {
    if let Some(name) = resource(&body) {
        let denied = shared
            .denials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|d| d.covers(&caller.service, &name));
        if denied {
            let message = format!(
                "User: arn:aws:sts::123456789012:assumed-role/hangar/{} is not authorized to \
                 perform: {}:{} on resource: {name} because no identity-based policy allows it",
                caller.access_key_id, caller.service, caller.action
            );
            return faults::aws_error(caller.wire(), 400, "AccessDeniedException", &message);
        }
    }
    shared.pass(parts, body).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_denied_path_covers_what_is_under_it_and_reads_of_the_path_itself() {
        let d = Denial {
            service: "ssm".into(),
            resource: "/prod/web/".into(),
        };
        assert!(d.covers("ssm", "/prod/web/DB_PASSWORD"));
        assert!(d.covers("ssm", "/prod/web/"));
        assert!(d.covers("ssm", "/prod/"), "a read of a path above it");
        assert!(!d.covers("ssm", "/prod/api/KEY"));
        assert!(!d.covers("secretsmanager", "/prod/web/DB_PASSWORD"));
        let one = Denial {
            service: "secretsmanager".into(),
            resource: "prod/stripe".into(),
        };
        assert!(one.covers("secretsmanager", "prod/stripe"));
        assert!(!one.covers("secretsmanager", "prod/stripe-2"));
        assert_eq!(
            resource(br#"{"Path":"/a/","Recursive":true}"#).as_deref(),
            Some("/a/")
        );
    }
}
