"""The runner: everything about running one candidate, on whatever machine it lands.

    result = run(request, cancel)

writes the candidate's committed bytes into a fresh run directory, builds the experiment's
environment from an allowlist, boxes it (see sandbox.py), spawns it with its output coming
to the harness through a pipe (the harness writes `run.log` and parses metrics as the
output flows), enforces the deadline on the harness's monotonic clock, decides integrity
by content, runs the trusted evaluator and the checks each in a fresh directory in the
same box, and cleans up. It never opens git: the request carries the files, so it runs the
same on a worker node that has no repository.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from overnight import _confine, sandbox
from overnight._confine import uids
from overnight.errors import OvernightError
from overnight.executors import cgroups, process
from overnight.executors.base import CheckResult, RunRequest, RunResult
from overnight.guard import RunGuard, attest_env
from overnight.metrics import Metrics, MetricStream, UnsafeFile, merge_json_file, tail
from overnight.tree import SYMLINK, Tree

METRICS_FILE_MAX_BYTES = 1 << 20


@dataclass
class Launch:
    """One boxed process: what it runs, where, for how long, and what it may see."""

    command: str
    cwd: Path  # writable: the work tree
    log: Path  # written by the harness from the process's output
    timeout: float
    grace: float
    writable: list[Path] = field(default_factory=list)
    readable: list[Path] = field(default_factory=list)  # bound in read-only
    hidden: list[Path] = field(default_factory=list)  # never visible
    readonly_files: list[str] = field(default_factory=list)  # under cwd: committed files
    devices: list[str] = field(default_factory=list)
    network: bool = False
    tmp_bytes: int = 4 << 30
    max_processes: int = 4096
    slot: int = 0  # the slot's own uid, for sandbox "user"
    # [run] data as (source, place): bound read-only (bwrap), readable through a link (user)
    mounts: list[tuple[str, str]] = field(default_factory=list)
    listeners: list[Callable[[bytes], None]] = field(default_factory=list)

    @classmethod
    def of(cls, req: RunRequest, command: str, cwd: Path, log: Path, timeout: float,
           tree: Tree, **more: object) -> Launch:
        """A process of this run, boxed as the request says."""
        return cls(command, cwd, log, timeout, req.kill_grace_seconds,
                   readable=list(req.readable), hidden=list(req.hidden),
                   readonly_files=[f.path for f in tree.files if f.mode != SYMLINK],
                   devices=sandbox.gpu_devices(tuple(req.devices)), network=req.network,
                   tmp_bytes=req.tmp_bytes, max_processes=req.max_processes, slot=req.slot,
                   **more)


def run(req: RunRequest, cancel: threading.Event, hardware: str = "",
        gpu: str | None = None, on_output: Callable[[bytes], None] | None = None) -> RunResult:
    """Run one candidate to a result; a failure of the harness itself is an `error` result."""
    try:
        return _run(req, cancel, hardware, gpu, on_output)
    except (OSError, OvernightError, ValueError) as e:
        now = time.time()
        return RunResult("error", None, now, now, reason=f"harness error: {e}",
                         hardware=hardware)


def _run(req: RunRequest, cancel: threading.Event, hardware: str, gpu: str | None,
         on_output: Callable[[bytes], None] | None) -> RunResult:
    if cancel.is_set():
        now = time.time()
        return RunResult("lost", None, now, now, reason="interrupted before start",
                         hardware=hardware)
    mode = sandbox.resolve(req.sandbox)
    _fresh(req.run_dir)
    req.tree.write(req.workdir)
    mounts = place_data(req, req.workdir, mode)
    req.artifacts.mkdir()
    req.attest_path.parent.mkdir()
    env, withheld = _env(req, gpu)
    if req.attest:
        env.update(attest_env(req.attest_path, req.workdir, env.get("PYTHONPATH"),
                              req.knob_names))
    stream = _stream(req)
    listeners = [stream.feed] + ([on_output] if on_output else [])
    launch = Launch.of(req, req.command, req.workdir, req.log_path, req.timeout_seconds,
                       req.tree, writable=[req.artifacts, req.attest_path.parent],
                       listeners=listeners, mounts=mounts)
    if mode == "user":
        share_tree(req.workdir, launch.readonly_files)
    guard = RunGuard(req.tree, req.workdir, tuple(rel for rel, _ in req.data))
    ran = None
    with guard:
        if not guard.tampered_before_launch:  # never run what is not the commit
            guard.launching()
            ran = spawn(mode, launch, env, cancel, f"{req.experiment_id}")
    if ran is None:
        now = time.time()
        result = RunResult("crash", None, now, now, reason="not launched", hardware=hardware)
    else:
        result = _result(req, ran, stream.close(), hardware)
    verdict = guard.verdict(req.attest_path if req.attest else None)
    result.integrity, result.tampered = verdict.report, verdict.summary
    result.integrity["sandbox"] = mode
    result.integrity["withheld_env"] = withheld
    result.runtime_knobs = verdict.runtime_knobs
    if result.status == "ok" and req.evaluate and not result.tampered and not cancel.is_set():
        _evaluate(req, mode, result, env, cancel)
    result.finished_at = time.time()
    return result


def check(req: RunRequest, command: str, timeout: float, cancel: threading.Event,
          gpu: str | None = None, log_name: str = "checks.log") -> CheckResult:
    """The checks command on a fresh copy of the candidate's tree, in the same box (gpu "":
    none visible)."""
    req.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    log = req.run_dir / log_name
    where: Path | None = None
    try:
        mode = sandbox.resolve(req.sandbox)
        where = _scratch(req.run_dir, "checks-", req.tree)
        mounts = place_data(req, where, mode)
        env, _ = _env(req, gpu)
        ran = spawn(mode, Launch.of(req, command, where, log, timeout, req.tree, mounts=mounts),
                    env, cancel, f"{req.experiment_id}-checks")
    except (OSError, OvernightError, ValueError) as e:
        return CheckResult(False, f"the checks could not run: {e}", log)
    finally:
        if where is not None:
            shutil.rmtree(where, ignore_errors=True)
    if ran.cancelled:
        return CheckResult(False, "interrupted (the loop was stopped)", log)
    if ran.timed_out:
        return CheckResult(False, f"`{command}` timed out after {timeout:g}s", log)
    if ran.returncode != 0:
        last = tail(log, 3).replace("\n", " | ")
        return CheckResult(False, f"`{command}` failed (exit {ran.returncode}): {last}", log)
    return CheckResult(True, "", log)


# -- the pieces ------------------------------------------------------------------------------


def _fresh(run_dir: Path) -> None:
    """A retry starts from a fresh directory; only the harness can read it."""
    if run_dir.exists() or run_dir.is_symlink():
        shutil.rmtree(run_dir) if run_dir.is_dir() and not run_dir.is_symlink() \
            else run_dir.unlink()
    run_dir.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    run_dir.mkdir(mode=0o700)


def place_data(req: RunRequest, cwd: Path, mode: str) -> list[tuple[str, str]]:
    """Make `[run] data` appear at its paths under `cwd`: a placeholder the box binds the
    source over, read-only (bwrap), or a link to it (user, none); (source, place) pairs."""
    mounts = []
    for rel, source in req.data:
        place = cwd / rel
        if place.exists() or place.is_symlink():
            raise OvernightError(f"[run] data {rel}: the commit has a file there; a dataset "
                                 "cannot replace committed files")
        if not os.path.exists(source):
            raise OvernightError(f"[run] data {rel}: {source} does not exist on this machine "
                                 "(every node that runs experiments needs the data at the same "
                                 "path)")
        place.parent.mkdir(parents=True, exist_ok=True)
        if mode == "bwrap":
            place.mkdir() if os.path.isdir(source) else place.touch()
        else:
            place.symlink_to(source)
        mounts.append((source, str(place)))
    return mounts


def _scratch(run_dir: Path, prefix: str, tree: Tree) -> Path:
    """A directory nobody could have prepared: a new, unguessable name, made by us."""
    where = Path(tempfile.mkdtemp(prefix=prefix, dir=run_dir))
    tree.write(where)
    return where


def _env(req: RunRequest, gpu: str | None) -> tuple[dict[str, str], list[str]]:
    env, withheld = sandbox.experiment_env(dict(os.environ), req.allow_env)
    env.update(req.env)
    env.update({
        "OVERNIGHT_BUDGET_SECONDS": f"{req.budget_seconds:g}",
        "OVERNIGHT_EXPERIMENT_ID": str(req.experiment_id),
        "OVERNIGHT_RUN_DIR": str(req.run_dir),
        "OVERNIGHT_ARTIFACTS": str(req.artifacts),
        "OVERNIGHT_SLOT": str(req.slot),
        "PYTHONUNBUFFERED": "1",  # so the log shows progress as it goes
        # `uv run` uses the repository's environment as it is: no new .venv in the work
        # tree, no sync, no network.
        "UV_NO_SYNC": "1", "UV_OFFLINE": "1", "UV_NO_CACHE": "1",
    })
    if req.project_venv:
        env["UV_PROJECT_ENVIRONMENT"] = str(req.project_venv)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env, withheld


def spawn(mode: str, launch: Launch, env: dict[str, str], cancel: threading.Event,
          label: str) -> process.Exit:
    """Run `launch` in the box `mode` gives ("bwrap", "user" or "none") to its end."""
    token = f"{os.getpid()}-{label}-{uuid.uuid4().hex}"
    env = {**env, process.RUN_TOKEN_ENV: token}
    launch.log.unlink(missing_ok=True)
    sink = process.LogSink(launch.log, launch.listeners)
    argv = ["/bin/sh", "-c", launch.command]
    fds: tuple[int, ...] = ()
    memfd = None
    term_leader = True
    extra_kill: Callable[[int], None] | None = None
    try:
        if mode == "bwrap":
            bw = sandbox.probe().bwrap
            assert bw is not None
            box = sandbox.Box(
                workdir=launch.cwd, writable=launch.writable,
                readable=[*sandbox.interpreter_paths(), *launch.readable],
                hidden=launch.hidden, readonly_files=launch.readonly_files,
                mounts=launch.mounts,
                devices=launch.devices, network=launch.network, tmp_bytes=launch.tmp_bytes)
            args = sandbox.bwrap_args(bw, box)
            if bw.has_args:  # any number of binds, whatever the command-line limit
                memfd = os.memfd_create("overnight-bwrap-args")
                os.write(memfd, b"".join(os.fsencode(a) + b"\0" for a in args))
                os.lseek(memfd, 0, os.SEEK_SET)
                fds = (memfd,)
                argv = [bw.path, "--args", str(memfd), "--", *argv]
            else:
                argv = [bw.path, *args, "--", *argv]
            term_leader = False  # TERM the experiment; bwrap's death would KILL it
        elif mode == "user":
            argv, env, extra_kill = user_box(launch, env, argv)
        with cgroups.PidsLimit(launch.max_processes) as limit:
            return process.spawn(limit.wrap(argv), launch.cwd, env, sink, launch.timeout,
                                 launch.grace, cancel, token=token, pass_fds=fds,
                                 term_leader=term_leader, extra_kill=extra_kill)
    finally:
        sink.close()
        if memfd is not None:
            os.close(memfd)


def user_box(launch: Launch, env: dict[str, str], argv: list[str]
             ) -> tuple[list[str], dict[str, str], Callable[[int], None]]:
    """Sandbox "user": the slot's own unprivileged uid, confined by Landlock where the kernel
    has it. Committed files stay root's and read-only, in sticky directories the run may add
    files to; its home and temporary directory are its own. Everything of the uid is killed
    at the end, whatever session or environment it gave itself."""
    uid, gid = uids.slot_ids(launch.slot)
    uids.kill_uid(uid)  # whatever a dead harness left running as this slot
    scratch = launch.log.parent / f".{launch.cwd.name}-user"
    home, tmp = scratch / "home", scratch / "tmp"
    for d in (home, tmp):
        d.mkdir(parents=True, exist_ok=True)
    launch.log.parent.chmod(0o711)  # the run's directory: traversable, not listable
    scratch.chmod(0o711)
    share_tree(launch.cwd, launch.readonly_files, None if launch.readonly_files else uid)
    for d in (*launch.writable, home, tmp):
        os.chown(d, uid, gid)
        os.chmod(d, 0o700)
    env = {**env, "HOME": str(home), "TMPDIR": str(tmp), "USER": f"overnight{launch.slot}"}
    abi = sandbox.landlock_abi()
    landlock = None
    if abi:
        readable = [*_confine.system_read_paths(), *map(str, sandbox.interpreter_paths()),
                    *map(str, launch.readable), *(source for source, _ in launch.mounts)]
        writable = [str(launch.cwd), *map(str, launch.writable), str(home), str(tmp),
                    *_confine.device_write_paths(), *launch.devices, "/dev/shm"]
        landlock = {"read": sorted({p for p in readable if os.path.exists(p)}),
                    "write": sorted({p for p in writable if os.path.exists(p)})}
    config = {"uid": uid, "gid": gid, "umask": 0o022, "cwd": str(launch.cwd),
              "rlimits": {"RLIMIT_CORE": 0}, "landlock": landlock}
    return _confine.argv(config, argv), env, lambda sig: uids.kill_uid(uid, sig)


def share_tree(root: Path, committed: list[str], owner: int | None = None) -> None:
    """Ready a tree for a run as another uid: committed files stay root's and read-only in
    sticky directories the run may add files to; or, with `owner`, everything is its own (a
    coding agent edits its checkout). Done before the integrity watch starts: a change of
    mode is not the run's doing. Idempotent."""
    if owner is None and os.stat(root).st_mode & 0o7777 == 0o1777:
        return
    keep = set(committed)
    for top, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(top, d))]
        if owner is not None:
            for name in [*dirs, *files]:
                os.lchown(os.path.join(top, name), owner, owner)
            os.chown(top, owner, owner)
            continue
        os.chmod(top, 0o1777)
        for name in files:
            path = os.path.join(top, name)
            if os.path.relpath(path, root) in keep and not os.path.islink(path):
                os.chmod(path, 0o555 if os.lstat(path).st_mode & 0o100 else 0o444)


