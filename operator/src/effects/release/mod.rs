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
//! .hangar/artifacts/<id>  sha256 of the artifact releases/<id> came from
//! .hangar/manifests/<id>  what releases/<id> holds, file by file (the
//!                         base of the next release's delta)
//! .hangar/stamps/<id>     stat stamps of releases/<id>'s files, recorded
//!                         when it was verified ([`stamps`])
//! ```
//!
//! [`ship`] streams the artifact over SSH into `releases/<id>.tmp` (its
//! sha256 checked on the operator, once per file stamp) while `tar`
//! extracts it, links `sharedPaths`, and
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
//! A node that runs an earlier release gets a **delta** instead: only the
//! files that changed travel, the rest is hard-linked from that release,
//! and the node verifies the whole tree against the new release's
//! [`manifest`] before the same rename ([`delta`]). What every node of a
//! fan-out shares (manifests, payloads) is derived once ([`memo`]).
//!
//! The pure parts (validation, script building, parsing, prune decisions)
//! live in [`plan`]; the effects here each cost one or two round trips.

pub mod delta;
pub mod manifest;
pub mod memo;
pub mod plan;
pub mod stamps;
#[cfg(test)]
mod test_tar;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::effects::ssh::{tail, ExitStatus, Session, SshError, Stdin};

pub use manifest::{Manifest, ManifestError, NodeView};
pub use memo::NodeManifest;
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
        "{node}: release {id}: the artifact read as sha256 {actual}, not {expected}; \
         nothing was activated"
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
    /// What went to the node on stdin (artifact or delta payload, manifest).
    pub bytes: u64,
    pub elapsed: Duration,
    pub method: ShipMethod,
    /// Why a node with an earlier release still got the whole artifact.
    pub delta_skipped: Option<String>,
}

/// How a release reached the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShipMethod {
    /// `releases/<id>` was already complete from this artifact.
    AlreadyThere,
    /// The whole artifact was streamed.
    Whole,
    /// Only the changes were sent; the rest was linked from `base`.
    Delta {
        base: String,
        files_sent: usize,
        files_reused: usize,
        bytes_reused: u64,
        /// Files the node hashed to verify the tree: those it received or
        /// copied, and linked ones whose stat stamp no longer held
        /// ([`stamps`]); the others took their sha256 from the stamp.
        files_hashed: usize,
    },
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
///
/// When the node runs an earlier release whose manifest it kept, only what
/// changed is sent and the rest is linked from that release; the node
/// verifies the whole tree against the new manifest before the rename
/// ([`delta`]). Whenever a delta is impossible or fails its check, the
/// artifact is shipped whole. Either way the node keeps the new manifest
/// for the next release.
pub async fn ship(
    session: &Session,
    config: &ReleaseConfig,
    id: &str,
    artifact: &Artifact,
) -> Result<ShipReport, ReleaseError> {
    config.validate_id(id)?;
    plan::validate_sha256(&artifact.sha256)?;
    let started = Instant::now();
    let out = session
        .run_checked(&plan::probe_script(config, id, &artifact.sha256))
        .await?;
    let probe = plan::parse_probe(&out.stdout_lossy());
    let view = NodeView {
        app_root: config.app_root.clone(),
        shared_paths: config.shared_paths.clone(),
        umask: (probe.uid != Some(0)).then_some(probe.umask.unwrap_or(0o022)),
    };
    if probe.present {
        if let (true, Some(hasher)) = (probe.unkept, probe.hasher.as_deref()) {
            if let Ok(new) = node_manifest(artifact, &view).await {
                keep_manifest(session, config, id, artifact, &new, hasher).await?;
            }
        }
        return Ok(ShipReport {
            id: id.to_string(),
            uploaded: false,
            bytes: 0,
            elapsed: started.elapsed(),
            method: ShipMethod::AlreadyThere,
            delta_skipped: None,
        });
    }
    let delta_skipped = match delta_blocker(&probe) {
        Some(reason) => reason,
        None => match node_manifest(artifact, &view).await {
            Ok(new) => {
                match ship_delta(session, config, id, artifact, &probe, &new, started).await? {
                    Ok(report) => return Ok(report),
                    Err(reason) => {
                        tracing::warn!(node = %session.node(), release = id, %reason, "delta ship not possible; shipping the whole artifact");
                        Some(reason)
                    }
                }
            }
            Err(e) => Some(e.to_string()),
        },
    };
    let mut report = ship_whole(
        session,
        config,
        id,
        artifact,
        &view,
        probe.hasher.as_deref(),
        started,
    )
    .await?;
    report.delta_skipped = delta_skipped;
    Ok(report)
}

