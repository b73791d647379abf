"""[run] precheck: each candidate is checked before it takes a slot, boxed, with no GPU; a
failure is `rejected` and spends no run."""

from __future__ import annotations

import os
import re
import shutil

import pytest
from conftest import PYTHON, git, rows, spec_toml, train_py
from shapes import nanogpt_data, nanogpt_like
from test_hostile import SYSTEM_PYTHON, ledger_rows, make_harness

from overnight.spec import tomllib

# A dry run: reads the candidate's train.py the way the script would, without training.
CHECK = """\
import os, re, sys
assert os.environ.get("CUDA_VISIBLE_DEVICES") == "", "a precheck sees no GPU"
source = open("train.py").read()
lr = float(re.search(r"LEARNING_RATE = (.+)", source).group(1))
width = re.search(r"WIDTH = (\\d+)", source)
print("dry run: LEARNING_RATE", lr, "WIDTH", width and width.group(1))
assert lr < 0.005, "the learning rate diverges"
assert width is None or 256 % int(width.group(1)) == 0, "WIDTH must divide 256"
"""


def test_a_candidate_that_fails_its_precheck_is_rejected_without_a_run(make_repo, cli):
    spec = spec_toml("grid", extra_run=f'precheck = "{PYTHON} check.py"')
    repo = make_repo({"train.py": train_py(0.001, extra="WIDTH = 4"), "check.py": CHECK}, spec)
    out = cli("run", "-t", "t", "-n", "4", cwd=repo)
    assert out.returncode == 0, out.stdout + out.stderr
    rs = rows(repo, "t")
    rejected = [r for r in rs if r["status"] == "rejected"]
    assert rejected, [(r["status"], r["description"]) for r in rs]
    for r in rejected:
        assert "WIDTH 4 -> 3" in r["description"] or "WIDTH 4 -> 5" in r["description"]
        assert r["reason"].startswith("precheck `") and "failed (exit 1)" in r["reason"]
        assert "WIDTH must divide 256" in r["reason"]
        assert r["started_at"] is None and not r["log_path"]  # it never took a slot
    ran = [r for r in rs if r["status"] in ("keep", "discard")]
    assert ran and all("WIDTH 4 -> 3" not in r["description"] for r in ran)
    # The loop went on after it, to 4 runs: a rejected candidate ran nothing that counts.
    assert len(ran) == 4 and ran[-1]["id"] > rejected[-1]["id"]
    assert f"rejected {len(rejected)} (no run to count)" in out.stdout


def test_a_baseline_that_fails_its_precheck_is_a_failed_start(make_repo, cli):
    spec = spec_toml("grid", extra_run=f'precheck = "{PYTHON} check.py"')
    repo = make_repo({"train.py": train_py(0.01), "check.py": CHECK}, spec)
    out = cli("run", "-t", "t", "-n", "3", cwd=repo)
    assert out.returncode == 2
    assert "fails its precheck" in out.stderr and "the learning rate diverges" in out.stderr
    rs = rows(repo, "t")
    assert [(r["status"], r["is_baseline"], r["started_at"]) for r in rs] == [
        ("rejected", 1, None)]
    status = cli("status", "-t", "t", cwd=repo)
    assert "not started: the baseline failed" in status.stdout


def test_a_precheck_that_hangs_is_rejected_at_its_own_timeout(make_repo, cli):
    hang = 'import time\nif "WIDTH = 4" not in open("train.py").read():\n    time.sleep(60)\n'
    spec = spec_toml("grid", timeout=30, extra_run=f'precheck = "{PYTHON} hang.py"\n'
                     "precheck_timeout_seconds = 1")
    repo = make_repo({"train.py": train_py(0.001, extra="WIDTH = 4"), "hang.py": hang}, spec)
    out = cli("run", "-t", "t", "-n", "3", cwd=repo, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    rs = rows(repo, "t")
    rejected = [r for r in rs if r["status"] == "rejected"]
    assert rejected and all("WIDTH 4 ->" in r["description"] for r in rejected)
    assert all(r["reason"].endswith("timed out after 1s") for r in rejected), rejected
    assert len([r for r in rs if r["status"] in ("keep", "discard")]) == 3


def test_a_dry_run_precheck_reads_the_ignored_data(make_repo, cli):
    # nanoGPT's shape: the precheck is the script itself with no iterations, so it opens
    # data/tiny/train.bin like a run; without [run] data the baseline's precheck says so.
    repo = make_repo({**nanogpt_like(), "data/tiny/prepare.py": "# writes train.bin\n"})
    (repo / "data" / "tiny" / "train.bin").write_bytes(nanogpt_data())  # git-ignored
    assert cli("init", "--command", "python train.py config/small.py", cwd=repo).returncode == 0
    text = (repo / "overnight.toml").read_text()
    command = tomllib.loads(text)["run"]["command"]
    text = text.replace("[run]\n", f"[run]\nprecheck = '{command} --max_iters=0'\n")
    (repo / "overnight.toml").write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "spec")

    out = cli("run", "-t", "d", "-n", "2", cwd=repo, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert [r["status"] for r in rows(repo, "d") if r["status"] == "rejected"] == []

    (repo / "overnight.toml").write_text(re.sub(r"^data = .*\n", "", text, flags=re.M))
    git(repo, "commit", "-qam", "no data")
    out = cli("run", "-t", "e", "-n", "2", cwd=repo, timeout=120)
    assert out.returncode == 2
    assert "fails its precheck" in out.stderr and "FileNotFoundError" in out.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason='sandbox "user" needs root')
def test_prechecks_run_beside_the_slots_without_touching_their_runs():
    # Sandbox "user" ends everything of a uid when a process of it ends: a precheck running
    # as a slot's uid would kill that slot's run. Two slots, each run outlasting the next
    # candidate's precheck.
    h = make_harness("root, sandbox user")
    try:
        check = "import time\ntime.sleep(0.3)\nprint('precheck ok')\n"
        train = train_py(0.001, extra="WIDTH = 4\ntime.sleep(2)")
        repo = h.repo(train, f'parallel = 2\nprecheck = "{SYSTEM_PYTHON} check.py"\n',
                      files={"check.py": check})
        out = h.run(repo, "run", "-t", "t", "-n", "6", timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr
        rs = ledger_rows(repo)
        # Six runs, none killed, and no candidate prechecked beyond them (left over, lost).
        assert [r["status"] for r in rs if r["status"] not in ("keep", "discard")] == [], \
            [(r["status"], r["reason"]) for r in rs]
        assert len(rs) == 6
    finally:
        shutil.rmtree(h.base, ignore_errors=True)
