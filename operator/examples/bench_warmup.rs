//! Benchmark: what `release.warmup` buys a PHP node's first users. On one
//! `debian` node of the local cloud (Debian 12, systemd, nginx + PHP-FPM
//! with OPcache, provisioned by the stock `runbooks/nginx-php-fpm.yaml`
//! through hangar's own runbook engine), each round ships two releases of
//! the PHP fixture (~200 files included per request) the way hangar does —
//! `afterActivate` reloads PHP-FPM, which empties OPcache — and times the
//! first 50 requests: once right after activation (cold), once after
//! hangar's warm-up (`health::warm_up`, 3 requests per path). The order
//! alternates per round, so both see the same machine and noise. Driven
//! by `benches/warmup/run.sh`; not a test.
//!
//! ```text
//! bench_warmup [--rounds 5] [--requests 50]
//! ```

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use hangar::effects::health;
use hangar::effects::release::{self, Artifact, ReleaseConfig};
use hangar::effects::runbook::{self, Facts, Runbook};
use hangar::effects::ssh::{Credentials, HostKeyVerifier, Redactor, SshPool, SshSettings, Target};
use hangar_local::debian::machine::DEPLOY_USER;
use hangar_local::php_app::PhpKind;
use hangar_local::{ImageVariant, LocalCloud, LocalCloudOptions, NodeKind};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const APP_ROOT: &str = "/srv/app";

fn main() -> Result<(), BoxError> {
    let (mut rounds, mut requests) = (5usize, 50usize);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--rounds" => rounds = value.parse::<usize>()?.max(1),
            "--requests" => requests = value.parse::<usize>()?.max(2),
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    let cloud = LocalCloud::start(LocalCloudOptions {
        nodes: NodeKind::Debian {
            image: ImageVariant::Php,
        },
        ..LocalCloudOptions::default()
    })?;
    let id = cloud.launch(1)?.remove(0).id;
    cloud.wait_ssh(&id, Duration::from_secs(180))?;
    let ip = cloud.node_ip(&id).ok_or("the node has no address")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(&cloud, &id, IpAddr::V4(ip), rounds, requests))
}

async fn run(
    cloud: &LocalCloud,
    id: &str,
    ip: IpAddr,
    rounds: usize,
    requests: usize,
) -> Result<(), BoxError> {
    let work = tempfile::tempdir()?;
    let pool = SshPool::new(
        SshSettings::new(
            Credentials::from_key_file(DEPLOY_USER, cloud.key_path())?,
            HostKeyVerifier::tofu(work.path()),
        ),
        Redactor::default(),
    );
    let session = pool.session(&Target::new(id.to_string(), ip, 22)).await?;
    let runbook_path = hangar_local::repo_root().join("runbooks/nginx-php-fpm.yaml");
    let plan = Runbook::load(&runbook_path)?.plan(
        &BTreeMap::new(),
        &Facts {
            instance_id: id.to_string(),
            private_ip: ip.to_string(),
            app_root: APP_ROOT.into(),
            health_path: "/health".into(),
            health_port: 80,
        },
    )?;
    runbook::apply(&session, &plan).await.into_result()?;
    let config = ReleaseConfig {
        shared_paths: vec!["storage".into()],
        keep: 3,
        after_activate: vec!["sudo -n systemctl reload php8.2-fpm".into()],
        ..ReleaseConfig::new(APP_ROOT)
    };
    let client = health::client()?;
    let url = format!("http://{}/", std::net::SocketAddr::new(ip, 80));
    let paths = vec!["/".to_string()];
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for warmed in order {
            let release_id = format!("r{round}-{}", if warmed { "warm" } else { "cold" });
            let (tarball, sha) = hangar_local::php_app::build(&release_id, PhpKind::Good)?;
            let path = work.path().join(format!("{release_id}.tar.gz"));
            std::fs::write(&path, &tarball)?;
            release::deploy(&session, &config, &release_id, &Artifact::new(&path, sha)).await?;
            // The reload is graceful: wait until the new workers answer.
            health::warm_up(
                ip,
                80,
                &["/health".into()],
                1,
                Duration::from_secs(5),
                Duration::from_secs(30),
            )
            .await?;
            if warmed {
                health::warm_up(
                    ip,
                    80,
                    &paths,
                    3,
                    Duration::from_secs(5),
                    Duration::from_secs(60),
                )
                .await?;
            }
            let mut times = Vec::with_capacity(requests);
            for _ in 0..requests {
                let t = Instant::now();
                let resp = client
                    .get(&url)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await?;
                let status = resp.status();
                let body = resp.text().await?;
                if !status.is_success() || !body.contains(&format!("release {release_id}")) {
                    return Err(format!("{url}: {status}: {body:.200}").into());
                }
                times.push(t.elapsed());
            }
            let (p50, p99) = (quantile(&times, 0.50), quantile(&times, 0.99));
            eprintln!(
                "round {round} {:>4}: first {:>7.1} ms  p50 {:>6.1} ms  p99 {:>7.1} ms",
                if warmed { "warm" } else { "cold" },
                ms(times[0]),
                ms(p50),
                ms(p99)
            );
            let row = (times[0], p50, p99);
            if warmed {
                warm.push(row);
            } else {
                cold.push(row);
            }
        }
    }
    let median = |rows: &[(Duration, Duration, Duration)],
                  pick: fn(&(Duration, Duration, Duration)) -> Duration| {
        let v: Vec<Duration> = rows.iter().map(pick).collect();
        quantile(&v, 0.5)
    };
    println!("\nfirst {requests} requests after activation, median of {rounds} rounds (ms):");
    println!("| | first request | p50 | p99 |");
    println!("|---|---:|---:|---:|");
    for (name, rows) in [("without warm-up", &cold), ("with warm-up", &warm)] {
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} |",
            ms(median(rows, |r| r.0)),
            ms(median(rows, |r| r.1)),
            ms(median(rows, |r| r.2))
        );
    }
    println!(
        "| ratio (without / with) | {:.1}× | {:.1}× | {:.1}× |",
        ratio(median(&cold, |r| r.0), median(&warm, |r| r.0)),
        ratio(median(&cold, |r| r.1), median(&warm, |r| r.1)),
        ratio(median(&cold, |r| r.2), median(&warm, |r| r.2))
    );
    Ok(())
}

/// The `q` quantile by nearest rank.
fn quantile(times: &[Duration], q: f64) -> Duration {
    let mut v = times.to_vec();
    v.sort();
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}