/// Why a delta cannot even be tried on this node (`Some(None)`: nothing to
/// diff against, which needs no explanation).
fn delta_blocker(probe: &plan::Probe) -> Option<Option<String>> {
    if probe.base.is_none() {
        return Some(None);
    }
    if let Err(missing) = &probe.tools {
        return Some(Some(format!("the node lacks a tool: {missing}")));
    }
    if probe.hasher.is_none() {
        return Some(Some("the node has neither openssl nor sha256sum".into()));
    }
    if !probe.shared_missing.is_empty() {
        return Some(Some(format!(
            "shared paths {:?} do not exist yet (a full ship seeds them)",
            probe.shared_missing
        )));
    }
    None
}

/// Derives now (once per process) the manifest that nodes seen as `view`
/// keep for `artifact`, so that shipping it, or later a delta against it,
/// neither waits for the derivation nor reads it back from a node.
pub async fn remember(artifact: &Artifact, view: &NodeView) -> Result<(), ManifestError> {
    node_manifest(artifact, view).await.map(|_| ())
}

/// The artifact's manifest, derived once per process.
async fn artifact_manifest(artifact: &Artifact) -> Result<Arc<Manifest>, ManifestError> {
    memo::ARTIFACT_MANIFESTS
        .get_or_try_init(&artifact.sha256, || async {
            let (path, sha) = (artifact.path.clone(), artifact.sha256.clone());
            let derived = tokio::task::spawn_blocking(move || manifest::derive(&path, &sha))
                .await
                .map_err(|e| ManifestError::Io {
                    path: artifact.path.clone(),
                    reason: e.to_string(),
                })?;
            match derived {
                Ok(m) => Ok(Ok(Arc::new(m))),
                // Remembered: the artifact will not change its mind.
                Err(e @ ManifestError::Unsupported { .. }) => Ok(Err(e)),
                Err(e) => Err(e),
            }
        })
        .await?
}

/// The manifest a node seen as `view` keeps for the artifact.
async fn node_manifest(
    artifact: &Artifact,
    view: &NodeView,
) -> Result<Arc<NodeManifest>, ManifestError> {
    let key = format!(
        "{}|{}|{:?}|{:?}",
        artifact.sha256, view.app_root, view.shared_paths, view.umask
    );
    memo::FOR_NODE
        .get_or_try_init(&key, || async {
            let m = artifact_manifest(artifact).await?.for_node(view);
            let text = m.to_text();
            let gz = delta::gzip(text.as_bytes(), 6).map_err(|e| ManifestError::Io {
                path: artifact.path.clone(),
                reason: e.to_string(),
            })?;
            let kept = Arc::new(NodeManifest {
                sha256: plan::sha256_hex(text.as_bytes()),
                manifest: m,
                gz,
            });
            memo::NODE_MANIFESTS.insert(&kept.sha256, kept.clone());
            Ok(kept)
        })
        .await
}

/// The manifest the node keeps for `base`: from memory when this process
/// shipped or read it, else read from the node. `None` when it is
/// unreadable or not what the probe said.
async fn base_manifest(
    session: &Session,
    config: &ReleaseConfig,
    base: &str,
    sha: &str,
) -> Result<Option<Arc<NodeManifest>>, ReleaseError> {
    if let Some(m) = memo::NODE_MANIFESTS.get(sha) {
        return Ok(Some(m));
    }
    let out = session
        .run(&plan::read_manifest_script(config, base))
        .await?;
    if !out.success() || out.stdout_dropped > 0 {
        return Ok(None);
    }
    let mut text = Vec::new();
    let read = flate2::read::GzDecoder::new(&out.stdout[..])
        .take(MAX_MANIFEST_BYTES)
        .read_to_end(&mut text);
    if read.is_err() || plan::sha256_hex(&text) != sha {
        return Ok(None);
    }
    let Ok(manifest) = std::str::from_utf8(&text)
        .map_err(|e| e.to_string())
        .and_then(|t| Manifest::parse(t).map_err(|e| e.to_string()))
    else {
        return Ok(None);
    };
    let kept = Arc::new(NodeManifest {
        manifest,
        sha256: sha.to_string(),
        gz: out.stdout,
    });
    memo::NODE_MANIFESTS.insert(sha, kept.clone());
    Ok(Some(kept))
}

