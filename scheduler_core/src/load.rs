//! Per-instance load as the scheduler sees it: refreshed from engine step feeds, bumped
//! optimistically on admission and migration so back-to-back decisions spread out.

use crate::cost::{prefill_pairs, BatchShape, CostProfile};
use crate::ids::{InstanceId, RequestId};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct InstanceLoad {
    /// Running requests and their context lengths, as of the last step feed (plus moves since).
    pub running: Vec<(RequestId, u32)>,
    pub sum_context: u64,
    pub max_context: u32,
    /// Admitted requests not yet seen running, and their prompt tokens. Each is named, so it
    /// leaves this list exactly when it shows up in a step feed, finishes, or moves: a request
    /// that finishes inside its first step never appears in a feed, and an instance with nothing
    /// left running sends no feed at all, so clearing the queue on a refresh would either leak
    /// its load forever (the instance looks full and admission stalls) or drop requests still
    /// waiting for KV room.
    pub queued: Vec<(RequestId, u32)>,
    pub queued_tokens: u64,
    /// Bounds on the ids in `queued` (exact after every change): a feed entry outside them is
    /// not queued, which spares most entries a scan of the list (it can hold hundreds).
    queued_ids: (u64, u64),
    /// Requests being moved here, counted in `running` from the move's decision: this
    /// instance's feeds do not list them until they land, and a request a feed leaves out is
    /// otherwise taken for preempted (queued, its whole context a prefill to come), which made
    /// every move's target look a prefill chunk slower for the whole copy.
    arriving: Vec<RequestId>,
}

impl InstanceLoad {
    fn push(&mut self, request: RequestId, len: u32) {
        self.running.push((request, len));
        self.sum_context += u64::from(len);
        self.max_context = self.max_context.max(len);
    }

    fn enqueue(&mut self, request: RequestId, len: u32) {
        let (lo, hi) = if self.queued.is_empty() { (u64::MAX, 0) } else { self.queued_ids };
        self.queued_ids = (lo.min(request.0), hi.max(request.0));
        self.queued.push((request, len));
        self.queued_tokens += u64::from(len);
    }

    /// Takes `request` off the queued list; whether it was there.
    fn dequeue(&mut self, request: RequestId) -> bool {
        let (lo, hi) = self.queued_ids;
        if self.queued.is_empty() || request.0 < lo || request.0 > hi {
            return false;
        }
        let Some(pos) = self.queued.iter().position(|&(r, _)| r == request) else { return false };
        let (_, len) = self.queued.swap_remove(pos);
        self.queued_tokens -= u64::from(len);
        if request.0 == lo || request.0 == hi {
            let ids = || self.queued.iter().map(|&(r, _)| r.0);
            self.queued_ids = (ids().min().unwrap_or(u64::MAX), ids().max().unwrap_or(0));
        }
        true
    }

    /// Takes `request` off this instance, queued or running.
    fn remove(&mut self, request: RequestId) -> Option<u32> {
        if !self.arriving.is_empty() {
            self.arriving.retain(|&r| r != request);
        }
        if self.dequeue(request) {
            return None;
        }
        let pos = self.running.iter().position(|&(r, _)| r == request)?;
        let (_, len) = self.running.swap_remove(pos);
        self.sum_context -= u64::from(len);
        if len == self.max_context {
            self.max_context = self.running.iter().map(|&(_, l)| l).max().unwrap_or(0);
        }
        Some(len)
    }

    /// Admitted requests not yet seen running.
    pub fn num_queued(&self) -> u32 {
        self.queued.len() as u32
    }

    /// KV tokens in use or promised.
    pub fn kv_tokens(&self) -> u64 {
        self.sum_context + self.queued_tokens
    }

    pub fn batch(&self) -> BatchShape {
        BatchShape {
            num_decode: self.running.len() as u32,
            sum_context: self.sum_context,
            max_context: self.max_context,
            prefill_tokens: 0,
            prefill_pairs: 0,
        }
    }
}

/// `batch` plus one chunk (at most the token budget) of `queued` prefill tokens.
fn with_prefill_chunk(mut batch: BatchShape, queued: u64, profile: &CostProfile) -> BatchShape {
    let chunk = queued.min(u64::from(profile.max_batch_tokens));
    batch.prefill_tokens = chunk as u32;
    batch.prefill_pairs = prefill_pairs(0, chunk);
    batch
}

/// Share of an instance's KV capacity that admission and migration fill before using the rest
/// (see [`LoadBook::least_loaded`]).
pub const KV_WATERMARK: f64 = 0.75;

#[derive(Clone, Debug, Default)]
pub struct LoadBook {
    loads: Vec<InstanceLoad>,
    /// Which call last reset each instance (so one call resets an instance once).
    epoch_of: Vec<u64>,
    epoch: u64,
    /// Per instance, how many running requests the current refresh has confirmed in the order
    /// they were listed before; `OUT_OF_ORDER` once the feed strayed from that order.
    confirmed_of: Vec<u32>,
    /// Instances refreshed by the current refresh.
    refreshed: Vec<InstanceId>,
    /// Per instance whose feed strayed from the old order, its running requests not confirmed
    /// by then: those the feed does not list again are still there, waiting (see
    /// [`LoadBook::end_refresh`]).
    before: Vec<(InstanceId, Vec<(RequestId, u32)>)>,
    /// Emptied lists kept for reuse (the simulator refreshes millions of times).
    spare: Vec<Vec<(RequestId, u32)>>,
    /// Per instance, whether its running list is still exactly what its last step feed listed,
    /// in that order (nothing moved, finished or was added there since): what lets
    /// [`LoadBook::advance_as_fed`] stand for the next feed.
    is_as_fed: Vec<bool>,
}

