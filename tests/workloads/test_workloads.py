"""The workload registry: every name samples valid, reproducible lengths; core presets keep the
traces they always had; shifts switch where they say; planning and the benchmarks accept every
name."""

from __future__ import annotations

import pytest
from cascadeinfer import _core, workloads
from cascadeinfer.evaluation.simbench import make_trace
from cascadeinfer.planning import load_requests
from cascadeinfer.workloads import UnknownWorkloadError


def test_the_builtins_are_the_core_presets_then_the_data_presets() -> None:
    names = workloads.names()
    assert names[: len(_core.preset_names())] == _core.preset_names()
    assert {"reasoning", "production-mix", "sharegpt", "sharegpt-multiturn"} <= set(names)


@pytest.mark.parametrize("name", [*workloads.names(), "shift:short-chat,reasoning"])
def test_every_name_draws_valid_reproducible_lengths(name: str) -> None:
    preset = workloads.get(name)
    prompts, outputs = preset.sample(3000, 5)
    assert len(prompts) == len(outputs) == 3000
    pairs = zip(prompts, outputs, strict=True)
    assert all(p >= 1 and o >= 1 and p + o <= preset.max_len for p, o in pairs)
    assert preset.sample(3000, 5) == (prompts, outputs)
    assert preset.sample(3000, 6) != (prompts, outputs)


def test_a_core_preset_trace_is_the_one_the_core_generates() -> None:
    # Results recorded before the registry existed stay reproducible.
    ours = workloads.get("bimodal").trace(400, 5.0, "gamma", 2.0, 3)
    assert ours == _core.generate_trace("bimodal", 400, 5.0, "gamma", 2.0, 3)


def test_data_presets_get_the_same_bursty_arrivals() -> None:
    ours = workloads.get("sharegpt").trace(2000, 8.0, "gamma", 3.0, 1)
    core = _core.generate_trace("short-chat", 2000, 8.0, "gamma", 3.0, 1)
    assert [t for t, _, _ in ours] == [t for t, _, _ in core]
    with pytest.raises(ValueError, match="cv"):
        workloads.get("sharegpt").trace(10, 8.0, "poisson", 3.0, 1)


def test_a_shift_switches_at_the_given_share_of_requests() -> None:
    n = 4000
    prompts, _ = workloads.get("shift:short-chat,long-context-mixed@0.25").sample(n, 2)
    chat, _ = _core.sample_preset("short-chat", n // 4, 2)
    assert prompts[: n // 4] == chat, "the first phase is the first preset's own stream"
    after = prompts[n // 4 :]
    assert max(prompts[: n // 4]) <= 4096 < max(after)
    assert 0.07 < sum(p >= 32_768 for p in after) / len(after) < 0.13
    halves, _ = workloads.get("shift:short-chat,long-context-mixed").sample(n, 2)
    assert max(halves[: n // 2]) <= 4096 < max(halves[n // 2 :])
    assert workloads.get("shift:short-chat,long-context-mixed").max_len == 131_072


def test_phases_naming_one_preset_draw_different_requests() -> None:
    prompts, _ = workloads.get("shift:bimodal,bimodal").sample(2000, 0)
    assert prompts[1000:] != _core.sample_preset("bimodal", 2000, 0)[0][1000:]
    assert prompts[1000:] != prompts[:1000]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nope", "sharegpt-multiturn"),
        ("shift:short-chat", "two or more"),
        ("shift:short-chat,nope", "two or more"),
        ("shift:short-chat,bimodal@x", "numbers"),
        ("shift:short-chat,bimodal@1.5", "in \\(0, 1\\)"),
        ("shift:short-chat,bimodal,agentic@0.7,0.2", "increasing"),
        ("shift:short-chat,bimodal@0.2,0.4", "1 shift point"),
    ],
)
def test_bad_names_say_what_is_wrong(name: str, message: str) -> None:
    with pytest.raises(UnknownWorkloadError, match=message):
        workloads.get(name)


@pytest.mark.parametrize("name", ["sharegpt", "sharegpt-multiturn", "shift:sharegpt,agentic"])
def test_planning_and_the_benchmarks_accept_data_presets_and_shifts(name: str) -> None:
    requests = load_requests(name, 32_768, clamp_prompts=True)
    assert len(requests.prompt_lens) == 20_000 and requests.rate is None
    trace = make_trace(name, num_requests=500, rate=4.0, max_len=32_768)
    assert len(trace) == 500 and all(e[1] + e[2] <= 32_768 for e in trace)
    assert all(e[5] < e[1] for e in trace if len(e) == 6), "a shared prefix stays inside its prompt"


def test_an_unknown_name_that_is_no_file_lists_the_workloads() -> None:
    with pytest.raises(UnknownWorkloadError, match="shift:") as err:
        load_requests("no-such-workload", 32_768)
    assert "sharegpt" in str(err.value) and "trace file" in str(err.value)
    with pytest.raises(UnknownWorkloadError, match="production-mix"):
        make_trace("no-such-workload.jsonl", num_requests=10, rate=1.0, max_len=2048)


def test_length_stats_are_nearest_rank() -> None:
    stats = workloads.length_stats(list(range(1, 201)))
    assert (stats.mean, stats.median, stats.p99, stats.max) == (100.5, 100.5, 198, 200)


@pytest.mark.parametrize("name", ["agentic", "sharegpt-multiturn"])
def test_multi_turn_presets_give_sessions_whose_turns_come_in_order(name: str) -> None:
    trace = workloads.get(name).trace(3000, 5.0, seed=2)
    assert all(len(e) == 6 for e in trace)
    assert [e[0] for e in trace] == sorted(e[0] for e in trace)
    last: dict[int, tuple[int, float, int]] = {}
    for arrival, prompt, output, session, turn, prefix in trace:
        if session in last:
            prev_turn, prev_arrival, prev_context = last[session]
            assert turn == prev_turn + 1
            assert 15.0 <= arrival - prev_arrival < 45.0, "30 s (MEAN_TURN_GAP_S) x [0.5, 1.5)"
            assert prefix == min(prev_context, prompt - 1)
        else:
            assert (turn, prefix) == (0, 0)
        last[session] = (turn, arrival, prompt + output)
    # Sessions start at the rate that makes 5 requests/s once they overlap in steady state.
    starts = [e[0] for e in trace if e[4] == 0]
    session_rate = 5.0 * len(starts) / len(trace)
    assert 0.75 < (len(starts) / starts[-1]) / session_rate < 1.25
    # The lengths are the preset's own draw, only their order changed.
    prompts, _ = workloads.get(name).sample(3000, 2)
    assert sorted(e[1] for e in trace) == sorted(prompts)


def test_single_turn_presets_have_no_sessions() -> None:
    for name in ("short-chat", "sharegpt", "production-mix", "shift:sharegpt,agentic"):
        assert all(len(e) == 3 for e in workloads.get(name).trace(200, 5.0, seed=1))
