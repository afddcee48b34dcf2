//! Specs from a git repository: the source address, and a local mirror
//! that fetches, resolves a ref to a commit, checks a commit against the
//! limits and the allowed signers, and exports its tree.
//!
//! hangar drives the `git` CLI rather than a library: it is the
//! implementation every server speaks to, it brings ssh/https transports,
//! credential helpers and SSH-signature verification (`verify-commit` with
//! an `allowed_signers` file) that users already configure, and a fetch is
//! seconds apart at most, so a process per step costs nothing that shows.
//! Every command runs with a deadline, no prompt, no system or global
//! config, and only the transport the source names.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::process::Command;

/// Where specs come from, as written in `--specs`: Terraform's module
/// source form, `git+<transport>://<repo>//<dir>?ref=<ref>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GitSource {
    /// What `git` is given: `ssh://…`, `https://…`, `http://…`, `file://…`.
    pub url: String,
    /// The directory inside the repository that holds the specs (`""`: the root).
    pub dir: String,
    /// A branch, a tag or a commit (default `main`).
    pub reference: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("specs source `{given}`: {message}")]
pub struct SourceError {
    /// The source as given, credentials masked.
    pub given: String,
    pub message: String,
}

impl GitSource {
    /// Whether `s` names a git source rather than a directory.
    pub fn is_git(s: &str) -> bool {
        s.starts_with("git+")
    }

    pub fn parse(s: &str) -> Result<GitSource, SourceError> {
        let fail = |message: &str| SourceError {
            given: redact(s),
            message: message.to_string(),
        };
        let rest = s
            .strip_prefix("git+")
            .ok_or_else(|| fail("expected git+ssh://, git+https://, git+http:// or git+file://"))?;
        let (scheme, after) = rest
            .split_once("://")
            .ok_or_else(|| fail("expected <transport>:// after git+"))?;
        if !["ssh", "https", "http", "file"].contains(&scheme) {
            return Err(fail(&format!(
                "transport `{scheme}` is not one of ssh, https, http, file"
            )));
        }
        let (path_part, query) = match after.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (after, None),
        };
        let mut reference = "main".to_string();
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            match pair.split_once('=') {
                Some(("ref", r)) if valid_ref(r) => reference = r.to_string(),
                Some(("ref", r)) => {
                    return Err(fail(&format!(
                        "ref `{r}` is not a branch, tag or commit name"
                    )))
                }
                _ => return Err(fail(&format!("unknown parameter `{pair}` (only `ref`)"))),
            }
        }
        // `//` separates the repository from the directory inside it; the
        // first `//` after the host is that separator (`file:///abs//dir`
        // has its host part empty).
        let (repo, dir) = match after_host(path_part)
            .and_then(|(host, path)| path.find("//").map(|i| (host.len() + i, &path[i + 2..])))
        {
            Some((cut, dir)) => (&path_part[..cut], dir.trim_matches('/')),
            None => (path_part, ""),
        };
        if dir.split('/').any(|c| c == "..") {
            return Err(fail(
                "the directory inside the repository must not contain `..`",
            ));
        }
        if repo.is_empty() || repo == "/" {
            return Err(fail("no repository"));
        }
        if scheme != "file" && after_host(repo).is_none_or(|(h, _)| h.is_empty()) {
            return Err(fail("no host"));
        }
        Ok(GitSource {
            url: format!("{scheme}://{repo}"),
            dir: dir.to_string(),
            reference,
        })
    }

    pub fn scheme(&self) -> &str {
        self.url.split_once("://").map_or("", |(s, _)| s)
    }

    /// The source as shown in logs and status: no credentials.
    pub fn display(&self) -> String {
        let dir = if self.dir.is_empty() {
            String::new()
        } else {
            format!("//{}", self.dir)
        };
        format!("git+{}{dir}?ref={}", redact(&self.url), self.reference)
    }
}

/// Splits `host[:port]/path` into the host part and the rest.
fn after_host(s: &str) -> Option<(&str, &str)> {
    let i = s.find('/')?;
    Some((&s[..i], &s[i..]))
}

fn valid_ref(r: &str) -> bool {
    !r.is_empty()
        && !r.starts_with('-')
        && !r.contains("..")
        && r.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
}

/// `scheme://user:password@host/…` → `scheme://user:***@host/…`.
fn redact(s: &str) -> String {
    let Some((scheme, rest)) = s.split_once("://") else {
        return s.to_string();
    };
    let host_end = rest.find('/').unwrap_or(rest.len());
    match rest[..host_end].rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}{}", &rest[host_end..])
        }
        _ => s.to_string(),
    }
}

