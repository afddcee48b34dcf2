//! `hangar run`: wires the lease, specs, watcher, resync, HTTP server and
//! the controller together, and shuts them down in order.
//!
//! With a distributed lease the process serves HTTP from the start and
//! waits as a standby; each time it wins the lease it runs one *term*: a
//! fresh operator (statuses loaded from the shared store, the fleet rebuilt
//! from the instance tags, every node continued from its phase) until the
//! term ends — the lease lost, or a stop. Then it is a standby again.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use hangar_cloud::lease::{LeaseStore, StateStore};
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::effects::git::{GitOptions, Limits, Mirror};
use crate::runtime::controller::runner::RunnerConfig;
use crate::runtime::controller::{self, TriggerSender};
use crate::runtime::git_sync::{Applied, GitSync};
use crate::runtime::http::{self, Board};
use crate::runtime::lease::shared::SharedMemory;
use crate::runtime::lease::{elector, Leadership, Lease, LeaseError, RoleName, Term};
use crate::runtime::reconcile::{CloudProvider, LoopSettings, Operator};
use crate::runtime::settings::{Settings, SpecSource};
use crate::runtime::specs::SpecSet;
use crate::runtime::status::{StatusStore, StoreError};
use crate::runtime::telemetry::{ApiStats, Telemetry};
use crate::runtime::webhook::Webhook;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("spec directory: {0}")]
    Specs(#[from] hangar_crds::LoadError),
    #[error("watching {dir}: {source}")]
    Watch { dir: String, source: notify::Error },
    #[error(transparent)]
    Settings(#[from] crate::runtime::settings::SettingsError),
    #[error("git spec source: {0}")]
    Git(#[from] crate::effects::git::GitError),
    /// The git sync task is gone (it ends only by a panic): no commit can
    /// come any more, so the process exits for its supervisor to restart it
    /// rather than reconcile the last commit forever.
    #[error("git spec source: the sync task ended; no new commit can be taken")]
    GitFeedEnded,
    #[error("the task following the specs panicked; no new spec can be taken")]
    SpecsUnfollowed,
    /// notify's watcher thread is gone: no edit of the directory would be
    /// seen any more.
    #[error("watching {dir}: the watcher stopped; no new spec can be taken")]
    WatcherGone { dir: String },
    /// The task that keeps the lease is gone: this process could never
    /// lead again, so it exits for its supervisor rather than idle as a
    /// standby for ever.
    #[error("the lease elector stopped; this process can no longer lead")]
    ElectorEnded,
    #[error("webhook secret: {0}")]
    WebhookSecret(String),
    #[error("HTTP server on {addr}: {source}")]
    Http {
        addr: String,
        source: std::io::Error,
    },
}

/// A distributed lease: this process's leadership and where the lease and
/// the shared statuses are kept.
pub struct Ha {
    pub leadership: Leadership,
    pub lease: Arc<dyn LeaseStore>,
    pub state: Arc<dyn StateStore>,
    /// Counters of the store's calls, for `/metrics`.
    pub calls: Option<Arc<hangar_cloud::ApiCalls>>,
}

/// Runs the operator until `shutdown` fires (SIGTERM/SIGINT in the binary),
/// under the single-host lease.
pub async fn run(
    settings: Settings,
    loop_settings: Option<LoopSettings>,
    clouds: Arc<dyn CloudProvider>,
    api_stats: Option<Arc<dyn ApiStats>>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    run_with(settings, loop_settings, clouds, api_stats, None, shutdown).await
}

/// [`run`], as leader or standby under `ha` when given. `clouds` must be
/// fenced by `ha.leadership` (see `AwsClouds::fenced`).
pub async fn run_with(
    settings: Settings,
    loop_settings: Option<LoopSettings>,
    clouds: Arc<dyn CloudProvider>,
    api_stats: Option<Arc<dyn ApiStats>>,
    ha: Option<Ha>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    // Held in every mode: two processes never share a state directory.
    let _flock = Lease::acquire(&settings.state_dir, &settings.owner)?;
    let leadership = match &ha {
        Some(ha) => ha.leadership.clone(),
        None => Leadership::single(&format!("pid-{}", std::process::id())),
    };
    let board = Arc::new(Board::default());
    let telemetry = Telemetry::new();
    if let Some(stats) = api_stats {
        telemetry.set_api_stats(stats);
    }
    let shows = tokio::spawn(show_leadership(
        leadership.clone(),
        board.clone(),
        telemetry.clone(),
        shutdown.clone(),
    ));
    let feed = match settings.spec_source()? {
        SpecSource::Dir(dir) => Feed::Dir(dir),
        SpecSource::Git(source) => {
            Feed::Git(start_git_sync(&settings, source, &board, &telemetry, &shutdown).await?)
        }
    };
    let webhook = match &feed {
        Feed::Git(git) => webhook_secret(&settings)?
            .map(|secret| Arc::new(Webhook::new(secret, git.kick.clone()))),
        Feed::Dir(_) => None,
    };
    let http_task = http::serve(
        settings.listen,
        board.clone(),
        telemetry.clone(),
        webhook,
        shutdown.clone(),
    )
    .await
    .map_err(|source| RunError::Http {
        addr: settings.listen.to_string(),
        source,
    })?;
    let elector_stop = CancellationToken::new();
    let elector_task = ha.as_ref().map(|ha| {
        tracing::info!(
            lease = %ha.lease.describe(),
            holder = %leadership.holder(),
            owner = %settings.owner,
            "standby: waiting for the lease"
        );
        spawn_elector(
            leadership.clone(),
            ha.lease.clone(),
            elector_stop.clone(),
            shutdown.clone(),
        )
    });

    let loop_settings = loop_settings.unwrap_or_else(|| LoopSettings {
        secrets_refresh: settings.secrets_refresh_interval.get(),
        target_group_check: settings.target_group_check_interval.get(),
        ..LoopSettings::new(settings.state_dir.clone(), settings.owner.clone())
    });
    let mut result = Ok(());
    while let Some(term) = leadership.wait_term(&shutdown).await {
        let served = serve_term(
            &settings,
            &feed,
            &loop_settings,
            &clouds,
            &leadership,
            &term,
            ha.as_ref(),
            &board,
            &telemetry,
            &shutdown,
        )
        .await;
        if let Err(e) = served {
            result = Err(e);
            break;
        }
        if shutdown.is_cancelled() {
            break;
        }
        tracing::warn!("the term ended: a standby from now on");
    }

    elector_stop.cancel();
    if let Some(t) = elector_task {
        if let Ok(Err(e)) = t.await {
            result = result.and(Err(e));
        }
    }
    if let Some(ha) = &ha {
        // A graceful stop hands over at once instead of after a lease.
        elector::release(&leadership, ha.lease.as_ref()).await;
    }
    shutdown.cancel();
    let _ = http_task.await;
    let _ = shows.await;
    tracing::info!("stopped");
    result
}

/// Runs the lease elector until `stop`. If it ends before (a panic), the
/// leader's term still ends at its deadline — every action asks the
/// lease — but nothing would renew or win the lease again: `shutdown` is
/// fired so the process stops, and the task returns an error.
fn spawn_elector(
    leadership: Leadership,
    lease: Arc<dyn LeaseStore>,
    stop: CancellationToken,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<Result<(), RunError>> {
    tokio::spawn(async move {
        let ran = AssertUnwindSafe(elector::run(leadership, lease, stop.clone()))
            .catch_unwind()
            .await;
        if stop.is_cancelled() {
            return Ok(());
        }
        tracing::error!(
            panicked = ran.is_err(),
            "the lease elector stopped; stopping"
        );
        shutdown.cancel();
        Err(RunError::ElectorEnded)
    })
}

/// One term: a fresh operator acting until the term ends or `shutdown`.
#[allow(clippy::too_many_arguments)]
async fn serve_term(
    settings: &Settings,
    feed: &Feed,
    loop_settings: &LoopSettings,
    clouds: &Arc<dyn CloudProvider>,
    leadership: &Leadership,
    term: &Term,
    ha: Option<&Ha>,
    board: &Arc<Board>,
    telemetry: &Telemetry,
    shutdown: &CancellationToken,
) -> Result<(), RunError> {
    // The term's work stops on either.
    let stop = shutdown.child_token();
    let ends = {
        let (stop, ended) = (stop.clone(), term.cancel.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = ended.cancelled() => stop.cancel(),
                _ = stop.cancelled() => {}
            }
        })
    };
    let mut store = StatusStore::open(&settings.state_dir)?;
    if let Some(ha) = ha {
        let timing = leadership.with(|m, _| m.timing()).unwrap_or_default();
        let shared = Arc::new(SharedMemory::new(
            ha.state.clone(),
            leadership.clone(),
            timing.renew_deadline / 2,
        ));
        // The memory of decisions comes from the last leader, read after
        // winning the lease: nothing the old leader could still write is
        // accepted from now on (its writes are fenced).
        let loaded = loop {
            match shared.load().await {
                Ok(l) => break l,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot load the shared statuses yet");
                    tokio::select! {
                        _ = stop.cancelled() => {
                            ends.abort();
                            return Ok(());
                        }
                        _ = tokio::time::sleep(timing.retry) => {}
                    }
                }
            }
        };
        tracing::info!(
            clusters = loaded.len(),
            fence = term.fence,
            "leading: statuses loaded from the shared store"
        );
        board.clear();
        store = store.with_shared(shared, loaded);
    }
    let (triggers, trigger_rx) = TriggerSender::channel();
    let resync = loop_settings.resync;
    let operator = Arc::new(Operator::new(
        loop_settings.clone(),
        clouds.clone(),
        store,
        board.clone(),
        telemetry.clone(),
        triggers.clone(),
    ));
    operator
        .tasks()
        .fence(leadership.gate(term), term.cancel.clone());

    let initial = match feed {
        Feed::Dir(dir) => SpecSet::load(dir)?,
        Feed::Git(git) => {
            // No commit yet (a first start, or a standby that never
            // fetched): no spec set is not "every spec was deleted" — that
            // would mark every known cluster removed, and drain those with
            // `deletionPolicy: delete`. Nothing is reconciled until one is.
            if git.applied.borrow().is_none() {
                tracing::info!(specs = %settings.specs_display(), "waiting for the first commit of the git source");
            }
            match git.first_commit(&stop).await {
                Ok(Some(a)) => (*a.specs).clone(),
                Ok(None) => {
                    ends.abort();
                    return Ok(());
                }
                Err(e) => {
                    ends.abort();
                    return Err(e);
                }
            }
        }
    };
    tracing::info!(
        specs = %settings.specs_display(),
        clusters = initial.clusters.len(),
        problems = initial.problems.len(),
        owner = %settings.owner,
        fence = term.fence,
        "hangar starting"
    );
    operator.set_specs(initial);
    for key in operator.keys() {
        triggers.now(key);
    }

    let mut _watcher = None;
    let specs_task =
        match feed {
            Feed::Dir(dir) => {
                let (changed_tx, changed_rx) = mpsc::unbounded_channel();
                _watcher = Some(crate::runtime::specs::watch(dir, changed_tx).map_err(
                    |source| RunError::Watch {
                        dir: dir.display().to_string(),
                        source,
                    },
                )?);
                spawn_follower(
                    follow_specs(
                        dir.clone(),
                        operator.clone(),
                        triggers.clone(),
                        changed_rx,
                        resync,
                        stop.clone(),
                    ),
                    stop.clone(),
                )
            }
            Feed::Git(git) => spawn_follower(
                follow_commits(
                    git.applied.clone(),
                    operator.clone(),
                    triggers.clone(),
                    resync,
                    stop.clone(),
                ),
                stop.clone(),
            ),
        };

    board.set_ready(true);
    let runner = controller::run(
        operator.clone(),
        trigger_rx,
        RunnerConfig {
            concurrency: settings.concurrency,
            ..RunnerConfig::default()
        },
        stop.clone(),
    );
    drop(triggers);
    runner.await;

    board.set_ready(false);
    tracing::info!("stopping: waiting for node tasks to reach a safe point");
    operator.shutdown().await;
    stop.cancel();
    let followed = specs_task.await;
    let _ = ends.await;
    followed.unwrap_or(Err(RunError::SpecsUnfollowed))
}

