//! The simulator drives policies only through the `Policy` trait: a recording wrapper logs every
//! call and its answer during a run, and a fresh policy built the same way, fed the same calls,
//! answers the same. So the simulator uses the policy objects as they are, nothing re-implemented.

use super::tests::{baseline, bimodal, ids, two_stage};
use super::*;
use crate::arrivals::{generate_trace, ArrivalProcess};
use crate::baselines::BaselineKind;
use crate::cascade::{CascadeConfig, CascadePolicy};
use crate::cost::tests::gpu;
use crate::grid::BucketGrid;
use crate::ids::RequestId;
use crate::layout::StageLayout;
use crate::partition::{partition, PartitionOptions};
use crate::policy::{Admission, Migration, NewRequest, StepEntry, TickOutcome};
use crate::presets::Preset;
use crate::router::Router;
use crate::workload::WorkloadSummary;

#[derive(Clone, Debug, PartialEq)]
enum Call {
    Admit { request: NewRequest, now: f64, answer: Result<Option<Admission>> },
    OnStep { entries: Vec<StepEntry>, now: f64, answer: Result<Vec<Migration>> },
    OnRepeatStep { instance: InstanceId, now: f64, answer: Option<Result<Vec<Migration>>> },
    Tick { now: f64, answer: TickOutcome },
    MigrationDone { migration: Migration, succeeded: bool },
    RequestFinished { request: RequestId, instance: InstanceId },
    AddInstance { instance: InstanceId, answer: Result<()> },
    RemoveInstance { instance: InstanceId, answer: Result<()> },
}

impl Call {
    fn now(&self) -> Option<f64> {
        match self {
            Call::Admit { now, .. }
            | Call::OnStep { now, .. }
            | Call::OnRepeatStep { now, .. }
            | Call::Tick { now, .. } => Some(*now),
            _ => None,
        }
    }
}

struct Recording {
    inner: Box<dyn Policy>,
    calls: Vec<Call>,
}

impl Policy for Recording {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn admit(&mut self, request: &NewRequest, now: f64) -> Result<Option<Admission>> {
        let answer = self.inner.admit(request, now);
        self.calls.push(Call::Admit { request: *request, now, answer: answer.clone() });
        answer
    }

    fn on_step(&mut self, entries: &[StepEntry], now: f64) -> Result<Vec<Migration>> {
        let answer = self.inner.on_step(entries, now);
        self.calls.push(Call::OnStep { entries: entries.to_vec(), now, answer: answer.clone() });
        answer
    }

    fn on_repeat_step(&mut self, instance: InstanceId, now: f64) -> Option<Result<Vec<Migration>>> {
        let answer = self.inner.on_repeat_step(instance, now);
        self.calls.push(Call::OnRepeatStep { instance, now, answer: answer.clone() });
        answer
    }

    fn tick(&mut self, now: f64) -> TickOutcome {
        let answer = self.inner.tick(now);
        self.calls.push(Call::Tick { now, answer: answer.clone() });
        answer
    }

    fn add_instance(&mut self, instance: InstanceId) -> Result<()> {
        let answer = self.inner.add_instance(instance);
        self.calls.push(Call::AddInstance { instance, answer: answer.clone() });
        answer
    }

    fn remove_instance(&mut self, instance: InstanceId) -> Result<()> {
        let answer = self.inner.remove_instance(instance);
        self.calls.push(Call::RemoveInstance { instance, answer: answer.clone() });
        answer
    }

    fn migration_done(&mut self, migration: &Migration, succeeded: bool) {
        self.inner.migration_done(migration, succeeded);
        self.calls.push(Call::MigrationDone { migration: *migration, succeeded });
    }

    fn request_finished(&mut self, request: RequestId, instance: InstanceId) {
        self.inner.request_finished(request, instance);
        self.calls.push(Call::RequestFinished { request, instance });
    }

    fn router(&self) -> &Router {
        self.inner.router()
    }

    fn router_mut(&mut self) -> &mut Router {
        panic!("the simulator changed policy state behind the policy's methods")
    }
}

