//! The host manager: turns the emulator's EC2 instances into real nodes.
//!
//! Every [`HostOptions::poll`] it lists the instances of the cloud's VPC
//! (`DescribeInstances`, paginated) and
//! - starts a [`Node`] (a real sshd in its own namespaces) at the private
//!   IP of every `running` instance that has none, authorizing the local
//!   cloud's key — node starts run in parallel, so five instances appearing
//!   at once are all reachable well within 2 s;
//! - stops the node of every instance that is no longer `running`, killing
//!   every process in its namespace (sessions, the app server, anything a
//!   runbook left behind).
//!
//! Each node's state directory (`<nodes_dir>/<instance-id>/`) keeps its host
//! key for the instance's whole life, so TOFU pinning by instance id holds
//! across a stop/start, and is removed when the instance terminates.
//!
//! The listing is also published as a [`Directory`] (instance id → state
//! and IP) for the load balancer, which needs an instance's IP to reach a
//! registered target.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_ec2::types::Filter;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::debian::apt_proxy::AptProxy;
use crate::debian::net::Bridge;
use crate::debian::{DebianError, DebianOptions, Machine, MachineConfig};
use crate::node::{self, Node, NodeConfig, NodeError};
use crate::slot::Slot;

#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("no node for instance {0} (not running, or its node has not started yet)")]
    NoSuchNode(String),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Debian(#[from] DebianError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone, Debug)]
pub struct HostOptions {
    /// Only instances with a private IP in this slot's VPC become nodes.
    pub slot: Slot,
    /// Lists only this VPC's instances (cheaper for moto).
    pub vpc_id: Option<String>,
    /// How often EC2 is polled. `DescribeInstances` costs moto ~70 ms of
    /// CPU at 50 instances; 250 ms keeps nodes prompt without hogging it.
    pub poll: Duration,
    /// Node state directories live here, one per instance id.
    pub nodes_dir: PathBuf,
    /// OpenSSH public key line every node accepts (for `root` and any user).
    pub authorized_key: String,
    /// Keep nodes a previous manager left running (the `serve` daemon was
    /// restarted while moto kept its instances). Otherwise every leftover
    /// node under `nodes_dir` is killed and removed before the first poll.
    pub adopt: bool,
    /// `Some`: instances become `debian` machines (their own network on the
    /// cloud's bridge, addresses in the slot's [`crate::slot::BridgedVpc`]);
    /// `None`: `lite` nodes on loopback.
    pub debian: Option<DebianOptions>,
}

impl HostOptions {
    pub fn new(
        slot: Slot,
        nodes_dir: impl Into<PathBuf>,
        authorized_key: impl Into<String>,
    ) -> Self {
        HostOptions {
            slot,
            vpc_id: None,
            poll: Duration::from_millis(250),
            nodes_dir: nodes_dir.into(),
            authorized_key: authorized_key.into(),
            adopt: false,
            debian: None,
        }
    }

    /// Whether `ip` may become a node of this cloud.
    fn in_vpc(&self, ip: Ipv4Addr) -> bool {
        match &self.debian {
            Some(d) => d.vpc.contains(ip),
            None => self.slot.contains(ip),
        }
    }
}

/// One instance as the last poll saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub id: String,
    /// `pending`, `running`, `stopping`, `stopped`, `shutting-down`, `terminated`.
    pub state: String,
    pub private_ip: Option<Ipv4Addr>,
    /// [`crate::seed::UNHEALTHY_AMI`] boots a node whose app never answers healthy.
    #[serde(default)]
    pub image_id: Option<String>,
}

impl InstanceInfo {
    pub fn is_running(&self) -> bool {
        self.state == "running"
    }
}

/// Instance id → what the last poll saw.
pub type Directory = Arc<BTreeMap<String, InstanceInfo>>;

