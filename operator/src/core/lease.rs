//! The lease between operators of one owner id, as a plain state machine:
//! what to do next (read the record, create it, take it over, renew it),
//! whether this process may act now, and when to look again.
//!
//! Time is a reading of the process's own monotonic clock ([`Mono`]),
//! passed in. No two hosts' clocks are ever compared: like the awslabs
//! DynamoDB lock client, a standby takes over only after it has itself seen
//! one record version unchanged for a whole lease duration, and like
//! client-go's leader election, a leader counts its renew deadline from the
//! moment it *sent* its last successful write. The leader stops acting at
//! `sent + renew_deadline`; a standby can take over no earlier than
//! `seen + lease`, and it saw that write after it was sent: between the two
//! lies `lease - renew_deadline` of margin (5 s with the defaults) for
//! clocks that run at different rates.
//!
//! The fence (`hangar:epoch`) grows on every change of holder, so what a
//! deposed leader might still write is told apart from its successor's.

use std::time::Duration;

/// A reading of this process's monotonic clock (time since an origin the
/// runtime picks).
pub type Mono = Duration;

/// How long a lease lasts and how it is kept; client-go's defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How long others must see the record unchanged before taking over.
    pub lease: Duration,
    /// How long after its last successful renewal was sent the leader
    /// keeps acting; it must stop well before others may take over.
    pub renew_deadline: Duration,
    /// How often the leader renews and a standby looks.
    pub retry: Duration,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            lease: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        }
    }
}

impl Timing {
    /// `lease > renew_deadline > retry > 0`, as client-go requires: the
    /// margin between the leader's deadline and a takeover is what makes
    /// two leaders impossible.
    pub fn check(&self) -> Result<(), String> {
        if self.retry.is_zero() {
            return Err("lease retry period must be positive".into());
        }
        if self.renew_deadline <= self.retry {
            return Err(format!(
                "lease renew deadline ({:?}) must be longer than the retry period ({:?})",
                self.renew_deadline, self.retry
            ));
        }
        if self.lease <= self.renew_deadline {
            return Err(format!(
                "lease duration ({:?}) must be longer than the renew deadline ({:?})",
                self.lease, self.renew_deadline
            ));
        }
        Ok(())
    }
}

/// The stored record, as far as the machine needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub holder: String,
    pub version: String,
    pub fence: u64,
    pub lease: Duration,
    pub released: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteKind {
    /// There is no record: create it.
    Create,
    /// Someone else's record that expired (or was released), or our own
    /// from a term that ended: a new term, with a new fence.
    TakeOver,
    /// Our own record, within our term.
    Renew,
    /// Giving it up (graceful stop).
    Release,
}

/// What to do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Read the record (and pass it to [`Lease::read`]).
    Read,
    /// Write `record` if the stored one still has version `expected`
    /// (`None`: if there is none), then pass the outcome to
    /// [`Lease::written`].
    Write {
        kind: WriteKind,
        record: Record,
        expected: Option<String>,
    },
}

/// What became of a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    Ok,
    /// The condition failed: the record is not the one we expected.
    Conflict,
    /// The call failed: applied or not, we do not know.
    Failed,
}

/// Whether this process leads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    Leader {
        fence: u64,
    },
    Standby {
        /// The holder of the record as last read (`None`: no record, or
        /// released).
        leader: Option<String>,
        fence: Option<u64>,
    },
}

/// A term of leadership.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Term {
    version: String,
    fence: u64,
    /// Past this the process must not act: `sent + renew_deadline` of its
    /// last successful write.
    valid_until: Mono,
    /// A renewal met a record we did not expect: stop acting until a read
    /// says whether it was our own earlier attempt.
    suspect: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    /// `None`: there was no record.
    record: Option<Record>,
    /// When this version was first seen by this process.
    since: Mono,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Pending {
    kind: WriteKind,
    record: Record,
    sent: Mono,
}

/// The lease as one process sees it.
#[derive(Clone, Debug)]
pub struct Lease {
    timing: Timing,
    me: String,
    seen: Option<Seen>,
    term: Option<Term>,
    /// A write whose outcome is not known yet (sent, or failed in transit).
    pending: Option<Pending>,
    /// The version of our last write known to have been applied.
    last_written: Option<String>,
    /// The highest fence seen anywhere (records, instance epochs): a new
    /// term's fence is above it.
    max_fence: u64,
    /// Why the last term ended.
    ended: Option<String>,
    /// Terms ended so far: a read answered after this changed was sent
    /// while a term still held.
    ends: u64,
}

