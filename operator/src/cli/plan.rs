//! `hangar plan`: what the planner decides, offline.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use clap::Args;
use hangar::core::planner::{effective_capacity, plan, History, Reading};
use hangar_crds::load::load_dir;
use serde::Serialize;

use super::{Global, Output, SettingsFlags};

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    settings: SettingsFlags,
    /// Plan without the cloud: time, traffic and node counts come from the
    /// flags below (implied by any of them).
    #[arg(long)]
    offline: bool,
    /// Instant to plan for (RFC 3339); default now.
    #[arg(long, value_name = "RFC3339")]
    at: Option<DateTime<Utc>>,
    /// A cluster's total traffic in requests per minute, e.g. `web=5400`.
    #[arg(long = "metric", value_name = "CLUSTER=RATE", value_parser = parse_pair::<f64>)]
    metrics: Vec<(String, f64)>,
    /// A cluster's current node count, e.g. `web=3` (default: its effective min).
    #[arg(long = "current", value_name = "CLUSTER=N", value_parser = parse_pair::<u32>)]
    current: Vec<(String, u32)>,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

fn parse_pair<T: std::str::FromStr>(s: &str) -> Result<(String, T), String>
where
    T::Err: std::fmt::Display,
{
    let (name, value) = s.split_once('=').ok_or("expected CLUSTER=VALUE")?;
    let value = value.parse::<T>().map_err(|e| format!("`{value}`: {e}"))?;
    Ok((name.to_string(), value))
}

#[derive(Serialize)]
struct Row {
    cluster: String,
    file: PathBuf,
    min: u32,
    max: u32,
    schedule: Option<String>,
    current: u32,
    desired: u32,
    reason: String,
}

pub fn run(args: PlanArgs, global: &Global) -> anyhow::Result<ExitCode> {
    let offline =
        args.offline || args.at.is_some() || !args.metrics.is_empty() || !args.current.is_empty();
    if !offline {
        return run_against_cloud(args, global);
    }
    let specs = args.settings.load(global)?.specs_dir()?;
    let report = load_dir(&specs).with_context(|| "loading specs")?;
    let now = args.at.unwrap_or_else(Utc::now);
    let metrics: BTreeMap<_, _> = args.metrics.into_iter().collect();
    let current: BTreeMap<_, _> = args.current.into_iter().collect();
    for name in metrics.keys().chain(current.keys()) {
        if !report.clusters.iter().any(|c| c.name() == name) {
            bail!("no valid cluster named `{name}` in {}", specs.display());
        }
    }

    let rows: Vec<Row> = report
        .clusters
        .iter()
        .map(|c| {
            let spec = &c.cluster.spec;
            let cur = current
                .get(c.name())
                .copied()
                .unwrap_or_else(|| effective_capacity(spec, now).min);
            let metric = metrics.get(c.name()).map(|&rate| Reading {
                requests_per_minute: rate,
                observed_at: now,
            });
            let d = plan(spec, now, cur, metric, &History::default());
            Row {
                cluster: c.name().to_string(),
                file: c.file.clone(),
                min: d.window.min,
                max: d.window.max,
                schedule: d.window.schedule,
                current: cur,
                desired: d.desired,
                reason: d.reason,
            }
        })
        .collect();

    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Output::Text => {
            println!("planning for {}", now.to_rfc3339());
            for r in &rows {
                let window = match &r.schedule {
                    Some(s) => format!("[{}, {}] ({s} schedule)", r.min, r.max),
                    None => format!("[{}, {}]", r.min, r.max),
                };
                println!(
                    "{}: window {window}, current {}, desired {}",
                    r.cluster, r.current, r.desired
                );
                println!("  {}", r.reason);
            }
        }
    }
    for p in &report.problems {
        eprintln!("{p}");
    }
    Ok(if report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Cloud-aware: observe each cluster and print what a reconcile would do
/// now. Only reads — listing instances, reading metrics — never a change.
fn run_against_cloud(args: PlanArgs, global: &Global) -> anyhow::Result<ExitCode> {
    let settings = args.settings.load(global)?;
    let set = hangar::runtime::specs::SpecSet::load(&settings.specs_dir()?)
        .with_context(|| "loading specs")?;
    let problems = set.problems.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let previews = runtime.block_on(async {
        let clouds = hangar::runtime::clouds::aws(&settings.owner, &settings.state_dir);
        let (triggers, _rx) = hangar::runtime::controller::TriggerSender::channel();
        // Read-only: statuses are read from the state dir, never written.
        let store = hangar::runtime::status::StatusStore::read_only(&settings.state_dir);
        let operator = hangar::runtime::reconcile::Operator::new(
            hangar::runtime::reconcile::LoopSettings::new(
                settings.state_dir.clone(),
                settings.owner.clone(),
            ),
            clouds,
            store,
            std::sync::Arc::new(hangar::runtime::http::Board::default()),
            hangar::runtime::telemetry::Telemetry::new(),
            triggers,
        );
        let names: Vec<String> = set.clusters.keys().cloned().collect();
        operator.set_specs(set);
        let mut out = Vec::new();
        for name in names {
            let p = operator
                .preview(&name)
                .await
                .with_context(|| format!("cluster {name}"))?;
            out.extend(p);
        }
        Ok::<_, anyhow::Error>(out)
    })?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&previews)?),
        Output::Text => {
            for p in &previews {
                let s = &p.status;
                let window = s
                    .memory
                    .window
                    .as_ref()
                    .map(|w| format!("[{}, {}]", w.min, w.max))
                    .unwrap_or_default();
                let phases: Vec<String> =
                    s.phases.iter().map(|(k, v)| format!("{k} {v}")).collect();
                println!(
                    "{}: window {window}, nodes: {}",
                    s.name,
                    if phases.is_empty() {
                        "none".into()
                    } else {
                        phases.join(", ")
                    }
                );
                if let Some(d) = &s.memory.last_decision {
                    println!("  desired {}: {}", d.desired, d.reason);
                }
                if p.diff.actions.is_empty() {
                    println!("  nothing to do");
                }
                for a in &p.diff.actions {
                    match a {
                        hangar::core::fleet::Action::Launch { subnet, count } => {
                            println!("  would launch {count} in {subnet}")
                        }
                        hangar::core::fleet::Action::Start { node, task } => {
                            println!("  would start {} on {node}", task.name())
                        }
                        hangar::core::fleet::Action::Cancel { node, reason } => {
                            println!("  would cancel the task on {node} ({reason})")
                        }
                    }
                }
                for n in &p.diff.notes {
                    println!("  note: {n}");
                }
            }
        }
    }
    for p in &problems {
        eprintln!("{p}");
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
