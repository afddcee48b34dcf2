//! The elector: the loop that keeps the lease — reads the record, creates
//! or takes it over, renews it — on the rhythm the lease machine asks for,
//! against a [`LeaseStore`].
//!
//! Every store call is bounded by half the renew deadline, so a hung
//! connection never holds a renewal past it. Whatever the elector is doing,
//! the deadline itself is enforced by [`Leadership`] on every question, so
//! a starved or paused elector can delay a takeover, never make two leaders.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use hangar_cloud::lease::{LeaseRecord, LeaseStore, LeaseWriteError};
use tokio_util::sync::CancellationToken;

use super::leadership::Leadership;
use crate::core::lease::{Plan, Record, WriteKind, Written};

/// A fresh record version: a random (v4) UUID.
pub fn new_version() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn to_core(r: LeaseRecord) -> Record {
    Record {
        holder: r.holder,
        version: r.version,
        fence: r.fence,
        lease: r.lease,
        released: r.released,
    }
}

fn to_store(r: &Record, kind: WriteKind, previous: Option<&LeaseRecord>) -> LeaseRecord {
    let now = Utc::now();
    let acquired_at = match kind {
        WriteKind::Renew => previous.and_then(|p| p.acquired_at).or(Some(now)),
        WriteKind::Create | WriteKind::TakeOver => Some(now),
        WriteKind::Release => None,
    };
    LeaseRecord {
        holder: r.holder.clone(),
        version: r.version.clone(),
        fence: r.fence,
        lease: r.lease,
        released: r.released,
        acquired_at,
        renewed_at: Some(now),
    }
}

/// Runs until `stop` fires. Does not release the lease: the run loop does
/// that once the operator has stopped ([`release`]).
pub async fn run(leadership: Leadership, store: Arc<dyn LeaseStore>, stop: CancellationToken) {
    if !leadership.is_distributed() {
        return;
    }
    let mut last_read: Option<LeaseRecord> = None;
    loop {
        if stop.is_cancelled() {
            return;
        }
        let Some(plan) = leadership.with(|m, now| m.plan(now, new_version)) else {
            return;
        };
        step(&leadership, store.as_ref(), plan, &mut last_read).await;
        let Some(wake) = leadership.with(|m, now| m.next_wake(now)) else {
            return;
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(leadership.instant(wake)) => {}
        }
    }
}

/// How long one store call may take.
fn call_timeout(leadership: &Leadership) -> Duration {
    leadership
        .with(|m, _| m.timing().renew_deadline / 2)
        .unwrap_or(Duration::from_secs(5))
}

async fn step(
    leadership: &Leadership,
    store: &dyn LeaseStore,
    plan: Plan,
    last_read: &mut Option<LeaseRecord>,
) {
    let limit = call_timeout(leadership);
    // A term that ends while a read is out makes its answer stale.
    let ends = leadership.with(|m, _| m.ends()).unwrap_or_default();
    match plan {
        Plan::Read => match tokio::time::timeout(limit, store.read()).await {
            Ok(Ok(record)) => {
                *last_read = record.clone();
                leadership.with(|m, now| m.read_sent(record.map(to_core), ends, now));
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, lease = %store.describe(), "cannot read the lease")
            }
            Err(_) => tracing::warn!(lease = %store.describe(), "reading the lease timed out"),
        },
        Plan::Write {
            kind,
            record,
            expected,
        } => {
            let stored = to_store(&record, kind, last_read.as_ref());
            let outcome = match tokio::time::timeout(
                limit,
                store.write(&stored, expected.as_deref()),
            )
            .await
            {
                Ok(Ok(())) => {
                    *last_read = Some(stored);
                    Written::Ok
                }
                Ok(Err(LeaseWriteError::Conflict)) => {
                    tracing::info!(?kind, "the lease record changed first");
                    Written::Conflict
                }
                Ok(Err(LeaseWriteError::Cloud(e))) => {
                    tracing::warn!(?kind, error = %e, lease = %store.describe(), "lease write failed");
                    Written::Failed
                }
                Err(_) => {
                    tracing::warn!(?kind, lease = %store.describe(), "lease write timed out");
                    Written::Failed
                }
            };
            leadership.with(|m, now| m.written(outcome, now));
        }
    }
}

