"""The Prometheus page both scrape endpoints serve: fresh below its render rate, the last
render past it, so a flood of scrapes costs a bounded number of renders."""

from __future__ import annotations

from collections.abc import Iterator

from cascadeinfer.metrics_page import RENDER_BURST, RENDERS_PER_S, MetricsPage
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics_core import Metric


class CountingRegistry(CollectorRegistry):
    """Counts its collections: each render of a page collects once."""

    num_collects = 0

    def collect(self) -> Iterator[Metric]:
        self.num_collects += 1
        yield from super().collect()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_flood_of_scrapes_costs_a_bounded_number_of_renders_and_pages_stay_current() -> None:
    registry = CountingRegistry()
    counter = Counter("probe", "a counter", registry=registry)
    clock = Clock()
    page = MetricsPage(registry, clock=clock)

    # A few scrapes after a quiet spell are all fresh: each sees the count as it is.
    for k in range(3):
        counter.inc()
        assert f"probe_total {k + 1}.0".encode() in page.get()
    # A flood within one instant: RENDER_BURST renders in all, then the last page.
    for _ in range(1000):
        page.get()
        page.get(is_gzipped=True)
    assert registry.num_collects == RENDER_BURST
    counter.inc()
    assert b"probe_total 3.0" in page.get(), "past the burst, the last render is served"
    # Then RENDERS_PER_S renders a second, however many scrapes come.
    for _ in range(8):
        clock.now += 0.125  # exact in binary: eight make one second
        for _ in range(100):
            page.get()
    assert registry.num_collects == RENDER_BURST + RENDERS_PER_S
    # The page follows the registry once a render is due.
    clock.now += 1 / RENDERS_PER_S
    assert b"probe_total 4.0" in page.get()
    # Each format is a page of its own; OpenMetrics ends with its EOF marker.
    assert page.get(is_openmetrics=True).endswith(b"# EOF\n")
