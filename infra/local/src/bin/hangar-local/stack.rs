//! `up`, `down`, `status`: the quickstart stack's lifecycle, by PID.
//!
//! `up`: moto (detached, own session) → seeding → the `serve` daemon
//! (detached), which inherits the slot lock, so "the daemon is alive" and
//! "the slot is taken" are the same fact. The env file and spec are written
//! last, once everything answers.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use hangar_local::aws::{process_env, Clients};
use hangar_local::gateway::{Lag, Semantics};
use hangar_local::harness::local_env;
use hangar_local::lb::HealthCheckOptions;
use hangar_local::node::{self, ClientKey};
use hangar_local::seed::{self, SeedOptions};
use hangar_local::slot::{Slot, SlotError, SlotLease};
use hangar_local::spec::{ClusterSpec, SpecInputs};

use crate::rundir::{alive, stop_pid, tail, RunDir, Stack};

/// The fix for every missing prerequisite.
const SETUP: &str = "sudo infra/local/setup";

/// Substrings of the processes' command lines, checked before any signal.
pub const SERVE_NEEDLE: &str = "hangar-local serve";
const MOTO_NEEDLE: &str = "infra/local/moto/server.py";

#[derive(clap::Args)]
pub struct UpArgs {
    /// Address slot: 0 is 127.77.0.0/16 (the quickstart); tests use 1 and up.
    #[arg(long, default_value_t = hangar_local::slot::QUICKSTART)]
    slot: u8,
    /// How often the LB publishes its CloudWatch metrics (divides the spec's 10s period).
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    metrics_interval: Duration,
    /// How often the LB health-checks each target (overrides the target
    /// group's HealthCheckIntervalSeconds; `group` keeps the group's, 5s).
    #[arg(long, default_value = "1s")]
    health_interval: String,
    /// How late DescribeInstances shows new instances and tag changes:
    /// `500ms-3s` (AWS-like, default), a fixed `2s`, or `0` (at once).
    #[arg(long, default_value = "500ms-3s", value_parser = Lag::parse)]
    listing_lag: Lag,
    /// Turn off AWS's API token buckets (RequestLimitExceeded / Throttling).
    #[arg(long)]
    no_throttling: bool,
    /// Turn off RunInstances ClientToken idempotency (moto launches again).
    #[arg(long)]
    no_idempotency: bool,
    /// What instances become: `lite` (sshd in a mount namespace, on
    /// 127.(77+n).0.0/16) or `debian` (Debian 12 machines with systemd and
    /// their own network, on 198.18.0.0/15).
    #[arg(long, default_value = "lite", value_parser = ["lite", "debian"])]
    nodes: String,
    /// The image of `debian` nodes: `base`, or `php` (nginx + PHP-FPM 8.2).
    #[arg(long, default_value = "base")]
    image: hangar_local::ImageVariant,
    /// What release v1 and the generated spec are: `static` (files served
    /// by `runbooks/static-http.yaml`) or `php` (the PHP fixture behind
    /// nginx + PHP-FPM, `runbooks/nginx-php-fpm.yaml`; needs `--nodes debian`).
    #[arg(long, default_value = "static", value_parser = ["static", "php"])]
    app: String,
}

impl UpArgs {
    fn node_kind(&self) -> hangar_local::NodeKind {
        match self.nodes.as_str() {
            "debian" => hangar_local::NodeKind::Debian { image: self.image },
            _ => hangar_local::NodeKind::Lite,
        }
    }
}

