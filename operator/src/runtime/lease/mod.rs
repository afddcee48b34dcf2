//! Only one operator may act for an owner id at a time.
//!
//! Two operators with the same owner would race on the same instances
//! (double launches, a drain fighting a rollout). Two leases keep them
//! apart:
//!
//! - [`flock`]: on one host, an exclusive `flock` in the state directory
//!   (the default, and always held, so two processes never share a state
//!   directory);
//! - a distributed lease (`--lease dynamodb:TABLE`): one item per owner id,
//!   acquired and renewed with conditional writes, with a fence that grows
//!   on every change of holder. A standby waits beside the leader and takes
//!   over when the leader stops renewing. The pure rules live in
//!   [`crate::core::lease`]; here are the process around them:
//!   [`leadership`] (the shared view, terms, the guard the cloud layer
//!   asks), [`elector`] (the loop that keeps the lease) and [`shared`]
//!   (the cluster statuses in the lease's table, fenced).

pub mod elector;
pub mod flock;
pub mod leadership;
pub mod shared;

pub use flock::{Lease, LeaseError};
pub use leadership::{LeaderView, Leadership, RoleName, Term};

use std::sync::Arc;

use hangar_cloud::aws::DynamoTable;
use hangar_cloud::RetryPolicy;

use crate::runtime::settings::{LeaseBackend, Settings, SettingsError};
use crate::runtime::Ha;

/// The distributed lease the settings ask for (`None`: the single-host
/// `flock`), on the AWS configuration chain: a standby until its elector
/// wins the lease.
pub async fn from_settings(settings: &Settings) -> Result<Option<Ha>, SettingsError> {
    let LeaseBackend::DynamoDb { table } = settings.lease.backend()? else {
        return Ok(None);
    };
    let timing = settings.lease.timing();
    // A lease call must end well inside the renew deadline, and no write
    // may be retried by the SDK past the moment it was decided on (a
    // renewal, a fenced memory write): one short attempt; the elector and
    // the next pass retry on their own rhythm, asking the lease first.
    let attempt = (timing.renew_deadline / 2).max(std::time::Duration::from_millis(250));
    let retry = RetryPolicy {
        max_attempts: 1,
        throttling_backoff: std::time::Duration::from_millis(100),
        transient_backoff: std::time::Duration::from_millis(25),
        max_backoff: attempt,
        attempt_timeout: attempt,
        connect_timeout: attempt.min(std::time::Duration::from_secs(1)),
    };
    let store =
        Arc::new(DynamoTable::from_env(table.clone(), settings.owner.clone(), &retry).await);
    let holder = settings.lease.holder();
    let leadership = Leadership::distributed(&holder, timing, &format!("dynamodb:{table}"));
    Ok(Some(Ha {
        leadership,
        calls: Some(store.api_calls().clone()),
        lease: store.clone(),
        state: store,
    }))
}
