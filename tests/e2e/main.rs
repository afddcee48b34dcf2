//! hangar end to end, on the local cloud: the moto emulator for the AWS
//! APIs, real OpenSSH nodes, a real HTTP load balancer, and `hangar run` as
//! a real process. Each test is one scenario from issue 6; each checks the
//! invariants of DESIGN.md with a watcher that looks at the cloud directly.
//!
//! Run with `cargo test -p hangar --test e2e` (root; `infra/local/setup` once).

mod support;

mod aws;
mod crash;
mod failover;
mod faults;
mod gitops;
mod isolation;
mod lifecycle;
mod page;
mod php;
mod releases;
mod scaling;
mod secrets;
mod walkthrough;
mod warm_pool;
