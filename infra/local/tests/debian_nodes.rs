//! `debian` nodes, end to end: Debian 12 machines booted by systemd-nspawn,
//! each with its own network namespace on the cloud's bridge, real sshd,
//! real apt through the host's proxy, the EC2 lifecycle.
//!
//! Each test starts its own cloud (own slot: own 198.18.x.0/21 and bridge)
//! and tears it down on drop. Waits are conditions polled until a
//! deadline; nothing sleeps blindly. The images are built on first use
//! (`infra/local/images/build`, ~1.5 min once per recipe) and then cached.
//!
//! The PHP stack on these machines — the stock runbooks applied by hangar's
//! own runbook engine, releases, hooks, workers — is tested end to end in
//! `tests/e2e/php.rs`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use hangar_local::debian::machine::DEPLOY_USER;
use hangar_local::{eventually, ImageVariant, LocalCloud, LocalCloudOptions, NodeKind};

/// Boot to SSH is ~2 s alone; two cores booting several machines while
/// other tests run need more.
const BOOT: Duration = Duration::from_secs(120);

/// One test of this binary at a time: each boots Debian machines, and two
/// tests booting side by side on a 2-core machine (or one of them killing
/// its helper's machines while the other leases a slot) turn boot
/// deadlines into flakes. The e2e suite does the same.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    // A test that panicked poisons the lock; the next one still runs.
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn debian_cloud(image: ImageVariant) -> LocalCloud {
    hangar_local::init_test_logging();
    LocalCloud::start(LocalCloudOptions {
        nodes: NodeKind::Debian { image },
        ..LocalCloudOptions::default()
    })
    .expect("local cloud with debian nodes starts (run `sudo infra/local/setup` once)")
}

/// Launches `n` instances and waits until each answers SSH as `deploy`.
fn launch_ready(cloud: &LocalCloud, n: u32) -> Vec<(String, Ipv4Addr)> {
    let started = Instant::now();
    let launched = cloud.launch(n).expect("RunInstances");
    assert_eq!(launched.len(), n as usize);
    for l in &launched {
        cloud
            .wait_ssh(&l.id, BOOT)
            .expect("the machine answers SSH");
    }
    eprintln!("{n} machine(s) launched to SSH in {:?}", started.elapsed());
    launched.into_iter().map(|l| (l.id, l.private_ip)).collect()
}

/// One `GET path` to `addr`; (status, headers, body). `None` if the
/// connection fails.
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, BTreeMap<String, String>, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.lines();
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    // Chunked bodies (nginx) are good enough for `contains` checks.
    Some((status, headers, body.to_string()))
}

fn out(o: &std::process::Output) -> String {
    format!(
        "exit {}; stdout: {}; stderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout).trim(),
        String::from_utf8_lossy(&o.stderr).trim()
    )
}