/// Runs the task that follows the specs. A panic there stops the term
/// with an error, as its other ends do: a leader must not go on
/// reconciling specs that nobody follows any more.
fn spawn_follower(
    follow: impl Future<Output = Result<(), RunError>> + Send + 'static,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Result<(), RunError>> {
    tokio::spawn(async move {
        match AssertUnwindSafe(follow).catch_unwind().await {
            Ok(result) => result,
            Err(_) => {
                tracing::error!("the task following the specs panicked; stopping the term");
                stop.cancel();
                Err(RunError::SpecsUnfollowed)
            }
        }
    })
}

/// Keeps `/api/v1/leader`, `/readyz` and the `hangar_leader` metrics in
/// step with the lease.
async fn show_leadership(
    leadership: Leadership,
    board: Arc<Board>,
    telemetry: Telemetry,
    shutdown: CancellationToken,
) {
    let mut views = leadership.subscribe();
    // A lapsed term is noticed by the first question; ask once a second
    // so status shows it even when nothing else asks.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let view = leadership.view();
        telemetry
            .leader
            .set(i64::from(view.role == RoleName::Leader));
        telemetry.lease_fence.set(match view.role {
            RoleName::Leader => view.fence.map_or(0, |f| f as i64),
            RoleName::Standby => 0,
        });
        board.set_leader(view);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = views.changed() => if changed.is_err() { return },
            _ = tick.tick() => {}
        }
    }
}

