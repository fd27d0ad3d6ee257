"""Per-process scratch directories in the temporary directory, named after the process that
made them, so a later process can remove those whose maker died without removing them (a
SIGKILLed worker leaves its KV sockets' directory and its built-in model; hundreds piled up on
a test host)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path


def make_scratch_dir(prefix: str) -> Path:
    """A new directory `<tmp>/<prefix><pid>-<random>` only this user can enter; first removes
    this user's `<prefix><pid>-*` directories whose process is gone."""
    remove_orphans(prefix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))


def remove_orphans(prefix: str, root: Path | None = None) -> list[Path]:
    """Removes this user's `<prefix><pid>-*` directories under `root` (the temporary
    directory) whose process no longer runs; returns them. A pid in use by another process
    since keeps its directory: only a pid that answers no process at all is proof."""
    root = Path(tempfile.gettempdir()) if root is None else root
    named = re.compile(re.escape(prefix) + r"(\d+)-[^/]+")
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            m = named.fullmatch(entry.name)
            if m is None or not entry.is_dir(follow_symlinks=False):
                continue
            if entry.stat(follow_symlinks=False).st_uid != os.getuid() or _runs(int(m.group(1))):
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


def _runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process, or not a pid this system could run: keep it
    return True
