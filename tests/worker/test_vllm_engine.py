"""VllmEngine on a real vLLM CPU engine: migration with the KV cache gives the greedy tokens of a
request that never moved.

Engines are built once per module. Several engines share this process (the KV connector
supports that, see kv_connector.py); one test also resumes a snapshot in a fresh process, the
way two worker daemons would. Each test uses its own prompt, and the unmoved run happens on a
third engine: the target has none of the request's blocks in its prefix cache, so its tokens
depend on the imported bytes (test_corrupted_blocks_change_the_tokens checks that they do).
"""

from __future__ import annotations

import json
import pickle
import random
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from cascadeinfer.worker.engine import (
    EngineError,
    EngineRequest,
    ErrorCode,
    FinishReason,
    KVSnapshot,
    SamplingSpec,
    StepReport,
)
from cascadeinfer.worker.engines import kv_blocks
from cascadeinfer.worker.engines import kv_connector as kvc
from cascadeinfer.worker.engines.vllm_engine import (
    SEEDED_DUMMY_LOAD_FORMAT,
    VllmEngine,
    VllmEngineConfig,
)
from cascadeinfer.worker.tiny_model import write_tiny_llama

Unmoved = Callable[[EngineRequest], list[int]]
BLOCK = 32
PROMPT_LEN = 45
MAX_TOKENS = 60


def prompt_for(name: str, length: int = PROMPT_LEN) -> tuple[int, ...]:
    rng = random.Random(zlib.crc32(name.encode()))
    return tuple(rng.randrange(3, 1024) for _ in range(length))


