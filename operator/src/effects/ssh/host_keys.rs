//! Host-key verification. hangar never accepts a node's key blindly.
//!
//! Two policies (`spec.ssh.hostKeyPolicy`):
//!
//! - **`known-hosts`**: the key must be listed for the node's address in
//!   `spec.ssh.knownHostsFile` (OpenSSH format, hashed entries allowed;
//!   `[ip]:port` for ports other than 22). No entry, or a different key of
//!   the same type, is refused.
//! - **`tofu`** (trust on first use): the first key a new instance presents
//!   is pinned to its **instance id** in `<stateDir>/host-keys/<id>.pub`;
//!   every later connection must present a pinned key, otherwise it is
//!   refused with [`HostKeyError::Changed`]. Pinning per instance id (not per
//!   IP) matters on EC2: private IPs are reused by new instances, and a new
//!   instance at an old address is a new host, not an attack.
//!
//! ## Pre-seeding pins from the EC2 console
//!
//! TOFU trusts the first contact. To close that window, pin the keys the
//! instance printed on its serial console before hangar's first connection.
//! cloud-init writes them there on first boot:
//!
//! ```text
//! $ aws ec2 get-console-output --instance-id i-0abc --latest --output text
//! …
//! ec2: #############################################################
//! ec2: -----BEGIN SSH HOST KEY FINGERPRINTS-----
//! ec2: 256 SHA256:Ab3…Zk root@ip-10-0-1-5 (ED25519)
//! ec2: -----END SSH HOST KEY FINGERPRINTS-----
//! -----BEGIN SSH HOST KEY KEYS-----
//! ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA… root@ip-10-0-1-5
//! -----END SSH HOST KEY KEYS-----
//! ```
//!
//! [`PinStore::seed_from_console_output`] takes that text and pins every key
//! of the `BEGIN SSH HOST KEY KEYS` block (or write the key lines to
//! `<stateDir>/host-keys/i-0abc.pub` yourself). The fingerprints block is
//! what a human compares with the `SHA256:…` fingerprint hangar prints in a
//! [`HostKeyError::Changed`] error. Console output can lag a few minutes
//! behind boot (use `--latest` on Nitro instances).

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use russh::keys::{HashAlg, PublicKey};

/// The node being connected to, as host-key checks see it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostId {
    /// EC2 instance id: what TOFU pins are keyed by.
    pub instance_id: String,
    /// The address connected to: what `known_hosts` entries are keyed by.
    pub host: String,
    pub port: u16,
}

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}:{})", self.instance_id, self.host, self.port)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    #[error(
        "HOST KEY CHANGED for {host}: it presented {presented}, but {source_of_truth} pins {}. \
         Refusing to connect: this is either a reinstalled node or a machine-in-the-middle. \
         If the change is legitimate, remove the stale entry and reconnect.",
        expected.join(", ")
    )]
    Changed {
        host: String,
        /// SHA256 fingerprint of the key the node presented.
        presented: String,
        /// SHA256 fingerprints on record.
        expected: Vec<String>,
        /// The pin file or `known_hosts` file (with line) holding them.
        source_of_truth: String,
    },
    #[error(
        "unknown host key for {host} ({presented}): {file} has no entry for {lookup}; \
         add one (e.g. from `ssh-keyscan` run on a trusted path, or the EC2 console output)"
    )]
    Unknown {
        host: String,
        presented: String,
        file: PathBuf,
        lookup: String,
    },
    #[error("{host} presented a host certificate; hangar verifies plain host keys only")]
    Certificate { host: String },
    #[error("instance id `{0}` cannot name a pin file (letters, digits, `-`, `_`, `.` only)")]
    BadInstanceId(String),
    #[error("host key store {path}: {reason}")]
    Store { path: PathBuf, reason: String },
    #[error("no `-----BEGIN SSH HOST KEY KEYS-----` block with a valid key in the console output of {0}")]
    NoConsoleKeys(String),
}

/// The SHA256 fingerprint as `ssh-keygen -l` prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// What made a key acceptable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trust {
    /// Listed in known_hosts, or already pinned.
    Known,
    /// First contact under TOFU: pinned just now.
    PinnedNow,
}

/// A host-key policy ready to check keys.
#[derive(Clone, Debug)]
pub enum HostKeyVerifier {
    KnownHosts { file: PathBuf },
    Tofu(PinStore),
}

impl HostKeyVerifier {
    pub fn known_hosts(file: impl Into<PathBuf>) -> Self {
        HostKeyVerifier::KnownHosts { file: file.into() }
    }

    /// TOFU with pins under `<state_dir>/host-keys/`.
    pub fn tofu(state_dir: &Path) -> Self {
        HostKeyVerifier::Tofu(PinStore::new(state_dir.join("host-keys")))
    }

    pub fn verify(&self, host: &HostId, key: &PublicKey) -> Result<Trust, HostKeyError> {
        match self {
            HostKeyVerifier::KnownHosts { file } => verify_known_hosts(file, host, key),
            HostKeyVerifier::Tofu(pins) => pins.verify(host, key),
        }
    }
}

