//! Benchmark: time to serve, from a traffic breach to the new node healthy
//! in the target group — a cold launch against a node taken from a stopped
//! warm pool (issue 16). Driven by `benches/time_to_serve/run.sh`; not a
//! test.
//!
//! ```text
//! bench_time_to_serve --hangar target/debug/hangar [--rounds 3] [--rps 12] [--log FILE]
//! ```
//!
//! The scenario: a real `hangar run` against the local cloud with
//! `debian` nodes (Debian 12 booted by systemd-nspawn: real boot, real
//! systemd, sshd, nginx + PHP-FPM from the php image), the stock
//! `runbooks/nginx-php-fpm.yaml` and the PHP fixture as release `v1`;
//! capacity 1..2, autoscaling on `requestCountPerTarget` (read as the
//! group's `RequestCount`: 300 requests a minute per node, 5 s periods,
//! evaluated every second). One node serves,
//! idle. The breach: the load generator starts sending `--rps` requests a
//! second through the load balancer (12/s = 720/min asks for 2 nodes), and
//! the clock runs until a second node is healthy in the target group.
//!
//! - **cold**: no warm pool; hangar launches an instance (RunInstances),
//!   waits for SSH, runs the runbook, ships and activates the release,
//!   health-checks and registers it.
//! - **warm**: `warmPool: { size: 1, state: stopped }`, filled and settled
//!   before the breach; hangar starts the stopped warm node
//!   (StartInstances), re-runs the runbook (unchanged steps skipped),
//!   finds the release it was stopped on still active (nothing shipped or
//!   activated), health-checks and registers it.
//!
//! Rounds alternate the order (cold then warm, warm then cold, …) so both
//! see the same machine. Between measurements the load stops, the fleet
//! scales back in to one node and (warm) the pool refills; the next
//! measurement starts only once all of that settled.
//!
//! Where each timestamp comes from:
//! - the breach: this bench, when it starts the load;
//! - the decision (`scale` activity), the launch (`launched` after
//!   RunInstances returned; the warm node's `start` note after
//!   StartInstances returned) and each node step's end (`reachable`,
//!   `provision`, `activate`, `healthy`): hangar's own JSON log;
//! - boot's end: this bench, the first time the new node's sshd sends its
//!   banner (probed every 50 ms at the node's address);
//! - healthy in the target group: the local load balancer's own target
//!   state (registered and healthy), polled every 50 ms.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use hangar::runtime::status::ClusterStatus;
use hangar_local::lb::Health;
use hangar_local::php_app::PhpKind;
use hangar_local::spec::{ClusterSpec, Yaml};
use hangar_local::{ImageVariant, LocalCloud, LocalCloudOptions, NodeKind};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const CLUSTER: &str = "web";
/// How long one measurement or one settling may take before the bench
/// gives up (a debian node boots in seconds to tens of seconds).
const DEADLINE: Duration = Duration::from_secs(300);

struct Args {
    hangar: PathBuf,
    rounds: usize,
    rps: f64,
    /// Where hangar's log goes (default: the bench's temp dir, removed).
    log: Option<PathBuf>,
}

fn args() -> Result<Args, BoxError> {
    let mut a = Args {
        hangar: PathBuf::from("target/debug/hangar"),
        rounds: 3,
        rps: 12.0,
        log: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--hangar" => a.hangar = PathBuf::from(value),
            "--rounds" => a.rounds = value.parse::<usize>()?.max(1),
            "--rps" => a.rps = value.parse()?,
            "--log" => a.log = Some(PathBuf::from(value)),
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    Ok(a)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Cold,
    Warm,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Cold => "cold",
            Mode::Warm => "warm",
        }
    }
}

/// The parts of one measurement, in order; each ends where the next
/// begins, so they add up to the total.
const PARTS: [&str; 8] = [
    "wait for the evaluation (breach → scale decision)",
    "launch (RunInstances / StartInstances returned)",
    "boot (until the node's sshd answers)",
    "SSH connect (sshd answers → hangar's session)",
    "runbook",
    "release ship + activate",
    "health check",
    "registration (RegisterTargets → healthy in the LB)",
];

/// One measurement: the instants that bound the parts (`PARTS.len() + 1`).
struct Measured {
    node: String,
    bounds: Vec<SystemTime>,
    /// When the machine's journal started (its init running): what comes
    /// before is the local cloud bringing the machine up (overlay mount,
    /// network namespace, systemd-nspawn).
    init_started: Option<SystemTime>,
    /// Requests the load generator got no 2xx/3xx for.
    failed_requests: u64,
}