pub fn up(root: &Path, args: UpArgs) -> Result<ExitCode> {
    let began = Instant::now();
    let run = RunDir::new(root)?;
    if args.app == "php" && !args.node_kind().is_debian() {
        bail!("--app php runs nginx and PHP-FPM under systemd: it needs --nodes debian (add --image php to skip installing them)");
    }
    preflight()?;
    let slot = Slot::new(args.slot)?;
    if let hangar_local::NodeKind::Debian { image } = args.node_kind() {
        hangar_local::debian::check_prerequisites()
            .map_err(|e| anyhow!("{e}\n  fix everything at once with: {SETUP}"))?;
        // Before anything starts: the first build takes a minute or two.
        let image = hangar_local::debian::Image::ensure(image)?;
        println!("node image {} ({})", image.name(), image.path.display());
    }

    // Unreadable (written by another version): treated as a dead stack.
    let previous = run.read_stack().unwrap_or(None);
    if let Some(stack) = &previous {
        let moto_up = alive(stack.moto_pid, MOTO_NEEDLE);
        let serve_up = stack.serve_pid.is_some_and(|p| alive(p, SERVE_NEEDLE));
        if moto_up && serve_up {
            println!(
                "local cloud already up (slot {}); nothing to do.",
                stack.slot
            );
            print_summary(&run, stack);
            return Ok(ExitCode::SUCCESS);
        }
        if serve_up && !moto_up {
            bail!(
                "moto (pid {}) has died under the running daemon; start over with \
                 `infra/local/cloud down && infra/local/cloud up` (logs: {})",
                stack.moto_pid,
                run.logs().display()
            );
        }
        if stack.slot != slot.index() && moto_up {
            bail!(
                "a stack on slot {} is half up in {}; run `infra/local/cloud down` first",
                stack.slot,
                run.root.display()
            );
        }
    }
    let lease = match slot.lease() {
        Ok(lease) => lease,
        Err(SlotError::Busy { .. }) => bail!(
            "{slot} is taken by another process: another `cloud up` still starting, \
             or a test using that slot. `infra/local/cloud status` shows this stack"
        ),
        Err(e) => return Err(e.into()),
    };

    // The slot is ours, so no daemon of this stack is alive. A live moto
    // with its seeded account means only the daemon died: restart just it,
    // adopting the nodes that still run.
    if let Some(mut stack) = previous {
        if alive(stack.moto_pid, MOTO_NEEDLE) && stack.slot == slot.index() {
            println!(
                "moto (pid {}) is up but the daemon is not: restarting the daemon",
                stack.moto_pid
            );
            let pid = spawn_serve(&run, &lease)?;
            stack.serve_pid = Some(pid);
            run.write_stack(&stack)?;
            println!("daemon restarted in {:.1}s", began.elapsed().as_secs_f64());
            print_summary(&run, &stack);
            return Ok(ExitCode::SUCCESS);
        }
        println!("cleaning up a stack that is no longer running");
    }
    // Also leftovers without a (readable) stack file: a crashed `up`.
    teardown(&run)?;

    fs::create_dir_all(run.logs()).with_context(|| format!("creating {}", run.logs().display()))?;
    let key = ClientKey::generate(&run.root, "id_ed25519")?;

    let (moto_pid, endpoint) = spawn_moto(&run)?;
    let stack = match seed_and_serve(&run, &lease, slot, &args, moto_pid, &endpoint, &key) {
        Ok(stack) => stack,
        Err(e) => {
            stop_pid(moto_pid, MOTO_NEEDLE, Duration::from_secs(5));
            return Err(e);
        }
    };
    write_env(&run, &stack)?;
    write_spec(&run, &stack)?;
    println!(
        "local cloud up in {:.1}s (slot {}).",
        began.elapsed().as_secs_f64(),
        stack.slot
    );
    print_summary(&run, &stack);
    Ok(ExitCode::SUCCESS)
}