class Transcript:
    """Every request's tokens as the step reports tell them, checking that indexes run on."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.finish: dict[str, FinishReason] = {}
        self._prompt_len: dict[str, int] = {}

    def start(self, engine: VllmEngine, req: EngineRequest) -> None:
        engine.add_request(req)
        self.tokens[req.request_id] = list(req.output_token_ids)
        self._prompt_len[req.request_id] = len(req.prompt_token_ids)

    def record(self, report: StepReport) -> None:
        for p in report.progress:
            tokens = self.tokens[p.request_id]
            assert p.first_index == len(tokens), f"{p.request_id}: gap or overlap"
            tokens.extend(p.new_token_ids)
            assert p.context_len == self._prompt_len[p.request_id] + len(tokens)
            if p.finish_reason is not None:
                self.finish[p.request_id] = p.finish_reason

    def step_until(self, engine: VllmEngine, request_id: str, num_tokens: int) -> None:
        while len(self.tokens.get(request_id, [])) < num_tokens:
            self.record(engine.step())

    def finish_all(self, engine: VllmEngine) -> None:
        while engine.has_unfinished():
            self.record(engine.step())


def request(
    request_id: str, max_tokens: int = MAX_TOKENS, prompt: tuple[int, ...] | None = None
) -> EngineRequest:
    """A greedy request whose prompt is its own (from its id) unless given."""
    prompt = prompt_for(request_id) if prompt is None else prompt
    return EngineRequest(request_id, prompt, SamplingSpec(max_tokens=max_tokens, ignore_eos=True))


@pytest.fixture(scope="module")
def vllm_config(tmp_path_factory: pytest.TempPathFactory) -> VllmEngineConfig:
    model = write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    return VllmEngineConfig(
        model=str(model),
        served_model_name="tiny",
        load_format=SEEDED_DUMMY_LOAD_FORMAT,
        block_size=BLOCK,
        max_model_len=1024,
        num_blocks=64,
        multiprocess=False,
    )


@pytest.fixture(scope="module")
def vllm_pair(vllm_config: VllmEngineConfig) -> Iterator[tuple[VllmEngine, VllmEngine]]:
    source, target = VllmEngine(vllm_config), VllmEngine(vllm_config)
    yield source, target
    target.shutdown()
    source.shutdown()


@pytest.fixture(scope="module")
def vllm_unmoved(vllm_config: VllmEngineConfig) -> Iterator[Unmoved]:
    """The tokens a request yields when it never moves, from an engine used for nothing else."""
    engine = VllmEngine(vllm_config)

    def unmoved(req: EngineRequest) -> list[int]:
        transcript = Transcript()
        transcript.start(engine, req)
        transcript.finish_all(engine)
        assert transcript.finish[req.request_id] is FinishReason.LENGTH
        return transcript.tokens[req.request_id]

    yield unmoved
    engine.shutdown()


@pytest.fixture()
def engines(vllm_pair: tuple[VllmEngine, VllmEngine]) -> Iterator[tuple[VllmEngine, VllmEngine]]:
    """The pair, idle, checked to hold no blocks afterwards (no leak on either side)."""
    source, target = vllm_pair
    start = (source.num_free_blocks(), target.num_free_blocks())
    assert start == (source.num_blocks_total, target.num_blocks_total)
    yield source, target
    assert not source.has_unfinished() and not target.has_unfinished()
    assert (source.num_free_blocks(), target.num_free_blocks()) == start


def migrate(
    source: VllmEngine, target: VllmEngine, request_id: str, precopy: bool = False
) -> KVSnapshot:
    pre = source.copy_full_blocks(request_id, 0) if precopy else []
    rest = source.export_kv(request_id, skip_blocks=len(pre))
    snapshot = replace(rest, blocks=pre + rest.blocks)
    target.import_kv(snapshot)
    return snapshot


# ---- the model and engine themselves ----------------------------------------------------------


def test_greedy_output_depends_on_the_context(
    engines: tuple[VllmEngine, VllmEngine], vllm_unmoved: Unmoved
) -> None:
    """Guards the other tests: with vLLM's plain dummy weights every prompt gives the same two
    tokens over and over, and a broken KV transfer would go unnoticed."""
    source, _ = engines
    same = request("same")
    reference = vllm_unmoved(same)
    transcript = Transcript()
    transcript.start(source, same)
    transcript.start(source, request("other", prompt=(5, *same.prompt_token_ids[1:])))
    transcript.finish_all(source)
    assert transcript.tokens["same"] == reference  # another engine computes the same tokens
    assert transcript.tokens["other"] != reference
    assert len(set(reference)) > MAX_TOKENS // 2


def test_layout_describes_the_kv_cache(engines: tuple[VllmEngine, VllmEngine]) -> None:
    layout = engines[0].layout
    assert (layout.num_layers, layout.num_kv_heads, layout.head_size) == (2, 2, 32)
    assert layout.block_size == BLOCK and layout.dtype == "bfloat16"
    assert layout.backend.startswith("CPU_ATTN/")
    assert layout.block_bytes == 2 * 2 * BLOCK * 2 * 32 * 2  # layers * heads * tokens * K,V * 2 B
    assert engines[0].layout == engines[1].layout
    # vLLM's CPU caches are contiguous per layer, so migrations copy byte rows (kv_blocks.py).
    llm, scheduler = engines[0]._llm, engines[0]._scheduler
    caches = kvc.layer_caches_of(llm.vllm_config.compilation_config.static_forward_context)
    assert kv_blocks.copies_as_byte_rows(caches, scheduler.kv_cache_config.num_blocks)


# ---- migration keeps the greedy tokens --------------------------------------------------------


@pytest.mark.parametrize(
    ("num_before", "precopy"),
    [
        (1, False),  # right after prefill
        (7, False),  # cached tokens end mid-block
        (19, False),  # cached tokens end one short of a block boundary
        (20, False),  # cached tokens fill their blocks exactly
        (20, True),
        (33, True),
    ],
)
def test_migrated_request_yields_the_unmoved_tokens(
    engines: tuple[VllmEngine, VllmEngine], vllm_unmoved: Unmoved, num_before: int, precopy: bool
) -> None:
    source, target = engines
    transcript = Transcript()
    rid = f"m-{num_before}-{precopy}"
    reference = vllm_unmoved(request(rid))
    transcript.start(source, request(rid))
    transcript.step_until(source, rid, num_before)
    snapshot = migrate(source, target, rid, precopy)
    cached = PROMPT_LEN + num_before - 1
    assert snapshot.num_cached_tokens == cached
    assert len(snapshot.blocks) == -(-cached // BLOCK)
    assert snapshot.request.output_token_ids == tuple(reference[:num_before])
    assert source.num_free_blocks() == source.num_blocks_total  # freed at once
    transcript.finish_all(target)
    assert transcript.tokens[rid] == reference
    assert transcript.finish[rid] is FinishReason.LENGTH


def test_request_migrated_twice_yields_the_unmoved_tokens(
    engines: tuple[VllmEngine, VllmEngine], vllm_unmoved: Unmoved
) -> None:
    source, target = engines
    reference = vllm_unmoved(request("twice"))
    transcript = Transcript()
    transcript.start(source, request("twice"))
    transcript.step_until(source, "twice", 10)
    migrate(source, target, "twice")
    transcript.step_until(target, "twice", 30)
    migrate(target, source, "twice", precopy=True)
    transcript.finish_all(source)
    assert transcript.tokens["twice"] == reference


def test_migration_while_other_requests_run(
    engines: tuple[VllmEngine, VllmEngine], vllm_unmoved: Unmoved
) -> None:
    """A batch on both sides; the export's transfer step moves no other request on."""
    source, target = engines
    reference = vllm_unmoved(request("busy"))
    transcript = Transcript()
    transcript.start(source, request("busy"))
    transcript.start(source, request("x-neighbour", prompt=prompt_for("x-neighbour", 40)))
    transcript.start(target, request("x-there", prompt=prompt_for("x-there", 70)))
    transcript.step_until(source, "busy", 12)
    transcript.step_until(target, "x-there", 3)
    neighbour = len(transcript.tokens["x-neighbour"])
    migrate(source, target, "busy", precopy=True)
    transcript.record(source.step())
    assert len(transcript.tokens["x-neighbour"]) == neighbour + 1
    transcript.finish_all(target)
    transcript.finish_all(source)
    assert transcript.tokens["busy"] == reference


