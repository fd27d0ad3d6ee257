"""What one step feed has not sent yet: the engine steps since its last message, merged.

A feed's reader (a scheduler) may fall behind the engine; one message per engine step would
then queue up step after step, each costing the worker and the scheduler a message. Instead,
the steps a feed has not sent are merged: a request's tokens from consecutive steps join one
chunk, and the counters (step index, running, KV) are the latest step's. A feed that keeps up
still sends one message per step; one that falls behind gets fewer, larger messages.

The buffer is bounded by what runs on the engine: one entry per request (a second only when a
request's chunks are not contiguous, or it finished and came back, within one message), each
holding at most the tokens its request produced since the last message.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from cascadeinfer.worker.engine import FinishReason, RequestProgress, StepReport


@dataclass
class _Merged:
    request_id: str
    first_index: int
    token_ids: list[int]
    context_len: int
    finish_reason: FinishReason | None

    @property
    def next_index(self) -> int:
        return self.first_index + len(self.token_ids)


class FeedBuffer:
    """The unsent steps of one feed; `take` waits for them and hands them over merged."""

    def __init__(self) -> None:
        self._entries: list[_Merged] = []
        self._open: dict[str, _Merged] = {}
        """Each request's last entry, which a contiguous chunk of a later step extends."""
        self._last: StepReport | None = None
        self._is_ended = False
        self._ready = asyncio.Event()

    def add(self, report: StepReport) -> None:
        for p in report.progress:
            entry = self._open.get(p.request_id)
            if (
                entry is not None
                and entry.finish_reason is None
                and entry.next_index == p.first_index
            ):
                entry.token_ids.extend(p.new_token_ids)
                entry.context_len = p.context_len
                entry.finish_reason = p.finish_reason
            else:
                entry = _Merged(
                    p.request_id,
                    p.first_index,
                    list(p.new_token_ids),
                    p.context_len,
                    p.finish_reason,
                )
                self._entries.append(entry)
                self._open[p.request_id] = entry
        self._last = report
        self._ready.set()

    def announce(self) -> None:
        """The worker's state changed (it is draining): the next message goes out even empty."""
        self._ready.set()

    def end(self) -> None:
        self._is_ended = True
        self._ready.set()

    async def take(self) -> StepReport | None:
        """The merged steps (None when only an announcement is pending); raises EOFError once
        the feed is ended."""
        await self._ready.wait()
        if self._is_ended:
            raise EOFError
        self._ready.clear()
        last, entries = self._last, self._entries
        self._last, self._entries, self._open = None, [], {}
        if last is None:
            return None
        progress = tuple(
            RequestProgress(
                e.request_id, tuple(e.token_ids), e.first_index, e.context_len, e.finish_reason
            )
            for e in entries
        )
        return StepReport(
            step_index=last.step_index,
            step_time_s=last.step_time_s,
            progress=progress,
            num_running=last.num_running,
            num_waiting=last.num_waiting,
            kv_blocks_used=last.kv_blocks_used,
            kv_blocks_free=last.kv_blocks_free,
        )
