//! The `Cluster` resource: what a team commits to its infrastructure repo.
//!
//! Every struct denies unknown fields: a typo such as `maxSruge` must fail
//! loudly instead of silently leaving the default in place. Defaults live in
//! `default_*` functions so the JSON Schema advertises the same values the
//! operator uses.

use std::collections::BTreeMap;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::Duration;

/// The only API version this crate understands.
pub const API_VERSION: &str = "hangar/v1alpha1";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(
    title = "Cluster",
    description = "A fleet of EC2 instances behind one ALB target group, kept in shape by hangar."
)]
pub struct Cluster {
    /// Always `hangar/v1alpha1`.
    pub api_version: ApiVersion,
    /// Always `Cluster`.
    pub kind: Kind,
    pub metadata: Metadata,
    /// The desired state of the fleet.
    pub spec: ClusterSpec,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ApiVersion {
    #[serde(rename = "hangar/v1alpha1")]
    V1Alpha1,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Kind {
    Cluster,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
/// Identifies the cluster.
pub struct Metadata {
    /// DNS label (lowercase letters, digits, `-`; at most 63 characters).
    /// Unique among the specs one operator watches; stamped on every
    /// instance as the `hangar:cluster` tag.
    pub name: String,
    /// Free-form labels, shown in status.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterSpec {
    /// AWS region, e.g. `eu-west-1`.
    pub region: String,
    /// How nodes are launched.
    pub instances: Instances,
    /// Where nodes serve traffic.
    pub load_balancer: LoadBalancer,
    /// Node count bounds.
    pub capacity: Capacity,
    /// Target tracking on a traffic metric. Without it the cluster runs at
    /// `capacity.min` (adjusted by schedules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,
    /// Time windows that override `capacity` (night, weekend, morning peak).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedules: Vec<Schedule>,
    /// How hangar logs in to nodes.
    pub ssh: Ssh,
    /// How a new node is set up before its first release.
    pub provision: Provision,
    /// The application release every node runs.
    pub release: Release,
    /// What runs on a node before it is terminated.
    #[serde(default)]
    pub drain: Drain,
    /// Replacing nodes that stop answering their health check.
    #[serde(default)]
    pub self_healing: SelfHealing,
    /// Which nodes go first when the cluster shrinks (nodes not yet in
    /// service always go before serving ones).
    #[serde(default)]
    pub scale_in_policy: ScaleInPolicy,
    /// What happens to the fleet when this spec disappears from the spec
    /// directory. `retain` (default) leaves every instance running and
    /// registered; `delete` drains and terminates them.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// Extra nodes kept provisioned, released and health-checked but out of
    /// the target group (phase `warm`), so a scale-out takes one of them
    /// instead of waiting for a cold launch. Without it: no pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_pool: Option<WarmPool>,
}

/// Ready nodes kept out of service for the next scale-out (EC2 Auto
/// Scaling's warm pool). They are not counted as capacity: `capacity.max`
/// bounds the serving fleet, `max + size` every machine of the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WarmPool {
    /// Nodes kept in the pool (refilled in the background).
    pub size: u32,
    /// What a pool node is once ready: `stopped` (default; pays for its
    /// disk only, starts in a boot) or `running` (pays for the instance,
    /// serves within a health check).
    #[serde(default)]
    pub state: WarmPoolState,
    /// A scale-in victim is drained, deregistered and stopped back into the
    /// pool while the pool is below `size`, instead of being terminated.
    #[serde(default)]
    pub reuse_on_scale_in: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum WarmPoolState {
    #[default]
    Stopped,
    Running,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Instances {
    /// Launch template id (`lt-…`) or name.
    pub launch_template: String,
    /// `$Default` (default), `$Latest` or a version number.
    #[serde(default = "default_launch_template_version")]
    pub launch_template_version: String,
    /// Subnets to spread instances over (one per availability zone is typical).
    pub subnets: Vec<String>,
    /// Overrides the launch template's instance type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    /// Extra tags for every instance. Keys starting with `hangar:` are reserved.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// Nodes older than this are replaced (surge first, one batch at a
    /// time, spread over the last tenth of the lifetime so a fleet
    /// launched together is not replaced at once), like ASG's maximum
    /// instance lifetime: no node lives on an unpatched kernel forever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lifetime: Option<Duration>,
}

fn default_launch_template_version() -> String {
    "$Default".to_string()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancer {
    /// ARN of the ALB target group (instance target type) nodes are registered in.
    pub target_group_arn: String,
    /// Longest a node may drain (deregistered, finishing its requests) before
    /// it is terminated anyway.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: Duration,
}

fn default_drain_timeout() -> Duration {
    Duration::from_secs(300)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Capacity {
    /// Fewest nodes, whatever the traffic.
    pub min: u32,
    /// Most nodes, whatever the traffic (at most 1000).
    pub max: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Autoscaling {
    /// The traffic signal.
    pub metric: MetricSource,
    /// Requests per minute one node should carry.
    pub target_per_node: f64,
    /// How often the metric is read and the planner runs.
    #[serde(default = "default_evaluation_interval")]
    pub evaluation_interval: Duration,
    /// Relative deviation from the target that is ignored (0.1 = ±10 %).
    #[serde(default = "default_tolerance")]
    pub tolerance: f64,
    /// A metric older than this counts as missing (hold, never scale down).
    #[serde(default = "default_metric_max_age")]
    pub metric_max_age: Duration,
    /// How fast to grow.
    #[serde(default = "ScalingPolicy::default_up")]
    pub scale_up: ScalingPolicy,
    /// How fast to shrink.
    #[serde(default = "ScalingPolicy::default_down")]
    pub scale_down: ScalingPolicy,
}

fn default_evaluation_interval() -> Duration {
    Duration::from_secs(15)
}

fn default_tolerance() -> f64 {
    0.1
}

fn default_metric_max_age() -> Duration {
    Duration::from_secs(300)
}

/// Where the traffic signal comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum MetricSource {
    /// The ALB's own CloudWatch metrics for the cluster's target group.
    Cloudwatch(CloudwatchMetric),
    /// A Prometheus instant query returning the cluster's total request
    /// rate in requests per minute.
    Prometheus(PrometheusMetric),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum CloudwatchMetric {
    /// Target tracking on the ALB's `RequestCountPerTarget`, as an Auto
    /// Scaling group's predefined metric. Read as the target group's
    /// `RequestCount` sum, which that average is taken of: an average times
    /// a count of nodes misreads the periods in which nodes join or leave.
    RequestCountPerTarget(CloudwatchOptions),
    /// `RequestCount` of the target group.
    RequestCount(CloudwatchOptions),
}

impl CloudwatchMetric {
    pub fn options(&self) -> &CloudwatchOptions {
        match self {
            CloudwatchMetric::RequestCountPerTarget(o) | CloudwatchMetric::RequestCount(o) => o,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CloudwatchOptions {
    /// Aggregation period of the sums read from CloudWatch. ALB metrics have
    /// one-minute resolution; the latest *complete* period is used and
    /// scaled to requests per minute.
    #[serde(default = "default_metric_period")]
    pub period: Duration,
}

impl Default for CloudwatchOptions {
    fn default() -> Self {
        CloudwatchOptions {
            period: default_metric_period(),
        }
    }
}

fn default_metric_period() -> Duration {
    Duration::from_secs(60)
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrometheusMetric {
    /// Base URL of the Prometheus server, e.g. `http://prometheus:9090`.
    pub url: String,
    /// PromQL returning one sample: requests per minute for the whole cluster.
    pub query: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScalingPolicy {
    /// How long a recommendation must persist before acting on it.
    /// Scale-down acts on the highest recommendation inside this window.
    pub stabilization: Duration,
    /// Most nodes added (or removed) by one evaluation.
    pub max_step: u32,
}

impl ScalingPolicy {
    /// Kubernetes HPA-like: react to growth at once, a few nodes at a time.
    pub fn default_up() -> Self {
        ScalingPolicy {
            stabilization: Duration::from_secs(0),
            max_step: 4,
        }
    }

    /// Kubernetes HPA-like: wait five minutes of lower traffic, then shed
    /// one node per evaluation.
    pub fn default_down() -> Self {
        ScalingPolicy {
            stabilization: Duration::from_secs(300),
            max_step: 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Schedule {
    /// DNS label naming the window in status and reasons (`night`).
    pub name: String,
    /// Five-field cron expression for when the window opens.
    pub cron: String,
    /// When the window closes: a five-field cron expression, or a duration
    /// after it opened (`9h`).
    pub until: String,
    /// IANA time zone the cron expressions are read in.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// Replaces `spec.capacity` while the window is open; an omitted bound
    /// keeps the spec's.
    pub capacity: CapacityOverride,
}

fn default_timezone() -> String {
    "UTC".to_string()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CapacityOverride {
    /// Replaces `spec.capacity.min` while the window is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<u32>,
    /// Replaces `spec.capacity.max` while the window is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Ssh {
    /// Login user on the nodes; non-root users need passwordless sudo for `become` steps.
    pub user: String,
    #[serde(default = "default_ssh_port")]
    pub port: u16,
    /// Private key (ed25519 or RSA, OpenSSH format) used to log in to nodes.
    pub private_key_file: PathBuf,
    /// Which instance address to connect to.
    #[serde(default)]
    pub address: AddressKind,
    /// How node host keys are verified. Never "accept anything".
    #[serde(default)]
    pub host_key_policy: HostKeyPolicy,
    /// Required with `hostKeyPolicy: known-hosts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known_hosts_file: Option<PathBuf>,
    /// Longest a TCP connect plus SSH handshake may take.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Duration,
    /// Longest any single remote command may run (steps can set their own).
    #[serde(default = "default_command_timeout")]
    pub command_timeout: Duration,
}

fn default_ssh_port() -> u16 {
    22
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_command_timeout() -> Duration {
    Duration::from_secs(600)
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum AddressKind {
    #[default]
    PrivateIp,
    PublicIp,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum HostKeyPolicy {
    /// Trust the key a new instance presents on first contact, then pin it
    /// to the instance id; a changed key is refused.
    #[default]
    Tofu,
    /// Only keys listed in `knownHostsFile` are accepted.
    KnownHosts,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Provision {
    /// Runbook (YAML step list) run on every new node, relative to this spec file.
    pub runbook: PathBuf,
    /// Variables the runbook's templates can use as `{{ vars.NAME }}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vars: BTreeMap<String, String>,
    /// Names of `vars` whose values are secret: redacted from logs and status.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// Environment file placed at `<appRoot>/shared/.env` (mode 0600),
    /// relative to this spec file. Its contents are never logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_file: Option<PathBuf>,
    /// Secrets read from AWS and written into `<appRoot>/shared/.env` with
    /// the env file's lines; a secret's variable replaces an env file line
    /// of the same name. Re-read every `secrets_refresh_interval` (default
    /// a minute): a rotated value is pushed to the nodes rolling, without a
    /// release. Values are never logged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets_from: Vec<SecretSource>,
}

/// Where secret environment variables come from (one of `ssm` or
/// `secretsManager`, like an ECS task definition's `valueFrom`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretSource {
    /// SSM Parameter Store: a path ending in `/` (`/prod/web/`) takes every
    /// parameter under it, recursively, each named by its last segment
    /// (`/prod/web/db/DB_PASSWORD` → `DB_PASSWORD`); a name without the
    /// trailing `/` (`/prod/web/DB_PASSWORD`) is that one parameter.
    /// SecureString values are decrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssm: Option<String>,
    /// Secrets Manager secret, by name or ARN: a JSON object becomes one
    /// variable per key; any other value needs `env`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets_manager: Option<String>,
    /// The variable for a single value: required for a plain-string secret,
    /// optional for a single SSM parameter (renames it), not allowed with
    /// an SSM path or a JSON secret's keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
}

impl SecretSource {
    /// `ssm:/prod/web/` or `secretsManager:prod/api` — how logs and status
    /// name the source (never its value).
    pub fn describe(&self) -> String {
        match (&self.ssm, &self.secrets_manager) {
            (Some(p), _) => format!("ssm:{p}"),
            (None, Some(s)) => format!("secretsManager:{s}"),
            (None, None) => "(no source)".into(),
        }
    }

    /// Whether `ssm` names a path (every parameter under it).
    pub fn is_ssm_path(&self) -> bool {
        self.ssm.as_deref().is_some_and(|p| p.ends_with('/'))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Release {
    /// Release identifier (a commit sha, a build number): the directory name
    /// under `releases/`.
    pub id: String,
    /// Tarball (`.tar.gz`) to ship: `s3://bucket/key`, `file:///path` or `https://…`.
    pub artifact: String,
    /// SHA-256 of the artifact, 64 hex digits. Nothing unverified is shipped.
    pub sha256: String,
    /// Where releases live on the node (`releases/`, `shared/`, `current`).
    #[serde(default = "default_app_root")]
    pub app_root: String,
    /// Paths inside a release that are symlinks into `<appRoot>/shared/`
    /// and survive releases (uploads, sessions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared_paths: Vec<String>,
    /// How many releases to keep on a node (the active and previous one are
    /// never pruned).
    #[serde(default = "default_keep")]
    pub keep: u32,
    #[serde(default)]
    pub hooks: ReleaseHooks,
    /// What must answer before a node is registered.
    #[serde(default)]
    pub health_check: HealthCheck,
    /// How a new release moves across the fleet.
    #[serde(default)]
    pub rollout: Rollout,
    /// Automatic fleet-wide rollback on a rising 5xx rate after activation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<Rollback>,
    /// Requests a node answers after activation and before it joins the
    /// target group, so its first real users do not pay for cold caches
    /// (OPcache, JIT, connection pools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup: Option<Warmup>,
}

/// Paths requested on a freshly activated node before it serves traffic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Warmup {
    /// Paths asked on the node's health-check port, in order (`/`,
    /// `/products`): each is requested until it answers 2xx/3xx, then
    /// `requests - 1` more times.
    pub paths: Vec<String>,
    /// Answered requests per path.
    #[serde(default = "default_warmup_requests")]
    pub requests: u32,
    /// Longest the warm-up may take; the node joins the target group then
    /// anyway (it passed its health check), and status says so.
    #[serde(default = "default_warmup_deadline")]
    pub deadline: Duration,
}

fn default_warmup_requests() -> u32 {
    3
}

fn default_warmup_deadline() -> Duration {
    Duration::from_secs(60)
}

fn default_app_root() -> String {
    "/srv/app".to_string()
}

fn default_keep() -> u32 {
    5
}

/// Shell commands run in the release directory; any non-zero exit aborts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReleaseHooks {
    /// Before `current` moves (migrations, cache warm-up). A failure keeps
    /// the old release serving.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub before_activate: Vec<String>,
    /// After `current` moved (reload php-fpm, restart workers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after_activate: Vec<String>,
    /// Run on exactly one node per release, before any node activates it
    /// (database migrations: `php artisan migrate --force`). Never on two
    /// nodes at once, not again once it succeeded (also across an operator
    /// restart); a failure halts the rollout with the old release serving.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub once: Vec<String>,
    /// Longest the `once` hooks may run together.
    #[serde(default = "default_once_timeout")]
    pub once_timeout: Duration,
}

fn default_once_timeout() -> Duration {
    Duration::from_secs(30 * 60)
}

impl Default for ReleaseHooks {
    fn default() -> Self {
        ReleaseHooks {
            before_activate: Vec::new(),
            after_activate: Vec::new(),
            once: Vec::new(),
            once_timeout: default_once_timeout(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthCheck {
    /// HTTP path asked on the node; any 2xx/3xx answer is healthy.
    #[serde(default = "default_health_path")]
    pub path: String,
    /// Port on the node's address (usually the target group's port).
    #[serde(default = "default_health_port")]
    pub port: u16,
    /// Per-request timeout.
    #[serde(default = "default_health_timeout")]
    pub timeout: Duration,
    /// Pause between attempts.
    #[serde(default = "default_health_interval")]
    pub interval: Duration,
    /// Give up on a node after this long without a healthy answer.
    /// Generous on purpose: a cold PHP/Rails boot can be slow.
    #[serde(default = "default_health_deadline")]
    pub deadline: Duration,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            path: default_health_path(),
            port: default_health_port(),
            timeout: default_health_timeout(),
            interval: default_health_interval(),
            deadline: default_health_deadline(),
        }
    }
}

fn default_health_path() -> String {
    "/health".to_string()
}

fn default_health_port() -> u16 {
    80
}

fn default_health_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_health_interval() -> Duration {
    Duration::from_secs(2)
}

fn default_health_deadline() -> Duration {
    Duration::from_secs(600)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rollout {
    /// In-service nodes that may be out of the target group at once during a rollout.
    #[serde(default = "default_max_unavailable")]
    pub max_unavailable: u32,
    /// Extra nodes that may be launched above the desired count during a rollout.
    #[serde(default = "default_max_surge")]
    pub max_surge: u32,
}

impl Default for Rollout {
    fn default() -> Self {
        Rollout {
            max_unavailable: default_max_unavailable(),
            max_surge: default_max_surge(),
        }
    }
}

fn default_max_unavailable() -> u32 {
    1
}

fn default_max_surge() -> u32 {
    1
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rollback {
    /// Fraction of requests answered 5xx (0.05 = 5 %) above which the
    /// cluster rolls back to the previous release.
    pub error_rate_above: f64,
    /// How long after activation the error rate is watched.
    #[serde(default = "default_rollback_window")]
    pub window: Duration,
    /// Fewer requests than this in the window never trigger a rollback
    /// (one failed request out of three is noise, not a verdict).
    #[serde(default = "default_rollback_min_requests")]
    pub min_requests: u64,
}

fn default_rollback_window() -> Duration {
    Duration::from_secs(300)
}

fn default_rollback_min_requests() -> u64 {
    20
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Drain {
    /// Run on the node after it left the target group and drained, before
    /// it is terminated (stop queue workers gracefully, flush logs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<String>,
    /// Longest the drain hooks may run together.
    #[serde(default = "default_drain_hooks_timeout")]
    pub timeout: Duration,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            hooks: Vec::new(),
            timeout: default_drain_hooks_timeout(),
        }
    }
}

fn default_drain_hooks_timeout() -> Duration {
    Duration::from_secs(60)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SelfHealing {
    /// An in-service node failing its health check for this long is
    /// drained and replaced.
    #[serde(default = "default_unhealthy_after")]
    pub unhealthy_after: Duration,
    /// Most nodes being replaced for ill health at once.
    #[serde(default = "default_max_unhealthy")]
    pub max_unhealthy: u32,
}

impl Default for SelfHealing {
    fn default() -> Self {
        SelfHealing {
            unhealthy_after: default_unhealthy_after(),
            max_unhealthy: default_max_unhealthy(),
        }
    }
}

fn default_unhealthy_after() -> Duration {
    Duration::from_secs(60)
}

fn default_max_unhealthy() -> u32 {
    1
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ScaleInPolicy {
    /// Newest serving nodes go first (old nodes have warm caches).
    #[default]
    Newest,
    /// Oldest serving nodes go first (keeps the fleet young).
    Oldest,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DeletionPolicy {
    #[default]
    Retain,
    Delete,
}
