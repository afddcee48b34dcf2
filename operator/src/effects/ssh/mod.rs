//! SSH to nodes: russh connections with verified host keys, pooled per
//! node under a global concurrency cap, running commands with timeouts and
//! size-capped, redactable output.
//!
//! ```no_run
//! # async fn demo(spec: &hangar_crds::Ssh) -> Result<(), hangar::effects::ssh::SshError> {
//! use hangar::effects::ssh::{Redactor, SshPool, SshSettings, Target};
//! let settings = SshSettings::from_spec(spec, std::path::Path::new("/var/lib/hangar"))?;
//! let pool = SshPool::new(settings, Redactor::default());
//! let node = Target::new("i-0abc", "10.0.1.5".parse().unwrap(), 22);
//! let session = pool.session(&node).await?;
//! let out = session.run_checked("uname -r").await?;
//! println!("{}", out.stdout_lossy());
//! # Ok(()) }
//! ```

pub mod host_keys;
mod redact;
mod session;

pub use host_keys::{fingerprint, HostId, HostKeyError, HostKeyVerifier, PinStore, Trust};
pub use redact::{Redactor, MASK};
pub use session::{
    tail, CommandOutput, Credentials, ExitStatus, Session, SshError, SshPool, SshSettings, Stdin,
    Target, DEFAULT_MAX_CONCURRENT_NODES, DEFAULT_MAX_OUTPUT, UPLOAD_CHUNK,
};

/// `s` quoted for a POSIX shell (single quotes; `'` becomes `'\''`).
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@%+,".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::shell_quote;

    #[test]
    fn quotes_only_when_needed() {
        assert_eq!(shell_quote("/srv/app"), "/srv/app");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$(rm)"), "'$(rm)'");
    }
}
