//! The event loop: arrivals, engine steps, migrations and ticks, with the policy called where
//! and in the order the live coordinator calls it (python/cascadeinfer/scheduler/coordinator.py).

use std::collections::{BTreeMap, VecDeque};

use super::engine::{EngineParams, Instance, Phase, Seq, StepFeed, Timeline};
use super::events::{EventKind, EventQueue};
use super::flights::Flights;
use super::inputs::{slots, validate_trace};
use super::migrate::{Failure, REASONS};
use super::prefix::PrefixCache;
use super::report::{summarize, InstanceStats, RequestRecord, SimReport, StageLoadSample};
use super::SimConfig;
use crate::arrivals::TraceRequest;
use crate::cost::{BatchShape, CostProfile};
use crate::error::{CoreError, Result};
use crate::ids::{InstanceId, RequestId};
use crate::policy::{NewRequest, Policy};
use crate::session::SessionTurn;

/// A run whose admission queue is stuck (nothing running, nothing in flight, nothing left to
/// arrive, the policy refusing every retry) ends after this many simulated seconds.
const MAX_STALL_S: f64 = 600.0;

/// Parked ticks up to this many are skipped one addition at a time, the way running ticks
/// advance their clock, so results do not depend on whether ticks ran or were parked (an idle
/// stretch of up to 6 days at the default 0.5 s ticks); longer stretches jump.
const MAX_TICKS_ADDED_ONE_BY_ONE: f64 = (1 << 20) as f64;

pub(super) struct Simulation<'a> {
    pub(super) policy: &'a mut dyn Policy,
    pub(super) profile: &'a CostProfile,
    pub(super) config: SimConfig,
    pub(super) p: EngineParams,
    pub(super) seqs: Vec<Seq>,
    pub(super) times: Vec<Timeline>,
    /// Each request's session; empty when the trace has none (then no instance caches).
    pub(super) sessions: Vec<Option<SessionTurn>>,
    /// Prompt tokens each request found cached where it was admitted; empty without sessions.
    pub(super) cached_tokens: Vec<u32>,
    /// Trace indices by arrival time.
    pub(super) order: Vec<u32>,
    pub(super) num_arrived: usize,
    pub(super) instances: Vec<Instance>,
    /// Dense index of each `InstanceId`, `u32::MAX` for ids not simulated.
    pub(super) slot_of: Vec<u32>,
    /// The scheduler's admission queue (FIFO).
    pub(super) queue: VecDeque<u32>,
    pub(super) events: EventQueue,
    pub(super) flights: Flights,
    /// The last step's feed (kept to reuse its buffers).
    pub(super) feed: StepFeed,
    pub(super) now: f64,
    pub(super) num_done: usize,
    pub(super) num_landed: [u64; 4],
    pub(super) num_failed: [u64; 4],
    pub(super) num_failed_by_cause: [u64; Failure::ALL.len()],
    pub(super) num_layout_changes: u64,
    pub(super) num_capacity_moves: u64,
    pub(super) total_output_tokens: u64,
    pub(super) last_finish_s: f64,
    pub(super) stalled_since: Option<f64>,
    pub(super) stage_load: Vec<StageLoadSample>,
    /// When the next tick is due while ticks are parked through an idle stretch (`tick`).
    pub(super) parked_tick_s: Option<f64>,
}