/// A commit as status shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommitInfo {
    pub sha: String,
    /// `Name <email>`.
    pub author: String,
    /// Committer date, RFC 3339.
    pub time: String,
    pub subject: String,
}

impl CommitInfo {
    pub fn short(&self) -> &str {
        &self.sha[..self.sha.len().min(7)]
    }
}

/// How git reaches the server and what it accepts.
#[derive(Clone, Debug, Default)]
pub struct GitOptions {
    /// Private key for `git+ssh://`; else ssh's own defaults.
    pub ssh_key: Option<PathBuf>,
    /// Known hosts for `git+ssh://`: given, a host not in it is refused;
    /// absent, the first key seen is pinned in the mirror's own file and
    /// a changed key is refused (the rule for nodes).
    pub known_hosts: Option<PathBuf>,
    /// Only commits signed by a key in this `allowed_signers` file load.
    pub allowed_signers: Option<PathBuf>,
    /// A file whose content is an HTTPS token (`git+https://`), sent as a
    /// header through git's environment, never on a command line.
    pub https_token_file: Option<PathBuf>,
    pub limits: Limits,
}

/// What a commit may weigh: a repository or a file bigger than this is
/// refused before anything of it is checked out.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub repo_bytes: u64,
    pub file_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            repo_bytes: 256 << 20,
            file_bytes: 1 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("git {step}: {message}")]
    Command { step: &'static str, message: String },
    #[error("git {step}: no answer within {}s", timeout.as_secs())]
    Timeout {
        step: &'static str,
        timeout: Duration,
    },
    #[error("ref `{0}` is not a branch, tag or commit of the repository")]
    UnknownRef(String),
    /// The commit is there but must not load (limits, signature).
    #[error("commit {sha}: {reason}")]
    Rejected { sha: String, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

const FETCH_TIMEOUT: Duration = Duration::from_secs(120);
const LOCAL_TIMEOUT: Duration = Duration::from_secs(30);

/// A bare mirror of the source in the state directory.
pub struct Mirror {
    source: GitSource,
    dir: PathBuf,
    options: GitOptions,
}

impl Mirror {
    /// Opens (creating on first use) the mirror at `dir`.
    pub async fn open(
        source: GitSource,
        dir: PathBuf,
        options: GitOptions,
    ) -> Result<Mirror, GitError> {
        let mirror = Mirror {
            source,
            dir,
            options,
        };
        if !mirror.dir.join("HEAD").exists() {
            std::fs::create_dir_all(&mirror.dir).map_err(|e| GitError::io(&mirror.dir, e))?;
            mirror
                .git("init", &["init", "--bare", "--quiet"], LOCAL_TIMEOUT)
                .await?;
        }
        Ok(mirror)
    }

    pub fn source(&self) -> &GitSource {
        &self.source
    }

    /// Fetches every branch and tag, forced: the repository is the truth,
    /// a force-pushed branch included.
    pub async fn fetch(&self) -> Result<(), GitError> {
        let url = self.source.url.clone();
        self.git(
            "fetch",
            &[
                "fetch",
                "--quiet",
                "--prune",
                "--no-tags",
                "--no-recurse-submodules",
                &url,
                "+refs/heads/*:refs/heads/*",
                "+refs/tags/*:refs/tags/*",
            ],
            FETCH_TIMEOUT,
        )
        .await?;
        Ok(())
    }

    /// The commit the source's ref names now.
    pub async fn resolve(&self) -> Result<String, GitError> {
        let r = &self.source.reference;
        let mut candidates = vec![format!("refs/heads/{r}"), format!("refs/tags/{r}")];
        if (7..=40).contains(&r.len()) && r.bytes().all(|b| b.is_ascii_hexdigit()) {
            candidates.push(r.clone());
        }
        for c in candidates {
            let spec = format!("{c}^{{commit}}");
            if let Ok(out) = self
                .git(
                    "rev-parse",
                    &["rev-parse", "--verify", "--quiet", &spec],
                    LOCAL_TIMEOUT,
                )
                .await
            {
                let sha = out.trim().to_string();
                if !sha.is_empty() {
                    return Ok(sha);
                }
            }
        }
        Err(GitError::UnknownRef(r.clone()))
    }

    pub async fn commit_info(&self, sha: &str) -> Result<CommitInfo, GitError> {
        let out = self
            .git(
                "show",
                &["show", "-s", "--format=%H%x00%an <%ae>%x00%cI%x00%s", sha],
                LOCAL_TIMEOUT,
            )
            .await?;
        let mut f = out.trim_end_matches('\n').splitn(4, '\0');
        let mut next = || f.next().unwrap_or("").to_string();
        Ok(CommitInfo {
            sha: next(),
            author: next(),
            time: next(),
            subject: next(),
        })
    }

    /// Whether `old` is in the history of `new` (false after a force-push
    /// that dropped it).
    pub async fn is_ancestor(&self, old: &str, new: &str) -> bool {
        self.git(
            "merge-base",
            &["merge-base", "--is-ancestor", old, new],
            LOCAL_TIMEOUT,
        )
        .await
        .is_ok()
    }

    /// Refuses a commit over the limits or, when signers are configured,
    /// not signed by one of them.
    pub async fn check(&self, sha: &str) -> Result<(), GitError> {
        let rejected = |reason: String| GitError::Rejected {
            sha: sha.to_string(),
            reason,
        };
        let counts = self
            .git("count-objects", &["count-objects", "-v"], LOCAL_TIMEOUT)
            .await?;
        let kib: u64 = counts
            .lines()
            .filter_map(|l| l.split_once(": "))
            .filter(|(k, _)| *k == "size" || *k == "size-pack")
            .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
            .sum();
        let limits = self.options.limits;
        if kib * 1024 > limits.repo_bytes {
            return Err(rejected(format!(
                "the repository is {} MiB, over the limit of {} MiB",
                kib / 1024,
                limits.repo_bytes >> 20
            )));
        }
        let tree = self
            .git(
                "ls-tree",
                &["ls-tree", "-r", "-l", "-z", sha],
                LOCAL_TIMEOUT,
            )
            .await?;
        for entry in tree.split('\0').filter(|e| !e.is_empty()) {
            // `<mode> <type> <object> <size>\t<path>`
            let Some((meta, path)) = entry.split_once('\t') else {
                continue;
            };
            let size = meta
                .split_whitespace()
                .nth(3)
                .and_then(|s| s.parse::<u64>().ok());
            if let Some(size) = size.filter(|s| *s > limits.file_bytes) {
                return Err(rejected(format!(
                    "{path} is {size} bytes, over the limit of {} bytes per file",
                    limits.file_bytes
                )));
            }
        }
        if let Some(signers) = &self.options.allowed_signers {
            let file = format!("gpg.ssh.allowedSignersFile={}", signers.display());
            let verified = self
                .git(
                    "verify-commit",
                    &["-c", "gpg.format=ssh", "-c", &file, "verify-commit", sha],
                    LOCAL_TIMEOUT,
                )
                .await;
            if let Err(e) = verified {
                return Err(rejected(format!(
                    "not signed by a key in {} ({})",
                    signers.display(),
                    short_error(&e)
                )));
            }
        }
        Ok(())
    }

    /// Writes the commit's tree into `dest`, which must not exist.
    pub async fn export(&self, sha: &str, dest: &Path) -> Result<(), GitError> {
        let tar = self
            .git_bytes("archive", &["archive", "--format=tar", sha], LOCAL_TIMEOUT)
            .await?;
        let dest = dest.to_path_buf();
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dest).map_err(|e| GitError::io(&dest, e))?;
            let mut archive = tar::Archive::new(std::io::Cursor::new(tar));
            archive.set_preserve_permissions(false);
            archive.unpack(&dest).map_err(|e| GitError::io(&dest, e))
        })
        .await
        .map_err(|e| GitError::Command {
            step: "archive",
            message: e.to_string(),
        })?
    }

    async fn git(
        &self,
        step: &'static str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<String, GitError> {
        let out = self.git_bytes(step, args, timeout).await?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    async fn git_bytes(
        &self,
        step: &'static str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<Vec<u8>, GitError> {
        let mut cmd = Command::new("git");
        cmd.arg("--git-dir")
            .arg(&self.dir)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &self.dir)
            .envs(std::env::var_os("SSH_AUTH_SOCK").map(|s| ("SSH_AUTH_SOCK", s)))
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_ALLOW_PROTOCOL", self.source.scheme())
            .env("GIT_SSH_COMMAND", self.ssh_command())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(file) = &self.options.https_token_file {
            let token = std::fs::read_to_string(file).map_err(|e| GitError::io(file, e))?;
            cmd.env("GIT_CONFIG_COUNT", "1")
                .env("GIT_CONFIG_KEY_0", "http.extraHeader")
                .env(
                    "GIT_CONFIG_VALUE_0",
                    format!("Authorization: Bearer {}", token.trim()),
                );
        }
        let out = tokio::time::timeout(timeout, cmd.output())
            .await
            .map_err(|_| GitError::Timeout { step, timeout })?
            .map_err(|e| GitError::Command {
                step,
                message: format!("cannot run git: {e}"),
            })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let message = stderr
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(redact_line)
                .collect::<Vec<_>>()
                .join("; ");
            return Err(GitError::Command {
                step,
                message: if message.is_empty() {
                    format!("exit {}", out.status)
                } else {
                    message
                },
            });
        }
        Ok(out.stdout)
    }

    /// ssh as git runs it: no prompt, the configured key only, and the
    /// host key checked (known hosts given, or pinned on first use).
    fn ssh_command(&self) -> String {
        let mut cmd = String::from(
            "ssh -o BatchMode=yes -o ConnectTimeout=15 -o GlobalKnownHostsFile=/dev/null",
        );
        if let Some(key) = &self.options.ssh_key {
            cmd.push_str(&format!(" -o IdentitiesOnly=yes -i {}", quote(key)));
        }
        match &self.options.known_hosts {
            Some(file) => cmd.push_str(&format!(
                " -o StrictHostKeyChecking=yes -o UserKnownHostsFile={}",
                quote(file)
            )),
            None => cmd.push_str(&format!(
                " -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile={}",
                quote(&self.dir.join("known_hosts"))
            )),
        }
        cmd
    }
}