/// `LoadBook::confirmed_of` of an instance whose refresh left the old order.
const OUT_OF_ORDER: u32 = u32::MAX;

impl LoadBook {
    pub fn get(&self, inst: InstanceId) -> &InstanceLoad {
        static EMPTY: InstanceLoad = InstanceLoad {
            running: Vec::new(),
            sum_context: 0,
            max_context: 0,
            queued: Vec::new(),
            queued_tokens: 0,
            queued_ids: (u64::MAX, 0),
            arriving: Vec::new(),
        };
        self.loads.get(inst.index()).unwrap_or(&EMPTY)
    }

    /// Whether no request is placed on any instance, running or queued.
    pub fn is_empty(&self) -> bool {
        self.loads.iter().all(|l| l.running.is_empty() && l.queued.is_empty())
    }

    fn get_mut(&mut self, inst: InstanceId) -> &mut InstanceLoad {
        if self.loads.len() <= inst.index() {
            self.grow(inst);
        }
        &mut self.loads[inst.index()]
    }

    #[cold]
    fn grow(&mut self, inst: InstanceId) {
        self.loads.resize_with(inst.index() + 1, InstanceLoad::default);
        self.epoch_of.resize(inst.index() + 1, 0);
        self.confirmed_of.resize(inst.index() + 1, 0);
        self.is_as_fed.resize(inst.index() + 1, false);
    }

    /// Starts a refresh: instances named in the following `record` calls are rebuilt from them.
    pub fn begin_refresh(&mut self) {
        // A refresh left open (no `end_refresh`) keeps what its feed listed, nothing more.
        for k in 0..self.refreshed.len() {
            let inst = self.refreshed[k];
            let confirmed = self.confirmed_of[inst.index()];
            if confirmed != OUT_OF_ORDER {
                let load = &mut self.loads[inst.index()];
                load.running.truncate(confirmed as usize);
            }
        }
        self.epoch += 1;
        self.refreshed.clear();
        self.before.clear();
    }

    /// Ends a refresh. A request that was running on a refreshed instance and is neither listed
    /// again, finished, nor moved was preempted: the engine freed its KV and holds it in its
    /// waiting queue, to recompute its whole context. It counts as queued there (prefill to
    /// redo, KV to come back) until it runs again; dropping it, as the book did, hid every
    /// preempted request from admission, which kept filling the instances that were already
    /// preempting (least-load: 1,055 preemptions on agentic traffic near saturation).
    pub fn end_refresh(&mut self) {
        // Whatever an in-order refresh did not reach was not listed again.
        for k in 0..self.refreshed.len() {
            let inst = self.refreshed[k];
            // The running list becomes the feed's, in its order (what is set aside below
            // either is listed later in it or leaves for the queued list).
            self.is_as_fed[inst.index()] = true;
            let confirmed = self.confirmed_of[inst.index()];
            if confirmed != OUT_OF_ORDER && (confirmed as usize) < self.loads[inst.index()].running.len() {
                self.set_aside_unconfirmed(inst, confirmed as usize);
            }
        }
        self.refreshed.clear();
        let mut refreshed = std::mem::take(&mut self.before);
        for (inst, mut before) in refreshed.drain(..) {
            let load = &mut self.loads[inst.index()];
            // Feeds list an instance's requests in a stable order, so the requests set aside are
            // almost always a subsequence of the new list, give or take one moved from the end
            // into a hole (`InstanceLoad::remove`): a pass that goes on from where the last one
            // was found, wrapping around, finds each, and only one that is missing costs a
            // full search.
            let mut next = 0;
            for &(request, len) in &before {
                let is_at = |&(r, _): &(RequestId, u32)| r == request;
                if let Some(k) = load.running[next..].iter().position(is_at) {
                    next += k + 1;
                } else if let Some(k) = load.running[..next].iter().position(is_at) {
                    next = k + 1;
                } else if load.arriving.contains(&request) {
                    // Not here yet, not preempted: it keeps its place until it lands.
                    load.push(request, len);
                    self.is_as_fed[inst.index()] = false;
                } else if !load.queued.iter().any(is_at) {
                    load.enqueue(request, len);
                }
            }
            before.clear();
            self.spare.push(before);
        }
        self.before = refreshed; // empty, keeping its capacity
    }

    /// Moves `inst`'s running requests from position `confirmed` on aside, to be looked for
    /// among the rest of the feed at the end of the refresh.
    fn set_aside_unconfirmed(&mut self, inst: InstanceId, confirmed: usize) {
        let mut rest = self.spare.pop().unwrap_or_default();
        rest.extend(self.loads[inst.index()].running.drain(confirmed..));
        self.before.push((inst, rest));
        self.confirmed_of[inst.index()] = OUT_OF_ORDER;
    }

