//! The node state machine: which steps a task performs from the phase a
//! node is in, and which phase tag each step leaves behind.
//!
//! Pure. The executor (`node_task`) runs the steps; this module decides
//! them, so crash safety is checkable here: every phase tag is written
//! only after the work it names is done, and from every phase the steps
//! that follow are safe to repeat. A restarted operator reads the phase tag
//! and resumes with [`steps`] from there.

use hangar_cloud::Phase;

use crate::core::fleet::Task;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Wait until the instance runs and answers SSH.
    AwaitReachable,
    /// Run the provision runbook (idempotent), then record the config hash.
    Provision,
    /// Make sure the node is not in the target group and has drained.
    LeaveService,
    /// A node resumed from a phase before `verifying` may be serving
    /// already: EC2's listing can show an earlier phase tag for seconds
    /// after the node was tagged `in-service`. When the target group calls
    /// it healthy and its `current` is the release this task brings, it is
    /// tagged `in-service` and the task ends here, instead of taking a
    /// serving node out to ship it what it runs. Its config tag is left as
    /// listed: if that is really outdated, the node is updated like any
    /// serving one, within the rollout's bounds.
    ConfirmServing,
    /// Fetch, upload, verify and unpack the release; link shared paths.
    Ship,
    /// Before hooks, atomic `current` swap, after hooks, prune.
    Activate,
    /// [`Step::Activate`], unless the release is `current` already: a warm
    /// node stopped on it, with its config unchanged since, ran its hooks
    /// when it was activated, and its services came up from it when the
    /// machine booted.
    EnsureActive,
    /// Swap `current` back to an already shipped release, in place.
    Reactivate,
    /// Read which release the node's `current` really points to. When it
    /// differs from the `hangar:release` tag (a crash between an
    /// activation and its tag), the node's truth wins: the tag is
    /// rewritten before anything else, so it never joins the target group
    /// counted as a release it does not run.
    CheckActive,
    /// The node's own health check passes (hangar asks it over HTTP).
    HealthCheck,
    /// Ask the spec's warm-up paths until they answer (or the warm-up
    /// deadline), so the first real requests find warm caches.
    Warmup,
    /// Run the release's `once` hooks on this node (started detached,
    /// under a lock, its exit status kept on the node: asking again after a
    /// crash finds the run going on or its result, never a second run).
    RunOnce,
    /// Register in the target group and wait until the ALB calls it healthy.
    Register,
    /// Deregister, then wait for the ALB to finish draining and for the
    /// node's open connections to end (bounded by the drain timeout).
    Deregister,
    /// Run the spec's drain hooks on the node.
    DrainHooks,
    Terminate,
    /// Stop the instance, keeping its disk (warm pool). Repeating it on a
    /// stopped instance is harmless.
    StopInstance,
    /// Start a stopped instance again (taking a node from the warm pool);
    /// harmless on a running one.
    StartInstance,
    /// Write the phase tag (and the release tag when given).
    SetPhase {
        phase: Phase,
        release: bool,
    },
}

/// What the executor needs to know about the node besides its phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// Its `hangar:config` differs from the spec's provisioning config.
    pub config_outdated: bool,
    /// The spec asks for a warm-up before a node joins the target group.
    pub warmup: bool,
}

