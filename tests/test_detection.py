"""Detection where prevention cannot reach, through the real `overnight` CLI and real loops:
a rewritten ledger, a moved branch and a changed spec each stop the loop naming what
happened, and nothing recorded changes silently. Also the lifecycle of lost work."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from pathlib import Path

import pytest
from conftest import git, rows, spec_toml, train_py
from test_scheduler import HANG, Background, wait_for_hanging_candidate

TAG = "t"

# Experiments that attack the harness (no sandbox by default): at LEARNING_RATE 0.002 (the
# third experiment of the grid: baseline 0.001, then 0.0005, then 0.002, a would-be keep).
ATTACK = """\
attack = os.environ.get("TEST_ATTACK")
if attack and LEARNING_RATE == 0.002:
    import sqlite3
    import subprocess
    repo = os.environ["TEST_REPO"]
    if attack == "ledger":
        db = sqlite3.connect(os.path.join(repo, ".overnight", "ledger.sqlite"))
        db.execute("UPDATE experiments SET metric = 50 WHERE is_baseline = 1")
        db.commit()
    if attack == "branch":
        def g(*args):
            return subprocess.run(["git", "-C", repo, "-c", "user.name=x", "-c",
                                   "user.email=x@x", *args], capture_output=True, text=True,
                                  check=True).stdout.strip()
        evil = g("commit-tree", "HEAD^{tree}", "-p", "overnight/t", "-m", "unmeasured")
        g("update-ref", "refs/heads/overnight/t", evil)
        open(os.path.join(os.environ["TEST_OUT"], "evil"), "w").write(evil)
