//! Benchmark: a 50-node scale-out on the local cloud, with AWS's API
//! semantics on (token buckets, listing lag, ClientToken idempotency), and
//! the API calls hangar makes per family against AWS's default budgets.
//! Driven by `benches/scale_out/run.sh` (release build); not a test.
//!
//! ```text
//! bench_scale_out --hangar target/release/hangar [--from 2] [--nodes 50]
//! ```
//!
//! The cluster first settles at `--from` nodes; then the spec asks for
//! `--nodes` and the clock runs until every node is healthy in the target
//! group. The gateway counts every call hangar signs, per action; sampled
//! every 200 ms, that gives each family's peak rate over any 1 s.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hangar_local::harness::{LocalCloud, LocalCloudOptions};
use hangar_local::lb::Health;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Args {
    hangar: PathBuf,
    from: u32,
    nodes: u32,
}

fn args() -> Result<Args, BoxError> {
    let mut a = Args {
        hangar: PathBuf::from("target/release/hangar"),
        from: 2,
        nodes: 50,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--hangar" => a.hangar = PathBuf::from(value),
            "--from" => a.from = value.parse()?,
            "--nodes" => a.nodes = value.parse()?,
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    Ok(a)
}

/// An API family and AWS's default budget for it (burst, refill per s).
struct Family {
    name: &'static str,
    budget: (u32, u32),
    matches: fn(&str, &str) -> bool,
}

const FAMILIES: [Family; 7] = [
    Family {
        name: "EC2 Describe*",
        budget: (100, 20),
        matches: |s, a| s == "ec2" && a.starts_with("Describe"),
    },
    Family {
        name: "EC2 RunInstances",
        budget: (5, 2),
        matches: |s, a| s == "ec2" && a == "RunInstances",
    },
    Family {
        name: "EC2 TerminateInstances",
        budget: (100, 5),
        matches: |s, a| s == "ec2" && a == "TerminateInstances",
    },
    Family {
        name: "EC2 CreateTags",
        budget: (100, 10),
        matches: |s, a| s == "ec2" && a == "CreateTags",
    },
    Family {
        name: "ELB (De)RegisterTargets",
        budget: (20, 4),
        matches: |s, a| s == "elasticloadbalancing" && a.ends_with("RegisterTargets"),
    },
    Family {
        name: "ELB Describe*",
        budget: (40, 10),
        matches: |s, a| s == "elasticloadbalancing" && a.starts_with("Describe"),
    },
    Family {
        name: "CloudWatch GetMetricData",
        budget: (50, 50),
        matches: |s, a| s == "monitoring" && a == "GetMetricData",
    },
];

struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        // SIGTERM by PID, then wait: node tasks reach a safe point.
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

fn main() -> Result<(), BoxError> {
    let args = args()?;
    let cloud = LocalCloud::start(LocalCloudOptions {
        deregistration_delay: Duration::from_secs(3),
        ..LocalCloudOptions::default()
    })?;
    let dir = tempfile::tempdir()?;
    let specs = dir.path().join("specs");
    std::fs::create_dir_all(&specs)?;
    let spec = |n: u32| {
        cloud
            .spec()
            .remove("spec.autoscaling")
            .with_capacity(n, n)
            .set("spec.release.healthCheck.interval", "500ms")
    };
    spec(args.from).write(&specs)?;
    let log = std::fs::File::create(dir.path().join("hangar.log"))?;
    let child = Command::new(&args.hangar)
        .args(["run", "--specs"])
        .arg(&specs)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--listen", "127.0.0.1:0", "--owner", "bench"])
        .envs(cloud.env())
        .stdout(Stdio::null())
        .stderr(log.try_clone()?)
        .spawn()?;
    let _operator = Operator(child);
    let healthy = || {
        cloud
            .lb()
            .targets()
            .iter()
            .filter(|t| t.registered && t.health == Health::Healthy)
            .count() as u32
    };
    wait_until(Duration::from_secs(180), || healthy() == args.from)?;

    cloud.reset_api_calls();
    let key = hangar_local::aws::ACCESS_KEY_ID;
    let started = Instant::now();
    spec(args.nodes).write(&specs)?;
    let mut samples: VecDeque<(Instant, BTreeMap<String, u64>)> = VecDeque::new();
    let mut peaks: BTreeMap<&str, u64> = BTreeMap::new();
    let mut first_new = None;
    while healthy() < args.nodes {
        if started.elapsed() > Duration::from_secs(600) {
            return Err(
                format!("only {} of {} healthy after 10 min", healthy(), args.nodes).into(),
            );
        }
        let now = Instant::now();
        if first_new.is_none() && healthy() > args.from {
            first_new = Some(started.elapsed());
        }
        let counts = per_action(&cloud, key);
        samples.push_back((now, counts.clone()));
        while samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(1))
        {
            samples.pop_front();
        }
        if let Some((_, old)) = samples.front() {
            for f in &FAMILIES {
                let rate = family(&counts, f) - family(old, f);
                let peak = peaks.entry(f.name).or_default();
                *peak = (*peak).max(rate);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let took = started.elapsed();
    let calls = cloud.api_calls();

    println!(
        "scale-out {} → {} nodes with AWS's API semantics on: all healthy in the target group after {:.1} s (first new node {:.1} s)",
        args.from,
        args.nodes,
        took.as_secs_f64(),
        first_new.unwrap_or(took).as_secs_f64()
    );
    println!();
    println!("| API family | calls | peak calls in any 1 s | AWS budget (burst / refill per s) | throttled |");
    println!("|---|---:|---:|---:|---:|");
    let mut throttled_total = 0;
    for f in &FAMILIES {
        let (mut n, mut throttled) = (0, 0);
        if let Some(actions) = calls.by_key.get(key) {
            for (k, c) in actions {
                let (service, action) = k.split_once(':').unwrap_or(("", k));
                if (f.matches)(service, action) {
                    n += c.calls;
                    throttled += c.throttled;
                }
            }
        }
        throttled_total += throttled;
        println!(
            "| {} | {n} | {} | {} / {} | {throttled} |",
            f.name,
            peaks.get(f.name).copied().unwrap_or(0),
            f.budget.0,
            f.budget.1
        );
    }
    println!();
    let total = calls.total(key);
    println!(
        "all calls: {} ({:.1}/s over the scale-out), throttled: {throttled_total}",
        total.calls,
        total.calls as f64 / took.as_secs_f64()
    );
    if let Some(actions) = calls.by_key.get(key) {
        println!();
        println!(
            "per action: {}",
            actions
                .iter()
                .map(|(k, c)| format!("{k}={}", c.calls))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok(())
}

fn per_action(cloud: &LocalCloud, key: &str) -> BTreeMap<String, u64> {
    cloud
        .api_calls()
        .by_key
        .get(key)
        .map(|m| m.iter().map(|(k, c)| (k.clone(), c.calls)).collect())
        .unwrap_or_default()
}

fn family(counts: &BTreeMap<String, u64>, f: &Family) -> u64 {
    counts
        .iter()
        .filter(|(k, _)| {
            let (s, a) = k.split_once(':').unwrap_or(("", k));
            (f.matches)(s, a)
        })
        .map(|(_, n)| n)
        .sum()
}

fn wait_until(timeout: Duration, mut ok: impl FnMut() -> bool) -> Result<(), BoxError> {
    let deadline = Instant::now() + timeout;
    while !ok() {
        if Instant::now() > deadline {
            return Err("timed out".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}