/// The steps `task` performs on a node currently in `phase`.
pub fn steps(task: &Task, phase: Phase, facts: NodeFacts) -> Vec<Step> {
    use Step::*;
    match task {
        // Resumed from `releasing`, the tag is written again before the
        // node leaves service: a `releasing` seen in a lagging listing may
        // be older than the node's real `in-service`, and a crash after the
        // deregistration must not leave that `in-service` as the last word
        // on a node that is out of the target group.
        //
        // From any phase before `verifying`, the node may turn out to be
        // serving already (see `ConfirmServing`).
        Task::Advance => {
            let mut s = Vec::new();
            if matches!(
                phase,
                Phase::Launching | Phase::Provisioning | Phase::Releasing
            ) {
                s.push(ConfirmServing);
            }
            if phase == Phase::Releasing {
                s.extend(release_again(facts));
            } else {
                s.extend(advance_from(phase, facts));
            }
            s
        }
        // The tag moves first, exactly as a resumed Advance from
        // `releasing` rewrites it: a crash from here on resumes as that
        // Advance, which leaves service before anything changes.
        Task::Update { .. } => release_again(facts),
        Task::Rollback { .. } => vec![
            Reactivate,
            HealthCheck,
            SetPhase {
                phase: Phase::InService,
                release: true,
            },
        ],
        Task::Prepare => {
            let mut s = advance_from(phase, facts);
            let stop = s.iter().position(|step| {
                *step
                    == SetPhase {
                        phase: Phase::Releasing,
                        release: false,
                    }
            });
            match stop {
                Some(i) => s.truncate(i + 1),
                None => s.clear(),
            }
            s
        }
        Task::Once { .. } => vec![AwaitReachable, Ship, RunOnce],
        Task::Warm { stop } => to_pool(phase, facts, *stop),
        Task::Serve => from_pool(phase, facts),
        // Its tags stay `in-service` throughout: a crash anywhere leaves a
        // node the next read of the target group finds missing again.
        Task::Rejoin => vec![HealthCheck, Register],
        Task::Drain { .. } => match phase {
            Phase::Terminating => vec![Terminate],
            // Never registered (or deregistered before it was pooled), and
            // possibly stopped: no hooks to run over SSH. Yet a node just
            // taken out of the pool is registered while the listing may
            // still show `warm`: out of the target group first.
            Phase::Warm => vec![
                LeaveService,
                SetPhase {
                    phase: Phase::Terminating,
                    release: false,
                },
                Terminate,
            ],
            Phase::Draining => drain_tail(),
            _ => {
                let mut s = vec![SetPhase {
                    phase: Phase::Draining,
                    release: false,
                }];
                s.extend(drain_tail());
                s
            }
        },
    }
}

/// `releasing` written (again), then the path from there.
fn release_again(facts: NodeFacts) -> Vec<Step> {
    let mut s = vec![Step::SetPhase {
        phase: Phase::Releasing,
        release: false,
    }];
    s.extend(advance_from(Phase::Releasing, facts));
    s
}

fn drain_tail() -> Vec<Step> {
    vec![
        Step::Deregister,
        Step::DrainHooks,
        Step::SetPhase {
            phase: Phase::Terminating,
            release: false,
        },
        Step::Terminate,
    ]
}

fn advance_from(phase: Phase, facts: NodeFacts) -> Vec<Step> {
    use Step::*;
    let set = |phase| SetPhase {
        phase,
        release: false,
    };
    let provision = || vec![AwaitReachable, Provision, set(Phase::Releasing)];
    // Out of service first: a node may carry `releasing` because an update
    // of a serving node was interrupted.
    let release = |facts: NodeFacts| {
        let mut s = vec![LeaveService];
        if facts.config_outdated {
            s.extend([AwaitReachable, Provision]);
        }
        s.extend([
            Ship,
            Activate,
            SetPhase {
                phase: Phase::Verifying,
                release: true,
            },
        ]);
        s
    };
    let verify = || {
        let mut s = vec![HealthCheck];
        if facts.warmup {
            s.push(Warmup);
        }
        s.extend([Register, set(Phase::InService)]);
        s
    };
    let provisioned = NodeFacts {
        config_outdated: false,
        ..facts
    };
    match phase {
        Phase::Launching => [
            vec![AwaitReachable, set(Phase::Provisioning)],
            provision().split_off(1),
            release(provisioned),
            verify(),
        ]
        .concat(),
        Phase::Provisioning => [provision(), release(provisioned), verify()].concat(),
        Phase::Releasing => [release(facts), verify()].concat(),
        // Re-provisioning a verified node means re-activating behind it.
        Phase::Verifying if facts.config_outdated => {
            [vec![set(Phase::Releasing)], release(facts), verify()].concat()
        }
        // Resuming after a crash: the activation was done, but by whom and
        // of what, only the node knows.
        Phase::Verifying => [vec![CheckActive], verify()].concat(),
        // Nothing to advance: in service already, or on its way out.
        Phase::InService | Phase::Draining | Phase::Terminating => Vec::new(),
        // A warm node advances only with `Task::Serve`.
        Phase::Warm => Vec::new(),
    }
}

// --- warm pool -------------------------------------------------------------