fn seed_and_serve(
    run: &RunDir,
    lease: &SlotLease,
    slot: Slot,
    args: &UpArgs,
    moto_pid: u32,
    endpoint: &str,
    key: &ClientKey,
) -> Result<Stack> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building a runtime")?;
    let nodes = args.node_kind();
    let options = if nodes.is_debian() {
        SeedOptions::new(slot).bridged()
    } else {
        SeedOptions::new(slot)
    };
    let php = args.app == "php";
    let seeded = runtime
        .block_on(async {
            let clients = Clients::connect(endpoint, &options.region).await;
            let mut seeded = seed::seed(&clients, &options).await?;
            if php {
                // Release v1 is the PHP fixture instead (same key, replaced).
                seeded.release = hangar_local::php_app::upload(
                    &clients.s3,
                    &seeded.bucket,
                    seed::RELEASE_PREFIX,
                    &seeded.release.id,
                    hangar_local::php_app::PhpKind::Good,
                )
                .await?;
            }
            anyhow::Ok(seeded)
        })
        .context("seeding the emulated account")?;
    let mut stack = Stack {
        slot: slot.index(),
        endpoint: endpoint.to_string(),
        aws_endpoint: format!("http://{}", slot.gateway_addr()),
        region: options.region.clone(),
        moto_pid,
        serve_pid: None,
        lb_url: format!("http://{}", slot.lb_addr()),
        key: key.private_key.clone(),
        public_key: key.public_key.clone(),
        seeded,
        metrics_interval: args.metrics_interval,
        health: HealthCheckOptions {
            interval: match args.health_interval.as_str() {
                "group" => None,
                other => Some(crate::parse_duration(other).map_err(anyhow::Error::msg)?),
            },
            ..HealthCheckOptions::default()
        },
        host_poll: Duration::from_millis(250),
        target_poll: Duration::from_millis(100),
        started: SystemTime::now(),
        semantics: Semantics {
            listing_lag: args.listing_lag,
            throttling: (!args.no_throttling).then(Default::default),
            client_token_ttl: if args.no_idempotency {
                None
            } else {
                Semantics::default().client_token_ttl
            },
            ..Semantics::default()
        },
        nodes,
        app: args.app.clone(),
    };
    run.write_stack(&stack)?;
    let pid = spawn_serve(run, lease)?;
    stack.serve_pid = Some(pid);
    run.write_stack(&stack)?;
    Ok(stack)
}

/// Root, sshd, unshare/nsenter, the Python venv: each gap named with its fix.
fn preflight() -> Result<()> {
    node::check_prerequisites()
        .map_err(|e| anyhow!("{e}\n  fix everything at once with: {SETUP}"))?;
    let python = python();
    if !python.exists() {
        bail!(
            "the Python venv that runs moto is missing ({}).\n  create it with: {SETUP}",
            python.display()
        );
    }
    Ok(())
}

fn python() -> PathBuf {
    std::env::var_os(hangar_local::moto::PYTHON_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| hangar_local::repo_root().join(".venv/bin/python"))
}

