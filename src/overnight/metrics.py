"""Reading metrics from an experiment's own output.

Never guesses: an absent or non-finite value is no value.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf|infinity)"
# `val_bpb: 0.9979` (a summary line) and `METRIC val_bpb=0.9979` (one metric per line).
_SUMMARY = re.compile(rf"^\s*([A-Za-z_][\w./-]*)\s*:\s*({_NUMBER})\s*$", re.IGNORECASE)
_METRIC = re.compile(rf"^\s*METRIC\s+([A-Za-z_][\w./-]*)\s*=\s*({_NUMBER})\s*$", re.IGNORECASE)


@dataclass
class Metrics:
    values: dict[str, float] = field(default_factory=dict)  # finite values only
    non_finite: dict[str, str] = field(default_factory=dict)  # name -> "nan" / "inf"

    def add(self, name: str, raw: float) -> None:
        if math.isfinite(raw):
            self.values[name] = raw
            self.non_finite.pop(name, None)
        else:
            self.non_finite[name] = str(raw)
            self.values.pop(name, None)

    def objective(self, name: str) -> tuple[float | None, str | None]:
        """The objective's value, or None and the reason it has none."""
        if name in self.values:
            return self.values[name], None
        if name in self.non_finite:
            return None, f"{name} is {self.non_finite[name]}"
        return None, f"no {name} in the output (print `{name}: <number>`)"


def parse_lines(lines: list[str], into: Metrics | None = None) -> Metrics:
    """Every `name: number` and `METRIC name=number` line; a later line wins."""
    out = into or Metrics()
    for line in lines:
        m = _METRIC.match(line) or _SUMMARY.match(line)
        if m:
            out.add(m.group(1), float(m.group(2)))
    return out


def parse_text(text: str) -> Metrics:
    return parse_lines(text.splitlines())


def parse_log(path: Path, tail_bytes: int = 1 << 20) -> Metrics:
    """Metrics from a log file; only its tail is read, where summaries live. No log, none."""
    if not path.exists():
        return Metrics()
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - tail_bytes))
        data = f.read().decode("utf-8", errors="replace")
    return parse_text(data)


def merge_json_file(path: Path, into: Metrics, max_bytes: int = 1 << 20) -> str | None:
    """Numbers from a flat JSON object file; returns an error message, or None."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return f"metrics file {path.name} was not written"
    except (OSError, ValueError) as e:
        return f"metrics file {path.name} is not valid JSON: {e}"
    if not isinstance(data, dict):
        return f"metrics file {path.name} must hold a JSON object of name -> number"
    for name, value in data.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            into.add(str(name), float(value))
    return None


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log, for crash reports."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class UnsafeFile(ValueError):
    """A file the harness will not read: not a regular file, or too large."""


class MetricStream:
    """Metrics parsed from output as it flows (temporary: line-by-line, bounded lines)."""

    def __init__(self) -> None:
        self._buf = b""
        self.metrics = Metrics()

    def feed(self, chunk: bytes) -> None:
        self._buf += chunk
        *lines, self._buf = self._buf.replace(b"\r", b"\n").split(b"\n")
        self._buf = self._buf[-65536:]
        parse_lines([ln.decode("utf-8", "replace") for ln in lines if len(ln) < 65536],
                    self.metrics)

    def close(self) -> Metrics:
        if self._buf:
            parse_lines([self._buf.decode("utf-8", "replace")], self.metrics)
            self._buf = b""
        return self.metrics
