"""Agent proposer: a real git repository, a real subprocess standing in for the coding agent."""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest
from conftest import PYTHON, alive, create_repo, git, train_py, wait_until

from overnight.errors import ConfigError
from overnight.proposers.agent_cli import AgentProposer
from overnight.proposers.base import Context, Experiment, fingerprint
from overnight.proposers.edits import knob_values
from overnight.snapshot import Repo
from overnight.spec import Spec, parse_spec

PROGRAM = "# Toy research\n\nFind the learning rate that minimizes val_loss. Zebra-42.\n"
PREPARE = "DATA = 'tiny'\n"
TRAIN = train_py(lr=0.001, extra="# overnight: protect\nTIME_BUDGET = 5\n# overnight: end")

# The agent: argv is MODE PROMPT SEEN, where SEEN is a file that receives the prompt.
FAKE_AGENT = '''\
import os
import subprocess
import sys
import time
from pathlib import Path

mode, prompt, seen = sys.argv[1], sys.argv[2], sys.argv[3]
Path(seen).write_text(prompt)
train = Path("train.py")
if mode == "edit":
    train.write_text(train.read_text().replace("LEARNING_RATE = 0.001", "LEARNING_RATE = 0.004"))
    with open("prepare.py", "a") as f:
        f.write("DATA = 'easier'\\n")
    Path("notes.txt").write_text("my scratch notes\\n")
    print("Hypothesis: a draft idea")
    print("thinking...")
    print("Hypothesis: the optimum is near 0.004")
    print("Description: LEARNING_RATE 0.001 -> 0.004")
elif mode == "plain":
    train.write_text(train.read_text().replace("LEARNING_RATE = 0.001", "LEARNING_RATE = 0.002"))
elif mode == "nothing":
    print("I looked around and found nothing worth changing.")
elif mode == "fail":
    print("error: no API key", file=sys.stderr)
    sys.exit(3)
elif mode == "region":
    train.write_text(train.read_text().replace("TIME_BUDGET = 5", "TIME_BUDGET = 500"))
elif mode == "hang":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    Path(seen + ".pids").write_text(f"{os.getpid()} {child.pid}")
    time.sleep(120)
'''


def make_spec(command: str, timeout: float = 30) -> Spec:
    return parse_spec({
        "objective": {"metric": "val_loss", "direction": "lower"},
        # Unboxed: the fake agent reports what it saw through files of the test.
        "run": {"command": "python train.py", "kill_grace_seconds": 0.5, "sandbox": "none"},
        "files": {"editable": ["train.py"], "protected": ["prepare.py"]},
        "proposer": {"kind": "agent"},
        "agent": {"command": command, "timeout_seconds": timeout},
    })


class Setup:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = create_repo(tmp / "repo", {"train.py": TRAIN, "prepare.py": PREPARE,
                                               "program.md": PROGRAM})
        self.repo = Repo(self.root)
        self.commit = git(self.root, "rev-parse", "HEAD")
        self.script = tmp / "fake_agent.py"
        self.script.write_text(FAKE_AGENT)
        self.seen = tmp / "seen_prompt.txt"
        self.scratch = tmp / "scratch"

    def proposer(self, mode: str, timeout: float = 30) -> AgentProposer:
        command = (f"{PYTHON} {shlex.quote(str(self.script))} {mode} {{prompt}} "
                   f"{shlex.quote(str(self.seen))}")
        return AgentProposer(make_spec(command, timeout), self.repo, self.scratch)

    def context(self, history: list[Experiment] | None = None) -> Context:
        files = {"train.py": TRAIN}
        base = Experiment(0, self.commit, None, "keep", 1.3, "baseline", knob_values(files),
                          is_baseline=True, fingerprint=fingerprint(files))
        past = history or []
        return Context(
            incumbent=base, files=files, history=[base, *past], in_flight=[],
            direction="lower", slots=1, metric="val_loss", program=PROGRAM,
            protected=("prepare.py",),
            tried=frozenset({base.fingerprint, *(e.fingerprint for e in past)}),
        )


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def test_agent_edit_keeps_only_editable_changes(setup: Setup) -> None:
    proposal = setup.proposer("edit").propose(setup.context())

    assert not proposal.rejected
    assert proposal.parent == setup.commit
    assert proposal.edits == {"train.py": TRAIN.replace("0.001", "0.004")}
    assert proposal.hypothesis == "the optimum is near 0.004"  # the last one printed
    assert proposal.description == "LEARNING_RATE 0.001 -> 0.004"
    assert proposal.knobs["LEARNING_RATE"] == 0.004
    notes = "\n".join(proposal.notes)
    assert "discarded the agent's changes to prepare.py (protected)" in notes
    assert "discarded the agent's new file notes.txt" in notes
    # The prompt carried program.md, and the user's repository was never touched.
    prompt = setup.seen.read_text()
    assert "Zebra-42" in prompt
    assert "Hypothesis:" in prompt and "LEARNING_RATE = 0.001" in prompt
    assert git(setup.root, "status", "--porcelain") == ""
    # The checkout is gone; the agent's log stays next to where it was.
    assert [p for p in setup.scratch.iterdir() if p.is_dir()] == []
    logs = list(setup.scratch.glob("*.log"))
    assert len(logs) == 1 and "thinking..." in logs[0].read_text()


