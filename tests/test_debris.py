"""A failed start leaves no debris: no branch, no pin, nothing counted; its log and reason
stay, with advice that fits the cause; fixing it and running again just works."""

from __future__ import annotations

from pathlib import Path

from conftest import git, rows, spec_toml, train_py

from overnight.ledger import Ledger
from overnight.report import status_view
from overnight.spec import Objective


def _events(repo: Path, tag: str) -> list[str]:
    import sqlite3
    db = sqlite3.connect(repo / ".overnight" / "ledger.sqlite")
    try:
        return [k for (k,) in db.execute("SELECT kind FROM events WHERE tag = ?", (tag,))]
    finally:
        db.close()


def test_a_failed_start_leaves_no_branch_no_pin_and_running_again_works(make_repo, cli):
    broken = "import no_such_package_here\n" + train_py(0.001)
    repo = make_repo({"train.py": broken}, spec_toml("grid"))

    out = cli("run", "-t", "t", "-n", "3", cwd=repo)

    assert out.returncode == 2
    assert "cannot import no_such_package_here" in out.stderr
    assert git(repo, "branch", "--list", "overnight/t") == ""
    assert "spec" not in _events(repo, "t")
    status = cli("status", "-t", "t", cwd=repo)
    assert "not started: the baseline failed" in status.stdout
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
    counted = [r for r in rs if r["status"] in ("keep", "discard")]
    assert len(counted) == 3  # the failed start did not count
    assert git(repo, "rev-parse", "overnight/t") == [r for r in rs if r["status"] == "keep"][-1][
        "kept_commit"]


def test_advice_for_a_file_git_ignores(make_repo, cli):
    reads = "open('data/set/train.bin').read()\n" + train_py(0.001)
    repo = make_repo({"train.py": reads, ".gitignore": "data/set/\n"}, spec_toml("grid"))
    (repo / "data" / "set").mkdir(parents=True)
    (repo / "data" / "set" / "train.bin").write_text("x")
    out = cli("run", "-t", "t", "-n", "2", cwd=repo)
    assert out.returncode == 2
    assert 'add [run] data = ["data/set"]' in out.stderr, out.stderr


def test_advice_when_no_metric_is_printed(make_repo, cli):
    script = "LR = 0.1\nprint('step 10: train loss 2.2177, val loss 2.3790')\n"
    repo = make_repo({"train.py": script}, spec_toml("grid"))
    out = cli("run", "-t", "t", "-n", "2", cwd=repo)
    assert out.returncode == 2
    assert "printed no val_loss" in out.stderr and "[objective] pattern" in out.stderr
    assert "step 10: train loss 2.2177, val loss 2.3790" in out.stderr


def test_advice_on_a_timeout(make_repo, cli):
    slow = "import time\ntime.sleep(30)\n" + train_py(0.001)
    repo = make_repo({"train.py": slow}, spec_toml("grid", budget=1, timeout=2))
    out = cli("run", "-t", "t", "-n", "2", cwd=repo, timeout=60)
    assert out.returncode == 2
    assert "ran past timeout_seconds (2 s)" in out.stderr


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
        assert "running:" not in text
    finally:
        ledger.close()

