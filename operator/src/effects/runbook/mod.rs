//! Runbooks: declarative, reviewable step lists that provision a node over
//! SSH, idempotent by construction.
//!
//! ```yaml
//! name: static-http
//! vars: { port: "80" }            # defaults; the spec's provision.vars win
//! steps:
//!   - name: release directories
//!     run: mkdir -p {{ release.app_root }}/releases {{ release.app_root }}/shared
//!     creates: "{{ release.app_root }}/shared"
//!   - name: server script
//!     file:
//!       path: /usr/local/lib/hangar/server.py
//!       template: |             # or `content:` (verbatim) or `src:` (a file next to the runbook)
//!         PORT = {{ vars.port }}
//!       mode: "0755"
//!       owner: root
//!   - name: start server
//!     run: setsid … &
//!     unless: pgrep -f server.py
//!     become: true              # sudo -n when the ssh user is not root
//!     timeout: 30s
//! ```
//!
//! Every command step needs a guard (`creates`, `unless` or `onlyIf`): a
//! step that runs every time cannot report "unchanged", so a re-run on a
//! provisioned node would not be a no-op. File steps compare content (by
//! sha256), mode and owner, and rewrite only on a difference.
//!
//! Templates are [minijinja](https://docs.rs/minijinja) with these variables:
//! `vars.NAME` (runbook defaults overlaid by `spec.provision.vars`),
//! `node.instance_id`, `node.private_ip`, `release.app_root`,
//! `release.health_path`, `release.health_port`. An undefined variable is an
//! error before anything runs on the node.
//!
//! This module is pure: parsing, validation and planning (rendering every
//! template, building the remote scripts). [`apply()`] runs a plan over SSH.

pub mod apply;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::effects::ssh::shell_quote;

pub use apply::{apply, Outcome, RunbookReport, StepReport};

#[derive(Debug, thiserror::Error)]
pub enum RunbookError {
    #[error("{file}: cannot read runbook: {reason}")]
    Read { file: PathBuf, reason: String },
    #[error("{file}: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("{file}: step {step}: {message}")]
    Invalid {
        file: PathBuf,
        step: String,
        message: String,
    },
    #[error("{file}: step {step}: template in `{field}`: {message}")]
    Template {
        file: PathBuf,
        step: String,
        field: &'static str,
        message: String,
    },
    #[error("runbook {runbook} failed at step `{step}`: {error}")]
    StepFailed {
        runbook: String,
        step: String,
        error: String,
        report: Box<RunbookReport>,
    },
}

/// A runbook file as written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Runbook {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    /// Defaults for `vars.*`; the spec's `provision.vars` override them.
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    pub steps: Vec<Step>,
    /// Where it was loaded from (for errors and `src:` paths).
    #[serde(skip)]
    pub origin: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Step {
    pub name: String,
    /// A shell command (POSIX `sh`).
    #[serde(default)]
    pub run: Option<String>,
    #[serde(default)]
    pub file: Option<FileStep>,
    /// Skip the command when this path exists.
    #[serde(default)]
    pub creates: Option<String>,
    /// Skip when this command succeeds.
    #[serde(default)]
    pub unless: Option<String>,
    /// Run only when this command succeeds.
    #[serde(default)]
    pub only_if: Option<String>,
    /// Run as root (`sudo -n`) when the ssh user is not root.
    #[serde(default, rename = "become")]
    pub become_root: bool,
    /// Overrides `spec.ssh.commandTimeout` for this step.
    #[serde(default)]
    pub timeout: Option<hangar_crds::Duration>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileStep {
    pub path: String,
    /// Placed verbatim.
    #[serde(default)]
    pub content: Option<String>,
    /// Rendered with the runbook variables.
    #[serde(default)]
    pub template: Option<String>,
    /// A file next to the runbook; rendered when it ends in `.j2`.
    #[serde(default)]
    pub src: Option<String>,
    /// Octal, e.g. `"0644"`.
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
}

/// What templates see besides `vars`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Facts {
    pub instance_id: String,
    pub private_ip: String,
    pub app_root: String,
    pub health_path: String,
    pub health_port: u16,
}

impl Facts {
    /// Facts for a node of a cluster spec.
    pub fn for_node(spec: &hangar_crds::ClusterSpec, instance_id: &str, private_ip: &str) -> Self {
        Facts {
            instance_id: instance_id.to_string(),
            private_ip: private_ip.to_string(),
            app_root: spec.release.app_root.clone(),
            health_path: spec.release.health_check.path.clone(),
            health_port: spec.release.health_check.port,
        }
    }
}