/// The image's cache key follows its recipe: an edited base recipe names a
/// new image for base and php, an edited php recipe only for php (checked
/// with `--check` against a copy of the recipe: nothing is built).
#[test]
fn image_names_follow_the_recipe_hash() {
    let _turn = turn();
    let script = hangar_local::debian::image::build_script();
    let recipe = script.parent().unwrap();
    let copy = std::env::temp_dir().join(format!("hangar-recipe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&copy);
    let cp = std::process::Command::new("cp")
        .arg("-a")
        .arg(recipe)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(cp.success());
    let cache = copy.join("cache");
    let check = |variant: &str| -> (Option<i32>, String) {
        let o = std::process::Command::new(copy.join("build"))
            .args(["--variant", variant, "--check"])
            .env("HANGAR_LOCAL_IMAGE_CACHE", &cache)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let name = text
            .split_whitespace()
            .find(|w| w.starts_with(&format!("{variant}-")))
            .unwrap_or_else(|| panic!("no image name in {text:?}"))
            .to_string();
        (o.status.code(), name)
    };
    let (code, base0) = check("base");
    assert_eq!(code, Some(3), "an empty cache has no image");
    let (_, php0) = check("php");
    // The copy hashes like the original: same recipe, same names.
    if let Some(built) = hangar_local::debian::Image::built(ImageVariant::Base).unwrap() {
        assert_eq!(built.path.file_name().unwrap().to_string_lossy(), base0);
    }
    std::fs::write(copy.join("php/packages"), "# edited\nnginx\n").unwrap();
    let (_, base1) = check("base");
    let (_, php1) = check("php");
    assert_eq!(base1, base0, "a php edit changed the base image");
    assert_ne!(php1, php0, "a php edit kept the php image");
    let mut setup = std::fs::read_to_string(copy.join("base/setup.sh")).unwrap();
    setup.push_str("\n# edited\n");
    std::fs::write(copy.join("base/setup.sh"), setup).unwrap();
    let (_, base2) = check("base");
    let (_, php2) = check("php");
    assert_ne!(base2, base1, "a base edit kept the base image");
    assert_ne!(php2, php1, "a base edit kept the php image");
    std::fs::remove_dir_all(&copy).unwrap();
}

/// Boots, logs in as `deploy` verifying the key the machine generated, and
/// proves the machines' networks are theirs: port 80 on one node is not
/// port 80 on another, and nothing routes beyond the bridge.
#[test]
fn machines_boot_answer_ssh_with_their_own_host_key_and_own_network() {
    let _turn = turn();
    let cloud = debian_cloud(ImageVariant::Base);
    let vpc = cloud.slot().bridged();
    let nodes = launch_ready(&cloud, 2);
    let (a, a_ip) = nodes[0].clone();
    let (b, b_ip) = nodes[1].clone();
    assert!(
        vpc.contains(a_ip) && vpc.contains(b_ip),
        "{a_ip} {b_ip} outside {}",
        vpc.cidr()
    );
    assert_eq!(cloud.node_ip(&a), Some(a_ip));

    // Each machine generated its own host key; SSH verifies against it
    // (StrictHostKeyChecking=yes with exactly that key known).
    let key_a = cloud.host_key(&a).unwrap();
    let key_b = cloud.host_key(&b).unwrap();
    assert!(key_a.starts_with("ssh-ed25519 "), "{key_a}");
    assert_ne!(key_a, key_b, "two machines share a host key");
    let served = cloud
        .machine(&a)
        .unwrap()
        .exec_ok("cat /etc/ssh/ssh_host_ed25519_key.pub")
        .unwrap();
    assert_eq!(served.trim(), key_a);
    assert_eq!(
        cloud.ssh_ok(&a, DEPLOY_USER, "id -un").unwrap().trim(),
        "deploy"
    );
    // Passwordless sudo (-n fails instead of prompting).
    assert_eq!(
        cloud
            .ssh_ok(&a, DEPLOY_USER, "sudo -n id -u")
            .unwrap()
            .trim(),
        "0"
    );
    // A wrong key for the address is refused, not trusted.
    let known = cloud.known_hosts(&a).unwrap();
    std::fs::write(
        &known,
        format!(
            "{a_ip} {}\n",
            key_b
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
        ),
    )
    .unwrap();
    let spoofed = std::process::Command::new("ssh")
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
        ])
        .arg(format!("UserKnownHostsFile={}", known.display()))
        .arg("-i")
        .arg(cloud.key_path())
        .arg(format!("deploy@{a_ip}"))
        .arg("true")
        .output()
        .unwrap();
    assert!(
        !spoofed.status.success(),
        "ssh accepted another machine's host key"
    );
    // root has no key on a machine (like a cloud image): deploy + sudo only.
    let root = cloud.ssh(&a, "root", "true").unwrap();
    assert!(!root.status.success(), "root logged in: {}", out(&root));

    // systemd is PID 1 and came up without failed units.
    let m = cloud.machine(&a).unwrap();
    assert_eq!(m.exec_ok("cat /proc/1/comm").unwrap().trim(), "systemd");
    let state = eventually(BOOT, "systemd finished booting", || {
        let s = m.exec("systemctl is-system-running").ok()?;
        let s = String::from_utf8_lossy(&s.stdout).trim().to_string();
        (s != "starting" && s != "initializing").then_some(s)
    })
    .unwrap();
    let failed = m.exec_ok("systemctl --failed --no-legend --plain").unwrap();
    assert_eq!(state, "running", "failed units: {failed}");
    assert_eq!(
        m.exec_ok("hostname").unwrap().trim(),
        format!("ip-{}", a_ip.to_string().replace('.', "-"))
    );

    // The node's interface holds the instance's IP; its only route is the
    // VPC's, on-link: no default route, and no way to add one.
    let addrs = m.exec_ok("ip -4 -o addr show dev eth0").unwrap();
    assert!(addrs.contains(&format!("inet {a_ip}/21")), "{addrs}");
    let routes = m.exec_ok("ip -4 route").unwrap();
    assert!(!routes.contains("default"), "a default route: {routes}");
    assert_eq!(routes.lines().count(), 1, "{routes}");
    // `ip route get` asks the kernel only: no packet leaves for the check.
    let beyond = m.exec("ip route get 203.0.113.10").unwrap();
    assert!(
        !beyond.status.success(),
        "a route beyond the VPC: {}",
        out(&beyond)
    );
    // Root inside the machine (not nsenter from the host) lacks CAP_NET_ADMIN.
    let add = cloud
        .ssh(
            &a,
            DEPLOY_USER,
            &format!("sudo -n ip route add default via {}", vpc.gateway()),
        )
        .unwrap();
    assert!(
        !add.status.success(),
        "the machine could add a default route"
    );
    assert!(
        String::from_utf8_lossy(&add.stderr).contains("Operation not permitted"),
        "{}",
        out(&add)
    );
    assert!(
        m.exec_ok("ip -6 addr").unwrap().trim().is_empty(),
        "IPv6 addresses on a node"
    );
    // Its network namespace's own sysctls are its to tune (a runbook raises
    // the accept-queue caps), not the host's; forwarding stays refused, and
    // the rest of /proc/sys is the host kernel's, read-only.
    let host_somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn").unwrap();
    let tuned = cloud
        .ssh(
            &a,
            DEPLOY_USER,
            "sudo -n sysctl -w net.core.somaxconn=12345 net.ipv4.tcp_max_syn_backlog=12345",
        )
        .unwrap();
    assert!(tuned.status.success(), "{}", out(&tuned));
    assert_eq!(
        m.exec_ok("cat /proc/sys/net/core/somaxconn")
            .unwrap()
            .trim(),
        "12345"
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/core/somaxconn").unwrap(),
        host_somaxconn,
        "the node changed the host's somaxconn"
    );
    for refused in [
        "net.ipv4.ip_forward=1",
        "vm.swappiness=1",
        "fs.file-max=100000",
    ] {
        let o = cloud
            .ssh(&a, DEPLOY_USER, &format!("sudo -n sysctl -w {refused}"))
            .unwrap();
        assert!(!o.status.success(), "{refused} was allowed: {}", out(&o));
    }

    // A server on port 80 of node A (a systemd unit, as a runbook starts
    // one) is reachable from the host at A's IP, and only there.
    let server = r#"use IO::Socket::INET; my $s = IO::Socket::INET->new(LocalAddr => "0.0.0.0:80", Listen => 16, ReuseAddr => 1) or die "bind: $!"; while (my $c = $s->accept) { my $h = `hostname`; chomp $h; while (my $l = <$c>) { last if $l =~ /^\r?\n$/ } print $c "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello from $h\n"; close $c }"#;
    cloud
        .ssh_ok(
            &a,
            DEPLOY_USER,
            &format!(
                "sudo -n systemd-run --unit=hello-http --property=Restart=no perl -e '{server}'"
            ),
        )
        .unwrap();
    let (status, _, body) = eventually(Duration::from_secs(20), "hello-http on node A", || {
        http_get(SocketAddr::from((a_ip, 80)), "/")
    })
    .unwrap();
    assert_eq!(status, 200);
    assert!(
        body.contains(&format!(
            "hello from ip-{}",
            a_ip.to_string().replace('.', "-")
        )),
        "{body}"
    );
    let refused = TcpStream::connect_timeout(&SocketAddr::from((b_ip, 80)), Duration::from_secs(2));
    assert!(
        refused.is_err(),
        "node B answers on port 80 although only A listens"
    );
    // Nor does the host itself listen on A's port (the lite nodes' catch).
    let on_host = cloud
        .machine(&b)
        .unwrap()
        .exec_ok("ss -Htln 'sport = :80'")
        .unwrap();
    assert!(
        on_host.trim().is_empty(),
        "B sees a listener on :80: {on_host}"
    );
    // Node to node through the bridge, like two instances in one VPC.
    let via_b = cloud
        .ssh_ok(
            &b,
            DEPLOY_USER,
            &format!("curl -s --max-time 5 http://{a_ip}/"),
        )
        .unwrap();
    assert!(via_b.contains("hello from"), "{via_b}");

    // Memory per node (PSS of its processes), for the README.
    let mem = cloud.node_memory_kib(&a).unwrap();
    eprintln!("node memory (PSS): {} KiB", mem);
    assert!(mem > 1000, "implausible memory reading {mem} KiB");
}