impl<'a> Simulation<'a> {
    pub fn new(
        policy: &'a mut dyn Policy,
        profile: &'a CostProfile,
        trace: &[TraceRequest],
        instances: &[InstanceId],
        config: SimConfig,
    ) -> Result<Self> {
        config.validate()?;
        profile.validate()?;
        let p = EngineParams {
            block_size: profile.kv_block_size,
            total_blocks: profile.kv_capacity_tokens / u64::from(profile.kv_block_size),
            max_num_seqs: profile.max_num_seqs,
            max_batch_tokens: profile.max_batch_tokens,
            max_model_len: profile.max_model_len,
        };
        validate_trace(trace, &p, policy.layout().max_len())?;
        let slot_of = slots(instances, policy)?;
        let mut order: Vec<u32> = (0..trace.len() as u32).collect();
        order.sort_by(|&a, &b| trace[a as usize].arrival_s.total_cmp(&trace[b as usize].arrival_s));
        let nan = f64::NAN;
        let has_sessions = trace.iter().any(|r| r.session.is_some());
        let sessions: Vec<Option<SessionTurn>> =
            if has_sessions { trace.iter().map(|r| r.session).collect() } else { Vec::new() };
        let mut engines: Vec<Instance> = instances.iter().map(|&id| Instance::new(id)).collect();
        if has_sessions {
            for inst in &mut engines {
                inst.cache = Some(Box::new(PrefixCache::new(p.total_blocks)));
            }
        }
        Ok(Simulation {
            policy,
            profile,
            flights: Flights::new(config.max_optional_migrations_per_s),
            config,
            p,
            seqs: trace.iter().map(|r| Seq::new(r.prompt_len, r.output_len)).collect(),
            times: trace
                .iter()
                .map(|r| Timeline { arrival_s: r.arrival_s, admitted_s: nan, first_token_s: nan, finished_s: nan })
                .collect(),
            cached_tokens: vec![0; sessions.len()],
            sessions,
            order,
            num_arrived: 0,
            instances: engines,
            slot_of,
            queue: VecDeque::new(),
            events: EventQueue::with_slots(instances.len()),
            feed: StepFeed::default(),
            now: 0.0,
            num_done: 0,
            num_landed: [0; 4],
            num_failed: [0; 4],
            num_failed_by_cause: [0; Failure::ALL.len()],
            num_layout_changes: 0,
            num_capacity_moves: 0,
            total_output_tokens: 0,
            last_finish_s: 0.0,
            stalled_since: None,
            stage_load: Vec::new(),
            parked_tick_s: None,
        })
    }

    pub fn run(mut self) -> Result<SimReport> {
        self.events.push(self.config.tick_interval_s, EventKind::Tick);
        let mut next_arrival_s = self.arrival_s(0);
        while self.num_done < self.seqs.len() {
            // An arrival goes first unless an event comes no later.
            let Some((t, kind)) = self.events.pop_unless_after(next_arrival_s) else {
                let Some(&r) = self.order.get(self.num_arrived) else { break };
                self.unpark_tick(next_arrival_s);
                self.now = next_arrival_s;
                self.num_arrived += 1;
                next_arrival_s = self.arrival_s(self.num_arrived);
                self.arrive(r)?;
                continue;
            };
            self.now = t;
            match kind {
                EventKind::StepEnd(slot) => self.step_end(slot)?,
                EventKind::BulkCopied(f) => self.bulk_copied(f),
                EventKind::Landed(f) => self.landed(f),
                EventKind::Tick => {
                    if !self.tick()? {
                        break;
                    }
                }
            }
        }
        Ok(self.into_report())
    }

    /// Arrival time of the `k`-th request by arrival, infinite past the last.
    fn arrival_s(&self, k: usize) -> f64 {
        self.order.get(k).map_or(f64::INFINITY, |&r| self.times[r as usize].arrival_s)
    }

    pub(super) fn slot(&self, id: InstanceId) -> Option<u32> {
        self.slot_of.get(id.index()).copied().filter(|&s| s != u32::MAX)
    }

    // --- admission ---------------------------------------------------------------------------

    fn arrive(&mut self, r: u32) -> Result<()> {
        self.seqs[r as usize].phase = Phase::Queued;
        if !self.try_admit(r)? {
            self.queue.push_back(r);
        }
        Ok(())
    }

