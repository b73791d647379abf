"""Reading metrics from an experiment's own output.

Never guesses: an absent or non-finite value is no value.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
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
    """Metrics from a log file's last `tail_bytes` (the harness parses live output with
    MetricStream; this is for logs on disk). No log, none."""
    try:
        data = read_tail(path, tail_bytes)
    except (OSError, UnsafeFile):
        return Metrics()
    return parse_text(data.decode("utf-8", errors="replace"))


def merge_json_file(path: Path, into: Metrics, max_bytes: int = 1 << 20) -> str | None:
    """Numbers from a flat JSON object file; returns an error message, or None. Read only if
    it is a regular file of at most `max_bytes` (never a FIFO, a device or a link)."""
    try:
        data = json.loads(read_regular(path, max_bytes))
    except FileNotFoundError:
        return f"metrics file {path.name} was not written"
    except UnsafeFile as e:
        return f"metrics file {path.name}: {e}"
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
        data = read_tail(path, 64 * 1024)
    except (OSError, UnsafeFile):
        return ""
    return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-lines:])


# -- reading what a run left, safely ---------------------------------------------------------


class UnsafeFile(ValueError):
    """A file the harness will not read: not a regular file, or too large."""


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a device",
          stat.S_IFBLK: "a device", stat.S_IFDIR: "a directory", stat.S_IFLNK: "a symlink"}


def _open_regular(path: Path) -> tuple[int, os.stat_result]:
    """An fd on `path` only if it is a regular file: no link followed, never blocking (a FIFO
    with no writer would hang an ordinary open)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeFile("is a symlink: not read") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafeFile(f"is {_KINDS.get(stat.S_IFMT(st.st_mode), 'not a regular file')}: "
                         "not read")
    return fd, st


def read_regular(path: Path, max_bytes: int) -> bytes:
    """The whole file, if it is a regular file of at most `max_bytes` (judged by its size,
    without reading it)."""
    fd, st = _open_regular(path)
    try:
        if st.st_size > max_bytes:
            raise UnsafeFile(f"is {st.st_size:,} bytes, over the {max_bytes:,}-byte limit: "
                             "not read")
        return _read_upto(fd, max_bytes)
    finally:
        os.close(fd)


def read_tail(path: Path, max_bytes: int) -> bytes:
    """The last `max_bytes` of a regular file."""
    fd, st = _open_regular(path)
    try:
        os.lseek(fd, max(0, st.st_size - max_bytes), os.SEEK_SET)
        return _read_upto(fd, max_bytes)
    finally:
        os.close(fd)


def _read_upto(fd: int, limit: int) -> bytes:
    chunks, left = [], limit
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# -- metrics from a stream ---------------------------------------------------------------------

MAX_LINE = 64 * 1024  # a longer line is not a metric line
MAX_NAMES = 10_000  # distinct metric names kept; more are ignored


class MetricStream:
    """Metrics parsed from output as it flows, in bounded memory whatever its size: lines
    are split across chunks (a `\\r` ends a line too, for progress bars), a line over
    MAX_LINE is skipped, the last value of each metric wins. With `pattern` (one group), its
    last match is recorded under `name`."""

    def __init__(self, pattern: re.Pattern[str] | None = None, name: str = "") -> None:
        self.metrics = Metrics()
        self.pattern, self.name = pattern, name
        self._partial = bytearray()
        self._overlong = False  # inside a line already longer than MAX_LINE

    def feed(self, chunk: bytes) -> None:
        start = 0
        for m in _EOL.finditer(chunk):
            self._line(chunk[start:m.start()])
            start = m.end()
        rest = chunk[start:]
        if self._overlong or len(self._partial) + len(rest) > MAX_LINE:
            self._overlong = True
            self._partial.clear()
        else:
            self._partial += rest

    def _line(self, piece: bytes) -> None:
        if self._overlong or len(self._partial) + len(piece) > MAX_LINE:
            self._overlong = False
            self._partial.clear()
            return
        raw = bytes(self._partial) + piece
        self._partial.clear()
        line = raw.decode("utf-8", errors="replace")
        m = _METRIC.match(line) or _SUMMARY.match(line)
        if m and (m.group(1) in self.metrics.values or m.group(1) in self.metrics.non_finite
                  or len(self.metrics.values) + len(self.metrics.non_finite) < MAX_NAMES):
            self.metrics.add(m.group(1), float(m.group(2)))
        if self.pattern is not None:
            for found in self.pattern.finditer(line):
                try:
                    self.metrics.add(self.name, float(found.group(1)))
                except (ValueError, IndexError):
                    continue

    def close(self) -> Metrics:
        if self._partial and not self._overlong:
            self._line(b"")
        self._partial.clear()
        return self.metrics


_EOL = re.compile(rb"\r\n|\n|\r")