fn replay(policy: &mut dyn Policy, calls: &[Call]) {
    for (k, call) in calls.iter().enumerate() {
        let again = match call.clone() {
            Call::Admit { request, now, .. } => Call::Admit { request, now, answer: policy.admit(&request, now) },
            Call::OnStep { entries, now, .. } => {
                let answer = policy.on_step(&entries, now);
                Call::OnStep { entries, now, answer }
            }
            Call::OnRepeatStep { instance, now, .. } => {
                Call::OnRepeatStep { instance, now, answer: policy.on_repeat_step(instance, now) }
            }
            Call::Tick { now, .. } => Call::Tick { now, answer: policy.tick(now) },
            Call::MigrationDone { migration, succeeded } => {
                policy.migration_done(&migration, succeeded);
                Call::MigrationDone { migration, succeeded }
            }
            Call::RequestFinished { request, instance } => {
                policy.request_finished(request, instance);
                Call::RequestFinished { request, instance }
            }
            Call::AddInstance { instance, .. } => Call::AddInstance { instance, answer: policy.add_instance(instance) },
            Call::RemoveInstance { instance, .. } => {
                Call::RemoveInstance { instance, answer: policy.remove_instance(instance) }
            }
        };
        assert_eq!(&again, call, "call {k} answered differently on replay");
    }
}

/// The cascade policy as `cascade plan` makes it, with refinement on, but planned for short chat:
/// the bimodal traffic it meets makes it re-plan (ticks change the layout).
fn planned_cascade() -> Box<dyn Policy> {
    let p = gpu();
    let grid = BucketGrid::geometric(p.max_model_len, 32, 64).unwrap();
    let w = WorkloadSummary::from_samples(&grid, &Preset::ShortChat.sample(2000, 0), 6.0).unwrap();
    let plan = partition(&w, &p, &PartitionOptions { num_instances: 6, max_stages: None }).unwrap();
    let layout = StageLayout::from_plan(&plan, &ids(6)).unwrap();
    let config = CascadeConfig { is_refine_enabled: true, ..CascadeConfig::default() };
    Box::new(CascadePolicy::new(p, layout, grid, config, Some(&w)).unwrap())
}

#[test]
fn the_simulator_calls_the_policy_and_nothing_else() {
    fn two_stage_cascade() -> Box<dyn Policy> {
        Box::new(two_stage(&gpu(), 1024, 2))
    }
    fn llumnix() -> Box<dyn Policy> {
        Box::new(baseline(BaselineKind::Llumnix, &gpu(), 4))
    }
    fn power_of_two() -> Box<dyn Policy> {
        Box::new(baseline(BaselineKind::PowerOfTwo, &gpu(), 4))
    }
    let p = gpu();
    let trace = bimodal(1500, 6.0, 8);
    for (k, make) in [planned_cascade, two_stage_cascade, llumnix, power_of_two].into_iter().enumerate() {
        let mut recording = Recording { inner: make(), calls: Vec::new() };
        let n = recording.layout().num_instances() as u32;
        let report = simulate(&mut recording, &p, &trace, &ids(n), &SimConfig::default()).unwrap();
        let calls = recording.calls;
        let count = |f: fn(&Call) -> bool| calls.iter().filter(|c| f(c)).count();
        assert_eq!(count(|c| matches!(c, Call::RequestFinished { .. })), trace.len());
        assert!(count(|c| matches!(c, Call::Admit { .. })) >= trace.len());
        assert!(
            count(|c| matches!(c, Call::OnStep { .. })) > trace.len()
                && count(|c| matches!(c, Call::OnRepeatStep { answer: Some(_), .. })) > trace.len()
                && count(|c| matches!(c, Call::Tick { .. })) > 100
        );
        let landed = count(|c| matches!(c, Call::MigrationDone { succeeded: true, .. }));
        assert_eq!(landed as u64, report.summary.migrations, "{}", report.policy);
        if k == 0 {
            assert!(count(|c| matches!(c, Call::Tick { answer, .. } if answer.new_layout.is_some())) > 0);
        }
        if report.policy != "power-of-two" {
            assert!(landed > 0, "{} moved nothing: the test would prove little", report.policy);
        }
        let times: Vec<f64> = calls.iter().filter_map(Call::now).collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "the simulated clock never goes back");
        replay(make().as_mut(), &calls);
    }
}

