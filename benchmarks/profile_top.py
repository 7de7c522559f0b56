"""The top of a py-spy profile, per thread: where a ``segcli predict`` run spends its time.

    py-spy record -r 200 -f raw --threads -o run.spy -- python -m segcli predict FRAMES -o OUT/ -q
    python benchmarks/profile_top.py run.spy [--top 12]

For each thread: its share of the samples, the functions that were running (self time) and the segcli
functions on the stack (inclusive time), as percentages of that thread's samples. The before/after
tables of issue 19 in benchmarks/README.md were made this way.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path


def parse(path: Path) -> dict[str, list[tuple[list[str], int]]]:
    """Stacks by thread name from py-spy's raw (collapsed) format: ``thread;frame;...;leaf COUNT``."""
    threads: dict[str, list[tuple[list[str], int]]] = collections.defaultdict(list)
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        name = re.sub(r"^thread \(\d+\):?\s*", "", frames[0]) or "unnamed (interpreter start-up)"
        threads[name].append((frames[1:], int(count)))
    return threads


def short(frame: str) -> str:
    """``func (path/to/file.py:123)`` → ``func (file.py)``."""
    m = re.match(r"(.*) \((.*?):\d+\)$", frame)
    return f"{m.group(1)} ({Path(m.group(2)).name})" if m else frame


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", type=Path)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    threads = parse(args.profile)
    total = sum(n for stacks in threads.values() for _, n in stacks)
    for name, stacks in sorted(threads.items(), key=lambda kv: -sum(n for _, n in kv[1])):
        n_thread = sum(n for _, n in stacks)
        own: collections.Counter[str] = collections.Counter()
        incl: collections.Counter[str] = collections.Counter()
        for frames, n in stacks:
            if frames:
                own[short(frames[-1])] += n
            for f in {short(f) for f in frames if "segcli/" in f}:
                incl[f] += n
        print(f"\n## {name}: {n_thread} samples, {100 * n_thread / total:.0f} % of all")
        print("| self | function | | inclusive | segcli function |\n|---:|---|---|---:|---|")
        rows_own, rows_incl = own.most_common(args.top), incl.most_common(args.top)
        for i in range(max(len(rows_own), len(rows_incl))):
            a = rows_own[i] if i < len(rows_own) else ("", 0)
            b = rows_incl[i] if i < len(rows_incl) else ("", 0)
            pa = f"{100 * a[1] / n_thread:.1f} %" if a[0] else ""
            pb = f"{100 * b[1] / n_thread:.1f} %" if b[0] else ""
            print(f"| {pa} | `{a[0]}` | | {pb} | `{b[0]}` |")


if __name__ == "__main__":
    main()
