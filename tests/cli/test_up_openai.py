"""`cascade up` serves the OpenAI API out of the box: the official client streams chat and
completions through it, with sim workers and with vLLM on CPU (the built-in tiny model, its
tokenizer and chat template)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest

CASCADE = str(Path(sys.executable).parent / "cascade")
OPENAI_LINE = re.compile(r"^openai\s+(\S+) \(model '([^']+)'\)$")
TOKEN_LINE = re.compile(r"^auth token (\S+)")


@contextmanager
def cascade_up(*args: str, timeout: float = 300) -> Iterator[tuple[str, str, str]]:
    """Runs `cascade up ARGS` until it serves; yields (OpenAI base URL, model, API key: the
    cluster's bearer token when it prints one); stops it with SIGTERM (as Ctrl-C would) and
    checks it stopped cleanly."""
    process = subprocess.Popen(
        [CASCADE, "up", "--http-port", "0", "--no-demo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line or line.startswith("Ctrl-C stops the cluster"):
                break
            lines.append(line.strip())
        served = [m for m in map(OPENAI_LINE.match, lines) if m]
        assert served, "\n".join(lines)
        tokens = [m.group(1) for m in map(TOKEN_LINE.match, lines) if m]
        api_key = Path(tokens[0]).read_text().strip() if tokens else "unused"
        yield served[0].group(1), served[0].group(2), api_key
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, out[-3000:]
    assert out.splitlines()[-1] == "cluster stopped"


def chat_and_complete(url: str, model: str, api_key: str) -> None:
    client = openai.OpenAI(base_url=url, api_key=api_key, max_retries=0)
    assert [m.id for m in client.models.list().data] == [model]
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Hello!"}],
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.completions.create(
        model=model,
        prompt="Once upon a time",
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 12
    again = client.completions.create(
        model=model,
        prompt="Once upon a time",
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert again.choices[0].text == whole.choices[0].text, "greedy decoding repeats itself"
    assert text or whole.choices[0].text, "random weights still decode to some text"


def test_openai_client_through_cascade_up_with_sim_workers() -> None:
    with cascade_up("--engine", "sim", "--workers", "2") as (url, model, api_key):
        assert model == "sim"
        chat_and_complete(url, model, api_key)


@pytest.mark.timeout(900)
def test_openai_client_through_cascade_up_with_vllm_on_cpu() -> None:
    pytest.importorskip("vllm")
    with cascade_up("--engine", "vllm", "--workers", "1", timeout=600) as (url, model, api_key):
        assert model == "cascade-tiny-llama"
        chat_and_complete(url, model, api_key)