/// A policy that passes every call on to the one it wraps, but for one shortcut it turns down:
/// a repeat step's answer without its feed (`whole_feeds`: the simulator then builds the feed
/// of every step) or the word that the fleet is idle (`never_idle`: the simulator then runs
/// every tick of an idle stretch).
struct Declining {
    inner: Box<dyn Policy>,
    whole_feeds: bool,
    never_idle: bool,
}

impl Declining {
    fn whole_feeds(inner: Box<dyn Policy>) -> Self {
        Declining { inner, whole_feeds: true, never_idle: false }
    }

    fn never_idle(inner: Box<dyn Policy>) -> Self {
        Declining { inner, whole_feeds: false, never_idle: true }
    }
}

impl Policy for Declining {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn admit(&mut self, request: &NewRequest, now: f64) -> Result<Option<Admission>> {
        self.inner.admit(request, now)
    }
    fn on_step(&mut self, entries: &[StepEntry], now: f64) -> Result<Vec<Migration>> {
        self.inner.on_step(entries, now)
    }
    fn on_repeat_step(&mut self, instance: InstanceId, now: f64) -> Option<Result<Vec<Migration>>> {
        if self.whole_feeds {
            return None;
        }
        self.inner.on_repeat_step(instance, now)
    }
    fn tick(&mut self, now: f64) -> TickOutcome {
        self.inner.tick(now)
    }
    fn add_instance(&mut self, instance: InstanceId) -> Result<()> {
        self.inner.add_instance(instance)
    }
    fn remove_instance(&mut self, instance: InstanceId) -> Result<()> {
        self.inner.remove_instance(instance)
    }
    fn migration_done(&mut self, migration: &Migration, succeeded: bool) {
        self.inner.migration_done(migration, succeeded);
    }
    fn request_finished(&mut self, request: RequestId, instance: InstanceId) {
        self.inner.request_finished(request, instance);
    }
    fn request_withdrawn(&mut self, request: RequestId) {
        self.inner.request_withdrawn(request);
    }
    fn router(&self) -> &Router {
        self.inner.router()
    }
    fn router_mut(&mut self) -> &mut Router {
        self.inner.router_mut()
    }
    fn is_idle(&self) -> bool {
        !self.never_idle && self.inner.is_idle()
    }
}

/// Cascade planned with refinement on, a two-stage cascade and the baselines that decide
/// differently (cache-aware is least-load without sessions; power-of-two is least-load over two
/// instances drawn at random).
fn every_kind_of_policy() -> [fn() -> Box<dyn Policy>; 5] {
    [
        planned_cascade,
        || Box::new(two_stage(&gpu(), 1024, 4)),
        || Box::new(baseline(BaselineKind::LeastLoad, &gpu(), 4)),
        || Box::new(baseline(BaselineKind::Llumnix, &gpu(), 4)),
        || Box::new(baseline(BaselineKind::RoundRobin, &gpu(), 4)),
    ]
}

/// A repeat step answered without its feed (`Policy::on_repeat_step`) leaves every policy
/// where the whole feed would: the same run, request for request, for cascade with refinement
/// and stage-bound moves, every baseline, a pool small enough to preempt, and sessions.
#[test]
fn repeat_steps_answered_without_their_feed_change_nothing() {
    let p = gpu();
    let mut small = gpu();
    small.kv_capacity_tokens = 64_000;
    let session_trace = generate_trace(Preset::Agentic, 600, 4.0, ArrivalProcess::Poisson, 3).unwrap();
    assert!(session_trace.iter().all(|r| r.session.is_some()));
    let policies = every_kind_of_policy();
    let (mut num_preemptions, mut num_cache_hits) = (0, 0);
    for (profile, trace) in [(&p, bimodal(1500, 6.0, 8)), (&small, bimodal(800, 6.0, 9)), (&p, session_trace)] {
        for make in policies {
            let mut fast = make();
            let n = fast.layout().num_instances() as u32;
            let mut with_shortcut = simulate(fast.as_mut(), profile, &trace, &ids(n), &SimConfig::default()).unwrap();
            let mut whole = Declining::whole_feeds(make());
            let mut without = simulate(&mut whole, profile, &trace, &ids(n), &SimConfig::default()).unwrap();
            with_shortcut.summary.sim_wall_s = 0.0;
            without.summary.sim_wall_s = 0.0;
            assert!(with_shortcut.summary.completed > 0);
            assert_eq!(with_shortcut, without, "{}", with_shortcut.policy);
            num_preemptions += with_shortcut.num_preemptions;
            num_cache_hits += u64::from(with_shortcut.summary.prefix_cache_hit_rate > 0.0);
        }
    }
    assert!(num_preemptions > 0 && num_cache_hits > 0, "no preemption or no cache hit: the test would prove little");
}

