//! The local cloud keeps AWS's promises and failure modes: each test drives
//! the gateway with the real AWS SDK, as hangar does, and checks one
//! documented behaviour (see infra/local/README.md, "AWS behaviours").
//!
//! Clients here do not retry (the SDK would retry throttles and dropped
//! connections, hiding what is under test). Waiting is always "poll until
//! a deadline"; the one timed pause is in the refill test, where elapsed
//! time is the thing measured.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_ec2::config::retry::RetryConfig;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    Filter, LaunchTemplateSpecification, ResourceType, Tag, TagSpecification,
};
use bytes::Bytes;
use hangar_local::gateway::admin;
use hangar_local::lb::Health;
use hangar_local::{Capacity, Lag, LocalCloud, LocalCloudOptions};
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(20);

fn start(options: LocalCloudOptions) -> LocalCloud {
    hangar_local::init_test_logging();
    LocalCloud::start(options).expect("local cloud starts (run `sudo infra/local/setup` once)")
}

/// An EC2 client through the gateway, signing with `key`, without retries.
fn ec2_as(cloud: &LocalCloud, key: &str) -> aws_sdk_ec2::Client {
    let sdk = cloud.clients_as(key).sdk;
    aws_sdk_ec2::Client::from_conf(
        aws_sdk_ec2::config::Builder::from(&sdk)
            .retry_config(RetryConfig::disabled())
            .build(),
    )
}

fn elb_as(cloud: &LocalCloud, key: &str) -> aws_sdk_elasticloadbalancingv2::Client {
    let sdk = cloud.clients_as(key).sdk;
    aws_sdk_elasticloadbalancingv2::Client::from_conf(
        aws_sdk_elasticloadbalancingv2::config::Builder::from(&sdk)
            .retry_config(RetryConfig::disabled())
            .build(),
    )
}

/// What a launch asks for.
#[derive(Clone)]
struct Launch {
    template: String,
    subnet: String,
    token: Option<String>,
    tag: (String, String),
}

impl Launch {
    fn new(cloud: &LocalCloud, subnet: usize) -> Launch {
        Launch {
            template: cloud.launch_template_id().to_string(),
            subnet: cloud.subnets()[subnet].clone(),
            token: None,
            tag: ("Name".into(), "semantics".into()),
        }
    }

    fn token(mut self, token: &str) -> Launch {
        self.token = Some(token.into());
        self
    }

    fn tag(mut self, key: &str, value: &str) -> Launch {
        self.tag = (key.into(), value.into());
        self
    }

    async fn send(
        &self,
        ec2: &aws_sdk_ec2::Client,
    ) -> Result<
        aws_sdk_ec2::operation::run_instances::RunInstancesOutput,
        SdkError<aws_sdk_ec2::operation::run_instances::RunInstancesError>,
    > {
        ec2.run_instances()
            .launch_template(
                LaunchTemplateSpecification::builder()
                    .launch_template_id(&self.template)
                    .build(),
            )
            .subnet_id(&self.subnet)
            .min_count(1)
            .max_count(1)
            .set_client_token(self.token.clone())
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .tags(Tag::builder().key(&self.tag.0).value(&self.tag.1).build())
                    .build(),
            )
            .send()
            .await
    }
}

/// `(code, HTTP status)` of a failed call.
fn code_status<E: ProvideErrorMetadata, R: HttpStatus>(e: &SdkError<E, R>) -> (String, u16) {
    (
        e.code().unwrap_or("<no code>").to_string(),
        e.raw_response().map(HttpStatus::status).unwrap_or(0),
    )
}

trait HttpStatus {
    fn status(&self) -> u16;
}

impl HttpStatus for aws_sdk_ec2::config::http::HttpResponse {
    fn status(&self) -> u16 {
        self.status().as_u16()
    }
}

fn ids(out: &aws_sdk_ec2::operation::run_instances::RunInstancesOutput) -> Vec<String> {
    out.instances()
        .iter()
        .filter_map(|i| i.instance_id().map(str::to_string))
        .collect()
}

/// An instance as a `DescribeInstances` answer shows it.
#[derive(Debug, Clone, PartialEq)]
struct Listed {
    id: String,
    client_token: Option<String>,
    tags: BTreeMap<String, String>,
    state: String,
}

async fn list(
    ec2: &aws_sdk_ec2::Client,
    filters: Vec<Filter>,
) -> Result<Vec<Listed>, SdkError<aws_sdk_ec2::operation::describe_instances::DescribeInstancesError>>
{
    let out = ec2
        .describe_instances()
        .set_filters(Some(filters))
        .send()
        .await?;
    Ok(out
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .map(|i| Listed {
            id: i.instance_id().unwrap_or_default().to_string(),
            client_token: i.client_token().map(str::to_string),
            tags: i
                .tags()
                .iter()
                .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
                .collect(),
            state: i
                .state()
                .and_then(|s| s.name())
                .map(|n| n.as_str().to_string())
                .unwrap_or_default(),
        })
        .collect())
}

fn tag_filter(key: &str, value: &str) -> Filter {
    Filter::builder()
        .name(format!("tag:{key}"))
        .values(value)
        .build()
}

/// Every instance moto holds, whatever its state (the truth, no gateway).
fn moto_instance_count(cloud: &LocalCloud) -> usize {
    let ec2 = cloud.moto_clients().ec2.clone();
    cloud
        .block_on(async move { ec2.describe_instances().send().await })
        .expect("moto DescribeInstances")
        .reservations()
        .iter()
        .map(|r| r.instances().len())
        .sum()
}

