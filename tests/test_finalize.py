"""`overnight finalize` on real loops and real git: the kept chain as a branch, each change
that stands alone as a branch from the baseline, the user's checkout untouched, --force,
and --verify measuring the gain again without changing the tag's decisions."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
from pathlib import Path

from conftest import create_repo, git, rows, spec_toml, train_py

from overnight.executors.local import LocalExecutor
from overnight.proposers.base import Context, Proposal, Proposer
from overnight.scheduler import Loop
from overnight.workspace import Workspace

TAG = "t"

# Two knobs far enough apart that a change to one leaves the other's diff context alone.
FILLER = "".join(f"# filler line {i}\n" for i in range(8))
TRAIN = f"""\
LEARNING_RATE = 0.001
{FILLER}WIDTH = 1

loss = 1.0 + abs(LEARNING_RATE - 0.004) * 100 + abs(WIDTH - 4) * 0.1
print(f"val_loss: {{loss:.6f}}")
"""


class Scripted(Proposer):
    """Each call returns the next scripted change on top of the incumbent."""

    name = "scripted"

    def __init__(self, changes: list[tuple[str, str, str]]):
        self.changes = list(changes)

    def propose(self, ctx: Context) -> Proposal | None:
        if not self.changes:
            return None
        old, new, description = self.changes.pop(0)
        text = ctx.files["train.py"]
        assert old in text, f"{old!r} is not in the incumbent's train.py"
        return Proposal(parent=ctx.incumbent.commit,
                        edits={"train.py": text.replace(old, new)}, description=description,
                        hypothesis=f"{description} lowers val_loss")


def run_scripted(repo: Path, changes: list[tuple[str, str, str]], tag: str = TAG) -> None:
    """The real loop (local slots, the box, git, the ledger with its chain head)."""
    ws = Workspace.open(repo)
    ws.repo.exclude("/.overnight/")
    ledger = ws.ledger()
    executor = LocalExecutor(1)
    try:
        Loop(ws.repo, ws.spec, ledger, executor, tag, lambda files: Scripted(changes),
             max_experiments=20).run()
    finally:
        executor.shutdown()
        ledger.close()


def user_state(repo: Path) -> dict[str, object]:
    """What the user would notice changing: HEAD, branch, index, status and file bytes."""
    files = {str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*"))
             if p.is_file() and ".git" not in p.parts and ".overnight" not in p.parts}
    return {"head": git(repo, "rev-parse", "HEAD"), "branch": git(repo, "symbolic-ref", "HEAD"),
            "index": git(repo, "ls-files", "-s"), "staged": git(repo, "diff", "--cached"),
            "status": git(repo, "status", "--porcelain", "--untracked-files=all"),
            "files": files}


def tree(repo: Path, rev: str) -> str:
    return git(repo, "rev-parse", f"{rev}^{{tree}}")


def final_branches(repo: Path) -> dict[str, str]:
    out = git(repo, "for-each-ref", "--format=%(refname:strip=2) %(objectname)",
              "refs/heads/overnight-final/")
    return dict(line.split() for line in out.splitlines())


def changed_lines(repo: Path, a: str, b: str) -> list[str]:
    """The lines the diff from a to b removes and adds (its headers name blobs and context
    that differ from one base to another)."""
    return [line for line in git(repo, "diff", a, b).splitlines() if line[:1] in ("+", "-")]


def applies_to_base(repo: Path, base: str, branch: str, tmp: Path) -> subprocess.CompletedProcess:
    """`git apply --check` of the branch's diff in a fresh clone checked out at the base."""
    clone = tmp / f"clone-{branch.replace('/', '_')}"
    git(tmp, "clone", "-q", str(repo), str(clone))
    git(clone, "checkout", "-q", base)
    patch = git(repo, "diff", base, branch) + "\n"
    return subprocess.run(["git", "apply", "--check", "-"], cwd=clone, input=patch, text=True,
                          capture_output=True, check=False)


