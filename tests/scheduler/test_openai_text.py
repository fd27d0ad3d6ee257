"""The HTTP front's text parts without daemons: the tiny model's tokenizer and chat template
(checked against Hugging Face's own apply_chat_template), incremental text that never splits
a character, stop strings across pieces, and the mapping of request fields."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import cast

import pytest
from cascadeinfer.scheduler.config import parse_args
from cascadeinfer.scheduler.openai.errors import APIError
from cascadeinfer.scheduler.openai.model_files import ModelFiles, load_model_files
from cascadeinfer.scheduler.openai.params import (
    build_job,
    chat_prompt,
    completion_prompt,
)
from cascadeinfer.scheduler.openai.schema import (
    MAX_MODEL_LEN,
    ChatCompletionRequest,
    CompletionRequest,
)
from cascadeinfer.scheduler.openai.textstream import StopWatch, TextStream
from cascadeinfer.scheduler.text import INLINE_ENCODE_CHARS, load_tokenizer
from cascadeinfer.worker.tiny_model import write_tiny_llama
from pydantic import ValidationError
from tokenizers import Tokenizer

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Grüße! 你好 🙂"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "Again?"},
]

NO_BYTE_LIMIT = 1 << 30
"""max_prompt_bytes for these tests (the limit has its own test in test_openai_api.py)."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def files(model_dir: Path) -> ModelFiles:
    return load_model_files(load_tokenizer(str(model_dir)), str(model_dir))


def test_any_text_round_trips_through_the_tiny_tokenizer(files: ModelFiles) -> None:
    tok = files.tokenizer
    assert tok.get_vocab_size() == 1024
    for text in ["Hello! How are you today?", "Grüße 你好 🙂 \x00\n\t", "    def f():\n"]:
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
    assert len(tok.encode("Hello! How are you today?").ids) < 1 + len("Hello! How are you today?")
    assert files.eos_token_ids == (2,), "<|im_end|>, eos_token_id in config.json"


async def test_chat_template_renders_as_hugging_face_does(
    model_dir: Path, files: ModelFiles
) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    for add_generation_prompt in (True, False):
        body = ChatCompletionRequest.model_validate(
            {"model": "m", "messages": MESSAGES, "add_generation_prompt": add_generation_prompt}
        )
        expected = hf.apply_chat_template(
            MESSAGES, add_generation_prompt=add_generation_prompt, tokenize=True
        )
        if isinstance(expected, dict) or hasattr(expected, "input_ids"):
            expected = expected["input_ids"]
        assert list(await chat_prompt(body, files, NO_BYTE_LIMIT)) == list(expected)
    text = files.tokenizer.decode(
        list(await chat_prompt(body, files, NO_BYTE_LIMIT)), skip_special_tokens=False
    )
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n")


def test_text_pieces_never_split_a_character(files: ModelFiles) -> None:
    text = "aé🙂你好b" * 3
    ids = files.tokenizer.encode(text, add_special_tokens=False).ids
    stream = TextStream(files.tokenizer, ())
    pieces = [stream.feed((t,), is_last=k == len(ids) - 1).text for k, t in enumerate(ids)]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert sum(1 for p in pieces if p == "") > 0, "some tokens end inside a character"


