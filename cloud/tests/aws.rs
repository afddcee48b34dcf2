//! `AwsCloud` against the moto emulator (plus a fault-injecting proxy).
//!
//! One moto server per test binary (starting one costs ~1 s of CPU), one
//! moto *account* per test (`x-moto-account-id`), so tests are isolated
//! and run in parallel. Every test builds its own VPC 127.77.0.0/16 with
//! two subnets, a launch template, an ALB + listener + instance target
//! group and an S3 bucket. moto is stopped by PID when the binary exits
//! (parent-death signal), whether tests passed, panicked or were killed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_cloudwatch::types::{Dimension, MetricDatum, StandardUnit};
use aws_sdk_ec2::types::{
    Filter, InstanceType, LaunchTemplateSpecification, RequestLaunchTemplateData, ResourceType,
    Tag, TagSpecification,
};
use aws_sdk_elasticloadbalancingv2::types::{
    Action, ActionTypeEnum, LoadBalancerTypeEnum, ProtocolEnum, TargetDescription,
    TargetGroupAttribute, TargetTypeEnum,
};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextMut;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;
use chrono::{DateTime, TimeZone, Utc};
use hangar_cloud::{
    AlbMetric, Artifacts, AwsCloud, Budgets, CloudError, Compute, InstanceState, LaunchRequest,
    LoadBalancer, Metrics, Phase, RetryPolicy, TargetState,
};
use hangar_crds::ArtifactSource;
use hangar_local::faults::{Fault, FaultProxy, Rule, Service};
use hangar_local::moto::Moto;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OWNER: &str = "hangar-test";

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

fn moto() -> &'static Moto {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    MOTO.get_or_init(|| Moto::start().unwrap_or_else(|e| panic!("starting moto: {e}")))
}

/// A fresh moto account id per test.
fn next_account() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(100_000_000_001);
    NEXT.fetch_add(1, Ordering::Relaxed).to_string()
}

/// Sends every request to one moto account.
#[derive(Debug)]
struct MotoAccount(String);

impl Intercept for MotoAccount {
    fn name(&self) -> &'static str {
        "MotoAccount"
    }

    fn modify_before_signing(
        &self,
        ctx: &mut BeforeTransmitInterceptorContextMut<'_>,
        _rc: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        ctx.request_mut()
            .headers_mut()
            .insert("x-moto-account-id", self.0.clone());
        Ok(())
    }
}

/// Records the body of every request of one operation (form-encoded query
/// protocols are readable as text).
#[derive(Debug, Clone, Default)]
struct Recorder {
    operation: &'static str,
    bodies: Arc<Mutex<Vec<String>>>,
}

impl Intercept for Recorder {
    fn name(&self) -> &'static str {
        "Recorder"
    }

    fn modify_before_signing(
        &self,
        ctx: &mut BeforeTransmitInterceptorContextMut<'_>,
        _rc: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if cfg.load::<Metadata>().map(|m| m.name()) == Some(self.operation) {
            let body = ctx.request().body().bytes().unwrap_or_default();
            self.bodies
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(body).into_owned());
        }
        Ok(())
    }
}

async fn sdk_config(endpoint: &str) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .empty_test_environment()
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "AKIDHANGARTEST",
            "secret",
            None,
            None,
            "hangar-tests",
        ))
        .load()
        .await
}

/// Quick retries so fault tests take milliseconds.
fn fast_retries() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 4,
        throttling_backoff: Duration::from_millis(5),
        transient_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(50),
        attempt_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(2),
    }
}

/// One test's private world inside moto.
struct World {
    account: String,
    sdk: SdkConfig,
    ec2: aws_sdk_ec2::Client,
    elb: aws_sdk_elasticloadbalancingv2::Client,
    cw: aws_sdk_cloudwatch::Client,
    s3: aws_sdk_s3::Client,
    subnet: String,
    subnet_b: String,
    template_id: String,
    template_name: String,
    lb_arn: String,
    tg_arn: String,
    bucket: String,
    cache: tempfile::TempDir,
}

impl World {
    async fn new() -> World {
        let account = next_account();
        let sdk = sdk_config(moto().endpoint()).await;
        let header = || MotoAccount(account.clone());
        let ec2 = aws_sdk_ec2::Client::from_conf(
            aws_sdk_ec2::config::Builder::from(&sdk)
                .interceptor(header())
                .build(),
        );
        let elb = aws_sdk_elasticloadbalancingv2::Client::from_conf(
            aws_sdk_elasticloadbalancingv2::config::Builder::from(&sdk)
                .interceptor(header())
                .build(),
        );
        let cw = aws_sdk_cloudwatch::Client::from_conf(
            aws_sdk_cloudwatch::config::Builder::from(&sdk)
                .interceptor(header())
                .build(),
        );
        let s3 = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&sdk)
                .force_path_style(true)
                .interceptor(header())
                .build(),
        );

        let vpc = ec2
            .create_vpc()
            .cidr_block("127.77.0.0/16")
            .send()
            .await
            .expect("create vpc")
            .vpc
            .and_then(|v| v.vpc_id)
            .expect("vpc id");
        let subnet = |cidr: &'static str, az: &'static str| {
            let ec2 = ec2.clone();
            let vpc = vpc.clone();
            async move {
                ec2.create_subnet()
                    .vpc_id(vpc)
                    .cidr_block(cidr)
                    .availability_zone(az)
                    .send()
                    .await
                    .expect("create subnet")
                    .subnet
                    .and_then(|s| s.subnet_id)
                    .expect("subnet id")
            }
        };
        let subnet_a = subnet("127.77.1.0/24", "us-east-1a").await;
        let subnet_b = subnet("127.77.2.0/24", "us-east-1b").await;
        let template_name = "web".to_string();
        let template_id = ec2
            .create_launch_template()
            .launch_template_name(&template_name)
            .launch_template_data(
                RequestLaunchTemplateData::builder()
                    .image_id("ami-12345678")
                    .instance_type(InstanceType::T3Micro)
                    .build(),
            )
            .send()
            .await
            .expect("create launch template")
            .launch_template
            .and_then(|t| t.launch_template_id)
            .expect("template id");
        let lb_arn = elb
            .create_load_balancer()
            .name("web")
            .r#type(LoadBalancerTypeEnum::Application)
            .subnets(&subnet_a)
            .subnets(&subnet_b)
            .send()
            .await
            .expect("create load balancer")
            .load_balancers()[0]
            .load_balancer_arn()
            .expect("lb arn")
            .to_string();
        let tg_arn = elb
            .create_target_group()
            .name("web")
            .protocol(ProtocolEnum::Http)
            .port(80)
            .vpc_id(&vpc)
            .target_type(TargetTypeEnum::Instance)
            .send()
            .await
            .expect("create target group")
            .target_groups()[0]
            .target_group_arn()
            .expect("tg arn")
            .to_string();
        elb.create_listener()
            .load_balancer_arn(&lb_arn)
            .protocol(ProtocolEnum::Http)
            .port(80)
            .default_actions(
                Action::builder()
                    .r#type(ActionTypeEnum::Forward)
                    .target_group_arn(&tg_arn)
                    .build(),
            )
            .send()
            .await
            .expect("create listener");
        let bucket = format!("hangar-releases-{account}");
        s3.create_bucket()
            .bucket(&bucket)
            .send()
            .await
            .expect("create bucket");

        World {
            account,
            sdk,
            ec2,
            elb,
            cw,
            s3,
            subnet: subnet_a,
            subnet_b,
            template_id,
            template_name,
            lb_arn,
            tg_arn,
            bucket,
            cache: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn builder(&self, owner: &str, sdk: &SdkConfig) -> hangar_cloud::AwsCloudBuilder {
        AwsCloud::builder(sdk, owner, self.cache.path().join(owner))
            .retry(fast_retries())
            .interceptor(MotoAccount(self.account.clone()))
    }

    /// hangar's cloud as `owner`, talking to moto directly.
    fn cloud(&self, owner: &str) -> AwsCloud {
        self.builder(owner, &self.sdk).build().expect("AwsCloud")
    }

    /// hangar's cloud through a fault-injecting proxy in front of moto.
    async fn cloud_via(&self, proxy: &FaultProxy, retry: RetryPolicy) -> AwsCloud {
        let sdk = sdk_config(&proxy.endpoint()).await;
        self.builder(OWNER, &sdk)
            .retry(retry)
            .build()
            .expect("AwsCloud via proxy")
    }

    fn launch_request(&self, cluster: &str, count: u32, token: &str) -> LaunchRequest {
        LaunchRequest {
            cluster: cluster.into(),
            release: "r1".into(),
            count,
            launch_template: self.template_id.clone(),
            launch_template_version: "$Default".into(),
            instance_type: None,
            subnet: self.subnet.clone(),
            extra_tags: BTreeMap::new(),
            client_token: token.into(),
            launch_settings: String::new(),
        }
    }

    /// An instance hangar did not launch: no hangar tags at all.
    async fn foreign_instance(&self) -> String {
        self.ec2
            .run_instances()
            .launch_template(
                LaunchTemplateSpecification::builder()
                    .launch_template_id(&self.template_id)
                    .build(),
            )
            .subnet_id(&self.subnet)
            .min_count(1)
            .max_count(1)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .tags(Tag::builder().key("Name").value("legacy-box").build())
                    .build(),
            )
            .send()
            .await
            .expect("launch foreign instance")
            .instances()[0]
            .instance_id()
            .expect("id")
            .to_string()
    }

    /// EC2 state and tags of one instance, as moto has them.
    async fn describe(&self, id: &str) -> (String, BTreeMap<String, String>) {
        let out = self
            .ec2
            .describe_instances()
            .instance_ids(id)
            .send()
            .await
            .expect("describe");
        let i = &out.reservations()[0].instances()[0];
        let state = i
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_string())
            .unwrap_or_default();
        let tags = i
            .tags()
            .iter()
            .map(|t| {
                (
                    t.key().unwrap_or_default().to_string(),
                    t.value().unwrap_or_default().to_string(),
                )
            })
            .collect();
        (state, tags)
    }

    async fn registered(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .elb
            .describe_target_health()
            .target_group_arn(&self.tg_arn)
            .send()
            .await
            .expect("describe target health")
            .target_health_descriptions()
            .iter()
            .filter_map(|d| d.target().and_then(|t| t.id()).map(str::to_string))
            .collect();
        ids.sort();
        ids
    }
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn ids(instances: &[hangar_cloud::Instance]) -> Vec<String> {
    sorted(instances.iter().map(|i| i.id.clone()).collect())
}

