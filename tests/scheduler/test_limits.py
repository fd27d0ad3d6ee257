"""The scheduler bounds what one client can make it hold: an oversized text prompt is refused
before it is tokenized (other streams never stall), and a client that stops reading its stream
has its request ended with RESOURCE_EXHAUSTED once it is too far behind, while other clients
are served as usual. A real scheduler and sim worker on loopback."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from cascadeinfer.proto.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from cascadeinfer.worker.tiny_model import write_byte_tokenizer

from tests.worker.daemons import SIM_WORKER, Daemon, start_scheduler, workers

MAX_LAG = 500


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("limits")
    tokenizer = write_byte_tokenizer(tmp / "tokenizer")
    # Steps take a tenth of their predicted time: an 8000-token output takes seconds, so a
    # stalled client's write is held up past STALLED_WRITE_S while tokens still arrive.
    paced = [*SIM_WORKER, "--sim-time-scale", "0.1"]
    with workers([paced], tmp) as (worker,):
        s = start_scheduler(
            [
                "--workers",
                worker.address,
                "--tokenizer",
                str(tokenizer),
                "--max-stream-lag-tokens",
                str(MAX_LAG),
            ],
            tmp,
        )
        try:
            yield s
        finally:
            s.stop()


def request(
    max_tokens: int, *, text: str = "", ids: int = 8
) -> scheduler_pb2.ClientGenerateRequest:
    r = scheduler_pb2.ClientGenerateRequest(
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    )
    if text:
        r.text = text
    else:
        r.prompt_token_ids.ids.extend(range(1, ids + 1))
    return r


def stub_of(address: str) -> scheduler_pb2_grpc.SchedulerServiceStub:
    # No BDP probing: the HTTP/2 window stays at its 64 KiB default, as for a slow link.
    channel = grpc.insecure_channel(address, options=[("grpc.http2.bdp_probe", 0)])
    return scheduler_pb2_grpc.SchedulerServiceStub(channel)


def read_all(stub: scheduler_pb2_grpc.SchedulerServiceStub, max_tokens: int) -> tuple[int, int]:
    """Tokens and finish reason of one stream."""
    n, finish = 0, 0
    for r in stub.Generate(request(max_tokens), timeout=60):
        n += len(r.tokens.token_ids)
        finish = r.finish_reason
    return n, finish


def test_an_oversized_text_prompt_is_refused_before_tokenizing(scheduler: Daemon) -> None:
    """8 MB of text: over the default limit (16 bytes per token of the 8192-token context)."""
    stub = stub_of(scheduler.address)
    gaps: list[float] = []

    errors: list[grpc.RpcError] = []

    def steady() -> None:
        last = time.monotonic()
        try:
            for _ in stub.Generate(request(3000), timeout=60):
                now = time.monotonic()
                gaps.append(now - last)
                last = now
        except grpc.RpcError as e:
            errors.append(e)

    thread = threading.Thread(target=steady)
    thread.start()
    time.sleep(0.2)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(request(4, text="x" * (8 << 20)), timeout=60))
    refused_after = time.monotonic() - started
    thread.join(60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_prompt_bytes" in (e.value.details() or "")
    assert refused_after < 2.0
    assert not errors
    assert max(gaps) < 1.0, "the other stream stalled"
    text_ok = list(stub.Generate(request(4, text="Hello"), timeout=30))
    assert sum(len(r.tokens.token_ids) for r in text_ok) == 4, "text prompts still work"


def test_a_client_that_stops_reading_is_cut_off_and_others_are_served(scheduler: Daemon) -> None:
    stub = stub_of(scheduler.address)
    max_tokens = 8000
    stalled = stub.Generate(request(max_tokens), timeout=60)
    time.sleep(3.0)  # reads nothing while the engine produces
    assert read_all(stub, 500) == (500, common_pb2.FINISH_REASON_LENGTH)
    received = 0
    with pytest.raises(grpc.RpcError) as e:
        for r in stalled:
            received += len(r.tokens.token_ids)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_stream_lag_tokens" in (e.value.details() or "")
    assert received < max_tokens
    assert read_all(stub, 500) == (500, common_pb2.FINISH_REASON_LENGTH)


def test_a_message_over_the_size_limit_is_refused_and_service_goes_on(scheduler: Daemon) -> None:
    channel = grpc.insecure_channel(
        scheduler.address, options=[("grpc.max_send_message_length", 128 << 20)]
    )
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(request(4, text="x" * (70 << 20)), timeout=60))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The scheduler's own limit (16 MiB: no KV passes through it), not the workers' 64 MiB.
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(request(4, text="x" * (20 << 20)), timeout=60))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_prompt_bytes" not in (e.value.details() or ""), "refused by size, unparsed"
    assert read_all(stub_of(scheduler.address), 5) == (5, common_pb2.FINISH_REASON_LENGTH)


def test_a_long_request_id_or_stop_list_is_refused_naming_the_field(scheduler: Daemon) -> None:
    """The request id travels in every step-feed message about the request: six clients with
    12 MB ids made a worker's feed outgrow its 64 MiB message limit, and the scheduler dropped
    that healthy worker. A list of millions of stop tokens made every engine step scan it."""
    stub = stub_of(scheduler.address)
    long_id = request(4)
    long_id.request_id = "r" * 129
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(long_id, timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == "request_id is longer than 128 characters"
    with pytest.raises(grpc.RpcError) as e:
        stub.Abort(scheduler_pb2.ClientAbortRequest(request_id="r" * 10_000), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    many_stops = request(4)
    many_stops.sampling.stop_token_ids.extend(range(2000, 3025))
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(many_stops, timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == "stop_token_ids: 1025 ids; at most 1024"
    ok = request(4)
    ok.request_id = "r" * 128
    ok.sampling.stop_token_ids.extend(range(2000, 3024))
    last = list(stub.Generate(ok, timeout=30))[-1]
    assert last.request_id == ok.request_id
    assert last.finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP)
