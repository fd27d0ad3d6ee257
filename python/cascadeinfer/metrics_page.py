"""A registry's Prometheus page for the scrape endpoints (the OpenAI front's `/metrics` and
`--metrics-port`), rendered afresh at a bounded rate and served from the last render past it.

A render formats every sample anew (`generate_latest`: about 2 ms for the scheduler's
registry), on the scheduler's event loop for the API port and under the GIL, beside that
loop, for the metrics port's threads; nothing bounded how often. 700 scrapes a second of the
API port's `/metrics`, which needs no token, doubled the completion p50 (29 to 56 ms;
docs/reliability.md, the seventh probe).

Past the bound a scrape gets the last page rendered, never a refusal: Prometheus does not
retry a failed scrape but records the target as down (`up` 0, and the alerts on it), so a
429 or a 503 (client_golang's `MaxRequestsInFlight`) would let any flood take the real
scraper's samples away too, while a page at most 1/RENDERS_PER_S old loses nothing at a
scrape interval of 10 to 60 s. Below the bound every scrape is fresh, so a person or a test
reading a counter right after an action sees it, as before (a plain cache of one page a
second would show them a stale one).
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import Collector

from cascadeinfer.ratelimit import TokenBucket

RENDERS_PER_S = 4.0
"""Fresh renders a second, sustained: a flood of scrapes costs at most this many (under 1% of
a core for the scheduler's registry) and gets pages at most 1/RENDERS_PER_S s old."""
RENDER_BURST = 8
"""Fresh renders allowed back to back after a quiet spell, so a few scrapers or people reading
at once all get fresh pages."""


def render(registry: Collector, *, is_openmetrics: bool) -> bytes:
    """The page in Prometheus's text format, or in OpenMetrics 1.0.0."""
    if is_openmetrics:
        page: bytes = generate_openmetrics(registry)  # type: ignore[no-untyped-call]
        return page
    return generate_latest(registry)


@dataclass
class _Page:
    body: bytes
    gzipped: bytes | None = None
    """Compressed on the first request for it (compressing costs a tenth of a render)."""


class MetricsPage:
    """`registry`'s page, rendered at most RENDER_BURST times back to back and RENDERS_PER_S
    times a second (a token bucket); a scrape past that gets the last render of its format.
    Thread-safe: the metrics port serves each connection on a thread of its own."""

    def __init__(
        self,
        registry: Collector,
        *,
        renders_per_s: float = RENDERS_PER_S,
        burst: int = RENDER_BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._clock = clock
        self._renders = TokenBucket(renders_per_s, burst, clock())
        self._pages: dict[bool, _Page] = {}
        self._lock = threading.Lock()

    def get(self, *, is_openmetrics: bool = False, is_gzipped: bool = False) -> bytes:
        """The page in the format asked for, fresh unless fresh renders are spent."""
        with self._lock:
            page = self._pages.get(is_openmetrics)
            if self._renders.try_take(self._clock()) or page is None:
                page = _Page(render(self._registry, is_openmetrics=is_openmetrics))
                self._pages[is_openmetrics] = page
            if not is_gzipped:
                return page.body
            if page.gzipped is None:
                page.gzipped = gzip.compress(page.body)
            return page.gzipped
