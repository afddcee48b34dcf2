//! [`LocalCloud`]: the whole local cloud inside one test — moto, seeding,
//! host manager, LB and metrics — torn down on drop, by PID, panics included.
//!
//! ```no_run
//! use std::time::Duration;
//! use hangar_local::{eventually, LocalCloud, LocalCloudOptions, ReleaseKind};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let specs = std::path::PathBuf::from("/tmp/specs");
//! # let hangar_bin = "target/debug/hangar";
//! let cloud = LocalCloud::start(LocalCloudOptions::default())?;
//! // A spec pointing at the seeded account (release v1), adjusted by path.
//! cloud.spec().with_capacity(2, 4).write(&specs)?;
//! let mut hangar = std::process::Command::new(hangar_bin)
//!     .args(["run", "--specs"])
//!     .arg(&specs)
//!     .envs(cloud.env()) // AWS_ENDPOINT_URL, AWS_REGION, credentials, HANGAR_LOCAL_*
//!     .spawn()?;
//! // Poll conditions, never sleep.
//! eventually(Duration::from_secs(120), "2 nodes serving", || {
//!     (cloud.lb().routable().len() == 2).then_some(())
//! })?;
//! // Steady traffic through the LB while a new release rolls out.
//! let load = cloud.start_load(20.0, None)?;
//! let v2 = cloud.upload_release("v2", ReleaseKind::Good)?;
//! cloud.spec().with_capacity(2, 4).with_release(&v2).write(&specs)?;
//! eventually(Duration::from_secs(180), "every node on v2", || {
//!     let nodes = cloud.nodes();
//!     nodes
//!         .iter()
//!         .all(|n| {
//!             cloud
//!                 .exec_inside(&n.instance_id, "readlink /srv/app/current")
//!                 .map(|o| String::from_utf8_lossy(&o.stdout).trim().ends_with("/v2"))
//!                 .unwrap_or(false)
//!         })
//!         .then_some(())
//! })?;
//! let report = load.stop();
//! assert_eq!(report.errors, 0);
//! // Which node served each request, with what status and release.
//! let log = cloud.lb().requests();
//! assert!(log.iter().all(|r| r.ok()));
//! hangar.kill()?;
//! # Ok(()) }
//! ```
//!
//! Isolation: each cloud leases a [`Slot`] (its own VPC CIDR and LB address
//! inside 127.0.0.0/8), so clouds run in parallel threads of one test binary
//! and in parallel processes. Everything it starts is a child of the test
//! process or a node recorded under its state directory; a test binary
//! killed with SIGKILL leaves its nodes behind, and the next cloud to lease
//! the same slot kills them first.
//!
//! Every method blocks; they are safe to call from async tests too (work
//! runs on the cloud's own runtime), though an async test may prefer its
//! own SDK clients from [`LocalCloud::sdk_config`].

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use aws_sdk_elasticloadbalancingv2::types::TargetDescription;

use crate::artifact::{Artifact, ArtifactError, ReleaseKind};
use crate::aws::{error_chain, Clients};
use crate::debian::{DebianError, NodeKind};
use crate::gateway::{ApiCalls, Capacity, Gateway, Lag, Semantics, ThrottleLimits};
use crate::hosts::{HostsError, NodeView};
use crate::lb::{HealthCheckOptions, Lb};
use crate::load::{LoadError, LoadGenerator, LoadOptions};
use crate::metrics::Publisher;
use crate::moto::{Moto, MotoError, MotoOptions};
use crate::node::{self, ClientKey, NodeError};
use crate::seed::{SeedError, SeedOptions, Seeded};
use crate::services::{ServiceOptions, Services, ServicesError};
use crate::slot::{self, Slot, SlotError, SlotLease};
use crate::spec::{ClusterSpec, SpecInputs};