/// `apt-get install` inside a node runs for real against the Debian archive
/// through the host's apt-cacher-ng on the bridge address.
#[test]
fn apt_installs_a_package_from_the_archive_through_the_proxy() {
    let _turn = turn();
    let cloud = debian_cloud(ImageVariant::Base);
    let (id, _) = launch_ready(&cloud, 1).remove(0);
    let gateway = cloud.vpc_gateway().unwrap();
    let conf = cloud
        .ssh_ok(&id, DEPLOY_USER, "cat /etc/apt/apt.conf.d/00hangar-proxy")
        .unwrap();
    assert!(conf.contains(&format!("http://{gateway}:3142/")), "{conf}");
    let started = Instant::now();
    let install = cloud
        .ssh(
            &id,
            DEPLOY_USER,
            "export DEBIAN_FRONTEND=noninteractive; sudo -n apt-get update -q && \
             sudo -n apt-get install -y -q --no-install-recommends hello",
        )
        .unwrap();
    assert!(
        install.status.success(),
        "apt-get failed: {}",
        out(&install)
    );
    eprintln!("apt-get update + install hello: {:?}", started.elapsed());
    assert_eq!(
        cloud.ssh_ok(&id, DEPLOY_USER, "hello").unwrap().trim(),
        "Hello, world!"
    );
    // It came through the proxy: the package sits in its cache.
    let cache = cloud.hosts().apt_cache_dir().expect("the proxy runs");
    let pool = cache.join("deb.debian.org/debian/pool/main/h/hello");
    let cached: Vec<_> = std::fs::read_dir(&pool)
        .unwrap_or_else(|e| panic!("{}: {e}", pool.display()))
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".deb"))
        .collect();
    assert!(!cached.is_empty(), "no hello .deb in {}", pool.display());
}

