"""The OpenAI-compatible HTTP API of cascade-scheduler, driven by the official `openai`
client against real daemons on loopback: a scheduler in front of two sim workers in two
stages (so requests migrate mid-stream), with a bearer token and the tiny model's tokenizer."""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from cascadeinfer import CostProfile
from cascadeinfer.launcher import SCHEDULER
from cascadeinfer.metrics_page import RENDER_BURST, RENDERS_PER_S
from cascadeinfer.proto.v1 import scheduler_pb2, scheduler_pb2_grpc, worker_pb2
from cascadeinfer.scheduler.openai.protocol import EXCESS_CONNECTIONS as EXCESS
from cascadeinfer.scheduler.openai.protocol import MAX_TARGET_BYTES
from cascadeinfer.scheduler.text import load_tokenizer
from cascadeinfer.worker.tiny_model import write_tiny_llama
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokenizers import Tokenizer

from tests.scheduler.certs import make_certs
from tests.worker.daemons import Daemon, start_scheduler, start_worker, workers
from tests.worker.streams import run_to_end

TOKEN = "s3cret-http"
SIM = ["--engine", "sim", "--sim-vocab-size", "1024", "--sim-max-model-len", "4096"]
SIM += ["--sim-kv-bytes-per-token", "64"]
AUTH = {"Authorization": f"Bearer {TOKEN}"}
AUTH_MD = (("authorization", f"Bearer {TOKEN}"),)
STREAM_LAG = 64
REQUEST_TIMEOUT_S = 2.0
BODIES_IN_FLIGHT = 6 << 20


@dataclass
class Front:
    scheduler: Daemon
    workers: list[Daemon]
    tokenizer: Tokenizer
    model_dir: Path

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.scheduler.openai_url, api_key=TOKEN, max_retries=0)

    def num_running(self) -> int:
        """Requests running or waiting on the workers, as the workers themselves report."""
        loads = [w.stub().GetLoad(worker_pb2.GetLoadRequest(), timeout=10) for w in self.workers]
        return sum(load.num_running + load.num_waiting for load in loads)

    def reference(self, prompt: list[int], max_tokens: int) -> list[int]:
        """The tokens the sim engine makes for `prompt` on one worker, never moved."""
        return run_to_end(self.workers[0].stub(), f"ref-{time.monotonic_ns()}", prompt, max_tokens)


def scheduler_args(model_dir: Path, token_file: Path, *extra: str) -> list[str]:
    return [
        "--tokenizer",
        str(model_dir),
        "--auth-token-file",
        str(token_file),
        "--http-port",
        "0",
        *extra,
    ]


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    tmp = tmp_path_factory.mktemp("openai")
    model_dir = write_tiny_llama(tmp / "model")
    token_file = tmp / "token"
    token_file.write_text(TOKEN)
    with workers([SIM, SIM], tmp) as daemons:
        addresses = ",".join(d.address for d in daemons)
        args = scheduler_args(
            model_dir, token_file, "--workers", addresses, "--stages", "0-64:1,64-4096:1"
        )
        # Small bounds, so the tests below can show they hold for HTTP clients too.
        args += ["--max-stream-lag-tokens", str(STREAM_LAG), "--max-prompt-bytes", "4096"]
        args += ["--http-request-timeout-s", str(REQUEST_TIMEOUT_S)]
        args += ["--http-max-body-bytes-in-flight", str(BODIES_IN_FLIGHT)]
        scheduler = start_scheduler(args, tmp)
        try:
            yield Front(scheduler, daemons, load_tokenizer(str(model_dir)), model_dir)
        finally:
            scheduler.stop()


