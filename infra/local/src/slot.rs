//! Address plan of one local cloud, and the lease that keeps two clouds
//! from using the same addresses at once.
//!
//! Nodes bind real loopback addresses on the host, so two clouds running at
//! the same time (parallel tests, a test beside the quickstart) must never
//! hand out the same instance IPs or LB address. Each cloud therefore runs
//! in a *slot*: slot `n` owns `127.(77+n).0.0/16` — its VPC — with subnets
//! `127.(77+n).1.0/24` and `127.(77+n).2.0/24` (moto assigns instances `.4`,
//! `.5`, … there), the LB listener at `127.(77+n).0.1:80` and the AWS
//! gateway at `127.(77+n).0.1:4566`.
//!
//! Slot 0 (`127.77.0.0/16`) is the quickstart's (`infra/local/cloud up`);
//! tests lease any free slot from 1 up. [`node::IpPool::tests`] hands out
//! `127.77.128.0` and above, which no slot's subnets reach.
//!
//! A lease is an `flock` on `<LEASE_DIR>/slot-<n>.lock`: released when the
//! holder closes it or dies, so a crashed test never blocks a slot for good.

use std::fs::{self, File, OpenOptions};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;

use crate::node::LEASE_DIR;

/// The quickstart's slot.
pub const QUICKSTART: u8 = 0;

/// Highest slot number (second octets 77..=140).
pub const MAX: u8 = 63;

/// Second octet of slot 0.
const BASE_OCTET: u8 = 77;

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("slot {0} does not exist (0..={MAX})")]
    OutOfRange(u8),
    #[error("slot {slot} ({cidr}) is in use by another local cloud (lock {path}); for slot 0 that is usually `infra/local/cloud up` — stop it with `infra/local/cloud down`")]
    Busy {
        slot: u8,
        cidr: String,
        path: PathBuf,
    },
    #[error("every local-cloud slot 1..={MAX} is in use (locks in {dir})")]
    Exhausted { dir: PathBuf },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// One cloud's share of 127.0.0.0/8.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Slot(u8);

impl Slot {
    pub fn new(index: u8) -> Result<Slot, SlotError> {
        if index > MAX {
            return Err(SlotError::OutOfRange(index));
        }
        Ok(Slot(index))
    }

    pub fn index(self) -> u8 {
        self.0
    }

    fn octet(self) -> u8 {
        BASE_OCTET + self.0
    }

    /// `127.(77+n).0.0/16`.
    pub fn vpc_cidr(self) -> String {
        format!("127.{}.0.0/16", self.octet())
    }

    /// Two `/24`s inside the VPC, one per availability zone.
    pub fn subnet_cidrs(self) -> [String; 2] {
        [
            format!("127.{}.1.0/24", self.octet()),
            format!("127.{}.2.0/24", self.octet()),
        ]
    }

    /// Where the LB data plane listens by default: outside both subnets.
    pub fn lb_addr(self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::new(127, self.octet(), 0, 1), 80))
    }

    /// Where the AWS gateway (`AWS_ENDPOINT_URL`) listens: the LB's address,
    /// port 4566 (what other local AWS emulators use).
    pub fn gateway_addr(self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::new(127, self.octet(), 0, 1), 4566))
    }

    /// Whether `ip` is inside this slot's VPC (the only addresses its
    /// host manager turns into nodes).
    pub fn contains(self, ip: Ipv4Addr) -> bool {
        let o = ip.octets();
        o[0] == 127 && o[1] == self.octet()
    }

    /// This slot's VPC for `debian` nodes (see [`BridgedVpc`]).
    pub fn bridged(self) -> BridgedVpc {
        BridgedVpc {
            base: Ipv4Addr::from(u32::from(BRIDGED_RANGE) + u32::from(self.0) * BRIDGED_SIZE),
            slot: self.0,
        }
    }

    fn lock_path(self) -> PathBuf {
        PathBuf::from(LEASE_DIR).join(format!("slot-{}.lock", self.0))
    }

    /// Leases exactly this slot, failing if anyone holds it.
    pub fn lease(self) -> Result<SlotLease, SlotError> {
        self.try_lease()?.ok_or_else(|| SlotError::Busy {
            slot: self.0,
            cidr: self.vpc_cidr(),
            path: self.lock_path(),
        })
    }

    /// Whether some process holds this slot right now.
    pub fn is_busy(self) -> Result<bool, SlotError> {
        Ok(self.try_lease()?.is_none())
    }

    fn try_lease(self) -> Result<Option<SlotLease>, SlotError> {
        fs::create_dir_all(LEASE_DIR).map_err(|source| SlotError::Io {
            context: format!("creating {LEASE_DIR}"),
            source,
        })?;
        let path = self.lock_path();
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o666)
            .open(&path)
            .map_err(|source| SlotError::Io {
                context: format!("opening {}", path.display()),
                source,
            })?;
        // SAFETY: flock(2) on a descriptor we own; released on close or exit.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        Ok((rc == 0).then_some(SlotLease {
            slot: self,
            lock: file,
        }))
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "slot {} ({})", self.0, self.vpc_cidr())
    }
}

