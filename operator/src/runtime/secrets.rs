//! `provision.secretsFrom` at run time: each cluster's secrets read from
//! AWS at most once a refresh interval (`secrets_refresh_interval`,
//! default [`TTL`]), folded into the config hash so a rotation
//! re-provisions the nodes rolling, and a hold when they cannot be read.
//!
//! The effective config hash (the `hangar:config` tag) is the spec's hash
//! (runbook + vars + envFile) combined with [`SecretEnv::digest`] — a
//! sha256 over the sorted `NAME=value` lines, never a value. A rotated
//! value changes it: the nodes are re-provisioned one batch at a time, the
//! way an edited runbook or envFile is, and `shared/.env` is rewritten.
//!
//! A source that does not exist or may not be read holds the cluster as it
//! is: nothing is provisioned or launched (a node would come up without
//! its secrets), nothing is drained, and status says which source. A
//! throttled or unreachable store keeps the last good read instead, for at
//! most [`STALE_FOR`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use hangar_cloud::{secrets, Secrets, SecretsError};
use hangar_crds::SecretSource;
use sha2::{Digest, Sha256};

use crate::effects::env_file::SecretEnv;
use crate::effects::ssh::Redactor;
use crate::runtime::specs::ClusterSpecEntry;
use crate::runtime::status::{ClusterStatus, ConditionType};

/// How long a successful read is used before the stores are asked again,
/// by default: a rotated value reaches the nodes' config hash within this
/// (plus one resync).
pub const TTL: Duration = Duration::from_secs(60);
/// How soon a failed read is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(10);
/// How long the last good read stands in for a store that is throttling
/// or unreachable.
const STALE_FOR: Duration = Duration::from_secs(600);

/// Condition reason of a cluster held for its secrets.
pub const REASON: &str = "SecretsUnreadable";

/// What a pass has to go on.
#[derive(Clone, Debug)]
pub enum SecretsRead {
    /// The spec names no `secretsFrom`.
    None,
    Ready(Arc<SecretEnv>),
    /// Hold the cluster as it is.
    Unreadable(SecretsError),
}

struct Cached {
    sources: Vec<SecretSource>,
    at: Instant,
    result: Result<Arc<SecretEnv>, SecretsError>,
    /// The last successful read and when it was made.
    good: Option<(Instant, Arc<SecretEnv>)>,
}

/// Per cluster, the last read. Shared by every pass of the process.
pub struct SecretCache {
    entries: Mutex<HashMap<String, Cached>>,
    ttl: Duration,
}

impl Default for SecretCache {
    fn default() -> Self {
        SecretCache::new(TTL)
    }
}

impl SecretCache {
    /// A cache that asks the stores again once a read is `ttl` old.
    pub fn new(ttl: Duration) -> SecretCache {
        SecretCache {
            entries: Mutex::default(),
            ttl,
        }
    }

    /// The cluster's secrets: from the cache while fresh, else read from
    /// `store` (all sources, all pages). The lock is not held across the
    /// read.
    pub async fn read(
        &self,
        cluster: &str,
        sources: &[SecretSource],
        store: &dyn Secrets,
    ) -> SecretsRead {
        if sources.is_empty() {
            self.forget(cluster);
            return SecretsRead::None;
        }
        let now = Instant::now();
        if let Some(c) = self.lock().get(cluster) {
            let fresh = match &c.result {
                Ok(_) => now.duration_since(c.at) < self.ttl,
                Err(_) => now.duration_since(c.at) < RETRY_AFTER,
            };
            if fresh && c.sources == sources {
                return Self::answer(c, now);
            }
        }
        let result = secrets::read_all(store, sources)
            .await
            .map(|vars| Arc::new(SecretEnv::new(vars)));
        let mut entries = self.lock();
        let good = match (&result, entries.get(cluster)) {
            (Ok(env), _) => Some((now, env.clone())),
            (Err(_), Some(c)) if c.sources == sources => c.good.clone(),
            (Err(_), _) => None,
        };
        match &result {
            Ok(env) => {
                tracing::debug!(cluster, vars = env.vars.len(), digest = %env.digest, "secrets read")
            }
            Err(error) => {
                tracing::warn!(cluster, %error, kind = error.kind(), "cannot read secrets")
            }
        }
        let c = Cached {
            sources: sources.to_vec(),
            at: now,
            result,
            good,
        };
        let answer = Self::answer(&c, now);
        entries.insert(cluster.to_string(), c);
        answer
    }

    fn answer(c: &Cached, now: Instant) -> SecretsRead {
        match &c.result {
            Ok(env) => SecretsRead::Ready(env.clone()),
            Err(e) => match &c.good {
                Some((at, env)) if e.is_transient() && now.duration_since(*at) < STALE_FOR => {
                    SecretsRead::Ready(env.clone())
                }
                _ => SecretsRead::Unreadable(e.clone()),
            },
        }
    }

    /// The secrets the last pass went on (for the node tasks it starts).
    pub fn current(&self, cluster: &str) -> Option<Arc<SecretEnv>> {
        let entries = self.lock();
        let c = entries.get(cluster)?;
        match &c.result {
            Ok(env) => Some(env.clone()),
            Err(_) => c.good.as_ref().map(|(_, env)| env.clone()),
        }
    }

    pub fn forget(&self, cluster: &str) {
        self.lock().remove(cluster);
    }

