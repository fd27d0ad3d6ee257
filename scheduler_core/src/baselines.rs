//! Baseline policies behind the same [`Policy`] interface, for honest comparison: every one
//! sees all instances as one pool, uses the same load book and the same KV-room rule.

use serde::{Deserialize, Serialize};

use crate::cost::CostProfile;
use crate::error::{CoreError, Result};
use crate::ids::InstanceId;
use crate::layout::StageLayout;
use crate::policy::{Admission, Migration, MigrationReason, NewRequest, Policy, StepEntry, TickOutcome};
use crate::rng::Rng;
use crate::router::Router;

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BaselineKind {
    RoundRobin,
    LeastLoad,
    PowerOfTwo,
    Llumnix,
    /// Prefix-cache affinity as the peer routers ship it (SGLang's gateway `cache_aware`,
    /// Dynamo's KV router, llm-d's prefix scorer): [`CacheAwareConfig`].
    CacheAware,
}

impl BaselineKind {
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "round-robin" => Ok(BaselineKind::RoundRobin),
            "least-load" => Ok(BaselineKind::LeastLoad),
            "power-of-two" => Ok(BaselineKind::PowerOfTwo),
            "llumnix" => Ok(BaselineKind::Llumnix),
            "cache-aware" => Ok(BaselineKind::CacheAware),
            _ => Err(CoreError::invalid(
                "policy",
                name,
                "known: cascade, round-robin, least-load, power-of-two, llumnix, cache-aware",
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BaselineKind::RoundRobin => "round-robin",
            BaselineKind::LeastLoad => "least-load",
            BaselineKind::PowerOfTwo => "power-of-two",
            BaselineKind::Llumnix => "llumnix",
            BaselineKind::CacheAware => "cache-aware",
        }
    }
}

/// Llumnix's migration trigger (Sun et al., OSDI'24: dispatch to the freest instance, and keep
/// migrating from the busiest to the freest while their KV usage differs).
#[derive(Copy, Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlumnixConfig {
    /// Migrate when the KV-usage fractions of the busiest and freest instances differ by more.
    pub usage_gap: f64,
    /// Most migrations started per tick.
    pub max_moves_per_tick: u32,
}

impl Default for LlumnixConfig {
    fn default() -> Self {
        LlumnixConfig { usage_gap: 0.1, max_moves_per_tick: 2 }
    }
}

/// When the cache-aware baseline follows a session's cache: SGLang's gateway defaults
/// (`cache_threshold` 0.3, `balance_abs_threshold` 64, `balance_rel_threshold` 1.5). A turn
/// goes to the instance holding the longest part of its prompt when that part is more than
/// `cache_threshold` of the prompt, unless that instance's load (requests running or waiting
/// there) exceeds the least-loaded instance's by more than `balance_abs_threshold` and by a
/// factor over `balance_rel_threshold`; otherwise, and for requests without a session, it is
/// least-load. The record of where sessions are cached is the router's own
/// ([`crate::prefix_index::PrefixIndex`]), as SGLang's approximate tree is.
#[derive(Copy, Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheAwareConfig {
    pub cache_threshold: f64,
    pub balance_abs_threshold: u32,
    pub balance_rel_threshold: f64,
}

impl Default for CacheAwareConfig {
    fn default() -> Self {
        CacheAwareConfig { cache_threshold: 0.3, balance_abs_threshold: 64, balance_rel_threshold: 1.5 }
    }
}

#[derive(Clone, Debug)]
pub struct Baseline {
    kind: BaselineKind,
    /// A single-stage router: its load book, KV-room rule and migration bookkeeping.
    router: Router,
    next_rr: usize,
    rng: Rng,
    llumnix: LlumnixConfig,
    cache_aware: CacheAwareConfig,
}

impl Baseline {
    pub fn new(
        kind: BaselineKind,
        profile: CostProfile,
        instances: &[InstanceId],
        max_len: u32,
        seed: u64,
        llumnix: LlumnixConfig,
    ) -> Result<Self> {
        if !(0.0..1.0).contains(&llumnix.usage_gap) {
            return Err(CoreError::invalid("llumnix.usage_gap", llumnix.usage_gap, "must be in [0, 1)"));
        }
        let layout = StageLayout::single(max_len, instances)?;
        Ok(Baseline {
            kind,
            router: Router::new(profile, layout)?,
            next_rr: 0,
            rng: Rng::new(seed),
            llumnix,
            cache_aware: CacheAwareConfig::default(),
        })
    }

    fn instances(&self) -> &[InstanceId] {
        &self.router.layout.stages()[0].instances
    }

    fn has_room(&self, inst: InstanceId, tokens: u32) -> bool {
        self.router.loads.has_room(&self.router.profile, inst, tokens)
    }

