"""`cascade up`: a scheduler and N workers on this machine, a short demo, then serve until Ctrl-C."""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cascadeinfer.cli import flags
from cascadeinfer.cli.client import generate, scheduler_stub
from cascadeinfer.cli.status import format_state
from cascadeinfer.config import POLICY_NAMES
from cascadeinfer.daemon import check_seconds
from cascadeinfer.launcher import (
    LOOPBACK,
    SCHEDULER,
    WORKER,
    Daemon,
    DaemonStartError,
    can_listen,
    start_many,
)
from cascadeinfer.proto.v1 import scheduler_pb2, worker_pb2
from cascadeinfer.proto.v1.scheduler_pb2_grpc import SchedulerServiceStub
from cascadeinfer.scheduler import config as scheduler_config
from cascadeinfer.security import token_metadata
from cascadeinfer.worker import config as worker_config
from cascadeinfer.worker.tiny_model import write_tiny_tokenizer

STOP_TIMEOUT_S = 60.0
"""How long the daemons get to drain once told to stop, before `cascade up` kills them."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("up", help="start a local cluster (scheduler + workers), run a demo, serve")
    p.add_argument("--engine", choices=["vllm", "sim"], default="vllm")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--model", default="", help="vllm: model directory (default: built-in tiny Llama)"
    )
    p.add_argument("--policy", choices=POLICY_NAMES, default="cascade")
    p.add_argument("--stages", help="explicit stages MIN-MAX:WORKERS,... (default: planned)")
    p.add_argument("--port", type=int, default=0, help="scheduler gRPC port (default: any free)")
    p.add_argument(
        "--http-port", type=int, default=8000, help="OpenAI-compatible API port (0: any free)"
    )
    p.add_argument("--profile", help="cost profile the plan is made with (default: per engine)")
    p.add_argument(
        "--workload", help="preset or trace to plan stages for (default: doubling stages)"
    )
    p.add_argument("--rate", type=flags.rate, help="arrival rate to plan stages for")
    p.add_argument(
        "--sim-time-scale", type=float, default=1.0, help="sim: step time factor (0: no wait)"
    )
    p.add_argument("--no-demo", action="store_true", help="skip the demo requests")
    p.add_argument("--exit-after-demo", action="store_true", help="stop the cluster after the demo")
    p.add_argument(
        "--stop-timeout-s",
        type=float,
        default=STOP_TIMEOUT_S,
        help="on stop, how long the daemons get to drain before they are killed",
    )
    p.set_defaults(run=run)


def worker_args(args: argparse.Namespace) -> list[str]:
    if args.engine == "sim":
        return [
            "--engine",
            "sim",
            "--sim-max-model-len",
            "8192",
            "--sim-kv-bytes-per-token",
            "1024",
            "--sim-vocab-size",
            "1024",
            "--sim-time-scale",
            str(args.sim_time_scale),
        ]
    return ["--engine", "vllm", *(["--model", args.model] if args.model else [])]


def scheduler_args(
    args: argparse.Namespace, workers: str, stages: str | None, tokenizer: Path
) -> list[str]:
    """The flags `cascade up` passes its scheduler, but for its token: the `workers` it
    started (comma-separated addresses), the `stages` when set, and the `tokenizer` files."""
    out = ["--workers", workers, "--policy", args.policy]
    if stages:
        out += ["--stages", stages]
    out += ["--port", str(args.port), "--http-port", str(args.http_port)]
    profile = args.profile or ("cpu-vllm-tiny-llama" if args.engine == "vllm" else None)
    for flag, value in (("--profile", profile), ("--workload", args.workload)):
        if value:
            out += [flag, value]
    if args.rate is not None:
        out += ["--rate", str(args.rate)]
    return [*out, "--tokenizer", str(tokenizer)]


def check_daemon_flags(args: argparse.Namespace) -> None:
    """Runs the daemons' own checks of what `cascade up` passes them, before any worker starts
    (a vLLM worker takes minutes to): a value either daemon would refuse (`--port 70000`,
    `--rate nan`, `--stages` that do not add up, a profile or workload that is not there)
    raises its ValueError here, so `cascade up` exits 2 at once and leaves nothing behind.
    It used to start the workers first, then fail with 1 and a log directory in /tmp."""
    if args.engine == "sim" and args.model:
        raise ValueError("--model is for --engine vllm: the sim engine has no model")
    worker_config.parse_args(worker_args(args))
    placeholders = ",".join(f"{LOOPBACK}:{k + 1}" for k in range(args.workers))
    with tempfile.TemporaryDirectory(prefix="cascade-up-check-") as tmp:
        tokenizer = tokenizer_for(args, Path(tmp))
        scheduler_config.parse_args(scheduler_args(args, placeholders, args.stages, tokenizer))


def _max_model_len(worker: Daemon, token: str) -> int:
    """The longest context the worker serves, as it reports it."""
    info = worker.stub().GetInfo(
        worker_pb2.GetInfoRequest(), metadata=token_metadata(token), timeout=30
    )
    return int(info.max_model_len)


def default_stages(num_workers: int, max_len: int) -> str:
    """Length stages doubling from 128 tokens, one worker each (the last takes the rest)."""
    bounds = [0]
    while len(bounds) < num_workers and bounds[-1] * 2 + 128 < max_len:
        bounds.append(max(128, bounds[-1] * 2))
    bounds.append(max_len)
    counts = [1] * (len(bounds) - 1)
    counts[-1] += num_workers - len(counts)
    return ",".join(f"{lo}-{hi}:{n}" for lo, hi, n in zip(bounds, bounds[1:], counts, strict=False))


def text_note(args: argparse.Namespace) -> str:
    """What the demo's text comes from, so that nonsense is not taken for a broken cluster."""
    if args.engine == "sim":
        return " (sim engine: no model, made-up token ids decoded to text)"
    if not args.model:
        return " (random weights: noise, but real text)"
    return ""


