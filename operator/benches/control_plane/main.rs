//! Control-plane benchmark: one hangar operator reconciling N clusters ×
//! M instances that are all in a steady state, against an in-memory cloud
//! (`memory_cloud.rs`) that counts every API call.
//!
//! Measures, per fleet size: CPU and wall time of one full reconcile pass
//! with nothing to do (after a warm-up pass, and after one resync interval
//! so the pass lists the instances again and evaluates the traffic metric,
//! as every 15 s resync does), the spec reload each resync also does, peak
//! RSS, and API calls per pass by kind, next to the naive per-cluster API
//! pattern counted against the same cloud. Optionally runs the real runtime
//! (`hangar::runtime::run`) for a while and reports sustained calls/s and
//! CPU/s, and health-probe rounds against a loopback HTTP server.
//!
//! Driven by `benches/control_plane/run.sh`; prints a report and one
//! `RESULT {json}` line.
//!
//! ```text
//! control_plane --clusters 1000 --per-cluster 10 [--wait-secs 15]
//!               [--sustained-secs 0] [--probes] [--concurrency 8]
//! ```

mod health_server;
mod memory_cloud;
mod process_usage;
mod steady_fleet;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use hangar::runtime::controller::{Reconciler, TriggerSender};
use hangar::runtime::http::Board;
use hangar::runtime::reconcile::{LoopSettings, Operator};
use hangar::runtime::specs::SpecSet;
use hangar::runtime::status::StatusStore;
use hangar::runtime::telemetry::Telemetry;
use hangar_cloud::{ApiCalls, Compute, LoadBalancer};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use memory_cloud::{MemoryCloud, MemoryClouds};
use process_usage::{cpu_time, mib, status_bytes};
use steady_fleet::Shape;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// EC2's refill for non-mutating (Describe*) calls, per second.
const EC2_DESCRIBE_REFILL: f64 = 20.0;
/// ELBv2's account-wide bucket refill, per second.
const ELB_REFILL: f64 = 10.0;
/// CloudWatch GetMetricData's default account quota, per second.
const CLOUDWATCH_GMD_QUOTA: f64 = 50.0;
/// Calls that change something: none may happen in a steady state.
const MUTATING: [&str; 5] = [
    "RunInstances",
    "CreateTags",
    "TerminateInstances",
    "RegisterTargets",
    "DeregisterTargets",
];

struct Args {
    clusters: usize,
    per_cluster: usize,
    wait: Duration,
    sustained: Duration,
    probes: bool,
    concurrency: usize,
    runbook: PathBuf,
}