/// Reloads specs when the directory changes (debounced) and on every resync
/// tick, and triggers the clusters that need a look. If the watcher goes
/// away while the term goes on, the term is stopped (`shutdown` is the
/// term's token) with an error.
async fn follow_specs(
    dir: std::path::PathBuf,
    operator: Arc<Operator>,
    triggers: TriggerSender,
    mut changed: mpsc::UnboundedReceiver<()>,
    resync: Duration,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let mut tick = tokio::time::interval(resync);
    tick.tick().await;
    loop {
        let everything = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => true,
            got = changed.recv() => {
                if got.is_none() {
                    if shutdown.is_cancelled() {
                        return Ok(());
                    }
                    tracing::error!(dir = %dir.display(), "the spec directory's watcher stopped; stopping the term");
                    shutdown.cancel();
                    return Err(RunError::WatcherGone { dir: dir.display().to_string() });
                }
                // Editors write files in several steps: wait for quiet.
                tokio::time::sleep(Duration::from_millis(200)).await;
                while changed.try_recv().is_ok() {}
                false
            }
        };
        reload(&dir, &operator, &triggers);
        if everything {
            for key in operator.keys() {
                triggers.now(key);
            }
        }
    }
}

/// Takes each commit the git source publishes, and triggers every cluster
/// on the resync tick. If the git sync ends while the term goes on, the
/// term is stopped (`shutdown` is the term's token) with an error.
async fn follow_commits(
    mut applied: watch::Receiver<Option<Applied>>,
    operator: Arc<Operator>,
    triggers: TriggerSender,
    resync: Duration,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let mut tick = tokio::time::interval(resync);
    tick.tick().await;
    // A commit published before this term began is taken now.
    applied.mark_changed();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {
                for key in operator.keys() {
                    triggers.now(key);
                }
            }
            got = applied.changed() => {
                if got.is_err() {
                    // The sync also ends on a process shutdown, which
                    // has cancelled this term's token already.
                    if shutdown.is_cancelled() {
                        return Ok(());
                    }
                    tracing::error!("the git sync task ended; stopping the term");
                    shutdown.cancel();
                    return Err(RunError::GitFeedEnded);
                }
                let set = applied.borrow_and_update().as_ref().map(|a| (*a.specs).clone());
                if let Some(set) = set {
                    for key in operator.set_specs(set) {
                        tracing::info!(cluster = %key, "spec changed");
                        triggers.now(key);
                    }
                }
            }
        }
    }
}