def demo(
    stub: SchedulerServiceStub, stages: list[scheduler_pb2.StageState], note: str = ""
) -> None:
    """Requests that start short and grow past the first stage bounds, printed as they finish;
    then one text prompt, its answer followed by `note`."""
    bound = stages[0].max_len if len(stages) > 1 else 64
    cases = [(16, 32), (max(8, bound - 40), 120), (max(8, bound + 20), 2 * bound)]
    for i, (prompt_len, max_tokens) in enumerate(cases):
        prompt = [(i * 97 + k * 13) % 250 + 1 for k in range(prompt_len)]
        g = generate(stub, prompt, max_tokens, f"demo-{i}")
        t = g.timings
        print(
            f"demo-{i}: prompt {prompt_len} -> {len(g.token_ids)} tokens ({g.finish_reason}), "
            f"migrations {t.num_migrations}, ttft {t.ttft_s * 1e3:.0f} ms, total {t.total_s:.2f} s; "
            f"first tokens {g.token_ids[:8]}"
        )
    g = generate(stub, "Hello from CascadeInfer!", 24, "demo-text")
    print(
        f"demo-text: {len(g.token_ids)} tokens ({g.finish_reason}) for a text prompt; "
        f"text {g.text!r}{note}"
    )


def curl_example(base_url: str, model: str, token_file: Path | None = None) -> str:
    """A chat request for the printed hint (with the bearer token when the cluster has one)."""
    body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hi"}}], "max_tokens": 16}}'
    auth = f' -H "Authorization: Bearer $(cat {token_file})"' if token_file else ""
    return f"curl {base_url}/chat/completions{auth} -H 'Content-Type: application/json' -d '{body}'"


def tokenizer_for(args: argparse.Namespace, log_dir: Path) -> Path:
    """The model's tokenizer files, else the built-in tiny model's (tokenizer and chat template)."""
    if args.model and (Path(args.model) / "tokenizer.json").is_file():
        return Path(args.model)
    return write_tiny_tokenizer(log_dir / "tokenizer")


def write_token(log_dir: Path) -> Path:
    """A fresh random bearer token for this cluster, readable by this user only."""
    path = log_dir / "token"
    path.touch(mode=0o600)
    path.write_text(secrets.token_urlsafe(32) + "\n")
    return path


