"""The scheduler's coordinator: admits requests through the Rust core, follows every worker's
step feed, splices tokens to clients, runs the migrations the core decides, and recovers
requests from a worker that dies.

All of it runs on one asyncio loop; the core is called synchronously (microseconds a call).
Workers are reached only through `WorkerClient` (scheduler/worker_client.py), so every decision
here can be tested with fake workers (tests/scheduler/test_coordinator.py).
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncGenerator, Coroutine
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import structlog

from cascadeinfer import _core
from cascadeinfer.config import CascadeConfig, FirstTokenSlo
from cascadeinfer.domain import MAX_REQUEST_ID_CHARS, FinishReason, SamplingSpec
from cascadeinfer.goodput import GoodputSlo
from cascadeinfer.log_throttle import LogThrottle
from cascadeinfer.planning import load_profile
from cascadeinfer.policies import FixedStage, build_policy
from cascadeinfer.proto.v1 import common_pb2, worker_pb2
from cascadeinfer.ratelimit import TokenBucket
from cascadeinfer.scheduler.admission_queue import AdmissionQueue, QueueFull
from cascadeinfer.scheduler.config import SchedulerConfig
from cascadeinfer.scheduler.metrics import SchedulerMetrics
from cascadeinfer.scheduler.requests import MAX_SESSION_ID_CHARS, ClientRequest
from cascadeinfer.scheduler.tasks import report_failure, run_in_daemon_thread
from cascadeinfer.scheduler.text import encode_off_loop, is_over_bytes, load_tokenizer
from cascadeinfer.scheduler.worker_client import FeedReader, WorkerCallError
from cascadeinfer.scheduler.workers import (
    WorkerLeaving,
    WorkerLink,
    WorkerNotDraining,
    WorkerPool,
    WorkerServesAnotherModel,
    WorkerServesAnotherScheduler,
    WorkerTooShort,
    WorkerUnreachable,
    grpc_clients,
)
from cascadeinfer.wire import FINISH_FROM_PROTO, sampling_to_proto

log = structlog.get_logger(__name__)


FEED_LAG_GRACE_S = 2.0
"""How long a migration source's feed is still trusted for the request it gave away, once
the client has every token the source made (`_forget_holder`)."""

MIN_CONTEXT = 2
"""The shortest context a worker must hold to be taken in: a prompt token and one output."""

HELD_GAP_LINK_TIMEOUTS = 3
"""How many `worker_link_timeout_s` a request's tokens may wait on a gap before them
(`_end_held`). A migration's gap fills once the source's feed brings its last tokens: within
moments, seconds where a busy scheduler reads its feeds behind; a feed silent for one link
timeout is a lost link by the link's own measure."""

RECONCILE_TIMEOUT_S = 10.0
"""How long a connecting worker has to open its step feed (whose first message is reconciled)
before its registration is refused (it registers again with its next heartbeat)."""
HELD_LOG_INTERVAL_S = 60.0
"""How often a worker held by another scheduler is logged (a static worker is tried again every
second, a registering one at every heartbeat)."""
PROMPT_BYTES_PER_TOKEN = 16
"""Default text prompt limit per token of context: a few times the bytes a token averages."""
SHUTTING_DOWN = "the scheduler is shutting down"
SHUTDOWN_ABORT_TIMEOUT_S = 2.0
"""How long a stopping scheduler waits for a worker to abort the requests it cut off; a worker
that does not answer in time is left to its own orphan bound (`orphan_timeout_s`)."""
LEAVE_CHECK_TIMEOUT_S = 3.0
"""How long a DeregisterWorker (or the registration of a worker taken out as leaving) waits for
the worker's own word on whether it drains; under the 5 s a worker gives its own goodbye."""
STEP_REFUSAL_LOG_S = 60.0
"""A worker's steps the core refused are logged at most once in this long (all are counted)."""
MAX_START_ERRORS = 3
"""INTERNAL answers to a request's placements before the request ends (HTTP 503, gRPC
FINISH_REASON_ABORT) rather than waits for another try: a worker's bug that refuses it every
time (vLLM 0.32's own validation errors, before the worker knew them) was retried every half
second for as long as the client waited, a traceback in the worker's log each time. A start
stream that breaks (INTERNAL too, the worker dying) is a rare one-off and fits well under the
bound."""
FALLBACK_POLICY = "least-load"
"""What a scheduler serves with when cascade's first plan cannot be made for its workers: one
stage, which is what cascade's own no-regret fallback runs."""
MAX_FAILED_WORKERS_KEPT = 16
"""Workers that failed (feed ended without a goodbye) still listed in the cluster state, as not
healthy, once nothing runs there; older ones, and every worker that left, are forgotten."""


class SchedulingError(Exception):
    """A request the scheduler cannot take; `code` is the gRPC status for the client."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Counters:
    num_migrations: int = 0
    num_failed_migrations: int = 0
    num_plan_changes: int = 0
    plan_changed_at: float = 0.0


def _another_model(link: WorkerLink, serving: list[WorkerLink]) -> str | None:
    """Why `link` cannot join the `serving` workers, or None: a scheduler serves one model,
    so a worker must serve the same model name and, where both say, the same vocabulary (a
    worker restarted with another tokenizer under the same name took every new request of its
    stage and failed each text prompt's token ids, the sixteenth probe's F6)."""
    who = f"worker {link.worker_id[:256]!r} at {link.address[:256]}"
    models = {w.info.model for w in serving}
    if models and link.info.model not in models:
        return (
            f"{who} serves model {link.info.model[:256]!r}, not "
            f"{', '.join(repr(m[:256]) for m in sorted(models))} as the workers already serving "
            "do: a scheduler serves one model (start the worker with the same model; vLLM "
            "workers with the same --served-model-name)"
        )
    vocabularies = {w.info.vocab_size for w in serving if w.info.vocab_size}
    if link.info.vocab_size and vocabularies and link.info.vocab_size not in vocabularies:
        return (
            f"{who} serves model {link.info.model[:256]!r} with a vocabulary of "
            f"{link.info.vocab_size} tokens, not {', '.join(map(str, sorted(vocabularies)))} as "
            "the workers already serving do: token ids would mean other tokens there (start it "
            "with the same model and tokenizer)"
        )
    return None


def _longest_context(info: worker_pb2.WorkerInfo) -> int:
    """The longest request a worker can run: its model's length, or its KV capacity where that
    is less. vLLM refuses to start with less KV than one request of its max_model_len needs;
    an engine that allowed it would hold such a request waiting for blocks forever, so the
    scheduler refuses it up front instead."""
    kv_tokens = info.kv_blocks_total * info.layout.block_size
    return min(info.max_model_len, kv_tokens) if kv_tokens > 0 else info.max_model_len


def _retrieved(task: asyncio.Task[None]) -> None:
    """Marks a task's exception as seen (asyncio warns of one nobody retrieved)."""
    if not task.cancelled():
        task.exception()