#[derive(Debug, thiserror::Error)]
pub enum LocalCloudError {
    #[error("{0} — install what is missing with `sudo infra/local/setup`")]
    Prerequisite(NodeError),
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error("moto: {0}\n(`sudo infra/local/setup` installs everything the local cloud needs)")]
    Moto(#[from] MotoError),
    #[error(transparent)]
    Seed(#[from] SeedError),
    #[error(transparent)]
    Services(#[from] ServicesError),
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error(transparent)]
    Hosts(#[from] HostsError),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Debian(#[from] DebianError),
    #[error("{what}: {message}")]
    Aws { what: String, message: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out after {waited:?} waiting for {what}")]
    Timeout { what: String, waited: Duration },
}

fn aws<E: std::error::Error + 'static>(
    what: impl Into<String>,
) -> impl FnOnce(E) -> LocalCloudError {
    let what = what.into();
    move |e| LocalCloudError::Aws {
        what,
        message: error_chain(&e),
    }
}

/// How a test's cloud behaves. The defaults are fast: health checks every
/// 200 ms, metrics every second.
#[derive(Clone, Debug)]
pub struct LocalCloudOptions {
    /// `None`: any free test slot (1..). Slot 0 is the quickstart's.
    pub slot: Option<u8>,
    /// Key, node state. Default `/tmp/hangar-local/slot-<n>`, wiped at start.
    pub state_dir: Option<PathBuf>,
    pub host_poll: Duration,
    pub target_poll: Duration,
    pub health: HealthCheckOptions,
    /// Whole seconds; make it divide the spec's metric period.
    pub metrics_interval: Duration,
    /// Default: the slot's `127.(77+n).0.1:80`.
    pub lb_listen: Option<SocketAddr>,
    /// The AWS endpoint (moto behind the ALB-aware [`crate::gateway`]).
    /// Default: the slot's `127.(77+n).0.1:4566`.
    pub gateway_listen: Option<SocketAddr>,
    pub deregistration_delay: Duration,
    /// The seeded resources' name and the default spec's `metadata.name`.
    pub cluster_name: String,
    pub moto: MotoOptions,
    // AWS behaviours the gateway adds to moto (see `crate::gateway`): each
    // defaults to AWS's; switch one off only with a comment saying why.
    /// `RunInstances` `ClientToken` idempotency; `None`: off. Default 24 h.
    pub client_token_ttl: Option<Duration>,
    /// `DescribeInstances` lag for new instances, tag and state changes. Default
    /// uniform 0.5–3 s per change.
    pub listing_lag: Lag,
    /// API token buckets per access key; `None`: no throttling. Default AWS's.
    pub throttling: Option<ThrottleLimits>,
    /// `DescribeTargetHealth` shows a drained target `draining` until its
    /// deregistration delay passed, as an ALB does. Default `true`.
    pub draining_for_whole_delay: bool,
    /// What instances become: `lite` (default) or `debian` machines (see
    /// [`crate::debian`]; the VPC is then the slot's 198.18.0.0/15 share).
    pub nodes: NodeKind,
}

impl Default for LocalCloudOptions {
    fn default() -> Self {
        LocalCloudOptions {
            slot: None,
            state_dir: None,
            host_poll: Duration::from_millis(250),
            target_poll: Duration::from_millis(100),
            // Faster than an ALB can (5 s minimum); the thresholds are the
            // target group's (seeded 2/2).
            health: HealthCheckOptions {
                interval: Some(Duration::from_millis(200)),
                timeout: Some(Duration::from_secs(1)),
                healthy_threshold: None,
                unhealthy_threshold: None,
            },
            metrics_interval: Duration::from_secs(1),
            lb_listen: None,
            gateway_listen: None,
            deregistration_delay: Duration::from_secs(20),
            cluster_name: "web".into(),
            moto: MotoOptions::default(),
            client_token_ttl: Semantics::default().client_token_ttl,
            listing_lag: Lag::default(),
            throttling: Some(ThrottleLimits::default()),
            draining_for_whole_delay: true,
            nodes: NodeKind::Lite,
        }
    }
}

impl LocalCloudOptions {
    fn semantics(&self) -> Semantics {
        Semantics {
            client_token_ttl: self.client_token_ttl,
            listing_lag: self.listing_lag,
            throttling: self.throttling,
            draining_for_whole_delay: self.draining_for_whole_delay,
        }
    }
}

/// An instance a test launched itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launched {
    pub id: String,
    pub private_ip: Ipv4Addr,
}

/// A running local cloud. Dropping it stops every node (no process left in
/// any node namespace), the LB and moto.
pub struct LocalCloud {
    runtime: Option<tokio::runtime::Runtime>,
    services: Option<Services>,
    moto: Option<Moto>,
    /// Through the gateway: what hangar sees (signed with the harness's key).
    clients: Clients,
    /// Straight to moto: the truth, without lag or throttling.
    moto_clients: Clients,
    seeded: Seeded,
    key: ClientKey,
    state_dir: PathBuf,
    slot: Slot,
    _lease: SlotLease,
}

impl std::fmt::Debug for LocalCloud {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCloud")
            .field("slot", &self.slot)
            .field("moto", &self.moto)
            .field("state_dir", &self.state_dir)
            .finish()
    }
}

