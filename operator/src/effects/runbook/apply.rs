//! Applying a runbook [`Plan`] to a node over one SSH session.

use std::fmt;
use std::time::{Duration, Instant};

use super::{
    check_batch_script, file_matches, parse_check_batch, wrap, Action, BatchCheck, CheckResult,
    Plan, PlannedStep, RunbookError,
};
use crate::effects::ssh::{tail, Session, SshError, Stdin};

/// How one step went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The node was modified.
    Changed,
    /// Already in the desired state; `why` names the guard or `content`.
    Unchanged { why: &'static str },
    /// The step failed; the message is redacted.
    Failed { error: String },
}

#[derive(Clone, Debug)]
pub struct StepReport {
    pub name: String,
    pub outcome: Outcome,
    pub elapsed: Duration,
}

/// Per-step results, in order, up to and including the first failure.
#[derive(Clone, Debug)]
pub struct RunbookReport {
    pub runbook: String,
    pub node: String,
    pub steps: Vec<StepReport>,
    /// Steps planned in total (more than `steps.len()` after a failure).
    pub planned: usize,
    pub elapsed: Duration,
}

impl RunbookReport {
    pub fn changed(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| s.outcome == Outcome::Changed)
            .count()
    }

    pub fn unchanged(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(s.outcome, Outcome::Unchanged { .. }))
            .count()
    }

    pub fn failure(&self) -> Option<&StepReport> {
        self.steps
            .iter()
            .find(|s| matches!(s.outcome, Outcome::Failed { .. }))
    }

    pub fn succeeded(&self) -> bool {
        self.failure().is_none() && self.steps.len() == self.planned
    }

    /// `Err(StepFailed)` (carrying this report) when a step failed.
    pub fn into_result(self) -> Result<RunbookReport, RunbookError> {
        match self.failure() {
            None => Ok(self),
            Some(f) => Err(RunbookError::StepFailed {
                runbook: self.runbook.clone(),
                step: f.name.clone(),
                error: match &f.outcome {
                    Outcome::Failed { error } => error.clone(),
                    _ => String::new(),
                },
                report: Box::new(self),
            }),
        }
    }
}

impl fmt::Display for RunbookReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "runbook {} on {}:", self.runbook, self.node)?;
        for s in &self.steps {
            let (mark, detail) = match &s.outcome {
                Outcome::Changed => ("changed  ", String::new()),
                Outcome::Unchanged { why } => ("unchanged", format!(" ({why})")),
                Outcome::Failed { error } => ("FAILED   ", format!(": {error}")),
            };
            writeln!(
                f,
                "  {mark} {:>7.3}s  {}{detail}",
                s.elapsed.as_secs_f64(),
                s.name
            )?;
        }
        let skipped = self.planned - self.steps.len();
        if let Some(failed) = self.failure() {
            write!(
                f,
                "failed at `{}` after {} changed; {skipped} step(s) not run",
                failed.name,
                self.changed()
            )
        } else if self.changed() == 0 {
            write!(
                f,
                "{} steps, nothing changed: node already provisioned ({:.3}s)",
                self.steps.len(),
                self.elapsed.as_secs_f64()
            )
        } else {
            write!(
                f,
                "{} steps: {} changed, {} unchanged ({:.3}s)",
                self.steps.len(),
                self.changed(),
                self.unchanged(),
                self.elapsed.as_secs_f64()
            )
        }
    }
}

