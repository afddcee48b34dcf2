//! hangar: run plain VMs the way Kubernetes runs pods.
//!
//! # Layout
//!
//! Three rings, each only using the rings before it:
//!
//! - [`core`] — **pure decisions.** No I/O, no clock, no locks: time and
//!   memory are passed in. [`core::decide()`] turns one [`core::Observation`]
//!   of a cluster and its [`core::Memory`] into a [`core::Decision`]; the
//!   planner (how many nodes), the fleet diff (what each node needs next),
//!   the node lifecycle (which steps from which phase) and the rollout
//!   bookkeeping are its parts. Tested exhaustively without a cloud,
//!   including whole scenarios (`core/decide/tests.rs`).
//! - [`effects`] — **talking to nodes and the cloud**, each step idempotent
//!   and safe to repeat after a crash: SSH sessions, runbooks, release
//!   shipping, health checks and probes, metric reads, and the node tasks
//!   that string these together.
//! - [`runtime`] — **the long-running process**: the controller
//!   (scheduler, runner, backoff), the reconcile loop
//!   (observe → decide → act), the shared instance inventory, specs from
//!   disk, status, the HTTP API, telemetry, the lease and settings.
//!
//! The `hangar` binary (`src/main.rs`, `src/cli/`) parses arguments and
//! calls into the runtime.
//!
//! A reconcile pass of one cluster, end to end:
//! [`runtime::reconcile`] observes (inventory, finished node tasks, metric
//! readings, probe results, the spec, `now`), calls [`core::decide()`], then
//! acts on the decision (launches, node tasks in [`effects::tasks`]),
//! reporting each action's failure into the next observation.

#![forbid(unsafe_code)]

pub mod core;
pub mod effects;
pub mod runtime;
