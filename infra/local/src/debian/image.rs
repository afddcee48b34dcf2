//! The node images: built by `infra/local/images/build` (the recipe and its
//! hash live there, one source of truth), found here by asking it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use super::{io_err, DebianError, Result};

/// Which image a cloud's `debian` nodes boot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageVariant {
    /// Debian 12 minbase + systemd, sshd, sudo, curl… (~190 MB).
    #[default]
    Base,
    /// Base + nginx and PHP-FPM 8.2 with the extensions
    /// `runbooks/nginx-php-fpm.yaml` installs (~265 MB).
    Php,
}

impl ImageVariant {
    pub fn name(self) -> &'static str {
        match self {
            ImageVariant::Base => "base",
            ImageVariant::Php => "php",
        }
    }
}

impl std::str::FromStr for ImageVariant {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "base" => Ok(ImageVariant::Base),
            "php" => Ok(ImageVariant::Php),
            other => Err(format!("unknown image `{other}` (base or php)")),
        }
    }
}

impl std::fmt::Display for ImageVariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A built image: a read-only directory tree, every node's lower layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub variant: ImageVariant,
    /// `/var/cache/hangar-local/images/<variant>-<recipe hash>`.
    pub path: PathBuf,
}

/// `infra/local/images/build`.
pub fn build_script() -> PathBuf {
    crate::repo_root().join("infra/local/images/build")
}

impl Image {
    /// The image of the current recipe, building it first if needed (about
    /// a minute for `base`, half a minute more for `php`; instant once
    /// cached). The build's progress goes to this process's stderr.
    pub fn ensure(variant: ImageVariant) -> Result<Image> {
        Self::run_script(variant, "--print-path", Stdio::inherit())
    }

    /// The image if it is built already (never builds).
    pub fn built(variant: ImageVariant) -> Result<Option<Image>> {
        let script = build_script();
        let out = Command::new(&script)
            .args(["--variant", variant.name(), "--check"])
            .stdin(Stdio::null())
            .output()
            .map_err(io_err(format!("running {}", script.display())))?;
        match out.status.code() {
            Some(0) => Ok(Some(Self::from_output(variant, &out.stdout)?)),
            Some(3) => Ok(None),
            _ => Err(DebianError::Image {
                variant: variant.name().into(),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            }),
        }
    }

    fn run_script(variant: ImageVariant, flag: &str, stderr: Stdio) -> Result<Image> {
        let script = build_script();
        let out = Command::new(&script)
            .args(["--variant", variant.name(), flag])
            .stdin(Stdio::null())
            .stderr(stderr)
            .output()
            .map_err(io_err(format!("running {}", script.display())))?;
        if !out.status.success() {
            return Err(DebianError::Image {
                variant: variant.name().into(),
                message: format!(
                    "{} --variant {} failed ({}){}",
                    script.display(),
                    variant.name(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        Self::from_output(variant, &out.stdout)
    }

    fn from_output(variant: ImageVariant, stdout: &[u8]) -> Result<Image> {
        let text = String::from_utf8_lossy(stdout);
        let path = text
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('/'))
            .map(PathBuf::from)
            .ok_or_else(|| DebianError::Image {
                variant: variant.name().into(),
                message: format!("the build script printed no path: {text:?}"),
            })?;
        let image = Image { variant, path };
        image.check()?;
        Ok(image)
    }

    /// The image carries its own name and hash in `/etc/hangar-image`.
    fn check(&self) -> Result<()> {
        let marker = self.path.join("etc/hangar-image");
        if !marker.is_file() {
            return Err(DebianError::Image {
                variant: self.variant.name().into(),
                message: format!(
                    "{} is not a built image (no {})",
                    self.path.display(),
                    marker.display()
                ),
            });
        }
        Ok(())
    }

    /// `name=…` from the image's `/etc/hangar-image` (`php-<hash>`).
    pub fn name(&self) -> String {
        image_name(&self.path).unwrap_or_else(|| self.variant.name().to_string())
    }
}

fn image_name(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path.join("etc/hangar-image")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("name="))
        .map(str::to_string)
}
