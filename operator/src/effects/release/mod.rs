//! Releases, shipped the zero-downtime PHP/Rails way.
//!
//! Layout on a node (`appRoot`, default `/srv/app`):
//!
//! ```text
//! releases/<id>/        complete, verified releases (never half-written)
//! releases/<id>.tmp/    staging while shipping; removed on failure or retry
//! shared/               survives releases; sharedPaths link here; .env (0600)
//! current -> <appRoot>/releases/<id>    swapped atomically (rename(2))
//! .hangar/state         active=<id> / previous=<id>, written after each swap
//! .hangar/shipped       release ids in the order they were shipped (for pruning)
//! .hangar/lock          flock: one release operation at a time per node
//! ```
//!
//! [`ship`] streams the artifact over SSH into `releases/<id>.tmp`, hashing
//! it on the node (sha256) while `tar` extracts it, links `sharedPaths`, and
//! only then renames the tree to `releases/<id>`: a release directory exists
//! only once it is verified and complete, so a dropped connection or a bad
//! checksum can never leave something activatable behind, and a retry starts
//! from a clean `.tmp`. [`activate`] runs `beforeActivate` hooks in the
//! release directory (a failure leaves `current` alone), swaps `current`
//! (`ln -sfn` to a temporary name + `mv -T`), records active/previous on the
//! node, runs `afterActivate` hooks and prunes to `keep` (never the active
//! or previous release). [`rollback`] swaps back to the previous release.
//! [`read_state`] tells a restarted operator what a node runs.
//!
//! The pure parts (validation, script building, parsing, prune decisions)
//! live in [`plan`]; the effects here each cost one or two round trips.

pub mod plan;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::effects::ssh::{tail, Session, SshError, Stdin};

pub use plan::{prune_victims, NodeReleases, ReleaseConfig};

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("invalid release configuration: {0}")]
    Invalid(String),
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error("cannot read artifact {path}: {reason}")]
    Artifact { path: PathBuf, reason: String },
    #[error(
        "{node}: release {id}: checksum mismatch on the node: expected sha256 {expected}, \
         got {actual}; nothing was activated"
    )]
    ChecksumMismatch {
        node: String,
        id: String,
        expected: String,
        actual: String,
    },
    #[error("{node}: release {id}: extracting the artifact failed: {stderr}")]
    Extract {
        node: String,
        id: String,
        stderr: String,
    },
    #[error("{node}: release {id}: {phase} hook `{hook}` failed ({status}): {output}")]
    HookFailed {
        node: String,
        id: String,
        phase: HookPhase,
        hook: String,
        status: String,
        output: String,
    },
    #[error("{node}: release {id} is not shipped (no complete releases/{id})")]
    NotShipped { node: String, id: String },
    #[error("{node}: no previous release to roll back to (active: {active:?})")]
    NoPrevious {
        node: String,
        active: Option<String>,
    },
    #[error("{node}: {step} failed: {stderr}")]
    Remote {
        node: String,
        step: &'static str,
        stderr: String,
    },
    #[error("{node}: release {id}: {what} did not end within {}s", after.as_secs())]
    Timeout {
        node: String,
        id: String,
        what: &'static str,
        after: Duration,
    },
    /// Asked to stop (a safe point); what runs detached on the node goes on.
    #[error("cancelled")]
    Cancelled,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookPhase {
    BeforeActivate,
    AfterActivate,
    Once,
}

impl std::fmt::Display for HookPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HookPhase::BeforeActivate => "beforeActivate",
            HookPhase::AfterActivate => "afterActivate",
            HookPhase::Once => "once",
        })
    }
}

/// How [`run_once`] ended well.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OnceRun {
    /// The hooks ran (now, or already when asked again after a restart).
    Ran { elapsed: Duration },
    /// A run had already succeeded on this node.
    AlreadyDone,
}

/// How often a once run is looked at while it goes on.
const ONCE_POLL: Duration = Duration::from_secs(1);