/// Where a term reads its specs: a directory it watches, or the commits
/// of the git source (followed for the whole process, so a standby's
/// mirror is fresh when it takes over).
enum Feed {
    Dir(std::path::PathBuf),
    Git(GitFeed),
}

struct GitFeed {
    applied: watch::Receiver<Option<Applied>>,
    kick: Arc<Notify>,
}

impl GitFeed {
    /// The newest commit, once there is one; `None` if `stop` fires first.
    /// An error if the sync ended without one: returning to wait for the
    /// next term would find the same lease and spin.
    async fn first_commit(&self, stop: &CancellationToken) -> Result<Option<Applied>, RunError> {
        let mut applied = self.applied.clone();
        tokio::select! {
            _ = stop.cancelled() => Ok(None),
            got = applied.wait_for(Option::is_some) => match got {
                Ok(a) => Ok(a.clone()),
                Err(_) if stop.is_cancelled() => Ok(None),
                Err(_) => Err(RunError::GitFeedEnded),
            },
        }
    }
}

async fn start_git_sync(
    settings: &Settings,
    source: crate::effects::git::GitSource,
    board: &Arc<Board>,
    telemetry: &Telemetry,
    shutdown: &CancellationToken,
) -> Result<GitFeed, RunError> {
    let g = &settings.git;
    let options = GitOptions {
        ssh_key: g.git_ssh_key.clone(),
        known_hosts: g.git_known_hosts.clone(),
        allowed_signers: g.git_allowed_signers.clone(),
        https_token_file: g.git_https_token_file.clone(),
        limits: Limits::default(),
    };
    let root = settings.state_dir.join("git");
    let mirror = Mirror::open(source, root.join("mirror.git"), options).await?;
    let mut sync = GitSync::new(
        mirror,
        root,
        g.git_poll_interval.get(),
        board.clone(),
        telemetry.clone(),
    );
    let restored = sync.restore();
    let (tx, applied) = watch::channel(restored);
    let kick = Arc::new(Notify::new());
    tokio::spawn(sync.run(kick.clone(), tx, shutdown.clone()));
    Ok(GitFeed { applied, kick })
}

