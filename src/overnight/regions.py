"""Protected regions of editable files: lines between `# overnight: protect` and `# overnight: end`.

An editable file may still hold things that are there for a reason (the time
budget, the evaluation call). A proposal that changes, moves out, or removes
such a region is rejected before anything runs.
"""

from __future__ import annotations

import re

START = re.compile(r"^\s*#\s*overnight:\s*protect\b")
END = re.compile(r"^\s*#\s*overnight:\s*end\b")


class RegionError(ValueError):
    pass


def regions(text: str) -> list[tuple[int, int]]:
    """1-based inclusive (first, last) line numbers of each protected region, markers included."""
    out: list[tuple[int, int]] = []
    start: int | None = None
    for n, line in enumerate(text.splitlines(), start=1):
        if START.match(line):
            if start is not None:
                raise RegionError(f"line {n}: `# overnight: protect` inside a protected region "
                                  f"opened at line {start}")
            start = n
        elif END.match(line):
            if start is None:
                raise RegionError(f"line {n}: `# overnight: end` without a matching protect")
            out.append((start, n))
            start = None
    if start is not None:
        raise RegionError(f"line {start}: `# overnight: protect` is never closed by "
                          "`# overnight: end`")
    return out


def protected_blocks(text: str) -> list[str]:
    lines = text.splitlines()
    return ["\n".join(lines[a - 1:b]) for a, b in regions(text)]


def protected_lines(text: str) -> set[int]:
    return {n for a, b in regions(text) for n in range(a, b + 1)}


def check_edit(path: str, old: str, new: str) -> str | None:
    """Why an edit of `path` from `old` to `new` breaks a protected region, or None."""
    try:
        before = protected_blocks(old)
    except RegionError as e:
        return f"{path}: {e}"
    try:
        after = protected_blocks(new)
    except RegionError as e:
        return f"edits a protected region of {path}: {e}"
    if before == after:
        return None
    spans = regions(old)
    for i, block in enumerate(before):
        if i >= len(after) or after[i] != block:
            a, b = spans[i]
            return f"edits the protected region of {path} at lines {a}-{b}"
    return f"adds a protected region to {path}"
