//! Leadership between operators of one owner id, as the cloud layer needs
//! it: a guard consulted before every mutating call ([`Fence`]), the lease
//! record and where it is kept ([`LeaseStore`]), and the operator's memory
//! of decisions kept beside it, fenced by the lease ([`StateStore`]).
//!
//! The stores are traits so the operator's lease logic can be tested
//! against [`memory::MemoryTable`]; [`crate::aws::DynamoTable`] keeps both
//! in one DynamoDB table.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::error::CloudError;

/// Why this process may not make a mutating call now.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not the leader: {0}")]
pub struct NotLeader(pub String);

/// Asked by the cloud layer right before each mutating call goes out (and
/// before every retry of it), and told of every fence epoch it reads on an
/// instance. Implemented by the operator's leadership.
pub trait Fence: Send + Sync + fmt::Debug {
    /// `Ok(Some(epoch))`: this process leads with fence `epoch`, to be
    /// stamped on what it writes; `Ok(None)`: it may act and nothing is
    /// fenced (a single operator under a host-local lock).
    fn authorize(&self) -> Result<Option<u64>, NotLeader>;

    /// An instance carries `hangar:epoch=epoch`: a higher one than ours
    /// means a newer leader has acted, and this process must stop at once.
    fn observed_epoch(&self, epoch: u64);
}

/// The fence of a single operator: always allowed, nothing stamped.
#[derive(Clone, Copy, Debug, Default)]
pub struct Unfenced;

impl Fence for Unfenced {
    fn authorize(&self) -> Result<Option<u64>, NotLeader> {
        Ok(None)
    }

    fn observed_epoch(&self, _epoch: u64) {}
}

/// The lease item of one owner id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRecord {
    /// Who holds it (one process: host, pid and a random suffix); empty
    /// when released.
    pub holder: String,
    /// A fresh UUID on every write: a standby that sees the same version
    /// for a whole lease duration knows the holder stopped renewing.
    pub version: String,
    /// Incremented on every change of holder; stamped on instances as
    /// `hangar:epoch`.
    pub fence: u64,
    /// How long others must see `version` unchanged before taking over.
    pub lease: Duration,
    /// Given up on purpose (graceful stop): anyone may take it at once.
    pub released: bool,
    /// Wall-clock times, for people only: never compared across hosts.
    pub acquired_at: Option<DateTime<Utc>>,
    pub renewed_at: Option<DateTime<Utc>>,
}

/// Why a conditional lease write did not happen.
#[derive(Clone, Debug, thiserror::Error)]
pub enum LeaseWriteError {
    /// The stored record is not the one the write was conditioned on.
    #[error("the lease record changed (conditional write refused)")]
    Conflict,
    /// The call failed; whether it was applied is unknown.
    #[error(transparent)]
    Cloud(#[from] CloudError),
}

/// Where the lease of one owner id is kept.
#[async_trait]
pub trait LeaseStore: Send + Sync {
    /// A strongly consistent read; `None` when there is no record.
    async fn read(&self) -> Result<Option<LeaseRecord>, CloudError>;

    /// Writes `record` if the stored one still has version `expected`
    /// (`None`: if there is none).
    async fn write(
        &self,
        record: &LeaseRecord,
        expected: Option<&str>,
    ) -> Result<(), LeaseWriteError>;

    /// Where it lives, for status (`dynamodb:TABLE`).
    fn describe(&self) -> String;
}

/// Who writes a cluster's state: only the lease holder with this fence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Writer {
    pub holder: String,
    pub fence: u64,
}

/// Why a fenced state write did not happen.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StateWriteError {
    /// The writer does not hold the lease (any more): nothing was written.
    #[error("fenced out: {0} does not hold the lease with that fence")]
    Fenced(String),
    /// The document is larger than the store takes.
    #[error("state of cluster {cluster} is {bytes} bytes; the store takes at most {max}")]
    TooLarge {
        cluster: String,
        bytes: usize,
        max: usize,
    },
    #[error(transparent)]
    Cloud(#[from] CloudError),
}