"""


@pytest.fixture
def repo(make_repo) -> Path:
    # Unboxed: detection is what covers the mode where prevention cannot reach (the boxed
    # default cannot even see the ledger or .git: test_hostile.py).
    unboxed = ('sandbox = "none"\nallow_env = ["TEST_ATTACK", "TEST_REPO", "TEST_OUT", '
               '"TEST_PIDS", "TEST_HANG"]')
    return make_repo({"train.py": train_py(0.001, ATTACK + HANG)},
                     spec_toml("grid", extra_run=unboxed))


@pytest.fixture
def background(cli_env: dict[str, str], tmp_path: Path):
    bg = Background(cli_env, tmp_path)
    yield bg
    bg.cleanup()


def ledger_path(repo: Path) -> Path:
    return repo / ".overnight" / "ledger.sqlite"


def sql(repo: Path, *statements: str) -> None:
    db = sqlite3.connect(ledger_path(repo))
    for statement in statements:
        db.execute(statement)
    db.commit()
    db.close()


def events(repo: Path, kind: str) -> list[str]:
    db = sqlite3.connect(ledger_path(repo))
    try:
        return [r[0] for r in db.execute("SELECT message FROM events WHERE kind = ? ORDER BY id",
                                         (kind,))]
    finally:
        db.close()


def branch(repo: Path) -> str:
    return git(repo, "rev-parse", f"overnight/{TAG}")


def last_keep(repo: Path) -> str:
    return [r for r in rows(repo, TAG) if r["status"] == "keep"][-1]["kept_commit"]


# -- the ledger ----------------------------------------------------------------------------


def test_a_metric_edited_between_runs_stops_status_and_run(repo: Path, cli):
    assert cli("run", "-t", TAG, "-n", "2", cwd=repo).returncode == 0
    sql(repo, "UPDATE experiments SET metric = 50 WHERE is_baseline = 1")
    before = rows(repo, TAG)

    status = cli("status", "-t", TAG, cwd=repo)
    assert status.returncode == 3, status.stderr
    assert "experiment #1: metric is 50.0" in status.stderr
    out = cli("run", "-t", TAG, "-n", "4", cwd=repo)
    assert out.returncode == 3, out.stderr
    assert "experiment #1: metric is 50.0" in out.stderr
    assert rows(repo, TAG) == before  # nothing ran, nothing was written


def test_an_experiment_that_rewrites_the_ledger_stops_the_loop(repo: Path, cli):
    out = cli("run", "-t", TAG, "-n", "5", cwd=repo, env={"TEST_ATTACK": "ledger",
                                                          "TEST_REPO": str(repo)})
    assert out.returncode == 3, out.stdout + out.stderr
    assert "experiment #1: metric is 50.0" in out.stderr
    rs = rows(repo, TAG)
    # The attacker's run is never judged against the forged baseline: never kept.
    attacker = next(r for r in rs if '"LEARNING_RATE": 0.002' in r["knobs"])
    assert attacker["status"] != "keep" and attacker["metric"] is None
    assert [r["status"] for r in rs if r["id"] < attacker["id"]] == ["keep", "discard"]
    assert len(rs) == 3
    assert branch(repo) == rs[0]["kept_commit"]


def test_a_deleted_journal_entry_stops_the_run(repo: Path, cli):
    assert cli("run", "-t", TAG, "-n", "2", cwd=repo).returncode == 0
    sql(repo, "DELETE FROM journal WHERE seq = 2")
    out = cli("run", "-t", TAG, "-n", "4", cwd=repo)
    assert out.returncode == 3
    assert "journal entry #2 is missing" in out.stderr


def test_a_consistently_rechained_ledger_does_not_match_the_head_in_git(repo: Path, cli):
    from overnight.ledger import GENESIS, _entry_hash

    assert cli("run", "-t", TAG, "-n", "2", cwd=repo).returncode == 0
    # The attacker rewrites the baseline's metric in the table and in the journal, and
    # recomputes every hash: a chain consistent in itself.
    db = sqlite3.connect(ledger_path(repo))
    db.execute("UPDATE experiments SET metric = 50 WHERE id = 1")
    entries = db.execute("SELECT seq, ts, op, payload FROM journal ORDER BY seq").fetchall()
    prev = GENESIS
    for seq, ts, op, payload in entries:
        data = json.loads(payload)
        if op == "update" and data["id"] == 1 and "metric" in data["set"]:
            data["set"]["metric"] = 50.0
            payload = json.dumps(data, sort_keys=True, separators=(",", ":"))
        digest = _entry_hash(prev, seq, ts, op, payload)
        db.execute("UPDATE journal SET payload = ?, prev = ?, hash = ? WHERE seq = ?",
                   (payload, prev, digest, seq))
        prev = digest
    db.commit()
    db.close()

    for command in (("status", "-t", TAG), ("run", "-t", TAG, "-n", "4")):
        out = cli(*command, cwd=repo)
        assert out.returncode == 3, out.stderr
        assert "does not match the head" in out.stderr and "ledger-head" in out.stderr
    assert len(rows(repo, TAG)) == 2


# -- the branch ------------------------------------------------------------------------------


def test_a_branch_moved_between_runs_is_reset_and_the_run_halts(repo: Path, cli):
    assert cli("run", "-t", TAG, "-n", "3", cwd=repo).returncode == 0
    kept = last_keep(repo)
    evil = git(repo, "commit-tree", f"{kept}^{{tree}}", "-p", kept, "-m", "unmeasured")
    git(repo, "update-ref", f"refs/heads/overnight/{TAG}", evil)
    before = rows(repo, TAG)

    out = cli("run", "-t", TAG, "-n", "5", cwd=repo)
    assert out.returncode == 3, out.stderr
    assert evil in out.stderr and "never recorded" in out.stderr
    assert branch(repo) == kept
    assert [r["status"] for r in rows(repo, TAG)] == [r["status"] for r in before]
    assert events(repo, "branch_reset") == [f"{evil} -> {kept}"]


def test_a_branch_moved_by_an_experiment_never_enters_the_history(repo: Path, cli,
                                                                    tmp_path: Path):
    out = cli("run", "-t", TAG, "-n", "6", cwd=repo,
              env={"TEST_ATTACK": "branch", "TEST_REPO": str(repo), "TEST_OUT": str(tmp_path)})
    assert out.returncode == 3, out.stdout + out.stderr
    evil = (tmp_path / "evil").read_text()
    assert evil in out.stderr
    rs = rows(repo, TAG)
    # It would have been kept (1.2 beats 1.3), but no keep is built on a moved branch.
    attacker = next(r for r in rs if '"LEARNING_RATE": 0.002' in r["knobs"])
    assert attacker["status"] == "lost" and "moved branch" in attacker["reason"]
    assert branch(repo) == rs[0]["kept_commit"]
    history = git(repo, "rev-list", f"overnight/{TAG}").split()
    assert evil not in history

    # The next run redoes the lost candidate on the real branch and keeps it.
    again = cli("run", "-t", TAG, "-n", "4", cwd=repo)
    assert again.returncode == 0, again.stderr
    assert evil not in git(repo, "rev-list", f"overnight/{TAG}").split()
    redo = next(r for r in rows(repo, TAG) if r["retry_of"] == attacker["id"])
    assert redo["status"] == "keep" and branch(repo) == last_keep(repo)


def test_a_branch_left_at_an_earlier_keep_by_a_crash_is_repaired(repo: Path, cli):
    assert cli("run", "-t", TAG, "-n", "3", cwd=repo).returncode == 0
    keeps = [r["kept_commit"] for r in rows(repo, TAG) if r["status"] == "keep"]
    assert len(keeps) == 2
    git(repo, "update-ref", f"refs/heads/overnight/{TAG}", keeps[0])  # ledger written, ref not
    out = cli("run", "-t", TAG, "-n", "4", cwd=repo)
    assert out.returncode == 0, out.stderr
    assert "moved back to the last recorded keep" in out.stdout
    assert branch(repo) == last_keep(repo)


# -- the spec ---------------------------------------------------------------------------------


def test_a_changed_command_is_refused_unless_accepted(repo: Path, cli):
    assert cli("run", "-t", TAG, "-n", "2", cwd=repo).returncode == 0
    spec = (repo / "overnight.toml").read_text()
    (repo / "overnight.toml").write_text(spec.replace(" train.py\"", " train.py --fast\""))
    before = rows(repo, TAG)

    out = cli("run", "-t", TAG, "-n", "3", cwd=repo)
    assert out.returncode == 2, out.stderr
    assert "run.command:" in out.stderr and "train.py --fast" in out.stderr
    assert rows(repo, TAG) == before

    out = cli("run", "-t", TAG, "-n", "3", "--accept-spec-change", cwd=repo)
    assert out.returncode == 0, out.stderr
    changes = events(repo, "spec_change")
    assert len(changes) == 1 and "run.command" in changes[0] and "--fast" in changes[0]
    # Accepted once, it is the new pin: the next run needs no flag.
    assert cli("run", "-t", TAG, "-n", "4", cwd=repo).returncode == 0


def test_a_budget_override_is_part_of_the_measurement(repo: Path, cli):
    assert cli("run", "-t", TAG, "-n", "2", "--budget", "3", cwd=repo).returncode == 0
    out = cli("run", "-t", TAG, "-n", "3", cwd=repo)
    assert out.returncode == 2
    assert "run.budget_seconds: 3.0 -> 5.0" in out.stderr
    assert cli("run", "-t", TAG, "-n", "3", "--budget", "3", cwd=repo).returncode == 0


def test_settings_that_do_not_measure_may_change_and_are_recorded(repo: Path, cli):
    assert cli("run", "-t", TAG, "-n", "2", cwd=repo).returncode == 0
    out = cli("run", "-t", TAG, "-n", "4", "--parallel", "2", cwd=repo)
    assert out.returncode == 0, out.stderr
    assert events(repo, "settings_change") == ["run.parallel: 1 -> 2"]


# -- lost work ---------------------------------------------------------------------------------


def interrupt(repo: Path, bg: Background, baseline: bool, **env: str) -> dict:
    proc = bg(repo, "-n", "3", **env)
    hung, _ = wait_for_hanging_candidate(repo, bg, baseline=baseline)
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=20) == 130
    return hung


def test_a_baseline_interrupted_four_times_still_runs(repo: Path, cli, background):
    for _ in range(4):
        interrupt(repo, background, baseline=True, TEST_HANG="all")
    assert [r["status"] for r in rows(repo, TAG)] == ["lost"] * 4
    out = cli("run", "-t", TAG, "-n", "3", cwd=repo)
    assert out.returncode == 0, out.stderr
    rs = rows(repo, TAG)
    # Each interrupted start was a failed start; a fresh baseline began the tag.
    assert rs[4]["is_baseline"] and rs[4]["status"] == "keep" and rs[4]["retry_of"] is None
    assert len([r for r in rs if r["status"] != "lost"]) == 3
    status = cli("status", "-t", TAG, cwd=repo).stdout
    assert "lost" not in status and "not started" not in status, status


def test_a_candidate_lost_three_times_is_given_up_and_reported(repo: Path, cli, background):
    hung = [interrupt(repo, background, baseline=False, TEST_HANG="candidates")
            for _ in range(3)]
    assert [h["commit_sha"] for h in hung] == [hung[0]["commit_sha"]] * 3

    out = cli("run", "-t", TAG, "-n", "3", cwd=repo)
    assert out.returncode == 0, out.stderr
    assert f"#{hung[-1]['id']} given up after 3 interruptions" in out.stdout
    rs = rows(repo, TAG)
    last = next(r for r in rs if r["id"] == hung[-1]["id"])
    assert last["status"] == "lost" and last["reason"].startswith("given up after 3")
    assert not [r for r in rs if r["retry_of"] == last["id"]]  # not redone a fourth time
    assert events(repo, "given_up") == [last["reason"]]

    status = cli("status", "-t", TAG, cwd=repo)
    assert status.returncode == 0, status.stderr
    assert "given up" in status.stdout and f"#{last['id']} given up after 3" in status.stdout