def test_agent_without_summary_gets_a_generated_description(setup: Setup) -> None:
    proposal = setup.proposer("plain").propose(setup.context())
    assert not proposal.rejected
    assert proposal.description == "agent edit: train.py (+1 -1 lines)"
    assert proposal.hypothesis == ""


def test_agent_that_changes_nothing_is_rejected(setup: Setup) -> None:
    proposal = setup.proposer("nothing").propose(setup.context())
    assert proposal.rejected == "the agent changed nothing"
    assert proposal.edits == {}


def test_agent_that_fails_is_rejected_with_its_output(setup: Setup) -> None:
    proposal = setup.proposer("fail").propose(setup.context())
    assert proposal.rejected == "the agent exited with status 3 and changed nothing"
    assert any("error: no API key" in n for n in proposal.notes)


def test_agent_editing_a_protected_region_is_rejected(setup: Setup) -> None:
    proposal = setup.proposer("region").propose(setup.context())
    assert proposal.rejected.startswith("the agent edits the protected region of train.py")
    assert proposal.edits == {}


def test_agent_duplicate_is_rejected(setup: Setup) -> None:
    files = {"train.py": TRAIN.replace("0.001", "0.004")}
    earlier = Experiment(5, "c5", setup.commit, "discard", 1.2, "lr 0.004", knob_values(files),
                         fingerprint=fingerprint(files))
    proposal = setup.proposer("edit").propose(setup.context([earlier]))
    assert proposal.rejected == "duplicate of experiment #5"


def test_agent_that_hangs_is_killed_with_its_group(setup: Setup) -> None:
    start = time.monotonic()
    proposal = setup.proposer("hang", timeout=1).propose(setup.context())
    elapsed = time.monotonic() - start

    assert proposal.rejected == "agent timed out after 1s"
    assert elapsed < 10
    pids = [int(p) for p in Path(str(setup.seen) + ".pids").read_text().split()]
    for pid in pids:  # the agent and the child it started
        wait_until(lambda pid=pid: not alive(pid), timeout=5, what=f"process {pid} to die")
    assert [p for p in setup.scratch.iterdir() if p.is_dir()] == []


def test_agent_section_is_required(setup: Setup) -> None:
    spec = parse_spec({
        "objective": {"metric": "val_loss"}, "run": {"command": "python train.py"},
        "files": {"editable": ["train.py"]},
    })
    with pytest.raises(ConfigError, match=r"\[agent\]"):
        AgentProposer(spec, setup.repo, setup.scratch)


def test_prompt_file_placeholder(setup: Setup) -> None:
    command = (f"{PYTHON} {shlex.quote(str(setup.script))} plain {{prompt_file}} "
               f"{shlex.quote(str(setup.seen))}")
    p = AgentProposer(make_spec(command), setup.repo, setup.scratch)
    proposal = p.propose(setup.context())
    assert proposal.edits == {"train.py": TRAIN.replace("0.001", "0.002")}
    prompt_file = Path(setup.seen.read_text())  # the agent was given a path
    assert prompt_file.parent == setup.scratch and "Zebra-42" in prompt_file.read_text()


# -- through `overnight run` --------------------------------------------------------------------

STEPPING_AGENT = '''\
import re, sys
from pathlib import Path
train = Path("train.py")
lr = float(re.search(r"LEARNING_RATE = ([0-9.e-]+)", train.read_text()).group(1))
text = re.sub(r"LEARNING_RATE = [0-9.e-]+", f"LEARNING_RATE = {lr + 0.001:.3f}",
              train.read_text())
train.write_text(text)
Path("prepare.py").write_text("DATA = 'rewritten by the agent'\\n")
print("Hypothesis: a step up in learning rate helps")
'''


