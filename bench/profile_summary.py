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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    threads: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in Path(args.path).read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
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