impl Runbook {
    /// Reads, parses and validates a runbook file; `src:` files are read now.
    pub fn load(path: &Path) -> Result<Runbook, RunbookError> {
        let text = std::fs::read_to_string(path).map_err(|e| RunbookError::Read {
            file: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let mut runbook = Self::parse(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for (i, step) in runbook.steps.iter_mut().enumerate() {
            let Some(file) = step.file.as_mut() else {
                continue;
            };
            let Some(src) = file.src.take() else { continue };
            let src_path = base.join(&src);
            let body = std::fs::read_to_string(&src_path).map_err(|e| RunbookError::Invalid {
                file: path.to_path_buf(),
                step: step_label(i, &step.name),
                message: format!("src {}: {e}", src_path.display()),
            })?;
            if src.ends_with(".j2") {
                file.template = Some(body);
            } else {
                file.content = Some(body);
            }
        }
        Ok(runbook)
    }

    /// Parses and validates runbook YAML; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Runbook, RunbookError> {
        let mut runbook: Runbook =
            serde_saphyr::from_str(text).map_err(|e| RunbookError::Parse {
                file: origin.to_path_buf(),
                message: e.to_string(),
            })?;
        runbook.origin = origin.to_path_buf();
        runbook.validate()?;
        Ok(runbook)
    }

    /// The display name: `name:` or the file stem.
    pub fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            self.origin
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "runbook".into())
        })
    }

    /// The rules types cannot express.
    pub fn validate(&self) -> Result<(), RunbookError> {
        let mut names = BTreeSet::new();
        for (i, step) in self.steps.iter().enumerate() {
            let invalid = |message: String| RunbookError::Invalid {
                file: self.origin.clone(),
                step: step_label(i, &step.name),
                message,
            };
            if step.name.trim().is_empty() {
                return Err(invalid("`name` is empty".into()));
            }
            if !names.insert(step.name.as_str()) {
                return Err(invalid("duplicate step name".into()));
            }
            match (&step.run, &step.file) {
                (Some(_), Some(_)) => {
                    return Err(invalid("has both `run` and `file`; use one".into()))
                }
                (None, None) => return Err(invalid("needs `run` or `file`".into())),
                (Some(_), None) => {
                    if step.creates.is_none() && step.unless.is_none() && step.only_if.is_none() {
                        return Err(invalid(
                            "a `run` step needs a guard (`creates`, `unless` or `onlyIf`) \
                             so a re-run knows it has nothing to do"
                                .into(),
                        ));
                    }
                }
                (None, Some(file)) => {
                    if step.creates.is_some() {
                        return Err(invalid(
                            "`creates` applies to `run` steps; a file step compares content".into(),
                        ));
                    }
                    let sources = [&file.content, &file.template, &file.src]
                        .iter()
                        .filter(|s| s.is_some())
                        .count();
                    if sources != 1 {
                        return Err(invalid(
                            "a file step needs exactly one of `content`, `template`, `src`".into(),
                        ));
                    }
                    if file.path.trim().is_empty() {
                        return Err(invalid("`file.path` is empty".into()));
                    }
                    if let Some(mode) = &file.mode {
                        parse_mode(mode).map_err(invalid)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Renders every template and builds the remote scripts. Nothing runs;
    /// any template error surfaces here, before the node is touched.
    pub fn plan(
        &self,
        spec_vars: &BTreeMap<String, String>,
        facts: &Facts,
    ) -> Result<Plan, RunbookError> {
        let mut vars = self.vars.clone();
        vars.extend(spec_vars.iter().map(|(k, v)| (k.clone(), v.clone())));
        let ctx = minijinja::context! {
            vars => vars,
            node => minijinja::context! {
                instance_id => facts.instance_id.clone(),
                private_ip => facts.private_ip.clone(),
            },
            release => minijinja::context! {
                app_root => facts.app_root.clone(),
                health_path => facts.health_path.clone(),
                health_port => facts.health_port,
            },
        };
        let env = template_env();
        let mut steps = Vec::with_capacity(self.steps.len());
        for (i, step) in self.steps.iter().enumerate() {
            let label = step_label(i, &step.name);
            let render = |field: &'static str, src: &str| -> Result<String, RunbookError> {
                env.render_str(src, ctx.clone())
                    .map_err(|e| RunbookError::Template {
                        file: self.origin.clone(),
                        step: label.clone(),
                        field,
                        message: template_error(&e),
                    })
            };
            let opt = |field: &'static str, src: &Option<String>| {
                src.as_deref().map(|s| render(field, s)).transpose()
            };
            let guards = Guards {
                creates: opt("creates", &step.creates)?,
                unless: opt("unless", &step.unless)?,
                only_if: opt("onlyIf", &step.only_if)?,
            };
            let action =
                match (&step.run, &step.file) {
                    (Some(run), _) => Action::Command {
                        script: render("run", run)?,
                    },
                    (None, Some(file)) => {
                        let content = match (&file.content, &file.template) {
                            (Some(c), _) => c.clone(),
                            (None, Some(t)) => render("file.template", t)?,
                            (None, None) => String::new(),
                        };
                        let mode = file.mode.as_deref().map(parse_mode).transpose().map_err(
                            |message| RunbookError::Invalid {
                                file: self.origin.clone(),
                                step: label.clone(),
                                message,
                            },
                        )?;
                        Action::File(PlannedFile {
                            path: render("file.path", &file.path)?,
                            sha256: hex::encode(Sha256::digest(content.as_bytes())),
                            content: content.into_bytes(),
                            mode,
                            owner: opt("file.owner", &file.owner)?,
                            group: opt("file.group", &file.group)?,
                        })
                    }
                    (None, None) => unreachable_step(&self.origin, &label)?,
                };
            steps.push(PlannedStep {
                name: step.name.clone(),
                guards,
                action,
                become_root: step.become_root,
                timeout: step.timeout.map(|d| d.get()),
            });
        }
        Ok(Plan {
            runbook: self.display_name(),
            steps,
        })
    }
}

fn unreachable_step(origin: &Path, label: &str) -> Result<Action, RunbookError> {
    Err(RunbookError::Invalid {
        file: origin.to_path_buf(),
        step: label.to_string(),
        message: "needs `run` or `file`".into(),
    })
}

/// Instructions one template render may execute.
const TEMPLATE_FUEL: u64 = 1_000_000;

fn template_env() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::SemiStrict);
    // A template is configuration, not a program: a budget of instructions
    // per render (a php-fpm pool file takes a few hundred) turns a runaway
    // loop into an error instead of a reconcile that never returns (the
    // fuzzer found `range(100000)` nested twice).
    env.set_fuel(Some(TEMPLATE_FUEL));
    // File contents must keep their final newline.
    if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder()
        .keep_trailing_newline(true)
        .build()
    {
        env.set_syntax(syntax);
    }
    env
}

