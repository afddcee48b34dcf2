//! `hangar-local load --rps N --for 60s`: fixed-rate traffic through the
//! LB, with a progress line every 5 s and a summary at the end (or Ctrl-C).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hangar_local::load::{LoadGenerator, LoadOptions, LoadReport};

use crate::rundir::RunDir;

#[derive(clap::Args)]
pub struct LoadArgs {
    /// Requests per second.
    #[arg(long)]
    rps: f64,
    /// How long to send (e.g. 60s, 2m).
    #[arg(long = "for", default_value = "60s", value_parser = crate::parse_duration)]
    duration: Duration,
    /// Target URL; default: `$HANGAR_LOCAL_LB_URL`, else the running stack's LB.
    #[arg(long)]
    url: Option<String>,
    /// Path requested on the LB.
    #[arg(long, default_value = "/")]
    path: String,
    /// Per-request timeout.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    timeout: Duration,
    /// Only print the summary.
    #[arg(long, short)]
    quiet: bool,
}

pub fn run(root: &Path, args: LoadArgs) -> Result<ExitCode> {
    let base = match args.url.clone() {
        Some(url) => url,
        None => match std::env::var("HANGAR_LOCAL_LB_URL") {
            Ok(url) if !url.is_empty() => url,
            _ => match RunDir::new(root)?.read_stack()? {
                Some(stack) => stack.lb_url,
                None => {
                    bail!("no LB URL: start the local cloud (`infra/local/cloud up`) or pass --url")
                }
            },
        },
    };
    let url = format!(
        "{}/{}",
        base.trim_end_matches('/'),
        args.path.trim_start_matches('/')
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the runtime")?;
    let mut options = LoadOptions::new(&url, args.rps);
    options.duration = Some(args.duration);
    options.timeout = args.timeout;
    println!(
        "load: GET {url} at {} req/s for {}s",
        args.rps,
        args.duration.as_secs()
    );
    let generator = LoadGenerator::start(options, runtime.handle())?;
    runtime.block_on(async {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        tick.tick().await;
        let end = tokio::time::Instant::now() + args.duration;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {
                    println!("load: interrupted");
                    break;
                }
                _ = tokio::time::sleep_until(end) => break,
                _ = tick.tick() => {
                    if !args.quiet {
                        println!("{}", progress(&generator.report()));
                    }
                }
            }
        }
    });
    // Waits for requests still in flight (at most --timeout).
    print_summary(&generator.stop());
    Ok(ExitCode::SUCCESS)
}

fn progress(r: &LoadReport) -> String {
    let targets = r
        .by_target
        .iter()
        .map(|(t, n)| format!("{t}:{n}"))
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "  {:>4}s  sent {:<6} ok {:<6} errors {:<5} p50 {:>4}ms p99 {:>5}ms  {}",
        r.elapsed.as_secs(),
        r.sent,
        r.ok,
        r.errors,
        r.latency_p50.as_millis(),
        r.latency_p99.as_millis(),
        targets
    )
}

fn print_summary(r: &LoadReport) {
    let statuses = r
        .by_status
        .iter()
        .map(|(s, n)| format!("{s}: {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "load: {} requests in {:.1}s: {} ok, {} errors ({} without an HTTP answer), {} not sent (too many in flight)",
        r.sent,
        r.elapsed.as_secs_f64(),
        r.ok,
        r.errors,
        r.transport_errors,
        r.dropped
    );
    if !statuses.is_empty() {
        println!("  by status:  {statuses}");
    }
    if !r.by_target.is_empty() {
        let t = r
            .by_target
            .iter()
            .map(|(t, n)| format!("{t}: {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!("  by node:    {t}");
    }
    if !r.by_release.is_empty() {
        let t = r
            .by_release
            .iter()
            .map(|(t, n)| format!("{t}: {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!("  by release: {t}");
    }
    if !r.by_releases_seen.is_empty() {
        let t = r
            .by_releases_seen
            .iter()
            .map(|(t, n)| format!("{t}: {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!("  files from: {t} ({} mixing releases)", r.mixed);
    }
    println!(
        "  latency:    p50 {}ms, p99 {}ms, max {}ms",
        r.latency_p50.as_millis(),
        r.latency_p99.as_millis(),
        r.latency_max.as_millis()
    );
}