    /// One running request seen in a step feed: the instance's running set is rebuilt from the
    /// feed, and the request is no longer queued there. A feed that lists the requests in the
    /// order the book holds them (a step with nothing started, finished or moved) only
    /// updates their lengths in place.
    #[inline]
    pub fn record(&mut self, inst: InstanceId, request: RequestId, len: u32) {
        let idx = inst.index();
        if self.loads.len() <= idx {
            self.grow(inst);
        }
        if self.epoch_of[idx] != self.epoch {
            self.epoch_of[idx] = self.epoch;
            self.confirmed_of[idx] = 0;
            self.refreshed.push(inst);
            let load = &mut self.loads[idx];
            load.sum_context = 0;
            load.max_context = 0;
        }
        let confirmed = self.confirmed_of[idx];
        if confirmed != OUT_OF_ORDER {
            let num_running = self.loads[idx].running.len();
            let at = confirmed as usize;
            if at < num_running && self.loads[idx].running[at].0 != request {
                self.set_aside_unconfirmed(inst, at);
            } else {
                self.confirmed_of[idx] += 1;
                if at < num_running {
                    // Already running here, so not queued here: no request is both.
                    let load = &mut self.loads[idx];
                    debug_assert!(!load.queued.iter().any(|&(r, _)| r == request));
                    load.running[at].1 = len;
                    load.sum_context += u64::from(len);
                    load.max_context = load.max_context.max(len);
                    return;
                }
            }
        }
        let load = &mut self.loads[idx];
        if !load.queued.is_empty() {
            load.dequeue(request);
        }
        load.push(request, len);
    }

    /// An admitted request, counted on `inst` until it is seen running, finishes or moves.
    pub fn add_queued(&mut self, inst: InstanceId, request: RequestId, prompt_len: u32) {
        self.get_mut(inst).enqueue(request, prompt_len);
    }

    /// Moves a running request's load from one instance to another (a migration decided): it
    /// counts as running on `to`, though `to`'s feeds leave it out until it lands there
    /// ([`LoadBook::arrived`]).
    pub fn move_request(&mut self, request: RequestId, from: InstanceId, to: InstanceId, len: u32) {
        self.get_mut(from).remove(request);
        let target = self.get_mut(to);
        target.push(request, len);
        target.arriving.push(request);
        self.is_as_fed[from.index()] = false;
        self.is_as_fed[to.index()] = false;
    }

    /// A move of `request` to `inst` ended in its landing there: from now on `inst`'s feeds
    /// list it, and one that does not means it was preempted.
    pub fn arrived(&mut self, inst: InstanceId, request: RequestId) {
        if let Some(load) = self.loads.get_mut(inst.index()) {
            load.arriving.retain(|&r| r != request);
        }
    }

    /// A move of `request` from `from` to `to` failed: its load leaves `to` and stays on
    /// `from`, where it kept decoding (once, though `from`'s feeds may have listed it again
    /// since the move was decided).
    pub fn move_back(&mut self, request: RequestId, from: InstanceId, to: InstanceId, len: u32) {
        self.get_mut(to).remove(request);
        let source = self.get_mut(from);
        if !source.running.iter().any(|&(r, _)| r == request) && !source.queued.iter().any(|&(r, _)| r == request) {
            source.push(request, len);
        }
        self.is_as_fed[from.index()] = false;
        self.is_as_fed[to.index()] = false;
    }

    /// Drops a finished request (running or still queued) from an instance's load.
    pub fn forget_request(&mut self, inst: InstanceId, request: RequestId) {
        if self.get_mut(inst).remove(request).is_some() {
            self.is_as_fed[inst.index()] = false;
        }
    }

    /// Drops a finished request from every instance's load (a scan of the whole book).
    pub fn forget_everywhere(&mut self, request: RequestId) {
        for k in 0..self.loads.len() {
            if self.loads[k].remove(request).is_some() {
                self.is_as_fed[k] = false;
            }
        }
    }

    /// Forgets an instance entirely (it left the cluster).
    pub fn clear(&mut self, inst: InstanceId) {
        if let Some(load) = self.loads.get_mut(inst.index()) {
            *load = InstanceLoad::default();
            self.is_as_fed[inst.index()] = false;
        }
    }

    /// What a refresh from a feed listing `inst`'s running requests as the book holds them,
    /// each one token longer, would do (a step in which nothing started, finished or moved
    /// there), in one pass without the feed; false, with nothing changed, unless the book
    /// still holds exactly what `inst`'s last feed listed (`is_as_fed`) and that was not
    /// empty. The simulator's engines repeat the same batch for most steps.
    pub fn advance_as_fed(&mut self, inst: InstanceId) -> bool {
        let idx = inst.index();
        if !self.is_as_fed.get(idx).copied().unwrap_or(false) || self.loads[idx].running.is_empty() {
            return false;
        }
        let load = &mut self.loads[idx];
        for e in &mut load.running {
            e.1 += 1;
        }
        load.sum_context += load.running.len() as u64;
        load.max_context += 1;
        true
    }

    /// Predicted time of `inst`'s next step: its decodes plus a chunk of its queued prefill.
    pub fn predicted_step(&self, profile: &CostProfile, inst: InstanceId) -> f64 {
        let load = self.get(inst);
        profile.step_time(&with_prefill_chunk(load.batch(), load.queued_tokens, profile))
    }

