//! The content of `<appRoot>/shared/.env`: the spec's `envFile` and the
//! variables read from `provision.secretsFrom`, in one file, written by
//! [`release::place_env_file`](crate::effects::release::place_env_file).
//!
//! Precedence: a secret replaces an `envFile` line of the same name (the
//! line is dropped, so every loader — systemd's `EnvironmentFile`, a shell's
//! `source`, PHP's and Node's dotenv — sees one value). The repository's
//! `envFile` carries defaults and placeholders; the value in AWS is the
//! authoritative one.

use std::collections::BTreeMap;

use hangar_cloud::SecretValue;
use sha2::{Digest, Sha256};

/// A cluster's secret variables as read this minute, and their digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretEnv {
    pub vars: BTreeMap<String, SecretValue>,
    /// sha256 (hex, 16 chars) over the sorted `NAME=value` lines: changes
    /// with any value, and shows none.
    pub digest: String,
}

impl SecretEnv {
    pub fn new(vars: BTreeMap<String, SecretValue>) -> SecretEnv {
        let mut h = Sha256::new();
        for (k, v) in &vars {
            h.update(k.as_bytes());
            h.update([b'=']);
            h.update(v.expose().as_bytes());
            h.update([0]);
        }
        let digest = hex::encode(h.finalize())[..16].to_string();
        SecretEnv { vars, digest }
    }

    /// Every value, and each line of a multi-line one, for the
    /// [`Redactor`](crate::effects::ssh::Redactor).
    pub fn values(&self) -> Vec<String> {
        let mut out = Vec::new();
        for v in self.vars.values() {
            let v = v.expose();
            out.push(v.to_string());
            out.push(quote(v));
            if v.contains('\n') {
                out.extend(
                    v.lines()
                        .filter(|l| l.trim().len() >= 4)
                        .map(str::to_string),
                );
            }
        }
        out
    }
}

/// The env file's lines, minus those that set a name `secrets` sets, then
/// the secrets (sorted), one `NAME=value` per line.
pub fn render(env_file: Option<&[u8]>, secrets: Option<&SecretEnv>) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(base) = env_file {
        let text = String::from_utf8_lossy(base);
        for line in text.split_inclusive('\n') {
            let overridden = secrets
                .zip(assigned_name(line))
                .is_some_and(|(s, name)| s.vars.contains_key(name));
            if !overridden {
                out.extend_from_slice(line.as_bytes());
            }
        }
        if !out.is_empty() && !out.ends_with(b"\n") {
            out.push(b'\n');
        }
    }
    if let Some(s) = secrets.filter(|s| !s.vars.is_empty()) {
        out.extend_from_slice(b"# provision.secretsFrom\n");
        for (name, value) in &s.vars {
            out.extend_from_slice(format!("{name}={}\n", quote(value.expose())).as_bytes());
        }
    }
    out
}

/// `NAME` of a `NAME=…` or `export NAME=…` line.
fn assigned_name(line: &str) -> Option<&str> {
    let line = line.trim_start();
    if line.starts_with('#') {
        return None;
    }
    let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
    let (name, _) = line.split_once('=')?;
    let name = name.trim_end();
    hangar_crds::validate::is_env_name(name).then_some(name)
}

/// As is when it is plain (`[A-Za-z0-9_./:@+,-]`), else double-quoted with
/// `\`, `"`, `$` and `` ` `` escaped: read back the same by a shell, systemd
/// and dotenv loaders (newlines stay inside the quotes).
fn quote(value: &str) -> String {
    let plain = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_./:@+,-".contains(&b));
    if plain {
        return value.to_string();
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        if matches!(c, '\\' | '"' | '$' | '`') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> SecretEnv {
        SecretEnv::new(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), SecretValue::new(*v)))
                .collect(),
        )
    }

    #[test]
    fn secrets_replace_env_file_lines_of_the_same_name() {
        let base = b"# defaults\nAPP_ENV=production\nexport DB_PASSWORD=placeholder\nDB_HOST=db\n";
        let out = render(
            Some(base),
            Some(&env(&[("DB_PASSWORD", "s3cr3t"), ("API_KEY", "k 1")])),
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "# defaults\nAPP_ENV=production\nDB_HOST=db\n# provision.secretsFrom\nAPI_KEY=\"k 1\"\nDB_PASSWORD=s3cr3t\n"
        );
        assert_eq!(render(Some(b"A=1"), None), b"A=1\n");
        assert_eq!(render(None, None), b"");
    }

    #[test]
    fn awkward_values_read_back_the_same_in_a_shell() {
        let value = "a \"quoted\" $HOME `x` \\ back\nline2";
        let out = render(None, Some(&env(&[("V", value)])));
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &out).unwrap();
        let read = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(". {}; printf %s \"$V\"", file.path().display()))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(read.stdout).unwrap(), value);
    }

    #[test]
    fn the_digest_follows_every_value_and_shows_none() {
        let a = env(&[("K", "v1")]);
        let b = env(&[("K", "v2")]);
        assert_ne!(a.digest, b.digest);
        assert_eq!(a.digest, env(&[("K", "v1")]).digest);
        assert!(!format!("{a:?}").contains("v1"));
    }
}
