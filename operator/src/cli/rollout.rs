//! `hangar rollout status CLUSTER [--watch] [--timeout D]` (kubectl's
//! habit): follows a rollout from a running operator's API so a CI job can
//! wait for its deploy.
//!
//! Exit codes: 0 the release is on every node in service; 1 the rollout
//! failed (halted, rolled back, the spec is broken or removed); 2 hangar
//! could not tell (operator unreachable, bad answer); 3 not finished yet —
//! `--timeout` passed, or without `--watch` the rollout is still going.
//! 3 is its own code because "still going" is neither a bad release (1)
//! nor hangar failing (2): a pipeline may keep waiting, but must not roll
//! back for it.

use std::io::{IsTerminal, Write as _};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use hangar::core::rollout;
use hangar::runtime::http::ProblemView;
use hangar::runtime::status::{ClusterStatus, NodeStatus};

use super::status::{get_body, server_url};
use super::{Global, SettingsFlags};

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Show (or with --watch, follow) a cluster's rollout. Exit 0: done;
    /// 1: halted, rolled back or spec broken; 2: operator unreachable;
    /// 3: not finished (timeout, or still going without --watch).
    Status(StatusArgs),
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    cluster: String,
    /// Keep following until the rollout finishes or fails.
    #[arg(long, short)]
    watch: bool,
    /// Give up after this long (e.g. `5m`); exit 3.
    #[arg(long, value_name = "DURATION")]
    timeout: Option<hangar_crds::Duration>,
    /// Wait for this release id (what CI just committed), not whatever the
    /// operator's applied spec names: until the operator applies the commit
    /// the old release being everywhere does not count.
    #[arg(long, value_name = "ID")]
    release: Option<String>,
    /// Operator HTTP address [env: HANGAR_SERVER; default: the listen address]
    #[arg(long, value_name = "URL")]
    server: Option<String>,
    /// How often to ask the operator while watching.
    #[arg(long, value_name = "DURATION", default_value = "2s")]
    interval: hangar_crds::Duration,
    #[command(flatten)]
    settings: SettingsFlags,
}

/// Where a rollout stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Done,
    Progressing,
    Failed,
}

/// One look at a rollout: its state and the line to print.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    pub state: State,
    pub line: String,
}

/// Phases of nodes on their way out (or parked); they do not count.
const LEAVING: [&str; 4] = ["draining", "terminating", "stopped", "warm"];

/// The whole decision, from the operator's status of the cluster and its
/// spec problems. `wanted` is the release to wait for (default: the one
/// the applied spec names).
pub fn assess(c: &ClusterStatus, problems: &[ProblemView], wanted: Option<&str>) -> Progress {
    let r = &c.memory.release;
    let release = wanted.unwrap_or(&r.desired).to_string();
    let head = format!("{}: release {release}", c.name);
    let failed = |why: String| Progress {
        state: State::Failed,
        line: format!("{head}: {why}"),
    };
    if c.spec_removed {
        return failed("the cluster's spec was removed".into());
    }
    let own_problems: Vec<&ProblemView> = problems
        .iter()
        .filter(|p| {
            c.file
                .as_ref()
                .is_some_and(|f| f.to_string_lossy() == p.file.as_str())
        })
        .collect();
    if let Some(p) = own_problems.first() {
        let more = match own_problems.len() {
            1 => String::new(),
            n => format!(" (and {} more)", n - 1),
        };
        return failed(format!("the spec is broken: {}{more}", p.text));
    }
    if r.desired.is_empty() {
        return Progress {
            state: State::Progressing,
            line: format!("{head}: waiting for the operator's first pass"),
        };
    }
    if r.desired != release {
        return Progress {
            state: State::Progressing,
            line: format!(
                "{head}: waiting for the operator to apply it (its spec names {})",
                r.desired
            ),
        };
    }
    if r.rolled_back.contains(&release) || r.rolling_back_from.as_deref() == Some(&release) {
        let why = reason(c, "rolling back").unwrap_or_else(|| format!("serving {}", r.target));
        return failed(format!("rolled back: {why}"));
    }
    if rollout::halted(r) {
        let why = reason(c, "halted").unwrap_or_else(|| format!("failed; serving {}", r.target));
        return failed(format!("halted: {why}"));
    }

    let live: Vec<&NodeStatus> = c
        .nodes
        .iter()
        .filter(|n| !LEAVING.contains(&n.phase.as_str()))
        .collect();
    let serving: Vec<&&NodeStatus> = live.iter().filter(|n| n.phase == "in-service").collect();
    let on = serving
        .iter()
        .filter(|n| n.release.as_deref() == Some(release.as_str()))
        .count();
    let total = (c.memory.desired as usize).max(live.len());
    let busy: Vec<String> = live
        .iter()
        .filter(|n| n.task.is_some() || n.phase != "in-service")
        .map(|n| match &n.task {
            Some(task) => format!("{} ({task}: {})", n.id, n.phase),
            None => format!("{} ({})", n.id, n.phase),
        })
        .collect();
    let done = busy.is_empty() && on == serving.len() && serving.len() >= c.memory.desired as usize;
    if done {
        return Progress {
            state: State::Done,
            line: format!("{head}: {on}/{on} nodes, rolled out"),
        };
    }
    let mut line = format!("{head}: {on}/{total} nodes");
    if !busy.is_empty() {
        line.push_str(&format!(", updating {}", busy.join(", ")));
    }
    if let Some(err) = live.iter().find_map(|n| n.last_error.as_ref()) {
        line.push_str(&format!(" — last error: {err}"));
    }
    Progress {
        state: State::Progressing,
        line,
    }
}

