//! [`LocalCloud`] for `debian` nodes: addresses, SSH with real host-key
//! verification, the EC2 lifecycle calls a test makes, and what the cloud
//! leaves behind. Kept out of `harness.rs` so both grow independently.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use super::machine::{self, Machine};
use super::{Leftovers, NodeKind};
use crate::artifact::Artifact;
use crate::harness::{eventually, LocalCloud, LocalCloudError};
use crate::hosts::NodeView;
use crate::php_app::PhpKind;

fn aws<E: std::error::Error + 'static>(what: &'static str) -> impl FnOnce(E) -> LocalCloudError {
    move |e| LocalCloudError::Aws {
        what: what.to_string(),
        message: crate::aws::error_chain(&e),
    }
}

impl LocalCloud {
    /// `lite` or `debian` (with its image).
    pub fn node_kind(&self) -> NodeKind {
        match self.hosts().debian() {
            Some(d) => NodeKind::Debian {
                image: d.image.variant,
            },
            None => NodeKind::Lite,
        }
    }

    /// The node's private IP (its own interface's address on `debian`).
    pub fn node_ip(&self, instance_id: &str) -> Option<Ipv4Addr> {
        self.node(instance_id).map(|n| n.ip)
    }

    /// The host's end of the VPC (`debian` clouds): the bridge address,
    /// where nodes reach the apt proxy.
    pub fn vpc_gateway(&self) -> Option<Ipv4Addr> {
        self.hosts().debian().map(|d| d.vpc.gateway())
    }

    /// A handle on the running machine of `instance_id` that never stops it.
    pub fn machine(&self, instance_id: &str) -> Result<Machine, LocalCloudError> {
        let view = self.node(instance_id).ok_or_else(|| {
            LocalCloudError::Hosts(crate::hosts::HostsError::NoSuchNode(
                instance_id.to_string(),
            ))
        })?;
        Ok(Machine::observe(&view.state_dir)?)
    }

    /// The ed25519 host key the machine generated at first boot, read from
    /// its disk (also while it is stopped).
    pub fn host_key(&self, instance_id: &str) -> Result<String, LocalCloudError> {
        Ok(machine::host_public_key(
            &self.state_dir().join("nodes").join(instance_id),
        )?)
    }

    /// A `known_hosts` file holding exactly the machine's own host key.
    pub fn known_hosts(&self, instance_id: &str) -> Result<PathBuf, LocalCloudError> {
        let ip = self.node_ip(instance_id).ok_or_else(|| {
            LocalCloudError::Hosts(crate::hosts::HostsError::NoSuchNode(
                instance_id.to_string(),
            ))
        })?;
        let key = self.host_key(instance_id)?;
        let mut parts = key.split_whitespace();
        let line = format!(
            "{ip} {} {}\n",
            parts.next().unwrap_or(""),
            parts.next().unwrap_or("")
        );
        let path = self.state_dir().join(format!("known_hosts-{instance_id}"));
        std::fs::write(&path, line).map_err(|source| LocalCloudError::Io {
            context: format!("writing {}", path.display()),
            source,
        })?;
        Ok(path)
    }

    /// `ssh user@<node ip> cmd` with the cloud's key, verifying the host key
    /// against the one the machine generated (`StrictHostKeyChecking=yes`).
    pub fn ssh(&self, instance_id: &str, user: &str, cmd: &str) -> Result<Output, LocalCloudError> {
        self.ssh_with_input(instance_id, user, cmd, &[])
    }