fn template_error(e: &minijinja::Error) -> String {
    let mut msg = e.to_string();
    if let Some(detail) = e.detail() {
        if !msg.contains(detail) {
            msg = format!("{msg}: {detail}");
        }
    }
    msg
}

fn step_label(index: usize, name: &str) -> String {
    format!("#{} `{}`", index + 1, name)
}

/// `"0644"` / `"644"` / `"0o644"` → 0o644.
pub fn parse_mode(mode: &str) -> Result<u32, String> {
    let digits = mode.trim().trim_start_matches("0o");
    if digits.is_empty() || digits.len() > 4 || !digits.chars().all(|c| ('0'..='7').contains(&c)) {
        return Err(format!(
            "mode `{mode}` is not an octal permission such as \"0644\""
        ));
    }
    u32::from_str_radix(digits, 8).map_err(|e| e.to_string())
}

/// A runbook with every template rendered, ready to apply.
#[derive(Clone, Debug)]
pub struct Plan {
    pub runbook: String,
    pub steps: Vec<PlannedStep>,
}

#[derive(Clone, Debug)]
pub struct PlannedStep {
    pub name: String,
    pub guards: Guards,
    pub action: Action,
    pub become_root: bool,
    pub timeout: Option<Duration>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Guards {
    pub creates: Option<String>,
    pub unless: Option<String>,
    pub only_if: Option<String>,
}

impl Guards {
    pub fn is_empty(&self) -> bool {
        self.creates.is_none() && self.unless.is_none() && self.only_if.is_none()
    }
}

#[derive(Clone, Debug)]
pub enum Action {
    Command { script: String },
    File(PlannedFile),
}

#[derive(Clone, PartialEq, Eq)]
pub struct PlannedFile {
    pub path: String,
    /// Never logged: it may hold secrets.
    pub content: Vec<u8>,
    pub sha256: String,
    pub mode: Option<u32>,
    pub owner: Option<String>,
    pub group: Option<String>,
}

impl std::fmt::Debug for PlannedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlannedFile")
            .field("path", &self.path)
            .field("content", &format_args!("<{} bytes>", self.content.len()))
            .field("sha256", &self.sha256)
            .field("mode", &self.mode.map(|m| format!("{m:04o}")))
            .field("owner", &self.owner)
            .field("group", &self.group)
            .finish()
    }
}

