//! The cascade router: admission by prompt length, and the per-token stage-bound check.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::cost::CostProfile;
use crate::error::{CoreError, Result};
use crate::ids::{InstanceId, RequestId};
use crate::layout::StageLayout;
use crate::load::LoadBook;
use crate::policy::{Admission, Migration, MigrationReason, StepEntry};
use crate::prefix_index::PrefixIndex;
use crate::session::SessionTurn;

/// How much costlier than the cheapest instance the one holding a session's KV may be and
/// still take its next turn ([`Router::admit_turn`]). The cost is the turn's marginal cost to
/// everyone over its expected decode steps ([`LoadBook::marginal_cost_prefilling`]), which
/// counts the whole prompt of every turn queued on an instance though the cached part of it
/// needs no prefill, so it overstates the backlog of an instance that holds sessions; and a
/// turn moved off its holder recomputes its whole conversation. Chosen from 1.0, 1.5 and 3.0
/// on the multi-turn presets (docs/evaluation.md, "Multi-turn traffic") when the cost was the
/// turn's first token alone: 1.0 lost up to 9% of mean TTFT to the cache-aware baseline on
/// agent sessions, 3.0 up to 6% of p99 end-to-end latency. Kept when the decode steps joined
/// the cost: on single trace cells 1.0 and 1.5 each led on some, and 2.0 traded a faster
/// first token for a slower answer below saturation (docs/benchmarks.md, "Turns placed by what
/// they cost everyone").
const HOLDER_STICKINESS: f64 = 1.5;

/// How many times cheaper per shared decode step the next stage must be for a new request to
/// start there rather than in its own stage ([`Router::admit`]). Chosen from 1, 1.5, 2 and 3 on
/// bursty production-like and long-context traces (`docs/benchmarks.md`, "Marginal-cost
/// placement within stages"): 1.5-2 gave the lowest mean and p99, 1 and 3 about 1% more.
const NEXT_STAGE_ADVANTAGE: f64 = 2.0;

/// The first-token service level a deployment promises: `base_s` plus `per_prompt_token_s` per
/// prompt token (the DistServe-style TTFT target; by default the one the goodput of
/// `cascade bench sim` counts, `cascadeinfer.evaluation.goodput.GoodputSlo`, which passes its
/// own to cascade). [`Router::first_token_target`] aims inside it.
#[derive(Copy, Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FirstTokenSlo {
    pub base_s: f64,
    pub per_prompt_token_s: f64,
}

impl Default for FirstTokenSlo {
    fn default() -> Self {
        FirstTokenSlo { base_s: 1.0, per_prompt_token_s: 2e-4 }
    }
}

impl FirstTokenSlo {
    pub fn validate(&self) -> Result<()> {
        for (field, v) in
            [("first_token.base_s", self.base_s), ("first_token.per_prompt_token_s", self.per_prompt_token_s)]
        {
            if !(v.is_finite() && v >= 0.0) {
                return Err(CoreError::invalid(field, v, "must be finite and >= 0"));
            }
        }
        Ok(())
    }

    /// The first-token service level of a prompt of `len` tokens, seconds.
    pub fn level(&self, len: u32) -> f64 {
        self.base_s + self.per_prompt_token_s * f64::from(len)
    }
}

/// Decode steps a newcomer is expected to share an instance with the requests there, when the
/// workload the layout was planned for is not known ([`Router::set_output_horizon`]).
const DEFAULT_OUTPUT_HORIZON: f64 = 512.0;

/// Where a new request goes: an instance, its stage, and whether it only visits there for its
/// prefill (a later stage than its own, [`Router::first_token_in_time`]).
#[derive(Copy, Clone, Debug, PartialEq)]
struct Placement {
    instance: InstanceId,
    stage: usize,
    is_visit: bool,
}

impl Placement {
    /// A placement for the request's whole stay (or until it grows past the stage).
    fn stay(instance: InstanceId, stage: usize) -> Self {
        Placement { instance, stage, is_visit: false }
    }
}

/// Routes requests over a stage layout. Holds the loads it has been told about and the
/// requests whose migration is in flight (so a request is never sent twice).
#[derive(Clone, Debug)]
pub struct Router {
    pub(crate) profile: CostProfile,
    pub(crate) layout: StageLayout,
    pub(crate) loads: LoadBook,
    pub(crate) in_flight: HashSet<RequestId>,
    /// Where sessions' KV is probably cached; filled only by policies that place sessions'
    /// requests by it (empty, and without effect, otherwise).
    pub(crate) prefixes: PrefixIndex,
    /// Output tokens a request is expected to decode (the planned workload's mean): with the
    /// stage's upper bound, how long a newcomer shares its instance ([`Router::horizon`]).
    output_horizon: f64,
    /// The first-token service level new requests are placed to meet.
    first_token: FirstTokenSlo,
    /// Requests prefilled on an instance of a later stage than their own, for a first token in
    /// time ([`Router::first_token_in_time`]), that go home once they decode there; with the
    /// instance they visit (a repeat step there is declined while one is held).
    pub(crate) visitors: HashMap<RequestId, InstanceId>,
}

impl Router {
    pub fn new(profile: CostProfile, layout: StageLayout) -> Result<Self> {
        profile.validate()?;
        let prefixes = PrefixIndex::new(profile.kv_capacity_tokens);
        Ok(Router {
            profile,
            layout,
            loads: LoadBook::default(),
            in_flight: HashSet::new(),
            prefixes,
            output_horizon: DEFAULT_OUTPUT_HORIZON,
            first_token: FirstTokenSlo::default(),
            visitors: HashMap::new(),
        })
    }

    /// Sets the output tokens a request is expected to decode (at least 1).
    pub fn set_output_horizon(&mut self, tokens: f64) {
        self.output_horizon = tokens.max(1.0);
    }

