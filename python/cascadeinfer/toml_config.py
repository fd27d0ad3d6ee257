"""Type checks for the daemons' TOML config files.

TOML values come typed (`port = "abc"` is a string), and a dataclass takes whatever it is
given: without a check, a wrong type surfaced as a TypeError traceback from deep inside a
validation (`'<=' not supported between 'int' and 'str'`). Each key is checked against its
field's annotation, so the error names the file, the key and what it should be.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cascadeinfer.small_files import read_small_text

MAX_CONFIG_BYTES = 1 << 20
"""Largest config file read. A daemon's config is a few hundred bytes; `--config /dev/zero`
grew a daemon to 9.5 GB in 8 s before it was killed."""


def read_toml(path: Path) -> dict[str, Any]:
    """A config file's TOML, as a ValueError naming the file for what is not one: not a
    regular file (a FIFO with no writer hung the daemon at start, silently), over
    MAX_CONFIG_BYTES, not UTF-8 TOML, or nested too deeply to parse (100,000 levels ended the
    daemon with a 3,000-line RecursionError traceback)."""
    # utf-8-sig: a byte-order mark (Windows editors write one) is not TOML, and tomllib said
    # only "Invalid statement (at line 1, column 1)".
    text = read_small_text(path, "config file", MAX_CONFIG_BYTES)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: {e}") from None
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply") from None


def check_table(where: str, doc: Mapping[str, Any], cls: type) -> None:
    """Raises ValueError for a key of a table (`[tls]`, `[sim]`) that `cls` has no field for,
    then checks the types: an unknown key in a table ended the daemon with a TypeError
    traceback from the dataclass's constructor."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(doc) - known
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    check_types(where, doc, cls)


def check_types(where: str, doc: Mapping[str, Any], cls: type) -> None:
    """Raises ValueError for the first key of `doc` whose value does not fit the annotation of
    `cls`'s field of that name (keys without a field are left to the caller)."""
    hints = typing.get_type_hints(cls)
    for key, value in doc.items():
        expected = hints.get(key)
        if expected is not None and not _fits(value, expected):
            raise ValueError(f"{where}: {key} = {value!r}: expected {_describe(expected)}")


def _fits(value: Any, expected: Any) -> bool:
    origin = typing.get_origin(expected)
    args = typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected in (str, Path):
        return isinstance(value, str | Path)
    if origin in (tuple, list):
        if not isinstance(value, tuple | list):
            return False
        item = args[0] if args else Any
        return item is Any or all(_fits(v, item) for v in value)
    return True  # a nested type: checked where it is built


def _describe(expected: Any) -> str:
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(expected))
    if typing.get_origin(expected) in (tuple, list):
        args = typing.get_args(expected)
        return f"a list of {_describe(args[0])}" if args else "a list"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(
        expected,
        "nothing" if expected is type(None) else getattr(expected, "__name__", str(expected)),
    )