class Coordinator:
    def __init__(self, config: SchedulerConfig, pool: WorkerPool | None = None) -> None:
        """`pool` defaults to gRPC clients built from `config`; tests pass fakes."""
        self.config = config
        self.profile = load_profile(config.profile)
        self.scheduler_id = uuid.uuid4().hex
        """Names this scheduler to the workers, on its step feeds and placements: a worker
        serves one scheduler at a time (`worker/claim.py`). New at every start, so a restarted
        scheduler takes its workers once its predecessor's feeds are closed."""
        self.started_at_s = time.time()
        self.is_serving = False
        """Set once its --workers list is linked (at once without one): a scheduler still
        linking it is outranked on a worker by one that serves (`worker/claim.py`)."""
        self.pool = pool or WorkerPool(
            grpc_clients(
                config.tls, config.auth_token, config.worker_link_timeout_s, self.scheduler_id
            ),
            config.worker_call_timeout_s,
        )
        self.policy: _core.Scheduler | None = None
        self.serving_policy = config.policy
        """The policy placing requests: the configured one, or FALLBACK_POLICY where its first
        plan failed (`_build_policy`)."""
        self.requests: dict[str, ClientRequest] = {}
        """By `request_id`, the id the workers know."""
        self._by_client: dict[tuple[str, str], ClientRequest] = {}
        """By (owner, the id its client gave)."""
        self._by_core: dict[int, ClientRequest] = {}
        self._queue = AdmissionQueue(config.max_queue, config.max_queue_per_client)
        self._core_ids = itertools.count(1)
        self._migrations = asyncio.Semaphore(config.max_concurrent_migrations)
        self._tasks: set[asyncio.Task[None]] = set()
        self._connecting: dict[str, asyncio.Future[WorkerLink]] = {}
        self._said_id_in_use = LogThrottle()
        self._said_too_short = LogThrottle()
        self._said_other_model = LogThrottle()
        self._said_vocabulary = LogThrottle()
        self._said_held = LogThrottle(HELD_LOG_INTERVAL_S)
        self._is_closing = False
        self.is_stopping = False
        """Set by `cut_off`: new requests are refused with UNAVAILABLE."""
        self._no_worker_since: float | None = None
        """Since when no worker has been healthy (None while one is)."""
        self._held_on_gaps: dict[str, ClientRequest] = {}
        """Requests whose delivered tokens or finish wait on a gap before them
        (`ClientRequest.held_since`), for `_end_held` to look at every tick."""
        self._left_in_plan: set[int] = set()
        """Instances of workers gone or leaving that the core kept (it cannot remove its last
        one); removed once another worker joins."""
        self._first_plan: asyncio.Task[None] | None = None
        """The task making the first plan (off the event loop, `_make_first_plan`); None while
        none is being made. Workers that register meanwhile wait for it."""
        self.counters = Counters()
        self.max_model_len = 0
        rate = config.max_optional_migrations_per_s
        self._optional_moves = TokenBucket(rate, burst=rate, now=time.monotonic())
        self.metrics = SchedulerMetrics()
        self._export_gauges()
        self.tokenizer = load_tokenizer(config.tokenizer) if config.tokenizer else None

    def _export_gauges(self) -> None:
        """Gauges read at scrape time, so no code path can forget to update them."""
        m = self.metrics
        m.queue_depth.set_function(lambda: len(self._queue))
        m.running.set_function(lambda: sum(len(w.running) for w in self.pool.by_id.values()))
        m.workers.labels("healthy").set_function(lambda: len(self.pool.healthy()))
        m.workers.labels("unhealthy").set_function(
            lambda: len(self.pool.by_id) - len(self.pool.healthy())
        )

    # --- workers ---------------------------------------------------------------------------
    async def now_serving(self) -> None:
        """Marks this scheduler serving (its --workers list is linked), and says so to the
        workers it holds: the feeds it opened while linking the list said it did not serve
        yet, and a serving scheduler that a worker registered with took that worker over from
        an idle one (`worker/claim.py`). One feed more each, closed at its first message: the
        worker keeps the latest word of its holder."""
        self.is_serving = True
        reader = self._feed_reader()

        async def tell(link: WorkerLink) -> None:
            feed = link.client.step_feed(reader)
            try:
                await asyncio.wait_for(anext(feed), self.config.worker_call_timeout_s)
            except Exception as e:  # a link that broke meanwhile: its next feed says it all
                log.info("serving_not_told", worker=link.address, error=repr(e))
            finally:
                if isinstance(feed, AsyncGenerator):
                    await feed.aclose()

        await asyncio.gather(*(tell(w) for w in self.pool.healthy()))

    def _feed_reader(self) -> FeedReader:
        """How this scheduler names itself on a step feed it opens now."""
        return FeedReader(self.scheduler_id, self.started_at_s, self.is_serving)

    async def add_worker(self, address: str, worker_id: str = "") -> WorkerLink:
        """Connects a worker and puts it in the plan once its step feed is up and the ghosts
        it ran are aborted (so nothing is placed beside a stale copy of the same request).
        Raises WorkerCallError or WorkerUnreachable when it is not reachable."""
        for link in self.pool.by_id.values():
            if link.address == address and link.is_healthy:
                return link
        back = await self._rejoin(address, worker_id)
        if back is not None:
            return back
        pending = self._connecting.get(address)
        if pending is not None:  # a heartbeat while the first registration is under way
            return await asyncio.shield(pending)
        pending = self._connecting[address] = asyncio.get_running_loop().create_future()
        try:
            link = await self._connect(address, worker_id)
        except asyncio.CancelledError:
            pending.cancel()
            raise
        except BaseException as e:
            pending.set_exception(e)
            pending.exception()  # retrieved: nobody else may be waiting
            raise
        else:
            pending.set_result(link)
        finally:
            del self._connecting[address]
        return link

    async def _keep_out(
        self, link: WorkerLink, said: LogThrottle, event: str, error: WorkerUnreachable
    ) -> NoReturn:
        """Drops `link`, a worker the cluster cannot take as it is, and raises `error`; logs
        `event` at most once per `said`'s interval for its address (a static worker is tried
        again every second, a registering one at every heartbeat)."""
        await self.pool.drop(link)
        if said.should_log(link.address, time.monotonic()):
            log.error(event, address=link.address, error=str(error))
        raise error

    async def _connect(self, address: str, worker_id: str) -> WorkerLink:
        await self._first_plan_settled()  # then the checks below see the plan's model length
        link = await self.pool.connect(address, worker_id)
        old, link.replaced = link.replaced, None
        if old is not None:
            self._retire_link(old)
        longest = _longest_context(link.info)
        if longest < MIN_CONTEXT:
            # The first worker sets the length every request is admitted by: one that said 0
            # was taken in, and every request was refused as "over 0 bytes".
            why = (
                f"worker {link.worker_id[:256]!r} at {address[:256]} says it holds requests "
                f"of at most {longest} tokens (max_model_len {link.info.max_model_len}): no "
                "request fits; check the worker's engine settings"
            )
            await self._keep_out(
                link, self._said_too_short, "worker_too_short", WorkerTooShort(why)
            )
        if self.policy is not None and longest < self.max_model_len:
            why = (
                f"worker {link.worker_id[:256]!r} at {address[:256]} holds requests of at most "
                f"{longest} tokens, less than the model length {self.max_model_len} this "
                "scheduler admits requests by: start it with at least that length (and KV), "
                "or restart the scheduler"
            )
            await self._keep_out(
                link, self._said_too_short, "worker_too_short", WorkerTooShort(why)
            )
        serving = [w for w in self.pool.healthy() if w is not link]
        if (mismatch := _another_model(link, serving)) is not None:
            error = WorkerServesAnotherModel(mismatch)
            await self._keep_out(link, self._said_other_model, "worker_serves_another_model", error)
        self._say_tokenizer_mismatch(link)
        link.is_healthy = False  # not placeable before its feed is reconciled
        reconciled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        follow = self._spawn(self._follow(link, reconciled))
        try:
            await asyncio.wait_for(asyncio.shield(reconciled), RECONCILE_TIMEOUT_S)
        except BaseException as e:
            follow.cancel()
            await self.pool.drop(link)
            if isinstance(e, asyncio.TimeoutError):
                why = f"{address}: no step feed within {RECONCILE_TIMEOUT_S} s"
                raise WorkerUnreachable(why) from None
            if isinstance(e, WorkerServesAnotherScheduler) and self._said_held.should_log(
                address, time.monotonic()
            ):
                log.error("worker_serves_another_scheduler", address=address, error=str(e))
            raise
        try:
            await self._join_policy(link)
        except BaseException:
            if link.is_healthy:  # in the first plan, made after its registration gave up
                log.info("worker_added", worker_id=link.worker_id, address=address)
            else:
                # Not joined (the plan failed, or the registration's deadline passed while it
                # waited for the plan): forgotten, so its next registration starts afresh.
                # Kept with its feed open, it was refused as "leaving" at every heartbeat.
                follow.cancel()
                await self.pool.drop(link)
            raise
        log.info("worker_added", worker_id=link.worker_id, address=address, instance=link.instance)
        return link

    def _say_tokenizer_mismatch(self, link: WorkerLink) -> None:
        """Logs where the scheduler's tokenizer and `link`'s vocabulary differ in size. Output
        ids the tokenizer does not know decode to nothing: with a 1,024-token tokenizer over
        workers of 32,000, every completion came back 200 with empty text and nothing was
        logged. Not refused: vLLM reports its embedding table's size, which models pad past
        their tokenizer's (so a larger vocabulary is a warning); a smaller one is an error, since
        text prompts then hold ids the worker refuses."""
        if self.tokenizer is None or not link.info.vocab_size:
            return
        ours, theirs = self.tokenizer.get_vocab_size(), link.info.vocab_size
        if ours == theirs or not self._said_vocabulary.should_log(link.address, time.monotonic()):
            return
        fields = {"worker": link.address, "tokenizer_tokens": ours, "worker_vocabulary": theirs}
        if theirs > ours:
            log.warning(
                "vocabulary_larger_than_tokenizer",
                **fields,
                why=f"output ids from {ours} up decode to no text (fine for a model whose "
                "vocabulary is padded; otherwise --tokenizer is another model's)",
            )
        else:
            log.error(
                "tokenizer_larger_than_vocabulary",
                **fields,
                why=f"text prompts holding ids from {theirs} up are refused; --tokenizer is "
                "likely another model's",
            )

    async def _first_plan_settled(self) -> None:
        """Returns once no first plan is being made (at once when none is). Waiting is all it
        does: a caller cancelled meanwhile (a registration past its deadline) leaves the plan
        to go on."""
        while (making := self._first_plan) is not None:
            await asyncio.wait([making])

    async def _join_policy(self, link: WorkerLink) -> None:
        """Makes a worker placeable: into the core's layout (or the first plan, once enough
        workers are healthy), and out of it every instance of a worker gone that the core had
        to keep (`_left_in_plan`)."""
        await self._first_plan_settled()
        if link.is_gone or link.has_left:  # its feed ended or it drains: nothing may go there
            raise WorkerUnreachable(f"{link.address}: the worker left as it joined")
        link.is_healthy = True
        if self.policy is None:
            joined = len(self.pool.healthy())
            if joined < self.config.min_workers:
                log.info(
                    "waiting_for_min_workers", joined=joined, min_workers=self.config.min_workers
                )
            else:
                making = self._first_plan = asyncio.get_running_loop().create_task(
                    self._make_first_plan(), name="first_plan"
                )
                self._tasks.add(making)  # `close` cancels it
                making.add_done_callback(self._tasks.discard)
                making.add_done_callback(_retrieved)  # its failure is logged where it fails
                try:
                    # Shielded: a registration past its deadline (5 s; a plan for 64 workers
                    # took longer under load) cancelled the plan with it, and with nothing to
                    # make it again, every request was refused for good.
                    await asyncio.shield(making)
                except asyncio.CancelledError:
                    raise  # the plan goes on, and this worker is in it
                except BaseException:
                    # Not placeable without a plan: marked healthy, it was listed as serving
                    # while every request was refused, and later heartbeats found it joined.
                    link.is_healthy = False
                    raise
                if not link.is_healthy:  # gone while the plan was made
                    return
        else:
            if link.instance in self._left_in_plan:  # the core kept it: it is there still
                self._left_in_plan.discard(link.instance)
            else:
                self.policy.add_instance(link.instance)
            for instance in list(self._left_in_plan):
                self.policy.remove_instance(instance)
                self._left_in_plan.discard(instance)
                kept = self.pool.by_instance.get(instance)
                if (
                    kept is not None
                    and kept.is_gone
                    and self.pool.by_id.get(kept.worker_id) is not kept
                ):
                    del self.pool.by_instance[instance]  # replaced while the core held it

    def say_id_in_use(self, address: str, why: str) -> None:
        """Logs a worker refused for an id in use, once per address (it retries every second)."""
        if self._said_id_in_use.should_log(address, time.monotonic()):
            log.error("worker_id_in_use", address=address, error=why)

    async def _make_first_plan(self) -> None:
        """Makes the first plan, for the workers healthy now, on a thread of its own: on 64
        workers it takes seconds (tens under load), and on the event loop every RPC, feed and
        health check waited for it. Workers registering meanwhile wait for it
        (`_first_plan_settled`) and then join the plan made; workers that left meanwhile are
        taken out of it before anything is placed. A plan that cannot be made is logged here
        too (its registration may be gone)."""
        workers = self.pool.healthy()
        try:
            started = time.perf_counter()
            policy = await run_in_daemon_thread("first-plan", lambda: self._build_policy(workers))
            self._install_first_policy(policy, workers, time.perf_counter() - started)
        except Exception as e:
            log.error("first_plan_failed", error=str(e)[:512])
            # Not placeable without a plan. Kept healthy, they were listed as serving while
            # every request was refused, and their heartbeats found them joined; kept unhealthy
            # with their feeds open, they were refused as leaving. Forgotten, each joins afresh
            # at its next registration, which tries the plan again.
            for link in workers:
                link.is_healthy = False
                await self.pool.drop(link)
            raise
        finally:
            self._first_plan = None

    def _install_first_policy(
        self, policy: _core.Scheduler, workers: list[WorkerLink], seconds: float
    ) -> None:
        """Serves with `policy`, planned for `workers`; those that left while it was made
        leave it now (no await between: nothing sees the plan with them in it)."""
        self.policy = policy
        self.serving_policy = policy.name
        served = max(hi for _, hi, _ in policy.stages())
        longest = min(_longest_context(w.info) for w in workers)
        # Fixed stages may end short of the workers' length: what grows past the last stage's
        # bound has no stage to go to, so admission holds requests to it.
        if served < longest:
            log.warning("stages_shorter_than_workers", stages_max_len=served, workers=longest)
        self.max_model_len = min(longest, served)
        self.counters.plan_changed_at = time.time()
        for link in workers:
            if not link.is_healthy:
                self._leave_policy(link)
        log.info(
            "policy_ready",
            policy=self.serving_policy,
            stages=policy.stages(),
            plan_seconds=round(seconds, 3),
        )

    def _build_policy(self, workers: list[WorkerLink]) -> _core.Scheduler:
        """The first plan, for `workers` (run off the event loop: it touches no state of the
        coordinator). A rate past what they can carry is planned for at the highest rate they
        can: refusing every request because the traffic forecast is too high would serve
        nobody. A plan that cannot be made for them at all (a worker whose KV holds fewer
        tokens than the planner's length buckets) falls back to one stage placed by least
        load, with an error saying why."""
        instances = [w.instance for w in workers]
        longest = min(_longest_context(w.info) for w in workers)
        c = self.config
        try:
            return build_policy(
                c.policy,
                self.profile,
                instances,
                max_len=longest,
                workload=c.workload,
                rate=c.rate,
                arrival_cv=c.arrival_cv,
                stages=[FixedStage(s.min_len, s.max_len, s.num_workers) for s in c.stages],
                seed=c.seed,
                plan_within_capacity=True,
                cascade_config=CascadeConfig(
                    is_capacity_guarded=c.is_capacity_guarded,
                    first_token=FirstTokenSlo(c.ttft_slo_s, c.ttft_slo_per_token_s),
                ),
                # The layout selection's goodput guard counts the same first-token level.
                goodput_slo=GoodputSlo(c.ttft_slo_s, c.ttft_slo_per_token_s),
            )
        except ValueError as e:
            if c.policy != "cascade" or c.stages:
                raise
            log.error(
                "plan_failed",
                error=str(e),
                serving=FALLBACK_POLICY,
                workers=len(instances),
                hint="check --workload and --rate against the workers' lengths and KV",
            )
            return build_policy(FALLBACK_POLICY, self.profile, instances, max_len=longest)

    async def _follow(self, link: WorkerLink, reconciled: asyncio.Future[None]) -> None:
        """Reads a worker's step feed until it ends; an end or a break means the worker is gone
        (a drained worker ends its feed once it stopped running anything). `reconciled` is
        settled once the first message (what runs there) is reconciled, or the feed fails."""
        why = "step feed ended"
        try:
            async for update in link.client.step_feed(self._feed_reader()):
                if not reconciled.done():
                    if update.is_draining:  # leaving: nothing may be placed there
                        draining = WorkerUnreachable(f"{link.address}: the worker is draining")
                        reconciled.set_exception(draining)
                        return
                    await self._reap_ghosts(link, update)
                    reconciled.set_result(None)
                self._on_step(link, update)
        except WorkerCallError as e:
            why = e.details
            if not reconciled.done():
                if e.code == grpc.StatusCode.FAILED_PRECONDITION:
                    held = WorkerServesAnotherScheduler(f"{link.address}: {e.details}")
                    reconciled.set_exception(held)
                else:
                    reconciled.set_exception(e)
                return
        except Exception as e:
            # A fault of this scheduler's, not the worker's: the worker is given up on (its
            # requests resume elsewhere, it is linked again later) rather than left placed on
            # with nobody reading its feed, which hung every request there.
            log.error("step_feed_failed", worker=link.address, error=repr(e), exc_info=e)
            why = f"the scheduler failed on its step feed: {e!r}"
        if not reconciled.done():
            reconciled.set_exception(WorkerUnreachable(f"{link.address}: {why}"))
            return
        if not self._is_closing:
            await self._worker_gone(link, why)

    async def _reap_ghosts(self, link: WorkerLink, snapshot: worker_pb2.StepUpdate) -> None:
        """Aborts the detached requests a worker runs that the scheduler did not put there:
        left by a previous scheduler that crashed (mid-migration included), or still running on
        a worker this scheduler gave up on and resumed elsewhere. Nobody reads their tokens."""
        ghosts = []
        for r in snapshot.requests:
            rec = self.requests.get(r.request_id)
            if not r.is_detached or (rec is not None and link.worker_id in rec.holders):
                continue
            log.warning("ghost_aborted", request_id=r.request_id, worker_id=link.worker_id)
            self.metrics.ghosts_aborted.inc()
            ghosts.append(self._abort_on(link, r.request_id))
        await asyncio.gather(*ghosts)

    def _leave_policy(self, link: WorkerLink) -> None:
        """Takes a worker out of routing; its stage is refilled by the core."""
        link.is_healthy = False
        if self.policy is not None:
            try:
                self.policy.remove_instance(link.instance)
            except ValueError:
                # The core keeps its last instance (a layout needs one); so does `can_place`'s
                # count, and new requests get UNAVAILABLE until a worker registers.
                self._left_in_plan.add(link.instance)
                log.error(
                    "no_workers_left",
                    worker=link.address,
                    detail="the last placeable worker left: new requests are refused "
                    "until a worker registers",
                )

    async def worker_leaving(self, link: WorkerLink) -> None:
        """A draining worker: nothing new goes there, and what runs there moves to workers the
        core picks (what cannot move finishes there, or is resumed elsewhere when it leaves)."""
        link.has_left = True
        if link.is_healthy:
            self._leave_policy(link)
            log.info("worker_leaving", worker_id=link.worker_id, requests=len(link.running))
            for rid in list(link.running):
                self._spawn(self._move_off(link, rid))

    async def deregister(self, link: WorkerLink) -> None:
        """A DeregisterWorker for `link`: the worker leaves (`worker_leaving`), unless it
        answers at its registered address, as itself, that it is not draining; then it keeps
        its place and WorkerNotDraining is raised. A worker deregisters itself only once it
        drains (its goodbye comes after it marked itself draining), so a goodbye it does not
        confirm is someone else's: any holder of the registry's credential used to take a
        healthy worker out of the plan with one call, until that worker restarted. A worker
        that does not answer (dead, cut off) leaves as before."""
        if not link.has_left and not link.is_gone and await self._is_serving(link):
            raise WorkerNotDraining(
                f"worker {link.worker_id[:256]!r} at {link.address} answers that it is serving "
                "and not draining: it stays; a worker deregisters itself when it drains"
            )
        await self.worker_leaving(link)

    async def _is_serving(self, link: WorkerLink) -> bool:
        """Whether the worker at `link`'s address answers, as the worker that joined there,
        that it is not draining. No answer within LEAVE_CHECK_TIMEOUT_S, an error, or another
        worker's answer: False."""
        try:
            load = await link.client.load(LEAVE_CHECK_TIMEOUT_S)
        except WorkerCallError:
            return False
        return load.worker_id == link.info.worker_id and not load.is_draining

    async def _rejoin(self, address: str, worker_id: str) -> WorkerLink | None:
        """Puts back into the plan a worker at `address` taken out as leaving whose feed is
        still open, when it answers that it is not draining and nothing of the scheduler's
        runs there any more (the core forgot its loads when it left; its moves are over):
        taken out by a DeregisterWorker while it could not be asked (stalled, a link that
        dropped a call), it used to be refused as leaving until it restarted. None when there
        is no such worker, or it cannot come back (yet): the caller goes on as for a new one.

        The checks that need no call come first. A worker whose feed said it drains is refused
        at once (WorkerLeaving, as the pool would after asking for its info): it never serves
        again, and no other process listens at its address while its feed is open (servers
        bind without SO_REUSEPORT). Each registration at a draining worker's address used to
        wait for its load, up to LEAVE_CHECK_TIMEOUT_S when it was stalled, and then for its
        info. Only a worker taken out by a goodbye its feed never confirmed is asked: nothing
        but its own answer tells whether it serves again."""
        leaving = (w for w in self.pool.by_id.values() if w.address == address and w.has_left)
        link = next((w for w in leaving if not w.is_gone), None)
        if link is None or (worker_id and worker_id != link.worker_id) or self._is_closing:
            return None
        if link.is_draining:
            raise WorkerLeaving.of(address, link.worker_id)
        if link.running or not await self._is_serving(link):
            return None
        await self._first_plan_settled()
        if link.is_healthy:  # another registration put it back meanwhile
            return link
        if not link.has_left or link.is_gone or link.running or self._is_closing:
            return None
        link.has_left = False
        await self._join_policy(link)
        log.warning(
            "worker_rejoined",
            worker_id=link.worker_id,
            address=address,
            instance=link.instance,
            why="taken out as leaving, it answers that it is not draining",
        )
        return link

    async def _worker_gone(self, link: WorkerLink, why: str) -> None:
        """Resumes by recompute elsewhere whatever the scheduler still had on `link` (a request
        being moved off it is left to its move, which resumes it if the move fails)."""
        link.is_gone = True
        if link.is_healthy:
            self._leave_policy(link)
        if link.running:
            log.warning(
                "worker_failed", worker_id=link.worker_id, reason=why, requests=len(link.running)
            )
        for rid in list(link.running):
            rec = self.requests.get(rid)
            if rec is None:
                link.running.discard(rid)
            elif not rec.is_moving and not rec.is_placing:
                await self._resume_elsewhere(rec, link)
        for rec in list(self.requests.values()):
            if (
                rec.owed_by is not None
                and rec.owed_by[0] == link.worker_id
                and len(rec.tokens) < rec.owed_by[1]
                and rec.worker_id not in (None, link.worker_id)
                and not (rec.is_done or rec.is_moving or rec.is_placing)
            ):
                await self._resume_past_lost_tokens(rec)
        for forgotten in self.pool.forget_gone(MAX_FAILED_WORKERS_KEPT, self._left_in_plan):
            self._spawn(self._close_later(forgotten))

    def _retire_link(self, old: WorkerLink) -> None:
        """A gone link that a new one of the same worker id replaced: its instance is dropped
        (unless the core still holds it) and its client closed. Each restart of a worker left
        both behind for good: an entry of `by_instance` and an open channel."""
        if old.instance not in self._left_in_plan:
            self.pool.by_instance.pop(old.instance, None)
        self._spawn(self._close_later(old))

    async def _close_later(self, link: WorkerLink) -> None:
        """Closes a forgotten worker's client once a call still under way on it (a move's, an
        abort's) has had its time: closing the channel at once would cut it."""
        try:
            await asyncio.sleep(self.config.migration_timeout_s)
        finally:
            await link.client.close()

    async def _resume_past_lost_tokens(self, rec: ClientRequest) -> None:
        """A request whose last move's source died before its feed delivered the tokens made
        there: the target went on past them, and the client waited for the gap for good (the
        request ran to its end unread). Its copy on the target is aborted, and it resumes by
        recompute from what the client has."""
        assert rec.owed_by is not None
        log.warning(
            "tokens_lost_with_source",
            request_id=rec.request_id,
            source=rec.owed_by[0],
            delivered=len(rec.tokens),
            owed=rec.owed_by[1],
        )
        rec.owed_by = None
        target = self.pool.by_id.get(rec.worker_id or "")
        if target is not None:
            self._unplace(rec, target)
            if not target.is_gone:
                await self._abort_on(target, rec.request_id)
        await self._place_from_delivered(rec)

    async def _resume_moved_away(self, rec: ClientRequest, link: WorkerLink) -> None:
        """A request its worker says it moved, by no call of the scheduler's: it is placed
        again, by recompute from what the client has (its copy elsewhere, if any, runs on
        unread: nothing says where it went but the worker's log)."""
        if rec.is_done or rec.worker_id != link.worker_id or rec.is_moving:
            return
        log.warning("moved_without_the_scheduler", request_id=rec.request_id, worker=link.worker_id)
        self._unplace(rec, link)
        await self._place_from_delivered(rec)

    async def _resume_elsewhere(self, rec: ClientRequest, link: WorkerLink) -> None:
        """Resumes by recompute from the prompt plus what the client already has, unless it
        left `link` meanwhile (a move that completed while other requests were resumed)."""
        link.running.discard(rec.request_id)
        rec.holders.discard(link.worker_id)
        if rec.is_done or rec.worker_id != link.worker_id:
            return
        await self._place_from_delivered(rec)

    async def _place_from_delivered(self, rec: ClientRequest) -> None:
        """Places `rec` again, to be recomputed from the tokens its client has: whatever
        arrived past them, and a finish that came with it, belong to a copy no longer followed."""
        rec.pending.clear()
        rec.finish_after = None
        rec.worker_id = None
        await self._place(rec)

    # --- steps and routing -----------------------------------------------------------------
    def _on_step(self, link: WorkerLink, update: worker_pb2.StepUpdate) -> None:
        """Splices one feed message (one engine step, or several the worker merged while this
        scheduler was busy) into the clients' streams and tells the core the new lengths."""
        if update.is_draining and link.is_healthy:
            self._spawn(self.worker_leaving(link))
        link.last_step = update
        ids: list[int] = []
        lens: list[int] = []
        requests = self.requests
        worker_id = link.worker_id
        max_lag = self.config.max_stream_lag_tokens
        for r in update.requests:
            rec = requests.get(r.request_id)
            if rec is None:
                continue
            if worker_id not in rec.holders:
                # Not where the scheduler put it: a stray or hostile copy must not write into
                # the client's stream.
                self.metrics.foreign_steps.inc()
                continue
            chunk = r.tokens
            token_ids = chunk.token_ids
            if r.finish_reason == common_pb2.FINISH_REASON_MIGRATED:
                if worker_id == rec.worker_id and not rec.is_moving:
                    # Moved or exported by a call the scheduler did not make (an operator's
                    # MigrateOut or ExportKV): it follows no copy elsewhere, and the client's
                    # stream stopped there. It resumes where the scheduler places it.
                    self._spawn(self._resume_moved_away(rec, link))
                continue
            finish = FINISH_FROM_PROTO.get(r.finish_reason) if r.finish_reason else None
            if finish is FinishReason.ABORT and worker_id != rec.worker_id:
                # A copy dropped where it was not running: a migration's target told by the
                # source to drop what it was sent. The request goes on where it runs.
                continue
            if token_ids or finish is not None:
                if rec.deliver(chunk.first_index, token_ids, finish):
                    self.metrics.tokens_past_max.inc()
                if rec.held_since is not None:
                    self._held_on_gaps[rec.request_id] = rec
                if (
                    rec.finish is None
                    and rec.num_unsent > max_lag
                    and rec.is_stalled(time.monotonic())
                ):
                    self._give_up(rec)
                    continue
            if rec.finish is not None:
                self._retire(rec)
            elif rec.worker_id == worker_id and rec.gone_from != worker_id:
                ids.append(rec.core_id)
                lens.append(r.context_len)
        if self.policy is not None and ids and link.is_healthy:
            started = time.perf_counter()
            try:
                moves = self.policy.on_step(ids, [link.instance] * len(ids), lens, time.monotonic())
            except ValueError as e:
                # The core refused a length (admission holds requests to the stages' bound, so
                # this is a bug): the feed goes on, its tokens were delivered above; only this
                # step's migrations are skipped. Before, the error ended the feed's reader and
                # every request on the worker hung.
                self.metrics.policy_step_errors.inc()
                self._say_step_refused(link, e)
                moves = []
            self.metrics.on_step_seconds.observe(time.perf_counter() - started)
            for m in moves:
                self._spawn(self._migrate(m))
        self._drain_queue()

    @staticmethod
    def _say_step_refused(link: WorkerLink, error: ValueError) -> None:
        """Logs a step of `link`'s the core refused, at most once per STEP_REFUSAL_LOG_S with
        the count of those left out: a worker that keeps reporting a bad length would
        otherwise write a line every step (every one is counted in `policy_step_errors`)."""
        now = time.monotonic()
        if now - link.step_refusals_logged_at < STEP_REFUSAL_LOG_S:
            link.step_refusals_unlogged += 1
            return
        log.error(
            "policy_step_refused",
            worker=link.address,
            error=str(error)[:256],
            not_logged_since_last=link.step_refusals_unlogged,
        )
        link.step_refusals_logged_at = now
        link.step_refusals_unlogged = 0

    def _retire(self, rec: ClientRequest) -> None:
        """Forgets a finished request (it must have its finish reason) and records it."""
        self._forget(rec)
        link = self.pool.by_id.get(rec.worker_id or "")
        if link is not None:
            link.running.discard(rec.request_id)
            if self.policy is not None:
                self.policy.request_finished(rec.core_id, link.instance)
        self._observe_finished(rec)

    def _observe_finished(self, rec: ClientRequest) -> None:
        assert rec.finish is not None and rec.finished_at is not None
        m = self.metrics
        m.requests.labels(rec.finish.value).inc()
        if rec.first_token_at is None:
            return
        stage = m.stage(rec.entry_stage)
        stage.ttft.observe(rec.first_token_at - rec.arrived_at)
        stage.e2e.observe(rec.finished_at - rec.arrived_at)
        if len(rec.tokens) > 1:
            tpot = (rec.finished_at - rec.first_token_at) / (len(rec.tokens) - 1)
            stage.tpot.observe(tpot)

    def _give_up(self, rec: ClientRequest) -> None:
        """Ends a request whose client stopped reading, so its unread tokens have a bound."""
        log.warning("client_too_slow", request_id=rec.request_id, unread=rec.num_unsent)
        rec.note_ended_by_scheduler(is_overflowed=True)
        self._end_and_abort_later(rec)

    def _end_and_abort_later(self, rec: ClientRequest) -> None:
        """Ends `rec` (ABORT) and aborts it on its worker in a task of the coordinator's own,
        which no caller's cancellation can cut short."""
        link = self.pool.by_id.get(rec.worker_id or "")
        self._end(rec, FinishReason.ABORT)
        if link is not None and link.is_healthy:
            self._spawn(self._abort_on(link, rec.request_id))

    def _end(self, rec: ClientRequest, reason: FinishReason) -> None:
        """Ends an accepted request that cannot go on (the client gets `reason`)."""
        rec.end(reason)
        self._retire(rec)

    async def _migrate(self, m: _core.Migration) -> None:
        rec = self._by_core.get(m.request_id)
        src, dst = (
            self.pool.by_instance.get(m.from_instance),
            self.pool.by_instance.get(m.to_instance),
        )
        assert self.policy is not None
        if (
            rec is None
            or src is None
            or dst is None
            or rec.is_done
            or rec.is_moving
            or rec.worker_id != src.worker_id
        ):
            self.policy.migration_done(m, False)
            return
        is_optional = m.reason is not _core.MigrationReason.STAGE_BOUND
        if is_optional and not self._optional_moves.try_take(time.monotonic()):
            self.policy.migration_done(m, False)
            self.metrics.migrations.labels(m.reason.value, "rate_limited").inc()
            return
        rec.holders.add(dst.worker_id)
        rec.is_moving = True
        try:
            moved = await self._migrate_out(rec, src, dst)
        except WorkerCallError as e:
            # NOT_FOUND: the request ended on the worker (finished, or its client left) before
            # it could move; its feed is behind. Stop asking it to move a request it no longer
            # has (the finish is on its way). Not a fault: counted apart from failures, which
            # an operator's alert watches (clients leaving mid-move showed as failed moves).
            is_overtaken = e.code == grpc.StatusCode.NOT_FOUND
            if is_overtaken:
                rec.gone_from = src.worker_id
            if dst.worker_id != rec.worker_id:
                rec.holders.discard(dst.worker_id)
            self.policy.migration_done(m, False)
            if is_overtaken:
                self.metrics.migrations.labels(m.reason.value, "overtaken").inc()
            else:
                self.counters.num_failed_migrations += 1
                self.metrics.migrations.labels(m.reason.value, "failed").inc()
            log.info(
                "migration_overtaken" if is_overtaken else "migration_failed",
                request_id=rec.request_id,
                reason=m.reason.value,
                error=e.details,
            )
            if src.is_gone:  # its feed ended during the move: nothing runs it now
                await self._resume_elsewhere(rec, src)
            return
        finally:
            rec.is_moving = False
        self._moved(rec, src, dst, m.reason.value, moved)
        self.policy.migration_done(m, True)

    async def _migrate_out(
        self, rec: ClientRequest, src: WorkerLink, dst: WorkerLink
    ) -> worker_pb2.MigrateOutResponse:
        """Has `src` move `rec` to `dst`, within the limit of concurrent transfers; raises the
        worker's WorkerCallError on failure. Between workers whose KV layouts differ (another
        tensor-parallel degree, dtype or attention backend for the same model) the target
        computes the KV again: a worker refuses blocks it cannot use, and the move, asked
        again at every step, never happened (thousands of failures a minute in the log)."""
        recompute = src.info.layout != dst.info.layout
        async with self._migrations:
            return await src.client.migrate_out(
                rec.request_id,
                dst.address,
                self.config.migration_timeout_s,
                recompute=recompute,
            )

    def _moved(
        self,
        rec: ClientRequest,
        src: WorkerLink,
        dst: WorkerLink,
        reason: str,
        moved: worker_pb2.MigrateOutResponse,
    ) -> None:
        src.running.discard(rec.request_id)
        made_at_source = moved.context_len - len(rec.prompt_token_ids)
        if not rec.is_done:
            dst.running.add(rec.request_id)
            rec.worker_id = dst.worker_id
            rec.owed_by = (src.worker_id, made_at_source)
        else:
            # Ended during the move (its client aborted or left): the abort went to the
            # source, which had stopped it for the move, so the target's copy is nobody's.
            self._spawn(self._abort_on(dst, rec.request_id))
        # The source's feed may still carry its last tokens; once they are here, nothing it
        # reports under this id is this request's.
        self._forget_holder_later(rec, src.worker_id, made_at_source)
        rec.num_migrations += 1
        self.counters.num_migrations += 1
        self.metrics.migrations.labels(reason, "ok").inc()
        log.info(
            "migrated",
            request_id=rec.request_id,
            source=src.worker_id,
            target=dst.worker_id,
            reason=reason,
            context_len=rec.context_len,
            num_bytes=moved.num_bytes,
            pause_s=round(moved.pause_s, 6),
            total_s=round(moved.total_s, 6),
        )

    def _forget_holder_later(self, rec: ClientRequest, worker_id: str, owed_until: int) -> None:
        asyncio.get_running_loop().call_later(
            FEED_LAG_GRACE_S, self._forget_holder, rec, worker_id, owed_until
        )

    def _forget_holder(self, rec: ClientRequest, worker_id: str, owed_until: int) -> None:
        """Stops following `worker_id`'s feed for `rec`, a move's source, unless the request
        runs there again, or the feed still owes the client tokens made there before the move
        (the first `owed_until`), or another move is under way: it is asked again later. A
        busy scheduler reads its feeds seconds behind; those tokens, dropped as a stranger's
        once a fixed grace had passed, left a gap the client's stream waited on for good (17
        of the 200 streams of a `bench_scheduler.py` relay run)."""
        if rec.worker_id == worker_id or rec.is_done:
            return
        link = self.pool.by_id.get(worker_id)
        is_owing = len(rec.tokens) < owed_until and link is not None and not link.is_gone
        if is_owing or rec.is_moving:
            # A source that is gone owes nothing more: `_worker_gone` resumes the request past
            # the tokens lost with it.
            self._forget_holder_later(rec, worker_id, owed_until)
            return
        rec.holders.discard(worker_id)

    async def _move_off(self, src: WorkerLink, request_id: str) -> None:
        """Moves a request off a draining worker to the instance the core admits it to; on
        failure it stays there (finishing there, or resumed by recompute when the worker goes)."""
        rec = self.requests.get(request_id)
        if rec is None or rec.is_done or self.policy is None or rec.worker_id != src.worker_id:
            return
        try:
            decision = self.policy.admit(rec.core_id, rec.context_len, time.monotonic())
        except ValueError:
            decision = None
        dst = self.pool.by_instance.get(decision[0]) if decision is not None else None
        if dst is None or not dst.is_healthy:
            log.info("drain_move_no_target", request_id=request_id, worker_id=src.worker_id)
            return
        rec.holders.add(dst.worker_id)
        rec.is_moving = True
        try:
            moved = await self._migrate_out(rec, src, dst)
        except WorkerCallError as e:
            rec.holders.discard(dst.worker_id)
            self.policy.request_finished(rec.core_id, dst.instance)
            self.counters.num_failed_migrations += 1
            self.metrics.migrations.labels("drain", "failed").inc()
            log.info("drain_move_failed", request_id=request_id, error=e.details)
            if src.is_gone:  # its feed ended during the move: nothing runs it now
                await self._resume_elsewhere(rec, src)
            return
        finally:
            rec.is_moving = False
        self._moved(rec, src, dst, "drain", moved)
        if rec.is_done:  # finished during the move: the core placed it on dst as well
            self.policy.request_finished(rec.core_id, dst.instance)

    async def tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.tick_interval_s)
            if self.policy is None:
                continue
            started = time.perf_counter()
            migrations, change = self.policy.tick(time.monotonic())
            self.metrics.tick_seconds.observe(time.perf_counter() - started)
            if change is not None:
                self.metrics.plan_changes.labels(change).inc()
                self.counters.num_plan_changes += 1
                self.counters.plan_changed_at = time.time()
                log.info("plan_changed", kind=change, stages=self.policy.stages())
            for m in migrations:
                self._spawn(self._migrate(m))
            self._end_stranded(time.monotonic())
            self._end_held(time.monotonic())
            self._drain_queue()

    def _end_stranded(self, now: float) -> None:
        """Ends with ABORT the accepted requests that wait for a worker (queued, or resumed
        from one that failed) once none has been healthy for `worker_link_timeout_s`. New
        requests are refused at once then (UNAVAILABLE); without this bound the accepted ones
        waited with no end, the dead worker tried again every tick, until one came back."""
        if self.pool.healthy():
            self._no_worker_since = None
            return
        if self._no_worker_since is None:
            self._no_worker_since = now
        if now - self._no_worker_since < self.config.worker_link_timeout_s:
            return
        stranded = [
            rec
            for rec in self.requests.values()
            if rec.worker_id is None and not rec.is_placing and not rec.is_done
        ]
        if stranded:
            log.warning("stranded_requests_ended", requests=len(stranded))
        for rec in stranded:
            self._end(rec, FinishReason.ABORT)

    def _end_held(self, now: float) -> None:
        """Ends with ABORT the requests whose tokens or finish have waited on a gap for
        HELD_GAP_LINK_TIMEOUTS link timeouts: the tokens before it were never sent (a worker's
        bug or lie). Before, such a request hung until its client gave up, one without a
        timeout for ever, though its worker had finished it (docs/reliability.md, "A
        nineteenth probe")."""
        bound = HELD_GAP_LINK_TIMEOUTS * self.config.worker_link_timeout_s
        for request_id, rec in list(self._held_on_gaps.items()):
            if rec.is_done or rec.held_since is None:
                del self._held_on_gaps[request_id]
            elif now - rec.held_since >= bound:
                del self._held_on_gaps[request_id]
                log.warning(
                    "tokens_never_came",
                    request_id=request_id,
                    worker_id=rec.worker_id,
                    delivered=len(rec.tokens),
                    waiting=len(rec.pending),
                )
                self._end_and_abort_later(rec)

    # --- admission -------------------------------------------------------------------------
    @property
    def max_prompt_bytes(self) -> int:
        return self.config.max_prompt_bytes or PROMPT_BYTES_PER_TOKEN * self.max_model_len

    async def encode_text(self, text: str) -> tuple[int, ...]:
        """Token ids of a text prompt. The size is checked first and the tokenizer runs on a
        thread, so one huge prompt neither exhausts memory nor stalls every other stream."""
        if self.tokenizer is None:
            raise SchedulingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "text prompts need a tokenizer; start the scheduler with --tokenizer",
            )
        self._check_open()
        limit = self.max_prompt_bytes
        if is_over_bytes(text, limit):
            raise SchedulingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"text prompt is over {limit} bytes (max_prompt_bytes)",
            )
        ids = await encode_off_loop(self.tokenizer, text, add_special_tokens=True)
        if not ids:
            raise SchedulingError(grpc.StatusCode.INVALID_ARGUMENT, "text is empty")
        return ids

    def new_request(
        self,
        request_id: str,
        prompt: tuple[int, ...],
        sampling: SamplingSpec,
        priority: int,
        session_id: str | None = None,
        owner: str = "",
    ) -> ClientRequest:
        _refuse_long_request_id(request_id)
        self._refuse_id_in_use(owner, request_id)
        if session_id is not None and len(session_id) > MAX_SESSION_ID_CHARS:
            raise SchedulingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"session_id is longer than {MAX_SESSION_ID_CHARS} characters",
            )
        core_id = next(self._core_ids)
        return ClientRequest(
            request_id,
            core_id,
            prompt,
            sampling,
            priority,
            session_id or None,
            owner=owner,
            client_id=request_id,
        )

    def _refuse_id_in_use(self, owner: str, client_id: str) -> None:
        """ALREADY_EXISTS when this owner already runs a request of this id; another owner's
        request of the same id is not this one's business (`ClientRequest.client_id`)."""
        if (owner, client_id) in self._by_client:
            raise SchedulingError(
                grpc.StatusCode.ALREADY_EXISTS, f"request id {client_id!r} is in use"
            )

    async def submit(self, rec: ClientRequest) -> None:
        """Admits a request now or queues it; raises SchedulingError when it cannot be taken."""
        self.check_fits(rec.context_len, rec.sampling.max_tokens)
        # Again: new_request refused early, but another call may have taken the id since.
        self._refuse_id_in_use(rec.owner, rec.client_id)
        if rec.request_id in self.requests:
            rec.request_id = uuid.uuid4().hex  # another owner's request has this id
        self.requests[rec.request_id] = rec
        self._by_client[(rec.owner, rec.client_id)] = rec
        self._by_core[rec.core_id] = rec
        try:
            placed = await self._try_place(rec)
        except SchedulingError:
            self._forget(rec)
            raise
        if placed:
            return
        try:
            self._queue.push(rec.request_id, rec.owner, rec.priority)
        except QueueFull as e:
            self._forget(rec)
            raise SchedulingError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None

    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        """Raises UNAVAILABLE unless a request could be admitted now, and INVALID_ARGUMENT for
        a prompt of `prompt_len` tokens that leaves no room for `max_tokens` within the
        model's length. The fronts ask before they turn a prompt into Python objects: a 15 MB
        message of 3 million token ids made a 150 MiB tuple before this refused it, ten such
        calls at once held 1.5 GB (docs/reliability.md, "A fourteenth probe")."""
        self._check_open()
        if prompt_len + max_tokens > self.max_model_len:
            raise SchedulingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt of {prompt_len} tokens plus max_tokens {max_tokens} "
                f"exceeds the model's length {self.max_model_len} (the longest context every "
                "worker can hold and the stages serve)",
            )

    def _check_open(self) -> None:
        """Raises UNAVAILABLE unless a request arriving now could be admitted."""
        if self.is_stopping:
            raise SchedulingError(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        if not self.can_place:
            joined = len(self.pool.healthy())
            if self.policy is None and joined:
                raise SchedulingError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"waiting for min_workers = {self.config.min_workers} workers before the "
                    f"first plan ({joined} joined)",
                )
            raise SchedulingError(
                grpc.StatusCode.UNAVAILABLE,
                "no worker is serving (none joined yet, or all are gone or draining)",
            )

    def _forget(self, rec: ClientRequest) -> None:
        if self.policy is not None:
            # Its retries' bookkeeping, were it refused while queued (a no-op otherwise).
            self.policy.request_withdrawn(rec.core_id)
        self.requests.pop(rec.request_id, None)
        self._queue.discard(rec.request_id)
        if self._by_client.get((rec.owner, rec.client_id)) is rec:
            del self._by_client[(rec.owner, rec.client_id)]
        self._by_core.pop(rec.core_id, None)

    async def _try_place(self, rec: ClientRequest) -> bool:
        """Asks the core for an instance and starts the request there; False when none has room."""
        assert self.policy is not None
        started = time.perf_counter()
        try:
            decision = self.policy.admit(
                rec.core_id, rec.context_len, time.monotonic(), rec.session_id
            )
        except ValueError as e:
            raise SchedulingError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        finally:
            self.metrics.admit_seconds.observe(time.perf_counter() - started)
        if decision is None:
            return False
        link = self.pool.by_instance[decision[0]]
        if not link.is_healthy:
            # The last worker, gone or leaving, that the core kept: a worker restarted on its
            # address would take the request there unfollowed, and its copy would then refuse
            # the real placement ("request id in use").
            self.policy.request_finished(rec.core_id, link.instance)
            return False
        request = worker_pb2.GenerateRequest(
            request_id=rec.request_id,
            prompt_token_ids=list(rec.prompt_token_ids),
            sampling=sampling_to_proto(rec.sampling),
            output_token_ids=rec.tokens,
            detach=True,
        )
        rec.worker_id = link.worker_id
        rec.holders.add(link.worker_id)
        link.running.add(rec.request_id)
        rec.is_placing = True
        try:
            await link.client.start_detached(request, self.config.worker_call_timeout_s)
        except WorkerCallError as e:
            self._unplace(rec, link)
            if e.code == grpc.StatusCode.ALREADY_EXISTS and rec.admitted_at is not None:
                # A resume where a copy of it runs already, unfollowed: the target of a move
                # whose source died before answering had taken it. The request was ended
                # (ABORT) with that worker healthy; the copy goes, and it is placed again.
                log.warning("stale_copy_aborted", request_id=rec.request_id, worker=link.worker_id)
                await self._abort_on(link, rec.request_id)
                return False
            if e.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS):
                raise SchedulingError(e.code, e.details) from None
            if e.code == grpc.StatusCode.INTERNAL:
                rec.num_start_errors += 1
                if rec.num_start_errors >= MAX_START_ERRORS:
                    raise SchedulingError(
                        grpc.StatusCode.INTERNAL,
                        f"the worker failed to start the request {rec.num_start_errors} times",
                    ) from None
            return False
        except asyncio.CancelledError:
            # The caller left mid-placement (a gRPC client that cancelled, or whose deadline
            # passed): nobody will read the request, so it ends here, and its placement with
            # it (the client tells the worker, `start_detached`).
            self._end(rec, FinishReason.ABORT)
            raise
        finally:
            rec.is_placing = False
        if rec.is_cut_off:
            # The scheduler began to stop while the worker took it: nobody will read it, and
            # the abort `cut_off` sent may have come before the request.
            await self.abort_all([(link, rec.request_id)])
            return True
        if rec.is_done:
            # Ended while the worker took it (its client aborted or left): the abort sent then
            # may have come before the request, which would run on, unread, to its max_tokens.
            # In a task of its own: the queue's drain waits on this placement.
            self._spawn(self._abort_on(link, rec.request_id))
            return True
        if link.is_gone:
            # Its feed ended while the request was being placed: nobody follows it there (the
            # copy there is a ghost, aborted if the worker comes back or by its orphan bound).
            self._unplace(rec, link)
            return False
        if rec.admitted_at is None:
            rec.admitted_at = time.monotonic()
            rec.entry_stage = decision[1]
        return True

    def _unplace(self, rec: ClientRequest, link: WorkerLink) -> None:
        """Undoes a placement on `link` that did not take."""
        link.running.discard(rec.request_id)
        rec.holders.discard(link.worker_id)
        rec.worker_id = None
        assert self.policy is not None
        self.policy.request_finished(rec.core_id, link.instance)

    async def _place(self, rec: ClientRequest) -> None:
        """Places a request that is already accepted: now, or at the head of the queue."""
        try:
            if await self._try_place(rec):
                return
        except SchedulingError as e:
            log.error("resume_refused", request_id=rec.request_id, error=e.message)
            self._end(rec, FinishReason.ABORT)
            return
        self._queue.resume(rec.request_id, rec.owner)

    def _drain_queue(self) -> None:
        if self._queue:
            self._spawn(self._drain_queue_async())

    async def _drain_queue_async(self) -> None:
        while (rid := self._queue.pop()) is not None:
            rec = self.requests.get(rid)
            if rec is None or rec.is_done:
                continue
            try:
                placed = await self._try_place(rec)
            except SchedulingError as e:
                log.error("queued_request_refused", request_id=rid, error=e.message)
                self._end(rec, FinishReason.ABORT)
                continue
            if not placed:
                self._queue.requeue(rid, rec.owner, rec.priority)
                return

    async def abort(self, request_id: str, owner: str | None = None) -> None:
        """Ends the request on behalf of `owner` (None: the scheduler itself). A request
        another owner started is not found, as if it did not exist: ids are the clients' to
        choose, so one client must not end or probe another's."""
        _refuse_long_request_id(request_id)  # never an id in use; not echoed whole
        if owner is None:
            rec = self.requests.get(request_id)
        else:
            rec = self._by_client.get((owner, request_id))
        if rec is None:
            raise SchedulingError(grpc.StatusCode.NOT_FOUND, f"no request {request_id!r}")
        link = self.pool.by_id.get(rec.worker_id or "")
        rec.is_aborted_by_client = owner is not None
        self._end(rec, FinishReason.ABORT)
        if link is not None and link.is_healthy:
            # The scheduler's id for it: a client's id can be another owner's request there.
            await self._abort_on(link, rec.request_id)

    def abandon(self, request_id: str) -> None:
        """Ends a request whose client left, and aborts it on its worker in a task of the
        coordinator's own. The client's handler is being torn down: gRPC and Starlette cancel
        what it awaits, and an abort awaited there was cut short while the request ran on,
        unread, to its max_tokens."""
        rec = self.requests.get(request_id)
        if rec is not None:
            self._end_and_abort_later(rec)

    def cut_off(self) -> list[tuple[WorkerLink, str]]:
        """The first step of a graceful stop: refuses new requests from now on (UNAVAILABLE)
        and ends every accepted one, placed or queued, so each client stream ends at once
        with UNAVAILABLE (HTTP: 503, or an error event mid-stream) rather than being cut when
        the servers stop. Returns where the ended requests may still run, for `abort_all`."""
        self.is_stopping = True
        placed = []
        accepted = list(self.requests.values())
        for rec in accepted:
            for worker_id in rec.holders:
                link = self.pool.by_id.get(worker_id)
                if link is not None and not link.is_gone:
                    placed.append((link, rec.request_id))
            rec.note_ended_by_scheduler(is_cut_off=True)
            self._end(rec, FinishReason.ABORT)
        self._queue.clear()
        if accepted:
            log.info("requests_cut_off", requests=len(accepted), placed=len(placed))
        return placed

    async def abort_all(self, placed: list[tuple[WorkerLink, str]]) -> None:
        """Aborts requests on their workers, all at once, each call bounded by
        SHUTDOWN_ABORT_TIMEOUT_S; never raises (a worker that does not answer is logged once
        and left to its orphan bound)."""
        timeout = min(self.config.worker_call_timeout_s, SHUTDOWN_ABORT_TIMEOUT_S)

        async def one(link: WorkerLink, request_id: str) -> WorkerCallError | None:
            try:
                await link.client.abort(request_id, timeout)
            except WorkerCallError as e:
                if e.code != grpc.StatusCode.NOT_FOUND:  # NOT_FOUND: it ended there already
                    return e
            return None

        errors = await asyncio.gather(*(one(link, rid) for link, rid in placed))
        failed: dict[str, tuple[int, WorkerCallError]] = {}
        for (link, _), e in zip(placed, errors, strict=True):
            if e is not None:
                count, _ = failed.get(link.worker_id, (0, e))
                failed[link.worker_id] = (count + 1, e)
        for worker_id, (count, e) in failed.items():
            log.warning(
                "abort_on_worker_failed", worker_id=worker_id, requests=count, error=e.details
            )

    async def _abort_on(self, link: WorkerLink, request_id: str) -> None:
        try:
            await link.client.abort(request_id, self.config.worker_call_timeout_s)
        except WorkerCallError as e:
            log.info("abort_on_worker_failed", request_id=request_id, error=e.details)

    @property
    def can_place(self) -> bool:
        """Whether a request arriving now could be admitted (health reports this)."""
        return self.policy is not None and bool(self.pool.healthy())

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Runs `coro` beside the RPCs, named after its function; a failure is logged and
        counted (`report_failure`), not dropped with the task."""
        name = getattr(coro, "__name__", "background")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        report_failure(task, self.metrics.background_failures)

    async def close(self) -> None:
        self._is_closing = True
        for task in list(self._tasks):
            task.cancel()
        await self.pool.close()


def _refuse_long_request_id(request_id: str) -> None:
    """INVALID_ARGUMENT for an id over MAX_REQUEST_ID_CHARS, which names the limit, not the id."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise SchedulingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"request_id is longer than {MAX_REQUEST_ID_CHARS} characters",
        )
