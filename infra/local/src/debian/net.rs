//! The VPC's wiring on the host: one bridge per cloud (`hangar-s<n>`,
//! holding the VPC's gateway address) and, per node, a network namespace
//! (`hangar-s<n>-<instance id>`) joined to the bridge by a veth pair whose
//! inner end, `eth0`, holds the instance's private IP.
//!
//! Nothing leaves the machine: addresses come from 198.18.0.0/15 (never
//! routed), a node's only route is its on-link /21 (no default route, and
//! machines run without `CAP_NET_ADMIN`, so they cannot add one), the host
//! does not forward what arrives on the bridge (`forwarding=0` on the bridge
//! and every veth) and there is no NAT. IPv6 is off on all of it, so not
//! even link-local addresses appear. The host reaches every node through
//! the bridge's connected route; nodes reach the host only at the gateway
//! address (the apt proxy).

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{run, DebianError, Result};
use crate::slot::{BridgedVpc, BRIDGED_PREFIX};

/// iproute2.
pub const IP: &str = "/usr/sbin/ip";

/// Where `ip netns` keeps its namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// Interface names the kernel accepts (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;

fn ip() -> Command {
    Command::new(IP)
}

/// Names of the network namespaces `ip netns` knows.
pub fn netns_names() -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(NETNS_DIR)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Names of the host's network interfaces.
pub fn link_names() -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir("/sys/class/net")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Deletes one interface by exact name (gone already is fine).
pub fn delete_link(name: &str) -> Result<()> {
    if !link_exists(name) {
        return Ok(());
    }
    match run(ip().args(["link", "del", "dev", name])) {
        Err(_) if !link_exists(name) => Ok(()),
        other => other.map(drop),
    }
}

/// Deletes one network namespace by exact name (gone already is fine);
/// the interfaces inside go with it, and so do their veth peers.
pub fn delete_netns(name: &str) -> Result<()> {
    if !Path::new(NETNS_DIR).join(name).exists() {
        return Ok(());
    }
    run(ip().args(["netns", "delete", name])).map(drop)
}

/// Writes a sysctl under `/proc/sys/net` (of this process's namespace).
fn sysctl(path: &str, value: &str) -> Result<()> {
    let full = Path::new("/proc/sys/net").join(path);
    fs::write(&full, value).map_err(super::io_err(format!("writing {}", full.display())))
}

/// The cloud's bridge on the host.
#[derive(Clone, Debug)]
pub struct Bridge {
    pub name: String,
    pub gateway: Ipv4Addr,
}

impl Bridge {
    /// Creates the bridge with the gateway address, or takes over the one a
    /// previous daemon of the same cloud left (its nodes are still on it).
    pub fn ensure(vpc: BridgedVpc) -> Result<Bridge> {
        let bridge = Bridge {
            name: vpc.bridge_name(),
            gateway: vpc.gateway(),
        };
        if !link_exists(&bridge.name) {
            run(ip().args(["link", "add", "name", &bridge.name, "type", "bridge"]))?;
        }
        // Before any address: no IPv6 link-local either.
        sysctl(&format!("ipv6/conf/{}/disable_ipv6", bridge.name), "1")?;
        sysctl(&format!("ipv4/conf/{}/forwarding", bridge.name), "0")?;
        let cidr = format!("{}/{BRIDGED_PREFIX}", bridge.gateway);
        let addrs = run(ip().args(["-4", "-o", "addr", "show", "dev", &bridge.name]))?;
        if !addrs.contains(&format!(" {cidr} ")) {
            run(ip().args(["addr", "add", &cidr, "dev", &bridge.name]))?;
        }
        run(ip().args(["link", "set", "dev", &bridge.name, "up"]))?;
        Ok(bridge)
    }

    /// Deletes the bridge (its veths must be gone: nodes stopped first).
    pub fn remove(&self) -> Result<()> {
        delete_link(&self.name)
    }
}

/// A node's network: its namespace and veth pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeNet {
    /// `hangar-s<n>-<instance id>`.
    pub netns: String,
    /// Host end, `hg<n>-<last 8 of the instance id>`.
    pub veth: String,
    pub ip: Ipv4Addr,
}

