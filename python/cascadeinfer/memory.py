"""Giving freed memory back to the operating system.

glibc keeps the heap pages Python and libzmq free, per thread arena, for reuse by the same
arena: a process that once held one large transfer stays at that high-water mark, and bytes
received on one thread are not reused by allocations on another. On a worker that was the
target of a 32K-token migration (4.3 GB of KV received on the connector's receiving thread) and
then the source of one (the same again read out on the forward thread), a vLLM model worker
reached 14.4 GB and the OOM killer took it. Standard library only: the vLLM processes import it.
"""

from __future__ import annotations

import contextlib
import ctypes

TRIM_AFTER_BYTES = 64 << 20
"""Transfers at least this large are followed by a trim; smaller ones leave little behind."""


def release_freed_memory() -> None:
    """Hands memory the process has freed back to the OS (`malloc_trim`, every arena). A no-op
    where the C library is not glibc. ctypes releases the GIL for the call."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