def _result(req: RunRequest, ran: process.Exit, metrics: Metrics, hardware: str) -> RunResult:
    rc, reason = ran.returncode, ""
    if req.metrics_file:
        err = _metrics_file(req.workdir, req.metrics_file, metrics)
        if err and rc == 0:
            reason = err
    if ran.cancelled:
        status, reason = "lost", "interrupted (the loop was stopped)"
    elif ran.timed_out:
        status = "timeout"
        reason = f"killed after the {req.timeout_seconds:g}s timeout"
    elif rc != 0:
        status = "crash"
        reason = f"exit code {rc}" if rc is not None and rc >= 0 else f"killed by signal {-rc}"
    else:
        status = "ok"
    return RunResult(status=status, returncode=rc, started_at=ran.started,
                     finished_at=time.time(), metrics=metrics,
                     peak_rss_mb=ran.peak_mb or None, reason=reason, hardware=hardware,
                     exited_at=ran.exited)


def _metrics_file(workdir: Path, name: str, into: Metrics) -> str | None:
    """The JSON metrics file, only if it is a regular file inside the work tree."""
    path = workdir / name
    real = os.path.realpath(path)
    if not real.startswith(os.path.realpath(workdir) + os.sep):
        return f"metrics file {name} points outside the run directory: not read"
    try:
        return merge_json_file(Path(real), into, max_bytes=METRICS_FILE_MAX_BYTES)
    except UnsafeFile as e:
        return f"metrics file {name}: {e}"


