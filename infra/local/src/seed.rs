//! Seeds a fresh emulated account the way a real one looks before hangar
//! arrives: a VPC with two subnets in two AZs, a security group, a launch
//! template, an ALB with an HTTP listener forwarding to an instance target
//! group, and an S3 bucket holding a first release.

use std::time::Duration;

use aws_sdk_ec2::types::{InstanceType, IpPermission, IpRange, RequestLaunchTemplateData};
use aws_sdk_elasticloadbalancingv2::types::{
    Action, ActionTypeEnum, LoadBalancerTypeEnum, Matcher, ProtocolEnum, TargetGroupAttribute,
    TargetTypeEnum,
};
use serde::{Deserialize, Serialize};

use crate::artifact::{self, Artifact, ArtifactError, ReleaseKind};
use crate::aws::{error_chain, Clients};
use crate::slot::Slot;

/// Any AMI id: moto does not check them against a catalogue.
pub const AMI: &str = "ami-0a1b2c3d4e5f60718";

/// An image whose machines boot and take SSH, runbooks and releases like
/// any other, but whose app never answers healthy: every HTTP answer of a
/// Python server on such a `lite` node is a 503 (see
/// [`crate::node::NodeConfig::unhealthy_app`]). A launch template version
/// naming it is a "patched AMI" that broke the app — what an instance
/// refresh must halt on, not roll through. `debian` nodes ignore it.
pub const UNHEALTHY_AMI: &str = "ami-0badbadbadbadbad0";

/// Where release tarballs live in the bucket.
pub const RELEASE_PREFIX: &str = "releases";
/// The DynamoDB table two operators share a lease (and their memory of
/// decisions) in: `hangar run --lease dynamodb:hangar-lease`. Keyed as
/// `infra/dynamodb/` documents (`pk`, `sk`, both strings, on demand).
pub const LEASE_TABLE: &str = "hangar-lease";

#[derive(Clone, Debug)]
pub struct SeedOptions {
    pub slot: Slot,
    pub region: String,
    /// Names the launch template, ALB and target group (the spec's cluster name).
    pub name: String,
    pub bucket: String,
    /// The target group's `deregistration_delay.timeout_seconds`: how long
    /// the LB lets a deregistered target finish its requests.
    pub deregistration_delay: Duration,
    /// Id of the release uploaded at seeding.
    pub first_release: String,
    /// The VPC and its two subnets: the slot's loopback range for `lite`
    /// nodes, its [`crate::slot::BridgedVpc`] for `debian` nodes
    /// ([`SeedOptions::bridged`]).
    pub vpc_cidr: String,
    pub subnet_cidrs: [String; 2],
}

impl SeedOptions {
    pub fn new(slot: Slot) -> SeedOptions {
        SeedOptions {
            slot,
            region: crate::aws::REGION.to_string(),
            name: "web".into(),
            bucket: "hangar-local-releases".into(),
            deregistration_delay: Duration::from_secs(20),
            first_release: "v1".into(),
            vpc_cidr: slot.vpc_cidr(),
            subnet_cidrs: slot.subnet_cidrs(),
        }
    }

    /// Addresses for `debian` nodes: the slot's 198.18.0.0/15 share.
    pub fn bridged(mut self) -> SeedOptions {
        let vpc = self.slot.bridged();
        self.vpc_cidr = vpc.cidr();
        self.subnet_cidrs = vpc.subnet_cidrs();
        self
    }
}

/// What seeding created: everything a spec and the data plane refer to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seeded {
    pub region: String,
    pub vpc_id: String,
    pub vpc_cidr: String,
    /// In AZ order (`<region>a`, `<region>b`).
    pub subnet_ids: Vec<String>,
    pub availability_zones: Vec<String>,
    pub security_group_id: String,
    pub launch_template_id: String,
    pub launch_template_name: String,
    pub load_balancer_arn: String,
    pub target_group_arn: String,
    pub listener_arn: String,
    /// Port targets are registered on by default (the app port).
    pub target_port: u16,
    pub health_check_path: String,
    pub deregistration_delay_secs: u64,
    pub bucket: String,
    /// The release uploaded at seeding (`v1`).
    pub release: Artifact,
    /// The lease table ([`LEASE_TABLE`]).
    #[serde(default)]
    pub lease_table: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("seeding: {step}: {message}")]
    Api { step: &'static str, message: String },
    #[error("seeding: {step}: the response lacks {what}")]
    Missing {
        step: &'static str,
        what: &'static str,
    },
    #[error("seeding: {0}")]
    Artifact(#[from] ArtifactError),
}

fn api<E: std::error::Error + 'static>(step: &'static str) -> impl FnOnce(E) -> SeedError {
    move |e| SeedError::Api {
        step,
        message: error_chain(&e),
    }
}

