//! Benchmark: shipping a release and re-running an idempotent runbook on
//! real local nodes, hangar vs plain OpenSSH vs Ansible, in one run on the
//! same nodes. Driven by `benches/nodes/run.sh` (which builds this in
//! release mode and installs ansible-core into a venv); not a test.
//!
//! ```text
//! bench_nodes --ansible-playbook VENV/bin/ansible-playbook [--nodes 10] [--size-mb 50]
//! ```

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hangar::effects::release::{self, Artifact, ReleaseConfig};
use hangar::effects::runbook::{self, Facts, Runbook};
use hangar::effects::ssh::{Credentials, HostKeyVerifier, Redactor, SshPool, SshSettings, Target};
use hangar_local::node::{ClientKey, TestNode};
use sha2::{Digest, Sha256};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Args {
    nodes: usize,
    size_mb: usize,
    playbook: PathBuf,
    rounds: usize,
}

fn args() -> Result<Args, BoxError> {
    let mut a = Args {
        nodes: 10,
        size_mb: 50,
        playbook: PathBuf::from("ansible-playbook"),
        rounds: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--nodes" => a.nodes = value.parse()?,
            "--size-mb" => a.size_mb = value.parse()?,
            "--ansible-playbook" => a.playbook = PathBuf::from(value),
            "--rounds" => a.rounds = value.parse::<usize>()?.max(1),
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    Ok(a)
}

fn main() -> Result<(), BoxError> {
    let args = args()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

struct Bench {
    work: PathBuf,
    key: ClientKey,
    known_hosts: PathBuf,
    nodes: Vec<TestNode>,
}

impl Bench {
    fn target(&self, i: usize) -> Target {
        let n = &self.nodes[i];
        Target::new(format!("i-{}", n.name()), IpAddr::V4(n.ip()), n.port())
    }

    fn pool(&self) -> Result<SshPool, BoxError> {
        let settings = SshSettings::new(
            Credentials::from_key_file("root", &self.key.private_key)?,
            HostKeyVerifier::known_hosts(&self.known_hosts),
        );
        Ok(SshPool::new(settings, Redactor::default()))
    }

    /// Every node has `current` → `<root>/releases/<id>` and the blob intact.
    fn verify_release(&self, root: &str, id: &str, blob_sha: &str) -> Result<(), BoxError> {
        for n in &self.nodes {
            let out = n.exec_inside_ok(&format!(
                "readlink {root}/current && sha256sum < {root}/current/blob.bin"
            ))?;
            let want = format!("{root}/releases/{id}\n{blob_sha}  -\n");
            if out != want {
                return Err(format!("{}: got {out:?}, want {want:?}", n.name()).into());
            }
        }
        Ok(())
    }

    fn clean(&self, root: &str) -> Result<(), BoxError> {
        for n in &self.nodes {
            n.exec_inside_ok(&format!("rm -rf {root}"))?;
        }
        Ok(())
    }
}

async fn run(args: Args) -> Result<(), BoxError> {
    let work = std::env::temp_dir().join(format!("hangar-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let key = ClientKey::generate(&work.join("keys"), "client")?;
    let started = Instant::now();
    let nodes = (0..args.nodes)
        .map(|i| TestNode::start(&work, &format!("bench{i}"), &[&key.public_key]))
        .collect::<Result<Vec<_>, _>>()?;
    eprintln!("{} nodes started in {:?}", nodes.len(), started.elapsed());
    let known_hosts = work.join("known_hosts");
    let mut kh = String::new();
    for n in &nodes {
        kh.push_str(&n.known_hosts_line()?);
        kh.push('\n');
    }
    std::fs::write(&known_hosts, kh)?;
    let bench = Bench {
        work: work.clone(),
        key,
        known_hosts,
        nodes,
    };
    let result = run_rounds(&bench, &args).await;
    drop(bench);
    let _ = std::fs::remove_dir_all(&work);
    result
}

async fn run_rounds(b: &Bench, args: &Args) -> Result<(), BoxError> {
    let (tarball, sha, blob_sha) = make_tarball(&b.work, args.size_mb)?;
    let size = std::fs::metadata(&tarball)?.len();
    eprintln!("release tarball: {:.1} MB", size as f64 / 1e6);
    let mut ship = BTreeMap::<&str, Vec<Duration>>::new();
    for round in 0..args.rounds {
        // (a) hangar: connect, upload, verify sha256 on the node, extract, swap.
        let t = ship_hangar(b, &tarball, &sha).await?;
        b.verify_release("/srv/app-hangar", "r1", &blob_sha)?;
        b.clean("/srv/app-hangar")?;
        ship.entry("hangar").or_default().push(t);
        // (b) plain OpenSSH, one `ssh … tar -xzf -` per node in parallel.
        let t = ship_plain_ssh(b, &tarball)?;
        b.verify_release("/srv/app-ssh", "r1", &blob_sha)?;
        b.clean("/srv/app-ssh")?;
        ship.entry("plain ssh").or_default().push(t);
        // (c) Ansible: unarchive + atomic link, forks = nodes.
        let t = ship_ansible(b, args, &tarball)?;
        b.verify_release("/srv/app-ansible", "r1", &blob_sha)?;
        b.clean("/srv/app-ansible")?;
        ship.entry("ansible").or_default().push(t);
        eprintln!("ship round {} done", round + 1);
    }

    // Idempotent runbook: provision once (untimed), then time a re-run.
    let rb_path = b.work.join("bench-runbook.yaml");
    let pb_path = b.work.join("bench-playbook.yml");
    std::fs::write(&rb_path, bench_runbook("/srv/bench-hangar"))?;
    std::fs::write(&pb_path, bench_playbook("/srv/bench-ansible"))?;
    let runbook = Runbook::load(&rb_path)?;
    let first = rerun_hangar(b, &runbook).await?;
    if first.1 != 20 * b.nodes.len() {
        return Err(format!("first hangar run changed {} steps", first.1).into());
    }
    run_playbook(b, args, &pb_path)?;
    let mut rerun = BTreeMap::<&str, Vec<Duration>>::new();
    for _ in 0..args.rounds {
        let (t, changed) = rerun_hangar(b, &runbook).await?;
        if changed != 0 {
            return Err(format!("hangar re-run changed {changed} steps").into());
        }
        rerun.entry("hangar").or_default().push(t);
        let t = run_playbook(b, args, &pb_path)?;
        rerun.entry("ansible").or_default().push(t);
    }

    let med = |v: &Vec<Duration>| {
        let mut v = v.clone();
        v.sort();
        v[v.len() / 2]
    };
    let (h, s, a) = (
        med(&ship["hangar"]),
        med(&ship["plain ssh"]),
        med(&ship["ansible"]),
    );
    let (rh, ra) = (med(&rerun["hangar"]), med(&rerun["ansible"]));
    let n = b.nodes.len();
    let mb = size as f64 / 1e6;
    println!();
    println!(
        "## Ship a {mb:.1} MB release to {n} nodes (upload + verify + extract + swap; median of {})",
        args.rounds
    );
    println!("| tool | wall time | vs hangar |");
    println!("|---|---:|---:|");
    println!("| hangar | {:.2} s | 1.00× |", h.as_secs_f64());
    println!(
        "| plain OpenSSH (parallel `ssh … tar -xzf -`) | {:.2} s | {:.2}× |",
        s.as_secs_f64(),
        s.as_secs_f64() / h.as_secs_f64()
    );
    println!(
        "| Ansible (`unarchive` + link, forks={n}) | {:.2} s | {:.2}× |",
        a.as_secs_f64(),
        a.as_secs_f64() / h.as_secs_f64()
    );
    println!();
    println!("## Re-run a 20-step idempotent runbook on {n} nodes (nothing to change)");
    println!("| tool | wall time | vs hangar |");
    println!("|---|---:|---:|");
    println!("| hangar | {:.3} s | 1.00× |", rh.as_secs_f64());
    println!(
        "| Ansible (forks={n}) | {:.3} s | {:.2}× |",
        ra.as_secs_f64(),
        ra.as_secs_f64() / rh.as_secs_f64()
    );
    println!();
    let ship_vs_ssh = h.as_secs_f64() / s.as_secs_f64();
    let ship_vs_ansible = a.as_secs_f64() / h.as_secs_f64();
    let rerun_vs_ansible = ra.as_secs_f64() / rh.as_secs_f64();
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!("## Targets");
    println!(
        "- hangar ≤ 1.0× plain ssh on fan-out: {:.2}× — {}",
        ship_vs_ssh,
        verdict(ship_vs_ssh <= 1.0)
    );
    println!(
        "- hangar ≥ 2.5× faster than Ansible on fan-out: {:.2}× — {}",
        ship_vs_ansible,
        verdict(ship_vs_ansible >= 2.5)
    );
    println!(
        "- hangar ≥ 10× faster than Ansible on the idempotent re-run: {:.1}× — {}",
        rerun_vs_ansible,
        verdict(rerun_vs_ansible >= 10.0)
    );
    Ok(())
}

/// ~`size_mb` MB of gzip: an incompressible blob (media, vendored
/// binaries) plus a few thousand small compressible source files.
fn make_tarball(work: &Path, size_mb: usize) -> Result<(PathBuf, String, String), BoxError> {
    let src = work.join("release-src");
    std::fs::create_dir_all(src.join("public"))?;
    let mut blob = vec![0u8; size_mb.saturating_sub(2).max(1) << 20];
    let mut x: u64 = 0x2545F4914F6CDD1D;
    for chunk in blob.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    std::fs::write(src.join("blob.bin"), &blob)?;
    let blob_sha = hex::encode(Sha256::digest(&blob));
    for d in 0..40 {
        let dir = src.join(format!("src/module{d}"));
        std::fs::create_dir_all(&dir)?;
        for f in 0..50 {
            let mut s = String::new();
            for line in 0..80 {
                s.push_str(&format!(
                    "<?php // module {d} file {f} line {line}: return $this->handle($request, {line});\n"
                ));
            }
            std::fs::write(dir.join(format!("File{f}.php")), s)?;
        }
    }
    std::fs::write(src.join("public/health"), "ok\n")?;
    let out = work.join("release.tar.gz");
    let status = Command::new("tar")
        .arg("-czf")
        .arg(&out)
        .arg("-C")
        .arg(&src)
        .arg(".")
        .status()?;
    if !status.success() {
        return Err("tar failed".into());
    }
    std::fs::remove_dir_all(&src)?;
    let sha = hex::encode(Sha256::digest(std::fs::read(&out)?));
    Ok((out, sha, blob_sha))
}

async fn ship_hangar(b: &Bench, tarball: &Path, sha: &str) -> Result<Duration, BoxError> {
    let pool = b.pool()?;
    let config = ReleaseConfig::new("/srv/app-hangar");
    let artifact = Artifact::new(tarball, sha);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..b.nodes.len() {
        let (pool, config, artifact, target) =
            (pool.clone(), config.clone(), artifact.clone(), b.target(i));
        tasks.push(tokio::spawn(async move {
            let session = pool.session(&target).await?;
            release::deploy(&session, &config, "r1", &artifact).await?;
            Ok::<_, BoxError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(started.elapsed())
}

fn ssh_base(b: &Bench) -> Vec<String> {
    vec![
        "-i".into(),
        b.key.private_key.display().to_string(),
        "-o".into(),
        format!("UserKnownHostsFile={}", b.known_hosts.display()),
        "-o".into(),
        "StrictHostKeyChecking=yes".into(),
        "-o".into(),
        "BatchMode=yes".into(),
        "-o".into(),
        "ControlMaster=no".into(),
    ]
}

fn ship_plain_ssh(b: &Bench, tarball: &Path) -> Result<Duration, BoxError> {
    let root = "/srv/app-ssh";
    let remote = format!(
        "mkdir -p {root}/releases/r1 && tar -xzf - -C {root}/releases/r1 \
         && ln -sfn {root}/releases/r1 {root}/current.tmp && mv -T {root}/current.tmp {root}/current"
    );
    let started = Instant::now();
    let mut children = Vec::new();
    for n in &b.nodes {
        let child = Command::new("ssh")
            .args(ssh_base(b))
            .arg(format!("root@{}", n.ip()))
            .arg(&remote)
            .stdin(std::fs::File::open(tarball)?)
            .stdout(Stdio::null())
            .spawn()?;
        children.push(child);
    }
    for mut c in children {
        let status = c.wait()?;
        if !status.success() {
            return Err(format!("ssh exited {status}").into());
        }
    }
    Ok(started.elapsed())
}

fn inventory(b: &Bench) -> Result<PathBuf, BoxError> {
    let path = b.work.join("inventory.ini");
    let mut f = std::fs::File::create(&path)?;
    writeln!(f, "[nodes]")?;
    for n in &b.nodes {
        writeln!(f, "{} ansible_host={}", n.name(), n.ip())?;
    }
    writeln!(f, "[nodes:vars]")?;
    writeln!(f, "ansible_user=root")?;
    writeln!(f, "ansible_python_interpreter=/usr/bin/python3")?;
    writeln!(
        f,
        "ansible_ssh_private_key_file={}",
        b.key.private_key.display()
    )?;
    writeln!(
        f,
        "ansible_ssh_common_args='-o UserKnownHostsFile={} -o StrictHostKeyChecking=yes'",
        b.known_hosts.display()
    )?;
    Ok(path)
}

fn run_playbook(b: &Bench, args: &Args, playbook: &Path) -> Result<Duration, BoxError> {
    let inv = inventory(b)?;
    let started = Instant::now();
    let out = Command::new(&args.playbook)
        .arg("-i")
        .arg(&inv)
        .arg("-f")
        .arg(b.nodes.len().to_string())
        .arg(playbook)
        .env("ANSIBLE_PIPELINING", "True")
        .env("ANSIBLE_HOST_KEY_CHECKING", "True")
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_LOCAL_TEMP", b.work.join("ansible-tmp"))
        .output()?;
    let elapsed = started.elapsed();
    if !out.status.success() {
        return Err(format!(
            "ansible-playbook failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(elapsed)
}

fn ship_ansible(b: &Bench, args: &Args, tarball: &Path) -> Result<Duration, BoxError> {
    let root = "/srv/app-ansible";
    let play = format!(
        r#"- hosts: nodes
  gather_facts: false
  tasks:
    - name: release directory
      ansible.builtin.file: {{ path: {root}/releases/r1, state: directory }}
    - name: upload and extract
      ansible.builtin.unarchive: {{ src: "{tar}", dest: {root}/releases/r1 }}
    - name: swap current atomically
      ansible.builtin.shell: ln -sfn {root}/releases/r1 {root}/current.tmp && mv -T {root}/current.tmp {root}/current
"#,
        tar = tarball.display()
    );
    let path = b.work.join("ship-playbook.yml");
    std::fs::write(&path, play)?;
    run_playbook(b, args, &path)
}

async fn rerun_hangar(b: &Bench, runbook: &Runbook) -> Result<(Duration, usize), BoxError> {
    let pool = b.pool()?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..b.nodes.len() {
        let facts = Facts {
            instance_id: format!("i-{i}"),
            private_ip: b.nodes[i].ip().to_string(),
            app_root: "/srv/app".into(),
            health_path: "/health".into(),
            health_port: 80,
        };
        let plan = runbook.plan(&BTreeMap::new(), &facts)?;
        let (pool, target) = (pool.clone(), b.target(i));
        tasks.push(tokio::spawn(async move {
            let session = pool.session(&target).await?;
            let report = runbook::apply(&session, &plan).await.into_result()?;
            Ok::<_, BoxError>(report.changed())
        }));
    }
    let mut changed = 0;
    for t in tasks {
        changed += t.await??;
    }
    Ok((started.elapsed(), changed))
}

/// 10 files and 10 guarded commands: the shape of a typical provision.
fn bench_runbook(root: &str) -> String {
    let mut s = String::from("name: bench\nsteps:\n");
    for i in 0..10 {
        s.push_str(&format!(
            "  - name: config file {i}\n    file:\n      path: {root}/etc/conf{i}.ini\n      mode: \"0644\"\n      content: |\n        [section{i}]\n        workers = {i}\n        listen = 127.0.0.1:{port}\n",
            port = 9000 + i
        ));
    }
    for i in 0..10 {
        s.push_str(&format!(
            "  - name: command {i}\n    run: mkdir -p {root}/state && echo done > {root}/state/step{i}\n    creates: {root}/state/step{i}\n"
        ));
    }
    s
}

/// The same 20 steps as Ansible tasks.
fn bench_playbook(root: &str) -> String {
    let mut s = String::from("- hosts: nodes\n  gather_facts: false\n  tasks:\n");
    s.push_str(&format!(
        "    - name: etc directory\n      ansible.builtin.file: {{ path: {root}/etc, state: directory }}\n"
    ));
    for i in 0..10 {
        s.push_str(&format!(
            "    - name: config file {i}\n      ansible.builtin.copy:\n        dest: {root}/etc/conf{i}.ini\n        mode: \"0644\"\n        content: |\n          [section{i}]\n          workers = {i}\n          listen = 127.0.0.1:{port}\n",
            port = 9000 + i
        ));
    }
    for i in 0..9 {
        s.push_str(&format!(
            "    - name: command {i}\n      ansible.builtin.shell: mkdir -p {root}/state && echo done > {root}/state/step{i}\n      args: {{ creates: {root}/state/step{i} }}\n"
        ));
    }
    s
}
