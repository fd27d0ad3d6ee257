"""Request and response bodies of the OpenAI API (the subset served here), as pydantic models.

Requests forbid unknown fields: a client asking for something this server does not do gets a
400 naming the field instead of an answer that silently ignored it (`params` adds the fields
that are known but only accepted at their default, such as n=1). They are also strict about
JSON types, as OpenAI's API is: `"max_tokens": "5"`, `true` or `5.0` is a 400 naming the
field, not a quiet 5 or 1 (an integer is still a valid number where a float is expected).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256

StopStrings = (
    Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
    | Annotated[
        list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]],
        Field(max_length=MAX_STOP_STRINGS),
    ]
    | None
)
MAX_U32 = 2**32 - 1
TokenId = Annotated[int, Field(ge=0, le=MAX_U32)]
TokenIdList = Annotated[list[TokenId], Field(min_length=1)]


def json_type(value: object) -> str:
    """The JSON type of a parsed value, as a client wrote it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


# Pydantic reports every bad item of a body with an error of its own, and a union field once per
# branch: 500,000 negative token ids (a 3 MB body) took 10 s to validate and 300,000 unknown keys
# a second, on the event loop that runs every stream and the scheduling itself. The 400 names only
# the first problem, so the checks below find it in one pass and leave pydantic one error to make.


def _one_unknown_key(model: type[BaseModel], data: Any) -> Any:
    """`data` with the first key `model` does not know and none of the others (the 400 names
    the first unknown field either way)."""
    if not isinstance(data, dict):
        return data
    known = model.model_fields
    num_unknown = len(data) - sum(1 for k in known if k in data)
    if num_unknown <= 1:
        return data
    first = next(k for k in data if k not in known)
    return {k: v for k, v in data.items() if k in known or k == first}


class _Forbidding(BaseModel):
    """A request object: unknown fields are refused, JSON types checked strictly."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _first_unknown_key_only(cls, data: Any) -> Any:
        return _one_unknown_key(cls, data)


_TOKEN_ID: TypeAdapter[int] = TypeAdapter(TokenId, config=ConfigDict(strict=True))


def _is_token_id(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_U32


def _bad_token(value: object, field: str) -> PydanticCustomError:
    try:
        _TOKEN_ID.validate_python(value)
        why = "Input should be a token id"  # not reached: callers pass a bad one
    except ValidationError as e:
        error = e.errors(include_url=False)[0]
        why = error["msg"]
        if error["type"].endswith("_type"):
            why = f"{why}, got {json_type(value)}"
    return PydanticCustomError("token_id", "{field}: {why}", {"field": field, "why": why})


def _batch(prompt: list[Any]) -> PydanticCustomError:
    return PydanticCustomError(
        "batch",
        "prompt: a batch of {n} prompts; send one prompt per request",
        {"field": "prompt", "n": len(prompt)},
    )


MAX_MODEL_LEN = "max_model_len"
"""The validation context key that gives a request's checks the model's length, when known."""


def check_prompt_list(prompt: list[Any], max_model_len: int = 0) -> None:
    """Raises for the first item of a list prompt that is not a token id (`prompt.3`, or
    `prompt.1.2` in a list of token lists), for a batch, and for a list of token ids that
    leaves no room in `max_model_len` (0: not known yet), checked before its items are: a
    4 MiB body holds 2 million ids, which took the front's event loop 0.34 s to walk before
    the length refused it; a valid single prompt passes."""
    if all(type(p) is str for p in prompt):
        if len(prompt) > 1:
            raise _batch(prompt)
        return
    if prompt and all(type(p) is list for p in prompt):
        for i, ids in enumerate(prompt):
            _check_room(ids, max_model_len)
            for j, token in enumerate(ids):
                if not _is_token_id(token):
                    raise _bad_token(token, f"prompt.{i}.{j}")
        if len(prompt) > 1:
            raise _batch(prompt)
        return
    _check_room(prompt, max_model_len)
    for i, token in enumerate(prompt):
        if not _is_token_id(token):
            raise _bad_token(token, f"prompt.{i}")


PROMPT_TOO_LONG = "prompt of {n} tokens leaves no room in the model's length {limit}"
"""A prompt (whatever max_tokens says: naming it sent clients to the wrong field) that leaves no
room in the model's length."""


def _check_room(ids: list[Any], max_model_len: int) -> None:
    if max_model_len and len(ids) >= max_model_len:
        raise PydanticCustomError(
            "prompt_too_long",
            PROMPT_TOO_LONG,
            {"field": "prompt", "n": len(ids), "limit": max_model_len},
        )