    /// Predicted next step of `inst` with one running request of `len` tokens taken off
    /// (`is_added` false) or added (true): what a balancing move would leave on either side,
    /// padding to the longest context included.
    pub fn predicted_step_moving(&self, profile: &CostProfile, inst: InstanceId, len: u32, is_added: bool) -> f64 {
        let load = self.get(inst);
        let mut batch = load.batch();
        if is_added {
            batch = batch.with_decode(len);
        } else {
            batch.num_decode = batch.num_decode.saturating_sub(1);
            batch.sum_context = batch.sum_context.saturating_sub(u64::from(len));
            let lengths = || load.running.iter().map(|&(_, l)| l);
            if len == load.max_context && lengths().filter(|&l| l == len).count() == 1 {
                batch.max_context = lengths().filter(|&l| l < len).max().unwrap_or(0);
            }
        }
        profile.step_time(&with_prefill_chunk(batch, load.queued_tokens, profile))
    }

    /// What one more request of `len` tokens costs on `inst`: the step time with it decoding
    /// there, times the steps the queued prefill ahead of it (and its own, when it `needs_prefill`)
    /// takes at the token budget. With nothing queued it is the decode step everyone there would
    /// see; with a backlog it is about the wait for the newcomer's first token on a first-come
    /// engine. A step time alone caps the backlog at one chunk, so an instance with minutes of
    /// queued prompts would look as good as one with a single chunk.
    pub fn predicted_cost(&self, profile: &CostProfile, inst: InstanceId, len: u32, needs_prefill: bool) -> f64 {
        self.cost_with_prefill(profile, inst, len, if needs_prefill { len } else { 0 })
    }

    /// Whether `inst` has KV room for `tokens` more.
    pub fn has_room(&self, profile: &CostProfile, inst: InstanceId, tokens: u32) -> bool {
        self.has_room_within(profile, inst, tokens, 1.0)
    }

    /// Whether `tokens` more fit within `fraction` of `inst`'s KV capacity (and its sequence cap).
    fn has_room_within(&self, profile: &CostProfile, inst: InstanceId, tokens: u32, fraction: f64) -> bool {
        let load = self.get(inst);
        (load.kv_tokens() + u64::from(tokens)) as f64 <= fraction * profile.kv_capacity_tokens as f64
            && (load.running.len() as u32 + load.num_queued()) < profile.max_num_seqs
    }

    /// Among `candidates` with room for `tokens`, the one where taking them costs least
    /// ([`LoadBook::predicted_cost`]; ties go to the first). A new request `needs_prefill`; a
    /// migrated one arrives with its KV.
    ///
    /// Instances that stay below `KV_WATERMARK` of their KV capacity with the newcomer come
    /// first; only when none does is the rest of the capacity used. Contexts keep growing after
    /// admission, so an instance filled to the brim preempts (recomputes from scratch) its
    /// newest requests a few steps later, which the step-time cost cannot see (least-load on
    /// agentic traffic at 6 req/s: 59.5 s -> 54.1 s mean with the watermark alone).
    pub fn least_loaded(
        &self,
        profile: &CostProfile,
        candidates: &[InstanceId],
        tokens: u32,
        needs_prefill: bool,
        skip: Option<InstanceId>,
    ) -> Option<InstanceId> {
        self.cheapest(profile, candidates, tokens, skip, |inst| {
            self.predicted_cost(profile, inst, tokens, needs_prefill)
        })
    }

    /// What one more request of `len` tokens costs everyone on `inst` over the next `horizon`
    /// decode steps, in request-seconds: its own wait for its first token
    /// ([`LoadBook::predicted_cost`]) and decode steps, plus what it adds to each of the `n`
    /// requests already there, running or queued: the time of its prefill, which every step of
    /// theirs waits for, and the longer step its context makes (padding to the longest
    /// included). [`LoadBook::predicted_cost`] is the newcomer's view alone, so it puts a long
    /// prompt on the instance where that prompt starts soonest even when a dozen short decodes
    /// there then stall for its whole prefill; this is the cost a sum of latencies pays.
    pub fn marginal_cost(
        &self,
        profile: &CostProfile,
        inst: InstanceId,
        len: u32,
        needs_prefill: bool,
        horizon: f64,
    ) -> f64 {
        self.marginal_cost_prefilling(profile, inst, len, if needs_prefill { len } else { 0 }, horizon)
    }

    /// [`LoadBook::marginal_cost`] of a request of `len` tokens that prefills `prefill` of them
    /// there (a session's turn finds the rest in the prefix cache).
    pub fn marginal_cost_prefilling(
        &self,
        profile: &CostProfile,
        inst: InstanceId,
        len: u32,
        prefill: u32,
        horizon: f64,
    ) -> f64 {
        let load = self.get(inst);
        let others = load.running.len() as f64 + f64::from(load.num_queued());
        let before = profile.step_time(&load.batch());
        let after = profile.step_time(&load.batch().with_decode(len));
        let prefill_s = if prefill > 0 { profile.prefill_work(u64::from(prefill)) } else { 0.0 };
        let horizon = horizon.max(1.0);
        self.cost_with_prefill(profile, inst, len, prefill)
            + (horizon - 1.0) * after
            + others * (prefill_s + horizon * (after - before))
    }