/// Polls `probe` every 100 ms (gentle on the Describe bucket) until it
/// yields or `timeout` passes.
fn wait_for<T>(timeout: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---- ClientToken idempotency -------------------------------------------------

#[test]
fn a_repeated_client_token_returns_the_same_reservation_also_after_terminate() {
    let cloud = start(LocalCloudOptions::default());
    let ec2 = ec2_as(&cloud, "idempotency");
    let launch = Launch::new(&cloud, 0).token("hangar-web-r1-1");
    let before = moto_instance_count(&cloud);
    let (first, again) = cloud.block_on({
        let (ec2, launch) = (ec2.clone(), launch.clone());
        async move {
            let first = launch.send(&ec2).await.expect("first RunInstances");
            let again = launch.send(&ec2).await.expect("repeated RunInstances");
            (first, again)
        }
    });
    assert!(first.reservation_id().is_some());
    assert_eq!(again.reservation_id(), first.reservation_id());
    assert_eq!(ids(&again), ids(&first));
    assert_eq!(ids(&first).len(), 1);
    assert_eq!(
        moto_instance_count(&cloud),
        before + 1,
        "the repeat launched again"
    );

    // The listing carries each instance's token (hangar recognises its
    // launch intents by it), once the instance is visible.
    let id = ids(&first).remove(0);
    let listed = wait_for(WAIT, "the instance in DescribeInstances", || {
        let ec2 = ec2.clone();
        let found = cloud
            .block_on(async move { list(&ec2, vec![tag_filter("Name", "semantics")]).await })
            .ok()?;
        found.into_iter().find(|l| l.id == id)
    });
    assert_eq!(listed.client_token.as_deref(), Some("hangar-web-r1-1"));

    cloud.terminate(&[&id]).expect("TerminateInstances");
    let after = cloud.block_on({
        let (ec2, launch) = (ec2.clone(), launch.clone());
        async move {
            launch
                .send(&ec2)
                .await
                .expect("RunInstances after terminate")
        }
    });
    assert_eq!(after.reservation_id(), first.reservation_id());
    assert_eq!(ids(&after), ids(&first));
    // Only the state is current, as on EC2.
    let state = after.instances()[0]
        .state()
        .and_then(|s| s.name())
        .map(|n| n.as_str().to_string());
    assert!(
        matches!(state.as_deref(), Some("shutting-down" | "terminated")),
        "{state:?}"
    );
    assert_eq!(moto_instance_count(&cloud), before + 1);
}

#[test]
fn a_client_token_reused_with_other_parameters_is_idempotent_parameter_mismatch() {
    let cloud = start(LocalCloudOptions::default());
    let ec2 = ec2_as(&cloud, "mismatch");
    let a = Launch::new(&cloud, 0)
        .token("tok-mismatch")
        .tag("hangar:release", "v1");
    let b = a.clone().tag("hangar:release", "v2");
    let other_subnet = Launch::new(&cloud, 1)
        .token("tok-mismatch")
        .tag("hangar:release", "v1");
    let before = moto_instance_count(&cloud);
    let (first, second, third) = cloud.block_on(async move {
        let first = a.send(&ec2).await;
        let second = b.send(&ec2).await;
        let third = other_subnet.send(&ec2).await;
        (first, second, third)
    });
    first.expect("first launch");
    let e = second.expect_err("a different tag value reuses the token");
    assert_eq!(
        code_status(&e),
        ("IdempotentParameterMismatch".to_string(), 400)
    );
    let e = third.expect_err("a different subnet reuses the token");
    assert_eq!(code_status(&e).0, "IdempotentParameterMismatch");
    assert_eq!(moto_instance_count(&cloud), before + 1);
}

#[test]
fn concurrent_duplicates_of_one_token_launch_once() {
    let cloud = start(LocalCloudOptions::default());
    let ec2 = ec2_as(&cloud, "duplicates");
    let launch = Launch::new(&cloud, 0).token("tok-concurrent");
    let before = moto_instance_count(&cloud);
    // Five at once: RunInstances' whole burst, so none is throttled.
    let outs = cloud.block_on(async move {
        let calls = (0..5).map(|_| {
            let (ec2, launch) = (ec2.clone(), launch.clone());
            tokio::spawn(async move { launch.send(&ec2).await })
        });
        let mut outs = Vec::new();
        for call in calls.collect::<Vec<_>>() {
            outs.push(call.await.expect("task").expect("RunInstances"));
        }
        outs
    });
    let reservations: std::collections::BTreeSet<_> = outs
        .iter()
        .map(|o| o.reservation_id().map(str::to_string))
        .collect();
    assert_eq!(reservations.len(), 1, "{reservations:?}");
    assert!(outs.iter().all(|o| ids(o) == ids(&outs[0])));
    assert_eq!(moto_instance_count(&cloud), before + 1);
    assert_eq!(
        cloud
            .api_calls()
            .get("duplicates", "ec2", "RunInstances")
            .calls,
        5
    );
}

// ---- eventual consistency -------------------------------------------------------

#[test]
fn a_new_instance_is_listed_only_after_its_lag() {
    let cloud = start(LocalCloudOptions {
        listing_lag: Lag::Fixed(Duration::from_secs(3)),
        ..LocalCloudOptions::default()
    });
    let ec2 = ec2_as(&cloud, "lag");
    let sent = Instant::now();
    let out = cloud
        .block_on({
            let (ec2, launch) = (ec2.clone(), Launch::new(&cloud, 0).tag("Name", "lagging"));
            async move { launch.send(&ec2).await }
        })
        .expect("RunInstances");
    let id = ids(&out).remove(0);
    // The local cloud's own parts see moto at once: the node starts.
    cloud
        .wait_for_node(&id, Duration::from_secs(3))
        .expect("a node before the listing shows the instance");
    let early = cloud.block_on({
        let (ec2, id) = (ec2.clone(), id.clone());
        async move {
            let listing = list(&ec2, vec![tag_filter("Name", "lagging")]).await;
            let by_id = ec2.describe_instances().instance_ids(&id).send().await;
            (listing, by_id)
        }
    });
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "too slow to see the lag"
    );
    assert!(
        early.0.expect("listing").is_empty(),
        "listed before its lag"
    );
    let e = early.1.expect_err("described by id before its lag");
    assert_eq!(
        code_status(&e),
        ("InvalidInstanceID.NotFound".to_string(), 400)
    );

    let listed = wait_for(WAIT, "the instance to be listed", || {
        let ec2 = ec2.clone();
        let found = cloud
            .block_on(async move { list(&ec2, vec![tag_filter("Name", "lagging")]).await })
            .ok()?;
        (!found.is_empty()).then(|| (sent.elapsed(), found))
    });
    assert!(
        listed.0 >= Duration::from_secs(3),
        "listed after {:?}",
        listed.0
    );
    assert_eq!(listed.1[0].id, id);
    assert_eq!(
        listed.1[0].tags.get("Name").map(String::as_str),
        Some("lagging")
    );
}