/// First address of the range `debian` nodes' VPCs are carved from:
/// 198.18.0.0/15, reserved for benchmarking (RFC 2544) and never routed on
/// the internet, so a node address can never be anybody else's host.
pub const BRIDGED_RANGE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);

/// Addresses per slot in [`BRIDGED_RANGE`]: a /21, 64 slots fill the /15.
const BRIDGED_SIZE: u32 = 2048;

/// Prefix length of a bridged VPC (and of every node's address: all of a
/// cloud's nodes share one layer-2 segment, the cloud's bridge).
pub const BRIDGED_PREFIX: u8 = 21;

/// A slot's VPC for `debian` nodes, which have their own network namespace
/// and cannot hold a loopback address: `198.18.0.0 + n·2048` as a /21.
/// Slot 0: `198.18.0.0/21`, subnets `198.18.1.0/24` and `198.18.2.0/24`,
/// the host's bridge at `198.18.0.1` (outside both subnets, like the LB's
/// `127.77.0.1` for `lite` nodes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BridgedVpc {
    base: Ipv4Addr,
    slot: u8,
}

impl BridgedVpc {
    pub fn network(self) -> Ipv4Addr {
        self.base
    }

    pub fn cidr(self) -> String {
        format!("{}/{BRIDGED_PREFIX}", self.base)
    }

    /// Two `/24`s, one per availability zone (third octet +1 and +2).
    pub fn subnet_cidrs(self) -> [String; 2] {
        [
            format!("{}/24", self.offset(256)),
            format!("{}/24", self.offset(512)),
        ]
    }

    /// The host end of the cloud's bridge: what nodes reach the host at
    /// (the apt proxy listens here).
    pub fn gateway(self) -> Ipv4Addr {
        self.offset(1)
    }

    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & !(BRIDGED_SIZE - 1) == u32::from(self.base)
    }

    /// The cloud's bridge on the host: `hangar-s<n>`.
    pub fn bridge_name(self) -> String {
        format!("hangar-s{}", self.slot)
    }

    /// Prefix of every network namespace this slot's nodes get.
    pub fn netns_prefix(self) -> String {
        format!("hangar-s{}-", self.slot)
    }

    /// Prefix of the host ends of this slot's veth pairs (`hg<n>-…`, kept
    /// short: interface names have at most 15 characters).
    pub fn veth_prefix(self) -> String {
        format!("hg{}-", self.slot)
    }

    fn offset(self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + n)
    }
}

/// Leases the first free test slot (1..=MAX).
pub fn lease_any() -> Result<SlotLease, SlotError> {
    // Start at a pid-dependent slot so parallel test processes rarely race.
    let span = u32::from(MAX);
    let start = std::process::id() % span;
    for i in 0..span {
        let slot = Slot(1 + ((start + i) % span) as u8);
        if let Some(lease) = slot.try_lease()? {
            return Ok(lease);
        }
    }
    Err(SlotError::Exhausted {
        dir: PathBuf::from(LEASE_DIR),
    })
}

/// A slot held for as long as this value (or its process) lives.
#[derive(Debug)]
pub struct SlotLease {
    slot: Slot,
    lock: File,
}

impl SlotLease {
    pub fn slot(&self) -> Slot {
        self.slot
    }