    /// [`LoadBook::least_loaded`] by [`LoadBook::marginal_cost`]: the instance where one more
    /// request of `tokens` costs everyone least over `horizon` decode steps.
    pub fn least_marginal_cost(
        &self,
        profile: &CostProfile,
        candidates: &[InstanceId],
        tokens: u32,
        needs_prefill: bool,
        skip: Option<InstanceId>,
        horizon: f64,
    ) -> Option<InstanceId> {
        self.cheapest(profile, candidates, tokens, skip, |inst| {
            self.marginal_cost(profile, inst, tokens, needs_prefill, horizon)
        })
    }

    /// Among `candidates` other than `skip` with room for `tokens`, the one of least `cost`,
    /// those staying below `KV_WATERMARK` first ([`LoadBook::least_loaded`]).
    fn cheapest(
        &self,
        profile: &CostProfile,
        candidates: &[InstanceId],
        tokens: u32,
        skip: Option<InstanceId>,
        cost: impl Fn(InstanceId) -> f64 + Copy,
    ) -> Option<InstanceId> {
        self.cheapest_within(profile, candidates, tokens, skip, KV_WATERMARK, cost)
            .or_else(|| self.cheapest_within(profile, candidates, tokens, skip, 1.0, cost))
    }

    /// Among `candidates` (instance, prompt tokens it would prefill there, a fixed extra cost
    /// in seconds) with room for `tokens`, the one where the request costs everyone least over
    /// `horizon` decode steps ([`LoadBook::marginal_cost_prefilling`], plus the extra); ties go
    /// to the first. The same watermark rule as [`LoadBook::least_loaded`]. A session's turn
    /// prefills only what an instance's prefix cache lacks, so the instance holding its
    /// conversation can be the cheaper one though busier; the decode steps count too, or every
    /// long conversation would stay where it started, several to an instance, each stretching
    /// the others' steps for its whole answer.
    pub fn cheapest_with_prefill(
        &self,
        profile: &CostProfile,
        candidates: &[(InstanceId, u32, f64)],
        tokens: u32,
        horizon: f64,
    ) -> Option<InstanceId> {
        [KV_WATERMARK, 1.0].into_iter().find_map(|fraction| {
            let mut best: Option<(f64, InstanceId)> = None;
            for &(inst, prefill, extra) in candidates {
                if !self.has_room_within(profile, inst, tokens, fraction) {
                    continue;
                }
                let t = self.marginal_cost_prefilling(profile, inst, tokens, prefill, horizon) + extra;
                if best.is_none_or(|(bt, _)| t < bt) {
                    best = Some((t, inst));
                }
            }
            best.map(|(_, inst)| inst)
        })
    }

    /// [`LoadBook::predicted_cost`] of a request of `tokens` that prefills `prefill` of them.
    pub fn cost_with_prefill(&self, profile: &CostProfile, inst: InstanceId, tokens: u32, prefill: u32) -> f64 {
        let load = self.get(inst);
        let batch = load.batch().with_decode(tokens);
        let queued = load.queued_tokens + u64::from(prefill);
        let steps = queued.div_ceil(u64::from(profile.max_batch_tokens.max(1))).max(1);
        profile.step_time(&with_prefill_chunk(batch, queued, profile)) * steps as f64
    }