/// A node the manager runs, for tests and `status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeView {
    pub instance_id: String,
    pub ip: Ipv4Addr,
    pub state_dir: PathBuf,
    /// `lite`: `mnt:[inode]`, every process in the node shows it in
    /// `/proc/PID/ns/mnt`; `debian`: the machine's `pid:[inode]`.
    pub namespace: String,
    /// `lite`: the sshd listener; `debian`: the machine's init (systemd).
    pub listener_pid: u32,
    /// `lite` or `debian`.
    #[serde(default = "lite")]
    pub kind: String,
    /// Seconds since the epoch when the node came up (or was adopted).
    pub since_unix: u64,
    pub adopted: bool,
}

fn lite() -> String {
    "lite".into()
}

/// A node of either kind, as the manager runs it.
#[derive(Debug)]
enum AnyNode {
    Lite(Node),
    Debian(Machine),
}

impl AnyNode {
    /// A handle on the node recorded in `dir` (a `machine.info` or `node.info`).
    fn attach(dir: &Path) -> Result<AnyNode, HostsError> {
        if dir.join("machine.info").is_file() {
            Ok(AnyNode::Debian(Machine::attach(dir)?))
        } else {
            Ok(AnyNode::Lite(Node::attach(dir)?))
        }
    }

    fn ip(&self) -> Ipv4Addr {
        match self {
            AnyNode::Lite(n) => n.ip(),
            AnyNode::Debian(m) => m.ip(),
        }
    }

    fn state_dir(&self) -> &Path {
        match self {
            AnyNode::Lite(n) => n.state_dir(),
            AnyNode::Debian(m) => m.state_dir(),
        }
    }

    fn alive(&self) -> bool {
        match self {
            AnyNode::Lite(n) => !n.pids().is_empty(),
            AnyNode::Debian(m) => m.is_running(),
        }
    }

    fn exec_inside(&self, cmd: &str) -> Result<Output, HostsError> {
        match self {
            AnyNode::Lite(n) => Ok(n.exec_inside(cmd)?),
            AnyNode::Debian(m) => Ok(m.exec(cmd)?),
        }
    }

    fn stop(&mut self) -> Result<(), HostsError> {
        match self {
            AnyNode::Lite(n) => Ok(n.stop()?),
            AnyNode::Debian(m) => Ok(m.stop()?),
        }
    }

    fn detach(self) {
        match self {
            AnyNode::Lite(n) => drop(n.detach()),
            AnyNode::Debian(m) => drop(m.detach()),
        }
    }
}

struct Running {
    node: AnyNode,
    view: NodeView,
}

/// The cloud-level parts of `debian` nodes: the bridge and the apt proxy,
/// torn down when the last handle on the manager goes (after its nodes).
struct DebianRuntime {
    options: DebianOptions,
    bridge: Bridge,
    proxy: Mutex<Option<AptProxy>>,
}

impl Drop for DebianRuntime {
    fn drop(&mut self) {
        if let Ok(mut proxy) = self.proxy.lock() {
            drop(proxy.take());
        }
        if let Err(e) = self.bridge.remove() {
            tracing::warn!(bridge = %self.bridge.name, error = %e, "removing the bridge failed");
        }
    }
}

#[derive(Default)]
struct State {
    nodes: BTreeMap<String, Running>,
    /// Last start failure per instance (cleared when it starts).
    errors: BTreeMap<String, String>,
    last_poll_error: Option<String>,
    polls: u64,
    /// Instances whose node is being stopped: not started again until done.
    stopping: HashSet<String>,
}

/// Handle to the host manager; cheap to clone.
#[derive(Clone)]
pub struct Hosts {
    options: Arc<HostOptions>,
    state: Arc<Mutex<State>>,
    directory: Arc<watch::Sender<Directory>>,
    debian: Option<Arc<DebianRuntime>>,
}

impl std::fmt::Debug for Hosts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hosts")
            .field("nodes_dir", &self.options.nodes_dir)
            .finish()
    }
}

/// What a finished node start reports back to the poll loop.
struct Started {
    id: String,
    result: Result<AnyNode, HostsError>,
    took: Duration,
}

