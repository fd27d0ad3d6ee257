"""cascade-scheduler: the gRPC server (SchedulerService, WorkerRegistry, health, reflection)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cascadeinfer.daemon import (
    GRPC_MESSAGE_LIMIT,
    SERVER_OPTIONS,
    STOP_SIGNALS,
    FatalError,
    StrictDecoding,
    connection_limit_options,
    raise_descriptor_limit,
    run_daemon,
)
from cascadeinfer.health_port import HealthService, health_server
from cascadeinfer.metrics_http import serve_metrics
from cascadeinfer.proto.v1 import registry_pb2, registry_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from cascadeinfer.scheduler.config import SchedulerConfig, parse_args
from cascadeinfer.scheduler.coordinator import Coordinator
from cascadeinfer.scheduler.openai.server import STOP_GRACE_S, HttpFront, start_http_front
from cascadeinfer.scheduler.servicer import RegistryServicer, SchedulerServicer
from cascadeinfer.scheduler.tasks import watch_essential
from cascadeinfer.scheduler.worker_client import WorkerCallError
from cascadeinfer.scheduler.workers import WorkerIdInUse, WorkerUnreachable
from cascadeinfer.security import BearerTokenInterceptor, add_port

SCHEDULER = scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name
REGISTRY = registry_pb2.DESCRIPTOR.services_by_name["WorkerRegistry"].full_name
CLIENT_METHODS = tuple(f"/{SCHEDULER}/{m}" for m in ("Generate", "Abort"))
"""What a client token opens (`SchedulerConfig.client_tokens`); the rest (worker registration,
cluster state) takes the cluster's token."""
log = structlog.get_logger("cascade-scheduler")
HEALTH_INTERVAL_S = 0.2


WAITING_LOG_S = 30.0
"""While --workers are missing, how often the scheduler says which and why."""


async def connect_static_workers(coordinator: Coordinator, addresses: tuple[str, ...]) -> None:
    """Connects the --workers list, retrying those not up yet; every WAITING_LOG_S it says which
    it still waits for (the scheduler serves nothing until they are all there), so a wrong
    address or token does not look like a slow start."""
    pending = list(addresses)
    refused: set[str] = set()
    in_use: set[str] = set()
    not_workers: set[str] = set()  # answers gRPC without WorkerService: itself, a scheduler
    why: dict[str, str] = {}  # the last error of an address still missing
    said_at = time.monotonic()
    while pending:
        for address in list(pending):
            try:
                await coordinator.add_worker(address)
                pending.remove(address)
                refused.discard(address)
                in_use.discard(address)
                not_workers.discard(address)
                why.pop(address, None)
            except WorkerIdInUse as e:
                if address not in in_use:
                    in_use.add(address)  # retried: the other may leave
                    log.error("worker_id_in_use", address=address, error=str(e))
            except WorkerUnreachable as e:
                why[address] = str(e)  # retried like a worker not up yet
            except WorkerCallError as e:
                why[address] = e.details
                if e.code == grpc.StatusCode.UNAUTHENTICATED and address not in refused:
                    refused.add(address)  # retried like a worker not up yet
                    log.error("worker_refused_token", address=address, error=e.details)
                elif e.code == grpc.StatusCode.UNIMPLEMENTED and address not in not_workers:
                    not_workers.add(address)  # retried: a worker may take the port later
                    log.error("worker_address_not_a_worker", address=address, error=e.details)
        if pending and time.monotonic() - said_at >= WAITING_LOG_S:
            said_at = time.monotonic()
            unreachable = [a for a in pending if a not in refused | in_use | not_workers]
            log.warning(
                "waiting_for_workers",
                unreachable=unreachable,
                refused_token=sorted(refused),
                worker_id_in_use=sorted(in_use),
                not_a_worker=sorted(not_workers),
                errors={a: why[a] for a in unreachable if a in why},
            )
        if pending:
            await asyncio.sleep(0.5)


STATIC_RETRY_S = 1.0
"""How often a --workers worker that is gone is tried again."""


async def keep_static_workers(coordinator: Coordinator, addresses: tuple[str, ...]) -> None:
    """Adds back a --workers worker whose step feed ended (killed and restarted, or cut off
    past the link timeout) as soon as it answers again: unlike a worker started with
    `--scheduler`, it sends no heartbeat to come back by, and was left out of the plan for good
    (a restarted worker on the same address got no request again). A worker still draining is
    not taken back (`Coordinator.add_worker` refuses it)."""
    while True:
        await asyncio.sleep(STATIC_RETRY_S)
        for address in addresses:
            links = [w for w in coordinator.pool.by_id.values() if w.address == address]
            if links and not all(w.is_gone for w in links):
                continue
            try:
                link = await coordinator.add_worker(address)
            except (WorkerUnreachable, WorkerCallError):
                continue  # still down; tried again next round
            log.info("static_worker_back", worker_id=link.worker_id, address=address)


async def report_health(servicer: HealthService, coordinator: Coordinator) -> None:
    """SERVING exactly while a request could be placed (enough workers known and healthy)."""
    last = None
    while True:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if coordinator.can_place
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        if status != last:
            servicer.set(status)
            log.info("health", serving=status == health_pb2.HealthCheckResponse.SERVING)
            last = status
        await asyncio.sleep(HEALTH_INTERVAL_S)


CLIENT_MESSAGE_LIMIT = 16 << 20
"""What one message to the scheduler may weigh, unless a larger max_prompt_bytes needs more:
its largest messages are text prompts (16 bytes per token of context by default, 2 MiB at
128K tokens); the workers' 64 MiB limit is for KV transfers, which never pass through here. A
client's oversized message is refused (RESOURCE_EXHAUSTED) before it is buffered whole."""