def test_models_and_health(front: Front) -> None:
    models = front.client().models.list()
    assert [m.id for m in models.data] == ["sim"]
    assert front.client().models.retrieve("sim").id == "sim"
    with pytest.raises(openai.NotFoundError):
        front.client().models.retrieve("gpt-4o")
    health = httpx.get(front.scheduler.openai_url.removesuffix("/v1") + "/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}


def test_completion_text_is_the_engine_tokens_decoded_across_a_migration(front: Front) -> None:
    prompt = "The quick brown fox"
    ids = front.tokenizer.encode(prompt).ids
    expected = front.tokenizer.decode(front.reference(ids, 80))
    client = front.client()
    whole = client.completions.create(
        model="sim", prompt=prompt, max_tokens=80, extra_body={"ignore_eos": True}
    )
    assert whole.choices[0].text == expected
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(ids), 80)
    stream = client.completions.create(
        model="sim",
        prompt=ids,
        max_tokens=80,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 80
    assert len(chunks) > 3, "text arrives in pieces, not at the end"


def test_an_answer_longer_than_the_stream_lag_bound_completes_for_a_client_that_reads(
    front: Front,
) -> None:
    # The lag bound ends only clients that stop reading; the HTTP front reads as it goes.
    client = front.client()
    n = 6 * STREAM_LAG
    whole = client.completions.create(
        model="sim", prompt=[5, 6, 7], max_tokens=n, extra_body={"ignore_eos": True}
    )
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == n
    stream = client.completions.create(
        model="sim",
        prompt=[5, 6, 7],
        max_tokens=n,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == n


def test_json_nested_past_the_parser_stack_is_400(front: Front) -> None:
    deep = '{"a":' * 100_000 + "1" + "}" * 100_000
    for route in ("/completions", "/chat/completions"):
        r = httpx.post(
            front.scheduler.openai_url + route,
            content=deep,
            headers={**AUTH, "Content-Type": "application/json"},
            timeout=30,
        )
        assert r.status_code == 400, r.text
        assert "nested too deeply" in r.json()["error"]["message"]


def test_a_text_prompt_over_the_byte_limit_is_400_before_tokenizing(front: Front) -> None:
    client = front.client()
    with pytest.raises(openai.BadRequestError, match="max_prompt_bytes"):
        client.completions.create(model="sim", prompt="é" * 2100, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="max_prompt_bytes"):
        client.chat.completions.create(
            model="sim", messages=[{"role": "user", "content": "x" * 5000}], max_tokens=4
        )
    # The service goes on.
    assert client.completions.create(model="sim", prompt="ok", max_tokens=2).choices


def test_text_with_a_lone_surrogate_is_400_naming_the_field(front: Front) -> None:
    """JSON may escape half of a UTF-16 pair (`"\\ud800"`): Python decodes it to a str that
    has no UTF-8 form, which the prompt's byte count and the tokenizer cannot take (it was a
    500 "internal error")."""
    bodies = {
        "/completions": {"model": "sim", "prompt": "hi \ud800 there", "max_tokens": 2},
        "/chat/completions": {
            "model": "sim",
            "messages": [{"role": "user", "content": "\udfff"}],
            "max_tokens": 2,
        },
    }
    for route, body in bodies.items():
        r = httpx.post(
            front.scheduler.openai_url + route,
            content=json.dumps(body),  # ASCII, the surrogate escaped
            headers={**AUTH, "Content-Type": "application/json"},
            timeout=30,
        )
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == ("prompt" if route == "/completions" else "messages")
        assert "surrogate" in error["message"]
    assert front.client().completions.create(model="sim", prompt="ok", max_tokens=2).choices


def test_a_session_key_comes_as_a_header_or_the_user_field_and_is_bounded(front: Front) -> None:
    client = front.client()
    for extra in ({"extra_headers": {"X-Session-Id": "conv-1"}}, {"user": "agent-7"}):
        first = client.completions.create(model="sim", prompt="turn one", max_tokens=3, **extra)
        assert first.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="x-session-id"):
        client.completions.create(
            model="sim", prompt="x", max_tokens=2, extra_headers={"X-Session-Id": "s" * 257}
        )


def test_a_session_header_is_utf_8_bounded_in_characters_as_over_grpc(front: Front) -> None:
    # The header was read as Latin-1: 256 two-byte characters counted 512 and were refused,
    # while the same key as `user` (or a gRPC session_id) was taken.
    url = f"{front.scheduler.openai_url}/completions"
    body = {"model": "sim", "prompt": "x", "max_tokens": 2}

    def post(session: bytes) -> httpx.Response:
        return httpx.post(url, json=body, headers={**AUTH, "X-Session-Id": session}, timeout=30)

    assert post("é".encode() * 256).status_code == 200
    r = post("é".encode() * 257)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == "x-session-id: longer than 256 characters"
    r = post(b"conv-\xff")
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == "x-session-id: not valid UTF-8"


def test_chat_streams_the_same_text_as_the_whole_answer(front: Front) -> None:
    client = front.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi! 🙂"}]
    whole = client.chat.completions.create(
        model="sim",
        messages=messages,
        max_completion_tokens=40,
        extra_body={"ignore_eos": True},
    )
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 40
    stream = client.chat.completions.create(
        model="sim",
        messages=messages,
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage == whole.usage
    rendered = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi! 🙂<|im_end|>\n<|im_start|>assistant\n"
    prompt_ids = front.tokenizer.encode(rendered, add_special_tokens=False).ids
    assert whole.usage.prompt_tokens == len(prompt_ids)
    assert whole.choices[0].message.content == front.tokenizer.decode(
        front.reference(prompt_ids, 40)
    )


def test_stop_string_and_stop_token_end_the_text_early(front: Front) -> None:
    prompt = [7, 8, 9, 10]
    tokens = front.reference(prompt, 60)
    text = front.tokenizer.decode(tokens)
    stop = next(text[i : i + 2] for i in range(10, 40) if "\ufffd" not in text[i : i + 2])
    expected = text[: text.find(stop)]
    client = front.client()
    args = {"model": "sim", "prompt": prompt, "max_tokens": 60, "stop": [stop]}
    whole = client.completions.create(**args, extra_body={"ignore_eos": True})
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (expected, "stop")
    chunks = [
        c
        for c in client.completions.create(**args, stream=True, extra_body={"ignore_eos": True})
        if c.choices
    ]
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    r = client.completions.create(
        model="sim",
        prompt=prompt,
        max_tokens=60,
        extra_body={"ignore_eos": True, "stop_token_ids": [tokens[5]]},
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens == tokens.index(tokens[5]) + 1


OPENAI_NULLABLE = [
    "temperature",
    "top_p",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "user",
]
"""Optional fields OpenAI's API documents as nullable: null asks for the default."""


def test_null_in_an_optional_field_means_its_default(front: Front) -> None:
    """Clients that write every field (null for those they leave unset) are served as if they
    had left them out; a required field that is null is still a 400 naming it."""
    url = front.scheduler.openai_url
    nulls = dict.fromkeys(OPENAI_NULLABLE)
    bodies = {
        "/completions": {"model": "sim", "prompt": [5, 6, 7], "max_tokens": 4},
        "/chat/completions": {
            "model": "sim",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
        },
    }
    extra = {"/completions": ["echo", "best_of", "suffix"], "/chat/completions": []}
    for route, body in bodies.items():
        plain = httpx.post(url + route, json=body, headers=AUTH, timeout=30)
        assert plain.status_code == 200, plain.text
        with_nulls = {**body, **nulls, **dict.fromkeys(extra[route])}
        r = httpx.post(url + route, json=with_nulls, headers=AUTH, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["choices"] == plain.json()["choices"]
        r = httpx.post(url + route, json={**body, "model": None}, headers=AUTH, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"temperature": 7}, "temperature"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
        ({"max_tokens": 5000}, "max_tokens"),
    ],
)
def test_bad_chat_requests_are_400_naming_the_field(
    front: Front, body: dict[str, object], param: str | None
) -> None:
    payload = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], **body}
    r = httpx.post(
        f"{front.scheduler.openai_url}/chat/completions", json=payload, headers=AUTH, timeout=30
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param and error["message"].startswith(param)


def test_a_prompt_that_alone_fills_the_model_names_the_prompt(front: Front) -> None:
    """It named max_tokens, which no value could have fixed."""
    payload = {"model": "sim", "prompt": [5] * 4096, "max_tokens": 3}
    r = httpx.post(f"{front.scheduler.openai_url}/completions", json=payload, headers=AUTH)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prompt", r.text


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        # The field's union (text, token ids, lists of either) reports the branch the input
        # matched in shape, named by field and index, not its first branch ("a valid string").
        ({"prompt": [5, -1]}, "prompt.1", "greater than or equal to 0"),
        ({"prompt": [[1, 2], [3, "x"]]}, "prompt.1.1", "valid integer"),
        ({"prompt": "hi", "stop": ["ab"] * 5000}, "stop", "at most 16 items"),
    ],
)
def test_a_bad_value_inside_a_union_field_is_named_where_it_is(
    front: Front, body: dict[str, object], param: str, words: str
) -> None:
    r = httpx.post(
        f"{front.scheduler.openai_url}/completions",
        json={"model": "sim", "max_tokens": 4, **body},
        headers=AUTH,
        timeout=30,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error


@pytest.mark.parametrize(
    ("route", "field", "param"),
    [
        ("chat/completions", '"temperature": NaN', "temperature"),
        ("completions", '"temperature": Infinity', "temperature"),
        ("completions", '"top_p": -Infinity', "top_p"),
        ("chat/completions", '"presence_penalty": NaN', "presence_penalty"),
        ("completions", '"logit_bias": {"5": NaN}', "logit_bias.5"),
    ],
)
def test_a_number_that_is_not_finite_is_400_naming_the_field(
    front: Front, route: str, field: str, param: str
) -> None:
    """Python's JSON parser reads NaN and Infinity; NaN was refused as over the upper bound
    ("less than or equal to 2"), and NaN in a field with no bound was not refused there."""
    prompt = (
        '"messages": [{"role": "user", "content": "hi"}]' if "chat" in route else '"prompt": "hi"'
    )
    r = httpx.post(
        f"{front.scheduler.openai_url}/{route}",
        content=f'{{"model": "sim", "max_tokens": 4, {prompt}, {field}}}',
        headers={**AUTH, "Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert error["message"] == f"{param}: Input should be a finite number", error


@pytest.mark.parametrize(
    ("route", "field", "param", "message"),
    [
        ("completions", {"max_tokens": "5"}, "max_tokens", "valid integer, got a string"),
        ("completions", {"max_tokens": True}, "max_tokens", "valid integer, got a boolean"),
        ("completions", {"max_tokens": 5.0}, "max_tokens", "valid integer, got a decimal number"),
        ("chat/completions", {"max_completion_tokens": "3"}, "max_completion_tokens", "integer"),
        ("chat/completions", {"temperature": "0.5"}, "temperature", "valid number, got a string"),
        ("chat/completions", {"stream": "true"}, "stream", "valid boolean, got a string"),
        ("chat/completions", {"stream": 1}, "stream", "valid boolean, got an integer"),
        ("completions", {"ignore_eos": 1}, "ignore_eos", "valid boolean"),
        ("completions", {"seed": "1"}, "seed", "valid integer"),
        ("completions", {"n": "1"}, "n", "valid integer"),
        ("completions", {"stop_token_ids": ["1"]}, "stop_token_ids.0", "valid integer"),
        ("completions", {"prompt": [1.0, 2.0]}, "prompt.0", "valid integer"),
        ("completions", {"prompt": [True]}, "prompt.0", "valid integer"),
    ],
)
def test_a_value_of_the_wrong_json_type_is_400_not_coerced(
    front: Front, route: str, field: dict[str, object], param: str, message: str
) -> None:
    """OpenAI's API refuses `"max_tokens": "5"`, `true` or `5.0`; pydantic's lax mode read them
    as 5, 1 and 5 and served the request."""
    prompt = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in route else {}
    body = {"model": "sim", "prompt": "hi", "max_tokens": 4, **prompt, **field}
    if "chat" in route:
        body.pop("prompt")
        if "max_completion_tokens" in field:
            body.pop("max_tokens")
    r = httpx.post(f"{front.scheduler.openai_url}/{route}", json=body, headers=AUTH, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert error["message"].startswith(f"{param}: "), error
    # An integer where a number is expected is a number (JSON has one number type).
    ok = {"model": "sim", "prompt": "hi", "max_tokens": 2, "temperature": 1, "top_p": 1}
    r = httpx.post(f"{front.scheduler.openai_url}/completions", json=ok, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        (
            [{"role": "user", "content": "a"}] * 4097,
            "messages: List should have at most 4096 items after validation, not 4097",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": "a"}] * 41}] * 100,
            "messages: 4100 text parts in all; at most 4096",
        ),
    ],
)
def test_a_chat_of_too_many_messages_or_parts_is_400_before_it_is_rendered(
    front: Front, messages: list[object], message: str
) -> None:
    """The chat template renders message by message on the front's event loop: 120,000
    one-letter messages (within the 4 MiB body bound) held every other stream for a second."""
    r = httpx.post(
        f"{front.scheduler.openai_url}/chat/completions",
        json={"model": "sim", "max_tokens": 2, "messages": messages},
        headers=AUTH,
        timeout=30,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"] == {
        "message": message,
        "type": "invalid_request_error",
        "param": "messages",
        "code": None,
    }


@pytest.mark.parametrize(
    ("route", "body", "param", "words"),
    [
        # Under the model's length (4,096 here) each id is checked, the first bad one named;
        # past it the length alone refuses the list, before any id is looked at.
        ("completions", {"prompt": [5] * 4000 + [-1]}, "prompt.4000", "greater than"),
        ("completions", {"prompt": [-1] * 4000}, "prompt.0", "greater than or equal to 0"),
        ("completions", {"prompt": [[5] * 4000 + ["x"]]}, "prompt.0.4000", "integer"),
        ("completions", {"prompt": [-1] * 400_000}, "prompt", "prompt of 400000 tokens leaves"),
        ("completions", {"prompt": [[5] * 400_000 + ["x"]]}, "prompt", "400001 tokens leaves"),
        ("completions", {"prompt": ["a"] * 400_000}, "prompt", "a batch of 400000 prompts"),
        ("completions", {f"k{i}": 1 for i in range(250_000)}, "k0", "not supported"),
        ("completions", {"logit_bias": {str(i): "x" for i in range(250_000)}}, "logit_bias.0", ""),
        (
            "chat/completions",
            {
                "messages": [
                    {"role": "user", "content": "a", **{f"k{i}": 1 for i in range(250_000)}}
                ]
            },
            "messages.0.k0",
            "not supported",
        ),
    ],
)
def test_a_body_with_many_bad_items_is_400_at_once_naming_the_first(
    front: Front, route: str, body: dict[str, object], param: str, words: str
) -> None:
    """Pydantic made an error for every bad item (and a union field one per branch) on the
    event loop that runs every stream and the scheduling: a 3 MB list of negative token ids
    held the scheduler for 27 s, 300,000 unknown keys for a second. The 400 names the first."""
    base: dict[str, object] = {"model": "sim", "max_tokens": 2}
    base.update(
        {"messages": [{"role": "user", "content": "hi"}]} if "chat" in route else {"prompt": "hi"}
    )
    content = json.dumps({**base, **body}).encode()
    assert len(content) < 4 << 20
    started = time.monotonic()
    r = httpx.post(
        f"{front.scheduler.openai_url}/{route}",
        content=content,
        headers={**AUTH, "Content-Type": "application/json"},
        timeout=60,
    )
    took = time.monotonic() - started
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert took < 3, f"answered after {took:.1f} s"
    _still_serves(front)


def test_a_body_that_is_not_a_json_object_is_400_saying_so(front: Front) -> None:
    for raw, kind in [(b"[]", "an array"), (b'"x"', "a string"), (b"null", "null")]:
        r = httpx.post(
            f"{front.scheduler.openai_url}/completions", content=raw, headers=AUTH, timeout=30
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"] == f"the body should be a JSON object, got {kind}"


def test_a_body_not_sent_as_json_is_415_and_never_runs(front: Front) -> None:
    """`text/plain` and the form types are what a web page may POST to any origin without a
    CORS preflight; the front read such bodies as JSON and ran them, so on a scheduler without
    a token (the loopback default) any page its user opened could start requests. JSON types
    with parameters, `+json` types and a body with no type named are still read."""
    url = f"{front.scheduler.openai_url}/completions"
    body = json.dumps({"model": "sim", "prompt": "hi", "max_tokens": 2}).encode()
    for kind in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x"]:
        r = httpx.post(url, content=body, headers={**AUTH, "Content-Type": kind}, timeout=30)
        assert r.status_code == 415, (kind, r.text)
        assert "Content-Type: application/json" in r.json()["error"]["message"]
    for kind in ["application/json; charset=utf-8", "Application/JSON", "application/x+json"]:
        r = httpx.post(url, content=body, headers={**AUTH, "Content-Type": kind}, timeout=30)
        assert r.status_code == 200, (kind, r.text)
    r = httpx.post(url, content=body, headers=AUTH, timeout=30)  # no Content-Type at all
    assert r.status_code == 200, r.text
    metrics = httpx.get(front.scheduler.openai_url.removesuffix("/v1") + "/metrics").text
    assert 'cascade_scheduler_http_responses_total{route="/v1/completions",status="415"} 3.0' in (
        metrics
    )


def _raw_exchange(front: Front, parts: list[bytes], pause_s: float = 0.0) -> tuple[bytes, float]:
    """Sends `parts` on one connection (pausing `pause_s` before the last) and reads until the
    server closes it; returns what came back and how long the server took to close."""
    host, port = front.scheduler.openai_url.removeprefix("http://").split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        start = time.monotonic()
        for k, part in enumerate(parts):
            if k == len(parts) - 1 and pause_s:
                time.sleep(pause_s)
            try:
                s.sendall(part)
            except OSError:
                break  # the server closed it already
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        return answer, time.monotonic() - start


def _still_serves(front: Front) -> None:
    r = httpx.get(f"{front.scheduler.openai_url}/models", headers=AUTH, timeout=10)
    assert r.status_code == 200


def test_an_http_1_0_client_gets_a_stream_delimited_by_the_close_not_chunked(
    front: Front,
) -> None:
    # HTTP/1.0 has no chunked coding (RFC 9112, 6.1); uvicorn sent it to such a client anyway.
    body = json.dumps({"model": "sim", "prompt": "hi", "max_tokens": 5, "stream": True}).encode()
    head = (
        b"POST /v1/completions HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer "
        + TOKEN.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    answer, _ = _raw_exchange(front, [head + body])  # it reads until the server closes
    status, _, rest = answer.partition(b"\r\n")
    headers, _, events = rest.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 200"), answer[:300]
    names = {line.split(b":")[0].lower() for line in headers.split(b"\r\n")}
    assert b"transfer-encoding" not in names and b"content-length" not in names, headers
    assert b"connection: close" in headers.lower()
    # The events as they were written, no chunk sizes between them.
    data = [e.removeprefix(b"data: ") for e in events.split(b"\n\n") if e]
    assert data[-1] == b"[DONE]", events[-200:]
    chunks = [json.loads(d) for d in data[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks)
    # A whole answer (it has a Content-Length) is unchanged, and a 1.1 stream is still chunked.
    models = b"GET /v1/models HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
    answer, _ = _raw_exchange(front, [models + b"\r\n\r\n"])
    assert b"content-length:" in answer.lower() and b'"object":"list"' in answer.replace(b" ", b"")
    eleven = head.replace(b"HTTP/1.0", b"HTTP/1.1").replace(
        b"Host: x", b"Host: x\r\nConnection: close"
    )
    answer, _ = _raw_exchange(front, [eleven + body])
    assert b"transfer-encoding: chunked" in answer.lower()
    _still_serves(front)


def test_an_oversized_request_head_is_431_and_the_connection_closes(front: Front) -> None:
    head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
    headers = [b"X-Filler-%d: %s\r\n" % (k, b"b" * 8000) for k in range(40)]  # 320 KB
    answer, _ = _raw_exchange(front, [head, *headers, b"\r\n"])
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"request head over" in answer
    _still_serves(front)


def test_a_request_target_over_its_bound_is_414_and_the_connection_closes(front: Front) -> None:
    # A 70 KB target got the parser's plain 400 (httptools' URL parser keeps 16-bit offsets),
    # and one of up to 64 KB was served.
    for target, parts in [
        (b"/v1/models?" + b"a" * 70_000, 1),  # whole in one write
        (b"/v1/models/" + b"m" * (MAX_TARGET_BYTES + 1000), 20),  # still arriving when refused
    ]:
        request = b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        size = -(-len(request) // parts)
        pieces = [request[k : k + size] for k in range(0, len(request), size)]
        answer, _ = _raw_exchange(front, pieces)
        assert answer.startswith(b"HTTP/1.1 414 URI Too Long\r\n"), answer[:200]
        error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
        assert error["message"] == f"request target over {MAX_TARGET_BYTES} bytes", error
    # A target at the bound is read as before.
    padding = b"a" * (MAX_TARGET_BYTES - len(b"/v1/models?"))
    request = b"GET /v1/models?" + padding + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer, _ = _raw_exchange(front, [request])
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]  # no token: it reached the app
    _still_serves(front)


def test_a_burst_of_metrics_scrapes_renders_the_page_a_bounded_number_of_times(
    front: Front,
) -> None:
    # /metrics needs no token, and each scrape rendered the whole registry on the event loop:
    # 700 scrapes a second doubled the completion p50. A counter that changes before every
    # scrape shows how many renders there were: as many as the distinct values seen.
    base = front.scheduler.openai_url.removesuffix("/v1")
    line = re.compile(
        r'^cascade_scheduler_http_responses_total\{route="/v1/models",status="200"\} (\S+)$', re.M
    )
    num_scrapes = 100
    with httpx.Client(headers=AUTH, timeout=10) as http:

        def models_answered() -> float:
            found = line.search(http.get(f"{base}/metrics").text)
            return float(found.group(1)) if found else 0.0

        time.sleep(1 / RENDERS_PER_S + 0.1)  # a fresh render is due
        before = models_answered()
        started = time.monotonic()
        seen = []
        for _ in range(num_scrapes):
            assert http.get(f"{base}/v1/models").status_code == 200
            seen.append(models_answered())
        took = time.monotonic() - started
        assert len(set(seen)) <= RENDER_BURST + RENDERS_PER_S * took + 1, (len(set(seen)), took)
        # Once a render is due again, the page shows every answer.
        time.sleep(1 / RENDERS_PER_S + 0.1)
        assert models_answered() == before + num_scrapes


def test_a_request_head_or_body_that_never_completes_is_408(front: Front) -> None:
    # Headers that stop coming (a slowloris): answered and closed after the timeout.
    answer, took = _raw_exchange(front, [b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"])
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert REQUEST_TIMEOUT_S * 0.9 <= took < REQUEST_TIMEOUT_S + 10
    # A body shorter than its declared length: the handler gives up with an OpenAI error.
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + TOKEN.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    answer, took = _raw_exchange(front, [head, b'{"model": "sim"'])
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["message"].startswith(
        "request body not received"
    )
    # A connection that never sends a byte is closed, not kept forever.
    answer, took = _raw_exchange(front, [])
    assert answer == b"" and took < REQUEST_TIMEOUT_S + 10
    _still_serves(front)


def test_bodies_arriving_at_once_are_bounded_in_total_and_the_bound_frees(front: Front) -> None:
    # Each body is bounded (4 MiB) and timed, but 400 slow ones at once held 1.66 GB: past
    # --http-max-body-bytes-in-flight (6 MiB here) a body is refused, with its connection.
    request = b'{"model": "sim", "prompt": "hi", "max_tokens": 2}'
    part, rest = 2_500_000, 1000
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + TOKEN.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        % (len(request) + part + rest)
    )
    host, port = front.scheduler.openai_url.removeprefix("http://").split("/")[0].split(":")
    held = [socket.create_connection((host, int(port)), timeout=30) for _ in range(2)]
    try:
        for s in held:  # two bodies, 5 MB together, short of their last bytes
            s.sendall(head + request + b" " * part)
        time.sleep(0.5)  # both read as far as they came
        # A third, past the bound by its last bytes (the answer comes once they are read, so
        # none are left unread when the connection closes, which would reset it).
        third = b" " * (BODIES_IN_FLIGHT - 2 * (len(request) + part) + 100)
        answer, _ = _raw_exchange(front, [head, third])
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
        assert b"retry-after: 1" in answer.lower()
        error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
        assert error["code"] == "server_busy" and "in-flight" in error["message"], error
        for s in held:  # the two held bodies end and are served
            s.sendall(b" " * rest)
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
    finally:
        for s in held:
            s.close()
    # The bound frees with the bodies read: a body as large as the third is taken now.
    body = request + b" " * len(third)
    r = httpx.post(f"{front.scheduler.openai_url}/completions", content=body, headers=AUTH)
    assert r.status_code == 200, r.text
    assert "http_internal_error" not in front.scheduler.log()


def test_a_client_gone_before_its_body_arrived_is_no_internal_error(front: Front) -> None:
    # Such a client made an error with a traceback and a 500 on the response counter each
    # time: anyone could fill the log with them and set off an alert on internal errors.
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + TOKEN.encode()
        + b"\r\nContent-Type: application/json\r\n"
    )
    host, port = front.scheduler.openai_url.removeprefix("http://").split("/")[0].split(":")
    for rest in [b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n", b"Content-Length: 99\r\n\r\n{"]:
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(head + rest)
            time.sleep(0.3)  # the handler is reading the body when the client goes
    deadline = time.monotonic() + 10
    while front.scheduler.log().count("client_left_before_body") < 2:
        assert time.monotonic() < deadline, "the scheduler did not see the clients leave"
        time.sleep(0.1)
    assert "http_internal_error" not in front.scheduler.log()
    metrics = httpx.get(front.scheduler.openai_url.removesuffix("/v1") + "/metrics").text
    assert 'route="/v1/completions",status="499"} 2.0' in metrics
    assert 'route="/v1/completions",status="500"}' not in metrics
    _still_serves(front)


def test_a_request_http_cannot_parse_is_400_in_the_openai_error_shape(front: Front) -> None:
    # uvicorn answered these in plain text ("Invalid HTTP request received.").
    for head in [
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GARBAGE\r\n\r\n",
    ]:
        answer, _ = _raw_exchange(front, [head])
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
        assert error["type"] == "invalid_request_error" and error["message"], error
    _still_serves(front)


def test_a_transfer_coding_other_than_chunked_is_501(front: Front) -> None:
    # `gzip, chunked` was read as plain chunked and answered 200: a proxy in front that applies
    # the gzip reads another body than the one served (a smuggling seam).
    body = b'{"model": "sim", "prompt": "x", "max_tokens": 2}'
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    for coding in (b"gzip, chunked", b"deflate,chunked"):
        head = (
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + TOKEN.encode()
            + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: "
            + coding
            + b"\r\n\r\n"
        )
        answer, _ = _raw_exchange(front, [head + chunked])
        assert answer.startswith(b"HTTP/1.1 501 "), (coding, answer[:200])
    _still_serves(front)


def test_a_connection_answered_before_its_body_arrived_is_not_held_forever(front: Front) -> None:
    # Answered (401: no token) while most of the declared body is still to come. One more
    # byte then disarmed uvicorn's keep-alive timer and nothing re-armed it: the connection,
    # and its slot under --http-max-connections, stayed open with no deadline, unauthenticated.
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{"
    answer, took = _raw_exchange(front, [head, b" "], pause_s=0.5)
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert took < REQUEST_TIMEOUT_S + 8, took
    # The body sent whole after the early answer, then silence: closed like any idle one.
    answer, took = _raw_exchange(front, [head, b" " * (100000 - 1)], pause_s=0.5)
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert took < REQUEST_TIMEOUT_S + 8, took
    _still_serves(front)


def test_bad_token_unknown_model_and_bad_json(front: Front) -> None:
    url = f"{front.scheduler.openai_url}/completions"
    body = {"model": "sim", "prompt": "hi", "max_tokens": 2}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=front.scheduler.openai_url, api_key="wrong", max_retries=0
        ).models.list()
    assert httpx.post(url, json=body, timeout=30).status_code == 401
    with pytest.raises(openai.NotFoundError) as e:
        front.client().completions.create(model="gpt-4o", prompt="hi", max_tokens=2)
    assert e.value.code == "model_not_found"
    r = httpx.post(url, content=b"{not json", headers=AUTH, timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    huge = b'{"model": "sim", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}"
    r = httpx.post(url, content=huge, headers=AUTH, timeout=30)  # past Python's 4300 digits
    assert r.status_code == 400 and "digits" in r.json()["error"]["message"], r.text
    r = httpx.post(url, content=b"x" * (5 << 20), headers=AUTH, timeout=30)
    assert r.status_code == 413
    assert (
        front.client().completions.create(model="sim", prompt="still serving", max_tokens=2).usage
        is not None
    )
    for k in range(3):  # distinct paths, one route: one series, whatever the paths
        assert httpx.get(f"{front.scheduler.openai_url}/models/x{k}", timeout=30).status_code == 401
    metrics = httpx.get(front.scheduler.openai_url.removesuffix("/v1") + "/metrics").text
    assert 'route="/v1/models/{name}",status="401"}' in metrics
    assert "/v1/models/x0" not in metrics
    for status in (200, 400, 401, 404, 413):
        line = (
            f'cascade_scheduler_http_responses_total{{route="/v1/completions",status="{status}"}}'
        )
        assert line in metrics, status


def test_an_error_quotes_at_most_a_bounded_part_of_what_the_client_sent(front: Front) -> None:
    """An unknown key, a model name or a path came back whole (a 3 MB key twice in one body),
    which a client that never read its answer kept in the scheduler's memory."""
    url = f"{front.scheduler.openai_url}/completions"
    key = "k" * 300_000
    r = httpx.post(url, json={"model": "sim", "prompt": "x", key: 1}, headers=AUTH, timeout=30)
    assert r.status_code == 400 and len(r.content) < 4096, len(r.content)
    assert "(300000 characters)" in r.json()["error"]["param"]
    r = httpx.post(url, json={"model": "m" * 300_000, "prompt": "x"}, headers=AUTH, timeout=30)
    assert r.status_code == 404 and len(r.content) < 4096, len(r.content)
    assert r.json()["error"]["code"] == "model_not_found"
    # A path just under the target bound (a longer one is 414, see below).
    r = httpx.get(f"{front.scheduler.openai_url}/{'p' * 8_000}", timeout=30)
    assert r.status_code == 404 and len(r.content) < 4096, len(r.content)


def test_a_trailing_slash_is_not_redirected_to_the_host_a_client_names(front: Front) -> None:
    # Starlette's slash redirect answered 307 to http://<Host header>/v1/completions, untokened.
    url = f"{front.scheduler.openai_url}/completions/"
    r = httpx.post(url, json={}, headers={"Host": "evil.example"}, timeout=30)
    assert r.status_code == 404 and "location" not in r.headers, r.headers
    metrics = httpx.get(front.scheduler.openai_url.removesuffix("/v1") + "/metrics").text
    assert 'cascade_scheduler_http_responses_total{route="unrouted",status="404"}' in metrics


def test_a_request_id_header_is_utf_8_as_over_grpc(front: Front) -> None:
    # Read as Latin-1, "café" came back as "cafÃ©": not the id the same client gives over gRPC.
    url = f"{front.scheduler.openai_url}/completions"
    body = {"model": "sim", "prompt": "x", "max_tokens": 2}
    r = httpx.post(url, json=body, headers={**AUTH, "X-Request-Id": "café-1".encode()}, timeout=30)
    assert r.status_code == 200 and r.json()["id"] == "café-1", r.text
    r = httpx.post(url, json=body, headers={**AUTH, "X-Request-Id": b"id-\xff"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-request-id", r.text


def wait_idle(front: Front, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while front.num_running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert front.num_running() == 0, "the request still runs on a worker"


def _abort_when_running(front: Front, request_id: str) -> None:
    """Sends the scheduler's Abort for `request_id` (this client's token) once it runs."""
    deadline = time.monotonic() + 20
    while not front.num_running():
        assert time.monotonic() < deadline, "the request never ran"
        time.sleep(0.05)
    channel = grpc.insecure_channel(front.scheduler.address)
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
    stub.Abort(
        scheduler_pb2.ClientAbortRequest(request_id=request_id), metadata=AUTH_MD, timeout=10
    )
    channel.close()


def test_a_request_its_client_aborts_is_499_and_not_run_again(front: Front) -> None:
    """A request ended by its client's Abort (gRPC, same token) was answered 503 "no worker
    could finish it": the openai SDK retries a 503 by default, so it sent the request again
    and it ran to its end, as if never aborted. Now 499, which clients do not retry."""
    client = openai.OpenAI(base_url=front.scheduler.openai_url, api_key=TOKEN, max_retries=2)
    body = {"model": "sim", "prompt": "x", "max_tokens": 3000, "extra_body": {"ignore_eos": True}}
    with ThreadPoolExecutor(1) as pool:
        whole = pool.submit(
            client.completions.create, **body, extra_headers={"X-Request-Id": "abort-whole"}
        )
        _abort_when_running(front, "abort-whole")
        with pytest.raises(openai.APIStatusError) as e:
            whole.result(timeout=60)
    assert e.value.status_code == 499, e.value
    assert "ended by its client's Abort" in e.value.message
    wait_idle(front, timeout=5)

    url = f"{front.scheduler.openai_url}/completions"
    stream_body = {"model": "sim", "prompt": "x", "max_tokens": 3000, "stream": True}
    headers = {**AUTH, "X-Request-Id": "abort-stream"}
    with ThreadPoolExecutor(1) as pool:
        later = pool.submit(_abort_when_running, front, "abort-stream")
        with httpx.stream("POST", url, json=stream_body, headers=headers, timeout=60) as r:
            events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
        later.result(timeout=30)
    assert events[-1] == "[DONE]"
    assert "ended by its client's Abort" in json.loads(events[-2])["error"]["message"]


def test_a_client_that_disconnects_has_its_request_aborted(front: Front) -> None:
    left = front.scheduler.log().count('"event": "client_left"')
    url = f"{front.scheduler.openai_url}/completions"
    body = {
        "model": "sim",
        "prompt": [5] * 10,
        "max_tokens": 3000,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", url, json=body, headers=AUTH, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert front.num_running() == 1
    wait_idle(front)
    body["stream"] = False
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=body, headers=AUTH, timeout=2)
    wait_idle(front)
    assert front.scheduler.log().count('"event": "client_left"') == left + 2


def test_queue_full_is_429_and_no_worker_is_503(front: Front, tmp_path: Path) -> None:
    profile = json.loads(CostProfile.builtin("gpu-h100-llama3-8b").to_json())
    profile["kv_capacity_tokens"] = 300
    (tmp_path / "small.json").write_text(json.dumps(profile))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    small = [
        "--profile",
        str(tmp_path / "small.json"),
        "--max-queue",
        "0",
        "--policy",
        "least-load",
        "--http-max-connections",
        "4",
    ]
    # A worker of its own: a worker serves one scheduler (the module's holds its workers).
    with workers([SIM], tmp_path) as (own,):
        _queue_full_is_429_and_no_worker_is_503(front, tmp_path, token_file, own, small)


def _queue_full_is_429_and_no_worker_is_503(
    front: Front, tmp_path: Path, token_file: Path, own: Daemon, small: list[str]
) -> None:
    full = start_scheduler(
        scheduler_args(front.model_dir, token_file, "--workers", own.address, *small),
        tmp_path,
    )
    try:
        client = openai.OpenAI(base_url=full.openai_url, api_key=TOKEN, max_retries=0)
        first = client.completions.create(
            model="sim",
            prompt=[3] * 200,
            max_tokens=2000,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        next(iter(first))
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="sim", prompt=[4] * 200, max_tokens=10)
        first.close()
        client.close()
        # Past the connection limit: 503 in the OpenAI error shape, like every other answer.
        host, port = full.openai_url.removeprefix("http://").split("/")[0].split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(4)]
        try:
            r = httpx.get(f"{full.openai_url}/models", headers=AUTH, timeout=10)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["type"] == "service_unavailable_error"
            # Far past it, connections are closed as they come: idle ones that send nothing
            # (no token needed) took every descriptor of the scheduler, gRPC API included.
            fds = Path(f"/proc/{full.process.pid}/fd")
            before = len(list(fds.iterdir()))
            idle += [socket.create_connection((host, int(port))) for _ in range(4 * EXCESS)]
            time.sleep(0.5)
            held = len(list(fds.iterdir())) - before
            assert held <= EXCESS + 8, f"{held} descriptors held for {4 * EXCESS} connections"
            health = health_pb2_grpc.HealthStub(grpc.insecure_channel(full.address))
            checked = health.Check(health_pb2.HealthCheckRequest(), metadata=AUTH_MD, timeout=10)
            assert checked.status
        finally:
            for s in idle:
                s.close()
    finally:
        full.stop()
    none = start_scheduler(
        scheduler_args(front.model_dir, token_file, "--workers", own.address, "--min-workers", "2"),
        tmp_path,
    )
    try:
        client = openai.OpenAI(base_url=none.openai_url, api_key=TOKEN, max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="sim", prompt="hi", max_tokens=2)
        assert e.value.status_code == 503
        assert httpx.get(none.openai_url.removesuffix("/v1") + "/health").status_code == 503
    finally:
        none.stop()


def test_a_front_without_a_token_answers_only_loopback_host_names(
    front: Front, tmp_path: Path
) -> None:
    """DNS rebinding: a page the user opens renames its origin to 127.0.0.1, and its browser
    then calls the API with the page's name as Host. Without a token on loopback, the front
    answers only Host names of this machine's loopback; with a token, any (test above)."""
    args = ["--tokenizer", str(front.model_dir), "--http-port", "0"]
    # A worker of its own: a worker serves one scheduler (the module's holds its workers).
    with workers([SIM], tmp_path) as (own,):
        _answers_only_loopback_host_names(
            start_scheduler([*args, "--workers", own.address], tmp_path)
        )


def _answers_only_loopback_host_names(open_front: Daemon) -> None:
    try:
        base = open_front.openai_url.removesuffix("/v1")
        port = base.rsplit(":", 1)[1]
        loopback = [f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST.", f"[::1]:{port}"]
        loopback += [f"[::ffff:127.0.0.1]:{port}", "localhost:"]
        for host in loopback:
            r = httpx.get(f"{base}/v1/models", headers={"Host": host}, timeout=10)
            assert r.status_code == 200, (host, r.text)
        others = [f"attacker.example:{port}", "attacker.example", f"127.0.0.1.nip.io:{port}"]
        for host in [*others, "[::1]attacker.example"]:
            for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions")]:
                r = httpx.request(
                    method,
                    f"{base}{path}",
                    headers={"Host": host},
                    json={"model": "sim", "prompt": "hi", "max_tokens": 2},
                    timeout=10,
                )
                assert r.status_code == 403, (host, path, r.text)
                assert r.json()["error"]["code"] == "host_not_allowed"
        # Two Host lines: which one a proxy in front went by is unknown (RFC 9112: 400).
        two = "GET /v1/models HTTP/1.1\r\nHost: localhost\r\nHost: attacker.example\r\n\r\n"
        with socket.create_connection(("127.0.0.1", int(port)), timeout=10) as c:
            c.sendall(two.encode())
            assert c.recv(65536).split(b"\r\n", 1)[0].split(b" ")[1] in (b"400", b"403")
        client = openai.OpenAI(base_url=open_front.openai_url, api_key="unused", max_retries=0)
        answer = client.completions.create(model="sim", prompt="hi", max_tokens=2)
        assert answer.usage is not None and answer.usage.completion_tokens == 2
    finally:
        open_front.stop()


def test_https_with_the_scheduler_certificate(tmp_path: Path) -> None:
    """With --tls-cert the HTTP API is HTTPS: a client trusting the CA streams, plain HTTP
    to the same port gets a 400 that says so."""
    certs = make_certs(tmp_path / "certs")
    tls = ["--tls-cert", str(certs.cert), "--tls-key", str(certs.key), "--tls-ca", str(certs.ca)]
    model_dir = write_tiny_llama(tmp_path / "model")
    args = ["--tokenizer", str(model_dir), "--http-port", "0", "--min-workers", "1", *tls]
    args += ["--served-model-name", "tiny-chat"]
    scheduler = start_scheduler(args, tmp_path)
    try:
        worker = start_worker([*SIM, "--scheduler", scheduler.address, *tls], tmp_path)
        try:
            assert scheduler.openai_url.startswith("https://127.0.0.1:")
            http = httpx.Client(verify=ssl.create_default_context(cafile=str(certs.ca)))
            client = openai.OpenAI(
                base_url=scheduler.openai_url, api_key="none", http_client=http, max_retries=0
            )
            health = scheduler.openai_url.removesuffix("/v1") + "/health"
            deadline = time.monotonic() + 30
            while http.get(health).status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert [m.id for m in client.models.list().data] == ["tiny-chat"]
            chunks = list(
                client.completions.create(
                    model="tiny-chat", prompt="secure", max_tokens=5, stream=True
                )
            )
            assert chunks[-1].choices[0].finish_reason in ("length", "stop")
            # Answered as nginx does (it was an empty reply: the TLS layer closed the socket).
            plain = httpx.get(scheduler.openai_url.replace("https://", "http://") + "/models")
            assert plain.status_code == 400
            assert "plain HTTP was sent to this HTTPS port" in plain.json()["error"]["message"]
        finally:
            worker.kill()
    finally:
        scheduler.kill()


def test_https_requires_a_client_certificate_where_grpc_does(tmp_path: Path) -> None:
    """`--tls-require-client-cert` holds for the HTTP API too: a client without a certificate
    signed by the CA fails the handshake; with one it is served. Before, the gRPC port
    refused such clients and the HTTP API on the same host served them (a scheduler that
    requires client certificates needs no token to start on a public address)."""
    certs = make_certs(tmp_path / "certs")
    tls = ["--tls-cert", str(certs.cert), "--tls-key", str(certs.key), "--tls-ca", str(certs.ca)]
    model_dir = write_tiny_llama(tmp_path / "model")
    args = ["--tokenizer", str(model_dir), "--http-port", "0", "--min-workers", "1", *tls]
    scheduler = start_scheduler([*args, "--tls-require-client-cert"], tmp_path)
    try:
        worker = start_worker([*SIM, "--scheduler", scheduler.address, *tls], tmp_path)
        try:
            models = scheduler.openai_url + "/models"
            anonymous = ssl.create_default_context(cafile=str(certs.ca))
            with pytest.raises(httpx.HTTPError):
                httpx.get(models, verify=anonymous, timeout=10)
            other = make_certs(tmp_path / "other", ca_name="another-ca")
            stranger = ssl.create_default_context(cafile=str(certs.ca))
            stranger.load_cert_chain(str(other.cert), str(other.key))
            with pytest.raises(httpx.HTTPError):
                httpx.get(models, verify=stranger, timeout=10)
            member = ssl.create_default_context(cafile=str(certs.ca))
            member.load_cert_chain(str(certs.cert), str(certs.key))
            deadline = time.monotonic() + 30
            while (r := httpx.get(models, verify=member, timeout=10)).status_code != 200:
                assert time.monotonic() < deadline, r.text  # 503 until the worker joined
                time.sleep(0.2)
        finally:
            worker.kill()
    finally:
        scheduler.kill()


def test_an_http_port_in_use_is_a_clear_configuration_error(tmp_path: Path) -> None:
    model_dir = write_tiny_llama(tmp_path / "model")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [SCHEDULER, "--port", "0", "--http-port", str(port), "--tokenizer", str(model_dir)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert out.returncode == 2
    assert f"cascade-scheduler: error: http_port = {port}: cannot listen" in out.stderr
