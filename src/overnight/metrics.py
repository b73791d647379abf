"""Reading metrics from an experiment's own output, and files from its run, safely.

Never guesses: an absent or non-finite value is no value. Never trusts a file an
experiment could have touched: a read cannot hang on a FIFO, follow a symlink, or
take more memory than its cap, and a stream is parsed in bounded memory however
much, and however oddly, the experiment prints.
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

# Unambiguous on purpose: `\d+\.?\d*` backtracks quadratically on a long run of digits
# that ends badly (a 16k-digit line took 9 s to reject).
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf|infinity)"
_NAME = r"[A-Za-z_][\w./-]{0,127}"  # capped, so a thousand kept names stay small
# `val_bpb: 0.9979` (a summary line) and `METRIC val_bpb=0.9979` (one metric per line).
_SUMMARY = re.compile(rf"^\s*({_NAME})\s*:\s*({_NUMBER})\s*$", re.IGNORECASE)
_METRIC = re.compile(rf"^\s*METRIC\s+({_NAME})\s*=\s*({_NUMBER})\s*$", re.IGNORECASE)
_WHOLE_NUMBER = re.compile(rf"\s*(?:{_NUMBER})\s*", re.IGNORECASE)
_EOL = re.compile(rb"[\r\n]")  # `\r` too: a progress bar redraws its line with it

MAX_LINE_BYTES = 64 * 1024
MAX_NAMES = 10_000
_CHUNK = 1 << 20


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


def _match_line(line: str) -> tuple[str, float] | None:
    m = _METRIC.match(line) or _SUMMARY.match(line)
    return (m.group(1), float(m.group(2))) if m else None


def parse_lines(lines: list[str], into: Metrics | None = None) -> Metrics:
    """Every `name: number` and `METRIC name=number` line; a later line wins."""
    out = into or Metrics()
    for line in lines:
        found = _match_line(line)
        if found:
            out.add(*found)
    return out


def parse_text(text: str) -> Metrics:
    return parse_lines(text.splitlines())


class MetricStream:
    """Metrics from output fed chunk by chunk, as it arrives, in bounded memory.

    Lines end at `\\n` or `\\r` and may be split anywhere across chunks. A line longer
    than `max_line` bytes is not a metric line, and only its first `max_line` bytes
    are ever held. At most `max_names` distinct names are kept (the objective always
    is); later new names are counted in `dropped_names`. With `pattern` (one group),
    the last match's group is also recorded under `objective`.
    """

    def __init__(self, objective: str | None = None, pattern: re.Pattern[str] | None = None,
                 *, max_line: int = MAX_LINE_BYTES, max_names: int = MAX_NAMES) -> None:
        if pattern is not None and pattern.groups != 1:
            raise ValueError(f"the metric pattern {pattern.pattern!r} must have exactly one "
                             f"group (the number), it has {pattern.groups}")
        if pattern is not None and not objective:
            raise ValueError("a metric pattern needs the objective's name to record under")
        self.objective = objective
        self.pattern = pattern
        self.max_line = max_line
        self.max_names = max_names
        self.dropped_names = 0  # distinct new names refused once max_names were held
        self.overlong_lines = 0  # lines set aside for being longer than max_line
        self._metrics = Metrics()
        self._line = bytearray()  # the unfinished line, never over max_line bytes
        self._overlong = False  # the unfinished line already passed max_line
        self._closed = False

    @property
    def metrics(self) -> Metrics:
        """The metrics of every finished line so far (the unfinished one counts at close)."""
        return self._metrics

    def feed(self, chunk: bytes) -> None:
        if self._closed:
            raise ValueError("MetricStream.feed after close")
        view = memoryview(chunk)
        start = 0
        for eol in _EOL.finditer(chunk):
            self._take(view[start:eol.start()])
            self._end_line()
            start = eol.end()
        self._take(view[start:])

    def close(self) -> Metrics:
        """The final metrics, counting an unfinished last line."""
        if not self._closed:
            self._end_line()
            self._closed = True
        return self._metrics

    def _take(self, piece: memoryview) -> None:
        if self._overlong or not piece:
            return
        if len(self._line) + len(piece) > self.max_line:
            self._overlong = True
            self._line.clear()
        else:
            self._line += piece

    def _end_line(self) -> None:
        if self._overlong:
            self.overlong_lines += 1
        elif self._line:
            self._parse(self._line)
        self._line.clear()
        self._overlong = False

    def _parse(self, raw: bytearray) -> None:
        if self.pattern is None and b":" not in raw and b"=" not in raw:
            return  # cannot be a metric line; most output is not, skip decoding it
        line = raw.decode("utf-8", errors="replace")
        found = _match_line(line)
        if found:
            self._add(*found)
        if self.pattern is not None and self.objective:
            value = None
            for m in self.pattern.finditer(line):
                if m.group(1) is not None and _WHOLE_NUMBER.fullmatch(m.group(1)):
                    value = float(m.group(1))
            if value is not None:
                self._add(self.objective, value)

    def _add(self, name: str, value: float) -> None:
        held = self._metrics
        if (name not in held.values and name not in held.non_finite and name != self.objective
                and len(held.values) + len(held.non_finite) >= self.max_names):
            self.dropped_names += 1
            return
        self._metrics.add(name, value)


class UnsafeFile(ValueError):
    """A path that is not a plain regular file within its size cap: it is not read."""

    def __init__(self, path: Path, kind: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.kind = kind  # "named pipe (FIFO)", "symbolic link", "too large", ...
        self.detail = detail  # the message without the path, to put after a name


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symbolic link"
    return "special file"


def _refuse(path: Path, mode: int) -> UnsafeFile:
    kind = _kind(mode)
    return UnsafeFile(path, kind, f"is a {kind}, not a regular file; it is not read")


def _open_regular(path: Path, max_bytes: int | None) -> tuple[int, int]:
    """A read-only descriptor on a regular file, and its size. Never blocks.

    lstat first, so a device or FIFO is never even opened; then open without following
    a symlink and without blocking, and fstat the descriptor, so a swap in between is
    caught too. Raises FileNotFoundError, UnsafeFile, or OSError.
    """
    mode = os.lstat(path).st_mode
    if not stat.S_ISREG(mode):
        raise _refuse(path, mode)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:  # swapped for a symlink since the lstat
            raise _refuse(path, stat.S_IFLNK) from e
        if e.errno == errno.ENXIO:  # swapped for a socket
            raise _refuse(path, stat.S_IFSOCK) from e
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(path, st.st_mode)
        if max_bytes is not None and st.st_size > max_bytes:
            raise UnsafeFile(path, "too large", f"is {st.st_size} bytes, over the "
                             f"{max_bytes}-byte limit; it is not read")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def read_regular(path: Path, max_bytes: int) -> bytes:
    """A regular file's bytes, at most `max_bytes` (a file grown since its fstat is cut).

    Raises UnsafeFile for a FIFO, socket, device, directory, symlink or a file over
    `max_bytes` (refused by its size, never read), FileNotFoundError when absent.
    """
    fd, _ = _open_regular(path, max_bytes)
    try:
        data = bytearray()
        while len(data) < max_bytes:
            piece = os.read(fd, min(_CHUNK, max_bytes - len(data)))
            if not piece:
                break
            data += piece
        return bytes(data)
    finally:
        os.close(fd)


def read_regular_text(path: Path, max_bytes: int) -> str:
    """`read_regular`, decoded as UTF-8 with undecodable bytes replaced."""
    return read_regular(path, max_bytes).decode("utf-8", errors="replace")


def parse_log(path: Path, objective: str | None = None,
              pattern: re.Pattern[str] | None = None) -> Metrics:
    """Metrics from a whole log, streamed in bounded memory. No log, none.

    Raises UnsafeFile when the log is not a regular file.
    """
    try:
        fd, _ = _open_regular(path, None)
    except FileNotFoundError:
        return Metrics()
    stream = MetricStream(objective, pattern)
    try:
        while piece := os.read(fd, _CHUNK):
            stream.feed(piece)
    finally:
        os.close(fd)
    return stream.close()


def merge_json_file(path: Path, into: Metrics, max_bytes: int = 1 << 20) -> str | None:
    """Numbers from a flat JSON object file; returns an error message, or None."""
    try:
        data = json.loads(read_regular(path, max_bytes))
    except FileNotFoundError:
        return f"metrics file {path.name} was not written"
    except UnsafeFile as e:
        return f"metrics file {path.name} {e.detail}"
    except RecursionError:  # `[[[[...` nested deeper than the parser's stack
        return f"metrics file {path.name} is not valid JSON: nested too deeply"
    except (OSError, ValueError) as e:
        return f"metrics file {path.name} is not valid JSON: {e}"
    if not isinstance(data, dict):
        return f"metrics file {path.name} must hold a JSON object of name -> number"
    for name, value in data.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer past float range is infinite, not a crash
                number = math.inf if value > 0 else -math.inf
            into.add(str(name), number)
    return None


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log, for crash reports; a note in their place if it is unsafe."""
    try:
        fd, size = _open_regular(path, None)
    except FileNotFoundError:
        return ""
    except UnsafeFile as e:
        return f"[log not shown: {e}]"
    try:
        os.lseek(fd, max(0, size - 64 * 1024), os.SEEK_SET)
        data = os.read(fd, 64 * 1024)
    finally:
        os.close(fd)
    return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-lines:])
