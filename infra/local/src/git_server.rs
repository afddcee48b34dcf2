//! A git server for tests: OpenSSH's `sshd` on 127.0.0.1 serving bare
//! repositories (git over SSH, as GitHub, GitLab and Gitea serve it), with
//! its own host key and one authorized client key, plus a working clone
//! to commit and push from.
//!
//! The server is the real thing hangar meets in production: `git
//! upload-pack` behind sshd with host-key checking and key
//! authentication. It runs as the test's user (root in CI) and is stopped
//! by PID when dropped.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub struct GitServer {
    dir: PathBuf,
    port: u16,
    sshd: Option<Child>,
    /// The client's private key (authorized on the server).
    pub key: PathBuf,
    /// A known_hosts file with the server's current host key.
    pub known_hosts: PathBuf,
}

impl GitServer {
    /// Starts sshd with its files under `dir` (created).
    pub fn start(dir: &Path) -> Result<GitServer> {
        std::fs::create_dir_all(dir.join("repos"))?;
        // sshd insists on its privilege separation directory.
        let _ = std::fs::create_dir_all("/run/sshd");
        let key = dir.join("client_key");
        keygen(&key, "hangar-git-client")?;
        std::fs::copy(key.with_extension("pub"), dir.join("authorized_keys"))?;
        let mut server = GitServer {
            dir: dir.to_path_buf(),
            port: 0,
            sshd: None,
            key,
            known_hosts: dir.join("known_hosts"),
        };
        server.new_host_key()?;
        server.launch()?;
        Ok(server)
    }

    /// `ssh://root@127.0.0.1:PORT/<dir>/repos/<name>.git`.
    pub fn url(&self, name: &str) -> String {
        format!(
            "ssh://{}@127.0.0.1:{}{}",
            whoami(),
            self.port,
            self.repo_path(name).display()
        )
    }

    pub fn repo_path(&self, name: &str) -> PathBuf {
        self.dir.join("repos").join(format!("{name}.git"))
    }

    /// A new bare repository and a working clone of it at `work`.
    pub fn create_repo(&self, name: &str, work: &Path) -> Result<WorkTree> {
        let bare = self.repo_path(name);
        git(
            None,
            &["init", "--quiet", "--bare", "-b", "main"],
            Some(&bare),
        )?;
        git(
            None,
            &[
                "clone",
                "--quiet",
                &bare.display().to_string(),
                &work.display().to_string(),
            ],
            None,
        )?;
        git(Some(work), &["checkout", "--quiet", "-B", "main"], None)?;
        Ok(WorkTree {
            dir: work.to_path_buf(),
        })
    }

    /// Restarts sshd with a new host key; `known_hosts` keeps the old
    /// one unless `update_known_hosts`.
    pub fn change_host_key(&mut self, update_known_hosts: bool) -> Result<()> {
        self.stop();
        let old = std::fs::read_to_string(&self.known_hosts)?;
        self.new_host_key()?;
        if !update_known_hosts {
            std::fs::write(&self.known_hosts, old)?;
        }
        self.launch()
    }

    /// Stops sshd (the repository becomes unreachable).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.sshd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts sshd again on the same port.
    pub fn resume(&mut self) -> Result<()> {
        if self.sshd.is_none() {
            self.launch()?;
        }
        Ok(())
    }

    fn new_host_key(&mut self) -> Result<()> {
        let host_key = self.dir.join("host_key");
        let _ = std::fs::remove_file(&host_key);
        let _ = std::fs::remove_file(host_key.with_extension("pub"));
        keygen(&host_key, "hangar-git-server")?;
        let public = std::fs::read_to_string(host_key.with_extension("pub"))?;
        let mut fields = public.split_whitespace();
        let (kind, blob) = (fields.next().unwrap_or(""), fields.next().unwrap_or(""));
        // The port is chosen at first launch; the entry names it.
        if self.port == 0 {
            self.port = free_port()?;
        }
        std::fs::write(
            &self.known_hosts,
            format!("[127.0.0.1]:{} {kind} {blob}\n", self.port),
        )?;
        Ok(())
    }