fn args() -> Result<Option<Args>, BoxError> {
    let mut a = Args {
        clusters: 100,
        per_cluster: 10,
        wait: Duration::from_secs(15),
        sustained: Duration::ZERO,
        probes: false,
        concurrency: 8,
        runbook: Path::new(env!("CARGO_MANIFEST_DIR")).join("../runbooks/nginx-php-fpm.yaml"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            // `cargo bench` appends it to every bench binary.
            "--bench" => {}
            "--probes" => a.probes = true,
            "--serve-health" => {
                health_server::serve_forever()?;
                return Ok(None);
            }
            "--clusters" => a.clusters = value()?.parse()?,
            "--per-cluster" => a.per_cluster = value()?.parse()?,
            "--wait-secs" => a.wait = Duration::from_secs_f64(value()?.parse()?),
            "--sustained-secs" => a.sustained = Duration::from_secs_f64(value()?.parse()?),
            "--concurrency" => a.concurrency = value()?.parse::<usize>()?.max(1),
            "--runbook" => a.runbook = PathBuf::from(value()?),
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    Ok(Some(a))
}

fn main() -> Result<(), BoxError> {
    let Some(args) = args()? else {
        return Ok(());
    };
    // Like `hangar run`: a multi-threaded runtime, one worker per core.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

/// API calls by `service:Operation`.
type Calls = BTreeMap<String, u64>;

fn calls(api: &ApiCalls) -> Calls {
    api.snapshot()
        .into_iter()
        .map(|o| (format!("{}:{}", o.service, o.operation), o.stats.calls))
        .collect()
}

fn since(before: &Calls, after: &Calls) -> Calls {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

fn sum(calls: &Calls, prefix: &str) -> u64 {
    calls
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v)
        .sum()
}

/// One measured reconcile pass.
#[derive(Debug, serde::Serialize)]
struct PassReport {
    cpu_ms: f64,
    wall_ms: f64,
    calls: Calls,
    errors: usize,
}

/// Reconciles every cluster once, at most `concurrency` at a time (like
/// the runner), and reports what that cost.
async fn pass(op: &Arc<Operator>, cloud: &MemoryCloud, concurrency: usize) -> PassReport {
    let keys = op.keys();
    let before = calls(&cloud.calls);
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    let gate = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut set = JoinSet::new();
    for key in keys {
        let Ok(permit) = gate.clone().acquire_owned().await else {
            break;
        };
        let op = op.clone();
        set.spawn(async move {
            let started = Instant::now();
            let outcome = op.reconcile(&key).await;
            op.observe(&key, outcome.as_ref(), started.elapsed());
            drop(permit);
            outcome.map_err(|e| format!("{key}: {e}"))
        });
    }
    let mut errors = 0;
    while let Some(done) = set.join_next().await {
        match done {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                errors += 1;
                if errors <= 3 {
                    eprintln!("reconcile failed: {e}");
                }
            }
            Err(e) => {
                errors += 1;
                eprintln!("reconcile task died: {e}");
            }
        }
    }
    let wall = t0.elapsed();
    let cpu = cpu_time() - cpu0;
    PassReport {
        cpu_ms: cpu.as_secs_f64() * 1e3,
        wall_ms: wall.as_secs_f64() * 1e3,
        calls: since(&before, &calls(&cloud.calls)),
        errors,
    }
}

/// Status files and their modification times (to prove an idle pass
/// writes none).
fn status_files(state: &Path) -> BTreeMap<PathBuf, SystemTime> {
    std::fs::read_dir(state.join("clusters"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.path(), e.metadata().ok()?.modified().ok()?)))
        .collect()
}

/// Activities recorded over every cluster (one status copy at a time, so
/// the harness does not inflate the peak RSS it measures).
fn activities(op: &Operator, board: &Board) -> usize {
    op.keys()
        .iter()
        .filter_map(|k| board.cluster(k))
        .map(|c| c.activities.len())
        .sum()
}

/// Facts that make a pass "nothing to do"; an empty list means it was.
fn idle_violations(
    report: &PassReport,
    op: &Operator,
    board: &Board,
    activities_before: usize,
    files_before: &BTreeMap<PathBuf, SystemTime>,
    state: &Path,
) -> Vec<String> {
    let mut v = Vec::new();
    for m in MUTATING {
        let n: u64 = report
            .calls
            .iter()
            .filter(|(k, _)| k.ends_with(&format!(":{m}")))
            .map(|(_, n)| n)
            .sum();
        if n > 0 {
            v.push(format!("{n} {m} calls"));
        }
    }
    if op.tasks().running_total() > 0 {
        v.push(format!("{} node tasks running", op.tasks().running_total()));
    }
    let acts = activities(op, board);
    if acts != activities_before {
        v.push(format!("{} new activities", acts - activities_before));
    }
    let files = status_files(state);
    let rewritten = files
        .iter()
        .filter(|(p, t)| files_before.get(*p) != Some(t))
        .count();
    if rewritten > 0 {
        v.push(format!("{rewritten} status files written"));
    }
    if report.errors > 0 {
        v.push(format!("{} reconciles failed", report.errors));
    }
    v
}

fn print_calls(label: &str, calls: &Calls) {
    let list: Vec<String> = calls.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("  {label:<28} {}", list.join("  "));
}

async fn run(args: Args) -> Result<(), BoxError> {
    let mut mem = Checkpoints::default();
    mem.mark("start");
    let rss_start = status_bytes("VmRSS").unwrap_or(0);
    let instances = args.clusters * args.per_cluster;
    let health = if args.probes {
        Some(health_server::HealthServer::spawn()?)
    } else {
        None
    };
    let shape = Shape {
        clusters: args.clusters,
        per_cluster: args.per_cluster,
        probe_at: health
            .as_ref()
            .map(|h| (IpAddr::V4(Ipv4Addr::LOCALHOST), h.port)),
    };
    println!(
        "control-plane benchmark: {} clusters × {} instances = {instances} instances{}",
        args.clusters,
        args.per_cluster,
        if args.probes {
            " (health probes on)"
        } else {
            " (no node addresses: health probes send nothing)"
        }
    );

    // The fleet: spec files, then the cloud that already matches them.
    let tmp = tempfile::tempdir()?;
    let spec_dir = steady_fleet::write_specs(tmp.path(), &args.runbook, &shape)?;
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    let specs = SpecSet::load(&spec_dir)?;
    let load_cpu = cpu_time() - cpu0;
    let load_wall = t0.elapsed();
    if !specs.problems.is_empty() {
        return Err(format!("spec problems: {}", specs.problems[0]).into());
    }
    mem.mark("specs loaded");
    let rss_specs = status_bytes("VmRSS").unwrap_or(0);
    let cloud = MemoryCloud::new(steady_fleet::OWNER, steady_fleet::TARGET_PER_NODE);
    steady_fleet::seed(&cloud, &specs, &shape);
    let rss_fleet = status_bytes("VmRSS").unwrap_or(0);
    mem.mark("fake cloud seeded");

    // The operator, as `hangar run` builds it.
    let state = tmp.path().join("state");
    let store = StatusStore::open(&state)?;
    let board = Arc::new(Board::default());
    let telemetry = Telemetry::new();
    let (triggers, _trigger_rx) = TriggerSender::channel();
    let op = Arc::new(Operator::new(
        LoopSettings::new(state.clone(), steady_fleet::OWNER.into()),
        Arc::new(MemoryClouds(cloud.clone())),
        store,
        board.clone(),
        telemetry.clone(),
        triggers,
    ));
    op.set_specs(specs);

    let warm = pass(&op, &cloud, args.concurrency).await;
    mem.mark("warm-up pass");
    if warm.errors > 0 {
        return Err(format!("{} reconciles failed in the warm-up pass", warm.errors).into());
    }
    // Let anything the warm-up started show itself before judging.
    tokio::time::sleep(Duration::from_millis(200)).await;
    if op.tasks().running_total() > 0 {
        return Err(format!(
            "the fleet is not steady: {} node tasks started in the warm-up pass",
            op.tasks().running_total()
        )
        .into());
    }

    // One resync later: the instance listing has aged and the metric
    // evaluation is due, as on every 15 s resync.
    tokio::time::sleep(args.wait).await;
    let files = status_files(&state);
    let acts = activities(&op, &board);
    let resync = pass(&op, &cloud, args.concurrency).await;
    let resync_bad = idle_violations(&resync, &op, &board, acts, &files, &state);
    mem.mark("steady pass (resync)");

    // Right away again: cached listing, no evaluation due (pure compute).
    let files = status_files(&state);
    let acts = activities(&op, &board);
    let hot = pass(&op, &cloud, args.concurrency).await;
    let hot_bad = idle_violations(&hot, &op, &board, acts, &files, &state);
    mem.mark("steady pass (cached)");

    // What `hangar run` also does every resync: reload the spec directory
    // (unchanged files reused).
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    let reloaded = op.specs().reload(&spec_dir)?;
    let changed = op.set_specs(reloaded);
    let reload_cpu = cpu_time() - cpu0;
    let reload_wall = t0.elapsed();
    mem.mark("spec reload");
    let scrape_cpu0 = cpu_time();
    let scrape = telemetry.encode();
    let scrape_cpu = cpu_time() - scrape_cpu0;

    // The naive pattern, counted against the same cloud: one filtered
    // DescribeInstances per cluster and one DescribeTargetHealth per
    // cluster, per pass.
    let before = calls(&cloud.calls);
    for key in op.keys() {
        let _ = cloud.list(Some(&key)).await?;
        let _ = cloud
            .target_health(&steady_fleet::target_group(&key))
            .await?;
    }
    let naive = since(&before, &calls(&cloud.calls));

    let probes = match &health {
        Some(h) => Some(measure_probes(&op, &cloud, h, instances, args.concurrency).await?),
        None => None,
    };
    let peak_pass = status_bytes("VmHWM").unwrap_or(0);

    // The baseline for the reload: every file parsed again, as each resync
    // did before. After the peak is read: its garbage is not hangar's.
    let cpu0 = cpu_time();
    drop(SpecSet::load(&spec_dir)?);
    let parse_all_cpu = cpu_time() - cpu0;

    let sustained = if args.sustained > Duration::ZERO {
        Some(
            sustained(
                &spec_dir,
                tmp.path(),
                &cloud,
                args.sustained,
                args.concurrency,
            )
            .await?,
        )
    } else {
        None
    };
    let peak_all = status_bytes("VmHWM").unwrap_or(0);
    let history = history_day(&op, &board);

    // The report.
    let every = args.wait.as_secs_f64().max(1.0);
    let rate = |calls: &Calls, prefix: &str| sum(calls, prefix) as f64 / 15.0;
    let ec2 = sum(&resync.calls, "ec2:Describe");
    let elb = sum(&resync.calls, "elbv2:");
    let cw = sum(&resync.calls, "cloudwatch:GetMetricData");
    let naive_ec2 = sum(&naive, "ec2:Describe");
    let naive_elb = sum(&naive, "elbv2:");
    println!();
    println!(
        "spec load ({} files):           {:>9.1} ms CPU {:>9.1} ms wall",
        args.clusters,
        load_cpu.as_secs_f64() * 1e3,
        load_wall.as_secs_f64() * 1e3
    );
    println!(
        "warm-up pass (first look):        {:>9.1} ms CPU {:>9.1} ms wall",
        warm.cpu_ms, warm.wall_ms
    );
    println!(
        "steady pass after {:>4.0} s:        {:>9.1} ms CPU {:>9.1} ms wall  {}",
        every,
        resync.cpu_ms,
        resync.wall_ms,
        verdict(&resync_bad)
    );
    println!(
        "steady pass, cached listing:      {:>9.1} ms CPU {:>9.1} ms wall  {}",
        hot.cpu_ms,
        hot.wall_ms,
        verdict(&hot_bad)
    );
    println!(
        "spec reload per resync:           {:>9.1} ms CPU {:>9.1} ms wall  ({} changed; parsing every file: {:.1} ms CPU)",
        reload_cpu.as_secs_f64() * 1e3,
        reload_wall.as_secs_f64() * 1e3,
        changed.len(),
        parse_all_cpu.as_secs_f64() * 1e3,
    );
    println!(
        "one /metrics scrape:              {:>9.1} ms CPU ({} KiB)",
        scrape_cpu.as_secs_f64() * 1e3,
        scrape.len() / 1024
    );
    println!(
        "memory: RSS at start {:.1} MiB, with fleet + fake cloud {:.1} MiB, peak (VmHWM) {:.1} MiB",
        mib(rss_start),
        mib(rss_fleet),
        mib(peak_pass)
    );
    // The fake cloud's own store lives in this process but would not in
    // production (it is AWS): what seeding it added is taken off.
    let fake_cloud = rss_fleet.saturating_sub(rss_specs);
    println!(
        "operator's own peak RSS: {:.1} MiB (VmHWM {:.1} MiB less the fake cloud's store, {:.1} MiB)",
        mib(peak_pass.saturating_sub(fake_cloud)),
        mib(peak_pass),
        mib(fake_cloud)
    );
    println!("memory checkpoints (VmRSS / VmHWM, MiB):");
    for (label, rss, hwm) in &mem.0 {
        println!("  {label:<28} {:>7.1} / {:>7.1}", mib(*rss), mib(*hwm));
    }
    println!("API calls per pass:");
    print_calls("warm-up pass", &warm.calls);
    print_calls("steady pass (resync)", &resync.calls);
    print_calls("steady pass (cached)", &hot.calls);
    print_calls("naive per-cluster pattern", &naive);
    println!("at a 15 s resync (one pass per 15 s):");
    println!(
        "  EC2 Describe*: hangar {:.3}/s = {:.2} % of 20/s; naive {:.2}/s = {:.1} %; naive/hangar = {:.0}×",
        rate(&resync.calls, "ec2:Describe"),
        100.0 * rate(&resync.calls, "ec2:Describe") / EC2_DESCRIBE_REFILL,
        rate(&naive, "ec2:Describe"),
        100.0 * rate(&naive, "ec2:Describe") / EC2_DESCRIBE_REFILL,
        naive_ec2 as f64 / ec2.max(1) as f64,
    );
    println!(
        "  ELBv2:         hangar {:.3}/s = {:.2} % of 10/s; naive {:.2}/s = {:.1} %",
        rate(&resync.calls, "elbv2:"),
        100.0 * rate(&resync.calls, "elbv2:") / ELB_REFILL,
        rate(&naive, "elbv2:"),
        100.0 * rate(&naive, "elbv2:") / ELB_REFILL,
    );
    println!(
        "  CloudWatch GetMetricData: hangar {:.2}/s = {:.1} % of the 50/s account quota",
        rate(&resync.calls, "cloudwatch:GetMetricData"),
        100.0 * rate(&resync.calls, "cloudwatch:GetMetricData") / CLOUDWATCH_GMD_QUOTA,
    );
    if let Some(p) = &probes {
        for (label, r) in [
            ("first round (connects)", &p.first),
            ("next round (kept alive)", &p.kept),
            ("old probe (reqwest, new connection each)", &p.fresh_reqwest),
        ] {
            println!(
                "health probes, {label}: {} answered, {:.1} ms CPU ({:.1} µs a probe), {:.1} ms wall, {} failed",
                r.answered,
                r.cpu_ms,
                r.cpu_ms * 1e3 / r.answered.max(1) as f64,
                r.wall_ms,
                r.failing
            );
        }
        println!("  connections kept between rounds: {}", p.idle_connections);
    }
    if let Some(s) = &sustained {
        println!(
            "sustained (hangar::runtime::run, {:.0} s measured after {:.0} s start-up): {:.1} ms CPU/s",
            s.measured_secs, s.startup_secs, s.cpu_ms_per_sec
        );
        print_calls("  calls in the window", &s.calls);
        println!(
            "  EC2 Describe* {:.3}/s ({:.2} % of 20/s), ELBv2 {:.3}/s ({:.2} % of 10/s), GetMetricData {:.2}/s",
            s.ec2_per_sec,
            100.0 * s.ec2_per_sec / EC2_DESCRIBE_REFILL,
            s.elb_per_sec,
            100.0 * s.elb_per_sec / ELB_REFILL,
            s.cw_per_sec
        );
        println!(
            "  peak RSS including the runtime run: {:.1} MiB",
            mib(peak_all)
        );
    }
    println!(
        "status-page history, 24 h at a 15 s evaluationInterval: {} points, {:.1} MiB held ({:.1} KiB a cluster); RSS {:.1} → {:.1} MiB (+{:.1} MiB); recording a point: {:.2} µs CPU",
        history.points,
        history.heap_bytes as f64 / (1 << 20) as f64,
        history.heap_bytes as f64 / 1024.0 / args.clusters.max(1) as f64,
        history.rss_before_mib,
        history.rss_after_mib,
        history.rss_after_mib - history.rss_before_mib,
        history.record_us,
    );
    let result = serde_json::json!({
        "clusters": args.clusters,
        "per_cluster": args.per_cluster,
        "instances": instances,
        "probes": args.probes,
        "wait_secs": every,
        "spec_load_cpu_ms": load_cpu.as_secs_f64() * 1e3,
        "warm": warm,
        "resync": resync,
        "resync_idle_violations": resync_bad,
        "hot": hot,
        "hot_idle_violations": hot_bad,
        "reload_cpu_ms": reload_cpu.as_secs_f64() * 1e3,
        "parse_all_cpu_ms": parse_all_cpu.as_secs_f64() * 1e3,
        "reload_wall_ms": reload_wall.as_secs_f64() * 1e3,
        "scrape_cpu_ms": scrape_cpu.as_secs_f64() * 1e3,
        "naive": naive,
        "ec2_describe_per_pass": ec2,
        "elb_per_pass": elb,
        "cloudwatch_gmd_per_pass": cw,
        "naive_ec2_describe_per_pass": naive_ec2,
        "naive_elb_per_pass": naive_elb,
        "rss_start_mib": mib(rss_start),
        "rss_fleet_mib": mib(rss_fleet),
        "peak_rss_mib": mib(peak_pass),
        "fake_cloud_rss_mib": mib(fake_cloud),
        "operator_peak_rss_mib": mib(peak_pass.saturating_sub(fake_cloud)),
        "peak_rss_with_runtime_mib": mib(peak_all),
        "memory_checkpoints": mem.0,
        "probes_report": probes,
        "sustained": sustained,
        "history_day": history,
    });
    println!("RESULT {result}");
    drop(health);
    Ok(())
}

#[derive(Debug, serde::Serialize)]
struct HistoryReport {
    points: usize,
    heap_bytes: usize,
    rss_before_mib: f64,
    rss_after_mib: f64,
    record_us: f64,
}

/// The status page's history at its bound: every cluster with a full day
/// of one point per 15 s evaluation (5,760), each point distinct (the
/// traffic varies), recorded through the board's history store.
fn history_day(op: &Operator, board: &Board) -> HistoryReport {
    use hangar::runtime::history::Point;
    let rss_before = status_bytes("VmRSS").unwrap_or(0);
    let keys = op.keys();
    let start = 1_800_000_000u32;
    let per_cluster = 24 * 3600 / 15;
    let cpu0 = cpu_time();
    for (c, key) in keys.iter().enumerate() {
        for i in 0..per_cluster {
            board.history().record(
                key,
                Point {
                    t: start + i * 15,
                    desired: 10,
                    in_service: 10,
                    rpm: 9000.0 + ((i as usize * 7 + c) % 1000) as f32,
                },
            );
        }
    }
    let cpu = cpu_time() - cpu0;
    let (points, heap_bytes) = board.history().size();
    HistoryReport {
        points,
        heap_bytes,
        rss_before_mib: mib(rss_before),
        rss_after_mib: mib(status_bytes("VmRSS").unwrap_or(0)),
        record_us: cpu.as_secs_f64() * 1e6 / points.max(1) as f64,
    }
}

/// RSS now and peak so far, at named points of the run.
#[derive(Default)]
struct Checkpoints(Vec<(&'static str, u64, u64)>);

impl Checkpoints {
    fn mark(&mut self, label: &'static str) {
        self.0.push((
            label,
            status_bytes("VmRSS").unwrap_or(0),
            status_bytes("VmHWM").unwrap_or(0),
        ));
    }
}

fn verdict(violations: &[String]) -> String {
    if violations.is_empty() {
        "(nothing done: no mutating call, no node task, no status write)".into()
    } else {
        format!("NOT IDLE: {}", violations.join(", "))
    }
}

#[derive(Debug, serde::Serialize)]
struct ProbeRound {
    answered: u64,
    cpu_ms: f64,
    wall_ms: f64,
    failing: u64,
}

/// The operator's probe rounds (its kept-alive connections: the first
/// round connects, the next reuses) beside the probe it replaced (a new
/// connection through `reqwest` per probe), against the same nodes.
#[derive(Debug, serde::Serialize)]
struct ProbeReport {
    /// A reconcile pass starting every cluster's round, until every node answered.
    first: ProbeRound,
    /// The same one round interval later: connections kept.
    kept: ProbeRound,
    /// The previous probe, replayed: `health::probe_once` with a
    /// non-pooling client, 16 at a time per cluster, every cluster at once.
    fresh_reqwest: ProbeRound,
    idle_connections: usize,
}

/// Waits until the health server has answered `nodes` more probes than
/// `start`, then reports what that cost since `cpu0`/`t0`.
async fn answered_round(
    health: &health_server::HealthServer,
    start: u64,
    nodes: usize,
    cpu0: Duration,
    t0: Instant,
) -> Result<ProbeRound, BoxError> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut answered = 0;
    while Instant::now() < deadline {
        answered = health.answered().await? - start;
        if answered >= nodes as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu = cpu_time() - cpu0;
    Ok(ProbeRound {
        answered,
        cpu_ms: cpu.as_secs_f64() * 1e3,
        wall_ms: t0.elapsed().as_secs_f64() * 1e3,
        // Every probe the server did not answer failed on hangar's side
        // (connect error, timeout).
        failing: (nodes as u64).saturating_sub(answered),
    })
}

/// A pass that starts a probe round for every cluster, measured until the
/// health server has answered one probe per node (the server runs in a
/// child process, so its CPU is not counted); twice, then the old probe.
async fn measure_probes(
    op: &Arc<Operator>,
    cloud: &MemoryCloud,
    health: &health_server::HealthServer,
    nodes: usize,
    concurrency: usize,
) -> Result<ProbeReport, BoxError> {
    let mut rounds = Vec::new();
    for _ in 0..2 {
        // Probe rounds are at least 5 s apart per cluster.
        tokio::time::sleep(Duration::from_secs(6)).await;
        let start = health.answered().await?;
        let cpu0 = cpu_time();
        let t0 = Instant::now();
        let _ = pass(op, cloud, concurrency).await;
        rounds.push(answered_round(health, start, nodes, cpu0, t0).await?);
    }
    let idle_connections = op.probes().idle_connections();
    // The old probe starts from no open connection, as it always did.
    op.probes().close_idle_connections();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fresh_reqwest = fresh_probe_round(op, health, nodes).await?;
    let kept = rounds.pop().ok_or("no second round")?;
    let first = rounds.pop().ok_or("no first round")?;
    Ok(ProbeReport {
        first,
        kept,
        fresh_reqwest,
        idle_connections,
    })
}

/// The probe round as it was before kept-alive connections: for every
/// cluster at once, its nodes 16 at a time, each probe a new connection
/// through one shared non-pooling `reqwest` client.
async fn fresh_probe_round(
    op: &Arc<Operator>,
    health: &health_server::HealthServer,
    nodes: usize,
) -> Result<ProbeRound, BoxError> {
    use futures::StreamExt as _;
    let client = hangar::effects::health::client()?;
    let url = format!("http://127.0.0.1:{}/health", health.port);
    let per_cluster = nodes / op.keys().len().max(1);
    let start = health.answered().await?;
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    let mut set = JoinSet::new();
    for _ in op.keys() {
        let (client, url) = (client.clone(), url.clone());
        set.spawn(async move {
            futures::stream::iter(0..per_cluster)
                .map(|_| hangar::effects::health::probe_once(&client, &url, Duration::from_secs(5)))
                .buffer_unordered(16)
                .collect::<Vec<_>>()
                .await
        });
    }
    while set.join_next().await.is_some() {}
    answered_round(health, start, per_cluster * op.keys().len(), cpu0, t0).await
}

#[derive(Debug, serde::Serialize)]
struct SustainedReport {
    startup_secs: f64,
    measured_secs: f64,
    cpu_ms_per_sec: f64,
    calls: Calls,
    ec2_per_sec: f64,
    elb_per_sec: f64,
    cw_per_sec: f64,
}

/// Runs the real operator runtime (spec watcher and reload, resync ticks,
/// runner with bounded concurrency) against the same cloud, and measures
/// what it costs per second once started.
async fn sustained(
    spec_dir: &Path,
    root: &Path,
    cloud: &Arc<MemoryCloud>,
    measure: Duration,
    concurrency: usize,
) -> Result<SustainedReport, BoxError> {
    let settings = hangar::runtime::settings::Settings {
        specs: spec_dir.display().to_string(),
        git: Default::default(),
        secrets_refresh_interval: hangar_crds::Duration::from_secs(60),
        template_version_ttl: hangar_crds::Duration::from_secs(60),
        target_group_check_interval: hangar_crds::Duration::from_secs(30),
        state_dir: root.join("state-runtime"),
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        owner: steady_fleet::OWNER.into(),
        concurrency,
        lease: Default::default(),
    };
    std::fs::create_dir_all(&settings.state_dir)?;
    let loop_settings = LoopSettings::new(settings.state_dir.clone(), settings.owner.clone());
    let shutdown = CancellationToken::new();
    let runtime = tokio::spawn(hangar::runtime::run(
        settings,
        Some(loop_settings),
        Arc::new(MemoryClouds(cloud.clone())),
        None,
        shutdown.clone(),
    ));
    // Start-up: the first pass over every cluster, then one full resync
    // so the steady rhythm is established.
    let startup = Duration::from_secs(20);
    tokio::time::sleep(startup).await;
    let before = calls(&cloud.calls);
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    tokio::time::sleep(measure).await;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_time() - cpu0;
    let window = since(&before, &calls(&cloud.calls));
    shutdown.cancel();
    match runtime.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("runtime: {e}").into()),
        Err(e) => return Err(format!("runtime task: {e}").into()),
    }
    Ok(SustainedReport {
        startup_secs: startup.as_secs_f64(),
        measured_secs: secs,
        cpu_ms_per_sec: cpu.as_secs_f64() * 1e3 / secs,
        ec2_per_sec: sum(&window, "ec2:Describe") as f64 / secs,
        elb_per_sec: sum(&window, "elbv2:") as f64 / secs,
        cw_per_sec: sum(&window, "cloudwatch:GetMetricData") as f64 / secs,
        calls: window,
    })
}
