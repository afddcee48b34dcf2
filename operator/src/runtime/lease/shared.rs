//! The cluster statuses (and the [`Memory`](crate::core::Memory) inside
//! them) in the lease's table, so that whoever leads next continues the
//! decisions — scale-down windows, rollout state, backoffs, launch intents
//! and their tokens — instead of starting them over.
//!
//! Writes happen where the status is persisted today (`Operator::persist`),
//! synchronously: a launch intent must be stored before `RunInstances` is
//! called. The store call is async, so it runs in `block_in_place` (the
//! operator runs on tokio's multi-threaded runtime); it is bounded, and
//! fenced twice: by this process's own view of its term, then by the
//! table's condition that the writer still holds the lease.

use std::sync::Arc;
use std::time::Duration;

use hangar_cloud::lease::{StateStore, StateWriteError, Writer};

use super::leadership::Leadership;
use crate::runtime::status::{ClusterStatus, SharedStatuses};

pub struct SharedMemory {
    store: Arc<dyn StateStore>,
    leadership: Leadership,
    timeout: Duration,
}

impl SharedMemory {
    pub fn new(store: Arc<dyn StateStore>, leadership: Leadership, timeout: Duration) -> Self {
        SharedMemory {
            store,
            leadership,
            timeout,
        }
    }

    /// Every cluster's status as last stored by a leader. A document that
    /// does not parse is skipped and reported: it costs memory of
    /// decisions, never nodes.
    pub async fn load(&self) -> Result<Vec<ClusterStatus>, String> {
        let docs = tokio::time::timeout(self.timeout, self.store.load())
            .await
            .map_err(|_| "loading the shared statuses timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for (cluster, doc) in docs {
            match serde_json::from_str::<ClusterStatus>(&doc) {
                Ok(s) => out.push(s),
                Err(e) => {
                    tracing::warn!(%cluster, error = %e, "ignoring an unreadable shared status")
                }
            }
        }
        Ok(out)
    }

    fn writer(&self) -> Result<Writer, String> {
        match self.leadership.may_act() {
            Ok(Some(fence)) => Ok(Writer {
                holder: self.leadership.holder(),
                fence,
            }),
            Ok(None) => Err("the single-host lease has no shared store".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Runs a store call to completion from synchronous code.
    fn block<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, StateWriteError>>,
    ) -> Result<T, String> {
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| "no tokio runtime to reach the shared store from".to_string())?;
        if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
            return Err("the shared store needs tokio's multi-threaded runtime".into());
        }
        let limit = self.timeout;
        let out = tokio::task::block_in_place(|| {
            handle.block_on(async move { tokio::time::timeout(limit, fut).await })
        });
        match out {
            Err(_) => Err(format!("no answer within {limit:?}")),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if matches!(e, StateWriteError::Fenced(_)) {
                    // The table says someone else holds the lease: stop now,
                    // the elector's next read tells who.
                    self.leadership.with(|m, _| m.suspect());
                }
                Err(e.to_string())
            }
        }
    }
}

/// What is shared of a status: everything but the node list, which the
/// next pass rebuilds from the cloud (and which would make a large
/// cluster's item outgrow the table's item size).
fn shareable(status: &ClusterStatus) -> ClusterStatus {
    let mut s = status.clone();
    s.nodes.clear();
    s
}

impl SharedStatuses for SharedMemory {
    fn save(&self, status: &ClusterStatus) -> Result<(), String> {
        let by = self.writer()?;
        let doc = serde_json::to_string(&shareable(status)).map_err(|e| e.to_string())?;
        let store = self.store.clone();
        let name = status.name.clone();
        self.block(async move { store.save(&name, &doc, &by).await })
    }

    fn remove(&self, name: &str) -> Result<(), String> {
        let by = self.writer()?;
        let store = self.store.clone();
        let name = name.to_string();
        self.block(async move { store.remove(&name, &by).await })
    }
}

#[cfg(test)]
mod tests {
    use hangar_cloud::lease::memory::MemoryTable;
    use hangar_cloud::lease::LeaseStore;

    use super::*;
    use crate::core::lease::Timing;
    use crate::runtime::lease::elector;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_the_leader_writes_and_a_successor_reads_what_it_wrote() {
        let table = MemoryTable::default();
        let a = Leadership::distributed("a", Timing::default(), "memory");
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(elector::run(
            a.clone(),
            Arc::new(table.clone()),
            stop.clone(),
        ));
        while a.term().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let shared = SharedMemory::new(Arc::new(table.clone()), a.clone(), Duration::from_secs(5));
        let mut s = ClusterStatus::new("web");
        s.memory.desired = 4;
        s.nodes.push(Default::default());
        shared.save(&s).expect("the leader writes");
        let loaded = shared.load().await.unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].memory.desired, 4);
        assert!(loaded[0].nodes.is_empty(), "nodes come from the cloud");

        // Someone else takes the record (a was paused, say): the table
        // refuses a's write, and a stops acting at once.
        stop.cancel();
        let mut r = table.read().await.unwrap().unwrap();
        r.holder = "b".into();
        r.version = "vb".into();
        r.fence += 1;
        table
            .write(&r, Some(&table.record().unwrap().version))
            .await
            .unwrap();
        let err = shared.save(&s).unwrap_err();
        assert!(err.contains("fenced"), "{err}");
        assert!(a.may_act().is_err());
        let err = shared.save(&s).unwrap_err();
        assert!(
            err.contains("not the leader"),
            "refused before any call: {err}"
        );
    }
}