impl Measured {
    fn part(&self, i: usize) -> f64 {
        secs_between(self.bounds[i], self.bounds[i + 1])
    }

    /// Of the boot: until the machine's init ran.
    fn until_init(&self) -> f64 {
        self.init_started
            .map(|t| secs_between(self.bounds[2], t).max(0.0))
            .unwrap_or(0.0)
    }

    fn total(&self) -> f64 {
        secs_between(self.bounds[0], self.bounds[PARTS.len()])
    }

    /// From the decision on: the node's path, without the metric's delay.
    fn node_path(&self) -> f64 {
        secs_between(self.bounds[1], self.bounds[PARTS.len()])
    }

    /// What hangar adds on the node path beyond the work that is not its
    /// own (the machine's boot, the runbook's and the release's commands).
    fn overhead(&self) -> f64 {
        self.node_path() - self.part(2) - self.part(4) - self.part(5)
    }
}

/// `hangar run` as a child process; SIGTERM by PID and wait on drop, so
/// node tasks reach a safe point and nothing outlives the bench.
struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

fn main() -> Result<(), BoxError> {
    let args = args()?;
    // The local cloud's own events (a node up and how long its boot took, a
    // start that failed) on stderr beside the progress lines.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("hangar_local::hosts=info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let load_before = loadavg();
    let cloud = LocalCloud::start(LocalCloudOptions {
        nodes: NodeKind::Debian {
            image: ImageVariant::Php,
        },
        deregistration_delay: Duration::from_secs(3),
        ..LocalCloudOptions::default()
    })?;
    let dir = tempfile::tempdir()?;
    let specs = dir.path().join("specs");
    std::fs::create_dir_all(&specs)?;
    let v1 = cloud.upload_php_release("v1", PhpKind::Good)?;
    let base = cloud
        .spec()
        .with_capacity(1, 2)
        .set(
            "spec.provision.runbook",
            hangar_local::repo_root()
                .join("runbooks/nginx-php-fpm.yaml")
                .as_path(),
        )
        .with_release(&v1)
        .set("spec.release.sharedPaths", Yaml::list(["storage"]))
        .set(
            "spec.release.hooks.afterActivate",
            Yaml::list(["sudo systemctl reload php8.2-fpm"]),
        )
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
        .set("spec.release.healthCheck.timeout", "2s")
        .set("spec.release.healthCheck.deadline", "120s");
    let spec = |mode: Mode| -> ClusterSpec {
        match mode {
            Mode::Cold => base.clone(),
            Mode::Warm => base
                .clone()
                .set("spec.warmPool.size", 1u64)
                .set("spec.warmPool.state", "stopped"),
        }
    };

    let log_path = args
        .log
        .clone()
        .unwrap_or_else(|| dir.path().join("hangar.log"));
    let log = std::fs::File::create(&log_path)?;
    let listen = free_port()?;
    spec(Mode::Cold).write(&specs)?;
    let child = Command::new(&args.hangar)
        .args(["--log-format", "json", "run", "--specs"])
        .arg(&specs)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--listen", &listen.to_string(), "--owner", "bench"])
        .envs(cloud.env())
        .env("HANGAR_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.try_clone()?)
        .spawn()?;
    let _operator = Operator(child);
    let api = Api { listen };
    eprintln!(
        "hangar {} on {listen}, log {}",
        args.hangar.display(),
        log_path.display()
    );

    let mut results: BTreeMap<&str, Vec<Measured>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for round in 0..args.rounds {
        let order = if round % 2 == 0 {
            [Mode::Cold, Mode::Warm]
        } else {
            [Mode::Warm, Mode::Cold]
        };
        for mode in order {
            spec(mode).write(&specs)?;
            let settled = Instant::now();
            let serving = settle(&cloud, &api, mode, &mut seen)?;
            eprintln!(
                "round {round} {}: settled in {:.1}s on {serving}",
                mode.name(),
                settled.elapsed().as_secs_f64()
            );
            let m = measure(&cloud, &api, &log_path, mode, &serving, args.rps)?;
            eprintln!(
                "round {round} {}: {} healthy in the target group {:.1}s after the breach ({}; init ran {:.1}s into the boot)",
                mode.name(),
                m.node,
                m.total(),
                (0..PARTS.len())
                    .map(|i| format!("{:.1}", m.part(i)))
                    .collect::<Vec<_>>()
                    .join(" + "),
                m.until_init()
            );
            // What the boot spent its time on, from the machine's own systemd.
            let chain = cloud.machine(&m.node).ok().and_then(|machine| {
                machine
                    .exec_ok("systemd-analyze --no-pager critical-chain ssh.service 2>&1 | tail -n +3 | head -4")
                    .ok()
            });
            if let Some(chain) = chain {
                eprintln!("  {} boot: {}", m.node, chain.trim().replace('\n', "\n  "));
            }
            results.entry(mode.name()).or_default().push(m);
        }
    }
    let load_after = loadavg();
    report(&args, &results, &load_before, &load_after);
    Ok(())
}

/// Waits until the fleet is back at one idle serving node — and, in warm
/// mode, one warm node stopped (the cloud says so) — with no task running,
/// nothing else registered or draining, and no machine still shutting down
/// (a stopping machine cannot be started yet, and its shutdown takes CPU
/// from the next measurement). Returns the serving node. `seen` collects
/// every instance id met so far, across calls.
fn settle(
    cloud: &LocalCloud,
    api: &Api,
    mode: Mode,
    seen: &mut BTreeSet<String>,
) -> Result<String, BoxError> {
    let warm = u32::from(mode == Mode::Warm);
    let deadline = Instant::now() + DEADLINE;
    let mut last = String::from("no status yet");
    loop {
        if let Some(st) = api.status()? {
            let phase = |p: &str| st.phases.get(p).copied().unwrap_or(0);
            let serving: Vec<&str> = st
                .nodes
                .iter()
                .filter(|n| n.phase == "in-service")
                .map(|n| n.id.as_str())
                .collect();
            let targets = cloud.lb().targets();
            let lb_ok = serving.len() == 1
                && targets.len() == 1
                && targets[0].instance_id == serving[0]
                && targets[0].registered
                && targets[0].health == Health::Healthy;
            let running = cloud.nodes().len();
            seen.extend(st.nodes.iter().map(|n| n.id.clone()));
            let stopping: Vec<&String> = seen
                .iter()
                .filter(|id| cloud.hosts().is_stopping(id))
                .collect();
            let ok = st.memory.desired == 1
                && phase("in-service") == 1
                && phase("warm") == warm
                && st.nodes.len() == 1 + warm as usize
                && st.nodes.iter().all(|n| n.task.is_none())
                && st
                    .nodes
                    .iter()
                    .filter(|n| n.phase == "warm")
                    .all(|n| n.state == "stopped")
                && lb_ok
                && running == 1
                && stopping.is_empty();
            if ok {
                return Ok(serving[0].to_string());
            }
            last = format!(
                "desired {}, phases {:?}, tasks {:?}, {} target(s), {running} machine(s) running, stopping {stopping:?}",
                st.memory.desired,
                st.phases,
                st.nodes
                    .iter()
                    .map(|n| (n.id.as_str(), n.state.as_str(), n.task.as_deref()))
                    .collect::<Vec<_>>(),
                targets.len()
            );
        }
        if Instant::now() > deadline {
            return Err(format!("{} mode never settled: {last}", mode.name()).into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One breach: starts the load, watches for the new node's sshd and for
/// a second target healthy in the LB, then reads hangar's log for the rest.
fn measure(
    cloud: &LocalCloud,
    api: &Api,
    log: &Path,
    mode: Mode,
    serving: &str,
    rps: f64,
) -> Result<Measured, BoxError> {
    let warm_node = match mode {
        Mode::Cold => None,
        Mode::Warm => api
            .status()?
            .and_then(|st| st.nodes.into_iter().find(|n| n.phase == "warm"))
            .map(|n| n.id),
    };
    let sshd_up: Mutex<BTreeMap<String, SystemTime>> = Mutex::default();
    let done = AtomicBool::new(false);
    let breach = SystemTime::now();
    let load = cloud.start_load(rps, None)?;
    let served = std::thread::scope(|scope| {
        // Boot's end, seen from outside: the first sshd banner of every
        // machine that is not the serving node, at the address hangar's
        // status gives it (known from the launch, or kept by a warm node).
        scope.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                let listed = api.status().ok().flatten().map(|st| st.nodes);
                let candidates: BTreeMap<String, std::net::IpAddr> = listed
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|n| Some((n.id, n.address?.parse().ok()?)))
                    .chain(
                        cloud
                            .nodes()
                            .into_iter()
                            .map(|n| (n.instance_id, n.ip.into())),
                    )
                    .collect();
                for (id, ip) in candidates {
                    if id == serving || lock(&sshd_up).contains_key(&id) {
                        continue;
                    }
                    if sshd_answers(SocketAddr::new(ip, 22)) {
                        lock(&sshd_up).insert(id, SystemTime::now());
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let deadline = Instant::now() + DEADLINE;
        let found = loop {
            let new =
                cloud.lb().targets().into_iter().find(|t| {
                    t.instance_id != serving && t.registered && t.health == Health::Healthy
                });
            if let Some(t) = new {
                break Ok((t.instance_id, SystemTime::now()));
            }
            if Instant::now() > deadline {
                break Err(format!(
                    "{}: no second node healthy in the target group after {DEADLINE:?}",
                    mode.name()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        done.store(true, Ordering::Relaxed);
        found
    });
    let load = load.stop();
    let (node, in_lb) = served?;
    if let Some(warm) = &warm_node {
        if &node != warm {
            return Err(format!("the scale-out served {node}, not the warm node {warm}").into());
        }
    }
    let booted = lock(&sshd_up)
        .get(&node)
        .copied()
        .ok_or_else(|| format!("never saw {node}'s sshd answer"))?;

    // hangar logs each node step's end as it records it; read them back.
    // The last one may still be in flight to the file: wait for it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let events = loop {
        let events = log_events(log, breach)?;
        if find(&events, Some(&node), "healthy").is_some() || Instant::now() > deadline {
            break events;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let decided = find(&events, None, "scale").ok_or("no scale decision in hangar's log")?;
    let launched = match mode {
        Mode::Cold => events
            .iter()
            .find(|e| e.message == "launched" && e.instances.contains(&node))
            .map(|e| e.at),
        Mode::Warm => find(&events, Some(&node), "start"),
    }
    .ok_or_else(|| format!("no launch of {node} in hangar's log"))?;
    let step = |kind: &str| {
        find(&events, Some(&node), kind).ok_or_else(|| format!("no `{kind}` note for {node}"))
    };
    let reachable = step("reachable")?;
    let provisioned = step("provision")?;
    let activated = step("activate")?;
    let healthy = step("healthy")?;
    let init_started = journal_start(cloud, &node);
    Ok(Measured {
        node,
        bounds: vec![
            breach,
            decided,
            launched,
            booted,
            reachable,
            provisioned,
            activated,
            healthy,
            in_lb,
        ],
        init_started,
        failed_requests: load.errors,
    })
}

/// An event of hangar's JSON log (`--log-format json`): when, what, and
/// the fields the bench looks at.
struct Event {
    at: SystemTime,
    message: String,
    kind: String,
    node: String,
    instances: String,
}

/// hangar's log events since `since`.
fn log_events(log: &Path, since: SystemTime) -> Result<Vec<Event>, BoxError> {
    let text = std::fs::read_to_string(log)?;
    let mut out = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let field = |k: &str| {
            v.get(k)
                .or_else(|| v.get("fields").and_then(|f| f.get(k)))
                .and_then(|x| x.as_str())
                .unwrap_or_default()
                .to_string()
        };
        let Ok(at) = chrono::DateTime::parse_from_rfc3339(&field("timestamp")) else {
            continue;
        };
        let at = SystemTime::from(at);
        if at < since || field("cluster") != CLUSTER {
            continue;
        }
        out.push(Event {
            at,
            message: field("message"),
            kind: field("kind"),
            node: field("node"),
            instances: field("instances"),
        });
    }
    Ok(out)
}

/// When the current boot's journal of the node's machine began.
fn journal_start(cloud: &LocalCloud, node: &str) -> Option<SystemTime> {
    let out = cloud
        .machine(node)
        .ok()?
        .exec_ok("journalctl -b --no-pager -o short-iso-precise | head -n 1")
        .ok()?;
    let stamp = out.split_whitespace().next()?;
    let at = chrono::DateTime::parse_from_str(stamp, "%Y-%m-%dT%H:%M:%S%.f%z").ok()?;
    Some(SystemTime::from(at))
}

/// The first event of `kind` (for `node`, if given).
fn find(events: &[Event], node: Option<&str>, kind: &str) -> Option<SystemTime> {
    events
        .iter()
        .find(|e| e.kind == kind && node.is_none_or(|n| e.node == n))
        .map(|e| e.at)
}

/// Whether an SSH server answers at `addr`: it sends its `SSH-2.0-…`
/// banner first thing after accepting.
fn sshd_answers(addr: SocketAddr) -> bool {
    let Ok(mut conn) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
    let mut banner = [0u8; 4];
    conn.read_exact(&mut banner).is_ok() && &banner == b"SSH-"
}

/// hangar's `/api/v1` on its `--listen` address.
struct Api {
    listen: SocketAddr,
}

impl Api {
    /// The cluster's status; `None` while hangar does not answer yet or
    /// has no status for it.
    fn status(&self) -> Result<Option<ClusterStatus>, BoxError> {
        let Ok(mut conn) = TcpStream::connect_timeout(&self.listen, Duration::from_secs(2)) else {
            return Ok(None);
        };
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            conn,
            "GET /api/v1/clusters/{CLUSTER} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.listen
        )?;
        let mut raw = Vec::new();
        conn.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            return Ok(None);
        };
        if !head.starts_with("HTTP/1.1 200") {
            return Ok(None);
        }
        Ok(Some(serde_json::from_str(body)?))
    }
}

fn report(
    args: &Args,
    results: &BTreeMap<&str, Vec<Measured>>,
    load_before: &str,
    load_after: &str,
) {
    let empty = Vec::new();
    let cold = results.get("cold").unwrap_or(&empty);
    let warm = results.get("warm").unwrap_or(&empty);
    let med =
        |rows: &[Measured], f: &dyn Fn(&Measured) -> f64| median(rows.iter().map(f).collect());
    println!(
        "time to serve on debian nodes, {} round(s) alternating, {} rps breach; median seconds",
        args.rounds, args.rps
    );
    println!();
    println!("| part | cold | warm |");
    println!("|---|---:|---:|");
    for (i, name) in PARTS.iter().enumerate() {
        println!(
            "| {name} | {:.2} | {:.2} |",
            med(cold, &|m| m.part(i)),
            med(warm, &|m| m.part(i))
        );
        if i == 2 {
            println!(
                "| … of which until the machine's init runs (the local cloud: overlay, netns, nspawn) | {:.2} | {:.2} |",
                med(cold, &Measured::until_init),
                med(warm, &Measured::until_init)
            );
        }
    }
    println!(
        "| **total: breach → healthy in the target group** | **{:.2}** | **{:.2}** |",
        med(cold, &Measured::total),
        med(warm, &Measured::total)
    );
    println!(
        "| total from the decision (the node path) | {:.2} | {:.2} |",
        med(cold, &Measured::node_path),
        med(warm, &Measured::node_path)
    );
    println!(
        "| hangar's own overhead (node path − boot − runbook − release) | {:.2} | {:.2} |",
        med(cold, &Measured::overhead),
        med(warm, &Measured::overhead)
    );
    println!();
    println!("per round (breach → healthy in the target group, s; failed requests during it):");
    for (name, rows) in [("cold", cold), ("warm", warm)] {
        println!(
            "- {name}: {}",
            rows.iter()
                .map(|m| format!("{:.1} ({} failed)", m.total(), m.failed_requests))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!();
    // Goal 1: warm ≤ 1.5 × (boot + health check), on warm's own parts.
    let warm_path = med(warm, &Measured::node_path);
    let warm_total = med(warm, &Measured::total);
    let bound = 1.5 * (med(warm, &|m| m.part(2)) + med(warm, &|m| m.part(6)));
    println!(
        "goal warm ≤ 1.5 × (boot + health check) = {bound:.2} s: node path {warm_path:.2} s → {}; \
         with the evaluation wait {warm_total:.2} s → {}",
        verdict(warm_path <= bound),
        verdict(warm_total <= bound)
    );
    // Goal 2: cold ≤ runbook + release + boot + 3 s.
    let cold_path = med(cold, &Measured::node_path);
    let cold_total = med(cold, &Measured::total);
    let allowed = med(cold, &|m| m.part(4)) + med(cold, &|m| m.part(5)) + med(cold, &|m| m.part(2));
    println!(
        "goal cold ≤ runbook + release + boot + 3 s = {:.2} s: node path {cold_path:.2} s (overhead {:.2} s) → {}; \
         with the evaluation wait {cold_total:.2} s → {}",
        allowed + 3.0,
        med(cold, &Measured::overhead),
        verdict(cold_path <= allowed + 3.0),
        verdict(cold_total <= allowed + 3.0)
    );
    println!();
    println!("load average before: {load_before}; after: {load_after}");
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "missed"
    }
}

/// The median (the mean of the middle two for an even count); 0 when empty.
fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Seconds from `a` to `b`, negative if `b` came first.
fn secs_between(a: SystemTime, b: SystemTime) -> f64 {
    match b.duration_since(a) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("unreadable: {e}"))
}

/// A free loopback port for hangar's `--listen` (bind, read, release).
fn free_port() -> Result<SocketAddr, BoxError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
