//! The local, content-addressed artifact cache: `<dir>/<sha256>`.
//!
//! A file appears under its checksum name only after its bytes were hashed
//! while being written and matched the expected sha256: it is streamed into
//! a hidden temporary file in the same directory and `rename(2)`d into place
//! once verified (atomic on one filesystem). Anything else (mismatch, a
//! broken download, a cancelled task) deletes the temporary file. So a path
//! returned by this cache is always a verified artifact.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::artifact_sources::FileChunks;
use crate::artifacts::VerifiedArtifact;
use crate::error::CloudError;

/// Where artifact bytes come from, one chunk at a time.
pub trait ChunkSource: Send {
    /// The next chunk; `Ok(None)` at the end.
    fn next_chunk(
        &mut self,
    ) -> impl std::future::Future<Output = Result<Option<Bytes>, CloudError>> + Send;
}

/// Sizes of the files this process has verified, so a cache hit costs a
/// `stat` and not a re-hash.
pub struct ArtifactCache {
    dir: PathBuf,
    verified: Mutex<HashMap<String, u64>>,
}

static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl ArtifactCache {
    pub fn new(dir: impl Into<PathBuf>) -> ArtifactCache {
        ArtifactCache {
            dir: dir.into(),
            verified: Mutex::new(HashMap::new()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cached artifact, if present and intact. A file this process has
    /// verified before is checked by size; one found on disk (left by an
    /// earlier run) is re-hashed once. A corrupt file is removed.
    pub async fn lookup(
        &self,
        artifact: &str,
        sha256: &str,
    ) -> Result<Option<VerifiedArtifact>, CloudError> {
        let sha256 = normalize_sha256(sha256)?;
        let path = self.dir.join(&sha256);
        let meta = match tokio::fs::metadata(&path).await {
            Ok(meta) if meta.is_file() => meta,
            Ok(_) => {
                return Err(CloudError::Artifact {
                    artifact: artifact.to_string(),
                    message: format!("{} exists and is not a file", path.display()),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(artifact, "stat cache entry", &e)),
        };
        let size = meta.len();
        let known = self.lock().get(&sha256).copied();
        if known == Some(size) {
            return Ok(Some(VerifiedArtifact { path, sha256, size }));
        }
        let actual = hash_file(&path, artifact).await?;
        if actual == sha256 {
            self.lock().insert(sha256.clone(), size);
            return Ok(Some(VerifiedArtifact { path, sha256, size }));
        }
        tracing::warn!(path = %path.display(), expected = %sha256, %actual, "removing corrupt cache entry");
        self.lock().remove(&sha256);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(artifact, "remove corrupt cache entry", &e)),
        }
    }

    /// Streams `source` into the cache, hashing as it goes; publishes the
    /// file only if it matches `sha256`.
    pub async fn store(
        &self,
        artifact: &str,
        sha256: &str,
        source: &mut impl ChunkSource,
    ) -> Result<VerifiedArtifact, CloudError> {
        let sha256 = normalize_sha256(sha256)?;
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(|e| io_error(artifact, "create cache dir", &e))?;
        let temp = TempFile {
            path: self.dir.join(format!(
                ".partial-{sha256}-{}-{}",
                std::process::id(),
                TEMP_SEQ.fetch_add(1, Ordering::Relaxed)
            )),
            keep: false,
        };
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp.path)
            .await
            .map_err(|e| io_error(artifact, "create temporary file", &e))?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = source.next_chunk().await? {
            hasher.update(&chunk);
            size += chunk.len() as u64;
            file.write_all(&chunk)
                .await
                .map_err(|e| io_error(artifact, "write", &e))?;
        }
        file.sync_all()
            .await
            .map_err(|e| io_error(artifact, "sync", &e))?;
        drop(file);
        let actual = hex::encode(hasher.finalize());
        if actual != sha256 {
            // `temp` is removed on drop.
            return Err(CloudError::ChecksumMismatch {
                artifact: artifact.to_string(),
                expected: sha256,
                actual,
            });
        }
        let path = self.dir.join(&sha256);
        tokio::fs::rename(&temp.path, &path)
            .await
            .map_err(|e| io_error(artifact, "publish into cache", &e))?;
        temp.keep();
        // Make the rename durable; a failure here only risks a re-fetch.
        if let Ok(dir) = tokio::fs::File::open(&self.dir).await {
            let _ = dir.sync_all().await;
        }
        self.lock().insert(sha256.clone(), size);
        Ok(VerifiedArtifact { path, sha256, size })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.verified.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A temporary file deleted on drop unless kept.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl TempFile {
    fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            // Synchronous on purpose: Drop can run on cancellation, where no
            // async cleanup would get polled.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Lowercase hex sha256, or `InvalidInput`.
pub fn normalize_sha256(sha256: &str) -> Result<String, CloudError> {
    let s = sha256.trim();
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(CloudError::InvalidInput {
            code: None,
            message: format!("`{sha256}` is not a sha256 (64 hex digits)"),
        })
    }
}

async fn hash_file(path: &Path, artifact: &str) -> Result<String, CloudError> {
    let mut chunks = FileChunks::open(path, artifact).await?;
    Ok(digest(&mut chunks).await?.0)
}

/// Lowercase hex sha256 and size of everything `source` yields (for
/// `hangar release`, which writes the checksum the spec will demand).
pub async fn digest(source: &mut impl ChunkSource) -> Result<(String, u64), CloudError> {
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = source.next_chunk().await? {
        size += chunk.len() as u64;
        hasher.update(&chunk);
    }
    Ok((hex::encode(hasher.finalize()), size))
}

pub(crate) fn io_error(artifact: &str, doing: &str, e: &std::io::Error) -> CloudError {
    CloudError::Artifact {
        artifact: artifact.to_string(),
        message: format!("{doing}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Chunks(Vec<Result<Bytes, CloudError>>);

    impl ChunkSource for Chunks {
        async fn next_chunk(&mut self) -> Result<Option<Bytes>, CloudError> {
            if self.0.is_empty() {
                return Ok(None);
            }
            self.0.remove(0).map(Some)
        }
    }

    fn sha(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    #[tokio::test]
    async fn verified_bytes_land_under_their_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::new(dir.path().join("cache"));
        let data = b"hello release";
        let mut src = Chunks(vec![
            Ok(Bytes::from_static(b"hello ")),
            Ok(Bytes::from_static(b"release")),
        ]);
        let got = cache
            .store("t", &sha(data).to_uppercase(), &mut src)
            .await
            .unwrap();
        assert_eq!(got.sha256, sha(data), "normalized to lowercase");
        assert_eq!(got.size, data.len() as u64);
        assert_eq!(std::fs::read(&got.path).unwrap(), data);
        assert_eq!(entries(cache.dir()), vec![sha(data)]);
        let hit = cache.lookup("t", &sha(data)).await.unwrap();
        assert_eq!(hit, Some(got));
    }

    #[tokio::test]
    async fn a_mismatch_or_a_broken_stream_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::new(dir.path());
        let wanted = sha(b"the real thing");
        let mut src = Chunks(vec![Ok(Bytes::from_static(b"something else"))]);
        let err = cache.store("t", &wanted, &mut src).await.unwrap_err();
        match err {
            CloudError::ChecksumMismatch {
                expected, actual, ..
            } => {
                assert_eq!(expected, wanted);
                assert_eq!(actual, sha(b"something else"));
            }
            other => panic!("expected ChecksumMismatch, got {other:?}"),
        }
        let mut broken = Chunks(vec![
            Ok(Bytes::from_static(b"the real")),
            Err(CloudError::Transport {
                service: "https",
                message: "reset".into(),
            }),
        ]);
        assert!(matches!(
            cache.store("t", &wanted, &mut broken).await,
            Err(CloudError::Transport { .. })
        ));
        assert_eq!(entries(dir.path()), Vec::<String>::new());
        assert_eq!(cache.lookup("t", &wanted).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_corrupted_entry_is_detected_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let data = b"release bytes";
        // Left by an earlier run: re-hashed, and it is fine.
        std::fs::write(dir.path().join(sha(data)), data).unwrap();
        let cache = ArtifactCache::new(dir.path());
        assert!(cache.lookup("t", &sha(data)).await.unwrap().is_some());
        // Truncated behind our back: the size no longer matches, re-hash
        // fails, the entry goes.
        std::fs::write(dir.path().join(sha(data)), b"release").unwrap();
        assert_eq!(cache.lookup("t", &sha(data)).await.unwrap(), None);
        assert_eq!(entries(dir.path()), Vec::<String>::new());
    }

    #[tokio::test]
    async fn bad_checksums_are_invalid_input() {
        let cache = ArtifactCache::new("/nonexistent");
        for bad in ["", "abc", &"g".repeat(64), &"a".repeat(65)] {
            assert!(
                matches!(
                    cache.lookup("t", bad).await,
                    Err(CloudError::InvalidInput { .. })
                ),
                "{bad:?}"
            );
        }
    }
}