/// Stop keeps the disk (a file, the host key) and the IP; start boots the
/// same disk; reboot restarts the machine (a new boot: /run is empty
/// again) on the same disk; terminate deletes machine and disk.
#[test]
fn stop_start_reboot_and_terminate_follow_ec2() {
    let _turn = turn();
    let cloud = debian_cloud(ImageVariant::Base);
    let (id, ip) = launch_ready(&cloud, 1).remove(0);
    let key = cloud.host_key(&id).unwrap();
    cloud
        .ssh_ok(&id, DEPLOY_USER, "echo kept > ~/disk-file && sync")
        .unwrap();
    cloud
        .ssh_ok(
            &id,
            DEPLOY_USER,
            "sudo -n sh -c 'echo gone > /run/boot-file'",
        )
        .unwrap();
    let netns = cloud.machine(&id).unwrap().net().netns.clone();
    let mac = |cloud: &LocalCloud| {
        cloud
            .ssh_ok(&id, DEPLOY_USER, "cat /sys/class/net/eth0/address")
            .unwrap()
            .trim()
            .to_string()
    };
    let mac_before = mac(&cloud);

    // Stop: the machine powers off, its namespace and mount go, the disk stays.
    let began = Instant::now();
    cloud.stop_instances(&[&id]).unwrap();
    cloud.wait_no_node(&id, Duration::from_secs(60)).unwrap();
    eprintln!("stop to powered off: {:?}", began.elapsed());
    let state = cloud.state_dir().join("nodes").join(&id);
    assert!(
        state.join("upper/home/deploy/disk-file").is_file(),
        "the disk lost a file"
    );
    let left = cloud.debian_leftovers();
    assert!(
        !left.netns.contains(&netns),
        "netns {netns} survived the stop"
    );
    assert!(
        left.mounts.is_empty(),
        "mounts survived the stop: {:?}",
        left.mounts
    );
    // (The cloud's apt proxy runs on; nothing of the machine does.)
    let machine_pids = hangar_local::debian::machine::pids_naming(&state);
    assert!(
        machine_pids.is_empty(),
        "processes survived the stop: {machine_pids:?}"
    );

    // Start: same disk, same host key, same IP.
    let began = Instant::now();
    cloud.start_instances(&[&id]).unwrap();
    cloud.wait_ssh(&id, BOOT).unwrap();
    eprintln!("start to SSH: {:?}", began.elapsed());
    assert_eq!(cloud.node_ip(&id), Some(ip));
    // Same MAC as before, as an ENI keeps it: a new one would leave the
    // host's neighbour entry for the address stale for seconds.
    assert_eq!(mac(&cloud), mac_before, "the MAC changed across stop/start");
    assert_eq!(
        cloud.host_key(&id).unwrap(),
        key,
        "the host key changed across stop/start"
    );
    assert_eq!(
        cloud
            .ssh_ok(&id, DEPLOY_USER, "cat ~/disk-file")
            .unwrap()
            .trim(),
        "kept"
    );
    let run = cloud.ssh(&id, DEPLOY_USER, "cat /run/boot-file").unwrap();
    assert!(!run.status.success(), "/run survived a power cycle");

    // Reboot: a new init, same disk.
    cloud
        .ssh_ok(
            &id,
            DEPLOY_USER,
            "sudo -n sh -c 'echo gone > /run/boot-file'",
        )
        .unwrap();
    let before = cloud.node(&id).unwrap().listener_pid;
    let began = Instant::now();
    cloud.reboot_instances(&[&id]).unwrap();
    eventually(BOOT, "the machine back after reboot", || {
        let view = cloud.node(&id)?;
        (view.listener_pid != before
            && cloud
                .ssh(&id, DEPLOY_USER, "true")
                .map(|o| o.status.success())
                .unwrap_or(false))
        .then_some(())
    })
    .unwrap();
    eprintln!("reboot to SSH: {:?}", began.elapsed());
    assert_eq!(
        cloud
            .ssh_ok(&id, DEPLOY_USER, "cat ~/disk-file")
            .unwrap()
            .trim(),
        "kept"
    );
    assert!(!cloud
        .ssh(&id, DEPLOY_USER, "cat /run/boot-file")
        .unwrap()
        .status
        .success());
    assert_eq!(cloud.host_key(&id).unwrap(), key);

    // Terminate: machine and disk are gone.
    cloud.terminate(&[&id]).unwrap();
    cloud.wait_no_node(&id, Duration::from_secs(60)).unwrap();
    eventually(Duration::from_secs(30), "the disk deleted", || {
        (!state.exists()).then_some(())
    })
    .unwrap();
    let left = cloud.debian_leftovers();
    assert!(left.netns.is_empty() && left.mounts.is_empty(), "{left:?}");
    assert!(hangar_local::debian::machine::pids_naming(&state).is_empty());
}

