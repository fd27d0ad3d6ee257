"""cascade-worker: starts the engine and the gRPC server (WorkerService, health, reflection),
reports SERVING after warm-up, and drains on SIGTERM (a SIGTERM while the engine is still being
built ends the processes the build started, and the daemon)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cascadeinfer.daemon import (
    CHANNEL_OPTIONS,
    PING_TOLERANCE,
    SERVER_OPTIONS,
    STOP_SIGNALS,
    FatalError,
    StrictDecoding,
    connection_limit_options,
    keepalive_options,
    raise_descriptor_limit,
    run_daemon,
)
from cascadeinfer.health_port import HealthService, health_server
from cascadeinfer.metrics_http import serve_metrics
from cascadeinfer.proto.v1 import worker_pb2, worker_pb2_grpc
from cascadeinfer.security import BearerTokenInterceptor, add_port
from cascadeinfer.worker.config import WorkerConfig, parse_args
from cascadeinfer.worker.engine import (
    Engine,
    EngineError,
    EngineRequest,
    FinishReason,
    SamplingSpec,
    StepReport,
)
from cascadeinfer.worker.engine_loop import EngineDead, EngineLoop
from cascadeinfer.worker.engines.factory import build_engine
from cascadeinfer.worker.engines.parent_watch import end_helper_processes
from cascadeinfer.worker.hub import Hub
from cascadeinfer.worker.kv_stream import ImportBudget
from cascadeinfer.worker.metrics import WorkerMetrics
from cascadeinfer.worker.reaper import orphans, reap_forever
from cascadeinfer.worker.registration import Registration
from cascadeinfer.worker.servicer import WorkerServicer
from cascadeinfer.worker.state import WorkerState

SERVICE = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name
log = structlog.get_logger("cascade-worker")


async def warm_up(loop: EngineLoop) -> None:
    """One short request through the engine before reporting SERVING. Its prompt is id 1
    only: every vocabulary the engines accept holds it (the sim's can be as small as 2), where
    ids up to 4 ended a worker with a small sim vocabulary in a traceback at start."""
    request = EngineRequest("warmup", (1, 1, 1, 1), SamplingSpec(max_tokens=2, ignore_eos=True))
    await loop.call(lambda e: e.add_request(request))
    while await loop.call(lambda e: e.has_unfinished()):
        await asyncio.sleep(0.01)


def _abort(engine: Engine, request_id: str) -> None:
    engine.abort(request_id)


async def drain(state: WorkerState, timeout_s: float) -> None:
    """Waits for running requests to finish or be moved away (a scheduler that follows the
    step feed moves them once it sees the drain); aborts what is left at the deadline, with
    ABORT on its direct streams, then ends the step feeds so a scheduler resumes it elsewhere.

    Detached requests that no step feed follows are aborted at once rather than at the
    deadline: nobody reads their tokens and nobody will move them (their scheduler is gone,
    and one that links to a draining worker takes nothing from it). A worker stopped after
    its scheduler crashed ran them for its whole drain timeout (30 s by default), past a
    supervisor's usual stop grace."""
    deadline = time.monotonic() + timeout_s
    while state.hub.requests and time.monotonic() < deadline and not state.loop.died.done():
        hub = state.hub
        for rid in orphans(hub.requests, hub.unfollowed_since, time.monotonic(), 0.0):
            await _end_at_shutdown(state, rid, "no step feed follows it")
        if hub.requests:
            await asyncio.sleep(0.05)
    for rid in list(state.hub.requests):
        await _end_at_shutdown(state, rid, "the drain timed out")
    state.hub.close_feeds()


async def _end_at_shutdown(state: WorkerState, request_id: str, why: str) -> None:
    # EngineError: already gone (finished or mid-migration); EngineDead: nothing runs.
    with contextlib.suppress(EngineError, EngineDead):
        await state.loop.call(functools.partial(_abort, request_id=request_id))
    state.hub.end(request_id, FinishReason.ABORT)
    log.warning("aborted_at_shutdown", request_id=request_id, why=why)


async def abandon(state: WorkerState, error: BaseException) -> None:
    """The engine died (vLLM's engine core or model worker process is gone): nothing here can
    run a request again. Ends every request at once, as a drain's deadline does (ABORT on the
    direct streams; the step feeds end, so a scheduler resumes its requests elsewhere by
    recompute), and stops taking requests; the daemon then exits 1."""
    log.error(
        "engine_died", error=repr(error), requests_ended=len(state.hub.requests), exc_info=error
    )
    state.is_draining = True  # new requests: UNAVAILABLE
    for rid in list(state.hub.requests):
        state.hub.end(rid, FinishReason.ABORT)
    state.hub.close_feeds()


async def _shut_down_dead(engine: Engine) -> None:
    """Ends whatever of a dead engine's processes is left (they also end with this process)."""
    try:
        await asyncio.wait_for(asyncio.to_thread(engine.shutdown), 30)
    except Exception as e:
        log.warning("engine_shutdown_failed", error=repr(e))


async def _built_unless_stopped(engine_loop: EngineLoop, stop: asyncio.Event) -> Engine | None:
    """The engine once built, or None if `stop` is set first. A vLLM engine takes from seconds
    (the tiny model on CPU) to minutes (a large model on GPUs) to build; a daemon that ended on
    the signal meanwhile left the engine core it had spawned waiting five minutes for its
    start-up handshake (vLLM's HANDSHAKE_TIMEOUT_MINS), holding its memory."""
    building = asyncio.ensure_future(engine_loop.start())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({building, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if building.done():
        stopping.cancel()
        return building.result()
    # The build goes on in the engine thread (a daemon thread) until its processes are gone.
    building.cancel()
    return None


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background_task_failed", task=task.get_name(), error=repr(task.exception()))


async def serve(config: WorkerConfig) -> None:
    loop = asyncio.get_running_loop()
    hub = Hub()
    metrics = WorkerMetrics(config.engine)

    def on_step(report: StepReport) -> None:
        hub.publish(report)
        metrics.observe_step(report)

    # Every call needs the cluster's token, or under mTLS a client certificate (checked by TLS).
    needs_token = config.auth_token and not config.tls.require_client_cert
    interceptors: list[grpc.aio.ServerInterceptor] = (
        [BearerTokenInterceptor(config.auth_token)] if needs_token else []
    )
    interceptors.append(StrictDecoding())  # after the token check: strangers get no parsing
    descriptor_limit = raise_descriptor_limit()  # every connection held open holds one
    keepalive = keepalive_options(config.link_timeout_s)
    # Pings both ways: the scheduler's find a cut link, and ours drop the feed of a scheduler
    # cut off (which starts the orphan bound).
    server = grpc.aio.server(
        options=[
            *CHANNEL_OPTIONS,
            *keepalive,
            *PING_TOLERANCE,
            *SERVER_OPTIONS,
            *connection_limit_options(descriptor_limit),
        ],
        interceptors=interceptors,
    )
    # Bound before the engine is built: a port in use fails at once, not after a model load.
    port = add_port(server, f"{config.host}:{config.port}", config.tls)
    # The health port answers NOT_SERVING from the start, through the model's load.
    health_servicer = HealthService(SERVICE)
    probes = None
    try:
        if config.health_port:
            probes = health_server(config.host, config.health_port, health_servicer)
            await probes.start()
        if config.metrics_port:
            serve_metrics(config.host, config.metrics_port, metrics.registry)
        # From here a stop signal drains (once serving) or ends the engine being built.
        stop = asyncio.Event()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, stop.set)
        engine_loop = EngineLoop(lambda: build_engine(config), loop, on_step)
        engine = await _built_unless_stopped(engine_loop, stop)
        if engine is None:
            ended = await asyncio.to_thread(end_helper_processes)
            log.info("stopped_while_starting", helper_processes_ended=ended)
            return
        worker_id = config.worker_id or f"{config.host}:{port}"
        structlog.contextvars.bind_contextvars(worker_id=worker_id, engine=engine.name)
        state = WorkerState(
            worker_id,
            engine.name,
            engine_loop,
            hub,
            metrics,
            tls=config.tls,
            token=config.auth_token,
            link_options=keepalive,
            import_budget=ImportBudget(config.max_import_mib << 20),
        )
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(WorkerServicer(state), server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        await server.start()
        try:
            await warm_up(engine_loop)
        except EngineDead as e:
            # Nothing was served yet: no request to end, no scheduler told of this worker.
            log.error("engine_died", error=str(e), during="warm-up")
            await server.stop(grace=None)
            engine_loop.stop()
            await _shut_down_dead(engine)
            raise FatalError(f"the engine died during warm-up, before serving ({e})") from e
        health_servicer.set(health_pb2.HealthCheckResponse.SERVING)
        # The launcher and tests read this line to learn the port.
        print(f"cascade-worker serving on {config.host}:{port} engine={engine.name}", flush=True)
        log.info(
            "serving",
            port=port,
            health_port=config.health_port or None,
            model=engine.layout.model,
            max_model_len=engine.max_model_len,
        )
        registration = None
        if config.scheduler:
            address = config.advertise_address or f"{config.host}:{port}"
            registration = Registration(
                config.scheduler, worker_id, address, engine, config.tls, config.auth_token
            )
            registration.start()

        reaper = asyncio.create_task(reap_forever(state, config.orphan_timeout_s))
        reaper.add_done_callback(_report_crash)
        engine_loop.died.add_done_callback(lambda _: stop.set())
        await stop.wait()
        reaper.cancel()
        if engine_loop.died.done():
            await abandon(state, engine_loop.died.result())
        else:
            log.info("draining", running=len(hub.requests))
        state.is_draining = True  # no new requests from here on
        hub.announce()  # a scheduler on the step feed starts moving the requests away
        health_servicer.set(health_pb2.HealthCheckResponse.NOT_SERVING)
        if registration is not None:
            await registration.stop()
        await drain(state, config.drain_timeout_s)
        # The streams a caller holds open for what comes next (step feeds, a scheduler's
        # StartDetached) ended with the drain (`Hub.closed`); the grace is for calls still
        # answering. After an engine death nothing is left to finish.
        health_servicer.close()
        await server.stop(grace=1 if engine_loop.died.done() else 5)
        await state.close()
        engine_loop.stop()
        if engine_loop.died.done():
            await _shut_down_dead(engine)
            raise FatalError(f"the engine died ({engine_loop.died.result()!r}); see engine_died")
        # Off the event loop: the multiprocess vLLM engine runs its own asyncio loop to shut down,
        # which cannot run on a thread that runs another (it raised, and the daemon exited 1).
        await asyncio.to_thread(engine.shutdown)
        log.info("stopped")
    finally:
        if probes is not None:
            await probes.stop(grace=None)


def main(argv: list[str] | None = None) -> None:
    run_daemon("cascade-worker", parse_args, serve, argv)


if __name__ == "__main__":
    main()
