"""Proposals are checked before any compute; the metric can come from a trusted evaluator;
a checks gate stands between a better number and a keep."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import PYTHON, create_repo, git, rows, spec_toml, train_py

from overnight.executors.local import LocalExecutor
from overnight.ledger import Ledger
from overnight.proposers.base import Context, Proposal, Proposer
from overnight.scheduler import Loop
from overnight.snapshot import Repo
from overnight.spec import load_spec

TAG = "t"

PROTECTED_TRAIN = train_py(0.001).replace(
    "loss = 1.0", "# overnight: protect\nBUDGET = 5\n# overnight: end\nloss = 1.0")


class Scripted(Proposer):
    """Stands in for a model's answers: each call returns the next scripted edit."""

    name = "scripted"

    def __init__(self, edits: list):
        self.edits = list(edits)

    def propose(self, ctx: Context) -> Proposal | None:
        if not self.edits:
            return None
        make = self.edits.pop(0)
        return make(ctx)


def run_loop(repo: Path, edits: list, n: int) -> list[dict]:
    spec = load_spec(repo)
    ledger = Ledger(repo / ".overnight" / "ledger.sqlite")
    executor = LocalExecutor(1)
    try:
        Loop(Repo(repo), spec, ledger, executor, TAG, lambda files: Scripted(edits),
             max_experiments=n).run()
    finally:
        executor.shutdown()
        ledger.close()
    return rows(repo, TAG)


def edit(path: str, old: str, new: str, parent: str | None = None):
    def make(ctx: Context) -> Proposal:
        text = ctx.files.get(path) or ""
        return Proposal(parent=parent or ctx.incumbent.commit,
                        edits={path: text.replace(old, new) if text else new},
                        description=f"edit {path}")
    return make


def test_bad_proposals_are_rejected_before_any_compute(tmp_path: Path):
    repo = create_repo(tmp_path / "r", {"train.py": PROTECTED_TRAIN, "prepare.py": "X = 1\n",
                                        "notes.txt": "n\n"},
                       spec_toml(extra='').replace('editable = ["train.py"]',
                                                   'editable = ["train.py"]\n'
                                                   'protected = ["prepare.py"]'))
    scripted = [
        edit("prepare.py", "X = 1", "X = 2"),
        edit("notes.txt", "n", "m"),
        edit("train.py", "BUDGET = 5", "BUDGET = 500"),
        edit("train.py", "# overnight: end\n", ""),
        edit("train.py", "LEARNING_RATE = 0.001", "LEARNING_RATE = 0.002", parent="0" * 40),
        edit("train.py", "LEARNING_RATE = 0.001", "LEARNING_RATE = 0.001"),
        edit("train.py", "LEARNING_RATE = 0.001", "LEARNING_RATE = 0.003"),
    ]
    rs = run_loop(repo, scripted, n=8)
    got = [(r["status"], r["reason"]) for r in rs[1:]]
    assert got[0] == ("rejected", "edits prepare.py, which is protected")
    assert got[1] == ("rejected", "edits notes.txt, which is not in [files] editable")
    assert got[2][0] == "rejected" and "protected region of train.py at lines 7-9" in got[2][1]
    assert got[3][0] == "rejected" and "protected region" in got[3][1]
    assert got[4][0] == "rejected" and got[4][1].startswith("stale parent 0000000000")
    assert got[5] == ("rejected", "changes nothing")
    assert got[6][0] == "keep"
    for r in rs[1:7]:  # nothing ran: no commit, no run directory, no log
        assert r["commit_sha"] is None and r["started_at"] is None and r["log_path"] == ""
    assert len(list((repo / ".overnight" / "runs" / TAG).iterdir())) == 2


def test_search_never_touches_constants_in_protected_regions(tmp_path: Path):
    repo = create_repo(tmp_path / "r", {"train.py": PROTECTED_TRAIN}, spec_toml("random"))
    from overnight.proposers.search import SearchProposer

    spec = load_spec(repo)
    proposer = SearchProposer(spec, {"train.py": PROTECTED_TRAIN})
    assert proposer.names == ["LEARNING_RATE"]


EVAL = """\
import json, os
# The trusted evaluator reads what training left in $OVERNIGHT_ARTIFACTS and scores it itself.
weights = json.load(open(os.path.join(os.environ["OVERNIGHT_ARTIFACTS"], "model.json")))
print(f"val_loss: {1.0 + abs(weights['lr'] - 0.004) * 100:.6f}")
"""

