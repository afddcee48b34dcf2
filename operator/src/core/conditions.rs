//! The three conditions status shows for a cluster (as Kubernetes
//! controllers do): is it `Ready`, is it `Progressing`, is it `Degraded` —
//! each with a reason a machine can match and a message a person can read.

use serde::{Deserialize, Serialize};

use crate::core::fleet;
use crate::core::memory::Memory;
use crate::core::rollout;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ConditionType {
    /// Every desired node is in service on the target release.
    Ready,
    /// Nodes are being launched, updated or drained.
    Progressing,
    /// Something needs a person: failing nodes, a failed release, a broken spec.
    Degraded,
}

/// One condition as decided now; the status keeps since when it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub kind: ConditionType,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

/// The fleet as the status shows it after a pass acted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FleetView<'a> {
    pub in_service: u32,
    /// Some node task is running.
    pub busy: bool,
    /// What the fleet diff had to say (launches held back, rollout progress…).
    pub notes: &'a [String],
}

pub fn verdicts(memory: &Memory, fleet: &FleetView<'_>) -> [Verdict; 3] {
    let release = &memory.release;
    let ready = fleet.in_service == memory.desired
        && release.on_target == fleet.in_service
        && release.outdated == 0;
    let summary = format!(
        "{}/{} in service on {}",
        fleet.in_service, memory.desired, release.target
    );
    let progressing = fleet.busy || !ready;
    let (degraded, degraded_reason, degraded_message) = if rollout::halted(release) {
        (
            true,
            "ReleaseFailed",
            format!(
                "release {} failed; serving {}",
                release.desired, release.target
            ),
        )
    } else if let Some(from) = &release.rolling_back_from {
        (true, "RollingBack", format!("rolling back from {from}"))
    } else if memory.node_failures >= 3 {
        let refresh = fleet
            .notes
            .iter()
            .find(|n| n.starts_with(fleet::REFRESH_NOTE))
            .map(|n| format!("; halted, the old nodes serve on: {n}"))
            .unwrap_or_default();
        (
            true,
            "NodesFailing",
            format!(
                "{} nodes in a row failed to come up{refresh}",
                memory.node_failures
            ),
        )
    } else {
        (false, "AsExpected", String::new())
    };
    [
        Verdict {
            kind: ConditionType::Ready,
            status: ready,
            reason: if ready { "AllInService" } else { "Converging" },
            message: summary,
        },
        Verdict {
            kind: ConditionType::Progressing,
            status: progressing,
            reason: if progressing { "Working" } else { "Idle" },
            message: fleet.notes.join("; "),
        },
        Verdict {
            kind: ConditionType::Degraded,
            status: degraded,
            reason: degraded_reason,
            message: degraded_message,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_nodes_during_an_instance_refresh_say_it_is_halted_and_how_far_it_got() {
        let memory = Memory {
            node_failures: 3,
            ..Memory::default()
        };
        let notes = ["instance refresh: 0 of 2 replaced, surge first".to_string()];
        let fleet = FleetView {
            notes: &notes,
            ..FleetView::default()
        };
        let [_, _, degraded] = verdicts(&memory, &fleet);
        assert!(degraded.status);
        assert_eq!(degraded.reason, "NodesFailing");
        assert_eq!(
            degraded.message,
            "3 nodes in a row failed to come up; halted, the old nodes serve on: \
             instance refresh: 0 of 2 replaced, surge first"
        );

        let [_, _, degraded] = verdicts(&memory, &FleetView::default());
        assert_eq!(degraded.message, "3 nodes in a row failed to come up");
    }
}
