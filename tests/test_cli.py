"""The `overnight` command as a user runs it: errors, exports, show, diff, status, init."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import (
    cli_environ,
    create_repo,
    git,
    rows,
    run_cli,
    spec_toml,
    train_py,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TAG = "t"


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository after a finished grid run: keep, discard, keep, keep, discard."""
    repo = create_repo(tmp_path_factory.mktemp("done") / "repo",
                       {"train.py": train_py(0.001)}, spec_toml("grid"))
    out = run_cli("run", "-t", TAG, "-n", "20", cwd=repo)
    assert out.returncode == 0, out.stderr
    assert [r["status"] for r in rows(repo, TAG)] == [
        "keep", "discard", "keep", "keep", "discard"]
    return repo


def by_lr(repo: Path, lr: float) -> dict:
    return next(r for r in rows(repo, TAG) if json.loads(r["knobs"])["LEARNING_RATE"] == lr)


# -- bad input: exit code 2 and a message that says what to fix -------------------------------


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("budget_seconds = 5", "budget_secs = 5", "[run] budget_secs is not a known key"),
        ("budget_seconds = 5", 'budget_seconds = "fast"', "[run] budget_seconds"),
        ("budget_seconds = 5", "budget_seconds = 0", "[run] budget_seconds"),
        ("budget_seconds = 5", "budget_seconds = -5", "[run] budget_seconds"),
        ('direction = "lower"', 'direction = "down"', "[objective] direction"),
        ('metric = "val_loss"', "", "[objective] metric is required"),
    ],
    ids=["unknown-key", "wrong-type", "zero-budget", "negative-budget", "bad-choice",
         "missing-key"],
)
def test_bad_spec_exits_2_naming_the_key(make_repo, cli, old, new, expected):
    toml = spec_toml("grid")
    assert old in toml
    repo = make_repo({"train.py": train_py()}, toml.replace(old, new))
    out = cli("run", "-n", "1", cwd=repo)
    assert out.returncode == 2
    assert "overnight.toml" in out.stderr
    assert expected in out.stderr
    assert "Traceback" not in out.stderr
    assert rows(repo) == []  # nothing ran


def test_invalid_toml_exits_2(make_repo, cli):
    repo = make_repo({"train.py": train_py()}, spec_toml("grid") + "[[[\n")
    out = cli("run", "-n", "1", cwd=repo)
    assert out.returncode == 2
    assert "not valid TOML" in out.stderr


def test_not_a_git_repository_exits_2(tmp_path, cli):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "train.py").write_text(train_py())
    (plain / "overnight.toml").write_text(spec_toml("grid"))
    out = cli("run", "-n", "1", cwd=plain)
    assert out.returncode == 2
    assert "git" in out.stderr.lower()
    assert "not inside a git repository" in out.stderr
    assert not (plain / ".overnight").exists()


def test_uncommitted_change_in_an_editable_file_exits_2(make_repo, cli):
    repo = make_repo({"train.py": train_py()}, spec_toml("grid"))
    (repo / "train.py").write_text(train_py(0.01))
    out = cli("run", "-n", "1", cwd=repo)
    assert out.returncode == 2
    assert "uncommitted" in out.stderr
    assert "train.py" in out.stderr
    assert rows(repo) == []
    assert (repo / "train.py").read_text() == train_py(0.01)  # the user's edit is left alone


def test_baseline_that_crashes_exits_2_and_shows_the_log_tail(make_repo, cli):
    crash = ('print("[rank0]: CUDA out of memory at step 3", file=sys.stderr)\n'
             'raise RuntimeError("loss exploded")\n')
    repo = make_repo({"train.py": train_py(0.001, crash)}, spec_toml("grid"))
    out = cli("run", "-t", TAG, "-n", "3", cwd=repo)
    assert out.returncode == 2
    assert "baseline" in out.stderr
    assert "exit code 1" in out.stderr
    assert "RuntimeError: loss exploded" in out.stderr
    assert "[rank0]: CUDA out of memory at step 3" in out.stderr  # the log, verbatim
    assert [r["status"] for r in rows(repo, TAG)] == ["crash"]  # no candidate was tried


