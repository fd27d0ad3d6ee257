"""The workers the scheduler knows: a client for each, dense instance ids for the core, health,
and the latest load each reported."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from cascadeinfer.daemon import keepalive_options
from cascadeinfer.proto.v1 import worker_pb2
from cascadeinfer.scheduler.worker_client import GrpcWorkerClient, WorkerCallError, WorkerClient
from cascadeinfer.security import TlsFiles


class WorkerUnreachable(Exception):
    """A worker answered its info call but its step feed did not come up."""


class WorkerIdMismatch(WorkerUnreachable):
    """A registration named a worker id that the worker at its address does not answer to
    (another spelling of a connected worker's address, under a made-up id, would have given
    that worker a second link whose feed reconciliation aborted what the first placed)."""


class WorkerIdInUse(WorkerUnreachable):
    """Another worker, still connected, has the same worker id (two workers started with one
    `--worker-id`, or the default host:port alike on two hosts). Ids key everything the
    scheduler knows of a worker, so the second is refused until the first is gone."""


class WorkerTooShort(WorkerUnreachable):
    """A worker that holds shorter requests than the model length the scheduler admits by (set
    when its first plan was made): placed there, a request the scheduler accepted was refused
    by the worker (a worker restarted with a smaller max_model_len or KV; every other request
    on round-robin got INVALID_ARGUMENT "leaves no room")."""


class WorkerServesAnotherModel(WorkerUnreachable):
    """A worker whose model is not the one the workers already serving serve. Requests and
    `/v1/models` name one model; placed on, such a worker answered requests for that model
    with another's output (and its name showed up as a second model in `/v1/models`)."""


class WorkerServesAnotherScheduler(WorkerUnreachable):
    """A worker that refused this scheduler's step feed because another scheduler's is open
    there (`worker/claim.py`): a scheduler aborts what it finds on a worker that it did not
    place, so two on one worker abort each other's requests. Tried again until the other lets
    the worker go."""


class WorkerLeaving(WorkerUnreachable):
    """A registration of a worker the scheduler is taking out (it drains, or deregistered) whose
    step feed has not ended yet: refused until it has, or until the worker answers that it is
    not draining (`Coordinator.add_worker` puts such a worker back)."""

    @classmethod
    def of(cls, address: str, worker_id: str) -> WorkerLeaving:
        """The refusal of a registration at `address` while worker `worker_id` leaves it (the
        pool's, and the coordinator's without a call once the feed said it drains)."""
        return cls(
            f"{address}: worker {worker_id!r} is leaving; it can join again once its step feed "
            "has ended"
        )


class WorkerNotDraining(Exception):
    """A DeregisterWorker for a worker that answers, at its registered address and as itself,
    that it is serving and not draining: the call is not the worker's own goodbye (a worker
    marks itself draining before it deregisters), so the worker keeps its place."""


@dataclass
class WorkerLink:
    worker_id: str
    address: str
    instance: int
    client: WorkerClient
    info: worker_pb2.WorkerInfo
    is_healthy: bool = True
    is_gone: bool = False
    """Its step feed ended: nothing it ran is running there any more."""
    has_left: bool = False
    """It drained or deregistered: it said goodbye, it did not fail."""
    replaced: WorkerLink | None = None
    """The gone link of the same worker id that this one took the place of, until the
    coordinator has retired it (its client closed, its instance dropped)."""
    last_step: worker_pb2.StepUpdate | None = None
    running: set[str] = field(default_factory=set)
    """Request ids the scheduler placed (or moved) here and that have not finished."""
    step_refusals_logged_at: float = float("-inf")
    """When a step of this worker's that the core refused was last logged (monotonic)."""
    step_refusals_unlogged: int = 0
    """Refused steps since then, counted but not logged."""

    @property
    def is_draining(self) -> bool:
        """Its step feed said it drains: the process there will not serve again."""
        return self.last_step is not None and self.last_step.is_draining


ClientFactory = Callable[[str], WorkerClient]
"""Makes the client for a worker's address (the daemon's: gRPC; tests': fakes)."""


def grpc_clients(
    tls: TlsFiles, token: str = "", link_timeout_s: float = 10.0, scheduler_id: str = ""
) -> ClientFactory:
    """gRPC clients with TLS when configured, the cluster's token, keepalive pings that notice
    a cut link within about `link_timeout_s`, and `scheduler_id` on every placement."""
    options = keepalive_options(link_timeout_s)
    return lambda address: GrpcWorkerClient.connect(address, tls, token, options, scheduler_id)


class WorkerPool:
    def __init__(self, clients: ClientFactory, call_timeout_s: float = 10.0) -> None:
        self._clients = clients
        self._call_timeout_s = call_timeout_s
        self.by_id: dict[str, WorkerLink] = {}
        self.by_instance: dict[int, WorkerLink] = {}
        self._next_instance = 0

    async def connect(self, address: str, worker_id: str = "") -> WorkerLink:
        """Opens a client and reads the worker's info; raises WorkerCallError when down, and
        WorkerIdInUse for a worker whose id a connected worker at another address has (it
        replaced that worker's entry: the scheduler never served, or added a new instance of
        it at every heartbeat, each with a step feed of its own that nobody closed)."""
        client = self._clients(address)
        try:
            info = await client.info(self._call_timeout_s)
        except WorkerCallError:
            await client.close()
            raise
        if worker_id and info.worker_id and worker_id != info.worker_id:
            await client.close()
            raise WorkerIdMismatch(
                f"{address[:256]} answers as worker {info.worker_id[:256]!r}, not "
                f"{worker_id[:256]!r}: a registration names the worker at its address"
            )
        worker_id = worker_id or info.worker_id or address
        held = self.by_id.get(worker_id)
        if held is not None and not held.is_gone:
            await client.close()
            if held.address == address:  # the same worker, draining or deregistered
                raise WorkerLeaving.of(address, worker_id)
            raise WorkerIdInUse(
                f"worker id {worker_id!r} of {address} is the id of the worker at "
                f"{held.address} already; give each worker its own --worker-id"
            )
        link = WorkerLink(worker_id, address, self._next_instance, client, info, replaced=held)
        self._next_instance += 1
        self.by_id[link.worker_id] = link
        self.by_instance[link.instance] = link
        return link

    async def drop(self, link: WorkerLink) -> None:
        """Forgets a link that never joined (its feed did not come up) and closes it."""
        if self.by_id.get(link.worker_id) is link:
            del self.by_id[link.worker_id]
        self.by_instance.pop(link.instance, None)
        await link.client.close()

    def forget_gone(self, max_failed_kept: int, keep: Collection[int]) -> list[WorkerLink]:
        """Forgets the workers whose feed ended and on which nothing runs: at once those that
        left, and the longest-known of those that failed past `max_failed_kept` (the rest stay
        listed as not healthy, for an operator to see). `keep`: instances the core still holds.
        Returns them, for their clients to be closed. Kept for good, every worker that ever
        joined stayed listed and counted unhealthy: with each restart of a pod a new one."""
        gone = [
            w for w in self.by_id.values() if w.is_gone and not w.running and w.instance not in keep
        ]
        failed = [w for w in gone if not w.has_left]
        forgotten = [w for w in gone if w.has_left]
        forgotten += failed[: max(0, len(failed) - max_failed_kept)]  # joined first, first out
        for w in forgotten:
            del self.by_id[w.worker_id]
            self.by_instance.pop(w.instance, None)
        return forgotten

    def healthy(self) -> list[WorkerLink]:
        return [w for w in self.by_id.values() if w.is_healthy]

    async def close(self) -> None:
        for link in self.by_id.values():
            await link.client.close()