fn verify_known_hosts(file: &Path, host: &HostId, key: &PublicKey) -> Result<Trust, HostKeyError> {
    if !file.exists() {
        return Err(HostKeyError::Store {
            path: file.to_path_buf(),
            reason: "known_hosts file does not exist".into(),
        });
    }
    let lookup = if host.port == 22 {
        host.host.clone()
    } else {
        format!("[{}]:{}", host.host, host.port)
    };
    let entries = russh::keys::known_hosts::known_host_keys_path(&host.host, host.port, file)
        .map_err(|e| HostKeyError::Store {
            path: file.to_path_buf(),
            reason: e.to_string(),
        })?;
    if entries.iter().any(|(_, k)| k.key_data() == key.key_data()) {
        return Ok(Trust::Known);
    }
    if entries.is_empty() {
        return Err(HostKeyError::Unknown {
            host: host.to_string(),
            presented: fingerprint(key),
            file: file.to_path_buf(),
            lookup,
        });
    }
    let lines: Vec<String> = entries.iter().map(|(l, _)| l.to_string()).collect();
    Err(HostKeyError::Changed {
        host: host.to_string(),
        presented: fingerprint(key),
        expected: entries.iter().map(|(_, k)| fingerprint(k)).collect(),
        source_of_truth: format!("{} (line {})", file.display(), lines.join(", ")),
    })
}

/// TOFU pins: one file of OpenSSH public key lines per instance id.
#[derive(Clone, Debug)]
pub struct PinStore {
    dir: PathBuf,
}