    fn choose(&mut self, request: &NewRequest) -> Option<InstanceId> {
        let prompt_len = request.prompt_len;
        let instances = self.instances().to_vec();
        match self.kind {
            BaselineKind::CacheAware => cache_aware_choice(&self.router, &self.cache_aware, request),
            BaselineKind::LeastLoad => {
                self.router.loads.least_loaded(&self.router.profile, &instances, prompt_len, true, None)
            }
            BaselineKind::RoundRobin => {
                // The next instance in turn that has room.
                let n = instances.len();
                let pick = (0..n).map(|k| instances[(self.next_rr + k) % n]).find(|&i| self.has_room(i, prompt_len))?;
                self.next_rr = (instances.iter().position(|&i| i == pick).unwrap() + 1) % n;
                Some(pick)
            }
            BaselineKind::PowerOfTwo => {
                let n = instances.len() as u32;
                let a = instances[self.rng.range_u32(0, n - 1) as usize];
                let b = if n > 1 {
                    let k = self.rng.range_u32(0, n - 2) as usize;
                    instances.iter().copied().filter(|&i| i != a).nth(k).unwrap()
                } else {
                    a
                };
                let pair = [a, b];
                self.router.loads.least_loaded(&self.router.profile, &pair, prompt_len, true, None)
            }
            BaselineKind::Llumnix => self.router.freest(&instances, prompt_len),
        }
    }

    fn llumnix_rebalance(&mut self) -> Vec<Migration> {
        let instances = self.instances().to_vec();
        let LlumnixConfig { usage_gap, max_moves_per_tick } = self.llumnix;
        self.router.even_kv_usage(&instances, usage_gap, max_moves_per_tick, MigrationReason::Rebalance)
    }
}

/// Where the cache-aware rule (`config`) places `request` on `router`'s first stage (its whole
/// fleet when it has one): the holder of the longest part of its prompt, unless that one is far
/// busier than the least-loaded instance, which gets it otherwise; `None` when no instance has
/// room. Shared with cascade's one-stage form that runs this way
/// ([`crate::cascade::OneStageTurns::CacheAware`]).
pub(crate) fn cache_aware_choice(
    router: &Router,
    config: &CacheAwareConfig,
    request: &NewRequest,
) -> Option<InstanceId> {
    let instances = &router.layout.stages()[0].instances;
    let least = router.loads.least_loaded(&router.profile, instances, request.prompt_len, true, None)?;
    Some(cache_holder(router, config, request, least).unwrap_or(least))
}

/// The instance with room holding the longest part of `request`'s prompt, when the
/// cache-aware rule (`config`) prefers it to `least`, the least-loaded instance.
fn cache_holder(
    router: &Router,
    config: &CacheAwareConfig,
    request: &NewRequest,
    least: InstanceId,
) -> Option<InstanceId> {
    let turn = request.session?;
    let num_requests = |inst: InstanceId| {
        let load = router.loads.get(inst);
        load.running.len() as u32 + load.num_queued()
    };
    let holder = router
        .prefixes
        .holdings(turn.session)
        .iter()
        .filter(|h| router.layout.stage_of_instance(h.instance).is_some())
        .filter(|h| router.loads.has_room(&router.profile, h.instance, request.prompt_len))
        .max_by_key(|h| (h.tokens.min(turn.prefix_len), std::cmp::Reverse(num_requests(h.instance))))?;
    let matched = holder.tokens.min(turn.prefix_len);
    let CacheAwareConfig { cache_threshold, balance_abs_threshold, balance_rel_threshold } = *config;
    if f64::from(matched) <= cache_threshold * f64::from(request.prompt_len) {
        return None;
    }
    let (busy, free) = (num_requests(holder.instance), num_requests(least));
    let is_imbalanced =
        busy > free + balance_abs_threshold && f64::from(busy) > balance_rel_threshold * f64::from(free);
    (!is_imbalanced).then_some(holder.instance)
}