/// Gives the lease up after a graceful stop, so a standby takes over at
/// once instead of after a lease duration. The term ends before the write.
pub async fn release(leadership: &Leadership, store: &dyn LeaseStore) {
    let Some(Some(plan)) = leadership.with(|m, now| m.release(now, new_version())) else {
        return;
    };
    let mut last = None;
    step(leadership, store, plan, &mut last).await;
    tracing::info!(lease = %store.describe(), "lease released");
}

#[cfg(test)]
mod tests {
    use hangar_cloud::lease::memory::MemoryTable;

    use super::*;
    use crate::core::lease::Timing;
    use crate::runtime::lease::leadership::RoleName;

    fn timing() -> Timing {
        Timing::default()
    }

    async fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
        let started = tokio::time::Instant::now();
        while !f() {
            assert!(started.elapsed() < limit, "{what} within {limit:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        started.elapsed()
    }

    #[test]
    fn versions_are_v4_uuids_and_differ() {
        let (a, b) = (new_version(), new_version());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }

    #[tokio::test(start_paused = true)]
    async fn one_leads_the_other_takes_over_within_the_lease_when_it_dies() {
        let table = MemoryTable::default();
        let a = Leadership::distributed("a", timing(), "memory");
        let b = Leadership::distributed("b", timing(), "memory");
        let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
        tokio::spawn(run(a.clone(), Arc::new(table.clone()), stop_a.clone()));
        until("a leads", Duration::from_secs(1), || a.term().is_some()).await;
        tokio::spawn(run(b.clone(), Arc::new(table.clone()), stop_b.clone()));
        // b stays a standby while a renews.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(b.term().is_none());
        assert_eq!(b.view().leader.as_deref(), Some("a"));
        assert!(table.writes() >= 25, "a renewed every 2 s");
        // a dies (its elector stops, nothing is released).
        stop_a.cancel();
        let took = until("b takes over", Duration::from_secs(25), || {
            b.term().is_some()
        })
        .await;
        assert!(took <= Duration::from_secs(15 + 2), "took {took:?}");
        assert_eq!(b.term().and_then(|t| t.fence), Some(2));
        assert!(a.may_act().is_err(), "a's term lapsed long before");
        stop_b.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_cut_off_from_the_store_stops_within_the_renew_deadline() {
        let table = MemoryTable::default();
        let a = Leadership::distributed("a", timing(), "memory");
        let stop = CancellationToken::new();
        tokio::spawn(run(a.clone(), Arc::new(table.clone()), stop.clone()));
        until("a leads", Duration::from_secs(1), || a.term().is_some()).await;
        tokio::time::sleep(Duration::from_secs(7)).await;
        let term = a.term().expect("still leads");
        table.set_down(true);
        let cut = tokio::time::Instant::now();
        term.cancel.cancelled().await;
        let took = cut.elapsed();
        assert!(took <= timing().renew_deadline, "stopped after {took:?}");
        assert!(a.may_act().is_err());
        assert_eq!(a.view().role, RoleName::Standby);
        // Back online: the record still names a, at the version it wrote
        // last: it leads again at once, in a new term with a new fence.
        table.set_down(false);
        until("a leads again", Duration::from_secs(5), || {
            a.term().is_some()
        })
        .await;
        assert_eq!(a.term().and_then(|t| t.fence), Some(2));
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_released_lease_passes_at_once() {
        let table = MemoryTable::default();
        let a = Leadership::distributed("a", timing(), "memory");
        let b = Leadership::distributed("b", timing(), "memory");
        let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
        tokio::spawn(run(a.clone(), Arc::new(table.clone()), stop_a.clone()));
        until("a leads", Duration::from_secs(1), || a.term().is_some()).await;
        tokio::spawn(run(b.clone(), Arc::new(table.clone()), stop_b.clone()));
        tokio::time::sleep(Duration::from_secs(5)).await;
        stop_a.cancel();
        release(&a, &table).await;
        assert!(a.may_act().is_err());
        let took = until("b takes over", Duration::from_secs(5), || {
            b.term().is_some()
        })
        .await;
        assert!(took <= timing().retry, "took {took:?}");
        stop_b.cancel();
    }
}
