"""A tiny Llama model directory (config.json only) for tests and the daemon's default model.

vLLM loads it with `load_format="dummy"`: weights are filled with fixed-seed values, so two
engines built from the same directory compute the same tokens. There is no tokenizer; engines
run with `skip_tokenizer_init=True` and requests with `ignore_eos=True`.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_LLAMA_CONFIG: dict[str, object] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 1024,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}
"""Head size 32 is the smallest the CPU attention backend supports."""


def write_tiny_llama(directory: Path, *, max_position_embeddings: int = 4096) -> Path:
    """Writes config.json into `directory` (created if missing) and returns the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {**TINY_LLAMA_CONFIG, "max_position_embeddings": max_position_embeddings}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def write_byte_tokenizer(directory: Path, *, vocab_size: int = 1024) -> Path:
    """Writes a byte-level tokenizer.json: ids 0-255 are bytes, the rest reserved specials.

    Enough for text prompts in tests and the demo: any text encodes (one token a byte) and
    any output decodes (reserved ids decode to nothing), deterministically, with no training.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([f"<|reserved_{i}|>" for i in range(len(vocab), vocab_size)])
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory
