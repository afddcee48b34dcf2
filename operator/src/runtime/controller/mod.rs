//! The controller runtime, after kube-runtime: triggers → [`scheduler`] →
//! [`runner`] → your [`Reconciler`].
//!
//! - Triggers name a cluster and when it should be looked at (spec changed,
//!   resync tick, metric evaluation due, a node task finished).
//! - The scheduler keeps one deadline per cluster; the earliest wins and
//!   bursts are debounced into one reconcile.
//! - The runner reconciles with bounded concurrency, never the same cluster
//!   twice at once, requeues as the reconciler asks, and backs a failing
//!   cluster off exponentially with jitter (reset on success) — per cluster,
//!   so one broken cluster never slows the others.

pub mod backoff;
pub mod runner;
pub mod scheduler;

use std::time::Duration;

use async_trait::async_trait;

pub use backoff::Backoff;
pub use runner::{run, Trigger, TriggerSender};

/// Clusters are keyed by name.
pub type Key = String;

/// What the reconciler wants next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Action {
    requeue_after: Option<Duration>,
}

impl Action {
    /// Look again after `d` (level-triggered: even if nothing changes).
    pub fn requeue(d: Duration) -> Action {
        Action {
            requeue_after: Some(d),
        }
    }

    /// Only look again when a trigger arrives.
    pub fn await_change() -> Action {
        Action {
            requeue_after: None,
        }
    }

    pub fn requeue_after(&self) -> Option<Duration> {
        self.requeue_after
    }
}

#[async_trait]
pub trait Reconciler: Send + Sync + 'static {
    type Error: std::fmt::Display + Send + 'static;

    async fn reconcile(&self, key: &Key) -> Result<Action, Self::Error>;

    /// Called after every reconcile with its outcome and duration, for
    /// metrics and logs. The default does nothing.
    fn observe(&self, _key: &Key, _outcome: Result<&Action, &Self::Error>, _took: Duration) {}
}