/// A manifest read from a node larger than this is not believed.
const MAX_MANIFEST_BYTES: u64 = 256 << 20;

/// Tries a delta; `Ok(Err(reason))` when the node must get the whole artifact.
async fn ship_delta(
    session: &Session,
    config: &ReleaseConfig,
    id: &str,
    artifact: &Artifact,
    probe: &plan::Probe,
    new: &Arc<NodeManifest>,
    started: Instant,
) -> Result<Result<ShipReport, String>, ReleaseError> {
    let (Some((base_id, base_sha)), Some(hasher)) = (&probe.base, probe.hasher.as_deref()) else {
        return Ok(Err("nothing to diff against".into()));
    };
    let Some(base) = base_manifest(session, config, base_id, base_sha).await? else {
        return Ok(Err(format!(
            "the manifest the node keeps for {base_id} is unreadable"
        )));
    };
    let key = format!("{}|{}|{}", artifact.sha256, base.sha256, new.sha256);
    let payload = memo::PAYLOADS
        .get_or_try_init(&key, || async {
            let plan = match delta::Plan::between(&base.manifest, &new.manifest) {
                Ok(plan) => plan,
                Err(reason) => return Ok(Err(reason)),
            };
            let (path, new) = (artifact.path.clone(), new.clone());
            tokio::task::spawn_blocking(move || delta::build_payload(&path, &new.gz, plan))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
                .map(|p| Ok(Arc::new(p)))
        })
        .await;
    let payload = match payload {
        Ok(Ok(p)) => p,
        Ok(Err(reason)) => return Ok(Err(reason)),
        Err(e) => return Ok(Err(format!("cannot build the delta: {e}"))),
    };
    let script = delta::delta_script(
        config,
        id,
        &artifact.sha256,
        base_id,
        base_sha,
        &new.sha256,
        hasher,
    );
    let out = session
        .exec(
            &script,
            Stdin::Bytes(&payload.stdin),
            session.default_timeout(),
        )
        .await?;
    let stdout = out.stdout_lossy();
    match out.status {
        ExitStatus::Code(0) => {}
        ExitStatus::Code(plan::EXIT_LOCKED) => {
            return Err(ReleaseError::Remote {
                node: session.node().to_string(),
                step: "shipping",
                stderr: tail(&session.redactor().redact_bytes(&out.stderr), 1000),
            })
        }
        ExitStatus::Code(delta::EXIT_NO_DELTA) => {
            return Ok(Err(tail(&session.redactor().redact(&stdout), 2000)))
        }
        status => {
            return Ok(Err(format!(
                "{status}: {}",
                tail(&session.redactor().redact_bytes(&out.stderr), 1000)
            )))
        }
    }
    let uploaded = stdout.lines().any(|l| l.trim() == "shipped");
    let files_hashed = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("hashed ")?.trim().parse().ok())
        .unwrap_or(0);
    memo::NODE_MANIFESTS.insert(&new.sha256, new.clone());
    let plan = &payload.plan;
    tracing::info!(
        node = %session.node(), release = id, base = %base_id, bytes = payload.stdin.len(),
        files_sent = plan.files_sent, files_reused = plan.files_reused(), files_hashed,
        elapsed = ?started.elapsed(), "release shipped as a delta"
    );
    Ok(Ok(ShipReport {
        id: id.to_string(),
        uploaded,
        bytes: if uploaded {
            payload.stdin.len() as u64
        } else {
            0
        },
        elapsed: started.elapsed(),
        method: ShipMethod::Delta {
            base: base_id.clone(),
            files_sent: plan.files_sent,
            files_reused: plan.files_reused(),
            bytes_reused: plan.bytes_reused,
            files_hashed,
        },
        delta_skipped: None,
    }))
}