def _stream(req: RunRequest) -> MetricStream:
    """The output's metrics as they stream; with [objective] pattern, the objective too."""
    if req.pattern and req.objective:
        return MetricStream(req.objective, re.compile(req.pattern))
    return MetricStream()


def _evaluate(req: RunRequest, mode: str, result: RunResult, env: dict[str, str],
              cancel: threading.Event) -> None:
    """The trusted evaluator decides the metrics: what the script printed is set aside. It
    runs from the baseline's tree in a fresh directory, the artifacts bound read-only."""
    tree = req.evaluate_tree or req.tree
    where = _scratch(req.run_dir, "eval-", tree)
    log = req.run_dir / "eval.log"
    stream = _stream(req)
    launch = Launch.of(req, req.evaluate or "", where, log, req.evaluate_timeout, tree,
                       listeners=[stream.feed], mounts=place_data(req, where, mode))
    launch.readable.append(req.artifacts)
    try:
        env = {k: v for k, v in env.items() if not k.startswith("OVERNIGHT_ATTEST")}
        _readonly(req.artifacts)
        ran = spawn(mode, launch, env, cancel, f"{req.experiment_id}-eval")
    finally:
        shutil.rmtree(where, ignore_errors=True)
    metrics = stream.close()
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


def _readonly(path: Path) -> None:
    """What the experiment left for the evaluator can no longer change (sandbox or not)."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                os.chmod(p, 0o444)