    /// Sets the first-token service level new requests are placed to meet.
    pub fn set_first_token_slo(&mut self, slo: FirstTokenSlo) -> Result<()> {
        slo.validate()?;
        self.first_token = slo;
        Ok(())
    }

    /// Decode steps a request of `len` tokens placed in `stage` is expected to stay there: its
    /// expected output, cut at the stage's upper bound, where it moves on.
    fn horizon(&self, stage: usize, len: u32) -> f64 {
        let room = self.layout.stages()[stage].max_len.saturating_sub(len);
        self.output_horizon.min(f64::from(room)).max(1.0)
    }

    pub fn layout(&self) -> &StageLayout {
        &self.layout
    }

    /// Whether the fleet is idle as far as the router knows: no request placed anywhere and
    /// no migration in flight.
    pub fn is_idle(&self) -> bool {
        self.in_flight.is_empty() && self.loads.is_empty()
    }

    pub fn loads(&self) -> &LoadBook {
        &self.loads
    }

    pub(crate) fn check_len(&self, len: u32) -> Result<()> {
        if len >= self.layout.max_len() {
            return Err(CoreError::invalid("context_len", len, format!("must be < max_len {}", self.layout.max_len())));
        }
        Ok(())
    }

    /// Stage by prompt length, then the least-loaded instance of that stage with KV room. When
    /// the whole stage is full the request spills up to the first later stage with room: a
    /// shorter request among longer ones only pays their step time, while waiting in the
    /// scheduler's FIFO queue would also hold back every request behind it (work conservation).
    /// It also starts in the next stage when that is much cheaper per step there
    /// ([`Router::cheaper_next_stage`]): a burst can swamp a stage while the next one idles;
    /// or it is prefilled in the stage before and moves home after (a burst of long prompts
    /// swamps the stage of long contexts: [`Router::cheaper_prefill_before`]).
    pub fn admit(&mut self, request: RequestId, prompt_len: u32) -> Result<Option<Admission>> {
        self.check_len(prompt_len)?;
        let Some(Placement { instance, stage, is_visit }) = self.place_new(prompt_len) else { return Ok(None) };
        if is_visit {
            self.visitors.insert(request, instance);
        }
        self.loads.add_queued(instance, request, prompt_len);
        Ok(Some(Admission { instance, stage }))
    }

    /// [`Router::admit`]'s choice for a new request of `len` tokens, without admitting it.
    fn place_new(&self, len: u32) -> Option<Placement> {
        let home = self.layout.stage_of_len(len);
        let (instance, stage) = self.best_from_stage(home, len, true, None)?;
        if stage != home || self.layout.stages().len() == 1 {
            return Some(Placement::stay(instance, stage));
        }
        // What the request costs on the best instance of its own stage, which both ways out
        // of it are weighed against.
        let home_horizon = self.horizon(home, len);
        let at_home = self.loads.marginal_cost(&self.profile, instance, len, true, home_horizon);
        if let Some(next) = self.cheaper_next_stage(home, at_home / home_horizon, len) {
            return Some(Placement::stay(next, home + 1));
        }
        if let Some(earlier) = self.cheaper_prefill_before(home, instance, at_home, home_horizon, len) {
            return Some(Placement::stay(earlier, home - 1));
        }
        if let Some(in_time) = self.first_token_in_time(home, instance, at_home, len) {
            return Some(in_time);
        }
        Some(Placement::stay(instance, home))
    }

    /// What [`Router::first_token_in_time`] aims at for a prompt of `len` tokens: halfway
    /// between the time its own prefill takes on an idle instance and the first-token service
    /// level ([`FirstTokenSlo`]). The prediction at admission sees the prefill queued ahead,
    /// not what lands after it (migrations in, contexts that grow, the next burst), so it aims
    /// at half the slack the service level leaves; a fixed share of the level itself would be
    /// out of reach of the longest prompts, whose own prefill takes most of it.
    fn first_token_target(&self, len: u32) -> f64 {
        0.5 * (self.first_token.level(len) + self.profile.prefill_work(u64::from(len)))
    }

    /// Another stage's instance for a new request of `len` tokens whose first token would come
    /// too late on `chosen`, the best instance of its own stage `home`: predicted
    /// ([`LoadBook::predicted_cost`]) past [`Router::first_token_target`]. Of the instances of
    /// the other stages predicted to meet the target, the one where the request costs everyone
    /// least ([`LoadBook::marginal_cost`]; in an earlier stage, its prefill there plus the stall
    /// of the move home its first token starts), provided that is no more than `at_home`, its
    /// marginal cost on `chosen`; `None` otherwise. Unlike [`Router::cheaper_prefill_before`],
    /// an earlier stage's side leaves out the decode at home: counted there too, fewer first
    /// tokens came in time for the same end-to-end latency (the variants in the benchmarks).
    /// In a later stage it either stays for its decode there, or only visits for its prefill
    /// and is sent home with its KV at its first decode ([`Router::send_visitor_home`]),
    /// priced as the earlier stage's side is; whichever costs less. A short prompt's whole
    /// stay among longer contexts costs more than any wait for a first token, so without the
    /// visit a burst on the short stage had nowhere to go (`docs/benchmarks.md`, "Prefill
    /// visits to a later stage").
    ///
    /// Stages sized for the mean put the long prompts on a few instances, where a burst of
    /// documents queues for prefill: on bursty production-like traffic the mean first token
    /// came up to 1.85 times later than under least-load, which spreads them over the whole
    /// fleet, and up to 3.1% of requests missed the service level against 0.8%
    /// (`docs/benchmarks.md`, "First token in time"). A mean-latency cost alone cannot see
    /// this: the wait of one long prompt weighs as much as the same wait spread over the short
    /// decodes its prefill would stall elsewhere.
    fn first_token_in_time(&self, home: usize, chosen: InstanceId, at_home: f64, len: u32) -> Option<Placement> {
        let target = self.first_token_target(len);
        if self.loads.predicted_cost(&self.profile, chosen, len, true) <= target {
            return None;
        }
        let mut best: Option<(f64, Placement)> = None;
        for (k, stage) in self.layout.stages().iter().enumerate() {
            if k == home {
                continue;
            }
            let stall = self.profile.migration_stall(u64::from(len));
            let stall_before_first = if k < home { stall } else { 0.0 };
            for &inst in &stage.instances {
                if !self.loads.has_room(&self.profile, inst, len)
                    || self.loads.predicted_cost(&self.profile, inst, len, true) + stall_before_first > target
                {
                    continue;
                }
                // Its prefill there and the move home (an earlier stage's bound sends it on
                // with its first token; a visitor to a later one is sent back), or, in a
                // later stage, its whole stay there if that costs less.
                let visit = self.loads.marginal_cost(&self.profile, inst, len, true, 1.0) + stall;
                let (cost, is_visit) = if k < home {
                    (visit, false)
                } else {
                    let spill = self.loads.marginal_cost(&self.profile, inst, len, true, self.horizon(k, len));
                    if visit < spill {
                        (visit, true)
                    } else {
                        (spill, false)
                    }
                };
                if cost <= at_home && best.as_ref().is_none_or(|(b, _)| cost < *b) {
                    best = Some((cost, Placement { instance: inst, stage: k, is_visit }));
                }
            }
        }
        best.map(|(_, p)| p)
    }