impl Hosts {
    /// Prepares `nodes_dir`: adopts or kills what a previous run left there
    /// (see [`HostOptions::adopt`]). Blocking (kills processes).
    pub fn new(options: HostOptions) -> Result<Hosts, HostsError> {
        match &options.debian {
            Some(_) => crate::debian::check_prerequisites()?,
            None => node::check_prerequisites()?,
        }
        fs::create_dir_all(&options.nodes_dir).map_err(|source| HostsError::Io {
            context: format!("creating {}", options.nodes_dir.display()),
            source,
        })?;
        // The bridge first: adopted machines are attached to it already.
        let debian = match &options.debian {
            Some(d) => {
                let bridge = Bridge::ensure(d.vpc)?;
                let proxy = if d.apt_proxy {
                    Some(AptProxy::start(
                        d.apt_proxy_addr(),
                        &d.state_dir.join("apt-proxy"),
                    )?)
                } else {
                    None
                };
                Some(Arc::new(DebianRuntime {
                    options: d.clone(),
                    bridge,
                    proxy: Mutex::new(proxy),
                }))
            }
            None => None,
        };
        let mut state = State::default();
        for dir in node_dirs(&options.nodes_dir) {
            let Some(id) = dir.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
                continue;
            };
            match AnyNode::attach(&dir) {
                Ok(node) if options.adopt && node.alive() => {
                    tracing::info!(instance = %id, ip = %node.ip(), "adopted a running node");
                    let view = view_of(&id, &node, true);
                    state.nodes.insert(id, Running { node, view });
                }
                Ok(node) => {
                    // Dropping the handle kills whatever is left in it.
                    drop(node);
                    if !options.adopt {
                        remove_dir(&dir);
                    }
                }
                Err(_) if !options.adopt => remove_dir(&dir),
                Err(_) => {}
            }
        }
        let (directory, _) = watch::channel(Directory::default());
        Ok(Hosts {
            options: Arc::new(options),
            state: Arc::new(Mutex::new(state)),
            directory: Arc::new(directory),
            debian,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The instance listing, updated after every poll.
    pub fn directory(&self) -> watch::Receiver<Directory> {
        self.directory.subscribe()
    }

    /// Nodes running now, by instance id.
    pub fn nodes(&self) -> Vec<NodeView> {
        self.lock().nodes.values().map(|r| r.view.clone()).collect()
    }

    pub fn node(&self, instance_id: &str) -> Option<NodeView> {
        self.lock().nodes.get(instance_id).map(|r| r.view.clone())
    }

    /// Whether the node of `instance_id` is being stopped right now (its
    /// machine powering off, its namespace and mount not yet released).
    pub fn is_stopping(&self, instance_id: &str) -> bool {
        self.lock().stopping.contains(instance_id)
    }

    /// Last start failure per instance that has no node yet.
    pub fn errors(&self) -> BTreeMap<String, String> {
        self.lock().errors.clone()
    }

    /// The last `DescribeInstances` failure, if the last poll failed.
    pub fn last_poll_error(&self) -> Option<String> {
        self.lock().last_poll_error.clone()
    }

    /// Completed polls (tests wait for "one more poll" with this).
    pub fn polls(&self) -> u64 {
        self.lock().polls
    }

    /// Runs `sh -c cmd` inside the node of `instance_id` (its `/srv`, its
    /// hostname…). Blocking.
    pub fn exec_inside(&self, instance_id: &str, cmd: &str) -> Result<Output, HostsError> {
        let dir = self
            .node(instance_id)
            .map(|v| v.state_dir)
            .ok_or_else(|| HostsError::NoSuchNode(instance_id.to_string()))?;
        // A second handle for the same node; detached so it never kills it.
        let handle = AnyNode::attach(&dir)?;
        let out = handle.exec_inside(cmd);
        handle.detach();
        out
    }

    /// Reboots the `debian` machine of `instance_id` (what RebootInstances
    /// does): systemd inside reboots, nspawn exits, and the next poll boots
    /// the machine again on the same disk, namespace name and IP. A `lite`
    /// node is restarted the same way (every process killed). Blocking.
    pub fn reboot(&self, instance_id: &str) -> Result<(), HostsError> {
        let dir = self
            .node(instance_id)
            .map(|v| v.state_dir)
            .ok_or_else(|| HostsError::NoSuchNode(instance_id.to_string()))?;
        match AnyNode::attach(&dir)? {
            AnyNode::Debian(m) => {
                let reboot = m.reboot();
                m.detach();
                Ok(reboot?)
            }
            AnyNode::Lite(mut n) => Ok(n.stop()?),
        }
    }

    /// The options of this cloud's `debian` nodes, if it runs them.
    pub fn debian(&self) -> Option<&DebianOptions> {
        self.debian.as_ref().map(|d| &d.options)
    }

    /// Where the apt proxy caches packages, if it runs.
    pub fn apt_cache_dir(&self) -> Option<PathBuf> {
        let d = self.debian.as_ref()?;
        let proxy = d.proxy.lock().ok()?;
        proxy.as_ref().map(|p| p.cache_dir().to_path_buf())
    }

    /// Polls EC2 until `cancel`, then stops every node it runs.
    pub async fn run(self, ec2: aws_sdk_ec2::Client, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.options.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Started>();
        let mut starting: HashSet<String> = HashSet::new();
        let mut retry_at: HashMap<String, (Instant, Duration)> = HashMap::new();
        let mut stopping = JoinSet::new();
        let mut listing = Directory::default();

        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                Some(started) = done_rx.recv() => {
                    starting.remove(&started.id);
                    self.on_started(started, &listing, &mut retry_at, &mut stopping);
                }
                _ = tick.tick() => {
                    match self.list(&ec2).await {
                        Ok(found) => {
                            listing = Arc::new(found);
                            self.directory.send_replace(listing.clone());
                            let mut state = self.lock();
                            state.last_poll_error = None;
                            state.polls += 1;
                        }
                        Err(message) => {
                            let mut state = self.lock();
                            if state.last_poll_error.as_deref() != Some(&message) {
                                tracing::warn!(%message, "listing instances failed");
                            }
                            state.last_poll_error = Some(message);
                            continue;
                        }
                    }
                    self.stop_gone(&listing, &mut stopping);
                    self.start_new(&listing, &mut starting, &mut retry_at, &done_tx);
                }
                Some(_) = stopping.join_next(), if !stopping.is_empty() => {}
            }
        }

        // Shutdown: let starts in flight finish (bounded by Node::start's
        // own timeouts), then stop everything.
        while !starting.is_empty() {
            match done_rx.recv().await {
                Some(started) => {
                    starting.remove(&started.id);
                    if let Ok(node) = started.result {
                        self.stop_node(&mut stopping, started.id, node, None);
                    }
                }
                None => break,
            }
        }
        let nodes = std::mem::take(&mut self.lock().nodes);
        for (id, running) in nodes {
            self.stop_node(&mut stopping, id, running.node, None);
        }
        while stopping.join_next().await.is_some() {}
    }

