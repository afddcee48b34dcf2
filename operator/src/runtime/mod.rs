//! The runtime: the long-running `hangar run` process around the core —
//! triggers, the reconcile loop, the shared inventory, specs, status, the
//! HTTP API, telemetry, the lease and settings.

pub mod clouds;
pub mod controller;
pub mod git_sync;
pub mod history;
pub mod http;
pub mod inventory;
pub mod lease;
pub mod page;
pub mod reconcile;
mod run;
pub mod secrets;
pub mod settings;
pub mod specs;
pub mod status;
pub mod telemetry;
pub mod webhook;

pub use run::{run, run_with, Ha, RunError};
