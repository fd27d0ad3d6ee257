"""`cascade calibrate` as a user runs it: the installed console script in a subprocess.

On the simulator the step time is a known profile's prediction, so calibration must give that
profile back; on vLLM for CPU the command must run end to end and write a profile the core loads.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cascadeinfer.calibrate.grid import HEADROOM_TOKENS, Limits, build_grid
from cascadeinfer.planning import load_profile

CASCADE = str(Path(sys.executable).parent / "cascade")
TIMING_TERMS = (
    "step_overhead_s",
    "per_sequence_s",
    "per_context_token_s",
    "heterogeneity",
    "per_prefill_token_s",
    "prefill_attention_s",
)


def cascade(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CASCADE, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def generating_profile(path: Path, heterogeneity: float) -> dict[str, Any]:
    """A profile whose terms all differ from the built-ins' (a fit that echoed a built-in, or
    mixed two terms up, would not match it)."""
    doc = {
        "name": "generator",
        "description": "test profile",
        "step_overhead_s": 0.0042,
        "per_sequence_s": 3.7e-5,
        "per_context_token_s": 7.3e-8,
        "heterogeneity": heterogeneity,
        "per_prefill_token_s": 6.1e-5,
        "prefill_attention_s": 2.3e-9,
        "kv_capacity_tokens": 200_000,
        "kv_block_size": 16,
        "kv_bytes_per_token": 65_536,
        "max_num_seqs": 128,
        "max_batch_tokens": 4096,
        "max_model_len": 16_384,
        "migration_pause_s": 0.02,
        "migration_bandwidth_bytes_per_s": 1.0e10,
        "max_utilization": 0.9,
    }
    path.write_text(json.dumps(doc))
    return doc


@pytest.mark.parametrize("heterogeneity", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("quick", [True, False])
def test_calibrating_the_simulator_recovers_its_profile(
    tmp_path: Path, heterogeneity: float, quick: bool
) -> None:
    generator = generating_profile(tmp_path / "generator.json", heterogeneity)
    out = tmp_path / "fitted.json"
    args = ["--engine", "sim", "--sim-profile", str(tmp_path / "generator.json")]
    result = cascade("calibrate", *args, "--out", str(out), "--json", *(["--quick"] * quick))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    fitted = json.loads(out.read_text())
    for term in TIMING_TERMS:
        assert fitted[term] == pytest.approx(generator[term], rel=1e-5, abs=1e-12), term
    assert report["fit"]["max_abs_rel_error"] < 1e-5
    assert report["profile"] == fitted
    # The engine's limits and the base profile's figures carry over; the core loads the file.
    for field in ("kv_capacity_tokens", "max_num_seqs", "max_batch_tokens", "max_model_len"):
        assert fitted[field] == generator[field], field
    assert fitted["migration_pause_s"] == generator["migration_pause_s"]
    profile = load_profile(str(out))
    assert profile.step_time(8, 8000, 4000) == pytest.approx(
        load_profile(str(tmp_path / "generator.json")).step_time(8, 8000, 4000), rel=1e-5
    )


def test_grid_pairs_skewed_batches_with_uniform_ones_of_equal_total() -> None:
    limits = Limits(
        max_model_len=2048,
        max_num_seqs=64,
        max_batch_tokens=4096,
        kv_capacity_tokens=2_000_000,
        block_size=32,
    )
    grid = build_grid(limits)
    uniform = {
        (len(p.prompt_lens), sum(p.prompt_lens)) for p in grid.decode if p.spread == "uniform"
    }
    skewed = [p for p in grid.decode if p.spread == "skewed"]
    assert len(skewed) >= 6
    for p in skewed:
        assert (len(p.prompt_lens), sum(p.prompt_lens)) in uniform, p.label
        assert max(p.prompt_lens) >= 2 * sum(p.prompt_lens) / len(p.prompt_lens), p.label
    for p in grid.decode:
        assert max(p.prompt_lens) + HEADROOM_TOKENS <= limits.max_model_len
        assert len(p.prompt_lens) <= limits.max_num_seqs
    assert {p.cached for p in grid.prefill} >= {0} and len({p.cached for p in grid.prefill}) >= 2
    assert all(p.cached % limits.block_size == 0 for p in grid.prefill)


def test_unknown_sim_profile_is_an_error() -> None:
    result = cascade("calibrate", "--engine", "sim", "--sim-profile", "nope", "--quick")
    assert result.returncode == 2
    assert "neither a built-in" in result.stderr


def test_calibrating_vllm_on_cpu_writes_a_profile_the_core_loads(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    from cascadeinfer.worker.tiny_model import write_tiny_llama

    model = write_tiny_llama(tmp_path / "tiny")
    out = tmp_path / "cpu.json"
    result = cascade(
        "calibrate",
        "--engine",
        "vllm",
        "--model",
        str(model),
        "--vllm-option",
        "load_format=cascade-dummy",
        "--vllm-option",
        "max_model_len=1024",
        "--quick",
        "--out",
        str(out),
        "--json",
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert len(report["points"]) >= 8
    assert all(p["measured_s"] > 0 for p in report["points"])
    prefills = [p for p in report["points"] if p["kind"] == "prefill"]
    # The prefix cache held the cached prefixes: they add attention pairs, not prefill tokens.
    assert {p["prefill_tokens"] for p in prefills} == {64, 256}
    assert len({p["prefill_pairs"] for p in prefills}) == 4
    error = report["fit"]["mean_abs_rel_error"]
    assert math.isfinite(error) and math.isfinite(report["fit"]["max_abs_rel_error"])
    assert f"mean {error:.1%}" in report["profile"]["description"]
    profile = load_profile(str(out))
    doc = json.loads(profile.to_json())
    assert doc["max_model_len"] == 1024
    assert doc["kv_block_size"] == 32
    assert doc["kv_bytes_per_token"] == 2 * 2 * 32 * 2 * 2  # layers * KV heads * dim * K,V * 2 B
    assert doc["step_overhead_s"] > 0
