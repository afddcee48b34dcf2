//! Keeping secrets out of logs and error messages.
//!
//! Every string hangar derives from remote commands (a command line, stderr,
//! a runbook step's output) passes through a [`Redactor`] before it reaches
//! a log line, a report or an error. The redactor knows the values the spec
//! marks secret (`provision.secrets` names of `provision.vars`) and the
//! values of the env file, and replaces each occurrence with `[REDACTED]`.

use std::collections::BTreeMap;
use std::sync::Arc;

/// What a secret is replaced with.
pub const MASK: &str = "[REDACTED]";

/// Replaces known secret values in text. Cheap to clone (shared list).
#[derive(Clone, Debug, Default)]
pub struct Redactor {
    /// Longest first, so a secret containing another is masked whole.
    secrets: Arc<Vec<String>>,
}

impl Redactor {
    /// A redactor for these values. Empty values are ignored (they would
    /// match everywhere); every other value is masked, however short.
    pub fn new<I, S>(values: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut secrets: Vec<String> = values
            .into_iter()
            .map(Into::into)
            .filter(|s| !s.is_empty())
            .collect();
        secrets.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        secrets.dedup();
        Redactor {
            secrets: Arc::new(secrets),
        }
    }

    /// The secret values among `vars` (those named in `secret_names`).
    pub fn from_vars(vars: &BTreeMap<String, String>, secret_names: &[String]) -> Self {
        Self::new(
            secret_names
                .iter()
                .filter_map(|name| vars.get(name).cloned()),
        )
    }

    /// Adds the values of an env file (`KEY=VALUE` lines, optionally quoted
    /// or `export`ed) and each whole non-comment line.
    pub fn with_env_file(&self, contents: &str) -> Self {
        let mut values: Vec<String> = self.secrets.as_ref().clone();
        for line in contents.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            values.push(line.to_string());
            if let Some((_, value)) = line.split_once('=') {
                let value = value.trim();
                values.push(value.to_string());
                let unquoted = value
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')));
                if let Some(v) = unquoted {
                    values.push(v.to_string());
                }
            }
        }
        Self::new(values)
    }

    /// Adds more secret values.
    pub fn with<I, S>(&self, values: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut all: Vec<String> = self.secrets.as_ref().clone();
        all.extend(values.into_iter().map(Into::into));
        Self::new(all)
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// `text` with every secret replaced by [`MASK`].
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for secret in self.secrets.iter() {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), MASK);
            }
        }
        out
    }

    /// Lossy UTF-8 of `bytes`, redacted.
    pub fn redact_bytes(&self, bytes: &[u8]) -> String {
        self.redact(&String::from_utf8_lossy(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_every_occurrence_longest_first() {
        let r = Redactor::new(["hunter2", "hunter2-extended", ""]);
        assert_eq!(
            r.redact("a hunter2 b hunter2-extended c"),
            "a [REDACTED] b [REDACTED] c"
        );
        assert_eq!(r.redact("nothing here"), "nothing here");
    }

    #[test]
    fn only_vars_named_secret_are_masked() {
        let vars = BTreeMap::from([
            ("db_password".to_string(), "s3cr3t".to_string()),
            ("php_version".to_string(), "8.2".to_string()),
        ]);
        let r = Redactor::from_vars(&vars, &["db_password".to_string()]);
        assert_eq!(r.redact("php 8.2 pw s3cr3t"), "php 8.2 pw [REDACTED]");
    }

    #[test]
    fn env_file_values_are_masked() {
        let r = Redactor::default()
            .with_env_file("# comment\nAPP_KEY=base64:abc\nexport DB_PASS=\"p w\"\n\n");
        let out = r.redact("key base64:abc pass p w");
        assert!(!out.contains("base64:abc"), "{out}");
        assert!(!out.contains("p w"), "{out}");
        assert_eq!(r.redact("# comment"), "# comment");
    }
}
