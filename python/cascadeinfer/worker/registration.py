"""Announces the worker to a scheduler (`--scheduler ADDR`): once SERVING, then as a heartbeat,
and a goodbye on drain. A scheduler that is down or restarting is retried, never fatal: the
worker keeps serving whoever calls it, and re-registers when the scheduler is back."""

from __future__ import annotations

import asyncio

import grpc
import structlog

from cascadeinfer.proto.v1 import registry_pb2, registry_pb2_grpc
from cascadeinfer.security import TlsFiles, aio_channel, token_metadata
from cascadeinfer.worker import convert
from cascadeinfer.worker.engine import Engine

log = structlog.get_logger(__name__)

RETRY_S = 1.0


class Registration:
    def __init__(
        self,
        scheduler: str,
        worker_id: str,
        address: str,
        engine: Engine,
        tls: TlsFiles,
        token: str,
    ) -> None:
        self._channel = aio_channel(scheduler, tls)
        self._metadata = token_metadata(token)
        self._stub = registry_pb2_grpc.WorkerRegistryStub(self._channel)
        self._scheduler = scheduler
        self._request = registry_pb2.RegisterWorkerRequest(
            worker_id=worker_id,
            address=address,
            engine=engine.name,
            model=engine.layout.model,
            max_model_len=engine.max_model_len,
            layout=convert.layout_to_proto(engine.layout),
            kv_blocks_total=engine.num_blocks_total,
        )
        self._task: asyncio.Task[None] | None = None
        self._was_registered = False
        """Whether the scheduler ever took this worker: one it refused (its id in use by
        another worker) must not deregister, which would take that other worker out."""

    def start(self) -> None:
        self._task = asyncio.create_task(self._heartbeat())

    async def _heartbeat(self) -> None:
        is_registered = False
        # The failure last logged since the scheduler last took this worker: each is said
        # once, so a worker that never registers still says why (it had said nothing while
        # the address was down or not a scheduler at all).
        said: grpc.StatusCode | None = None
        while True:
            try:
                response = await self._stub.RegisterWorker(
                    self._request, timeout=5, metadata=self._metadata
                )
                if not is_registered:
                    log.info("registered", scheduler=self._scheduler)
                is_registered = self._was_registered = True
                said = None
                await asyncio.sleep(max(response.heartbeat_interval_s, 0.1))
            except grpc.aio.AioRpcError as e:
                if e.code() != said:
                    said = e.code()
                    self._say_why(e)
                is_registered = False
                await asyncio.sleep(RETRY_S)

    def _say_why(self, e: grpc.aio.AioRpcError) -> None:
        code, scheduler = e.code(), self._scheduler
        if code == grpc.StatusCode.UNAUTHENTICATED:
            log.error("scheduler_refused_token", scheduler=scheduler)
        elif code == grpc.StatusCode.ALREADY_EXISTS:
            log.error("scheduler_refused_worker_id", scheduler=scheduler, error=e.details())
        elif code == grpc.StatusCode.FAILED_PRECONDITION:
            # Reachable, and it will not take this worker as it is (an id the worker does not
            # answer to, a length shorter than the scheduler admits): it was logged as
            # "scheduler_unreachable", a warning that sent operators after the network.
            log.error("scheduler_refused_worker", scheduler=scheduler, error=e.details())
        elif code == grpc.StatusCode.UNIMPLEMENTED:
            # a worker, or any other gRPC service: retrying is kept (it may be replaced)
            log.error("scheduler_address_not_a_scheduler", scheduler=scheduler)
        else:
            log.warning("scheduler_unreachable", scheduler=scheduler, error=e.details())

    async def stop(self) -> None:
        """Stops the heartbeat and tells the scheduler this worker is leaving."""
        if self._task is not None:
            self._task.cancel()
        if not self._was_registered:
            await self._channel.close()
            return
        try:
            await self._stub.DeregisterWorker(
                registry_pb2.DeregisterWorkerRequest(worker_id=self._request.worker_id),
                timeout=5,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as e:
            log.warning("deregister_failed", scheduler=self._scheduler, error=e.details())
        await self._channel.close()
