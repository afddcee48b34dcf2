//! [`Artifacts`]: `s3://` through the SDK, `file://` and `https://`
//! directly, all verified into the sha256-keyed cache.

use async_trait::async_trait;
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use hangar_crds::ArtifactSource;

use super::errors::from_sdk;
use super::AwsCloud;
use crate::artifact_cache::ChunkSource;
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
        let fetched = match source {
            ArtifactSource::File(path) => {
                let mut chunks = FileChunks::open(path, &name).await?;
                cache.store(&name, sha256, &mut chunks).await
            }
            ArtifactSource::Https(url) => {
                let mut chunks = HttpChunks::get(&self.inner.https, url).await?;
                cache.store(&name, sha256, &mut chunks).await
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
                let mut chunks = S3Chunks(out.body);
                cache.store(&name, sha256, &mut chunks).await
            }
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