def test_a_baseline_without_the_metric_exits_2_saying_what_to_print(make_repo, cli):
    repo = make_repo({"train.py": "print('done training')\n"
                                  "LEARNING_RATE = 0.1\n"}, spec_toml("grid"))
    out = cli("run", "-t", TAG, "-n", "3", cwd=repo)
    assert out.returncode == 2
    assert "no val_loss in the output" in out.stderr
    assert "done training" in out.stderr


# -- export ------------------------------------------------------------------------------


def test_export_tsv_has_the_autoresearch_columns(done, cli):
    out = cli("export", "--format", "tsv", "-t", TAG, cwd=done)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "commit\tval_loss\tmemory_gb\tstatus\tdescription"
    rs = rows(done, TAG)
    assert len(lines) == 1 + len(rs)
    for line, r in zip(lines[1:], rs, strict=True):
        commit, metric, memory, status, description = line.split("\t")
        # A keep: the commit on the branch (autoresearch's meaning); else the candidate's.
        named = r["kept_commit"] if r["status"] == "keep" else r["commit_sha"]
        assert commit == named[:7]
        assert float(metric) == pytest.approx(r["metric"])
        assert float(memory) >= 0
        assert status == r["status"]
        assert description == r["description"]
    assert lines[1].split("\t")[1:4:2] == ["1.300000", "keep"]
    assert lines[3].split("\t")[4] == "LEARNING_RATE 0.001 -> 0.002"


def test_export_to_a_file(done, cli, tmp_path):
    target = tmp_path / "results.tsv"
    out = cli("export", "-o", str(target), "-t", TAG, cwd=done)
    assert out.returncode == 0, out.stderr
    assert f"wrote {len(rows(done, TAG))} decided candidates" in out.stderr
    assert target.read_text().startswith("commit\tval_loss\tmemory_gb\tstatus\tdescription\n")


def test_export_jsonl_has_every_field(done, cli):
    out = cli("export", "--format", "jsonl", "-t", TAG, cwd=done)
    assert out.returncode == 0, out.stderr
    objs = [json.loads(line) for line in out.stdout.splitlines()]
    rs = rows(done, TAG)
    assert len(objs) == len(rs)
    for obj, r in zip(objs, rs, strict=True):
        assert set(r) <= set(obj), f"missing fields: {set(r) - set(obj)}"
        for key in ("id", "tag", "status", "commit_sha", "parent", "kept_commit", "metric",
                    "delta", "retry_of", "started_at", "finished_at", "description"):
            assert obj[key] == r[key]
        assert obj["knobs"] == json.loads(r["knobs"])
        assert obj["metrics"] == json.loads(r["metrics"])
        assert obj["duration_s"] == pytest.approx(r["finished_at"] - r["started_at"])


# -- show, diff, status ---------------------------------------------------------------------


def test_show_prints_status_metrics_and_the_diff(done, cli):
    r = by_lr(done, 0.002)
    out = cli("show", str(r["id"]), cwd=done)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"experiment #{r['id']} ({TAG})" in text
    assert "status       keep" in text
    assert "LEARNING_RATE 0.001 -> 0.002" in text
    assert "val_loss     1.200000  (delta -0.100000)" in text
    assert "-LEARNING_RATE = 0.001" in text
    assert "+LEARNING_RATE = 0.002" in text
    assert r["commit_sha"] in text
    assert f"kept as      {r['kept_commit']} on overnight/{TAG}" in text


def test_show_an_unknown_experiment_exits_2(done, cli):
    out = cli("show", "999", cwd=done)
    assert out.returncode == 2
    assert "no experiment #999" in out.stderr


