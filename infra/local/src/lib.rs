//! hangar's local cloud, used by the tests and the quickstart.
//!
//! - [`moto`]: the AWS API emulator (moto + the CloudWatch CBOR adapter),
//!   started on a loopback port and stopped by PID;
//! - [`faults`]: a loopback proxy in front of moto that injects
//!   protocol-correct throttling, 5xx, hangs and resets;
//! - [`node`]: `lite` nodes, real OpenSSH `sshd` processes on loopback
//!   addresses, each in its own mount namespace;
//! - [`debian`]: `debian` nodes, Debian 12 machines (systemd-nspawn) with
//!   their own network namespace on the cloud's bridge, apt through the host.
//!
//! On top of those, the local cloud itself:
//! - [`slot`]: each cloud's addresses inside 127.0.0.0/8, leased so clouds
//!   can run side by side;
//! - [`seed`]: the emulated account's VPC, subnets, launch template, ALB,
//!   target group and release bucket; [`artifact`]: release tarballs;
//!   [`php_app`]: release tarballs of the PHP fixture (`fixtures/php-app`);
//! - [`hosts`]: the host manager turning running instances into nodes;
//! - [`lb`]: the load balancer's data plane; [`gateway`]: the AWS endpoint
//!   (moto, plus what AWS promises and moto does not: ClientToken
//!   idempotency, listing lag, capacity errors, token-bucket throttling,
//!   target health and draining as the data plane sees them, per-key call
//!   accounting and blocking);
//!   [`metrics`]: the LB's CloudWatch metrics; [`services`]: all of them together;
//! - [`harness`]: [`LocalCloud`], the whole thing inside one test;
//! - [`spec`]: ready-to-use cluster specs; [`load`]: a fixed-rate load generator.

pub mod artifact;
pub mod aws;
pub mod debian;
pub mod faults;
pub mod gateway;
pub mod git_server;
pub mod harness;
pub mod hosts;
pub mod lb;
pub mod load;
pub mod metrics;
pub mod moto;
pub mod node;
pub mod php_app;
pub(crate) mod procfs;
pub mod seed;
pub mod services;
pub mod slot;
pub mod spec;

pub use artifact::{Artifact, ReleaseKind};
pub use debian::{ImageVariant, NodeKind};
pub use gateway::{ApiCalls, CallCounts, Capacity, Lag, Semantics};
pub use harness::{eventually, init_test_logging, LocalCloud, LocalCloudError, LocalCloudOptions};
pub use spec::ClusterSpec;

use std::path::PathBuf;

/// The repository root (this crate lives in `infra/local/`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")))
}
