"""Process control, once: spawn a process group, stream its output, enforce a deadline on
the harness's monotonic clock, stop it (TERM, grace, KILL) and everything it started.

Used for experiments, evaluators and checks (through the runner) and for coding agents.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import psutil

RUN_TOKEN_ENV = "OVERNIGHT_RUN_TOKEN"  # marks every process of one run, wherever it went
_CHUNK = 1 << 16
LOG_HEAD_BYTES = 64 << 20  # a log keeps its first 64 MiB and its last TAIL bytes
LOG_TAIL_BYTES = 1 << 20


@dataclass
class Exit:
    returncode: int | None
    timed_out: bool
    cancelled: bool
    peak_mb: float
    started: float  # wall clock, for the record
    exited: float
    seconds: float  # monotonic, launch to exit
    output_bytes: int = 0


class LogSink:
    """Where a run's output goes: the harness's own log file (head and tail kept within a
    bound, whatever the output's size) and any number of listeners (the metric parser, a
    live view)."""

    def __init__(self, path: Path, listeners: list[Callable[[bytes], None]] = (),
                 head: int = LOG_HEAD_BYTES, tail: int = LOG_TAIL_BYTES):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        self.file: BinaryIO = os.fdopen(fd, "ab", buffering=0)  # live: `tail -f` works
        self.listeners = list(listeners)
        self.head_left = head
        self.tail_max = tail
        self.tail = bytearray()
        self.dropped = 0
        self.total = 0

    def write(self, chunk: bytes) -> None:
        self.total += len(chunk)
        for listen in self.listeners:
            listen(chunk)
        if self.head_left > 0:
            part = chunk[: self.head_left]
            self.file.write(part)
            self.head_left -= len(part)
            chunk = chunk[len(part):]
            if not chunk:
                return
        self.tail += chunk
        if len(self.tail) > self.tail_max:
            cut = len(self.tail) - self.tail_max
            self.dropped += cut
            del self.tail[:cut]

    def close(self) -> None:
        if self.dropped:
            self.file.write(f"\n[overnight: {self.dropped} bytes of output not kept here]\n"
                            .encode())
        self.file.write(bytes(self.tail))
        self.file.close()


def spawn(argv: list[str], cwd: Path, env: dict[str, str], sink: LogSink, timeout: float,
          grace: float, cancel: threading.Event, *, token: str = "",
          pass_fds: tuple[int, ...] = (), sample_interval: float = 0.5,
          extra_kill: Callable[[int], None] | None = None, term_leader: bool = True) -> Exit:
    """Run one process group to completion or its deadline; everything of it dies.

    Output comes through a pipe and goes to `sink`. The deadline is `timeout` seconds on
    the monotonic clock from launch: an exit noticed after it is a timeout, however long
    the harness itself was stopped. `extra_kill(sig)` reaches processes the group does not
    (a slot's uid). `term_leader` False: the leader is a sandbox that would KILL what it
    holds on a TERM, so the TERM goes to the processes inside it, and the leader follows.
    """
    read_fd, write_fd = os.pipe()
    started, t0 = time.time(), time.monotonic()
    try:
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=write_fd,
            stderr=write_fd, start_new_session=True, pass_fds=pass_fds, close_fds=True,
        )
    finally:
        os.close(write_fd)
    deadline = t0 + timeout
    tree = TreeWatcher(proc.pid, token)
    pump = _Pump(read_fd, sink)
    exited = _ExitWaiter(proc)
    timed_out = was_cancelled = False
    interval = 0.02  # sample early runs often, then back off to the steady interval
    try:
        while True:
            if cancel.is_set():
                was_cancelled = True
                stop(proc, tree, grace, extra_kill, term_leader)
                break
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                stop(proc, tree, grace, extra_kill, term_leader)
                break
            if exited.wait(min(interval, left)):
                break
            tree.sample()
            interval = min(interval * 2, sample_interval)
        exit_seen = time.monotonic()
        if exit_seen > deadline and not was_cancelled:
            timed_out = True  # it ran past its time, whatever kept us from seeing it
    finally:
        exited.close()
        # Whatever the main process left behind in its group, or spawned into its own
        # session, dies with it: an experiment never outlives its run.
        _signal_group(proc.pid, signal.SIGKILL)
        if extra_kill is not None:
            extra_kill(signal.SIGKILL)
        tree.signal_all(signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        pump.finish()
    return Exit(proc.returncode, timed_out, was_cancelled, tree.peak_mb, started, time.time(),
                exit_seen - t0, sink.total)


class _Pump:
    """Reads the run's pipe on a thread until every writer has closed it (or we stop)."""

    def __init__(self, fd: int, sink: LogSink):
        self.fd, self.sink = fd, sink
        self._stop_r, self._stop_w = os.pipe()
        self.thread = threading.Thread(target=self._run, daemon=True, name="overnight-pump")
        self.thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN | select.POLLHUP)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self.fd in ready:
                chunk = os.read(self.fd, _CHUNK)
                if not chunk:
                    return
                self.sink.write(chunk)
            elif self._stop_r in ready:
                return

    def finish(self) -> None:
        """After the run is dead: read what is left in the pipe, then stop. A killed run's
        descendants are dead too, so the pipe drains; a stray holder cannot keep us."""
        self.thread.join(timeout=2)
        os.write(self._stop_w, b"x")
        self.thread.join()
        with contextlib.suppress(BlockingIOError):
            os.set_blocking(self.fd, False)
            while chunk := os.read(self.fd, _CHUNK):
                self.sink.write(chunk)
        for fd in (self.fd, self._stop_r, self._stop_w):
            os.close(fd)


