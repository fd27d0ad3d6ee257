"""Calibration probe over the simulated engine.

The simulator's step time is its cost profile's prediction, so calibrating it must give that
profile back: the check that grid, measurement and fit work together. The probe runs the
simulator without sleeping and reads the time it would have slept (`SimEngine.last_step_cost`),
so the "measurements" are exact.
"""

from __future__ import annotations

import json

from cascadeinfer.calibrate.grid import Limits
from cascadeinfer.calibrate.measure import EngineFacts, Observation, Shape
from cascadeinfer.worker.engine import Engine
from cascadeinfer.worker.engines.sim_engine import SimEngine, SimEngineConfig


class SimProbe:
    def __init__(self, profile: str) -> None:
        self._profile_name = profile
        self._engine = SimEngine(SimEngineConfig(profile=profile, time_scale=0.0))

    @property
    def engine(self) -> Engine:
        return self._engine

    def facts(self) -> EngineFacts:
        doc = json.loads(self._engine.profile.to_json())
        limits = Limits(
            max_model_len=self._engine.max_model_len,
            max_num_seqs=self._engine.max_num_seqs,
            max_batch_tokens=self._engine.max_batch_tokens,
            kv_capacity_tokens=self._engine.num_blocks_total * self._engine.block_size,
            block_size=self._engine.block_size,
        )
        return EngineFacts(
            engine="sim",
            summary=f"simulated engine (cascadeinfer sim) with profile {self._profile_name!r}",
            limits=limits,
            kv_bytes_per_token=int(doc["kv_bytes_per_token"]),
            time_source="the simulator's modelled step time (no sleep, no wall clock)",
        )

    def step(self) -> Observation:
        report = self._engine.step()
        cost = self._engine.last_step_cost
        if cost is None:
            raise RuntimeError("the simulator reported no step cost")
        shape = Shape(
            cost.num_decode,
            cost.sum_context,
            cost.max_context,
            cost.prefill_tokens,
            cost.prefill_pairs,
        )
        started = frozenset(p.request_id for p in report.progress if p.first_index == 0)
        finished = frozenset(p.request_id for p in report.progress if p.finish_reason is not None)
        return Observation(shape, cost.step_time_s, started, finished)

    def close(self) -> None:
        self._engine.shutdown()