/// Keeps the manifest of a release just shipped whole on the node.
async fn keep_manifest(
    session: &Session,
    config: &ReleaseConfig,
    id: &str,
    artifact: &Artifact,
    new: &NodeManifest,
    hasher: &str,
) -> Result<(), ReleaseError> {
    let script = plan::store_manifest_script(config, id, &artifact.sha256, &new.sha256, hasher);
    let out = session
        .exec(&script, Stdin::Bytes(&new.gz), session.default_timeout())
        .await?;
    if !out.success() {
        // The release itself is fine; the next one ships whole.
        tracing::warn!(
            node = %session.node(), release = id, status = %out.status,
            stderr = %tail(&session.redactor().redact_bytes(&out.stderr), 500),
            "could not keep the release manifest on the node"
        );
    }
    Ok(())
}

/// What identifies a file's exact content without reading it (see
/// [`stamps`] for why ctime makes that hold): the operator's copy of an
/// artifact, checked once per process instead of once per node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    pub fn of(meta: &std::fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// How the artifact file read when its sha256 was checked.
#[derive(Clone, Debug)]
enum Checked {
    /// It hashed to its sha256 and kept this stamp while it was read.
    Verified(FileStamp),
    /// It hashed to this.
    Mismatch(String),
    /// It changed while it was read: every ship hashes what it sends.
    Unstable,
}

/// Checks the artifact's sha256 once per process and file stamp: a fan-out
/// hashes 50 MB once, not once per node.
async fn check_artifact(artifact: &Artifact) -> Result<Checked, ReleaseError> {
    let err = |e: std::io::Error| ReleaseError::Artifact {
        path: artifact.path.clone(),
        reason: e.to_string(),
    };
    let meta = tokio::fs::metadata(&artifact.path).await.map_err(err)?;
    if !meta.is_file() {
        // A pipe can be read once: whoever streams it hashes it.
        return Ok(Checked::Unstable);
    }
    let stamp = FileStamp::of(&meta);
    let key = format!("{}|{}|{stamp:?}", artifact.sha256, artifact.path.display());
    let (path, sha) = (artifact.path.clone(), artifact.sha256.clone());
    memo::CHECKED
        .get_or_try_init(&key, || async move {
            tokio::task::spawn_blocking(move || -> std::io::Result<Checked> {
                use sha2::Digest;
                let mut file = std::fs::File::open(&path)?;
                if FileStamp::of(&file.metadata()?) != stamp {
                    return Ok(Checked::Unstable);
                }
                let mut hasher = sha2::Sha256::new();
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = file.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                }
                if FileStamp::of(&file.metadata()?) != stamp {
                    return Ok(Checked::Unstable);
                }
                let actual = hex::encode(hasher.finalize());
                Ok(if actual == sha {
                    Checked::Verified(stamp)
                } else {
                    Checked::Mismatch(actual)
                })
            })
            .await
            .map_err(std::io::Error::other)?
        })
        .await
        .map_err(err)
}

