"""`cascade trace gen`, `cascade bench sim` (with the SLO search) and `cascade bench compare`,
run as a user would, on small simulated workloads."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cascadeinfer import workload_names
from cascadeinfer.traces import read_trace

from tests.summary_keys import SIM_SUMMARY_KEYS

CASCADE = str(Path(sys.executable).parent / "cascade")


def cascade(*args: str) -> str:
    out = subprocess.run([CASCADE, *args], capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_trace_gen_writes_a_bursty_trace(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    cascade(
        "trace", "gen", "--workload", "bimodal", "--requests", "500", "--rate", "5",
        "--arrival", "gamma", "--cv", "3", "--max-len", "8192", "--out", str(path),
    )  # fmt: skip
    trace = read_trace(path)
    assert len(trace) == 500
    assert all(r.prompt_len + r.output_len <= 8192 for r in trace)
    assert 50 < trace[-1].arrival_s < 200, "500 requests at 5/s span about 100 s"


def test_bench_sim_prints_the_documented_keys_for_a_preset_and_a_trace(tmp_path: Path) -> None:
    base = ["bench", "sim", "--instances", "4", "--requests", "400", "--rate", "2", "--json"]
    doc = json.loads(cascade(*base, "--workload", "bimodal", "--policy", "cascade"))
    assert set(doc) >= SIM_SUMMARY_KEYS | {"goodput", "goodput_req_s", "stages", "plan_wall_s"}
    assert doc["completed"] == 400
    assert 0 < doc["mean_ttft_s"] <= doc["mean_e2e_s"] <= doc["p99_e2e_s"]
    # The layout the run started with: stages of consecutive lengths over the 4 instances.
    stages = re.findall(r"\[(\d+), (\d+)\) x(\d+)", doc["stages"])
    assert stages and stages[0][0] == "0" and sum(int(n) for _, _, n in stages) == 4
    assert all(a[1] == b[0] for a, b in itertools.pairwise(stages))
    assert doc["plan_wall_s"] > 0
    trace = tmp_path / "t.jsonl"
    cascade("trace", "gen", "--workload", "short-chat", "--requests", "300", "--rate", "3",
            "--out", str(trace))  # fmt: skip
    doc = json.loads(cascade(*base, "--workload", str(trace), "--policy", "round-robin"))
    assert doc["completed"] == 300 and doc["migrations"] == 0
    assert doc["stages"] == "[0, 131072) x4", "a baseline: one stage of every length"
    text = cascade(*base[:-1], "--workload", str(trace), "--policy", "least-load")
    assert "stages                [0, 131072) x4" in text


@pytest.mark.parametrize("policy", ["least-load", "cascade"])
def test_a_trace_recorded_past_capacity_replays_at_its_own_rate(
    tmp_path: Path, policy: str
) -> None:
    """Without --rate a trace runs as recorded, overload included (it used to be refused: the
    default rate was planned for, and no plan carries an overload)."""
    trace = tmp_path / "overload.jsonl"
    cascade("trace", "gen", "--workload", "long-context-mixed", "--requests", "300",
            "--rate", "100", "--out", str(trace))  # fmt: skip
    args = ["bench", "sim", "--workload", str(trace), "--instances", "2", "--json"]
    doc = json.loads(cascade(*args, "--policy", policy))
    assert doc["completed"] == 300
    assert doc["rate"] == pytest.approx(100, rel=0.2)
    assert doc["mean_ttft_s"] > 1.0, "two instances cannot keep up with the recorded rate"


def test_a_trace_runs_whole_and_a_part_of_it_at_that_parts_own_rate(tmp_path: Path) -> None:
    """Without --requests a trace file runs whole (it once ran its first 10,000 only); with it,
    the first REQUESTS run as recorded, not rescaled to the whole trace's mean rate."""
    trace = tmp_path / "two-phases.jsonl"
    fast = [i * 0.05 for i in range(300)]  # 20 req/s, then 1 req/s
    slow = [fast[-1] + 1.0 + i for i in range(100)]
    trace.write_text(
        "".join(f'{{"arrival_s": {t}, "prompt_len": 200, "output_len": 20}}\n' for t in fast + slow)
    )
    args = ["bench", "sim", "--policy", "least-load", "--workload", str(trace), "--json"]
    whole = json.loads(cascade(*args))
    assert whole["requests"] == whole["completed"] == 400
    assert whole["rate"] == pytest.approx(399 / (slow[-1] - fast[0]))
    part = json.loads(cascade(*args, "--requests", "300"))
    assert part["requests"] == 300
    assert part["rate"] == pytest.approx(20.0)


