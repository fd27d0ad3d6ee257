"""`cascade calibrate`: measure an engine's step times and fit its cost profile."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from cascadeinfer.calibrate.measure import Measurement
from cascadeinfer.calibrate.profile import check_profile, write_profile
from cascadeinfer.calibrate.session import Calibration, calibrate, make_probe
from cascadeinfer.cli import flags
from cascadeinfer.domain import EngineError
from cascadeinfer.planning import load_profile
from cascadeinfer.worker.config import parse_engine_option

DEFAULT_SIM_PROFILE = "gpu-h100-llama3-8b"
DEFAULT_VLLM_BASE = "cpu-vllm-tiny-llama"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "calibrate",
        help="measure an engine's step times and fit a cost profile",
        description="Time engine steps over a grid of batch compositions (batch size, mean "
        "context, uniform vs skewed lengths, prefill chunks with and without a cached "
        "prefix), fit the cost profile and report the fit error.",
    )
    p.add_argument("--engine", choices=["vllm", "sim"], default="vllm")
    p.add_argument(
        "--model", default="", help="vllm: model directory or id (default: built-in tiny Llama)"
    )
    p.add_argument(
        "--vllm-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="vllm: an engine option (VALUE as JSON, else a string), e.g. max_model_len=4096",
    )
    p.add_argument(
        "--sim-profile",
        default=DEFAULT_SIM_PROFILE,
        help="sim: the profile the simulator steps on (calibration should give it back)",
    )
    p.add_argument(
        "--base-profile",
        help="profile (name or file) for the fields not measured: migration figures, "
        f"max_utilization (default: {DEFAULT_VLLM_BASE} for vllm, the sim profile for sim)",
    )
    p.add_argument(
        "--worker",
        metavar="HOST:PORT",
        help="instead of timing a bare engine: measure what a running, idle worker daemon adds "
        "to each step and write --base-profile with that overhead added",
    )
    p.add_argument("--tls-ca", default="", help="--worker: PEM CA to verify a TLS worker with")
    p.add_argument("--tls-cert", default="", help="--worker: client certificate")
    p.add_argument("--tls-key", default="", help="--worker: PEM key of --tls-cert")
    p.add_argument(
        "--auth-token-file",
        default="",
        help="--worker: bearer token file (else $CASCADE_AUTH_TOKEN)",
    )
    p.add_argument("--name", help="name of the fitted profile")
    p.add_argument("--out", type=Path, help="write the fitted profile here")
    p.add_argument("--quick", action="store_true", help="a small grid (tests, smoke runs)")
    p.add_argument("--seed", type=flags.seed, default=0, help="seed for prompts and point order")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run)


def command_line(args: argparse.Namespace) -> str:
    """The command as run, for the profile's description."""
    words = ["cascade", "calibrate", "--engine", args.engine]
    if args.engine == "vllm":
        words += ["--model", args.model] if args.model else []
        for option in args.vllm_option:
            words += ["--vllm-option", option]
    else:
        words += ["--sim-profile", args.sim_profile]
    words += ["--base-profile", args.base_profile] if args.base_profile else []
    words += ["--quick"] if args.quick else []
    words += ["--seed", str(args.seed)] if args.seed else []
    return shlex.join(words)


def default_name(args: argparse.Namespace) -> str:
    if args.engine == "sim":
        return f"calibrated-sim-{Path(args.sim_profile).stem}"
    return f"calibrated-vllm-{Path(args.model).name if args.model else 'tiny-llama'}"


def _row(label: str, kind: str, *cells: object) -> str:
    return f"{label:<24} {kind:<7} " + " ".join(f"{c:>10}" for c in cells)


