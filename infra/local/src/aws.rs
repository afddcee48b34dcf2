//! SDK clients for the emulated account: the same `aws-sdk-*` crates hangar
//! uses, pointed at moto.

use std::time::Duration;

use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};

/// The region every local cloud lives in.
pub const REGION: &str = "us-east-1";

/// Credentials moto accepts (any value does; these name who is calling).
pub const ACCESS_KEY_ID: &str = "hangar-local";
pub const SECRET_ACCESS_KEY: &str = "hangar-local";

/// The key the test harness's own clients sign with: its calls get their
/// own token buckets and counters, apart from hangar's ([`ACCESS_KEY_ID`]).
pub const HARNESS_ACCESS_KEY_ID: &str = "hangar-local-harness";

/// moto answers in milliseconds; anything slower than this is a hung emulator.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

/// The services the local cloud touches.
#[derive(Clone, Debug)]
pub struct Clients {
    pub sdk: SdkConfig,
    pub ec2: aws_sdk_ec2::Client,
    pub elb: aws_sdk_elasticloadbalancingv2::Client,
    pub cloudwatch: aws_sdk_cloudwatch::Client,
    pub s3: aws_sdk_s3::Client,
    pub dynamodb: aws_sdk_dynamodb::Client,
}

impl Clients {
    /// Clients for moto at `endpoint` (`http://127.0.0.1:PORT`). Nothing
    /// from the host's environment or `~/.aws` is read, so a developer's
    /// real AWS profile can never leak into the emulator (or the reverse).
    pub async fn connect(endpoint: &str, region: &str) -> Clients {
        Clients::connect_as(endpoint, region, ACCESS_KEY_ID).await
    }

    /// Clients signing with `access_key_id` (the gateway counts, throttles
    /// and blocks per key).
    pub async fn connect_as(endpoint: &str, region: &str, access_key_id: &str) -> Clients {
        let sdk = sdk_config_as(endpoint, region, access_key_id).await;
        Clients::from_sdk(sdk)
    }

    pub fn from_sdk(sdk: SdkConfig) -> Clients {
        let s3 = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&sdk)
                // `bucket.127.0.0.1` cannot resolve: address buckets by path.
                .force_path_style(true)
                .build(),
        );
        Clients {
            ec2: aws_sdk_ec2::Client::new(&sdk),
            elb: aws_sdk_elasticloadbalancingv2::Client::new(&sdk),
            cloudwatch: aws_sdk_cloudwatch::Client::new(&sdk),
            dynamodb: aws_sdk_dynamodb::Client::new(&sdk),
            s3,
            sdk,
        }
    }
}

/// An `SdkConfig` for moto at `endpoint`, independent of the host's environment.
pub async fn sdk_config(endpoint: &str, region: &str) -> SdkConfig {
    sdk_config_as(endpoint, region, ACCESS_KEY_ID).await
}

/// [`sdk_config`] signing with `access_key_id`.
pub async fn sdk_config_as(endpoint: &str, region: &str, access_key_id: &str) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .empty_test_environment()
        .region(Region::new(region.to_string()))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            access_key_id,
            SECRET_ACCESS_KEY,
            None,
            None,
            "hangar-local",
        ))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_timeout(OPERATION_TIMEOUT)
                .build(),
        )
        .load()
        .await
}

/// The environment a process (`hangar run`, the AWS CLI) needs to talk to
/// this emulator, as `(name, value)` pairs.
pub fn process_env(endpoint: &str, region: &str) -> Vec<(String, String)> {
    process_env_as(endpoint, region, ACCESS_KEY_ID)
}

/// [`process_env`] with another access key id (a second operator).
pub fn process_env_as(endpoint: &str, region: &str, access_key_id: &str) -> Vec<(String, String)> {
    [
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_REGION", region),
        ("AWS_DEFAULT_REGION", region),
        ("AWS_ACCESS_KEY_ID", access_key_id),
        ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY),
        // No instance metadata service on a laptop: skip the 1 s probe.
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// `Display` for an SDK error with its whole source chain (the SDK's own
/// `Display` says only "service error").
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
