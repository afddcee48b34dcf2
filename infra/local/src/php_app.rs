//! Release tarballs of the PHP fixture (`infra/local/fixtures/php-app/`):
//! a real PHP application for `debian` nodes behind nginx + PHP-FPM, built
//! in memory like [`crate::artifact`]'s static releases.
//!
//! A release has `RELEASE`, `public/index.php`, `app/bootstrap.php`,
//! [`MODULES`] modules (`app/modules/mNNN.php`) that every page includes,
//! and the CLI entry points `bin/worker.php` (a queue worker) and
//! `bin/schedule.php` (the per-minute scheduler), each stamped with the
//! release id: the response's `X-Releases-Seen` lists the distinct ids of
//! the files that ran, so a request served from a mix of two releases is
//! visible. Deployed with `sharedPaths: [storage]`, `/write`, `/read` and
//! the job queue go through `<appRoot>/shared/storage`.

use std::io::Write;

use flate2::write::GzEncoder;
use flate2::Compression;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::artifact::{Artifact, ArtifactError, ReleaseKind};

/// Modules included per request (OPcache compiles each once per release).
pub const MODULES: usize = 200;

/// Every entry's mtime: fixed, so a release always hashes the same, but
/// not 0 — OPcache never caches a file whose timestamp reads 0 (it takes
/// it for a socket or a failed stat), so a tarball stamped with the epoch
/// silently recompiles every file on every request.
pub const MTIME: u64 = 1_704_067_200; // 2024-01-01T00:00:00Z

const INDEX: &str = include_str!("../fixtures/php-app/public/index.php");
const BOOTSTRAP: &str = include_str!("../fixtures/php-app/app/bootstrap.php");
const MODULE: &str = include_str!("../fixtures/php-app/app/module.php.tpl");
const WORKER: &str = include_str!("../fixtures/php-app/bin/worker.php");
const SCHEDULE: &str = include_str!("../fixtures/php-app/bin/schedule.php");

/// What a PHP release does once active.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PhpKind {
    /// Every page and `/health` answer 200.
    Good,
    /// `/health` answers 500 (a `HEALTH_FAIL` marker): never activated
    /// behind a health-checking rollout.
    FailingHealth,
    /// `/health` passes, every other page dies with a PHP fatal error
    /// (a module calls an undefined function): what auto-rollback watches.
    Fatal,
}

impl PhpKind {
    /// The static kind with the same behaviour toward the LB.
    pub fn as_release_kind(self) -> ReleaseKind {
        match self {
            PhpKind::Good => ReleaseKind::Good,
            PhpKind::FailingHealth => ReleaseKind::FailingHealth,
            PhpKind::Fatal => ReleaseKind::Fail5xx,
        }
    }
}

/// The files of release `id` (path, content), in tarball order.
pub fn files(id: &str, kind: PhpKind) -> Result<Vec<(String, String)>, ArtifactError> {
    crate::artifact::check_id(id)?;
    let stamp = |s: &str| s.replace("{{RELEASE}}", id);
    let mut files = vec![
        ("RELEASE".to_string(), format!("{id}\n")),
        ("public/index.php".to_string(), stamp(INDEX)),
        ("app/bootstrap.php".to_string(), stamp(BOOTSTRAP)),
        ("bin/worker.php".to_string(), stamp(WORKER)),
        ("bin/schedule.php".to_string(), stamp(SCHEDULE)),
    ];
    for i in 0..MODULES {
        let body = stamp(MODULE)
            .replace("{{N}}", &format!("{i:03}"))
            .replace("{{I}}", &i.to_string());
        files.push((format!("app/modules/m{i:03}.php"), body));
    }
    match kind {
        PhpKind::Good => {}
        PhpKind::FailingHealth => {
            files.push(("HEALTH_FAIL".into(), "/health answers 500\n".into()));
        }
        PhpKind::Fatal => files.push((
            format!("app/modules/m{MODULES:03}.php"),
            format!(
                "<?php\n// Release {id} is broken on purpose: a fatal error on every page.\n\
                 declare(strict_types=1);\n\nhangar_fixture_undefined_function();\n"
            ),
        )),
    }
    Ok(files)
}