    fn try_admit(&mut self, r: u32) -> Result<bool> {
        let request = NewRequest {
            id: RequestId(u64::from(r)),
            prompt_len: self.seqs[r as usize].prompt_len,
            session: self.sessions.get(r as usize).copied().flatten(),
        };
        let Some(a) = self.policy.admit(&request, self.now)? else { return Ok(false) };
        let slot = self.slot(a.instance).ok_or(CoreError::Unknown { kind: "instance", id: u64::from(a.instance.0) })?;
        if let Some(turn) = request.session {
            self.reuse_prefix(r, slot, turn);
        }
        let seq = &mut self.seqs[r as usize];
        seq.phase = Phase::Waiting;
        seq.slot = slot;
        let times = &mut self.times[r as usize];
        if times.admitted_s.is_nan() {
            times.admitted_s = self.now;
        }
        self.instances[slot as usize].waiting.push_back(r);
        self.kick(slot);
        Ok(true)
    }

    /// Gives request `r`, just admitted to `slot`, the leading blocks of its prompt its
    /// session left cached there (vLLM's prefix cache lookup; done at admission rather than
    /// when the engine first schedules it, so a waiting turn holds its cached blocks). At least
    /// one prompt token is always computed, as in vLLM.
    fn reuse_prefix(&mut self, r: u32, slot: u32, turn: SessionTurn) {
        let block_size = self.p.block_size;
        let inst = &mut self.instances[slot as usize];
        let seq = &mut self.seqs[r as usize];
        let Some(cache) = inst.cache.as_mut() else { return };
        let cached = cache.take(turn.session);
        let usable = turn.prefix_len.min(seq.prompt_len - 1) / block_size;
        let hit = cached.min(usable);
        if hit == 0 || seq.num_blocks > 0 {
            return;
        }
        inst.allocate(hit);
        seq.num_blocks = hit;
        seq.num_computed = hit * block_size;
        self.cached_tokens[r as usize] = hit * block_size;
    }

    /// Request `r` left `slot` (finished, or migrated away): its session's KV up to its last
    /// computed token stays cached there, in whole blocks.
    pub(super) fn cache_prefix(&mut self, r: u32, slot: u32) {
        let Some(turn) = self.sessions.get(r as usize).copied().flatten() else { return };
        let computed = self.seqs[r as usize].context_len() - 1;
        let inst = &mut self.instances[slot as usize];
        if let Some(cache) = inst.cache.as_mut() {
            cache.insert(turn.session, computed / self.p.block_size, inst.used_blocks);
        }
    }

    /// Retries the queue head until the policy refuses one.
    fn drain_queue(&mut self) -> Result<()> {
        while let Some(&r) = self.queue.front() {
            if !self.try_admit(r)? {
                break;
            }
            self.queue.pop_front();
        }
        Ok(())
    }

    // --- engine steps ------------------------------------------------------------------------

    /// Starts a step on an idle instance that has work; it stays idle when nothing fits.
    pub(super) fn kick(&mut self, slot: u32) {
        self.start_step(slot, None);
    }

    /// `kick`, with what the step that just ended there says of the next batch.
    fn start_step(&mut self, slot: u32, next_decode: Option<BatchShape>) {
        let inst = &mut self.instances[slot as usize];
        if inst.is_busy || !inst.has_work() {
            return;
        }
        let shape = inst.schedule(&self.p, &mut self.seqs, next_decode);
        if inst.decode.is_empty() && inst.prefill.is_empty() {
            return;
        }
        let dt = self.profile.step_time(&shape);
        inst.is_busy = true;
        inst.peaks.num_steps += 1;
        inst.peaks.busy_s += dt;
        self.events.push(self.now + dt, EventKind::StepEnd(slot));
    }

