//! Release artifacts, fetched once and verified before anything uses them.

use std::path::PathBuf;

use async_trait::async_trait;
use hangar_crds::ArtifactSource;

use crate::error::CloudError;

/// A local file whose sha256 has been checked against the spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedArtifact {
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
}

#[async_trait]
pub trait Artifacts: Send + Sync {
    /// Returns the artifact from the local cache (keyed by sha256), fetching
    /// and verifying it first if needed. A checksum mismatch is
    /// [`CloudError::ChecksumMismatch`] and leaves nothing in the cache.
    async fn fetch(
        &self,
        source: &ArtifactSource,
        sha256: &str,
    ) -> Result<VerifiedArtifact, CloudError>;
}
