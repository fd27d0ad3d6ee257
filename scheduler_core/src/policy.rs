//! The interface every scheduling policy implements, cascade and baselines alike, so the live
//! scheduler and the simulator drive them the same way.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::ids::{InstanceId, RequestId};
use crate::layout::StageLayout;
use crate::router::Router;
use crate::session::SessionTurn;

/// One running request in an engine step feed.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepEntry {
    pub request: RequestId,
    pub instance: InstanceId,
    /// Prompt plus tokens generated so far.
    pub context_len: u32,
}

/// What a policy is told about a request to place.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewRequest {
    pub id: RequestId,
    pub prompt_len: u32,
    /// The conversation the request continues, when the client named one: a policy that
    /// keeps a session's KV where it is cached reads it, the others ignore it.
    pub session: Option<SessionTurn>,
}

impl NewRequest {
    /// A request outside any session.
    pub fn new(id: RequestId, prompt_len: u32) -> Self {
        NewRequest { id, prompt_len, session: None }
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Admission {
    pub instance: InstanceId,
    /// Stage index (always 0 for policies without stages).
    pub stage: usize,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationReason {
    /// The request's context is past its stage's bounds: it grew to the upper one, or it was
    /// prefilled in a later stage than its own and now decodes (a visitor, sent home).
    StageBound,
    /// Within-stage load balancing.
    Balance,
    /// A boundary moved or the plan changed and the request is now outside its stage.
    Refinement,
    /// Llumnix-style periodic move from the most to the least loaded instance.
    Rebalance,
}

impl MigrationReason {
    pub const ALL: [MigrationReason; 4] = [
        MigrationReason::StageBound,
        MigrationReason::Balance,
        MigrationReason::Refinement,
        MigrationReason::Rebalance,
    ];

    /// The reason's name on the wire: metric labels, logs, the simulator report's keys.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationReason::StageBound => "stage_bound",
            MigrationReason::Balance => "balance",
            MigrationReason::Refinement => "refinement",
            MigrationReason::Rebalance => "rebalance",
        }
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    pub request: RequestId,
    pub from: InstanceId,
    pub to: InstanceId,
    pub context_len: u32,
    pub reason: MigrationReason,
}

/// Why a stage layout changed at runtime.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum LayoutChange {
    /// Refinement nudged a boundary or re-planned (`refine.rs`).
    Refinement,
    /// The capacity guard moved one instance to another stage (`capacity.rs`).
    CapacityMove,
}

impl LayoutChange {
    pub fn as_str(self) -> &'static str {
        match self {
            LayoutChange::Refinement => "refinement",
            LayoutChange::CapacityMove => "capacity",
        }
    }
}

/// What a periodic `tick` decided besides migrations.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TickOutcome {
    pub migrations: Vec<Migration>,
    /// Set when the stage layout changed, with why (the last change when a tick made two).
    pub new_layout: Option<(StageLayout, LayoutChange)>,
}

/// A scheduling policy: a function of the state it was told about and of `now` (seconds on the
/// caller's clock). It never reads a clock or does I/O.
pub trait Policy: Send + Sync {
    fn name(&self) -> &'static str;

    /// Chooses the instance for a new request, or `None` when no eligible instance has room
    /// (the caller queues and asks again later, with the same request).
    fn admit(&mut self, request: &NewRequest, now: f64) -> Result<Option<Admission>>;

    /// Takes one engine step's running requests (one instance or several; instances named
    /// here have their load replaced by what is listed) and returns the migrations to start.
    fn on_step(&mut self, entries: &[StepEntry], now: f64) -> Result<Vec<Migration>>;

    /// `on_step` for a step of `instance` whose feed would list exactly the requests of its
    /// last feed, in the same order, each one token longer (nothing started, finished, left or
    /// joined there): the same answer and state without the feed, which the simulator, whose
    /// engines repeat the same batch for most steps, then need not build. `None`, with nothing
    /// changed, when the policy cannot answer so (its view of the instance changed since that
    /// feed); the caller then calls `on_step` with the feed. The default always says `None`.
    fn on_repeat_step(&mut self, _instance: InstanceId, _now: f64) -> Option<Result<Vec<Migration>>> {
        None
    }

    /// Periodic work: balancing, refinement, rebalancing.
    ///
    /// While [`Policy::is_idle`], a tick may reset state (a balancer's hysteresis) but a
    /// second one in a row changes nothing and returns nothing, so a caller may skip every
    /// tick of an idle stretch after the first: the simulator does, and a day-long trace with
    /// minutes between its requests plans in seconds instead of ticking every 0.5 s through
    /// the gaps.
    fn tick(&mut self, now: f64) -> TickOutcome;

    /// Whether nothing is placed, in flight or waiting for a retry of `admit`: the fleet is
    /// idle as far as the policy knows (see [`Policy::tick`]).
    fn is_idle(&self) -> bool {
        self.router().is_idle()
    }

    fn add_instance(&mut self, instance: InstanceId) -> Result<()>;

    /// The router holding the policy's layout, loads and in-flight migrations.
    fn router(&self) -> &Router;
    fn router_mut(&mut self) -> &mut Router;

    /// A migration this policy asked for ended; on failure the request stays on its source.
    fn migration_done(&mut self, migration: &Migration, succeeded: bool) {
        self.router_mut().migration_done(migration, succeeded);
    }

    /// A request left `instance` (finished or aborted).
    fn request_finished(&mut self, request: RequestId, instance: InstanceId) {
        self.router_mut().request_finished(request, instance);
    }

    /// A request `admit` refused left the caller's queue without being admitted (its client
    /// gave up, or the queue turned it away): what the policy kept for its retries goes, so
    /// a scheduler under overload with impatient clients holds nothing for them. Harmless for
    /// a request that was admitted. The default keeps nothing.
    fn request_withdrawn(&mut self, _request: RequestId) {}

    /// The current layout (a single stage for policies without stages).
    fn layout(&self) -> &StageLayout {
        self.router().layout()
    }

    /// An instance left the cluster: out of the layout (its stage refilled) and the loads.
    fn remove_instance(&mut self, instance: InstanceId) -> Result<()> {
        let router = self.router_mut();
        router.layout.remove_instance(instance)?;
        router.loads.clear(instance);
        Ok(())
    }
}
