//! Benchmark: shipping releases and re-running an idempotent runbook on
//! real local nodes, hangar against plain OpenSSH, rsync and Ansible, in
//! one run on the same nodes with the baselines interleaved round by
//! round. Driven by `benches/nodes/run.sh` (which builds this in release
//! mode and installs Ansible into a venv); not a test.
//!
//! ```text
//! bench_nodes --ansible-playbook VENV/bin/ansible-playbook [--nodes 10] [--size-mb 50]
//!             [--rounds 5] [--change-pct 1] [--skip ansible,delta,rerun,full]
//! ```
//!
//! Every measurement reports wall time, CPU on the operator side (this
//! process for hangar, the tool's processes for the others), CPU on the
//! nodes (a cpuacct cgroup holding every node's sshd and what it runs),
//! and the machine's whole CPU in the same interval (what else ran). Bytes
//! on the wire are counted in one extra round through a TCP relay per node
//! (SSH's payload both ways, handshakes included).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hangar::effects::release::{self, Artifact, NodeView, ReleaseConfig, ShipMethod};
use hangar::effects::runbook::{self, Facts, Runbook};
use hangar::effects::ssh::{Credentials, HostKeyVerifier, Redactor, SshPool, SshSettings, Target};
use hangar_local::node::{ClientKey, TestNode};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Args {
    nodes: usize,
    size_mb: usize,
    playbook: PathBuf,
    rounds: usize,
    change_pct: f64,
    skip: BTreeSet<String>,
}

fn args() -> Result<Args, BoxError> {
    let mut a = Args {
        nodes: 10,
        size_mb: 50,
        playbook: PathBuf::from("ansible-playbook"),
        rounds: 5,
        change_pct: 1.0,
        skip: BTreeSet::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--nodes" => a.nodes = value.parse()?,
            "--size-mb" => a.size_mb = value.parse()?,
            "--ansible-playbook" => a.playbook = PathBuf::from(value),
            "--rounds" => a.rounds = value.parse::<usize>()?.max(1),
            "--change-pct" => a.change_pct = value.parse()?,
            "--skip" => a.skip = value.split(',').map(|s| s.trim().to_string()).collect(),
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    Ok(a)
}

fn main() -> Result<(), BoxError> {
    let args = args()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

// ---- measuring ------------------------------------------------------

/// CPU seconds of this process and of its waited-for children
/// (`/proc/self/stat` utime+stime, cutime+cstime).
fn own_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(") ").map(|(_, s)| s).unwrap_or("");
    let f: Vec<f64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // Fields 14-17 of stat(5), counted from the state field (3).
    let tick = 100.0;
    let get = |i: usize| f.get(i - 3).copied().unwrap_or(0.0) / tick;
    (get(14) + get(15), get(16) + get(17))
}

/// Busy CPU seconds of the whole machine (`/proc/stat`).
fn machine_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or("");
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: f64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| v.get(i)).sum();
    busy / 100.0
}

/// A cpuacct cgroup (v1) holding every node's sshd: their sessions and
/// what those run are accounted in it.
struct NodeCpu {
    dir: Option<PathBuf>,
}

impl NodeCpu {
    fn new(nodes: &[TestNode]) -> NodeCpu {
        let dir = PathBuf::from(format!(
            "/sys/fs/cgroup/cpuacct/hangar-bench-{}",
            std::process::id()
        ));
        let ok = std::fs::create_dir_all(&dir).is_ok()
            && nodes.iter().all(|n| {
                std::fs::write(dir.join("cgroup.procs"), n.listener_pid().to_string()).is_ok()
            });
        if !ok {
            eprintln!(
                "no cpuacct cgroup (v1) at {}: node CPU not measured",
                dir.display()
            );
            let _ = std::fs::remove_dir(&dir);
            return NodeCpu { dir: None };
        }
        NodeCpu { dir: Some(dir) }
    }

