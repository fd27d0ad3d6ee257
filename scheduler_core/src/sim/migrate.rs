//! Migrations as the coordinator runs them: its `_migrate` gates, the workers' two-stage copy.

use super::engine::Phase;
use super::events::EventKind;
use super::flights::Flight;
use super::run::Simulation;
use crate::policy::{Migration, MigrationReason};

pub(super) const REASONS: [MigrationReason; 4] =
    [MigrationReason::StageBound, MigrationReason::Balance, MigrationReason::Refinement, MigrationReason::Rebalance];

pub(super) fn reason_index(r: MigrationReason) -> usize {
    REASONS.iter().position(|&x| x == r).expect("every reason is listed")
}

/// Why a migration failed.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) enum Failure {
    /// The request finished (or was unknown) before the transfer could start.
    Gone,
    /// An optional move found the token bucket empty.
    RateLimited,
    /// At the start of the transfer the request was on another instance, already migrating,
    /// or the target was its source: the policy's view was stale.
    NotOnSource,
    /// At the start of the transfer the request was preempted (waiting or recomputing).
    Preempted,
    /// The target had no KV room for the context at the start.
    NoRoom,
    /// The request finished or was preempted during the bulk copy.
    Interrupted,
    /// The target could not take the final context at landing.
    NoRoomAtLanding,
}

impl Failure {
    pub const ALL: [Failure; 7] = [
        Failure::Gone,
        Failure::RateLimited,
        Failure::NotOnSource,
        Failure::Preempted,
        Failure::NoRoom,
        Failure::Interrupted,
        Failure::NoRoomAtLanding,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Gone => "gone",
            Failure::RateLimited => "rate_limited",
            Failure::NotOnSource => "not_on_source",
            Failure::Preempted => "preempted",
            Failure::NoRoom => "no_room",
            Failure::Interrupted => "interrupted",
            Failure::NoRoomAtLanding => "no_room_at_landing",
        }
    }
}

