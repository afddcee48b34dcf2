//! Long-running node work, started by reconcile and observed by it.
//!
//! Reconcile never waits for a node: it starts a task here and looks at
//! the registry on its next pass — what runs, what finished and how. At
//! most one task runs per node. Cancelling is cooperative: the task stops
//! at its next safe point (between steps, or out of a wait), so a node is
//! never left between a cloud call and the tag that records it.
//!
//! Under a distributed lease the runtime [`fences`](Tasks::fence) the
//! registry to its leadership term: no task starts once the term's
//! [`Gate`] closes, every task's cancellation is a child of the term's (so
//! a lost lease cancels them all at once), and each task runs with the
//! gate in scope for the SSH layer to check before every command.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::core::fleet::Task;
pub use crate::core::observation::{Finished, Note, Outcome};
use crate::effects::gate::{self, Gate};

struct Running {
    cluster: String,
    task: Task,
    cancel: CancellationToken,
}

#[derive(Default)]
struct Inner {
    running: HashMap<String, Running>,
    finished: HashMap<String, Vec<Finished>>,
    notes: HashMap<String, Vec<Note>>,
}

/// The leadership term tasks run under (none: a single operator).
#[derive(Clone, Default)]
struct Term {
    gate: Option<Gate>,
    cancel: Option<CancellationToken>,
}

/// Cheap to clone; shared by the reconciler and every task.
#[derive(Clone)]
pub struct Tasks {
    inner: Arc<Mutex<Inner>>,
    term: Arc<std::sync::RwLock<Term>>,
    tracker: TaskTracker,
    /// Told the cluster whose task just ended (the runtime reconciles it).
    on_finished: Arc<dyn Fn(&str) + Send + Sync>,
}

/// Handed to a task: its cancellation signal and a way to leave notes.
#[derive(Clone)]
pub struct TaskHandle {
    pub cluster: String,
    pub node: String,
    pub cancel: CancellationToken,
    gate: Option<Gate>,
    tasks: Tasks,
}

impl TaskHandle {
    pub fn note(&self, kind: &str, message: impl Into<String>) {
        let message = message.into();
        tracing::info!(cluster = %self.cluster, node = %self.node, kind, "{message}");
        let mut inner = self.tasks.lock();
        inner
            .notes
            .entry(self.cluster.clone())
            .or_default()
            .push(Note {
                at: Utc::now(),
                node: self.node.clone(),
                kind: kind.to_string(),
                message,
            });
    }

    /// Cancelled, or the leadership term the task runs under ended (the
    /// step loop's safe point asks this before every step).
    pub fn cancelled(&self) -> bool {
        self.cancel.is_cancelled() || self.gate.as_ref().is_some_and(|g| g.check().is_err())
    }
}

