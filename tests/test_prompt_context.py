"""What a model must respect, it sees: protected and [files] context files go into the
prompt read-only; a program.md written for a stand-alone agent is reconciled with the
harness's contract, which comes first and wins."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import PYTHON, create_repo, git, rows
from shapes import PROGRAM, autoresearch_like
from test_llm import FakeAPI

from overnight.proposers.base import Context, Experiment
from overnight.proposers.prompt import PromptLimits, build_messages, program_conflicts
from overnight.spec import parse_spec, tomllib
from overnight.workspace import render_program

ANSWER = """\
Hypothesis: a lower learning rate is closer to the optimum
Description: LR 0.02 -> 0.01

train.py
<<<<<<< SEARCH
LR = 0.02                # learning rate
=======
LR = 0.01                # learning rate
>>>>>>> REPLACE
"""


def test_program_conflicts_finds_each_kind_and_nothing_in_ours() -> None:
    found = program_conflicts(PROGRAM)
    assert len(found) == 4 and any("git" in f for f in found)
    assert any("run the script" in f for f in found) and any("loop" in f for f in found)
    spec = parse_spec(tomllib.loads("""
[objective]
metric = "val_bpb"
[run]
command = "uv run train.py"
[files]
editable = ["train.py"]
protected = ["prepare.py"]
"""))
    assert program_conflicts(render_program(spec)) == []


@pytest.fixture
def api():
    server = FakeAPI("openai")
    yield server
    server.server.shutdown()


def test_the_model_sees_prepare_py_read_only_and_the_contract_first(tmp_path: Path, api,
                                                                      cli) -> None:
    files = {**autoresearch_like(), "README.md": "# Pretend GPT\nThe model is small.\n"}
    spec = f"""\
[objective]
metric = "val_bpb"
[run]
command = "{PYTHON} train.py"
budget_seconds = 5
timeout_seconds = 20
[files]
editable = ["train.py"]
protected = ["prepare.py"]
context = ["README.md"]
[judge]
mode = "greedy"
[proposer]
kind = "llm"
prefetch = 0
[llm]
model = "test-model"
base_url = "{api.base_url}"
"""
    repo = create_repo(tmp_path / "r", files, spec)
    api.answer(ANSWER)
    out = cli("run", "-t", "t", "-n", "2", cwd=repo, env={"OPENAI_API_KEY": "sk-test"},
              timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "program.md tells an agent to run its own loop" in out.stdout
    assert [r["status"] for r in rows(repo, "t")][:2] == ["keep", "keep"]
    messages = api.received[0].body["messages"]
    system, user = messages[0]["content"], messages[1]["content"]
    assert "you propose ONE experiment" in system
    # The contract before the program; the editable file before the read-only ones.
    assert user.index("the harness wins") < user.index("LOOP FOREVER")
    assert user.index("### train.py") < user.index("### prepare.py (protected, read-only)")
    assert "TIME_BUDGET = 2" in user and "def evaluate(loss_fn)" in user
    assert "### README.md (context, read-only)" in user and "The model is small." in user
    assert git(repo, "status", "--porcelain") == ""


def test_read_only_files_are_cut_largest_first_and_the_editable_file_stays_whole() -> None:
    train = "LR = 0.1\n" + "# a comment line\n" * 200
    base = Experiment(0, "c0", None, "keep", 1.0, "baseline", {"LR": 0.1}, True)
    ctx = Context(base, {"train.py": train}, [base], [], "lower", 1, metric="val_loss",
                  protected=("prepare.py",),
                  readonly={"prepare.py": "EVAL = 1\n" * 20, "big.txt": "x" * 60_000,
                            "blob.bin": None})
    system, user = build_messages(ctx, PromptLimits(context_tokens=9000, max_tokens=1000))
    assert train.strip() in user
    assert "more characters of big.txt left out to fit the context window" in user
    assert "EVAL = 1\n" * 20 in user  # the small one is whole
    assert "### blob.bin (context; not text)" in user


def test_init_says_a_program_for_a_stand_alone_agent_is_reconciled(make_repo, cli) -> None:
    repo = make_repo(autoresearch_like())
    out = cli("init", cwd=repo)
    assert out.returncode == 0, out.stderr
    assert "program.md was written for an agent that runs its own loop" in out.stdout
    assert (repo / "program.md").read_text() == PROGRAM  # the user's program is left alone
