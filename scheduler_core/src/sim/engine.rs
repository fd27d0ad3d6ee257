//! One engine instance: continuous batching under a token budget, chunked prefill, KV blocks
//! and preemption by recompute (the newest running request first).
//!
//! It follows the `sim` worker engine (python/cascadeinfer/worker/engines/sim_engine.py) step
//! for step, with three vLLM rules that engine lacks: a decode spends one token of the budget
//! (none is scheduled once the budget is gone), a request gets blocks for the tokens computed in
//! this step only, and no waiting request starts in a step that preempted one.

use std::collections::VecDeque;

use super::prefix::PrefixCache;
use crate::cost::{prefill_pairs, BatchShape};
use crate::ids::{InstanceId, RequestId};
use crate::policy::StepEntry;

/// Where a request is.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    NotArrived,
    /// In the scheduler's admission queue (the policy had no room).
    Queued,
    /// Admitted to an instance, waiting there for blocks and budget.
    Waiting,
    Running,
    /// Stopped for the final copy of a migration: on neither engine's batch.
    Paused,
    Done,
}

/// A request's engine state (the hot part; times live in [`Timeline`]).
#[derive(Copy, Clone, Debug)]
pub(super) struct Seq {
    pub prompt_len: u32,
    pub output_len: u32,
    pub num_generated: u32,
    /// Tokens of prompt + output whose KV exists.
    pub num_computed: u32,
    pub num_blocks: u32,
    /// Dense index of the instance holding the request (meaningless before admission).
    pub slot: u32,
    pub phase: Phase,
    pub is_migrating: bool,
    pub num_migrations: u32,
    pub num_preemptions: u32,
}

impl Seq {
    pub fn new(prompt_len: u32, output_len: u32) -> Self {
        Seq {
            prompt_len,
            output_len,
            num_generated: 0,
            num_computed: 0,
            num_blocks: 0,
            slot: 0,
            phase: Phase::NotArrived,
            is_migrating: false,
            num_migrations: 0,
            num_preemptions: 0,
        }
    }

    pub fn context_len(&self) -> u32 {
        self.prompt_len + self.num_generated
    }

    /// A request decodes once everything but its last sampled token has KV.
    pub fn is_prefilling(&self) -> bool {
        self.num_computed + u32::from(self.num_generated > 0) < self.context_len()
    }
}

/// When things happened to a request; NaN until they do.
#[derive(Copy, Clone, Debug)]
pub(super) struct Timeline {
    pub arrival_s: f64,
    pub admitted_s: f64,
    pub first_token_s: f64,
    pub finished_s: f64,
}

/// The engine limits every instance shares.
#[derive(Copy, Clone, Debug)]
pub(super) struct EngineParams {
    pub block_size: u32,
    pub total_blocks: u64,
    pub max_num_seqs: u32,
    pub max_batch_tokens: u32,
    pub max_model_len: u32,
}

impl EngineParams {
    pub fn blocks_for(&self, tokens: u32) -> u32 {
        tokens.div_ceil(self.block_size)
    }
}

/// Counters for the report.
#[derive(Copy, Clone, Debug, Default)]
pub(super) struct Peaks {
    pub num_steps: u64,
    pub busy_s: f64,
    pub used_blocks: u64,
    pub batch_tokens: u32,
    pub batch_seqs: u32,
}