#[test]
fn the_default_lag_is_between_half_a_second_and_three() {
    let cloud = start(LocalCloudOptions::default());
    let ec2 = ec2_as(&cloud, "default-lag");
    let sent = Instant::now();
    let id = cloud
        .block_on({
            let (ec2, launch) = (ec2.clone(), Launch::new(&cloud, 1));
            async move { launch.send(&ec2).await }
        })
        .map(|o| ids(&o).remove(0))
        .expect("RunInstances");
    let seen = wait_for(WAIT, "the instance to be described", || {
        let (ec2, id) = (ec2.clone(), id.clone());
        cloud
            .block_on(async move { ec2.describe_instances().instance_ids(id).send().await })
            .ok()
            .map(|_| sent.elapsed())
    });
    assert!(seen >= Duration::from_millis(500), "visible after {seen:?}");
    // 3 s, plus a poll interval and the call itself.
    assert!(seen < Duration::from_millis(3500), "visible after {seen:?}");
}

#[test]
fn a_tag_change_is_listed_only_after_its_lag() {
    let cloud = start(LocalCloudOptions {
        listing_lag: Lag::Fixed(Duration::from_secs(2)),
        ..LocalCloudOptions::default()
    });
    let ec2 = ec2_as(&cloud, "tags");
    let id = cloud
        .block_on({
            let (ec2, launch) = (ec2.clone(), Launch::new(&cloud, 0).tag("phase", "serving"));
            async move { launch.send(&ec2).await }
        })
        .map(|o| ids(&o).remove(0))
        .expect("RunInstances");
    wait_for(WAIT, "the instance to be listed", || {
        let ec2 = ec2.clone();
        cloud
            .block_on(async move { list(&ec2, vec![tag_filter("phase", "serving")]).await })
            .ok()
            .filter(|l| !l.is_empty())
    });

    let changed = Instant::now();
    let shown = |filters: Vec<Filter>| {
        let ec2 = ec2.clone();
        cloud
            .block_on(async move { list(&ec2, filters).await })
            .expect("DescribeInstances")
    };
    cloud
        .block_on({
            let (ec2, id) = (ec2.clone(), id.clone());
            async move {
                ec2.create_tags()
                    .resources(id)
                    .tags(Tag::builder().key("phase").value("draining").build())
                    .tags(Tag::builder().key("since").value("now").build())
                    .send()
                    .await
            }
        })
        .expect("CreateTags");
    // moto has the new values at once …
    let truth = {
        let ec2 = cloud.moto_clients().ec2.clone();
        cloud
            .block_on(async move { list(&ec2, vec![tag_filter("phase", "draining")]).await })
            .expect("moto DescribeInstances")
    };
    assert_eq!(truth.len(), 1);
    // … the listing the old ones, tag filters included.
    let old = shown(vec![]);
    let listed = old.iter().find(|l| l.id == id).expect("still listed");
    assert_eq!(
        listed.tags.get("phase").map(String::as_str),
        Some("serving")
    );
    assert!(!listed.tags.contains_key("since"));
    assert_eq!(shown(vec![tag_filter("phase", "serving")]).len(), 1);
    assert!(shown(vec![tag_filter("phase", "draining")]).is_empty());
    assert!(
        changed.elapsed() < Duration::from_secs(2),
        "too slow to see the lag"
    );

    let when = wait_for(WAIT, "the new tag values to be listed", || {
        let now = shown(vec![tag_filter("phase", "draining")]);
        now.first()
            .filter(|l| l.tags.get("since").map(String::as_str) == Some("now"))
            .map(|_| changed.elapsed())
    });
    assert!(when >= Duration::from_secs(2), "visible after {when:?}");
    assert!(shown(vec![tag_filter("phase", "serving")]).is_empty());

    // A deletion lags the same way.
    let deleted = Instant::now();
    cloud
        .block_on({
            let (ec2, id) = (ec2.clone(), id.clone());
            async move {
                ec2.delete_tags()
                    .resources(id)
                    .tags(Tag::builder().key("since").build())
                    .send()
                    .await
            }
        })
        .expect("DeleteTags");
    assert_eq!(
        shown(vec![])
            .iter()
            .find(|l| l.id == id)
            .and_then(|l| l.tags.get("since").cloned()),
        Some("now".to_string())
    );
    let gone = wait_for(WAIT, "the deleted tag to vanish", || {
        let now = shown(vec![]);
        now.iter()
            .find(|l| l.id == id && !l.tags.contains_key("since"))
            .map(|_| deleted.elapsed())
    });
    assert!(gone >= Duration::from_secs(2), "deleted after {gone:?}");
}