class _ExitWaiter:
    """Wakes the moment the process exits (a pidfd on Linux), not at the next poll tick."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.poller: select.poll | None = None
        self.fd: int | None = None
        try:
            self.fd = os.pidfd_open(proc.pid)
            self.poller = select.poll()
            self.poller.register(self.fd, select.POLLIN)
        except (AttributeError, OSError):  # not Linux >= 5.3: fall back to timed waits
            self.fd = self.poller = None

    def wait(self, timeout: float) -> bool:
        """True once the process has exited (and is reaped)."""
        if self.poller is None:
            try:
                self.proc.wait(timeout=timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        if self.poller.poll(max(0, int(timeout * 1000))):
            self.proc.wait()
            return True
        return False

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class TreeWatcher:
    """Peak RSS of a process tree, and every process of the run, to kill escapees at the end."""

    def __init__(self, pid: int, token: str = ""):
        self.pgid = pid  # the run's own session and group
        self.born = time.time()
        self.token = token
        self.peak_mb = 0.0
        self.seen: dict[int, psutil.Process] = {}
        try:
            self.root: psutil.Process | None = psutil.Process(pid)
        except psutil.NoSuchProcess:
            self.root = None

    def sample(self) -> None:
        if self.root is None:
            return
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
                self.seen.setdefault(p.pid, p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        self.peak_mb = max(self.peak_mb, total / 2**20)

    def alive(self) -> list[psutil.Process]:
        """Live processes of the run: its group, descendants seen, and any process carrying
        its token (a daemon that double-forked into a new session has left both)."""
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter():
            try:
                if os.getpgid(p.pid) == self.pgid:
                    found[p.pid] = p
                # Only processes born during the run can be its escapees: reading the
                # environment of every process on a busy GPU box would be slow.
                elif (self.token and p.create_time() >= self.born - 1
                      and p.environ().get(RUN_TOKEN_ENV) == self.token):
                    found[p.pid] = p
            except (psutil.Error, OSError):  # gone, a zombie, or not ours to read
                continue
        for p in self.seen.values():
            found.setdefault(p.pid, p)
        live = []
        for p in found.values():
            try:
                # is_running() checks the pid was not reused; zombies are already dead.
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    live.append(p)
            except psutil.Error:
                continue
        return live

    def signal_all(self, sig: int, outside_group_only: bool = False,
                   spare: int | None = None) -> None:
        for p in self.alive():
            try:
                if outside_group_only and os.getpgid(p.pid) == self.pgid or p.pid == spare:
                    continue  # killpg reached it already: one TERM each, not two
                p.send_signal(sig)
            except (psutil.Error, OSError):
                continue


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def stop(proc: subprocess.Popen, tree: TreeWatcher, grace: float,
         extra_kill: Callable[[int], None] | None = None, term_leader: bool = True) -> None:
    """TERM every process of the run, give them `grace` seconds to exit, then KILL them.

    The script itself is usually a child of /bin/sh, which dies on the TERM at once: the
    grace lasts until the whole run has exited, not just its leader.
    """
    tree.sample()  # remember the tree while its root is still there
    if term_leader:
        _signal_group(proc.pid, signal.SIGTERM)
        tree.signal_all(signal.SIGTERM, outside_group_only=True)
    else:
        tree.signal_all(signal.SIGTERM, spare=proc.pid)
    if extra_kill is not None:
        extra_kill(signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end:
        if proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=min(0.05, max(0.0, end - time.monotonic())))
            continue
        left = tree.alive()
        if not left:
            break
        psutil.wait_procs(left, timeout=min(0.05, max(0.0, end - time.monotonic())))
    _signal_group(proc.pid, signal.SIGKILL)
    if extra_kill is not None:
        extra_kill(signal.SIGKILL)
    tree.signal_all(signal.SIGKILL)
    proc.wait()


def kill_leftovers(marker: str, value: str) -> int:
    """Processes a dead harness left behind, found by an environment marker; how many."""
    orphans = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(marker) == value:
                orphans.append(p)
        except (psutil.Error, OSError):
            continue
    for p in orphans:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(orphans, timeout=5)
    return len(orphans)
