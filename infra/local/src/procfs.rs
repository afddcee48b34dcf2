//! Telling processes and namespaces apart through `/proc`, where pids and
//! namespace numbers are reused: a pid once its process is reaped, a
//! namespace's inode number as soon as the namespace is freed.

use std::fs::{self, File};
use std::os::unix::io::AsRawFd;

/// Start time (clock ticks since boot) of a live, non-zombie process:
/// what tells a process from a later one that reused its pid.
pub(crate) fn process_start(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may contain spaces) in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is the state (field 3), start time is field 22.
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Opens `pid`'s namespace of `kind` (`mnt`, `pid`) if it is still
/// `namespace` (`kind:[inode]`), checked on the open file so a pid reused
/// in between cannot pass. While the file is open the namespace, and so
/// its number, stays allocated: a scan by that number finds only its own.
pub(crate) fn pin_namespace(pid: u32, kind: &str, namespace: &str) -> Option<File> {
    let file = File::open(format!("/proc/{pid}/ns/{kind}")).ok()?;
    let held = fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()?;
    (held.to_string_lossy() == namespace).then_some(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_start_reads_past_a_command_with_spaces() {
        let me = std::process::id();
        assert!(process_start(me).is_some());
        assert!(process_start(u32::MAX).is_none());
    }

    #[test]
    fn a_namespace_is_pinned_only_under_its_own_name() {
        let me = std::process::id();
        let own = fs::read_link("/proc/self/ns/mnt").unwrap();
        let own = own.to_string_lossy();
        assert!(pin_namespace(me, "mnt", &own).is_some());
        assert!(pin_namespace(me, "mnt", "mnt:[1]").is_none());
        assert!(pin_namespace(u32::MAX, "mnt", &own).is_none());
    }
}