def test_kept_chain_and_independent_branches(tmp_path: Path, cli):
    repo = create_repo(tmp_path / "r", {"train.py": TRAIN, "notes.txt": "v1\n"},
                       spec_toml())
    run_scripted(repo, [
        ("LEARNING_RATE = 0.001", "LEARNING_RATE = 0.002", "LR 0.001 -> 0.002"),
        ("LEARNING_RATE = 0.002", "LEARNING_RATE = 0.5", "LR 0.002 -> 0.5"),  # discarded
        ("WIDTH = 1", "WIDTH = 4", "Width: 1 -> 4 (wider!)"),
        ("LEARNING_RATE = 0.002", "LEARNING_RATE = 0.003", "LR 0.002 -> 0.003"),
    ])
    rs = rows(repo, TAG)
    assert [r["status"] for r in rs] == ["keep", "keep", "discard", "keep", "keep"]
    base, keeps = rs[0], [r for r in rs[1:] if r["status"] == "keep"]
    # The user goes on working: an edit, a staged change, an untracked file.
    (repo / "train.py").write_text(TRAIN + "# mine\n")
    (repo / "notes.txt").write_text("v2\n")
    git(repo, "add", "notes.txt")
    (repo / "scratch.txt").write_text("untracked\n")
    before = user_state(repo)

    out = cli("finalize", "-t", TAG, cwd=repo)
    assert out.returncode == 0, out.stderr
    assert user_state(repo) == before
    made = final_branches(repo)

    # The chain: from the baseline's commit, one commit per keep, each with the kept tree.
    final = "overnight-final/t"
    assert tree(repo, final) == tree(repo, keeps[-1]["commit_sha"]) == \
        tree(repo, f"overnight/{TAG}")
    chain = git(repo, "rev-list", "--reverse", f"{base['commit_sha']}..{final}").splitlines()
    assert [tree(repo, c) for c in chain] == [tree(repo, k["commit_sha"]) for k in keeps]
    assert git(repo, "rev-list", "--max-parents=0", final) == \
        git(repo, "rev-list", "--max-parents=0", base["commit_sha"])
    assert git(repo, "rev-parse", f"{chain[0]}^") == base["commit_sha"]
    messages = [git(repo, "log", "-1", "--format=%B", c) for c in chain]
    assert [m.splitlines()[0] for m in messages] == [k["description"] for k in keeps]
    assert f"experiment #{keeps[0]['id']}, proposed by scripted" in messages[0]
    assert "Hypothesis: LR 0.001 -> 0.002 lowers val_loss" in messages[0]
    assert "Delta: val_loss -0.100000 (+6.25% improvement)" in messages[0]  # 1.6 -> 1.5
    assert "Delta: val_loss -0.300000 (+20.00% improvement)" in messages[1]  # 1.5 -> 1.2
    assert "Delta: val_loss -0.100000 (+8.33% improvement)" in messages[2]  # 1.2 -> 1.1
    assert all(m.rstrip().endswith("Overnight-Final: t") for m in messages)
    assert git(repo, "log", "-1", "--format=%an <%ae>", final) == "overnight <overnight@localhost>"

    # Changes 1 and 2 stand alone; change 3 edits the line change 1 edited.
    assert set(made) == {final, "overnight-final/t-1-lr-0-001-0-002",
                         "overnight-final/t-2-width-1-4-wider"}
    for n, name in ((1, "overnight-final/t-1-lr-0-001-0-002"),
                    (2, "overnight-final/t-2-width-1-4-wider")):
        assert git(repo, "rev-parse", f"{name}^") == base["commit_sha"]
        assert changed_lines(repo, base["commit_sha"], name) == \
            changed_lines(repo, chain[n - 2] if n > 1 else base["commit_sha"], chain[n - 1])
        check = applies_to_base(repo, base["commit_sha"], name, tmp_path)
        assert check.returncode == 0, check.stderr
        assert f"change {n} alone" in out.stdout and f"git show {name}" in out.stdout
    assert "WIDTH = 4" in git(repo, "show", "overnight-final/t-2-width-1-4-wider:train.py")
    assert "LEARNING_RATE = 0.001" in \
        git(repo, "show", "overnight-final/t-2-width-1-4-wider:train.py")
    assert re.search(r"change 3 \(#\d+: LR 0\.002 -> 0\.003\) has no branch of its own: it "
                     r"builds on change 1 \(#\d+: LR 0\.001 -> 0\.002\)", out.stdout)
    assert f"review: git log -p --reverse {base['commit_sha'][:10]}..{final}" in out.stdout
    assert made[final][:10] in out.stdout
    assert "nothing was pushed" in out.stdout

    # Again: the same ledger makes the same commits; nothing moves.
    again = cli("finalize", "-t", TAG, cwd=repo)
    assert again.returncode == 0, again.stderr
    assert final_branches(repo) == made
    assert again.stdout.count("(unchanged)") == 3

    # One more keep: the branches differ now, and are left alone without --force.
    run_scripted(repo, [("LEARNING_RATE = 0.003", "LEARNING_RATE = 0.004", "LR 0.004")])
    refused = cli("finalize", "-t", TAG, cwd=repo)
    assert refused.returncode == 2
    assert "--force" in refused.stderr and final in refused.stderr
    assert final_branches(repo) == made
    forced = cli("finalize", "-t", TAG, "--force", cwd=repo)
    assert forced.returncode == 0, forced.stderr
    now = final_branches(repo)
    assert now[final] != made[final]
    assert f"(replaced, was {made[final][:10]})" in forced.stdout
    assert len(git(repo, "rev-list", f"{base['commit_sha']}..{final}").splitlines()) == 4
    assert tree(repo, final) == tree(repo, f"overnight/{TAG}")
    assert user_state(repo) == before