    /// The coordinator's `_on_step`: finished requests leave the policy, the others form the
    /// step entries; then migrations, pauses due here, the queue, and the next step.
    fn step_end(&mut self, slot: u32) -> Result<()> {
        self.feed.entries.clear();
        self.feed.finished.clear();
        let inst = &mut self.instances[slot as usize];
        let next_decode = inst.finish_step(&self.p, &mut self.seqs, &mut self.times, self.now, &mut self.feed);
        let id = inst.id;
        for k in 0..self.feed.finished.len() {
            let r = self.feed.finished[k];
            if !self.sessions.is_empty() {
                self.cache_prefix(r, slot);
            }
            self.num_done += 1;
            self.total_output_tokens += u64::from(self.seqs[r as usize].num_generated);
            self.last_finish_s = self.now;
            self.policy.request_finished(RequestId(u64::from(r)), id);
        }
        let migrations = if self.feed.is_repeat {
            match self.policy.on_repeat_step(id, self.now) {
                Some(answer) => answer?,
                None => {
                    self.instances[slot as usize].list_decodes(&self.seqs, &mut self.feed);
                    self.policy.on_step(&self.feed.entries, self.now)?
                }
            }
        } else if !self.feed.entries.is_empty() {
            self.policy.on_step(&self.feed.entries, self.now)?
        } else {
            Vec::new()
        };
        for m in migrations {
            self.migrate(m);
        }
        if !self.instances[slot as usize].pending_pauses.is_empty() {
            let mut pauses = std::mem::take(&mut self.instances[slot as usize].pending_pauses);
            for &f in &pauses {
                self.pause(f);
            }
            pauses.clear();
            self.instances[slot as usize].pending_pauses = pauses;
        }
        if !self.queue.is_empty() {
            self.drain_queue()?;
        }
        self.instances[slot as usize].is_busy = false;
        self.start_step(slot, next_decode);
        Ok(())
    }

    // --- ticks -------------------------------------------------------------------------------

    /// The coordinator's `tick_forever` body; false ends the run (stalled too long).
    fn tick(&mut self) -> Result<bool> {
        let was_idle = self.policy.is_idle();
        let outcome = self.policy.tick(self.now);
        self.num_layout_changes += u64::from(outcome.new_layout.is_some());
        self.num_capacity_moves +=
            u64::from(matches!(outcome.new_layout, Some((_, crate::policy::LayoutChange::CapacityMove))));
        self.sample_stage_load();
        for m in outcome.migrations {
            self.migrate(m);
        }
        self.drain_queue()?;
        // An engine loop polls: an idle instance whose blocks freed up without a kick starts.
        for slot in 0..self.instances.len() as u32 {
            self.kick(slot);
        }
        let is_stalled = self.num_arrived == self.order.len()
            && self.flights.num_active == 0
            && self.instances.iter().all(|i| !i.is_busy);
        if !is_stalled {
            self.stalled_since = None;
        } else if self.now - *self.stalled_since.get_or_insert(self.now) > MAX_STALL_S {
            return Ok(false);
        }
        let next_tick_s = self.now + self.config.tick_interval_s;
        if was_idle && self.is_idle() {
            self.parked_tick_s = Some(next_tick_s);
        } else {
            self.events.push(next_tick_s, EventKind::Tick);
        }
        Ok(true)
    }

    /// Whether nothing can happen before the next arrival: nothing queued, running, in flight
    /// or placed as far as the policy knows, and a request still to come. The ticks of such a
    /// stretch after an idle one are no-ops (`Policy::tick`), so `tick` parks them and
    /// `unpark_tick` skips them: the loop then jumps from one arrival to the next, where a
    /// trace with minutes between requests cost thousands of ticks per request. What is left
    /// out is their stage-load samples (every stage idle).
    fn is_idle(&self) -> bool {
        self.num_arrived < self.order.len()
            && self.queue.is_empty()
            && self.flights.num_active == 0
            && self.instances.iter().all(|i| !i.is_busy && !i.has_work())
            && self.policy.is_idle()
    }

    /// Schedules the first tick after `arrival_s` on the ticks' own clock (ticks due at the
    /// arrival itself came first, and were no-ops) when ticks are parked.
    fn unpark_tick(&mut self, arrival_s: f64) {
        let Some(mut t) = self.parked_tick_s.take() else { return };
        let interval = self.config.tick_interval_s;
        // Tick by tick, as running ticks add up their clock, for up to a few days of idle
        // time; past that in one jump (a trace with years between requests took billions of
        // additions here, hours of wall time).
        let skipped = ((arrival_s - t) / interval).floor();
        if skipped > MAX_TICKS_ADDED_ONE_BY_ONE {
            t += skipped * interval;
        }
        while t <= arrival_s {
            t += interval;
        }
        self.events.push(t, EventKind::Tick);
    }

