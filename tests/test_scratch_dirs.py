"""Scratch directories of processes killed before they could remove them are removed by the
next process that makes one of the same kind; a live process's are kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cascadeinfer.scratch_dirs import make_scratch_dir, remove_orphans


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_the_dirs_of_processes_gone_are_removed(tmp_path: Path) -> None:
    dead = tmp_path / f"cascade-kv-{_dead_pid()}-abc"
    alive = tmp_path / f"cascade-kv-{os.getpid()}-def"
    other_kind = tmp_path / f"cascade-other-{_dead_pid()}-ghi"
    unnamed = tmp_path / "cascade-kv-xyz"  # made before the pid was in the name
    for d in (dead, alive, other_kind, unnamed):
        d.mkdir()
        (d / "export").write_text("socket")
    assert remove_orphans("cascade-kv-", tmp_path) == [dead]
    assert not dead.exists()
    assert alive.exists() and other_kind.exists() and unnamed.exists()


def test_a_new_scratch_dir_is_named_after_its_process() -> None:
    made = make_scratch_dir("cascade-test-scratch-")
    try:
        assert made.name.startswith(f"cascade-test-scratch-{os.getpid()}-")
        assert made.stat().st_mode & 0o077 == 0, "only this user may enter it"
    finally:
        made.rmdir()
