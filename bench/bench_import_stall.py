"""What an imported request costs the requests already decoding on the target (issue 12).

Two multiprocess vLLM engines (`VllmMpEngine`, driven directly, no daemons) with Llama-3-8B's KV
geometry (128 KiB of KV per token, `bench_migration.py --kv-geometry 8b`). The target decodes
NEIGHBOURS requests; a request of each context length is exported from the source and imported
into the target. Reported per length (median of --repeats):

- `step ms`: the target's median step before the import (steps that advanced the neighbours);
- `worst step ms`: its longest step from the import until the imported request's first token:
  what the import stalled the neighbours by (the daemon's own `import_kv` call included, since
  the neighbours' tokens wait for it too);
- `import ms`: the daemon's `import_kv` call (sending the bytes to the ranks, adding the request);
- `to first token ms`: from the import call to the imported request's first new token.

    python bench/bench_import_stall.py [--lengths 1024,2048,4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_migration import LLAMA_8B_KV
from cascadeinfer.worker.engine import EngineRequest, SamplingSpec
from cascadeinfer.worker.engines.vllm_engine import SEEDED_DUMMY_LOAD_FORMAT, VllmEngineConfig
from cascadeinfer.worker.engines.vllm_mp_engine import VllmMpEngine
from cascadeinfer.worker.tiny_model import write_tiny_llama

NEIGHBOURS = 4


def config_for(directory: Path, max_len: int) -> VllmEngineConfig:
    path = write_tiny_llama(directory, max_position_embeddings=max_len)
    config = path / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **LLAMA_8B_KV}))
    return VllmEngineConfig(
        model=str(path),
        served_model_name="llama-8b-kv",
        load_format=SEEDED_DUMMY_LOAD_FORMAT,
        max_model_len=max_len,
        enable_prefix_caching=False,
        # The migrated request and the neighbours, at 128 KiB a token, with room to spare.
        cpu_kv_cache_gib=-(-3 * max_len * 128 // 2**20),
        multiprocess=True,
    )


def one_import(source: VllmMpEngine, target: VllmMpEngine, length: int, tag: str) -> list[float]:
    neighbours = [f"{tag}-n{i}" for i in range(NEIGHBOURS)]
    for rid in neighbours:
        target.add_request(
            EngineRequest(rid, tuple(range(3, 35)), SamplingSpec(max_tokens=4000, ignore_eos=True))
        )
    steps = []
    for _ in range(30):
        started = time.perf_counter()
        report = target.step()
        if any(p.request_id in neighbours for p in report.progress):
            steps.append(time.perf_counter() - started)
    moved = f"{tag}-moved"
    prompt = tuple(3 + (i * 7919) % 1000 for i in range(length))
    source.add_request(EngineRequest(moved, prompt, SamplingSpec(max_tokens=64, ignore_eos=True)))
    num_out = 0
    while num_out < 5:
        num_out += sum(len(p.new_token_ids) for p in source.step().progress)
    snapshot = source.export_kv(moved)
    while source.has_unfinished():
        source.step()
    started = time.perf_counter()
    target.import_kv(snapshot)
    import_s = time.perf_counter() - started
    worst = import_s
    while True:
        step_started = time.perf_counter()
        report = target.step()
        worst = max(worst, time.perf_counter() - step_started)
        if any(p.request_id == moved and p.new_token_ids for p in report.progress):
            break
    first_token_s = time.perf_counter() - started
    for rid in [*neighbours, moved]:
        target.abort(rid)
    while target.has_unfinished():
        target.step()
    return [statistics.median(steps), worst, import_s, first_token_s]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="1024,2048,4096")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        config = config_for(Path(tmp) / "model", max(lengths) + 256)
        source = VllmMpEngine(config)
        target = VllmMpEngine(config)
        try:
            print("| context tokens | step ms | worst step ms | import ms | to first token ms |")
            print("|---|---|---|---|---|")
            for length in lengths:
                runs = [
                    one_import(source, target, length, f"L{length}-{r}")
                    for r in range(args.repeats)
                ]
                cells = " | ".join(
                    f"{statistics.median(c) * 1000:.1f}" for c in zip(*runs, strict=True)
                )
                print(f"| {length} | {cells} |", flush=True)
        finally:
            target.shutdown()
            source.shutdown()


if __name__ == "__main__":
    main()
