"""The worker's conversions of what callers send: bounds checked before ids become Python
objects."""

from __future__ import annotations

import tracemalloc

import pytest
from cascadeinfer.domain import EngineError, ErrorCode
from cascadeinfer.proto.v1 import common_pb2, worker_pb2
from cascadeinfer.worker import convert


def test_a_context_past_the_model_length_is_refused_before_its_ids_are_read() -> None:
    # One 40 MB call of 8 million ids took a worker from 56 to 486 MiB, kept after the engine
    # refused it (docs/reliability.md, "A fourteenth probe").
    m = worker_pb2.GenerateRequest(request_id="huge")
    m.prompt_token_ids.extend(range(1000, 2_001_000))  # past the small-int cache
    tracemalloc.start()
    try:
        with pytest.raises(EngineError) as e:
            convert.request_from_generate(m, 4096)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert e.value.code == ErrorCode.INVALID_ARGUMENT
    assert "prompt of 2000000 tokens leaves no room below max_model_len 4096" in e.value.message
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MiB allocated (a tuple of the ids: ~70 MiB)"


def test_more_stop_ids_than_allowed_are_refused_before_they_are_read() -> None:
    sampling = common_pb2.SamplingParams(max_tokens=4)
    sampling.stop_token_ids.extend(range(1000, 2_001_000))
    m = worker_pb2.GenerateRequest(request_id="stops", sampling=sampling)
    m.prompt_token_ids.extend([1, 2, 3])
    tracemalloc.start()
    try:
        with pytest.raises(EngineError, match="stop_token_ids: 2000000 ids; at most 1024"):
            convert.request_from_generate(m, 4096)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MiB allocated"


def test_a_request_that_fits_converts_whole() -> None:
    m = worker_pb2.GenerateRequest(
        request_id="ok", sampling=common_pb2.SamplingParams(max_tokens=4)
    )
    m.prompt_token_ids.extend([1, 2, 3])
    m.output_token_ids.extend([4])
    req = convert.request_from_generate(m, 5)
    assert (req.prompt_token_ids, req.output_token_ids, req.context_len) == ((1, 2, 3), (4,), 4)
    with pytest.raises(EngineError, match="prompt of 5 tokens leaves no room"):
        m.output_token_ids.append(5)
        convert.request_from_generate(m, 5)