#[track_caller]
fn assert_not_owned(result: Result<(), CloudError>, foreign: &str) {
    match result {
        Err(CloudError::NotOwned { resource, owner }) => {
            assert!(resource.contains(foreign), "{resource} names {foreign}");
            assert_eq!(owner, OWNER);
        }
        other => panic!("expected NotOwned for {foreign}, got {other:?}"),
    }
}

#[track_caller]
fn assert_not_found<T: std::fmt::Debug>(result: Result<T, CloudError>, code: Option<&str>) {
    match result {
        Err(CloudError::NotFound { code: got, .. }) => assert_eq!(got.as_deref(), code),
        other => panic!("expected NotFound({code:?}), got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Compute
// ---------------------------------------------------------------------------

/// The SDK crates are built with default features off (no legacy
/// hyper 0.14 / rustls 0.21 stack): a client built from the standard
/// configuration chain, with no HTTP client of hangar's own, must still
/// find the one the `default-https-client` feature provides, and real
/// requests go out on it.
#[tokio::test]
async fn with_default_features_off_the_sdk_has_its_http_client_and_calls_go_out() {
    let sdk = sdk_config(moto().endpoint()).await;
    let ec2 = aws_sdk_ec2::Client::new(&sdk);
    let regions = ec2
        .describe_regions()
        .send()
        .await
        .expect("a real request to moto");
    assert!(!regions.regions().is_empty());
}

#[tokio::test]
async fn launch_tags_instances_and_volumes_atomically_and_list_finds_them() {
    let w = World::new().await;
    let recorder = Recorder {
        operation: "RunInstances",
        ..Recorder::default()
    };
    let cloud = w
        .builder(OWNER, &w.sdk)
        .interceptor(recorder.clone())
        .build()
        .unwrap();
    let other_owner = w.cloud("someone-else");

    let web = cloud
        .launch(&w.launch_request("web", 2, "web-r1-0001"))
        .await
        .expect("launch by template id");
    assert_eq!(web.len(), 2);
    for i in &web {
        assert_eq!(i.cluster, "web");
        assert_eq!(i.phase, Some(Phase::Launching));
        assert_eq!(i.release.as_deref(), Some("r1"));
        assert_eq!(i.subnet_id.as_deref(), Some(w.subnet.as_str()));
        let ip = i.private_ip.expect("private ip").to_string();
        assert!(ip.starts_with("127.77.1."), "{ip}");
    }

    let mut api_req = w.launch_request("api", 1, "api-r1-0001");
    api_req.launch_template = w.template_name.clone();
    api_req.launch_template_version = "1".into();
    api_req.instance_type = Some("t3.small".into());
    api_req.subnet = w.subnet_b.clone();
    api_req.extra_tags = BTreeMap::from([("team".into(), "payments".into())]);
    let api = cloud
        .launch(&api_req)
        .await
        .expect("launch by template name");
    assert_eq!(api.len(), 1);

    let foreign = w.foreign_instance().await;
    let theirs = other_owner
        .launch(&w.launch_request("web", 1, "other-0001"))
        .await
        .expect("other owner launches");

    // What EC2 has: hangar's tags on the instances and on their volumes.
    let (state, tags) = w.describe(&api[0].id).await;
    assert_eq!(state, "running");
    assert_eq!(tags["hangar:cluster"], "api");
    assert_eq!(tags["hangar:owner"], OWNER);
    assert_eq!(tags["hangar:phase"], "launching");
    assert_eq!(tags["hangar:release"], "r1");
    assert_eq!(tags["team"], "payments");
    let described = w
        .ec2
        .describe_instances()
        .instance_ids(&api[0].id)
        .send()
        .await
        .unwrap();
    assert_eq!(
        described.reservations()[0].instances()[0]
            .instance_type()
            .map(|t| t.as_str()),
        Some("t3.small")
    );
    let volumes = w
        .ec2
        .describe_volumes()
        .filters(
            Filter::builder()
                .name("attachment.instance-id")
                .values(&web[0].id)
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert!(!volumes.volumes().is_empty(), "instance has a volume");
    for v in volumes.volumes() {
        let vt: BTreeMap<_, _> = v
            .tags()
            .iter()
            .map(|t| (t.key().unwrap_or_default(), t.value().unwrap_or_default()))
            .collect();
        assert_eq!(vt.get("hangar:owner"), Some(&OWNER));
        assert_eq!(vt.get("hangar:cluster"), Some(&"web"));
    }

    // The request itself: ClientToken and both TagSpecifications.
    let bodies = recorder.bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 2);
    assert!(
        bodies[0].contains("ClientToken=web-r1-0001"),
        "{}",
        bodies[0]
    );
    assert!(bodies[0].contains("ResourceType=instance"));
    assert!(bodies[0].contains("ResourceType=volume"));

    // list: ours only, per cluster or all, never the foreign or the other owner's.
    let all = cloud.list(None).await.unwrap();
    let mut want = ids(&web);
    want.extend(ids(&api));
    assert_eq!(ids(&all), sorted(want));
    assert!(!all.iter().any(|i| i.id == foreign || i.id == theirs[0].id));
    assert_eq!(ids(&cloud.list(Some("web")).await.unwrap()), ids(&web));
    assert_eq!(cloud.list(Some("nope")).await.unwrap(), vec![]);
    assert_eq!(ids(&other_owner.list(None).await.unwrap()), ids(&theirs));

    // Terminated instances drop out of the listing (moto terminates at once;
    // on AWS they would show as shutting-down first).
    cloud.terminate(&[web[0].id.clone()]).await.unwrap();
    assert_eq!(w.describe(&web[0].id).await.0, "terminated");
    let left = cloud.list(Some("web")).await.unwrap();
    assert_eq!(ids(&left), vec![web[1].id.clone()]);
    assert!(left.iter().all(|i| i.state == InstanceState::Running));

    let calls = cloud.api_calls();
    assert_eq!(calls.get("ec2", "RunInstances").calls, 2);
    assert!(calls.get("ec2", "DescribeInstances").calls >= 4);
    assert_eq!(calls.get("ec2", "RunInstances").retries, 0);
}

#[tokio::test]
async fn launch_errors_are_typed_and_bad_requests_never_reach_ec2() {
    let w = World::new().await;
    let cloud = w.cloud(OWNER);

    let mut bad_subnet = w.launch_request("web", 1, "t-1");
    bad_subnet.subnet = "subnet-0123456789abcdef0".into();
    assert_not_found(
        cloud.launch(&bad_subnet).await,
        Some("InvalidSubnetID.NotFound"),
    );

    let mut bad_template = w.launch_request("web", 1, "t-2");
    bad_template.launch_template = "no-such-template".into();
    assert_not_found(
        cloud.launch(&bad_template).await,
        Some("InvalidLaunchTemplateName.NotFoundException"),
    );
    let before = cloud.api_calls().get("ec2", "RunInstances").calls;
    assert_eq!(before, 2);

    let mut reserved = w.launch_request("web", 1, "t-3");
    reserved
        .extra_tags
        .insert("hangar:owner".into(), "me-too".into());
    let zero = w.launch_request("web", 0, "t-4");
    let no_token = w.launch_request("web", 1, "");
    for req in [reserved, zero, no_token] {
        match cloud.launch(&req).await {
            Err(CloudError::InvalidInput { .. }) => {}
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }
    assert_eq!(
        cloud.api_calls().get("ec2", "RunInstances").calls,
        before,
        "invalid requests are refused before any call"
    );
    assert_eq!(cloud.list(None).await.unwrap(), vec![]);
}

#[tokio::test]
async fn set_phase_and_set_config_touch_only_our_live_instances() {
    let w = World::new().await;
    let cloud = w.cloud(OWNER);
    let other = w.cloud("someone-else");
    let ours = cloud
        .launch(&w.launch_request("web", 2, "tok-1"))
        .await
        .unwrap();
    let theirs = other
        .launch(&w.launch_request("web", 1, "tok-2"))
        .await
        .unwrap();
    let foreign = w.foreign_instance().await;

    cloud
        .set_phase(&ours[0].id, Phase::InService, Some("r2"))
        .await
        .unwrap();
    cloud.set_config(&ours[0].id, "cfg-abc").await.unwrap();
    cloud
        .set_phase(&ours[1].id, Phase::Provisioning, None)
        .await
        .unwrap();
    let listed = cloud.list(Some("web")).await.unwrap();
    let first = listed.iter().find(|i| i.id == ours[0].id).unwrap();
    assert_eq!(first.phase, Some(Phase::InService));
    assert_eq!(first.release.as_deref(), Some("r2"));
    assert_eq!(first.tags["hangar:config"], "cfg-abc");
    let second = listed.iter().find(|i| i.id == ours[1].id).unwrap();
    assert_eq!(second.phase, Some(Phase::Provisioning));
    assert_eq!(second.release.as_deref(), Some("r1"), "release untouched");

    let (_, foreign_before) = w.describe(&foreign).await;
    assert_not_owned(
        cloud.set_phase(&foreign, Phase::Draining, None).await,
        &foreign,
    );
    assert_not_owned(cloud.set_config(&foreign, "x").await, &foreign);
    assert_not_owned(
        cloud.set_phase(&theirs[0].id, Phase::Draining, None).await,
        &theirs[0].id,
    );
    assert_eq!(
        w.describe(&foreign).await.1,
        foreign_before,
        "foreign tags untouched"
    );
    assert_eq!(
        w.describe(&theirs[0].id).await.1["hangar:phase"],
        "launching"
    );

    assert_not_found(
        cloud
            .set_phase("i-0123456789abcdef0", Phase::InService, None)
            .await,
        Some("InvalidInstanceID.NotFound"),
    );
    cloud.terminate(&[ours[1].id.clone()]).await.unwrap();
    // moto moves it to terminated at once; a terminated node is gone.
    assert_eq!(w.describe(&ours[1].id).await.0, "terminated");
    assert_not_found(
        cloud.set_phase(&ours[1].id, Phase::Draining, None).await,
        Some(hangar_cloud::error::TERMINATED),
    );
    assert_eq!(cloud.api_calls().get("ec2", "CreateTags").calls, 3);
}

/// A node coming up gets several tag writes within seconds: the ownership
/// check of the first (or the launch itself) covers the next ones, while a
/// foreign instance is checked, and refused, every time.
#[tokio::test]
async fn tag_writes_on_an_instance_known_ours_do_not_describe_it_again() {
    let w = World::new().await;
    let cloud = w.cloud(OWNER);
    let ours = cloud
        .launch(&w.launch_request("web", 1, "tok-owned"))
        .await
        .unwrap();
    let foreign = w.foreign_instance().await;
    let describes = || {
        cloud
            .api_calls()
            .snapshot()
            .into_iter()
            .find(|o| o.operation == "DescribeInstances")
            .map_or(0, |o| o.stats.calls)
    };
    let before = describes();
    for phase in [
        Phase::Provisioning,
        Phase::Releasing,
        Phase::Verifying,
        Phase::InService,
    ] {
        cloud.set_phase(&ours[0].id, phase, None).await.unwrap();
    }
    assert_eq!(describes(), before, "launched by us: trusted");
    for _ in 0..2 {
        assert_not_owned(
            cloud.set_phase(&foreign, Phase::Draining, None).await,
            &foreign,
        );
    }
    assert_eq!(
        describes(),
        before + 2,
        "a foreign instance is looked at each time"
    );
}

#[tokio::test]
async fn terminate_refuses_the_whole_call_when_any_instance_is_not_ours() {
    let w = World::new().await;
    let cloud = w.cloud(OWNER);
    let ours = cloud
        .launch(&w.launch_request("web", 2, "tok-1"))
        .await
        .unwrap();
    let foreign = w.foreign_instance().await;
    let theirs = w
        .cloud("someone-else")
        .launch(&w.launch_request("web", 1, "tok-2"))
        .await
        .unwrap();

    for intruder in [&foreign, &theirs[0].id] {
        let mixed = vec![ours[0].id.clone(), intruder.clone(), ours[1].id.clone()];
        assert_not_owned(cloud.terminate(&mixed).await, intruder);
        for id in [&ours[0].id, &ours[1].id, intruder] {
            assert_eq!(w.describe(id).await.0, "running", "{id} untouched");
        }
    }
    assert_eq!(cloud.api_calls().get("ec2", "TerminateInstances").calls, 0);

    assert_not_found(
        cloud
            .terminate(&[ours[0].id.clone(), "i-0123456789abcdef0".into()])
            .await,
        Some("InvalidInstanceID.NotFound"),
    );
    assert_eq!(w.describe(&ours[0].id).await.0, "running");

    cloud.terminate(&[]).await.expect("nothing to do");
    let ids = vec![ours[0].id.clone(), ours[1].id.clone(), ours[0].id.clone()];
    cloud.terminate(&ids).await.expect("terminate ours");
    for id in [&ours[0].id, &ours[1].id] {
        let state = w.describe(id).await.0;
        assert!(
            state == "shutting-down" || state == "terminated",
            "{id}: {state}"
        );
    }
    assert_eq!(w.describe(&foreign).await.0, "running");
    assert_eq!(cloud.api_calls().get("ec2", "TerminateInstances").calls, 1);
    // Terminating again is harmless (the operator retries after crashes).
    cloud.terminate(&ids).await.expect("idempotent");
}

/// Warm pools: stop keeps the instance (stopped, still listed with its
/// tags), start brings it back; both refuse foreign instances and are
/// harmless to repeat.
#[tokio::test]
async fn stop_and_start_move_owned_instances_and_refuse_foreign_ones() {
    let w = World::new().await;
    let cloud = w.cloud(OWNER);
    let ours = cloud
        .launch(&w.launch_request("web", 1, "tok-stop"))
        .await
        .unwrap();
    let id = ours[0].id.clone();
    let foreign = w.foreign_instance().await;
    assert_not_owned(cloud.stop(&foreign).await, &foreign);
    assert_not_owned(cloud.start(&foreign).await, &foreign);
    assert_eq!(w.describe(&foreign).await.0, "running", "untouched");
    assert_eq!(cloud.api_calls().get("ec2", "StopInstances").calls, 0);

    cloud.stop(&id).await.expect("stop ours");
    let state = w.describe(&id).await.0;
    assert!(state == "stopping" || state == "stopped", "{state}");
    cloud.stop(&id).await.expect("stopping again is harmless");
    let listed = cloud.list(Some("web")).await.unwrap();
    assert!(
        listed
            .iter()
            .any(|i| i.id == id
                && matches!(i.state, InstanceState::Stopping | InstanceState::Stopped)),
        "a stopped instance stays listed: {listed:?}"
    );

    cloud.start(&id).await.expect("start ours");
    let state = w.describe(&id).await.0;
    assert!(state == "pending" || state == "running", "{state}");
    cloud.start(&id).await.expect("starting again is harmless");
    assert_eq!(cloud.api_calls().get("ec2", "StartInstances").calls, 2);
}

// ---------------------------------------------------------------------------
// Load balancer
// ---------------------------------------------------------------------------

#[tokio::test]
async fn targets_register_and_deregister_without_touching_foreign_ones() {
    let w = World::new().await;
    let cloud = w.cloud(OWNER);
    let ours = cloud
        .launch(&w.launch_request("web", 2, "tok-1"))
        .await
        .unwrap();
    let foreign = w.foreign_instance().await;
    // Somebody else's target in the same group.
    w.elb
        .register_targets()
        .target_group_arn(&w.tg_arn)
        .targets(TargetDescription::builder().id(&foreign).build())
        .send()
        .await
        .unwrap();

    let both = vec![ours[0].id.clone(), ours[1].id.clone()];
    cloud.register(&w.tg_arn, &both).await.unwrap();
    cloud.register(&w.tg_arn, &both).await.expect("idempotent");
    let mut all = both.clone();
    all.push(foreign.clone());
    assert_eq!(w.registered().await, sorted(all.clone()));

    let health = cloud.target_health(&w.tg_arn).await.unwrap();
    assert_eq!(
        ids_of(&health),
        sorted(all.clone()),
        "every target, owned or not"
    );
    for t in &health {
        assert_eq!(t.state, TargetState::Healthy);
        assert_eq!(t.port, Some(80));
    }

    // A foreign id anywhere refuses the whole call; nothing is deregistered.
    assert_not_owned(
        cloud
            .deregister(&w.tg_arn, &[ours[0].id.clone(), foreign.clone()])
            .await,
        &foreign,
    );
    assert_eq!(w.registered().await, sorted(all.clone()));
    assert_not_owned(
        cloud
            .register(&w.tg_arn, std::slice::from_ref(&foreign))
            .await,
        &foreign,
    );

    cloud
        .deregister(&w.tg_arn, &[ours[0].id.clone()])
        .await
        .unwrap();
    assert_eq!(
        w.registered().await,
        sorted(vec![ours[1].id.clone(), foreign.clone()])
    );
    // Deregistering what is already gone succeeds (retries after a crash).
    cloud
        .deregister(&w.tg_arn, &[ours[0].id.clone(), ours[1].id.clone()])
        .await
        .unwrap();
    assert_eq!(
        w.registered().await,
        vec![foreign.clone()],
        "the foreign target stays"
    );

    let missing_tg = w.tg_arn.replace("targetgroup/web/", "targetgroup/gone/");
    assert_not_found(
        cloud.target_health(&missing_tg).await,
        Some("TargetGroupNotFound"),
    );
    assert_not_found(
        cloud.register(&missing_tg, &[ours[0].id.clone()]).await,
        Some("TargetGroupNotFound"),
    );
    assert_not_found(
        cloud
            .register(&w.tg_arn, &["i-0123456789abcdef0".into()])
            .await,
        Some("InvalidInstanceID.NotFound"),
    );
}

fn ids_of(health: &[hangar_cloud::TargetHealth]) -> Vec<String> {
    sorted(health.iter().map(|t| t.id.clone()).collect())
}

#[tokio::test]
async fn deregistration_delay_is_read_from_the_target_group() {
    let w = World::new().await;
    let cloud = w.cloud(OWNER);
    assert_eq!(
        cloud.deregistration_delay(&w.tg_arn).await.unwrap(),
        Duration::from_secs(300)
    );
    w.elb
        .modify_target_group_attributes()
        .target_group_arn(&w.tg_arn)
        .attributes(
            TargetGroupAttribute::builder()
                .key("deregistration_delay.timeout_seconds")
                .value("45")
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        cloud.deregistration_delay(&w.tg_arn).await.unwrap(),
        Duration::from_secs(45)
    );
    let missing_tg = w.tg_arn.replace("targetgroup/web/", "targetgroup/gone/");
    assert_not_found(
        cloud.deregistration_delay(&missing_tg).await,
        Some("TargetGroupNotFound"),
    );
}

// ---------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------

/// `targetgroup/…` and `app/…` of the world's ALB, derived independently of
/// the code under test.
fn alb_dimensions(w: &World) -> (String, String) {
    let lb = w.lb_arn.split_once(":loadbalancer/").unwrap().1.to_string();
    let tg = w.tg_arn.rsplit_once(':').unwrap().1.to_string();
    (lb, tg)
}

async fn put_sum(w: &World, metric: &str, at: DateTime<Utc>, value: f64) {
    let (lb, tg) = alb_dimensions(w);
    w.cw.put_metric_data()
        .namespace("AWS/ApplicationELB")
        .metric_data(
            MetricDatum::builder()
                .metric_name(metric)
                // Sorted by name, as hangar queries them.
                .dimensions(Dimension::builder().name("LoadBalancer").value(lb).build())
                .dimensions(Dimension::builder().name("TargetGroup").value(tg).build())
                .timestamp(aws_smithy_types::DateTime::from_secs(at.timestamp()))
                .value(value)
                .unit(StandardUnit::Count)
                .build(),
        )
        .send()
        .await
        .expect("put metric data");
}

#[tokio::test]
async fn alb_sums_come_back_per_period_oldest_first_and_no_data_is_empty() {
    let w = World::new().await;
    let cloud = w.cloud(OWNER);
    let now = Utc::now().timestamp();
    let t0 = Utc.timestamp_opt(now - now % 60 - 600, 0).unwrap();
    let minute = chrono::Duration::seconds(60);
    // Put out of order; two datapoints in the second minute add up.
    put_sum(&w, "RequestCount", t0 + minute * 2, 30.0).await;
    put_sum(&w, "RequestCount", t0, 10.0).await;
    put_sum(
        &w,
        "RequestCount",
        t0 + minute + chrono::Duration::seconds(5),
        12.0,
    )
    .await;
    put_sum(
        &w,
        "RequestCount",
        t0 + minute + chrono::Duration::seconds(40),
        8.0,
    )
    .await;

    let points = cloud
        .alb_sums(
            &w.tg_arn,
            AlbMetric::RequestCount,
            Duration::from_secs(60),
            t0,
            t0 + minute * 5,
        )
        .await
        .unwrap();
    let got: Vec<(i64, f64)> = points
        .iter()
        .map(|p| ((p.start - t0).num_seconds(), p.value))
        .collect();
    assert_eq!(got, vec![(0, 10.0), (60, 20.0), (120, 30.0)]);

    // A start inside a minute is aligned down to the period.
    let from_middle = cloud
        .alb_sums(
            &w.tg_arn,
            AlbMetric::RequestCount,
            Duration::from_secs(60),
            t0 + minute + chrono::Duration::seconds(20),
            t0 + minute * 5,
        )
        .await
        .unwrap();
    assert_eq!(from_middle.len(), 2);
    assert_eq!(from_middle[0].value, 20.0);

    // No data is an empty list, never a zero.
    let none = cloud
        .alb_sums(
            &w.tg_arn,
            AlbMetric::RequestCountPerTarget,
            Duration::from_secs(60),
            t0,
            t0 + minute * 5,
        )
        .await
        .unwrap();
    assert_eq!(none, vec![]);
    let earlier = cloud
        .alb_sums(
            &w.tg_arn,
            AlbMetric::RequestCount,
            Duration::from_secs(60),
            t0 - minute * 10,
            t0 - minute * 5,
        )
        .await
        .unwrap();
    assert_eq!(earlier, vec![]);

    // The target group's load balancer was looked up once and cached.
    assert_eq!(
        cloud.api_calls().get("elbv2", "DescribeTargetGroups").calls,
        1
    );
    assert_eq!(
        cloud.api_calls().get("cloudwatch", "GetMetricData").calls,
        4
    );

    let missing_tg = w.tg_arn.replace("targetgroup/web/", "targetgroup/gone/");
    assert_not_found(
        cloud
            .alb_sums(
                &missing_tg,
                AlbMetric::RequestCount,
                Duration::from_secs(60),
                t0,
                t0 + minute,
            )
            .await,
        Some("TargetGroupNotFound"),
    );
    match cloud
        .alb_sums(
            &w.tg_arn,
            AlbMetric::RequestCount,
            Duration::from_secs(90),
            t0,
            t0 + minute,
        )
        .await
    {
        Err(CloudError::InvalidInput { .. }) => {}
        other => panic!("expected InvalidInput for a 90 s period, got {other:?}"),
    }
}

#[tokio::test]
async fn concurrent_reads_share_one_get_metric_data_and_each_gets_its_own_sums() {
    let w = World::new().await;
    let cloud = w.cloud(OWNER);
    let now = Utc::now().timestamp();
    let t0 = Utc.timestamp_opt(now - now % 60 - 600, 0).unwrap();
    let minute = chrono::Duration::seconds(60);
    put_sum(&w, "RequestCount", t0, 10.0).await;
    put_sum(&w, "RequestCount", t0 + minute * 3, 30.0).await;
    put_sum(&w, "HTTPCode_Target_5XX_Count", t0 + minute, 2.0).await;

    // Five clusters' evaluations at once (one task, as the runner's
    // reconciles interleave): different metrics, periods and ranges, and
    // one invalid query that must not spoil the others.
    let read = |metric, secs, from: i32, to: i32| {
        cloud.alb_sums(
            &w.tg_arn,
            metric,
            Duration::from_secs(secs),
            t0 + minute * from,
            t0 + minute * to,
        )
    };
    let (whole, tail, errors, none, invalid) = tokio::join!(
        read(AlbMetric::RequestCount, 60, 0, 5),
        read(AlbMetric::RequestCount, 60, 2, 5),
        read(AlbMetric::Target5xxCount, 10, 0, 2),
        read(AlbMetric::RequestCountPerTarget, 60, 0, 5),
        read(AlbMetric::RequestCount, 90, 0, 5),
    );
    let offsets = |points: Vec<hangar_cloud::Datapoint>| -> Vec<(i64, f64)> {
        points
            .iter()
            .map(|p| ((p.start - t0).num_seconds(), p.value))
            .collect()
    };
    assert_eq!(offsets(whole.unwrap()), [(0, 10.0), (180, 30.0)]);
    assert_eq!(
        offsets(tail.unwrap()),
        [(180, 30.0)],
        "cut back to its own range from the shared one"
    );
    assert_eq!(offsets(errors.unwrap()), [(60, 2.0)]);
    assert_eq!(none.unwrap(), vec![], "no data is empty, not zero");
    assert!(
        matches!(invalid, Err(CloudError::InvalidInput { .. })),
        "{invalid:?}"
    );
    assert_eq!(
        cloud.api_calls().get("cloudwatch", "GetMetricData").calls,
        1,
        "four valid reads, one call"
    );
}

// ---------------------------------------------------------------------------
// Prometheus
// ---------------------------------------------------------------------------

/// A tiny HTTP/1.1 server on 127.0.0.1 answering from a function of the
/// request target. Stopped on drop.
struct HttpServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Handler = fn(&str) -> (u16, &'static str, Vec<u8>);

async fn http_server(handler: Handler) -> HttpServer {
    serve(handler, None).await
}

/// The same over TLS, with the test certificate for 127.0.0.1
/// (`tests/fixtures`).
async fn https_server(handler: Handler) -> HttpServer {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;

    let certs =
        vec![CertificateDer::from_pem_slice(include_bytes!("fixtures/loopback.crt")).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(include_bytes!("fixtures/loopback.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    serve(
        handler,
        Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
    )
    .await
}

async fn serve(handler: Handler, tls: Option<tokio_rustls::TlsAcceptor>) -> HttpServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    None => answer(stream, handler).await,
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(stream).await {
                            answer(stream, handler).await;
                        }
                    }
                }
            });
        }
    });
    HttpServer { addr, task }
}

