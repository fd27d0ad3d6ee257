"""VllmMpEngine on real vLLM CPU engines whose engine core runs in its own process (AsyncLLM).

Three engines are built once for the module (each start takes about 40 s on CPU): a pair with
the cross-process KV connector (`move_kv`, the default) that requests move between, and one
without it (recompute only). Prefix caching is off, so a request's tokens do not depend on what
ran on an engine before, and the unmoved reference can run on either engine of the pair; the
target then holds none of the request's blocks, so its tokens depend on the imported bytes
(test_corrupted_blocks_change_the_tokens checks that they do).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from cascadeinfer.worker.engine import (
    EngineError,
    EngineRequest,
    ErrorCode,
    FinishReason,
    KVSnapshot,
    KVTransfer,
    SamplingSpec,
    StepReport,
)
from cascadeinfer.worker.engines.vllm_engine import SEEDED_DUMMY_LOAD_FORMAT, VllmEngineConfig
from cascadeinfer.worker.engines.vllm_mp_engine import VllmMpEngine
from cascadeinfer.worker.tiny_model import write_tiny_llama

BLOCK = 32
PROMPT_LEN = 45
MAX_TOKENS = 80


def prompt_for(name: str, length: int = PROMPT_LEN) -> tuple[int, ...]:
    rng = random.Random(zlib.crc32(name.encode()))
    return tuple(rng.randrange(3, 1024) for _ in range(length))


def request(request_id: str, max_tokens: int = MAX_TOKENS) -> EngineRequest:
    return EngineRequest(
        request_id, prompt_for(request_id), SamplingSpec(max_tokens=max_tokens, ignore_eos=True)
    )


class Transcript:
    """Every request's tokens as the step reports tell them, checking that indexes run on."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.finish: dict[str, FinishReason] = {}

    def start(self, engine: VllmMpEngine, req: EngineRequest) -> None:
        engine.add_request(req)
        self.tokens.setdefault(req.request_id, list(req.output_token_ids))

    def record(self, report: StepReport) -> None:
        for p in report.progress:
            tokens = self.tokens[p.request_id]
            assert p.first_index == len(tokens), f"{p.request_id}: gap or overlap"
            tokens.extend(p.new_token_ids)
            if p.finish_reason is not None:
                self.finish[p.request_id] = p.finish_reason

    def step_until(self, engine: VllmMpEngine, request_id: str, num_tokens: int) -> None:
        while len(self.tokens[request_id]) < num_tokens:
            self.record(engine.step())

    def finish_all(self, engine: VllmMpEngine) -> None:
        while engine.has_unfinished():
            self.record(engine.step())


@pytest.fixture(scope="module")
def mp_config(tmp_path_factory: pytest.TempPathFactory) -> VllmEngineConfig:
    model = write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    return VllmEngineConfig(
        model=str(model),
        served_model_name="tiny",
        load_format=SEEDED_DUMMY_LOAD_FORMAT,
        block_size=BLOCK,
        max_model_len=1024,
        num_blocks=64,
        enable_prefix_caching=False,
        multiprocess=True,
    )


@pytest.fixture(scope="module")
def mp_pair(mp_config: VllmEngineConfig) -> Iterator[tuple[VllmMpEngine, VllmMpEngine]]:
    source = VllmMpEngine(mp_config)
    try:
        target = VllmMpEngine(mp_config)
    except BaseException:
        source.shutdown()
        raise
    yield source, target
    target.shutdown()
    source.shutdown()


@pytest.fixture(scope="module")
def recompute_only(mp_config: VllmEngineConfig) -> Iterator[VllmMpEngine]:
    engine = VllmMpEngine(replace(mp_config, move_kv=False))
    yield engine
    engine.shutdown()


