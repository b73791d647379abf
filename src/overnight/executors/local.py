"""The local executor: one slot per GPU (or N CPU slots), one process group per experiment.

Each run gets its own directory materialized from the commit, its own session
(so a timeout or Ctrl-C kills the whole tree, grandchildren included), a log
file, a hard timeout (TERM, grace, KILL), and peak memory of the process tree.
Every process of a run carries a token in its environment, so that even a
daemon that double-forked into a new session is found and killed at the end.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil

from overnight.errors import ConfigError
from overnight.executors.base import CheckResult, Executor, RunRequest, RunResult
from overnight.guard import RunGuard, attest_env
from overnight.metrics import merge_json_file, parse_log, tail
from overnight.sandbox import bwrap_argv, require_bwrap, scrubbed_env
from overnight.snapshot import Repo

RUN_TOKEN_ENV = "OVERNIGHT_RUN_TOKEN"  # marks every process of one run, wherever it went


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
    def __init__(self, repo: Repo, slots: int, gpus: list[str] | None = None,
                 sample_interval: float = 0.5):
        self.repo = repo
        self.slots = slots
        self.gpus = gpus or []
        self.sample_interval = sample_interval
        self._pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="overnight-slot")
        self._lock = threading.Lock()
        self._live: dict[int, subprocess.Popen] = {}
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

    def submit(self, request: RunRequest) -> Future[RunResult]:
        return self._pool.submit(self._run_safely, request)

    def _run_safely(self, req: RunRequest) -> RunResult:
        """A failure of the harness itself (disk full, git gone) loses the run, not the loop."""
        try:
            return self._run(req)
        except Exception as e:  # noqa: BLE001 - reported in the ledger, the loop goes on
            now = time.time()
            return RunResult("error", None, now, now, reason=f"harness error: {e}",
                             hardware=self._hardware.get(req.slot, ""))

    def cancel_all(self) -> None:
        self._cancelled.set()
        with self._lock:
            live = list(self._live.values())
        for proc in live:
            _signal_group(proc.pid, signal.SIGTERM)

    def reap(self, run_dirs: list[Path]) -> int:
        """Orphans of a killed `overnight run` still hold their GPU: find them by the run
        directory in their environment and kill them before the work is redone."""
        wanted = {str(d) for d in run_dirs}
        if not wanted:
            return 0
        orphans = []
        for p in psutil.process_iter():
            try:
                if p.environ().get("OVERNIGHT_RUN_DIR") in wanted:
                    orphans.append(p)
            except (psutil.Error, OSError):
                continue
        for p in orphans:
            try:
                p.kill()
            except psutil.Error:
                continue
        psutil.wait_procs(orphans, timeout=5)
        return len(orphans)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)

    # -- one run -------------------------------------------------------------

    def _env(self, req: RunRequest, token: str) -> dict[str, str]:
        env, _ = scrubbed_env({**os.environ, **req.env}, list(req.allow_env))
        env[RUN_TOKEN_ENV] = token
        env["OVERNIGHT_BUDGET_SECONDS"] = f"{req.budget_seconds:g}"
        env["OVERNIGHT_EXPERIMENT_ID"] = str(req.experiment_id)
        env["OVERNIGHT_RUN_DIR"] = str(req.run_dir)
        env["OVERNIGHT_ARTIFACTS"] = str(req.artifacts)
        env["OVERNIGHT_SLOT"] = str(req.slot)
        env["PYTHONUNBUFFERED"] = "1"  # so the log shows progress and survives a kill
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[req.slot % len(self.gpus)]
        return env

    def _readable(self) -> list[Path]:
        """What an experiment needs to read even if it lives under /tmp: the repository, this
        Python and its environment, and everything on PATH and PYTHONPATH."""
        paths = [self.repo.root, Path(sys.prefix), Path(sys.executable).resolve().parent,
                 Path(__file__).resolve().parents[1]]
        for var in ("PATH", "PYTHONPATH", "VIRTUAL_ENV"):
            paths += [Path(p) for p in os.environ.get(var, "").split(os.pathsep) if p]
        return paths

    def _argv(self, req: RunRequest, command: str, cwd: Path) -> list[str]:
        argv = ["/bin/sh", "-c", command]
        if req.sandbox == "bwrap":
            writable = [req.artifacts, req.attest_path.parent]
            argv = bwrap_argv(require_bwrap(), cwd, writable, self._readable()) + argv
        return argv

    def _spawn(self, req: RunRequest, argv: list[str], cwd: Path, env: dict[str, str],
               log_path: Path, timeout: float, token: str) -> _Exit:
        """Run one process group to completion or its deadline; everything of it dies."""
        with open(log_path, "ab") as log:
            started = time.time()
            proc = subprocess.Popen(
                argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: we can kill the whole tree
            )
            with self._lock:
                self._live[req.experiment_id] = proc
            try:
                timed_out, peak = self._wait(proc, token, started + timeout,
                                             req.kill_grace_seconds)
            finally:
                with self._lock:
                    self._live.pop(req.experiment_id, None)
        return _Exit(proc.returncode, timed_out, peak, started, time.time())

    def _run(self, req: RunRequest) -> RunResult:
        hardware = self._hardware.get(req.slot, "")
        if self._cancelled.is_set():
            now = time.time()
            return RunResult("lost", None, now, now, reason="interrupted before start",
                             hardware=hardware)
        if req.run_dir.exists():  # a retry starts from a fresh directory
            shutil.rmtree(req.run_dir)
        self.repo.materialize(req.commit, req.workdir)
        req.artifacts.mkdir(parents=True)
        req.attest_path.parent.mkdir(parents=True)
        token = _token(req)
        env = self._env(req, token)
        if req.attest:
            env.update(attest_env(req.attest_path, req.workdir, env.get("PYTHONPATH")))
        guard = RunGuard(self.repo.tree(req.commit), req.workdir)
        with guard:
            ran = None
            if not guard.tampered_before_launch:  # never run what is not the commit
                guard.launching()
                ran = self._spawn(req, self._argv(req, req.command, req.workdir), req.workdir,
                                  env, req.log_path, req.timeout_seconds, token)
        if ran is None:
            now = time.time()
            result = RunResult("crash", None, now, now, reason="not launched",
                               hardware=hardware)
        else:
            result = self._result(req, ran, hardware)
        verdict = guard.verdict(req.attest_path if req.attest else None)
        result.integrity, result.tampered = verdict.report, verdict.summary
        result.runtime_knobs = verdict.runtime_knobs
        if result.status == "ok" and req.evaluate and not result.tampered:
            self._evaluate(req, result, token)
        result.finished_at = time.time()
        return result

    def _evaluate(self, req: RunRequest, result: RunResult, token: str) -> None:
        """The trusted evaluator decides the metrics: what the script printed is set aside."""
        eval_dir = req.run_dir / "eval"
        self.repo.materialize(req.evaluate_commit or req.commit, eval_dir)
        env = self._env(req, token)
        log = req.run_dir / "eval.log"
        ran = self._spawn(req, self._argv(req, req.evaluate, eval_dir), eval_dir, env, log,
                          req.evaluate_timeout, token)
        metrics = parse_log(log)
        printed = result.metrics.values.get("peak_vram_mb")
        if printed is not None and "peak_vram_mb" not in metrics.values:
            metrics.add("peak_vram_mb", printed)  # memory is informational, not judged
        result.metrics = metrics
        if ran.timed_out:
            result.status, result.reason = "crash", (
                f"the evaluator was killed after {req.evaluate_timeout:g}s (see {log})")
        elif ran.returncode != 0:
            result.status, result.reason = "crash", (
                f"the evaluator failed with exit code {ran.returncode} (see {log})")

    def submit_checks(self, req: RunRequest, command: str,
                      timeout: float) -> Future[CheckResult]:
        return self._pool.submit(self._checks, req, command, timeout)

    def _checks(self, req: RunRequest, command: str, timeout: float) -> CheckResult:
        where = req.run_dir / "checks"
        if where.exists():
            shutil.rmtree(where)
        self.repo.materialize(req.commit, where)
        log = req.run_dir / "checks.log"
        token = _token(req)
        ran = self._spawn(req, self._argv(req, command, where), where, self._env(req, token),
                          log, timeout, token)
        shutil.rmtree(where, ignore_errors=True)
        if self._cancelled.is_set():
            return CheckResult(False, "interrupted (the loop was stopped)", log)
        if ran.timed_out:
            return CheckResult(False, f"checks `{command}` timed out after {timeout:g}s", log)
        if ran.returncode != 0:
            last = tail(log, 3).replace("\n", " | ")
            return CheckResult(False, f"checks `{command}` failed (exit {ran.returncode}): "
                               f"{last}", log)
        return CheckResult(True, "", log)

    def _wait(self, proc: subprocess.Popen, token: str, deadline: float,
              grace: float) -> tuple[bool, float]:
        """Wait for exit, sampling memory; on the deadline kill the run. (timed_out, peak MB)."""
        watcher = _TreeWatcher(proc.pid, token)
        exited = _ExitWaiter(proc)
        interval = 0.02  # sample early runs often, then back off to the steady interval
        timed_out = False
        while True:
            if self._cancelled.is_set():
                _stop(proc, watcher, grace)
                break
            left = deadline - time.time()
            if left <= 0:
                timed_out = True
                _stop(proc, watcher, grace)
                break
            if exited.wait(min(interval, left)):
                break
            watcher.sample()
            interval = min(interval * 2, self.sample_interval)
        exited.close()
        # Whatever the main process left behind in its group, or spawned into its own
        # session, dies with it: an experiment never outlives its run.
        _signal_group(proc.pid, signal.SIGKILL)
        watcher.signal_all(signal.SIGKILL)
        return timed_out, watcher.peak_mb

    def _result(self, req: RunRequest, ran: _Exit, hardware: str) -> RunResult:
        metrics = parse_log(req.log_path)
        rc, reason = ran.returncode, ""
        if req.metrics_file:
            err = merge_json_file(req.workdir / req.metrics_file, metrics)
            if err and rc == 0:
                reason = err
        if self._cancelled.is_set() and not ran.timed_out:
            status, reason = "lost", "interrupted (the loop was stopped)"
        elif ran.timed_out:
            status = "timeout"
            reason = f"killed after the {req.timeout_seconds:g}s timeout"
        elif rc != 0:
            status = "crash"
            reason = f"exit code {rc}" if rc is not None and rc >= 0 else f"killed by signal {-rc}"
        else:
            status = "ok"
        return RunResult(
            status=status, returncode=rc, started_at=ran.started, finished_at=time.time(),
            metrics=metrics, peak_rss_mb=ran.peak_mb or None, reason=reason, hardware=hardware,
            exited_at=ran.exited,
        )


def _token(req: RunRequest) -> str:
    """A mark unique to one process group of a run, carried in its environment."""
    return f"{os.getpid()}-{req.experiment_id}-{uuid.uuid4().hex}"


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


@dataclass
class _Exit:
    returncode: int | None
    timed_out: bool
    peak_mb: float
    started: float
    exited: float


class _TreeWatcher:
    """Peak RSS of a process tree, and every process of the run, to kill escapees at the end."""

    def __init__(self, pid: int, token: str):
        self.pgid = pid  # the run's own session and group, led by /bin/sh
        self.born = time.time()
        self.token = token
        self.peak_mb = 0.0
        self.seen: dict[int, psutil.Process] = {}
        try:
            self.root = psutil.Process(pid)
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
                elif (p.create_time() >= self.born - 1
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

    def signal_all(self, sig: int, outside_group_only: bool = False) -> None:
        for p in self.alive():
            try:
                if outside_group_only and os.getpgid(p.pid) == self.pgid:
                    continue  # killpg reached it already: one TERM each, not two
                p.send_signal(sig)
            except (psutil.Error, OSError):
                continue


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(proc: subprocess.Popen, watcher: _TreeWatcher, grace: float) -> None:
    """TERM every process of the run, give them `grace` seconds to exit, then KILL them.

    The script itself is usually a child of /bin/sh, which dies on the TERM at once: the
    grace lasts until the whole run has exited, not just its leader.
    """
    watcher.sample()  # remember the tree while its root is still there
    _signal_group(proc.pid, signal.SIGTERM)
    watcher.signal_all(signal.SIGTERM, outside_group_only=True)
    end = time.monotonic() + grace
    while time.monotonic() < end:
        if proc.poll() is None:
            try:
                proc.wait(timeout=min(0.05, max(0.0, end - time.monotonic())))
            except subprocess.TimeoutExpired:
                pass
            continue
        left = watcher.alive()
        if not left:
            return
        psutil.wait_procs(left, timeout=min(0.05, max(0.0, end - time.monotonic())))
    _signal_group(proc.pid, signal.SIGKILL)
    watcher.signal_all(signal.SIGKILL)
    proc.wait()