/// Dropping the cloud leaves nothing: no nspawn or machine process, no
/// overlay mount, no bridge, veth or namespace, no proxy.
#[test]
fn dropping_the_cloud_leaves_nothing_behind() {
    let _turn = turn();
    let cloud = debian_cloud(ImageVariant::Base);
    let nodes = launch_ready(&cloud, 2);
    let vpc = cloud.slot().bridged();
    let state_dir = cloud.state_dir().to_path_buf();
    let during = cloud.debian_leftovers();
    assert_eq!(during.netns.len(), 2, "{during:?}");
    assert!(during.links.contains(&vpc.bridge_name()), "{during:?}");
    assert_eq!(during.mounts.len(), 2, "{during:?}");
    let machines: Vec<u32> = nodes
        .iter()
        .map(|(id, _)| cloud.node(id).unwrap().listener_pid)
        .collect();
    // A process a session left behind must die with the machine too.
    cloud
        .ssh_ok(
            &nodes[0].0,
            DEPLOY_USER,
            "setsid sleep 600 </dev/null >/dev/null 2>&1 &",
        )
        .unwrap();
    drop(cloud);
    let after = hangar_local::debian::leftovers(vpc, &state_dir);
    assert!(after.is_empty(), "left behind: {after:?}");
    for pid in machines {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "machine init {pid} alive"
        );
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&*state_dir.to_string_lossy()),
        "a mount under {} survived",
        state_dir.display()
    );
    assert!(!Path::new("/sys/class/net").join(vpc.bridge_name()).exists());
}