@pytest.mark.parametrize("policy", ["least-load", "cascade"])
def test_a_trace_arriving_all_at_once_replays_as_an_offline_batch(
    tmp_path: Path, policy: str
) -> None:
    """A batch sent at once (a throughput benchmark) runs as recorded: every request at the
    same instant, its rate reported as null; cascade plans for the fleet's capacity. It used
    to be refused, a rate being undefined."""
    trace = tmp_path / "batch.jsonl"
    lines = [(100, 10), (9000, 400), (300, 2000)] * 40
    trace.write_text(
        "".join(f'{{"arrival_s": 5.0, "prompt_len": {p}, "output_len": {o}}}\n' for p, o in lines)
    )
    args = ["bench", "sim", "--workload", str(trace), "--instances", "4", "--json"]
    doc = json.loads(cascade(*args, "--policy", policy))
    assert doc["completed"] == doc["requests"] == 120
    assert doc["rate"] is None
    assert doc["mean_ttft_s"] > 0.5, "120 prompts at once queue for prefill on 4 instances"


def test_figures_a_run_cannot_have_are_null_in_standard_json(tmp_path: Path) -> None:
    """With one token per answer no request has a time per output token: the figure is null,
    not the bare NaN Python writes by default, which strict JSON parsers refuse."""
    trace = tmp_path / "one-token.jsonl"
    trace.write_text(
        "".join(
            f'{{"arrival_s": {k * 0.1}, "prompt_len": 50, "output_len": 1}}\n' for k in range(20)
        )
    )
    args = ["bench", "sim", "--workload", str(trace), "--instances", "2", "--json"]
    text = cascade(*args, "--policy", "least-load")
    doc = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in {text}"))
    assert doc["completed"] == 20
    assert doc["mean_tpot_s"] is None and doc["p99_tpot_s"] is None
    assert doc["mean_e2e_s"] > 0


def test_a_trace_arriving_all_at_once_is_not_run_under_a_rate_it_cannot_have(
    tmp_path: Path,
) -> None:
    """Rescaling multiplies a trace's gaps; with none, --rate, a rate search or a sweep would
    only relabel a run of everything at once. Refused, with the reason."""
    trace = tmp_path / "batch.jsonl"
    trace.write_text('{"arrival_s": 5.0, "prompt_len": 100, "output_len": 10}\n' * 8)
    base = ["--workload", str(trace), "--instances", "2"]
    for args in (
        ["bench", "sim", *base, "--rate", "5"],
        ["bench", "sim", *base, "--find-max-rate"],
        ["bench", "compare", *base, "--out", str(tmp_path / "cmp")],
    ):
        out = subprocess.run(
            [CASCADE, *args], capture_output=True, text=True, timeout=120, check=False
        )
        assert out.returncode == 2 and "Traceback" not in out.stderr, args
        assert "arrive at once" in out.stderr, args


def test_cascade_plan_names_a_batch_that_arrives_at_once(tmp_path: Path) -> None:
    trace = tmp_path / "batch.jsonl"
    trace.write_text('{"arrival_s": 0.0, "prompt_len": 100, "output_len": 10}\n' * 50)
    out = cascade("plan", "--instances", "2", "--workload", str(trace))
    assert "arriving at once (planned for the fleet's capacity" in out


def test_cascade_splits_long_documents_from_chat_and_migrates_across_the_bounds() -> None:
    args = ["--workload", "long-context-mixed", "--instances", "16", "--requests", "1000"]
    doc = json.loads(cascade("bench", "sim", "--policy", "cascade", *args, "--rate", "8", "--json"))
    assert doc["completed"] == 1000
    assert doc["migrations"] > 0, "requests grow across the stage bounds of the plan"


