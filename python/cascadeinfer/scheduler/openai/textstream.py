"""A request's output as text: spliced token deliveries in, text pieces out.

Tokens become text incrementally (`Detokenizer`, which never hands out half a UTF-8
character), and the front watches the text for the client's stop strings itself, as vLLM's
front end does: the worker only knows token ids. Text that could be the start of a stop string
is held back until it is clear it is not one, so a client never sees any part of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

from cascadeinfer.scheduler.text import Detokenizer


@dataclass(frozen=True)
class Piece:
    text: str
    is_stopped: bool = False
    """A stop string matched: `text` ends just before it and the request is over."""


class StopWatch:
    """Finds the first stop string in a text that arrives in pieces."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._pending = ""

    def feed(self, text: str, *, is_last: bool) -> Piece:
        buf = self._pending + text
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._pending = ""
            return Piece(buf[: min(hits)], is_stopped=True)
        if is_last or self._hold == 0:
            self._pending = ""
            return Piece(buf)
        cut = max(len(buf) - self._hold, 0)
        self._pending = buf[cut:]
        return Piece(buf[:cut])


class TextStream:
    """Output tokens of one request, turned into text pieces as they arrive."""

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...]) -> None:
        self._detokenizer = Detokenizer(tokenizer)
        self._stops = StopWatch(stops)
        self.token_ids: list[int] = []

    def feed(self, token_ids: Sequence[int], *, is_last: bool) -> Piece:
        self.token_ids.extend(token_ids)
        text = self._detokenizer.delta(self.token_ids, is_last=is_last)
        return self._stops.feed(text, is_last=is_last)