def test_a_change_on_the_lines_of_the_one_before_gets_no_branch_of_its_own(tmp_path: Path,
                                                                          cli):
    repo = create_repo(tmp_path / "r", {"train.py": TRAIN}, spec_toml())
    run_scripted(repo, [
        ("LEARNING_RATE = 0.001", "LEARNING_RATE = 0.002", "lr up"),
        ("LEARNING_RATE = 0.002", "LEARNING_RATE = 0.004", "lr up again"),
    ])
    out = cli("finalize", cwd=repo)  # the most recent tag
    assert out.returncode == 0, out.stderr
    assert set(final_branches(repo)) == {"overnight-final/t", "overnight-final/t-1-lr-up"}
    assert re.search(r"change 2 \(#\d+: lr up again\) has no branch of its own: it builds on "
                     r"change 1 \(#\d+: lr up\)", out.stdout)

    # A branch checked out is never moved: the one that stays the same may be checked out.
    git(repo, "checkout", "-q", "overnight-final/t-1-lr-up")
    run_scripted(repo, [("WIDTH = 1", "WIDTH = 2", "wider")])
    out = cli("finalize", "--force", cwd=repo)
    assert out.returncode == 0, out.stderr
    assert "overnight-final/t-1-lr-up (unchanged)" in out.stdout
    assert "overnight-final/t-3-wider (created)" in out.stdout
    git(repo, "checkout", "-q", "overnight-final/t")
    run_scripted(repo, [("WIDTH = 2", "WIDTH = 4", "wider still")])
    made = final_branches(repo)
    out = cli("finalize", "--force", cwd=repo)
    assert out.returncode == 2
    assert f"overnight-final/t is checked out ({repo})" in out.stderr
    assert final_branches(repo) == made


