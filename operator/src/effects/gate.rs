//! Which leadership term node work runs under.
//!
//! A node task is started by a leader and may outlive its term: a process
//! paused past its renew deadline (SIGSTOP, a VM stall) wakes up with tasks
//! in the middle of a step. The runtime hands every task a [`Gate`] —
//! task-local, so every await inside the task sees it — and the SSH layer
//! asks it before each command, the task before each step: work of a term
//! that ended stops before its next change to a node, whatever the runtime
//! has noticed yet. (Cloud calls have their own guard in the cloud layer.)

use std::future::Future;
use std::sync::Arc;

type Check = dyn Fn() -> Result<(), String> + Send + Sync;

/// Says whether work may go on; `Err` carries why not.
#[derive(Clone)]
pub struct Gate(Arc<Check>);

impl Gate {
    pub fn new(check: impl Fn() -> Result<(), String> + Send + Sync + 'static) -> Gate {
        Gate(Arc::new(check))
    }

    /// Always open (a single operator).
    pub fn open() -> Gate {
        Gate::new(|| Ok(()))
    }

    pub fn check(&self) -> Result<(), String> {
        (self.0)()
    }
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gate")
    }
}

tokio::task_local! {
    static CURRENT: Gate;
}

/// Runs `fut` with `gate` as its task's gate.
pub fn scope<F: Future>(gate: Gate, fut: F) -> impl Future<Output = F::Output> {
    CURRENT.scope(gate, fut)
}

/// Whether the current task's gate is open (no gate set: always).
pub fn check() -> Result<(), String> {
    CURRENT.try_with(Gate::check).unwrap_or(Ok(()))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[tokio::test]
    async fn the_gate_is_seen_inside_its_scope_only() {
        let open = Arc::new(AtomicBool::new(true));
        let gate = {
            let open = open.clone();
            Gate::new(move || {
                if open.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err("term ended".into())
                }
            })
        };
        assert_eq!(check(), Ok(()), "no gate outside a scope");
        let seen = scope(gate, async {
            let before = check();
            open.store(false, Ordering::SeqCst);
            tokio::task::yield_now().await;
            (before, check())
        })
        .await;
        assert_eq!(seen, (Ok(()), Err("term ended".to_string())));
        assert_eq!(check(), Ok(()));
    }
}
