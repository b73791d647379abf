"""Proposal admission, the one gate: scope, a real change, duplicates, regions, syntax and
bounds, where only Python files hold knobs."""

from __future__ import annotations

from conftest import rows, spec_toml, train_py

from overnight.admission import Rules, problem
from overnight.proposers.base import fingerprint
from overnight.spec import Bound

TRAIN = train_py(0.001)
YAML = "batch_size: 32\nwarmup: 100\n"
RULES = Rules(editable=("train.py", "config.yaml"), protected=("prepare.py",),
              bounds={"LEARNING_RATE": Bound(low=1e-4, high=1e-2)})
BASE = {"train.py": TRAIN, "config.yaml": YAML}


def test_a_yaml_file_beside_bounded_knobs_is_just_text():
    """The bug: with [search.bounds] set and a config.yaml editable, every proposal was
    rejected with "config.yaml is not valid Python"."""
    assert problem(RULES, BASE, {"config.yaml": YAML.replace("32", "64")}) is None
    assert problem(RULES, BASE, {"train.py": train_py(0.002)}) is None


def test_each_rule_says_why():
    assert problem(RULES, BASE, {"prepare.py": "X = 1\n"}) == "edits prepare.py, which is protected"
    assert "not in [files] editable" in problem(RULES, BASE, {"other.py": "X = 1\n"})
    assert problem(RULES, BASE, {"train.py": TRAIN}) == "changes nothing"
    moved = {"train.py": train_py(0.5)}
    assert problem(RULES, BASE, moved) == "LEARNING_RATE = 0.5 is outside its bounds [0.0001, 0.01]"
    broken = {"train.py": TRAIN + "def (:\n"}
    assert problem(RULES, BASE, broken).startswith("leaves train.py not valid Python")
    seen = {fingerprint({**BASE, **moved}): 7}
    assert problem(RULES, BASE, moved, seen.get) == (
        "duplicate of experiment #7: the same files were already tried")


def test_overnight_run_with_a_yaml_config_and_bounds(make_repo, cli):
    extra = 'knobs = ["LEARNING_RATE"]\n[search.bounds]\nLEARNING_RATE = [0.0001, 0.01]'
    toml = spec_toml("grid", extra=extra).replace(
        'editable = ["train.py"]', 'editable = ["train.py", "config.yaml"]')
    repo = make_repo({"train.py": TRAIN, "config.yaml": YAML}, toml)
    out = cli("run", "-t", "y", "-n", "4", cwd=repo)
    assert out.returncode == 0, out.stdout + out.stderr
    statuses = [r["status"] for r in rows(repo, "y")]
    assert "rejected" not in statuses, [(r["status"], r["reason"]) for r in rows(repo, "y")]
    assert len(statuses) == 4
