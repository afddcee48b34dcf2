//! The stage every scenario plays on: a local cloud (moto + real sshd
//! nodes + the load balancer), a spec directory, and `hangar run` as a real
//! child process — plus an invariant watcher that looks at the cloud the
//! whole time the scenario runs.

pub mod browser;
pub mod dashboard;
pub mod ha;
pub mod operator;
pub mod watcher;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hangar::runtime::status::ClusterStatus;
use hangar_cloud::aws::AwsCloud;
use hangar_cloud::{Compute, Instance, InstanceState};
use hangar_local::faults::FaultProxy;
use hangar_local::harness::{LocalCloud, LocalCloudOptions};
use hangar_local::spec::ClusterSpec;
use hangar_local::{ImageVariant, NodeKind};

use operator::{free_port, log_tail, OperatorProcess};
use watcher::Watcher;

/// Every test's operator uses this owner id.
pub const OWNER: &str = "e2e";

/// How many scenarios run at once, whatever `--test-threads` says. Each
/// one times real SSH, HTTP and emulator work, and much of it is waiting
/// (health intervals, drains, cooldowns). On a 2-core machine, two side by
/// side passed every scenario: 1011 s under `cargo nextest run -E
/// 'binary(e2e)' -j 2`, 891–921 s in CI, against 1772 s one at a time.
/// More were not tried.
const AT_ONCE: usize = 2;

/// Scenarios running now; see [`Turn`].
static RUNNING: (std::sync::Mutex<usize>, std::sync::Condvar) =
    (std::sync::Mutex::new(0), std::sync::Condvar::new());

/// A scenario's place among the [`AT_ONCE`] that may run; given back on
/// drop, after the scenario's cloud and operator are gone.
struct Turn;

impl Turn {
    fn take() -> Turn {
        let (running, freed) = &RUNNING;
        // A scenario that panicked poisons the lock; the next one still runs.
        let mut n = running.lock().unwrap_or_else(|e| e.into_inner());
        while *n >= AT_ONCE {
            n = freed.wait(n).unwrap_or_else(|e| e.into_inner());
        }
        *n += 1;
        Turn
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let (running, freed) = &RUNNING;
        let mut n = running.lock().unwrap_or_else(|e| e.into_inner());
        *n -= 1;
        freed.notify_one();
    }
}

pub struct Scenario {
    pub cloud: LocalCloud,
    /// Holds the scenario's files; removed on drop (kept, and its path
    /// printed, with `HANGAR_E2E_KEEP=1`: the operator's log and state).
    dir: Option<tempfile::TempDir>,
    pub specs: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
    operator: Option<OperatorProcess>,
    listen: std::net::SocketAddr,
    pub watcher: Watcher,
    reader: AwsCloud,
    runtime: tokio::runtime::Runtime,
    /// Where the operator's AWS calls go instead of the cloud's endpoint
    /// (a fault-injecting proxy), and the proxy itself.
    aws_faults: Option<FaultProxy>,
    /// Added to every operator's environment (operator settings).
    pub operator_settings: Vec<(String, String)>,
    _turn: Turn,
}

impl Scenario {
    /// A fresh cloud with fast timings (health checks every 200 ms, metrics
    /// every second, 3 s deregistration delay).
    pub fn start() -> Scenario {
        Scenario::start_with(NodeKind::Lite)
    }

    /// [`start`](Self::start) with `debian` machines booted from `image`
    /// (systemd, apt, hangar logging in as `deploy`). The image is built by
    /// `infra/local/setup --images`; a missing one is built here, before
    /// any deadline starts.
    pub fn debian(image: ImageVariant) -> Scenario {
        // What the LB saw (targets turning unhealthy, draining) goes to the
        // test's output, shown when it fails.
        hangar_local::init_test_logging();
        Scenario::start_with(NodeKind::Debian { image })
    }

    fn start_with(nodes: NodeKind) -> Scenario {
        let turn = Turn::take();
        let cloud = LocalCloud::start(LocalCloudOptions {
            deregistration_delay: Duration::from_secs(3),
            nodes,
            ..LocalCloudOptions::default()
        })
        .expect("local cloud starts (run infra/local/setup first)");
        let dir = tempfile::tempdir().expect("temp dir");
        let specs = dir.path().join("specs");
        let state = dir.path().join("state");
        std::fs::create_dir_all(&specs).expect("specs dir");
        let log = dir.path().join("hangar.log");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        // What exists (moto), not the lagging listing the operator sees.
        let reader = AwsCloud::new(
            &cloud.moto_clients().sdk,
            OWNER,
            dir.path().join("reader-cache"),
        )
        .expect("cloud reader");
        let watcher = Watcher::start(&cloud, OWNER);
        Scenario {
            cloud,
            dir: Some(dir),
            specs,
            state,
            log,
            operator: None,
            listen: free_port(),
            watcher,
            reader,
            runtime,
            aws_faults: None,
            operator_settings: Vec::new(),
            _turn: turn,
        }
    }

    /// Puts a fault-injecting proxy (seeded) between the operator and the
    /// AWS endpoint; operators started from now on go through it. Rules
    /// go to [`Scenario::faults`].
    pub fn aws_faults(&mut self, seed: u64) {
        let endpoint = self.cloud.endpoint();
        let proxy = self
            .runtime
            .block_on(FaultProxy::start(&endpoint, seed))
            .expect("fault proxy starts");
        self.aws_faults = Some(proxy);
    }

