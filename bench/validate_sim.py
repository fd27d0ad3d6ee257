"""Simulator validation: one trace through the live system and through `cascadeinfer.simulate`,
summarized the same way (`cascadeinfer.evaluation.summary`), and the gap on mean end-to-end
latency (live minus simulated, over simulated).

Two cases, each a scheduler plus workers started as subprocesses on loopback (as `cascade up`
does), the trace replayed at its arrival times by `cascadeinfer.evaluation.live.replay`:

1. `sim`: sim workers sleeping each step's predicted time; goal: within 10%.
2. `vllm`: 2 vLLM-on-CPU workers (built-in tiny Llama, one OpenMP thread each); goal: within
   25%. Profile: --vllm-profile, else `profiles/cpu-vllm-tiny-llama-calibrated.json` when
   present, else `cpu-vllm-tiny-llama.json` (written for a larger model than the built-in one:
   expect the simulator to be far too slow). A matching one:
   `OMP_NUM_THREADS=1 cascade calibrate --engine vllm --out FILE`.

3. `vllm-sessions`: the same 2 vLLM workers with prefix caching (the worker's default) on a
   multi-turn trace (`session_trace`: short conversations sized to the built-in model, each
   turn's prompt extending the previous one), stages that the conversations grow across; the
   same 25% goal, plus the prefix-cache hit rate: live from the workers'
   `cascade_worker_prompt_tokens{,_cached}` counters over the replay, simulated from the
   simulator's per-instance prefix caches (`prefix_cache_hit_rate`).

Both sides get the same trace (a preset clamped to the cluster's length limit with the clamp
`cascade bench` uses), the same profile file (its KV pool, block size and length limit set to
what the workers report), the same instance count and the same cascade policy object, built by
`cascadeinfer.policies.build_policy` from the same explicit stages.

The profile is calibrated as an operator would: the engine's own profile (`cascade calibrate
--engine`, or a built-in), then what the worker daemon adds to each step, measured on worker 0
before the scheduler starts (`cascade calibrate --worker`, `cascadeinfer.calibrate.serving`).
The scheduler and the simulator run on that serving profile; the primary gap is theirs. The
simulator is also run on the engine profile alone (`sim_with_engine_profile`), to show what the
daemon's overhead is worth, and on a serving profile measured again right after the replay
(`sim_with_calibration_after`), to show how far the machine's speed moved while it ran. Also reported: client send lag, client-link time (client e2e minus
the scheduler's own), per-request live/sim ratios, decode-time ratio, engine steps per worker,
CPU seconds of each daemon and load averages (other jobs on the machine show there).

    .venv/bin/python bench/validate_sim.py --json-out validation.json   # both cases
    .venv/bin/python bench/validate_sim.py --case sim --sim-rates 10
    .venv/bin/python bench/validate_sim.py --case vllm-sessions --vllm-profile ENGINE.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
from bench_scheduler import cpu_seconds, free_port
from cascadeinfer import CostProfile, generate_trace, load_profile, simulate
from cascadeinfer.calibrate.serving import measure_serving_overhead, serving_profile
from cascadeinfer.evaluation.live import LiveRecord, replay
from cascadeinfer.evaluation.simbench import clamp
from cascadeinfer.evaluation.summary import SUMMARY_KEYS, summarize
from cascadeinfer.launcher import SCHEDULER, WORKER, Daemon, start_many
from cascadeinfer.policies import FixedStage, build_policy
from cascadeinfer.proto.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2
from cascadeinfer.traces import TraceEntry

from tests.worker.metrics import prompt_counters, step_counters

PROFILES = Path(__file__).resolve().parents[1] / "python" / "cascadeinfer" / "profiles"


@dataclass
class Case:
    name: str
    engine_args: list[str]
    num_workers: int
    stages: str
    """MIN-MAX:WORKERS,... as the scheduler's --stages."""
    profile_doc: dict[str, Any]
    """The profile as JSON; limits the workers report override it (see `fit_limits`)."""
    workload: str
    num_requests: int
    rate: float
    max_len: int
    seed: int
    goal: float
    timeout_s: float
    warm_up_tokens: int = 0
    env: dict[str, str] = field(default_factory=dict)
    """Set in the workers' environment."""
    sessions: bool = False
    """Replay `session_trace` (multi-turn) instead of the `workload` preset."""
    notes: list[str] = field(default_factory=list)