/// Streams the whole artifact; the node only extracts (`tar -xzf -`), and
/// the staged tree is renamed into place (with the manifest the node
/// keeps) once the bytes sent are known to be the artifact's: the file
/// kept the stamp it had when this process checked its sha256 (before and
/// after the stream), or, when it did not, the bytes hashed as they left.
async fn ship_whole(
    session: &Session,
    config: &ReleaseConfig,
    id: &str,
    artifact: &Artifact,
    view: &NodeView,
    hasher: Option<&str>,
    started: Instant,
) -> Result<ShipReport, ReleaseError> {
    let node = session.node().to_string();
    let file = tokio::fs::File::open(&artifact.path)
        .await
        .map_err(|e| ReleaseError::Artifact {
            path: artifact.path.clone(),
            reason: e.to_string(),
        })?;
    let checked = match check_artifact(artifact).await? {
        Checked::Verified(stamp) => Some(stamp),
        Checked::Mismatch(actual) => {
            return Err(ReleaseError::ChecksumMismatch {
                node,
                id: id.to_string(),
                expected: artifact.sha256.clone(),
                actual,
            })
        }
        Checked::Unstable => None,
    };
    let opened = match file.metadata().await {
        Ok(m) => Some(FileStamp::of(&m)),
        Err(_) => None,
    };
    let trusted = checked.filter(|c| opened == Some(*c));
    let mut reader = HashingReader::new(file, trusted.is_none());
    let token = staging_token();
    let script = plan::ship_script(config, id, &artifact.sha256, &token);
    // The manifest is derived while the artifact streams.
    let (out, manifest) = tokio::join!(
        session.exec(
            &script,
            Stdin::Reader(&mut reader),
            session.default_timeout()
        ),
        node_manifest(artifact, view)
    );
    let out = out?;
    let stdout = out.stdout_lossy();
    let stderr = tail(&session.redactor().redact_bytes(&out.stderr), 2000);
    match out.status {
        ExitStatus::Code(0) => {}
        ExitStatus::Code(plan::EXIT_EXTRACT) => {
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
    if stdout.lines().any(|l| l.trim() == "present") {
        return Ok(ShipReport {
            id: id.to_string(),
            uploaded: false,
            bytes: 0,
            elapsed: started.elapsed(),
            method: ShipMethod::AlreadyThere,
            delta_skipped: None,
        });
    }
    let (bytes, hashed, file) = reader.finish().await.map_err(|e| ReleaseError::Artifact {
        path: artifact.path.clone(),
        reason: e.to_string(),
    })?;
    let actual = match (hashed, trusted) {
        (Some(sha), _) => sha,
        (None, Some(stamp)) => match file.metadata().await {
            Ok(m) if FileStamp::of(&m) == stamp => artifact.sha256.clone(),
            _ => "unknown (the file changed while it was sent)".into(),
        },
        (None, None) => "unknown".into(),
    };
    if actual != artifact.sha256 {
        session
            .run_checked(&plan::abort_script(config, id, &token))
            .await?;
        return Err(ReleaseError::ChecksumMismatch {
            node,
            id: id.to_string(),
            expected: artifact.sha256.clone(),
            actual,
        });
    }
    let kept = match (&manifest, hasher) {
        (Ok(m), Some(h)) => Some((m.clone(), h)),
        (Err(e), _) => {
            tracing::debug!(node = %node, release = id, error = %e, "no manifest: the next release ships whole too");
            None
        }
        _ => None,
    };
    let script = plan::commit_script(
        config,
        id,
        &artifact.sha256,
        &token,
        kept.as_ref().map(|(m, h)| (m.sha256.as_str(), *h)),
    );
    let gz: &[u8] = kept
        .as_ref()
        .map(|(m, _)| m.gz.as_slice())
        .unwrap_or_default();
    let out = session
        .exec(&script, Stdin::Bytes(gz), session.default_timeout())
        .await?;
    let out = session.check(&script, out)?;
    if let Some((m, _)) = &kept {
        memo::NODE_MANIFESTS.insert(&m.sha256, m.clone());
    }
    let uploaded = out.stdout_lossy().lines().any(|l| l.trim() == "shipped");
    tracing::info!(node = %session.node(), release = id, bytes, elapsed = ?started.elapsed(), uploaded, "release shipped");
    Ok(ShipReport {
        id: id.to_string(),
        uploaded,
        bytes: bytes + gz.len() as u64,
        elapsed: started.elapsed(),
        method: ShipMethod::Whole,
        delta_skipped: None,
    })
}

/// Names a staging directory as this ship's (unique within the process,
/// and across restarts by the clock).
fn staging_token() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}-{nanos:x}-{n}", std::process::id())
}

/// Counts what is read through it and, when asked to, hashes it (sha256).
struct HashingReader<R> {
    inner: R,
    hasher: Option<sha2::Sha256>,
    bytes: u64,
}

impl<R> HashingReader<R> {
    fn new(inner: R, hash: bool) -> Self {
        HashingReader {
            inner,
            hasher: hash.then(sha2::Digest::new),
            bytes: 0,
        }
    }

