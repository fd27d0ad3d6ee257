"""`cascade bench live`: replays a request trace against a running cascade-scheduler and
summarizes it with the simulator's definitions (`evaluation.summary`), so a live run and a
simulated run of the same trace can be compared key by key.

Each request is sent at its trace arrival time (times `time_scale`) with a prompt of
`prompt_len` deterministic token ids and `max_tokens = output_len`, `ignore_eos` on, so every
request produces exactly its trace's output length. Times are taken on this client's clock: a
request's arrival is when its call starts, its first token when the first message carrying tokens
arrives, its end when the last message arrives. So live latencies include the client-scheduler
link and the scheduler's own work, which the simulator does not model.

A request that fails (a gRPC error, a finish other than length or stop, a gap in the token
indexes) is counted under its cause in `failed_by_code`, never dropped silently.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from cascadeinfer import workloads
from cascadeinfer.cli import flags
from cascadeinfer.cli.arrival import add_arrival_arguments, gamma_cv
from cascadeinfer.cli.client import add_connection_args
from cascadeinfer.evaluation.simbench import WHOLE_TRACE, make_trace
from cascadeinfer.evaluation.summary import RequestRecord, summarize
from cascadeinfer.proto.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from cascadeinfer.security import TlsFiles, aio_channel, read_caller_token, token_metadata
from cascadeinfer.traces import TraceEntry

if TYPE_CHECKING:
    from cascadeinfer.proto.v1.scheduler_pb2_grpc import SchedulerServiceAsyncStub

Trace = Sequence[TraceEntry]
PromptBuilder = Callable[[int, int], list[int]]

DEFAULT_PRESET_REQUESTS = 200
NO_LENGTH_LIMIT = 1 << 31
"""--max-len when none is given: no request is clamped."""
COMPLETE = (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP)


def default_prompt(index: int, length: int) -> list[int]:
    """Request `index`'s prompt: ids in [1, 250], so they fit even a byte-sized vocabulary."""
    return [(index * 31 + k) % 250 + 1 for k in range(length)]


def session_prompt(session: int, length: int) -> list[int]:
    """A prompt of session `session`: every turn's prompt starts with the same stream of ids
    in [1, 250], so it extends the previous turn's prompt and the engine's prefix cache can
    serve that part (the previous answer's tokens, which the replay cannot know in advance,
    are not in it); streams of different sessions differ from their first ids."""
    rng = random.Random(session)
    return [rng.randrange(1, 251) for _ in range(length)]


def _request(
    run: str, i: int, entry: TraceEntry, prompt_token_ids: PromptBuilder
) -> scheduler_pb2.ClientGenerateRequest:
    """The replay's request for trace entry `i`, a turn of a session with its session key."""
    prompt_len, output_len = entry[1], entry[2]
    session = entry[3] if len(entry) == 6 else None
    ids = (
        prompt_token_ids(i, prompt_len) if session is None else session_prompt(session, prompt_len)
    )
    return scheduler_pb2.ClientGenerateRequest(
        request_id=f"replay-{run}-{i}",
        prompt_token_ids=scheduler_pb2.TokenIds(ids=ids),
        sampling=common_pb2.SamplingParams(max_tokens=output_len, ignore_eos=True),
        session_id="" if session is None else f"replay-{run}-session-{session}",
    )


@dataclass(frozen=True)
class LiveRecord(RequestRecord):
    """A summary record plus what the replay saw of the request (times from the replay start)."""

    index: int = 0
    prompt_len: int = 0
    max_tokens: int = 0
    error: str = ""
    """Empty for a completed request; else the gRPC code name or what went wrong."""
    server_ttft_s: float | None = None
    """The scheduler's own measurement, from its final message (no client link in it)."""
    server_e2e_s: float | None = None


async def _one(
    stub: SchedulerServiceAsyncStub,
    metadata: tuple[tuple[str, str], ...],
    index: int,
    request: scheduler_pb2.ClientGenerateRequest,
    t0: float,
    timeout_s: float,
) -> LiveRecord:
    arrival = time.perf_counter() - t0
    first: float | None = None
    num_tokens = 0
    last = scheduler_pb2.ClientGenerateResponse()
    error = ""
    try:
        async for r in stub.Generate(request, metadata=metadata, timeout=timeout_s):
            if r.tokens.token_ids:
                if first is None:
                    first = time.perf_counter() - t0
                if r.tokens.first_index != num_tokens and not error:
                    error = "TOKEN_GAP"
                num_tokens += len(r.tokens.token_ids)
            last = r
    except grpc.aio.AioRpcError as e:
        error = e.code().name
    end = time.perf_counter() - t0
    if not error and last.finish_reason not in COMPLETE:
        name = common_pb2.FinishReason.Name(last.finish_reason)
        error = "NO_FINISH" if last.finish_reason == 0 else name
    t = last.timings
    return LiveRecord(
        arrival_s=arrival,
        first_token_s=first,
        finished_s=None if error else end,
        num_output_tokens=num_tokens,
        num_migrations=t.num_migrations,
        index=index,
        prompt_len=len(request.prompt_token_ids.ids),
        max_tokens=request.sampling.max_tokens,
        error=error,
        server_ttft_s=t.ttft_s if last.HasField("timings") else None,
        server_e2e_s=t.total_s if last.HasField("timings") else None,
    )


