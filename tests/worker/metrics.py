"""A worker daemon's figures read from its Prometheus exporter (`--metrics-port`), for tests
and benchmarks that judge a live run by the worker's own counters."""

from __future__ import annotations

import re
import urllib.request


def metrics_text(port: int) -> str:
    """A worker's Prometheus exposition."""
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def step_counters(port: int) -> tuple[float, float]:
    """(seconds, steps) a worker has spent in engine steps, from its Prometheus exporter."""
    text = metrics_text(port)
    values = dict(
        re.findall(r"^cascade_worker_step_seconds_(sum|count)\{[^}]*\} (\S+)$", text, re.M)
    )
    return float(values["sum"]), float(values["count"])


def prompt_counters(port: int) -> tuple[float, float]:
    """(prompt tokens started, of them served by the prefix cache) of a worker so far."""
    text = metrics_text(port)
    values = dict(
        re.findall(r"^cascade_worker_prompt_tokens(|_cached)_total\{[^}]*\} (\S+)$", text, re.M)
    )
    return float(values[""]), float(values["_cached"])