/// Opens a log for a daemon's output (appending: logs survive restarts).
fn log_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Detaches a child into its own session: it outlives this command and
/// the terminal, and a Ctrl-C in the shell never reaches it.
fn detach(cmd: &mut Command) {
    // SAFETY: setsid(2) is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Starts moto detached and waits for its `ready http://…` line.
fn spawn_moto(run: &RunDir) -> Result<(u32, String)> {
    let root = hangar_local::repo_root();
    let out_path = run.moto_out();
    let _ = fs::remove_file(&out_path);
    let mut cmd = Command::new(python());
    cmd.arg(root.join("infra/local/moto/server.py"))
        .args(["--host", "127.0.0.1", "--port", "0", "--pidfile"])
        .arg(run.moto_pid())
        .current_dir(&root)
        .env_remove("MOTO_ACCOUNT_ID")
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(log_file(&out_path)?)
        .stderr(log_file(&run.moto_log())?);
    detach(&mut cmd);
    let mut child = cmd.spawn().context("starting moto")?;
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = fs::read_to_string(&out_path).unwrap_or_default();
        if let Some(url) = out.lines().find_map(|l| l.trim().strip_prefix("ready ")) {
            return Ok((pid, url.to_string()));
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "moto exited ({status}) before it was ready; {}:\n{}",
                run.moto_log().display(),
                tail(&run.moto_log(), 20)
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!(
                "moto not ready after 60s; {}:\n{}",
                run.moto_log().display(),
                tail(&run.moto_log(), 20)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts the daemon detached, handing it the slot lock, and waits until
/// it reports its services up.
fn spawn_serve(run: &RunDir, lease: &SlotLease) -> Result<u32> {
    let fd = lease.share_with_child()?;
    let exe = std::env::current_exe().context("locating hangar-local")?;
    let _ = fs::remove_file(run.status());
    let mut cmd = Command::new(exe);
    cmd.arg("serve")
        .arg("--run-dir")
        .arg(&run.root)
        .arg("--lock-fd")
        .arg(fd.to_string())
        .stdin(Stdio::null())
        .stdout(log_file(&run.serve_log())?)
        .stderr(log_file(&run.serve_log())?);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "hangar_local=info");
    }
    detach(&mut cmd);
    let child = cmd.spawn().context("starting the daemon")?;
    wait_serving(run, child)
}

fn wait_serving(run: &RunDir, mut child: Child) -> Result<u32> {
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = run.read_status() {
            if status.pid == pid {
                return Ok(pid);
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "the daemon exited ({status}) before it was ready; {}:\n{}",
                run.serve_log().display(),
                tail(&run.serve_log(), 20)
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!(
                "the daemon did not come up within 30s; {}:\n{}",
                run.serve_log().display(),
                tail(&run.serve_log(), 20)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Shell-quotes a value for an `export` line.
fn shell_quote(v: &str) -> String {
    if !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./:,=@+-".contains(c))
    {
        v.to_string()
    } else {
        format!("'{}'", v.replace('\'', "'\\''"))
    }
}

fn write_env(run: &RunDir, stack: &Stack) -> Result<()> {
    let mut text = String::from(
        "# hangar's local cloud: `source infra/local/run/env`.\n\
         # Written by `infra/local/cloud up`; removed by `down`.\n",
    );
    let mut vars = process_env(&stack.aws_endpoint, &stack.region);
    vars.extend(local_env(&stack.seeded, &stack.lb_url, &stack.key));
    vars.push((
        "HANGAR_LOCAL_SPECS".into(),
        run.specs().display().to_string(),
    ));
    for (k, v) in vars {
        text.push_str(&format!("export {k}={}\n", shell_quote(&v)));
    }
    let path = run.env();
    let tmp = run.root.join(".env.tmp");
    let mut f = File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn write_spec(run: &RunDir, stack: &Stack) -> Result<()> {
    let root = hangar_local::repo_root();
    let php = stack.app == "php";
    let runbook = if php {
        "runbooks/nginx-php-fpm.yaml"
    } else {
        "runbooks/static-http.yaml"
    };
    let spec = ClusterSpec::local_default(&SpecInputs {
        name: stack.seeded.launch_template_name.clone(),
        region: stack.region.clone(),
        launch_template_id: stack.seeded.launch_template_id.clone(),
        subnet_ids: stack.seeded.subnet_ids.clone(),
        target_group_arn: stack.seeded.target_group_arn.clone(),
        private_key: stack.key.clone(),
        runbook: root.join(runbook),
        release: stack.seeded.release.clone(),
        schema: root.join("crds/schema/cluster.json"),
        origin: "`infra/local/cloud up`".into(),
    })
    .comment("Scales between 2 and 6 nodes: `infra/local/cloud load --rps 20 --for 2m`")
    .comment("asks for 4 (20 rps = 1200/min, 300/min per node); scale-in follows 30s")
    .comment("after the load stops.");
    // Debian machines accept the cloud's key for `deploy` (sudo), not root.
    let spec = if stack.nodes.is_debian() {
        spec.set("spec.ssh.user", hangar_local::debian::machine::DEPLOY_USER)
    } else {
        spec
    };
    // The PHP fixture keeps its storage across releases; FPM reloads after
    // each activation (the deploy user may run exactly that, see the runbook).
    let spec = if php {
        spec.comment("The PHP fixture (infra/local/fixtures/php-app) on nginx + PHP-FPM.")
            .set(
                "spec.release.sharedPaths",
                hangar_local::spec::Yaml::list(["storage"]),
            )
            .set(
                "spec.release.hooks.afterActivate",
                hangar_local::spec::Yaml::list(["sudo systemctl reload php8.2-fpm"]),
            )
    } else {
        spec
    };
    spec.write_to(&run.spec())
        .with_context(|| format!("writing {}", run.spec().display()))
}

/// Stops the daemon (which stops its nodes), then moto, then kills any
/// node left behind; removes everything but the logs.
fn teardown(run: &RunDir) -> Result<Vec<String>> {
    let mut stopped = Vec::new();
    let (serve_pid, moto_pid) = run.stack_pids();
    if let Some(pid) = serve_pid {
        let nodes = run
            .read_status()
            .ok()
            .flatten()
            .map(|s| s.snapshot.nodes.len())
            .unwrap_or(0);
        // The daemon stops every node (≤10 s each, in parallel) before exiting.
        if stop_pid(pid, SERVE_NEEDLE, Duration::from_secs(30)) {
            stopped.push(format!("daemon (pid {pid}) and its {nodes} node(s)"));
        }
    }
    let moto_pids = moto_pid.into_iter().chain(
        fs::read_to_string(run.moto_pid())
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok()),
    );
    for pid in moto_pids {
        if stop_pid(pid, MOTO_NEEDLE, Duration::from_secs(5)) {
            stopped.push(format!("moto (pid {pid})"));
        }
    }
    let leftovers = hangar_local::hosts::sweep(&run.nodes())?;
    if leftovers > 0 {
        stopped.push(format!("{leftovers} leftover node(s)"));
    }
    // Bridge, namespaces, mounts and proxy of `debian` nodes, by exact
    // name and PID (nothing when the stack ran `lite` nodes).
    let slot = run
        .read_stack()
        .ok()
        .flatten()
        .map(|s| s.slot)
        .unwrap_or(hangar_local::slot::QUICKSTART);
    let slot = Slot::new(slot)
        .ok()
        .filter(|s| !hangar_local::debian::leftovers(s.bridged(), &run.root).is_empty());
    if let Some(slot) = slot {
        let swept = hangar_local::debian::sweep(slot.bridged(), &run.root)?;
        if !swept.is_empty() {
            stopped.push(format!(
                "debian leftovers ({} netns, {} links, {} mounts, {} processes)",
                swept.netns.len(),
                swept.links.len(),
                swept.mounts.len(),
                swept.pids.len()
            ));
        }
    }
    run.clean()?;
    Ok(stopped)
}

pub fn down(root: &Path) -> Result<ExitCode> {
    let began = Instant::now();
    let run = RunDir::new(root)?;
    // Unreadable (another version's): `down` still stops what it can find.
    let stack = run.read_stack().unwrap_or_else(|e| {
        eprintln!("warning: {e:#}");
        None
    });
    let stopped = teardown(&run)?;
    if stopped.is_empty() {
        println!("local cloud: nothing was running.");
    } else {
        println!(
            "local cloud down in {:.1}s: stopped {}.",
            began.elapsed().as_secs_f64(),
            stopped.join(", ")
        );
    }
    // Anything still holding the slot is not ours to stop; say so.
    if let Some(stack) = &stack {
        if let Ok(slot) = Slot::new(stack.slot) {
            if slot.is_busy().unwrap_or(false) {
                eprintln!("note: {slot} is still held by another process (a test?)");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn status(root: &Path, json: bool) -> Result<ExitCode> {
    let run = RunDir::new(root)?;
    let Some(stack) = run
        .read_stack()
        .context("`infra/local/cloud down` stops and cleans it anyway")?
    else {
        if json {
            println!("null");
        } else {
            println!("local cloud: down (nothing in {}).", run.root.display());
        }
        return Ok(ExitCode::from(3));
    };
    let daemon = run.read_status()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&daemon)?);
    }
    let moto_up = alive(stack.moto_pid, MOTO_NEEDLE);
    let serve_pid = stack.serve_pid.unwrap_or(0);
    let serve_up = alive(serve_pid, SERVE_NEEDLE);
    let age = daemon
        .as_ref()
        .and_then(|d| SystemTime::now().duration_since(d.snapshot.written).ok());
    let fresh = age.is_some_and(|a| a < Duration::from_secs(5));
    let healthy = moto_up && serve_up && fresh;
    if json {
        return Ok(if healthy {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let word = |up: bool| if up { "up" } else { "DOWN" };
    println!(
        "local cloud: {} (slot {}, {})",
        if healthy { "up" } else { "DEGRADED" },
        stack.slot,
        stack.seeded.vpc_cidr
    );
    println!(
        "  moto     {:<5} pid {:<7} {}  region {}",
        word(moto_up),
        stack.moto_pid,
        stack.endpoint,
        stack.region
    );
    println!(
        "  aws      {}  (AWS_ENDPOINT_URL: moto behind the daemon's ALB-aware gateway)",
        stack.aws_endpoint
    );
    println!(
        "  daemon   {:<5} pid {:<7} log {}",
        word(serve_up),
        serve_pid,
        run.serve_log().display()
    );
    match (&daemon, age) {
        (Some(d), Some(age)) => {
            let s = &d.snapshot;
            if !fresh {
                println!("  (daemon status is {}s old)", age.as_secs());
            }
            let routable = s.targets.iter().filter(|t| t.routable()).count();
            println!(
                "  lb       {}  targets: {} registered, {} healthy; {} requests so far",
                s.lb_url,
                s.targets.iter().filter(|t| t.registered).count(),
                routable,
                s.requests_total
            );
            if let Some(m) = &s.last_metrics {
                let ago = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|n| n.as_secs() as i64 - m.period_start)
                    .unwrap_or(0);
                println!(
                    "  metrics  every {}s; last interval ({}s ago): RequestCount {} RequestCountPerTarget {:.1} 5xx {}{}",
                    m.interval_secs,
                    ago,
                    m.counters.requests,
                    m.request_count_per_target,
                    m.counters.target_5xx,
                    m.error.as_ref().map(|e| format!("  PUBLISH FAILED: {e}")).unwrap_or_default()
                );
            }
            println!("  nodes    {}", s.nodes.len());
            for n in &s.nodes {
                let target = s.targets.iter().find(|t| t.instance_id == n.instance_id);
                let target = match target {
                    Some(t) if t.registered => format!(
                        "target {:?}{}, {} in flight, {} served",
                        t.health,
                        t.last_check_error
                            .as_ref()
                            .map(|e| format!(" ({e})"))
                            .unwrap_or_default(),
                        t.in_flight,
                        t.served
                    ),
                    Some(t) => format!("draining, {} in flight", t.in_flight),
                    None => "not registered".into(),
                };
                println!(
                    "    {}  {:<6} {:<15} {} procs  {}",
                    n.instance_id,
                    n.kind,
                    n.ip,
                    s.node_pids.get(&n.instance_id).copied().unwrap_or(0),
                    target
                );
            }
            for (id, e) in &s.node_errors {
                println!("    {id}  FAILED TO START: {e}");
            }
            if let Some(e) = &s.last_poll_error {
                println!("  ! listing instances fails: {e}");
            }
            if let Some(e) = &s.last_target_sync_error {
                println!("  ! reading the target group fails: {e}");
            }
        }
        _ => println!("  (no daemon status yet: {})", run.status().display()),
    }
    println!("  env      source {}", run.env().display());
    println!("  spec     {}", run.spec().display());
    if !healthy {
        println!(
            "  fix: `infra/local/cloud up` restarts a dead daemon; `down` then `up` starts over"
        );
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_summary(run: &RunDir, stack: &Stack) {
    println!(
        "  AWS API   {} (moto at {} behind the LB's gateway; region {})",
        stack.aws_endpoint, stack.endpoint, stack.region
    );
    println!("  LB        {}", stack.lb_url);
    println!(
        "  account   VPC {} ({}), subnets {}, launch template {}",
        stack.seeded.vpc_id,
        stack.seeded.vpc_cidr,
        stack.seeded.subnet_ids.join(","),
        stack.seeded.launch_template_id
    );
    println!("  target group {}", stack.seeded.target_group_arn);
    println!(
        "  release   {} ({})",
        stack.seeded.release.url, stack.seeded.release.id
    );
    println!("  env       source {}", run.env().display());
    println!("  spec      {}", run.spec().display());
    println!("  logs      {}", run.logs().display());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_values_survive_the_shell() {
        assert_eq!(
            shell_quote("http://127.77.0.1:4566"),
            "http://127.77.0.1:4566"
        );
        assert_eq!(shell_quote("subnet-a,subnet-b"), "subnet-a,subnet-b");
        assert_eq!(shell_quote("/path with space"), "'/path with space'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn pids_are_checked_against_their_command_line() {
        let me = std::process::id();
        assert!(alive(me, ""));
        assert!(!alive(me, "certainly-not-in-this-command-line"));
        assert!(!alive(u32::MAX, ""));
    }
}