/// The operator's memory per cluster (a JSON document opaque here), kept
/// where a standby that takes over can read it. Writes are conditioned on
/// the lease: a deposed leader can never overwrite its successor's memory.
#[async_trait]
pub trait StateStore: Send + Sync {
    /// Every cluster's document: `(cluster, document)`, sorted by cluster.
    async fn load(&self) -> Result<Vec<(String, String)>, CloudError>;

    async fn save(&self, cluster: &str, document: &str, by: &Writer)
        -> Result<(), StateWriteError>;

    async fn remove(&self, cluster: &str, by: &Writer) -> Result<(), StateWriteError>;
}

pub mod memory {
    //! [`LeaseStore`] and [`StateStore`] in this process's memory, with the
    //! same conditions as DynamoDB's, for tests of the lease logic.

    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Default)]
    struct Table {
        lease: Option<LeaseRecord>,
        state: BTreeMap<String, String>,
        /// While set, every call fails like a lost connection.
        down: bool,
        writes: u64,
    }

    /// Cheap to clone; clones share the table.
    #[derive(Clone, Default)]
    pub struct MemoryTable {
        inner: Arc<Mutex<Table>>,
    }

    impl MemoryTable {
        fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
            self.inner.lock().unwrap_or_else(|e| e.into_inner())
        }

        /// Makes every call fail (`true`) or work again.
        pub fn set_down(&self, down: bool) {
            self.lock().down = down;
        }

        /// The lease record as stored.
        pub fn record(&self) -> Option<LeaseRecord> {
            self.lock().lease.clone()
        }

        /// Lease writes that were applied.
        pub fn writes(&self) -> u64 {
            self.lock().writes
        }

        fn check(&self) -> Result<std::sync::MutexGuard<'_, Table>, CloudError> {
            let t = self.lock();
            if t.down {
                return Err(CloudError::Transport {
                    service: "dynamodb",
                    message: "connection reset (memory table is down)".into(),
                });
            }
            Ok(t)
        }

        fn fenced(t: &Table, by: &Writer) -> Result<(), StateWriteError> {
            match &t.lease {
                Some(r) if r.holder == by.holder && r.fence == by.fence && !r.released => Ok(()),
                _ => Err(StateWriteError::Fenced(by.holder.clone())),
            }
        }
    }

    #[async_trait]
    impl LeaseStore for MemoryTable {
        async fn read(&self) -> Result<Option<LeaseRecord>, CloudError> {
            Ok(self.check()?.lease.clone())
        }

        async fn write(
            &self,
            record: &LeaseRecord,
            expected: Option<&str>,
        ) -> Result<(), LeaseWriteError> {
            let mut t = self.check()?;
            let current = t.lease.as_ref().map(|r| r.version.as_str());
            if current != expected {
                return Err(LeaseWriteError::Conflict);
            }
            t.lease = Some(record.clone());
            t.writes += 1;
            Ok(())
        }

        fn describe(&self) -> String {
            "memory".into()
        }
    }

    #[async_trait]
    impl StateStore for MemoryTable {
        async fn load(&self) -> Result<Vec<(String, String)>, CloudError> {
            Ok(self
                .check()?
                .state
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect())
        }

        async fn save(
            &self,
            cluster: &str,
            document: &str,
            by: &Writer,
        ) -> Result<(), StateWriteError> {
            let mut t = self.check()?;
            MemoryTable::fenced(&t, by)?;
            t.state.insert(cluster.to_string(), document.to_string());
            Ok(())
        }

        async fn remove(&self, cluster: &str, by: &Writer) -> Result<(), StateWriteError> {
            let mut t = self.check()?;
            MemoryTable::fenced(&t, by)?;
            t.state.remove(cluster);
            Ok(())
        }
    }
}