/// Runs the release's `once` hooks on the node (in `releases/<id>`, which
/// must be shipped) and waits for them: started detached and under a lock
/// (see [`plan::once_start_script`]), so asking again — after a dropped
/// connection, a cancel or an operator crash — finds the run still going
/// or its result, and never starts a second one. A run that ended without
/// a result (the node restarted under it) is an error, not a retry: the
/// hooks may have half run.
pub async fn run_once(
    session: &Session,
    config: &ReleaseConfig,
    id: &str,
    hooks: &[String],
    timeout: Duration,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<OnceRun, ReleaseError> {
    config.validate_id(id)?;
    let started = Instant::now();
    let first = session
        .run_checked(&plan::once_start_script(config, id, hooks))
        .await
        .map_err(|e| not_shipped_or(e, session, id))?;
    let mut state = first.stdout_lossy().trim().to_string();
    let was_done = state.starts_with("done");
    loop {
        if let Some(status) = state.strip_prefix("done ") {
            if status.trim() == "0" {
                return Ok(if was_done {
                    OnceRun::AlreadyDone
                } else {
                    OnceRun::Ran {
                        elapsed: started.elapsed(),
                    }
                });
            }
            let log = session.run(&plan::once_log_script(config, id)).await?;
            return Err(ReleaseError::HookFailed {
                node: session.node().to_string(),
                id: id.to_string(),
                phase: HookPhase::Once,
                hook: hooks.join(" && "),
                status: format!("exit status {}", status.trim()),
                output: tail(&log.stdout_lossy(), 1000),
            });
        }
        if state == "absent" {
            return Err(ReleaseError::Remote {
                node: session.node().to_string(),
                step: "the once hooks",
                stderr: "the run ended without a result (did the node restart?); not run again"
                    .into(),
            });
        }
        if started.elapsed() >= timeout {
            return Err(ReleaseError::Timeout {
                node: session.node().to_string(),
                id: id.to_string(),
                what: "the once hooks",
                after: timeout,
            });
        }
        tokio::select! {
            _ = cancel.cancelled() => return Err(ReleaseError::Cancelled),
            _ = tokio::time::sleep(ONCE_POLL) => {}
        }
        let out = session
            .run_checked(&plan::once_status_script(config, id))
            .await?;
        state = out.stdout_lossy().trim().to_string();
    }
}

/// `releases/<id>` missing is its own error.
fn not_shipped_or(e: SshError, session: &Session, id: &str) -> ReleaseError {
    match &e {
        SshError::CommandFailed { status, .. }
            if *status == crate::effects::ssh::ExitStatus::Code(plan::EXIT_NOT_SHIPPED) =>
        {
            ReleaseError::NotShipped {
                node: session.node().to_string(),
                id: id.to_string(),
            }
        }
        _ => ReleaseError::Ssh(e),
    }
}

/// A tarball from the cloud layer's verified cache.
#[derive(Clone, Debug)]
pub struct Artifact {
    pub path: PathBuf,
    /// 64 lowercase hex digits; the node checks what it received against it.
    pub sha256: String,
}

impl Artifact {
    pub fn new(path: impl Into<PathBuf>, sha256: impl Into<String>) -> Self {
        Artifact {
            path: path.into(),
            sha256: sha256.into().to_ascii_lowercase(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ShipReport {
    pub id: String,
    /// False when `releases/<id>` was already complete (nothing sent).
    pub uploaded: bool,
    pub bytes: u64,
    pub elapsed: Duration,
}

#[derive(Clone, Debug)]
pub struct ActivateReport {
    pub id: String,
    /// What `current` pointed to before.
    pub replaced: Option<String>,
    pub hooks_run: usize,
    pub pruned: Vec<String>,
    pub elapsed: Duration,
}

/// Ships a release to the node: upload, verify, extract, link shared paths,
/// rename into place. Idempotent: a complete `releases/<id>` is kept as is.
pub async fn ship(
    session: &Session,
    config: &ReleaseConfig,
    id: &str,
    artifact: &Artifact,
) -> Result<ShipReport, ReleaseError> {
    config.validate_id(id)?;
    plan::validate_sha256(&artifact.sha256)?;
    let started = Instant::now();
    let node = session.node().to_string();
    let probe = session
        .run_checked(&plan::is_shipped_script(config, id, &artifact.sha256))
        .await?;
    if probe.stdout_lossy().trim() == "present" {
        return Ok(ShipReport {
            id: id.to_string(),
            uploaded: false,
            bytes: 0,
            elapsed: started.elapsed(),
        });
    }
    let mut file =
        tokio::fs::File::open(&artifact.path)
            .await
            .map_err(|e| ReleaseError::Artifact {
                path: artifact.path.clone(),
                reason: e.to_string(),
            })?;
    let bytes = file
        .metadata()
        .await
        .map(|m| m.len())
        .map_err(|e| ReleaseError::Artifact {
            path: artifact.path.clone(),
            reason: e.to_string(),
        })?;
    let script = plan::ship_script(config, id, &artifact.sha256);
    let out = session
        .exec(&script, Stdin::Reader(&mut file), session.default_timeout())
        .await?;
    let stdout = out.stdout_lossy();
    let stderr = tail(&session.redactor().redact_bytes(&out.stderr), 2000);
    match out.status {
        crate::effects::ssh::ExitStatus::Code(0) => {}
        crate::effects::ssh::ExitStatus::Code(plan::EXIT_CHECKSUM) => {
            let actual = stdout
                .lines()
                .find_map(|l| l.strip_prefix("sha256="))
                .unwrap_or("?")
                .to_string();
            return Err(ReleaseError::ChecksumMismatch {
                node,
                id: id.to_string(),
                expected: artifact.sha256.clone(),
                actual,
            });
        }
        crate::effects::ssh::ExitStatus::Code(plan::EXIT_EXTRACT) => {
            return Err(ReleaseError::Extract {
                node,
                id: id.to_string(),
                stderr,
            })
        }
        _ => {
            return Err(ReleaseError::Remote {
                node,
                step: "shipping",
                stderr: format!("{}: {stderr}", out.status),
            })
        }
    }
    let uploaded = stdout.lines().any(|l| l.trim() == "shipped");
    tracing::info!(node = %session.node(), release = id, bytes, elapsed = ?started.elapsed(), uploaded, "release shipped");
    Ok(ShipReport {
        id: id.to_string(),
        uploaded,
        bytes: if uploaded { bytes } else { 0 },
        elapsed: started.elapsed(),
    })
}

/// Activates a shipped release: beforeActivate hooks, atomic swap,
/// afterActivate hooks, prune. A beforeActivate failure leaves the old
/// release serving; an afterActivate failure is reported after the swap
/// (the caller decides whether to roll back).
pub async fn activate(
    session: &Session,
    config: &ReleaseConfig,
    id: &str,
) -> Result<ActivateReport, ReleaseError> {
    config.validate_id(id)?;
    let started = Instant::now();
    let state = read_state(session, config).await?;
    if !state.releases.iter().any(|r| r == id) {
        return Err(ReleaseError::NotShipped {
            node: session.node().to_string(),
            id: id.to_string(),
        });
    }
    let mut hooks_run = 0;
    for hook in &config.before_activate {
        run_hook(session, config, id, HookPhase::BeforeActivate, hook).await?;
        hooks_run += 1;
    }
    swap(session, config, id).await?;
    tracing::info!(node = %session.node(), release = id, replaced = ?state.active, "release activated");
    for hook in &config.after_activate {
        run_hook(session, config, id, HookPhase::AfterActivate, hook).await?;
        hooks_run += 1;
    }
    let pruned = prune(session, config).await?;
    Ok(ActivateReport {
        id: id.to_string(),
        replaced: state.active,
        hooks_run,
        pruned,
        elapsed: started.elapsed(),
    })
}

/// [`ship`] then [`activate`].
pub async fn deploy(
    session: &Session,
    config: &ReleaseConfig,
    id: &str,
    artifact: &Artifact,
) -> Result<ActivateReport, ReleaseError> {
    ship(session, config, id, artifact).await?;
    activate(session, config, id).await
}

/// Swaps `current` back to the previous release and runs the
/// afterActivate hooks there (e.g. reload PHP-FPM). Returns the release now
/// active.
pub async fn rollback(session: &Session, config: &ReleaseConfig) -> Result<String, ReleaseError> {
    let state = read_state(session, config).await?;
    let Some(previous) = state
        .previous
        .clone()
        .filter(|p| state.releases.contains(p))
    else {
        return Err(ReleaseError::NoPrevious {
            node: session.node().to_string(),
            active: state.active,
        });
    };
    swap(session, config, &previous).await?;
    tracing::warn!(node = %session.node(), from = ?state.active, to = %previous, "release rolled back");
    for hook in &config.after_activate {
        run_hook(session, config, &previous, HookPhase::AfterActivate, hook).await?;
    }
    Ok(previous)
}

/// What the node runs and has: active and previous release, complete
/// releases (oldest first) and leftover staging directories.
pub async fn read_state(
    session: &Session,
    config: &ReleaseConfig,
) -> Result<NodeReleases, ReleaseError> {
    let out = session.run_checked(&plan::state_script(config)).await?;
    Ok(plan::parse_state(&out.stdout_lossy()))
}

/// Places the env file at `<appRoot>/shared/.env` (mode 0600) when its
/// content differs. The content goes over stdin and is never logged; add it
/// to the pool's [`Redactor`](crate::effects::ssh::Redactor) with
/// `with_env_file` so commands that echo it are masked too. Returns whether
/// the file changed.
pub async fn place_env_file(
    session: &Session,
    config: &ReleaseConfig,
    contents: &[u8],
) -> Result<bool, ReleaseError> {
    let sha = plan::sha256_hex(contents);
    let script = plan::env_file_script(config, &sha);
    let out = session
        .exec(&script, Stdin::Bytes(contents), session.default_timeout())
        .await?;
    let out = session.check(&script, out)?;
    Ok(out.stdout_lossy().trim() == "changed")
}

/// Reads the env file from disk for [`place_env_file`].
pub fn read_env_file(path: &Path) -> Result<Vec<u8>, ReleaseError> {
    std::fs::read(path).map_err(|e| ReleaseError::Artifact {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

async fn swap(session: &Session, config: &ReleaseConfig, id: &str) -> Result<(), ReleaseError> {
    let out = session.run(&plan::swap_script(config, id)).await?;
    match out.status {
        crate::effects::ssh::ExitStatus::Code(0) => Ok(()),
        crate::effects::ssh::ExitStatus::Code(plan::EXIT_NOT_SHIPPED) => {
            Err(ReleaseError::NotShipped {
                node: session.node().to_string(),
                id: id.to_string(),
            })
        }
        status => Err(ReleaseError::Remote {
            node: session.node().to_string(),
            step: "swapping current",
            stderr: format!(
                "{status}: {}",
                tail(&session.redactor().redact_bytes(&out.stderr), 1000)
            ),
        }),
    }
}

async fn run_hook(
    session: &Session,
    config: &ReleaseConfig,
    id: &str,
    phase: HookPhase,
    hook: &str,
) -> Result<(), ReleaseError> {
    let cmd = plan::hook_script(config, id, hook);
    let out = session.run(&cmd).await?;
    if out.success() {
        return Ok(());
    }
    let redactor = session.redactor();
    let stderr = redactor.redact_bytes(&out.stderr);
    let output = if stderr.trim().is_empty() {
        redactor.redact_bytes(&out.stdout)
    } else {
        stderr
    };
    Err(ReleaseError::HookFailed {
        node: session.node().to_string(),
        id: id.to_string(),
        phase,
        hook: redactor.redact(hook),
        status: out.status.to_string(),
        output: tail(&output, 1000),
    })
}

async fn prune(session: &Session, config: &ReleaseConfig) -> Result<Vec<String>, ReleaseError> {
    let state = read_state(session, config).await?;
    let victims = prune_victims(&state, config.keep);
    if victims.is_empty() {
        return Ok(victims);
    }
    session
        .run_checked(&plan::prune_script(config, &victims))
        .await?;
    tracing::info!(node = %session.node(), pruned = ?victims, "old releases pruned");
    Ok(victims)
}