    /// The best instance of the stage before `home` when prefilling a new request of `len`
    /// tokens there, then moving it home with its KV, costs everyone less than `at_home`, its
    /// marginal cost over `home_horizon` steps on `chosen`, the best of its own stage
    /// ([`LoadBook::marginal_cost`] on both sides, the migration stall on the way back); `None`
    /// otherwise. A burst of long prompts swamps the
    /// stage sized for their average while the stage of shorter ones idles; a prompt is the
    /// heaviest work a request brings, and where the prompts are long and the answers short
    /// (summaries, documents) it is most of it. The request crosses the earlier stage's bound
    /// with its first token and moves home like any request that grew past its stage. No
    /// advantage is asked for, unlike [`Router::cheaper_next_stage`]: both sides price the
    /// same decode at home, and asking 1.5 or 2 times cheaper left the p99 loss on bursty
    /// summaries that this removes (`docs/benchmarks.md`, "Prefill in the stage before").
    fn cheaper_prefill_before(
        &self,
        home: usize,
        chosen: InstanceId,
        at_home: f64,
        home_horizon: f64,
        len: u32,
    ) -> Option<InstanceId> {
        let earlier = &self.layout.stages()[home.checked_sub(1)?];
        let alt = self.loads.least_marginal_cost(&self.profile, &earlier.instances, len, true, None, 1.0)?;
        let by_way_of_earlier = self.loads.marginal_cost(&self.profile, alt, len, true, 1.0)
            + self.profile.migration_stall(u64::from(len))
            + self.loads.marginal_cost(&self.profile, chosen, len, false, home_horizon);
        (by_way_of_earlier < at_home).then_some(alt)
    }

    /// The best instance of the stage after `home` when a new request of `len` tokens would cost
    /// less than a `1 / NEXT_STAGE_ADVANTAGE` share there, per decode step it shares, than
    /// `per_step_home`, its marginal cost per shared step on the best instance of its own
    /// stage ([`LoadBook::marginal_cost`]); `None` otherwise.
    /// A stage sized for the average can be swamped by a burst while the next one idles; the
    /// request pays the longer contexts' step time there, which the cost counts, and saves the
    /// wait and the stalls it would add at home.
    fn cheaper_next_stage(&self, home: usize, per_step_home: f64, len: u32) -> Option<InstanceId> {
        let next = self.layout.stages().get(home + 1)?;
        let next_horizon = self.horizon(home + 1, len);
        let alt = self.loads.least_marginal_cost(&self.profile, &next.instances, len, true, None, next_horizon)?;
        let per_step_next = self.loads.marginal_cost(&self.profile, alt, len, true, next_horizon) / next_horizon;
        (per_step_next * NEXT_STAGE_ADVANTAGE < per_step_home).then_some(alt)
    }

    /// `admit` for a turn of a session: the cheapest instance counting the prompt tokens each
    /// would serve from its prefix cache ([`Router::cheapest_with_cache`]); where no instance
    /// is known to hold the session, exactly `admit`'s choice.
    pub fn admit_turn(&mut self, request: RequestId, prompt_len: u32, turn: SessionTurn) -> Result<Option<Admission>> {
        self.check_len(prompt_len)?;
        let home = self.layout.stage_of_len(prompt_len);
        let placed = || self.place_new(prompt_len);
        let choice = if self.prefixes.holdings(turn.session).is_empty() {
            placed()
        } else {
            let by_cache = self.cheapest_with_cache(home, prompt_len, turn);
            by_cache.map(|(instance, stage)| Placement::stay(instance, stage)).or_else(placed)
        };
        let Some(Placement { instance, stage, is_visit }) = choice else { return Ok(None) };
        if is_visit {
            self.visitors.insert(request, instance);
        }
        self.loads.add_queued(instance, request, prompt_len);
        self.prefixes.placed(request, turn.session, instance, prompt_len);
        Ok(Some(Admission { instance, stage }))
    }