#[derive(Debug)]
pub(super) struct Instance {
    pub id: InstanceId,
    pub waiting: VecDeque<u32>,
    /// In start order: the last is the newest, preempted first.
    pub running: Vec<u32>,
    /// Blocks held by requests here, paused requests migrating away and reservations of
    /// requests migrating in.
    pub used_blocks: u64,
    pub is_busy: bool,
    /// The step in progress: decodes, then prefill chunks `(request, tokens)`.
    pub decode: Vec<u32>,
    pub prefill: Vec<(u32, u32)>,
    /// Migrations whose bulk copy ended during the step in progress; they pause at its end.
    pub pending_pauses: Vec<u32>,
    /// Whether the step in progress decodes exactly the requests the step before it decoded,
    /// in the same order, and that step was decodes only and finished none: then, unless one
    /// finishes now, its feed is the last one with every length one longer.
    is_repeat: bool,
    /// Whether the last step's feed listed exactly its decodes (it had no prefill and
    /// finished none), and those decodes, for the next batch formed from scratch to compare.
    was_decodes_only: bool,
    last_decode: Vec<u32>,
    /// The decodes of the last step whose next decode needs one more block, in batch order,
    /// and how many blocks they need together.
    needs_block: Vec<u32>,
    num_blocks_needed: u64,
    pub peaks: Peaks,
    /// Sessions' KV kept in free blocks; `None` when the trace has no sessions.
    pub cache: Option<Box<PrefixCache>>,
}

impl Instance {
    pub fn new(id: InstanceId) -> Self {
        Instance {
            id,
            waiting: VecDeque::new(),
            running: Vec::new(),
            used_blocks: 0,
            is_busy: false,
            decode: Vec::new(),
            prefill: Vec::new(),
            pending_pauses: Vec::new(),
            is_repeat: false,
            was_decodes_only: false,
            last_decode: Vec::new(),
            needs_block: Vec::new(),
            num_blocks_needed: 0,
            peaks: Peaks::default(),
            cache: None,
        }
    }

    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    pub fn can_allocate(&self, p: &EngineParams, blocks: u32) -> bool {
        self.used_blocks + u64::from(blocks) <= p.total_blocks
    }

    pub fn allocate(&mut self, blocks: u32) {
        self.used_blocks += u64::from(blocks);
        self.peaks.used_blocks = self.peaks.used_blocks.max(self.used_blocks);
        if self.cache.is_some() {
            self.fit_cache();
        }
    }

    /// The blocks just allocated came from the free pool, cached contents or not.
    #[cold]
    #[inline(never)]
    fn fit_cache(&mut self) {
        if let Some(cache) = &mut self.cache {
            cache.fit(self.used_blocks);
        }
    }

    pub fn release(&mut self, blocks: u32) {
        debug_assert!(self.used_blocks >= u64::from(blocks));
        self.used_blocks -= u64::from(blocks);
    }

    /// Gives `seq` blocks for `tokens` tokens; false when the pool is short.
    fn grow(&mut self, p: &EngineParams, seq: &mut Seq, tokens: u32) -> bool {
        let need = p.blocks_for(tokens).saturating_sub(seq.num_blocks);
        if !self.can_allocate(p, need) {
            return false;
        }
        self.allocate(need);
        seq.num_blocks += need;
        true
    }

    /// Gives running request `i` blocks for `tokens` tokens, preempting the newest running
    /// requests while the pool is short. Returns whether request `i` is still running (it is
    /// the last one preempted when nothing else frees enough) and whether anything was.
    #[cold]
    fn grow_or_preempt(&mut self, p: &EngineParams, seqs: &mut [Seq], i: usize, tokens: u32) -> (bool, bool) {
        let r = self.running[i] as usize;
        let mut has_preempted = false;
        while !self.grow(p, &mut seqs[r], tokens) {
            let is_self = self.running.len() - 1 == i;
            self.preempt_last(seqs);
            has_preempted = true;
            if is_self {
                return (false, true);
            }
        }
        (true, has_preempted)
    }

    /// Frees the newest running request; it recomputes from scratch later, first in line.
    fn preempt_last(&mut self, seqs: &mut [Seq]) {
        let victim = self.running.pop().expect("preempting from an empty batch");
        let seq = &mut seqs[victim as usize];
        self.release(seq.num_blocks);
        seq.num_blocks = 0;
        seq.num_computed = 0;
        seq.phase = Phase::Waiting;
        seq.num_preemptions += 1;
        self.waiting.push_front(victim);
    }

