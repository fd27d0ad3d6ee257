"""Text prompts: the scheduler's tokenizer, and the incremental detokenizer that turns a
request's token stream into text chunks as the tokens arrive."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tokenizers import Tokenizer


def load_tokenizer(path: str) -> Tokenizer:
    """A `tokenizer.json` file, or a model directory holding one (Hugging Face layout)."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise ValueError(f"tokenizer = {path!r}: no tokenizer.json there")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # the tokenizers library raises a bare Exception on bad files
        raise ValueError(f"tokenizer = {path!r}: cannot load ({e})") from None


INLINE_ENCODE_CHARS = 8192
"""Texts up to this long are tokenized on the event loop (well under a millisecond); longer ones
in a thread, through `encode_batch`, which releases the GIL: a 4 MiB prompt takes seconds to
tokenize and would otherwise stall every stream the scheduler relays."""


def is_over_bytes(text: str, limit: int) -> bool:
    """Whether `text` is over `limit` bytes of UTF-8 (max_prompt_bytes), checked before any
    tokenizing; len(text) <= its UTF-8 size, so the cheap test refuses most oversized texts."""
    return len(text) > limit or len(text.encode()) > limit


async def encode_off_loop(
    tokenizer: Tokenizer, text: str, *, add_special_tokens: bool
) -> tuple[int, ...]:
    """Token ids of `text`, without stalling the event loop for a long one."""
    if len(text) <= INLINE_ENCODE_CHARS:
        return tuple(tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)
    batch = await asyncio.to_thread(
        tokenizer.encode_batch, [text], add_special_tokens=add_special_tokens
    )
    return tuple(batch[0].ids)


MAX_HELD_TOKENS = 16
"""Most output tokens held back waiting for text. One character spans at most 4 tokens (its
UTF-8 bytes), so a longer hold is no character being completed: tokens that decode to nothing
(special tokens, which `decode` skips; a model given `ignore_eos` often emits its end token
again and again) or bytes that are no valid UTF-8 and never will be. Unbounded, each new token
decoded the whole held run again: O(tokens^2) on the event loop every stream shares (a
4,000-token run of such tokens, one a step, took 1.2 s of it; 8,000 took 4.7 s, and a 128K
context would take many minutes)."""


class Detokenizer:
    """Text of a growing token list, handed out as new suffixes.

    Decodes only the tokens since the last complete character (vLLM's prefix/read offsets), so
    a long output costs O(tokens), not O(tokens^2). A token may end inside a multi-byte
    character: the text then ends in U+FFFD and is held back until a later token completes it,
    for at most MAX_HELD_TOKENS tokens (past that it is not a character in the making, and the
    text goes out as it decodes, U+FFFD included).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._prefix_offset = 0
        self._read_offset = 0

    def delta(self, token_ids: list[int], *, is_last: bool) -> str:
        decode = self._tokenizer.decode
        prefix = decode(token_ids[self._prefix_offset : self._read_offset])
        text = decode(token_ids[self._prefix_offset :])
        is_held = len(text) <= len(prefix) or (text.endswith("\ufffd") and not is_last)
        if is_held and len(token_ids) - self._read_offset <= MAX_HELD_TOKENS:
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(token_ids)
        return text[len(prefix) :]