@pytest.mark.parametrize("workload", [*workload_names(), "shift:short-chat,long-context-mixed"])
def test_every_workload_runs_end_to_end_with_bursty_arrivals(workload: str) -> None:
    args = ["--workload", workload, "--requests", "500", "--instances", "4"]
    doc = json.loads(cascade("bench", "sim", *args, "--arrival", "gamma", "--cv", "2", "--json"))
    assert doc["requests"] == doc["completed"] == 500
    assert 0 < doc["mean_ttft_s"] <= doc["mean_e2e_s"] <= doc["p99_e2e_s"]


def test_find_max_rate_brackets_the_slo() -> None:
    # Enough requests that a rate past capacity queues them: a short trace is a burst the fleet
    # may absorb within the SLO at any rate.
    args = ["bench", "sim", "--instances", "4", "--requests", "2000", "--workload", "short-chat"]
    slo = ["--slo-p99-ttft-s", "2", "--slo-p99-tpot-s", "0.1"]
    doc = json.loads(cascade(*args, "--find-max-rate", *slo, "--json"))
    best = doc["max_rate"]
    assert best > 0 and doc["at_max_rate"]["p99_ttft_s"] <= 2
    above = json.loads(cascade(*args, "--rate", str(best * 1.5), "--json"))
    assert above["p99_ttft_s"] > 2 or above["p99_tpot_s"] > 0.1, "1.5x the maximum breaks the SLO"


def test_compare_writes_a_table_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    cascade(
        "bench", "compare", "--workload", "bimodal", "--instances", "4", "--requests", "300",
        "--rates", "1,2", "--no-max-rate", "--out", str(out),
    )  # fmt: skip
    table = (out / "compare.md").read_text()
    for policy in (
        "cascade",
        "round-robin",
        "least-load",
        "power-of-two",
        "llumnix",
        "cache-aware",
    ):
        assert f"| {policy} |" in table
    assert "| prefix-cache hits |" in table
    for png in ("latency_cdf.png", "latency_vs_rate.png", "stage_load.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_compare_on_a_trace_says_it_replays_the_trace(tmp_path: Path) -> None:
    """The table's header names what ran: the trace's own requests, not a preset's draws."""
    trace, out = tmp_path / "t.jsonl", tmp_path / "cmp"
    cascade("trace", "gen", "--workload", "bimodal", "--requests", "120", "--rate", "2",
            "--out", str(trace))  # fmt: skip
    cascade(
        "bench", "compare", "--workload", str(trace), "--instances", "2", "--rates", "1",
        "--no-max-rate", "--out", str(out),
    )  # fmt: skip
    table = (out / "compare.md").read_text()
    assert "The trace's first 120 requests a run" in table
    assert "poisson arrivals" not in table


def test_bench_sim_counts_the_capacity_guards_moves_and_can_turn_it_off() -> None:
    """Bursty long documents load the long stage unevenly; with the guard on, instances move to
    it (counted among the layout changes), and --no-capacity-guard runs the plan unchanged."""
    args = ["--workload", "long-context-mixed", "--instances", "16", "--requests", "2000"]
    args += ["--rate", "14", "--arrival", "gamma", "--cv", "2", "--json"]
    guarded = json.loads(cascade("bench", "sim", *args))
    assert 0 < guarded["capacity_moves"] <= guarded["layout_changes"]
    plain = json.loads(cascade("bench", "sim", *args, "--no-capacity-guard"))
    assert plain["capacity_moves"] == 0
    assert plain["completed"] == guarded["completed"] == 2000
    baseline = json.loads(cascade("bench", "sim", *args, "--policy", "least-load"))
    assert baseline["capacity_moves"] == baseline["layout_changes"] == 0


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        # 0 once read as "no rate given" and ran the preset's default rate without a word.
        (["sim", "--rate", "0"], "--rate"),
        (["sim", "--rate", "1e-300"], "--rate"),
        # NaN failed every rate and reported "highest rate within the SLO: 0 req/s".
        (["sim", "--find-max-rate", "--slo-p99-ttft-s", "nan"], "--slo-p99-ttft-s"),
        (["compare", "--rates", "1,abc", "--out", "unused"], "--rates"),
    ],
)
def test_a_rate_or_slo_no_run_can_have_is_refused_naming_its_flag(
    args: list[str], flag: str
) -> None:
    out = subprocess.run(
        [CASCADE, "bench", *args, "--workload", "short-chat", "--requests", "50"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 2, out.stdout
    assert f"argument {flag}" in out.stderr and "Traceback" not in out.stderr