fn missing(step: &'static str, what: &'static str) -> SeedError {
    SeedError::Missing { step, what }
}

/// Creates the account's resources. Not idempotent (moto's `ClientToken`
/// is not either): call it once on a fresh moto.
pub async fn seed(clients: &Clients, options: &SeedOptions) -> Result<Seeded, SeedError> {
    let ec2 = &clients.ec2;
    let elb = &clients.elb;

    let vpc_id = ec2
        .create_vpc()
        .cidr_block(&options.vpc_cidr)
        .send()
        .await
        .map_err(api("create VPC"))?
        .vpc
        .and_then(|v| v.vpc_id)
        .ok_or_else(|| missing("create VPC", "a VPC id"))?;

    let azs: Vec<String> = ["a", "b"]
        .iter()
        .map(|s| format!("{}{s}", options.region))
        .collect();
    let mut subnet_ids = Vec::new();
    for (cidr, az) in options.subnet_cidrs.iter().zip(&azs) {
        let id = ec2
            .create_subnet()
            .vpc_id(&vpc_id)
            .cidr_block(cidr)
            .availability_zone(az)
            .send()
            .await
            .map_err(api("create subnet"))?
            .subnet
            .and_then(|s| s.subnet_id)
            .ok_or_else(|| missing("create subnet", "a subnet id"))?;
        subnet_ids.push(id);
    }

    let security_group_id = ec2
        .create_security_group()
        .group_name(format!("{}-nodes", options.name))
        .description("hangar local cloud nodes: SSH and HTTP from the VPC")
        .vpc_id(&vpc_id)
        .send()
        .await
        .map_err(api("create security group"))?
        .group_id
        .ok_or_else(|| missing("create security group", "a group id"))?;
    let rule = |port: i32| {
        IpPermission::builder()
            .ip_protocol("tcp")
            .from_port(port)
            .to_port(port)
            .ip_ranges(IpRange::builder().cidr_ip(&options.vpc_cidr).build())
            .build()
    };
    ec2.authorize_security_group_ingress()
        .group_id(&security_group_id)
        .ip_permissions(rule(22))
        .ip_permissions(rule(80))
        .send()
        .await
        .map_err(api("authorize security group ingress"))?;

    let launch_template_name = options.name.clone();
    let launch_template_id = ec2
        .create_launch_template()
        .launch_template_name(&launch_template_name)
        .launch_template_data(
            RequestLaunchTemplateData::builder()
                .image_id(AMI)
                .instance_type(InstanceType::T3Micro)
                .security_group_ids(&security_group_id)
                .build(),
        )
        .send()
        .await
        .map_err(api("create launch template"))?
        .launch_template
        .and_then(|t| t.launch_template_id)
        .ok_or_else(|| missing("create launch template", "a template id"))?;

    let load_balancer_arn = elb
        .create_load_balancer()
        .name(&options.name)
        .r#type(LoadBalancerTypeEnum::Application)
        .set_subnets(Some(subnet_ids.clone()))
        .security_groups(&security_group_id)
        .send()
        .await
        .map_err(api("create load balancer"))?
        .load_balancers()
        .first()
        .and_then(|lb| lb.load_balancer_arn())
        .map(str::to_string)
        .ok_or_else(|| missing("create load balancer", "a load balancer ARN"))?;

    let target_port = 80;
    let health_check_path = "/health".to_string();
    let target_group_arn = elb
        .create_target_group()
        .name(&options.name)
        .protocol(ProtocolEnum::Http)
        .port(i32::from(target_port))
        .vpc_id(&vpc_id)
        .target_type(TargetTypeEnum::Instance)
        .health_check_protocol(ProtocolEnum::Http)
        .health_check_path(&health_check_path)
        .health_check_interval_seconds(5)
        .health_check_timeout_seconds(2)
        .healthy_threshold_count(2)
        .unhealthy_threshold_count(2)
        .matcher(Matcher::builder().http_code("200-399").build())
        .send()
        .await
        .map_err(api("create target group"))?
        .target_groups()
        .first()
        .and_then(|tg| tg.target_group_arn())
        .map(str::to_string)
        .ok_or_else(|| missing("create target group", "a target group ARN"))?;

    let delay = options.deregistration_delay.as_secs();
    elb.modify_target_group_attributes()
        .target_group_arn(&target_group_arn)
        .attributes(
            TargetGroupAttribute::builder()
                .key("deregistration_delay.timeout_seconds")
                .value(delay.to_string())
                .build(),
        )
        .send()
        .await
        .map_err(api("set the deregistration delay"))?;

    let listener_arn = elb
        .create_listener()
        .load_balancer_arn(&load_balancer_arn)
        .protocol(ProtocolEnum::Http)
        .port(80)
        .default_actions(
            Action::builder()
                .r#type(ActionTypeEnum::Forward)
                .target_group_arn(&target_group_arn)
                .build(),
        )
        .send()
        .await
        .map_err(api("create listener"))?
        .listeners()
        .first()
        .and_then(|l| l.listener_arn())
        .map(str::to_string)
        .ok_or_else(|| missing("create listener", "a listener ARN"))?;

    clients
        .s3
        .create_bucket()
        .bucket(&options.bucket)
        .send()
        .await
        .map_err(api("create bucket"))?;
    let release = artifact::upload(
        &clients.s3,
        &options.bucket,
        RELEASE_PREFIX,
        &options.first_release,
        ReleaseKind::Good,
    )
    .await?;
    create_lease_table(&clients.dynamodb, LEASE_TABLE).await?;

    Ok(Seeded {
        region: options.region.clone(),
        vpc_id,
        vpc_cidr: options.vpc_cidr.clone(),
        subnet_ids,
        availability_zones: azs,
        security_group_id,
        launch_template_id,
        launch_template_name,
        load_balancer_arn,
        target_group_arn,
        listener_arn,
        target_port,
        health_check_path,
        deregistration_delay_secs: delay,
        bucket: options.bucket.clone(),
        release,
        lease_table: LEASE_TABLE.to_string(),
    })
}