    /// `base` plus the cluster's current secret values, and a key that
    /// changes when they do (an SSH pool is rebuilt with the new redactor).
    pub fn redactor(&self, cluster: &str, base: Redactor) -> (Redactor, String) {
        match self.current(cluster) {
            Some(env) => (base.with(env.values()), env.digest.clone()),
            None => (base, String::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The config hash the nodes must carry: the spec's alone without
/// secrets (so clusters without `secretsFrom` keep their tags), else a
/// hash of both.
pub fn effective_config_hash(base: &str, env: Option<&SecretEnv>) -> String {
    match env {
        None => base.to_string(),
        Some(env) => {
            let mut h = Sha256::new();
            h.update(base.as_bytes());
            h.update([0]);
            h.update(env.digest.as_bytes());
            hex::encode(h.finalize())[..12].to_string()
        }
    }
}

/// `entry` with the effective config hash.
pub fn with_secrets(entry: &ClusterSpecEntry, env: &SecretEnv) -> ClusterSpecEntry {
    let mut e = entry.clone();
    e.config_hash = effective_config_hash(&entry.config_hash, Some(env));
    e
}

/// Shows the hold in status: `Degraded` (reason [`REASON`]) naming the
/// source and what is wrong, never a value; recorded once per hold.
pub fn hold(status: &mut ClusterStatus, error: &SecretsError, now: DateTime<Utc>) {
    let problem = error.to_string();
    let already = status
        .condition(ConditionType::Degraded)
        .is_some_and(|c| c.status && c.reason == REASON);
    if !already {
        status.record(
            now,
            "secrets",
            None,
            format!("cannot read secrets; holding every node as it is: {problem}"),
        );
    }
    status.set_condition(ConditionType::Degraded, true, REASON, problem, now);
    status.set_condition(ConditionType::Progressing, false, REASON, "", now);
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use hangar_cloud::secrets::Parameter;
    use hangar_cloud::{CloudError, SecretValue};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// One SSM parameter whose value and availability the test sets.
    #[derive(Default)]
    struct Store {
        value: Mutex<Option<Result<String, CloudError>>>,
        reads: AtomicUsize,
    }

    #[async_trait]
    impl Secrets for Store {
        async fn parameters_by_path(&self, _: &str) -> Result<Vec<Parameter>, CloudError> {
            unreachable!()
        }
        async fn parameter(&self, name: &str) -> Result<Parameter, CloudError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let v = self.value.lock().unwrap().clone().unwrap();
            v.map(|v| Parameter {
                name: name.into(),
                value: SecretValue::new(v),
            })
        }
        async fn secret_string(&self, _: &str) -> Result<SecretValue, CloudError> {
            unreachable!()
        }
    }

    fn source() -> Vec<SecretSource> {
        vec![SecretSource {
            ssm: Some("/app/DB_PASSWORD".into()),
            secrets_manager: None,
            env: None,
        }]
    }

    #[tokio::test]
    async fn reads_are_cached_and_a_rotation_changes_the_effective_hash() {
        let store = Store::default();
        *store.value.lock().unwrap() = Some(Ok("one".into()));
        let cache = SecretCache::default();
        let SecretsRead::Ready(a) = cache.read("web", &source(), &store).await else {
            panic!("not ready")
        };
        cache.read("web", &source(), &store).await;
        assert_eq!(store.reads.load(Ordering::SeqCst), 1, "cached");
        cache.forget("web");
        *store.value.lock().unwrap() = Some(Ok("two".into()));
        let SecretsRead::Ready(b) = cache.read("web", &source(), &store).await else {
            panic!("not ready")
        };
        assert_ne!(
            effective_config_hash("abc", Some(&a)),
            effective_config_hash("abc", Some(&b))
        );
        assert_eq!(effective_config_hash("abc", None), "abc");
        let (r, key) = cache.redactor("web", Redactor::default());
        assert_eq!(r.redact("pw=two"), "pw=[REDACTED]");
        assert_eq!(key, b.digest);
    }

    #[tokio::test]
    async fn a_missing_parameter_holds_but_a_throttled_store_keeps_the_last_good_read() {
        let store = Store::default();
        let cache = SecretCache::default();
        *store.value.lock().unwrap() = Some(Err(CloudError::NotFound {
            what: "SSM parameter /app/DB_PASSWORD".into(),
            code: Some("ParameterNotFound".into()),
        }));
        let SecretsRead::Unreadable(e) = cache.read("web", &source(), &store).await else {
            panic!("read")
        };
        assert!(e.to_string().contains("ssm:/app/DB_PASSWORD"), "{e}");
        assert_eq!(e.kind(), "not_found");

        *store.value.lock().unwrap() = Some(Ok("one".into()));
        cache.forget("web");
        assert!(matches!(
            cache.read("web", &source(), &store).await,
            SecretsRead::Ready(_)
        ));
        // Expire the good read by hand, then throttle.
        cache.lock().get_mut("web").unwrap().at = Instant::now() - TTL;
        *store.value.lock().unwrap() = Some(Err(CloudError::Throttled {
            service: "ssm",
            code: "ThrottlingException".into(),
            message: "Rate exceeded".into(),
        }));
        let SecretsRead::Ready(env) = cache.read("web", &source(), &store).await else {
            panic!("a throttled store should keep the last good read")
        };
        assert_eq!(env.vars["DB_PASSWORD"].expose(), "one");
    }
}
