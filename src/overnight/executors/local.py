"""The local executor: a pool of slots (one per GPU, or N CPU slots) around the runner.

Everything about running one candidate (its directory, box, deadline, output, integrity)
is the runner's (runner.py); this only decides which slot and GPU a run gets, and stops
them all on Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from overnight.errors import ConfigError
from overnight.executors import cgroups, process, runner
from overnight.executors.base import CheckResult, Executor, RunRequest, RunResult


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def gpu_names() -> dict[str, str]:
    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    names = {}
    for line in out.stdout.splitlines():
        if "," in line:
            idx, name = line.split(",", 1)
            names[idx.strip()] = name.strip()
    return names


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def resolve_slots(parallel: int | str) -> tuple[int, list[str]]:
    """(number of slots, GPU id per slot or [] for CPU slots)."""
    gpus = visible_gpus()
    if parallel == "gpus":
        if not gpus:
            raise ConfigError(
                'parallel = "gpus" but no GPU is visible (nvidia-smi found none): '
                "set [run] parallel to a number of CPU slots, or pass --parallel N"
            )
        return len(gpus), gpus
    n = int(parallel)
    if gpus and n > len(gpus):
        raise ConfigError(
            f"parallel = {n} but only {len(gpus)} GPU(s) are visible: one slot per GPU keeps "
            f'runs comparable; use parallel = "gpus" or a number <= {len(gpus)}'
        )
    return n, gpus[:n] if gpus else []


class LocalExecutor(Executor):
    def __init__(self, slots: int, gpus: list[str] | None = None):
        self.slots = slots
        self.gpus = gpus or []
        self._pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="overnight-slot")
        self._cancelled = threading.Event()
        names = gpu_names() if self.gpus else {}
        self._hardware = {
            slot: (f"{names.get(g, 'gpu')} (gpu {g})" if self.gpus else f"{cpu_name()} (cpu)")
            for slot, g in enumerate(self.gpus or [None] * slots)
        }

    @property
    def hardware(self) -> str:
        """What the slots run on, in words, e.g. 'NVIDIA H100 80GB HBM3 (gpu 0), ...'."""
        return ", ".join(dict.fromkeys(self._hardware.values()))

    def _gpu(self, slot: int) -> str | None:
        return self.gpus[slot % len(self.gpus)] if self.gpus else None

    def submit(self, request: RunRequest) -> Future[RunResult]:
        return self._pool.submit(runner.run, request, self._cancelled,
                                 self._hardware.get(request.slot, ""), self._gpu(request.slot))

    def submit_checks(self, request: RunRequest, command: str,
                      timeout: float) -> Future[CheckResult]:
        return self._pool.submit(runner.check, request, command, timeout, self._cancelled,
                                 self._gpu(request.slot))

    def cancel_all(self) -> None:
        """Every run stops (TERM, grace, KILL); their futures resolve as `lost`."""
        self._cancelled.set()

    def reap(self, run_dirs: list[Path]) -> int:
        """Orphans of a killed `overnight run` (unboxed runs only: a box dies with the
        harness) still hold their GPU: kill them before the work is redone."""
        return sum(process.kill_leftovers("OVERNIGHT_RUN_DIR", str(d)) for d in run_dirs)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
        cgroups.sweep(mine=True)  # run cgroups whose killed processes were not yet reaped
