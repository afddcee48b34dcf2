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

use super::{Global, SettingsFlags};

/// How `hangar plan` prints: for a terminal, for programs, for a pull
/// request comment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PlanFormat {
    Text,
    Json,
    Markdown,
}

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
    /// `markdown` is made for a pull request comment (examples/ci/).
    #[arg(long, visible_alias = "format", value_enum, default_value_t = PlanFormat::Text)]
    output: PlanFormat,
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
        PlanFormat::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        PlanFormat::Markdown => {
            let plans: Vec<ClusterPlan> = report
                .clusters
                .iter()
                .zip(&rows)
                .map(|(c, r)| {
                    let mut p = ClusterPlan::of(c, now);
                    p.window = window_text(r.min, r.max, r.schedule.as_deref());
                    p.nodes = Some((r.current, r.desired));
                    p.reason = r.reason.clone();
                    if r.desired > r.current {
                        p.changes.push(format!("launch {}", r.desired - r.current));
                    } else if r.desired < r.current {
                        p.changes
                            .push(format!("drain and terminate {}", r.current - r.desired));
                    }
                    p
                })
                .collect();
            print!("{}", markdown(&plans, &report.problems, now, true));
        }
        PlanFormat::Text => {
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
    let loaded: BTreeMap<String, hangar_crds::LoadedCluster> = set
        .clusters
        .iter()
        .map(|(name, c)| (name.clone(), c.loaded.clone()))
        .collect();
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
        PlanFormat::Json => println!("{}", serde_json::to_string_pretty(&previews)?),
        PlanFormat::Markdown => {
            let now = Utc::now();
            let plans: Vec<ClusterPlan> = previews
                .iter()
                .filter_map(|p| Some(ClusterPlan::of_preview(loaded.get(&p.status.name)?, p, now)))
                .collect();
            print!("{}", markdown(&plans, &problems, now, false));
        }
        PlanFormat::Text => {
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

/// What `--format markdown` shows of one cluster.
#[derive(Clone, Debug, Default, PartialEq)]
struct ClusterPlan {
    name: String,
    /// `file:line` of the cluster's document.
    at: String,
    window: String,
    /// Node count now → desired.
    nodes: Option<(u32, u32)>,
    reason: String,
    release: String,
    artifact: String,
    /// What a reconcile would do: launches, terminations, rollouts, config pushes.
    changes: Vec<String>,
    notes: Vec<String>,
    /// Name, capacity it sets, whether it is open at the planned instant.
    schedules: Vec<(String, String, bool)>,
}

impl ClusterPlan {
    fn of(c: &hangar_crds::LoadedCluster, now: DateTime<Utc>) -> ClusterPlan {
        let spec = &c.cluster.spec;
        let schedules = spec
            .schedules
            .iter()
            .map(|sc| {
                let open = hangar_crds::schedule::Window::parse(sc)
                    .ok()
                    .and_then(|w| w.open_since(now))
                    .is_some();
                let bound = |b: Option<u32>| b.map_or("-".to_string(), |v| v.to_string());
                (
                    sc.name.clone(),
                    format!(
                        "min {}, max {} ({}, until {}, {})",
                        bound(sc.capacity.min),
                        bound(sc.capacity.max),
                        sc.cron,
                        sc.until,
                        sc.timezone
                    ),
                    open,
                )
            })
            .collect();
        ClusterPlan {
            name: c.name().to_string(),
            at: format!("{}:{}", c.file.display(), c.line),
            release: spec.release.id.clone(),
            artifact: spec.release.artifact.clone(),
            schedules,
            ..ClusterPlan::default()
        }
    }

    fn of_preview(
        c: &hangar_crds::LoadedCluster,
        p: &hangar::runtime::reconcile::Preview,
        now: DateTime<Utc>,
    ) -> ClusterPlan {
        use hangar::core::fleet::{Action, Task};
        let mut plan = ClusterPlan::of(c, now);
        let s = &p.status;
        if let Some(w) = &s.memory.window {
            plan.window = window_text(w.min, w.max, w.schedule.as_deref());
        }
        let in_service = s.phases.get("in-service").copied().unwrap_or(0);
        let live = s
            .nodes
            .iter()
            .filter(|n| !matches!(n.phase.as_str(), "terminating" | "stopped"))
            .count() as u32;
        plan.nodes = Some((live.max(in_service), s.memory.desired));
        if let Some(d) = &s.memory.last_decision {
            plan.reason = d.reason.clone();
        }
        let runs = |node: &str| {
            s.nodes
                .iter()
                .find(|n| n.id == node)
                .and_then(|n| n.release.clone())
        };
        for a in &p.diff.actions {
            plan.changes.push(match a {
                Action::Launch { subnet, count } => format!("launch {count} in `{subnet}`"),
                Action::Start { node, task } => match task {
                    Task::Update { release } if runs(node).as_deref() == Some(release) => {
                        format!("push config to `{node}` (re-provision, release {release} kept)")
                    }
                    Task::Update { release } => format!(
                        "roll `{node}` to release {release} (from {})",
                        runs(node).unwrap_or_else(|| "none".into())
                    ),
                    Task::Rollback { release } => {
                        format!("roll `{node}` back to release {release}")
                    }
                    Task::Drain { reason } => format!("drain and terminate `{node}` ({reason})"),
                    Task::Advance => format!("bring `{node}` into service"),
                    Task::Prepare => format!("provision `{node}` (held before activation)"),
                    Task::Once { release } => {
                        format!("run the once hooks of {release} on `{node}`")
                    }
                    Task::Warm { stop: true } => {
                        format!("bring `{node}` into the warm pool, stopped")
                    }
                    Task::Warm { stop: false } => {
                        format!("bring `{node}` into the warm pool, running")
                    }
                    Task::Serve => format!("take `{node}` from the warm pool into service"),
                    Task::Rejoin => format!(
                        "register `{node}` in the target group again (tagged in service, not listed there)"
                    ),
                },
                Action::Cancel { node, reason } => {
                    format!("cancel the task on `{node}` ({reason})")
                }
            });
        }
        plan.notes = p.diff.notes.clone();
        plan
    }
}

fn window_text(min: u32, max: u32, schedule: Option<&str>) -> String {
    match schedule {
        Some(s) => format!("[{min}, {max}] ({s} schedule)"),
        None => format!("[{min}, {max}]"),
    }
}

/// Text for a table cell or list item: no line breaks, `|` escaped.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace(['\r', '\n'], " ")
}

/// The plan as a pull-request comment: problems first (they block the
/// merge), then a heading per cluster with a short table and its changes.
fn markdown(
    plans: &[ClusterPlan],
    problems: &[hangar_crds::Problem],
    now: DateTime<Utc>,
    offline: bool,
) -> String {
    let mut out = String::from("## hangar plan\n\n");
    out.push_str(&format!(
        "Planned for {} ({}) · {} cluster{} · {} problem{}\n\n",
        now.format("%Y-%m-%d %H:%M UTC"),
        if offline {
            "offline: node counts assumed, no cloud read"
        } else {
            "against the cloud"
        },
        plans.len(),
        if plans.len() == 1 { "" } else { "s" },
        problems.len(),
        if problems.len() == 1 { "" } else { "s" },
    ));
    if !problems.is_empty() {
        out.push_str("### :x: Problems\n\n");
        out.push_str("These specs do not load; the operator keeps running what it had.\n\n");
        for p in problems {
            let mut at = p.file.display().to_string();
            if let Some(line) = p.line {
                at.push_str(&format!(":{line}"));
                if let Some(col) = p.column {
                    at.push_str(&format!(":{col}"));
                }
            }
            let field = if p.path.is_empty() {
                String::new()
            } else {
                format!(" `{}`", p.path)
            };
            out.push_str(&format!("- `{at}`{field}: {}\n", cell(&p.message)));
        }
        out.push('\n');
    }
    for p in plans {
        out.push_str(&format!("### `{}`\n\n", p.name));
        out.push_str("| | |\n|---|---|\n");
        out.push_str(&format!("| Spec | `{}` |\n", cell(&p.at)));
        out.push_str(&format!("| Window | {} |\n", cell(&p.window)));
        if let Some((now_n, desired)) = p.nodes {
            let arrow = if now_n == desired {
                format!("{desired} (no change)")
            } else {
                format!("{now_n} → {desired}")
            };
            out.push_str(&format!("| Nodes | {arrow} |\n"));
        }
        out.push_str(&format!(
            "| Release | `{}` (`{}`) |\n\n",
            cell(&p.release),
            cell(&p.artifact)
        ));
        if p.changes.is_empty() {
            out.push_str("No changes.\n\n");
        } else {
            out.push_str("**Changes**\n\n");
            for c in &p.changes {
                out.push_str(&format!("- {}\n", cell(c)));
            }
            out.push('\n');
        }
        for n in &p.notes {
            out.push_str(&format!("> {}\n", cell(n)));
        }
        if !p.notes.is_empty() {
            out.push('\n');
        }
        if !p.schedules.is_empty() {
            out.push_str("| Schedule | Capacity | Now |\n|---|---|---|\n");
            for (name, capacity, open) in &p.schedules {
                out.push_str(&format!(
                    "| `{}` | {} | {} |\n",
                    cell(name),
                    cell(capacity),
                    if *open { "open" } else { "closed" }
                ));
            }
            out.push('\n');
        }
        if !p.reason.is_empty() {
            out.push_str(&format!(
                "<details><summary>Why this many nodes</summary>\n\n{}\n\n</details>\n\n",
                cell(&p.reason)
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 5, 1, 23, 0, 0).unwrap()
    }

    fn web() -> ClusterPlan {
        ClusterPlan {
            name: "web".into(),
            at: "specs/web.yaml:1".into(),
            window: "[1, 3] (night schedule)".into(),
            nodes: Some((5, 3)),
            reason: "window max 3 | traffic low".into(),
            release: "v2".into(),
            artifact: "s3://releases/web-v2.tar.gz".into(),
            changes: vec![
                "drain and terminate `i-05` (scale in)".into(),
                "roll `i-01` to release v2 (from v1)".into(),
            ],
            notes: vec!["launches held back: at max".into()],
            schedules: vec![("night".into(), "min 1, max 3".into(), true)],
        }
    }

    #[test]
    fn one_heading_per_cluster_with_its_table_changes_and_schedules() {
        let api = ClusterPlan {
            name: "api".into(),
            nodes: Some((2, 2)),
            ..ClusterPlan::default()
        };
        let md = markdown(&[web(), api], &[], at(), true);
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines[0], "## hangar plan");
        assert!(lines[2].contains("2025-05-01 23:00 UTC"), "{md}");
        assert!(lines[2].contains("2 clusters · 0 problems"), "{md}");
        assert!(!md.contains("Problems"), "{md}");
        let headings: Vec<&&str> = lines.iter().filter(|l| l.starts_with("### ")).collect();
        assert_eq!(headings, [&"### `web`", &"### `api`"]);
        assert!(md.contains("| Nodes | 5 → 3 |"), "{md}");
        assert!(md.contains("| Nodes | 2 (no change) |"), "{md}");
        assert!(md.contains("| Release | `v2` (`s3://releases/web-v2.tar.gz`) |"));
        assert!(md.contains("**Changes**\n\n- drain and terminate `i-05` (scale in)\n- roll `i-01` to release v2 (from v1)\n"));
        assert!(md.contains("> launches held back: at max"));
        assert!(md.contains("| `night` | min 1, max 3 | open |"));
        // A `|` in free text would break the table.
        assert!(md.contains("window max 3 \\| traffic low"), "{md}");
        // The second cluster has nothing to do.
        let api_part = &md[md.find("### `api`").unwrap()..];
        assert!(api_part.contains("No changes."), "{api_part}");
    }

    #[test]
    fn problems_come_first_with_file_line_col() {
        let problems = vec![
            hangar_crds::Problem {
                file: "specs/api.yaml".into(),
                line: Some(12),
                column: Some(5),
                path: "spec.release.sha256".into(),
                message: "not a sha256 (64 hex digits)".into(),
            },
            hangar_crds::Problem {
                file: "specs/broken.yaml".into(),
                line: None,
                column: None,
                path: String::new(),
                message: "cannot read: permission denied".into(),
            },
        ];
        let md = markdown(&[web()], &problems, at(), false);
        let problems_at = md.find("### :x: Problems").expect("a problems section");
        assert!(problems_at < md.find("### `web`").unwrap());
        assert!(
            md.contains(
                "- `specs/api.yaml:12:5` `spec.release.sha256`: not a sha256 (64 hex digits)\n"
            ),
            "{md}"
        );
        assert!(
            md.contains("- `specs/broken.yaml`: cannot read: permission denied\n"),
            "{md}"
        );
        assert!(md.contains("1 cluster · 2 problems"), "{md}");
        assert!(md.contains("against the cloud"), "{md}");
    }

    #[test]
    fn a_real_spec_shows_its_schedules_open_or_closed() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/web.yaml"))
                .unwrap();
        let file =
            std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/web.yaml"));
        let report = hangar_crds::load_str(&text, file);
        let c = report.clusters.first().expect("examples/web.yaml loads");
        // 23:00 UTC on a Thursday in May is 00:00 in Dublin: night is open.
        let p = ClusterPlan::of(c, at());
        let open: Vec<(&str, bool)> = p
            .schedules
            .iter()
            .map(|(n, _, o)| (n.as_str(), *o))
            .collect();
        assert_eq!(open, [("night", true), ("morning-peak", false)]);
        assert!(
            p.schedules[0].1.starts_with("min 1, max 3 (0 22 * * *"),
            "{:?}",
            p.schedules
        );
        assert_eq!(p.release, "3f2a9c1");
        assert!(p.at.ends_with("examples/web.yaml:1"), "{}", p.at);
    }
}