def as_table(result: Calibration, out: Path | None) -> str:
    c = result.fit.coefficients
    lines = [
        f"engine: {result.facts.summary}",
        f"step time: {result.facts.time_source}",
        result.grid.describe(),
        f"load average (1, 5, 15 min) before {result.load_before}, after {result.load_after} "
        f"on {os.cpu_count()} CPUs",
        "",
        _row("point", "kind", "n", "S", "Lmax", "P", "Q", "meas_ms", "pred_ms", "error"),
    ]
    for p in result.fit.points:
        s = p.shape
        lines.append(
            _row(
                p.label,
                p.kind,
                s.num_decode,
                s.sum_context,
                s.max_context,
                s.prefill_tokens,
                s.prefill_pairs,
                f"{p.measured_s * 1e3:.3f}",
                f"{p.predicted_s * 1e3:.3f}",
                f"{p.rel_error:+.1%}",
            )
        )
    lines += [
        "",
        f"step_overhead_s      {c.step_overhead_s:.4g}",
        f"per_sequence_s       {c.per_sequence_s:.4g}",
        f"per_context_token_s  {c.per_context_token_s:.4g}",
        f"heterogeneity        {c.heterogeneity:.4g}",
        f"per_prefill_token_s  {c.per_prefill_token_s:.4g}",
        f"prefill_attention_s  {c.prefill_attention_s:.4g}",
        f"fit error over {len(result.fit.points)} points: mean "
        f"{result.fit.mean_abs_rel_error:.2%}, max {result.fit.max_abs_rel_error:.2%}",
        *(f"note: {n}" for n in result.fit.notes),
    ]
    if out is not None:
        lines.append(f"profile written to {out}")
    else:
        lines += ["", json.dumps(result.profile, indent=2)]
    return "\n".join(lines)


def as_json(result: Calibration, out: Path | None) -> dict[str, Any]:
    return {
        "engine": result.facts.summary,
        "time_source": result.facts.time_source,
        "grid": result.grid.describe(),
        "load_average": {"before": result.load_before, "after": result.load_after},
        "points": [
            {
                "label": p.label,
                "kind": p.kind,
                "num_decode": p.shape.num_decode,
                "sum_context": p.shape.sum_context,
                "max_context": p.shape.max_context,
                "prefill_tokens": p.shape.prefill_tokens,
                "prefill_pairs": p.shape.prefill_pairs,
                "measured_s": p.measured_s,
                "predicted_s": p.predicted_s,
                "rel_error": p.rel_error,
                "times_s": list(m.times_s),
            }
            for p, m in zip(result.fit.points, result.measurements, strict=True)
        ],
        "fit": {
            "mean_abs_rel_error": result.fit.mean_abs_rel_error,
            "max_abs_rel_error": result.fit.max_abs_rel_error,
            "notes": list(result.fit.notes),
        },
        "profile": result.profile,
        "out": str(out) if out is not None else None,
    }


def run(args: argparse.Namespace) -> int:
    if args.worker:
        from cascadeinfer.cli.calibrate_serving import run_serving

        return run_serving(args)
    base_name = args.base_profile or (
        args.sim_profile if args.engine == "sim" else DEFAULT_VLLM_BASE
    )
    base = load_profile(base_name)
    options = dict(parse_engine_option(o) for o in args.vllm_option)
    if args.engine == "sim":
        load_profile(args.sim_profile)  # a bad name fails here, with the usual message

    def progress(m: Measurement) -> None:
        print(f"  {m.kind:<7} {m.label:<24} {m.time_s * 1e3:9.3f} ms", file=sys.stderr)

    print(f"cascade calibrate: starting the {args.engine} engine ...", file=sys.stderr, flush=True)
    try:
        probe = make_probe(
            args.engine, model=args.model, options=options, sim_profile=args.sim_profile
        )
        try:
            result = calibrate(
                probe,
                name=args.name or default_name(args),
                base=base,
                base_name=base_name,
                command=command_line(args),
                quick=args.quick,
                seed=args.seed,
                on_point=progress,
            )
        finally:
            probe.close()
    except (RuntimeError, EngineError) as e:
        print(f"cascade calibrate: error: {e}", file=sys.stderr)
        return 1
    if args.out is not None:
        write_profile(args.out, result.profile, result.fit)
    else:
        check_profile(json.dumps(result.profile), result.fit)
    print(
        json.dumps(as_json(result, args.out), indent=2) if args.json else as_table(result, args.out)
    )
    return 0
