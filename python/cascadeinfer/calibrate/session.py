"""One calibration run: build the probe, measure the grid, fit, and make the profile."""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cascadeinfer import _core
from cascadeinfer.calibrate.fit import FitResult, fit
from cascadeinfer.calibrate.grid import Grid, build_grid
from cascadeinfer.calibrate.measure import (
    EngineFacts,
    Measurement,
    Probe,
    Repeats,
    measure_grid,
)
from cascadeinfer.calibrate.profile import Provenance, profile_doc

FULL_REPEATS = Repeats(num_warmup=3, num_timed=15, num_rounds=3)
QUICK_REPEATS = Repeats(num_warmup=1, num_timed=5)


def make_probe(
    engine: str, *, model: str = "", options: Mapping[str, Any] | None = None, sim_profile: str
) -> Probe:
    """`engine` 'vllm' (model directory or id, '' for the built-in tiny Llama; `options` are
    VllmEngineConfig fields) or 'sim' (stepping on `sim_profile`)."""
    if engine == "sim":
        from cascadeinfer.calibrate.sim_probe import SimProbe

        return SimProbe(sim_profile)
    if engine == "vllm":
        from cascadeinfer.calibrate.vllm_probe import VllmProbe

        return VllmProbe(model, options or {})
    raise ValueError(f"engine = {engine!r}: must be 'vllm' or 'sim'")


def load_average() -> str:
    """The first three fields of /proc/loadavg (1, 5, 15 minutes)."""
    path = Path("/proc/loadavg")
    if path.is_file():
        return " ".join(path.read_text().split()[:3])
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} CPUs"


@dataclass(frozen=True)
class Calibration:
    facts: EngineFacts
    grid: Grid
    measurements: list[Measurement]
    fit: FitResult
    profile: dict[str, Any]
    """The profile JSON object (cost.rs format)."""
    load_before: str
    load_after: str
    """/proc/loadavg around the measurements: other work on the machine inflates step times."""


def calibrate(
    probe: Probe,
    *,
    name: str,
    base: _core.CostProfile,
    base_name: str,
    command: str,
    quick: bool = False,
    seed: int = 0,
    on_point: Callable[[Measurement], None] | None = None,
) -> Calibration:
    """Measures `probe`'s engine over the grid for its limits and fits a profile."""
    facts = probe.facts()
    grid = build_grid(facts.limits, quick=quick)
    repeats = QUICK_REPEATS if quick else FULL_REPEATS
    load_before = load_average()
    measurements = measure_grid(
        probe, grid.decode, grid.prefill, repeats, seed=seed, on_point=on_point
    )
    load_after = load_average()
    result = fit(measurements)
    how = Provenance(
        command=command,
        date=datetime.date.today().isoformat(),
        machine=machine(),
        load_before=load_before,
        load_after=load_after,
        grid=f"{grid.describe()}; {repeats.num_rounds} round(s) in random order, each with "
        f"{repeats.num_warmup} warm-up and {repeats.num_timed} timed steps (prefills) per "
        f"point, seed {seed}",
        base_profile=base_name,
    )
    doc = profile_doc(name, result, facts, base, how)
    return Calibration(facts, grid, measurements, result, doc, load_before, load_after)
