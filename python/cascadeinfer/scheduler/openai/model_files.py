"""What the HTTP front reads from the model directory: the tokenizer, the chat template, and
the end-of-sequence token ids (the scheduler adds them to every request's stop tokens unless
it asks for ignore_eos, so a worker stops at EOS whatever engine it runs)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from cascadeinfer.scheduler.openai.chat_template import (
    ChatTemplate,
    find_template,
    read_tokenizer_config,
    token_text,
)
from cascadeinfer.small_files import read_small_text


@dataclass(frozen=True)
class ModelFiles:
    tokenizer: Tokenizer
    chat_template: ChatTemplate | None
    eos_token_ids: tuple[int, ...]


def _generation_eos(directory: Path) -> list[int]:
    path = directory / "generation_config.json"
    if not path.is_file():
        return []
    try:
        value: Any = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: {e}") from None
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int)]


def load_model_files(tokenizer: Tokenizer, path: str, chat_template_file: str = "") -> ModelFiles:
    """`path` is the scheduler's --tokenizer (a directory or a tokenizer.json beside the other
    files); `chat_template_file` replaces the directory's template when given."""
    directory = Path(path) if Path(path).is_dir() else Path(path).parent
    config = read_tokenizer_config(directory)
    if chat_template_file:
        source: str | None = read_small_text(chat_template_file, "chat template")
    else:
        source = find_template(directory, config)
    eos: list[int] = []
    eos_id = tokenizer.token_to_id(token_text(config.get("eos_token")))
    if eos_id is not None:
        eos.append(eos_id)
    eos += [t for t in _generation_eos(directory) if t not in eos]
    template = ChatTemplate(source, config) if source else None
    return ModelFiles(tokenizer, template, tuple(eos))
