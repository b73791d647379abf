"""The linter story: something rewrites a constant between save and run. Every experiment it
touches is `tampered`, explained in one line, never kept; the loop halts with exit code 3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import create_repo, rows, spec_toml

from overnight.guard import RunGuard, attest_env
from overnight.snapshot import Repo

TAG = "t"

# SCALAR_LR sits on line 8; the script sleeps so that a rewrite can land mid-run.
TRAIN = """\
import os
import time

LEARNING_RATE = 0.001
PAUSE = 1.5
print("training", flush=True)

SCALAR_LR = 0.5
time.sleep(PAUSE)
loss = 1.0 + abs(LEARNING_RATE - 0.004) * 100 + SCALAR_LR
print(f"val_loss: {loss:.6f}")
"""

# A formatter-like process: atomic rename (write a temp file, os.replace it onto the target).
LINTER = textwrap.dedent("""\
    import glob, os, sys, time
    pattern, deadline = sys.argv[1], time.time() + float(sys.argv[2])
    mid_run = sys.argv[3] == "1"  # wait until the run has printed something
    while time.time() < deadline:
        for path in glob.glob(pattern):
            log = os.path.join(os.path.dirname(os.path.dirname(path)), "run.log")
            if mid_run and not (os.path.exists(log) and os.path.getsize(log)):
                continue
            try:
                text = open(path).read()
            except OSError:
                continue
            if "SCALAR_LR = 0.5" in text:
                tmp = path + ".fmt.tmp"
                with open(tmp, "w") as f:
                    f.write(text.replace("SCALAR_LR = 0.5", "SCALAR_LR = 0.3"))
                os.replace(tmp, path)
        time.sleep(0.05)
