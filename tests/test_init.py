"""`overnight init` on repositories shaped like the ones users bring (tests/shapes.py): the
spec it writes runs the first time, and its search space does not waste a night."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

from conftest import git, rows, spec_toml, train_py
from shapes import autoresearch_like, nanogpt_like

from overnight.knobs import read_knobs
from overnight.proposers.base import Context, Experiment
from overnight.proposers.search import SearchProposer
from overnight.spec import load_spec, tomllib


def _init(cli, repo: Path, *args: str) -> tuple[dict, str]:
    out = cli("init", *args, cwd=repo)
    assert out.returncode == 0, out.stderr
    return tomllib.loads((repo / "overnight.toml").read_text()), out.stdout


def _first_proposals(repo: Path, n: int) -> tuple[dict, list[dict]]:
    """The first n proposals of the search proposer the written spec configures, each
    proposed while the earlier ones are in flight (what a loop with many slots does)."""
    spec = load_spec(repo)
    files = {p: (repo / p).read_text() for p in spec.files.editable}
    proposer = SearchProposer(spec, files)
    head = {k: v.value for k, v in read_knobs(files, proposer.scope).items()}
    base = Experiment(0, "c0", None, "keep", 1.0, "baseline", head, True)
    ctx = Context(base, files, [base], [], spec.objective.direction, 1)
    out = []
    for _ in range(n):
        p = proposer.propose(ctx)
        assert p is not None
        out.append(p.knobs)
    return head, out


def test_autoresearch_shape_gets_a_safe_search_space(make_repo, cli) -> None:
    repo = make_repo(autoresearch_like())
    spec, said = _init(cli, repo)

    assert spec["files"] == {"editable": ["train.py"], "protected": ["prepare.py"]}
    assert spec["objective"]["metric"] == "val_bpb" and "pattern" not in spec["objective"]
    # The time budget lives in the protected prepare.py: the spec says so and follows it.
    assert spec["run"]["budget_seconds"] == 2
    assert "prepare.py (protected) sets TIME_BUDGET = 2" in said
    search = spec["search"]
    assert search["strategy"] == "perturb"
    knobs = search["knobs"]
    assert "PEAK_FLOPS" not in knobs  # reporting only
    assert "step" not in knobs and "accum" not in knobs  # loop state, derived values
    assert {"LR", "BETA2", "WARMUP_FRAC", "FINAL_LR_RATIO", "BATCH", "DEPTH"} <= set(knobs)
    bounds = search["bounds"]
    assert bounds["WARMUP_FRAC"]["low"] == 0 and bounds["FINAL_LR_RATIO"]["low"] == 0
    assert bounds["BATCH"]["scale"] == "pow2" and bounds["BETA2"]["scale"] == "log1m"
    text = (repo / "overnight.toml").read_text()
    assert "# not searched: PEAK_FLOPS" in text

    head, proposals = _first_proposals(repo, 12)
    for knobs_ in proposals:
        changed = [n for n in knobs_ if knobs_[n] != head[n]]
        assert 1 <= len(changed) <= 2, knobs_
        assert knobs_["WARMUP_FRAC"] >= 0 and knobs_["FINAL_LR_RATIO"] >= 0
        batch = knobs_["BATCH"]
        assert batch & (batch - 1) == 0 and (2**12) % (batch * 32) == 0, batch


def test_autoresearch_shape_runs_with_the_spec_init_writes(make_repo, cli) -> None:
    repo = make_repo(autoresearch_like())
    _init(cli, repo)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "overnight spec")

    out = cli("run", "-t", "first", "-n", "8", cwd=repo, timeout=240)

    assert out.returncode == 0, out.stdout + out.stderr
    ran = rows(repo, "first")
    assert ran and all(r["status"] not in ("crash", "timeout", "lost") for r in ran), \
        [(r["status"], r["reason"]) for r in ran]
    measured = [r for r in ran if not r["is_baseline"] and r["metric"] is not None]
    assert len(measured) >= 4, [(r["status"], r["reason"]) for r in ran]


def test_nanogpt_shape_gets_pattern_config_files_and_lowercase_knobs(make_repo, cli) -> None:
    repo = make_repo(nanogpt_like())
    spec, said = _init(cli, repo, "--command",
                       "python train.py config/small.py --n_layer=2")

    assert spec["files"]["editable"] == ["train.py", "config/small.py"]
    assert "config/small.py is passed to the script by the command" in said
    assert spec["objective"]["metric"] == "val_loss"
    assert spec["objective"]["pattern"].startswith("val loss")
    assert "prints `val loss <number>`" in said
    assert "never reads OVERNIGHT_BUDGET_SECONDS" in said and "max_iters = 10" in said
    knobs = spec["search"]["knobs"]
    assert {"learning_rate", "beta2", "dropout"} <= set(knobs)
    # What defines the measurement or the budget, what the command sets, loop state, seeds:
    for name in ("eval_interval", "eval_iters", "log_interval", "max_iters", "n_layer",
                 "iter_num", "seed", "batch_size"):
        assert name not in knobs, name
    text = (repo / "overnight.toml").read_text()
    assert "# not searched: n_layer: set by the command (--n_layer=2)" in text
    # learning_rate's home is the config file, whose value is the one that runs.
    assert "learning_rate = { low = 0.0002, high = 0.02 }  # 0.002 at config/small.py:3" in text
    assert spec["search"]["bounds"]["dropout"] == {"low": 0.0, "high": 0.5}


def test_init_pattern_and_a_metric_it_cannot_find(make_repo, cli) -> None:
    repo = make_repo({"train.py": "import random\nprint('score is', random.random())\n"})
    spec, said = _init(cli, repo, "--metric", "score", "--pattern", r"score is ([0-9.]+)",
                       "--direction", "higher")
    assert spec["objective"]["pattern"] == r"score is ([0-9.]+)"

    other = make_repo({"train.py": "print('acc', 0.5)\n"})
    spec, said = _init(cli, other, "--metric", "val_acc", "--direction", "higher")
    assert "could not find where val_acc is printed" in said and "--pattern" in said

    bad = make_repo({"train.py": "print('hello')\n"})
    out = cli("init", "--metric", "x", "--pattern", "no group", "--direction", "lower", cwd=bad)
    assert out.returncode == 2 and "exactly one group" in out.stderr


def test_init_finds_the_interpreter_that_imports_the_script(make_repo, cli, tmp_path) -> None:
    """`python` on PATH cannot import what the script imports (overnight installed in a
    venv that is not activated): init writes the interpreter that can, and says so."""
    repo = make_repo({"train.py": "import optuna\nprint(f'val_loss: {1.0}')\n"})
    bare = tmp_path / "bin"
    bare.mkdir()
    stub = bare / "python"
    stub.write_text(f"#!/bin/sh\nexec {sys.base_prefix}/bin/python3 -I -S \"$@\"\n")
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    env = {"PATH": f"{bare}{os.pathsep}/usr/bin:/bin"}
    out = cli("init", cwd=repo, env=env)
    assert out.returncode == 0, out.stderr
    spec = tomllib.loads((repo / "overnight.toml").read_text())
    assert spec["run"]["command"] == f"{sys.executable} train.py"
    assert "cannot import optuna" in out.stdout and sys.executable in out.stdout

    again = make_repo({"train.py": "import optuna\nprint(f'val_loss: {1.0}')\n"})
    out = cli("init", "--command", "python train.py", cwd=again, env=env)
    assert out.returncode == 0, out.stderr
    assert f"`python` here ({stub}) cannot import optuna; {sys.executable} can" in out.stdout


def _nano_spec(editable: list[str]) -> str:
    return f"""\