/// Runs the plan's steps in order on `session`, stopping at the first
/// failure. Never panics on remote errors: they become a failed step.
///
/// Checks go in batches ([`check_batch_script`]): one round trip answers
/// every step up to the next one with work to do, so a re-run that changes
/// nothing costs one exec. A batched step's `elapsed` is its share of the
/// batch.
pub async fn apply(session: &Session, plan: &Plan) -> RunbookReport {
    let started = Instant::now();
    let mut steps = Vec::with_capacity(plan.steps.len());
    let mut next = 0;
    'batches: while next < plan.steps.len() {
        let t = Instant::now();
        let rest = &plan.steps[next..];
        let checks = match check_batch(session, rest).await {
            Ok(checks) => checks,
            Err(e) => vec![Err(session.redactor().redact(&e.to_string()))],
        };
        let share = t.elapsed() / checks.len().max(1) as u32;
        for (step, check) in rest.iter().zip(checks) {
            let t = Instant::now();
            let (outcome, acted) = match check {
                Err(error) => (Outcome::Failed { error }, true),
                Ok(check) => match nothing_to_do(step, &check) {
                    Some(why) => (Outcome::Unchanged { why }, false),
                    None => (
                        act(session, step, check)
                            .await
                            .unwrap_or_else(|e| Outcome::Failed {
                                error: session.redactor().redact(&e.to_string()),
                            }),
                        true,
                    ),
                },
            };
            let failed = matches!(outcome, Outcome::Failed { .. });
            let elapsed = share + t.elapsed();
            match &outcome {
                Outcome::Failed { error } => {
                    tracing::warn!(node = %session.node(), step = %step.name, %error, "runbook step failed")
                }
                other => {
                    tracing::debug!(node = %session.node(), step = %step.name, outcome = ?other, ?elapsed, "runbook step")
                }
            }
            steps.push(StepReport {
                name: step.name.clone(),
                outcome,
                elapsed,
            });
            next += 1;
            if failed {
                break 'batches;
            }
            if acted {
                // Later checks of this batch ran before this step acted.
                continue 'batches;
            }
        }
    }
    let report = RunbookReport {
        runbook: plan.runbook.clone(),
        node: session.node().to_string(),
        steps,
        planned: plan.steps.len(),
        elapsed: started.elapsed(),
    };
    tracing::info!(
        node = %session.node(), runbook = %plan.runbook, changed = report.changed(),
        unchanged = report.unchanged(), ok = report.succeeded(), elapsed = ?report.elapsed,
        "runbook applied"
    );
    report
}

/// The checks of `steps` from one batch, in order: at least one, at most
/// up to the first step with work to do; `Err` is a step's redacted
/// failure.
async fn check_batch(
    session: &Session,
    steps: &[PlannedStep],
) -> Result<Vec<Result<CheckResult, String>>, SshError> {
    let timeout = steps
        .iter()
        .map(|s| s.timeout.unwrap_or(session.default_timeout()))
        .sum();
    let cmd = wrap(
        &check_batch_script(steps, session.user()),
        false,
        session.user(),
    );
    let out = session.exec(&cmd, Stdin::Null, timeout).await?;
    let out = session.check(&cmd, out)?;
    let stdout = out.stdout_lossy();
    let mut checks: Vec<Result<CheckResult, String>> = parse_check_batch(&stdout)
        .into_iter()
        .take(steps.len())
        .map(|c| match c {
            BatchCheck::Checked(c) => Ok(c),
            BatchCheck::Failed(code) => Err(format!(
                "check failed (exit {code}): {}",
                tail(&session.redactor().redact_bytes(&out.stderr), 1000)
            )),
            BatchCheck::Unreadable(text) => Err(format!(
                "unexpected check output: {}",
                tail(&session.redactor().redact(&text), 300)
            )),
        })
        .collect();
    if checks.is_empty() {
        // Not even the first check ran: `sudo` refused, most likely.
        checks.push(Err(format!(
            "the check did not run: {}{}",
            tail(&session.redactor().redact_bytes(&out.stderr), 1000),
            tail(&session.redactor().redact(&stdout), 300)
        )));
    }
    Ok(checks)
}

/// Why a checked step needs nothing done (`None`: it has work to do).
fn nothing_to_do(step: &PlannedStep, check: &CheckResult) -> Option<&'static str> {
    match (check, &step.action) {
        (CheckResult::Skip(why), _) => Some(why),
        (_, Action::File(file)) if file_matches(file, check) => Some("content"),
        _ => None,
    }
}

/// Runs a step whose check said it has work to do.
async fn act(
    session: &Session,
    step: &PlannedStep,
    check: CheckResult,
) -> Result<Outcome, SshError> {
    let timeout = step.timeout.unwrap_or(session.default_timeout());
    let user = session.user();
    match &step.action {
        Action::Command { script } => {
            debug_assert_eq!(check, CheckResult::Run);
            let cmd = wrap(script, step.become_root, user);
            let out = session.exec(&cmd, Stdin::Null, timeout).await?;
            if out.success() {
                return Ok(Outcome::Changed);
            }
            let stderr = session.redactor().redact_bytes(&out.stderr);
            let stdout = session.redactor().redact_bytes(&out.stdout);
            let output = if stderr.trim().is_empty() {
                stdout
            } else {
                stderr
            };
            Ok(Outcome::Failed {
                error: format!("{}: {}", out.status, tail(&output, 1000)),
            })
        }
        Action::File(file) => {
            let cmd = wrap(&super::write_script(file), step.become_root, user);
            let out = session
                .exec(&cmd, Stdin::Bytes(&file.content), timeout)
                .await?;
            session.check(&cmd, out)?;
            Ok(Outcome::Changed)
        }
    }
}
