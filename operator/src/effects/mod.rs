//! Effects: hangar's hands on nodes and the cloud. Every step here is
//! idempotent and safe to repeat after a crash; what to do is decided in
//! [`crate::core`], when to do it in [`crate::runtime`].

pub mod env_file;
pub mod gate;
pub mod git;
pub mod health;
pub mod node_task;
pub mod probe;
pub mod release;
pub mod runbook;
pub mod ssh;
pub mod tasks;
pub mod traffic;