def blocks_in_use(engine: VllmMpEngine) -> int:
    """KV blocks vLLM holds while one fresh 1-block request runs, less that request's own:
    what earlier requests left allocated (an idle engine reports no usage of its own, and
    blocks an export holds until the ranks sent them would show here)."""
    for attempt in range(5):
        transcript = Transcript()
        # 10 prompt + 20 output tokens: one block of 32 for its whole life.
        probe = EngineRequest(
            f"probe-{attempt}",
            prompt_for("probe", 10),
            SamplingSpec(max_tokens=20, ignore_eos=True),
        )
        transcript.start(engine, probe)
        used = None
        while engine.has_unfinished():
            report = engine.step()
            transcript.record(report)
            if report.num_running:
                # The last report that shows it running: an abort just before the probe may
                # still be freeing its blocks in the engine core during the probe's first
                # steps (2 blocks seen once in CI), and a leak lasts the probe's whole life.
                used = report.kv_blocks_used
        if used is not None:  # else it ran whole between two of our reads: try again
            return used - 1
    raise AssertionError("no step report showed the probe running")


@pytest.fixture()
def engines(
    mp_pair: tuple[VllmMpEngine, VllmMpEngine],
) -> Iterator[tuple[VllmMpEngine, VllmMpEngine]]:
    """The pair, idle, checked to hold no requests and no blocks afterwards (no leak on either
    side, delayed frees of exports included)."""
    source, target = mp_pair
    yield source, target
    assert not source.has_unfinished() and not target.has_unfinished()
    assert (blocks_in_use(source), blocks_in_use(target)) == (0, 0)


def unmoved(engine: VllmMpEngine, req: EngineRequest) -> list[int]:
    transcript = Transcript()
    transcript.start(engine, req)
    transcript.finish_all(engine)
    assert transcript.finish[req.request_id] is FinishReason.LENGTH
    return transcript.tokens[req.request_id]


def test_the_model_runs_in_other_processes(engines: tuple[VllmMpEngine, VllmMpEngine]) -> None:
    source, target = engines
    pids = source.engine_core_pids() + target.engine_core_pids()
    assert os.getpid() not in pids and len(set(pids)) == 2
    assert source.num_blocks_total == 63  # num_blocks = 64, less vLLM's null block
    layout = source.layout
    assert (layout.num_layers, layout.num_kv_heads, layout.head_size) == (2, 2, 32)
    assert layout.block_bytes == 2 * 2 * BLOCK * 2 * 32 * 2
    assert layout == target.layout and layout.backend == "vllm-mp-tp1"
    assert source.can_move_kv


def test_tokens_match_the_in_process_engine(
    engines: tuple[VllmMpEngine, VllmMpEngine], mp_config: VllmEngineConfig, tmp_path: Path
) -> None:
    """The same request on the in-process engine (built in a fresh process, as it needs
    VLLM_ENABLE_V1_MULTIPROCESSING=0) gives the same greedy tokens, and depends on its prompt."""
    source, _ = engines
    req = request("same-as-in-process")
    tokens = unmoved(source, req)
    config = replace(mp_config, multiprocess=False, enable_prefix_caching=True)
    (tmp_path / "job.json").write_text(
        json.dumps(
            {
                "config": config.__dict__,
                "prompt": list(req.prompt_token_ids),
                "max_tokens": MAX_TOKENS,
            }
        )
    )
    out = subprocess.run(
        [sys.executable, "-c", _IN_PROCESS, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "tokens.json").read_text()) == tokens
    other = unmoved(source, replace(req, prompt_token_ids=(5, *req.prompt_token_ids[1:])))
    assert other != tokens and len(set(tokens)) > MAX_TOKENS // 2


_IN_PROCESS = """
import json, sys
from pathlib import Path
from cascadeinfer.worker.engine import EngineRequest, SamplingSpec
from cascadeinfer.worker.engines.vllm_engine import VllmEngine, VllmEngineConfig
directory = Path(sys.argv[1])
job = json.loads((directory / "job.json").read_text())
engine = VllmEngine(VllmEngineConfig(**job["config"]))
sampling = SamplingSpec(max_tokens=job["max_tokens"], ignore_eos=True)
engine.add_request(EngineRequest("r", tuple(job["prompt"]), sampling))
tokens = []
while engine.has_unfinished():
    for p in engine.step().progress:
        tokens.extend(p.new_token_ids)
(directory / "tokens.json").write_text(json.dumps(tokens))
engine.shutdown()
"""


