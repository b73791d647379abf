"""What a model must respect, it sees: protected and [files] context files go into the
prompt read-only; a program.md written for a stand-alone agent is reconciled with the
harness's contract, which comes first and wins."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import PYTHON, create_repo, git, rows, train_py
from shapes import PROGRAM, autoresearch_like
from test_llm import FakeAPI

from overnight.proposers.base import Context, Experiment
from overnight.proposers.prompt import (
    PromptLimits,
    build_messages,
    estimate_tokens,
    program_conflicts,
    readonly_texts,
    task_prompt,
)
from overnight.spec import parse_spec, tomllib
from overnight.tree import FILE, SYMLINK, Tree, TreeFile
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


@pytest.mark.parametrize(("text", "kind"), [
    ("First make a branch of your own: `git checkout -b mar5`.", "git"),
    ("When it is better, `git commit -am 'lr 0.04'` and go on.", "git"),
    ("If it got worse, throw it away with git reset --hard.", "git"),
    ("Then: uv run train.py > run.log 2>&1 and read the summary.", "running the script"),
    ("Run the experiment and wait for it to finish.", "running the script"),
    ("Log every outcome as a row of results.tsv (tab-separated).", "recording results"),
    ("LOOP FOREVER: each idea, then the next.", "looping"),
    ("Once started, never stop: the human is asleep.", "looping"),
])
def test_program_conflicts_finds_each_kind_alone(text: str, kind: str) -> None:
    assert program_conflicts(text, kinds=True) == [kind]
    assert len(program_conflicts(text)) == 1  # and one line to tell the model


@pytest.mark.parametrize("command", ["uv run train.py", "python train.py",
                                     "python train.py config/train_shakespeare_char.py"])
def test_the_program_init_writes_has_no_conflicts(command: str) -> None:
    spec = parse_spec({"objective": {"metric": "val_loss"}, "run": {"command": command},
                       "files": {"editable": ["train.py", "config/x.py"],
                                 "protected": ["prepare.py"]}})
    assert program_conflicts(render_program(spec)) == []


def test_research_guidance_is_not_a_conflict() -> None:
    guidance = ("Try a deeper model before a wider one. prepare.py fixes the evaluation and "
                "the time budget: do not fight them. A commit message should say what changed. "
                "Results below 0.99 val_bpb would be remarkable; the training run is short.")
    assert program_conflicts(guidance) == []


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
    assert ("program.md tells an agent to run its own loop (git, running the script, "
            "recording results, looping)") in out.stdout
    assert [r["status"] for r in rows(repo, "t")][:2] == ["keep", "keep"]
    messages = api.received[0].body["messages"]
    system, user = messages[0]["content"], messages[1]["content"]
    assert "you propose ONE experiment" in system
    assert "These rules win over it" in system and "results.tsv" in system  # stated first
    # The contract before the program; the editable file before the read-only ones.
    assert user.index("the harness wins") < user.index("LOOP FOREVER")
    assert user.index("### train.py") < user.index("### prepare.py (protected, read-only)")
    assert "TIME_BUDGET = 2" in user and "def evaluate(loss_fn)" in user
    assert "### README.md (context, read-only)" in user and "The model is small." in user
    assert git(repo, "status", "--porcelain") == ""


def test_a_small_window_cuts_context_files_in_the_real_run(tmp_path: Path, api, cli) -> None:
    """What the scheduler reads from the commit (a long README, a link to it, binary weights)
    reaches the model within [llm] context_tokens: the editable file whole, the rest cut."""
    notes = "".join(f"Finding {i}: a longer warmup did not help at depth {i}.\n"
                    for i in range(1500))
    files = {**autoresearch_like(), "NOTES.md": notes}
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
context = ["NOTES.md", "LINKED.md", "weights.bin"]
[judge]
mode = "greedy"
[proposer]
kind = "llm"
prefetch = 0
[llm]
model = "test-model"
base_url = "{api.base_url}"
context_tokens = 8000
max_tokens = 1000
"""
    repo = create_repo(tmp_path / "r", files, spec)
    (repo / "LINKED.md").symlink_to("NOTES.md")
    (repo / "weights.bin").write_bytes(bytes(range(256)) * 4)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "notes and weights")
    api.answer(ANSWER)
    out = cli("run", "-t", "t", "-n", "2", cwd=repo, env={"OPENAI_API_KEY": "sk-test"},
              timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    system, user = (m["content"] for m in api.received[0].body["messages"])
    assert estimate_tokens(system) + estimate_tokens(user) <= 8000 - 1000
    assert autoresearch_like()["train.py"] in user  # whole
    assert "### prepare.py (protected, read-only)" in user and "def evaluate" in user
    assert "### weights.bin (context; not UTF-8 text: not shown)" in user
    for name in ("LINKED.md", "NOTES.md"):  # the link shows the file it leads to
        assert f"### {name} (context, read-only)" in user
        assert re.search(rf"\[\.\.\. \d+ more characters of {name} left out", user)
    assert "Finding 0: a longer warmup" in user and notes not in user


AGENT = """\
import re, sys
from pathlib import Path
prompt = Path(sys.argv[1]).read_text()
listed = "- prepare.py (protected)" in prompt
inlined = "TARGET_LR" in prompt
first = prompt.index("These rules win over it") < prompt.index("LOOP FOREVER")
target = re.search(r"TARGET_LR = ([0-9.]+)", Path("prepare.py").read_text()).group(1)
train = Path("train.py")
train.write_text(re.sub(r"LEARNING_RATE = [0-9.]+", f"LEARNING_RATE = {target}",
                        train.read_text()))
print("Hypothesis: prepare.py says where the optimum is")
print(f"Description: listed={listed} inlined={inlined} first={first} lr={target}")
"""


def test_a_boxed_agent_is_told_prepare_py_is_read_only_and_reads_it(tmp_path: Path,
                                                                     cli) -> None:
    agent = tmp_path / "agent.py"
    agent.write_text(AGENT)
    spec = f"""\
[objective]
metric = "val_loss"
[run]
command = "{PYTHON} train.py"
budget_seconds = 5
timeout_seconds = 20
[files]
editable = ["train.py"]
protected = ["prepare.py"]
[judge]
mode = "greedy"
[proposer]
kind = "agent"
prefetch = 0
[agent]
command = "{PYTHON} {agent} {{prompt_file}}"
timeout_seconds = 60
readable = ["{agent}"]
"""
    files = {"train.py": train_py(0.001), "program.md": PROGRAM,
             "prepare.py": "TARGET_LR = 0.004  # where the loss is lowest\n"}
    repo = create_repo(tmp_path / "r", files, spec)
    out = cli("run", "-t", "a", "-n", "2", cwd=repo, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    second = rows(repo, "a")[1]
    assert second["description"] == "listed=True inlined=False first=True lr=0.004"
    assert second["status"] == "keep"


def test_read_only_files_are_cut_largest_first_and_the_editable_file_stays_whole() -> None:
    train = "LR = 0.1\n" + "# a comment line\n" * 200
    big = "".join(f"line {i} of the big notes\n" for i in range(3000))
    base = Experiment(0, "c0", None, "keep", 1.0, "baseline", {"LR": 0.1}, True)
    past = [Experiment(i, f"c{i}", "c0", "discard", 1.5, f"idea number {i}", {"LR": 0.2})
            for i in range(1, 40)]
    ctx = Context(base, {"train.py": train}, [base, *past], [], "lower", 1,
                  metric="val_loss", protected=("prepare.py",),
                  readonly={"prepare.py": "EVAL = 1\n" * 20, "big.txt": big, "blob.bin": None})
    limits = PromptLimits(context_tokens=9000, max_tokens=1000)
    system, user = build_messages(ctx, limits)
    assert estimate_tokens(system) + estimate_tokens(user) <= 8000
    assert train.strip() in user
    assert user.index("### train.py") < user.index("### big.txt")  # the editable file first
    assert "EVAL = 1\n" * 20 in user  # the small one is whole
    assert "### blob.bin (context; not UTF-8 text: not shown)" in user
    # The history went first; then big.txt was cut at a line end, as long as fits.
    assert "idea number 1\n" not in user and "older experiments are left out" in user
    m = re.search(r"\[\.\.\. (\d+) more characters of big.txt left out to fit the context "
                  r"window \.\.\.\]", user)
    assert m is not None
    shown = len(big) - int(m.group(1))
    assert big[:shown] in user and big[shown - 1] == "\n"
    assert shown > 0.6 * (8000 * 3.5 - len(system) - len(train) - 2000)  # the room is used

    # With room to spare, nothing is cut and the history is all there.
    _, roomy = build_messages(ctx, PromptLimits(context_tokens=100_000, max_tokens=1000))
    assert big in roomy and "left out" not in roomy and "idea number 1\n" in roomy


def test_an_agent_is_told_the_read_only_names_not_their_text() -> None:
    base = Experiment(0, "c0", None, "keep", 1.0, "baseline", {"LR": 0.1}, True)
    ctx = Context(base, {"train.py": "LR = 0.1\n"}, [base], [], "lower", 1, metric="val_bpb",
                  program=PROGRAM, protected=("prepare.py",),
                  readonly={"prepare.py": "def evaluate(loss_fn):\n    pass\n",
                            "README.md": "# About\n", "w.bin": None})
    prompt = task_prompt(ctx)
    assert ("- README.md (context)\n- prepare.py (protected)\n"
            "- w.bin (context) (not UTF-8 text)") in prompt
    assert "def evaluate" not in prompt and "# About" not in prompt
    assert prompt.index("These rules win over it") < prompt.index("LOOP FOREVER")


def test_readonly_texts_follow_links_inside_the_tree_only() -> None:
    tree = Tree("c", (TreeFile.of("prepare.py", FILE, b"TIME_BUDGET = 300\n"),
                      TreeFile.of("docs/guide.md", FILE, b"# Guide\n"),
                      TreeFile.of("GUIDE.md", SYMLINK, b"docs/guide.md"),
                      TreeFile.of("secrets.md", SYMLINK, b"/etc/passwd"),
                      TreeFile.of("up.md", SYMLINK, b"../outside.md"),
                      TreeFile.of("weights.bin", FILE, b"\x00\x01\x02"),
                      TreeFile.of("latin1.txt", FILE, "café".encode("latin-1"))))
    got = readonly_texts(tree, ["prepare.py", "GUIDE.md", "secrets.md", "up.md", "docs",
                                "weights.bin", "latin1.txt", "missing.py", "prepare.py"])
    assert got == {"prepare.py": "TIME_BUDGET = 300\n", "GUIDE.md": "# Guide\n",
                   "weights.bin": None, "latin1.txt": None}


def test_init_says_a_program_for_a_stand_alone_agent_is_reconciled(make_repo, cli) -> None:
    repo = make_repo(autoresearch_like())
    out = cli("init", cwd=repo)
    assert out.returncode == 0, out.stderr
    assert "program.md was written for an agent that runs its own loop" in out.stdout
    assert (repo / "program.md").read_text() == PROGRAM  # the user's program is left alone


@pytest.mark.parametrize(("context", "said"), [
    ('["../outside.md"]', "[files] context must name files by their path inside the "
                          "repository, relative to its root: '../outside.md' is not one"),
    ('["/etc/passwd"]', "'/etc/passwd' is not one"),
    ('["docs"]', "[files] context names docs, a directory: name the files in it"),
    ('["NOTES.md"]', "[files] context names NOTES.md, which is not committed at HEAD"),
])
def test_context_files_are_checked_at_start(make_repo, cli, context: str, said: str) -> None:
    spec = f"""\
[objective]
metric = "val_bpb"
[run]
command = "{PYTHON} train.py"
[files]
editable = ["train.py"]
context = {context}
[proposer]
kind = "llm"
[llm]
model = "test-model"
base_url = "http://127.0.0.1:9"
"""
    repo = make_repo({**autoresearch_like(), "docs/guide.md": "# Guide\n"}, spec)
    (repo / "NOTES.md").write_text("not committed\n")
    out = cli("run", "-t", "t", "-n", "1", cwd=repo)
    assert out.returncode == 2, out.stdout + out.stderr
    assert said in " ".join(out.stderr.split()), out.stderr
    assert rows(repo) == []