impl Simulation<'_> {
    fn fail(&mut self, m: &Migration, why: Failure) {
        self.num_failed[reason_index(m.reason)] += 1;
        self.num_failed_by_cause[why as usize] += 1;
        self.policy.migration_done(m, false);
    }

    /// The coordinator's `_migrate` up to its semaphore: drop moves of finished requests or
    /// unknown instances, rate-limit optional moves, then queue for a transfer slot.
    pub(super) fn migrate(&mut self, m: Migration) {
        let r = m.request.0 as usize;
        let is_known = r < self.seqs.len() && self.slot(m.from).is_some() && self.slot(m.to).is_some();
        if !is_known || matches!(self.seqs[r].phase, Phase::Done | Phase::NotArrived) {
            return self.fail(&m, Failure::Gone);
        }
        if m.reason != MigrationReason::StageBound {
            if let Some(bucket) = &mut self.flights.bucket {
                if !bucket.try_take(self.now) {
                    return self.fail(&m, Failure::RateLimited);
                }
            }
        }
        self.flights.pending.push_back(m);
        self.pump();
    }

    fn pump(&mut self) {
        while self.flights.num_active < self.config.max_concurrent_migrations {
            let Some(m) = self.flights.pending.pop_front() else { break };
            self.begin(m);
        }
    }

    /// `MigrateOut` starts: the request must be decoding on its source and the target must
    /// have room for its KV, which is reserved there; the bulk copy runs while it decodes on.
    fn begin(&mut self, m: Migration) {
        let r = m.request.0 as usize;
        let seq = self.seqs[r];
        let (from, to) = (self.slot(m.from).unwrap(), self.slot(m.to).unwrap());
        if seq.phase == Phase::Done {
            return self.fail(&m, Failure::Gone);
        }
        if seq.slot != from || seq.is_migrating || from == to {
            return self.fail(&m, Failure::NotOnSource);
        }
        if seq.phase != Phase::Running || seq.is_prefilling() {
            return self.fail(&m, Failure::Preempted);
        }
        let need = self.p.blocks_for(seq.context_len());
        if !self.instances[to as usize].can_allocate(&self.p, need) {
            return self.fail(&m, Failure::NoRoom);
        }
        self.instances[to as usize].allocate(need);
        self.seqs[r].is_migrating = true;
        let copied_tokens = (seq.context_len() - 1) / self.p.block_size * self.p.block_size;
        let f = self.flights.start(Flight { migration: m, reserved_blocks: need, copied_tokens });
        self.events.push(self.now + self.transfer_s(copied_tokens), EventKind::BulkCopied(f));
    }

    fn transfer_s(&self, tokens: u32) -> f64 {
        (u64::from(tokens) * self.profile.kv_bytes_per_token) as f64 / self.profile.migration_bandwidth_bytes_per_s
    }

    pub(super) fn bulk_copied(&mut self, f: u32) {
        let from = self.slot(self.flights.get(f).migration.from).unwrap();
        let source = &mut self.instances[from as usize];
        if source.is_busy {
            source.pending_pauses.push(f);
        } else {
            self.pause(f);
        }
    }

    /// The request stops on its source (between steps) for the fixed pause plus the copy of
    /// what the bulk copy missed.
    pub(super) fn pause(&mut self, f: u32) {
        let flight = self.flights.get(f);
        let r = flight.migration.request.0 as usize;
        let from = self.slot(flight.migration.from).unwrap();
        let seq = self.seqs[r];
        if seq.phase != Phase::Running || seq.slot != from || seq.is_prefilling() {
            // Finished or preempted meanwhile: nothing left to move.
            return self.abort(f, Failure::Interrupted);
        }
        let running = &mut self.instances[from as usize].running;
        let pos = running.iter().position(|&x| x as usize == r).expect("a running request is in its batch");
        running.remove(pos);
        self.seqs[r].phase = Phase::Paused;
        let stall = self.profile.migration_pause_s + self.transfer_s(seq.context_len() - flight.copied_tokens);
        self.events.push(self.now + stall, EventKind::Landed(f));
    }

    /// Ends a flight that failed: the target's reservation goes, the policy hears of it.
    fn abort(&mut self, f: u32, why: Failure) {
        let flight = self.flights.end(f);
        let m = flight.migration;
        let to = self.slot(m.to).unwrap();
        self.instances[to as usize].release(flight.reserved_blocks);
        self.seqs[m.request.0 as usize].is_migrating = false;
        self.fail(&m, why);
        self.kick(to);
        self.pump();
    }

    pub(super) fn landed(&mut self, f: u32) {
        let flight = self.flights.get(f);
        let m = flight.migration;
        let r = m.request.0 as usize;
        let (from, to) = (self.slot(m.from).unwrap(), self.slot(m.to).unwrap());
        let need = self.p.blocks_for(self.seqs[r].context_len());
        let extra = need.saturating_sub(flight.reserved_blocks);
        if !self.instances[to as usize].can_allocate(&self.p, extra) {
            // The target is full: the request resumes on its source.
            self.seqs[r].phase = Phase::Running;
            self.instances[from as usize].running.push(r as u32);
            self.abort(f, Failure::NoRoomAtLanding);
            self.kick(from);
            return;
        }
        self.flights.end(f);
        self.instances[to as usize].allocate(extra);
        let seq = &mut self.seqs[r];
        self.instances[from as usize].release(seq.num_blocks);
        seq.num_blocks = flight.reserved_blocks + extra;
        seq.num_computed = seq.context_len() - 1;
        seq.slot = to;
        seq.phase = Phase::Running;
        seq.is_migrating = false;
        seq.num_migrations += 1;
        self.instances[to as usize].running.push(r as u32);
        if !self.sessions.is_empty() {
            // The source frees its copy of the KV into its prefix cache.
            self.cache_prefix(r as u32, from);
        }
        self.num_landed[reason_index(m.reason)] += 1;
        self.policy.migration_done(&m, true);
        self.kick(from);
        self.kick(to);
        self.pump();
    }
}
