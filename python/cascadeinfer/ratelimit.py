"""A token bucket: at most `rate` events a second on average, bursts of up to `burst`
(the scheduler's optional migrations, the daemons' metrics renders)."""

from __future__ import annotations


class TokenBucket:
    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self._tokens = self.burst
        self._at = now

    def try_take(self, now: float) -> bool:
        """Takes one token if there is one; `now` is the caller's monotonic clock."""
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
