use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::*;

/// A reconciler that records what ran when, can be told to fail or to
/// take time, and checks that one key never runs twice at once.
#[derive(Default)]
struct Probe {
    log: Mutex<Vec<(Key, Instant)>>,
    active: Mutex<HashSet<Key>>,
    max_parallel: Mutex<usize>,
    fail: Mutex<HashMap<Key, u32>>,
    panic: Mutex<HashMap<Key, u32>>,
    work: Duration,
    requeue: Option<Duration>,
}

#[async_trait]
impl Reconciler for Probe {
    type Error = String;

    async fn reconcile(&self, key: &Key) -> Result<Action, String> {
        {
            let mut active = self.active.lock().unwrap();
            assert!(active.insert(key.clone()), "{key} reconciled twice at once");
            let mut m = self.max_parallel.lock().unwrap();
            *m = (*m).max(active.len());
        }
        self.log.lock().unwrap().push((key.clone(), Instant::now()));
        tokio::time::sleep(self.work).await;
        self.active.lock().unwrap().remove(key);
        let panics = match self.panic.lock().unwrap().get_mut(key) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        };
        if panics {
            panic!("{key}: a bug");
        }
        let mut fail = self.fail.lock().unwrap();
        if let Some(n) = fail.get_mut(key) {
            if *n > 0 {
                *n -= 1;
                return Err(format!("{key} is broken"));
            }
        }
        Ok(self
            .requeue
            .map(Action::requeue)
            .unwrap_or_else(Action::await_change))
    }
}

impl Probe {
    fn runs(&self, key: &str) -> Vec<Instant> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, t)| *t)
            .collect()
    }
}

fn config(concurrency: usize) -> RunnerConfig {
    RunnerConfig {
        concurrency,
        debounce: Duration::from_millis(100),
        backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
    }
}

async fn settle(d: Duration) {
    tokio::time::sleep(d).await;
}

#[tokio::test(start_paused = true)]
async fn bursts_of_triggers_become_one_reconcile() {
    let probe = Arc::new(Probe::default());
    let (tx, rx) = TriggerSender::channel();
    let stop = CancellationToken::new();
    let handle = tokio::spawn(run(probe.clone(), rx, config(4), stop.clone()));
    for _ in 0..10 {
        tx.now("web");
    }
    settle(Duration::from_secs(1)).await;
    assert_eq!(probe.runs("web").len(), 1);
    stop.cancel();
    handle.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn one_cluster_never_runs_twice_at_once_but_runs_again_after() {
    let probe = Arc::new(Probe {
        work: Duration::from_secs(5),
        ..Probe::default()
    });
    let (tx, rx) = TriggerSender::channel();
    let stop = CancellationToken::new();
    let handle = tokio::spawn(run(probe.clone(), rx, config(4), stop.clone()));
    tx.now("web");
    settle(Duration::from_secs(1)).await;
    tx.now("web"); // arrives while the first reconcile is still running
    settle(Duration::from_secs(20)).await;
    let runs = probe.runs("web");
    assert_eq!(runs.len(), 2, "the trigger during the run is not lost");
    assert!(
        runs[1] - runs[0] >= Duration::from_secs(5),
        "the second run waited for the first"
    );
    stop.cancel();
    handle.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn concurrency_is_bounded() {
    let probe = Arc::new(Probe {
        work: Duration::from_secs(1),
        ..Probe::default()
    });
    let (tx, rx) = TriggerSender::channel();
    let stop = CancellationToken::new();
    let handle = tokio::spawn(run(probe.clone(), rx, config(3), stop.clone()));
    for i in 0..10 {
        tx.now(format!("c{i}"));
    }
    settle(Duration::from_secs(10)).await;
    assert_eq!(probe.log.lock().unwrap().len(), 10);
    assert_eq!(*probe.max_parallel.lock().unwrap(), 3);
    stop.cancel();
    handle.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn requeue_is_honoured() {
    let probe = Arc::new(Probe {
        requeue: Some(Duration::from_secs(15)),
        ..Probe::default()
    });
    let (tx, rx) = TriggerSender::channel();
    let stop = CancellationToken::new();
    let handle = tokio::spawn(run(probe.clone(), rx, config(2), stop.clone()));
    tx.now("web");
    settle(Duration::from_secs(50)).await;
    let runs = probe.runs("web");
    assert_eq!(runs.len(), 4, "t≈0, 15, 30, 45");
    for w in runs.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap >= Duration::from_secs(15) && gap < Duration::from_secs(16),
            "{gap:?}"
        );
    }
    stop.cancel();
    handle.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_failing_cluster_backs_off_alone_and_resets_on_success() {
    let probe = Arc::new(Probe {
        requeue: Some(Duration::from_secs(100)),
        ..Probe::default()
    });
    probe.fail.lock().unwrap().insert("bad".into(), 4);
    let (tx, rx) = TriggerSender::channel();
    let stop = CancellationToken::new();
    let handle = tokio::spawn(run(probe.clone(), rx, config(2), stop.clone()));
    tx.now("bad");
    tx.now("good");
    settle(Duration::from_secs(60)).await;
    let bad = probe.runs("bad");
    assert_eq!(bad.len(), 5, "4 failures then a success");
    let gaps: Vec<Duration> = bad.windows(2).map(|w| w[1] - w[0]).collect();
    // Backoff 1s, 2s, 4s, 8s, each jittered into [½, 1]×.
    for (gap, full) in gaps.iter().zip([1u64, 2, 4, 8]) {
        let full = Duration::from_secs(full);
        assert!(
            *gap >= full / 2 && *gap <= full + Duration::from_millis(10),
            "{gap:?} vs {full:?}"
        );
    }
    assert_eq!(
        probe.runs("good").len(),
        1,
        "the healthy cluster was not dragged along"
    );
    stop.cancel();
    handle.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_panicking_reconcile_gives_its_slot_back_and_backs_off() {
    let probe = Arc::new(Probe {
        requeue: Some(Duration::from_secs(100)),
        ..Probe::default()
    });
    probe.panic.lock().unwrap().insert("boom".into(), 2);
    let (tx, rx) = TriggerSender::channel();
    let stop = CancellationToken::new();
    // One slot: if a panic kept it, nothing would ever run again.
    let handle = tokio::spawn(run(probe.clone(), rx, config(1), stop.clone()));
    tx.now("boom");
    settle(Duration::from_millis(500)).await;
    tx.now("web");
    settle(Duration::from_secs(10)).await;
    assert_eq!(probe.runs("web").len(), 1, "the slot came back");
    assert_eq!(
        probe.runs("boom").len(),
        3,
        "two panics, backed off, then a success"
    );
    stop.cancel();
    handle.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn shutdown_lets_in_flight_reconciles_finish() {
    let probe = Arc::new(Probe {
        work: Duration::from_secs(3),
        ..Probe::default()
    });
    let (tx, rx) = TriggerSender::channel();
    let stop = CancellationToken::new();
    let handle = tokio::spawn(run(probe.clone(), rx, config(2), stop.clone()));
    tx.now("web");
    settle(Duration::from_secs(1)).await;
    stop.cancel();
    tx.now("api"); // too late: nothing new starts
    handle.await.unwrap();
    assert!(
        probe.active.lock().unwrap().is_empty(),
        "the running reconcile completed"
    );
    assert_eq!(probe.runs("web").len(), 1);
    assert!(probe.runs("api").is_empty());
}