class CountingTokenizer:
    """The tokenizer, counting the token ids it is asked to decode."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.num_decoded = 0

    def decode(self, ids: list[int]) -> str:
        self.num_decoded += len(ids)
        return self.tokenizer.decode(ids)


@pytest.mark.parametrize("kind", ["special tokens", "invalid UTF-8"])
def test_tokens_that_make_no_text_cost_linear_time(files: ModelFiles, kind: str) -> None:
    """An output of tokens that never complete a character (special tokens, which decode to
    nothing, as a model given ignore_eos may emit its end token again and again; or bytes that
    are no UTF-8) was held back whole and decoded again at every token: 4,000 such tokens
    decoded about 8 million ids, O(n^2) on the scheduler's event loop. Text around such a run
    still comes out whole."""
    tok = files.tokenizer
    if kind == "special tokens":
        filler = next(i for i in range(tok.get_vocab_size()) if tok.decode([i]) == "")
    else:
        filler = next(i for i in range(tok.get_vocab_size()) if tok.decode([i]) == "\ufffd")
    n = 4000
    counting = CountingTokenizer(tok)
    stream = TextStream(cast(Tokenizer, counting), ())
    head = tok.encode("ab", add_special_tokens=False).ids
    tail = tok.encode("é🙂c", add_special_tokens=False).ids
    ids = [*head, *[filler] * n, *tail]
    pieces = [stream.feed((t,), is_last=k == len(ids) - 1).text for k, t in enumerate(ids)]
    assert counting.num_decoded < 100 * len(ids), counting.num_decoded
    text = "".join(pieces)
    assert text.startswith("ab") and text.endswith("é🙂c"), text[:20] + text[-20:]
    assert text.strip("ab\ufffdé🙂c") == ""


def test_stop_strings_match_across_pieces_and_nothing_of_them_leaks() -> None:
    watch = StopWatch(("STOP", "xyz"))
    out = [watch.feed(t, is_last=False) for t in ["ab", "cS", "T", "OPde"]]
    assert "".join(p.text for p in out) == "abc"
    assert [p.is_stopped for p in out] == [False, False, False, True]
    watch = StopWatch(("STOP",))
    out = [watch.feed("abcST", is_last=False), watch.feed("", is_last=True)]
    assert "".join(p.text for p in out) == "abcST", "a partial stop string at the end is text"
    assert not any(p.is_stopped for p in out)


async def test_fields_map_to_the_worker_sampling(files: ModelFiles) -> None:
    body = CompletionRequest.model_validate(
        {
            "model": "m",
            "prompt": [5, 6, 7],
            "max_tokens": 9,
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": -1,
            "seed": 3,
            "stop": "END",
            "stop_token_ids": [7],
        }
    )
    job = build_job(
        body, await completion_prompt(body, files, NO_BYTE_LIMIT), files, 4096, body.max_tokens
    )
    s = job.sampling
    assert job.prompt == (5, 6, 7) and job.stop == ("END",)
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed) == (9, 0.5, 0.9, 0, 3)
    assert s.stop_token_ids == (7, 2), "EOS joins the client's stop tokens"
    body = CompletionRequest.model_validate({"model": "m", "prompt": "hi", "ignore_eos": True})
    job = build_job(body, await completion_prompt(body, files, NO_BYTE_LIMIT), files, 4096, None)
    assert job.sampling.stop_token_ids == () and job.sampling.ignore_eos
    assert job.sampling.max_tokens == 4096 - len(job.prompt), "default: the rest of the length"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": 1}, "logprobs"),
        ({"echo": True}, "echo"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"prompt": ""}, "prompt"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
async def test_unsupported_values_are_refused_by_name(
    files: ModelFiles, extra: dict[str, object], param: str
) -> None:
    body = CompletionRequest.model_validate({"model": "m", "prompt": "hi", **extra})
    with pytest.raises(APIError) as e:
        build_job(body, await completion_prompt(body, files, NO_BYTE_LIMIT), files, 4096, None)
    assert e.value.status == 400 and e.value.param == param
    assert param in e.value.message


def test_a_batch_of_prompts_is_refused_as_the_body_is_read() -> None:
    """A batch is refused by the schema, before any prompt is tokenized, so a body of many
    prompts costs one check (the HTTP side of it is in test_openai_api)."""
    with pytest.raises(ValidationError, match="a batch of 2 prompts"):
        CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"]})


@pytest.mark.parametrize("nesting", ["ids", "list of ids"])
def test_a_token_id_prompt_past_the_model_length_is_refused_before_its_ids_are_walked(
    nesting: str,
) -> None:
    # 2 million ids (a 4 MiB body) were each checked on the event loop, 0.34 s, before the
    # length refused them; with the model's length known, the length is checked first. The
    # last id is not one, so a walk would say that instead.
    ids: list[object] = [5] * 2_000_000 + ["x"]
    prompt = ids if nesting == "ids" else [ids]
    body = {"model": "m", "prompt": prompt, "max_tokens": 2}
    with pytest.raises(ValidationError, match=r"prompt of 2000001 tokens leaves no room in the "):
        CompletionRequest.model_validate(body, context={MAX_MODEL_LEN: 4096})
    with pytest.raises(ValidationError, match=r"Input should be a token id|integer"):
        CompletionRequest.model_validate(body)  # the length not known: the ids are checked


def test_http_port_needs_a_tokenizer(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="http_port needs a tokenizer"):
        parse_args(["--http-port", "8000"])
    with pytest.raises(ValueError, match="http_port = 70000"):
        parse_args(["--http-port", "70000", "--tokenizer", str(model_dir)])
    config = parse_args(["--http-port", "0", "--tokenizer", str(model_dir)])
    assert config.http_port == 0
    assert parse_args([]).http_port is None, "off unless asked for"


async def test_long_texts_tokenize_off_the_event_loop_to_the_same_ids(files: ModelFiles) -> None:
    text = "Grüße, 你好! The quick brown fox. " * 10_000
    assert len(text) > INLINE_ENCODE_CHARS
    body = CompletionRequest.model_validate({"model": "m", "prompt": text})
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)
    ids = await completion_prompt(body, files, NO_BYTE_LIMIT)
    ticker.cancel()
    assert list(ids) == files.tokenizer.encode(text).ids
    assert ticks >= 5, "the event loop ran while the text was tokenized"


async def test_a_chat_template_file_replaces_the_directory_one(
    model_dir: Path, tmp_path: Path
) -> None:
    template = tmp_path / "plain.jinja"
    template.write_text(
        "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    files = load_model_files(load_tokenizer(str(model_dir)), str(model_dir), str(template))
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES[:2]})
    ids = await chat_prompt(body, files, NO_BYTE_LIMIT)
    assert files.tokenizer.decode(list(ids)) == (
        "SYSTEM: You are terse.\nUSER: Grüße! 你好 🙂\nASSISTANT:"
    )