impl LocalCloud {
    /// Starts moto, seeds it, and starts the host manager, LB and metrics.
    pub fn start(options: LocalCloudOptions) -> Result<LocalCloud, LocalCloudError> {
        node::check_prerequisites().map_err(LocalCloudError::Prerequisite)?;
        // Built once and cached; minutes only on a fresh machine.
        let image = match options.nodes {
            NodeKind::Debian { image } => {
                crate::debian::check_prerequisites()?;
                Some(crate::debian::Image::ensure(image)?)
            }
            NodeKind::Lite => None,
        };
        let lease = match options.slot {
            Some(n) => Slot::new(n)?.lease()?,
            None => slot::lease_any()?,
        };
        let slot = lease.slot();
        let state_dir = options
            .state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/tmp/hangar-local/slot-{}", slot.index())));
        // A previous holder of this slot may have died without cleaning up.
        let nodes_dir = state_dir.join("nodes");
        let leftovers = crate::hosts::sweep(&nodes_dir)?;
        if leftovers > 0 {
            tracing::warn!(leftovers, %slot, "killed nodes a previous run left behind");
        }
        // Bridge, namespaces, mounts and processes of a crashed debian run.
        if image.is_some() || !crate::debian::leftovers(slot.bridged(), &state_dir).is_empty() {
            let machines = crate::debian::sweep(slot.bridged(), &state_dir)?;
            if !machines.is_empty() {
                tracing::warn!(?machines, %slot, "removed what a previous run's debian nodes left behind");
            }
        }
        let _ = std::fs::remove_dir_all(&state_dir);
        std::fs::create_dir_all(&state_dir).map_err(|source| LocalCloudError::Io {
            context: format!("creating {}", state_dir.display()),
            source,
        })?;
        let key = ClientKey::generate(&state_dir, "id_ed25519")?;

        let moto = Moto::start_with(options.moto.clone())?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("hangar-local")
            .enable_all()
            .build()
            .map_err(|source| LocalCloudError::Io {
                context: "building the local cloud's runtime".into(),
                source,
            })?;

        let endpoint = moto.endpoint().to_string();
        let mut seed_options = SeedOptions::new(slot);
        seed_options.name = options.cluster_name.clone();
        seed_options.deregistration_delay = options.deregistration_delay;
        if image.is_some() {
            seed_options = seed_options.bridged();
        }
        let debian = image.map(|image| {
            crate::debian::DebianOptions::new(image, slot.bridged(), state_dir.join("debian"))
        });
        let service_options = ServiceOptions {
            slot,
            nodes_dir,
            authorized_key: key.public_key.clone(),
            adopt: false,
            host_poll: options.host_poll,
            lb_listen: options.lb_listen.unwrap_or_else(|| slot.lb_addr()),
            gateway_listen: options
                .gateway_listen
                .unwrap_or_else(|| slot.gateway_addr()),
            moto_endpoint: endpoint.clone(),
            target_poll: options.target_poll,
            health: options.health,
            metrics_interval: options.metrics_interval,
            semantics: options.semantics(),
            debian,
        };
        let handle = runtime.handle().clone();
        let started = on_own_thread(move || {
            handle.block_on(async move {
                // The cloud's own services talk to moto directly.
                let internal = Clients::connect(&endpoint, &seed_options.region).await;
                let seeded = crate::seed::seed(&internal, &seed_options).await?;
                let services = Services::start(&internal, &seeded, service_options).await?;
                let clients = Clients::connect_as(
                    &services.gateway.endpoint(),
                    &seed_options.region,
                    crate::aws::HARNESS_ACCESS_KEY_ID,
                )
                .await;
                Ok::<_, LocalCloudError>((clients, internal, seeded, services))
            })
        });
        let (clients, moto_clients, seeded, services) = match started {
            Ok(parts) => parts,
            Err(e) => {
                on_own_thread(move || runtime.shutdown_timeout(Duration::from_secs(5)));
                return Err(e);
            }
        };
        Ok(LocalCloud {
            runtime: Some(runtime),
            services: Some(services),
            moto: Some(moto),
            clients,
            moto_clients,
            seeded,
            key,
            state_dir,
            slot,
            _lease: lease,
        })
    }