def test_corrupted_blocks_change_the_tokens(
    engines: tuple[VllmEngine, VllmEngine], vllm_unmoved: Unmoved
) -> None:
    """Proves the imported bytes are what the target attends to (not a silent recompute)."""
    source, target = engines
    reference = vllm_unmoved(request("corrupt"))
    transcript = Transcript()
    transcript.start(source, request("corrupt"))
    transcript.step_until(source, "corrupt", 20)
    snapshot = source.export_kv("corrupt")
    zeroed = replace(snapshot, blocks=[bytes(len(b)) for b in snapshot.blocks])
    target.import_kv(zeroed)
    transcript.finish_all(target)
    assert transcript.tokens["corrupt"][:20] == reference[:20]
    assert transcript.tokens["corrupt"][20:] != reference[20:]


def test_snapshot_resumes_in_another_process(
    engines: tuple[VllmEngine, VllmEngine],
    vllm_unmoved: Unmoved,
    vllm_config: VllmEngineConfig,
    tmp_path: Path,
) -> None:
    """Bytes out of one process, into an engine built in another (as between two daemons)."""
    source, _ = engines
    reference = vllm_unmoved(request("far"))
    transcript = Transcript()
    transcript.start(source, request("far"))
    transcript.step_until(source, "far", 25)
    snapshot = source.export_kv("far", skip_blocks=0)
    (tmp_path / "snapshot.pkl").write_bytes(pickle.dumps((vllm_config, snapshot)))
    out = subprocess.run(
        [sys.executable, "-c", _RESUME_ELSEWHERE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = json.loads((tmp_path / "tokens.json").read_text())
    assert list(snapshot.request.output_token_ids) + resumed == reference


_RESUME_ELSEWHERE = """
import json, pickle, sys
from pathlib import Path
from cascadeinfer.worker.engines.vllm_engine import VllmEngine
directory = Path(sys.argv[1])
config, snapshot = pickle.loads((directory / "snapshot.pkl").read_bytes())
engine = VllmEngine(config)
engine.import_kv(snapshot)
tokens = []
while engine.has_unfinished():
    for p in engine.step().progress:
        assert p.first_index == len(snapshot.request.output_token_ids) + len(tokens)
        tokens.extend(p.new_token_ids)
assert engine.num_free_blocks() == engine.num_blocks_total
(directory / "tokens.json").write_text(json.dumps(tokens))
engine.shutdown()
"""


# ---- refusals leave the request resumable where it was ----------------------------------------


def test_layout_mismatch_refused_and_resumed_on_source(
    engines: tuple[VllmEngine, VllmEngine], vllm_unmoved: Unmoved, vllm_config: VllmEngineConfig
) -> None:
    source, _ = engines
    other = VllmEngine(replace(vllm_config, block_size=2 * BLOCK))
    try:
        reference = vllm_unmoved(request("mismatch"))
        transcript = Transcript()
        transcript.start(source, request("mismatch"))
        transcript.step_until(source, "mismatch", 15)
        snapshot = source.export_kv("mismatch")
        with pytest.raises(EngineError) as refused:
            other.import_kv(snapshot)
        assert refused.value.code is ErrorCode.FAILED_PRECONDITION
        assert "block_size" in refused.value.message
        assert other.num_free_blocks() == other.num_blocks_total
        source.import_kv(snapshot)  # the source's cached blocks are reused here
        transcript.finish_all(source)
        assert transcript.tokens["mismatch"] == reference
    finally:
        other.shutdown()


def test_no_capacity_refused_and_resumed_on_source(
    engines: tuple[VllmEngine, VllmEngine], vllm_unmoved: Unmoved, vllm_config: VllmEngineConfig
) -> None:
    source, _ = engines
    small = VllmEngine(replace(vllm_config, num_blocks=8, max_model_len=224))
    try:
        reference = vllm_unmoved(request("no-room"))
        transcript = Transcript()
        transcript.start(small, request("filler", max_tokens=40, prompt=prompt_for("filler", 150)))
        transcript.record(small.step())
        assert small.num_free_blocks() == small.num_blocks_total - 5
        transcript.start(source, request("no-room"))
        transcript.step_until(source, "no-room", 30)
        snapshot = source.export_kv("no-room")
        free_before = small.num_free_blocks()
        with pytest.raises(EngineError) as refused:
            small.import_kv(snapshot)
        assert refused.value.code is ErrorCode.RESOURCE_EXHAUSTED
        assert small.num_free_blocks() == free_before
        small.abort("filler")
        assert small.num_free_blocks() == small.num_blocks_total
        assert not small.has_unfinished()
        source.import_kv(snapshot)
        transcript.finish_all(source)
        assert transcript.tokens["no-room"] == reference
    finally:
        small.shutdown()


def test_abort_frees_blocks(engines: tuple[VllmEngine, VllmEngine]) -> None:
    source, _ = engines
    transcript = Transcript()
    transcript.start(source, request("aborted"))
    transcript.step_until(source, "aborted", 3)
    assert source.num_free_blocks() < source.num_blocks_total
    source.abort("aborted")
    assert source.num_free_blocks() == source.num_blocks_total
    assert not source.has_unfinished()


def test_import_aborted_before_loading(engines: tuple[VllmEngine, VllmEngine]) -> None:
    """The bytes an import brought are dropped when it is aborted before they were loaded."""
    source, target = engines
    transcript = Transcript()
    transcript.start(source, request("aborted-import"))
    transcript.step_until(source, "aborted-import", 5)
    target.import_kv(source.export_kv("aborted-import"))
    target.abort("aborted-import")
    assert target.num_free_blocks() == target.num_blocks_total


# ---- recompute mode ---------------------------------------------------------------------------


def test_recompute_mode_yields_the_unmoved_tokens(
    engines: tuple[VllmEngine, VllmEngine], vllm_unmoved: Unmoved
) -> None:
    _, target = engines
    reference = vllm_unmoved(request("recompute"))
    transcript = Transcript()
    transcript.start(target, replace(request("recompute"), output_token_ids=tuple(reference[:25])))
    transcript.finish_all(target)
    assert transcript.tokens["recompute"] == reference


# ---- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (replace(request("bad"), prompt_token_ids=()), "prompt_token_ids"),
        (replace(request("bad"), prompt_token_ids=(1, 1024)), "prompt_token_ids"),
        (request("bad", prompt=(3,) * 1024), "context_len"),
        (request("bad", max_tokens=0), "max_tokens"),
        (replace(request("bad"), sampling=SamplingSpec(max_tokens=5, top_p=0.0)), "top_p"),
        (replace(request("bad"), sampling=SamplingSpec(max_tokens=5, temperature=-1)), "temp"),
        (replace(request("bad", max_tokens=3), output_token_ids=(1, 2, 3)), "output_token_ids"),
        # Refused by vLLM itself, with an error that is no ValueError (VLLMValidationError).
        (
            replace(request("bad"), sampling=SamplingSpec(max_tokens=5, stop_token_ids=(1024,))),
            "stop_token_ids",
        ),
        (replace(request("bad"), sampling=SamplingSpec(max_tokens=5, temperature=2.5)), "temp"),
    ],
)
def test_bad_requests_are_invalid_arguments(
    engines: tuple[VllmEngine, VllmEngine], bad: EngineRequest, field: str
) -> None:
    with pytest.raises(EngineError) as error:
        engines[0].add_request(bad)
    assert error.value.code is ErrorCode.INVALID_ARGUMENT
    assert field in error.value.message


