//! `hangar run`: wires the lease, specs, watcher, resync, HTTP server and
//! the controller together, and shuts them down in order.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::runtime::controller::runner::RunnerConfig;
use crate::runtime::controller::{self, TriggerSender};
use crate::runtime::http::{self, Board};
use crate::runtime::lease::{Lease, LeaseError};
use crate::runtime::reconcile::{CloudProvider, LoopSettings, Operator};
use crate::runtime::settings::Settings;
use crate::runtime::specs::SpecSet;
use crate::runtime::status::{StatusStore, StoreError};
use crate::runtime::telemetry::{ApiStats, Telemetry};

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
    #[error("HTTP server on {addr}: {source}")]
    Http {
        addr: String,
        source: std::io::Error,
    },
}

/// Runs the operator until `shutdown` fires (SIGTERM/SIGINT in the binary).
pub async fn run(
    settings: Settings,
    loop_settings: Option<LoopSettings>,
    clouds: Arc<dyn CloudProvider>,
    api_stats: Option<Arc<dyn ApiStats>>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let _lease = Lease::acquire(&settings.state_dir, &settings.owner)?;
    let store = StatusStore::open(&settings.state_dir)?;
    let board = Arc::new(Board::default());
    let telemetry = Telemetry::new();
    if let Some(stats) = api_stats {
        telemetry.set_api_stats(stats);
    }
    let (triggers, trigger_rx) = TriggerSender::channel();
    let loop_settings = loop_settings
        .unwrap_or_else(|| LoopSettings::new(settings.state_dir.clone(), settings.owner.clone()));
    let resync = loop_settings.resync;
    let operator = Arc::new(Operator::new(
        loop_settings,
        clouds,
        store,
        board.clone(),
        telemetry.clone(),
        triggers.clone(),
    ));

    let initial = SpecSet::load(&settings.specs)?;
    tracing::info!(
        specs = %settings.specs.display(),
        clusters = initial.clusters.len(),
        problems = initial.problems.len(),
        owner = %settings.owner,
        "hangar starting"
    );
    operator.set_specs(initial);
    for key in operator.keys() {
        triggers.now(key);
    }

    let http_task = http::serve(
        settings.listen,
        board.clone(),
        telemetry.clone(),
        shutdown.clone(),
    )
    .await
    .map_err(|source| RunError::Http {
        addr: settings.listen.to_string(),
        source,
    })?;

    let (changed_tx, changed_rx) = mpsc::unbounded_channel();
    let _watcher = crate::runtime::specs::watch(&settings.specs, changed_tx).map_err(|source| {
        RunError::Watch {
            dir: settings.specs.display().to_string(),
            source,
        }
    })?;
    let specs_task = tokio::spawn(follow_specs(
        settings.specs.clone(),
        operator.clone(),
        triggers.clone(),
        changed_rx,
        resync,
        shutdown.clone(),
    ));

    board.set_ready(true);
    let runner = controller::run(
        operator.clone(),
        trigger_rx,
        RunnerConfig {
            concurrency: settings.concurrency,
            ..RunnerConfig::default()
        },
        shutdown.clone(),
    );
    drop(triggers);
    runner.await;

    board.set_ready(false);
    tracing::info!("stopping: waiting for node tasks to reach a safe point");
    operator.shutdown().await;
    let _ = specs_task.await;
    let _ = http_task.await;
    tracing::info!("stopped");
    Ok(())
}

/// Reloads specs when the directory changes (debounced) and on every resync
/// tick, and triggers the clusters that need a look.
async fn follow_specs(
    dir: std::path::PathBuf,
    operator: Arc<Operator>,
    triggers: TriggerSender,
    mut changed: mpsc::UnboundedReceiver<()>,
    resync: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(resync);
    tick.tick().await;
    loop {
        let everything = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => true,
            got = changed.recv() => {
                if got.is_none() {
                    return;
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