/// Reads one request head and writes the handler's response.
async fn answer<S>(mut stream: S, handler: Handler)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let target = head.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (status, content_type, body) = handler(&target);
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(&body).await;
    let _ = stream.shutdown().await;
}

fn prometheus_handler(target: &str) -> (u16, &'static str, Vec<u8>) {
    let json = "application/json";
    let url = url::Url::parse(&format!("http://x{target}")).unwrap();
    if url.path() != "/prom/api/v1/query" {
        return (404, "text/plain", b"404 page not found".to_vec());
    }
    let query = url
        .query_pairs()
        .find(|(k, _)| k == "query")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let body = match query.as_str() {
        "sum(rate(http_requests_total[1m]))" => {
            r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1700000000.123,"1234.5"]}]}}"#
        }
        "sum(nothing)" => r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#,
        "rate(x[1m])" => {
            r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"i":"a"},"value":[1,"1"]},{"metric":{"i":"b"},"value":[1,"2"]}]}}"#
        }
        _ => {
            return (
                400,
                json,
                br#"{"status":"error","errorType":"bad_data","error":"1:5: parse error: unexpected end of input"}"#
                    .to_vec(),
            )
        }
    };
    (200, json, body.as_bytes().to_vec())
}

#[tokio::test]
async fn prometheus_instant_queries_return_one_number_or_none() {
    let w = World::new().await;
    let cloud = w.cloud(OWNER);
    let server = http_server(prometheus_handler).await;
    let base = format!("http://{}/prom", server.addr);

    assert_eq!(
        cloud
            .prometheus(&base, "sum(rate(http_requests_total[1m]))")
            .await
            .unwrap(),
        Some(1234.5)
    );
    assert_eq!(cloud.prometheus(&base, "sum(nothing)").await.unwrap(), None);
    let many = cloud.prometheus(&base, "rate(x[1m])").await.unwrap_err();
    assert_eq!(many.kind(), "invalid_input", "{many}");
    let bad = cloud.prometheus(&base, "sum(").await.unwrap_err();
    assert_eq!(
        (bad.kind(), bad.code()),
        ("invalid_input", Some("bad_data"))
    );
    let wrong_path = cloud
        .prometheus(&format!("http://{}/", server.addr), "up")
        .await
        .unwrap_err();
    assert_eq!(wrong_path.kind(), "not_found", "{wrong_path}");

    // Nobody listening: a transport error.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let refused = cloud
        .prometheus(&format!("http://127.0.0.1:{port}"), "up")
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), "transport", "{refused}");

    let stats = cloud.api_calls().get("prometheus", "query");
    assert_eq!((stats.calls, stats.errors), (6, 4));
}