def test_error_codes(engines: tuple[VllmEngine, VllmEngine]) -> None:
    source, target = engines

    def code_of(call: Callable[[], object]) -> ErrorCode:
        with pytest.raises(EngineError) as error:
            call()
        return error.value.code

    assert code_of(lambda: source.abort("nobody")) is ErrorCode.NOT_FOUND
    assert code_of(lambda: source.export_kv("nobody")) is ErrorCode.NOT_FOUND
    assert code_of(lambda: source.copy_full_blocks("nobody", 0)) is ErrorCode.NOT_FOUND
    transcript = Transcript()
    transcript.start(source, request("codes"))
    assert code_of(lambda: source.add_request(request("codes"))) is ErrorCode.ALREADY_EXISTS
    # Still waiting: nothing to export yet.
    assert code_of(lambda: source.export_kv("codes")) is ErrorCode.FAILED_PRECONDITION
    transcript.step_until(source, "codes", 2)
    assert code_of(lambda: source.export_kv("codes", skip_blocks=5)) is ErrorCode.INVALID_ARGUMENT
    snapshot = source.export_kv("codes")
    short = replace(snapshot, blocks=snapshot.blocks[:-1])
    assert code_of(lambda: target.import_kv(short)) is ErrorCode.INVALID_ARGUMENT
    torn = replace(snapshot, blocks=[b[:-1] for b in snapshot.blocks])
    assert code_of(lambda: target.import_kv(torn)) is ErrorCode.INVALID_ARGUMENT
    target.add_request(request("codes"))
    assert code_of(lambda: target.import_kv(snapshot)) is ErrorCode.ALREADY_EXISTS
    target.abort("codes")
    assert target.num_free_blocks() == target.num_blocks_total