    /// Among the instances of stage `home` and those holding `turn`'s session, the one where
    /// the turn costs least when it prefills only what that instance has not cached. A holder in
    /// an earlier stage (the conversation grew past it) also pays the stall of the migration
    /// that takes the turn to its stage after its prefill: the conversation's KV then follows
    /// it there, prefill done where the prefix is. A holder in a later stage takes it as a
    /// spill would.
    fn cheapest_with_cache(&self, home: usize, len: u32, turn: SessionTurn) -> Option<(InstanceId, usize)> {
        let usable = turn.prefix_len.min(len - 1);
        let cached = |inst: InstanceId| self.prefixes.cached_tokens(turn.session, inst).min(usable);
        let mut candidates: Vec<(InstanceId, u32, f64)> =
            self.layout.stages()[home].instances.iter().map(|&i| (i, len - cached(i), 0.0)).collect();
        for h in self.prefixes.holdings(turn.session) {
            let Some(stage) = self.layout.stage_of_instance(h.instance) else { continue };
            if stage != home {
                let stall = if stage < home { self.profile.migration_stall(u64::from(len)) } else { 0.0 };
                candidates.push((h.instance, len - cached(h.instance), stall));
            }
        }
        let horizon = self.horizon(home, len);
        let mut instance = self.loads.cheapest_with_prefill(&self.profile, &candidates, len, horizon)?;
        // The instance holding most of the session stays its home unless another is
        // HOLDER_STICKINESS times cheaper.
        let holder = candidates
            .iter()
            .filter(|&&(i, prefill, _)| prefill < len && self.loads.has_room(&self.profile, i, len))
            .min_by_key(|&&(_, prefill, _)| prefill);
        if let Some(&(h, prefill, extra)) = holder {
            let cost = |i: InstanceId, p: u32, e: f64| {
                self.loads.marginal_cost_prefilling(&self.profile, i, len, p, horizon) + e
            };
            let &(_, best_prefill, best_extra) = candidates.iter().find(|c| c.0 == instance)?;
            if cost(h, prefill, extra) <= HOLDER_STICKINESS * cost(instance, best_prefill, best_extra) {
                instance = h;
            }
        }
        Some((instance, self.layout.stage_of_instance(instance)?))
    }

    /// The best instance with room for `len` tokens in stage `first`, else in the first later
    /// stage that has one; with its stage. Across stages, the one where the request costs
    /// everyone there least ([`LoadBook::marginal_cost`]): within a stage of similar lengths,
    /// what a long prompt's prefill and a longer context do to the requests beside it is what
    /// sets their latency. One stage keeps least-load's choice exactly
    /// ([`LoadBook::least_loaded`]), so the one-stage fallback the layout selection compares
    /// every split with is the least-load baseline decision for decision. (On bursty production-like traces, marginal cost in one stage
    /// gained about 1% of mean latency and lost up to 5% of p99 at low load; in splits it gained
    /// on both: `docs/benchmarks.md`, "Marginal-cost placement within stages".)
    fn best_from_stage(
        &self,
        first: usize,
        len: u32,
        needs_prefill: bool,
        skip: Option<InstanceId>,
    ) -> Option<(InstanceId, usize)> {
        let is_split = self.layout.stages().len() > 1;
        (first..self.layout.stages().len()).find_map(|stage| {
            let candidates = &self.layout.stages()[stage].instances;
            let instance = if is_split {
                let horizon = self.horizon(stage, len);
                self.loads.least_marginal_cost(&self.profile, candidates, len, needs_prefill, skip, horizon)?
            } else {
                self.loads.least_loaded(&self.profile, candidates, len, needs_prefill, skip)?
            };
            Some((instance, stage))
        })
    }

    /// Refreshes the loads of the instances in `entries` and returns a migration for every
    /// request that reached its stage's upper bound (target: the least-loaded instance of the
    /// stage its length now belongs to), and for every visitor now decoding that its own stage
    /// has room for ([`Router::send_visitor_home`]). Requests already migrating are skipped.
    pub fn check_step(&mut self, entries: &[StepEntry]) -> Result<Vec<Migration>> {
        self.loads.begin_refresh();
        let mut crossed: Vec<StepEntry> = Vec::new();
        for e in entries {
            let Some(stage) = self.layout.stage_of_instance(e.instance) else {
                self.loads.end_refresh();
                return Err(CoreError::Unknown { kind: "instance", id: u64::from(e.instance.0) });
            };
            self.loads.record(e.instance, e.request, e.context_len);
            if e.context_len >= self.layout.stages()[stage].max_len {
                crossed.push(*e);
            }
        }
        self.loads.end_refresh();
        let mut out = self.migrate_crossed(crossed.into_iter())?;
        if !self.visitors.is_empty() {
            out.extend(entries.iter().filter_map(|e| self.send_visitor_home(e)));
        }
        Ok(out)
    }

    /// A migration of `e` to its own stage when it is a visitor ([`Router::visitors`]) now
    /// decoding in a later stage, and an instance of its own stage (or of a stage before the
    /// one it visits) has room; `None` otherwise (tried again next step).
    fn send_visitor_home(&mut self, e: &StepEntry) -> Option<Migration> {
        if !self.visitors.contains_key(&e.request) || self.in_flight.contains(&e.request) {
            return None;
        }
        let here = self.layout.stage_of_instance(e.instance)?;
        let home = self.layout.stage_of_len(e.context_len);
        if home >= here {
            // It grew into the stage it visits (or the layout moved): it is home.
            self.visitors.remove(&e.request);
            return None;
        }
        let (to, stage) = self.best_from_stage(home, e.context_len, false, Some(e.instance))?;
        if stage >= here {
            return None;
        }
        Some(self.start_migration(*e, to, MigrationReason::StageBound))
    }

