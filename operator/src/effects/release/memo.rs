//! Process-wide memory of release work that is the same for every node:
//! an artifact's manifest, the manifests nodes keep, and the payload that
//! takes a node from one manifest to another. A fan-out to fifty nodes
//! derives each once (the first node computes, the others wait for it),
//! not fifty times; a bounded number of recent ones is kept.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, LazyLock, Mutex};

use tokio::sync::OnceCell;

/// How many of each kind are kept: a rollout needs the current and the
/// previous release, a rollback one more.
const KEEP: usize = 8;

/// A bounded map of single-flight cells: concurrent callers with the same
/// key share one computation; a failed computation is not kept (the next
/// caller tries again).
pub struct Memo<V> {
    inner: Mutex<Cells<V>>,
}

struct Cells<V> {
    cells: HashMap<String, Arc<OnceCell<V>>>,
    order: VecDeque<String>,
}

impl<V: Clone> Memo<V> {
    pub fn new() -> Self {
        Memo {
            inner: Mutex::new(Cells {
                cells: HashMap::new(),
                order: VecDeque::new(),
            }),
        }
    }

    fn cell(&self, key: &str) -> Arc<OnceCell<V>> {
        // A panic while holding this lock leaves a consistent map.
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = inner.cells.get(key) {
            return c.clone();
        }
        let c = Arc::new(OnceCell::new());
        inner.cells.insert(key.to_string(), c.clone());
        inner.order.push_back(key.to_string());
        while inner.order.len() > KEEP {
            if let Some(old) = inner.order.pop_front() {
                inner.cells.remove(&old);
            }
        }
        c
    }

    /// The value for `key`, computing it with `init` unless another caller
    /// has (or is doing so now).
    pub async fn get_or_try_init<E, F, Fut>(&self, key: &str, init: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let cell = self.cell(key);
        cell.get_or_try_init(init).await.cloned()
    }

    pub fn get(&self, key: &str) -> Option<V> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.cells.get(key).and_then(|c| c.get().cloned())
    }

    pub fn insert(&self, key: &str, value: V) {
        let cell = self.cell(key);
        let _ = cell.set(value);
    }

    /// Forgets everything (benchmarks measure a cold operator with it).
    pub fn clear(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.cells.clear();
        inner.order.clear();
    }
}

impl<V: Clone> Default for Memo<V> {
    fn default() -> Self {
        Memo::new()
    }
}

use super::delta::Payload;
use super::manifest::{Manifest, ManifestError};

/// A manifest as a node keeps it, with its name and its wire form.
#[derive(Debug)]
pub struct NodeManifest {
    pub manifest: Manifest,
    /// sha256 of the text: its name on the node.
    pub sha256: String,
    /// The text, gzip'd, as it is sent.
    pub gz: Vec<u8>,
}

/// Artifact sha256 → its manifest (or why it has none).
pub(super) static ARTIFACT_MANIFESTS: LazyLock<Memo<Result<Arc<Manifest>, ManifestError>>> =
    LazyLock::new(Memo::new);

/// Artifact sha256 and node view → the manifest such a node keeps.
pub(super) static FOR_NODE: LazyLock<Memo<Arc<NodeManifest>>> = LazyLock::new(Memo::new);

/// Manifest text sha256 → the manifest a node keeps under that name.
pub(super) static NODE_MANIFESTS: LazyLock<Memo<Arc<NodeManifest>>> = LazyLock::new(Memo::new);

/// Artifact, base manifest and new manifest → what a node on that base
/// needs, or why a delta is not worth it.
pub(super) static PAYLOADS: LazyLock<Memo<Result<Arc<Payload>, String>>> = LazyLock::new(Memo::new);

/// Artifact sha256, path and file stamp → how the file read when checked.
pub(super) static CHECKED: LazyLock<Memo<super::Checked>> = LazyLock::new(Memo::new);

/// Forgets every manifest and payload this process derived, as if it had
/// just started (a benchmark's cold operator; nodes keep theirs).
pub fn forget_all() {
    ARTIFACT_MANIFESTS.clear();
    FOR_NODE.clear();
    NODE_MANIFESTS.clear();
    PAYLOADS.clear();
    CHECKED.clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_callers_share_one_computation_and_failures_are_retried() {
        let memo: Memo<u32> = Memo::new();
        let runs = AtomicUsize::new(0);
        let compute = || async {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            Ok::<_, ()>(7)
        };
        let (a, b) = tokio::join!(
            memo.get_or_try_init("k", compute),
            memo.get_or_try_init("k", compute)
        );
        assert_eq!((a, b), (Ok(7), Ok(7)));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        let failed: Result<u32, &str> = memo.get_or_try_init("e", || async { Err("no") }).await;
        assert_eq!(failed, Err("no"));
        assert_eq!(
            memo.get_or_try_init("e", || async { Ok::<_, &str>(1) })
                .await,
            Ok(1)
        );
    }

    #[test]
    fn keeps_only_the_newest() {
        let memo: Memo<usize> = Memo::new();
        for i in 0..KEEP + 2 {
            memo.insert(&i.to_string(), i);
        }
        assert_eq!(memo.get("0"), None);
        assert_eq!(memo.get("1"), None);
        assert_eq!(memo.get(&(KEEP + 1).to_string()), Some(KEEP + 1));
    }
}
