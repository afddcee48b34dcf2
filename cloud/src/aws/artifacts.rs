//! [`Artifacts`]: `s3://` through the SDK, `file://` and `https://`
//! directly, all verified into the sha256-keyed cache.

use async_trait::async_trait;
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use hangar_crds::ArtifactSource;

use super::errors::from_sdk;
use super::AwsCloud;
use crate::artifact_cache::{digest, ChunkSource};
use crate::artifact_sources::{FileChunks, HttpChunks};
use crate::artifacts::{Artifacts, VerifiedArtifact};
use crate::error::{error_chain, CloudError};

#[async_trait]
impl Artifacts for AwsCloud {
    async fn fetch(
        &self,
        source: &ArtifactSource,
        sha256: &str,
    ) -> Result<VerifiedArtifact, CloudError> {
        let cache = &self.inner.cache;
        let name = source.to_string();
        if let Some(hit) = cache.lookup(&name, sha256).await? {
            return Ok(hit);
        }
        let fetched = match self.open_artifact(source).await {
            Ok(mut chunks) => cache.store(&name, sha256, &mut chunks).await,
            Err(e) => Err(e),
        };
        match &fetched {
            Ok(a) => {
                tracing::info!(artifact = %name, sha256 = %a.sha256, size = a.size, "artifact fetched and verified")
            }
            Err(e) => tracing::warn!(artifact = %name, error = %e, "artifact fetch failed"),
        }
        fetched
    }
}

impl AwsCloud {
    /// The sha256 and size of an artifact, read once from its source and
    /// not cached (the cache is keyed by a checksum not known yet).
    pub async fn artifact_digest(
        &self,
        source: &ArtifactSource,
    ) -> Result<(String, u64), CloudError> {
        let mut chunks = self.open_artifact(source).await?;
        digest(&mut chunks).await
    }

    /// The bytes of `source`, whichever scheme it has.
    async fn open_artifact(&self, source: &ArtifactSource) -> Result<AnyChunks, CloudError> {
        let name = source.to_string();
        Ok(match source {
            ArtifactSource::File(path) => AnyChunks::File(FileChunks::open(path, &name).await?),
            ArtifactSource::Https(url) => {
                AnyChunks::Http(HttpChunks::get(&self.inner.https, url).await?)
            }
            ArtifactSource::S3 { bucket, key } => {
                let out = self
                    .inner
                    .s3
                    .get_object()
                    .bucket(bucket)
                    .key(key)
                    .send()
                    .await
                    .map_err(|e| from_sdk("s3", || name.clone(), e))?;
                AnyChunks::S3(S3Chunks(out.body))
            }
        })
    }
}

/// One artifact's bytes, from any of the sources.
enum AnyChunks {
    File(FileChunks),
    Http(HttpChunks),
    S3(S3Chunks),
}

impl ChunkSource for AnyChunks {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, CloudError> {
        match self {
            AnyChunks::File(c) => c.next_chunk().await,
            AnyChunks::Http(c) => c.next_chunk().await,
            AnyChunks::S3(c) => c.next_chunk().await,
        }
    }
}

/// An S3 object body, streamed.
struct S3Chunks(ByteStream);

impl ChunkSource for S3Chunks {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, CloudError> {
        self.0
            .next()
            .await
            .transpose()
            .map_err(|e| CloudError::Transport {
                service: "s3",
                message: error_chain(&e),
            })
    }
}
