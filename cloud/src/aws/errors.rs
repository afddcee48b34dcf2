//! Turning SDK errors into [`CloudError`], keeping AWS's error code.
//!
//! By the time an error reaches us the SDK has already retried what it
//! considers transient (throttling, 5xx, timeouts); what is left is mapped
//! by code so the operator can decide: `NotFound` (the thing is gone),
//! `InvalidInput` (our request or the spec is wrong), `Throttled` (retries
//! ran out), `Transport` (below the API), else `Service`.

use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::display::DisplayErrorContext;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use crate::error::CloudError;

/// Codes AWS uses for rate limiting (the SDK's own list, plus EC2's).
const THROTTLING_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "RequestThrottled",
    "SlowDown",
    "EC2ThrottledException",
    "BandwidthLimitExceeded",
    "PriorRequestNotComplete",
];

/// Codes meaning "your request is wrong", beyond the `*.Malformed` family.
const INVALID_INPUT_CODES: &[&str] = &[
    "ValidationError",
    "ValidationException",
    "InvalidParameter",
    "InvalidParameterValue",
    "InvalidParameterValueException",
    "InvalidParameterCombination",
    "InvalidParameterCombinationException",
    "MissingParameter",
    "MissingParameterValueException",
    "InvalidInput",
    "InvalidRequest",
    "InvalidArgument",
    "InvalidTarget",
    "InvalidConfigurationRequest",
    "InvalidNextToken",
    "InvalidBucketName",
    "InvalidInstanceType",
    "InvalidClientToken",
    "IdempotentParameterMismatch",
    "TargetNotRunning",
    "InvalidLaunchTemplateId.VersionNotFound",
];

/// Codes meaning "that does not exist", beyond the `*NotFound*` family.
const NOT_FOUND_CODES: &[&str] = &["NoSuchKey", "NoSuchBucket", "ResourceNotFound"];

/// Codes meaning "your role may not": IAM's and KMS's (a SecureString or
/// secret whose key the role cannot use). EC2's `UnauthorizedOperation`
/// stays a plain service error, as it always was for the EC2 paths.
const ACCESS_DENIED_CODES: &[&str] = &[
    "AccessDenied",
    "AccessDeniedException",
    "KMSAccessDeniedException",
];

/// Maps one SDK error. `what` names the thing the call was about
/// (`instance i-…`, `target group arn:…`) for `NotFound` messages.
pub(crate) fn from_sdk<E>(
    service: &'static str,
    what: impl FnOnce() -> String,
    err: SdkError<E, HttpResponse>,
) -> CloudError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    // The lease guard refused the attempt before it was sent.
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(e) = source {
        if let Some(r) = e.downcast_ref::<super::fence::Refused>() {
            return CloudError::NotLeader {
                operation: r.operation.clone(),
                reason: r.reason.0.clone(),
            };
        }
        source = e.source();
    }
    match err {
        SdkError::ServiceError(ctx) => {
            let status = ctx.raw().status().as_u16();
            let e = ctx.err();
            let message = e
                .message()
                .map(str::to_string)
                .unwrap_or_else(|| DisplayErrorContext(e).to_string());
            let code = e
                .code()
                .map(str::to_string)
                .unwrap_or_else(|| format!("HTTP{status}"));
            classify(service, code, message, status, what)
        }
        SdkError::ConstructionFailure(_) => CloudError::InvalidInput {
            code: None,
            message: format!(
                "{service} request could not be built: {}",
                DisplayErrorContext(&err)
            ),
        },
        SdkError::TimeoutError(_) => CloudError::Transport {
            service,
            message: format!("timed out: {}", DisplayErrorContext(&err)),
        },
        SdkError::DispatchFailure(_) => CloudError::Transport {
            service,
            message: DisplayErrorContext(&err).to_string(),
        },
        SdkError::ResponseError(_) => CloudError::Transport {
            service,
            message: format!("unreadable response: {}", DisplayErrorContext(&err)),
        },
        _ => CloudError::Transport {
            service,
            message: DisplayErrorContext(&err).to_string(),
        },
    }
}

/// The decision table, separate so it can be tested without an SDK error.
pub(crate) fn classify(
    service: &'static str,
    code: String,
    message: String,
    status: u16,
    what: impl FnOnce() -> String,
) -> CloudError {
    if THROTTLING_CODES.contains(&code.as_str()) {
        CloudError::Throttled {
            service,
            code,
            message,
        }
    } else if ACCESS_DENIED_CODES.contains(&code.as_str()) {
        CloudError::AccessDenied {
            what: what(),
            code,
            message,
        }
    } else if is_not_found(&code) || (status == 404 && code == "HTTP404") {
        CloudError::NotFound {
            what: what(),
            code: Some(code),
        }
    } else if INVALID_INPUT_CODES.contains(&code.as_str()) || code.ends_with(".Malformed") {
        CloudError::InvalidInput {
            code: Some(code),
            message,
        }
    } else {
        CloudError::Service {
            service,
            code,
            message,
        }
    }
}

fn is_not_found(code: &str) -> bool {
    NOT_FOUND_CODES.contains(&code)
        || code.ends_with(".NotFound")
        || code.ends_with("NotFound")
        || code.ends_with("NotFoundException")
        || code.ends_with(".NotFoundException")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(code: &str, status: u16) -> (&'static str, Option<String>) {
        let e = classify("ec2", code.into(), "msg".into(), status, || "thing".into());
        (e.kind(), e.code().map(str::to_string))
    }

    #[test]
    fn codes_map_to_kinds_and_are_preserved() {
        let cases = [
            ("RequestLimitExceeded", 503, "throttled"),
            ("Throttling", 400, "throttled"),
            ("ThrottlingException", 400, "throttled"),
            ("SlowDown", 503, "throttled"),
            ("InvalidInstanceID.NotFound", 400, "not_found"),
            (
                "InvalidLaunchTemplateName.NotFoundException",
                400,
                "not_found",
            ),
            ("InvalidSubnetID.NotFound", 400, "not_found"),
            ("TargetGroupNotFound", 400, "not_found"),
            ("LoadBalancerNotFound", 400, "not_found"),
            ("NoSuchKey", 404, "not_found"),
            ("NoSuchBucket", 404, "not_found"),
            ("HTTP404", 404, "not_found"),
            ("ValidationError", 400, "invalid_input"),
            ("InvalidParameterValue", 400, "invalid_input"),
            ("InvalidInstanceID.Malformed", 400, "invalid_input"),
            ("InvalidTarget", 400, "invalid_input"),
            ("UnauthorizedOperation", 403, "service"),
            ("AccessDeniedException", 400, "access_denied"),
            ("ParameterNotFound", 400, "not_found"),
            ("ResourceNotFoundException", 400, "not_found"),
            ("InternalError", 500, "service"),
        ];
        for (code, status, want) in cases {
            let (got, preserved) = kind(code, status);
            assert_eq!(got, want, "{code}");
            assert_eq!(preserved.as_deref(), Some(code), "{code} kept");
        }
    }

    #[test]
    fn server_errors_that_survive_retries_stay_transient() {
        let e = classify("elbv2", "InternalFailure".into(), "x".into(), 500, || {
            "x".into()
        });
        assert!(e.is_transient());
        let e = classify("elbv2", "ValidationError".into(), "x".into(), 400, || {
            "x".into()
        });
        assert!(!e.is_transient());
    }
}