def test_diff_prints_the_knob_change_as_a_unified_diff(done, cli):
    r = by_lr(done, 0.0005)  # a discarded one: its change is still there to read
    out = cli("diff", str(r["id"]), cwd=done)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "diff --git a/train.py b/train.py"
    assert "--- a/train.py" in lines and "+++ b/train.py" in lines
    assert any(line.startswith("@@ ") for line in lines)
    changed = [ln for ln in lines if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]
    assert changed == ["-LEARNING_RATE = 0.001", "+LEARNING_RATE = 0.0005"]
    # It is a real patch: it applies to the parent and gives the candidate.
    base = rows(done, TAG)[0]["commit_sha"]
    assert git(done, "diff", base, r["commit_sha"]) == out.stdout.rstrip("\n")


def test_diff_of_the_baseline_says_so(done, cli):
    out = cli("diff", str(rows(done, TAG)[0]["id"]), cwd=done)
    assert out.returncode == 0
    assert "is the baseline" in out.stderr
    assert out.stdout.strip() == ""


def test_status_shows_baseline_and_best(done, cli):
    rs = rows(done, TAG)
    best = by_lr(done, 0.004)
    out = cli("status", cwd=done)  # the most recent tag by default
    assert out.returncode == 0, out.stderr
    assert f"tag {TAG}: 5 runs: 5 candidates, 0 repeats" in out.stdout
    assert "candidates  discard 2, keep 3" in out.stdout
    assert f"baseline    #{rs[0]['id']}  val_loss 1.300000\n" in out.stdout  # one run: no ±
    assert f"best        #{best['id']}  val_loss 1.000000  (" in out.stdout
    assert "greedy judging: each keep beat its incumbent on one run" in out.stdout
    assert "+23.08% vs baseline, 2 kept improvements" in out.stdout
    assert f"overnight/{TAG} at {best['kept_commit'][:10]}" in out.stdout


def test_status_of_an_unknown_tag_exits_2(done, cli):
    out = cli("status", "-t", "nope", cwd=done)
    assert out.returncode == 2
    assert "no experiments with tag 'nope'" in out.stderr


# -- init ------------------------------------------------------------------------------


def test_init_writes_a_spec_that_runs(make_repo, cli):
    repo = make_repo({"train.py": train_py(0.001), "prepare.py": "DATA = 'here'\n"})
    out = cli("init", cwd=repo)
    assert out.returncode == 0, out.stderr
    spec = tomllib.loads((repo / "overnight.toml").read_text())
    assert spec["objective"]["metric"] == "val_loss"
    assert spec["objective"]["direction"] == "lower"
    assert spec["files"]["editable"] == ["train.py"]
    assert spec["files"]["protected"] == ["prepare.py"]
    assert spec["run"]["budget_seconds"] > 0
    exclude = (repo / ".git" / "info" / "exclude").read_text().splitlines()
    assert exclude.count("/.overnight/") == 1
    program = (repo / "program.md").read_text()  # research instructions for a model or agent
    assert "val_loss" in program and "prepare.py" in program and "# overnight: protect" in program

    # A user commits them and runs, with the environment's `python` first on PATH.
    git(repo, "add", "overnight.toml", "program.md")
    git(repo, "commit", "-q", "-m", "spec")
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    out = cli("run", "-t", TAG, "-n", "2", cwd=repo, env={"PATH": path})
    assert out.returncode == 0, out.stderr
    assert [r["status"] for r in rows(repo, TAG)][0] == "keep"
    assert git(repo, "status", "--porcelain") == ""  # .overnight/ is ignored
    assert (repo / ".git" / "info" / "exclude").read_text().splitlines().count(
        "/.overnight/") == 1


def test_init_refuses_to_overwrite(make_repo, cli):
    repo = make_repo({"train.py": train_py()}, spec_toml("grid"))
    before = (repo / "overnight.toml").read_text()
    out = cli("init", cwd=repo)
    assert out.returncode == 2
    assert "already exists" in out.stderr
    assert (repo / "overnight.toml").read_text() == before


def test_init_outside_git_exits_2(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "train.py").write_text(train_py())
    out = run_cli("init", cwd=plain, env=cli_environ(tmp_path))
    assert out.returncode == 2
    assert "git" in out.stderr.lower()
    assert not (plain / "overnight.toml").exists()
