"""What an executor is asked to run (RunRequest) and what it reports (RunResult)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from overnight.metrics import Metrics


@dataclass(frozen=True)
class RunRequest:
    experiment_id: int
    commit: str  # the exact tree to run
    run_dir: Path  # per-experiment directory; the tree goes to run_dir/"work"
    command: str  # run through /bin/sh in the work tree
    env: dict[str, str]  # added to the experiment's environment
    budget_seconds: float
    timeout_seconds: float
    kill_grace_seconds: float
    slot: int
    metrics_file: str | None = None  # JSON file of name -> number, relative to the work tree

    @property
    def workdir(self) -> Path:
        return self.run_dir / "work"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "run.log"


@dataclass
class RunResult:
    status: str  # "ok" (exited 0), "crash", "timeout", "lost" (interrupted, worker vanished)
    returncode: int | None
    started_at: float
    finished_at: float
    metrics: Metrics = field(default_factory=Metrics)
    peak_rss_mb: float | None = None
    reason: str = ""
    hardware: str = ""
    exited_at: float | None = None  # when the process was seen to exit (for overhead figures)


class Executor(ABC):
    slots: int

    @abstractmethod
    def submit(self, request: RunRequest) -> Future[RunResult]:
        """Start the run as soon as possible; the future resolves when it is over."""

    @abstractmethod
    def cancel_all(self) -> None:
        """Kill everything running; their futures resolve with status `lost`."""

    def reap(self, run_dirs: list[Path]) -> int:
        """Kill what a dead harness left running in these run directories; how many."""
        return 0

    @abstractmethod
    def shutdown(self) -> None:
        """Release workers; called once the loop is done."""