/// Env var that turns [`crash_helper`] on: the slot it starts its cloud on.
const CRASH_SLOT: &str = "HANGAR_TEST_CRASH_SLOT";

/// Not a test of its own: run by the test below in a child process, which
/// it then kills with SIGKILL (no drop, no cleanup) once a machine runs.
#[test]
#[ignore = "helper: run by a_killed_test_leaves_machines_the_next_cloud_on_its_slot_removes"]
fn crash_helper() {
    let Some(slot) = std::env::var(CRASH_SLOT)
        .ok()
        .and_then(|s| s.parse::<u8>().ok())
    else {
        return;
    };
    let cloud = LocalCloud::start(LocalCloudOptions {
        slot: Some(slot),
        nodes: NodeKind::Debian {
            image: ImageVariant::Base,
        },
        ..LocalCloudOptions::default()
    })
    .unwrap();
    let (id, _) = launch_ready(&cloud, 1).remove(0);
    let pid = cloud.node(&id).unwrap().listener_pid;
    println!("READY {id} {pid}");
    std::io::stdout().flush().unwrap();
    // Bounded: the parent kills this process long before.
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        std::thread::park_timeout(Duration::from_secs(1));
    }
}

/// A test process killed with SIGKILL leaves its machine running (nothing
/// could stop it); the next cloud on the same slot removes all of it first.
#[test]
fn a_killed_test_leaves_machines_the_next_cloud_on_its_slot_removes() {
    let _turn = turn();
    use std::io::BufRead;
    // The slot is free when leased here, but another test of this binary
    // may take it before the helper does: then the helper ends early and
    // another free slot is tried.
    let mut attempts = 0;
    let (slot, mut child, ready) = loop {
        attempts += 1;
        let slot = {
            let lease = hangar_local::slot::lease_any().unwrap();
            lease.slot()
        };
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "crash_helper", "--ignored", "--nocapture"])
            .env(CRASH_SLOT, slot.index().to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(stdout).lines();
        let ready = loop {
            match lines.next() {
                Some(Ok(line)) if line.starts_with("READY ") => break Some(line),
                Some(Ok(_)) => continue,
                _ => break None,
            }
        };
        match ready {
            Some(line) => break (slot, child, line),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                assert!(attempts < 5, "the helper never got its machine running");
            }
        }
    };
    let mut parts = ready.split_whitespace().skip(1);
    let (id, init): (String, u32) = (
        parts.next().unwrap().to_string(),
        parts.next().unwrap().parse().unwrap(),
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let vpc = slot.bridged();
    let state_dir = std::path::PathBuf::from(format!("/tmp/hangar-local/slot-{}", slot.index()));
    let left = hangar_local::debian::leftovers(vpc, &state_dir);
    assert!(
        left.netns.iter().any(|n| n.ends_with(&id)) && !left.mounts.is_empty(),
        "the killed run left nothing to clean: {left:?}"
    );
    assert!(
        Path::new(&format!("/proc/{init}")).exists(),
        "its machine died with it"
    );

    // The slot's next cloud (the lease died with the helper).
    let cloud = eventually(Duration::from_secs(10), "the slot free again", || {
        LocalCloud::start(LocalCloudOptions {
            slot: Some(slot.index()),
            nodes: NodeKind::Debian {
                image: ImageVariant::Base,
            },
            ..LocalCloudOptions::default()
        })
        .ok()
    })
    .unwrap();
    let now = cloud.debian_leftovers();
    assert!(!now.netns.iter().any(|n| n.ends_with(&id)), "{now:?}");
    assert!(now.mounts.is_empty(), "{now:?}");
    let machine_gone = eventually(
        Duration::from_secs(10),
        "the old machine's init gone",
        || {
            let stat = std::fs::read_to_string(format!("/proc/{init}/stat")).ok();
            // Gone, or a zombie waiting for its (new) parent to reap it.
            stat.is_none_or(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .then_some(())
        },
    );
    assert!(
        machine_gone.is_ok(),
        "machine init {init} survived the sweep"
    );
    drop(cloud);
    assert!(hangar_local::debian::leftovers(vpc, &state_dir).is_empty());
}