class StreamOptions(_Forbidding):
    include_usage: bool = False


def _defaulted(model: type[BaseModel]) -> frozenset[str]:
    """The fields of `model` that are optional with a default other than None."""
    found = _DEFAULTED.get(model)
    if found is None:
        found = _DEFAULTED[model] = frozenset(
            name
            for name, f in model.model_fields.items()
            if not f.is_required() and (f.default is not None or f.default_factory is not None)
        )
    return found


_DEFAULTED: dict[type[BaseModel], frozenset[str]] = {}


class SamplingFields(_Forbidding):
    """Fields both endpoints share. Numbers must be finite: Python's JSON parser reads `NaN`
    and `Infinity`, which no bound check refuses clearly (NaN fails every comparison)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _one_logit_bias(cls, data: Any) -> Any:
        """A `logit_bias` is refused whatever it holds (`params.check_unsupported`); its first
        entry is enough to name the field, or its first bad value."""
        bias = data.get("logit_bias") if isinstance(data, dict) else None
        if isinstance(bias, dict) and len(bias) > 1:
            return {**data, "logit_bias": dict([next(iter(bias.items()))])}
        return data

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """OpenAI documents its optional fields as nullable, and some clients send every field,
        null for those they leave unset: a null then asks for the field's default, as if it
        were absent (and it counts as unset for `params.check_unsupported`). Required fields
        and unknown ones are checked as given."""
        if not isinstance(data, dict) or None not in data.values():
            return data
        defaulted = _defaulted(cls)
        return {k: v for k, v in data.items() if v is not None or k not in defaulted}

    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_U32)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1, le=2**31 - 1)
    """vLLM's extension; 0 or -1 turn it off."""
    seed: int | None = Field(default=None, ge=0, le=2**64 - 1)
    stop: StopStrings = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=256)] = []
    """vLLM's extension: stop at any of these tokens."""
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)
    # Known, accepted only at the value that changes nothing (params.check_unsupported).
    n: int = 1
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None
    priority: int = Field(default=0, ge=-(2**31), le=2**31 - 1)
    """vLLM's extension: higher is admitted first when requests wait in the queue."""


class CompletionRequest(SamplingFields):
    @model_validator(mode="before")
    @classmethod
    def _prompt_list_in_one_pass(cls, data: Any, info: ValidationInfo) -> Any:
        prompt = data.get("prompt") if isinstance(data, dict) else None
        if isinstance(prompt, list):
            check_prompt_list(prompt, (info.context or {}).get(MAX_MODEL_LEN, 0))
        return data

    prompt: str | TokenIdList | list[str] | list[TokenIdList]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


MAX_MESSAGES = 4096
MAX_TEXT_PARTS = 4096
"""A chat's messages, and its text parts (content given as a list) in all, at most. The chat
template renders them one by one on the front's event loop: 120,000 one-letter messages (a
4 MiB body) held every other stream of the front for over a second."""


class TextPart(_Forbidding):
    type: Literal["text"]
    text: str


class ChatMessage(_Forbidding):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    @model_validator(mode="before")
    @classmethod
    def _few_enough_parts(cls, data: Any) -> Any:
        """Counts the text parts before any is validated (a count after would come too late
        to spare the work). Too many messages are refused by the field's own bound."""
        messages = data.get("messages") if isinstance(data, dict) else None
        if not isinstance(messages, list) or len(messages) > MAX_MESSAGES:
            return data
        num_parts = sum(
            len(m["content"])
            for m in messages
            if isinstance(m, dict) and isinstance(m.get("content"), list)
        )
        if num_parts > MAX_TEXT_PARTS:
            raise PydanticCustomError(
                "too_long",
                "messages: {num_parts} text parts in all; at most {max_parts}",
                {"num_parts": num_parts, "max_parts": MAX_TEXT_PARTS, "field": "messages"},
            )
        return data

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_U32)
    add_generation_prompt: bool = True
    """vLLM's extension; Hugging Face's apply_chat_template argument."""


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReasonName = Literal["stop", "length"]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReasonName | None


class Completion(BaseModel):
    """Both the whole answer and a streamed chunk (OpenAI uses one object type for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(default=None, exclude_if=lambda v: v is None)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReasonName | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    """Only the fields a chunk carries are written (OpenAI's own stream leaves the rest out)."""

    role: Literal["assistant"] | None = Field(default=None, exclude_if=lambda v: v is None)
    content: str | None = Field(default=None, exclude_if=lambda v: v is None)


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: FinishReasonName | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(default=None, exclude_if=lambda v: v is None)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "cascadeinfer"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