// ---------------------------------------------------------------------------
// Artifacts
// ---------------------------------------------------------------------------

fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Names in the cache directory, temporary files included.
fn cache_entries(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test]
async fn s3_artifacts_are_verified_cached_and_refused_on_mismatch() {
    let w = World::new().await;
    let cloud = w.cloud(OWNER);
    let cache_dir = w.cache.path().join(OWNER);
    let data: Vec<u8> = (0..300_000u32).flat_map(|i| i.to_le_bytes()).collect();
    w.s3.put_object()
        .bucket(&w.bucket)
        .key("app/app-3f2a9c1.tar.gz")
        .body(data.clone().into())
        .send()
        .await
        .unwrap();
    let source: ArtifactSource = format!("s3://{}/app/app-3f2a9c1.tar.gz", w.bucket)
        .parse()
        .unwrap();

    let wrong = sha256(b"not it");
    match cloud.fetch(&source, &wrong).await {
        Err(CloudError::ChecksumMismatch {
            expected, actual, ..
        }) => {
            assert_eq!(expected, wrong);
            assert_eq!(actual, sha256(&data));
        }
        other => panic!("expected ChecksumMismatch, got {other:?}"),
    }
    assert_eq!(
        cache_entries(&cache_dir),
        Vec::<String>::new(),
        "nothing left behind"
    );

    let got = cloud.fetch(&source, &sha256(&data)).await.unwrap();
    assert_eq!(got.sha256, sha256(&data));
    assert_eq!(got.size, data.len() as u64);
    assert_eq!(got.path, cache_dir.join(sha256(&data)));
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    assert_eq!(cache_entries(&cache_dir), vec![sha256(&data)]);

    let again = cloud.fetch(&source, &sha256(&data)).await.unwrap();
    assert_eq!(again, got);
    assert_eq!(
        cloud.api_calls().get("s3", "GetObject").calls,
        2,
        "the second fetch was a cache hit"
    );

    let missing: ArtifactSource = format!("s3://{}/app/nope.tar.gz", w.bucket)
        .parse()
        .unwrap();
    assert_not_found(
        cloud.fetch(&missing, &sha256(b"x")).await,
        Some("NoSuchKey"),
    );
    let no_bucket: ArtifactSource = "s3://no-such-bucket-hangar/x.tgz".parse().unwrap();
    assert_not_found(
        cloud.fetch(&no_bucket, &sha256(b"x")).await,
        Some("NoSuchBucket"),
    );
    match cloud.fetch(&source, "not-a-sha").await {
        Err(CloudError::InvalidInput { .. }) => {}
        other => panic!("expected InvalidInput, got {other:?}"),
    }
}