impl Policy for Baseline {
    fn name(&self) -> &'static str {
        self.kind.name()
    }

    fn admit(&mut self, new: &NewRequest, _now: f64) -> Result<Option<Admission>> {
        let NewRequest { id: request, prompt_len, .. } = *new;
        if prompt_len >= self.router.layout.max_len() {
            return Err(CoreError::invalid(
                "prompt_len",
                prompt_len,
                format!("must be < max_len {}", self.router.layout.max_len()),
            ));
        }
        let Some(instance) = self.choose(new) else { return Ok(None) };
        self.router.loads.add_queued(instance, request, prompt_len);
        if let (BaselineKind::CacheAware, Some(turn)) = (self.kind, new.session) {
            self.router.prefixes.placed(request, turn.session, instance, prompt_len);
        }
        Ok(Some(Admission { instance, stage: 0 }))
    }

    fn on_step(&mut self, entries: &[StepEntry], _now: f64) -> Result<Vec<Migration>> {
        // One stage spanning every length: the check only refreshes loads and validates input.
        self.router.check_step(entries)
    }

    fn on_repeat_step(&mut self, instance: InstanceId, _now: f64) -> Option<Result<Vec<Migration>>> {
        self.router.check_repeat_step(instance)
    }

    fn tick(&mut self, _now: f64) -> TickOutcome {
        let migrations = if self.kind == BaselineKind::Llumnix { self.llumnix_rebalance() } else { Vec::new() };
        TickOutcome { migrations, new_layout: None }
    }

    fn router(&self) -> &Router {
        &self.router
    }

    fn router_mut(&mut self) -> &mut Router {
        &mut self.router
    }

    fn add_instance(&mut self, instance: InstanceId) -> Result<()> {
        self.router.layout.add_instance(instance, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::tests::gpu;
    use crate::ids::RequestId;
    use crate::session::{SessionId, SessionTurn};

    fn ids(n: u32) -> Vec<InstanceId> {
        (0..n).map(InstanceId).collect()
    }

    fn baseline(kind: BaselineKind) -> Baseline {
        Baseline::new(kind, gpu(), &ids(4), 131_072, 1, LlumnixConfig::default()).unwrap()
    }

    #[test]
    fn round_robin_cycles() {
        let mut b = baseline(BaselineKind::RoundRobin);
        let picks: Vec<u32> =
            (0..8).map(|r| b.admit(&NewRequest::new(RequestId(r), 100), 0.0).unwrap().unwrap().instance.0).collect();
        assert_eq!(picks, vec![0, 1, 2, 3, 0, 1, 2, 3]);
    }

    #[test]
    fn least_load_and_llumnix_avoid_the_busy_instance() {
        for kind in [BaselineKind::LeastLoad, BaselineKind::Llumnix, BaselineKind::PowerOfTwo] {
            let mut b = baseline(kind);
            let busy: Vec<StepEntry> = (0..50)
                .map(|r| StepEntry { request: RequestId(r), instance: InstanceId(0), context_len: 5000 })
                .collect();
            b.on_step(&busy, 0.0).unwrap();
            for r in 100..103 {
                assert_ne!(
                    b.admit(&NewRequest::new(RequestId(r), 100), 0.0).unwrap().unwrap().instance,
                    InstanceId(0),
                    "{kind:?}"
                );
            }
        }
    }

    #[test]
    fn llumnix_migrates_from_busiest_to_freest() {
        let mut b = baseline(BaselineKind::Llumnix);
        let busy: Vec<StepEntry> = (0..50)
            .map(|r| StepEntry { request: RequestId(r), instance: InstanceId(2), context_len: 4000 + r as u32 })
            .collect();
        b.on_step(&busy, 0.0).unwrap();
        let moves = b.tick(1.0).migrations;
        assert_eq!(moves.len(), 2);
        assert!(moves.iter().all(|m| m.from == InstanceId(2) && m.reason == MigrationReason::Rebalance));
        assert_eq!(moves[0].context_len, 4000, "the shortest request moves first");
        assert!(baseline(BaselineKind::LeastLoad).tick(1.0).migrations.is_empty());
    }

    fn turn(request: u64, session: u64, prompt_len: u32, prefix_len: u32) -> NewRequest {
        let session = SessionTurn { session: SessionId(session), turn: 1, prefix_len };
        NewRequest { session: Some(session), ..NewRequest::new(RequestId(request), prompt_len) }
    }

    fn busy(b: &mut Baseline, instance: u32, num_requests: u64) {
        let entries: Vec<StepEntry> = (0..num_requests)
            .map(|r| StepEntry { request: RequestId(10_000 + r), instance: InstanceId(instance), context_len: 500 })
            .collect();
        b.on_step(&entries, 0.0).unwrap();
    }

    #[test]
    fn cache_aware_follows_a_sessions_cache_unless_its_holder_is_much_busier() {
        let mut b = baseline(BaselineKind::CacheAware);
        let first = b.admit(&turn(1, 7, 2000, 0), 0.0).unwrap().unwrap().instance;
        b.request_finished(RequestId(1), first);
        busy(&mut b, first.0, 20);
        // Least-load would avoid the busy holder; the cache keeps the turn there.
        assert_eq!(b.admit(&turn(2, 7, 3000, 2100), 0.0).unwrap().unwrap().instance, first);
        b.request_finished(RequestId(2), first);
        assert_ne!(b.admit(&NewRequest::new(RequestId(3), 3000), 0.0).unwrap().unwrap().instance, first);
        // A prefix of 30% or less of the prompt is not worth following.
        assert_ne!(b.admit(&turn(4, 7, 10_000, 2100), 0.0).unwrap().unwrap().instance, first);
        // Past the imbalance thresholds (64 more requests and 1.5x), least-load wins.
        busy(&mut b, first.0, 100);
        assert_ne!(b.admit(&turn(5, 7, 3000, 2100), 0.0).unwrap().unwrap().instance, first);
    }

    #[test]
    fn unknown_policy_name_is_an_error() {
        assert!(BaselineKind::from_name("fifo").unwrap_err().to_string().contains("round-robin"));
    }
}
