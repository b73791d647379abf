"""A failed start leaves no debris: no branch, no pin, nothing counted; its log and reason
stay, with advice that fits the cause; fixing it and running again just works. The same after
a Ctrl-C or a `kill -9` during the first baseline, and a baseline that has its number is never
thrown away."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path

import pytest
from conftest import CLI, alive, git, rows, spec_toml, train_py, wait_until

from overnight import pins
from overnight.executors.base import RunRequest, RunResult
from overnight.executors.local import LocalExecutor
from overnight.ledger import Ledger
from overnight.report import status_view
from overnight.scheduler import Loop
from overnight.spec import Objective, load_spec
from overnight.workspace import Workspace

UNBOXED = 'sandbox = "none"\nallow_env = ["TEST_MARK"]'
# With TEST_MARK set, the script writes its pid there and trains "forever".
HANGS = train_py(0.001, extra="""\
mark = os.environ.get("TEST_MARK")
if mark:
    with open(mark, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(300)
""")


def _events(repo: Path, tag: str) -> list[str]:
    db = sqlite3.connect(repo / ".overnight" / "ledger.sqlite")
    try:
        return [k for (k,) in db.execute("SELECT kind FROM events WHERE tag = ?", (tag,))]
    finally:
        db.close()


def _clean_tag(repo: Path, cli, tag: str = "t") -> None:
    """The tag as if no start had ever failed: status, export and the branch say so."""
    status = cli("status", "-t", tag, cwd=repo).stdout
    for debris in ("not started", "lost", "crash", "not counted", "running", "queued"):
        assert debris not in status, status
    exported = cli("export", "-t", tag, cwd=repo).stdout
    assert "crash" not in exported and exported.splitlines()[1].endswith("\tkeep\tbaseline")
    keeps = [r for r in rows(repo, tag) if r["status"] == "keep"]
    assert git(repo, "rev-parse", f"overnight/{tag}") == keeps[-1]["kept_commit"]


def test_a_failed_start_leaves_no_branch_no_pin_and_running_again_works(make_repo, cli):
    broken = "import no_such_package_here\n" + train_py(0.001)
    repo = make_repo({"train.py": broken}, spec_toml("grid"))

    out = cli("run", "-t", "t", "-n", "3", cwd=repo)

    assert out.returncode == 2
    assert "cannot import no_such_package_here" in out.stderr
    assert git(repo, "branch", "--list", "overnight/t") == ""
    assert "spec" not in _events(repo, "t")
    status = cli("status", "-t", "t", cwd=repo)
    assert "not started: the baseline failed (1 try)" in status.stdout
    assert "cannot import no_such_package_here" in status.stdout  # the reason, with its cause
    assert "running" not in status.stdout and "tag t: 0 runs" in status.stdout
    shown = cli("show", "1", cwd=repo)
    assert "ModuleNotFoundError" in shown.stdout  # the failed start keeps its log

    # Fix the script and change the spec: no --accept-spec-change, no new tag needed.
    (repo / "train.py").write_text(train_py(0.001))
    (repo / "overnight.toml").write_text(spec_toml("grid", budget=6))
    git(repo, "commit", "-qam", "fixed")
    again = cli("run", "-t", "t", "-n", "3", cwd=repo)
    assert again.returncode == 0, again.stdout + again.stderr
    rs = rows(repo, "t")
    assert rs[1]["is_baseline"] and rs[1]["commit_sha"] == git(repo, "rev-parse", "HEAD")
    counted = [r for r in rs if r["status"] in ("keep", "discard")]
    assert len(counted) == 3  # the failed start did not count
    _clean_tag(repo, cli)


def test_a_search_space_that_cannot_work_stops_before_any_row(make_repo, cli):
    repo = make_repo({"train.py": "lr = 0.1\nprint('val_loss: 1.0')\n"}, spec_toml("grid"))
    out = cli("run", "-t", "t", "-n", "2", cwd=repo)
    assert out.returncode == 2 and "no knobs found" in out.stderr
    assert rows(repo, "t") == []
    assert "queued" not in cli("status", "-t", "t", cwd=repo).stdout


def test_a_branch_the_ledger_did_not_make_is_refused_before_the_tag_begins(make_repo, cli):
    repo = make_repo({"train.py": "import sys\nsys.exit(3)\n" + train_py()}, spec_toml("grid"))
    assert cli("run", "-t", "t", "-n", "2", cwd=repo).returncode == 2  # a failed start
    git(repo, "branch", "overnight/t")
    (repo / "train.py").write_text(train_py())
    git(repo, "commit", "-qam", "fixed")
    out = cli("run", "-t", "t", "-n", "2", cwd=repo)
    assert out.returncode == 2
    assert "branch overnight/t exists but tag 't' has no measured baseline" in out.stderr
    assert git(repo, "rev-parse", "overnight/t") == git(repo, "rev-parse", "HEAD~1")


def test_a_pin_left_without_a_measured_baseline_binds_nothing(make_repo, cli):
    """A start that died between pinning and recording its baseline (or an older overnight
    that pinned at start) left a pin: the fixed spec runs without --accept-spec-change, and
    the tag is then pinned to what its baseline really measured."""
    repo = make_repo({"train.py": train_py()}, spec_toml("grid", timeout=10))
    ws = Workspace.open(repo)
    ledger = ws.ledger()
    try:
        pins.pin_spec(ledger, "t", ws.spec.model_copy(update={
            "run": ws.spec.run.model_copy(update={"command": "python3 train.py"})}))
    finally:
        ledger.close()

    out = cli("run", "-t", "t", "-n", "2", cwd=repo)
    assert out.returncode == 0, out.stderr
    ledger = ws.ledger()
    try:
        assert pins.pinned_spec(ledger, "t") == pins.spec_record(load_spec(repo))
    finally:
        ledger.close()
    (repo / "overnight.toml").write_text(spec_toml("grid", timeout=11))
    git(repo, "commit", "-qam", "measure differently")
    refused = cli("run", "-t", "t", "-n", "3", cwd=repo)
    assert refused.returncode == 2 and "run.timeout_seconds: 10" in refused.stderr


def _start(repo: Path, env: dict[str, str], mark: Path) -> tuple[subprocess.Popen, int]:
    """`overnight run` in the background, once its baseline is training (its pid)."""
    proc = subprocess.Popen([*CLI, "run", "-t", "t", "-n", "3"], cwd=repo,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**env, "TEST_MARK": str(mark)})
    wait_until(lambda: mark.exists() and mark.read_text(), 20, "the baseline to start")
    return proc, int(mark.read_text())


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL])
def test_a_first_baseline_stopped_by_ctrl_c_or_kill_9_leaves_no_debris(
        make_repo, cli, cli_env, tmp_path: Path, stop: signal.Signals):
    repo = make_repo({"train.py": HANGS}, spec_toml("grid", extra_run=UNBOXED))
    proc, pid = _start(repo, cli_env, tmp_path / "mark")
    os.kill(proc.pid, stop)
    assert proc.wait(timeout=20) == (130 if stop == signal.SIGINT else -signal.SIGKILL)

    assert git(repo, "branch", "--list", "overnight/t") == ""
    assert "spec" not in _events(repo, "t")
    status = cli("status", "-t", "t", cwd=repo).stdout
    if stop == signal.SIGINT:
        assert "not started: the baseline was interrupted (1 try)" in status, status
        assert "running" not in status and "queued" not in status

    # Change the script and what it measures; the same command starts a fresh baseline.
    (repo / "train.py").write_text(HANGS.replace("0.001", "0.002"))
    (repo / "overnight.toml").write_text(spec_toml("grid", timeout=12, extra_run=UNBOXED))
    git(repo, "commit", "-qam", "a better start")
    out = cli("run", "-t", "t", "-n", "3", cwd=repo)
    assert out.returncode == 0, out.stderr
    wait_until(lambda: not alive(pid), 5, "the orphaned baseline to be killed")
    rs = rows(repo, "t")
    assert rs[0]["status"] == "lost"
    assert (rs[1]["is_baseline"], rs[1]["status"], rs[1]["retry_of"]) == (1, "keep", None)
    assert rs[1]["commit_sha"] == git(repo, "rev-parse", "HEAD")
    assert rs[1]["metric"] == pytest.approx(1.2)  # the new script, not the interrupted one
    assert len([r for r in rs if r["status"] != "lost"]) == 3
    _clean_tag(repo, cli)


class _FinishesFirst(LocalExecutor):
    """The real local executor, whose submit returns once the run has ended: a stop that
    comes next comes after the run finished and before the loop recorded it."""

    def submit(self, request: RunRequest) -> Future[RunResult]:
        fut = super().submit(request)
        fut.result()
        return fut


class _CtrlCAtStart:
    def started(self, row) -> None:  # noqa: ANN001
        raise KeyboardInterrupt

    def finished(self, row, best, done) -> None:  # noqa: ANN001
        pass

    def note(self, text: str) -> None:
        pass


def test_a_baseline_that_finished_before_ctrl_c_keeps_its_number(make_repo):
    repo = make_repo({"train.py": train_py(0.001)}, spec_toml("grid"))
    ws = Workspace.open(repo)
    ledger = ws.ledger()
    executor = _FinishesFirst(1)
    try:
        outcome = Loop(ws.repo, ws.spec, ledger, executor, "t", lambda files: None,
                       max_experiments=3, reporter=_CtrlCAtStart()).run()
        assert outcome.interrupted
        base = ledger.get(1)
        assert (base.status, base.metric) == ("keep", pytest.approx(1.3))
        assert pins.pinned_spec(ledger, "t") == pins.spec_record(ws.spec)
    finally:
        executor.shutdown()
        ledger.close()
    assert git(repo, "rev-parse", "overnight/t") == git(repo, "rev-parse", "HEAD")


def test_status_never_shows_a_queued_row_as_running(tmp_path: Path):
    ledger = Ledger(tmp_path / "ledger.sqlite", head=tmp_path / "head")
    try:
        ledger.insert("t", "queued", is_baseline=1, commit_sha="c" * 40, description="baseline",
                      proposer="baseline")
        lost = ledger.mark_lost("t", "the process running it stopped")
        assert [r.id for r in lost] == [1]
        row = ledger.get(1)
        assert row.status == "lost" and row.reason == "never started: the loop stopped first"
        ledger.insert("t", "queued", is_baseline=1, commit_sha="c" * 40, description="baseline",
                      proposer="baseline")
        from rich.console import Console
        console = Console(record=True, width=200)
        console.print(status_view(ledger, "t", Objective(metric="val_loss")))
        text = console.export_text()
        assert "queued (waiting for a slot, not running):\n    #2 baseline" in text, text
        assert "a fresh baseline is on its way (1 try before it)" in text
        assert "running:" not in text
    finally:
        ledger.close()


# -- advice that fits the cause: one end-to-end run each ----------------------------------------

def test_advice_for_an_interpreter_without_the_module(make_repo, cli, tmp_path: Path):
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    path = f"{bare / 'bin'}:/usr/bin:/bin"  # the run's PATH: its `python` imports nothing
    spec = spec_toml("grid", extra_run=f'sandbox = "none"\nenv = {{ PATH = "{path}" }}')
    spec = spec.replace(f'command = "{sys.executable} train.py"', 'command = "python train.py"')
    repo = make_repo({"train.py": "import rich\n" + train_py()}, spec)
    out = cli("run", "-t", "t", "-n", "2", cwd=repo)
    assert out.returncode == 2
    assert f"`python` is {bare / 'bin' / 'python'} in the run's environment" in out.stderr
    assert f'command = "{sys.executable} train.py"' in out.stderr, out.stderr
    assert "prints `val_loss: <number>`" not in out.stderr


def test_advice_when_the_command_s_program_is_not_there(make_repo, cli):
    spec = spec_toml("grid", extra_run='env = { PATH = "/nonexistent" }')
    spec = spec.replace(f'command = "{sys.executable} train.py"', 'command = "python train.py"')
    repo = make_repo({"train.py": train_py()}, spec)
    out = cli("run", "-t", "t", "-n", "2", cwd=repo)
    assert out.returncode == 2
    assert "found no `python` on its PATH" in out.stderr
    assert f'command = "{sys.executable} train.py"' in out.stderr, out.stderr


def test_advice_for_a_file_git_ignores(make_repo, cli):
    reads = "open('data/set/train.bin').read()\n" + train_py(0.001)
    repo = make_repo({"train.py": reads, ".gitignore": "data/set/\n"}, spec_toml("grid"))
    (repo / "data" / "set").mkdir(parents=True)
    (repo / "data" / "set" / "train.bin").write_text("x")
    out = cli("run", "-t", "t", "-n", "2", cwd=repo)
    assert out.returncode == 2
    assert 'add [run] data = ["data/set"]' in out.stderr, out.stderr
    assert 'add [run] data = ["data/set"]' in cli("status", "-t", "t", cwd=repo).stdout


def test_advice_when_no_metric_is_printed(make_repo, cli):
    script = "LR = 0.1\nprint('step 10: train loss 2.2177, val loss 2.3790')\n"
    repo = make_repo({"train.py": script}, spec_toml("grid"))
    out = cli("run", "-t", "t", "-n", "2", cwd=repo)
    assert out.returncode == 2
    assert "printed no val_loss" in out.stderr and "[objective] pattern = 'val loss" in out.stderr
    assert "step 10: train loss 2.2177, val loss 2.3790" in out.stderr


def test_advice_on_a_timeout(make_repo, cli):
    slow = "import time\ntime.sleep(30)\n" + train_py(0.001)
    repo = make_repo({"train.py": slow}, spec_toml("grid", budget=1, timeout=2))
    out = cli("run", "-t", "t", "-n", "2", cwd=repo, timeout=60)
    assert out.returncode == 2
    assert "ran past timeout_seconds (2 s)" in out.stderr
