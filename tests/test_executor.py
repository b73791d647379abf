"""LocalExecutor on real commits: real subprocesses, process groups, logs, timeouts, memory."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import PYTHON, alive, git, wait_until

from overnight import judge
from overnight.executors.base import RunRequest, RunResult
from overnight.executors.local import LocalExecutor
from overnight.snapshot import Repo
from overnight.spec import Objective

OBJECTIVE = Objective(metric="val_loss", direction="lower")
SLACK = 2.5  # seconds allowed on top of the timeout and grace on a loaded 2-core machine


class Bench:
    """One committed script, run by a real LocalExecutor."""

    def __init__(self, repo: Path, slots: int = 1):
        self.repo = Repo(repo)
        self.commit = git(repo, "rev-parse", "HEAD")
        self.executor = LocalExecutor(slots)
        self.runs = repo.parent / f"{repo.name}-runs"

    def request(self, experiment_id: int = 1, timeout: float = 20, grace: float = 0.5,
                budget: float = 5, slot: int = 0, env: dict[str, str] | None = None,
                metrics_file: str | None = None) -> RunRequest:
        return RunRequest(
            experiment_id=experiment_id, tree=self.repo.tree(self.commit), sandbox="none",
            run_dir=self.runs / str(experiment_id), command=f"{PYTHON} train.py",
            env=env or {}, budget_seconds=budget, timeout_seconds=timeout,
            kill_grace_seconds=grace, slot=slot, metrics_file=metrics_file,
        )

    def run(self, req: RunRequest | None = None, wait: float = 30) -> RunResult:
        return self.executor.submit(req or self.request()).result(timeout=wait)


@pytest.fixture
def bench(make_repo: Callable[..., Path]):
    made: list[Bench] = []

    def make(script: str, slots: int = 1) -> Bench:
        b = Bench(make_repo({"train.py": script}), slots)
        made.append(b)
        return b

    yield make
    for b in made:
        b.executor.cancel_all()
        b.executor.shutdown()


def decide(result: RunResult) -> judge.Decision:
    return judge.Judge(OBJECTIVE).baseline(judge.outcome(result, OBJECTIVE.metric))


def pid_file(req: RunRequest, name: str = "pid") -> int:
    return int((req.workdir / name).read_text())


# -- outcomes ------------------------------------------------------------------


def test_exit_zero_parses_both_metric_formats(bench):
    b = bench(
        "import sys\n"
        "print('step 1 of 1')\n"
        "print('val_loss: 0.8125')\n"
        "print('METRIC accuracy=0.93')\n"
        "print('tokens_per_second: 1.5e3')\n"
        "print('warning on stderr', file=sys.stderr)\n"
    )
    result = b.run()
    assert result.status == "ok"
    assert result.returncode == 0
    assert result.metrics.values == {"val_loss": 0.8125, "accuracy": 0.93,
                                     "tokens_per_second": 1500.0}
    assert result.finished_at >= result.started_at
    d = decide(result)
    assert (d.status, d.metric) == ("keep", 0.8125)


def test_log_file_holds_stdout_and_stderr(bench):
    b = bench("import sys\nprint('hello from stdout')\nprint('hello from stderr', "
              "file=sys.stderr)\nprint('val_loss: 1.0')\n")
    req = b.request()
    b.run(req)
    log = req.log_path.read_text()
    assert "hello from stdout" in log
    assert "hello from stderr" in log
    assert "val_loss: 1.0" in log


def test_nonzero_exit_is_a_crash_with_the_exit_code(bench):
    b = bench("import sys\nprint('val_loss: 0.5')\nsys.exit(3)\n")
    result = b.run()
    assert result.status == "crash"
    assert result.returncode == 3
    assert "exit code 3" in result.reason
    d = decide(result)
    assert d.status == "crash" and d.metric is None  # a printed number does not rescue it


def test_nan_objective_is_judged_a_crash(bench):
    b = bench("print('val_loss: nan')\n")
    result = b.run()
    assert result.status == "ok"  # the process itself was fine...
    assert "val_loss" not in result.metrics.values
    d = decide(result)
    assert d.status == "crash"  # ...but a NaN objective is never a number to compare
    assert d.metric is None
    assert "nan" in d.reason


def test_missing_metric_is_judged_a_crash(bench):
    b = bench("print('trained, but forgot to print the metric')\nprint('METRIC other=1')\n")
    result = b.run()
    d = decide(result)
    assert d.status == "crash"
    assert "no val_loss in the output" in d.reason


def test_metrics_file_is_read_from_the_work_tree(bench):
    b = bench("import json\njson.dump({'val_loss': 0.25, 'note': 'x'}, open('out.json', 'w'))\n")
    result = b.run(b.request(metrics_file="out.json"))
    assert result.metrics.values == {"val_loss": 0.25}


# -- timeouts and process trees -------------------------------------------------------


def test_timeout_kills_a_script_that_ignores_sigterm(bench):
    b = bench(
        "import os, signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "open('pid', 'w').write(str(os.getpid()))\n"
        "print('val_loss: 1.0', flush=True)\n"
        "time.sleep(300)\n"
    )
    req = b.request(timeout=1.0, grace=0.5)
    t0 = time.monotonic()
    result = b.run(req)
    elapsed = time.monotonic() - t0
    assert result.status == "timeout"
    assert "timeout" in result.reason
    assert elapsed < 1.0 + 0.5 + SLACK
    assert elapsed >= 1.0  # it was not cut short either
    pid = pid_file(req)
    wait_until(lambda: not alive(pid), 1, "the killed script to be gone")
    assert decide(result).status == "timeout"  # the metric it printed early does not count


def test_timeout_gives_the_script_its_grace_period_to_stop(bench):
    # SIGTERM first: a script that saves a checkpoint on TERM gets kill_grace_seconds to do it,
    # even though /bin/sh (its parent, the group leader) dies on the TERM at once.
    b = bench(
        "import signal, sys, time\n"
        "def stop(signum, frame):\n"
        "    time.sleep(0.3)\n"
        "    print('checkpoint saved', flush=True)\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('training', flush=True)\n"
        "time.sleep(300)\n"
    )
    req = b.request(timeout=1.0, grace=3.0)
    t0 = time.monotonic()
    result = b.run(req)
    assert result.status == "timeout"
    assert time.monotonic() - t0 < 1.0 + 3.0 + SLACK
    assert req.log_path.read_text().count("checkpoint saved") == 1  # one TERM, handled once


def test_children_that_outlive_the_script_are_killed(bench):
    b = bench(
        "import subprocess\n"
        "child = subprocess.Popen(['sleep', '300'])\n"
        "open('child', 'w').write(str(child.pid))\n"
        "print('val_loss: 1.0')\n"
    )
    req = b.request(timeout=20)
    t0 = time.monotonic()
    result = b.run(req)
    assert time.monotonic() - t0 < 5  # done when the script is done, not when `sleep` is
    assert result.status == "ok"
    child = pid_file(req, "child")
    wait_until(lambda: not alive(child), 1, "the child to be gone")


def test_children_in_their_own_session_are_killed(bench):
    b = bench(
        "import subprocess, time\n"
        "child = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
        "open('child', 'w').write(str(child.pid))\n"
        "print('val_loss: 1.0')\n"
    )
    req = b.request(timeout=20)
    result = b.run(req)
    assert result.status == "ok"
    child = pid_file(req, "child")
    wait_until(lambda: not alive(child), 1, "the child to be gone")


def test_double_forked_daemon_that_exits_at_once_is_killed(bench):
    # The classic daemon: fork, setsid, fork again, the middle process exits at once and the
    # script finishes right after. Nothing of it may survive the run.
    b = bench(
        "import os, time\n"
        "r, w = os.pipe()\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        os.write(w, str(os.getpid()).encode()); os.close(w)\n"
        "        time.sleep(300)\n"
        "    os._exit(0)\n"
        "os.close(w)\n"
        "open('daemon', 'w').write(os.read(r, 32).decode())\n"
        "print('val_loss: 1.0')\n"
    )
    req = b.request(timeout=20)
    t0 = time.monotonic()
    result = b.run(req)
    assert time.monotonic() - t0 < 5
    assert result.status == "ok"
    daemon = pid_file(req, "daemon")
    try:
        wait_until(lambda: not alive(daemon), 1, "the double-forked daemon to be gone")
    finally:
        if alive(daemon):
            os.kill(daemon, signal.SIGKILL)


def test_cancel_all_kills_the_group_and_reports_lost(bench):
    b = bench(
        "import os, subprocess, time\n"
        "child = subprocess.Popen(['sleep', '300'])\n"
        "open('pids', 'w').write(f'{os.getpid()} {child.pid}')\n"
        "time.sleep(300)\n"
    )
    req = b.request(timeout=60, grace=0.5)
    fut = b.executor.submit(req)
    pids_path = req.workdir / "pids"
    wait_until(lambda: pids_path.exists() and pids_path.read_text().count(" ") == 1, 10,
               "the script to start")
    b.executor.cancel_all()
    result = fut.result(timeout=5)
    assert result.status == "lost"
    for pid in map(int, pids_path.read_text().split()):
        wait_until(lambda pid=pid: not alive(pid), 1, f"process {pid} to be gone")


# -- resources and environment ------------------------------------------------------


def test_peak_memory_of_a_50mb_script_is_recorded(bench):
    b = bench(
        "import time\n"
        "block = b'x' * (50 * 2**20)  # written, so resident\n"
        "time.sleep(1.0)\n"
        "print('val_loss: 1.0', len(block) > 0)\n"
    )
    result = b.run()
    assert result.status == "ok"
    assert result.peak_rss_mb is not None
    assert 45 < result.peak_rss_mb < 1000


def test_each_slot_gets_its_budget_and_environment(bench):
    b = bench(
        "import os\n"
        "for k in ('OVERNIGHT_BUDGET_SECONDS', 'OVERNIGHT_SLOT', 'OVERNIGHT_EXPERIMENT_ID',\n"
        "          'EXTRA'):\n"
        "    print(f'{k}={os.environ.get(k)}')\n"
        "print('val_loss: 1.0')\n",
        slots=2,
    )
    reqs = [b.request(experiment_id=11, slot=0, budget=7, env={"EXTRA": "a"}),
            b.request(experiment_id=12, slot=1, budget=2.5, env={"EXTRA": "b"})]
    futures = [b.executor.submit(r) for r in reqs]
    for f in futures:
        assert f.result(timeout=30).status == "ok"
    first, second = (r.log_path.read_text().splitlines() for r in reqs)
    assert "OVERNIGHT_BUDGET_SECONDS=7" in first
    assert "OVERNIGHT_SLOT=0" in first
    assert "OVERNIGHT_EXPERIMENT_ID=11" in first
    assert "EXTRA=a" in first
    assert "OVERNIGHT_BUDGET_SECONDS=2.5" in second
    assert "OVERNIGHT_SLOT=1" in second
    assert "EXTRA=b" in second


def test_the_work_tree_is_the_commit_not_the_checkout(make_repo):
    repo = make_repo({"data.txt": "9.0\n",
                      "train.py": "print('val_loss:', open('data.txt').read().strip())\n"})
    (repo / "data.txt").write_text("1.0\n")  # the user's uncommitted edit
    b = Bench(repo)
    try:
        assert b.run().metrics.values == {"val_loss": 9.0}
    finally:
        b.executor.shutdown()
    assert (repo / "data.txt").read_text() == "1.0\n"


def test_the_work_tree_holds_every_committed_file_byte_for_byte(make_repo):
    # git archive would drop `export-ignore` files and rewrite `export-subst` ones; the run
    # must see exactly what was committed.
    repo = make_repo({
        ".gitattributes": "helper.py export-ignore\nversion.txt export-subst\n",
        "helper.py": "VALUE = 0.5\n",
        "version.txt": "$Format:%H$\n",
        "train.py": "from helper import VALUE\n"
                    "print('version', open('version.txt').read().strip())\n"
                    "print('val_loss:', VALUE)\n",
    })
    b = Bench(repo)
    try:
        req = b.request()
        result = b.run(req)
        assert result.status == "ok", req.log_path.read_text()
        assert result.metrics.values == {"val_loss": 0.5}
        for name in ("helper.py", "version.txt", "train.py", ".gitattributes"):
            assert (req.workdir / name).read_bytes() == (repo / name).read_bytes()
    finally:
        b.executor.shutdown()
