"""Fans engine step reports out to per-request output streams and to step-feed subscribers.

Lives on the asyncio loop. A request is tracked from admission (or import) until it finishes or
leaves; each Generate/Attach stream reads its own queue; each StreamSteps subscriber gets every
step report, merged with the others it has not sent yet (worker/feed.py). Nothing here blocks
the engine thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from cascadeinfer.worker.engine import FinishReason, RequestProgress, StepReport
from cascadeinfer.worker.feed import FeedBuffer


@dataclass(frozen=True)
class StreamEnd:
    """The last item of a request stream when the request ended without a final token."""

    reason: FinishReason
    context_len: int
    migrated_to: str = ""


StreamItem = RequestProgress | StreamEnd


@dataclass
class TrackedRequest:
    context_len: int
    num_output: int
    subscribers: list[asyncio.Queue[StreamItem]] = field(default_factory=list)
    started_at: float = field(default_factory=time.monotonic)

    @property
    def is_detached(self) -> bool:
        """No client streams its output directly: only step feeds follow it."""
        return not self.subscribers


class Hub:
    def __init__(self) -> None:
        self.requests: dict[str, TrackedRequest] = {}
        self._step_subscribers: list[FeedBuffer] = []
        self.closed = asyncio.Event()
        """Set once the drain is over (or the engine died): every stream a caller keeps open
        for what comes next ends then (the step feeds, the scheduler's StartDetached)."""
        self.last_report: StepReport | None = None
        self.unfollowed_since: float | None = time.monotonic()
        """Since when no step feed is open (None while one is): detached requests are leased
        to the feeds, and the orphan reaper reads this."""

    def track(self, request_id: str, context_len: int, num_output: int) -> None:
        self.requests[request_id] = TrackedRequest(context_len, num_output)

    def subscribe(self, request_id: str) -> asyncio.Queue[StreamItem]:
        queue: asyncio.Queue[StreamItem] = asyncio.Queue()
        self.requests[request_id].subscribers.append(queue)
        return queue

    def publish(self, report: StepReport) -> None:
        """Called on the loop for every engine step, in order."""
        self.last_report = report
        for p in report.progress:
            tracked = self.requests.get(p.request_id)
            if tracked is None:
                continue
            tracked.context_len = p.context_len
            tracked.num_output = p.first_index + len(p.new_token_ids)
            for q in tracked.subscribers:
                q.put_nowait(p)
            if p.finish_reason is not None:
                del self.requests[p.request_id]
        for feed in self._step_subscribers:
            feed.add(report)

    def end(
        self,
        request_id: str,
        reason: FinishReason,
        migrated_to: str = "",
        *,
        tell_feeds: bool = False,
    ) -> None:
        """Ends a request's streams without a token (abort, migration). `tell_feeds`: the step
        feeds report it finished with `reason` too, so a scheduler that placed it (and did not
        end it itself) ends its client's stream, or, for a move it did not ask for (an
        operator's MigrateOut or ExportKV), resumes it where it can follow it. Off where the
        scheduler resumes the request anyway: a drain or a dead engine."""
        tracked = self.requests.pop(request_id, None)
        if tracked is None:
            return
        for q in tracked.subscribers:
            q.put_nowait(StreamEnd(reason, tracked.context_len, migrated_to))
        if tell_feeds and self._step_subscribers:
            # The last step's counters, with this request's end as its only progress.
            ended = RequestProgress(request_id, (), tracked.num_output, tracked.context_len, reason)
            last = self.last_report or StepReport(0, 0.0, (), 0, 0, 0, 0)
            report = replace(last, progress=(ended,))
            for feed in self._step_subscribers:
                feed.add(report)

    def announce(self) -> None:
        """Wakes every step feed with `None`: the worker's state changed (it is draining)."""
        for feed in self._step_subscribers:
            feed.announce()

    def close_feeds(self) -> None:
        """Ends every step feed (the drain is over), and sets `closed`."""
        self.closed.set()
        for feed in self._step_subscribers:
            feed.end()

    async def steps(self) -> AsyncIterator[StepReport | None]:
        """The step reports in order, those that piled up while the reader was busy merged
        into one; `None` when `announce` was called and no step came since."""
        feed = FeedBuffer()
        self._step_subscribers.append(feed)
        self.unfollowed_since = None
        try:
            while not self.closed.is_set():
                try:
                    item = await feed.take()
                except EOFError:
                    return
                yield item
        finally:
            self._step_subscribers.remove(feed)
            if not self._step_subscribers:
                self.unfollowed_since = time.monotonic()

    def sum_context(self) -> int:
        return sum(t.context_len for t in self.requests.values())