/// The newest rollout activity that says why (`halted`, `rolling back`).
fn reason(c: &ClusterStatus, word: &str) -> Option<String> {
    c.activities
        .iter()
        .find(|a| a.kind == "rollout" && a.message.contains(word))
        .map(|a| a.message.clone())
}

pub fn run(cmd: RolloutCommand, global: &Global) -> anyhow::Result<ExitCode> {
    let RolloutCommand::Status(args) = cmd;
    let server = server_url(args.server.clone(), &args.settings, global)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(follow(args, server))
}

/// Prints progress lines: refreshed in place on a terminal, a new line per
/// change otherwise (CI logs).
struct Printer {
    tty: bool,
    shown: Option<String>,
}

impl Printer {
    fn show(&mut self, line: &str, final_line: bool) {
        let mut out = std::io::stdout();
        let changed = self.shown.as_deref() != Some(line);
        if self.tty {
            if changed || final_line {
                let _ = write!(out, "\r\x1b[2K{line}");
            }
            if final_line {
                let _ = writeln!(out);
            }
        } else if changed {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
        self.shown = Some(line.to_string());
    }
}

async fn follow(args: StatusArgs, server: String) -> anyhow::Result<ExitCode> {
    let client = reqwest::Client::builder().no_proxy().build()?;
    let deadline = args.timeout.map(|t| Instant::now() + t.get());
    let timeout_text = args.timeout.map(|t| t.to_string()).unwrap_or_default();
    let mut printer = Printer {
        tty: std::io::stdout().is_terminal(),
        shown: None,
    };
    let mut last_error: Option<anyhow::Error>;
    loop {
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let answer = match remaining {
            Some(left) => {
                match tokio::time::timeout(left, look(&client, &server, &args.cluster)).await {
                    Ok(a) => a,
                    Err(_) => Err(anyhow::anyhow!("no answer from {server} in time")),
                }
            }
            None => look(&client, &server, &args.cluster).await,
        };
        match answer {
            Ok((status, problems)) => {
                last_error = None;
                let p = assess(&status, &problems, args.release.as_deref());
                match p.state {
                    State::Done => {
                        printer.show(&p.line, true);
                        return Ok(ExitCode::SUCCESS);
                    }
                    State::Failed => {
                        printer.show(&p.line, true);
                        return Ok(ExitCode::from(1));
                    }
                    State::Progressing if !args.watch => {
                        printer.show(&p.line, true);
                        return Ok(ExitCode::from(3));
                    }
                    State::Progressing => printer.show(&p.line, false),
                }
            }
            // Watching rides out an operator restart; a single look does not.
            Err(e) if !args.watch => {
                eprintln!("error: {e:#}");
                return Ok(ExitCode::from(2));
            }
            Err(e) => last_error = Some(e),
        }
        let wait = args.interval.get().max(Duration::from_millis(100));
        if let Some(deadline) = deadline {
            let now = Instant::now();
            if now + wait > deadline {
                tokio::time::sleep(deadline.saturating_duration_since(now)).await;
                if let Some(last) = printer.shown.clone() {
                    printer.show(&last, true);
                }
                if let (Some(e), None) = (last_error.as_ref(), &printer.shown) {
                    eprintln!("error: no answer within {timeout_text}: {e:#}");
                    return Ok(ExitCode::from(2));
                }
                eprintln!(
                    "error: timed out after {timeout_text}: the rollout of {} has not finished",
                    args.cluster
                );
                return Ok(ExitCode::from(3));
            }
        }
        tokio::time::sleep(wait).await;
    }
}

async fn look(
    client: &reqwest::Client,
    server: &str,
    cluster: &str,
) -> anyhow::Result<(ClusterStatus, Vec<ProblemView>)> {
    let body = get_body(client, format!("{server}/api/v1/clusters/{cluster}")).await?;
    let status: ClusterStatus =
        serde_json::from_slice(&body).context("the operator's cluster status")?;
    let body = get_body(client, format!("{server}/api/v1/problems")).await?;
    let problems: Vec<ProblemView> =
        serde_json::from_slice(&body).context("the operator's spec problems")?;
    Ok((status, problems))
}

#[cfg(test)]
mod tests;
