//! hangar: run plain VMs the way Kubernetes runs pods.

pub mod controller;
pub mod fleet;
pub mod planner;
pub mod settings;
pub mod ssh;
