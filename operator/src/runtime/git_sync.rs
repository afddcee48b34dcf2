//! Follows a git spec source: fetches on a poll interval and when the
//! webhook asks, and publishes each new commit's specs as one set.
//!
//! A commit is loaded atomically: its tree is exported into
//! `<stateDir>/git/trees/<sha>` (under a temporary name, renamed when
//! complete), then `<stateDir>/git/current` is switched to it with one
//! rename of a symlink, and only then are its specs read — through
//! `current`, so a spec's file path is the same at every commit (status
//! and the hold of a broken spec key on it). A half-fetched or half-written
//! tree is never read, and `current` survives a restart: an operator that
//! comes back while the repository is unreachable runs its last commit.
//!
//! What is *not* loaded — a fetch that fails, a ref that is gone, a commit
//! over the limits or unsigned — is reported (status, log, metrics) and
//! the clusters keep what the last good commit said. A commit whose spec is
//! invalid does load: the other clusters move on, the broken one is held
//! as it is, exactly as with a spec directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::effects::git::{CommitInfo, GitError, Mirror};
use crate::runtime::http::{Board, SourceView};
use crate::runtime::specs::{Origin, SpecSet};
use crate::runtime::telemetry::Telemetry;

/// The longest wait between tries while the source keeps failing.
const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// Source events kept for status.
const EVENTS: usize = 20;

/// The specs of the commit last loaded.
#[derive(Clone, Debug)]
pub struct Applied {
    pub specs: Arc<SpecSet>,
    pub commit: Arc<CommitInfo>,
}

pub struct GitSync {
    mirror: Mirror,
    /// `<stateDir>/git`.
    root: PathBuf,
    poll: Duration,
    board: Arc<Board>,
    telemetry: Telemetry,
    view: SourceView,
    set: SpecSet,
    applied: Option<Arc<CommitInfo>>,
    /// A commit refused once is not examined again until the ref moves.
    refused: Option<String>,
    failures: u32,
}

impl GitSync {
    pub fn new(
        mirror: Mirror,
        root: PathBuf,
        poll: Duration,
        board: Arc<Board>,
        telemetry: Telemetry,
    ) -> GitSync {
        let view = SourceView {
            source: mirror.source().display(),
            reference: mirror.source().reference.clone(),
            ..SourceView::default()
        };
        GitSync {
            mirror,
            root,
            poll,
            board,
            telemetry,
            view,
            set: SpecSet::default(),
            applied: None,
            refused: None,
            failures: 0,
        }
    }

    /// The commit a previous run left in `current`, loaded as it was.
    pub fn restore(&mut self) -> Option<Applied> {
        let target = std::fs::read_link(self.root.join("current")).ok()?;
        let sha = target.file_name()?.to_str()?.to_string();
        let info: CommitInfo = serde_json::from_slice(
            &std::fs::read(self.root.join("trees").join(format!("{sha}.json"))).ok()?,
        )
        .ok()?;
        let applied = self.load(Arc::new(info), None).ok()?;
        tracing::info!(commit = %applied.commit.short(), "specs: the last commit applied, until the source answers");
        Some(applied)
    }