#[tokio::test]
async fn file_artifacts_and_http_downloads_are_verified_into_the_cache() {
    let w = World::new().await;
    let cloud = w.cloud(OWNER);
    let cache_dir = w.cache.path().join(OWNER);
    let src_dir = tempfile::tempdir().unwrap();
    let path = src_dir.path().join("app.tar.gz");
    let data = b"a release tarball".repeat(10_000);
    std::fs::write(&path, &data).unwrap();
    let source: ArtifactSource = format!("file://{}", path.display()).parse().unwrap();

    match cloud.fetch(&source, &sha256(b"other")).await {
        Err(CloudError::ChecksumMismatch { .. }) => {}
        other => panic!("expected ChecksumMismatch, got {other:?}"),
    }
    assert_eq!(cache_entries(&cache_dir), Vec::<String>::new());
    let got = cloud.fetch(&source, &sha256(&data)).await.unwrap();
    assert_eq!(std::fs::read(&got.path).unwrap(), data);

    let missing: ArtifactSource = format!("file://{}", src_dir.path().join("gone").display())
        .parse()
        .unwrap();
    assert_not_found(cloud.fetch(&missing, &sha256(b"x")).await, None);

    // The download itself (status mapping, streaming into the cache),
    // against a local plain-HTTP server; TLS is covered below.
    let server = http_server(|target| match target {
        "/app.tgz" => (200, "application/gzip", b"served bytes".to_vec()),
        "/busy.tgz" => (503, "text/plain", b"busy".to_vec()),
        _ => (404, "text/plain", b"no".to_vec()),
    })
    .await;
    let client = reqwest::Client::new();
    let cache = hangar_cloud::artifact_cache::ArtifactCache::new(src_dir.path().join("cache"));
    let url = format!("http://{}/app.tgz", server.addr);
    let mut chunks = hangar_cloud::artifact_sources::HttpChunks::get(&client, &url)
        .await
        .unwrap();
    let got = cache
        .store(&url, &sha256(b"served bytes"), &mut chunks)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&got.path).unwrap(), b"served bytes");
    let not_there = hangar_cloud::artifact_sources::HttpChunks::get(
        &client,
        &format!("http://{}/missing.tgz", server.addr),
    )
    .await;
    assert!(matches!(not_there, Err(CloudError::NotFound { .. })));
    let busy = hangar_cloud::artifact_sources::HttpChunks::get(
        &client,
        &format!("http://{}/busy.tgz", server.addr),
    )
    .await;
    assert!(matches!(busy, Err(CloudError::Transport { .. })));
}

