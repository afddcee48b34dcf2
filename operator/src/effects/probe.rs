//! Background health probes of serving nodes, for self-healing.
//!
//! Reconcile asks for a probe round at most every health-check interval
//! (and at least 5 s apart) and never waits for it; the next reconcile reads
//! since when each node has been failing. hangar probes nodes itself rather
//! than polling the ALB's target health, whose API budget is account-wide.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use hangar_cloud::Instance;
use hangar_crds::ClusterSpec;
use tokio::time::Instant;

use crate::effects::health::{self, HealthProbe};

/// Probes in flight at once, per round.
const CONCURRENCY: usize = 16;

#[derive(Default)]
struct State {
    last_round: HashMap<String, Instant>,
    in_flight: HashSet<String>,
    /// node → (cluster, failing since)
    failing: HashMap<String, (String, DateTime<Utc>)>,
}

#[derive(Clone, Default)]
pub struct Probes {
    state: Arc<Mutex<State>>,
    /// One HTTP client for every round: building one loads the system's
    /// root certificates (~10 ms of CPU), which per cluster per round was
    /// most of a 1,000-cluster reconcile pass.
    client: Arc<Mutex<Option<reqwest::Client>>>,
}

impl Probes {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The shared client, built on first use (a failure is retried next round).
    fn client(&self) -> Result<reqwest::Client, health::HealthError> {
        let mut slot = self.client.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = health::client()?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Nodes of `cluster` whose probes fail, and since when.
    pub fn unhealthy(&self, cluster: &str) -> HashMap<String, DateTime<Utc>> {
        self.lock()
            .failing
            .iter()
            .filter(|(_, (c, _))| c == cluster)
            .map(|(node, (_, since))| (node.clone(), *since))
            .collect()
    }

    /// Starts a probe round for `serving` unless one ran recently or runs now.
    pub fn maybe_probe(
        &self,
        cluster: &str,
        spec: &ClusterSpec,
        serving: &[&Instance],
        now: DateTime<Utc>,
    ) {
        let check = &spec.release.health_check;
        let every = check.interval.get().max(Duration::from_secs(5));
        {
            let mut st = self.lock();
            let recent = st
                .last_round
                .get(cluster)
                .is_some_and(|t| t.elapsed() < every);
            if recent || st.in_flight.contains(cluster) {
                return;
            }
            st.last_round.insert(cluster.to_string(), Instant::now());
            st.in_flight.insert(cluster.to_string());
            // Forget nodes no longer serving.
            let ids: HashSet<&str> = serving.iter().map(|i| i.id.as_str()).collect();
            st.failing
                .retain(|node, (c, _)| c != cluster || ids.contains(node.as_str()));
        }
        let targets: Vec<(String, HealthProbe)> = serving
            .iter()
            .filter_map(|i| Some((i.id.clone(), HealthProbe::for_node(i.private_ip?, check))))
            .collect();
        if targets.is_empty() {
            // Nothing to probe (no node has an address): the round is over.
            self.lock().in_flight.remove(cluster);
            return;
        }
        let this = self.clone();
        let cluster = cluster.to_string();
        tokio::spawn(async move {
            let results: Vec<(String, bool)> = match this.client() {
                Ok(client) => {
                    futures::stream::iter(targets)
                        .map(|(id, p)| {
                            let client = client.clone();
                            async move {
                                (
                                    id,
                                    health::probe_once(&client, &p.url, p.timeout).await.is_ok(),
                                )
                            }
                        })
                        .buffer_unordered(CONCURRENCY)
                        .collect()
                        .await
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot probe nodes");
                    Vec::new()
                }
            };
            let mut st = this.lock();
            for (id, ok) in results {
                if ok {
                    st.failing.remove(&id);
                } else {
                    st.failing
                        .entry(id)
                        .or_insert_with(|| (cluster.clone(), now));
                }
            }
            st.in_flight.remove(&cluster);
        });
    }
}