/// What the node's check said about a step (parsed from [`check_script`]'s output).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckResult {
    /// A guard says there is nothing to do (which guard).
    Skip(&'static str),
    /// Run the command.
    Run,
    /// A file step: the file is missing.
    FileAbsent,
    /// A file step: what is there now.
    FilePresent {
        mode: u32,
        owner: String,
        group: String,
        sha256: String,
    },
}

/// One remote script that evaluates a step's guards (and, for a file step,
/// reports the file's state): a re-run costs one round trip per step.
pub fn check_script(step: &PlannedStep) -> String {
    let mut s = String::new();
    if let Some(path) = &step.guards.creates {
        s.push_str(&format!(
            "[ -e {} ] && {{ echo skip:creates; exit 0; }}\n",
            shell_quote(path)
        ));
    }
    if let Some(cmd) = &step.guards.unless {
        s.push_str(&format!(
            "( {cmd}\n) >/dev/null 2>&1 </dev/null && {{ echo skip:unless; exit 0; }}\n"
        ));
    }
    if let Some(cmd) = &step.guards.only_if {
        s.push_str(&format!(
            "( {cmd}\n) >/dev/null 2>&1 </dev/null || {{ echo skip:onlyIf; exit 0; }}\n"
        ));
    }
    match &step.action {
        Action::Command { .. } => s.push_str("echo run\n"),
        Action::File(f) => {
            let p = shell_quote(&f.path);
            s.push_str(&format!(
                "if [ -f {p} ]; then echo \"file $(stat -c '%a %U %G' {p}) $(sha256sum < {p} | cut -d' ' -f1)\"; else echo absent; fi\n"
            ));
        }
    }
    s
}

/// The checks of `steps`, in order, in one remote script: a re-run of a
/// provisioned node is one round trip, not one per step. It stops after
/// the first step that has work to do (a guard says run, a file differs),
/// because that step's action can change what the later checks see. Each
/// check runs in its own `sh` ([`check_script`]); consecutive steps with
/// the same `become` share one `sudo` (one PAM session instead of one per
/// step: most of a re-run's time on a node that runs everything as root).
/// Its output is read by [`parse_check_batch`].
pub fn check_batch_script(steps: &[PlannedStep], user: &str) -> String {
    let mut s = String::new();
    let mut i = 0;
    while i < steps.len() {
        let become_root = steps[i].become_root;
        let mut segment = String::new();
        while i < steps.len() && steps[i].become_root == become_root {
            segment.push_str(&batched_check(i, &steps[i]));
            i += 1;
        }
        segment.push_str(&format!("exit {BATCH_CONTINUE}\n"));
        // Anything but "continue" (work found, a check failed, sudo
        // refused) ends the batch.
        s.push_str(&format!(
            "{}\n[ $? = {BATCH_CONTINUE} ] || exit 0\n",
            wrap(&segment, become_root, user)
        ));
    }
    s
}

/// One step of a batch segment: its check, reported, and the segment left
/// unless the step has nothing to do.
fn batched_check(i: usize, step: &PlannedStep) -> String {
    let check = shell_quote(&check_script(step));
    let nothing_to_do = match &step.action {
        Action::Command { .. } => "skip:*".to_string(),
        Action::File(f) => {
            let any = || "*".to_string();
            format!(
                "\"file \"{}\" \"{}\" \"{}\" \"{}",
                f.mode.map(|m| format!("{m:o}")).unwrap_or_else(any),
                f.owner.as_deref().map(shell_quote).unwrap_or_else(any),
                f.group.as_deref().map(shell_quote).unwrap_or_else(any),
                shell_quote(&f.sha256),
            )
        }
    };
    format!(
        "o=$(sh -c {check} </dev/null) || {{ printf '{BATCH_MARK}%d failed %d\\n' {i} \"$?\"; exit 0; }}\n\
         printf '{BATCH_MARK}%d\\n%s\\n' {i} \"$o\"\n\
         case \"$o\" in {nothing_to_do}) ;; *) exit 0 ;; esac\n"
    )
}

/// A batch segment's exit code for "every step had nothing to do".
const BATCH_CONTINUE: u8 = 10;