""")


def start_linter(tmp_path: Path, pattern: str, seconds: float = 60,
                 mid_run: bool = False) -> subprocess.Popen:
    script = tmp_path / "linter.py"
    script.write_text(LINTER)
    return subprocess.Popen([sys.executable, str(script), pattern, str(seconds),
                             "1" if mid_run else "0"])


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return create_repo(tmp_path / "r", {"train.py": TRAIN}, spec_toml("grid", timeout=20))


@pytest.mark.parametrize("mid_run", [False, True], ids=["as-soon-as-it-can", "mid-run"])
def test_linter_rewriting_run_directories_halts_the_loop(repo: Path, tmp_path: Path, cli,
                                                         mid_run: bool):
    linter = start_linter(tmp_path, str(repo / ".overnight/runs/*/*/work/train.py"),
                          mid_run=mid_run)
    try:
        out = cli("run", "-t", TAG, "-n", "5", cwd=repo, timeout=120)
    finally:
        linter.kill()
    assert out.returncode == 3, out.stdout + out.stderr
    assert "SCALAR_LR = 0.5 -> 0.3" in out.stderr
    assert "train.py:8" in out.stderr
    rs = rows(repo, TAG)
    assert [r["status"] for r in rs] == ["tampered", "tampered"]  # the first, and its retry
    assert rs[1]["retry_of"] == rs[0]["id"]
    for r in rs:
        assert r["metric"] is None
        assert "SCALAR_LR = 0.5 -> 0.3" in r["reason"]
        assert ("after launch" if mid_run else "launch") in r["reason"]
    show = cli("show", str(rs[0]["id"]), cwd=repo)
    assert "train.py:8 SCALAR_LR = 0.5 -> 0.3" in show.stdout


def test_on_tamper_continue_goes_on_without_counting_them(tmp_path: Path, cli):
    toml = spec_toml("grid", timeout=20, extra_run='on_tamper = "continue"')
    train = TRAIN.replace("PAUSE = 1.5", "PAUSE = 0.3")
    repo = create_repo(tmp_path / "r", {"train.py": train}, toml)
    out = cli("run", "-t", TAG, "-n", "2", cwd=repo, timeout=120)  # clean: baseline + one
    assert out.returncode == 0, out.stderr
    linter = start_linter(tmp_path, str(repo / ".overnight/runs/*/*/work/train.py"))
    try:
        out = cli("run", "-t", TAG, "-n", "5", cwd=repo, timeout=120)
    finally:
        linter.kill()
    assert out.returncode == 0, out.stdout + out.stderr
    rs = rows(repo, TAG)
    late = [r for r in rs[2:]]
    assert late and all(r["status"] == "tampered" for r in late)
    assert all(r["metric"] is None for r in late)
    kept = [r for r in rs if r["status"] == "keep"]
    assert all(r["id"] <= rs[1]["id"] for r in kept)


def test_linter_in_the_users_working_tree_does_not_matter(repo: Path, tmp_path: Path, cli):
    linter = start_linter(tmp_path, str(repo / "train.py"))
    try:
        time.sleep(0.5)
        assert "SCALAR_LR = 0.3" in (repo / "train.py").read_text()
        # overnight refuses to start on uncommitted changes to editable files...
        out = cli("run", "-t", TAG, "-n", "2", cwd=repo, timeout=60)
        assert out.returncode == 2 and "uncommitted" in out.stderr
    finally:
        linter.kill()
    subprocess.run(["git", "checkout", "train.py"], cwd=repo, check=True)
    # ...and once running, rewrites of the working tree never reach a run.
    linter = start_linter(tmp_path, str(repo / "train.py"))
    try:
        out = cli("run", "-t", TAG, "-n", "2", cwd=repo, timeout=60)
    finally:
        linter.kill()
    assert out.returncode in (0, 2), out.stderr
    if out.returncode == 2:  # the linter won the race against the start-up check
        assert "uncommitted" in out.stderr
        return
    rs = rows(repo, TAG)
    assert [r["status"] for r in rs] == ["keep", rs[1]["status"]]
    assert rs[1]["status"] in ("keep", "discard")
    assert rs[0]["metric"] == pytest.approx(1.3 + 0.5)  # SCALAR_LR 0.5 ran, as committed


def test_rewrite_before_launch_is_caught_before_anything_runs(repo: Path, tmp_path: Path):
    r = Repo(repo)
    head = r.head()
    work = tmp_path / "run" / "work"
    r.materialize(head, work)
    text = (work / "train.py").read_text()
    tmp = work / "train.py.tmp"
    tmp.write_text(text.replace("SCALAR_LR = 0.5", "SCALAR_LR = 0.3"))
    tmp.replace(work / "train.py")
    guard = RunGuard(r.tree(head), work)
    with guard:
        assert guard.tampered_before_launch
    verdict = guard.verdict(None)
    assert verdict.summary == "train.py:8 SCALAR_LR = 0.5 -> 0.3 (file changed before launch)"


def test_runtime_knob_values_are_recorded_and_a_changed_one_is_noted(tmp_path: Path, cli):
    train = TRAIN.replace("PAUSE = 1.5", "PAUSE = 0.1").replace(
        'print(f"val_loss',
        'def scale():\n    global LEARNING_RATE\n    LEARNING_RATE *= 2  # changed at run time\n'
        '\n\nscale()\nprint(f"val_loss')
    repo = create_repo(tmp_path / "r", {"train.py": train}, spec_toml("grid"))
    out = cli("run", "-t", TAG, "-n", "1", cwd=repo)
    assert out.returncode == 0, out.stderr
    row = rows(repo, TAG)[0]
    ran = json.loads(row["runtime_knobs"])
    assert ran["SCALAR_LR"] == 0.5 and ran["PAUSE"] == 0.1
    assert ran["LEARNING_RATE"] == 0.002  # what really ran, not what the file says
    assert row["status"] == "keep"  # a script may compute its constants: noted, not tampering
    show = cli("show", str(row["id"]), cwd=repo).stdout
    assert "LEARNING_RATE = 0.001 in the commit but 0.002 at run time" in show
    exported = cli("export", "--format", "jsonl", cwd=repo).stdout
    assert json.loads(exported.splitlines()[0])["runtime_knobs"]["LEARNING_RATE"] == 0.002


# --- a module reached through a committed symlink --------------------------------------------

HELPER_TRAIN = """\
import helper