def session_trace(
    num_sessions: int,
    rate: float,
    seed: int,
    max_len: int,
    min_gap_s: float = 2.0,
    think_s: float = 4.0,
) -> list[TraceEntry]:
    """Conversations sized to the built-in model: sessions start at `rate` per second
    (Poisson), 2-6 turns each, `min_gap_s` plus `think_s` seconds (exponential) between a
    turn's arrival and the next, so the answer (well under `min_gap_s` here) has come before
    the user writes again, as in a conversation; a first prompt of 100-300 tokens, outputs of 32-192 (six turns then stay within the
    model's 2,048 tokens), and each later prompt the previous one plus the previous output's
    length plus a new message of 16-64 tokens. The replay
    (`evaluation.live.session_prompt`) cannot send the previous answer's own tokens, so what a
    turn shares with the one before is that turn's prompt: `prefix_len` says so, and the
    simulator's cache serves no more than vLLM's can."""
    rng = random.Random(seed)
    entries: list[TraceEntry] = []
    start = 0.0
    for session in range(num_sessions):
        start += rng.expovariate(rate)
        at, prompt, prefix = start, rng.randint(100, 300), 0
        for turn in range(rng.randint(2, 6)):
            output = rng.randint(32, 192)
            if prompt + output >= max_len:
                break
            entries.append((at, prompt, output, session, turn, prefix))
            prefix, prompt = prompt, prompt + output + rng.randint(16, 64)
            at += min_gap_s + rng.expovariate(1.0 / think_s)
    entries.sort(key=lambda e: e[0])
    return entries


def parse_stages(text: str) -> list[FixedStage]:
    out = []
    for part in text.split(","):
        bounds, count = part.split(":")
        lo, hi = bounds.split("-")
        out.append(FixedStage(int(lo), int(hi), int(count)))
    return out


def fit_limits(case: Case, info: worker_pb2.WorkerInfo) -> dict[str, Any]:
    """The profile with the KV pool, block size and length limit the workers report, so the
    simulated engines hold what the live ones hold."""
    doc = dict(case.profile_doc)
    block = info.layout.block_size
    wanted = {
        "kv_block_size": block,
        "kv_capacity_tokens": info.kv_blocks_total * block,
        "kv_bytes_per_token": info.layout.block_bytes // block,
        "max_model_len": info.max_model_len,
    }
    for key, value in wanted.items():
        if doc[key] != value:
            case.notes.append(f"profile {key} {doc[key]} -> {value} (from the workers)")
            doc[key] = value
    return doc


def warm_up(daemons: list[Daemon], tokens: int) -> None:
    """One short request on each worker directly (vLLM's first steps are slower)."""
    for i, d in enumerate(daemons):
        request = worker_pb2.GenerateRequest(
            request_id=f"warm-{i}",
            prompt_token_ids=[(7 * k) % 250 + 1 for k in range(64)],
            sampling=common_pb2.SamplingParams(max_tokens=tokens, ignore_eos=True),
        )
        for _ in d.stub().Generate(request, timeout=120):
            pass


def calibrate_serving(
    worker: Daemon, metrics_port: int, engine_path: Path, label: str
) -> tuple[Path, dict[str, Any]]:
    """The engine profile in `engine_path` plus what `worker`'s daemon adds to each step,
    measured now (as `cascade calibrate --worker` does); the profile's path and the figures."""
    engine_doc = json.loads(engine_path.read_text())
    (t0, n0) = step_counters(metrics_port)
    overhead = measure_serving_overhead(worker.stub(), load_profile(str(engine_path)))
    (t1, n1) = step_counters(metrics_port)
    doc, notes = serving_profile(
        engine_doc,
        overhead,
        name=f"{engine_doc['name']}-serving",
        provenance=f"measured by bench/validate_sim.py on worker 0 {label} the replay",
    )
    path = engine_path.parent / f"serving-profile-{label}.json"
    path.write_text(json.dumps(doc, indent=2))
    measured = {
        "per_step_ms": 1e3 * overhead.per_step_s,
        "per_sequence_us": 1e6 * overhead.per_sequence_s,
        "notes": notes,
        "rounds": [
            {
                "batch_size": r.batch_size,
                "num_steps": r.num_steps,
                "cadence_ms": 1e3 * r.cadence_s,
                "engine_step_ms": 1e3 * r.engine_step_s,
                "engine_profile_ms": 1e3 * r.predicted_s,
            }
            for r in overhead.rounds
        ],
        "engine_step_ms_during_calibration": 1e3 * (t1 - t0) / (n1 - n0),
    }
    return path, measured


