//! This process's leadership, shared by everything that acts: the cloud
//! layer's guard ([`hangar_cloud::Fence`]), the node task registry's gate,
//! the fenced memory writes, the HTTP status and the run loop.
//!
//! It wraps the pure [`core::lease::Lease`](crate::core::lease::Lease)
//! with the process's monotonic clock and turns its role changes into
//! *terms*: each term has a cancellation token that is cancelled the moment
//! the term is seen to end — by the elector, or by whichever caller asks
//! first (a task waking from a pause finds out at its first question).

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use hangar_cloud::lease::{Fence, NotLeader};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::core::lease::{Lease, Mono, Role, Timing};
use crate::effects::gate::Gate;

/// What this process is to the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RoleName {
    Leader,
    Standby,
}

/// Who leads, as served on `/api/v1/leader` and shown by `hangar status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaderView {
    /// `flock` (one host) or `dynamodb:TABLE`.
    pub lease: String,
    /// This process's identity in the lease.
    pub holder: String,
    pub role: RoleName,
    /// The holder of the lease as this process last saw it.
    pub leader: Option<String>,
    /// The fence (`hangar:epoch`) of the leader's term.
    pub fence: Option<u64>,
    /// Terms this process has led.
    pub terms: u64,
    /// When this process last changed role (wall clock, for people).
    pub since: DateTime<Utc>,
    /// Why this process's last term ended, if one did.
    pub ended: Option<String>,
}

/// One term of leadership, as handed to the work done under it.
#[derive(Clone, Debug)]
pub struct Term {
    /// `None` with the single-host lease (nothing fenced).
    pub fence: Option<u64>,
    /// Cancelled the moment the term is seen to end.
    pub cancel: CancellationToken,
}

enum Mode {
    /// `flock`: leader for the whole life of the process.
    Single,
    /// Boxed: the machine is large beside the unit variant.
    Distributed(Box<Mutex<Lease>>),
}

struct Inner {
    origin: Instant,
    mode: Mode,
    term: Mutex<Option<Term>>,
    view: watch::Sender<LeaderView>,
}

/// Cheap to clone.
#[derive(Clone)]
pub struct Leadership {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("view", &*self.inner.view.borrow())
            .finish()
    }
}

impl Leadership {
    /// The single-host lease: this process leads from the start (it holds
    /// the `flock`) and nothing it writes is fenced.
    pub fn single(holder: &str) -> Leadership {
        let term = Term {
            fence: None,
            cancel: CancellationToken::new(),
        };
        let view = LeaderView {
            lease: "flock".into(),
            holder: holder.to_string(),
            role: RoleName::Leader,
            leader: Some(holder.to_string()),
            fence: None,
            terms: 1,
            since: Utc::now(),
            ended: None,
        };
        Leadership {
            inner: Arc::new(Inner {
                origin: Instant::now(),
                mode: Mode::Single,
                term: Mutex::new(Some(term)),
                view: watch::channel(view).0,
            }),
        }
    }

    /// A distributed lease held as `holder`, kept in `lease` (for status:
    /// `dynamodb:TABLE`). A standby until the elector wins it.
    pub fn distributed(holder: &str, timing: Timing, lease: &str) -> Leadership {
        let view = LeaderView {
            lease: lease.to_string(),
            holder: holder.to_string(),
            role: RoleName::Standby,
            leader: None,
            fence: None,
            terms: 0,
            since: Utc::now(),
            ended: None,
        };
        Leadership {
            inner: Arc::new(Inner {
                origin: Instant::now(),
                mode: Mode::Distributed(Box::new(Mutex::new(Lease::new(holder, timing)))),
                term: Mutex::new(None),
                view: watch::channel(view).0,
            }),
        }
    }

    /// Now, on this process's monotonic clock.
    pub fn now(&self) -> Mono {
        self.inner.origin.elapsed()
    }

    /// The instant a reading of [`now`](Self::now) stands for.
    pub fn instant(&self, at: Mono) -> Instant {
        self.inner.origin + at
    }

    pub fn is_distributed(&self) -> bool {
        matches!(self.inner.mode, Mode::Distributed(_))
    }

    /// Runs `f` on the lease machine at `now`, then turns any change of
    /// role into a change of term. `None` with the single-host lease.
    pub fn with<R>(&self, f: impl FnOnce(&mut Lease, Mono) -> R) -> Option<R> {
        let Mode::Distributed(machine) = &self.inner.mode else {
            return None;
        };
        let mut m = machine.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.now();
        let out = f(&mut m, now);
        let role = m.role(now);
        let ended = m.ended().map(str::to_string);
        self.sync(role, ended);
        Some(out)
    }