CHEATING_TRAIN = """\
import json, os
LEARNING_RATE = 0.001
with open(os.path.join(os.environ["OVERNIGHT_ARTIFACTS"], "model.json"), "w") as f:
    json.dump({"lr": LEARNING_RATE}, f)
print("val_loss: 0.0001")  # a fake number: it must not count
"""


def test_trusted_evaluator_sets_the_metric_not_the_script(make_repo, cli):
    toml = spec_toml("grid").replace('editable = ["train.py"]',
                                     'editable = ["train.py"]\nprotected = ["eval.py"]')
    toml += f'\n[evaluate]\ncommand = "{PYTHON} eval.py"\n'
    repo = make_repo({"train.py": CHEATING_TRAIN, "eval.py": EVAL}, toml)
    out = cli("run", "-t", TAG, "-n", "3", cwd=repo)
    assert out.returncode == 0, out.stderr
    rs = rows(repo, TAG)
    assert rs[0]["metric"] == 1.3  # what the evaluator measured for lr = 0.001
    assert all(r["metric"] is None or r["metric"] > 1.0 for r in rs)
    assert all(json.loads(r["metrics"]).get("val_loss", 1) > 1.0 for r in rs)


def test_checks_gate_blocks_a_better_result_that_fails_them(make_repo, cli):
    checks = "test -f ok.txt || (echo 'tests failed: ok.txt missing'; exit 1)"
    toml = spec_toml("grid", extra_run=f'checks = "{checks}"')
    repo = make_repo({"train.py": train_py(0.001)}, toml)
    out = cli("run", "-t", TAG, "-n", "4", cwd=repo)
    assert out.returncode == 0, out.stderr
    rs = rows(repo, TAG)
    failed = [r for r in rs if r["status"] == "checks_failed"]
    assert failed, [(r["status"], r["metric"]) for r in rs]
    assert "ok.txt missing" in failed[0]["reason"]
    assert failed[0]["metric"] is None
    assert [r["status"] for r in rs].count("keep") == 1  # only the baseline
    assert git(repo, "rev-list", "--count", f"overnight/{TAG}") == "1"

    # With the file present, the same improvements pass the gate and are kept.
    repo2 = make_repo({"train.py": train_py(0.001), "ok.txt": "fine\n"}, toml)
    out = cli("run", "-t", TAG, "-n", "4", cwd=repo2)
    assert out.returncode == 0, out.stderr
    assert "keep" in [r["status"] for r in rows(repo2, TAG)[1:]]


# The metric goes through print inside the region, so each trick below would fake it.
REGION_TRAIN = train_py(0.001).replace(
    'print(f"val_loss: {loss:.6f}")',
    '# overnight: protect\nprint(f"val_loss: {loss:.6f}")\n# overnight: end')


def test_tricks_around_a_protected_region_are_rejected_before_any_compute(tmp_path: Path):
    repo = create_repo(tmp_path / "r", {"train.py": REGION_TRAIN}, spec_toml())
    region = "# overnight: protect\n"
    fake = "print = lambda *a, **k: __import__('sys').stdout.write('val_loss: 0.000001\\n')\n"
    scripted = [
        # hide the region in a string, print a better number instead
        edit("train.py", region, 'print("val_loss: 0.000001")\n_ = """\n' + region),
        edit("train.py", region, fake + region),  # monkeypatch print above it
        edit("train.py", region, "import builtins\nbuiltins.print = len\n" + region),
        edit("train.py", region, "def print(*a, **k):\n    pass\n" + region),
        edit("train.py", "LEARNING_RATE = 0.001", "LEARNING_RATE = 0.003"),  # fine
    ]
    # the string trick needs its closing quotes after the region
    first = scripted[0]

    def string_trick(ctx: Context) -> Proposal:
        p = first(ctx)
        text = p.edits["train.py"].replace("# overnight: end\n", '# overnight: end\n"""\n')
        return Proposal(parent=p.parent, edits={"train.py": text}, description="hide it")

    scripted[0] = string_trick
    rs = run_loop(repo, scripted, n=6)
    got = [(r["status"], r["reason"]) for r in rs[1:]]
    assert [s for s, _ in got] == ["rejected"] * 4 + ["keep"], got
    assert "inside an assignment at line" in got[0][1] and "top-level statements" in got[0][1]
    assert got[1][1].startswith("rebinds `print` at line") and "(assignment)" in got[1][1]
    assert got[2][1].startswith("monkeypatches builtins (`import builtins` at line")
    assert got[3][1].startswith("rebinds `print` at line") and "(def)" in got[3][1]
    for r in rs[1:5]:  # nothing ran
        assert r["commit_sha"] is None and r["started_at"] is None
    assert rs[5]["metric"] < rs[0]["metric"]