    /// [`Router::check_step`] for a feed that would list `instance`'s running requests as
    /// the book holds them, each one token longer ([`LoadBook::advance_as_fed`]): the same
    /// book and migrations without the feed. `None`, with nothing changed, when the book no
    /// longer holds what the instance's last feed listed or the instance is in no stage;
    /// the caller then sends the feed to `check_step`.
    pub fn check_repeat_step(&mut self, instance: InstanceId) -> Option<Result<Vec<Migration>>> {
        let stage = self.layout.stage_of_instance(instance)?;
        if self.visitors.values().any(|&at| at == instance) {
            return None; // a visitor waiting to go home: `check_step` sends it
        }
        if !self.loads.advance_as_fed(instance) {
            return None;
        }
        let max_len = self.layout.stages()[stage].max_len;
        let load = self.loads.get(instance);
        if load.max_context < max_len {
            return Some(Ok(Vec::new()));
        }
        let crossed: Vec<StepEntry> = load
            .running
            .iter()
            .filter(|&&(_, len)| len >= max_len)
            .map(|&(request, context_len)| StepEntry { request, instance, context_len })
            .collect();
        Some(self.migrate_crossed(crossed.into_iter()))
    }

    /// Stage-bound migrations for `crossed`, the entries of a feed at or past their stage's
    /// upper bound, in feed order (those already moving are left alone).
    fn migrate_crossed(&mut self, crossed: impl Iterator<Item = StepEntry>) -> Result<Vec<Migration>> {
        let mut out = Vec::new();
        for e in crossed {
            if self.in_flight.contains(&e.request) {
                continue;
            }
            self.check_len(e.context_len)?;
            if let Some(m) = self.migrate_to_own_stage(e, MigrationReason::StageBound) {
                out.push(m);
            }
        }
        Ok(out)
    }

    /// A migration of `e` to the best instance of the stage its length belongs to, or of the
    /// first later stage with room when that one is full (a long request left behind would
    /// stretch every step of the short stage it sits in); `None` when no such stage has room
    /// (the request keeps decoding where it is and is retried next step).
    pub(crate) fn migrate_to_own_stage(&mut self, e: StepEntry, reason: MigrationReason) -> Option<Migration> {
        let target_stage = self.layout.stage_of_len(e.context_len);
        let (to, _) = self.best_from_stage(target_stage, e.context_len, false, Some(e.instance))?;
        Some(self.start_migration(e, to, reason))
    }

    /// Llumnix's dispatch: among `candidates` with KV room for `tokens`, the one with the most
    /// free KV tokens per request it holds or waits for (Sun et al., OSDI'24).
    pub(crate) fn freest(&self, candidates: &[InstanceId], tokens: u32) -> Option<InstanceId> {
        let freeness = |inst: InstanceId| {
            let load = self.loads.get(inst);
            let free = self.profile.kv_capacity_tokens as f64 - load.kv_tokens() as f64;
            free / (load.running.len() as f64 + f64::from(load.num_queued()) + 1.0)
        };
        candidates
            .iter()
            .copied()
            .filter(|&i| self.loads.has_room(&self.profile, i, tokens))
            .max_by(|&a, &b| freeness(a).total_cmp(&freeness(b)))
    }

    /// Llumnix's rebalancing: up to `max_moves` times, move the shortest request from the
    /// instance of `candidates` with the highest KV usage to the one with the lowest while
    /// their usages differ by more than `usage_gap`.
    pub(crate) fn even_kv_usage(
        &mut self,
        candidates: &[InstanceId],
        usage_gap: f64,
        max_moves: u32,
        reason: MigrationReason,
    ) -> Vec<Migration> {
        let mut out = Vec::new();
        for _ in 0..max_moves {
            let by_usage = |a: &&InstanceId, b: &&InstanceId| self.kv_usage(**a).total_cmp(&self.kv_usage(**b));
            let (Some(&busiest), Some(&freest)) =
                (candidates.iter().max_by(by_usage), candidates.iter().min_by(by_usage))
            else {
                break;
            };
            if self.kv_usage(busiest) - self.kv_usage(freest) <= usage_gap {
                break;
            }
            let Some(m) = self.move_shortest(busiest, freest, reason) else { break };
            out.push(m);
        }
        out
    }

    /// Admits to the freest instance of stage 0 ([`Router::freest`]): a one-stage layout run
    /// Llumnix's way.
    pub(crate) fn admit_freest(&mut self, request: RequestId, prompt_len: u32) -> Result<Option<Admission>> {
        self.check_len(prompt_len)?;
        let Some(instance) = self.freest(&self.layout.stages()[0].instances, prompt_len) else { return Ok(None) };
        self.loads.add_queued(instance, request, prompt_len);
        Ok(Some(Admission { instance, stage: 0 }))
    }

    /// KV tokens in use or promised on `inst`, as a share of its capacity.
    pub(crate) fn kv_usage(&self, inst: InstanceId) -> f64 {
        self.loads.get(inst).kv_tokens() as f64 / self.profile.kv_capacity_tokens as f64
    }

    /// Starts moving the shortest request on `from` that is not migrating already to `to`
    /// (the least KV to copy); `None` when there is none or `to` has no room for it.
    pub(crate) fn move_shortest(
        &mut self,
        from: InstanceId,
        to: InstanceId,
        reason: MigrationReason,
    ) -> Option<Migration> {
        let &(request, len) = self
            .loads
            .get(from)
            .running
            .iter()
            .filter(|(r, _)| !self.in_flight.contains(r))
            .min_by_key(|(_, len)| *len)?;
        if !self.loads.has_room(&self.profile, to, len) {
            return None;
        }
        Some(self.start_migration(StepEntry { request, instance: from, context_len: len }, to, reason))
    }

    pub(crate) fn start_migration(&mut self, e: StepEntry, to: InstanceId, reason: MigrationReason) -> Migration {
        self.in_flight.insert(e.request);
        self.loads.move_request(e.request, e.instance, to, e.context_len);
        Migration { request: e.request, from: e.instance, to, context_len: e.context_len, reason }
    }