def test_a_tag_without_keeps_a_tampered_ledger_and_a_tag_named_like_a_change(tmp_path: Path,
                                                                             cli):
    repo = create_repo(tmp_path / "r", {"train.py": TRAIN}, spec_toml())
    run_scripted(repo, [("LEARNING_RATE = 0.001", "LEARNING_RATE = 0.5", "worse")], tag="flat")
    out = cli("finalize", "-t", "flat", cwd=repo)
    assert out.returncode == 2
    assert "no kept improvement" in out.stderr
    assert git(repo, "for-each-ref", "refs/heads/overnight-final/") == ""

    # Tag t's change 1 would be overnight-final/t-1-lr-up: the final branch of tag t-1-lr-up.
    run_scripted(repo, [("LEARNING_RATE = 0.001", "LEARNING_RATE = 0.002", "lr up"),
                        ("WIDTH = 1", "WIDTH = 4", "wider")])
    run_scripted(repo, [("WIDTH = 1", "WIDTH = 2", "width 2")], tag="t-1-lr-up")
    assert cli("finalize", "-t", "t-1-lr-up", cwd=repo).returncode == 0
    theirs = final_branches(repo)["overnight-final/t-1-lr-up"]
    out = cli("finalize", "-t", TAG, cwd=repo)
    assert out.returncode == 0, out.stderr
    assert "change 1 (#" in out.stdout and \
        "is the final branch of tag 't-1-lr-up'" in out.stdout
    assert final_branches(repo)["overnight-final/t-1-lr-up"] == theirs
    assert "overnight-final/t-2-wider" in final_branches(repo)

    db = sqlite3.connect(repo / ".overnight" / "ledger.sqlite")
    db.execute("UPDATE experiments SET metric = 0.1 WHERE tag = 't' AND status = 'keep'")
    db.commit()
    db.close()
    out = cli("finalize", "-t", TAG, cwd=repo)
    assert out.returncode == 3
    assert "changed outside overnight" in out.stderr


# Noise on top of the standard workload, so that --verify has an uncertainty to report.
NOISY = "import random\nloss += random.gauss(0, 0.001)\n"


def test_verify_reports_the_gain_with_its_uncertainty_and_decides_nothing(make_repo, cli):
    # The noise-aware judge (the default): repeats, estimates and their standard errors.
    repo = make_repo({"train.py": train_py(0.001, extra=NOISY)},
                     spec_toml("grid", budget=2, judge=""))
    run = cli("run", "-t", TAG, "-n", "30", cwd=repo, timeout=120)
    assert run.returncode == 0, run.stderr
    decided = rows(repo, TAG)
    keeps = [r for r in decided if r["status"] == "keep"]
    assert len(keeps) == 3 and keeps[-1]["knobs"] == '{"LEARNING_RATE": 0.004}'

    out = cli("finalize", "-t", TAG, "--verify", "3", cwd=repo, timeout=120)
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("verified:"))
    m = re.search(r"val_loss (\S+) \(baseline #\d+\) -> (\S+) \(final #\d+\): gain (\S+) "
                  r"\(\+[\d.]+%\) ± (\S+) \(standard error; 95% interval (\S+) to (\S+); "
                  r"3 runs of the final tree, 3 of the baseline\)", line)
    assert m, line
    base_mean, final_mean, gain, se, low, high = map(float, m.groups())
    assert abs(base_mean - 1.3) < 0.01 and abs(final_mean - 1.0) < 0.01
    assert abs(gain - 0.3) < 0.01 and 0 < se < 0.01 and low < gain < high
    # Said before the branches are.
    assert out.stdout.index("verified:") < out.stdout.index("overnight-final/t (created)")
    # Each commit's delta carries the uncertainty the judge recorded.
    message = git(repo, "log", "-1", "--format=%B", "overnight-final/t")
    assert re.search(r"Measured: val_loss [\d.]+ ± \S+ \(\d+ runs, noise σ \S+\)", message)
    assert re.search(r"Delta: val_loss -0\.(19|20)\d+ \(\+1\d\.\d\d% improvement\) ± \S+ "
                     r"\(standard error\)", message), message

    # Recorded as its own kind of event; the tag's experiments are exactly as they were.
    assert rows(repo, TAG) == decided
    db = sqlite3.connect(repo / ".overnight" / "ledger.sqlite")
    events = [json.loads(m) for (m,) in db.execute(
        "SELECT message FROM events WHERE kind = 'finalize_verify'")]
    db.close()
    assert len(events) == 1
    assert len(events[0]["final"]["values"]) == 3 and len(events[0]["base"]["values"]) == 3
    assert events[0]["final"]["experiment"] == keeps[-1]["id"]
    assert abs(events[0]["gain"] - gain) < 1e-6 and events[0]["se"] > 0
    status = cli("status", "-t", TAG, cwd=repo)
    assert status.returncode == 0, status.stderr
    assert "2 kept improvements" in status.stdout
