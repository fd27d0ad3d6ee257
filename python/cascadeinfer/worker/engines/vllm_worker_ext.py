"""Loaded by vLLM inside each of its worker processes (`worker_extension_cls`), before the model.

Importing this module requests the AMX tile state for the worker process: Linux kills with
SIGILL a process that runs AMX instructions without it, and vLLM's CPU attention kernel can
reach AMX before oneDNN requests it (see vllm_engine._prepare_cpu_kernels). With the engine
core in its own process the daemon's own request does not cover the worker processes, so they
make it here. A no-op on hosts without AMX and on GPUs.

It also starts the parent watch (parent_watch.py), and registers the seeded dummy weight loader: weights load in the worker processes, and
a registration made in the daemon's process does not reach them.
"""

from __future__ import annotations

import os

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")

import torch

from cascadeinfer.worker.engines.parent_watch import watch_parent
from cascadeinfer.worker.engines.vllm_engine import register_seeded_dummy_loader

if hasattr(torch._C, "_cpu"):
    torch._C._cpu._init_amx()
register_seeded_dummy_loader()
watch_parent()  # the model worker ends with the engine core that started it


class CascadeWorkerExtension:
    """Mixed into vLLM's worker class; also reachable with `collective_rpc`."""

    def cascade_ping(self) -> int:
        """The worker's process id (lets tests see the workers are other processes)."""
        return os.getpid()
