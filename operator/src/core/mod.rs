//! The pure core: every decision hangar makes, as plain functions of plain
//! values. Nothing here does I/O, reads a clock or takes a lock; the
//! runtime passes `now`, what it observed and what it remembers.

pub mod conditions;
pub mod decide;
pub mod fleet;
pub mod launches;
pub mod lease;
pub mod lifecycle;
pub mod memory;
pub mod observation;
pub mod planner;
pub mod reachability;
pub mod rollout;
pub mod warm_pool;

pub use decide::{decide, Decision};
pub use memory::Memory;
pub use observation::Observation;