fn redact_line(line: &str) -> String {
    line.split(' ').map(redact).collect::<Vec<_>>().join(" ")
}

fn short_error(e: &GitError) -> String {
    match e {
        GitError::Command { message, .. } => message.chars().take(200).collect(),
        other => other.to_string(),
    }
}

fn quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

impl GitError {
    /// A file or directory of the mirror or a checkout that failed.
    pub fn io(path: &Path, source: std::io::Error) -> GitError {
        GitError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_terraform_style_sources() {
        let s =
            GitSource::parse("git+ssh://git@github.com/org/infra.git//clusters?ref=main").unwrap();
        assert_eq!(s.url, "ssh://git@github.com/org/infra.git");
        assert_eq!((s.dir.as_str(), s.reference.as_str()), ("clusters", "main"));

        let s = GitSource::parse("git+https://example.com:8443/infra.git").unwrap();
        assert_eq!(s.url, "https://example.com:8443/infra.git");
        assert_eq!((s.dir.as_str(), s.reference.as_str()), ("", "main"));

        let s = GitSource::parse("git+file:///srv/git/infra.git//env/prod/?ref=v1.2").unwrap();
        assert_eq!(s.url, "file:///srv/git/infra.git");
        assert_eq!((s.dir.as_str(), s.reference.as_str()), ("env/prod", "v1.2"));

        let sha = "0123456789abcdef0123456789abcdef01234567";
        let s = GitSource::parse(&format!("git+ssh://h:2222/r.git?ref={sha}")).unwrap();
        assert_eq!(s.reference, sha);
        assert_eq!(s.display(), format!("git+ssh://h:2222/r.git?ref={sha}"));
    }

    #[test]
    fn refuses_what_it_cannot_fetch_safely() {
        for (bad, says) in [
            ("git+ftp://h/r.git", "transport `ftp`"),
            ("git+ssh:/h/r.git", "expected <transport>://"),
            (
                "git+ssh://h/r.git?ref=--upload-pack=x",
                "ref `--upload-pack=x`",
            ),
            ("git+ssh://h/r.git?ref=a..b", "ref `a..b`"),
            ("git+ssh://h/r.git?depth=1", "unknown parameter `depth=1`"),
            ("git+ssh://h/r.git//../etc", "must not contain `..`"),
            ("git+ssh:///r.git", "no host"),
        ] {
            let e = GitSource::parse(bad).unwrap_err();
            assert!(e.message.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn credentials_never_reach_a_log_line() {
        let s = GitSource::parse("git+https://ci:s3cr3t@example.com/infra.git//c").unwrap();
        assert_eq!(
            s.display(),
            "git+https://ci:***@example.com/infra.git//c?ref=main"
        );
        let e = GitSource::parse("git+https://ci:s3cr3t@example.com/r.git?x=1").unwrap_err();
        assert!(!e.to_string().contains("s3cr3t"), "{e}");
        assert_eq!(
            redact_line("fatal: unable to access 'https://u:tok@h/r.git/': 403"),
            "fatal: unable to access 'https://u:***@h/r.git/': 403"
        );
    }
}