    fn launch(&mut self) -> Result<()> {
        let config = self.dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "ListenAddress 127.0.0.1:{port}
HostKey {dir}/host_key
AuthorizedKeysFile {dir}/authorized_keys
PidFile none
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
PrintMotd no
LogLevel INFO
",
                port = self.port,
                dir = self.dir.display()
            ),
        )?;
        let log = std::fs::File::create(self.dir.join("sshd.log"))?;
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting /usr/sbin/sshd")?;
        self.sshd = Some(child);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(Some(status)) = self.sshd.as_mut().map(|c| c.try_wait().ok().flatten()) {
                bail!(
                    "sshd exited ({status}): {}",
                    std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("sshd not listening on {addr} after 10s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A working clone: write files, commit, push.
pub struct WorkTree {
    pub dir: PathBuf,
}

impl WorkTree {
    pub fn write(&self, path: &str, text: &str) -> Result<()> {
        let p = self.dir.join(path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(p, text)?;
        Ok(())
    }

    pub fn remove(&self, path: &str) -> Result<()> {
        git(Some(&self.dir), &["rm", "--quiet", path], None).map(|_| ())
    }

    /// Commits everything and pushes; the new commit's sha.
    pub fn commit(&self, message: &str) -> Result<String> {
        self.commit_with(message, &[])
    }

    /// [`WorkTree::commit`], signed with the SSH key `key` (git's
    /// `gpg.format=ssh`).
    pub fn commit_signed(&self, message: &str, key: &Path) -> Result<String> {
        let key = key.display().to_string();
        self.commit_with(
            message,
            &[
                "-c",
                "gpg.format=ssh",
                "-c",
                &format!("user.signingkey={key}"),
                "-c",
                "commit.gpgsign=true",
            ],
        )
    }

    fn commit_with(&self, message: &str, config: &[&str]) -> Result<String> {
        git(Some(&self.dir), &["add", "-A"], None)?;
        let mut args: Vec<&str> = config.to_vec();
        args.extend(["commit", "--quiet", "--allow-empty", "-m", message]);
        git(Some(&self.dir), &args, None)?;
        git(
            Some(&self.dir),
            &["push", "--quiet", "--force", "origin", "HEAD:main"],
            None,
        )?;
        self.head()
    }

    /// Drops the last commit and force-pushes the branch without it.
    pub fn rewrite_last(&self, message: &str) -> Result<String> {
        git(
            Some(&self.dir),
            &["reset", "--quiet", "--soft", "HEAD~1"],
            None,
        )?;
        self.commit(message)
    }

    pub fn head(&self) -> Result<String> {
        Ok(git(Some(&self.dir), &["rev-parse", "HEAD"], None)?
            .trim()
            .to_string())
    }
}

fn git(cwd: Option<&Path>, args: &[&str], target: Option<&Path>) -> Result<String> {
    let mut cmd = Command::new("git");
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    cmd.args([
        "-c",
        "user.name=Hangar Test",
        "-c",
        "user.email=test@hangar.invalid",
    ])
    .args(args);
    if let Some(t) = target {
        cmd.arg(t);
    }
    let out = cmd
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("git {args:?}"))?;
    if !out.status.success() {
        bail!("git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An ed25519 key pair at `path` / `path.pub`.
pub fn keygen(path: &Path, comment: &str) -> Result<()> {
    let out = Command::new("/usr/bin/ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .context("ssh-keygen")?;
    if !out.status.success() {
        bail!("ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// An `allowed_signers` line for the key pair at `path`.
pub fn allowed_signer(path: &Path, principal: &str) -> Result<String> {
    let public = std::fs::read_to_string(path.with_extension("pub"))?;
    let mut f = public.split_whitespace();
    Ok(format!(
        "{principal} {} {}\n",
        f.next().unwrap_or(""),
        f.next().unwrap_or("")
    ))
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

fn whoami() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "root".into())
}