    /// Forms the next step's batch in `decode` and `prefill` and returns its shape.
    /// `next_decode` is what [`Instance::finish_step`] returned for the step that ended just
    /// now (at the same time, nothing simulated in between), if anything.
    pub fn schedule(&mut self, p: &EngineParams, seqs: &mut [Seq], next_decode: Option<BatchShape>) -> BatchShape {
        if let Some(shape) = next_decode {
            // Unless requests joined, left or wait since, the same requests decode again:
            // what the loops below would find, request by request, since each decodes one
            // token, into blocks it holds or, while the pool has them for all, blocks it
            // gets in batch order without preempting anyone.
            let n = self.running.len() as u32;
            let is_same = self.waiting.is_empty()
                && self.prefill.is_empty()
                && self.running.len() == self.decode.len()
                && self.running.iter().zip(&self.decode).all(|(a, b)| a == b);
            if is_same
                && n <= p.max_batch_tokens.min(p.max_num_seqs)
                && self.used_blocks + self.num_blocks_needed <= p.total_blocks
            {
                for k in 0..self.needs_block.len() {
                    let seq = &mut seqs[self.needs_block[k] as usize];
                    let tokens = seq.context_len();
                    let is_grown = self.grow(p, seq, tokens);
                    debug_assert!(is_grown);
                }
                debug_assert_eq!(shape.num_decode, n);
                self.peaks.batch_tokens = self.peaks.batch_tokens.max(n);
                self.peaks.batch_seqs = self.peaks.batch_seqs.max(n);
                self.is_repeat = true;
                return shape;
            }
        }
        std::mem::swap(&mut self.decode, &mut self.last_decode);
        self.decode.clear();
        self.prefill.clear();
        let mut shape = BatchShape::default();
        let mut budget = p.max_batch_tokens;
        let mut has_preempted = false;
        let mut i = 0;
        let block_size = u64::from(p.block_size);
        let mut has_pool = self.used_blocks <= p.total_blocks;
        while i < self.running.len() && budget > 0 && self.num_scheduled() < p.max_num_seqs {
            let r = self.running[i];
            let seq = &seqs[r as usize];
            let (ctx, start, is_prefilling) = (seq.context_len(), seq.num_computed, seq.is_prefilling());
            let chunk = if is_prefilling { budget.min(ctx - start) } else { 1 };
            // Most steps need no new block (`grow` would find it needs none).
            let has_blocks = has_pool && u64::from(start + chunk) <= u64::from(seq.num_blocks) * block_size;
            if !has_blocks {
                let (fits, preempted) = self.grow_or_preempt(p, seqs, i, start + chunk);
                has_preempted |= preempted;
                if !fits {
                    break;
                }
                has_pool = self.used_blocks <= p.total_blocks;
            }
            if is_prefilling {
                self.add_prefill(&mut shape, r, start, chunk);
            } else {
                self.decode.push(r);
                shape.num_decode += 1;
                shape.sum_context += u64::from(ctx);
                shape.max_context = shape.max_context.max(ctx);
            }
            budget -= chunk;
            i += 1;
        }
        while !has_preempted && budget > 0 && (self.running.len() as u32) < p.max_num_seqs {
            let Some(&w) = self.waiting.front() else { break };
            let seq = &mut seqs[w as usize];
            let chunk = budget.min(seq.context_len() - seq.num_computed);
            let start = seq.num_computed;
            if !self.grow(p, seq, start + chunk) {
                break;
            }
            seq.phase = Phase::Running;
            self.waiting.pop_front();
            self.running.push(w);
            self.add_prefill(&mut shape, w, start, chunk);
            budget -= chunk;
        }
        self.peaks.batch_tokens = self.peaks.batch_tokens.max(p.max_batch_tokens - budget);
        self.peaks.batch_seqs = self.peaks.batch_seqs.max(self.num_scheduled());
        // A batch formed anew can still be the last one again (a step that needed a block).
        self.is_repeat = self.was_decodes_only && self.prefill.is_empty() && self.decode == self.last_decode;
        shape
    }