    /// Among `candidates` other than `skip` with room for `tokens` within `fraction` of their
    /// KV capacity, the one of least `cost`; ties go to the first.
    fn cheapest_within(
        &self,
        profile: &CostProfile,
        candidates: &[InstanceId],
        tokens: u32,
        skip: Option<InstanceId>,
        fraction: f64,
        cost: impl Fn(InstanceId) -> f64,
    ) -> Option<InstanceId> {
        let mut best: Option<(f64, InstanceId)> = None;
        for &inst in candidates {
            if Some(inst) == skip || !self.has_room_within(profile, inst, tokens, fraction) {
                continue;
            }
            let t = cost(inst);
            if best.is_none_or(|(bt, _)| t < bt) {
                best = Some((t, inst));
            }
        }
        best.map(|(_, inst)| inst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::tests::gpu;

    #[test]
    fn refresh_replaces_only_the_instances_it_names() {
        let mut book = LoadBook::default();
        book.begin_refresh();
        book.record(InstanceId(0), RequestId(1), 100);
        book.record(InstanceId(1), RequestId(2), 50);
        book.begin_refresh();
        book.record(InstanceId(0), RequestId(1), 101);
        assert_eq!(book.get(InstanceId(0)).sum_context, 101);
        assert_eq!(book.get(InstanceId(1)).sum_context, 50);
    }

    #[test]
    fn queued_requests_leave_exactly_when_seen_running_finished_or_moved() {
        let mut book = LoadBook::default();
        let (a, b) = (InstanceId(0), InstanceId(1));
        for r in 1..=3 {
            book.add_queued(a, RequestId(r), 100);
        }
        // Request 1 finishes inside its first step: it never shows up in a feed.
        book.forget_request(a, RequestId(1));
        // Request 2 starts running; request 3 still waits for room and must stay counted.
        book.begin_refresh();
        book.record(a, RequestId(2), 101);
        assert_eq!((book.get(a).num_queued(), book.get(a).queued_tokens), (1, 100));
        assert_eq!(book.get(a).running, vec![(RequestId(2), 101)]);
        book.move_request(RequestId(3), a, b, 100);
        book.forget_request(a, RequestId(2));
        assert_eq!(book.get(a).kv_tokens(), 0, "nothing leaks on an instance that sends no more feeds");
        assert_eq!(book.get(b).kv_tokens(), 100);
    }

    #[test]
    fn a_request_missing_from_its_feed_was_preempted_and_stays_counted_until_it_runs_again() {
        let mut book = LoadBook::default();
        let a = InstanceId(0);
        book.begin_refresh();
        book.record(a, RequestId(1), 5000);
        book.record(a, RequestId(2), 7000);
        book.end_refresh();
        // Request 2 was preempted: the engine lists only request 1.
        book.begin_refresh();
        book.record(a, RequestId(1), 5001);
        book.end_refresh();
        assert_eq!(book.get(a).running, vec![(RequestId(1), 5001)]);
        assert_eq!((book.get(a).queued.clone(), book.get(a).kv_tokens()), (vec![(RequestId(2), 7000)], 12_001));
        // It runs again, then finishes: nothing is left behind.
        book.begin_refresh();
        book.record(a, RequestId(1), 5002);
        book.record(a, RequestId(2), 7001);
        book.end_refresh();
        assert_eq!(book.get(a).num_queued(), 0);
        book.forget_request(a, RequestId(1));
        book.forget_request(a, RequestId(2));
        assert_eq!(book.get(a).kv_tokens(), 0);
    }

    #[test]
    fn queued_requests_are_found_whatever_their_ids_and_the_feed_order() {
        let mut book = LoadBook::default();
        let a = InstanceId(0);
        for r in [10, 5, 20] {
            book.add_queued(a, RequestId(r), 100);
        }
        // Running 7 (inside the queued ids' bounds, not queued) and 20 (the highest queued id).
        book.begin_refresh();
        book.record(a, RequestId(7), 50);
        book.record(a, RequestId(20), 101);
        book.end_refresh();
        let queued = |book: &LoadBook| {
            let mut ids: Vec<u64> = book.get(a).queued.iter().map(|&(r, _)| r.0).collect();
            ids.sort_unstable();
            ids
        };
        assert_eq!(queued(&book), vec![5, 10]);
        // The lowest and the highest queued ids start, the feed listing them out of order.
        book.begin_refresh();
        for (r, len) in [(10, 101), (20, 102), (5, 101), (7, 51)] {
            book.record(a, RequestId(r), len);
        }
        book.end_refresh();
        assert!(queued(&book).is_empty());
        // Listed in a new order with one missing: only the missing one counts as preempted.
        book.begin_refresh();
        for (r, len) in [(7, 52), (5, 102), (20, 103)] {
            book.record(a, RequestId(r), len);
        }
        book.end_refresh();
        assert_eq!(queued(&book), vec![10]);
        assert_eq!(book.get(a).running.len(), 3);
        assert_eq!(book.get(a).kv_tokens(), 52 + 102 + 103 + 101);
    }

    /// The book as a plain rebuild from each feed: what `record`'s in-place refresh must equal.
    #[derive(Default)]
    struct Reference {
        running: Vec<(RequestId, u32)>,
        queued: Vec<(RequestId, u32)>,
    }

    impl Reference {
        fn refresh(&mut self, feed: &[(RequestId, u32)]) {
            if feed.is_empty() {
                return; // a feed that names no request of the instance leaves it as it was
            }
            let before = std::mem::replace(&mut self.running, feed.to_vec());
            self.queued.retain(|q| !feed.iter().any(|f| f.0 == q.0));
            for e in before {
                if !feed.iter().any(|f| f.0 == e.0) && !self.queued.iter().any(|q| q.0 == e.0) {
                    self.queued.push(e);
                }
            }
        }
    }

    proptest::proptest! {
        /// Feeds that keep, reorder, drop and add requests, with finishes between them: the
        /// book holds what a rebuild from each feed holds, in the feed's order. A repeat step
        /// (`advance_as_fed`) is taken exactly when the book still holds the last feed, and
        /// then equals a rebuild from that feed one token on.
        #[test]
        fn an_in_place_refresh_equals_a_rebuild_from_the_feed(
            ops in proptest::collection::vec((0u8..5, proptest::collection::vec(0u64..12, 0..10)), 1..30)
        ) {
            let inst = InstanceId(1);
            let (mut book, mut reference) = (LoadBook::default(), Reference::default());
            // Whether the reference's running list is still the last feed, as listed.
            let mut is_as_fed = false;
            for (step, (op, ids)) in ops.into_iter().enumerate() {
                let len = step as u32 + 1;
                let feed: Option<Vec<(RequestId, u32)>> = match op {
                    // A feed listing `ids` (deduplicated) in that order.
                    0 => {
                        let mut feed: Vec<(RequestId, u32)> = Vec::new();
                        for id in ids.iter().copied() {
                            if !feed.iter().any(|f| f.0 .0 == id) {
                                feed.push((RequestId(id), len + id as u32));
                            }
                        }
                        Some(feed)
                    }
                    // The feed of a step with nothing new: every running request, in order.
                    1 => Some(reference.running.iter().map(|&(r, l)| (r, l + 1)).collect()),
                    _ => None,
                };
                // Whether a feed named any request (only that refreshes the instance and its order).
                let is_refreshed = match (op, feed) {
                    (_, Some(feed)) => {
                        book.begin_refresh();
                        for &(r, l) in &feed {
                            book.record(inst, r, l);
                        }
                        book.end_refresh();
                        reference.refresh(&feed);
                        is_as_fed |= !feed.is_empty();
                        !feed.is_empty()
                    }
                    (2, None) => {
                        if let Some(&id) = ids.first() {
                            let r = RequestId(id);
                            book.forget_request(inst, r);
                            is_as_fed &= !reference.running.iter().any(|e| e.0 == r);
                            reference.running.retain(|e| e.0 != r);
                            reference.queued.retain(|e| e.0 != r);
                        }
                        false
                    }
                    (4, None) => {
                        let is_taken = book.advance_as_fed(inst);
                        proptest::prop_assert_eq!(is_taken, is_as_fed && !reference.running.is_empty());
                        if is_taken {
                            let feed: Vec<(RequestId, u32)> = reference.running.iter().map(|&(r, l)| (r, l + 1)).collect();
                            reference.refresh(&feed);
                        }
                        is_taken
                    }
                    _ => {
                        if let Some(&id) = ids.first() {
                            let r = RequestId(id + 100);
                            if !reference.queued.iter().any(|q| q.0 == r) {
                                book.add_queued(inst, r, 7);
                                reference.queued.push((r, 7));
                            }
                        }
                        false
                    }
                };
                let load = book.get(inst);
                let mut running = reference.running.clone();
                let mut held = load.running.clone();
                if !is_refreshed {
                    // A finish reorders the book's list (swap_remove) until the next feed.
                    running.sort_unstable();
                    held.sort_unstable();
                }
                proptest::prop_assert_eq!(&held, &running);
                let mut queued = load.queued.clone();
                queued.sort_unstable();
                let mut expected = reference.queued.clone();
                expected.sort_unstable();
                proptest::prop_assert_eq!(queued, expected);
                proptest::prop_assert_eq!(load.sum_context, running.iter().map(|e| u64::from(e.1)).sum::<u64>());
                proptest::prop_assert_eq!(load.max_context, running.iter().map(|e| e.1).max().unwrap_or(0));
                proptest::prop_assert_eq!(load.queued_tokens, reference.queued.iter().map(|e| u64::from(e.1)).sum::<u64>());
            }
        }
    }

    #[test]
    fn a_move_either_way_ends_the_repeat_steps_of_both_instances() {
        let (a, b) = (InstanceId(0), InstanceId(1));
        let mut book = LoadBook::default();
        book.begin_refresh();
        for (inst, r) in [(a, 1), (a, 2), (b, 3)] {
            book.record(inst, RequestId(r), 100);
        }
        book.end_refresh();
        assert!(book.advance_as_fed(a) && book.advance_as_fed(b));
        assert_eq!((book.get(a).sum_context, book.get(a).max_context), (202, 101));
        book.move_request(RequestId(2), a, b, 101);
        assert!(!book.advance_as_fed(a) && !book.advance_as_fed(b), "neither holds its last feed");
        assert_eq!(book.get(b).sum_context, 202, "nothing advanced");
        // The next feed of each makes it so again.
        book.begin_refresh();
        book.record(a, RequestId(1), 102);
        book.record(a, RequestId(4), 10);
        book.end_refresh();
        assert!(book.advance_as_fed(a) && !book.advance_as_fed(b));
        assert_eq!(book.get(a).running, vec![(RequestId(1), 103), (RequestId(4), 11)]);
        // A queued request that leaves changes nothing the feed listed; a running one does.
        book.add_queued(a, RequestId(9), 50);
        book.forget_request(a, RequestId(9));
        assert!(book.advance_as_fed(a));
        book.forget_request(a, RequestId(1));
        assert!(!book.advance_as_fed(a));
        assert_eq!(book.get(a).running, vec![(RequestId(4), 12)]);
    }

    #[test]
    fn a_request_on_its_way_counts_as_running_on_its_target_until_it_lands() {
        let profile = gpu();
        let (a, b) = (InstanceId(0), InstanceId(1));
        let feed = |book: &mut LoadBook, entries: &[(InstanceId, u64, u32)]| {
            book.begin_refresh();
            for &(inst, r, len) in entries {
                book.record(inst, RequestId(r), len);
            }
            book.end_refresh();
        };
        let mut book = LoadBook::default();
        feed(&mut book, &[(a, 1, 30_000), (b, 2, 100)]);
        let idle_step = book.predicted_step(&profile, b);
        book.move_request(RequestId(1), a, b, 30_000);
        // The copy runs: the source still lists it, the target not yet.
        feed(&mut book, &[(a, 1, 30_001), (b, 2, 101)]);
        let target = book.get(b);
        assert_eq!((target.num_queued(), target.running.len()), (0, 2), "not taken for preempted on the target");
        assert!(!book.advance_as_fed(b), "the target's book is not its feed");
        let step = book.predicted_step(&profile, b);
        assert!(step < idle_step + profile.prefill_work(8192) / 2.0, "a decode more, no prefill: {idle_step} {step}");
        // It lands; from then on, a feed of the target without it means it was preempted.
        book.forget_request(a, RequestId(1));
        book.arrived(b, RequestId(1));
        feed(&mut book, &[(b, 2, 102)]);
        assert_eq!(book.get(b).queued, vec![(RequestId(1), 30_000)]);
        // A move that fails leaves the load once on its source, though its feed listed it again.
        feed(&mut book, &[(a, 3, 500), (b, 1, 30_001), (b, 2, 103)]);
        book.move_request(RequestId(3), a, b, 500);
        feed(&mut book, &[(a, 3, 501)]);
        book.move_back(RequestId(3), a, b, 500);
        assert_eq!(book.get(a).running, vec![(RequestId(3), 501)]);
        assert_eq!(book.get(b).kv_tokens(), 30_001 + 103);
        feed(&mut book, &[(b, 1, 30_002), (b, 2, 104)]);
        assert_eq!(book.get(b).num_queued(), 0, "nothing is on its way to the target any more");
    }

    #[test]
    fn queued_requests_leave_the_queue_one_by_one() {
        let mut book = LoadBook::default();
        let inst = InstanceId(3);
        for r in [5, 69, 133, 6] {
            book.add_queued(inst, RequestId(r), 10);
        }
        book.begin_refresh();
        book.record(inst, RequestId(69), 11);
        book.record(inst, RequestId(7), 11);
        assert_eq!(book.get(inst).num_queued(), 3);
        book.forget_request(inst, RequestId(5));
        book.begin_refresh();
        book.record(inst, RequestId(133), 12);
        book.record(inst, RequestId(6), 12);
        assert_eq!((book.get(inst).num_queued(), book.get(inst).queued_tokens), (0, 0));
        book.add_queued(inst, RequestId(197), 10);
        book.clear(inst);
        book.add_queued(inst, RequestId(261), 10);
        book.begin_refresh();
        book.record(inst, RequestId(261), 11);
        assert_eq!(book.get(inst).kv_tokens(), 11);
    }

    #[test]
    fn a_long_prompt_goes_where_its_prefill_stalls_fewest_requests() {
        let p = gpu();
        let mut book = LoadBook::default();
        let (crowded, backlogged) = (InstanceId(0), InstanceId(1));
        book.add_queued(backlogged, RequestId(0), 4000);
        book.begin_refresh();
        for r in 10..22 {
            book.record(crowded, RequestId(r), 600);
        }
        book.record(backlogged, RequestId(30), 600);
        book.end_refresh();
        let both = [crowded, backlogged];
        // Its own first token comes sooner on the instance with no prompt queued...
        assert_eq!(book.least_loaded(&p, &both, 8000, true, None), Some(crowded));
        // ... but there its prefill stalls twelve decodes, and on the other two requests.
        assert_eq!(book.least_marginal_cost(&p, &both, 8000, true, None, 64.0), Some(backlogged));
        // A short prompt stalls no one for long: it goes where it starts soonest either way.
        assert_eq!(book.least_marginal_cost(&p, &both, 100, true, None, 64.0), Some(crowded));
        // The cost to the others grows with what they share: the newcomer's steps over the horizon.
        let short = book.marginal_cost(&p, backlogged, 8000, true, 1.0);
        assert!(book.marginal_cost(&p, backlogged, 8000, true, 64.0) > short);
    }

    #[test]
    fn a_long_prefill_backlog_weighs_more_than_a_few_decodes() {
        let p = gpu();
        let mut book = LoadBook::default();
        let (backlogged, decoding) = (InstanceId(0), InstanceId(1));
        for r in 0..3 {
            book.add_queued(backlogged, RequestId(r), 32_000);
        }
        book.add_queued(decoding, RequestId(3), 9000);
        book.begin_refresh();
        for r in 10..20 {
            book.record(decoding, RequestId(r), 1000);
        }
        // One step ahead, the two look alike (a full prefill chunk each, plus the decodes on one).
        assert!(book.predicted_step(&p, decoding) > book.predicted_step(&p, backlogged));
        let both = [backlogged, decoding];
        assert_eq!(book.least_loaded(&p, &both, 500, true, None), Some(decoding));
        // A migrated request skips the queue's prefill but still shares its chunks.
        assert!(book.predicted_cost(&p, backlogged, 500, false) > book.predicted_cost(&p, decoding, 500, false));
    }

    #[test]
    fn least_loaded_prefers_the_lighter_instance_and_respects_room() {
        let p = gpu();
        let mut book = LoadBook::default();
        book.begin_refresh();
        book.record(InstanceId(0), RequestId(1), 300_000);
        book.record(InstanceId(1), RequestId(2), 1000);
        let all = [InstanceId(0), InstanceId(1)];
        assert_eq!(book.least_loaded(&p, &all, 100, true, None), Some(InstanceId(1)));
        // Only instance 0 is a candidate but it lacks room for 200K more tokens.
        assert_eq!(book.least_loaded(&p, &all[..1], 200_000, true, None), None);
        book.move_request(RequestId(1), InstanceId(0), InstanceId(1), 300_000);
        assert_eq!(book.get(InstanceId(0)).running.len(), 0);
        assert_eq!(book.get(InstanceId(1)).max_context, 300_000);
    }
}