    /// Syncs now and then every poll interval, when `kick` is notified,
    /// or after a backoff while the source fails; publishes on `tx`.
    pub async fn run(
        mut self,
        kick: Arc<Notify>,
        tx: watch::Sender<Option<Applied>>,
        shutdown: CancellationToken,
    ) {
        loop {
            match self.sync().await {
                Ok(Some(applied)) => {
                    let _ = tx.send(Some(applied));
                }
                Ok(None) => {}
                Err(e) => self.failed(&e),
            }
            self.board.set_source(self.view.clone());
            let wait = backoff(self.poll, self.failures);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = kick.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One fetch; the specs when the ref moved to a commit that loads.
    pub async fn sync(&mut self) -> Result<Option<Applied>, GitError> {
        self.mirror.fetch().await?;
        let now = Utc::now();
        self.telemetry.git_last_sync.set(now.timestamp());
        self.view.last_sync = Some(now);
        let sha = self.mirror.resolve().await?;
        self.failures = 0;
        self.view.error = None;
        if self.refused.as_deref() == Some(sha.as_str()) {
            self.view.error = self.view.refused.clone();
            return Ok(None);
        }
        if self.applied.as_ref().is_some_and(|a| a.sha == sha) {
            return Ok(None);
        }
        if let Err(e) = self.mirror.check(&sha).await {
            self.refused = Some(sha.clone());
            self.view.refused = Some(e.to_string());
            return Err(e);
        }
        self.view.refused = None;
        let info = Arc::new(self.mirror.commit_info(&sha).await?);
        let rewritten = match &self.applied {
            Some(old) if !self.mirror.is_ancestor(&old.sha, &sha).await => Some(old.sha.clone()),
            _ => None,
        };
        if let Some(old) = &rewritten {
            tracing::warn!(from = %old, to = %sha, reference = %self.view.reference, "the branch was rewritten (force-push); following it");
            self.event(format!(
                "{} was rewritten: {} is no longer in its history; now at {}",
                self.view.reference,
                &old[..7.min(old.len())],
                info.short()
            ));
        }
        let previous = std::fs::read_link(self.root.join("current")).ok();
        self.export(&info).await?;
        match self.load(info.clone(), rewritten) {
            Ok(applied) => {
                tracing::info!(commit = %info.short(), subject = %info.subject, author = %info.author, clusters = applied.specs.clusters.len(), problems = applied.specs.problems.len(), "specs: commit applied");
                self.event(format!(
                    "applied {} {:?} ({})",
                    info.short(),
                    info.subject,
                    info.author
                ));
                self.prune(previous.as_deref());
                Ok(Some(applied))
            }
            Err(e) => {
                // Back to the tree the running specs came from.
                if let Some(prev) = previous {
                    let _ = switch(&self.root, &prev);
                }
                self.refused = Some(sha.clone());
                let e = GitError::Rejected {
                    sha,
                    reason: e.to_string(),
                };
                self.view.refused = Some(e.to_string());
                Err(e)
            }
        }
    }

    fn failed(&mut self, e: &GitError) {
        self.failures += 1;
        self.telemetry.git_sync_failures.inc();
        let text = e.to_string();
        tracing::error!(error = %text, source = %self.view.source, retry_in = ?backoff(self.poll, self.failures), "specs: cannot sync the git source; the clusters keep the last good commit");
        if self.view.error.as_deref() != Some(text.as_str()) {
            self.event(text.clone());
        }
        self.view.error = Some(text);
    }

    fn event(&mut self, text: String) {
        self.view.events.push_front(format!(
            "{} {text}",
            Utc::now().format("%Y-%m-%dT%H:%M:%SZ")
        ));
        self.view.events.truncate(EVENTS);
    }

    /// Writes the commit's tree (if it is not there yet) and points
    /// `current` at it.
    async fn export(&self, info: &CommitInfo) -> Result<(), GitError> {
        let trees = self.root.join("trees");
        let dest = trees.join(&info.sha);
        if !dest.exists() {
            let tmp = trees.join(format!(".{}.tmp", info.sha));
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp).map_err(|e| GitError::io(&tmp, e))?;
            }
            self.mirror.export(&info.sha, &tmp).await?;
            std::fs::rename(&tmp, &dest).map_err(|e| GitError::io(&dest, e))?;
        }
        let meta = trees.join(format!("{}.json", info.sha));
        let json = serde_json::to_vec(info).unwrap_or_default();
        std::fs::write(&meta, json).map_err(|e| GitError::io(&meta, e))?;
        switch(&self.root, &dest).map_err(|e| GitError::io(&self.root.join("current"), e))
    }

    /// Reads the specs below `current`.
    fn load(
        &mut self,
        commit: Arc<CommitInfo>,
        rewritten: Option<String>,
    ) -> Result<Applied, hangar_crds::LoadError> {
        let current = self.root.join("current");
        let dir = match self.mirror.source().dir.as_str() {
            "" => current.clone(),
            d => current.join(d),
        };
        let set = self.set.reload(&dir)?.at(Origin {
            commit: commit.clone(),
            root: current,
            rewritten,
        });
        self.set = set.clone();
        self.applied = Some(commit.clone());
        self.view.commit = Some((*commit).clone());
        self.view.problems = set.problems.len();
        Ok(Applied {
            specs: Arc::new(set),
            commit,
        })
    }

    /// Keeps the tree in use and the one before it; a crash between the
    /// switch and here only leaves more trees.
    fn prune(&self, previous: Option<&Path>) {
        let trees = self.root.join("trees");
        let current = std::fs::read_link(self.root.join("current")).ok();
        let keep = |p: &Path| Some(p) == current.as_deref() || Some(p) == previous;
        let Ok(entries) = std::fs::read_dir(&trees) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let tree = match path.extension() {
                Some(ext) if ext == "json" => path.with_extension(""),
                _ => path.clone(),
            };
            if !keep(&tree) {
                let _ = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
            }
        }
    }
}

/// Points `<root>/current` at `tree` with one rename.
fn switch(root: &Path, tree: &Path) -> std::io::Result<()> {
    let tmp = root.join(".current.tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(tree, &tmp)?;
    std::fs::rename(&tmp, root.join("current"))
}

/// The poll interval, doubled per consecutive failure up to [`MAX_BACKOFF`].
fn backoff(poll: Duration, failures: u32) -> Duration {
    if failures == 0 {
        return poll;
    }
    poll.saturating_mul(1 << failures.min(10))
        .min(MAX_BACKOFF.max(poll))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_while_failing_and_polls_again_once_it_answers() {
        let poll = Duration::from_secs(30);
        assert_eq!(backoff(poll, 0), poll);
        assert_eq!(backoff(poll, 1), Duration::from_secs(60));
        assert_eq!(backoff(poll, 3), Duration::from_secs(240));
        assert_eq!(backoff(poll, 9), MAX_BACKOFF);
        // A poll longer than the cap is not shortened by failing.
        assert_eq!(
            backoff(Duration::from_secs(900), 2),
            Duration::from_secs(900)
        );
    }
}