    fn num_scheduled(&self) -> u32 {
        (self.decode.len() + self.prefill.len()) as u32
    }

    fn add_prefill(&mut self, shape: &mut BatchShape, r: u32, start: u32, chunk: u32) {
        self.prefill.push((r, chunk));
        shape.prefill_tokens += chunk;
        shape.prefill_pairs += prefill_pairs(u64::from(start), u64::from(chunk));
    }

    /// Applies the step that ends at `now`: every decode and every completed prefill samples a
    /// token. Requests that go on are listed in `feed.entries` (decodes first, as the worker's
    /// step feed lists them), finished ones in `feed.finished` (`Phase::Done`, blocks freed).
    /// A step that repeated the last one's batch and finished nothing lists no entries and
    /// sets `feed.is_repeat` instead: its feed is the last one, every length one longer
    /// ([`Instance::list_decodes`] writes it out).
    /// When the step was decodes only and none finished, returns the shape of the next batch
    /// of the same decodes (for `schedule`, which gives them the blocks they need then).
    pub fn finish_step(
        &mut self,
        p: &EngineParams,
        seqs: &mut [Seq],
        times: &mut [Timeline],
        now: f64,
        feed: &mut StepFeed,
    ) -> Option<BatchShape> {
        let num_finished = feed.finished.len();
        let is_listed = !self.is_repeat;
        if is_listed {
            feed.entries.reserve(self.decode.len() + self.prefill.len());
        }
        let block_size = u64::from(p.block_size);
        let mut next = BatchShape::default();
        self.needs_block.clear();
        self.num_blocks_needed = 0;
        for &r in &self.decode {
            let seq = &mut seqs[r as usize];
            debug_assert_eq!(seq.phase, Phase::Running);
            seq.num_computed = seq.context_len();
            emit(p, self.id, r, seq, times, now, feed, is_listed);
            // Its next decode needs KV for one more token.
            let ctx = seq.context_len();
            if u64::from(ctx) > u64::from(seq.num_blocks) * block_size && seq.phase != Phase::Done {
                self.needs_block.push(r);
                self.num_blocks_needed += u64::from(p.blocks_for(ctx) - seq.num_blocks);
            }
            next.sum_context += u64::from(ctx);
            next.max_context = next.max_context.max(ctx);
        }
        next.num_decode = self.decode.len() as u32;
        let is_plain = self.prefill.is_empty() && feed.finished.len() == num_finished;
        for &(r, chunk) in &self.prefill {
            let seq = &mut seqs[r as usize];
            seq.num_computed += chunk;
            if !seq.is_prefilling() {
                emit(p, self.id, r, seq, times, now, feed, true);
            }
        }
        feed.is_repeat = self.is_repeat && feed.finished.len() == num_finished;
        self.was_decodes_only = is_plain;
        if self.is_repeat && !feed.is_repeat {
            self.list_decodes(seqs, feed); // the others' entries, as a feed would list them
        }
        if feed.finished.len() > num_finished {
            let mut freed = 0;
            self.running.retain(|&r| {
                let seq = &mut seqs[r as usize];
                if seq.phase == Phase::Done {
                    freed += seq.num_blocks;
                    seq.num_blocks = 0;
                }
                seq.phase != Phase::Done
            });
            self.release(freed);
        }
        is_plain.then_some(next)
    }

    /// Lists in `feed.entries` the requests of the step that just ended here as its feed
    /// names them, for a step that decoded only (a repeat step): those that go on, in order.
    pub fn list_decodes(&self, seqs: &[Seq], feed: &mut StepFeed) {
        debug_assert!(self.prefill.is_empty());
        feed.entries.reserve(self.decode.len());
        for &r in &self.decode {
            let seq = &seqs[r as usize];
            if seq.phase != Phase::Done {
                feed.entries.push(entry(self.id, r, seq));
            }
        }
    }
}