/// Stop, start and terminate as `DescribeInstances` shows them: the state
/// before the call (filters included) until the change's own lag.
#[test]
fn a_state_change_is_listed_only_after_its_lag() {
    let cloud = start(LocalCloudOptions {
        listing_lag: Lag::Fixed(Duration::from_secs(2)),
        ..LocalCloudOptions::default()
    });
    let ec2 = ec2_as(&cloud, "states");
    let id = cloud
        .block_on({
            let (ec2, launch) = (ec2.clone(), Launch::new(&cloud, 0));
            async move { launch.send(&ec2).await }
        })
        .map(|o| ids(&o).remove(0))
        .expect("RunInstances");
    let listed = |ec2: &aws_sdk_ec2::Client, filters: Vec<Filter>| -> Option<String> {
        let (ec2, id) = (ec2.clone(), id.clone());
        cloud
            .block_on(async move { list(&ec2, filters).await })
            .expect("DescribeInstances")
            .into_iter()
            .find(|l| l.id == id)
            .map(|l| l.state)
    };
    let state_filter = |state: &str| {
        vec![Filter::builder()
            .name("instance-state-name")
            .values(state)
            .build()]
    };
    let moto = cloud.moto_clients().ec2.clone();
    wait_for(WAIT, "the instance to be listed running", || {
        listed(&ec2, vec![]).filter(|s| s == "running")
    });

    let steps: [(StateChange, &str, &[&str]); 3] = [
        (StateChange::Stop, "running", &["stopping", "stopped"]),
        (StateChange::Start, "stopped", &["pending", "running"]),
        (
            StateChange::Terminate,
            "running",
            &["shutting-down", "terminated"],
        ),
    ];
    for (what, before, after) in steps {
        wait_for(WAIT, "moto to settle", || {
            listed(&moto, vec![]).filter(|s| s == before)
        });
        wait_for(WAIT, "the listing to settle", || {
            listed(&ec2, vec![]).filter(|s| s == before)
        });
        let changed = Instant::now();
        cloud
            .block_on(what.send(&ec2, &id))
            .unwrap_or_else(|e| panic!("{what:?}: {e}"));
        let truth = listed(&moto, vec![]).unwrap_or_default();
        assert!(
            after.contains(&truth.as_str()),
            "{what:?}: moto says {truth}"
        );
        assert_eq!(listed(&ec2, vec![]).as_deref(), Some(before), "{what:?}");
        assert_eq!(
            listed(&ec2, state_filter(before)).as_deref(),
            Some(before),
            "{what:?}"
        );
        for a in after {
            assert_eq!(
                listed(&ec2, state_filter(a)),
                None,
                "{what:?}: filtered on {a}"
            );
        }
        assert!(
            changed.elapsed() < Duration::from_secs(2),
            "{what:?}: too slow to see the lag"
        );
        let when = wait_for(WAIT, "the new state to be listed", || {
            listed(&ec2, vec![])
                .filter(|s| after.contains(&s.as_str()))
                .map(|_| changed.elapsed())
        });
        assert!(
            when >= Duration::from_secs(2),
            "{what:?}: visible after {when:?}"
        );
    }
}

/// The three calls that change an instance's state, each lagged alike.
#[derive(Clone, Copy, Debug)]
enum StateChange {
    Stop,
    Start,
    Terminate,
}

impl StateChange {
    async fn send(self, ec2: &aws_sdk_ec2::Client, id: &str) -> Result<(), String> {
        fn shown<T, E: std::fmt::Debug>(sent: Result<T, E>) -> Result<(), String> {
            sent.map(drop).map_err(|e| format!("{e:?}"))
        }
        match self {
            StateChange::Stop => shown(ec2.stop_instances().instance_ids(id).send().await),
            StateChange::Start => shown(ec2.start_instances().instance_ids(id).send().await),
            StateChange::Terminate => {
                shown(ec2.terminate_instances().instance_ids(id).send().await)
            }
        }
    }
}

// ---- capacity --------------------------------------------------------------------