    /// Bytes read, the sha256 (hex) of everything the reader holds when it
    /// hashes (what `tar` left unread at the end still counts), and the
    /// reader.
    async fn finish(mut self) -> std::io::Result<(u64, Option<String>, R)>
    where
        R: tokio::io::AsyncRead + Unpin,
    {
        let sent = self.bytes;
        if self.hasher.is_some() {
            tokio::io::copy(&mut self, &mut tokio::io::sink()).await?;
        }
        let sha = self.hasher.map(|h| hex::encode(sha2::Digest::finalize(h)));
        Ok((sent, sha, self.inner))
    }
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for HashingReader<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = &polled {
            let n = buf.filled().len() - before;
            self.bytes += n as u64;
            let this = &mut *self;
            if let Some(h) = this.hasher.as_mut() {
                sha2::Digest::update(h, &buf.filled()[before..]);
            }
        }
        polled
    }
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
    activate_unless(session, config, id, false)
        .await?
        .ok_or_else(|| ReleaseError::Remote {
            node: session.node().to_string(),
            step: "swapping current",
            stderr: "the swap left current as it was".into(),
        })
}

/// [`activate`], unless `id` is `current` already (`None`).
pub async fn ensure_active(
    session: &Session,
    config: &ReleaseConfig,
    id: &str,
) -> Result<Option<ActivateReport>, ReleaseError> {
    activate_unless(session, config, id, true).await
}

/// Without beforeActivate hooks this is one round trip: the swap checks
/// that the release is shipped (and, with `unless_active`, not active) and
/// reports the state prune decides from; prune runs only when it has
/// victims. Hooks need the checks before they run: a second look first.
async fn activate_unless(
    session: &Session,
    config: &ReleaseConfig,
    id: &str,
    unless_active: bool,
) -> Result<Option<ActivateReport>, ReleaseError> {
    config.validate_id(id)?;
    let started = Instant::now();
    let mut hooks_run = 0;
    if !config.before_activate.is_empty() {
        let state = read_state(session, config).await?;
        if unless_active && state.active.as_deref() == Some(id) {
            return Ok(None);
        }
        if !state.releases.iter().any(|r| r == id) {
            return Err(ReleaseError::NotShipped {
                node: session.node().to_string(),
                id: id.to_string(),
            });
        }
        for hook in &config.before_activate {
            run_hook(session, config, id, HookPhase::BeforeActivate, hook).await?;
            hooks_run += 1;
        }
    }
    let swapped = swap(session, config, id, unless_active).await?;
    if !swapped.swapped {
        return Ok(None);
    }
    tracing::info!(node = %session.node(), release = id, replaced = ?swapped.replaced, "release activated");
    for hook in &config.after_activate {
        run_hook(session, config, id, HookPhase::AfterActivate, hook).await?;
        hooks_run += 1;
    }
    let pruned = prune(session, config, &swapped.state).await?;
    Ok(Some(ActivateReport {
        id: id.to_string(),
        replaced: swapped.replaced,
        hooks_run,
        pruned,
        elapsed: started.elapsed(),
    }))
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
    swap(session, config, &previous, false).await?;
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

async fn swap(
    session: &Session,
    config: &ReleaseConfig,
    id: &str,
    unless_active: bool,
) -> Result<plan::Swapped, ReleaseError> {
    let out = session
        .run(&plan::swap_script(config, id, unless_active))
        .await?;
    match out.status {
        ExitStatus::Code(0) => Ok(plan::parse_swap(&out.stdout_lossy())),
        ExitStatus::Code(plan::EXIT_NOT_SHIPPED) => Err(ReleaseError::NotShipped {
            node: session.node().to_string(),
            id: id.to_string(),
        }),
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

/// Deletes what [`prune_victims`] picks from `state` (the node's state
/// after the swap: hooks do not ship or delete releases).
async fn prune(
    session: &Session,
    config: &ReleaseConfig,
    state: &NodeReleases,
) -> Result<Vec<String>, ReleaseError> {
    let victims = prune_victims(state, config.keep);
    if victims.is_empty() {
        return Ok(victims);
    }
    session
        .run_checked(&plan::prune_script(config, &victims))
        .await?;
    tracing::info!(node = %session.node(), pruned = ?victims, "old releases pruned");
    Ok(victims)
}
