//! Sample release artifacts (`.tar.gz`) for `runbooks/static-http.yaml`,
//! built in memory and uploaded to the emulated S3.
//!
//! A release is `VERSION`, `public/index.html` and `public/health` at the
//! root of the tarball (hangar extracts it as `releases/<id>/`). The kinds
//! exercise what the operator must survive: a good release, one whose
//! health check fails (no `public/health`: the static server answers 404),
//! and one that passes its health check but answers 500 everywhere else
//! (a top-level `FAIL_5XX`: what auto-rollback watches).

use std::io::Write;

use flate2::write::GzEncoder;
use flate2::Compression;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a built release does once active.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReleaseKind {
    /// Serves pages and passes its health check.
    Good,
    /// Has no `public/health`: the node's health check answers 404.
    FailingHealth,
    /// Healthy, but every other path answers 500 (`FAIL_5XX` marker).
    Fail5xx,
}

/// A release uploaded to the emulated S3, ready for a spec's `release:`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// Release id (the directory name under `releases/`).
    pub id: String,
    /// `s3://bucket/key`.
    pub url: String,
    /// SHA-256 of the tarball, 64 lowercase hex digits.
    pub sha256: String,
    pub kind: ReleaseKind,
}

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("release id `{0}` must be letters, digits, `.`, `_` or `-`")]
    BadId(String),
    #[error("building the tarball: {0}")]
    Build(#[from] std::io::Error),
    #[error("uploading s3://{bucket}/{key}: {message}")]
    Upload {
        bucket: String,
        key: String,
        message: String,
    },
}

/// The tarball of release `id`, gzip-compressed, and its SHA-256.
/// A release id is a directory name on the node: letters, digits, `._-`.
pub(crate) fn check_id(id: &str) -> Result<(), ArtifactError> {
    let valid = !id.is_empty()
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !valid {
        return Err(ArtifactError::BadId(id.to_string()));
    }
    Ok(())
}

pub fn build(id: &str, kind: ReleaseKind) -> Result<(Vec<u8>, String), ArtifactError> {
    check_id(id)?;
    let index = format!(
        "<!doctype html>\n<title>hangar local demo</title>\n<h1>release {id}</h1>\n<p>served by a hangar-managed node on the local cloud.</p>\n"
    );
    let mut files: Vec<(&str, String)> =
        vec![("VERSION", format!("{id}\n")), ("public/index.html", index)];
    if kind != ReleaseKind::FailingHealth {
        files.push(("public/health", format!("ok {id}\n")));
    }
    if kind == ReleaseKind::Fail5xx {
        files.push(("FAIL_5XX", "every non-health request answers 500\n".into()));
    }

    let gz = GzEncoder::new(Vec::new(), Compression::default());
    let mut tar = tar::Builder::new(gz);
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    dir.set_mtime(0);
    tar.append_data(&mut dir, "public/", std::io::empty())?;
    for (path, body) in &files {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_size(body.len() as u64);
        // Fixed metadata: the same id and kind always hash the same.
        header.set_mtime(0);
        tar.append_data(&mut header, path, body.as_bytes())?;
    }
    let mut gz = tar.into_inner()?;
    gz.flush()?;
    let bytes = gz.finish()?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    Ok((bytes, sha256))
}

/// Builds release `id` and uploads it to `s3://bucket/<prefix>/<id>.tar.gz`.
pub async fn upload(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
    id: &str,
    kind: ReleaseKind,
) -> Result<Artifact, ArtifactError> {
    let (bytes, sha256) = build(id, kind)?;
    put(s3, bucket, prefix, id, bytes, sha256, kind).await
}

/// Uploads a built tarball as release `id`.
pub(crate) async fn put(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
    id: &str,
    bytes: Vec<u8>,
    sha256: String,
    kind: ReleaseKind,
) -> Result<Artifact, ArtifactError> {
    let key = format!("{}/{id}.tar.gz", prefix.trim_matches('/'));
    s3.put_object()
        .bucket(bucket)
        .key(&key)
        .content_type("application/gzip")
        .body(bytes.into())
        .send()
        .await
        .map_err(|e| ArtifactError::Upload {
            bucket: bucket.to_string(),
            key: key.clone(),
            message: crate::aws::error_chain(&e),
        })?;
    Ok(Artifact {
        id: id.to_string(),
        url: format!("s3://{bucket}/{key}"),
        sha256,
        kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::GzDecoder;

    fn entries(bytes: &[u8]) -> Vec<(String, String)> {
        let mut archive = tar::Archive::new(GzDecoder::new(bytes));
        let mut out = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            let mut body = String::new();
            std::io::Read::read_to_string(&mut entry, &mut body).unwrap();
            out.push((path, body));
        }
        out
    }

    #[test]
    fn kinds_differ_exactly_in_health_and_the_5xx_marker() {
        let (good, sha) = build("v1", ReleaseKind::Good).unwrap();
        assert_eq!(sha, hex::encode(Sha256::digest(&good)));
        let names = |b: &[u8]| entries(b).into_iter().map(|(p, _)| p).collect::<Vec<_>>();
        assert_eq!(
            names(&good),
            ["public/", "VERSION", "public/index.html", "public/health"]
        );
        assert!(entries(&good).contains(&("VERSION".into(), "v1\n".into())));
        let (bad, _) = build("v2", ReleaseKind::FailingHealth).unwrap();
        assert!(!names(&bad).contains(&"public/health".to_string()));
        let (five, _) = build("v3", ReleaseKind::Fail5xx).unwrap();
        assert!(names(&five).contains(&"FAIL_5XX".to_string()));
        assert!(names(&five).contains(&"public/health".to_string()));
    }

    #[test]
    fn same_release_same_checksum_and_ids_are_checked() {
        let a = build("v1", ReleaseKind::Good).unwrap().1;
        let b = build("v1", ReleaseKind::Good).unwrap().1;
        assert_eq!(a, b);
        assert_ne!(a, build("v2", ReleaseKind::Good).unwrap().1);
        for bad in ["", "..", "a/b", "v 1"] {
            assert!(matches!(
                build(bad, ReleaseKind::Good),
                Err(ArtifactError::BadId(_))
            ));
        }
    }
}
