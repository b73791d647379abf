"""A process limit per run, through the pids controller of a cgroup the harness may create.

cgroup v1 (a `pids` hierarchy) or v2 (with `pids` delegated to the harness's own cgroup).
Where neither is writable (an unprivileged harness on most hosts), runs have no process
limit of their own; `overnight doctor` says so.

Nothing a run forks escapes the count: with v1, which tracks threads, the harness thread
that spawns runs (a slot) sits in a cgroup of its own, and what it spawns is born inside it
(moving a process between v1 cgroups costs a ~10 ms RCU grace period: once per slot, not
per run); with v2, the run joins its cgroup before it execs (a shell line writes its pid
to `cgroup.procs`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import uuid
from pathlib import Path

import psutil


def pids_root() -> Path | None:
    """The directory under which this process may create cgroups with a pids limit."""
    found = pids_hierarchy()
    return found[0] if found else None


@functools.cache
def pids_hierarchy() -> tuple[Path, int] | None:
    """(that directory, the cgroup version) or None."""
    try:
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
        mine = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    own = {}
    for line in mine:  # "8:pids:/path" (v1) or "0::/path" (v2)
        _, controllers, path = line.split(":", 2)
        own[controllers] = path
    for line in mounts:
        left, _, right = line.partition(" - ")
        fields, after = left.split(), right.split()
        if len(fields) < 5 or len(after) < 3:
            continue
        point, kind, options = fields[4], after[0], after[2]
        if kind == "cgroup" and "pids" in options.split(","):
            base, version = Path(point) / own.get("pids", "/").lstrip("/"), 1
        elif kind == "cgroup2" and "" in own:
            version = 2
            base = Path(point) / own[""].lstrip("/")
            try:
                if "pids" not in (base / "cgroup.subtree_control").read_text().split():
                    continue
            except OSError:
                continue
        else:
            continue
        if os.access(base, os.W_OK):
            return base, version
    return None


class PidsLimit:
    """`with PidsLimit(n) as limit: argv = limit.wrap(argv)`: what runs is limited to `n`
    processes and threads, and killed on exit."""

    def __init__(self, max_pids: int):
        self.max_pids = max_pids
        self.path: Path | None = None
        self.per_run = False

    def __enter__(self) -> PidsLimit:
        found = pids_hierarchy()
        if found is None:
            return self
        root, version = found
        try:
            if version == 1:
                self.path = self._thread_cgroup(root)
            else:
                self.path = root / f"overnight-{os.getpid()}-{uuid.uuid4().hex[:12]}"
                self.path.mkdir()
                self.per_run = True
            # One more than asked: with v1 the slot's own thread is a member.
            (self.path / "pids.max").write_text(str(self.max_pids + (version == 1)))
        except OSError:
            if self.per_run and self.path is not None:
                with contextlib.suppress(OSError):
                    self.path.rmdir()
            self.path, self.per_run = None, False
        return self

    @staticmethod
    def _thread_cgroup(root: Path) -> Path:
        tid = threading.get_native_id()
        path = root / f"overnight-{os.getpid()}-t{tid}"
        path.mkdir(exist_ok=True)
        inside = Path("/proc/thread-self/cgroup").read_text()
        if not any(line.split(":", 2)[1].split(",").count("pids")
                   and line.rstrip().endswith("/" + path.name) for line in inside.splitlines()):
            (path / "tasks").write_text(str(tid))
        return path

    def wrap(self, argv: list[str]) -> list[str]:
        if not self.per_run or self.path is None:
            return argv  # born inside: the spawning thread is a member (v1)
        join = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
        return ["/bin/sh", "-c", join, str(self.path), *argv]

    def __exit__(self, *exc: object) -> None:
        if self.path is None:
            return
        _kill_members(self.path)
        # Killed processes stay members until reaped, which a slow init may take seconds to
        # do: a cgroup still busy is removed by sweep() when the executor shuts down. A
        # slot's own (v1) is kept for its next run.
        if self.per_run:
            with contextlib.suppress(OSError):
                self.path.rmdir()


def _kill_members(path: Path) -> int:
    """SIGKILL every live process of a cgroup; how many were alive. Not waited for: a killed
    process is a zombie until a (possibly slow) init reaps it, and a zombie is harmless."""
    try:
        pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return 0
    live = 0
    for pid in pids:
        if pid == os.getpid():
            continue  # the harness itself: its slot thread is a member (v1)
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                proc.kill()
                live += 1
    return live


def sweep(mine: bool = False) -> int:
    """Kill what a harness that died (kill -9) left running in its runs' cgroups, and remove
    them; with `mine`, this process's own too (once its runs are over). How many processes
    were killed."""
    root = pids_root()
    if root is None:
        return 0
    killed = 0
    for path in root.glob("overnight-*-*"):
        pid = path.name.split("-")[1]
        if not pid.isdigit():
            continue
        if int(pid) == os.getpid() and mine or not Path(f"/proc/{pid}").exists():
            killed += _kill_members(path)
            with contextlib.suppress(OSError):
                path.rmdir()
    return killed
