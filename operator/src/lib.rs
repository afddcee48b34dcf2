//! hangar: run plain VMs the way Kubernetes runs pods.

pub mod clouds;
pub mod controller;
pub mod fleet;
pub mod health;
pub mod http;
pub mod inventory;
pub mod lease;
pub mod lifecycle;
pub mod node_task;
pub mod planner;
pub mod probe;
pub mod reconcile;
pub mod release;
pub mod rollout;
pub mod runbook;
pub mod runtime;
pub mod settings;
pub mod specs;
pub mod ssh;
pub mod status;
pub mod tasks;
pub mod telemetry;
pub mod traffic;