[objective]
metric = "val_loss"
pattern = "val loss ([0-9.]+)"
[run]
command = "python train.py config/small.py"
budget_seconds = 10
timeout_seconds = 30
[files]
editable = {editable!r}
[search]
strategy = "perturb"
knobs = ["learning_rate"]
[judge]
mode = "greedy"
""".replace("'", '"')


def test_an_edit_that_a_config_file_sets_again_tests_nothing(make_repo, cli) -> None:
    """train.py's learning_rate is edited, but config/small.py (not editable here) sets it
    again before it is used: the run did not test the proposal, and says so."""
    files = {**nanogpt_like(), "data/tiny/train.bin": "committed here, not ignored"}
    del files[".gitignore"]
    repo = make_repo(files, _nano_spec(["train.py"]))

    out = cli("run", "-t", "t", "-n", "3", cwd=repo, timeout=120)

    assert out.returncode == 0, out.stdout + out.stderr
    cands = [r for r in rows(repo, "t") if not r["is_baseline"]]
    assert cands and all(r["status"] == "discard" for r in cands), cands
    assert all("the edit changed nothing at run time: learning_rate ran as 0.002" in r["reason"]
               for r in cands), [r["reason"] for r in cands]
    assert "(the edit changed nothing at run time: learning_rate ran as 0.002" in out.stdout
    shown = cli("show", str(cands[0]["id"]), cwd=repo)
    assert "the edit changed nothing" in shown.stdout and "learning_rate=0.002" in shown.stdout


def test_an_edit_of_the_config_file_reaches_the_run(make_repo, cli) -> None:
    files = {**nanogpt_like(), "data/tiny/train.bin": "committed here, not ignored"}
    del files[".gitignore"]
    repo = make_repo(files, _nano_spec(["train.py", "config/small.py"]))

    out = cli("run", "-t", "t", "-n", "3", cwd=repo, timeout=120)

    assert out.returncode == 0, out.stdout + out.stderr
    cands = [r for r in rows(repo, "t") if not r["is_baseline"]]
    assert cands and not any("the edit" in r["reason"] for r in cands)
    for r in cands:
        proposed = json.loads(r["knobs"])["learning_rate"]
        assert json.loads(r["runtime_knobs"])["learning_rate"] == proposed
        assert git(repo, "show", f"{r['commit_sha']}:config/small.py").count(
            f"learning_rate = {proposed}") == 1


def test_run_says_when_the_script_ignores_the_budget(make_repo, cli) -> None:
    files = {**nanogpt_like(), "data/tiny/train.bin": "committed here, not ignored"}
    del files[".gitignore"]
    repo = make_repo(files, _nano_spec(["train.py", "config/small.py"]))
    out = cli("run", "-t", "t", "-n", "1", cwd=repo, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "never read OVERNIGHT_BUDGET_SECONDS: a run lasts as long as the script decides, " \
           "up to timeout_seconds (30 s)" in out.stdout

    reads = make_repo({"train.py": train_py()}, spec_toml())
    out = cli("run", "-t", "t", "-n", "1", cwd=reads, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "never read" not in out.stdout