LEARNING_RATE = 0.001
print(f"val_loss: {helper.loss(LEARNING_RATE):.6f}")
"""
HELPER_IMPL = "def loss(lr):\n    return 1.0 + abs(lr - 0.004) * 100\n"


def symlinked_repo(tmp_path: Path, train: str = HELPER_TRAIN) -> Path:
    repo = create_repo(tmp_path / "r", {"train.py": train, "lib/helper_impl.py": HELPER_IMPL},
                       spec_toml("grid"))
    (repo / "helper.py").symlink_to("lib/helper_impl.py")
    subprocess.run(["git", "add", "helper.py"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm",
                    "link"], cwd=repo, check=True)
    return repo


def test_a_module_imported_through_a_committed_symlink_runs_clean(tmp_path: Path, cli):
    repo = symlinked_repo(tmp_path)
    out = cli("run", "-t", TAG, "-n", "2", cwd=repo)
    assert out.returncode == 0, out.stderr
    rs = rows(repo, TAG)
    assert rs[0]["status"] == "keep" and rs[0]["metric"] == pytest.approx(1.3), rs[0]
    assert all(r["status"] != "tampered" for r in rs), [(r["status"], r["reason"]) for r in rs]


def run_guarded(repo: Path, work: Path) -> str:
    """Run train.py of HEAD in `work` under a RunGuard with the attestation on: the summary."""
    r = Repo(repo)
    tree = r.tree(r.head())
    tree.write(work)
    attest = work.parent / "attest" / "attest.json"
    attest.parent.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(attest_env(attest, work, None))
    guard = RunGuard(tree, work)
    with guard:
        assert not guard.tampered_before_launch
        guard.launching()
        subprocess.run([sys.executable, "train.py"], cwd=work, env=env, check=True,
                       capture_output=True)
    return guard.verdict(attest).summary


def test_a_symlinked_module_changed_during_the_run_is_caught(tmp_path: Path):
    # The run rewrites the file the link points to, then imports through the link.
    train = ("import pathlib\n"
             "pathlib.Path('lib/helper_impl.py').write_text('def loss(lr):\\n    return 0.0\\n')\n"
             + HELPER_TRAIN)
    repo = symlinked_repo(tmp_path, train)
    summary = run_guarded(repo, tmp_path / "run" / "work")
    assert summary.startswith("lib/helper_impl.py"), summary


def test_a_symlinked_module_left_alone_attests_clean(tmp_path: Path):
    repo = symlinked_repo(tmp_path)
    assert run_guarded(repo, tmp_path / "run" / "work") == ""


# --- a flood of events, then a swap put back --------------------------------------------------

FLOODING_TRAIN = """\
import os

LEARNING_RATE = 0.001
for _ in range(20000):  # bury what follows under events
    os.utime("val.txt")
os.rename("val.txt", ".orig")
with open(".fake", "w") as f:
    f.write("0.0001\\n")
os.replace(".fake", "val.txt")  # swap in an easy validation set
score = float(open("val.txt").read())
os.replace(".orig", "val.txt")  # and put the real one back before exit
print(f"val_loss: {score:.6f}")
"""


def test_a_swap_put_back_after_a_flood_of_touches_is_caught(tmp_path: Path, cli):
    """Unboxed: detection where prevention cannot reach (boxed, the committed file cannot
    even be renamed: test_hostile.py)."""
    toml = spec_toml("grid", timeout=60, extra_run='sandbox = "none"').replace(
        'editable = ["train.py"]', 'editable = ["train.py"]\nprotected = ["val.txt"]')
    repo = create_repo(tmp_path / "r", {"train.py": FLOODING_TRAIN, "val.txt": "1.3\n"}, toml)
    for tag in ("a", "b", "c"):  # the verdict must not depend on how fast the watch keeps up
        out = cli("run", "-t", tag, "-n", "1", cwd=repo, timeout=120)
        assert out.returncode in (0, 3), out.stderr
        row = rows(repo, tag)[-1]
        assert row["status"] == "tampered", (row["status"], row["metric"], row["reason"])
        # Named by its path: with its changed line ("val.txt:1 ...") or as a whole file,
        # depending on what the watch saw first.
        assert row["reason"].startswith(("val.txt ", "val.txt:")), row["reason"]
        assert row["metric"] is None
        for work in (repo / ".overnight" / "runs" / tag).glob("*/work"):
            assert (work / "val.txt").read_text() == "1.3\n"  # put back: exit check sees nothing