def live_run(case: Case, trace: list[TraceEntry], log_dir: Path) -> dict[str, Any]:
    base_path = log_dir / f"{case.name}-base-profile.json"
    base_path.write_text(json.dumps(case.profile_doc))
    engine_args = list(case.engine_args)
    if "sim" in engine_args:
        engine_args += ["--sim-profile", str(base_path)]
    saved = {k: os.environ.get(k) for k in case.env}
    os.environ.update(case.env)  # the launcher hands its environment to the daemons
    ports = [free_port() for _ in range(case.num_workers)]
    arg_lists = [[*engine_args, "--metrics-port", str(port)] for port in ports]
    try:
        workers = start_many(WORKER, arg_lists, log_dir)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    daemons = list(workers)
    try:
        info = workers[0].stub().GetInfo(worker_pb2.GetInfoRequest(), timeout=30)
        engine_doc = fit_limits(case, info)
        engine_path = log_dir / f"{case.name}-engine-profile.json"
        engine_path.write_text(json.dumps(engine_doc, indent=2))
        if case.warm_up_tokens:
            warm_up(workers, case.warm_up_tokens)
        # As an operator would: measure what the daemon adds to each step on one worker
        # (`cascade calibrate --worker`), and run scheduler and simulator on that profile.
        profile_path, serving = calibrate_serving(workers[0], ports[0], engine_path, "before")
        sched_args = [
            *("--workers", ",".join(d.address for d in workers)),
            *("--stages", case.stages, "--profile", str(profile_path)),
        ]
        scheduler = start_many(SCHEDULER, [sched_args], log_dir, timeout=120)[0]
        daemons.append(scheduler)
        steps_before = [step_counters(port) for port in ports]
        prompts_before = [prompt_counters(port) for port in ports]
        cpu_before = {d.process.pid: cpu_seconds(d.process.pid) for d in daemons}
        load_before = os.getloadavg()
        started = time.perf_counter()
        records, makespan = replay(scheduler.address, trace, timeout_s=case.timeout_s)
        wall = time.perf_counter() - started
        stub = scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(scheduler.address))
        state = stub.GetClusterState(scheduler_pb2.GetClusterStateRequest(), timeout=30)
        steps_after = [step_counters(port) for port in ports]
        prompts_after = [prompt_counters(port) for port in ports]
        prompt_tokens = sum(a[0] - b[0] for a, b in zip(prompts_after, prompts_before, strict=True))
        cached_tokens = sum(a[1] - b[1] for a, b in zip(prompts_after, prompts_before, strict=True))
        # Again after the replay: how far the machine's speed moved while it ran.
        after_path, serving_after = calibrate_serving(workers[0], ports[0], engine_path, "after")
        cpu = {
            d.process.pid: cpu_seconds(d.process.pid) - cpu_before[d.process.pid] for d in daemons
        }
        steps = [
            (t1 - t0, n1 - n0) for (t0, n0), (t1, n1) in zip(steps_before, steps_after, strict=True)
        ]
        return {
            "records": records,
            "makespan_s": makespan,
            "wall_s": wall,
            "profile_path": profile_path,
            "engine_profile_path": engine_path,
            "serving_overhead": serving,
            "after_profile_path": after_path,
            "serving_overhead_after": serving_after,
            "engine_steps": {
                "num_steps": [int(n) for _, n in steps],
                "busy_s": [t for t, _ in steps],
            },
            "cluster_migrations": state.num_migrations,
            "prefix_cache_hit_rate": cached_tokens / prompt_tokens if prompt_tokens else 0.0,
            "load_before": load_before,
            "load_after": os.getloadavg(),
            "cpu_s": {
                "scheduler": cpu[scheduler.process.pid],
                "workers": [cpu[w.process.pid] for w in workers],
            },
        }
    finally:
        for d in reversed(daemons):
            d.kill()


def sim_run(
    case: Case, trace: list[TraceEntry], profile_path: Path
) -> tuple[dict[str, float], dict[str, Any]]:
    """The simulator on the trace, with the profile in `profile_path`."""
    profile = load_profile(str(profile_path))
    instances = list(range(case.num_workers))
    policy = build_policy(
        "cascade",
        profile,
        instances,
        max_len=profile.max_model_len,
        stages=parse_stages(case.stages),
    )
    report = simulate(policy, profile, trace, instances)
    extra = {
        "per_request": report.requests(),
        "num_preemptions": report.num_preemptions,
        "num_unfinished": report.num_unfinished,
        "num_layout_changes": report.num_layout_changes,
        "failed_migrations_by_cause": report.failed_migrations_by_cause(),
        "makespan_s": report.makespan_s,
        "engine_steps": {
            "num_steps": report.instances()["num_steps"],
            "busy_s": report.instances()["busy_s"],
        },
    }
    return dict(report.summary()), extra