    /// Called with the machine locked: keeps the term and the view in step
    /// with the role.
    fn sync(&self, role: Role, ended: Option<String>) {
        let mut term = self.inner.term.lock().unwrap_or_else(|e| e.into_inner());
        let (role_name, leader, fence) = match &role {
            Role::Leader { fence } => (RoleName::Leader, Some(self.holder()), Some(*fence)),
            Role::Standby { leader, fence } => (RoleName::Standby, leader.clone(), *fence),
        };
        let mut new_term = false;
        match (&role, term.as_ref()) {
            (Role::Leader { fence }, Some(t)) if t.fence == Some(*fence) => {}
            (Role::Leader { fence }, current) => {
                if let Some(old) = current {
                    old.cancel.cancel();
                }
                *term = Some(Term {
                    fence: Some(*fence),
                    cancel: CancellationToken::new(),
                });
                new_term = true;
                tracing::info!(fence, "leading: this operator holds the lease");
            }
            (Role::Standby { .. }, Some(t)) => {
                t.cancel.cancel();
                *term = None;
                tracing::warn!(
                    reason = ended.as_deref().unwrap_or(""),
                    "stopped leading: no mutating call from now on"
                );
            }
            (Role::Standby { .. }, None) => {}
        }
        self.inner.view.send_if_modified(|v| {
            let role_changed = v.role != role_name || new_term;
            let changed =
                role_changed || v.leader != leader || v.fence != fence || v.ended != ended;
            if role_changed {
                v.since = Utc::now();
            }
            if new_term {
                v.terms += 1;
            }
            v.role = role_name;
            v.leader = leader;
            v.fence = fence;
            v.ended = ended;
            changed
        });
    }

    /// This process's identity in the lease.
    pub fn holder(&self) -> String {
        self.inner.view.borrow().holder.clone()
    }

    pub fn view(&self) -> LeaderView {
        // Bring the view up to date with the clock first (a lapsed term).
        self.with(|m, now| m.expire(now));
        self.inner.view.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<LeaderView> {
        self.inner.view.subscribe()
    }

    /// The fence to act under now (`None`: unfenced single host), or why not.
    pub fn may_act(&self) -> Result<Option<u64>, NotLeader> {
        match self.with(|m, now| m.may_act(now)) {
            None => Ok(None),
            Some(Ok(fence)) => Ok(Some(fence)),
            Some(Err(why)) => Err(NotLeader(why)),
        }
    }

    /// The current term, if this process leads.
    pub fn term(&self) -> Option<Term> {
        self.with(|m, now| m.expire(now));
        self.inner
            .term
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until this process leads; `None` if `stop` fires first.
    pub async fn wait_term(&self, stop: &CancellationToken) -> Option<Term> {
        let mut view = self.subscribe();
        loop {
            if let Some(t) = self.term() {
                return Some(t);
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                changed = view.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
            }
        }
    }

    /// Open while `term` is the term in force and this process may act.
    pub fn gate(&self, term: &Term) -> Gate {
        let me = self.clone();
        let fence = term.fence;
        Gate::new(move || match me.may_act() {
            Ok(f) if f == fence => Ok(()),
            Ok(_) => Err("a later term of this operator is in force".into()),
            Err(e) => Err(e.0),
        })
    }
}

impl Fence for Leadership {
    fn authorize(&self) -> Result<Option<u64>, NotLeader> {
        self.may_act()
    }

    fn observed_epoch(&self, epoch: u64) {
        self.with(|m, _| m.saw_epoch(epoch));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::core::lease::{Plan, Written};

    #[tokio::test(start_paused = true)]
    async fn a_term_ends_at_its_deadline_even_if_only_a_caller_notices() {
        let l = Leadership::distributed("a", Timing::default(), "memory");
        assert!(l.may_act().is_err());
        // Read: no record; create it.
        l.with(|m, now| {
            assert_eq!(m.plan(now, || "v1".into()), Plan::Read);
            m.read(None, now);
            assert!(matches!(m.plan(now, || "v1".into()), Plan::Write { .. }));
            m.written(Written::Ok, now);
        });
        let term = l.term().expect("leads");
        assert_eq!(term.fence, Some(1));
        assert_eq!(l.view().role, RoleName::Leader);
        let gate = l.gate(&term);
        assert!(gate.check().is_ok());
        // Nothing renews; 10 s later the first question ends the term.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!term.cancel.is_cancelled(), "nobody asked yet");
        assert!(l.authorize().is_err());
        assert!(term.cancel.is_cancelled(), "the asker ended the term");
        assert!(gate.check().is_err());
        let v = l.view();
        assert_eq!(v.role, RoleName::Standby);
        assert!(v.ended.is_some_and(|e| e.contains("renew deadline")));
    }

    #[test]
    fn a_newer_epoch_ends_the_term_at_once() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = Leadership::distributed("a", Timing::default(), "memory");
            l.with(|m, now| {
                m.plan(now, || "v1".into());
                m.read(None, now);
                m.plan(now, || "v1".into());
                m.written(Written::Ok, now);
            });
            let term = l.term().expect("leads");
            l.observed_epoch(1);
            assert!(l.authorize().is_ok());
            l.observed_epoch(2);
            assert!(term.cancel.is_cancelled());
            assert!(l.authorize().is_err());
        });
    }

    #[test]
    fn the_single_host_lease_always_leads_unfenced() {
        let l = Leadership::single("a");
        assert_eq!(l.authorize(), Ok(None));
        l.observed_epoch(99);
        assert_eq!(l.authorize(), Ok(None));
        assert_eq!(l.view().lease, "flock");
        assert!(l.term().is_some());
    }
}