/// The lease table as `infra/dynamodb/` has users create it: partition key
/// `pk` and sort key `sk` (strings), billed per request.
pub async fn create_lease_table(
    dynamodb: &aws_sdk_dynamodb::Client,
    name: &str,
) -> Result<(), SeedError> {
    use aws_sdk_dynamodb::types::{
        AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    };
    let attr = |n: &str| {
        AttributeDefinition::builder()
            .attribute_name(n)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .map_err(api("create lease table"))
    };
    let key = |n: &str, t: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(n)
            .key_type(t)
            .build()
            .map_err(api("create lease table"))
    };
    dynamodb
        .create_table()
        .table_name(name)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attr("pk")?)
        .attribute_definitions(attr("sk")?)
        .key_schema(key("pk", KeyType::Hash)?)
        .key_schema(key("sk", KeyType::Range)?)
        .send()
        .await
        .map_err(api("create lease table"))?;
    Ok(())
}

impl Seeded {
    /// Builds release `id` of `kind` and uploads it next to the first one.
    pub async fn upload_release(
        &self,
        clients: &Clients,
        id: &str,
        kind: ReleaseKind,
    ) -> Result<Artifact, ArtifactError> {
        artifact::upload(&clients.s3, &self.bucket, RELEASE_PREFIX, id, kind).await
    }

    /// `app/<name>/<id>`: the ALB's CloudWatch `LoadBalancer` dimension.
    pub fn load_balancer_dimension(&self) -> Option<String> {
        arn_resource(&self.load_balancer_arn)?
            .strip_prefix("loadbalancer/")
            .map(str::to_string)
    }

    /// `targetgroup/<name>/<id>`: the `TargetGroup` dimension.
    pub fn target_group_dimension(&self) -> Option<String> {
        arn_resource(&self.target_group_arn)
            .filter(|r| r.starts_with("targetgroup/"))
            .map(str::to_string)
    }
}

/// The resource part of an ARN (after the fifth `:`).
fn arn_resource(arn: &str) -> Option<&str> {
    let mut parts = arn.splitn(6, ':');
    (parts.next()? == "arn").then_some(())?;
    parts.nth(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dimensions_come_from_the_arns() {
        let seeded = Seeded {
            region: "us-east-1".into(),
            vpc_id: String::new(),
            vpc_cidr: String::new(),
            subnet_ids: vec![],
            availability_zones: vec![],
            security_group_id: String::new(),
            launch_template_id: String::new(),
            launch_template_name: String::new(),
            load_balancer_arn:
                "arn:aws:elasticloadbalancing:us-east-1:123456789012:loadbalancer/app/web/50dc6c495c0c9188"
                    .into(),
            target_group_arn:
                "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web/73e2d6bc24d8a067"
                    .into(),
            listener_arn: String::new(),
            target_port: 80,
            health_check_path: "/health".into(),
            deregistration_delay_secs: 20,
            bucket: String::new(),
            release: Artifact {
                id: "v1".into(),
                url: String::new(),
                sha256: String::new(),
                kind: ReleaseKind::Good,
            },
            lease_table: LEASE_TABLE.into(),
        };
        assert_eq!(
            seeded.load_balancer_dimension().as_deref(),
            Some("app/web/50dc6c495c0c9188")
        );
        assert_eq!(
            seeded.target_group_dimension().as_deref(),
            Some("targetgroup/web/73e2d6bc24d8a067")
        );
    }
}