const BATCH_MARK: &str = "#hangar-check ";

/// One step's check as [`check_batch_script`] reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BatchCheck {
    Checked(CheckResult),
    /// The check itself exited non-zero (`sudo` refused, a guard's shell
    /// broke): the step fails.
    Failed(u32),
    /// It printed nothing [`parse_check`] can read.
    Unreadable(String),
}

/// The checks a [`check_batch_script`] run reported, in step order (as many
/// as it ran).
pub fn parse_check_batch(stdout: &str) -> Vec<BatchCheck> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    let finish = |text: Option<String>, out: &mut Vec<BatchCheck>| {
        if let Some(text) = text {
            out.push(match parse_check(&text) {
                Some(c) => BatchCheck::Checked(c),
                None => BatchCheck::Unreadable(text),
            });
        }
    };
    for line in stdout.lines() {
        let Some(rest) = line.strip_prefix(BATCH_MARK) else {
            if let Some(text) = current.as_mut() {
                text.push_str(line);
                text.push('\n');
            }
            continue;
        };
        finish(current.take(), &mut out);
        let mut words = rest.split_whitespace();
        let _index = words.next();
        match (words.next(), words.next().and_then(|c| c.parse().ok())) {
            (Some("failed"), Some(code)) => {
                out.push(BatchCheck::Failed(code));
                return out;
            }
            _ => current = Some(String::new()),
        }
    }
    finish(current, &mut out);
    out
}

/// Reads the last line [`check_script`] printed.
pub fn parse_check(stdout: &str) -> Option<CheckResult> {
    let line = stdout.lines().rev().find(|l| !l.trim().is_empty())?.trim();
    match line {
        "run" => Some(CheckResult::Run),
        "absent" => Some(CheckResult::FileAbsent),
        "skip:creates" => Some(CheckResult::Skip("creates")),
        "skip:unless" => Some(CheckResult::Skip("unless")),
        "skip:onlyIf" => Some(CheckResult::Skip("onlyIf")),
        _ => {
            let mut parts = line.strip_prefix("file ")?.split_whitespace();
            let mode = u32::from_str_radix(parts.next()?, 8).ok()?;
            let owner = parts.next()?.to_string();
            let group = parts.next()?.to_string();
            let sha256 = parts.next()?.to_string();
            Some(CheckResult::FilePresent {
                mode,
                owner,
                group,
                sha256,
            })
        }
    }
}

/// Whether the file on the node already matches (content, and mode/owner
/// where the step sets them).
pub fn file_matches(want: &PlannedFile, check: &CheckResult) -> bool {
    match check {
        CheckResult::FilePresent {
            mode,
            owner,
            group,
            sha256,
        } => {
            *sha256 == want.sha256
                && want.mode.is_none_or(|m| m == *mode)
                && want.owner.as_ref().is_none_or(|o| o == owner)
                && want.group.as_ref().is_none_or(|g| g == group)
        }
        _ => false,
    }
}

/// Writes stdin to the file atomically (temp file + `mv`), then sets mode
/// and owner. The content travels on stdin, never on a command line.
pub fn write_script(f: &PlannedFile) -> String {
    let p = shell_quote(&f.path);
    let tmp = shell_quote(&format!("{}.hangar-tmp", f.path));
    let mut s = format!("set -e\nmkdir -p \"$(dirname {p})\"\numask 077\ncat > {tmp}\n");
    let mode = f.mode.unwrap_or(0o644);
    s.push_str(&format!("chmod {mode:04o} {tmp}\n"));
    match (&f.owner, &f.group) {
        (Some(o), Some(g)) => s.push_str(&format!(
            "chown {} {tmp}\n",
            shell_quote(&format!("{o}:{g}"))
        )),
        (Some(o), None) => s.push_str(&format!("chown {} {tmp}\n", shell_quote(o))),
        (None, Some(g)) => s.push_str(&format!("chgrp {} {tmp}\n", shell_quote(g))),
        (None, None) => {}
    }
    s.push_str(&format!("mv -f {tmp} {p}\n"));
    s
}

/// The command line that runs `script` with `sh`, through `sudo -n` when
/// the step asks for root and the login user is not root.
pub fn wrap(script: &str, become_root: bool, user: &str) -> String {
    if become_root && user != "root" {
        format!("sudo -n -- sh -c {}", shell_quote(script))
    } else {
        format!("sh -c {}", shell_quote(script))
    }
}

#[cfg(test)]
mod tests;
