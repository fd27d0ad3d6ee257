"""Which repeats of a recurring log line to write: a refused worker retries every second, and
one line per try would fill the log."""

from __future__ import annotations

import math
from collections.abc import Hashable

MAX_KEYS = 1024
"""Keys remembered; past it all are forgotten (a few repeats logged again, memory bounded)."""


class LogThrottle:
    """Each key is logged at most once per `interval_s` (`math.inf`: once)."""

    def __init__(self, interval_s: float = math.inf, max_keys: int = MAX_KEYS) -> None:
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._last: dict[Hashable, float] = {}

    def should_log(self, key: Hashable, now: float) -> bool:
        """Whether to log `key` at `now` (monotonic seconds); a yes counts as logged."""
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            return False
        if len(self._last) >= self.max_keys:
            self._last.clear()
        self._last[key] = now
        return True