/// Ticks parked through idle stretches (`Simulation::tick`) leave every policy where ticking
/// through them would: the same run, request for request, on a trace that alternates busy
/// minutes (refinement and balancing at work) with idle ones, for every kind of policy
/// (`every_kind_of_policy`). Only the idle stretches' stage-load samples go.
#[test]
fn ticks_parked_while_the_fleet_idles_change_nothing() {
    let p = gpu();
    // Bursts of 300 bimodal requests at 6 req/s, 20 minutes apart.
    let mut trace = Vec::new();
    for burst in 0..4 {
        let start = burst as f64 * 1200.0;
        trace.extend(
            bimodal(300, 6.0, 20 + burst).into_iter().map(|r| TraceRequest { arrival_s: r.arrival_s + start, ..r }),
        );
    }
    let policies = every_kind_of_policy();
    for make in policies {
        let mut parked = make();
        let n = parked.layout().num_instances() as u32;
        let mut with_parking = simulate(parked.as_mut(), &p, &trace, &ids(n), &SimConfig::default()).unwrap();
        let mut every = Declining::never_idle(make());
        let mut without = simulate(&mut every, &p, &trace, &ids(n), &SimConfig::default()).unwrap();
        let name = with_parking.policy.clone();
        assert_eq!(with_parking.summary.completed, 1200, "{name}");
        let (samples, all_samples) = (with_parking.stage_load.len(), without.stage_load.len());
        assert!(samples * 2 < all_samples, "{name}: {samples} of {all_samples} ticks run: none parked?");
        for report in [&mut with_parking, &mut without] {
            report.summary.sim_wall_s = 0.0;
            report.stage_load.clear();
        }
        assert_eq!(with_parking, without, "{name}");
    }
}

/// Requests millennia apart: the ticks parked between them jump over the idle stretch (added
/// one by one, 8 * 10^11 additions a gap, the run took hours).
#[test]
fn requests_millennia_apart_run_at_once() {
    let p = gpu();
    let trace: Vec<TraceRequest> = (0..3)
        .map(|k| TraceRequest { arrival_s: k as f64 * 4e11, prompt_len: 100, output_len: 20, session: None })
        .collect();
    for make in every_kind_of_policy() {
        let mut policy = make();
        let n = policy.layout().num_instances() as u32;
        let report = simulate(policy.as_mut(), &p, &trace, &ids(n), &SimConfig::default()).unwrap();
        assert_eq!(report.summary.completed, 3, "{}", report.policy);
        assert!(report.summary.p99_e2e_s < 1.0, "{}: {:?}", report.policy, report.summary);
    }
}

/// A run leaves nothing in the policy's book: every request it placed finished, and so left
/// it, also those that finished while being moved (Llumnix's moves here interrupt some that
/// way, which left a request held on an instance for the rest of the run).
#[test]
fn the_book_is_empty_when_every_request_finished() {
    let p = gpu();
    let trace = bimodal(300, 6.0, 20);
    let policies: [fn() -> Box<dyn Policy>; 3] = [
        planned_cascade,
        || Box::new(two_stage(&gpu(), 1024, 2)),
        || Box::new(baseline(BaselineKind::Llumnix, &gpu(), 4)),
    ];
    let mut num_interrupted = 0;
    for make in policies {
        let mut policy = make();
        let n = policy.layout().num_instances() as u32;
        let report = simulate(policy.as_mut(), &p, &trace, &ids(n), &SimConfig::default()).unwrap();
        assert_eq!(report.summary.completed, 300);
        num_interrupted += report.failed_migrations_by_cause.get("interrupted").copied().unwrap_or(0);
        assert!(policy.is_idle(), "{}: the book still holds {:?}", report.policy, policy.router().loads());
    }
    assert!(num_interrupted > 0, "no move was interrupted: the test would prove little");
}