async def _replay(
    address: str,
    trace: Trace,
    tls: TlsFiles,
    token: str,
    time_scale: float,
    timeout_s: float,
    prompt_token_ids: PromptBuilder,
) -> list[LiveRecord]:
    run = uuid.uuid4().hex[:8]  # concurrent replays against one scheduler must not collide
    requests = [_request(run, i, entry, prompt_token_ids) for i, entry in enumerate(trace)]
    metadata = token_metadata(token)
    async with aio_channel(address, tls) as channel:
        stub: SchedulerServiceAsyncStub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        # Fails fast (and with the right status) on a wrong address, token or certificate.
        await stub.GetClusterState(
            scheduler_pb2.GetClusterStateRequest(), metadata=metadata, timeout=30
        )
        t0 = time.perf_counter()
        tasks = []
        for i, ((arrival_s, *_lengths), request) in enumerate(zip(trace, requests, strict=True)):
            delay = t0 + arrival_s * time_scale - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(stub, metadata, i, request, t0, timeout_s)))
        return list(await asyncio.gather(*tasks))


def replay(
    address: str,
    trace: Trace,
    *,
    tls: TlsFiles | None = None,
    token: str = "",
    time_scale: float = 1.0,
    timeout_s: float = 600.0,
    prompt_token_ids: PromptBuilder = default_prompt,
) -> tuple[list[LiveRecord], float]:
    """Sends every `(arrival_s, prompt_len, output_len)` of `trace` at `arrival_s * time_scale`
    seconds after the start and waits for all (a turn of a session with its session key and a
    prompt extending the session's previous one, `session_prompt`); each call gets `timeout_s`. Returns the records in
    trace order and the makespan: first arrival to last completion, as the simulator's."""
    if time_scale < 0:
        raise ValueError(f"time_scale = {time_scale}: must be >= 0")
    if not trace:
        raise ValueError("the trace has no requests")
    records = asyncio.run(
        _replay(address, trace, tls or TlsFiles(), token, time_scale, timeout_s, prompt_token_ids)
    )
    finished = [r.finished_s for r in records if r.finished_s is not None]
    first_arrival = min(r.arrival_s for r in records)
    makespan = max(max(finished) - first_arrival, 0.0) if finished else 0.0
    return records, makespan


def add_live_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `cascade bench live` (connection, TLS and token flags included)."""
    add_connection_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--workload", help=f"preset: {workloads.describe_names()}")
    source.add_argument("--trace", help="JSONL trace file (arrival_s, prompt_len, output_len)")
    p.add_argument(
        "--rate",
        type=float,
        help="requests/s; required with --workload; with --trace, rescales its arrivals",
    )
    p.add_argument(
        "--requests",
        type=flags.num_requests,
        help=f"requests to send (preset default {DEFAULT_PRESET_REQUESTS}; trace: all)",
    )
    p.add_argument("--seed", type=flags.seed, default=0)
    add_arrival_arguments(p)
    p.add_argument(
        "--max-len",
        type=int,
        help="clamp each request to this many tokens of context (prompt to max-len - 1, then "
        "output to what is left); use the cluster's max_model_len, and the same value in the "
        "simulated run you compare with",
    )
    p.add_argument(
        "--time-scale", type=float, default=1.0, help="send at arrival_s x this (2: half the rate)"
    )
    p.add_argument("--timeout-s", type=float, default=600.0, help="deadline of each request")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def trace_from_args(args: argparse.Namespace) -> list[TraceEntry]:
    """The trace `--workload`/`--trace` and the shaping flags describe, clamped to --max-len."""
    if args.workload is not None and args.rate is None:
        raise ValueError("--rate is required with --workload")
    if args.max_len is not None and args.max_len < 2:
        raise ValueError(f"--max-len {args.max_len}: must be >= 2")
    count = args.requests or (DEFAULT_PRESET_REQUESTS if args.workload else WHOLE_TRACE)
    return make_trace(
        args.workload or args.trace,
        num_requests=count,
        rate=args.rate,
        arrival=args.arrival,
        cv=gamma_cv(args),
        seed=args.seed,
        max_len=args.max_len or NO_LENGTH_LIMIT,
    )


def run_live(args: argparse.Namespace) -> dict[str, Any]:
    """Replays the trace the flags describe against `--address`; the summary keys of
    `evaluation.summary`, plus `wall_s`, `rate`, `requests`, `failed` and `failed_by_code`."""
    trace = trace_from_args(args)
    tls = TlsFiles(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca)
    tls.validate(is_server=False)
    started = time.perf_counter()
    records, makespan = replay(
        args.address,
        trace,
        tls=tls,
        token=read_caller_token(args.auth_token_file),
        time_scale=args.time_scale,
        timeout_s=args.timeout_s,
    )
    wall = time.perf_counter() - started
    failed = Counter(r.error for r in records if r.error)
    if failed:
        print(
            f"cascade bench live: {sum(failed.values())} of {len(records)} requests failed: "
            + ", ".join(f"{code} x{n}" for code, n in failed.most_common()),
            file=sys.stderr,
        )
    span = (trace[-1][0] - trace[0][0]) * args.time_scale
    if args.rate and args.time_scale > 0:
        rate = args.rate / args.time_scale
    else:
        # None (JSON null) for a trace that arrives at once, as `cascade bench sim` reports it.
        rate = (len(trace) - 1) / span if len(trace) > 1 and span > 0 else None
    return {
        **summarize(records, makespan),
        "wall_s": wall,
        "rate": rate,
        "requests": len(trace),
        "failed": sum(failed.values()),
        "failed_by_code": dict(failed),
    }