/// What one step produced, as the worker's step feed reports it.
#[derive(Debug, Default)]
pub(super) struct StepFeed {
    /// Requests that sampled a token and go on, with their new context length.
    pub entries: Vec<StepEntry>,
    /// Requests that finished (their blocks are freed by the caller).
    pub finished: Vec<u32>,
    /// The step repeated the last one's batch and finished nothing: `entries` is empty, and
    /// the feed is the last one with every length one longer.
    pub is_repeat: bool,
}

/// Samples one token of request `r` on instance `id` and lists it in `feed` (its entries only
/// when `is_listed`).
#[inline]
#[allow(clippy::too_many_arguments)]
fn emit(
    p: &EngineParams,
    id: InstanceId,
    r: u32,
    seq: &mut Seq,
    times: &mut [Timeline],
    now: f64,
    feed: &mut StepFeed,
    is_listed: bool,
) {
    seq.num_generated += 1;
    // The first token ever (a preempted request keeps the tokens it generated).
    if seq.num_generated == 1 {
        times[r as usize].first_token_s = now;
    }
    if seq.num_generated >= seq.output_len || seq.context_len() >= p.max_model_len {
        seq.phase = Phase::Done;
        times[r as usize].finished_s = now;
        feed.finished.push(r);
    } else if is_listed {
        feed.entries.push(entry(id, r, seq));
    }
}