/// `Task::Warm`: bring a node into the warm pool. A new node walks the
/// usual path up to its health check but stops short of the target group
/// (and of the warm-up: that is for when it serves); a serving node (a
/// scale-in victim with `reuseOnScaleIn`) is drained like any victim. The
/// `warm` tag is written before the stop: a crash in between leaves a
/// running warm node, which the next pass stops.
fn to_pool(phase: Phase, facts: NodeFacts, stop: bool) -> Vec<Step> {
    use Step::*;
    let mut s = match phase {
        Phase::Launching | Phase::Provisioning | Phase::Releasing | Phase::Verifying => {
            let mut s = advance_from(
                phase,
                NodeFacts {
                    warmup: false,
                    ..facts
                },
            );
            let Some(at) = s.iter().position(|x| *x == Register) else {
                return Vec::new();
            };
            s.truncate(at);
            // From `verifying` the path has no `LeaveService`, yet the node
            // may be registered: a crash between `Register` and its
            // `in-service` tag, or a serving node whose later tags the
            // listing does not show yet. Out first: a pool node is never
            // in the target group, and is never stopped undrained.
            if !s.contains(&LeaveService) {
                s.insert(0, LeaveService);
            }
            s
        }
        Phase::InService => [
            vec![SetPhase {
                phase: Phase::Draining,
                release: false,
            }],
            vec![Deregister, DrainHooks],
        ]
        .concat(),
        Phase::Draining => vec![Deregister, DrainHooks],
        // Listed `warm` may be a node just taken out of the pool and
        // registered (the listing lags): out of the target group first.
        Phase::Warm => vec![LeaveService],
        Phase::Terminating => return Vec::new(),
    };
    if phase != Phase::Warm {
        s.push(SetPhase {
            phase: Phase::Warm,
            release: false,
        });
    }
    s.push(if stop { StopInstance } else { StartInstance });
    s
}