#[test]
fn a_subnet_without_capacity_refuses_launches_until_lifted() {
    let cloud = start(LocalCloudOptions::default());
    let ec2 = ec2_as(&cloud, "capacity");
    let (a, b) = (Launch::new(&cloud, 0), Launch::new(&cloud, 1));
    let subnet_a = a.subnet.clone();
    cloud.set_subnet_capacity(&subnet_a, Capacity::Insufficient);
    let before = moto_instance_count(&cloud);
    let (refused, elsewhere) = cloud.block_on({
        let (ec2, a, b) = (ec2.clone(), a.clone(), b.clone());
        async move { (a.send(&ec2).await, b.send(&ec2).await) }
    });
    let e = refused.expect_err("no capacity in the first subnet");
    assert_eq!(
        code_status(&e),
        ("InsufficientInstanceCapacity".to_string(), 500)
    );
    assert!(
        e.message().unwrap_or_default().contains("capacity"),
        "{e:?}"
    );
    elsewhere.expect("the other subnet still launches");
    assert_eq!(moto_instance_count(&cloud), before + 1);

    // The same control over the admin API (what `infra/local/cloud capacity` uses).
    let endpoint = cloud.endpoint();
    let listed = admin::request(&endpoint, "GET", "capacity").expect("GET capacity");
    let listed: BTreeMap<String, String> = serde_json::from_str(&listed).unwrap();
    assert_eq!(
        listed.get(&subnet_a).map(String::as_str),
        Some("insufficient")
    );
    admin::request(
        &endpoint,
        "POST",
        &format!("capacity/{subnet_a}/unsupported"),
    )
    .expect("POST capacity");
    let e = cloud
        .block_on({
            let (ec2, a) = (ec2.clone(), a.clone());
            async move { a.send(&ec2).await }
        })
        .expect_err("unsupported there");
    assert_eq!(code_status(&e), ("Unsupported".to_string(), 400));
    assert!(admin::request(&endpoint, "POST", &format!("capacity/{subnet_a}/plenty")).is_err());

    admin::request(&endpoint, "POST", &format!("capacity/{subnet_a}/on")).expect("lift");
    assert!(cloud.gateway().subnet_capacities().is_empty());
    cloud
        .block_on(async move { a.send(&ec2).await })
        .expect("launches again once lifted");
    assert_eq!(moto_instance_count(&cloud), before + 2);
}

// ---- target health and draining -----------------------------------------------

/// The ALB's documented behaviour: "After your target is registered, it
/// must pass one health check to be considered healthy";
/// `HealthyThresholdCount` is "the number of consecutive successful health
/// checks required before considering an *unhealthy* target healthy".
#[test]
fn a_new_target_is_healthy_at_its_first_passing_check_a_recovering_one_only_after_the_threshold() {
    let cloud = start(LocalCloudOptions::default());
    let rt = test_runtime();
    let elb = elb_as(&cloud, "health");
    let arn = cloud.target_group_arn().to_string();
    cloud
        .block_on({
            let (elb, arn) = (elb.clone(), arn.clone());
            async move {
                elb.modify_target_group()
                    .target_group_arn(arn)
                    .healthy_threshold_count(5)
                    .unhealthy_threshold_count(2)
                    .send()
                    .await
            }
        })
        .expect("ModifyTargetGroup");
    let instance = cloud.launch(1).unwrap().remove(0);
    // The LB knows the target's address once the host manager has its node.
    cloud.wait_for_node(&instance.id, WAIT).unwrap();
    let app = Backend::start(&rt, instance.private_ip, 200);
    let health = |cloud: &LocalCloud| {
        cloud
            .lb()
            .targets()
            .into_iter()
            .find(|t| t.instance_id == instance.id)
            .map(|t| t.health)
    };
    cloud.register(&[&instance.id]).unwrap();
    let passes_when_healthy = wait_for(WAIT, "healthy", || {
        let checks = app.health_checks();
        (health(&cloud) == Some(Health::Healthy)).then_some(checks)
    });
    // Counted before the state was read, 10 ms apart against checks 200 ms
    // apart: the pass that made it healthy (one more only if this thread
    // stalled that long).
    assert!(
        passes_when_healthy <= 2,
        "a new target needed {passes_when_healthy} passing checks"
    );
    assert_eq!(
        target_health(&cloud, &elb, &instance.id).0.as_deref(),
        Some("healthy")
    );

    app.set_health(500);
    wait_for(WAIT, "unhealthy", || {
        (health(&cloud) == Some(Health::Unhealthy)).then_some(())
    });
    let checks_before_recovery = app.health_checks();
    app.set_health(200);
    // From unhealthy it takes the group's five passes.
    let mut most_passes_while_unhealthy = 0;
    let passes_to_recover = loop {
        let passes = app.health_checks() - checks_before_recovery;
        match health(&cloud) {
            Some(Health::Healthy) => break app.health_checks() - checks_before_recovery,
            Some(Health::Unhealthy) => {
                most_passes_while_unhealthy = most_passes_while_unhealthy.max(passes)
            }
            other => panic!("unexpected health {other:?}"),
        }
        assert!(app.started.elapsed() < WAIT * 2, "never healthy again");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        passes_to_recover >= 5,
        "healthy again after {passes_to_recover} checks"
    );
    assert!(
        most_passes_while_unhealthy >= 3,
        "still unhealthy after only {most_passes_while_unhealthy} passing checks"
    );
}

#[test]
fn health_checks_follow_the_groups_interval() {
    let cloud = start(LocalCloudOptions {
        // No override: the target group's HealthCheckIntervalSeconds rules,
        // as on an ALB (the test defaults check every 200 ms).
        health: hangar_local::lb::HealthCheckOptions {
            interval: None,
            ..LocalCloudOptions::default().health
        },
        ..LocalCloudOptions::default()
    });
    let rt = test_runtime();
    let elb = elb_as(&cloud, "interval");
    let arn = cloud.target_group_arn().to_string();
    cloud
        .block_on({
            let elb = elb.clone();
            async move {
                elb.modify_target_group()
                    .target_group_arn(arn)
                    .health_check_interval_seconds(1)
                    .send()
                    .await
            }
        })
        .expect("ModifyTargetGroup");
    let instance = cloud.launch(1).unwrap().remove(0);
    // The LB knows the target's address once the host manager has its node.
    cloud.wait_for_node(&instance.id, WAIT).unwrap();
    let app = Backend::start(&rt, instance.private_ip, 200);
    let registered = Instant::now();
    cloud.register(&[&instance.id]).unwrap();
    let healthy_after = wait_for(WAIT, "healthy", || {
        cloud
            .lb()
            .routable()
            .contains(&instance.id)
            .then(|| registered.elapsed())
    });
    // A new target: healthy at its first pass, long before a second check.
    assert!(
        healthy_after < Duration::from_millis(900),
        "healthy after {healthy_after:?}"
    );
    let times = wait_for(WAIT, "three checks", || {
        let times = app.health_check_times();
        (times.len() >= 3).then_some(times)
    });
    for pair in times.windows(2) {
        let gap = pair[1].duration_since(pair[0]);
        assert!(gap >= Duration::from_millis(900), "checks {gap:?} apart");
    }
}