impl PinStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PinStore { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The pin file of an instance.
    pub fn path(&self, instance_id: &str) -> Result<PathBuf, HostKeyError> {
        let ok = !instance_id.is_empty()
            && !instance_id.starts_with('.')
            && instance_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            return Err(HostKeyError::BadInstanceId(instance_id.to_string()));
        }
        Ok(self.dir.join(format!("{instance_id}.pub")))
    }

    /// Keys pinned for an instance (empty when never contacted).
    pub fn pinned(&self, instance_id: &str) -> Result<Vec<PublicKey>, HostKeyError> {
        let path = self.path(instance_id)?;
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(store_err(&path, e)),
        };
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                PublicKey::from_openssh(l).map_err(|e| HostKeyError::Store {
                    path: path.clone(),
                    reason: format!("bad key line: {e}"),
                })
            })
            .collect()
    }

    pub fn verify(&self, host: &HostId, key: &PublicKey) -> Result<Trust, HostKeyError> {
        let pinned = self.pinned(&host.instance_id)?;
        if pinned.is_empty() {
            match self.pin_new(&host.instance_id, key) {
                Ok(()) => {
                    tracing::info!(
                        node = %host, fingerprint = %fingerprint(key),
                        "host key pinned on first use"
                    );
                    return Ok(Trust::PinnedNow);
                }
                // Another task pinned first: check against what it pinned.
                Err(HostKeyError::Store { .. }) if !self.pinned(&host.instance_id)?.is_empty() => {
                    return self.verify(host, key);
                }
                Err(e) => return Err(e),
            }
        }
        if pinned.iter().any(|k| k.key_data() == key.key_data()) {
            return Ok(Trust::Known);
        }
        Err(HostKeyError::Changed {
            host: host.to_string(),
            presented: fingerprint(key),
            expected: pinned.iter().map(fingerprint).collect(),
            source_of_truth: self.path(&host.instance_id)?.display().to_string(),
        })
    }

    /// Pins the keys printed in an instance's EC2 console output (see the
    /// module docs); replaces earlier pins. Returns how many were pinned.
    pub fn seed_from_console_output(
        &self,
        instance_id: &str,
        console_output: &str,
    ) -> Result<usize, HostKeyError> {
        let keys = console_host_keys(console_output);
        if keys.is_empty() {
            return Err(HostKeyError::NoConsoleKeys(instance_id.to_string()));
        }
        let path = self.path(instance_id)?;
        let body: String = keys
            .iter()
            .filter_map(|k| k.to_openssh().ok())
            .map(|l| format!("{l}\n"))
            .collect();
        self.write_atomically(&path, &body)?;
        Ok(keys.len())
    }

    /// Drops an instance's pins (it was terminated; EC2 never reuses ids).
    pub fn forget(&self, instance_id: &str) -> Result<(), HostKeyError> {
        let path = self.path(instance_id)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(store_err(&path, e)),
        }
    }

    /// First pin: `create_new`, so two racing first contacts cannot both win.
    fn pin_new(&self, instance_id: &str, key: &PublicKey) -> Result<(), HostKeyError> {
        let path = self.path(instance_id)?;
        fs::create_dir_all(&self.dir).map_err(|e| store_err(&self.dir, e))?;
        let line = key.to_openssh().map_err(|e| HostKeyError::Store {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| store_err(&path, e))?;
        f.write_all(format!("{line}\n").as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| store_err(&path, e))
    }

    fn write_atomically(&self, path: &Path, body: &str) -> Result<(), HostKeyError> {
        fs::create_dir_all(&self.dir).map_err(|e| store_err(&self.dir, e))?;
        let tmp = path.with_extension("pub.tmp");
        fs::write(&tmp, body).map_err(|e| store_err(&tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| store_err(path, e))
    }
}

fn store_err(path: &Path, e: io::Error) -> HostKeyError {
    HostKeyError::Store {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// The keys between `-----BEGIN SSH HOST KEY KEYS-----` and its END line
/// (lines may carry an `ec2: ` prefix; unparsable lines are skipped).
pub fn console_host_keys(console_output: &str) -> Vec<PublicKey> {
    let mut keys = Vec::new();
    let mut inside = false;
    for raw in console_output.lines() {
        let line = raw.trim();
        let line = line.strip_prefix("ec2:").map(str::trim).unwrap_or(line);
        if line.contains("-----BEGIN SSH HOST KEY KEYS-----") {
            inside = true;
        } else if line.contains("-----END SSH HOST KEY KEYS-----") {
            inside = false;
        } else if inside {
            if let Ok(k) = PublicKey::from_openssh(line) {
                keys.push(k);
            }
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED1: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINeosI6/CG2Q6r0RS/cGg1D4/vcVyswAmGvAqxpZNOg5 one";
    const ED2: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDFhOLATv2bICw+aeJIpt56Xye48w7OMYKV1aeVpQ0Dl two";

    fn host(id: &str) -> HostId {
        HostId {
            instance_id: id.into(),
            host: "127.77.1.2".into(),
            port: 22,
        }
    }

    #[test]
    fn tofu_pins_first_key_and_refuses_a_changed_one() {
        let dir = tempfile::tempdir().unwrap();
        let pins = PinStore::new(dir.path());
        let k1 = PublicKey::from_openssh(ED1).unwrap();
        let k2 = PublicKey::from_openssh(ED2).unwrap();
        assert_eq!(pins.verify(&host("i-1"), &k1).unwrap(), Trust::PinnedNow);
        assert_eq!(pins.verify(&host("i-1"), &k1).unwrap(), Trust::Known);
        let err = pins.verify(&host("i-1"), &k2).unwrap_err();
        assert!(matches!(err, HostKeyError::Changed { .. }), "{err}");
        assert!(err.to_string().contains(&fingerprint(&k2)));
        // Another instance at the same address is a different host.
        assert_eq!(pins.verify(&host("i-2"), &k2).unwrap(), Trust::PinnedNow);
    }

    #[test]
    fn instance_ids_cannot_escape_the_pin_directory() {
        let pins = PinStore::new("/nonexistent");
        for bad in ["../x", "", ".hidden", "a/b"] {
            assert!(pins.path(bad).is_err(), "{bad}");
        }
        assert!(pins.path("i-0abc123").is_ok());
    }

    #[test]
    fn console_output_seeds_pins() {
        let console = format!(
            "[   10.1] cloud-init: boot\nec2: -----BEGIN SSH HOST KEY FINGERPRINTS-----\n\
             ec2: 256 SHA256:x root@h (ED25519)\nec2: -----END SSH HOST KEY FINGERPRINTS-----\n\
             -----BEGIN SSH HOST KEY KEYS-----\n{ED1}\nnot a key\n-----END SSH HOST KEY KEYS-----\n"
        );
        let dir = tempfile::tempdir().unwrap();
        let pins = PinStore::new(dir.path());
        assert_eq!(pins.seed_from_console_output("i-9", &console).unwrap(), 1);
        let k1 = PublicKey::from_openssh(ED1).unwrap();
        let k2 = PublicKey::from_openssh(ED2).unwrap();
        assert_eq!(pins.verify(&host("i-9"), &k1).unwrap(), Trust::Known);
        assert!(pins.verify(&host("i-9"), &k2).is_err());
        assert!(matches!(
            pins.seed_from_console_output("i-9", "no keys"),
            Err(HostKeyError::NoConsoleKeys(_))
        ));
    }

    #[test]
    fn known_hosts_accepts_listed_refuses_changed_and_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("known_hosts");
        let body = ED1.rsplit_once(' ').unwrap().0;
        fs::write(&file, format!("127.77.1.2 {body}\n")).unwrap();
        let v = HostKeyVerifier::known_hosts(&file);
        let k1 = PublicKey::from_openssh(ED1).unwrap();
        let k2 = PublicKey::from_openssh(ED2).unwrap();
        assert_eq!(v.verify(&host("i-1"), &k1).unwrap(), Trust::Known);
        assert!(matches!(
            v.verify(&host("i-1"), &k2),
            Err(HostKeyError::Changed { .. })
        ));
        let other = HostId {
            host: "127.77.1.3".into(),
            ..host("i-1")
        };
        assert!(matches!(
            v.verify(&other, &k1),
            Err(HostKeyError::Unknown { .. })
        ));
    }
}
