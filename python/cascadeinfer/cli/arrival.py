"""The `--arrival`/`--cv` flags that `cascade plan`, `cascade bench sim|compare|live` and `cascade
trace gen` share. `--cv` only shapes Gamma gaps: given without `--arrival gamma` it used to be
ignored without a word (a run that looked bursty was Poisson), so it is refused instead.
(`cascade bench sim|compare` refused it for a preset before too, with the core's "only the gamma
process takes a cv", and ran a trace file without it.)"""

from __future__ import annotations

import argparse
import functools

from cascadeinfer.cli import flags

ARRIVALS = ("poisson", "gamma")
DEFAULT_CV = 1.0
"""The Gamma gaps' coefficient of variation when `--arrival gamma` names none (1: as bursty as
Poisson)."""


def add_arrival_arguments(p: argparse.ArgumentParser, arrival_help: str | None = None) -> None:
    """`--arrival` and `--cv` on `p`, and the check that `cascade` runs after parsing
    (`check_args`, see `cli.main`)."""
    p.add_argument("--arrival", choices=ARRIVALS, default="poisson", help=arrival_help)
    p.add_argument(
        "--cv",
        type=flags.cv,
        help=f"inter-arrival coefficient of variation; needs --arrival gamma (default {DEFAULT_CV:g})",
    )
    p.set_defaults(check_args=functools.partial(check_arrival_args, p))


def check_arrival_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exits 2 with `parser`'s usage, as argparse's own errors do, when `--cv` came without
    `--arrival gamma`: the flags are read in any order, so no single action can tell."""
    if args.cv is not None and args.arrival != "gamma":
        parser.error(f"--cv needs --arrival gamma (only Gamma gaps take a CV; got {args.arrival})")


def gamma_cv(args: argparse.Namespace) -> float:
    """The CV for Gamma arrivals: `--cv`, else `DEFAULT_CV`."""
    return DEFAULT_CV if args.cv is None else float(args.cv)
