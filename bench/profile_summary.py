"""Summarizes a py-spy collapsed-stack file (`py-spy record -f raw`): the share of samples per
thread, the functions with the most samples on top of the stack (self), and those on the
stack at all (inclusive), so a profile can be written down as a table.

    python bench/profile_summary.py /tmp/prof/relay.txt [--top 25]
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def frame_name(frame: str) -> str:
    """`func (path/to/file.py:123)` -> `func (file.py)`: lines differ, functions add up."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rsplit("/", 1)[-1].rstrip(")")
    return f"{name} ({file})" if file else name


def read_stacks(path: Path) -> list[tuple[list[str], int]]:
    """Each line's frames (thread first) and sample count; a ValueError names the first line
    that is not `frame;frame;... COUNT`."""
    stacks = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        try:
            stacks.append((stack.split(";"), int(count_text)))
        except ValueError:
            raise ValueError(
                f"{path}:{number}: not a py-spy raw stack line (`py-spy record -f raw`)"
            ) from None
    return stacks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    try:
        stacks = read_stacks(Path(args.path))
    except OSError as e:  # one line and exit 2, as for a bad flag: no traceback
        p.error(f"{args.path}: {e.strerror}")
    except ValueError as e:
        p.error(str(e))
    threads: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for frames, count in stacks:
        total += count
        threads[frames[0]] += count
        names = [frame_name(f) for f in frames[1:]] or [frames[0]]
        own[names[-1]] += count
        for name in set(names):
            inclusive[name] += count
    print(f"{total} samples")
    for title, counter in (("thread", threads), ("self", own), ("inclusive", inclusive)):
        print(f"\n{title}:")
        for name, count in counter.most_common(args.top):
            print(f"  {100 * count / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
