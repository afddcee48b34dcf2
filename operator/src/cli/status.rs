//! `hangar status [CLUSTER]`: what a running operator reports.

use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use hangar::runtime::http::{ProblemView, SourceView};
use hangar::runtime::lease::{LeaderView, RoleName};
use hangar::runtime::status::{ClusterStatus, ConditionType};

use super::{Global, Output, SettingsFlags};

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Show one cluster in detail (nodes, recent activity).
    cluster: Option<String>,
    /// Operator HTTP address [env: HANGAR_SERVER; default: the listen address]
    #[arg(long, value_name = "URL")]
    server: Option<String>,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(flatten)]
    settings: SettingsFlags,
}

pub fn run(args: StatusArgs, global: &Global) -> anyhow::Result<ExitCode> {
    let server = server_url(args.server.clone(), &args.settings, global)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let client = reqwest::Client::builder().no_proxy().build()?;
        let get = |path: String| get_body(&client, format!("{server}{path}"));
        let problems: Vec<ProblemView> = serde_json::from_slice(&get("/api/v1/problems".into()).await?)?;
        // Who leads; an operator that does not say (starting) is shown as unknown.
        let leader: Option<LeaderView> = match get("/api/v1/leader".into()).await {
            Ok(body) => serde_json::from_slice(&body).ok(),
            Err(_) => None,
        };
        // The git spec source; a directory of specs has none (404).
        let source: Option<SourceView> = match get("/api/v1/source".into()).await {
            Ok(body) => serde_json::from_slice(&body).ok(),
            Err(_) => None,
        };
        if args.output == Output::Text {
            println!("{}", leader_line(leader.as_ref()));
            if let Some(v) = &source {
                println!("{}", source_line(v, chrono::Utc::now()));
            }
        }
        match &args.cluster {
            Some(name) => {
                let c: ClusterStatus = serde_json::from_slice(&get(format!("/api/v1/clusters/{name}")).await?)?;
                match args.output {
                    Output::Json => println!("{}", serde_json::to_string_pretty(&c)?),
                    Output::Text => print!("{}", detail(&c)),
                }
            }
            None => {
                let list: Vec<ClusterStatus> = serde_json::from_slice(&get("/api/v1/clusters".into()).await?)?;
                match args.output {
                    Output::Json => println!(
                        "{}",
                        serde_json::to_string_pretty(&serde_json::json!({ "leader": leader, "source": source, "clusters": list, "problems": problems }))?
                    ),
                    Output::Text => {
                        print!("{}", table(&list));
                        if !problems.is_empty() {
                            println!("\nspec problems ({}):", problems.len());
                            for p in &problems {
                                println!("  {}", p.text);
                            }
                        }
                    }
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `specs: git+ssh://…//clusters?ref=main at 1a2b3c4 "subject" (author); synced 12s ago`,
/// and why the newest commit did not load, if it did not.
fn source_line(v: &SourceView, now: chrono::DateTime<chrono::Utc>) -> String {
    let mut out = format!("specs: {}", v.source);
    match &v.commit {
        Some(c) => out.push_str(&format!(
            " at {} {:?} ({}, {})",
            c.short(),
            c.subject,
            c.author,
            c.time
        )),
        None => out.push_str(" (no commit loaded yet)"),
    }
    if let Some(t) = v.last_sync {
        out.push_str(&format!("; synced {}s ago", (now - t).num_seconds().max(0)));
    }
    for problem in [&v.refused, &v.error].into_iter().flatten() {
        out.push_str(&format!("\n  ! {problem}"));
    }
    out
}

/// The operator's base URL: `--server`, else `HANGAR_SERVER`, else the
/// listen address from the settings.
pub(super) fn server_url(
    server: Option<String>,
    settings: &SettingsFlags,
    global: &Global,
) -> anyhow::Result<String> {
    let server = match server.or_else(|| std::env::var("HANGAR_SERVER").ok()) {
        Some(s) => s,
        None => format!("http://{}", settings.load(global)?.listen),
    };
    Ok(server.trim_end_matches('/').to_string())
}

/// `GET url` on the operator's API; a 404 is an error with the operator's text.
pub(super) async fn get_body(client: &reqwest::Client, url: String) -> anyhow::Result<Vec<u8>> {
    let resp = client
        .get(&url)
        .timeout(std::time::Duration::from_secs(10))
        .send()
        .await
        .with_context(|| {
            format!("cannot reach the operator at {url} (is `hangar run` running? see --server)")
        })?;
    if resp.status() == reqwest::StatusCode::NOT_FOUND {
        bail!("{}", resp.text().await.unwrap_or_default().trim());
    }
    let resp = resp.error_for_status().with_context(|| url.clone())?;
    Ok(resp.bytes().await?.to_vec())
}

/// `leader: host-a-123-9f3c… (fence 4) via dynamodb:hangar-lease; this operator is a standby`.
fn leader_line(l: Option<&LeaderView>) -> String {
    let Some(l) = l else {
        return "leader: unknown (the operator is starting)".into();
    };
    let who = match (&l.leader, l.fence) {
        (Some(h), Some(f)) => format!("{h} (fence {f})"),
        (Some(h), None) => h.clone(),
        (None, _) => "nobody".into(),
    };
    let me = match l.role {
        RoleName::Leader => "this operator leads".to_string(),
        RoleName::Standby => format!("this operator ({}) is a standby", l.holder),
    };
    let ended = match (&l.role, &l.ended) {
        (RoleName::Standby, Some(why)) => format!(" (its last term ended: {why})"),
        _ => String::new(),
    };
    format!("leader: {who} via {}; {me}{ended}", l.lease)
}

fn ready(c: &ClusterStatus) -> String {
    format!(
        "{}/{}",
        c.phases.get("in-service").copied().unwrap_or(0),
        c.memory.desired
    )
}

fn phases(c: &ClusterStatus) -> String {
    if c.phases.is_empty() {
        return "-".into();
    }
    c.phases
        .iter()
        .map(|(p, n)| format!("{p} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn release(c: &ClusterStatus) -> String {
    let r = &c.memory.release;
    if r.rolling_back_from.is_some() {
        format!(
            "{} ← {} (rolling back)",
            r.target,
            r.rolling_back_from.clone().unwrap_or_default()
        )
    } else if r.desired != r.target {
        format!("{} ({} failed)", r.target, r.desired)
    } else if r.outdated > 0 {
        format!("→ {} ({} left)", r.target, r.outdated)
    } else {
        r.target.clone()
    }
}

fn conditions(c: &ClusterStatus) -> String {
    let mut out = Vec::new();
    for cond in &c.conditions {
        if cond.status {
            let mut s = format!("{:?}", cond.kind);
            if cond.kind == ConditionType::Degraded && !cond.message.is_empty() {
                s.push_str(&format!(" ({})", cond.message));
            }
            out.push(s);
        }
    }
    if c.spec_removed {
        out.push("SpecRemoved".into());
    }
    if out.is_empty() {
        "-".into()
    } else {
        out.join(", ")
    }
}

/// One line per cluster, aligned.
fn table(list: &[ClusterStatus]) -> String {
    let header = [
        "CLUSTER",
        "READY",
        "WINDOW",
        "PHASES",
        "RELEASE",
        "CONDITIONS",
    ];
    let rows: Vec<[String; 6]> = list
        .iter()
        .map(|c| {
            let window = match &c.memory.window {
                Some(w) => match &w.schedule {
                    Some(s) => format!("[{},{}] {s}", w.min, w.max),
                    None => format!("[{},{}]", w.min, w.max),
                },
                None => "-".into(),
            };
            [
                c.name.clone(),
                ready(c),
                window,
                phases(c),
                release(c),
                conditions(c),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    if rows.is_empty() {
        out.push_str("(no clusters)\n");
    }
    for r in &rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn detail(c: &ClusterStatus) -> String {
    let mut out = String::new();
    out.push_str(&format!("cluster {} ({})\n", c.name, c.region));
    if let Some(f) = &c.file {
        out.push_str(&format!(
            "  spec:     {} (hash {})\n",
            f.display(),
            c.observed_spec_hash
        ));
    }
    if let Some(commit) = &c.commit {
        out.push_str(&format!(
            "  commit:   {} {:?} by {} at {}\n",
            commit.short(),
            commit.subject,
            commit.author,
            commit.time
        ));
    }
    out.push_str(&format!("  ready:    {} in service\n", ready(c)));
    if let Some(w) = &c.memory.window {
        out.push_str(&format!(
            "  window:   [{}, {}]{}\n",
            w.min,
            w.max,
            w.schedule
                .as_ref()
                .map(|s| format!(" ({s} schedule)"))
                .unwrap_or_default()
        ));
    }
    if let Some(d) = &c.memory.last_decision {
        out.push_str(&format!("  decision: {}\n", d.reason));
    }
    out.push_str(&format!("  release:  {}\n", release(c)));
    for cond in &c.conditions {
        out.push_str(&format!(
            "  {:<12}{} {}{}\n",
            format!("{:?}:", cond.kind),
            cond.status,
            cond.reason,
            if cond.message.is_empty() {
                String::new()
            } else {
                format!(" — {}", cond.message)
            }
        ));
    }
    out.push_str("\n  NODE                 PHASE         RELEASE     ADDRESS        TASK\n");
    for n in &c.nodes {
        out.push_str(&format!(
            "  {:<20} {:<13} {:<11} {:<14} {}{}\n",
            n.id,
            n.phase,
            n.release.as_deref().unwrap_or("-"),
            n.address.as_deref().unwrap_or("-"),
            n.task.as_deref().unwrap_or("-"),
            n.last_error
                .as_ref()
                .map(|e| format!("  (last error: {e})"))
                .unwrap_or_default()
        ));
    }
    out.push_str("\n  recent activity:\n");
    for a in c.activities.iter().take(15) {
        out.push_str(&format!(
            "  {}  {:<10} {}{}\n",
            a.at.format("%H:%M:%S"),
            a.kind,
            a.node
                .as_ref()
                .map(|n| format!("{n}: "))
                .unwrap_or_default(),
            a.message
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_aligned_and_says_what_matters() {
        let mut c = ClusterStatus::new("web");
        c.memory.desired = 3;
        c.phases.insert("in-service".into(), 2);
        c.phases.insert("provisioning".into(), 1);
        c.memory.release.target = "v2".into();
        c.memory.release.desired = "v2".into();
        c.memory.release.outdated = 1;
        let t = table(&[c]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("CLUSTER  READY"));
        assert!(lines[1].contains("web      2/3"), "{t}");
        assert!(lines[1].contains("in-service 2, provisioning 1"), "{t}");
        assert!(lines[1].contains("→ v2 (1 left)"), "{t}");
        assert_eq!(table(&[]).lines().nth(1), Some("(no clusters)"));
    }

    #[test]
    fn the_source_line_names_the_commit_and_what_did_not_load() {
        let now = chrono::Utc::now();
        let v = SourceView {
            source: "git+ssh://git@h/infra.git//clusters?ref=main".into(),
            reference: "main".into(),
            commit: Some(hangar::effects::git::CommitInfo {
                sha: "1a2b3c4d5e6f".into(),
                author: "Ada <ada@example.com>".into(),
                time: "2026-12-01T10:00:00Z".into(),
                subject: "web: v2".into(),
            }),
            last_sync: Some(now - chrono::Duration::seconds(12)),
            refused: Some("commit 9f: not signed by a key in /etc/hangar/allowed_signers".into()),
            ..SourceView::default()
        };
        let line = source_line(&v, now);
        assert!(
            line.starts_with(
                "specs: git+ssh://git@h/infra.git//clusters?ref=main at 1a2b3c4 \"web: v2\" (Ada"
            ),
            "{line}"
        );
        assert!(line.contains("synced 12s ago"), "{line}");
        assert!(line.contains("\n  ! commit 9f: not signed"), "{line}");
    }
}