def relative(live: float, sim: float) -> float:
    return (live - sim) / sim if sim else math.nan


def diagnostics(
    trace: list[TraceEntry], records: list[LiveRecord], sim_requests: dict[str, Any]
) -> dict[str, Any]:
    """Where a gap comes from: pacing lag, the client link, and per-request pairs."""
    done = [r for r in records if not r.error]
    lag = [r.arrival_s - e[0] for r, e in zip(records, trace, strict=True)]
    link = [
        (r.e2e_s or 0.0) - r.server_e2e_s
        for r in done
        if r.server_e2e_s is not None and r.e2e_s is not None
    ]
    pairs = [
        (r.e2e_s, sim_requests["e2e_s"][r.index])
        for r in done
        if r.e2e_s is not None and not math.isnan(sim_requests["e2e_s"][r.index])
    ]
    ratios = sorted(live / sim for live, sim in pairs if sim > 0)
    decode = [
        (r.e2e_s - r.ttft_s, sim_requests["e2e_s"][r.index] - sim_requests["ttft_s"][r.index])
        for r in done
        if r.e2e_s is not None and r.ttft_s is not None and r.num_output_tokens > 1
    ]
    return {
        "send_lag_mean_ms": 1e3 * statistics.fmean(lag),
        "send_lag_max_ms": 1e3 * max(lag),
        "client_link_e2e_mean_ms": 1e3 * statistics.fmean(link) if link else math.nan,
        "per_request_e2e_ratio_median": statistics.median(ratios) if ratios else math.nan,
        "per_request_e2e_ratio_p10_p90": (
            [ratios[len(ratios) // 10], ratios[(9 * len(ratios)) // 10]] if ratios else []
        ),
        "decode_time_ratio": (
            sum(x for x, _ in decode) / sum(y for _, y in decode) if decode else math.nan
        ),
        "ttft_live_minus_sim_mean_ms": (
            1e3
            * statistics.fmean(
                (r.ttft_s or 0.0) - sim_requests["ttft_s"][r.index]
                for r in done
                if r.ttft_s is not None
            )
            if done
            else math.nan
        ),
    }


def step_comparison(live: dict[str, list[Any]], sim: dict[str, list[Any]]) -> dict[str, Any]:
    """Engine steps, live (the workers' own step timer: for vLLM the wall time of
    LLMEngine.step(), for sim the modelled sleep) against the simulator's, per worker in
    instance order and in total. Live engine time above the model with the same number of
    steps points at the engine (contention, model error); a daemon whose steps match but whose
    requests take longer points at the time between steps."""

    def mean_ms(busy: list[float], steps: list[int]) -> float:
        return 1e3 * sum(busy) / sum(steps) if sum(steps) else math.nan

    return {
        "live_num_steps": live["num_steps"],
        "sim_num_steps": sim["num_steps"],
        "live_busy_s": live["busy_s"],
        "sim_busy_s": sim["busy_s"],
        "live_mean_step_ms": mean_ms(live["busy_s"], live["num_steps"]),
        "sim_mean_step_ms": mean_ms(sim["busy_s"], sim["num_steps"]),
    }


def per_request(
    trace: list[TraceEntry], records: list[LiveRecord], sim_requests: dict[str, Any]
) -> list[dict[str, Any]]:
    """Both sides of every request, for looking at where they part (--json-out keeps them)."""
    return [
        {
            "arrival_s": a,
            "prompt_len": p,
            "output_len": o,
            "live_ttft_s": r.ttft_s,
            "live_e2e_s": r.e2e_s,
            "live_migrations": r.num_migrations,
            "live_error": r.error,
            "sim_ttft_s": sim_requests["ttft_s"][i],
            "sim_e2e_s": sim_requests["e2e_s"][i],
            "sim_migrations": sim_requests["num_migrations"][i],
        }
        for i, ((a, p, o, *_session), r) in enumerate(zip(trace, records, strict=True))
    ]


def run_case(case: Case, log_dir: Path) -> dict[str, Any]:
    if case.sessions:
        trace = session_trace(case.num_requests, case.rate, case.seed, case.max_len)
    else:
        trace = clamp(
            generate_trace(case.workload, case.num_requests, case.rate, "poisson", 1.0, case.seed),
            case.max_len,
        )
    print(
        f"[{case.name}] live run: {len(trace)} requests at {case.rate:g}/s ...",
        file=sys.stderr,
        flush=True,
    )
    live = live_run(case, trace, log_dir)
    records: list[LiveRecord] = live["records"]
    failed: dict[str, int] = {}
    for r in records:
        if r.error:
            failed[r.error] = failed.get(r.error, 0) + 1
    live_summary = {**summarize(records, live["makespan_s"]), "wall_s": live["wall_s"]}
    print(f"[{case.name}] simulating ...", file=sys.stderr, flush=True)
    sim_summary, sim_extra = sim_run(case, trace, live["profile_path"])
    gap = relative(live_summary["mean_e2e_s"], sim_summary["mean_e2e_s"])
    bare, _ = sim_run(case, trace, live["engine_profile_path"])
    after, _ = sim_run(case, trace, live["after_profile_path"])
    return {
        "case": case.name,
        "setup": {
            "engine_args": case.engine_args,
            "worker_env": case.env,
            "workers": case.num_workers,
            "stages": case.stages,
            "profile": json.loads(live["profile_path"].read_text())["name"],
            "workload": case.workload,
            "requests": len(trace),
            "rate": case.rate,
            "max_len": case.max_len,
            "seed": case.seed,
            "mean_prompt_len": statistics.fmean(e[1] for e in trace),
            "mean_output_len": statistics.fmean(e[2] for e in trace),
            "sessions": len({e[3] for e in trace if len(e) == 6}),
            "notes": case.notes,
        },
        "live": live_summary,
        "sim": sim_summary,
        "gaps": {
            k: relative(live_summary[k], sim_summary[k])
            for k in SUMMARY_KEYS
            if k not in ("completed", "migrations")
        },
        "mean_e2e_gap": gap,
        "serving_overhead": live["serving_overhead"],
        "serving_overhead_after": live["serving_overhead_after"],
        "sim_with_calibration_after": {
            "summary": after,
            "mean_e2e_gap": relative(live_summary["mean_e2e_s"], after["mean_e2e_s"]),
        },
        "sim_with_engine_profile": {
            "summary": bare,
            "mean_e2e_gap": relative(live_summary["mean_e2e_s"], bare["mean_e2e_s"]),
        },
        "goal": case.goal,
        "is_within_goal": abs(gap) <= case.goal,
        "live_failed": failed,
        "live_cluster_migrations": live["cluster_migrations"],
        "prefix_cache_hit_rate": {
            "live": live["prefix_cache_hit_rate"],
            "sim": sim_summary["prefix_cache_hit_rate"],
        },
        "sim_other": {
            k: v for k, v in sim_extra.items() if k not in ("per_request", "engine_steps")
        },
        "engine_steps": step_comparison(live["engine_steps"], sim_extra["engine_steps"]),
        "diagnostics": diagnostics(trace, records, sim_extra["per_request"]),
        "per_request": per_request(trace, records, sim_extra["per_request"]),
        "machine": {
            "load_before": live["load_before"],
            "load_after": live["load_after"],
            "cpu_s": live["cpu_s"],
            "cpus": os.cpu_count(),
        },
    }


def sim_case(args: argparse.Namespace, rate: float) -> Case:
    doc = json.loads(CostProfile.builtin(args.sim_profile).to_json())
    # 1 KiB of KV per token (as `cascade up --engine sim`) instead of the 8B model's 128 KiB, so
    # migrations do not push hundreds of MB through Python on loopback; the same file drives the
    # workers, the scheduler and the simulator, so all three price migrations alike.
    doc["kv_bytes_per_token"] = 1024
    doc["max_model_len"] = args.sim_max_len
    doc["name"] = f"{doc['name']}-kv1k"
    return Case(
        name="sim",
        engine_args=["--engine", "sim"],
        num_workers=args.sim_workers,
        stages=args.sim_stages,
        profile_doc=doc,
        workload=args.workload,
        num_requests=args.sim_requests,
        rate=rate,
        max_len=args.sim_max_len,
        seed=args.seed,
        goal=0.10,
        timeout_s=300,
    )


def vllm_case(args: argparse.Namespace, rate: float) -> Case:
    calibrated = PROFILES / "cpu-vllm-tiny-llama-calibrated.json"
    if args.vllm_profile:
        path = Path(args.vllm_profile)
    else:
        path = calibrated if calibrated.is_file() else PROFILES / "cpu-vllm-tiny-llama.json"
    doc = json.loads(path.read_text())
    # A calibrated profile (`cascade calibrate`) carries the engine's own batch limits.
    is_calibrated = str(doc.get("description", "")).startswith("Calibrated")
    case = Case(
        name="vllm",
        # The in-process engine, as calibrated (`cascade calibrate` observes its scheduler).
        engine_args=["--engine", "vllm", "--vllm-option", "multiprocess=false"],
        num_workers=2,
        stages=args.vllm_stages,
        profile_doc=doc,
        workload=args.workload,
        num_requests=args.vllm_requests,
        rate=rate,
        max_len=args.vllm_max_len,
        seed=args.seed,
        goal=0.25,
        timeout_s=600,
        warm_up_tokens=16,
        # One OpenMP thread per engine: with the default (one per core), an engine whose
        # threads share a core with anything else spin-waits at every barrier, and its steps
        # were measured up to 80x slower on this 2-core machine.
        env={"OMP_NUM_THREADS": str(args.vllm_omp_threads)},
    )
    # The worker's vLLM scheduler limits (VllmEngineConfig.max_num_seqs; vLLM's default
    # max_num_batched_tokens for an LLMEngine) where the profile was written for others.
    for key, value in (("max_num_seqs", 64), ("max_batch_tokens", 2048)):
        if doc[key] != value and not is_calibrated:
            case.notes.append(f"profile {key} {doc[key]} -> {value} (the workers' vLLM config)")
            doc[key] = value
    case.notes.insert(0, f"profile file {path.name}")
    return case


def vllm_sessions_case(args: argparse.Namespace, rate: float) -> Case:
    """The vllm case on conversations (`session_trace`); `rate` is sessions started per second
    and `num_requests` the number of sessions."""
    case = vllm_case(args, rate)
    case.name = "vllm-sessions"
    case.sessions = True
    case.stages = args.sessions_stages
    case.num_requests = args.sessions
    case.max_len = args.sessions_max_len
    case.workload = "session_trace"
    return case


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", choices=["sim", "vllm", "vllm-sessions", "all"], default="all")
    p.add_argument("--workload", default="short-chat")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sim-profile", default="gpu-h100-llama3-8b")
    p.add_argument("--sim-workers", type=int, default=4)
    p.add_argument("--sim-stages", default="0-512:2,512-8192:2")
    p.add_argument("--sim-requests", type=int, default=400)
    p.add_argument("--sim-rates", default="10,25", help="requests/s, one run each")
    p.add_argument("--sim-max-len", type=int, default=8192)
    p.add_argument("--vllm-stages", default="0-128:1,128-2048:1")
    p.add_argument("--vllm-requests", type=int, default=80)
    p.add_argument("--vllm-rates", default="1,4", help="requests/s, one run each")
    p.add_argument("--vllm-max-len", type=int, default=512)
    p.add_argument(
        "--vllm-profile", help="profile file for the vllm case (default: calibrated, else base)"
    )
    p.add_argument("--vllm-omp-threads", type=int, default=1)
    p.add_argument("--sessions", type=int, default=40, help="vllm-sessions: conversations")
    p.add_argument(
        "--sessions-rates", default="0.5,2", help="vllm-sessions: sessions started per second"
    )
    p.add_argument("--sessions-stages", default="0-512:1,512-2048:1")
    p.add_argument("--sessions-max-len", type=int, default=2048)
    p.add_argument("--json-out", help="also write the JSON document here")
    args = p.parse_args()
    results: list[dict[str, Any]] = []
    tmp = tempfile.mkdtemp(prefix="validate-sim-")  # kept: the daemons' logs explain outliers
    print(f"daemon logs in {tmp}", file=sys.stderr)
    for name, make, rates in (
        ("sim", sim_case, args.sim_rates),
        ("vllm", vllm_case, args.vllm_rates),
        ("vllm-sessions", vllm_sessions_case, args.sessions_rates),
    ):
        if args.case not in ("all", name):
            continue
        for rate in (float(r) for r in rates.split(",")):
            log_dir = Path(tmp) / f"{name}-{rate:g}"
            log_dir.mkdir()
            results.append(run_case(make(args, rate), log_dir))
    doc = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"), "runs": results}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(doc, indent=2) + "\n")
    for run in results:
        del run["per_request"]  # in --json-out only
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