def taken_port(args: argparse.Namespace) -> str | None:
    """Why a port given on the command line cannot be listened on now (a second `cascade up`
    meets the first one's default --http-port), with the flag that picks another; else None."""
    for flag, port in (("--port", args.port), ("--http-port", args.http_port)):
        # 0 picks a free port; one out of range is the scheduler's to refuse (exit 2).
        if 0 < port < 65536 and not can_listen(port):
            return (
                f"cannot listen on {LOOPBACK}:{port}: the port is in use (another cascade up?); "
                f"choose another with {flag} PORT (0 picks a free port)"
            )
    return None


MAX_LOCAL_WORKERS = 64
"""Workers one `cascade up` starts, all at once, on this one machine."""


def run(args: argparse.Namespace) -> int:
    # Before any worker starts (a vLLM one takes minutes): a ValueError exits 2.
    if not 1 <= args.workers <= MAX_LOCAL_WORKERS:
        # 0 was a ZeroDivisionError traceback; -1 started nothing and then failed on min();
        # thousands would all start at once on this machine.
        raise ValueError(f"--workers {args.workers}: must be in [1, {MAX_LOCAL_WORKERS}]")
    if (taken := taken_port(args)) is not None:
        raise ValueError(taken)
    check_seconds("--stop-timeout-s", args.stop_timeout_s)
    check_daemon_flags(args)
    # A closed terminal (SIGHUP) or a supervisor's stop (SIGTERM) stops the cluster as Ctrl-C
    # does, while it starts too: they used to end `cascade up` before its daemons, which then
    # served on with nobody to stop them and the token left in /tmp.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    log_dir = Path(tempfile.mkdtemp(prefix="cascade-up-"))
    token_file = write_token(log_dir)
    auth = ["--auth-token-file", str(token_file)]
    print(f"starting {args.workers} {args.engine} workers (logs in {log_dir}) ...", flush=True)
    daemons: list[Daemon] = []
    # vLLM on CPU starts one OpenMP thread per core in every worker; workers sharing the cores
    # then slow each other down many times over. Split the cores instead (a user's own
    # OMP_NUM_THREADS wins).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.workers)))
    try:
        return _serve(args, log_dir, token_file, auth, daemons)
    except KeyboardInterrupt:
        # Ctrl-C before the cluster served: what had started is stopped below.
        print("cascade up: interrupted while starting", file=sys.stderr)
        return 130
    except DaemonStartError as e:
        # Another cluster on the same ports, a model directory that is not there: the daemon's
        # own error says what to change.
        print(f"cascade up: error: {e.log_path.name} did not start:\n{e.reason}", file=sys.stderr)
        if (taken := taken_port(args)) is not None:  # taken while the workers started
            print(f"cascade up: {taken}", file=sys.stderr)
        print(f"(logs in {log_dir})", file=sys.stderr)
        return 1
    finally:
        stop_all(daemons, args.stop_timeout_s)
        # The token opens the cluster; once it is stopped, the file would only linger in /tmp.
        # The directory is this run's own (mkdtemp), so nobody else's file goes; the logs stay.
        token_file.unlink(missing_ok=True)
        print("cluster stopped")