impl NodeNet {
    pub fn for_instance(vpc: BridgedVpc, instance_id: &str, ip: Ipv4Addr) -> Result<NodeNet> {
        let id_ok = !instance_id.is_empty()
            && instance_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !id_ok {
            return Err(DebianError::Refused {
                what: format!("name a namespace after instance id {instance_id:?}"),
            });
        }
        let tail: String = {
            let id = instance_id.trim_start_matches("i-");
            id[id.len().saturating_sub(8)..].to_string()
        };
        let veth = format!("{}{tail}", vpc.veth_prefix());
        if veth.len() > MAX_IFNAME {
            return Err(DebianError::Refused {
                what: format!("use interface name {veth} (longer than {MAX_IFNAME})"),
            });
        }
        Ok(NodeNet {
            netns: format!("{}{instance_id}", vpc.netns_prefix()),
            veth,
            ip,
        })
    }

    /// The node's MAC, fixed by its address as an ENI's is for its life: a
    /// stopped and started machine (same address, new veth) must not get a
    /// new one, or the host's neighbour entry for the address keeps
    /// pointing at the old MAC and the node is unreachable until it
    /// expires (seconds to tens of seconds; a started warm node measured
    /// 9 s to first answer SSH instead of 1 s). Locally administered
    /// unicast (`02:…`), the address's four octets last.
    pub fn mac(&self) -> String {
        let [a, b, c, d] = self.ip.octets();
        format!("02:00:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
    }

    /// `/run/netns/<name>`, for `systemd-nspawn --network-namespace-path`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.netns)
    }

    /// Creates the namespace, the veth pair on `bridge` and the address,
    /// replacing leftovers of the same names.
    pub fn create(&self, bridge: &Bridge) -> Result<()> {
        self.remove()?;
        let made = self.try_create(bridge);
        if made.is_err() {
            let _ = self.remove();
        }
        made
    }

    fn try_create(&self, bridge: &Bridge) -> Result<()> {
        run(ip().args(["netns", "add", &self.netns]))?;
        // IPv6 off inside before any interface is up.
        run(ip()
            .args(["netns", "exec", &self.netns, "/bin/sh", "-c"])
            .arg(
                "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 && \
             echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6",
            ))?;
        run(ip().args([
            "link",
            "add",
            "name",
            &self.veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "address",
            &self.mac(),
            "netns",
            &self.netns,
        ]))?;
        sysctl(&format!("ipv6/conf/{}/disable_ipv6", self.veth), "1")?;
        sysctl(&format!("ipv4/conf/{}/forwarding", self.veth), "0")?;
        run(ip().args([
            "link",
            "set",
            "dev",
            &self.veth,
            "master",
            &bridge.name,
            "up",
        ]))?;
        let cidr = format!("{}/{BRIDGED_PREFIX}", self.ip);
        run(ip().args(["-n", &self.netns, "addr", "add", &cidr, "dev", "eth0"]))?;
        run(ip().args(["-n", &self.netns, "link", "set", "dev", "eth0", "up"]))?;
        run(ip().args(["-n", &self.netns, "link", "set", "dev", "lo", "up"]))?;
        Ok(())
    }

    /// Deletes the namespace and the host end of the veth (by exact name).
    pub fn remove(&self) -> Result<()> {
        delete_netns(&self.netns)?;
        delete_link(&self.veth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slot::Slot;

    #[test]
    fn names_carry_the_slot_and_fit_the_kernel() {
        let vpc = Slot::new(63).unwrap().bridged();
        let n = NodeNet::for_instance(vpc, "i-0123456789abcdef0", Ipv4Addr::new(198, 19, 249, 4))
            .unwrap();
        assert_eq!(n.netns, "hangar-s63-i-0123456789abcdef0");
        assert_eq!(n.veth, "hg63-9abcdef0");
        assert!(n.veth.len() <= MAX_IFNAME);
        assert_eq!(n.mac(), "02:00:c6:13:f9:04");
        assert_eq!(
            n.path(),
            Path::new("/run/netns/hangar-s63-i-0123456789abcdef0")
        );
        assert!(NodeNet::for_instance(vpc, "../etc", Ipv4Addr::LOCALHOST).is_err());
        assert!(NodeNet::for_instance(vpc, "", Ipv4Addr::LOCALHOST).is_err());
    }
}