    fn seconds(&self) -> f64 {
        self.dir
            .as_ref()
            .and_then(|d| std::fs::read_to_string(d.join("cpuacct.usage")).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .map(|ns| ns / 1e9)
            .unwrap_or(f64::NAN)
    }

    /// Removes the cgroup once the nodes are gone.
    fn remove(&self) {
        if let Some(d) = &self.dir {
            if let Err(e) = std::fs::remove_dir(d) {
                eprintln!("leaving {}: {e}", d.display());
            }
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    wall: f64,
    /// hangar: this process; the others: their processes.
    client: f64,
    nodes: f64,
    machine: f64,
}

struct Probe {
    at: Instant,
    own: (f64, f64),
    nodes: f64,
    machine: f64,
}

impl Probe {
    fn start(cpu: &NodeCpu) -> Probe {
        Probe {
            at: Instant::now(),
            own: own_cpu(),
            nodes: cpu.seconds(),
            machine: machine_cpu(),
        }
    }

    /// `in_process`: the work ran in this process (hangar) rather than in
    /// child processes.
    fn stop(self, cpu: &NodeCpu, in_process: bool) -> Sample {
        let wall = self.at.elapsed().as_secs_f64();
        let own = own_cpu();
        Sample {
            wall,
            client: if in_process {
                own.0 - self.own.0
            } else {
                own.1 - self.own.1
            },
            nodes: cpu.seconds() - self.nodes,
            machine: machine_cpu() - self.machine,
        }
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[derive(Default)]
struct Series {
    samples: Vec<Sample>,
    bytes: Option<u64>,
}

impl Series {
    fn med(&self, f: impl Fn(&Sample) -> f64) -> f64 {
        median(&self.samples.iter().map(f).collect::<Vec<_>>())
    }
    fn wall(&self) -> f64 {
        self.med(|s| s.wall)
    }
}

// ---- relays: counting bytes on the wire ------------------------------

/// One TCP relay per node (`node ip:ephemeral → node ip:22`), counting
/// the bytes each way.
struct Relays {
    ports: Vec<u16>,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Relays {
    async fn start(nodes: &[TestNode]) -> Result<Relays, BoxError> {
        let up = Arc::new(AtomicU64::new(0));
        let down = Arc::new(AtomicU64::new(0));
        let mut ports = Vec::new();
        let mut tasks = Vec::new();
        for n in nodes {
            let listener = tokio::net::TcpListener::bind((n.ip(), 0)).await?;
            ports.push(listener.local_addr()?.port());
            let target = (n.ip(), n.port());
            let (up, down) = (up.clone(), down.clone());
            tasks.push(tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let (up, down) = (up.clone(), down.clone());
                    tokio::spawn(async move {
                        let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                            return;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        tokio::join!(pump(cr, sw, up), pump(sr, cw, down));
                    });
                }
            }));
        }
        Ok(Relays {
            ports,
            up,
            down,
            tasks,
        })
    }

    fn take(&self) -> (u64, u64) {
        (
            self.up.swap(0, Ordering::SeqCst),
            self.down.swap(0, Ordering::SeqCst),
        )
    }
}

impl Drop for Relays {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    count: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                count.fetch_add(n as u64, Ordering::Relaxed);
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

// ---- the bench ------------------------------------------------------

/// Where the tools connect: the nodes themselves, or the relays.
#[derive(Clone)]
struct Route {
    ports: Vec<u16>,
    known_hosts: PathBuf,
}

struct Bench {
    work: PathBuf,
    key: ClientKey,
    nodes: Vec<TestNode>,
    direct: Route,
    cpu: NodeCpu,
    playbook: PathBuf,
}

impl Bench {
    fn target(&self, route: &Route, i: usize) -> Target {
        let n = &self.nodes[i];
        Target::new(
            format!("i-{}", n.name()),
            IpAddr::V4(n.ip()),
            route.ports[i],
        )
    }

    fn pool(&self, route: &Route) -> Result<SshPool, BoxError> {
        let mut settings = SshSettings::new(
            Credentials::from_key_file("root", &self.key.private_key)?,
            HostKeyVerifier::known_hosts(&route.known_hosts),
        );
        settings.command_timeout = Duration::from_secs(300);
        Ok(SshPool::new(settings, Redactor::default()))
    }

    /// Runs `cmd` in every node (`nsenter`), in parallel; fails on any error.
    fn on_nodes(&self, cmd: &str) -> Result<Vec<String>, BoxError> {
        std::thread::scope(|s| {
            let handles: Vec<_> = self
                .nodes
                .iter()
                .map(|n| s.spawn(move || n.exec_inside_ok(cmd).map_err(|e| e.to_string())))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| BoxError::from("thread panicked"))?
                        .map_err(BoxError::from)
                })
                .collect()
        })
    }

    /// Every node has `current` → `<root>/releases/<id>` and `checks`
    /// (path → sha256) hold in it.
    fn verify(&self, root: &str, id: &str, checks: &[(&str, &str)]) -> Result<(), BoxError> {
        let mut cmd = format!("readlink {root}/current");
        for (path, _) in checks {
            cmd.push_str(&format!(" && sha256sum < {root}/current/{path}"));
        }
        let mut want = format!("{root}/releases/{id}\n");
        for (_, sha) in checks {
            want.push_str(&format!("{sha}  -\n"));
        }
        for (n, out) in self.nodes.iter().zip(self.on_nodes(&cmd)?) {
            if out != want {
                return Err(format!("{}: got {out:?}, want {want:?}", n.name()).into());
            }
        }
        Ok(())
    }

    fn absent(&self, root: &str, path: &str) -> Result<(), BoxError> {
        self.on_nodes(&format!("! test -e {root}/current/{path}"))?;
        Ok(())
    }

    /// Moves `root` aside rather than deleting it. ext4 passes over inodes
    /// freed in the last minute or more when it allocates new ones
    /// (`recently_deleted`), so a bench that deletes 20,000 files and
    /// creates as many seconds later measures that scan (perf: ~80 % of
    /// the machine's CPU, growing round by round, for every tool alike)
    /// rather than the tools. What is moved aside goes with the nodes.
    fn clean(&self, root: &str) -> Result<(), BoxError> {
        self.on_nodes(&set_aside(root))?;
        Ok(())
    }

    fn ssh_base(&self, route: &Route, i: usize) -> Vec<String> {
        vec![
            "-i".into(),
            self.key.private_key.display().to_string(),
            "-p".into(),
            route.ports[i].to_string(),
            "-o".into(),
            format!("UserKnownHostsFile={}", route.known_hosts.display()),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "ControlMaster=no".into(),
        ]
    }
}

async fn run(args: Args) -> Result<(), BoxError> {
    let work = std::env::temp_dir().join(format!("hangar-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let key = ClientKey::generate(&work.join("keys"), "client")?;
    let started = Instant::now();
    let nodes = (0..args.nodes)
        .map(|i| TestNode::start(&work, &format!("bench{i}"), &[&key.public_key]))
        .collect::<Result<Vec<_>, _>>()?;
    eprintln!("{} nodes started in {:?}", nodes.len(), started.elapsed());
    let known_hosts = work.join("known_hosts");
    let mut kh = String::new();
    for n in &nodes {
        kh.push_str(&n.known_hosts_line()?);
        kh.push('\n');
    }
    std::fs::write(&known_hosts, kh)?;
    let cpu = NodeCpu::new(&nodes);
    let bench = Bench {
        work: work.clone(),
        key,
        direct: Route {
            ports: nodes.iter().map(|n| n.port()).collect(),
            known_hosts,
        },
        nodes,
        cpu,
        playbook: args.playbook.clone(),
    };
    let result = run_all(&bench, &args).await;
    let Bench { nodes, cpu, .. } = bench;
    drop(nodes);
    cpu.remove();
    let _ = std::fs::remove_dir_all(&work);
    result
}

async fn relay_route(b: &Bench) -> Result<(Relays, Route), BoxError> {
    let relays = Relays::start(&b.nodes).await?;
    let key_lines: Vec<String> = b
        .nodes
        .iter()
        .map(|n| n.known_hosts_line())
        .collect::<Result<_, _>>()?;
    let mut kh = String::new();
    for ((n, line), port) in b.nodes.iter().zip(key_lines).zip(&relays.ports) {
        let key = line.split_once(' ').map(|(_, k)| k).unwrap_or("");
        kh.push_str(&format!("[{}]:{port} {key}\n", n.ip()));
    }
    let path = b.work.join("known_hosts.relay");
    std::fs::write(&path, kh)?;
    let route = Route {
        ports: relays.ports.clone(),
        known_hosts: path,
    };
    Ok((relays, route))
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

async fn run_all(b: &Bench, args: &Args) -> Result<(), BoxError> {
    let n = b.nodes.len();
    println!(
        "# {n} nodes, {} MB release, {} rounds; load at start {}",
        args.size_mb,
        args.rounds,
        load()
    );
    let r1 = make_release(&b.work, args.size_mb)?;
    eprintln!("release tarball: {:.1} MB", r1.bytes as f64 / 1e6);
    if !args.skip.contains("full") {
        full_ship(b, args, &r1).await?;
    }
    if !args.skip.contains("delta") {
        delta_ship(b, args, &r1).await?;
    }
    if !args.skip.contains("rerun") {
        rerun(b, args).await?;
    }
    println!("\nload at the end: {}", load());
    Ok(())
}

// ---- the release ------------------------------------------------------

struct Release {
    tarball: PathBuf,
    sha: String,
    bytes: u64,
    src: PathBuf,
    blob_sha: String,
}

/// ~`size_mb` MB of gzip: an incompressible blob (media, vendored
/// binaries) plus 2,000 small compressible source files.
fn make_release(work: &Path, size_mb: usize) -> Result<Release, BoxError> {
    let src = work.join("src-r1");
    std::fs::create_dir_all(src.join("public"))?;
    let mut blob = vec![0u8; size_mb.saturating_sub(2).max(1) << 20];
    let mut x: u64 = 0x2545F4914F6CDD1D;
    for chunk in blob.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    std::fs::write(src.join("blob.bin"), &blob)?;
    let blob_sha = hex::encode(Sha256::digest(&blob));
    for d in 0..40 {
        let dir = src.join(format!("src/module{d}"));
        std::fs::create_dir_all(&dir)?;
        for f in 0..50 {
            std::fs::write(dir.join(format!("File{f}.php")), php_file(d, f, 0))?;
        }
    }
    std::fs::write(src.join("public/health"), "ok\n")?;
    let tarball = work.join("r1.tar.gz");
    tar_czf(&src, &tarball)?;
    let bytes = std::fs::metadata(&tarball)?.len();
    let sha = hex::encode(Sha256::digest(std::fs::read(&tarball)?));
    Ok(Release {
        tarball,
        sha,
        bytes,
        src,
        blob_sha,
    })
}

fn php_file(d: usize, f: usize, version: usize) -> String {
    let mut s = String::new();
    for line in 0..80 {
        s.push_str(&format!(
            "<?php // module {d} file {f} line {line}: return $this->handle($request, {line});\n"
        ));
    }
    if version > 0 {
        s.push_str(&format!("// changed in release {version}\n"));
    }
    s
}

fn tar_czf(src: &Path, out: &Path) -> Result<(), BoxError> {
    let status = Command::new("tar")
        .arg("-czf")
        .arg(out)
        .arg("-C")
        .arg(src)
        .arg(".")
        .status()?;
    if !status.success() {
        return Err("tar failed".into());
    }
    Ok(())
}

/// r2: `pct` % of r1's files changed — 70 % of them edited in place, 15 %
/// added, 15 % removed — with the mtimes of the rest kept (a reproducible
/// build). Returns the release and the bytes of changed and added files.
fn make_changed(work: &Path, r1: &Release, pct: f64) -> Result<(Release, Changes), BoxError> {
    let src = work.join("src-r2");
    let _ = std::fs::remove_dir_all(&src);
    let status = Command::new("cp")
        .arg("-a")
        .arg(&r1.src)
        .arg(&src)
        .status()?;
    if !status.success() {
        return Err("cp -a failed".into());
    }
    let files = 2002.0;
    let n = ((files * pct / 100.0).round() as usize).max(1);
    let (edit, add) = ((n * 7).div_ceil(10), (n * 15).div_ceil(100));
    let remove = n.saturating_sub(edit + add);
    let mut changed_bytes = 0u64;
    let mut edited = Vec::new();
    for i in 0..edit {
        let (d, f) = ((i * 7) % 40, (i * 13) % 50);
        let path = format!("src/module{d}/File{f}.php");
        let body = php_file(d, f, 2);
        changed_bytes += body.len() as u64;
        std::fs::write(src.join(&path), &body)?;
        edited.push((path, hex::encode(Sha256::digest(body.as_bytes()))));
    }
    for i in 0..add {
        let body = php_file(100 + i, i, 2);
        changed_bytes += body.len() as u64;
        std::fs::write(src.join(format!("src/module{}/Added{i}.php", i % 40)), body)?;
    }
    let mut removed = Vec::new();
    for i in 0..remove {
        let path = format!("src/module{}/File{}.php", (i * 11 + 3) % 40, 49 - i);
        if edited.iter().any(|(p, _)| *p == path) {
            continue;
        }
        std::fs::remove_file(src.join(&path))?;
        removed.push(path);
    }
    let tarball = work.join("r2.tar.gz");
    tar_czf(&src, &tarball)?;
    let bytes = std::fs::metadata(&tarball)?.len();
    let sha = hex::encode(Sha256::digest(std::fs::read(&tarball)?));
    Ok((
        Release {
            tarball,
            sha,
            bytes,
            src,
            blob_sha: r1.blob_sha.clone(),
        },
        Changes {
            files: edit + add + removed.len(),
            bytes: changed_bytes,
            edited,
            removed,
        },
    ))
}

struct Changes {
    files: usize,
    bytes: u64,
    edited: Vec<(String, String)>,
    removed: Vec<String>,
}

// ---- the tools ------------------------------------------------------

/// hangar: a fresh pool (connections are part of the time), then ship +
/// activate on every node at once. Returns the ship reports and the most
/// commands one node took (ship + activate): round trips are the fixed cost.
async fn hangar_deploy(
    b: &Bench,
    route: &Route,
    root: &str,
    id: &str,
    rel: &Release,
) -> Result<(Vec<release::ShipReport>, usize), BoxError> {
    let pool = b.pool(route)?;
    let config = ReleaseConfig::new(root);
    let artifact = Artifact::new(&rel.tarball, &rel.sha);
    let mut tasks = Vec::new();
    for i in 0..b.nodes.len() {
        let (pool, config, artifact, target) = (
            pool.clone(),
            config.clone(),
            artifact.clone(),
            b.target(route, i),
        );
        let id = id.to_string();
        tasks.push(tokio::spawn(async move {
            let session = pool.session(&target).await?;
            let report = release::ship(&session, &config, &id, &artifact).await?;
            release::activate(&session, &config, &id).await?;
            Ok::<_, BoxError>((report, session.execs()))
        }));
    }
    let mut reports = Vec::new();
    let mut execs = 0;
    for t in tasks {
        let (report, n) = t.await??;
        reports.push(report);
        execs = execs.max(n);
    }
    Ok((reports, execs))
}

fn spawn_all(mut cmds: Vec<Command>) -> Result<(), BoxError> {
    let mut children = Vec::new();
    for c in &mut cmds {
        children.push(c.stdout(Stdio::null()).spawn()?);
    }
    let mut failed = None;
    for mut c in children {
        let status = c.wait()?;
        if !status.success() {
            failed = Some(format!("exited {status}"));
        }
    }
    match failed {
        Some(f) => Err(f.into()),
        None => Ok(()),
    }
}

/// Where [`Bench::clean`] moves what a round left on a node.
const SET_ASIDE: &str = "/srv/.bench-set-aside";

/// A command that moves `path` (if it is there) into a fresh directory
/// under [`SET_ASIDE`].
fn set_aside(path: &str) -> String {
    format!("[ ! -e {path} ] || {{ mkdir -p {SET_ASIDE} && mv {path} \"$(mktemp -d -p {SET_ASIDE})\"/; }}")
}

fn swap_cmd(root: &str, id: &str) -> String {
    format!("ln -sfn {root}/releases/{id} {root}/current.tmp && mv -T {root}/current.tmp {root}/current")
}

/// Plain OpenSSH: one `ssh … tar -xzf -` per node in parallel.
fn plain_ssh(b: &Bench, route: &Route, root: &str, rel: &Release) -> Result<(), BoxError> {
    let remote = format!(
        "mkdir -p {root}/releases/r1 && tar -xzf - -C {root}/releases/r1 && {}",
        swap_cmd(root, "r1")
    );
    let mut cmds = Vec::new();
    for (i, n) in b.nodes.iter().enumerate() {
        let mut c = Command::new("ssh");
        c.args(b.ssh_base(route, i))
            .arg(format!("root@{}", n.ip()))
            .arg(&remote)
            .stdin(std::fs::File::open(&rel.tarball)?);
        cmds.push(c);
    }
    spawn_all(cmds)
}

/// rsync -a --link-dest over ssh, then an ssh that swaps `current`:
/// Capistrano's and Deployer's way.
fn rsync(
    b: &Bench,
    route: &Route,
    root: &str,
    id: &str,
    prev: Option<&str>,
    src: &Path,
) -> Result<(), BoxError> {
    let mut cmds = Vec::new();
    for (i, n) in b.nodes.iter().enumerate() {
        let ssh = format!("ssh {}", b.ssh_base(route, i).join(" "));
        let link = prev
            .map(|p| format!("--link-dest={root}/releases/{p}"))
            .unwrap_or_default();
        let mut c = Command::new("sh");
        c.arg("-c").arg(format!(
            "rsync -a {link} --rsync-path='mkdir -p {root}/releases && rsync' -e '{ssh}' '{}/' root@{}:{root}/releases/{id}/ \
             && {ssh} root@{} '{}'",
            src.display(),
            n.ip(),
            n.ip(),
            swap_cmd(root, id)
        ));
        cmds.push(c);
    }
    spawn_all(cmds)
}

fn inventory(b: &Bench, route: &Route) -> Result<PathBuf, BoxError> {
    let path = b.work.join("inventory.ini");
    let mut f = std::fs::File::create(&path)?;
    writeln!(f, "[nodes]")?;
    for (i, n) in b.nodes.iter().enumerate() {
        writeln!(
            f,
            "{} ansible_host={} ansible_port={}",
            n.name(),
            n.ip(),
            route.ports[i]
        )?;
    }
    writeln!(f, "[nodes:vars]")?;
    writeln!(f, "ansible_user=root")?;
    writeln!(f, "ansible_python_interpreter=/usr/bin/python3")?;
    writeln!(
        f,
        "ansible_ssh_private_key_file={}",
        b.key.private_key.display()
    )?;
    writeln!(
        f,
        "ansible_ssh_common_args='-o UserKnownHostsFile={} -o StrictHostKeyChecking=yes'",
        route.known_hosts.display()
    )?;
    Ok(path)
}

fn run_playbook(b: &Bench, route: &Route, playbook: &Path) -> Result<(), BoxError> {
    let inv = inventory(b, route)?;
    let out = Command::new(&b.playbook)
        .arg("-i")
        .arg(&inv)
        .arg("-f")
        .arg(b.nodes.len().to_string())
        .arg(playbook)
        .env("ANSIBLE_PIPELINING", "True")
        .env("ANSIBLE_HOST_KEY_CHECKING", "True")
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_LOCAL_TEMP", b.work.join("ansible-tmp"))
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "ansible-playbook failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(())
}

fn ansible_unarchive(b: &Bench, route: &Route, root: &str, rel: &Release) -> Result<(), BoxError> {
    let play = format!(
        r#"- hosts: nodes
  gather_facts: false
  tasks:
    - name: release directory
      ansible.builtin.file: {{ path: {root}/releases/r1, state: directory }}
    - name: upload and extract
      ansible.builtin.unarchive: {{ src: "{tar}", dest: {root}/releases/r1 }}
    - name: swap current atomically
      ansible.builtin.shell: {swap}
"#,
        tar = rel.tarball.display(),
        swap = swap_cmd(root, "r1"),
    );
    let path = b.work.join("ship-playbook.yml");
    std::fs::write(&path, play)?;
    run_playbook(b, route, &path)
}

/// Ansible's `synchronize` (rsync) with `link_dest`, then the swap.
fn ansible_synchronize(b: &Bench, route: &Route, root: &str, src: &Path) -> Result<(), BoxError> {
    let play = format!(
        r#"- hosts: nodes
  gather_facts: false
  tasks:
    - name: releases directory
      ansible.builtin.file: {{ path: {root}/releases, state: directory }}
    - name: sync the release, linking unchanged files
      ansible.posix.synchronize:
        src: "{src}/"
        dest: "{root}/releases/r2/"
        archive: true
        link_dest: ["{root}/releases/r1"]
        use_ssh_args: true
    - name: swap current atomically
      ansible.builtin.shell: {swap}
"#,
        src = src.display(),
        swap = swap_cmd(root, "r2"),
    );
    let path = b.work.join("sync-playbook.yml");
    std::fs::write(&path, play)?;
    run_playbook(b, route, &path)
}

// ---- 1. full ship ----------------------------------------------------

async fn full_ship(b: &Bench, args: &Args, rel: &Release) -> Result<(), BoxError> {
    let ansible = !args.skip.contains("ansible");
    let checks = [("blob.bin", rel.blob_sha.as_str())];
    let mut s: BTreeMap<&str, Series> = BTreeMap::new();
    let route = b.direct.clone();
    let ssh_round = |s: &mut BTreeMap<&str, Series>| -> Result<(), BoxError> {
        let p = Probe::start(&b.cpu);
        plain_ssh(b, &route, "/srv/app-ssh", rel)?;
        s.entry("plain ssh")
            .or_default()
            .samples
            .push(p.stop(&b.cpu, false));
        b.verify("/srv/app-ssh", "r1", &checks)?;
        b.clean("/srv/app-ssh")
    };
    for round in 0..args.rounds {
        // A/B alternation: every other round the baseline goes first, so
        // neither side always runs on a machine the other just warmed up.
        let ssh_first = round % 2 == 1;
        if ssh_first {
            ssh_round(&mut s)?;
        }
        // hangar as a cold operator: the manifest is derived in the run.
        release::memo::forget_all();
        let p = Probe::start(&b.cpu);
        hangar_deploy(b, &route, "/srv/app-hangar", "r1", rel).await?;
        s.entry("hangar")
            .or_default()
            .samples
            .push(p.stop(&b.cpu, true));
        b.verify("/srv/app-hangar", "r1", &checks)?;
        b.clean("/srv/app-hangar")?;
        if !ssh_first {
            ssh_round(&mut s)?;
        }

        if ansible {
            let p = Probe::start(&b.cpu);
            ansible_unarchive(b, &route, "/srv/app-ansible", rel)?;
            s.entry("ansible")
                .or_default()
                .samples
                .push(p.stop(&b.cpu, false));
            b.verify("/srv/app-ansible", "r1", &checks)?;
            b.clean("/srv/app-ansible")?;
        }
        eprintln!(
            "full ship round {}: hangar {:.2} s, plain ssh {:.2} s",
            round + 1,
            s["hangar"].samples[round].wall,
            s["plain ssh"].samples[round].wall
        );
    }
    // Bytes on the wire, one more (untimed) round through the relays.
    let (relays, via) = relay_route(b).await?;
    release::memo::forget_all();
    hangar_deploy(b, &via, "/srv/app-hangar", "r1", rel).await?;
    b.verify("/srv/app-hangar", "r1", &checks)?;
    let (u, d) = relays.take();
    s.entry("hangar").or_default().bytes = Some(u + d);
    plain_ssh(b, &via, "/srv/app-ssh", rel)?;
    b.verify("/srv/app-ssh", "r1", &checks)?;
    let (u, d) = relays.take();
    s.entry("plain ssh").or_default().bytes = Some(u + d);
    if ansible {
        ansible_unarchive(b, &via, "/srv/app-ansible", rel)?;
        let (u, d) = relays.take();
        s.entry("ansible").or_default().bytes = Some(u + d);
    }
    drop(relays);
    for root in ["/srv/app-hangar", "/srv/app-ssh", "/srv/app-ansible"] {
        b.clean(root)?;
    }

    let n = b.nodes.len();
    println!(
        "\n## Ship a {:.1} MB release to {n} nodes (upload + verify + extract + swap; median of {})\n",
        rel.bytes as f64 / 1e6,
        args.rounds
    );
    let h = s["hangar"].wall();
    table(
        &s,
        &["hangar", "plain ssh", "ansible"],
        h,
        |name| match name {
            "plain ssh" => "plain OpenSSH (parallel `ssh … tar -xzf -`)".into(),
            "ansible" => format!("Ansible (`unarchive` + link, forks={n})"),
            other => other.into(),
        },
    );
    let vs_ssh = h / s["plain ssh"].wall();
    let per_round: Vec<f64> = s["hangar"]
        .samples
        .iter()
        .zip(&s["plain ssh"].samples)
        .map(|(a, b)| a.wall / b.wall)
        .collect();
    println!(
        "\n- hangar ≤ 1.0× plain ssh at {n} nodes: {vs_ssh:.2}× (per round: {}) — {}",
        per_round
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(", "),
        verdict(vs_ssh <= 1.0)
    );
    if let Some(a) = s.get("ansible") {
        let x = a.wall() / h;
        println!(
            "- hangar ≥ 2.5× faster than Ansible on fan-out: {x:.2}× — {}",
            verdict(x >= 2.5)
        );
    }
    Ok(())
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn table(s: &BTreeMap<&str, Series>, order: &[&str], base: f64, label: impl Fn(&str) -> String) {
    println!("| tool | wall (median) | vs hangar | operator CPU | node CPU | machine CPU | bytes on the wire |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for name in order {
        let Some(x) = s.get(name) else { continue };
        println!(
            "| {} | {:.2} s | {:.2}× | {:.2} s | {:.2} s | {:.2} s | {} |",
            label(name),
            x.wall(),
            x.wall() / base,
            x.med(|s| s.client),
            x.med(|s| s.nodes),
            x.med(|s| s.machine),
            x.bytes.map(human_bytes).unwrap_or_else(|| "—".into())
        );
    }
}

fn human_bytes(b: u64) -> String {
    if b >= 10_000_000 {
        format!("{:.1} MB", b as f64 / 1e6)
    } else {
        format!("{:.1} kB", b as f64 / 1e3)
    }
}

// ---- 2. a release with 1 % of its files changed ------------------------

async fn delta_ship(b: &Bench, args: &Args, r1: &Release) -> Result<(), BoxError> {
    let ansible = !args.skip.contains("ansible");
    let (r2, changes) = make_changed(&b.work, r1, args.change_pct)?;
    let n = b.nodes.len();
    let roots = [
        ("hangar delta", "/srv/app-hd"),
        ("hangar full", "/srv/app-hf"),
        ("rsync", "/srv/app-rs"),
        ("ansible", "/srv/app-as"),
    ];
    let route = b.direct.clone();
    // r1 everywhere, untimed: hangar ships it itself (with its manifest),
    // rsync and Ansible's root get a plain rsync copy.
    release::memo::forget_all();
    hangar_deploy(b, &route, "/srv/app-hd", "r1", r1).await?;
    hangar_deploy(b, &route, "/srv/app-hf", "r1", r1).await?;
    rsync(b, &route, "/srv/app-rs", "r1", None, &r1.src)?;
    if ansible {
        rsync(b, &route, "/srv/app-as", "r1", None, &r1.src)?;
    }
    let mut checks: Vec<(&str, &str)> = vec![("blob.bin", r2.blob_sha.as_str())];
    checks.extend(
        changes
            .edited
            .iter()
            .take(3)
            .map(|(p, s)| (p.as_str(), s.as_str())),
    );
    let view = NodeView {
        app_root: "/srv/app-hd".into(),
        shared_paths: vec![],
        umask: None,
    };
    let r1_artifact = Artifact::new(&r1.tarball, &r1.sha);
    let reset = |root: &str, whole: bool| -> Result<(), BoxError> {
        b.on_nodes(&swap_cmd(root, "r1"))?;
        if whole {
            // No manifest to diff against, and r2's 2,000 files moved
            // aside, not deleted (see `Bench::clean`).
            b.on_nodes(&format!(
                "{} && rm -rf {root}/.hangar/manifests {root}/.hangar/artifacts/r2 {root}/.hangar/stamps/r2",
                set_aside(&format!("{root}/releases/r2"))
            ))?;
            return Ok(());
        }
        // r2 goes the way hangar prunes a release (which renews the stat
        // stamps of the releases sharing its inodes); it frees the few
        // files that were new in r2, not the ones linked from r1.
        b.on_nodes(&release::plan::prune_script(
            &ReleaseConfig::new(root),
            &["r2".to_string()],
        ))?;
        Ok(())
    };
    let mut s: BTreeMap<&str, Series> = BTreeMap::new();
    let mut delta_reports = Vec::new();
    let mut delta_execs = 0;
    for round in 0..=args.rounds {
        // The last round goes through the relays: bytes on the wire.
        let counted = round == args.rounds;
        let relay = if counted {
            Some(relay_route(b).await?)
        } else {
            None
        };
        let route = relay
            .as_ref()
            .map(|(_, r)| r.clone())
            .unwrap_or_else(|| b.direct.clone());
        let mut record = |name: &'static str, sample: Sample| {
            let series = s.entry(name).or_default();
            if counted {
                let (u, d) = relay.as_ref().map(|(r, _)| r.take()).unwrap_or_default();
                series.bytes = Some(u + d);
            } else {
                series.samples.push(sample);
            }
        };

        // hangar, delta: the operator shipped r1 itself (it remembers its
        // manifest) and derives r2's in the run.
        reset("/srv/app-hd", false)?;
        release::memo::forget_all();
        release::remember(&r1_artifact, &view).await?;
        let p = Probe::start(&b.cpu);
        let (reports, execs) = hangar_deploy(b, &route, "/srv/app-hd", "r2", &r2).await?;
        record("hangar delta", p.stop(&b.cpu, true));
        delta_execs = execs;
        if let Some(r) = reports
            .iter()
            .find(|r| !matches!(r.method, ShipMethod::Delta { .. }))
        {
            return Err(format!("not a delta: {r:?}").into());
        }
        delta_reports = reports;
        b.verify("/srv/app-hd", "r2", &checks)?;

        // hangar, whole: the same release with no manifest to diff against.
        reset("/srv/app-hf", true)?;
        release::memo::forget_all();
        let p = Probe::start(&b.cpu);
        let (reports, _) = hangar_deploy(b, &route, "/srv/app-hf", "r2", &r2).await?;
        record("hangar full", p.stop(&b.cpu, true));
        if let Some(r) = reports.iter().find(|r| r.method != ShipMethod::Whole) {
            return Err(format!("not whole: {r:?}").into());
        }
        b.verify("/srv/app-hf", "r2", &checks)?;

        reset("/srv/app-rs", false)?;
        let p = Probe::start(&b.cpu);
        rsync(b, &route, "/srv/app-rs", "r2", Some("r1"), &r2.src)?;
        record("rsync", p.stop(&b.cpu, false));
        b.verify("/srv/app-rs", "r2", &checks)?;

        if ansible {
            reset("/srv/app-as", false)?;
            let p = Probe::start(&b.cpu);
            ansible_synchronize(b, &route, "/srv/app-as", &r2.src)?;
            record("ansible", p.stop(&b.cpu, false));
            b.verify("/srv/app-as", "r2", &checks)?;
        }
        for (_, root) in roots {
            if root != "/srv/app-as" || ansible {
                for path in &changes.removed {
                    b.absent(root, path)?;
                }
            }
        }
        if !counted {
            eprintln!(
                "delta round {}: hangar delta {:.2} s, full {:.2} s, rsync {:.2} s",
                round + 1,
                s["hangar delta"].samples[round].wall,
                s["hangar full"].samples[round].wall,
                s["rsync"].samples[round].wall
            );
        }
    }
    for (_, root) in roots {
        b.clean(root)?;
    }

    let manifest_gz = {
        let m = hangar::effects::release::manifest::derive(&r2.tarball, &r2.sha)?;
        let text = m.to_text();
        hangar::effects::release::delta::gzip(text.as_bytes(), 6)?.len() as u64
    };
    println!(
        "\n## Ship a release with {:.0} % of its files changed to {n} nodes ({} of 2,002 files: {} kB changed; {:.1} MB tarball; median of {})\n",
        args.change_pct,
        changes.files,
        changes.bytes / 1000,
        r2.bytes as f64 / 1e6,
        args.rounds
    );
    let h = s["hangar delta"].wall();
    table(
        &s,
        &["hangar delta", "hangar full", "rsync", "ansible"],
        h,
        |name| match name {
            "rsync" => "rsync -a --link-dest over ssh + swap".into(),
            "ansible" => format!("Ansible `synchronize` (link_dest) + swap, forks={n}"),
            other => other.into(),
        },
    );
    if let Some(r) = delta_reports.first() {
        if let ShipMethod::Delta {
            files_sent,
            files_reused,
            bytes_reused,
            files_hashed,
            ..
        } = &r.method
        {
            println!(
                "\nper node: {delta_execs} commands (ship + activate), {files_sent} files sent, {files_reused} linked or copied on the node ({:.1} MB), {files_hashed} files hashed to verify (the rest by stat stamp), {} kB of payload (manifest {} kB gzip'd)",
                *bytes_reused as f64 / 1e6,
                r.bytes / 1000,
                manifest_gz / 1000
            );
        }
    }
    let full_x = s["hangar full"].wall() / h;
    let rsync_x = h / s["rsync"].wall();
    println!(
        "\n- delta ≥ 10× faster than hangar's full ship: {full_x:.1}× — {}",
        verdict(full_x >= 10.0)
    );
    println!(
        "- delta ≤ 1.2× rsync's time: {rsync_x:.2}× — {}",
        verdict(rsync_x <= 1.2)
    );
    if let Some(bytes) = s["hangar delta"].bytes {
        let per_node = bytes as f64 / n as f64;
        let budget = 2.0 * changes.bytes as f64 + manifest_gz as f64;
        println!(
            "- bytes on the wire ≤ 2 × changed bytes + manifest: {:.1} kB per node vs {:.1} kB — {}",
            per_node / 1e3,
            budget / 1e3,
            verdict(per_node <= budget)
        );
    }
    Ok(())
}

// ---- 3. idempotent runbook re-run --------------------------------------

async fn rerun(b: &Bench, args: &Args) -> Result<(), BoxError> {
    let ansible = !args.skip.contains("ansible");
    let rb_path = b.work.join("bench-runbook.yaml");
    let pb_path = b.work.join("bench-playbook.yml");
    std::fs::write(&rb_path, bench_runbook("/srv/bench-hangar"))?;
    std::fs::write(&pb_path, bench_playbook("/srv/bench-ansible"))?;
    let runbook = Runbook::load(&rb_path)?;
    let route = b.direct.clone();
    let first = rerun_hangar(b, &runbook).await?;
    if first.1 != 20 * b.nodes.len() {
        return Err(format!("first hangar run changed {} steps", first.1).into());
    }
    if ansible {
        run_playbook(b, &route, &pb_path)?;
    }
    let mut s: BTreeMap<&str, Series> = BTreeMap::new();
    for _ in 0..args.rounds {
        let p = Probe::start(&b.cpu);
        let (_, changed) = rerun_hangar(b, &runbook).await?;
        s.entry("hangar")
            .or_default()
            .samples
            .push(p.stop(&b.cpu, true));
        if changed != 0 {
            return Err(format!("hangar re-run changed {changed} steps").into());
        }
        if ansible {
            let p = Probe::start(&b.cpu);
            run_playbook(b, &route, &pb_path)?;
            s.entry("ansible")
                .or_default()
                .samples
                .push(p.stop(&b.cpu, false));
        }
    }
    let n = b.nodes.len();
    println!(
        "\n## Re-run a 20-step idempotent runbook on {n} nodes (nothing to change; median of {})\n",
        args.rounds
    );
    let h = s["hangar"].wall();
    table(&s, &["hangar", "ansible"], h, |name| match name {
        "ansible" => format!("Ansible (forks={n})"),
        other => other.into(),
    });
    if let Some(a) = s.get("ansible") {
        let x = a.wall() / h;
        println!(
            "\n- hangar ≥ 10× faster than Ansible on the idempotent re-run: {x:.1}× — {}",
            verdict(x >= 10.0)
        );
    }
    Ok(())
}

async fn rerun_hangar(b: &Bench, runbook: &Runbook) -> Result<(Duration, usize), BoxError> {
    let pool = b.pool(&b.direct)?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..b.nodes.len() {
        let facts = Facts {
            instance_id: format!("i-{i}"),
            private_ip: b.nodes[i].ip().to_string(),
            app_root: "/srv/app".into(),
            health_path: "/health".into(),
            health_port: 80,
        };
        let plan = runbook.plan(&BTreeMap::new(), &facts)?;
        let (pool, target) = (pool.clone(), b.target(&b.direct, i));
        tasks.push(tokio::spawn(async move {
            let session = pool.session(&target).await?;
            let report = runbook::apply(&session, &plan).await.into_result()?;
            Ok::<_, BoxError>(report.changed())
        }));
    }
    let mut changed = 0;
    for t in tasks {
        changed += t.await??;
    }
    Ok((started.elapsed(), changed))
}

/// 10 files and 10 guarded commands: the shape of a typical provision.
fn bench_runbook(root: &str) -> String {
    let mut s = String::from("name: bench\nsteps:\n");
    for i in 0..10 {
        s.push_str(&format!(
            "  - name: config file {i}\n    file:\n      path: {root}/etc/conf{i}.ini\n      mode: \"0644\"\n      content: |\n        [section{i}]\n        workers = {i}\n        listen = 127.0.0.1:{port}\n",
            port = 9000 + i
        ));
    }
    for i in 0..10 {
        s.push_str(&format!(
            "  - name: command {i}\n    run: mkdir -p {root}/state && echo done > {root}/state/step{i}\n    creates: {root}/state/step{i}\n"
        ));
    }
    s
}

/// The same 20 steps as Ansible tasks.
fn bench_playbook(root: &str) -> String {
    let mut s = String::from("- hosts: nodes\n  gather_facts: false\n  tasks:\n");
    s.push_str(&format!(
        "    - name: etc directory\n      ansible.builtin.file: {{ path: {root}/etc, state: directory }}\n"
    ));
    for i in 0..10 {
        s.push_str(&format!(
            "    - name: config file {i}\n      ansible.builtin.copy:\n        dest: {root}/etc/conf{i}.ini\n        mode: \"0644\"\n        content: |\n          [section{i}]\n          workers = {i}\n          listen = 127.0.0.1:{port}\n",
            port = 9000 + i
        ));
    }
    for i in 0..9 {
        s.push_str(&format!(
            "    - name: command {i}\n      ansible.builtin.shell: mkdir -p {root}/state && echo done > {root}/state/step{i}\n      args: {{ creates: {root}/state/step{i} }}\n"
        ));
    }
    s
}