    /// [`ssh`](Self::ssh) with `input` on the command's stdin.
    pub fn ssh_with_input(
        &self,
        instance_id: &str,
        user: &str,
        cmd: &str,
        input: &[u8],
    ) -> Result<Output, LocalCloudError> {
        let known = self.known_hosts(instance_id)?;
        let ip = self.node_ip(instance_id).unwrap_or(Ipv4Addr::UNSPECIFIED);
        let mut child = Command::new("/usr/bin/ssh")
            .arg("-i")
            .arg(self.key_path())
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", known.display()))
            .args([
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "GlobalKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=5",
                "-o",
                "LogLevel=ERROR",
            ])
            .arg(format!("{user}@{ip}"))
            .arg(cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| LocalCloudError::Io {
                context: "running ssh".into(),
                source,
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            // A command that does not read its stdin closes it early: fine.
            let _ = stdin.write_all(input);
        }
        child
            .wait_with_output()
            .map_err(|source| LocalCloudError::Io {
                context: "waiting for ssh".into(),
                source,
            })
    }

    /// [`ssh`](Self::ssh), failing on a non-zero exit; returns stdout.
    pub fn ssh_ok(
        &self,
        instance_id: &str,
        user: &str,
        cmd: &str,
    ) -> Result<String, LocalCloudError> {
        let out = self.ssh(instance_id, user, cmd)?;
        if !out.status.success() {
            return Err(LocalCloudError::Node(crate::node::NodeError::Command {
                command: format!("ssh {user}@{instance_id} {cmd}"),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            }));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until `instance_id` has a node and `ssh deploy@… true` succeeds.
    pub fn wait_ssh(
        &self,
        instance_id: &str,
        timeout: Duration,
    ) -> Result<NodeView, LocalCloudError> {
        // Why the last attempt failed, for the timeout's message: a machine
        // whose sshd answers but refuses the login must say how.
        let mut last = String::from("no attempt");
        let result = eventually(timeout, &format!("ssh to {instance_id}"), || {
            let view = self.node(instance_id)?;
            match self.ssh(instance_id, machine::DEPLOY_USER, "true") {
                Ok(o) if o.status.success() => return Some(view),
                Ok(o) => {
                    last = format!(
                        "{}: {}",
                        o.status,
                        String::from_utf8_lossy(&o.stderr).trim()
                    )
                }
                Err(e) => last = e.to_string(),
            }
            None
        });
        result.map_err(|e| match e {
            LocalCloudError::Timeout { what, waited } => LocalCloudError::Timeout {
                what: format!("{what} (last attempt: {last})"),
                waited,
            },
            other => other,
        })
    }

    /// StopInstances (through the gateway, as hangar calls it).
    pub fn stop_instances(&self, instance_ids: &[&str]) -> Result<(), LocalCloudError> {
        let ec2 = self.clients().ec2.clone();
        let ids: Vec<String> = instance_ids.iter().map(|s| s.to_string()).collect();
        self.block_on(async move {
            ec2.stop_instances()
                .set_instance_ids(Some(ids))
                .send()
                .await
        })
        .map_err(aws("StopInstances"))?;
        Ok(())
    }

    /// StartInstances.
    pub fn start_instances(&self, instance_ids: &[&str]) -> Result<(), LocalCloudError> {
        let ec2 = self.clients().ec2.clone();
        let ids: Vec<String> = instance_ids.iter().map(|s| s.to_string()).collect();
        self.block_on(async move {
            ec2.start_instances()
                .set_instance_ids(Some(ids))
                .send()
                .await
        })
        .map_err(aws("StartInstances"))?;
        Ok(())
    }

    /// RebootInstances, then the reboot itself: moto records nothing a
    /// poll could see, so the harness tells the host manager (the machine's
    /// systemd reboots; the manager boots it again on the same disk).
    pub fn reboot_instances(&self, instance_ids: &[&str]) -> Result<(), LocalCloudError> {
        let ec2 = self.clients().ec2.clone();
        let ids: Vec<String> = instance_ids.iter().map(|s| s.to_string()).collect();
        self.block_on(async move {
            ec2.reboot_instances()
                .set_instance_ids(Some(ids))
                .send()
                .await
        })
        .map_err(aws("RebootInstances"))?;
        for id in instance_ids {
            self.hosts().reboot(id)?;
        }
        Ok(())
    }

    /// Waits until the host manager's last poll saw `instance_id` in `state`.
    pub fn wait_instance_state(
        &self,
        instance_id: &str,
        state: &str,
        timeout: Duration,
    ) -> Result<(), LocalCloudError> {
        let directory = self.hosts().directory();
        eventually(timeout, &format!("{instance_id} {state}"), || {
            let listing = directory.borrow().clone();
            listing
                .get(instance_id)
                .is_some_and(|i| i.state == state)
                .then_some(())
        })
    }

    /// Waits until `instance_id` has no node: stopped or terminated, its
    /// machine powered off and its namespace and mount released.
    pub fn wait_no_node(
        &self,
        instance_id: &str,
        timeout: Duration,
    ) -> Result<(), LocalCloudError> {
        eventually(timeout, &format!("{instance_id} without a node"), || {
            (self.node(instance_id).is_none() && !self.hosts().is_stopping(instance_id))
                .then_some(())
        })
    }

    /// Memory of the node's processes (PSS, KiB).
    pub fn node_memory_kib(&self, instance_id: &str) -> Option<u64> {
        let view = self.node(instance_id)?;
        Some(
            crate::node::pids_in_namespace(&view.namespace)
                .into_iter()
                .map(machine::pss_kib)
                .sum(),
        )
    }

    /// What this cloud's `debian` nodes have on the host right now:
    /// namespaces, links, mounts, processes (all empty after drop).
    pub fn debian_leftovers(&self) -> Leftovers {
        super::leftovers(self.slot().bridged(), self.state_dir())
    }

    /// Builds PHP release `id` (see [`crate::php_app`]) and uploads it to
    /// the seeded bucket, like [`LocalCloud::upload_release`].
    pub fn upload_php_release(&self, id: &str, kind: PhpKind) -> Result<Artifact, LocalCloudError> {
        let s3 = self.clients().s3.clone();
        let bucket = self.seeded().bucket.clone();
        let id = id.to_string();
        Ok(self.block_on(async move {
            crate::php_app::upload(&s3, &bucket, crate::seed::RELEASE_PREFIX, &id, kind).await
        })?)
    }
}