/// Request `r`'s line in a step feed of instance `id`.
#[inline]
fn entry(id: InstanceId, r: u32, seq: &Seq) -> StepEntry {
    StepEntry { request: RequestId(u64::from(r)), instance: id, context_len: seq.context_len() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(total_blocks: u64) -> EngineParams {
        EngineParams { block_size: 16, total_blocks, max_num_seqs: 4, max_batch_tokens: 64, max_model_len: 10_000 }
    }

    fn admit(inst: &mut Instance, seqs: &mut [Seq], r: u32) {
        seqs[r as usize].phase = Phase::Waiting;
        inst.waiting.push_back(r);
    }

    #[test]
    fn chunked_prefill_then_decode_under_the_budget() {
        let p = params(1000);
        let mut seqs = vec![Seq::new(100, 3), Seq::new(10, 2)];
        let mut times =
            vec![Timeline { arrival_s: 0.0, admitted_s: 0.0, first_token_s: f64::NAN, finished_s: f64::NAN }; 2];
        let mut inst = Instance::new(InstanceId(0));
        admit(&mut inst, &mut seqs, 0);
        admit(&mut inst, &mut seqs, 1);
        let shape = inst.schedule(&p, &mut seqs, None);
        // 64 tokens of budget: all go to the first prompt's first chunk.
        assert_eq!((shape.prefill_tokens, shape.num_decode, inst.prefill.len()), (64, 0, 1));
        let mut feed = StepFeed::default();
        inst.finish_step(&p, &mut seqs, &mut times, 1.0, &mut feed);
        assert!(feed.entries.is_empty() && seqs[0].num_computed == 64);
        let shape = inst.schedule(&p, &mut seqs, None);
        assert_eq!(shape.prefill_tokens, 36 + 10, "rest of the first prompt, then the second");
        inst.finish_step(&p, &mut seqs, &mut times, 2.0, &mut feed);
        let fed: Vec<(u64, u32)> = feed.entries.iter().map(|e| (e.request.0, e.context_len)).collect();
        assert_eq!(fed, vec![(0, 101), (1, 11)]);
        assert!(feed.finished.is_empty());
        assert_eq!((times[0].first_token_s, seqs[0].context_len()), (2.0, 101));
        let shape = inst.schedule(&p, &mut seqs, None);
        assert_eq!((shape.num_decode, shape.sum_context, shape.max_context), (2, 101 + 11, 101));
    }

    #[test]
    fn the_next_decode_a_step_reports_is_the_batch_formed_from_scratch() {
        // Two engines in lockstep, one told what each step reports of the next batch, the other
        // forming every batch from scratch: they hold the same blocks and batches at every
        // step, through block boundaries, finishes and, with 8 blocks for 9 at the peak, a
        // preemption.
        for total_blocks in [1000, 8] {
            let p = params(total_blocks);
            let mut seqs = vec![Seq::new(30, 50), Seq::new(14, 50), Seq::new(5, 3)];
            let mut times =
                vec![Timeline { arrival_s: 0.0, admitted_s: 0.0, first_token_s: f64::NAN, finished_s: f64::NAN }; 3];
            let (mut fast, mut scratch) = (Instance::new(InstanceId(0)), Instance::new(InstanceId(1)));
            let mut scratch_seqs = seqs.clone();
            for r in 0..3 {
                admit(&mut fast, &mut seqs, r);
                admit(&mut scratch, &mut scratch_seqs, r);
            }
            let (mut feed, mut next, mut num_reported) = (StepFeed::default(), None, 0);
            for t in 1..80 {
                num_reported += u32::from(next.is_some());
                let shape = fast.schedule(&p, &mut seqs, next);
                assert_eq!(shape, scratch.schedule(&p, &mut scratch_seqs, None), "step {t}");
                assert_eq!((&fast.decode, &fast.prefill), (&scratch.decode, &scratch.prefill));
                assert_eq!(fast.used_blocks, scratch.used_blocks);
                let blocks = |seqs: &[Seq]| seqs.iter().map(|s| (s.num_blocks, s.num_preemptions)).collect::<Vec<_>>();
                assert_eq!(blocks(&seqs), blocks(&scratch_seqs), "step {t}");
                next = fast.finish_step(&p, &mut seqs, &mut times, f64::from(t), &mut feed);
                scratch.finish_step(&p, &mut scratch_seqs, &mut times, f64::from(t), &mut feed);
            }
            assert!(seqs.iter().all(|s| s.phase == Phase::Done));
            assert!(num_reported > 40, "{num_reported}: the test would prove little");
            if total_blocks == 8 {
                assert!(seqs.iter().any(|s| s.num_preemptions > 0), "no preemption: the test would prove little");
            }
        }
    }

    #[test]
    fn a_short_pool_preempts_the_newest_and_frees_everything_at_the_end() {
        // 8 blocks of 16 tokens: two 60-token prompts fit (4 blocks each) but cannot both grow.
        let p = params(8);
        let mut seqs = vec![Seq::new(60, 10), Seq::new(60, 10)];
        let mut times =
            vec![Timeline { arrival_s: 0.0, admitted_s: 0.0, first_token_s: f64::NAN, finished_s: f64::NAN }; 2];
        let mut inst = Instance::new(InstanceId(0));
        admit(&mut inst, &mut seqs, 0);
        admit(&mut inst, &mut seqs, 1);
        let mut feed = StepFeed::default();
        let mut t = 0.0;
        while seqs.iter().any(|s| s.phase != Phase::Done) {
            inst.schedule(&p, &mut seqs, None);
            assert!(inst.used_blocks <= p.total_blocks);
            t += 1.0;
            inst.finish_step(&p, &mut seqs, &mut times, t, &mut feed);
            assert!(t < 100.0, "no progress");
        }
        assert!(seqs[1].num_preemptions > 0 && seqs[0].num_preemptions == 0, "the newer request yields");
        assert_eq!(feed.finished, vec![0, 1]);
        assert!(times.iter().all(|t| t.first_token_s < t.finished_s));
        assert_eq!(inst.used_blocks, 0);
        assert!(inst.peaks.used_blocks <= 8);
    }
}