    async fn list(
        &self,
        ec2: &aws_sdk_ec2::Client,
    ) -> Result<BTreeMap<String, InstanceInfo>, String> {
        let filters = self
            .options
            .vpc_id
            .as_ref()
            .map(|vpc| vec![Filter::builder().name("vpc-id").values(vpc).build()]);
        let mut pages = ec2
            .describe_instances()
            .set_filters(filters)
            .into_paginator()
            .send();
        let mut found = BTreeMap::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| crate::aws::error_chain(&e))?;
            for reservation in page.reservations() {
                for instance in reservation.instances() {
                    let Some(id) = instance.instance_id() else {
                        continue;
                    };
                    let state = instance
                        .state()
                        .and_then(|s| s.name())
                        .map(|n| n.as_str().to_string())
                        .unwrap_or_default();
                    let private_ip = instance
                        .private_ip_address()
                        .and_then(|ip| ip.parse::<Ipv4Addr>().ok());
                    found.insert(
                        id.to_string(),
                        InstanceInfo {
                            id: id.to_string(),
                            state,
                            private_ip,
                            image_id: instance.image_id().map(str::to_string),
                        },
                    );
                }
            }
        }
        Ok(found)
    }

    /// Stops the node of every instance that is no longer running; removes
    /// the state of terminated (or vanished) instances.
    fn stop_gone(&self, listing: &Directory, stopping: &mut JoinSet<()>) {
        let gone: Vec<(String, Running)> = {
            let mut state = self.lock();
            // Also machines that ended while their instance runs (a reboot,
            // or a crash): stopped cleanly here, booted again by start_new.
            let ids: Vec<String> = state
                .nodes
                .iter()
                .filter(|(id, r)| {
                    !listing.get(*id).is_some_and(InstanceInfo::is_running)
                        || matches!(r.node, AnyNode::Debian(_)) && !r.node.alive()
                })
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter()
                .filter_map(|id| state.nodes.remove(&id).map(|r| (id, r)))
                .collect()
        };
        for (id, running) in gone {
            let state = listing.get(&id).map(|i| i.state.as_str()).unwrap_or("gone");
            if state == "running" {
                let exit = match &running.node {
                    AnyNode::Debian(m) => format!("{:?}", m.exit_status()),
                    AnyNode::Lite(_) => String::new(),
                };
                tracing::info!(instance = %id, exit, "machine ended (reboot or crash): booting it again");
            } else {
                tracing::info!(instance = %id, state, "instance left `running`: stopping its node");
            }
            let remove = terminated(listing, &id).then(|| running.view.state_dir.clone());
            self.stop_node(stopping, id, running.node, remove);
        }
        // State of instances that terminated while they had no node.
        let (active, busy): (HashSet<String>, HashSet<String>) = {
            let state = self.lock();
            (
                state.nodes.keys().cloned().collect(),
                state.stopping.clone(),
            )
        };
        for dir in node_dirs(&self.options.nodes_dir) {
            let id = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if !active.contains(id) && !busy.contains(id) && terminated(listing, id) {
                remove_dir(&dir);
            }
        }
    }

    fn start_new(
        &self,
        listing: &Directory,
        starting: &mut HashSet<String>,
        retry_at: &mut HashMap<String, (Instant, Duration)>,
        done: &mpsc::UnboundedSender<Started>,
    ) {
        let now = Instant::now();
        let (have, busy): (HashSet<String>, HashSet<String>) = {
            let state = self.lock();
            (
                state.nodes.keys().cloned().collect(),
                state.stopping.clone(),
            )
        };
        for info in listing.values() {
            let Some(ip) = info.private_ip else { continue };
            if !info.is_running()
                || !self.options.in_vpc(ip)
                || have.contains(&info.id)
                || busy.contains(&info.id)
                || starting.contains(&info.id)
                || retry_at.get(&info.id).is_some_and(|(at, _)| *at > now)
            {
                continue;
            }
            starting.insert(info.id.clone());
            let state_dir = self.options.nodes_dir.join(&info.id);
            let start: Box<dyn FnOnce() -> Result<AnyNode, HostsError> + Send> = match &self.debian
            {
                Some(d) => {
                    let config = MachineConfig {
                        instance_id: info.id.clone(),
                        ip,
                        vpc: d.options.vpc,
                        image: d.options.image.clone(),
                        state_dir,
                        authorized_keys: vec![self.options.authorized_key.clone()],
                        apt_proxy: d.options.apt_proxy.then(|| d.options.apt_proxy_addr()),
                        boot_timeout: d.options.boot_timeout,
                    };
                    let d = d.clone();
                    Box::new(move || Ok(AnyNode::Debian(Machine::start(config, &d.bridge)?)))
                }
                None => {
                    let config = NodeConfig::new(&info.id, ip, state_dir)
                        .authorize(self.options.authorized_key.clone())
                        .unhealthy_app(
                            info.image_id.as_deref() == Some(crate::seed::UNHEALTHY_AMI),
                        );
                    Box::new(move || Ok(AnyNode::Lite(Node::start(config)?)))
                }
            };
            let done = done.clone();
            let id = info.id.clone();
            tokio::task::spawn_blocking(move || {
                let began = Instant::now();
                let result = start();
                let _ = done.send(Started {
                    id,
                    result,
                    took: began.elapsed(),
                });
            });
        }
    }

    fn on_started(
        &self,
        started: Started,
        listing: &Directory,
        retry_at: &mut HashMap<String, (Instant, Duration)>,
        stopping: &mut JoinSet<()>,
    ) {
        let Started { id, result, took } = started;
        match result {
            Ok(node) => {
                retry_at.remove(&id);
                // The instance may have stopped while its node was starting.
                if !listing.get(&id).is_some_and(InstanceInfo::is_running) {
                    let remove = terminated(listing, &id).then(|| node.state_dir().to_path_buf());
                    self.stop_node(stopping, id, node, remove);
                    return;
                }
                tracing::info!(instance = %id, ip = %node.ip(), took_ms = took.as_millis() as u64, "node up");
                let view = view_of(&id, &node, false);
                let mut state = self.lock();
                state.errors.remove(&id);
                state.nodes.insert(id, Running { node, view });
            }
            Err(e) => {
                let delay = retry_at
                    .get(&id)
                    .map(|(_, d)| (*d * 2).min(Duration::from_secs(10)))
                    .unwrap_or(Duration::from_millis(500));
                tracing::warn!(instance = %id, error = %e, retry_in_ms = delay.as_millis() as u64, "node failed to start");
                retry_at.insert(id.clone(), (Instant::now() + delay, delay));
                self.lock().errors.insert(id, e.to_string());
            }
        }
    }

    /// Kills every process in the node (blocking, so off the async threads),
    /// then removes its state if the instance is gone for good. Until that
    /// is done the instance gets no new node (a machine's namespace and
    /// disk must be released first).
    fn stop_node(
        &self,
        stopping: &mut JoinSet<()>,
        id: String,
        mut node: AnyNode,
        remove: Option<PathBuf>,
    ) {
        self.lock().stopping.insert(id.clone());
        let state = self.state.clone();
        stopping.spawn_blocking(move || {
            match node.stop() {
                Ok(()) => tracing::info!(instance = %id, "node stopped"),
                Err(e) => tracing::error!(instance = %id, error = %e, "stopping node failed"),
            }
            if let Some(dir) = remove {
                remove_dir(&dir);
            }
            state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .stopping
                .remove(&id);
        });
    }
}

