"""One client request as the scheduler tracks it, and the splicing of its tokens by index."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from cascadeinfer.domain import FinishReason, SamplingSpec
from cascadeinfer.scheduler.text import Detokenizer

STALLED_WRITE_S = 1.0
"""How long one write to a client may take before the tokens waiting behind it count against
max_stream_lag_tokens. Counting every unsent token would cut off clients that read: a worker's
feed can bring hundreds of tokens in one message, and a busy event loop resumes a stream a few
milliseconds after its write completed."""

MAX_SESSION_ID_CHARS = 256
"""Longest session key a client may give (gRPC `session_id`, HTTP `X-Session-Id` or `user`)."""


@dataclass(frozen=True)
class Delivery:
    """Tokens for the client, in order; `finish` set on the last one."""

    token_ids: list[int]
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
    owner: str = ""
    """Who may abort it: `security.credential_owner` of the credential it came with."""
    client_id: str = ""
    """The id its client gave (`request_id` when empty). Ids are the clients' to choose, so two
    owners may pick the same one: the second then runs under an id of the scheduler's own
    (`request_id`, what the workers see), and neither can tell the other's exists."""
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
    owed_by: tuple[str, int] | None = None
    """(worker, n) after a move off that worker: its feed still owes the client the first n
    output tokens (made there before the move; the target goes on from n)."""
    entry_stage: int = 0
    """The stage the request was first admitted to (metrics are labelled by it)."""
    num_migrations: int = 0
    num_start_errors: int = 0
    """Placements a worker answered INTERNAL (`coordinator.MAX_START_ERRORS` bounds them)."""
    tokens: list[int] = field(default_factory=list)
    """Every output token delivered to the client, in order."""
    pending: dict[int, int] = field(default_factory=dict)
    """Tokens that arrived ahead of a gap (from a migration target's feed), by index."""
    finish: FinishReason | None = None
    finish_after: tuple[int, FinishReason] | None = None
    """A finish that arrived with output index N: it takes effect once N tokens are here."""
    held_since: float | None = None
    """Since when delivered tokens or a finish have waited on a gap before them (None while
    nothing does). A migration's gap fills within moments; one that never fills is a
    worker's bug or lie, and `coordinator` ends the request after a bound instead of leaving
    its client waiting for ever."""
    num_sent: int = 0
    """Tokens the client's front has taken (`take_delivery`); the coordinator bounds the rest
    (`tokens[num_sent:]`) by max_stream_lag_tokens once the front stalls (`is_stalled`)."""
    is_finish_sent: bool = False
    front_busy_since: float | None = field(default_factory=time.monotonic)
    """Since when the client's front has been writing what it took last (from arrival until
    its first take); None while it waits for news, when whatever arrives goes out at once."""
    has_news: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when tokens or the finish arrived that the front has not taken. One flag, not a
    queue of deliveries: the front wakes once for whatever piled up, and takes it as one
    message (a client that reads slower than the engines produce gets fewer, larger ones)."""
    is_overflowed: bool = False
    """Ended because the client fell too far behind (its stream ends RESOURCE_EXHAUSTED)."""
    is_cut_off: bool = False
    """Ended because the scheduler is stopping (its stream ends UNAVAILABLE)."""
    writing_front: asyncio.Task[object] | None = None
    """The client's front while it is in a write to the client: `note_ended_by_scheduler`
    cancels that write. A client that stops reading holds a write for ever (HTTP/2 flow
    control), and its stream must still end once the scheduler ended its request."""
    is_aborted_by_client: bool = False
    """Ended by its client's own Abort call (HTTP: 499, which clients do not retry)."""
    detokenizer: Detokenizer | None = None
    """Set for text prompts: the client gets text along with token ids."""

    def __post_init__(self) -> None:
        self.client_id = self.client_id or self.request_id

    @property
    def context_len(self) -> int:
        return len(self.prompt_token_ids) + len(self.tokens)

    @property
    def is_done(self) -> bool:
        return self.finish is not None

    def deliver(
        self, first_index: int, token_ids: Sequence[int], finish: FinishReason | None
    ) -> int:
        """Takes tokens from any worker's feed; passes on each index exactly once, in order.
        Returns how many it dropped for lying past `max_tokens`.

        A worker's feed is trusted for the requests placed on it, but not past what they asked
        for: tokens at index `max_tokens` and beyond are dropped, and a finish beyond it counts
        at it. Before, a feed that sent tokens past a gap that never filled grew `pending`
        without bound (a scheduler at 2.1 GB after 8 s, one `generate` of 3,000 tokens), and
        one that sent more than asked handed them to the client (5,050 tokens for max_tokens
        50; docs/reliability.md, "A nineteenth probe")."""
        if self.finish is not None:
            return 0
        limit = self.sampling.max_tokens
        num_dropped = 0
        if first_index + len(token_ids) > limit:
            kept = max(0, limit - first_index)
            num_dropped = len(token_ids) - kept
            token_ids = token_ids[:kept]
        tokens = self.tokens
        start = len(tokens)
        if first_index == start and not self.pending:
            tokens.extend(token_ids)  # the usual case: the next tokens, from one feed
        else:
            for k, token in enumerate(token_ids):
                index = first_index + k
                if index >= start:
                    self.pending[index] = token
            while len(tokens) in self.pending:
                tokens.append(self.pending.pop(len(tokens)))
        is_fresh = len(tokens) > start
        if is_fresh and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if finish is not None:
            self.finish_after = (min(first_index + len(token_ids), limit), finish)
        # A finish is final only once every token before it has arrived: a migration target
        # can finish the request before the source's last tokens reach the scheduler.
        if self.finish_after is not None and len(tokens) >= self.finish_after[0]:
            self.finish = self.finish_after[1]
            self.finished_at = time.monotonic()
        if is_fresh or self.finish is not None:
            self.has_news.set()
        if self.finish is None and (self.pending or self.finish_after is not None):
            if self.held_since is None:
                self.held_since = time.monotonic()
        else:
            self.held_since = None
        return num_dropped

    @property
    def num_unsent(self) -> int:
        return len(self.tokens) - self.num_sent

    def is_stalled(self, now: float) -> bool:
        """Whether the client's front has been held up by one write for STALLED_WRITE_S: its
        reader stopped. (A reading client holds it up for a moment at most, and a burst that
        arrives while it waits goes out in one message.)"""
        return self.front_busy_since is not None and now - self.front_busy_since >= STALLED_WRITE_S

    def take_delivery(self) -> Delivery | None:
        """Every token the front has not taken, with the finish once the request is done;
        None when there is nothing new."""
        self.has_news.clear()
        if self.is_finish_sent or (self.num_sent == len(self.tokens) and self.finish is None):
            return None
        first = self.num_sent
        delivery = Delivery(self.tokens[first:], first, self.finish)
        self.num_sent = len(self.tokens)
        self.is_finish_sent = self.finish is not None
        return delivery

    async def next_delivery(self) -> Delivery:
        """The next delivery: waits until there is one."""
        while True:
            delivery = self.take_delivery()
            if delivery is not None:
                self.front_busy_since = time.monotonic()
                return delivery
            self.front_busy_since = None
            await self.has_news.wait()

    def note_ended_by_scheduler(
        self, *, is_overflowed: bool = False, is_cut_off: bool = False
    ) -> None:
        """Marks why the scheduler ends this request (its front reports it to the client)."""
        self.is_overflowed = self.is_overflowed or is_overflowed
        self.is_cut_off = self.is_cut_off or is_cut_off
        if self.writing_front is not None:
            self.writing_front.cancel()

    @property
    def is_ended_by_scheduler(self) -> bool:
        return self.is_overflowed or self.is_cut_off

    def end(self, reason: FinishReason) -> None:
        """Ends the request without more tokens (abort, failure)."""
        if not self.is_done:
            self.finish = reason
            self.finished_at = time.monotonic()
            self.has_news.set()