#[test]
fn deregistration_drains_in_flight_requests_and_reports_draining_for_the_delay() {
    let cloud = start(LocalCloudOptions {
        deregistration_delay: Duration::from_secs(3),
        ..LocalCloudOptions::default()
    });
    let rt = test_runtime();
    let elb = elb_as(&cloud, "drain");
    let instance = cloud.launch(1).unwrap().remove(0);
    // The LB knows the target's address once the host manager has its node.
    cloud.wait_for_node(&instance.id, WAIT).unwrap();
    let app = Backend::start(&rt, instance.private_ip, 200);
    cloud.register(&[&instance.id]).unwrap();
    wait_for(WAIT, "routable", || {
        cloud.lb().routable().contains(&instance.id).then_some(())
    });
    let lb = cloud.lb_url();
    let slow = std::thread::spawn(move || http_get(&lb, "/slow"));
    wait_for(WAIT, "the slow request in flight", || {
        (cloud.lb().in_flight(&instance.id) == 1).then_some(())
    });
    let deregistered = Instant::now();
    cloud.deregister(&[&instance.id]).unwrap();
    let (state, reason) = target_health(&cloud, &elb, &instance.id);
    assert_eq!(state.as_deref(), Some("draining"));
    assert_eq!(reason.as_deref(), Some("Target.DeregistrationInProgress"));
    // No new request goes there; the LB has no other target.
    assert_eq!(http_get(&cloud.lb_url(), "/"), 502);
    assert_eq!(app.requests(), 1);

    app.release_slow();
    assert_eq!(slow.join().unwrap(), 200, "the in-flight request completed");
    wait_for(WAIT, "the data plane to finish draining", || {
        cloud
            .lb()
            .targets()
            .iter()
            .all(|t| t.instance_id != instance.id)
            .then_some(())
    });
    assert!(
        deregistered.elapsed() < Duration::from_secs(3),
        "drained too slowly to tell"
    );
    // An ALB reports it draining until the delay has passed …
    assert_eq!(
        target_health(&cloud, &elb, &instance.id).0.as_deref(),
        Some("draining")
    );
    // … then it is gone.
    let gone = wait_for(WAIT, "the target to leave DescribeTargetHealth", || {
        target_health(&cloud, &elb, &instance.id)
            .0
            .is_none()
            .then(|| deregistered.elapsed())
    });
    assert!(gone >= Duration::from_secs(3), "gone after {gone:?}");
}