    fn services(&self) -> &Services {
        // Only `Drop` takes them.
        self.services.as_ref().expect("services run until drop")
    }

    /// Runs `fut` on the cloud's runtime and waits for it. Works from sync
    /// and async tests alike.
    pub fn block_on<F: Future + Send>(&self, fut: F) -> F::Output
    where
        F::Output: Send,
    {
        let handle = self
            .runtime
            .as_ref()
            .expect("runtime runs until drop")
            .handle()
            .clone();
        std::thread::scope(|s| {
            s.spawn(move || handle.block_on(fut))
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    pub fn slot(&self) -> Slot {
        self.slot
    }

    /// The AWS endpoint hangar should use (`AWS_ENDPOINT_URL`): moto
    /// behind the [`crate::gateway`], `http://127.(77+n).0.1:4566`.
    pub fn endpoint(&self) -> String {
        self.services().gateway.endpoint()
    }

    /// moto itself (`http://127.0.0.1:PORT`), bypassing the gateway.
    pub fn moto_endpoint(&self) -> &str {
        self.moto.as_ref().map(Moto::endpoint).unwrap_or_default()
    }

    pub fn moto(&self) -> Option<&Moto> {
        self.moto.as_ref()
    }

    pub fn region(&self) -> &str {
        &self.seeded.region
    }

    /// SDK clients through the gateway (what hangar sees): after
    /// `deregister_targets` returns, the LB sends the target nothing new.
    pub fn clients(&self) -> &Clients {
        &self.clients
    }

    pub fn sdk_config(&self) -> aws_config::SdkConfig {
        self.clients.sdk.clone()
    }

    /// SDK clients through the gateway signed with `access_key_id`: a
    /// second caller with its own token buckets, counters and blocks.
    pub fn clients_as(&self, access_key_id: &str) -> Clients {
        let endpoint = self.endpoint();
        let region = self.region().to_string();
        let key = access_key_id.to_string();
        self.block_on(async move { Clients::connect_as(&endpoint, &region, &key).await })
    }

    /// SDK clients straight to moto: the account as it is now, with no
    /// listing lag, throttling or blocks (for watchers that check the truth).
    pub fn moto_clients(&self) -> &Clients {
        &self.moto_clients
    }

    /// The AWS endpoint's controls (see [`crate::gateway`]).
    pub fn gateway(&self) -> &Gateway {
        &self.services().gateway
    }

    /// What `RunInstances` into `subnet` answers from now on:
    /// [`Capacity::Insufficient`] is EC2's HTTP 500
    /// `InsufficientInstanceCapacity`, [`Capacity::Unsupported`] its 400
    /// `Unsupported`, [`Capacity::Available`] lifts either.
    pub fn set_subnet_capacity(&self, subnet: &str, capacity: Capacity) {
        self.gateway().set_subnet_capacity(subnet, capacity);
    }

    /// Calls through the AWS endpoint so far, per access key id and action
    /// (hangar signs with [`crate::aws::ACCESS_KEY_ID`], this harness with
    /// [`crate::aws::HARNESS_ACCESS_KEY_ID`]).
    pub fn api_calls(&self) -> ApiCalls {
        self.gateway().api_calls()
    }

    pub fn reset_api_calls(&self) {
        self.gateway().reset_api_calls();
    }

    /// Resets the connection of every `service` call (`dynamodb`, `ec2`,
    /// `elbv2`, …) signed with `access_key_id` until [`unblock`](Self::unblock).
    pub fn block(&self, access_key_id: &str, service: &str) {
        self.gateway().block(access_key_id, service);
    }

    pub fn unblock(&self, access_key_id: &str, service: &str) {
        self.gateway().unblock(access_key_id, service);
    }

    pub fn seeded(&self) -> &Seeded {
        &self.seeded
    }

    pub fn lb(&self) -> &Lb {
        &self.services().lb
    }

    /// `http://127.(77+n).0.1:80`.
    pub fn lb_url(&self) -> String {
        self.lb().url()
    }

    pub fn hosts(&self) -> &crate::hosts::Hosts {
        &self.services().hosts
    }

    pub fn metrics(&self) -> &Publisher {
        &self.services().metrics
    }

    pub fn target_group_arn(&self) -> &str {
        &self.seeded.target_group_arn
    }

    pub fn load_balancer_arn(&self) -> &str {
        &self.seeded.load_balancer_arn
    }

    pub fn launch_template_id(&self) -> &str {
        &self.seeded.launch_template_id
    }

    pub fn subnets(&self) -> &[String] {
        &self.seeded.subnet_ids
    }

    /// The private key every node accepts (for `root`).
    pub fn key_path(&self) -> &Path {
        &self.key.private_key
    }

    pub fn public_key(&self) -> &str {
        &self.key.public_key
    }

    /// The release uploaded at seeding (`v1`, good).
    pub fn first_release(&self) -> &Artifact {
        &self.seeded.release
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Environment for a `hangar` child process (or the AWS CLI): the AWS
    /// endpoint, region and credentials, plus the `HANGAR_LOCAL_*` values
    /// `infra/local/run/env` exports.
    pub fn env(&self) -> Vec<(String, String)> {
        self.env_as(crate::aws::ACCESS_KEY_ID)
    }

    /// [`env`](Self::env) for a process signing with `access_key_id` (a
    /// second operator against the same cloud).
    pub fn env_as(&self, access_key_id: &str) -> Vec<(String, String)> {
        let mut env = crate::aws::process_env_as(&self.endpoint(), self.region(), access_key_id);
        env.extend(local_env(
            &self.seeded,
            &self.lb_url(),
            &self.key.private_key,
        ));
        env
    }

    /// The default spec for this cloud (see [`ClusterSpec::local_default`]);
    /// with `debian` nodes hangar logs in as `deploy` (root has no key there).
    pub fn spec(&self) -> ClusterSpec {
        let spec = self.lite_spec();
        if self.hosts().debian().is_some() {
            spec.set("spec.ssh.user", crate::debian::machine::DEPLOY_USER)
        } else {
            spec
        }
    }

    fn lite_spec(&self) -> ClusterSpec {
        ClusterSpec::local_default(&SpecInputs {
            name: self.seeded.launch_template_name.clone(),
            region: self.seeded.region.clone(),
            launch_template_id: self.seeded.launch_template_id.clone(),
            subnet_ids: self.seeded.subnet_ids.clone(),
            target_group_arn: self.seeded.target_group_arn.clone(),
            private_key: self.key.private_key.clone(),
            runbook: crate::repo_root().join("runbooks/static-http.yaml"),
            release: self.seeded.release.clone(),
            schema: crate::repo_root().join("crds/schema/cluster.json"),
            origin: format!("a hangar-local test cloud ({})", self.slot),
        })
    }

    /// Writes the default spec to `<dir>/<name>.yaml`.
    pub fn write_spec(&self, dir: &Path) -> Result<PathBuf, LocalCloudError> {
        self.spec()
            .write(dir)
            .map_err(|source| LocalCloudError::Io {
                context: format!("writing a spec to {}", dir.display()),
                source,
            })
    }

    /// Builds release `id` of `kind` and uploads it to the seeded bucket.
    pub fn upload_release(&self, id: &str, kind: ReleaseKind) -> Result<Artifact, LocalCloudError> {
        Ok(self.block_on(self.seeded.upload_release(&self.clients, id, kind))?)
    }

    /// Nodes running now.
    pub fn nodes(&self) -> Vec<NodeView> {
        self.hosts().nodes()
    }

    pub fn node(&self, instance_id: &str) -> Option<NodeView> {
        self.hosts().node(instance_id)
    }

    /// Runs `sh -c cmd` inside the node of `instance_id`.
    pub fn exec_inside(&self, instance_id: &str, cmd: &str) -> Result<Output, LocalCloudError> {
        Ok(self.hosts().exec_inside(instance_id, cmd)?)
    }

    /// Waits until `instance_id` has a node.
    pub fn wait_for_node(
        &self,
        instance_id: &str,
        timeout: Duration,
    ) -> Result<NodeView, LocalCloudError> {
        eventually(timeout, &format!("a node for {instance_id}"), || {
            self.node(instance_id)
        })
    }

    /// Launches `count` instances from the seeded launch template into the
    /// first subnet, untagged (what a foreign, non-hangar instance looks like).
    pub fn launch(&self, count: u32) -> Result<Vec<Launched>, LocalCloudError> {
        let ec2 = self.clients.ec2.clone();
        let template = self.seeded.launch_template_id.clone();
        let subnet = self.seeded.subnet_ids.first().cloned().unwrap_or_default();
        let count = i32::try_from(count).unwrap_or(i32::MAX);
        let out = self
            .block_on(async move {
                ec2.run_instances()
                    .launch_template(
                        aws_sdk_ec2::types::LaunchTemplateSpecification::builder()
                            .launch_template_id(template)
                            .build(),
                    )
                    .subnet_id(subnet)
                    .min_count(count)
                    .max_count(count)
                    .send()
                    .await
            })
            .map_err(aws("RunInstances"))?;
        Ok(out
            .instances()
            .iter()
            .filter_map(|i| {
                Some(Launched {
                    id: i.instance_id()?.to_string(),
                    private_ip: i.private_ip_address()?.parse().ok()?,
                })
            })
            .collect())
    }

    /// Creates a new version of the seeded launch template, version 1's
    /// settings booting `image_id` (a patched AMI, or
    /// [`crate::seed::UNHEALTHY_AMI`]), and returns its number: what `$Latest`
    /// names from now on. Through the gateway, like a person's `aws ec2
    /// create-launch-template-version`. The data is spelled out: moto
    /// ignores `SourceVersion`.
    pub fn new_template_version(&self, image_id: &str) -> Result<i64, LocalCloudError> {
        let ec2 = self.clients.ec2.clone();
        let template = self.seeded.launch_template_id.clone();
        let group = self.seeded.security_group_id.clone();
        let image = image_id.to_string();
        let out = self
            .block_on(async move {
                ec2.create_launch_template_version()
                    .launch_template_id(template)
                    .source_version("1")
                    .launch_template_data(
                        aws_sdk_ec2::types::RequestLaunchTemplateData::builder()
                            .image_id(image)
                            .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
                            .security_group_ids(group)
                            .build(),
                    )
                    .send()
                    .await
            })
            .map_err(aws("CreateLaunchTemplateVersion"))?;
        out.launch_template_version()
            .and_then(|v| v.version_number())
            .ok_or_else(|| LocalCloudError::Aws {
                what: "CreateLaunchTemplateVersion".into(),
                message: "no version number in the answer".into(),
            })
    }

    pub fn terminate(&self, instance_ids: &[&str]) -> Result<(), LocalCloudError> {
        let ec2 = self.clients.ec2.clone();
        let ids: Vec<String> = instance_ids.iter().map(|s| s.to_string()).collect();
        self.block_on(async move {
            ec2.terminate_instances()
                .set_instance_ids(Some(ids))
                .send()
                .await
        })
        .map_err(aws("TerminateInstances"))?;
        Ok(())
    }

    /// Sets tags on an instance behind the operator's back (a test playing
    /// what a crash left, or a person editing tags), straight in moto.
    pub fn tag_instance(
        &self,
        instance_id: &str,
        tags: &[(&str, &str)],
    ) -> Result<(), LocalCloudError> {
        let ec2 = self.moto_clients.ec2.clone();
        let id = instance_id.to_string();
        let tags: Vec<aws_sdk_ec2::types::Tag> = tags
            .iter()
            .map(|(k, v)| aws_sdk_ec2::types::Tag::builder().key(*k).value(*v).build())
            .collect();
        self.block_on(async move {
            ec2.create_tags()
                .resources(id)
                .set_tags(Some(tags))
                .send()
                .await
        })
        .map_err(aws("CreateTags"))?;
        Ok(())
    }

    /// An instance's tags as `DescribeInstances` through the gateway shows
    /// them now (what an operator sees, lag included); `None` while the
    /// listing does not show the instance.
    pub fn listed_tags(
        &self,
        instance_id: &str,
    ) -> Result<Option<std::collections::BTreeMap<String, String>>, LocalCloudError> {
        let ec2 = self.clients.ec2.clone();
        let id = instance_id.to_string();
        let out = self
            .block_on(async move { ec2.describe_instances().instance_ids(id).send().await })
            .map_err(aws("DescribeInstances"))?;
        Ok(out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find(|i| i.instance_id() == Some(instance_id))
            .map(|i| {
                i.tags()
                    .iter()
                    .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
                    .collect()
            }))
    }

    /// Registers instances in the seeded target group on its port (through
    /// the gateway: the LB starts health-checking them before this returns).
    pub fn register(&self, instance_ids: &[&str]) -> Result<(), LocalCloudError> {
        let elb = self.clients.elb.clone();
        let arn = self.seeded.target_group_arn.clone();
        let targets = targets(instance_ids);
        self.block_on(async move {
            elb.register_targets()
                .target_group_arn(arn)
                .set_targets(Some(targets))
                .send()
                .await
        })
        .map_err(aws("RegisterTargets"))?;
        Ok(())
    }

    /// Deregisters instances (through the gateway: when this returns, the
    /// LB sends them no new request; requests in flight finish).
    pub fn deregister(&self, instance_ids: &[&str]) -> Result<(), LocalCloudError> {
        let elb = self.clients.elb.clone();
        let arn = self.seeded.target_group_arn.clone();
        let targets = targets(instance_ids);
        self.block_on(async move {
            elb.deregister_targets()
                .target_group_arn(arn)
                .set_targets(Some(targets))
                .send()
                .await
        })
        .map_err(aws("DeregisterTargets"))?;
        Ok(())
    }

    /// Starts sending `GET /` to the LB at `rps` (for `duration`, or until
    /// [`LoadGenerator::stop`]).
    pub fn start_load(
        &self,
        rps: f64,
        duration: Option<Duration>,
    ) -> Result<LoadGenerator, LoadError> {
        self.start_load_path(rps, "/", duration)
    }

    /// [`start_load`](Self::start_load) asking for `path` (with its query,
    /// e.g. `/slow?ms=300`) instead of `/`.
    pub fn start_load_path(
        &self,
        rps: f64,
        path: &str,
        duration: Option<Duration>,
    ) -> Result<LoadGenerator, LoadError> {
        let url = format!("{}/{}", self.lb_url(), path.trim_start_matches('/'));
        let mut options = LoadOptions::new(url, rps);
        options.duration = duration;
        let handle = self
            .runtime
            .as_ref()
            .expect("runtime runs until drop")
            .handle();
        LoadGenerator::start(options, handle)
    }

    /// Stops everything now (same as dropping it).
    pub fn stop(self) {}
}

fn targets(ids: &[&str]) -> Vec<TargetDescription> {
    ids.iter()
        .map(|id| TargetDescription::builder().id(*id).build())
        .collect()
}

impl Drop for LocalCloud {
    fn drop(&mut self) {
        let services = self.services.take();
        if let Some(runtime) = self.runtime.take() {
            // Off this thread: dropping or blocking on a runtime inside an
            // async test's runtime would panic.
            on_own_thread(move || {
                if let Some(services) = services {
                    runtime.block_on(services.shutdown());
                }
                runtime.shutdown_timeout(Duration::from_secs(5));
            });
        }
        drop(self.moto.take());
        // Nothing may stay mounted under the state dir we delete.
        if !crate::debian::leftovers(self.slot.bridged(), &self.state_dir).is_empty() {
            if let Err(e) = crate::debian::sweep(self.slot.bridged(), &self.state_dir) {
                eprintln!("hangar-local: cleaning up debian nodes: {e}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// Runs `f` on a fresh thread and waits for it (never inside an async context).
fn on_own_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(f)
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// The `HANGAR_LOCAL_*` variables describing a cloud.
pub fn local_env(seeded: &Seeded, lb_url: &str, key: &Path) -> Vec<(String, String)> {
    [
        ("HANGAR_LOCAL_REGION", seeded.region.clone()),
        ("HANGAR_LOCAL_LB_URL", lb_url.to_string()),
        (
            "HANGAR_LOCAL_TARGET_GROUP_ARN",
            seeded.target_group_arn.clone(),
        ),
        (
            "HANGAR_LOCAL_LOAD_BALANCER_ARN",
            seeded.load_balancer_arn.clone(),
        ),
        (
            "HANGAR_LOCAL_LAUNCH_TEMPLATE_ID",
            seeded.launch_template_id.clone(),
        ),
        ("HANGAR_LOCAL_SUBNETS", seeded.subnet_ids.join(",")),
        ("HANGAR_LOCAL_SSH_KEY", key.display().to_string()),
        ("HANGAR_LOCAL_ARTIFACT", seeded.release.url.clone()),
        (
            "HANGAR_LOCAL_ARTIFACT_SHA256",
            seeded.release.sha256.clone(),
        ),
        ("HANGAR_LOCAL_RELEASE_ID", seeded.release.id.clone()),
        ("HANGAR_LOCAL_BUCKET", seeded.bucket.clone()),
        ("HANGAR_LOCAL_LEASE_TABLE", seeded.lease_table.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Polls `probe` every 20 ms until it yields, or fails after `timeout`
/// naming `what`: how tests wait for a condition without sleeping.
pub fn eventually<T>(
    timeout: Duration,
    what: &str,
    mut probe: impl FnMut() -> Option<T>,
) -> Result<T, LocalCloudError> {
    let started = Instant::now();
    loop {
        if let Some(v) = probe() {
            return Ok(v);
        }
        if started.elapsed() >= timeout {
            return Err(LocalCloudError::Timeout {
                what: what.to_string(),
                waited: started.elapsed(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Logs the local cloud's events to the test's output (`RUST_LOG`
/// overrides the default `hangar_local=info`). Safe to call many times.
pub fn init_test_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("hangar_local=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}
