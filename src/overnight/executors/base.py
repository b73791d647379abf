"""What an executor is asked to run (RunRequest) and what it reports (RunResult)."""

from __future__ import annotations

import queue
import threading
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from overnight.metrics import Metrics
from overnight.tree import Tree

# Sandbox "user": the slot uids prechecks run as, apart from the runs' (0 and up) and the
# coding agents' (520 and up), since everything of a slot's uid ends when one of its
# processes does.
PRECHECK_SLOTS = (512, 513)


@dataclass(frozen=True)
class RunRequest:
    """Everything needed to run one candidate, on this machine or a worker without the
    repository: the files travel with it."""

    experiment_id: int
    tree: Tree  # the exact files to run: the candidate's committed bytes
    run_dir: Path  # per-experiment directory; the tree goes to run_dir/"work"
    command: str  # run through /bin/sh in the work tree
    env: dict[str, str]  # added to the experiment's environment
    budget_seconds: float
    timeout_seconds: float
    kill_grace_seconds: float
    slot: int
    metrics_file: str | None = None  # JSON file of name -> number, relative to the work tree
    allow_env: tuple[str, ...] = ()  # the harness's variables the experiment may also see
    sandbox: str = "auto"  # auto | bwrap | user | none (resolved where it runs)
    network: bool = False  # reach the network from the sandbox
    attest: bool = False  # inject the attestation hook into Python processes
    evaluate: str | None = None  # trusted evaluator command: the metric comes from it
    evaluate_tree: Tree | None = None  # the tree the evaluator runs from (the baseline's)
    evaluate_timeout: float = 600
    readable: tuple[Path, ...] = ()  # bound in read-only (a venv inside the repository)
    hidden: tuple[Path, ...] = ()  # never visible to the experiment (the repository)
    devices: tuple[str, ...] = ()  # device nodes passed through besides the GPUs found
    project_venv: Path | None = None  # the repository's .venv, for `uv run`
    tmp_bytes: int = 4 << 30  # size of the box's private /tmp and /dev/shm, each
    max_processes: int = 4096  # processes (and threads) a run may have at once
    # The objective's name and, for output that does not say `name: value`, a regular
    # expression whose one group is the value (the last match wins).
    objective: str | None = None
    pattern: str | None = None
    knob_names: tuple[str, ...] = ()  # lowercase knobs whose values at exit are recorded
    hw_class: str = ""  # the hardware class of its slot ("" on a single-class executor)
    # [run] data: (path in the run, absolute source) pairs, read-only in the run.
    data: tuple[tuple[str, str], ...] = ()

    @property
    def commit(self) -> str:
        return self.tree.commit

    @property
    def workdir(self) -> Path:
        return self.run_dir / "work"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "run.log"

    @property
    def artifacts(self) -> Path:
        """Where the experiment leaves what the evaluator reads ($OVERNIGHT_ARTIFACTS)."""
        return self.run_dir / "artifacts"

    @property
    def attest_path(self) -> Path:
        return self.run_dir / "attest" / "attest.json"


@dataclass
class RunResult:
    # "ok" (exited 0), "crash", "timeout", "lost" (interrupted), "error" (the harness failed)
    status: str
    returncode: int | None
    started_at: float
    finished_at: float
    metrics: Metrics = field(default_factory=Metrics)
    peak_rss_mb: float | None = None
    reason: str = ""
    hardware: str = ""
    exited_at: float | None = None  # when the process was seen to exit (for overhead figures)
    runtime_knobs: dict[str, object] = field(default_factory=dict)  # what really ran
    integrity: dict = field(default_factory=dict)  # the tamper report, as JSON
    tampered: str = ""  # one-line explanation when what ran is not what was committed


@dataclass
class CheckResult:
    ok: bool
    reason: str
    log_path: Path | None = None


class Executor(ABC):
    slots: int
    _cancelled: threading.Event
    _side: ThreadPoolExecutor | None = None
    _side_slots: queue.SimpleQueue[int] | None = None

    @property
    def slot_classes(self) -> list[str]:
        """The hardware class of each slot: results compare only within a class. One class
        ("") unless the executor spans kinds of hardware."""
        return [""] * self.slots

    def grow(self) -> list[str]:
        """The classes of slots gained since the last call (a cluster that grew): []."""
        return []

    def precheck(self, request: RunRequest, command: str, timeout: float
                 ) -> Future[CheckResult]:
        """The precheck command on a fresh copy of the candidate's tree, on this machine,
        outside the slots, boxed like a run, with no GPU visible."""
        if self._side is None:
            self._side_slots = queue.SimpleQueue()
            for slot in PRECHECK_SLOTS:
                self._side_slots.put(slot)
            self._side = ThreadPoolExecutor(max_workers=len(PRECHECK_SLOTS),
                                            thread_name_prefix="overnight-pre")
        return self._side.submit(self._precheck, request, command, timeout)

    def _precheck(self, request: RunRequest, command: str, timeout: float) -> CheckResult:
        from overnight.executors import runner

        assert self._side_slots is not None
        slot = self._side_slots.get()  # one per worker thread: always one free
        try:
            return runner.check(replace(request, slot=slot), command, timeout,
                                self._cancelled, "", "precheck.log")
        finally:
            self._side_slots.put(slot)

    @abstractmethod
    def submit(self, request: RunRequest) -> Future[RunResult]:
        """Start the run as soon as possible; the future resolves when it is over."""

    @abstractmethod
    def cancel_all(self) -> None:
        """Kill everything running; their futures resolve with status `lost`."""

    @abstractmethod
    def submit_checks(self, request: RunRequest, command: str,
                      timeout: float) -> Future[CheckResult]:
        """Run the checks command on a fresh copy of the candidate's tree."""

    def reap(self, run_dirs: list[Path]) -> int:
        """Kill what a dead harness left running in these run directories; how many."""
        return 0

    @abstractmethod
    def shutdown(self) -> None:
        """Release workers; called once the loop is done."""
