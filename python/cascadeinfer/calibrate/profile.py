"""Writes a fitted profile in the JSON format the core reads (cost.rs `CostProfile`), and checks
it by loading it back through the core."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cascadeinfer import _core
from cascadeinfer.calibrate.fit import FitResult
from cascadeinfer.calibrate.measure import EngineFacts
from cascadeinfer.planning import profile_from_json

BASE_FIELDS = ("migration_pause_s", "migration_bandwidth_bytes_per_s", "max_utilization")
"""Not measured by calibration: taken from the base profile."""


@dataclass(frozen=True)
class Provenance:
    """Where and how the numbers were measured, for the description."""

    command: str
    date: str
    machine: str
    load_before: str
    load_after: str
    grid: str
    base_profile: str


def profile_doc(
    name: str, fit: FitResult, facts: EngineFacts, base: _core.CostProfile, how: Provenance
) -> dict[str, Any]:
    """The profile as a JSON object, fields in cost.rs order."""
    base_doc = json.loads(base.to_json())
    c = fit.coefficients
    limits = facts.limits
    notes = "".join(f" Note: {n}." for n in fit.notes)
    description = (
        f"Calibrated {how.date} by `{how.command}` on {how.machine} (load average before "
        f"{how.load_before}, after {how.load_after}). Engine: {facts.summary}. Step time: "
        f"{facts.time_source}. Grid: {how.grid}; median of the timed steps per point. Fit: "
        f"relative least squares, every term >= 0, heterogeneity in [0, 1]; fit error over "
        f"{len(fit.points)} points: mean {fit.mean_abs_rel_error:.1%}, max "
        f"{fit.max_abs_rel_error:.1%}.{notes} Measured: the six timing terms. From the "
        f"engine's configuration: KV capacity, block size, bytes per token, max_num_seqs, "
        f"max_batch_tokens, max_model_len. From base profile {how.base_profile!r}, not "
        f"measured: {', '.join(BASE_FIELDS)}."
    )
    return {
        "name": name,
        "description": description,
        "step_overhead_s": c.step_overhead_s,
        "per_sequence_s": c.per_sequence_s,
        "per_context_token_s": c.per_context_token_s,
        "heterogeneity": c.heterogeneity,
        "per_prefill_token_s": c.per_prefill_token_s,
        "prefill_attention_s": c.prefill_attention_s,
        "kv_capacity_tokens": limits.kv_capacity_tokens,
        "kv_block_size": limits.block_size,
        "kv_bytes_per_token": facts.kv_bytes_per_token,
        "max_num_seqs": limits.max_num_seqs,
        "max_batch_tokens": limits.max_batch_tokens,
        "max_model_len": limits.max_model_len,
        **{f: base_doc[f] for f in BASE_FIELDS},
    }


def check_profile(text: str, fit: FitResult) -> _core.CostProfile:
    """Loads the profile through the core (deny_unknown_fields, domain checks) and checks that
    the core predicts what the fit reported for every point."""
    profile = profile_from_json(text)
    for p in fit.points:
        s = p.shape
        core = profile.step_time(
            s.num_decode, s.sum_context, s.max_context, s.prefill_tokens, s.prefill_pairs
        )
        if not math.isclose(core, p.predicted_s, rel_tol=1e-9):
            raise RuntimeError(
                f"{p.label}: the core predicts {core} s, the fit {p.predicted_s} s (format drift?)"
            )
    return profile


def write_profile(path: Path, doc: dict[str, Any], fit: FitResult) -> None:
    """Writes the profile after checking it; nothing is written when the check fails."""
    text = json.dumps(doc, indent=2) + "\n"
    check_profile(text, fit)
    path.write_text(text, encoding="utf-8")
