//! hangar's local cloud, used by the tests and the quickstart.
//!
//! - [`moto`]: the AWS API emulator (moto + the CloudWatch CBOR adapter),
//!   started on a loopback port and stopped by PID;
//! - [`node`]: real OpenSSH `sshd` nodes on loopback addresses, each in its
//!   own mount namespace.

pub mod moto;
pub mod node;

use std::path::PathBuf;

/// The repository root (this crate lives in `infra/local/`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")))
}