/// A release tarball's worth of bytes, served over HTTPS.
fn release_bytes() -> Vec<u8> {
    (0..100_000u32)
        .flat_map(|i| (i * 7).to_be_bytes())
        .collect()
}

#[tokio::test]
async fn https_artifacts_are_fetched_over_tls_and_verified() {
    let w = World::new().await;
    let server = https_server(|target| match target {
        "/releases/app.tgz" => (200, "application/gzip", release_bytes()),
        _ => (404, "text/plain", b"no such release".to_vec()),
    })
    .await;
    let ca = reqwest::Certificate::from_pem(include_bytes!("fixtures/test-ca.crt")).unwrap();
    let client = reqwest::Client::builder()
        .https_only(true)
        .tls_certs_only([ca])
        .build()
        .unwrap();
    let cloud = w
        .builder(OWNER, &w.sdk)
        .https_client(client)
        .build()
        .unwrap();
    let cache_dir = w.cache.path().join(OWNER);
    let url = |path: &str| -> ArtifactSource {
        format!("https://{}{path}", server.addr).parse().unwrap()
    };
    let data = release_bytes();

    match cloud
        .fetch(&url("/releases/app.tgz"), &sha256(b"other"))
        .await
    {
        Err(CloudError::ChecksumMismatch { actual, .. }) => assert_eq!(actual, sha256(&data)),
        other => panic!("expected ChecksumMismatch, got {other:?}"),
    }
    assert_eq!(cache_entries(&cache_dir), Vec::<String>::new());

    let got = cloud
        .fetch(&url("/releases/app.tgz"), &sha256(&data))
        .await
        .unwrap();
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    assert_eq!(cache_entries(&cache_dir), vec![sha256(&data)]);

    assert_not_found(
        cloud.fetch(&url("/releases/gone.tgz"), &sha256(b"x")).await,
        Some("HTTP404"),
    );

    // hangar's default client does not trust the test CA: a typed
    // transport error, and nothing cached.
    let default_client = w.cloud("default-tls");
    let err = default_client
        .fetch(&url("/releases/app.tgz"), &sha256(&data))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "transport", "{err}");
    assert_eq!(
        cache_entries(&w.cache.path().join("default-tls")),
        Vec::<String>::new()
    );
}

// ---------------------------------------------------------------------------
// Faults: throttling, 5xx, hangs — injected by a proxy in front of moto
// ---------------------------------------------------------------------------

#[tokio::test]
async fn throttled_and_failed_calls_are_retried_until_they_succeed() {
    let w = World::new().await;
    let proxy = FaultProxy::start(moto().endpoint(), 1).await.unwrap();
    let recorder = Recorder {
        operation: "RunInstances",
        ..Recorder::default()
    };
    let sdk = sdk_config(&proxy.endpoint()).await;
    let cloud = w
        .builder(OWNER, &sdk)
        .interceptor(recorder.clone())
        .build()
        .unwrap();

    // EC2 query/XML: RequestLimitExceeded (503) twice.
    proxy.add(
        Rule::new(Fault::Throttle)
            .service(Service::Ec2)
            .operation("RunInstances")
            .times(2),
    );
    let launched = cloud
        .launch(&w.launch_request("web", 1, "retry-token-1"))
        .await
        .expect("launch after two throttles");
    let run = cloud.api_calls().get("ec2", "RunInstances");
    assert_eq!(
        (
            run.calls,
            run.attempts,
            run.retries,
            run.throttles,
            run.errors
        ),
        (1, 3, 2, 2, 0)
    );
    assert_eq!(proxy.stats(Service::Ec2, "RunInstances").injected, 2);
    let bodies = recorder.bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 3, "every attempt was recorded");
    assert!(
        bodies
            .iter()
            .all(|b| b.contains("ClientToken=retry-token-1")),
        "retries reuse the client token"
    );
    assert_eq!(
        cloud.list(None).await.unwrap().len(),
        1,
        "one launch, not three"
    );

    // ELBv2 query/XML: Throttling (400).
    proxy.add(
        Rule::new(Fault::Throttle)
            .operation("RegisterTargets")
            .times(1),
    );
    cloud
        .register(&w.tg_arn, &[launched[0].id.clone()])
        .await
        .expect("register after a throttle");
    let reg = cloud.api_calls().get("elbv2", "RegisterTargets");
    assert_eq!((reg.retries, reg.throttles), (1, 1));

    // A 500 and a 503 are retried too, but are not throttles.
    proxy.add(
        Rule::new(Fault::ServerError)
            .operation("DescribeTargetHealth")
            .times(1),
    );
    proxy.add(
        Rule::new(Fault::Unavailable)
            .operation("DescribeTargetHealth")
            .times(1),
    );
    let health = cloud.target_health(&w.tg_arn).await.unwrap();
    assert_eq!(health.len(), 1);
    let dth = cloud.api_calls().get("elbv2", "DescribeTargetHealth");
    assert_eq!((dth.attempts, dth.retries, dth.throttles), (3, 2, 0));

    // CloudWatch RPCv2-CBOR: Throttling (400, CBOR body).
    proxy.add(
        Rule::new(Fault::Throttle)
            .service(Service::CloudWatch)
            .operation("GetMetricData")
            .times(2),
    );
    let now = Utc::now();
    let points = cloud
        .alb_sums(
            &w.tg_arn,
            AlbMetric::RequestCount,
            Duration::from_secs(60),
            now - chrono::Duration::minutes(5),
            now,
        )
        .await
        .expect("GetMetricData after two throttles");
    assert_eq!(points, vec![]);
    let gmd = cloud.api_calls().get("cloudwatch", "GetMetricData");
    assert_eq!((gmd.retries, gmd.throttles), (2, 2));

    // S3 REST/XML: SlowDown (503).
    w.s3.put_object()
        .bucket(&w.bucket)
        .key("a.tgz")
        .body(b"abc".to_vec().into())
        .send()
        .await
        .unwrap();
    proxy.add(Rule::new(Fault::Throttle).operation("GetObject").times(1));
    let source: ArtifactSource = format!("s3://{}/a.tgz", w.bucket).parse().unwrap();
    cloud
        .fetch(&source, &sha256(b"abc"))
        .await
        .expect("GetObject after SlowDown");
    let get = cloud.api_calls().get("s3", "GetObject");
    assert_eq!((get.retries, get.throttles), (1, 1));

    // Every retry was also charged to the client-side budgets.
    let ec2_run = cloud
        .limiter_stats()
        .into_iter()
        .find(|b| b.name == "ec2_run_instances")
        .unwrap();
    assert_eq!(ec2_run.acquired, 3, "1 call + 2 retries");
}

