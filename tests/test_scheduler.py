"""The loop through the real `overnight run`: keeps, discards, refs, parallel slots, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import CLI, alive, git, rows, spec_toml, train_py, wait_until

TAG = "t"

# Written into train.py: with TEST_PIDS set, record our pid and a child's. TEST_HANG=candidates
# makes every candidate (not the baseline, LEARNING_RATE 0.001) hang as if training forever;
# TEST_HANG=all makes the baseline hang too.
HANG = """\
pids = os.environ.get("TEST_PIDS")
if pids:
    import subprocess
    child = subprocess.Popen(["sleep", "300"])
    with open(os.path.join(pids, os.environ["OVERNIGHT_EXPERIMENT_ID"]), "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    hang = os.environ.get("TEST_HANG")
    if hang == "all" or (hang == "candidates" and LEARNING_RATE != 0.001):
        time.sleep(300)
    child.kill()
"""


# The workload reports its pids to the test through a shared directory: unboxed runs (the
# boxed equivalents are in test_hostile.py).
UNBOXED = 'sandbox = "none"\nallow_env = ["TEST_PIDS", "TEST_HANG"]'


def statuses(repo: Path) -> list[str]:
    return [r["status"] for r in rows(repo, TAG)]


def assert_git_agrees_with_ledger(repo: Path) -> None:
    """The branch tip is the last keep; exactly one ref per experiment with a commit."""
    rs = rows(repo, TAG)
    keeps = [r for r in rs if r["status"] == "keep"]
    assert keeps, "no keep at all: the baseline should be one"
    assert git(repo, "rev-parse", f"overnight/{TAG}") == keeps[-1]["kept_commit"]
    refs = dict(
        line.split(" ")
        for line in git(repo, "for-each-ref", "--format=%(refname) %(objectname)",
                        f"refs/overnight/{TAG}/").splitlines()
    )
    expected = {f"refs/overnight/{TAG}/{r['id']}": r["commit_sha"] for r in rs if r["commit_sha"]}
    assert refs == expected


def snapshot_user_state(repo: Path) -> dict[str, object]:
    """What the user would notice changing: HEAD, branch, index, status and file bytes."""
    files = {
        str(p.relative_to(repo)): p.read_bytes()
        for p in sorted(repo.rglob("*"))
        if p.is_file() and ".git" not in p.parts and ".overnight" not in p.parts
    }
    return {
        "head": git(repo, "rev-parse", "HEAD"),
        "branch": git(repo, "symbolic-ref", "HEAD"),
        "index": git(repo, "ls-files", "-s"),
        "staged": git(repo, "diff", "--cached"),
        "status": git(repo, "status", "--porcelain", "--untracked-files=all"),
        "files": files,
    }


class Background:
    """`overnight run` started in the background, in its own session so nothing leaks."""

    def __init__(self, env: dict[str, str], tmp: Path):
        self.env = env
        self.tmp = tmp
        self.pids_dir = tmp / "pids"  # where the workload writes "<pid> <child pid>"
        self.pids_dir.mkdir()
        self.started: list[subprocess.Popen] = []

    def __call__(self, repo: Path, *args: str, **env: str) -> subprocess.Popen:
        with open(self.tmp / f"bg{len(self.started)}.out", "w") as out:
            proc = subprocess.Popen(
                [*CLI, "run", "-t", TAG, *args], cwd=repo, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
                env={**self.env, "TEST_PIDS": str(self.pids_dir), **env},
            )
        self.started.append(proc)
        return proc

    def output(self) -> str:
        return (self.tmp / f"bg{len(self.started) - 1}.out").read_text()

    def cleanup(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for f in self.pids_dir.iterdir():
            for pid in map(int, f.read_text().split()):
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def background(cli_env: dict[str, str], tmp_path: Path):
    """background(repo, "-n", "3", TEST_HANG="all") -> a running `overnight run` (Popen)."""
    bg = Background(cli_env, tmp_path)
    yield bg
    bg.cleanup()


def wait_for_hanging_candidate(repo: Path, bg: Background,
                               baseline: bool = False) -> tuple[dict, list[int]]:
    """The first candidate (or baseline) row that is `running`, once its script has started."""
    pids_dir = bg.pids_dir

    def ready() -> tuple[dict, list[int]] | None:
        if bg.started[-1].poll() is not None:
            raise AssertionError(f"`overnight run` exited early:\n{bg.output()}")
        for r in rows(repo, TAG):
            f = pids_dir / str(r["id"])
            if r["status"] == "running" and bool(r["is_baseline"]) == baseline and f.exists():
                text = f.read_text().split()
                if len(text) == 2:
                    return r, [int(p) for p in text]
        return None

    return wait_until(ready, 20, "a candidate to be running")  # type: ignore[return-value]


# -- the main path ---------------------------------------------------------------------------


def test_keeps_and_discards_land_on_the_branch_and_nothing_else_moves(make_repo, cli):
    repo = make_repo({"train.py": train_py(0.001), "README.md": "# notes\n",
                      "other.txt": "v1\n"}, spec_toml("grid"))
    # The user keeps working meanwhile: unrelated edits, a staged change, an untracked file.
    (repo / "README.md").write_text("# notes\nedited, not committed\n")
    (repo / "other.txt").write_text("v2 staged\n")
    git(repo, "add", "other.txt")
    (repo / "scratch.txt").write_text("untracked\n")
    before = snapshot_user_state(repo)

    out = cli("run", "-t", TAG, "-n", "20", cwd=repo)
    assert out.returncode == 0, out.stderr
    assert "the proposer has nothing new to try" in out.stdout

    # val_loss = 1 + 100 |lr - 0.004|: the grid walks 0.001 -> 0.002 -> 0.004.
    rs = rows(repo, TAG)
    seen = [(r["status"], r["knobs"], r["metric"]) for r in rs]
    assert seen == [
        ("keep", '{"LEARNING_RATE": 0.001}', pytest.approx(1.3)),
        ("discard", '{"LEARNING_RATE": 0.0005}', pytest.approx(1.35)),
        ("keep", '{"LEARNING_RATE": 0.002}', pytest.approx(1.2)),
        ("keep", '{"LEARNING_RATE": 0.004}', pytest.approx(1.0)),
        ("discard", '{"LEARNING_RATE": 0.008}', pytest.approx(1.4)),
    ]
    assert rs[0]["is_baseline"] and rs[0]["commit_sha"] == before["head"]

    # One commit per kept change, newest first, each with the metric delta in its message.
    log = git(repo, "log", "--format=%H %s", f"{before['head']}..overnight/{TAG}").splitlines()
    assert len(log) == 2
    assert [line.split(" ", 1)[1] for line in log] == [
        "val_loss 1.200000 -> 1.000000 (+16.67%): LEARNING_RATE 0.002 -> 0.004",
        "val_loss 1.300000 -> 1.200000 (+7.69%): LEARNING_RATE 0.001 -> 0.002",
    ]
    assert [line.split()[0] for line in log] == [rs[3]["kept_commit"], rs[2]["kept_commit"]]
    tip_train = git(repo, "show", f"overnight/{TAG}:train.py")
    assert "LEARNING_RATE = 0.004" in tip_train
    # The kept commit holds exactly the tree that was measured.
    for r in (rs[2], rs[3]):
        assert git(repo, "rev-parse", f"{r['kept_commit']}^{{tree}}") == \
            git(repo, "rev-parse", f"{r['commit_sha']}^{{tree}}")
    # Discarded candidates stay reachable, but not from the branch.
    for r in (rs[1], rs[4]):
        merged = subprocess.run(["git", "merge-base", "--is-ancestor", r["commit_sha"],
                                 f"overnight/{TAG}"], cwd=repo, check=False)
        assert merged.returncode == 1
    assert_git_agrees_with_ledger(repo)
    # Logs always stay; work trees only for keeps ([run] keep_workdirs = "kept").
    for r in rs:
        assert "val_loss:" in Path(r["log_path"]).read_text()
        assert (Path(r["run_dir"]) / "work").exists() == (r["status"] == "keep")

    assert snapshot_user_state(repo) == before


def test_max_experiments_is_respected_and_a_rerun_tops_up(make_repo, cli):
    repo = make_repo({"train.py": train_py(0.001)}, spec_toml("perturb"))
    out = cli("run", "-t", TAG, "-n", "4", cwd=repo)
    assert out.returncode == 0, out.stderr
    assert "reached 4 runs" in out.stdout
    assert len(rows(repo, TAG)) == 4

    out = cli("run", "-t", TAG, "-n", "6", cwd=repo)  # the baseline is not redone
    assert out.returncode == 0, out.stderr
    rs = rows(repo, TAG)
    assert len(rs) == 6
    assert sum(r["is_baseline"] for r in rs) == 1
    assert len({r["knobs"] for r in rs}) == 6  # nothing was tried twice
    assert_git_agrees_with_ledger(repo)

    out = cli("run", "-t", TAG, "-n", "6", cwd=repo)  # already done: nothing more runs
    assert out.returncode == 0, out.stderr
    assert len(rows(repo, TAG)) == 6


def test_parallel_two_runs_two_at_once(make_repo, cli):
    repo = make_repo({"train.py": train_py(0.001, "time.sleep(1.0)")}, spec_toml("perturb"))
    out = cli("run", "-t", TAG, "-n", "3", "--parallel", "2", cwd=repo)
    assert out.returncode == 0, out.stderr
    base, a, b = rows(repo, TAG)
    # Nothing is proposed before the baseline has a number...
    assert base["finished_at"] <= min(a["started_at"], b["started_at"])
    # ...then both slots run at the same time.
    assert {a["slot"], b["slot"]} == {0, 1}
    assert max(a["started_at"], b["started_at"]) < min(a["finished_at"], b["finished_at"])
    assert {a["status"], b["status"]} <= {"keep", "discard"}


def test_nan_and_missing_metrics_are_crashes_and_never_kept(make_repo, cli):
    extra = ("if LEARNING_RATE > 0.0015:\n    loss = float('nan')\n"
             "if LEARNING_RATE < 0.0009:\n    sys.exit(0)\n")
    repo = make_repo({"train.py": train_py(0.001, extra)}, spec_toml("grid"))
    out = cli("run", "-t", TAG, "-n", "3", cwd=repo)
    assert out.returncode == 0, out.stderr
    base, low, high = rows(repo, TAG)
    assert (low["knobs"], low["status"]) == ('{"LEARNING_RATE": 0.0005}', "crash")
    assert "no val_loss in the output" in low["reason"]
    assert (high["knobs"], high["status"]) == ('{"LEARNING_RATE": 0.002}', "crash")
    assert "val_loss is nan" in high["reason"]
    assert high["metric"] is None
    assert git(repo, "rev-parse", f"overnight/{TAG}") == base["commit_sha"]


def test_a_candidate_past_its_timeout_is_recorded_as_timeout(make_repo, cli):
    extra = "if LEARNING_RATE != 0.001:\n    time.sleep(300)\n"
    repo = make_repo({"train.py": train_py(0.001, extra)},
                     spec_toml("grid", budget=0.5, timeout=1, grace=0.2))
    t0 = time.monotonic()
    out = cli("run", "-t", TAG, "-n", "2", cwd=repo)
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - t0 < 15
    assert statuses(repo) == ["keep", "timeout"]
    assert "timeout" in rows(repo, TAG)[1]["reason"]


# -- stops and resumes ---------------------------------------------------------------------


def test_kill_9_mid_experiment_then_resume_redoes_the_lost_work_once(make_repo, cli,
                                                                     background):
    repo = make_repo({"train.py": train_py(0.001, HANG)}, spec_toml("grid", extra_run=UNBOXED))
    proc = background(repo, "-n", "4", TEST_HANG="candidates")
    hung, pids = wait_for_hanging_candidate(repo, background)

    # One loop per tag: a second `overnight run` refuses while the first is alive.
    second = cli("run", "-t", TAG, "-n", "4", cwd=repo, timeout=20)
    assert second.returncode == 2
    assert "another `overnight run`" in second.stderr

    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    # A dead loop records nothing; its experiment keeps running in its own session, as a
    # real orphaned training run would (holding its GPU). The resumed loop kills it.
    assert rows(repo, TAG)[-1]["status"] == "running"
    assert all(alive(pid) for pid in pids)

    out = cli("run", "-t", TAG, "-n", "4", cwd=repo)
    assert out.returncode == 0, out.stderr
    assert "resuming" in out.stdout
    assert "killed" in out.stdout and "orphaned" in out.stdout
    assert not any(alive(pid) for pid in pids)
    rs = rows(repo, TAG)
    lost = [r for r in rs if r["status"] == "lost"]
    assert [r["id"] for r in lost] == [hung["id"]]
    redo = [r for r in rs if r["retry_of"] == hung["id"]]
    assert len(redo) == 1, "the lost experiment must be redone exactly once"
    assert redo[0]["commit_sha"] == hung["commit_sha"]
    assert redo[0]["status"] in ("keep", "discard")
    counted = [r for r in rs if r["status"] != "lost"]
    assert len(counted) == 4
    assert len({r["commit_sha"] for r in counted}) == 4  # nothing ran twice
    assert_git_agrees_with_ledger(repo)


def test_kill_9_during_the_baseline_then_resume(make_repo, cli, background):
    repo = make_repo({"train.py": train_py(0.001, HANG)}, spec_toml("grid", extra_run=UNBOXED))
    proc = background(repo, "-n", "3", TEST_HANG="all")
    hung, pids = wait_for_hanging_candidate(repo, background, baseline=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    # The orphaned baseline is left running here: the resumed loop must cope with it.

    out = cli("run", "-t", TAG, "-n", "3", cwd=repo)
    assert out.returncode == 0, out.stderr
    rs = rows(repo, TAG)
    # The lost baseline was a failed start: a fresh baseline (from HEAD) began the tag.
    assert [(r["status"], r["is_baseline"], r["retry_of"]) for r in rs[:2]] == [
        ("lost", 1, None), ("keep", 1, None)]
    assert rs[1]["commit_sha"] == hung["commit_sha"]
    assert rs[1]["metric"] == pytest.approx(1.3)
    assert len([r for r in rs if r["status"] != "lost"]) == 3
    assert all(r["parent"] == hung["commit_sha"] for r in rs[2:])
    assert_git_agrees_with_ledger(repo)


def test_ctrl_c_stops_promptly_kills_the_experiment_and_resumes(make_repo, cli, background):
    repo = make_repo({"train.py": train_py(0.001, HANG)},
                     spec_toml("grid", grace=1, extra_run=UNBOXED))
    proc = background(repo, "-n", "3", TEST_HANG="candidates")
    hung, pids = wait_for_hanging_candidate(repo, background)

    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=10) == 130
    assert time.monotonic() - t0 < 1 + 3  # grace plus a little
    for pid in pids:  # the script and the child it started
        wait_until(lambda pid=pid: not alive(pid), 2, f"experiment process {pid} to be gone")
    row = next(r for r in rows(repo, TAG) if r["id"] == hung["id"])
    assert row["status"] == "lost"
    assert "interrupted" in row["reason"]
    assert not [r for r in rows(repo, TAG) if r["status"] in ("queued", "running")]

    out = cli("run", "-t", TAG, "-n", "3", cwd=repo)
    assert out.returncode == 0, out.stderr
    rs = rows(repo, TAG)
    redo = [r for r in rs if r["retry_of"] == hung["id"]]
    assert len(redo) == 1 and redo[0]["commit_sha"] == hung["commit_sha"]
    assert len([r for r in rs if r["status"] != "lost"]) == 3
    assert_git_agrees_with_ledger(repo)


def test_ctrl_c_with_two_slots_loses_both_and_redoes_each_once(make_repo, cli, background):
    repo = make_repo({"train.py": train_py(0.001, HANG)},
                     spec_toml("perturb", grace=1, extra_run=UNBOXED))
    proc = background(repo, "-n", "4", "--parallel", "2", TEST_HANG="candidates")

    def two_running() -> list[dict] | None:
        running = [r for r in rows(repo, TAG) if r["status"] == "running"
                   and (background.pids_dir / str(r["id"])).exists()]
        return running if len(running) == 2 else None

    hung = wait_until(two_running, 20, "two candidates to be running")
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=10) == 130
    for r in hung:
        for pid in map(int, (background.pids_dir / str(r["id"])).read_text().split()):
            wait_until(lambda pid=pid: not alive(pid), 2, f"process {pid} to be gone")
    assert {r["status"] for r in rows(repo, TAG) if r["id"] in {h["id"] for h in hung}} == {
        "lost"}

    out = cli("run", "-t", TAG, "-n", "4", "--parallel", "2", cwd=repo)
    assert out.returncode == 0, out.stderr
    rs = rows(repo, TAG)
    for h in hung:
        redo = [r for r in rs if r["retry_of"] == h["id"]]
        assert len(redo) == 1 and redo[0]["commit_sha"] == h["commit_sha"]
    assert len([r for r in rs if r["status"] != "lost"]) == 4
    assert_git_agrees_with_ledger(repo)


def test_sigterm_is_handled_like_ctrl_c(make_repo, background):
    repo = make_repo({"train.py": train_py(0.001, HANG)},
                     spec_toml("grid", grace=1, extra_run=UNBOXED))
    proc = background(repo, "-n", "3", TEST_HANG="candidates")
    hung, pids = wait_for_hanging_candidate(repo, background)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=10) == 130
    for pid in pids:
        wait_until(lambda pid=pid: not alive(pid), 2, f"experiment process {pid} to be gone")
    assert next(r for r in rows(repo, TAG) if r["id"] == hung["id"])["status"] == "lost"
