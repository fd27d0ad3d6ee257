"""One client request as the scheduler tracks it, and the splicing of its tokens by index."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from cascadeinfer.domain import FinishReason, SamplingSpec
from cascadeinfer.scheduler.text import Detokenizer

MAX_SESSION_ID_CHARS = 256
"""Longest session key a client may give (gRPC `session_id`, HTTP `X-Session-Id` or `user`)."""


@dataclass(frozen=True)
class Delivery:
    """Tokens for the client, in order; `finish` set on the last one."""

    token_ids: tuple[int, ...]
    first_index: int
    finish: FinishReason | None = None


@dataclass
class ClientRequest:
    request_id: str
    core_id: int
    """The id the Rust core knows this request by."""
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingSpec
    priority: int = 0
    session_id: str | None = None
    """The conversation the request continues, as the client named it (policies that follow
    sessions place it where the conversation's KV is likely cached)."""
    arrived_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    worker_id: str | None = None
    holders: set[str] = field(default_factory=set)
    """Workers whose step feed may carry this request's tokens: the ones the scheduler placed it
    on or chose as its migration target. Any other worker's feed is ignored for it."""
    is_moving: bool = False
    """A move off a draining worker is in flight (its outcome decides where it runs)."""
    is_placing: bool = False
    """The Generate that places it is in flight (its outcome decides where it runs: a worker
    lost meanwhile must not also re-place it, or it would be placed twice)."""
    gone_from: str | None = None
    """A worker that said it no longer has this request while its feed still showed it."""
    entry_stage: int = 0
    """The stage the request was first admitted to (metrics are labelled by it)."""
    num_migrations: int = 0
    tokens: list[int] = field(default_factory=list)
    """Every output token delivered to the client, in order."""
    pending: dict[int, int] = field(default_factory=dict)
    """Tokens that arrived ahead of a gap (from a migration target's feed), by index."""
    finish: FinishReason | None = None
    finish_after: tuple[int, FinishReason] | None = None
    """A finish that arrived with output index N: it takes effect once N tokens are here."""
    out: asyncio.Queue[Delivery] = field(default_factory=asyncio.Queue)
    num_sent: int = 0
    """Tokens the client's front has taken (`next_delivery`); the rest wait in `out`."""
    is_overflowed: bool = False
    """Ended because the client fell too far behind (its stream ends RESOURCE_EXHAUSTED)."""
    detokenizer: Detokenizer | None = None
    """Set for text prompts: the client gets text along with token ids."""

    @property
    def context_len(self) -> int:
        return len(self.prompt_token_ids) + len(self.tokens)

    @property
    def is_done(self) -> bool:
        return self.finish is not None

    def deliver(
        self, first_index: int, token_ids: list[int] | tuple[int, ...], finish: FinishReason | None
    ) -> None:
        """Takes tokens from any worker's feed; passes on each index exactly once, in order."""
        if self.is_done:
            return
        for k, token in enumerate(token_ids):
            index = first_index + k
            if index >= len(self.tokens):
                self.pending[index] = token
        start = len(self.tokens)
        while len(self.tokens) in self.pending:
            self.tokens.append(self.pending.pop(len(self.tokens)))
        fresh = tuple(self.tokens[start:])
        if fresh and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if finish is not None:
            self.finish_after = (first_index + len(token_ids), finish)
        # A finish is final only once every token before it has arrived: a migration target
        # can finish the request before the source's last tokens reach the scheduler.
        if self.finish_after is not None and len(self.tokens) >= self.finish_after[0]:
            self.finish = self.finish_after[1]
            self.finished_at = time.monotonic()
        if fresh or self.finish is not None:
            self.out.put_nowait(Delivery(fresh, start, self.finish))

    async def next_delivery(self) -> Delivery:
        """The next delivery, merged with those already waiting: a client that reads slower
        than the engines produce gets fewer, larger messages instead of a growing backlog."""
        first = await self.out.get()
        if self.out.empty() or first.finish is not None:
            delivery = first
        else:
            tokens = list(first.token_ids)
            finish = None
            while not self.out.empty() and finish is None:
                more = self.out.get_nowait()
                tokens.extend(more.token_ids)
                finish = more.finish
            delivery = Delivery(tuple(tokens), first.first_index, finish)
        # What the client's front has taken: the coordinator bounds the rest.
        self.num_sent = delivery.first_index + len(delivery.token_ids)
        return delivery

    def end(self, reason: FinishReason) -> None:
        """Ends the request without more tokens (abort, failure)."""
        if not self.is_done:
            self.finish = reason
            self.finished_at = time.monotonic()
            self.out.put_nowait(Delivery((), len(self.tokens), reason))
