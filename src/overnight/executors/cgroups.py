"""A process limit per run, through the pids controller of a cgroup the harness may create.

cgroup v1 (a `pids` hierarchy) or v2 (with `pids` delegated to the harness's own cgroup).
Where neither is writable (an unprivileged harness on most hosts), runs have no process
limit of their own; `overnight doctor` says so. The run joins its cgroup before it execs
(a shell line writes its pid to `cgroup.procs`), so nothing it forks escapes the count.
"""

from __future__ import annotations

import contextlib
import functools
import os
import uuid
from pathlib import Path

import psutil


@functools.cache
def pids_root() -> Path | None:
    """The directory under which this process may create cgroups with a pids limit."""
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
            base = Path(point) / own.get("pids", "/").lstrip("/")
        elif kind == "cgroup2" and "" in own:
            base = Path(point) / own[""].lstrip("/")
            try:
                if "pids" not in (base / "cgroup.subtree_control").read_text().split():
                    continue
            except OSError:
                continue
        else:
            continue
        if os.access(base, os.W_OK):
            return base
    return None


class PidsLimit:
    """`with PidsLimit(n) as limit: argv = limit.wrap(argv)`; removed on exit."""

    def __init__(self, max_pids: int):
        self.max_pids = max_pids
        self.path: Path | None = None

    def __enter__(self) -> PidsLimit:
        root = pids_root()
        if root is None:
            return self
        path = root / f"overnight-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        try:
            path.mkdir()
            (path / "pids.max").write_text(str(self.max_pids))
        except OSError:
            with contextlib.suppress(OSError):
                path.rmdir()
            return self
        self.path = path
        return self

    def wrap(self, argv: list[str]) -> list[str]:
        if self.path is None:
            return argv
        join = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
        return ["/bin/sh", "-c", join, str(self.path), *argv]

    def __exit__(self, *exc: object) -> None:
        if self.path is None:
            return
        _kill_members(self.path)
        # Killed processes stay members until reaped, which a slow init may take seconds to
        # do: a cgroup still busy is removed by sweep() when the executor shuts down.
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