#[tokio::test]
async fn throttling_that_outlasts_the_retries_is_a_typed_error() {
    let w = World::new().await;
    let proxy = FaultProxy::start(moto().endpoint(), 2).await.unwrap();
    let cloud = w.cloud_via(&proxy, fast_retries()).await;
    proxy.add(Rule::new(Fault::Throttle).operation("DescribeInstances"));
    proxy.add(Rule::new(Fault::Throttle).operation("DescribeTargetHealth"));

    match cloud.list(None).await {
        Err(CloudError::Throttled { service, code, .. }) => {
            assert_eq!((service, code.as_str()), ("ec2", "RequestLimitExceeded"))
        }
        other => panic!("expected Throttled, got {other:?}"),
    }
    let di = cloud.api_calls().get("ec2", "DescribeInstances");
    assert_eq!(
        (di.calls, di.attempts, di.throttles, di.errors),
        (1, 4, 4, 1)
    );

    let err = cloud.target_health(&w.tg_arn).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert_eq!((err.kind(), err.code()), ("throttled", Some("Throttling")));

    // Once AWS calms down, the same handle works again.
    proxy.clear();
    assert_eq!(cloud.list(None).await.unwrap(), vec![]);
}

#[tokio::test]
async fn hung_attempts_time_out_and_are_retried() {
    let w = World::new().await;
    let proxy = FaultProxy::start(moto().endpoint(), 3).await.unwrap();
    let retry = RetryPolicy {
        max_attempts: 2,
        // Long enough for a loaded moto to answer, short enough to keep the test quick.
        attempt_timeout: Duration::from_secs(1),
        ..fast_retries()
    };
    let cloud = w.cloud_via(&proxy, retry).await;

    proxy.add(
        Rule::new(Fault::Hang(Duration::from_secs(30)))
            .operation("DescribeTargetGroupAttributes")
            .times(1),
    );
    assert_eq!(
        cloud.deregistration_delay(&w.tg_arn).await.unwrap(),
        Duration::from_secs(300)
    );
    let a = cloud
        .api_calls()
        .get("elbv2", "DescribeTargetGroupAttributes");
    assert_eq!((a.attempts, a.retries, a.errors), (2, 1, 0));

    proxy.add(
        Rule::new(Fault::Reset)
            .operation("DescribeInstances")
            .times(1),
    );
    assert_eq!(
        cloud.list(None).await.unwrap(),
        vec![],
        "a dropped connection is retried"
    );

    proxy.add(
        Rule::new(Fault::Hang(Duration::from_secs(30))).operation("DescribeTargetGroupAttributes"),
    );
    match cloud.deregistration_delay(&w.tg_arn).await {
        Err(CloudError::Transport { service, .. }) => assert_eq!(service, "elbv2"),
        other => panic!("expected Transport after timeouts, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Budgets
// ---------------------------------------------------------------------------

#[tokio::test]
async fn the_client_side_budget_spaces_out_a_burst() {
    let w = World::new().await;
    let budgets = Budgets {
        ec2_describe: hangar_cloud::aws::BucketSpec::new(2.0, 20.0),
        ..Budgets::default()
    };
    let cloud = w.builder(OWNER, &w.sdk).budgets(budgets).build().unwrap();
    let start = std::time::Instant::now();
    // 2 from the burst, then 4 more at 20/s: at least 200 ms.
    let lists = (0..6).map(|_| {
        let cloud = cloud.clone();
        async move { cloud.list(None).await }
    });
    for listed in futures_join_all(lists).await {
        assert_eq!(listed.unwrap(), vec![]);
    }
    assert!(
        start.elapsed() >= Duration::from_millis(190),
        "{:?}",
        start.elapsed()
    );
    let bucket = cloud
        .limiter_stats()
        .into_iter()
        .find(|b| b.name == "ec2_describe")
        .unwrap();
    assert_eq!(bucket.acquired, 6);
    assert!(
        bucket.waited >= Duration::from_millis(190),
        "{:?}",
        bucket.waited
    );
}

/// `join_all` without a futures dependency.
async fn futures_join_all<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let mut out = Vec::new();
    let mut handles = Vec::new();
    for f in futs {
        handles.push(tokio::spawn(f));
    }
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

/// `$Latest` and `$Default` name version numbers that change without a
/// spec change (a new template version with a patched AMI): hangar reads
/// them, at most once a minute per template, by id or by name.
#[tokio::test]
async fn latest_and_default_template_versions_are_resolved_to_their_numbers() {
    let w = World::new().await;
    let cloud = w.cloud(OWNER);
    for template in [&w.template_id, &w.template_name] {
        for which in ["$Latest", "$Default"] {
            let v = cloud.resolve_template_version(template, which).await;
            assert_eq!(v.expect("resolved"), "1", "{template} {which}");
        }
    }
    w.ec2
        .create_launch_template_version()
        .launch_template_id(&w.template_id)
        .source_version("1")
        .launch_template_data(
            aws_sdk_ec2::types::RequestLaunchTemplateData::builder()
                .image_id("ami-12c6146b")
                .build(),
        )
        .send()
        .await
        .expect("a second version");
    let again = cloud
        .resolve_template_version(&w.template_id, "$Latest")
        .await;
    assert_eq!(
        again.expect("cached"),
        "1",
        "read again only after a minute"
    );
    let fresh = w.cloud(OWNER);
    let latest = fresh
        .resolve_template_version(&w.template_id, "$Latest")
        .await;
    assert_eq!(latest.expect("resolved"), "2");
    let default = fresh
        .resolve_template_version(&w.template_id, "$Default")
        .await;
    assert_eq!(default.expect("resolved"), "1", "the default did not move");
    let pinned = fresh.resolve_template_version(&w.template_id, "7").await;
    assert_eq!(pinned.expect("a number is itself"), "7");
    let missing = fresh
        .resolve_template_version("lt-0000000000000000f", "$Latest")
        .await;
    assert!(missing.is_err(), "{missing:?}");
}

// ---------------------------------------------------------------------------
// The lease: fenced mutating calls, and the DynamoDB lease and state table
// ---------------------------------------------------------------------------

/// A fence the test opens and closes, recording the epochs it is told of.
#[derive(Debug, Default)]
struct TestFence {
    epoch: Mutex<Option<u64>>,
    observed: Mutex<Vec<u64>>,
}

impl hangar_cloud::Fence for TestFence {
    fn authorize(&self) -> Result<Option<u64>, hangar_cloud::NotLeader> {
        match *self.epoch.lock().unwrap() {
            Some(e) => Ok(Some(e)),
            None => Err(hangar_cloud::NotLeader(
                "the test took the lease away".into(),
            )),
        }
    }

    fn observed_epoch(&self, epoch: u64) {
        self.observed.lock().unwrap().push(epoch);
    }
}

#[tokio::test]
async fn a_fenced_cloud_stamps_its_epoch_and_sends_nothing_mutating_once_the_lease_is_gone() {
    let w = World::new().await;
    let fence = Arc::new(TestFence::default());
    *fence.epoch.lock().unwrap() = Some(3);
    let cloud = w
        .builder(OWNER, &w.sdk)
        .fence(fence.clone())
        .build()
        .expect("AwsCloud");
    let launched = cloud
        .launch(&w.launch_request("web", 1, "tok-fenced-1"))
        .await
        .expect("the leader launches");
    let id = launched[0].id.clone();
    assert!(
        !w.describe(&id).await.1.contains_key("hangar:epoch"),
        "not at launch: a retry of the token by the next leader sends the same parameters"
    );
    *fence.epoch.lock().unwrap() = Some(4);
    cloud
        .set_phase(&id, Phase::Provisioning, None)
        .await
        .expect("the leader moves a phase");
    let tags = w.describe(&id).await.1;
    assert_eq!(
        (tags["hangar:phase"].as_str(), tags["hangar:epoch"].as_str()),
        ("provisioning", "4"),
        "the move carries the epoch of the term that made it"
    );

    // The lease is gone: every mutating call fails typed, and none reaches EC2.
    *fence.epoch.lock().unwrap() = None;
    let before = w.describe(&id).await;
    let refused = [
        cloud
            .launch(&w.launch_request("web", 1, "tok-fenced-2"))
            .await
            .map(|_| ()),
        cloud.set_phase(&id, Phase::InService, None).await,
        cloud.set_config(&id, "cfg").await,
        cloud.register(&w.tg_arn, std::slice::from_ref(&id)).await,
        cloud.deregister(&w.tg_arn, std::slice::from_ref(&id)).await,
        cloud.terminate(std::slice::from_ref(&id)).await,
    ];
    for (n, r) in refused.into_iter().enumerate() {
        match r {
            Err(CloudError::NotLeader { reason, .. }) => {
                assert!(reason.contains("took the lease away"), "call {n}: {reason}")
            }
            other => panic!("call {n}: expected NotLeader, got {other:?}"),
        }
    }
    assert!(
        CloudError::NotLeader {
            operation: "x".into(),
            reason: "y".into()
        }
        .is_transient(),
        "a later leader may make it"
    );
    assert_eq!(w.describe(&id).await, before, "nothing changed");
    assert!(w.registered().await.is_empty(), "nothing registered");
    let all = w
        .ec2
        .describe_instances()
        .send()
        .await
        .expect("describe")
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .count();
    assert_eq!(all, 1, "no second launch");
    // Reads still work, and report the epochs they see.
    w.ec2
        .create_tags()
        .resources(&id)
        .tags(Tag::builder().key("hangar:epoch").value("9").build())
        .send()
        .await
        .expect("a newer leader's tag");
    cloud.list(Some("web")).await.expect("listing still works");
    assert!(
        fence.observed.lock().unwrap().contains(&9),
        "told of epoch 9"
    );
}

async fn lease_table(w: &World) -> hangar_cloud::DynamoTable {
    use aws_sdk_dynamodb::types::{
        AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    };
    let table = format!("hangar-lease-{}", w.account);
    let ddb = aws_sdk_dynamodb::Client::new(&w.sdk);
    let attr = |n: &str| {
        AttributeDefinition::builder()
            .attribute_name(n)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .unwrap()
    };
    let key = |n: &str, t| {
        KeySchemaElement::builder()
            .attribute_name(n)
            .key_type(t)
            .build()
            .unwrap()
    };
    ddb.create_table()
        .table_name(&table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attr("pk"))
        .attribute_definitions(attr("sk"))
        .key_schema(key("pk", KeyType::Hash))
        .key_schema(key("sk", KeyType::Range))
        .send()
        .await
        .expect("create the lease table");
    hangar_cloud::DynamoTable::new(&w.sdk, table, OWNER, &fast_retries())
}

fn record(holder: &str, version: &str, fence: u64) -> hangar_cloud::LeaseRecord {
    hangar_cloud::LeaseRecord {
        holder: holder.into(),
        version: version.into(),
        fence,
        lease: Duration::from_secs(15),
        released: false,
        acquired_at: Some(Utc::now()),
        renewed_at: Some(Utc::now()),
    }
}

#[tokio::test]
async fn the_dynamodb_lease_is_taken_only_by_conditional_writes() {
    use hangar_cloud::lease::{LeaseStore, LeaseWriteError};
    let w = World::new().await;
    let table = lease_table(&w).await;
    assert_eq!(table.read().await.unwrap(), None, "no record yet");
    table
        .write(&record("a", "v1", 1), None)
        .await
        .expect("the first creates it");
    assert!(
        matches!(
            table.write(&record("b", "v2", 1), None).await,
            Err(LeaseWriteError::Conflict)
        ),
        "a second create is refused"
    );
    assert!(
        matches!(
            table.write(&record("b", "v2", 2), Some("v0")).await,
            Err(LeaseWriteError::Conflict)
        ),
        "a takeover from a version that is not there is refused"
    );
    table
        .write(&record("a", "v3", 1), Some("v1"))
        .await
        .expect("the holder renews from the version it wrote");
    table
        .write(&record("b", "v4", 2), Some("v3"))
        .await
        .expect("a takeover from the version last seen");
    let r = table.read().await.unwrap().expect("record");
    assert_eq!(
        (r.holder.as_str(), r.version.as_str(), r.fence),
        ("b", "v4", 2)
    );
    assert_eq!(r.lease, Duration::from_secs(15));
    assert!(!r.released && r.acquired_at.is_some());
    assert!(
        matches!(
            table.write(&record("a", "v5", 1), Some("v3")).await,
            Err(LeaseWriteError::Conflict)
        ),
        "the old holder's renewal is refused"
    );
    assert_eq!(
        table.describe(),
        format!("dynamodb:hangar-lease-{}", w.account)
    );
    assert!(table.api_calls().get("dynamodb", "PutItem").calls >= 6);
}

#[tokio::test]
async fn state_writes_are_fenced_by_the_lease_in_one_transaction() {
    use hangar_cloud::lease::{LeaseStore, StateStore, StateWriteError, Writer};
    let w = World::new().await;
    let table = lease_table(&w).await;
    let a = Writer {
        holder: "a".into(),
        fence: 1,
    };
    assert!(
        matches!(
            table.save("web", "{}", &a).await,
            Err(StateWriteError::Fenced(_))
        ),
        "no lease, no write"
    );
    table.write(&record("a", "v1", 1), None).await.unwrap();
    table
        .save("web", r#"{"desired":4}"#, &a)
        .await
        .expect("the holder writes");
    table
        .save("api", r#"{"desired":2}"#, &a)
        .await
        .expect("another cluster");
    assert_eq!(
        table.load().await.unwrap(),
        vec![
            ("api".to_string(), r#"{"desired":2}"#.to_string()),
            ("web".to_string(), r#"{"desired":4}"#.to_string())
        ]
    );
    // b takes over: a's writes and removals fail as a whole.
    table
        .write(&record("b", "v2", 2), Some("v1"))
        .await
        .unwrap();
    assert!(matches!(
        table.save("web", r#"{"desired":2}"#, &a).await,
        Err(StateWriteError::Fenced(_))
    ));
    assert!(matches!(
        table.remove("api", &a).await,
        Err(StateWriteError::Fenced(_))
    ));
    let b = Writer {
        holder: "b".into(),
        fence: 2,
    };
    assert!(
        matches!(
            table
                .save(
                    "web",
                    "{}",
                    &Writer {
                        holder: "b".into(),
                        fence: 1
                    }
                )
                .await,
            Err(StateWriteError::Fenced(_))
        ),
        "the right holder with a stale fence is refused too"
    );
    table
        .remove("api", &b)
        .await
        .expect("the new holder removes");
    assert_eq!(
        table.load().await.unwrap(),
        vec![("web".to_string(), r#"{"desired":4}"#.to_string())],
        "what a wrote while it held the lease survives; nothing after"
    );
    let huge = "x".repeat(400 * 1024);
    assert!(matches!(
        table.save("web", &huge, &b).await,
        Err(StateWriteError::TooLarge { .. })
    ));
}
