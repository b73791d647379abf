"""Output that outlives its terminal: `overnight run` is started over SSH and left alone.

    with outliving(console, log_path):
        ...   # console writes go to the terminal while it lasts, and always to log_path

A closed pipe (`overnight run | head`, a dead `tee`) or a terminal that went away (the SSH
session dropped: EIO) stops the writes to it, never the loop; the loop's own log under
.overnight/ has every line (without colour codes). SIGHUP is caught and noted, so a hang-up
does not kill the loop; experiments start with the default disposition again (a caught
signal is reset by exec).
"""

from __future__ import annotations

import contextlib
import io
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from rich.console import Console

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


class Outliving(io.TextIOBase):
    """A text stream writing to `stream` until it fails, and to `log` (if any) always."""

    def __init__(self, stream: IO[str] | None, log: IO[str] | None = None) -> None:
        self.stream = stream
        self.log = log

    def write(self, s: str) -> int:
        if self.stream is not None:
            try:
                self.stream.write(s)
                self.stream.flush()
            except (OSError, ValueError):  # EPIPE, EIO, a closed file: the terminal is gone
                self.stream = None
        if self.log is not None:
            self.log.write(_ANSI.sub("", s))
            self.log.flush()
        return len(s)

    def flush(self) -> None:
        if self.stream is not None:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self.stream = None

    def isatty(self) -> bool:
        try:
            return self.stream is not None and self.stream.isatty()
        except (OSError, ValueError):
            return False

    def writable(self) -> bool:
        return True


def _hung_up(signum: int, frame: object) -> None:
    """The terminal went away: the loop goes on (its log is under .overnight/)."""


@contextlib.contextmanager
def outliving(console: Console, err: Console, log_path: Path) -> Iterator[None]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        out, errs = console.file, err.file
        console.file = Outliving(out, log)
        err.file = Outliving(errs, log)
        previous = signal.signal(signal.SIGHUP, _hung_up)
        try:
            yield
        finally:
            signal.signal(signal.SIGHUP, previous)
            console.file, err.file = out, errs
