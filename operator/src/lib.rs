//! hangar: run plain VMs the way Kubernetes runs pods.

pub mod planner;
pub mod settings;