/// The gzip'd tarball of release `id` and its SHA-256.
pub fn build(id: &str, kind: PhpKind) -> Result<(Vec<u8>, String), ArtifactError> {
    let files = files(id, kind)?;
    let gz = GzEncoder::new(Vec::new(), Compression::default());
    let mut tar = tar::Builder::new(gz);
    for dir in ["public/", "app/", "app/modules/", "bin/"] {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o755);
        header.set_size(0);
        header.set_mtime(MTIME);
        tar.append_data(&mut header, dir, std::io::empty())?;
    }
    for (path, body) in &files {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_size(body.len() as u64);
        // Fixed metadata (see MTIME): the same id and kind always hash the same.
        header.set_mtime(MTIME);
        tar.append_data(&mut header, path, body.as_bytes())?;
    }
    let mut gz = tar.into_inner()?;
    gz.flush()?;
    let bytes = gz.finish()?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    Ok((bytes, sha256))
}

/// Builds PHP release `id` and uploads it to `s3://bucket/<prefix>/<id>.tar.gz`.
pub async fn upload(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
    id: &str,
    kind: PhpKind,
) -> Result<Artifact, ArtifactError> {
    let (bytes, sha256) = build(id, kind)?;
    crate::artifact::put(
        s3,
        bucket,
        prefix,
        id,
        bytes,
        sha256,
        kind.as_release_kind(),
    )
    .await
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
    fn every_file_carries_its_release_and_no_placeholder_is_left() {
        let (bytes, sha) = build("v1", PhpKind::Good).unwrap();
        assert_eq!(sha, hex::encode(Sha256::digest(&bytes)));
        let files = entries(&bytes);
        let php: Vec<_> = files.iter().filter(|(p, _)| p.ends_with(".php")).collect();
        assert_eq!(php.len(), MODULES + 4);
        for (path, body) in &php {
            assert!(body.contains("'v1'"), "{path} does not carry its release");
            assert!(!body.contains("{{"), "{path} has a placeholder left");
        }
        // Decimal indexes (a leading zero would be an octal literal in PHP).
        let m8 = &files
            .iter()
            .find(|(p, _)| p == "app/modules/m008.php")
            .unwrap()
            .1;
        assert!(m8.contains("INDEX = 8;"));
        assert!(m8.contains("namespace HangarFixture\\M008;"));
        assert_eq!(build("v1", PhpKind::Good).unwrap().1, sha);
        assert_ne!(build("v2", PhpKind::Good).unwrap().1, sha);
    }

    #[test]
    fn no_entry_is_stamped_with_the_epoch_which_opcache_refuses_to_cache() {
        let (bytes, _) = build("v1", PhpKind::Good).unwrap();
        let mut archive = tar::Archive::new(GzDecoder::new(&bytes[..]));
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            assert_eq!(entry.header().mtime().unwrap(), MTIME);
        }
    }

    #[test]
    fn broken_kinds_differ_only_in_their_marker() {
        let names = |k| {
            entries(&build("v3", k).unwrap().0)
                .into_iter()
                .map(|(p, _)| p)
                .collect::<Vec<_>>()
        };
        let good = names(PhpKind::Good);
        let health = names(PhpKind::FailingHealth);
        let fatal = names(PhpKind::Fatal);
        assert_eq!(health.len(), good.len() + 1);
        assert!(health.contains(&"HEALTH_FAIL".to_string()));
        assert!(fatal.contains(&format!("app/modules/m{MODULES:03}.php")));
        assert!(matches!(
            build("../x", PhpKind::Good),
            Err(ArtifactError::BadId(_))
        ));
    }
}