def stop_all(daemons: list[Daemon], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Drains the scheduler (started last, so it stops taking requests first), then every
    worker at once, each group within `timeout_s`; a daemon still running then (frozen, or
    stuck) is killed and named. Stopped one by one, each stuck worker cost a silent minute,
    and the live ones behind it got their SIGTERM only then. A second Ctrl-C while they drain
    kills the rest instead: it had ended `cascade up` with a traceback and left the workers
    running."""
    try:
        for group in (daemons[-1:], daemons[:-1]):
            _stop_together(group, timeout_s)
    except (KeyboardInterrupt, Exception):
        for d in daemons:
            d.kill()


def _stop_together(group: list[Daemon], timeout_s: float) -> None:
    """SIGTERM to every daemon of `group`, then waits for them together; kills and names each
    one still running after `timeout_s`."""
    for d in group:
        d.terminate()
    deadline = time.monotonic() + timeout_s
    for d in group:
        if not d.wait(max(0.0, deadline - time.monotonic())):
            print(
                f"cascade up: {d.name} {d.address} did not stop within {timeout_s:g} s; killed",
                file=sys.stderr,
                flush=True,
            )
            d.kill()


def _serve(
    args: argparse.Namespace,
    log_dir: Path,
    token_file: Path,
    auth: list[str],
    daemons: list[Daemon],
) -> int:
    """Starts the cluster (each daemon appended to `daemons` as it serves), runs the demo, and
    serves until Ctrl-C or SIGTERM."""
    worker_lists = [[*worker_args(args), *auth]] * args.workers
    daemons += start_many(WORKER, worker_lists, log_dir, stop_with_parent=True)
    # The default stages end where the workers' length does: a shorter last stage would
    # bound what the scheduler admits below what the model serves.
    token = token_file.read_text().strip()
    max_len = min(_max_model_len(d, token) for d in daemons)
    # Doubling stages show migrations on any traffic; a workload or rate asks for a plan.
    is_planned = args.workload is not None or args.rate is not None
    stages = args.stages or (
        default_stages(args.workers, max_len)
        if args.policy == "cascade" and not is_planned
        else None
    )
    addresses = ",".join(d.address for d in daemons)
    sched_args = [*auth, *scheduler_args(args, addresses, stages, tokenizer_for(args, log_dir))]
    scheduler = start_many(SCHEDULER, [sched_args], log_dir, timeout=120, stop_with_parent=True)[0]
    daemons.append(scheduler)
    for d in daemons[:-1]:
        print(f"worker     {d.address} ({d.engine})")
    print(f"scheduler  {scheduler.address} (policy {scheduler.engine})")
    model = scheduler.openai_models[0] if scheduler.openai_models else "?"
    print(f"openai     {scheduler.openai_url} (model {model!r})")
    print(
        f"auth token {token_file} (every call needs it: --auth-token-file, or HTTP Bearer; "
        "deleted when the cluster stops)\n"
    )
    stub = scheduler_stub(scheduler.address, token_file=str(token_file))
    state = stub.GetClusterState(scheduler_pb2.GetClusterStateRequest())
    print(format_state(state) + "\n")
    if not args.no_demo:
        demo(stub, list(state.stages), text_note(args))
    if args.exit_after_demo:
        return 0
    print(
        f"\nserving; try: cascade generate --address {scheduler.address} "
        f"--auth-token-file {token_file} --prompt-token-ids 1,2,3 --max-tokens 16"
    )
    print(f"or: {curl_example(scheduler.openai_url, model, token_file)}")
    print("Ctrl-C stops the cluster.", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C, SIGTERM or SIGHUP (`_interrupt`)
        return _watch(daemons[:-1], scheduler)
    return 0


WATCH_INTERVAL_S = 1.0
"""How often `cascade up` checks that the daemons it started still run."""


def _watch(workers: list[Daemon], scheduler: Daemon) -> int:
    """Until Ctrl-C: says so once when a daemon of the cluster exits (reaping it), and returns
    1 when the scheduler does, so the workers are stopped (`run`'s `finally`). A worker's exit
    leaves the cluster serving on the others; a worker the operator starts again on the same
    port rejoins it. Before, `cascade up` waited on nothing: killed daemons stayed zombies, and
    after its scheduler stopped it went on saying "Ctrl-C stops the cluster" over a cluster
    that served nothing."""
    gone: set[str] = set()
    while True:
        time.sleep(WATCH_INTERVAL_S)
        for d in workers:
            code = d.process.poll()
            if code is not None and d.address not in gone:
                gone.add(d.address)
                left = len(workers) - len(gone)
                print(
                    f"cascade up: worker {d.address} exited with code {code} (log {d.log_path}); "
                    f"{left} of {len(workers)} still running",
                    file=sys.stderr,
                    flush=True,
                )
        code = scheduler.process.poll()
        if code is not None:
            print(
                f"cascade up: the scheduler exited with code {code} (log {scheduler.log_path}); "
                "stopping the cluster",
                file=sys.stderr,
                flush=True,
            )
            return 1


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM and SIGHUP as Ctrl-C: the cluster started so far is stopped."""
    raise KeyboardInterrupt
