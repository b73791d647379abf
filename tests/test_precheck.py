"""[run] precheck: each candidate is checked before it takes a slot, boxed, with no GPU; a
failure is `rejected` and spends no run."""

from __future__ import annotations

from conftest import PYTHON, rows, spec_toml, train_py

# A dry run: reads the candidate's train.py the way the script would, without training.
CHECK = """\
import os, re, sys
assert os.environ.get("CUDA_VISIBLE_DEVICES") == "", "a precheck sees no GPU"
lr = float(re.search(r"LEARNING_RATE = (.+)", open("train.py").read()).group(1))
print("dry run: LEARNING_RATE", lr)
sys.exit(1 if lr > 0.0015 else 0)
"""


def test_a_candidate_that_fails_its_precheck_is_rejected_without_a_run(make_repo, cli):
    spec = spec_toml("grid", extra_run=f'precheck = "{PYTHON} check.py"')
    repo = make_repo({"train.py": train_py(0.001), "check.py": CHECK}, spec)
    out = cli("run", "-t", "t", "-n", "3", cwd=repo)
    assert out.returncode == 0, out.stdout + out.stderr
    rs = rows(repo, "t")
    rejected = [r for r in rs if r["status"] == "rejected"]
    assert rejected, [(r["status"], r["description"]) for r in rs]
    for r in rejected:
        assert "LEARNING_RATE 0.001 -> 0.002" in r["description"]
        assert r["reason"].startswith("precheck `") and "failed (exit 1)" in r["reason"]
        assert "dry run: LEARNING_RATE 0.002" in r["reason"]
        assert r["started_at"] is None and not r["log_path"]  # it never took a slot
    ran = [r for r in rs if r["status"] in ("keep", "discard")]
    assert ran and all("0.002" not in r["description"] for r in ran)


def test_a_baseline_that_fails_its_precheck_is_a_failed_start(make_repo, cli):
    spec = spec_toml("grid", extra_run=f'precheck = "{PYTHON} check.py"')
    repo = make_repo({"train.py": train_py(0.01), "check.py": CHECK}, spec)
    out = cli("run", "-t", "t", "-n", "3", cwd=repo)
    assert out.returncode == 2
    assert "fails its precheck" in out.stderr and "dry run: LEARNING_RATE 0.01" in out.stderr
    rs = rows(repo, "t")
    assert [(r["status"], r["is_baseline"], r["started_at"]) for r in rs] == [
        ("rejected", 1, None)]
    status = cli("status", "-t", "t", cwd=repo)
    assert "not started: the baseline failed" in status.stdout
