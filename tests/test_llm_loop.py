"""`overnight run` with kind = "llm" end to end: a real HTTP server on loopback plays the
model (the one fake: its answers); everything else is the real loop, git, runs and ledger."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import PYTHON, create_repo, git, rows
from test_llm import TRAIN, FakeAPI, lr_answer

TAG = "t"
CHEAT = """\
Hypothesis: a lower reported loss
Description: report 0

train.py
<<<<<<< SEARCH
print(f"val_loss: {loss:.6f}")
=======
print("val_loss: 0.0")
>>>>>>> REPLACE
"""


def spec(base_url: str, provider: str = "openai", extra: str = "") -> str:
    return f"""\
[objective]
metric = "val_loss"
direction = "lower"

[run]
command = "{PYTHON} train.py"
budget_seconds = 5
timeout_seconds = 20

[files]
editable = ["train.py"]

[judge]
mode = "greedy"

[proposer]
kind = "llm"
prefetch = 0
{extra}

[llm]
provider = "{provider}"
model = "test-model"
base_url = "{base_url}"
answer_tries = 2
price_input_per_mtok = 2.0
price_output_per_mtok = 10.0
"""


@pytest.fixture
def api():
    server = FakeAPI("openai")
    yield server
    server.server.shutdown()


def test_a_model_proposes_the_loop_runs_and_keeps(tmp_path: Path, api: FakeAPI, cli):
    repo = create_repo(tmp_path / "r", {"train.py": TRAIN, "program.md": "Lower val_loss.\n"},
                       spec(api.base_url))
    api.answer(lr_answer("0.003"))  # better: kept
    api.answer("I think we should raise it.")  # malformed: sent back with the error...
    api.answer(lr_answer("0.0045").replace("LEARNING_RATE = 0.002\n=", "LEARNING_RATE = 0.003\n="))
    api.answer(CHEAT)  # the evaluation is a protected region: sent back, then rejected
    api.answer(CHEAT)
    # A rejected proposal ran nothing, so it does not count against -n: a fourth run follows.
    api.answer(lr_answer("0.005").replace("LEARNING_RATE = 0.002\n=",
                                          "LEARNING_RATE = 0.0045\n="))
    out = cli("run", "-t", TAG, "-n", "4", cwd=repo, env={"OPENAI_API_KEY": "sk-test"},
              timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    rs = rows(repo, TAG)
    assert [r["status"] for r in rs][:4] == ["keep", "keep", "keep", "rejected"], \
        [(r["status"], r["reason"]) for r in rs]
    assert len(rs) == 5 and rs[4]["status"] in ("keep", "discard"), rs[4]["reason"]
    assert [r["metric"] for r in rs[:3]] == [pytest.approx(1.2), pytest.approx(1.1),
                                            pytest.approx(1.05)]
    assert rs[1]["hypothesis"] == "a higher learning rate learns faster"
    assert "protected" in rs[3]["reason"] and rs[3]["commit_sha"] is None
    # Tokens and dollars, per proposal: the retried one paid for two answers.
    assert [r["tokens_in"] for r in rs][:4] == [0, 1000, 2000, 2000]
    assert rs[1]["cost_usd"] == pytest.approx(1000 * 2e-6 + 200 * 10e-6)
    # What the model was told: the program, the objective, the history, the error.
    first = api.received[0].body["messages"]
    prompt = "\n".join(m["content"] for m in first)
    assert "Lower val_loss." in prompt and "LEARNING_RATE = 0.002" in prompt
    retry = api.received[2].body["messages"]
    assert len(retry) > len(api.received[1].body["messages"])
    assert api.received[0].headers["authorization"] == "Bearer sk-test"
    later = "\n".join(m["content"] for m in api.received[3].body["messages"])
    assert "a higher learning rate learns faster" in later  # the hypothesis log
    # The branch holds the two kept changes; hypotheses and status tell the story.
    kept = sum(r["status"] == "keep" for r in rs)
    assert git(repo, "rev-list", "--count", f"overnight/{TAG}") == str(kept)
    hyp = cli("hypotheses", cwd=repo).stdout
    assert "a higher learning rate learns faster" in hyp and "rejected" in hyp
    status = cli("status", cwd=repo).stdout
    assert "tokens in" in status and "per kept improvement" in status
    traces = list((repo / ".overnight" / "llm").glob("*.json"))
    assert traces, "each conversation is kept for debugging"
    json.loads(traces[0].read_text())


def test_the_experiment_never_sees_the_api_key(tmp_path: Path, api: FakeAPI, cli):
    train = TRAIN.replace("import time", "import os, time\nprint('key', os.environ.get("
                          "'OPENAI_API_KEY'))")
    repo = create_repo(tmp_path / "r", {"train.py": train}, spec(api.base_url))
    out = cli("run", "-t", TAG, "-n", "1", cwd=repo, env={"OPENAI_API_KEY": "sk-secret"})
    assert out.returncode == 0, out.stderr
    log = Path(rows(repo, TAG)[0]["log_path"]).read_text()
    assert "key None" in log and "sk-secret" not in log


def test_a_wrong_key_stops_the_loop_with_a_clear_error(tmp_path: Path, api: FakeAPI, cli):
    repo = create_repo(tmp_path / "r", {"train.py": TRAIN}, spec(api.base_url))
    api.error(401, "invalid api key")
    out = cli("run", "-t", TAG, "-n", "3", cwd=repo, env={"OPENAI_API_KEY": "sk-wrong"})
    assert out.returncode == 2, out.stdout + out.stderr
    assert "invalid api key" in out.stderr
    assert [r["status"] for r in rows(repo, TAG)] == ["keep"]


def test_a_slow_model_keeps_the_slots_busy(tmp_path: Path, api: FakeAPI, cli):
    slow_train = TRAIN.replace("import time", "import time\ntime.sleep(1.0)")
    toml = spec(api.base_url).replace("prefetch = 0", "prefetch = 1")
    repo = create_repo(tmp_path / "r", {"train.py": slow_train}, toml)
    anchor = "loss = 1.0 + abs(LEARNING_RATE - 0.004) * 100"
    for i in range(4):  # each answer adds a line after a line no answer changes
        api.answer(f"Hypothesis: idea {i}\nDescription: note {i}\n\ntrain.py\n"
                   f"<<<<<<< SEARCH\n{anchor}\n=======\n{anchor}\nNOTE_{i} = {i}\n"
                   ">>>>>>> REPLACE\n")
        api.script[-1].delay = 0.7  # each answer takes 0.7 s
    out = cli("run", "-t", TAG, "-n", "5", cwd=repo, env={"OPENAI_API_KEY": "k"}, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    ran = [r for r in rows(repo, TAG) if r["started_at"] is not None]
    assert len(ran) == 5, [(r["status"], r["reason"]) for r in rows(repo, TAG)]
    # Once the first answer is in, the next is always ready when the slot frees up: the
    # gaps stay far below the model's 0.7 s.
    gaps = [b["started_at"] - a["finished_at"] for a, b in zip(ran[1:], ran[2:], strict=False)]
    assert max(gaps) < 0.4, gaps


def test_a_keep_decided_after_a_newer_one_is_the_incumbent(tmp_path: Path, api: FakeAPI, cli):
    """Two slots: #3 (fast) is kept first, then #2 (slow) beats it and is kept: #2 is the
    incumbent, its id notwithstanding, and the branch stays at it across a resume."""
    train = TRAIN.replace("WARMUP = 10\n",
                          "WARMUP = 10\ntime.sleep(3 if LEARNING_RATE > 0.0032 else 0.1)\n")
    toml = spec(api.base_url).replace("prefetch = 0", "max_concurrent = 1").replace(
        "[run]\n", "[run]\nparallel = 2\n")  # one proposal at a time: #2 is the first answer
    repo = create_repo(tmp_path / "r", {"train.py": train}, toml)
    api.answer(lr_answer("0.0035", hypothesis="slow and best"))  # val_loss 1.05, slow
    api.answer(lr_answer("0.003", hypothesis="fast and better"))  # 1.1, fast
    out = cli("run", "-t", TAG, "-n", "3", cwd=repo, env={"OPENAI_API_KEY": "k"}, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    rs = {r["id"]: r for r in rows(repo, TAG)}
    assert [rs[i]["status"] for i in (1, 2, 3)] == ["keep"] * 3
    assert rs[2]["decided_at"] > rs[3]["decided_at"], "the slow one was kept last"
    tip = git(repo, "rev-parse", f"overnight/{TAG}")
    assert tip == rs[2]["kept_commit"]
    assert "best        #2" in cli("status", cwd=repo).stdout
    # Resumed: the branch is where it was, and the proposer works on #2's files.
    api.answer(lr_answer("0.0038", hypothesis="a little further").replace(
        "LEARNING_RATE = 0.002\n=", "LEARNING_RATE = 0.0035\n="))
    out = cli("run", "-t", TAG, "-n", "4", cwd=repo, env={"OPENAI_API_KEY": "k"}, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    four = rows(repo, TAG)[3]
    assert four["status"] == "keep" and four["parent"] == rs[2]["commit_sha"], four
    assert git(repo, "rev-parse", f"overnight/{TAG}") == four["kept_commit"]
