"""Small helpers the client commands share: a scheduler stub and one streamed generation."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from cascadeinfer.daemon import check_address
from cascadeinfer.proto.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from cascadeinfer.security import TlsFiles, client_channel, read_caller_token

FINISH_NAMES = {
    v: k.removeprefix("FINISH_REASON_").lower() for k, v in common_pb2.FinishReason.items()
}


def add_connection_args(p: Any) -> None:
    """--address plus the optional TLS and token flags every client command takes."""
    p.add_argument("--address", required=True, help="scheduler address HOST:PORT")
    p.add_argument("--tls-ca", default="", help="PEM CA to verify a TLS scheduler with")
    p.add_argument("--tls-cert", default="", help="client certificate, when the scheduler asks")
    p.add_argument("--tls-key", default="", help="PEM key of --tls-cert")
    p.add_argument(
        "--auth-token-file",
        default="",
        help="bearer token file (else $CASCADE_CLIENT_TOKEN, else $CASCADE_AUTH_TOKEN)",
    )


def scheduler_stub(
    address: str, args: argparse.Namespace | None = None, token_file: str = ""
) -> scheduler_pb2_grpc.SchedulerServiceStub:
    check_address("address", address)
    tls, token = TlsFiles(), read_caller_token(token_file)
    if args is not None:
        tls = TlsFiles(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca)
        tls.validate(is_server=False)
        token = read_caller_token(args.auth_token_file)
    return scheduler_pb2_grpc.SchedulerServiceStub(client_channel(address, tls, token))


@dataclass
class Generation:
    request_id: str
    token_ids: list[int]
    finish_reason: str
    timings: scheduler_pb2.RequestTimings
    text: str = ""
    """Filled for text prompts."""


def generate(
    stub: scheduler_pb2_grpc.SchedulerServiceStub,
    prompt: list[int] | str,
    max_tokens: int,
    request_id: str = "",
    on_chunk: Callable[[scheduler_pb2.ClientGenerateResponse], None] | None = None,
) -> Generation:
    """Streams one request; `prompt` is token ids or text (the scheduler needs a tokenizer)."""
    request = scheduler_pb2.ClientGenerateRequest(
        request_id=request_id,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
    )
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.prompt_token_ids.ids.extend(prompt)
    tokens: list[int] = []
    text: list[str] = []
    last = scheduler_pb2.ClientGenerateResponse()
    for r in stub.Generate(request):
        tokens.extend(r.tokens.token_ids)
        text.append(r.text)
        if on_chunk is not None:
            on_chunk(r)
        last = r
    return Generation(
        last.request_id,
        tokens,
        FINISH_NAMES.get(last.finish_reason, "?"),
        last.timings,
        "".join(text),
    )


def describe_rpc_error(e: grpc.RpcError, address: str) -> str:
    """What a failed call says, and for UNIMPLEMENTED what it most likely means: the address
    is not a scheduler's API port (a worker, a health port). gRPC says "Method not found!"."""
    code: grpc.StatusCode = e.code()
    text = f"{code.name}: {e.details()}"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        text += (
            f" ({address} does not serve the scheduler's API: is it a cascade-scheduler's --port?)"
        )
    return text