fn terminated(listing: &Directory, id: &str) -> bool {
    listing
        .get(id)
        .is_none_or(|i| matches!(i.state.as_str(), "terminated" | "shutting-down"))
}

fn view_of(id: &str, node: &AnyNode, adopted: bool) -> NodeView {
    let (namespace, listener_pid, kind) = match node {
        AnyNode::Lite(n) => (n.namespace().to_string(), n.listener_pid(), "lite"),
        AnyNode::Debian(m) => (m.pid_namespace().to_string(), m.leader_pid(), "debian"),
    };
    NodeView {
        instance_id: id.to_string(),
        ip: node.ip(),
        state_dir: node.state_dir().to_path_buf(),
        namespace,
        listener_pid,
        kind: kind.to_string(),
        since_unix: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        adopted,
    }
}

fn node_dirs(nodes_dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(nodes_dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

fn remove_dir(dir: &Path) {
    // Never through a live overlay: a machine's root must be unmounted first.
    if let Err(e) = crate::debian::machine::remove_state(dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "removing node state failed");
    }
}

/// Kills every node recorded under `nodes_dir` and removes their state
/// (`cloud down`, or a crashed run's leftovers). Returns how many nodes
/// had processes left.
pub fn sweep(nodes_dir: &Path) -> Result<usize, HostsError> {
    let mut killed = 0;
    for dir in node_dirs(nodes_dir) {
        if let Ok(mut node) = AnyNode::attach(&dir) {
            if node.alive() {
                killed += 1;
            }
            node.stop()?;
        }
        // A machine whose handle is gone may still have its root mounted.
        for mount in crate::debian::machine::mounts_under(&dir).iter().rev() {
            crate::debian::machine::unmount(mount)?;
        }
        remove_dir(&dir);
    }
    Ok(killed)
}
