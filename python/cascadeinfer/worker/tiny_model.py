"""The built-in tiny Llama model directory: config.json plus real tokenizer files.

vLLM loads it with `load_format="dummy"`: weights are filled with fixed-seed values, so two
engines built from the same directory compute the same tokens. Engines run with
`skip_tokenizer_init=True`; the tokenizer files are for the scheduler, which turns text into
token ids and back and renders chat messages with the chat template. The weights are random,
so generated text is noise, but every protocol around it (text, chat, stop strings, EOS) is the
real one.
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

SPECIAL_TOKENS = ("<|pad|>", "<|begin_of_text|>", "<|im_end|>", "<|im_start|>")
"""Ids 0-3, so bos (1) and eos (2) match config.json. `<|im_end|>` ends a chat turn and is the
end-of-sequence token, as in ChatML models."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML, as Qwen's models use it (no BOS token, neither here nor when encoding text)."""

TRAINING_TEXT = """\
A length-aware scheduler serves one large language model on a fleet of engine instances.
The instances are split into stages by context length. A request enters the stage that fits
its prompt and, as decoding grows its context past the stage's upper bound, it moves with its
KV cache to an instance of the next stage. Each instance then batches requests of similar
length, so one long request no longer stretches every decode step of the short ones beside it.
Hello! How are you today? I am fine, thank you. What is the weather like? It is sunny and warm.
The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2048.
def main():\n    print("hello, world")\n    return 0\n
Bonjour, ça va ? Très bien, merci. Grüße aus München. ¿Dónde está la estación? Это тест. 你好世界。
"""
"""What the byte-level BPE merges are learned from (any UTF-8 text still encodes: the 256
bytes are in the vocabulary)."""


def write_tiny_llama(directory: Path, *, max_position_embeddings: int = 4096) -> Path:
    """Writes config.json and the tokenizer files into `directory` (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {**TINY_LLAMA_CONFIG, "max_position_embeddings": max_position_embeddings}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tiny_tokenizer(directory, vocab_size=int(str(TINY_LLAMA_CONFIG["vocab_size"])))
    return directory


def write_tiny_tokenizer(directory: Path, *, vocab_size: int = 1024) -> Path:
    """Writes tokenizer.json and tokenizer_config.json (Hugging Face layout, with the chat
    template) into `directory` and returns it.

    A byte-level BPE trained here, offline, on `TRAINING_TEXT`: the four special tokens, the
    256 byte symbols, merges up to `vocab_size`. Like Qwen's, it adds no BOS token: an empty
    text is no tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(keepends=True), trainer)
    # A short text leaves ids free below vocab_size: reserve them, so every id the model can
    # emit decodes (to nothing, as special tokens do).
    size = tokenizer.get_vocab_size()
    tokenizer.add_special_tokens([f"<|reserved_{i}|>" for i in range(size, vocab_size)])
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[1],
        "eos_token": SPECIAL_TOKENS[2],
        "pad_token": SPECIAL_TOKENS[0],
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


write_byte_tokenizer = write_tiny_tokenizer
"""The earlier name (a bytes-only vocabulary); the tokenizer it writes is byte-level BPE now."""
