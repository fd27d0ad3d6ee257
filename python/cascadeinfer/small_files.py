"""The small files an operator names (a config, tokens, certificates, a chat template), read
with a bound: regular files only, at most a given size. Read whole without one, `/dev/zero`
given as a token file grew a daemon to 5.9 GB in 3 s, and a FIFO hung it at start without a
word (docs/reliability.md, "A nineteenth probe")."""

from __future__ import annotations

import stat
from pathlib import Path

MAX_TEXT_FILE_BYTES = 1 << 20
"""Largest token list, certificate chain or template read: each is a few kilobytes."""


def read_small_file(path: str | Path, what: str, limit: int = MAX_TEXT_FILE_BYTES) -> bytes:
    """The bytes of `path`, or a ValueError naming `what` and the file: not a regular file,
    not readable, or over `limit` bytes."""
    where = f"{what} {str(path)!r}"
    p = Path(path)
    try:
        # Checked before opening: opening a FIFO waits for a writer.
        if not stat.S_ISREG(p.stat().st_mode):
            raise ValueError(f"{where}: not a regular file")
        with p.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise ValueError(f"{where}: {e.strerror}") from None
    if len(data) > limit:
        raise ValueError(f"{where}: over {limit} bytes")
    return data


def read_small_text(path: str | Path, what: str, limit: int = MAX_TEXT_FILE_BYTES) -> str:
    """`read_small_file` as UTF-8 text (a byte-order mark dropped)."""
    data = read_small_file(path, what, limit)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{what} {str(path)!r} is not UTF-8 text") from None