def test_a_prompt_extending_a_finished_one_is_counted_as_served_by_the_prefix_cache(
    engines: tuple[VllmEngine, VllmEngine],
) -> None:
    """The step reports count a fresh request's prompt tokens and those vLLM's prefix cache
    served (full blocks of a finished request's prompt), and nothing for a migrated-in one."""
    source, target = engines
    first = request("turn-1", max_tokens=4, prompt=prompt_for("turn-1", 100))
    second = request("turn-2", max_tokens=4, prompt=first.prompt_token_ids + prompt_for("x", 20))
    counted: list[tuple[int, int]] = []
    for req in (first, second):
        transcript = Transcript()
        transcript.start(source, req)
        totals = [0, 0]
        while source.has_unfinished():
            report = source.step()
            transcript.record(report)
            totals[0] += report.prompt_tokens
            totals[1] += report.prompt_tokens_cached
        counted.append((totals[0], totals[1]))
    assert counted == [(100, 0), (120, 96)]  # 3 full blocks of 32 of the first prompt
    transcript = Transcript()
    transcript.start(source, request("moved-in", max_tokens=40))
    transcript.step_until(source, "moved-in", 5)
    snapshot = source.export_kv("moved-in")
    target.import_kv(snapshot)
    reports = []
    while target.has_unfinished():
        reports.append(target.step())
    assert sum(r.prompt_tokens for r in reports) == 0