/// `Task::Serve`: take a warm node into service. Start it, re-run the
/// runbook (its unchanged steps are skipped), then the usual release path
/// from `releasing`: the target release is shipped and activated only if
/// the node lacks it, health-checked (and warmed up) before it registers —
/// so a pool node whose release or config went stale is brought up to
/// date before it serves. The tag leaves `warm` only once the instance
/// runs and answers SSH; a crash before that leaves a warm node, which is
/// started (again) or stopped (again) harmlessly.
fn from_pool(phase: Phase, facts: NodeFacts) -> Vec<Step> {
    use Step::*;
    if phase != Phase::Warm {
        return steps(&Task::Advance, phase, facts);
    }
    let provisioned = NodeFacts {
        config_outdated: false,
        ..facts
    };
    let mut s = [
        vec![
            StartInstance,
            AwaitReachable,
            Provision,
            SetPhase {
                phase: Phase::Releasing,
                release: false,
            },
        ],
        advance_from(Phase::Releasing, provisioned),
    ]
    .concat();
    // With its config changed while it was stopped (the env file, say),
    // the activation's hooks run again, as they do for a serving node.
    if !facts.config_outdated {
        for step in &mut s {
            if *step == Activate {
                *step = EnsureActive;
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use Step::*;

    #[test]
    fn a_node_back_into_the_target_group_is_health_checked_first_and_keeps_its_tags() {
        let s = steps(&Task::Rejoin, Phase::InService, FRESH);
        assert_eq!(s, [HealthCheck, Register]);
    }

    #[test]
    fn a_node_resumed_before_verifying_first_checks_whether_it_serves_already() {
        let before_verifying = [Phase::Launching, Phase::Provisioning, Phase::Releasing];
        for config_outdated in [false, true] {
            let facts = NodeFacts {
                config_outdated,
                warmup: false,
            };
            for phase in Phase::ALL {
                let s = steps(&Task::Advance, phase, facts);
                if before_verifying.contains(&phase) {
                    assert_eq!(s.first(), Some(&ConfirmServing), "{phase}: {s:?}");
                } else {
                    assert!(!s.contains(&ConfirmServing), "{phase}: {s:?}");
                }
            }
        }
        // An update is decided from an in-service listing: it leaves.
        let update = Task::Update {
            release: "v2".into(),
        };
        assert!(!steps(&update, Phase::InService, FRESH).contains(&ConfirmServing));
    }

    #[test]
    fn a_node_resumed_from_releasing_is_tagged_releasing_again_before_it_leaves_service() {
        for config_outdated in [false, true] {
            let facts = NodeFacts {
                config_outdated,
                warmup: false,
            };
            let s = steps(&Task::Advance, Phase::Releasing, facts);
            let tagged = s.iter().position(|x| {
                *x == SetPhase {
                    phase: Phase::Releasing,
                    release: false,
                }
            });
            let leaves = s.iter().position(|x| *x == LeaveService);
            assert!(
                tagged.is_some() && tagged < leaves,
                "config outdated {config_outdated}: {s:?}"
            );
        }
    }

    const FRESH: NodeFacts = NodeFacts {
        config_outdated: false,
        warmup: false,
    };

    fn set(phase: Phase) -> Step {
        SetPhase {
            phase,
            release: false,
        }
    }

    #[test]
    fn a_new_node_walks_every_phase_in_order() {
        let s = steps(&Task::Advance, Phase::Launching, FRESH);
        assert_eq!(
            s,
            [
                ConfirmServing,
                AwaitReachable,
                set(Phase::Provisioning),
                Provision,
                set(Phase::Releasing),
                LeaveService,
                Ship,
                Activate,
                SetPhase {
                    phase: Phase::Verifying,
                    release: true
                },
                HealthCheck,
                Register,
                set(Phase::InService),
            ]
        );
    }

    #[test]
    fn prepare_stops_at_releasing_and_once_never_touches_current_or_the_target_group() {
        let s = steps(&Task::Prepare, Phase::Launching, FRESH);
        assert_eq!(s.last(), Some(&set(Phase::Releasing)));
        assert!(!s.contains(&Activate) && !s.contains(&Register));
        assert!(steps(&Task::Prepare, Phase::Releasing, FRESH).is_empty());
        let once = steps(
            &Task::Once {
                release: "v2".into(),
            },
            Phase::InService,
            FRESH,
        );
        assert_eq!(once, [AwaitReachable, Ship, RunOnce]);
    }

    #[test]
    fn with_a_warmup_a_node_is_warmed_after_its_health_check_and_before_it_registers() {
        let facts = NodeFacts {
            warmup: true,
            ..FRESH
        };
        for (task, phase) in [
            (Task::Advance, Phase::Launching),
            (Task::Advance, Phase::Verifying),
            (
                Task::Update {
                    release: "v2".into(),
                },
                Phase::InService,
            ),
        ] {
            let s = steps(&task, phase, facts);
            let at = |step: &Step| s.iter().position(|x| x == step).expect("present");
            assert!(
                at(&HealthCheck) < at(&Warmup) && at(&Warmup) < at(&Register),
                "{s:?}"
            );
        }
    }

    #[test]
    fn resuming_a_verifying_node_first_reads_what_it_really_runs() {
        let s = steps(&Task::Advance, Phase::Verifying, FRESH);
        assert_eq!(
            s,
            [CheckActive, HealthCheck, Register, set(Phase::InService)]
        );
    }

    #[test]
    fn nothing_is_registered_before_its_health_check_and_release() {
        // Invariant 2, for every task and starting phase.
        for phase in Phase::ALL {
            for outdated in [false, true] {
                for task in [
                    Task::Advance,
                    Task::Update {
                        release: "v2".into(),
                    },
                ] {
                    let s = steps(
                        &task,
                        phase,
                        NodeFacts {
                            config_outdated: outdated,
                            warmup: false,
                        },
                    );
                    if let Some(reg) = s.iter().position(|x| *x == Register) {
                        let health = s
                            .iter()
                            .position(|x| *x == HealthCheck)
                            .expect("health before register");
                        assert!(health < reg, "{task:?} from {phase}: {s:?}");
                        // The release it verifies is the one last activated.
                        let activated = s.iter().rposition(|x| *x == Activate);
                        let resumed_verifying = phase == Phase::Verifying && !outdated;
                        assert!(
                            activated.is_some_and(|a| a < health) || resumed_verifying,
                            "{task:?} from {phase}: {s:?}"
                        );
                        if let Some(p) = s.iter().rposition(|x| *x == Provision) {
                            assert!(p < activated.unwrap_or(0) || resumed_verifying);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn phase_tags_only_move_forward_after_their_work() {
        let s = steps(&Task::Advance, Phase::Launching, FRESH);
        let pos = |step: &Step| s.iter().position(|x| x == step).unwrap();
        assert!(pos(&AwaitReachable) < pos(&set(Phase::Provisioning)));
        assert!(pos(&Provision) < pos(&set(Phase::Releasing)));
        assert!(
            pos(&Activate)
                < pos(&SetPhase {
                    phase: Phase::Verifying,
                    release: true
                })
        );
        assert!(pos(&Register) < pos(&set(Phase::InService)));
    }

    #[test]
    fn an_update_leaves_service_before_anything_changes_on_the_node() {
        let s = steps(
            &Task::Update {
                release: "v2".into(),
            },
            Phase::InService,
            FRESH,
        );
        assert_eq!(s[0], set(Phase::Releasing));
        assert_eq!(s[1], LeaveService);
        assert!(!s.contains(&Provision));
        let s = steps(
            &Task::Update {
                release: "v2".into(),
            },
            Phase::InService,
            NodeFacts {
                config_outdated: true,
                warmup: false,
            },
        );
        assert_eq!(
            &s[..4],
            [
                set(Phase::Releasing),
                LeaveService,
                AwaitReachable,
                Provision
            ]
        );
        assert_eq!(&s[4..6], [Ship, Activate]);
    }

    #[test]
    fn a_crash_mid_update_resumes_out_of_service() {
        // The tag says releasing: Advance from there asks whether the node
        // serves the target already (a node mid-update runs the old one),
        // writes the tag again, then leaves service before anything else.
        let s = steps(&Task::Advance, Phase::Releasing, FRESH);
        assert_eq!(
            s[..3],
            [
                ConfirmServing,
                SetPhase {
                    phase: Phase::Releasing,
                    release: false
                },
                LeaveService
            ]
        );
    }

    #[test]
    fn nothing_serving_is_terminated_before_deregistration_and_hooks() {
        // Invariant 3, from every phase.
        for phase in Phase::ALL {
            let s = steps(
                &Task::Drain {
                    reason: "scale-in".into(),
                },
                phase,
                FRESH,
            );
            let term = s
                .iter()
                .position(|x| *x == Terminate)
                .expect("drain terminates");
            // A warm node never serves (it was deregistered before it
            // was pooled): it is terminated without SSH.
            if phase != Phase::Terminating && phase != Phase::Warm {
                let dereg = s.iter().position(|x| *x == Deregister).unwrap();
                let hooks = s.iter().position(|x| *x == DrainHooks).unwrap();
                assert!(dereg < hooks && hooks < term, "{phase}: {s:?}");
                assert!(s.contains(&set(Phase::Terminating)));
            }
        }
    }

    #[test]
    fn rollback_swaps_in_place_and_rechecks() {
        let s = steps(
            &Task::Rollback {
                release: "v1".into(),
            },
            Phase::InService,
            FRESH,
        );
        assert_eq!(
            s,
            [
                Reactivate,
                HealthCheck,
                SetPhase {
                    phase: Phase::InService,
                    release: true
                }
            ]
        );
    }

    #[test]
    fn a_pool_node_is_health_checked_then_tagged_warm_then_stopped_and_never_registered() {
        for phase in [Phase::Launching, Phase::Releasing, Phase::Verifying] {
            let s = steps(&Task::Warm { stop: true }, phase, FRESH);
            assert!(!s.contains(&Register) && !s.contains(&Warmup), "{s:?}");
            let n = s.len();
            assert_eq!(&s[n - 3..], [HealthCheck, set(Phase::Warm), StopInstance]);
        }
        let running = steps(&Task::Warm { stop: false }, Phase::Launching, FRESH);
        assert_eq!(running.last(), Some(&StartInstance));
        // Resumed after a crash between the tag and the stop.
        assert_eq!(
            steps(&Task::Warm { stop: true }, Phase::Warm, FRESH),
            [LeaveService, StopInstance]
        );
    }

    /// A node just taken out of the pool is registered while the listing
    /// may still show its `warm` tag for a few seconds: whatever the pool
    /// then does with a "warm" node (stop it, terminate it), it leaves the
    /// target group first. For a node that really is warm that costs one
    /// target-health read.
    #[test]
    fn a_node_listed_warm_leaves_the_target_group_before_it_is_stopped_or_terminated() {
        for stop in [true, false] {
            let s = steps(&Task::Warm { stop }, Phase::Warm, FRESH);
            assert_eq!(s.first(), Some(&LeaveService), "{s:?}");
        }
        let s = steps(
            &Task::Drain {
                reason: "pool shrinks".into(),
            },
            Phase::Warm,
            FRESH,
        );
        assert_eq!(s.first(), Some(&LeaveService), "{s:?}");
        assert_eq!(s.last(), Some(&Terminate), "{s:?}");
        assert!(
            !s.iter().any(|x| matches!(x, DrainHooks | AwaitReachable)),
            "no SSH: {s:?}"
        );
    }

    /// A `verifying` node may be in the target group already: registered
    /// by a task that crashed before its `in-service` tag, or serving with
    /// its later tags not yet listed (EC2's listing lags). Whatever the
    /// phase a node enters the pool from, it leaves service before the
    /// `warm` tag and the stop.
    #[test]
    fn every_way_into_the_warm_pool_leaves_the_target_group_before_the_warm_tag() {
        for phase in Phase::ALL {
            for stop in [true, false] {
                for config_outdated in [false, true] {
                    let facts = NodeFacts {
                        config_outdated,
                        ..FRESH
                    };
                    let s = steps(&Task::Warm { stop }, phase, facts);
                    let Some(warm) = s.iter().position(|x| *x == set(Phase::Warm)) else {
                        continue;
                    };
                    assert!(
                        s[..warm]
                            .iter()
                            .any(|x| matches!(x, LeaveService | Deregister)),
                        "from {phase:?}: {s:?}"
                    );
                }
            }
        }
        assert_eq!(
            steps(&Task::Warm { stop: true }, Phase::Verifying, FRESH),
            [
                LeaveService,
                CheckActive,
                HealthCheck,
                set(Phase::Warm),
                StopInstance
            ]
        );
    }

    #[test]
    fn a_serving_node_returns_to_the_pool_only_after_it_left_the_target_group() {
        let s = steps(&Task::Warm { stop: true }, Phase::InService, FRESH);
        assert_eq!(
            s,
            [
                set(Phase::Draining),
                Deregister,
                DrainHooks,
                set(Phase::Warm),
                StopInstance
            ]
        );
    }

    #[test]
    fn a_warm_node_is_started_reprovisioned_released_and_checked_before_it_registers() {
        let s = steps(
            &Task::Serve,
            Phase::Warm,
            NodeFacts {
                warmup: true,
                ..FRESH
            },
        );
        assert_eq!(
            s,
            [
                StartInstance,
                AwaitReachable,
                Provision,
                set(Phase::Releasing),
                LeaveService,
                Ship,
                EnsureActive,
                SetPhase {
                    phase: Phase::Verifying,
                    release: true
                },
                HealthCheck,
                Warmup,
                Register,
                set(Phase::InService),
            ]
        );
        // Its config changed while it was stopped: activated again, hooks
        // and all, as a serving node would be.
        let s = steps(
            &Task::Serve,
            Phase::Warm,
            NodeFacts {
                config_outdated: true,
                ..FRESH
            },
        );
        assert!(s.contains(&Activate) && !s.contains(&EnsureActive), "{s:?}");
        // Crashed after the tag moved on: the usual path from there.
        assert_eq!(
            steps(&Task::Serve, Phase::Releasing, FRESH),
            steps(&Task::Advance, Phase::Releasing, FRESH)
        );
    }

    #[test]
    fn a_warm_node_is_terminated_without_ssh() {
        let s = steps(
            &Task::Drain {
                reason: "refresh".into(),
            },
            Phase::Warm,
            FRESH,
        );
        assert_eq!(s, [LeaveService, set(Phase::Terminating), Terminate]);
    }

    #[test]
    fn in_service_nodes_have_nothing_to_advance() {
        assert!(steps(&Task::Advance, Phase::InService, FRESH).is_empty());
    }
}