impl Lease {
    pub fn new(me: impl Into<String>, timing: Timing) -> Lease {
        Lease {
            timing,
            me: me.into(),
            seen: None,
            term: None,
            pending: None,
            last_written: None,
            max_fence: 0,
            ended: None,
            ends: 0,
        }
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// Ends the term once its deadline passed. Every other method calls it
    /// first, so a process paused past its deadline knows at its first
    /// look, before anything else.
    pub fn expire(&mut self, now: Mono) {
        if let Some(t) = &self.term {
            if now >= t.valid_until {
                self.end("no renewal within the renew deadline".into());
            }
        }
    }

    fn end(&mut self, why: String) {
        if self.term.take().is_some() {
            self.ended = Some(why);
            self.ends += 1;
            // What we saw belongs to the term that ended: read afresh
            // before writing anything.
            self.seen = None;
        }
    }

    /// The fence to act under now, or why not.
    pub fn may_act(&mut self, now: Mono) -> Result<u64, String> {
        self.expire(now);
        match &self.term {
            Some(t) if !t.suspect => Ok(t.fence),
            Some(_) => Err("the lease record changed under us; checking".into()),
            None => Err(self
                .ended
                .clone()
                .unwrap_or_else(|| "this operator is a standby".into())),
        }
    }

    pub fn role(&mut self, now: Mono) -> Role {
        self.expire(now);
        match &self.term {
            Some(t) => Role::Leader { fence: t.fence },
            None => {
                let record = self.seen.as_ref().and_then(|s| s.record.as_ref());
                Role::Standby {
                    leader: record
                        .filter(|r| !r.released && !r.holder.is_empty())
                        .map(|r| r.holder.clone()),
                    fence: record.map(|r| r.fence),
                }
            }
        }
    }

    /// Why the last term ended, if one did.
    pub fn ended(&self) -> Option<&str> {
        self.ended.as_deref()
    }

    /// An instance carries `hangar:epoch=epoch`. One above our fence means
    /// a newer leader acted: step down at once.
    pub fn saw_epoch(&mut self, epoch: u64) {
        self.max_fence = self.max_fence.max(epoch);
        if self.term.as_ref().is_some_and(|t| epoch > t.fence) {
            self.end(format!(
                "an instance carries a newer leader's epoch {epoch}"
            ));
        }
    }

    /// Evidence from outside the record (a fenced write refused) that
    /// another process may hold the lease: stop acting until a read tells.
    pub fn suspect(&mut self) {
        if let Some(t) = &mut self.term {
            t.suspect = true;
        }
    }

    /// What to do now. A write's `record` carries `new_version`; the caller
    /// sends it at once (its deadline counts from `now`).
    pub fn plan(&mut self, now: Mono, new_version: impl FnOnce() -> String) -> Plan {
        self.expire(now);
        if self.pending.is_some() {
            // A write in an unknown state: learn what became of it first.
            return Plan::Read;
        }
        if let Some(t) = &self.term {
            if t.suspect {
                return Plan::Read;
            }
            let record = self.record(new_version(), t.fence);
            let expected = Some(t.version.clone());
            return self.send(WriteKind::Renew, record, expected, now);
        }
        let Some(seen) = &self.seen else {
            return Plan::Read;
        };
        match &seen.record {
            None => {
                let record = self.record(new_version(), self.max_fence + 1);
                self.send(WriteKind::Create, record, None, now)
            }
            Some(r) => {
                let ours =
                    r.holder == self.me && self.last_written.as_deref() == Some(r.version.as_str());
                let wait = r.lease.max(self.timing.lease);
                let expired = now.saturating_sub(seen.since) >= wait;
                if r.released || ours || expired {
                    let fence = r.fence.max(self.max_fence) + 1;
                    let expected = Some(r.version.clone());
                    let record = self.record(new_version(), fence);
                    self.send(WriteKind::TakeOver, record, expected, now)
                } else {
                    Plan::Read
                }
            }
        }
    }

    /// Gives the lease up (graceful stop): the term ends now, before the
    /// write is sent, so nothing acts while it is released.
    pub fn release(&mut self, now: Mono, new_version: String) -> Option<Plan> {
        self.expire(now);
        let t = self.term.clone()?;
        self.end("released".into());
        let record = Record {
            holder: String::new(),
            version: new_version,
            fence: t.fence,
            lease: self.timing.lease,
            released: true,
        };
        Some(self.send(WriteKind::Release, record, Some(t.version), now))
    }

    fn record(&self, version: String, fence: u64) -> Record {
        Record {
            holder: self.me.clone(),
            version,
            fence,
            lease: self.timing.lease,
            released: false,
        }
    }

    fn send(
        &mut self,
        kind: WriteKind,
        record: Record,
        expected: Option<String>,
        now: Mono,
    ) -> Plan {
        self.pending = Some(Pending {
            kind,
            record: record.clone(),
            sent: now,
        });
        Plan::Write {
            kind,
            record,
            expected,
        }
    }

    /// The outcome of the write [`plan`](Self::plan) asked for.
    pub fn written(&mut self, outcome: Written, now: Mono) {
        self.expire(now);
        match outcome {
            Written::Ok => {
                if let Some(p) = self.pending.take() {
                    self.won(p, now);
                }
            }
            Written::Conflict => {
                // Our own earlier attempt may be what is there (a retry of a
                // write that was applied): keep it pending for the read.
                if let Some(t) = &mut self.term {
                    t.suspect = true;
                }
                self.seen = None;
            }
            // Applied or not: the next read tells.
            Written::Failed => {}
        }
    }

    fn won(&mut self, p: Pending, now: Mono) {
        self.last_written = Some(p.record.version.clone());
        self.max_fence = self.max_fence.max(p.record.fence);
        match p.kind {
            WriteKind::Release => {}
            kind => {
                let valid_until = p.sent + self.timing.renew_deadline;
                if kind != WriteKind::Renew {
                    self.ended = None;
                }
                self.term = (now < valid_until).then(|| Term {
                    version: p.record.version.clone(),
                    fence: p.record.fence,
                    valid_until,
                    suspect: false,
                });
            }
        }
        self.seen = Some(Seen {
            record: Some(p.record),
            since: now,
        });
    }

    /// The record as just read (`None`: there is none).
    pub fn read(&mut self, record: Option<Record>, now: Mono) {
        let ends = self.ends;
        self.read_sent(record, ends, now);
    }

    /// How many terms have ended: given with a read's answer
    /// ([`Lease::read_sent`]) as it was when the read was sent.
    pub fn ends(&self) -> u64 {
        self.ends
    }

    /// [`Lease::read`] of a read sent when [`Lease::ends`] was `ends`. If a
    /// term ended since — a pause (SIGSTOP, a frozen VM) can hold an answer
    /// for any time — the answer tells what the record was while the term
    /// held, not now: it teaches a fence and nothing else, and the next
    /// plan reads again.
    pub fn read_sent(&mut self, record: Option<Record>, ends: u64, now: Mono) {
        self.expire(now);
        if self.ends != ends {
            if let Some(r) = &record {
                self.max_fence = self.max_fence.max(r.fence);
            }
            return;
        }
        if let Some(p) = self.pending.take() {
            let applied = record
                .as_ref()
                .is_some_and(|r| r.version == p.record.version && r.holder == p.record.holder);
            if applied {
                self.won(p, now);
                return;
            }
        }
        if let Some(r) = &record {
            self.max_fence = self.max_fence.max(r.fence);
        }
        if let Some(t) = &self.term {
            let still_ours = record.as_ref().is_some_and(|r| r.version == t.version);
            if still_ours {
                if let Some(t) = &mut self.term {
                    t.suspect = false;
                }
            } else {
                let by = record
                    .as_ref()
                    .map(|r| format!("{} (fence {})", r.holder, r.fence))
                    .unwrap_or_else(|| "nobody".into());
                self.end(format!("the lease record now names {by}"));
            }
        }
        let same = self.seen.as_ref().is_some_and(|s| {
            s.record.as_ref().map(|r| &r.version) == record.as_ref().map(|r| &r.version)
        });
        if !same {
            self.seen = Some(Seen { record, since: now });
        }
    }

    /// When to look again (the caller may look earlier).
    pub fn next_wake(&mut self, now: Mono) -> Mono {
        self.expire(now);
        let retry = now + self.timing.retry;
        if self.pending.is_some() {
            return retry;
        }
        if let Some(t) = &self.term {
            if t.suspect {
                return now;
            }
            return retry.min(t.valid_until);
        }
        match self.seen.as_ref() {
            Some(Seen {
                record: Some(r),
                since,
            }) if !r.released => retry.min(*since + r.lease.max(self.timing.lease)),
            Some(_) => now,
            None => retry,
        }
    }

    /// Until when this process may act (its term's deadline).
    pub fn valid_until(&self) -> Option<Mono> {
        self.term.as_ref().map(|t| t.valid_until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: f64) -> Mono {
        Duration::from_secs_f64(secs)
    }

    /// A tiny table with DynamoDB's conditions, to play both sides.
    #[derive(Default)]
    struct Table {
        record: Option<Record>,
        versions: u64,
    }

    impl Table {
        fn apply(&mut self, plan: &Plan) -> Written {
            match plan {
                Plan::Read => Written::Ok,
                Plan::Write {
                    record, expected, ..
                } => {
                    if self.record.as_ref().map(|r| &r.version) != expected.as_ref() {
                        return Written::Conflict;
                    }
                    self.record = Some(record.clone());
                    Written::Ok
                }
            }
        }

        fn version(&mut self) -> String {
            self.versions += 1;
            format!("v{}", self.versions)
        }
    }

    /// One step of `lease` against `table` at `now`: plan, then apply.
    fn step(lease: &mut Lease, table: &mut Table, now: Mono) -> Plan {
        let v = table.version();
        let plan = lease.plan(now, || v);
        match &plan {
            Plan::Read => lease.read(table.record.clone(), now),
            Plan::Write { .. } => {
                let w = table.apply(&plan);
                lease.written(w, now);
            }
        }
        plan
    }

    fn timing() -> Timing {
        Timing::default()
    }

    #[test]
    fn client_go_defaults_and_their_order_is_checked() {
        assert_eq!(
            (timing().lease, timing().renew_deadline, timing().retry),
            (s(15.0), s(10.0), s(2.0))
        );
        assert!(timing().check().is_ok());
        let bad = Timing {
            renew_deadline: s(15.0),
            ..timing()
        };
        assert!(bad.check().unwrap_err().contains("renew deadline"));
        let bad = Timing {
            retry: s(10.0),
            ..timing()
        };
        assert!(bad.check().is_err());
    }

    #[test]
    fn the_first_operator_creates_the_record_and_leads_with_fence_1() {
        let mut t = Table::default();
        let mut a = Lease::new("a", timing());
        assert_eq!(step(&mut a, &mut t, s(0.0)), Plan::Read);
        assert!(a.may_act(s(0.0)).is_err(), "not before it wrote");
        let plan = step(&mut a, &mut t, s(0.1));
        assert!(matches!(
            plan,
            Plan::Write {
                kind: WriteKind::Create,
                expected: None,
                ..
            }
        ));
        assert_eq!(a.may_act(s(0.2)), Ok(1));
        assert_eq!(a.role(s(0.2)), Role::Leader { fence: 1 });
        assert_eq!(t.record.as_ref().map(|r| r.fence), Some(1));
    }

    #[test]
    fn a_leader_that_cannot_renew_stops_at_its_deadline_counted_from_the_send() {
        let mut t = Table::default();
        let mut a = Lease::new("a", timing());
        step(&mut a, &mut t, s(0.0));
        step(&mut a, &mut t, s(1.0)); // created, sent at 1.0
        assert_eq!(a.valid_until(), Some(s(11.0)));
        // Renew at 3.0, sent at 3.0, answered (late) at 4.5: the deadline
        // counts from the send.
        let v = t.version();
        let plan = a.plan(s(3.0), || v);
        assert!(matches!(
            plan,
            Plan::Write {
                kind: WriteKind::Renew,
                ..
            }
        ));
        let w = t.apply(&plan);
        a.written(w, s(4.5));
        assert_eq!(a.valid_until(), Some(s(13.0)));
        // Then every renewal fails.
        for now in [5.0, 7.0, 9.0, 11.0] {
            let v = t.version();
            let _ = a.plan(s(now), || v);
            a.written(Written::Failed, s(now + 0.1));
            // After a failure it reads before writing again: not applied.
            assert_eq!(a.plan(s(now + 0.2), || "x".into()), Plan::Read);
            a.read(t.record.clone(), s(now + 0.3));
        }
        assert!(a.may_act(s(12.9)).is_ok());
        assert!(
            a.may_act(s(13.0)).is_err(),
            "stopped at sent + renew deadline"
        );
        assert!(a.ended().is_some());
    }

    /// Seen in e2e `a_paused_leader_wakes_as_a_standby…`: a leader frozen
    /// (SIGSTOP) with a read in flight woke to that read's answer — its own
    /// record, from before the pause — and tried to take "its" lease back.
    #[test]
    fn a_read_sent_before_the_term_ended_is_not_taken_for_the_lease_now() {
        let mut t = Table::default();
        let mut a = Lease::new("a", timing());
        step(&mut a, &mut t, s(0.0));
        step(&mut a, &mut t, s(0.1));
        assert_eq!(a.may_act(s(0.2)), Ok(1));
        // A renewal's answer is lost: a reads to learn its fate…
        let v = t.version();
        let _ = a.plan(s(2.0), || v);
        a.written(Written::Failed, s(2.1));
        assert_eq!(a.plan(s(2.2), || "x".into()), Plan::Read);
        let sent = a.ends();
        // …and freezes with the answer (its own record) in flight, while b
        // takes over.
        let answer = t.record.clone();
        t.record = Some(Record {
            holder: "b".into(),
            version: "vb".into(),
            fence: 2,
            lease: timing().lease,
            released: false,
        });
        // a wakes long past its deadline, to the old answer.
        a.read_sent(answer, sent, s(40.0));
        assert!(a.may_act(s(40.0)).is_err(), "the term is over");
        assert_eq!(
            a.plan(s(40.1), || "y".into()),
            Plan::Read,
            "it reads again instead of writing on a pre-pause answer"
        );
    }

    #[test]
    fn a_standby_takes_over_only_after_seeing_one_version_for_a_whole_lease() {
        let mut t = Table::default();
        let mut a = Lease::new("a", timing());
        let mut b = Lease::new("b", timing());
        step(&mut a, &mut t, s(0.0));
        step(&mut a, &mut t, s(0.0));
        // b first reads at 0.5 (a's version), a renews every 2 s until 6.
        step(&mut b, &mut t, s(0.5));
        for now in [2.0, 4.0, 6.0] {
            step(&mut a, &mut t, s(now));
            step(&mut b, &mut t, s(now + 0.5));
        }
        // a dies after its renewal at 6.0 (b saw it at 6.5).
        for now in [8.5, 12.0, 21.0] {
            assert_eq!(step(&mut b, &mut t, s(now)), Plan::Read, "at {now}");
        }
        assert_eq!(
            b.next_wake(s(21.0)),
            s(21.5),
            "wakes exactly at seen + lease"
        );
        let plan = step(&mut b, &mut t, s(21.5));
        assert!(matches!(
            plan,
            Plan::Write {
                kind: WriteKind::TakeOver,
                ..
            }
        ));
        assert_eq!(b.may_act(s(21.6)), Ok(2), "a new fence");
        // a had to stop at 6.0 + 10 = 16.0 < 21.5: never two at once.
        assert!(a.may_act(s(16.0)).is_err());
    }

    #[test]
    fn two_standbys_racing_for_one_record_make_one_leader() {
        let mut t = Table::default();
        let mut a = Lease::new("a", timing());
        step(&mut a, &mut t, s(0.0));
        step(&mut a, &mut t, s(0.0));
        let mut b = Lease::new("b", timing());
        let mut c = Lease::new("c", timing());
        step(&mut b, &mut t, s(1.0));
        step(&mut c, &mut t, s(1.0));
        // Both decide to take over from the same version; one write wins.
        let (vb, vc) = (t.version(), t.version());
        let pb = b.plan(s(17.0), || vb);
        let pc = c.plan(s(17.0), || vc);
        let wb = t.apply(&pb);
        let wc = t.apply(&pc);
        b.written(wb, s(17.1));
        c.written(wc, s(17.1));
        assert_eq!((wb, wc), (Written::Ok, Written::Conflict));
        // c learns from its next read that b leads.
        step(&mut c, &mut t, s(17.2));
        assert!(b.may_act(s(17.2)).is_ok());
        assert!(c.may_act(s(17.2)).is_err());
        assert_eq!(
            c.role(s(17.2)),
            Role::Standby {
                leader: Some("b".into()),
                fence: Some(2)
            }
        );
    }

    #[test]
    fn a_paused_leader_notices_on_waking_before_anything_else() {
        let mut t = Table::default();
        let mut a = Lease::new("a", timing());
        step(&mut a, &mut t, s(0.0));
        step(&mut a, &mut t, s(0.0));
        assert!(a.may_act(s(9.9)).is_ok());
        // SIGSTOP at 1 s, SIGCONT at 40 s: the first question is refused.
        assert!(a.may_act(s(40.0)).is_err());
        // And it reads before it writes anything (the record it knew is stale).
        assert_eq!(a.plan(s(40.0), || "v".into()), Plan::Read);
    }

    #[test]
    fn a_write_whose_answer_was_lost_is_recognised_by_its_version() {
        let mut t = Table::default();
        let mut a = Lease::new("a", timing());
        step(&mut a, &mut t, s(0.0));
        let v = t.version();
        let plan = a.plan(s(1.0), || v);
        assert_eq!(t.apply(&plan), Written::Ok);
        a.written(Written::Failed, s(3.0)); // applied, but the answer was lost
        assert!(a.may_act(s(3.0)).is_err());
        assert_eq!(step(&mut a, &mut t, s(3.1)), Plan::Read);
        assert_eq!(a.may_act(s(3.2)), Ok(1), "its own write, sent at 1.0");
        assert_eq!(a.valid_until(), Some(s(11.0)));
    }

    #[test]
    fn a_renewal_that_meets_a_newer_record_steps_down() {
        let mut t = Table::default();
        let mut a = Lease::new("a", timing());
        step(&mut a, &mut t, s(0.0));
        step(&mut a, &mut t, s(0.0));
        // Someone took the record over (a was paused, say).
        t.record = Some(Record {
            holder: "b".into(),
            version: "vb".into(),
            fence: 2,
            lease: s(15.0),
            released: false,
        });
        step(&mut a, &mut t, s(2.0)); // renew: conflict
        assert!(a.may_act(s(2.0)).is_err(), "suspect: stops at once");
        step(&mut a, &mut t, s(2.1)); // read: b
        assert!(a.may_act(s(2.1)).is_err());
        assert!(a.ended().is_some_and(|w| w.contains("b (fence 2)")));
    }

    #[test]
    fn a_newer_epoch_on_an_instance_steps_down_and_the_next_term_is_above_it() {
        let mut t = Table::default();
        let mut a = Lease::new("a", timing());
        step(&mut a, &mut t, s(0.0));
        step(&mut a, &mut t, s(0.0));
        a.saw_epoch(1);
        assert!(a.may_act(s(0.1)).is_ok(), "its own epoch");
        a.saw_epoch(5);
        assert!(a.may_act(s(0.2)).is_err());
        // The record still names a (say the table was restored from a
        // backup): the next term's fence is above what instances carry.
        step(&mut a, &mut t, s(0.3));
        step(&mut a, &mut t, s(0.4));
        assert_eq!(a.may_act(s(0.5)), Ok(6));
    }

    #[test]
    fn a_released_lease_is_taken_at_once() {
        let mut t = Table::default();
        let mut a = Lease::new("a", timing());
        let mut b = Lease::new("b", timing());
        step(&mut a, &mut t, s(0.0));
        step(&mut a, &mut t, s(0.0));
        step(&mut b, &mut t, s(0.5));
        let plan = a.release(s(1.0), t.version()).expect("a leads");
        assert!(a.may_act(s(1.0)).is_err(), "stops before the write");
        let w = t.apply(&plan);
        a.written(w, s(1.1));
        step(&mut b, &mut t, s(1.2)); // reads: released
        step(&mut b, &mut t, s(1.3)); // takes it
        assert_eq!(b.may_act(s(1.4)), Ok(2));
    }

    #[test]
    fn a_leader_whose_term_lapsed_gets_its_own_record_back_without_waiting() {
        let mut t = Table::default();
        let mut a = Lease::new("a", timing());
        step(&mut a, &mut t, s(0.0));
        step(&mut a, &mut t, s(0.0));
        // Paused 12 s: past its deadline, but nobody took over.
        assert!(a.may_act(s(12.0)).is_err());
        assert_eq!(step(&mut a, &mut t, s(12.0)), Plan::Read);
        let plan = step(&mut a, &mut t, s(12.1));
        assert!(matches!(
            plan,
            Plan::Write {
                kind: WriteKind::TakeOver,
                ..
            }
        ));
        assert_eq!(a.may_act(s(12.2)), Ok(2), "a new term, a new fence");
    }
}