@pytest.mark.parametrize("hops", [1, 2, 3])
@pytest.mark.parametrize("mode", ["kv", "precopy", "rank-to-rank", "recompute"])
def test_migrated_request_yields_the_unmoved_tokens(
    engines: tuple[VllmMpEngine, VllmMpEngine], hops: int, mode: str
) -> None:
    source, target = engines
    rid = f"hops-{hops}-{mode}"
    reference = unmoved(target, request(rid))
    transcript = Transcript()
    transcript.start(source, request(rid))
    where = [source, target]
    for hop in range(hops):
        here, there = where[hop % 2], where[(hop + 1) % 2]
        # A different offset in the last block on each hop (the stop lands a token or two later).
        transcript.step_until(here, rid, 7 + 19 * hop)
        pre: list[bytes] = []
        if mode == "precopy":  # full blocks first, while it decodes on
            pre = here.copy_full_blocks(rid, 0)
            assert len(pre) >= 1
            transcript.step_until(here, rid, len(transcript.tokens[rid]) + 3)
        if mode == "rank-to-rank":  # the same, each rank sending to the peer's rank
            peer = there.kv_peer
            assert peer is not None
            transfer = KVTransfer(peer, f"{rid}-{hop}")
            num_pre = here.send_full_blocks(rid, 0, transfer)
            assert num_pre >= 1
            transcript.step_until(here, rid, len(transcript.tokens[rid]) + 3)
            snapshot = here.export_kv_to(rid, num_pre, transfer)
            assert snapshot.transfer_id == transfer.transfer_id and snapshot.blocks == []
        else:
            rest = here.export_kv(rid, skip_blocks=len(pre))
            snapshot = replace(rest, blocks=pre + rest.blocks)
        transcript.record(here.step())  # the tokens computed until the stop took effect
        assert list(snapshot.request.output_token_ids) == transcript.tokens[rid]
        assert snapshot.request.output_token_ids == tuple(reference[: len(transcript.tokens[rid])])
        cached = snapshot.request.context_len - 1
        assert snapshot.num_cached_tokens == cached
        if mode != "rank-to-rank":
            assert len(snapshot.blocks) == -(-cached // BLOCK)
        assert not here.has_unfinished()
        if mode != "recompute":
            there.import_kv(snapshot)
        else:
            there.add_request(snapshot.request)
    transcript.finish_all(where[hops % 2])
    assert transcript.tokens[rid] == reference
    assert transcript.finish[rid] is FinishReason.LENGTH


def exported_midway(
    engines: tuple[VllmMpEngine, VllmMpEngine], rid: str, num_tokens: int
) -> tuple[list[int], Transcript, KVSnapshot]:
    """The unmoved tokens of request `rid` (run on the target), and the same request run on the
    source for num_tokens tokens, then exported: its transcript so far and its snapshot."""
    source, target = engines
    reference = unmoved(target, request(rid))
    transcript = Transcript()
    transcript.start(source, request(rid))
    transcript.step_until(source, rid, num_tokens)
    snapshot = source.export_kv(rid)
    transcript.record(source.step())  # the tokens computed until the stop took effect
    return reference, transcript, snapshot


def test_corrupted_blocks_change_the_tokens(engines: tuple[VllmMpEngine, VllmMpEngine]) -> None:
    """Proves the imported bytes are what the target attends to (not a silent recompute)."""
    _, target = engines
    reference, transcript, snapshot = exported_midway(engines, "corrupt", 20)
    num_before = len(snapshot.request.output_token_ids)
    target.import_kv(replace(snapshot, blocks=[bytes(len(b)) for b in snapshot.blocks]))
    transcript.finish_all(target)
    assert transcript.tokens["corrupt"][:num_before] == reference[:num_before]
    assert transcript.tokens["corrupt"][num_before:] != reference[num_before:]


def test_bytes_that_never_arrive_are_recomputed(
    engines: tuple[VllmMpEngine, VllmMpEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """kv_load_failure_policy = recompute: a load whose bytes are lost (the side channel cut)
    recomputes the tokens, and the request still yields the unmoved tokens."""
    _, target = engines
    reference, transcript, snapshot = exported_midway(engines, "lost", 15)
    channel = target._channel
    assert channel is not None
    monkeypatch.setattr(channel, "send_import", lambda migration_id, blocks: None)
    target.import_kv(snapshot)
    transcript.finish_all(target)
    assert transcript.tokens["lost"] == reference


def test_an_import_waits_for_its_bytes_without_stalling_the_batch(
    engines: tuple[VllmMpEngine, VllmMpEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The target loads asynchronously: while an imported request's bytes are late, the
    requests already running there go on decoding and the imported one waits (no tokens, no
    recompute); the bytes, once they come, are the ones it attends to (zeroed bytes sent late
    change its tokens, so they were not recomputed)."""
    _, target = engines
    reference, transcript, snapshot = exported_midway(engines, "late", 15)
    num_before = len(transcript.tokens["late"])
    transcript.start(target, request("neighbour", max_tokens=200))
    transcript.step_until(target, "neighbour", 3)
    channel = target._channel
    assert channel is not None
    held: list[tuple[str, list[bytes]]] = []
    send_import = channel.send_import
    monkeypatch.setattr(channel, "send_import", lambda m, blocks: held.append((m, blocks)))
    target.import_kv(snapshot)
    neighbour_at_import = len(transcript.tokens["neighbour"])
    transcript.step_until(target, "neighbour", neighbour_at_import + 20)
    assert len(transcript.tokens["late"]) == num_before  # waiting for its bytes
    (migration_id, blocks) = held[0]
    send_import(migration_id, [bytes(len(b)) for b in blocks])
    transcript.finish_all(target)
    assert transcript.tokens["late"][:num_before] == reference[:num_before]
    assert len(transcript.tokens["late"]) == len(reference)
    assert transcript.tokens["late"][num_before:] != reference[num_before:]


def test_export_whose_bytes_never_come_resumes_by_recompute(
    engines: tuple[VllmMpEngine, VllmMpEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The side channel breaks after the stop (after a pre-copy, too): the export still hands
    back the request, with no cached tokens, and resuming it recomputes the unmoved tokens."""
    source, target = engines
    reference = unmoved(target, request("cut"))
    transcript = Transcript()
    transcript.start(source, request("cut"))
    transcript.step_until(source, "cut", 15)
    pre = source.copy_full_blocks("cut", 0)
    channel = source._channel
    assert channel is not None and pre

    def cut(tag: str, timeout_s: float) -> list[bytes]:
        raise RuntimeError("side channel cut")

    monkeypatch.setattr(channel, "receive_export", cut)
    rest = source.export_kv("cut", skip_blocks=len(pre))
    transcript.record(source.step())
    assert rest.num_cached_tokens == 0 and rest.blocks == []
    assert list(rest.request.output_token_ids) == transcript.tokens["cut"]
    source.import_kv(replace(rest, blocks=pre))  # as migrate_out resumes it on failure
    transcript.finish_all(source)
    assert transcript.tokens["cut"] == reference


def test_a_peer_without_the_ticket_is_refused_and_the_request_runs_on(
    engines: tuple[VllmMpEngine, VllmMpEngine],
) -> None:
    """A transfer to the target's ranks with a wrong ticket: the pre-copy reports the refusal
    (before any stop, so migration can take the daemons' road), and an export so sent comes
    back with no cached tokens, so the request resumes by recompute with the unmoved tokens.
    The target's ranks keep nothing of it."""
    source, target = engines
    peer = target.kv_peer
    assert peer is not None and len(peer.endpoints) == 1 and len(peer.server_key) == 40
    assert peer.endpoints[0].startswith("tcp://127.0.0.1:")
    forged = KVTransfer(replace(peer, ticket=b"0" * len(peer.ticket)), "forged")
    reference = unmoved(target, request("forged"))
    transcript = Transcript()
    transcript.start(source, request("forged"))
    transcript.step_until(source, "forged", 15)
    with pytest.raises(RuntimeError, match="refused"):
        source.send_full_blocks("forged", 0, forged)
    rest = source.export_kv_to("forged", 0, forged)
    transcript.record(source.step())
    assert rest.num_cached_tokens == 0 and rest.blocks == [] and rest.transfer_id is None
    source.import_kv(rest)  # as migrate_out resumes it on failure: by recompute
    transcript.finish_all(source)
    assert transcript.tokens["forged"] == reference


def test_refused_imports_take_nothing_and_the_source_resumes(
    engines: tuple[VllmMpEngine, VllmMpEngine],
) -> None:
    source, target = engines
    reference = unmoved(target, request("refused"))
    transcript = Transcript()
    transcript.start(source, request("refused"))
    transcript.step_until(source, "refused", 12)
    with pytest.raises(EngineError) as error:
        source.export_kv("refused", skip_blocks=99)
    assert error.value.code is ErrorCode.INVALID_ARGUMENT
    snapshot = source.export_kv("refused")
    transcript.record(source.step())
    bad = [
        (replace(snapshot, blocks=snapshot.blocks[:-1]), ErrorCode.INVALID_ARGUMENT),
        (replace(snapshot, blocks=[b[:-1] for b in snapshot.blocks]), ErrorCode.INVALID_ARGUMENT),
        (
            replace(snapshot, layout=replace(snapshot.layout, block_size=64)),
            ErrorCode.FAILED_PRECONDITION,
        ),
    ]
    for snap, code in bad:
        with pytest.raises(EngineError) as error:
            target.import_kv(snap)
        assert error.value.code is code
    assert not target.has_unfinished()
    source.import_kv(snapshot)  # as migrate_out resumes a request whose move failed
    transcript.finish_all(source)
    assert transcript.tokens["refused"] == reference


def test_recompute_only_engine_refuses_kv_and_the_request_runs_on(
    recompute_only: VllmMpEngine, engines: tuple[VllmMpEngine, VllmMpEngine]
) -> None:
    source, target = engines
    assert not recompute_only.can_move_kv
    assert recompute_only.layout.backend == "vllm-mp-tp1+mp-recompute-only"
    reference = unmoved(target, request("kv-refused"))
    transcript = Transcript()
    transcript.start(recompute_only, request("kv-refused"))
    transcript.step_until(recompute_only, "kv-refused", 10)
    with pytest.raises(EngineError) as error:
        recompute_only.copy_full_blocks("kv-refused", 0)
    assert error.value.code is ErrorCode.FAILED_PRECONDITION
    transcript.step_until(recompute_only, "kv-refused", 20)
    snapshot = recompute_only.export_kv("kv-refused")
    assert snapshot.blocks == [] and snapshot.num_cached_tokens == 0
    transcript.record(recompute_only.step())
    assert not recompute_only.has_unfinished()
    kv_snapshot = KVSnapshot(request("kv-import"), source.layout, PROMPT_LEN - 1, [b"\0"] * 2)
    with pytest.raises(EngineError) as error:
        recompute_only.import_kv(kv_snapshot)
    assert error.value.code is ErrorCode.FAILED_PRECONDITION
    recompute_only.import_kv(snapshot)  # no blocks: resumed by recompute
    transcript.finish_all(recompute_only)
    assert transcript.tokens["kv-refused"] == reference
    assert recompute_only.num_free_blocks() == recompute_only.num_blocks_total


def test_a_recompute_export_delivers_the_tokens_it_takes(recompute_only: VllmMpEngine) -> None:
    """Outputs that reached the request's collector since the last step (any command that runs
    AsyncLLM's loop lets them in: adding another request, say) go into the snapshot, so they
    must reach the request's stream too: the target resumes after them."""
    reference = unmoved(recompute_only, request("taken", 400))
    transcript = Transcript()
    transcript.start(recompute_only, request("taken", 400))
    transcript.step_until(recompute_only, "taken", 10)
    # The engine core decodes on; let its outputs in without a step taking them.
    recompute_only._aloop.run_until_complete(asyncio.sleep(0.1))
    snapshot = recompute_only.export_kv("taken")
    assert len(snapshot.request.output_token_ids) > len(transcript.tokens["taken"])
    while recompute_only.has_unfinished():
        transcript.record(recompute_only.step())
    assert transcript.tokens["taken"] == list(snapshot.request.output_token_ids)
    recompute_only.import_kv(snapshot)
    transcript.finish_all(recompute_only)
    assert transcript.tokens["taken"] == reference


def test_batch_usage_and_abort(engines: tuple[VllmMpEngine, VllmMpEngine]) -> None:
    """Several requests decode together; the step feed reports their blocks; an abort frees
    them and leaves the others running."""
    source, _ = engines
    transcript = Transcript()
    names = [f"batch-{i}" for i in range(4)]
    for name in names:
        transcript.start(source, request(name, max_tokens=200))
    seen_running, seen_used = 0, 0
    while min(len(transcript.tokens[n]) for n in names) < 20:
        report = source.step()
        transcript.record(report)
        seen_running = max(seen_running, report.num_running)
        seen_used = max(seen_used, report.kv_blocks_used)
    assert seen_running == 4
    assert seen_used >= 4 * 2  # 45 + 20 tokens each: at least 2 blocks of 32
    assert source.num_free_blocks() <= source.num_blocks_total - 8
    for name in names[:3]:
        source.abort(name)
    assert source.has_unfinished()
    count = len(transcript.tokens[names[3]])
    while len(transcript.tokens[names[3]]) < count + 5:
        report = source.step()
        transcript.record(report)
        assert {p.request_id for p in report.progress} <= {names[3]}
    assert report.kv_blocks_used in (3, 4)  # only the last request's blocks are held
    source.abort(names[3])
    assert not source.has_unfinished()


def test_error_codes(engines: tuple[VllmMpEngine, VllmMpEngine]) -> None:
    source, _ = engines

    def code_of(call: Callable[[], object]) -> ErrorCode:
        with pytest.raises(EngineError) as error:
            call()
        return error.value.code

    assert code_of(lambda: source.abort("nobody")) is ErrorCode.NOT_FOUND
    assert code_of(lambda: source.export_kv("nobody")) is ErrorCode.NOT_FOUND
    assert code_of(lambda: source.copy_full_blocks("nobody", 0)) is ErrorCode.NOT_FOUND
    bad = replace(request("bad"), prompt_token_ids=(1, 1024))
    assert code_of(lambda: source.add_request(bad)) is ErrorCode.INVALID_ARGUMENT
    too_long = replace(request("long"), prompt_token_ids=(3,) * 1024)
    assert code_of(lambda: source.add_request(too_long)) is ErrorCode.INVALID_ARGUMENT
    # Refused by vLLM itself, with an error that is no ValueError (VLLMValidationError): it
    # was INTERNAL, which the scheduler retried for as long as the client waited.
    for name, sampling in [
        ("stop-oov", SamplingSpec(max_tokens=5, stop_token_ids=(1024,))),
        ("too-hot", SamplingSpec(max_tokens=5, temperature=2.5)),
    ]:
        refused = EngineRequest(name, prompt_for(name), sampling)
        assert code_of(partial(source.add_request, refused)) is ErrorCode.INVALID_ARGUMENT
    source.add_request(request("codes"))
    assert code_of(lambda: source.add_request(request("codes"))) is ErrorCode.ALREADY_EXISTS
    source.abort("codes")


def test_tensor_parallelism_needs_the_multiprocess_engine(mp_config: VllmEngineConfig) -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        replace(mp_config, multiprocess=False, tensor_parallel_size=2).validate()


def test_tensor_parallel_ranks_send_and_receive_their_shards(
    mp_config: VllmEngineConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tensor parallelism 2 on CPU: two model-worker processes, each holding half the KV heads.
    A request exported from it (each rank sends its shard, joined per block) and imported back
    (each rank gets its slice) yields the unmoved tokens, and zeroed shards change them; so does
    one sent rank to rank (each rank's shard to the endpoint of its number). vLLM for
    CPU binds each rank's threads to its own cores: one core each here."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("tensor parallelism 2 on CPU needs 2 cores")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"{cpus[0]}|{cpus[1]}")
    # Its rank-to-rank channel unencrypted (the pair's is encrypted): both kinds are covered.
    engine = VllmMpEngine(replace(mp_config, tensor_parallel_size=2, kv_peer_encrypt=False))
    try:
        assert len(set(engine.engine_core_pids())) == 2
        assert engine.layout.backend == "vllm-mp-tp2" and engine.layout.num_kv_heads == 2
        reference = unmoved(engine, request("tp"))
        transcript = Transcript()
        transcript.start(engine, request("tp"))
        transcript.step_until(engine, "tp", 20)
        snapshot = engine.export_kv("tp")
        transcript.record(engine.step())
        engine.import_kv(snapshot)
        transcript.finish_all(engine)
        assert transcript.tokens["tp"] == reference
        zeroed = replace(
            snapshot,
            request=replace(snapshot.request, request_id="tp-zeroed"),
            blocks=[bytes(len(b)) for b in snapshot.blocks],
        )
        engine.import_kv(zeroed)
        transcript.tokens["tp-zeroed"] = list(snapshot.request.output_token_ids)
        transcript.finish_all(engine)
        assert transcript.tokens["tp-zeroed"] != reference
        # Rank to rank, to the engine's own ranks: each rank sends its shard to its own
        # number's endpoint.
        peer = engine.kv_peer
        assert peer is not None and len(peer.endpoints) == 2 and peer.server_key == b""
        transcript.start(engine, request("tp-direct"))
        transcript.step_until(engine, "tp-direct", 20)
        transfer = KVTransfer(peer, "tp-direct")
        direct = engine.export_kv_to("tp-direct", 0, transfer)
        transcript.record(engine.step())
        assert direct.transfer_id == "tp-direct" and direct.num_cached_tokens > 0
        engine.import_kv(direct)
        transcript.finish_all(engine)
        assert transcript.tokens["tp-direct"] == unmoved(engine, request("tp-direct"))
        assert blocks_in_use(engine) == 0
    finally:
        engine.shutdown()


def test_a_prompt_extending_a_finished_one_is_counted_as_served_by_the_prefix_cache(
    mp_config: VllmEngineConfig,
) -> None:
    """As with the in-process engine: the step reports count a fresh request's prompt tokens
    and those the engine core's prefix cache served (`RequestOutput.num_cached_tokens`). An
    engine of its own: the pair runs without prefix caching."""
    engine = VllmMpEngine(replace(mp_config, enable_prefix_caching=True))
    try:
        first_prompt = prompt_for("turn-1", 100)
        counted: list[tuple[int, int]] = []
        for name, prompt in (
            ("turn-1", first_prompt),
            ("turn-2", first_prompt + prompt_for("x", 20)),
        ):
            transcript = Transcript()
            transcript.start(engine, EngineRequest(name, prompt, SamplingSpec(4, ignore_eos=True)))
            totals = [0, 0]
            while engine.has_unfinished():
                report = engine.step()
                transcript.record(report)
                totals[0] += report.prompt_tokens
                totals[1] += report.prompt_tokens_cached
            counted.append((totals[0], totals[1]))
        assert counted == [(100, 0), (120, 96)]  # 3 full blocks of 32 of the first prompt
    finally:
        engine.shutdown()
