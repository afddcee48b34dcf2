//! `hangar release CLUSTER --id ID --artifact URL [--sha256 HEX]`: points a
//! cluster's spec at a new release by editing its file in place — the
//! GitOps form of a deploy (commit the change, the operator rolls it out).
//!
//! The edit itself is [`hangar_crds::edit`] (pure, format-preserving);
//! this is the I/O around it: find the file, compute the checksum from the
//! artifact when none is given (through the same sources the operator
//! fetches from), check the result with the loader, write it atomically.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context};
use clap::Args;
use hangar_crds::edit::{set_release, ReleaseEdit};
use hangar_crds::ArtifactSource;

#[derive(Debug, Args)]
pub struct ReleaseArgs {
    /// The cluster (`metadata.name`) whose spec is edited.
    cluster: String,
    /// Release id: the directory name under `releases/` (a commit sha, a build number).
    #[arg(long)]
    id: String,
    /// The tarball: `s3://BUCKET/KEY`, `https://…`, `file:///PATH` or a local path.
    #[arg(long, value_name = "URL")]
    artifact: String,
    /// SHA-256 of the artifact (64 hex digits); default: computed by reading it.
    #[arg(long, value_name = "HEX")]
    sha256: Option<String>,
    /// Directory of Cluster specs searched for the cluster [env: HANGAR_SPECS].
    #[arg(long, value_name = "DIR", env = "HANGAR_SPECS", default_value = ".")]
    specs: PathBuf,
}

pub fn run(args: ReleaseArgs) -> anyhow::Result<ExitCode> {
    let file = match find_spec_file(&args.specs, &args.cluster) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e:#}");
            return Ok(ExitCode::from(1));
        }
    };
    let artifact = match artifact_url(&args.artifact) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: --artifact: {e:#}");
            return Ok(ExitCode::from(1));
        }
    };
    let source: ArtifactSource = match artifact.parse() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: --artifact: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("cannot read {}", file.display()))?;
    let sha256 = match &args.sha256 {
        Some(given) => match hangar_cloud::artifact_cache::normalize_sha256(given) {
            Ok(s) => s,
            Err(_) => {
                eprintln!("error: --sha256: `{given}` is not a sha256 (64 hex digits)");
                return Ok(ExitCode::from(1));
            }
        },
        None => {
            let region = region_of(&text, &file, &args.cluster);
            match compute_sha256(&source, region.as_deref()) {
                Ok((sha, size)) => {
                    eprintln!("{artifact}: sha256 {sha} ({size} bytes)");
                    sha
                }
                Err(e) => {
                    eprintln!("error: cannot read the artifact {artifact} to compute its sha256 (or give --sha256): {e:#}");
                    return Ok(ExitCode::from(2));
                }
            }
        }
    };
    let edit = ReleaseEdit {
        id: &args.id,
        artifact: &artifact,
        sha256: &sha256,
    };
    let new_text = match set_release(&text, &args.cluster, &edit) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}: {e}", file.display());
            return Ok(ExitCode::from(1));
        }
    };
    if let Err(problems) = check(&text, &new_text, &file, &args.cluster, &edit) {
        eprintln!(
            "{}: the edited spec would not be valid; nothing written:",
            file.display()
        );
        for p in problems {
            eprintln!("  {p}");
        }
        return Ok(ExitCode::from(1));
    }
    if new_text == text {
        println!(
            "{}: cluster {} already on release {}",
            file.display(),
            args.cluster,
            args.id
        );
        return Ok(ExitCode::SUCCESS);
    }
    write_atomically(&file, new_text.as_bytes())
        .with_context(|| format!("cannot write {}", file.display()))?;
    println!(
        "{}: cluster {} → release {} ({artifact}, sha256 {sha256})",
        file.display(),
        args.cluster,
        args.id
    );
    Ok(ExitCode::SUCCESS)
}

