"""The simulated engine in-process: deterministic tokens, exact resume after export/import at
any position, block accounting under preemption, step times from the cost model."""

from __future__ import annotations

import pytest
from cascadeinfer.worker.engine import (
    EngineError,
    EngineRequest,
    ErrorCode,
    FinishReason,
    SamplingSpec,
)
from cascadeinfer.worker.engines.sim_engine import SimEngine, SimEngineConfig

FAST = SimEngineConfig(time_scale=0.0, kv_bytes_per_token=64, max_model_len=4096)
PROMPT = tuple(range(1, 51))


def run(
    engine: SimEngine, until: str | None = None, context_len: int | None = None
) -> dict[str, list[int]]:
    """Steps until every request finishes, or until `until` reaches `context_len`."""
    out: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for p in engine.step().progress:
            out.setdefault(p.request_id, []).extend(p.new_token_ids)
            if p.request_id == until and p.context_len == context_len:
                return out
    return out


def request(rid: str, max_tokens: int = 200, prompt: tuple[int, ...] = PROMPT) -> EngineRequest:
    return EngineRequest(rid, prompt, SamplingSpec(max_tokens=max_tokens))


def reference(max_tokens: int = 200) -> list[int]:
    e = SimEngine(FAST)
    e.add_request(request("r", max_tokens))
    return run(e)["r"]


@pytest.mark.parametrize("stop_at", [64, 65, 80, 96, 97, 130])
@pytest.mark.parametrize("precopy", [False, True])
def test_export_import_at_any_position_gives_the_unmoved_tokens(
    stop_at: int, precopy: bool
) -> None:
    """block_size is 16: 64/80/96 put the cached tokens (context - 1) mid-block, 65/97 at a boundary."""
    source, target = SimEngine(FAST), SimEngine(FAST)
    free = [source.num_free_blocks(), target.num_free_blocks()]
    source.add_request(request("r"))
    first = run(source, "r", stop_at)["r"]
    pre = source.copy_full_blocks("r", 0) if precopy else []
    snap = source.export_kv("r", skip_blocks=len(pre))
    snap.blocks = pre + snap.blocks
    assert snap.num_cached_tokens == stop_at - 1
    assert len(snap.blocks) == -(-snap.num_cached_tokens // 16)
    assert source.num_free_blocks() == free[0]
    target.import_kv(snap)
    rest = run(target)["r"]
    assert first + rest == reference()
    assert target.num_free_blocks() == free[1]


def test_corrupted_or_mismatched_snapshots_are_refused_and_leak_nothing() -> None:
    source, target = SimEngine(FAST), SimEngine(FAST)
    source.add_request(request("r"))
    run(source, "r", 90)
    snap = source.export_kv("r")
    snap.blocks[2] = b"\0" * len(snap.blocks[2])
    free = target.num_free_blocks()
    with pytest.raises(EngineError) as info:
        target.import_kv(snap)
    assert info.value.code == ErrorCode.INVALID_ARGUMENT
    other = SimEngine(SimEngineConfig(time_scale=0.0, kv_bytes_per_token=128, max_model_len=4096))
    with pytest.raises(EngineError) as info:
        other.import_kv(snap)
    assert info.value.code == ErrorCode.FAILED_PRECONDITION
    assert target.num_free_blocks() == free


def test_preemption_under_kv_pressure_completes_everything_and_frees_all_blocks() -> None:
    engine = SimEngine(
        SimEngineConfig(time_scale=0.0, kv_bytes_per_token=8, num_blocks=40, max_model_len=4096)
    )
    for k in range(8):
        engine.add_request(request(f"r{k}", 150))
    out = run(engine)
    assert all(out[f"r{k}"] == reference(150) for k in range(8))
    assert engine.num_free_blocks() == 40


def test_recompute_resume_continues_the_numbering() -> None:
    engine = SimEngine(FAST)
    ref = reference()
    engine.add_request(EngineRequest("r", PROMPT, SamplingSpec(max_tokens=200), tuple(ref[:77])))
    first_index = None
    tokens = []
    while engine.has_unfinished():
        for p in engine.step().progress:
            first_index = p.first_index if first_index is None else first_index
            tokens.extend(p.new_token_ids)
            last = p
    assert first_index == 77
    assert ref[:77] + tokens == ref
    assert last.finish_reason == FinishReason.LENGTH


def test_step_time_follows_the_cost_model() -> None:
    engine = SimEngine(SimEngineConfig(time_scale=1.0, kv_bytes_per_token=8))
    engine.add_request(request("r", 3))
    reports = [engine.step() for _ in range(3)]
    # GPU profile: 6 ms of overhead per step at least.
    assert all(r.step_time_s >= 0.006 for r in reports)
    assert engine.name == "sim" and engine.layout.backend == "sim"


def test_token_ids_outside_the_vocabulary_are_refused_in_the_prompt_and_the_stop_list() -> None:
    # Stop ids were taken whatever they were (never matching), where vLLM refuses them: a
    # client tested on the sim engine met a 400 first on vLLM.
    engine = SimEngine(FAST)
    vocab = FAST.vocab_size
    for bad, words in [
        (EngineRequest("p", (1, vocab), SamplingSpec(max_tokens=4)), "token id"),
        (
            EngineRequest("s", PROMPT, SamplingSpec(max_tokens=4, stop_token_ids=(2, vocab))),
            "stop_token_ids: id",
        ),
    ]:
        with pytest.raises(EngineError) as e:
            engine.add_request(bad)
        assert e.value.code == ErrorCode.INVALID_ARGUMENT
        assert f"{words} {vocab} is outside the vocabulary" in e.value.message
    engine.add_request(EngineRequest("ok", PROMPT, SamplingSpec(4, stop_token_ids=(vocab - 1,))))
    assert run(engine)["ok"]