    pub fn faults(&self) -> &FaultProxy {
        self.aws_faults.as_ref().expect("aws_faults() first")
    }

    /// The local cloud's default spec, tuned for tests: capacity 2..4,
    /// evaluations every second over 5 s metric periods, 10 s scale-down
    /// stabilization, quick health checks, 10 s drain timeout.
    pub fn spec(&self) -> ClusterSpec {
        self.cloud
            .spec()
            .with_capacity(2, 4)
            .set(
                "spec.autoscaling.metric.cloudwatch.requestCountPerTarget.period",
                "5s",
            )
            .set("spec.autoscaling.evaluationInterval", "1s")
            .set("spec.autoscaling.metricMaxAge", "30s")
            .set("spec.autoscaling.targetPerNode", 300)
            .set("spec.autoscaling.scaleDown.stabilization", "10s")
            .set("spec.loadBalancer.drainTimeout", "10s")
            .set("spec.release.healthCheck.interval", "500ms")
            .set("spec.release.healthCheck.deadline", "60s")
            .set("spec.release.healthCheck.timeout", "2s")
    }

    pub fn write_spec(&self, spec: &ClusterSpec) -> PathBuf {
        spec.write(&self.specs).expect("write spec")
    }

    pub fn start_operator(&mut self) {
        assert!(self.operator.is_none(), "operator already running");
        self.operator = Some(OperatorProcess::start(
            &self.specs,
            &self.state,
            OWNER,
            &self.operator_env(),
            &self.log,
            self.listen,
        ));
    }

    /// [`start_operator`](Self::start_operator) reading its specs from
    /// `source` (a git source) with `env` added.
    pub fn start_operator_from(&mut self, source: &str, env: &[(String, String)]) {
        assert!(self.operator.is_none(), "operator already running");
        let mut all = self.operator_env();
        all.extend(env.iter().cloned());
        self.operator = Some(OperatorProcess::start(
            std::path::Path::new(source),
            &self.state,
            OWNER,
            &all,
            &self.log,
            self.listen,
        ));
    }

    /// The environment a `hangar` process gets: the cloud's, with AWS
    /// calls sent through the fault proxy if there is one.
    pub fn operator_env(&self) -> Vec<(String, String)> {
        let mut env = self.cloud.env();
        env.extend(self.operator_settings.iter().cloned());
        if let Some(proxy) = &self.aws_faults {
            for (k, v) in &mut env {
                if k == "AWS_ENDPOINT_URL" {
                    *v = proxy.endpoint();
                }
            }
        }
        env
    }

    /// `kill -9` the operator.
    pub fn crash_operator(&mut self) {
        if let Some(op) = self.operator.take() {
            op.kill();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop_operator(&mut self) -> Option<std::process::ExitStatus> {
        self.operator.take().and_then(|op| op.stop())
    }

    /// Where this scenario's files live (the operators' state, logs).
    pub fn dir(&self) -> &std::path::Path {
        self.dir
            .as_ref()
            .map(|d| d.path())
            .expect("the scenario's directory exists until drop")
    }

    pub fn operator(&self) -> &OperatorProcess {
        self.operator.as_ref().expect("operator running")
    }

    pub fn status(&self, cluster: &str) -> Option<ClusterStatus> {
        self.operator.as_ref()?.status(cluster)
    }

    /// Waits until the cluster's status satisfies `pred`; panics with the
    /// last status and the operator's log if it never does.
    pub fn wait_status(
        &self,
        cluster: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&ClusterStatus) -> bool,
    ) -> ClusterStatus {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(s) = self.status(cluster) {
                if pred(&s) {
                    return s;
                }
                last = Some(s);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "timed out after {timeout:?} waiting for {what}\nlast status: {}\noperator log:\n{}",
            last.map(|s| serde_json::to_string_pretty(&s).unwrap_or_default())
                .unwrap_or_else(|| "none".into()),
            log_tail(&self.log, 60)
        );
    }

    /// Our instances as the cloud reports them (not through the operator).
    pub fn instances(&self, cluster: &str) -> Vec<Instance> {
        let reader = self.reader.clone();
        let cluster = cluster.to_string();
        self.runtime
            .block_on(async move { reader.list(Some(&cluster)).await })
            .expect("list instances")
            .into_iter()
            .filter(|i| {
                !matches!(
                    i.state,
                    InstanceState::Terminated | InstanceState::ShuttingDown
                )
            })
            .collect()
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        // The operator first (it could still be acting), then the watcher,
        // then the cloud (moto, nodes and every process in them, by PID).
        self.operator.take();
        self.watcher.stop();
        self.aws_faults.take();
        if std::env::var_os("HANGAR_E2E_KEEP").is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!(
                    "HANGAR_E2E_KEEP: scenario files kept in {}",
                    dir.keep().display()
                );
            }
        }
    }
}

/// The seed of a probabilistic scenario: a failure names it, and
/// `HANGAR_E2E_SEED=<n>` replays it.
pub fn seed() -> u64 {
    std::env::var("HANGAR_E2E_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261122)
}

pub fn in_service(s: &ClusterStatus) -> u32 {
    s.phases.get("in-service").copied().unwrap_or(0)
}

/// Every node in service, on `release`, nothing else running.
pub fn settled_on(s: &ClusterStatus, n: u32, release: &str) -> bool {
    in_service(s) == n
        && s.nodes.len() == n as usize
        && s.nodes
            .iter()
            .all(|x| x.release.as_deref() == Some(release) && x.task.is_none())
}