    /// Hands the lock to a child process: clears close-on-exec and returns
    /// the descriptor number to pass on. The lock then lives until both
    /// this process and the child have closed it.
    pub fn share_with_child(&self) -> Result<i32, SlotError> {
        let fd = self.lock.as_raw_fd();
        // SAFETY: fcntl(2) on a descriptor we own.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
            return Err(SlotError::Io {
                context: "clearing FD_CLOEXEC on the slot lock".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(fd)
    }

    /// Takes over a lock inherited from the parent (see
    /// [`share_with_child`](Self::share_with_child)), checking that `fd`
    /// really is this slot's lock file.
    pub fn inherit(slot: Slot, fd: i32) -> Result<SlotLease, SlotError> {
        use std::os::fd::FromRawFd;
        let want = fs::metadata(slot.lock_path()).map_err(|source| SlotError::Io {
            context: format!("stat {}", slot.lock_path().display()),
            source,
        })?;
        let have = fs::metadata(format!("/proc/self/fd/{fd}")).map_err(|source| SlotError::Io {
            context: format!("inherited lock descriptor {fd}"),
            source,
        })?;
        use std::os::unix::fs::MetadataExt;
        if (want.dev(), want.ino()) != (have.dev(), have.ino()) {
            return Err(SlotError::Io {
                context: format!("descriptor {fd}"),
                source: std::io::Error::other(format!("is not {}", slot.lock_path().display())),
            });
        }
        // SAFETY: the descriptor was inherited for exactly this purpose and
        // nothing else in this process owns it.
        let lock = unsafe { File::from_raw_fd(fd) };
        // Our own children (sshd nodes) must not keep the slot locked.
        // SAFETY: fcntl(2) on a descriptor we now own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        Ok(SlotLease { slot, lock })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_never_overlap_each_other_or_the_test_node_pool() {
        let s0 = Slot::new(0).unwrap();
        assert_eq!(s0.vpc_cidr(), "127.77.0.0/16");
        assert_eq!(s0.subnet_cidrs()[0], "127.77.1.0/24");
        assert_eq!(s0.lb_addr().to_string(), "127.77.0.1:80");
        let s5 = Slot::new(5).unwrap();
        assert_eq!(s5.vpc_cidr(), "127.82.0.0/16");
        assert!(s5.contains(Ipv4Addr::new(127, 82, 1, 4)));
        assert!(!s5.contains(Ipv4Addr::new(127, 77, 1, 4)));
        assert!(Slot::new(MAX + 1).is_err());
        // IpPool::tests starts at 127.77.128.1; slot 0's subnets end at .2.255.
        let pool = crate::node::IpPool::tests();
        assert!(pool.first > Ipv4Addr::new(127, 77, 2, 255));
    }

    #[test]
    fn bridged_vpcs_tile_the_benchmark_range_without_overlap() {
        let s0 = Slot::new(0).unwrap().bridged();
        assert_eq!(s0.cidr(), "198.18.0.0/21");
        assert_eq!(s0.subnet_cidrs(), ["198.18.1.0/24", "198.18.2.0/24"]);
        assert_eq!(s0.gateway(), Ipv4Addr::new(198, 18, 0, 1));
        let s5 = Slot::new(5).unwrap().bridged();
        assert_eq!(s5.cidr(), "198.18.40.0/21");
        assert!(s5.contains(Ipv4Addr::new(198, 18, 41, 4)));
        assert!(!s5.contains(Ipv4Addr::new(198, 18, 48, 4)));
        assert!(!s0.contains(Ipv4Addr::new(198, 18, 41, 4)));
        let last = Slot::new(MAX).unwrap().bridged();
        assert_eq!(last.cidr(), "198.19.248.0/21");
        // Still inside 198.18.0.0/15.
        assert_eq!(
            u32::from(last.network()) >> 17,
            u32::from(BRIDGED_RANGE) >> 17
        );
        assert!(s5.bridge_name().len() <= 15);
        assert!(format!("{}{}", last.veth_prefix(), "abcdef01").len() <= 15);
    }

    #[test]
    fn a_slot_lease_is_exclusive() {
        let lease = lease_any().unwrap();
        let slot = lease.slot();
        assert_ne!(slot.index(), QUICKSTART);
        assert!(matches!(slot.lease(), Err(SlotError::Busy { .. })));
        assert!(slot.is_busy().unwrap());
        drop(lease);
        assert!(!slot.is_busy().unwrap());
    }
}