def test_overnight_run_with_a_coding_agent(tmp_path: Path, cli):
    agent = tmp_path / "agent.py"
    agent.write_text(STEPPING_AGENT)
    toml = f"""\
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

[agent]
command = "{PYTHON} {agent} {{prompt}}"
timeout_seconds = 30
readable = ["{agent}"]  # the agent's own program, outside the box otherwise
"""
    repo = create_repo(tmp_path / "r", {"train.py": train_py(0.001), "prepare.py": PREPARE},
                       toml)
    out = cli("run", "-t", "a", "-n", "3", cwd=repo, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "discarded the agent's changes to prepare.py (protected)" in out.stdout
    log = git(repo, "log", "--format=%s", "overnight/a").splitlines()
    # Boxed, the agent keeps no memory between calls: it steps from the incumbent it is shown
    # (a prefetched proposal may repeat the one before it and be rejected as a duplicate).
    assert len(log) >= 2 and all(line.startswith("val_loss ") for line in log[:-1])
    assert git(repo, "show", "overnight/a:prepare.py") == PREPARE.strip()
    assert "LEARNING_RATE = 0.001" not in git(repo, "show", "overnight/a:train.py")


BOXED_AGENT = '''\
import os, sys
from pathlib import Path
repo = sys.argv[1]
print("repo visible" if os.path.exists(os.path.join(repo, "prepare.py")) else "repo hidden")
ledger = os.path.join(repo, ".overnight", "ledger.sqlite")
print("ledger visible" if os.path.exists(ledger) else "ledger hidden")
for name in ("ANTHROPIC_API_KEY", "GITHUB_TOKEN", "AWS_SECRET_ACCESS_KEY"):
    print(name, "present" if name in os.environ else "absent")
print("gpus", repr(os.environ.get("CUDA_VISIBLE_DEVICES")))
print("caps", [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")][0])
print("git ran" if os.path.exists(".git") else "no .git in the checkout")
train = Path("train.py")
train.write_text(train.read_text().replace("LEARNING_RATE = 0.001", "LEARNING_RATE = 0.003"))
'''


def test_the_agent_runs_boxed_with_only_its_own_key(setup: Setup, monkeypatch) -> None:
    """A coding agent is untrusted too: its checkout, its key, nothing of the harness."""
    script = setup.tmp / "boxed_agent.py"
    script.write_text(BOXED_AGENT)
    for name, value in (("ANTHROPIC_API_KEY", "sk-ant"), ("GITHUB_TOKEN", "ghp"),
                        ("AWS_SECRET_ACCESS_KEY", "aws")):
        monkeypatch.setenv(name, value)
    spec = parse_spec({
        "objective": {"metric": "val_loss"}, "run": {"command": "python train.py"},
        "files": {"editable": ["train.py"], "protected": ["prepare.py"]},
        "proposer": {"kind": "agent"},
        "agent": {"command": f"{PYTHON} {shlex.quote(str(script))} {setup.root}",
                  "readable": [str(script)]},
    })
    (setup.root / ".overnight").mkdir()
    (setup.root / ".overnight" / "ledger.sqlite").write_text("the truth")
    setup.scratch = setup.root / ".overnight" / "scratch"
    p = AgentProposer(spec, setup.repo, setup.scratch)
    assert p.isolation == "bwrap"
    proposal = p.propose(setup.context())
    assert proposal.edits == {"train.py": TRAIN.replace("0.001", "0.003")}
    log = next(setup.scratch.glob("agent-*.log")).read_text()
    assert "repo hidden" in log and "ledger hidden" in log, log
    assert "ANTHROPIC_API_KEY present" in log
    assert "GITHUB_TOKEN absent" in log and "AWS_SECRET_ACCESS_KEY absent" in log
    assert "gpus ''" in log and "caps 0000000000000000" in log


def test_checkouts_left_by_a_killed_harness_are_swept(setup: Setup) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    setup.scratch.mkdir(parents=True)
    left = setup.scratch / f"agent-{dead.pid}-abc123"
    (left / "sub").mkdir(parents=True)
    (setup.scratch / f"agent-{dead.pid}-abc123.log").write_text("kept")
    mine = setup.scratch / f"agent-{os.getpid()}-def456"  # a live harness's: untouched
    mine.mkdir()
    p = setup.proposer("plain")
    p.propose(setup.context())
    assert not left.exists() and mine.exists()
    assert (setup.scratch / f"agent-{dead.pid}-abc123.log").exists()