/// ELB answers a `DeregisterTargets` of a target that is not (or no longer)
/// registered with success and does nothing — a drain retried after an
/// operator crash does exactly that; moto refuses it with `InvalidTarget`.
#[test]
fn deregistering_a_target_that_is_not_registered_succeeds_and_does_nothing() {
    let cloud = start(LocalCloudOptions::default());
    let rt = test_runtime();
    let elb = elb_as(&cloud, "drain-again");
    let instance = cloud.launch(1).unwrap().remove(0);
    let target = aws_sdk_elasticloadbalancingv2::types::TargetDescription::builder()
        .id(&instance.id)
        .build();
    let deregister = || {
        rt.block_on(
            elb.deregister_targets()
                .target_group_arn(cloud.target_group_arn())
                .targets(target.clone())
                .send(),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    };
    deregister().expect("never registered: nothing to do");
    cloud.register(&[&instance.id]).unwrap();
    deregister().expect("registered: deregistered");
    deregister().expect("deregistered already: nothing to do");
    assert!(
        cloud
            .lb()
            .targets()
            .iter()
            .all(|t| t.instance_id != instance.id || !t.registered),
        "{:?}",
        cloud.lb().targets()
    );
}

// ---- throttling ------------------------------------------------------------------

#[test]
fn run_instances_is_throttled_after_a_burst_of_five_and_refills_at_two_per_second() {
    let cloud = start(LocalCloudOptions::default());
    let ec2 = ec2_as(&cloud, "burst");
    let launch = Launch::new(&cloud, 0);
    let burst = |n: usize| {
        let (ec2, launch) = (ec2.clone(), launch.clone());
        cloud.block_on(async move {
            let calls: Vec<_> = (0..n)
                .map(|_| {
                    let (ec2, launch) = (ec2.clone(), launch.clone());
                    tokio::spawn(async move { launch.send(&ec2).await })
                })
                .collect();
            let mut outs = Vec::new();
            for call in calls {
                outs.push(call.await.expect("task"));
            }
            outs
        })
    };
    let started = Instant::now();
    let outs = burst(10);
    assert!(
        started.elapsed() < Duration::from_millis(1200),
        "the burst took {:?}: too slow to measure the refill",
        started.elapsed()
    );
    let ok = outs.iter().filter(|o| o.is_ok()).count();
    let throttled: Vec<(String, u16)> = outs
        .iter()
        .filter_map(|o| o.as_ref().err().map(code_status))
        .collect();
    assert_eq!(ok, 5, "{throttled:?}");
    assert!(
        throttled
            .iter()
            .all(|c| c == &("RequestLimitExceeded".to_string(), 503)),
        "{throttled:?}"
    );
    // The refill is what is measured: 1.25 s after the burst began, at 2
    // tokens/s, the bucket holds 2 to 2.5 tokens.
    std::thread::sleep(Duration::from_millis(1250).saturating_sub(started.elapsed()));
    let outs = burst(3);
    assert_eq!(outs.iter().filter(|o| o.is_ok()).count(), 2, "{outs:?}");
    let counts = cloud.api_calls().get("burst", "ec2", "RunInstances");
    assert_eq!((counts.calls, counts.throttled, counts.errors), (13, 6, 0));
    // Another key has buckets of its own.
    cloud
        .block_on({
            let ec2 = ec2_as(&cloud, "not-burst");
            async move { launch.send(&ec2).await }
        })
        .expect("another key is not throttled");
}

#[test]
fn elb_describes_are_throttled_with_throttling_400() {
    let cloud = start(LocalCloudOptions::default());
    let elb = elb_as(&cloud, "elb-burst");
    let arn = cloud.target_group_arn().to_string();
    let outs = cloud.block_on(async move {
        let calls: Vec<_> = (0..45)
            .map(|_| {
                let (elb, arn) = (elb.clone(), arn.clone());
                tokio::spawn(async move {
                    elb.describe_target_health()
                        .target_group_arn(arn)
                        .send()
                        .await
                })
            })
            .collect();
        let mut outs = Vec::new();
        for call in calls {
            outs.push(call.await.expect("task"));
        }
        outs
    });
    let errors: Vec<(String, u16)> = outs
        .iter()
        .filter_map(|o| o.as_ref().err().map(code_status))
        .collect();
    // 40 tokens; a few may refill (10/s) while 45 calls arrive.
    assert!((3..=5).contains(&errors.len()), "{errors:?}");
    assert!(
        errors.iter().all(|e| e == &("Throttling".to_string(), 400)),
        "{errors:?}"
    );
}

// ---- accounting and blocking ------------------------------------------------

#[test]
fn calls_are_counted_per_access_key_and_action() {
    let cloud = start(LocalCloudOptions::default());
    let (a, b) = (ec2_as(&cloud, "key-a"), ec2_as(&cloud, "key-b"));
    cloud.block_on(async move {
        for _ in 0..3 {
            a.describe_instances().send().await.expect("describe");
        }
        a.terminate_instances()
            .instance_ids("i-0000000000000000f")
            .send()
            .await
            .expect_err("no such instance");
        for _ in 0..2 {
            b.describe_instances().send().await.expect("describe");
        }
    });
    let calls = cloud.api_calls();
    let describe_a = calls.get("key-a", "ec2", "DescribeInstances");
    assert_eq!(
        (describe_a.calls, describe_a.errors, describe_a.throttled),
        (3, 0, 0)
    );
    let terminate_a = calls.get("key-a", "ec2", "TerminateInstances");
    assert_eq!((terminate_a.calls, terminate_a.errors), (1, 1));
    assert_eq!(calls.total("key-a").calls, 4);
    assert_eq!(calls.total("key-b").calls, 2);
    assert_eq!(calls.action("key-b", "DescribeInstances").calls, 2);
    // The harness's own calls are under its key, not hangar's.
    assert!(calls.total(hangar_local::aws::HARNESS_ACCESS_KEY_ID).calls == 0);
    // The same numbers over the admin API.
    let json = admin::request(&cloud.endpoint(), "GET", "calls").expect("GET calls");
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["key-a"]["ec2:DescribeInstances"]["calls"], 3);
    assert_eq!(json["key-b"]["ec2:DescribeInstances"]["calls"], 2);
    admin::request(&cloud.endpoint(), "POST", "calls/reset").expect("reset");
    assert_eq!(cloud.api_calls().total("key-a").calls, 0);
}

#[test]
fn blocking_dynamodb_for_one_key_resets_only_that_keys_dynamodb_calls() {
    let cloud = start(LocalCloudOptions::default());
    let dynamo = |key: &str| {
        let sdk = cloud.clients_as(key).sdk;
        aws_sdk_dynamodb::Client::from_conf(
            aws_sdk_dynamodb::config::Builder::from(&sdk)
                .retry_config(RetryConfig::disabled())
                .build(),
        )
    };
    let (leader, follower) = (dynamo("operator-a"), dynamo("operator-b"));
    let follower_ec2 = ec2_as(&cloud, "operator-b");
    cloud
        .block_on({
            let leader = leader.clone();
            async move {
                use aws_sdk_dynamodb::types::{
                    AttributeDefinition, BillingMode, KeySchemaElement, KeyType,
                    ScalarAttributeType,
                };
                leader
                    .create_table()
                    // Not the seeded lease table: a table of this test's own.
                    .table_name("blocking-test")
                    .billing_mode(BillingMode::PayPerRequest)
                    .attribute_definitions(
                        AttributeDefinition::builder()
                            .attribute_name("name")
                            .attribute_type(ScalarAttributeType::S)
                            .build()
                            .unwrap(),
                    )
                    .key_schema(
                        KeySchemaElement::builder()
                            .attribute_name("name")
                            .key_type(KeyType::Hash)
                            .build()
                            .unwrap(),
                    )
                    .send()
                    .await
            }
        })
        .expect("CreateTable through the gateway");

    cloud.block("operator-b", "dynamodb");
    let (blocked, leader_ok, ec2_ok) = cloud.block_on({
        let (leader, follower, follower_ec2) =
            (leader.clone(), follower.clone(), follower_ec2.clone());
        async move {
            (
                follower.list_tables().send().await,
                leader.list_tables().send().await,
                follower_ec2.describe_instances().send().await,
            )
        }
    });
    let e = blocked.expect_err("operator-b's DynamoDB is cut off");
    assert!(
        matches!(e, SdkError::DispatchFailure(_) | SdkError::ResponseError(_)),
        "a network failure, not an answer: {e:?}"
    );
    let tables = leader_ok.expect("operator-a's DynamoDB still works");
    assert!(
        tables.table_names().contains(&"blocking-test".to_string()),
        "{:?}",
        tables.table_names()
    );
    ec2_ok.expect("operator-b's EC2 still works");
    let calls = cloud.api_calls();
    assert_eq!(calls.get("operator-b", "dynamodb", "ListTables").blocked, 1);
    assert_eq!(calls.get("operator-a", "dynamodb", "ListTables").blocked, 0);

    cloud.unblock("operator-b", "dynamodb");
    cloud
        .block_on(async move { follower.list_tables().send().await })
        .expect("unblocked");
}