/// The one spec file under `dir` that defines `cluster` validly (a broken
/// spec is reported with its problems: fix it first).
fn find_spec_file(dir: &Path, cluster: &str) -> anyhow::Result<PathBuf> {
    let report =
        hangar_crds::load_dir(dir).with_context(|| format!("loading {}", dir.display()))?;
    let hits: Vec<&hangar_crds::LoadedCluster> = report
        .clusters
        .iter()
        .filter(|c| c.name() == cluster)
        .collect();
    match hits.as_slice() {
        [one] => Ok(one.file.clone()),
        [] => {
            let names: Vec<&str> = report.clusters.iter().map(|c| c.name()).collect();
            let mut msg = format!(
                "no valid cluster named `{cluster}` among the specs in {} (clusters: {})",
                dir.display(),
                if names.is_empty() {
                    "none".into()
                } else {
                    names.join(", ")
                }
            );
            for p in &report.problems {
                msg.push_str(&format!("\n  {p}"));
            }
            bail!(msg)
        }
        many => bail!(
            "cluster `{cluster}` is defined in several files: {}",
            many.iter()
                .map(|c| c.file.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// A local path becomes a `file://` URL (absolute, as the spec requires).
fn artifact_url(arg: &str) -> anyhow::Result<String> {
    if arg.contains("://") {
        return Ok(arg.to_string());
    }
    let path = std::fs::canonicalize(arg).with_context(|| format!("`{arg}`"))?;
    let path = path
        .to_str()
        .ok_or_else(|| anyhow!("`{arg}`: the path is not UTF-8"))?;
    Ok(format!("file://{path}"))
}

/// The cluster's region from the spec as it is now, for `s3://` reads.
fn region_of(text: &str, file: &Path, cluster: &str) -> Option<String> {
    hangar_crds::load_str(text, file)
        .clusters
        .into_iter()
        .find(|c| c.name() == cluster)
        .map(|c| c.cluster.spec.region.clone())
}

fn compute_sha256(source: &ArtifactSource, region: Option<&str>) -> anyhow::Result<(String, u64)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // Only reads; the owner id and cache dir are never used for them.
        let cloud =
            hangar_cloud::AwsCloud::from_env(region, "hangar-release", std::env::temp_dir())
                .await?;
        Ok(cloud.artifact_digest(source).await?)
    })
}

/// The edited text must load as the cluster with exactly the new release,
/// and must not bring a problem the file did not have before.
fn check(
    old: &str,
    new: &str,
    file: &Path,
    cluster: &str,
    edit: &ReleaseEdit<'_>,
) -> Result<(), Vec<String>> {
    let before = hangar_crds::load_str(old, file);
    let after = hangar_crds::load_str(new, file);
    let known = |p: &hangar_crds::Problem| {
        before
            .problems
            .iter()
            .any(|q| q.path == p.path && q.message == p.message)
    };
    let mut problems: Vec<String> = after
        .problems
        .iter()
        .filter(|p| !known(p))
        .map(|p| p.to_string())
        .collect();
    match after.clusters.iter().find(|c| c.name() == cluster) {
        Some(c) => {
            let r = &c.cluster.spec.release;
            if (r.id.as_str(), r.artifact.as_str(), r.sha256.as_str())
                != (edit.id, edit.artifact, edit.sha256)
            {
                problems.push(format!(
                    "the edit did not read back as release {} (got {}, {}, {})",
                    edit.id, r.id, r.artifact, r.sha256
                ));
            }
        }
        None if problems.is_empty() => {
            problems.extend(after.problems.iter().map(|p| p.to_string()));
            if problems.is_empty() {
                problems.push(format!("cluster {cluster} no longer loads"));
            }
        }
        None => {}
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Temp file in the same directory, same mode, fsync, rename: a reader (the
/// operator's file watcher, git) sees the old file or the new one.
fn write_atomically(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = file.parent().unwrap_or(Path::new("."));
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}.hangar-release-{}", std::process::id()));
    let permissions = std::fs::metadata(file)?.permissions();
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)?;
        f.write_all(bytes)?;
        f.set_permissions(permissions)?;
        f.sync_all()?;
        std::fs::rename(&temp, file)?;
        // The rename itself is durable once the directory is synced.
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}