/// The webhook secret: `HANGAR_WEBHOOK_SECRET`, or the file
/// `webhook_secret_file` names. Never logged.
fn webhook_secret(settings: &Settings) -> Result<Option<Vec<u8>>, RunError> {
    let secret = match (
        &settings.git.webhook_secret_file,
        std::env::var("HANGAR_WEBHOOK_SECRET"),
    ) {
        (_, Ok(v)) => v.into_bytes(),
        (Some(file), Err(_)) => std::fs::read(file)
            .map_err(|e| RunError::WebhookSecret(format!("{}: {e}", file.display())))?,
        (None, Err(_)) => return Ok(None),
    };
    let trimmed = secret.trim_ascii().to_vec();
    if trimmed.is_empty() {
        return Err(RunError::WebhookSecret("the secret is empty".into()));
    }
    Ok(Some(trimmed))
}

fn reload(dir: &Path, operator: &Operator, triggers: &TriggerSender) {
    match operator.specs().reload(dir) {
        Ok(set) => {
            for key in operator.set_specs(set) {
                tracing::info!(cluster = %key, "spec changed");
                triggers.now(key);
            }
        }
        // A directory that vanished is not a reason to forget the fleet:
        // keep the last good view and say so.
        Err(e) => tracing::error!(error = %e, "cannot reload specs; keeping the last good set"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::controller::TriggerSender;
    use crate::runtime::http::Board;

    fn operator(state_dir: &Path) -> Arc<Operator> {
        let (triggers, _rx) = TriggerSender::channel();
        Arc::new(Operator::new(
            LoopSettings::new(state_dir.to_path_buf(), "test".into()),
            crate::runtime::clouds::aws("test", state_dir),
            StatusStore::read_only(state_dir),
            Arc::new(Board::default()),
            Telemetry::new(),
            triggers,
        ))
    }

    /// The git sync ends only by a panic. A term that kept running on the
    /// last commit would never see another one, so it stops with an error
    /// and the process exits for its supervisor to restart it.
    #[tokio::test]
    async fn a_term_following_commits_stops_when_the_git_sync_is_gone() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (tx, applied) = watch::channel(None);
        let (triggers, _rx) = TriggerSender::channel();
        let stop = CancellationToken::new();
        let follow = tokio::spawn(follow_commits(
            applied,
            operator(dir.path()),
            triggers,
            Duration::from_secs(60),
            stop.clone(),
        ));
        drop(tx);
        tokio::time::timeout(Duration::from_secs(5), stop.cancelled())
            .await
            .expect("the term is stopped when the git feed ends");
        let ended = follow.await.expect("follow_commits did not panic");
        assert!(
            matches!(ended, Err(RunError::GitFeedEnded)),
            "follow_commits ends with an error, got {ended:?}"
        );
    }

    #[tokio::test]
    async fn a_process_shutdown_that_ends_the_git_sync_is_no_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (tx, applied) = watch::channel(None);
        let (triggers, _rx) = TriggerSender::channel();
        let stop = CancellationToken::new();
        let follow = tokio::spawn(follow_commits(
            applied,
            operator(dir.path()),
            triggers,
            Duration::from_secs(60),
            stop.clone(),
        ));
        stop.cancel();
        drop(tx);
        let ended = follow.await.expect("follow_commits did not panic");
        assert!(ended.is_ok(), "a shutdown is a clean end, got {ended:?}");
    }

    /// notify's watcher thread holds the sender: the channel closes only
    /// if that thread is gone, and then no edit of the specs is ever seen.
    #[tokio::test]
    async fn a_term_following_a_directory_stops_when_its_watcher_is_gone() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (changed_tx, changed) = mpsc::unbounded_channel();
        let (triggers, _rx) = TriggerSender::channel();
        let stop = CancellationToken::new();
        let follow = tokio::spawn(follow_specs(
            dir.path().to_path_buf(),
            operator(dir.path()),
            triggers,
            changed,
            Duration::from_secs(60),
            stop.clone(),
        ));
        drop(changed_tx);
        tokio::time::timeout(Duration::from_secs(5), stop.cancelled())
            .await
            .expect("the term is stopped when the watcher is gone");
        let ended = follow.await.expect("follow_specs did not panic");
        assert!(
            matches!(ended, Err(RunError::WatcherGone { .. })),
            "follow_specs ends with an error, got {ended:?}"
        );
    }

    #[tokio::test]
    async fn a_follower_that_panics_stops_the_term_with_an_error() {
        let stop = CancellationToken::new();
        let follower = spawn_follower(
            async {
                panic!("a bug in the follower");
            },
            stop.clone(),
        );
        let ended = follower.await.expect("the panic is caught");
        assert!(stop.is_cancelled(), "the term is stopped");
        assert!(
            matches!(ended, Err(RunError::SpecsUnfollowed)),
            "got {ended:?}"
        );
    }

    #[tokio::test]
    async fn a_shutdown_that_closes_the_watcher_is_no_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (changed_tx, changed) = mpsc::unbounded_channel();
        let (triggers, _rx) = TriggerSender::channel();
        let stop = CancellationToken::new();
        stop.cancel();
        drop(changed_tx);
        let ended = follow_specs(
            dir.path().to_path_buf(),
            operator(dir.path()),
            triggers,
            changed,
            Duration::from_secs(60),
            stop,
        )
        .await;
        assert!(ended.is_ok(), "a shutdown is a clean end, got {ended:?}");
    }

    /// A lease store with a bug: every call panics.
    struct PanickingStore;

    #[async_trait::async_trait]
    impl LeaseStore for PanickingStore {
        async fn read(
            &self,
        ) -> Result<Option<hangar_cloud::lease::LeaseRecord>, hangar_cloud::CloudError> {
            panic!("a bug in the lease store")
        }
        async fn write(
            &self,
            _: &hangar_cloud::lease::LeaseRecord,
            _: Option<&str>,
        ) -> Result<(), hangar_cloud::lease::LeaseWriteError> {
            panic!("a bug in the lease store")
        }
        fn describe(&self) -> String {
            "panicking".into()
        }
    }

    #[tokio::test]
    async fn a_process_whose_elector_dies_stops_instead_of_idling_as_a_standby() {
        let leadership =
            Leadership::distributed("a", crate::core::lease::Timing::default(), "panicking");
        let (stop, shutdown) = (CancellationToken::new(), CancellationToken::new());
        let elector = spawn_elector(
            leadership,
            Arc::new(PanickingStore),
            stop.clone(),
            shutdown.clone(),
        );
        tokio::time::timeout(Duration::from_secs(5), shutdown.cancelled())
            .await
            .expect("the process is stopped");
        let ended = elector.await.expect("the panic is caught");
        assert!(
            matches!(ended, Err(RunError::ElectorEnded)),
            "got {ended:?}"
        );
    }

    #[tokio::test]
    async fn an_elector_stopped_on_purpose_stops_nothing_else() {
        let table = hangar_cloud::lease::memory::MemoryTable::default();
        let leadership =
            Leadership::distributed("a", crate::core::lease::Timing::default(), "memory");
        let (stop, shutdown) = (CancellationToken::new(), CancellationToken::new());
        let elector = spawn_elector(leadership, Arc::new(table), stop.clone(), shutdown.clone());
        stop.cancel();
        let ended = elector.await.expect("no panic");
        assert!(ended.is_ok(), "got {ended:?}");
        assert!(!shutdown.is_cancelled());
    }

    fn feed() -> (watch::Sender<Option<Applied>>, GitFeed) {
        let (tx, applied) = watch::channel(None);
        let feed = GitFeed {
            applied,
            kick: Arc::new(Notify::new()),
        };
        (tx, feed)
    }

    /// Before this was an error, a term waiting for a first commit that
    /// could not come returned as if stopped, and the leader started the
    /// same term again at once, for ever.
    #[tokio::test]
    async fn a_term_waiting_for_a_first_commit_fails_when_the_git_sync_is_gone() {
        let (tx, feed) = feed();
        drop(tx);
        let got = tokio::time::timeout(
            Duration::from_secs(5),
            feed.first_commit(&CancellationToken::new()),
        )
        .await
        .expect("the wait ends");
        assert!(matches!(got, Err(RunError::GitFeedEnded)), "got {got:?}");
    }

    #[tokio::test]
    async fn a_stopped_term_waits_for_no_first_commit() {
        let (_tx, feed) = feed();
        let stop = CancellationToken::new();
        stop.cancel();
        let got = feed.first_commit(&stop).await;
        assert!(matches!(got, Ok(None)), "got {got:?}");
    }
}
