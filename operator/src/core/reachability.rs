//! When an address is worth an SSH attempt while a node boots.
//!
//! Waiting for the listing to say `running` costs seconds on every new
//! node: the shared listing is a snapshot (one DescribeInstances serves
//! every cluster) on top of EC2's eventual consistency, and a machine that
//! boots in seconds answers long before its listing catches up. A refused
//! connection costs nothing, so hangar tries as soon as the address it
//! holds can only be this instance's. That is the whole question here: an
//! attempt at an address that now belongs to someone else would, under
//! TOFU, pin a stranger's host key to this instance id.
//!
//! - A **private IP** stays with the instance's network interface from
//!   launch to termination (EC2 keeps it across stop and start), so it is
//!   this instance's in every state short of shutting down — including a
//!   stale `stopped` for a node this task has just started.
//! - A **public IP** is released when the instance stops and a new one is
//!   assigned when it starts. Only a listing that shows the instance
//!   pending or running carries the current one; a `stopped` entry's
//!   address (if any) may already be another account's.

use hangar_cloud::InstanceState;
use hangar_crds::AddressKind;

/// Whether SSH may be tried at the address hangar holds for an instance
/// listed in `listed`; `started_here` says the task itself started it (a
/// warm node), so a `stopped`/`stopping` listing is known to be stale.
pub fn may_try_ssh(listed: InstanceState, address: AddressKind, started_here: bool) -> bool {
    use InstanceState::*;
    match listed {
        Pending | Running => true,
        Stopped | Stopping => started_here && address == AddressKind::PrivateIp,
        ShuttingDown | Terminated => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AddressKind::*;
    use InstanceState::*;

    #[test]
    fn a_pending_instance_is_tried_before_its_listing_says_running() {
        for kind in [PrivateIp, PublicIp] {
            assert!(may_try_ssh(Pending, kind, false));
            assert!(may_try_ssh(Running, kind, false));
        }
    }

    #[test]
    fn a_just_started_warm_node_is_tried_at_its_kept_private_ip_only() {
        for stale in [Stopped, Stopping] {
            assert!(may_try_ssh(stale, PrivateIp, true));
            // The public IP it had before it stopped is gone, maybe reused.
            assert!(!may_try_ssh(stale, PublicIp, true));
            // Nobody started it: it is really down.
            assert!(!may_try_ssh(stale, PrivateIp, false));
        }
    }

    #[test]
    fn a_terminating_instance_is_never_tried() {
        for kind in [PrivateIp, PublicIp] {
            for started in [false, true] {
                assert!(!may_try_ssh(ShuttingDown, kind, started));
                assert!(!may_try_ssh(Terminated, kind, started));
            }
        }
    }
}
