//! Runs reconciles: bounded concurrency, one at a time per cluster,
//! requeue and per-cluster backoff, graceful shutdown.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::{self, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::scheduler::Scheduler;
use super::{Action, Key, Reconciler};

/// "Look at this cluster after this long."
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trigger {
    pub key: Key,
    pub after: Duration,
}

/// Cheap handle anything can use to ask for a reconcile.
#[derive(Clone, Debug)]
pub struct TriggerSender(mpsc::UnboundedSender<Trigger>);

impl TriggerSender {
    pub fn channel() -> (TriggerSender, mpsc::UnboundedReceiver<Trigger>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (TriggerSender(tx), rx)
    }

    pub fn now(&self, key: impl Into<Key>) {
        self.after(key, Duration::ZERO);
    }

    /// Sending fails only once the runner has stopped, when nobody needs
    /// the trigger any more.
    pub fn after(&self, key: impl Into<Key>, after: Duration) {
        let _ = self.0.send(Trigger {
            key: key.into(),
            after,
        });
    }
}

#[derive(Debug)]
pub struct RunnerConfig {
    pub concurrency: usize,
    /// Triggers closer together than this become one reconcile.
    pub debounce: Duration,
    pub backoff: Backoff,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            concurrency: 8,
            debounce: Duration::from_millis(100),
            backoff: Backoff::default(),
        }
    }
}

type Done<E> = (Key, Result<Action, E>, Duration);

/// Runs until `shutdown` is cancelled (or every trigger sender is gone),
/// then lets in-flight reconciles finish and returns.
pub async fn run<R: Reconciler>(
    reconciler: Arc<R>,
    mut triggers: mpsc::UnboundedReceiver<Trigger>,
    mut config: RunnerConfig,
    shutdown: CancellationToken,
) {
    let concurrency = config.concurrency.max(1);
    let mut scheduler = Scheduler::default();
    let mut running: HashMap<task::Id, Key> = HashMap::new();
    let mut dirty: HashSet<Key> = HashSet::new();
    let mut tasks: JoinSet<Done<R::Error>> = JoinSet::new();
    let mut stopping = false;

    loop {
        if !stopping {
            start_due(
                &mut scheduler,
                &mut running,
                &mut dirty,
                &mut tasks,
                &reconciler,
                concurrency,
            );
        }
        if stopping && tasks.is_empty() {
            return;
        }
        let next = scheduler
            .next_deadline()
            .filter(|_| !stopping && running.len() < concurrency);
        tokio::select! {
            _ = shutdown.cancelled(), if !stopping => stopping = true,
            trigger = triggers.recv(), if !stopping => match trigger {
                Some(t) => scheduler.schedule(t.key, Instant::now() + t.after.max(config.debounce)),
                None => stopping = true,
            },
            _ = sleep_until_opt(next), if next.is_some() => {}
            Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                // The slot is freed by task id, so a reconcile that panicked
                // (or was aborted) gives its slot back like any other.
                let id = match &done {
                    Ok((id, _)) => *id,
                    Err(e) => e.id(),
                };
                let Some(key) = running.remove(&id) else {
                    continue;
                };
                let again_now = dirty.remove(&key);
                let delay = match done {
                    Ok((_, (_, Ok(action), took))) => {
                        reconciler.observe(&key, Ok(&action), took);
                        config.backoff.succeeded(&key);
                        action.requeue_after()
                    }
                    Ok((_, (_, Err(err), took))) => {
                        reconciler.observe(&key, Err(&err), took);
                        let d = config.backoff.failed(&key, rand::random::<f64>());
                        tracing::warn!(cluster = %key, error = %err, retry_in = ?d, "reconcile failed");
                        Some(d)
                    }
                    Err(panic) => {
                        let d = config.backoff.failed(&key, rand::random::<f64>());
                        tracing::error!(cluster = %key, panic = %panic, retry_in = ?d, "reconcile panicked");
                        Some(d)
                    }
                };
                if let Some(d) = delay {
                    scheduler.schedule(key.clone(), Instant::now() + d);
                }
                if again_now && !stopping {
                    scheduler.schedule(key, Instant::now());
                }
            }
        }
    }
}

fn start_due<R: Reconciler>(
    scheduler: &mut Scheduler,
    running: &mut HashMap<task::Id, Key>,
    dirty: &mut HashSet<Key>,
    tasks: &mut JoinSet<Done<R::Error>>,
    reconciler: &Arc<R>,
    concurrency: usize,
) {
    let now = Instant::now();
    while running.len() < concurrency {
        let due = scheduler.pop_due(now, concurrency - running.len());
        if due.is_empty() {
            return;
        }
        for key in due {
            if running.values().any(|k| *k == key) {
                // Never two reconciles of one cluster: run again afterwards.
                dirty.insert(key);
                continue;
            }
            let r = Arc::clone(reconciler);
            let k = key.clone();
            let handle = tasks.spawn(async move {
                let started = Instant::now();
                let outcome = r.reconcile(&k).await;
                (k, outcome, started.elapsed())
            });
            running.insert(handle.id(), key);
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