def server_options(config: SchedulerConfig, descriptor_limit: int) -> list[tuple[str, int]]:
    limit = max(CLIENT_MESSAGE_LIMIT, config.max_prompt_bytes + (1 << 20))
    return [
        ("grpc.max_send_message_length", GRPC_MESSAGE_LIMIT),
        ("grpc.max_receive_message_length", limit),
        *SERVER_OPTIONS,
        *connection_limit_options(descriptor_limit),
    ]


async def serve(config: SchedulerConfig) -> None:
    # From the start, so a scheduler stopped while it waits for its workers shuts down as one
    # stopped later does (asyncio's own SIGINT handling ends in tracebacks; SIGTERM's default
    # kills it).
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    descriptor_limit = raise_descriptor_limit()  # every client connection holds a descriptor
    coordinator = Coordinator(config)
    interceptors: list[grpc.aio.ServerInterceptor] = (
        [BearerTokenInterceptor(config.auth_token, config.client_api_tokens, CLIENT_METHODS)]
        if config.auth_token or config.client_tokens
        else []
    )
    interceptors.append(StrictDecoding())  # after the token check: strangers get no parsing
    server = grpc.aio.server(
        options=server_options(config, descriptor_limit), interceptors=interceptors
    )
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(
        SchedulerServicer(coordinator), server
    )
    registry_pb2_grpc.add_WorkerRegistryServicer_to_server(RegistryServicer(coordinator), server)
    health_servicer = HealthService(SCHEDULER)  # NOT_SERVING until `report_health` says
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SCHEDULER, REGISTRY, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = add_port(server, f"{config.host}:{config.port}", config.tls)
    servers = [server]
    if config.health_port:
        servers.append(health_server(config.host, config.health_port, health_servicer))
    if config.metrics_port:
        serve_metrics(config.host, config.metrics_port, coordinator.metrics.registry)
    for s in servers:
        await s.start()
    try:
        http = await start_http_front(config, coordinator) if config.http_port is not None else None
    except ValueError:
        # A port in use: stop the gRPC servers before the loop closes under them.
        await asyncio.gather(*(s.stop(None) for s in servers))
        raise
    structlog.contextvars.bind_contextvars(scheduler=f"{config.host}:{port}")
    failures = coordinator.metrics.background_failures
    health_task = asyncio.create_task(
        report_health(health_servicer, coordinator), name="report_health"
    )
    watch_essential(health_task, failures, stop)
    essential = [health_task]
    if await _unless_stopped(connect_static_workers(coordinator, config.workers), stop):
        tick = asyncio.create_task(coordinator.tick_forever(), name="tick_forever")
        watch_essential(tick, failures, stop)
        essential.append(tick)
        if config.workers:
            keep = asyncio.create_task(
                keep_static_workers(coordinator, config.workers), name="keep_static_workers"
            )
            watch_essential(keep, failures, stop)
            essential.append(keep)
        await coordinator.now_serving()  # outranks, on a worker, a scheduler still linking
        _announce(config, port, http)
        await stop.wait()
    await _shut_down(health_servicer, essential, http, servers, coordinator)
    for task in essential:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise FatalError(f"{task.get_name()} failed: {task.exception()!r}")


def _announce(config: SchedulerConfig, port: int, http: HttpFront | None) -> None:
    """The lines the launcher and operators read once the scheduler serves."""
    if http is not None:
        models = ",".join(http.model_names()) or "-"
        print(f"cascade-scheduler openai api on {http.url} models={models}", flush=True)
    print(f"cascade-scheduler serving on {config.host}:{port} policy={config.policy}", flush=True)
    log.info(
        "serving",
        port=port,
        policy=config.policy,
        workers=len(config.workers),
        tls=bool(config.tls.cert),
        mtls_to_workers=bool(config.tls.ca and config.tls.cert),
        auth=bool(config.auth_token),
        client_tokens=len(config.client_tokens),
        tokenizer=config.tokenizer or None,
        http=http.url if http is not None else None,
        health_port=config.health_port or None,
    )


async def _unless_stopped(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> bool:
    """Runs `work` to its end (True), unless `stop` is set first (False: `work` is cancelled)."""
    task = asyncio.create_task(work)
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return False
    task.result()
    return True


async def _shut_down(
    health_servicer: HealthService,
    tasks: list[asyncio.Task[None]],
    http: HttpFront | None,
    servers: list[grpc.aio.Server],
    coordinator: Coordinator,
) -> None:
    """In this order: new requests refused (HTTP 503, gRPC UNAVAILABLE) and every accepted one
    ended, so each open stream ends at once with a clear error (`Coordinator.cut_off`); the
    background tasks cancelled and NOT_SERVING; then at the same time the ended requests aborted
    on their workers (each call bounded) and the servers stopped (connections still open get
    STOP_GRACE_S to write their last answer); then the worker links closed."""
    placed = coordinator.cut_off()
    for task in tasks:
        task.cancel()
    health_servicer.set(health_pb2.HealthCheckResponse.NOT_SERVING)
    health_servicer.close()  # every Watch ends with that, not at the end of the grace
    stopping = [coordinator.abort_all(placed), *(s.stop(grace=STOP_GRACE_S) for s in servers)]
    if http is not None:
        stopping.append(http.stop())
    await asyncio.gather(*stopping)
    await coordinator.close()
    log.info("stopped")


def main(argv: list[str] | None = None) -> None:
    run_daemon("cascade-scheduler", parse_args, serve, argv)


if __name__ == "__main__":
    main()
