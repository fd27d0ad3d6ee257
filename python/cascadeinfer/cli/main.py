"""`cascade`: the command line. Each subcommand lives in its own module with `add_parser`/`run`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc

from cascadeinfer.cli import bench, calibrate, generate, plan, status, trace, up
from cascadeinfer.cli.client import describe_rpc_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cascade", description="CascadeInfer: length-aware stage scheduling for LLM serving."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (plan, generate, status, up, bench, trace, calibrate):
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Rules across flags that argparse cannot state (`--cv` needs `--arrival gamma`): a
    # subcommand names its check, which exits 2 with that subcommand's usage.
    check = getattr(args, "check_args", None)
    if check is not None:
        check(args)
    try:
        code: int = args.run(args)
    except (ValueError, OSError) as e:
        print(f"cascade {args.command}: error: {e}", file=sys.stderr)
        return 2
    except grpc.RpcError as e:
        address = getattr(args, "address", "the address")
        print(f"cascade {args.command}: {describe_rpc_error(e, address)}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
