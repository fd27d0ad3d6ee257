"""From an OpenAI request to what the coordinator takes: prompt token ids, the worker's
sampling spec, and the stop strings the front itself watches for. Fields this server does
not implement are refused here by name, never ignored."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cascadeinfer.domain import SamplingSpec
from cascadeinfer.scheduler.openai.errors import invalid
from cascadeinfer.scheduler.openai.model_files import ModelFiles
from cascadeinfer.scheduler.openai.schema import (
    PROMPT_TOO_LONG,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)
from cascadeinfer.scheduler.text import encode_off_loop, is_over_bytes

ONLY_DEFAULT: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (lambda v: v in (None, 1), "only n = 1 is supported"),
    "best_of": (lambda v: v in (None, 1), "only best_of = 1 is supported"),
    "logprobs": (lambda v: v in (None, False, 0), "log probabilities are not supported"),
    "top_logprobs": (lambda v: v in (None, 0), "log probabilities are not supported"),
    "presence_penalty": (lambda v: v in (None, 0), "penalties are not supported"),
    "frequency_penalty": (lambda v: v in (None, 0), "penalties are not supported"),
    "repetition_penalty": (lambda v: v in (None, 1), "penalties are not supported"),
    "logit_bias": (lambda v: not v, "logit_bias is not supported"),
    "echo": (lambda v: not v, "echo is not supported"),
    "suffix": (lambda v: v is None, "suffix is not supported"),
}
"""Fields accepted only at the value that asks for nothing: anything else is a 400."""


def check_unsupported(body: SamplingFields) -> None:
    for name, (is_default, why) in ONLY_DEFAULT.items():
        if name in body.model_fields_set and not is_default(getattr(body, name)):
            raise invalid(f"{name} = {getattr(body, name)!r}: {why}", name)
    if body.stream_options is not None and not body.stream:
        raise invalid("stream_options: only allowed with stream = true", "stream_options")


@dataclass(frozen=True)
class Job:
    """One generation the front runs: what the coordinator needs plus the front's own part."""

    prompt: tuple[int, ...]
    sampling: SamplingSpec
    stop: tuple[str, ...]
    priority: int = 0
    session_id: str | None = None
    """The conversation it continues: the `X-Session-Id` header, else the body's `user`."""


async def encode(
    files: ModelFiles, text: str, *, add_special_tokens: bool, max_bytes: int, field: str
) -> tuple[int, ...]:
    """Token ids of `text`, refused before tokenizing when it is over `max_bytes` (the
    scheduler's max_prompt_bytes, which the gRPC front applies too) or has no UTF-8 form: JSON
    may escape half of a UTF-16 pair (`"\\ud800"`), which decodes to a lone surrogate (gRPC's
    strings are UTF-8 already)."""
    try:
        is_over = is_over_bytes(text, max_bytes)
    except UnicodeEncodeError as e:
        raise invalid(
            f"{field}: not valid Unicode text: character {e.start} is a lone surrogate "
            f"({text[e.start]!r})",
            field,
        ) from None
    if is_over:
        raise invalid(f"{field}: the prompt is over {max_bytes} bytes (max_prompt_bytes)", field)
    return await encode_off_loop(files.tokenizer, text, add_special_tokens=add_special_tokens)


async def completion_prompt(
    body: CompletionRequest, files: ModelFiles, max_bytes: int
) -> tuple[int, ...]:
    prompt: Any = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise invalid(
                f"prompt: a batch of {len(prompt)} prompts; send one prompt per request", "prompt"
            )
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = (
            await encode(
                files, prompt, add_special_tokens=True, max_bytes=max_bytes, field="prompt"
            )
            if prompt
            else ()
        )
    else:
        ids = tuple(prompt)
    if not ids:
        raise invalid("prompt: is empty", "prompt")
    return ids


async def chat_prompt(
    body: ChatCompletionRequest, files: ModelFiles, max_bytes: int
) -> tuple[int, ...]:
    if files.chat_template is None:
        raise invalid(
            "this model has no chat template (start the scheduler with --chat-template)",
            "messages",
        )
    messages = [
        {
            "role": m.role,
            "content": m.content
            if isinstance(m.content, str)
            else "\n".join(p.text for p in m.content),
            **({"name": m.name} if m.name else {}),
        }
        for m in body.messages
    ]
    try:
        text = files.chat_template.render(
            messages, add_generation_prompt=body.add_generation_prompt
        )
    except ValueError as e:
        raise invalid(str(e), "messages") from None
    # The template writes the special tokens (BOS) itself, as Hugging Face assumes.
    ids = await encode(files, text, add_special_tokens=False, max_bytes=max_bytes, field="messages")
    if not ids:
        raise invalid("messages: the chat template rendered them to nothing", "messages")
    return ids


def build_job(
    body: SamplingFields,
    prompt: tuple[int, ...],
    files: ModelFiles,
    max_model_len: int,
    max_tokens: int | None,
) -> Job:
    """`max_tokens` defaults to what the model's length leaves after the prompt."""
    check_unsupported(body)
    if len(prompt) >= max_model_len:
        # The prompt alone: naming max_tokens sent a client to the wrong field.
        raise invalid(PROMPT_TOO_LONG.format(n=len(prompt), limit=max_model_len), "prompt")
    if max_tokens is None:
        max_tokens = max_model_len - len(prompt)
    elif len(prompt) + max_tokens > max_model_len:
        raise invalid(
            f"max_tokens {max_tokens} plus the prompt's {len(prompt)} tokens exceeds the "
            f"model's length {max_model_len}",
            "max_tokens",
        )
    stop_ids = list(body.stop_token_ids)
    if not body.ignore_eos:
        stop_ids += [t for t in files.eos_token_ids if t not in stop_ids]
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    sampling = SamplingSpec(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=max(body.top_k, 0),
        seed=body.seed,
        stop_token_ids=tuple(stop_ids),
        ignore_eos=body.ignore_eos,
    )
    return Job(prompt, sampling, stop, body.priority)