    /// Ends an in-flight migration; on failure the load goes back to the source.
    pub fn migration_done(&mut self, m: &Migration, succeeded: bool) {
        if !self.in_flight.remove(&m.request) {
            // It finished during the move (`request_finished` forgot it everywhere): putting
            // its load back on the source would leave a request there that never ends.
            return;
        }
        if succeeded {
            self.visitors.remove(&m.request);
            // It kept decoding on the source during the bulk copy, so the source's feed may
            // have listed it again since the move was decided.
            self.loads.forget_request(m.from, m.request);
            self.loads.arrived(m.to, m.request);
            self.prefixes.moved(m.request, m.to, m.context_len);
        } else {
            self.loads.move_back(m.request, m.from, m.to, m.context_len);
        }
    }

    /// A request left `instance`. One that finished while it was being moved may be held on
    /// the move's target too (the book moved it when the move was decided, and a refresh of
    /// the target that did not list it took it for preempted), so it is forgotten everywhere:
    /// forgetting it on `instance` alone left a request in the book that never ends, and the
    /// instance holding it looked loaded for the rest of the run (one per interrupted move).
    pub fn request_finished(&mut self, request: RequestId, instance: InstanceId) {
        let was_moving = self.in_flight.remove(&request);
        self.visitors.remove(&request);
        if self.prefixes.follows(request) {
            let running = &self.loads.get(instance).running;
            let context_len = running.iter().find(|&&(r, _)| r == request).map(|&(_, len)| len);
            self.prefixes.finished(request, instance, context_len);
        }
        if was_moving {
            self.loads.forget_everywhere(request);
        } else {
            self.loads.forget_request(instance, request);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::tests::gpu;
    use crate::layout::StageRange;

    fn router() -> Router {
        let ids = |v: &[u32]| v.iter().map(|&i| InstanceId(i)).collect::<Vec<_>>();
        let layout = StageLayout::new(vec![
            StageRange { min_len: 0, max_len: 1000, instances: ids(&[0, 1]) },
            StageRange { min_len: 1000, max_len: 8000, instances: ids(&[2, 3]) },
            StageRange { min_len: 8000, max_len: 131_072, instances: ids(&[4]) },
        ])
        .unwrap();
        Router::new(gpu(), layout).unwrap()
    }

    fn entry(r: u64, i: u32, len: u32) -> StepEntry {
        StepEntry { request: RequestId(r), instance: InstanceId(i), context_len: len }
    }

    #[test]
    fn admission_picks_the_stage_by_prompt_and_spreads_load() {
        let mut r = router();
        let a = r.admit(RequestId(0), 500).unwrap().unwrap();
        let b = r.admit(RequestId(0), 500).unwrap().unwrap();
        assert_eq!((a.stage, b.stage), (0, 0));
        assert_ne!(a.instance, b.instance, "the second request goes to the other instance");
        assert_eq!(r.admit(RequestId(0), 5000).unwrap().unwrap().stage, 1);
        assert_eq!(r.admit(RequestId(0), 100_000).unwrap().unwrap().instance, InstanceId(4));
        assert!(r.admit(RequestId(0), 131_072).is_err());
    }

    #[test]
    fn a_swamped_stage_sends_new_requests_to_a_next_stage_that_idles() {
        let mut r = router();
        // A burst of prompts waits on both instances of the short stage.
        for i in 0..2 {
            for q in 0..40 {
                r.loads.add_queued(InstanceId(i), RequestId(1000 + u64::from(i) * 100 + q), 900);
            }
        }
        let a = r.admit(RequestId(1), 500).unwrap().unwrap();
        assert_eq!((a.stage, a.instance), (1, InstanceId(2)), "the middle stage is idle");
        // Without the burst, the short stage keeps its own requests.
        let mut r = router();
        r.loads.add_queued(InstanceId(0), RequestId(2000), 900);
        assert_eq!(r.admit(RequestId(2), 500).unwrap().unwrap().stage, 0);
    }

    #[test]
    fn a_burst_of_long_prompts_prefills_in_the_stage_before_and_moves_home() {
        let mut r = router();
        // Ten long documents wait on the last stage's only instance; the middle stage idles.
        for q in 0..10 {
            r.loads.add_queued(InstanceId(4), RequestId(1000 + q), 20_000);
        }
        let a = r.admit(RequestId(1), 12_000).unwrap().unwrap();
        assert_eq!(a.stage, 1, "prefilled where it stalls no queue");
        // Its first token takes it past the middle stage's bound: it moves home with its KV.
        let moves = r.check_step(&[entry(1, a.instance.0, 12_001)]).unwrap();
        assert_eq!(moves.len(), 1);
        assert_eq!((moves[0].to, moves[0].reason), (InstanceId(4), MigrationReason::StageBound));
        // With its own stage idle, a long prompt starts at home (the move would only add a
        // stall).
        assert_eq!(router().admit(RequestId(2), 12_000).unwrap().unwrap().stage, 2);
    }

    #[test]
    fn a_long_prompt_whose_first_token_would_be_late_at_home_prefills_where_it_is_in_time() {
        // `docs` prompts of `doc_len` tokens wait on the last stage's only instance, thirty of
        // 7,000 on each of the middle stage's; the short stage idles.
        let busy = |docs: u64, doc_len: u32| {
            let mut r = router();
            for q in 0..docs {
                r.loads.add_queued(InstanceId(4), RequestId(1000 + q), doc_len);
            }
            for i in [2, 3] {
                for q in 0..30 {
                    r.loads.add_queued(InstanceId(i), RequestId(2000 + u64::from(i) * 100 + q), 7000);
                }
            }
            r
        };
        let mut r = busy(10, 20_000);
        let target = r.first_token_target(12_000);
        assert!(r.loads.predicted_cost(&r.profile, InstanceId(4), 12_000, true) > target);
        assert!(r.loads.predicted_cost(&r.profile, InstanceId(2), 12_000, true) > target);
        let a = r.admit(RequestId(1), 12_000).unwrap().unwrap();
        assert_eq!(a.stage, 0, "the idle short stage gives it its first token in time");
        // Its first token takes it home with its KV, like any request past its stage's bound.
        let moves = r.check_step(&[entry(1, a.instance.0, 12_001)]).unwrap();
        assert_eq!((moves.len(), moves[0].to), (1, InstanceId(4)));
        // With one short document ahead at home its first token is in time there: it stays.
        let mut r = busy(1, 2000);
        assert!(r.loads.predicted_cost(&r.profile, InstanceId(4), 12_000, true) <= r.first_token_target(12_000));
        assert_eq!(r.admit(RequestId(1), 12_000).unwrap().unwrap().stage, 2);
        // Two documents ahead at home still leave its first token in time by default; a
        // deployment that promises it sooner than they allow, though not sooner than the idle
        // short stage and the move home take, has the short stage take the prefill.
        assert_eq!(busy(2, 6000).admit(RequestId(1), 12_000).unwrap().unwrap().stage, 2);
        let mut r = busy(2, 6000);
        let home = r.loads.predicted_cost(&r.profile, InstanceId(4), 12_000, true);
        let away = r.loads.predicted_cost(&r.profile, InstanceId(0), 12_000, true) + r.profile.migration_stall(12_000);
        assert!(away < home, "{away} {home}");
        let level = (home + away) - r.profile.prefill_work(12_000);
        r.set_first_token_slo(FirstTokenSlo { base_s: level, per_prompt_token_s: 0.0 }).unwrap();
        assert!(home > r.first_token_target(12_000) && away < r.first_token_target(12_000));
        assert_eq!(r.admit(RequestId(1), 12_000).unwrap().unwrap().stage, 0);
    }

    #[test]
    fn a_short_prompt_late_at_home_visits_a_later_stage_for_its_prefill_and_goes_home_decoding() {
        // A burst of prompts waits on both instances of the short stage; the middle stage's
        // instances decode long contexts, a step there costs more than at home.
        let swamped = || {
            let mut r = router();
            for i in 0..2 {
                for q in 0..40 {
                    r.loads.add_queued(InstanceId(i), RequestId(1000 + u64::from(i) * 100 + q), 900);
                }
            }
            let decoding: Vec<StepEntry> =
                (0..60).flat_map(|q| [entry(5000 + q, 2, 7000), entry(6000 + q, 3, 7000)]).collect();
            r.check_step(&decoding).unwrap();
            r
        };
        let mut r = swamped();
        assert!(r.loads.predicted_cost(&r.profile, InstanceId(0), 500, true) > r.first_token_target(500));
        let a = r.admit(RequestId(1), 500).unwrap().unwrap();
        assert!(a.stage > 0, "prefilled where its first token is in time");
        assert!(r.visitors.contains_key(&RequestId(1)));
        // Its first decode: its own stage still has room, so it goes home with its KV (a
        // repeat step is declined, so the full feed reaches `check_step`).
        assert!(r.check_repeat_step(a.instance).is_none());
        let moves = r.check_step(&[entry(1, a.instance.0, 501)]).unwrap();
        assert_eq!(moves.len(), 1);
        assert_eq!(r.layout.stage_of_instance(moves[0].to), Some(0));
        assert_eq!(moves[0].context_len, 501);
        assert!(r.check_step(&[entry(1, a.instance.0, 502)]).unwrap().is_empty(), "sent once");
        r.migration_done(&moves[0], true);
        assert!(r.visitors.is_empty());
        // A failed move leaves it a visitor, sent again at its next step.
        let mut r = swamped();
        let a = r.admit(RequestId(1), 500).unwrap().unwrap();
        let [m] = r.check_step(&[entry(1, a.instance.0, 501)]).unwrap()[..] else { panic!() };
        r.migration_done(&m, false);
        assert_eq!(r.check_step(&[entry(1, a.instance.0, 502)]).unwrap().len(), 1);
        // A request that starts in a later stage for its whole stay (here the short stage
        // has no room) is no visitor and stays where it decodes.
        let mut r = router();
        for i in 0..2 {
            r.loads.add_queued(InstanceId(i), RequestId(3000 + u64::from(i)), 409_000);
        }
        let a = r.admit(RequestId(1), 500).unwrap().unwrap();
        assert_eq!(a.stage, 1);
        assert!(r.visitors.is_empty());
        r.loads.clear(InstanceId(0));
        assert!(r.check_step(&[entry(1, a.instance.0, 501)]).unwrap().is_empty());
    }

    #[test]
    fn a_first_token_slo_must_be_finite_and_not_negative() {
        let mut r = router();
        for (base_s, per_prompt_token_s) in [(-1.0, 2e-4), (1.0, f64::NAN), (f64::INFINITY, 0.0)] {
            assert!(r.set_first_token_slo(FirstTokenSlo { base_s, per_prompt_token_s }).is_err());
        }
        assert_eq!(r.first_token, FirstTokenSlo::default(), "a refused level leaves the old one");
        r.set_first_token_slo(FirstTokenSlo { base_s: 0.0, per_prompt_token_s: 0.0 }).unwrap();
    }

    #[test]
    fn first_token_targets_leave_the_longest_prompts_room_for_their_own_prefill() {
        let r = router();
        for len in [1, 1000, 32_000, 130_000] {
            let (own, target) = (r.profile.prefill_work(u64::from(len)), r.first_token_target(len));
            let level = r.first_token.level(len);
            assert!(own < target && target < level, "{len}: {own} {target} {level}");
        }
    }

    #[test]
    fn crossing_the_bound_migrates_once_to_the_lighter_next_stage_instance() {
        let mut r = router();
        r.check_step(&[entry(7, 2, 3000), entry(8, 2, 3000)]).unwrap();
        let moves = r.check_step(&[entry(1, 0, 999), entry(2, 0, 1000), entry(3, 1, 1200)]).unwrap();
        assert_eq!(moves.len(), 2);
        assert!(moves.iter().all(|m| m.to == InstanceId(3) && m.reason == MigrationReason::StageBound));
        // Still on the source next step while the move is in flight: no second migration.
        assert!(r.check_step(&[entry(2, 0, 1001)]).unwrap().is_empty());
        r.migration_done(&moves[0], false);
        assert_eq!(r.check_step(&[entry(2, 0, 1002)]).unwrap().len(), 1);
    }

    #[test]
    fn a_full_stage_spills_admissions_and_moves_to_the_next_stage_with_room() {
        let mut r = router();
        // Fill stage 1 (instances 2 and 3) to its sequence cap.
        let full: Vec<StepEntry> = (0..2 * 256).map(|k| entry(k, 2 + (k % 2) as u32, 2000)).collect();
        r.check_step(&full).unwrap();
        let a = r.admit(RequestId(9000), 5000).unwrap().unwrap();
        assert_eq!((a.stage, a.instance), (2, InstanceId(4)), "a stage-1 prompt spills to stage 2");
        // A stage-0 request crossing into the full stage 1 goes on to stage 2, not nowhere.
        let moves = r.check_step(&[entry(1, 0, 1000)]).unwrap();
        assert_eq!(moves.len(), 1);
        assert_eq!(moves[0].to, InstanceId(4));
        // Nothing spills downwards: with the last stage full too, a long prompt waits.
        let last: Vec<StepEntry> = (0..256).map(|k| entry(10_000 + k, 4, 9000)).collect();
        r.check_step(&last).unwrap();
        assert!(r.admit(RequestId(9001), 100_000).unwrap().is_none());
        assert_eq!(r.admit(RequestId(9002), 100).unwrap().unwrap().stage, 0);
    }

    #[test]
    fn a_turn_goes_where_its_session_is_cached_when_that_is_cheaper() {
        use crate::session::{SessionId, SessionTurn};
        let mut r = router();
        let turn = |prefix_len| SessionTurn { session: SessionId(5), turn: 1, prefix_len };
        // Nothing known of the session: exactly admit's choice.
        let first = r.admit_turn(RequestId(1), 3000, turn(0)).unwrap().unwrap();
        assert_eq!(first, Admission { instance: InstanceId(2), stage: 1 });
        r.check_step(&[entry(1, 2, 3400)]).unwrap();
        r.request_finished(RequestId(1), InstanceId(2));
        assert_eq!(r.prefixes.cached_tokens(SessionId(5), InstanceId(2)), 3400);
        // Instance 2 is now the busier of its stage: a new prompt goes to 3, the session's
        // next turn stays with its 3,400 cached tokens on 2.
        r.check_step(&[entry(10, 2, 2000)]).unwrap();
        assert_eq!(r.admit(RequestId(2), 7000).unwrap().unwrap().instance, InstanceId(3));
        r.request_finished(RequestId(2), InstanceId(3));
        assert_eq!(r.admit_turn(RequestId(3), 7000, turn(3400)).unwrap().unwrap().instance, InstanceId(2));
        // Far busier, it is no longer worth it.
        r.check_step(&(10..200).map(|k| entry(k, 2, 6000)).collect::<Vec<_>>()).unwrap();
        assert_eq!(r.admit_turn(RequestId(4), 7000, turn(3400)).unwrap().unwrap().instance, InstanceId(3));
    }

    #[test]
    fn a_turn_leaves_its_holder_when_the_long_decodes_there_cost_more_than_its_prefill_saves() {
        use crate::session::{SessionId, SessionTurn};
        let layout = StageLayout::single(131_072, &[InstanceId(0), InstanceId(1)]).unwrap();
        let mut r = Router::new(gpu(), layout).unwrap();
        let turn = |prefix_len| SessionTurn { session: SessionId(5), turn: 1, prefix_len };
        r.check_step(&[entry(99, 1, 100)]).unwrap();
        assert_eq!(r.admit_turn(RequestId(1), 60_000, turn(0)).unwrap().unwrap().instance, InstanceId(0));
        r.check_step(&[entry(1, 0, 60_400), entry(99, 1, 101)]).unwrap();
        r.request_finished(RequestId(1), InstanceId(0));
        r.request_finished(RequestId(99), InstanceId(1));
        // A light holder keeps the conversation: 600 tokens to prefill there against 61,000.
        r.check_step(&[entry(2, 0, 2000)]).unwrap();
        assert_eq!(r.admit_turn(RequestId(3), 61_000, turn(60_400)).unwrap().unwrap().instance, InstanceId(0));
        r.request_finished(RequestId(3), InstanceId(0));
        // Three other long conversations decoding on the holder: the turn would be first to
        // its first token there, but its answer would stretch their steps and they its own, for
        // hundreds of steps, which costs more than the prefill the cache saves. The cost of the
        // first token alone still says stay.
        let crowded: Vec<StepEntry> = (10..13).map(|k| entry(k, 0, 90_000)).collect();
        r.check_step(&crowded).unwrap();
        let first_token =
            |r: &Router, i: u32, prefill: u32| r.loads.cost_with_prefill(&r.profile, InstanceId(i), 61_000, prefill);
        assert!(first_token(&r, 0, 600) < first_token(&r, 1, 61_000));
        assert_eq!(r.admit_turn(RequestId(4), 61_000, turn(60_400)).unwrap().unwrap().instance, InstanceId(1));
    }

    #[test]
    fn unknown_instances_and_overlong_contexts_are_errors() {
        let mut r = router();
        assert!(r.check_step(&[entry(1, 99, 10)]).is_err());
        assert!(r.check_step(&[entry(1, 4, 200_000)]).is_err());
    }
}