#[test]
fn s3_uploads_pass_through_the_gateway() {
    let cloud = start(LocalCloudOptions::default());
    let s3 = cloud.clients().s3.clone();
    let bucket = cloud.seeded().bucket.clone();
    // 8 MiB of non-repeating bytes, one PutObject.
    let body: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let back = cloud.block_on({
        let body = body.clone();
        async move {
            s3.put_object()
                .bucket(&bucket)
                .key("big/blob")
                .body(body.into())
                .send()
                .await
                .expect("PutObject");
            s3.get_object()
                .bucket(&bucket)
                .key("big/blob")
                .send()
                .await
                .expect("GetObject")
                .body
                .collect()
                .await
                .expect("body")
                .into_bytes()
        }
    });
    assert!(
        back.as_ref() == body.as_slice(),
        "the object came back different"
    );
}

// ---- helpers -----------------------------------------------------------------------

/// `DescribeTargetHealth` of one target through the gateway: `(state, reason)`;
/// `(None, None)` when it is not listed.
fn target_health(
    cloud: &LocalCloud,
    elb: &aws_sdk_elasticloadbalancingv2::Client,
    id: &str,
) -> (Option<String>, Option<String>) {
    let (elb, arn, id) = (
        elb.clone(),
        cloud.target_group_arn().to_string(),
        id.to_string(),
    );
    let out = cloud
        .block_on(async move {
            elb.describe_target_health()
                .target_group_arn(arn)
                .send()
                .await
        })
        .expect("DescribeTargetHealth");
    out.target_health_descriptions()
        .iter()
        .find(|d| d.target().and_then(|t| t.id()) == Some(id.as_str()))
        .and_then(|d| d.target_health())
        .map(|h| {
            (
                h.state().map(|s| s.as_str().to_string()),
                h.reason().map(|r| r.as_str().to_string()),
            )
        })
        .unwrap_or((None, None))
}

fn test_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// `GET url+path` over a fresh connection; the status (0: no answer).
fn http_get(base: &str, path: &str) -> u16 {
    use std::io::{Read, Write};
    let addr = base.trim_start_matches("http://");
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// A target app on an instance's IP, port 80: `/health` answers
/// `health_status`; `/slow` waits for [`Backend::release_slow`].
struct Backend {
    requests: Arc<AtomicUsize>,
    /// The status its `/health` answers with.
    health: Arc<AtomicU16>,
    checks: Arc<Mutex<Vec<Instant>>>,
    release: watch::Sender<bool>,
    started: Instant,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    fn start(rt: &tokio::runtime::Runtime, ip: Ipv4Addr, health_status: u16) -> Backend {
        let requests = Arc::new(AtomicUsize::new(0));
        let health = Arc::new(AtomicU16::new(health_status));
        let checks = Arc::new(Mutex::new(Vec::new()));
        let (release, released) = watch::channel(false);
        let listener = rt
            .block_on(tokio::net::TcpListener::bind((ip, 80)))
            .expect("bind the app port on the instance IP");
        let task = rt.spawn({
            let (requests, checks, health) = (requests.clone(), checks.clone(), health.clone());
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let (requests, checks, released, health) = (
                        requests.clone(),
                        checks.clone(),
                        released.clone(),
                        health.clone(),
                    );
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(
                            move |req: Request<hyper::body::Incoming>| {
                                let (requests, checks, mut released, health) = (
                                    requests.clone(),
                                    checks.clone(),
                                    released.clone(),
                                    health.clone(),
                                );
                                async move {
                                    let status = if req.uri().path() == "/health" {
                                        checks
                                            .lock()
                                            .unwrap_or_else(|p| p.into_inner())
                                            .push(Instant::now());
                                        health.load(Ordering::SeqCst)
                                    } else {
                                        requests.fetch_add(1, Ordering::SeqCst);
                                        if req.uri().path() == "/slow" {
                                            let _ = released.wait_for(|r| *r).await;
                                        }
                                        200
                                    };
                                    Response::builder()
                                        .status(status)
                                        .body(Full::new(Bytes::from_static(b"ok\n")))
                                }
                            },
                        );
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            }
        });
        Backend {
            requests,
            health,
            checks,
            release,
            started: Instant::now(),
            task,
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    fn health_checks(&self) -> usize {
        self.checks.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn health_check_times(&self) -> Vec<Instant> {
        self.checks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_health(&self, status: u16) {
        self.health.store(status, Ordering::SeqCst);
    }

    fn release_slow(&self) {
        self.release.send_replace(true);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.release.send_replace(true);
        self.task.abort();
    }
}