    fn sample_stage_load(&mut self) {
        for (k, stage) in self.policy.layout().stages().iter().enumerate() {
            let (mut num_running, mut kv_blocks) = (0, 0);
            for &id in &stage.instances {
                if let Some(&slot) = self.slot_of.get(id.index()).filter(|&&s| s != u32::MAX) {
                    let inst = &self.instances[slot as usize];
                    num_running += inst.running.len() as u32;
                    kv_blocks += inst.used_blocks;
                }
            }
            self.stage_load.push(StageLoadSample {
                time_s: self.now,
                stage: k as u32,
                min_len: stage.min_len,
                max_len: stage.max_len,
                num_instances: stage.instances.len() as u32,
                num_running,
                kv_tokens: kv_blocks * u64::from(self.p.block_size),
            });
        }
    }

    fn into_report(self) -> SimReport {
        let records: Vec<RequestRecord> = self
            .seqs
            .iter()
            .zip(&self.times)
            .enumerate()
            .map(|(i, (s, t))| {
                let some = |x: f64| (!x.is_nan()).then_some(x);
                RequestRecord {
                    request: RequestId(i as u64),
                    prompt_len: s.prompt_len,
                    output_len: s.output_len,
                    arrival_s: t.arrival_s,
                    admitted_s: some(t.admitted_s),
                    first_token_s: some(t.first_token_s),
                    finished_s: some(t.finished_s),
                    num_migrations: s.num_migrations,
                    num_preemptions: s.num_preemptions,
                    num_cached_prompt_tokens: self.cached_tokens.get(i).copied().unwrap_or(0),
                }
            })
            .collect();
        let first_arrival = self.order.first().map_or(0.0, |&r| self.times[r as usize].arrival_s);
        let makespan_s = (self.last_finish_s - first_arrival).max(0.0);
        let throughput = if makespan_s > 0.0 { self.total_output_tokens as f64 / makespan_s } else { 0.0 };
        let by_reason = |counts: &[u64; 4]| -> BTreeMap<&'static str, u64> {
            REASONS.iter().zip(counts).filter(|(_, &n)| n > 0).map(|(r, &n)| (r.as_str(), n)).collect()
        };
        let block = u64::from(self.p.block_size);
        SimReport {
            policy: self.policy.name().to_string(),
            summary: summarize(&records, self.num_landed.iter().sum(), throughput),
            migrations_by_reason: by_reason(&self.num_landed),
            failed_migrations_by_reason: by_reason(&self.num_failed),
            failed_migrations_by_cause: Failure::ALL
                .iter()
                .zip(self.num_failed_by_cause)
                .filter(|&(_, n)| n > 0)
                .map(|(f, n)| (f.as_str(), n))
                .collect(),
            num_preemptions: self.seqs.iter().map(|s| u64::from(s.num_preemptions)).sum(),
            num_layout_changes: self.num_layout_changes,
            num_capacity_moves: self.num_capacity_moves,
            num_unfinished: (self.seqs.len() - self.num_done) as u64,
            total_output_tokens: self.total_output_tokens,
            makespan_s,
            stage_load: self.stage_load,
            instances: self
                .instances
                .iter()
                .map(|i| InstanceStats {
                    instance: i.id,
                    num_steps: i.peaks.num_steps,
                    busy_s: i.peaks.busy_s,
                    peak_kv_tokens: i.peaks.used_blocks * block,
                    peak_batch_tokens: i.peaks.batch_tokens,
                    peak_batch_seqs: i.peaks.batch_seqs,
                    final_kv_tokens: i.used_blocks * block,
                })
                .collect(),
            requests: records,
        }
    }
}