impl Tasks {
    pub fn new(on_finished: impl Fn(&str) + Send + Sync + 'static) -> Tasks {
        Tasks {
            inner: Arc::default(),
            term: Arc::default(),
            tracker: TaskTracker::new(),
            on_finished: Arc::new(on_finished),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ties every task started from now on to a leadership term: none
    /// starts while `gate` is closed, each one's cancellation is a child
    /// of `cancel`, and each runs with `gate` in scope.
    pub fn fence(&self, gate: Gate, cancel: CancellationToken) {
        *self.term.write().unwrap_or_else(|e| e.into_inner()) = Term {
            gate: Some(gate),
            cancel: Some(cancel),
        };
    }

    /// Starts `task` for `node` unless one already runs for it. `work`
    /// receives the handle; when it ends, its outcome is recorded and the
    /// cluster is reconciled again.
    pub fn start<F, Fut>(&self, cluster: &str, node: &str, task: Task, work: F) -> bool
    where
        F: FnOnce(TaskHandle) -> Fut,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        let term = self.term.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(why) = term.gate.as_ref().and_then(|g| g.check().err()) {
            tracing::debug!(cluster, node, %why, "node task not started");
            return false;
        }
        let cancel = match &term.cancel {
            Some(parent) => parent.child_token(),
            None => CancellationToken::new(),
        };
        {
            let mut inner = self.lock();
            if inner.running.contains_key(node) {
                return false;
            }
            inner.running.insert(
                node.to_string(),
                Running {
                    cluster: cluster.to_string(),
                    task: task.clone(),
                    cancel: cancel.clone(),
                },
            );
        }
        let handle = TaskHandle {
            cluster: cluster.to_string(),
            node: node.to_string(),
            cancel,
            gate: term.gate.clone(),
            tasks: self.clone(),
        };
        let fut = gate::scope(term.gate.unwrap_or_else(Gate::open), work(handle));
        let this = self.clone();
        let (cluster, node) = (cluster.to_string(), node.to_string());
        self.tracker.spawn(async move {
            // A panic inside a task is a bug, but it must not wedge the node
            // as "running" forever: catch it and record a retry.
            let outcome = match tokio::spawn(fut).await {
                Ok(o) => o,
                Err(e) => Outcome::Retry(format!("task panicked: {e}")),
            };
            {
                let mut inner = this.lock();
                inner.running.remove(&node);
                inner
                    .finished
                    .entry(cluster.clone())
                    .or_default()
                    .push(Finished {
                        node,
                        task,
                        outcome,
                        at: Utc::now(),
                    });
            }
            (this.on_finished)(&cluster);
        });
        true
    }

    /// Asks the task of `node` to stop at its next safe point.
    pub fn cancel(&self, node: &str) {
        if let Some(r) = self.lock().running.get(node) {
            r.cancel.cancel();
        }
    }

    /// Tasks running for a cluster, by node.
    pub fn running(&self, cluster: &str) -> HashMap<String, Task> {
        self.lock()
            .running
            .iter()
            .filter(|(_, r)| r.cluster == cluster)
            .map(|(node, r)| (node.clone(), r.task.clone()))
            .collect()
    }

    pub fn running_total(&self) -> usize {
        self.lock().running.len()
    }

    /// Outcomes and notes since the last call, for one cluster.
    pub fn drain(&self, cluster: &str) -> (Vec<Finished>, Vec<Note>) {
        let mut inner = self.lock();
        (
            inner.finished.remove(cluster).unwrap_or_default(),
            inner.notes.remove(cluster).unwrap_or_default(),
        )
    }

    /// Cancels everything and waits for every task to reach a safe point.
    pub async fn shutdown(&self) {
        for r in self.lock().running.values() {
            r.cancel.cancel();
        }
        self.tracker.close();
        self.tracker.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn one_task_per_node_outcome_recorded_and_cluster_triggered() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let tasks = Tasks::new(move |cluster| {
            let _ = tx.send(cluster.to_string());
        });
        let (release, wait) = tokio::sync::oneshot::channel::<()>();
        assert!(tasks.start("web", "i-1", Task::Advance, |h| async move {
            h.note("provision", "provisioned");
            let _ = wait.await;
            Outcome::Done
        }));
        assert!(
            !tasks.start("web", "i-1", Task::Advance, |_| async { Outcome::Done }),
            "second task refused"
        );
        assert_eq!(tasks.running("web").len(), 1);
        assert!(tasks.running("api").is_empty());
        release.send(()).unwrap();
        let trig = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(trig, "web");
        let (finished, notes) = tasks.drain("web");
        assert_eq!(finished.len(), 1);
        assert_eq!(finished[0].outcome, Outcome::Done);
        assert_eq!(notes[0].message, "provisioned");
        assert!(tasks.running("web").is_empty());
        assert!(tasks.drain("web").0.is_empty(), "drained once");
    }

    #[tokio::test]
    async fn cancel_reaches_the_task_and_shutdown_waits_for_it() {
        let tasks = Tasks::new(|_| {});
        tasks.start("web", "i-1", Task::Advance, |h| async move {
            h.cancel.cancelled().await;
            // A safe point: finish the current step, then stop.
            tokio::time::sleep(Duration::from_millis(20)).await;
            Outcome::Cancelled
        });
        tasks.cancel("i-1");
        tasks.shutdown().await;
        let (finished, _) = tasks.drain("web");
        assert_eq!(finished[0].outcome, Outcome::Cancelled);
    }

    #[tokio::test]
    async fn a_closed_term_starts_nothing_and_stops_its_tasks_at_their_next_safe_point() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let open = Arc::new(AtomicBool::new(true));
        let term = CancellationToken::new();
        let tasks = Tasks::new(|_| {});
        let gate = {
            let open = open.clone();
            Gate::new(move || {
                if open.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err("lease lost".into())
                }
            })
        };
        tasks.fence(gate, term.clone());
        let (stepped, mut steps) = tokio::sync::mpsc::unbounded_channel();
        assert!(
            tasks.start("web", "i-1", Task::Advance, move |h| async move {
                loop {
                    // The step loop's safe point, and what SSH asks before a command.
                    if h.cancelled() {
                        return Outcome::Cancelled;
                    }
                    if gate::check().is_err() {
                        return Outcome::Retry("gate closed inside a step".into());
                    }
                    let _ = stepped.send(());
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        );
        steps.recv().await.expect("the task steps");
        // The term's deadline passes: the gate closes before anyone cancels.
        open.store(false, Ordering::SeqCst);
        assert!(
            !tasks.start("web", "i-2", Task::Advance, |_| async { Outcome::Done }),
            "nothing new starts"
        );
        tasks.shutdown().await;
        let (finished, _) = tasks.drain("web");
        assert_eq!(finished.len(), 1);
        assert_eq!(finished[0].outcome, Outcome::Cancelled);
        // A term cancelled as a whole cancels its tasks' tokens.
        let (done, mut finished) = tokio::sync::mpsc::unbounded_channel::<String>();
        let tasks = Tasks::new(move |c| {
            let _ = done.send(c.to_string());
        });
        tasks.fence(Gate::open(), term.clone());
        tasks.start("web", "i-3", Task::Advance, |h| async move {
            h.cancel.cancelled().await;
            Outcome::Cancelled
        });
        term.cancel();
        tokio::time::timeout(Duration::from_secs(5), finished.recv())
            .await
            .expect("the term's cancellation reaches the task")
            .expect("finished");
        assert_eq!(tasks.drain("web").0[0].outcome, Outcome::Cancelled);
    }

    #[tokio::test]
    async fn a_panicking_task_frees_its_node() {
        let tasks = Tasks::new(|_| {});
        tasks.start("web", "i-1", Task::Advance, |_| async { panic!("bug") });
        tasks.shutdown().await;
        let (finished, _) = tasks.drain("web");
        assert!(matches!(&finished[0].outcome, Outcome::Retry(m) if m.contains("panicked")));
        assert!(tasks.running("web").is_empty());
    }
}
