"""LLM proposer against real HTTP servers on loopback that speak the chat-completions and the
messages APIs. The only fake is the model: each server answers from a script."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from overnight.errors import ConfigError
from overnight.proposers.base import Context, Experiment, Usage, fingerprint
from overnight.proposers.edits import knob_values
from overnight.proposers.llm import LLMError, LLMProposer
from overnight.proposers.prompt import (
    PromptLimits,
    PromptTooLarge,
    build_messages,
    estimate_tokens,
    task_prompt,
)
from overnight.spec import Spec, parse_spec

PROGRAM = "# Research notes\n\nMake val_loss small. The secret word is MARMALADE.\n"
TRAIN = """\
import time

LEARNING_RATE = 0.002
WARMUP = 10

loss = 1.0 + abs(LEARNING_RATE - 0.004) * 100

# overnight: protect
print(f"val_loss: {loss:.6f}")
# overnight: end
"""
FILES = {"train.py": TRAIN}


def with_lr(lr: str) -> dict[str, str]:
    return {"train.py": TRAIN.replace("LEARNING_RATE = 0.002", f"LEARNING_RATE = {lr}")}


def lr_answer(lr: str, hypothesis: str = "a higher learning rate learns faster",
              description: str = "") -> str:
    return f"""\
Hypothesis: {hypothesis}
Description: {description or f"LEARNING_RATE -> {lr}"}

train.py
```python
<<<<<<< SEARCH
LEARNING_RATE = 0.002
=======
LEARNING_RATE = {lr}
>>>>>>> REPLACE
```
"""


# --- the fake model's servers ----------------------------------------------------------------


@dataclass
class Step:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False  # close the connection without answering
    delay: float = 0.0  # a slow model: seconds before the answer


@dataclass
class Received:
    path: str
    headers: dict[str, str]  # names in lower case
    body: dict[str, Any]


class FakeAPI:
    """A real HTTP server on 127.0.0.1 answering POSTs from a script, recording each request."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.script: list[Step] = []
        self.received: list[Received] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                api.received.append(Received(self.path, headers, json.loads(raw)))
                step = api.script.pop(0) if api.script else Step(500, {"error": "no script"})
                time.sleep(step.delay)
                if step.drop:
                    self.close_connection = True
                    return
                data = step.body if isinstance(step.body, bytes) else json.dumps(step.body)
                data = data.encode() if isinstance(data, str) else data
                self.send_response(step.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in step.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass  # keep the test output clean

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.01,),
                                       daemon=True)  # short poll: fast shutdown
        self.thread.start()

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}" + ("/v1" if self.kind == "openai" else "")

    def answer(self, text: str, tokens_in: int = 1000, tokens_out: int = 200,
               cut_off: bool = False) -> None:
        if self.kind == "openai":
            body = {"id": "x", "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "length" if cut_off else "stop"}],
                    "usage": {"prompt_tokens": tokens_in, "completion_tokens": tokens_out}}
        else:
            body = {"id": "msg", "type": "message", "role": "assistant",
                    "content": [{"type": "text", "text": text}],
                    "stop_reason": "max_tokens" if cut_off else "end_turn",
                    "usage": {"input_tokens": tokens_in, "output_tokens": tokens_out}}
        self.script.append(Step(200, body))

    def error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self.script.append(Step(status, {"error": {"type": "x", "message": message}},
                                headers or {}))

    def drop(self) -> None:
        self.script.append(Step(drop=True))

    def user_messages(self, i: int) -> list[str]:
        """The user turns of request i (for either API)."""
        return [m["content"] for m in self.received[i].body["messages"] if m["role"] == "user"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def openai_api() -> Iterator[FakeAPI]:
    api = FakeAPI("openai")
    yield api
    api.close()


@pytest.fixture
def anthropic_api() -> Iterator[FakeAPI]:
    api = FakeAPI("anthropic")
    yield api
    api.close()


# --- specs and contexts ----------------------------------------------------------------------


def make_spec(base_url: str | None, provider: str = "openai", **llm: Any) -> Spec:
    section = {"provider": provider, "model": "test-model", "retries": 3, **llm}
    if base_url is not None:
        section["base_url"] = base_url
    return parse_spec({
        "objective": {"metric": "val_loss", "direction": "lower", "min_delta": 0.001},
        "run": {"command": "python train.py"},
        "files": {"editable": ["train.py"], "protected": ["prepare.py"]},
        "proposer": {"kind": "llm"},
        "llm": section,
    })


def proposer(api: FakeAPI, sleeps: list[float] | None = None, environ: dict[str, str] | None
             = None, **llm: Any) -> LLMProposer:
    env = {"OPENAI_API_KEY": "sk-test", "ANTHROPIC_API_KEY": "ak-test"} if environ is None \
        else environ
    spec = make_spec(api.base_url, provider=api.kind, **llm)
    record = sleeps.append if sleeps is not None else (lambda s: None)
    return LLMProposer(spec, env, sleep=record, backoff_base=0.001)


def experiment(id: int, status: str, metric: float | None, files: dict[str, str],
               description: str, **kw: Any) -> Experiment:
    return Experiment(id, f"c{id}", "c0", status, metric, description, knob_values(files),
                      fingerprint=fingerprint(files), **kw)


def rich_context(n_old: int = 0, log_tail: str = "") -> Context:
    """Baseline #0, kept #1 (the incumbent), a crash, a discard whose runtime knobs differ,
    `n_old` old discards in between, one running experiment, two notes from the user."""
    base = Experiment(0, "c0", None, "keep", 1.2, "baseline", knob_values(with_lr("0.001")),
                      is_baseline=True, fingerprint=fingerprint(with_lr("0.001")))
    # Older is worse here, so that the oldest are not among the best few either.
    old = [experiment(10 + i, "discard", 1.5 - i / 1000, with_lr(f"0.0{i + 100}"),
                      f"old idea {i}", hypothesis=f"old hypothesis number {i}", delta=0.1)
           for i in range(n_old)]
    inc = experiment(500, "keep", 1.1, FILES, "LEARNING_RATE 0.001 -> 0.002",
                     hypothesis="lr 0.001 is too low for a short run", delta=-0.1)
    crash = experiment(501, "crash", None, with_lr("0.5"), "LEARNING_RATE -> 0.5",
                       hypothesis="much higher lr", reason="exit status 1",
                       log_tail=log_tail or "Traceback...\nRuntimeError: loss is NaN")
    disc = experiment(502, "discard", 1.15, with_lr("0.003"), "LEARNING_RATE -> 0.003",
                      hypothesis="a bit higher still", delta=0.05,
                      runtime_knobs={"LEARNING_RATE": 0.0029, "WARMUP": 10})
    running = experiment(503, "running", None, {"train.py": TRAIN.replace("10", "20")},
                         "WARMUP 10 -> 20", hypothesis="longer warmup stabilizes training")
    history = [base, *old, inc, crash, disc, running]
    return Context(
        incumbent=inc, files=dict(FILES), history=history, in_flight=[running],
        direction="lower", slots=2, metric="val_loss", min_delta=0.001, budget_seconds=300,
        hardware="NVIDIA H100 80GB HBM3", program=PROGRAM, protected=("prepare.py",),
        notes=("try schedules, not just the learning rate", "stop changing WARMUP"),
        tried=frozenset(e.fingerprint for e in history),
    )


# --- proposals -------------------------------------------------------------------------------


def test_valid_answer_makes_a_proposal(openai_api: FakeAPI) -> None:
    openai_api.answer(lr_answer("0.004"), tokens_in=1000, tokens_out=200)
    p = proposer(openai_api, price_input_per_mtok=2.0, price_output_per_mtok=10.0)
    proposal = p.propose(rich_context())

    assert not proposal.rejected
    assert proposal.parent == "c500"
    assert proposal.edits == with_lr("0.004")
    assert proposal.hypothesis == "a higher learning rate learns faster"
    assert proposal.description == "LEARNING_RATE -> 0.004"
    assert proposal.knobs == {"LEARNING_RATE": 0.004, "WARMUP": 10}
    assert proposal.usage == Usage(1000, 200, pytest.approx(0.004), 1)
    assert proposal.notes == ()
    (req,) = openai_api.received
    assert req.path == "/v1/chat/completions"
    assert req.headers["authorization"] == "Bearer sk-test"
    assert req.body["model"] == "test-model"
    assert req.body["temperature"] == 0.7 and req.body["max_tokens"] == 4096
    assert [m["role"] for m in req.body["messages"]] == ["system", "user"]
    assert "<<<<<<< SEARCH" in req.body["messages"][0]["content"]


def test_prompt_carries_program_files_history_in_flight_and_notes(openai_api: FakeAPI) -> None:
    openai_api.answer(lr_answer("0.004"))
    proposer(openai_api).propose(rich_context())
    (user,) = openai_api.user_messages(0)

    assert "MARMALADE" in user  # program.md
    assert "Minimize `val_loss`" in user and "0.001 (min_delta)" in user
    assert "300 s" in user and "NVIDIA H100 80GB HBM3" in user
    assert TRAIN in user  # the file in full
    assert "Protected in train.py: lines 8-10" in user
    assert "## Read-only files" in user
    assert "### prepare.py (protected; not a file at this commit: not shown)" in user
    assert "Baseline: #0, val_loss = 1.2" in user
    assert "Incumbent (the best so far; your change applies to it): #500, val_loss = 1.1" in user
    assert "#501 crash" in user and "RuntimeError: loss is NaN" in user  # the log tail
    assert "LEARNING_RATE=0.0029 (proposed 0.003)" in user  # runtime differs from proposed
    assert "WARMUP=10" not in user  # same as proposed: not shown
    assert "- #502 [discard, Δ +0.05] a bit higher still" in user  # the hypothesis log
    running = user.index("## Queued or running right now")
    assert "propose something different" in user[running:].lower()
    assert "#503 running: WARMUP 10 -> 20" in user[running:]
    notes = user.index("## Notes from the user")
    assert user.index("try schedules", notes) < user.index("stop changing WARMUP", notes)


def test_diff_answer(openai_api: FakeAPI) -> None:
    openai_api.answer("""\
Hypothesis: a longer warmup helps
Description: WARMUP 10 -> 15

```diff
--- a/train.py
+++ b/train.py
@@ -3,2 +3,2 @@
 LEARNING_RATE = 0.002
-WARMUP = 10
+WARMUP = 15
```
""")
    proposal = proposer(openai_api).propose(rich_context())
    assert proposal.edits == {"train.py": TRAIN.replace("WARMUP = 10", "WARMUP = 15")}
    assert proposal.description == "WARMUP 10 -> 15"


def test_malformed_answer_is_sent_back_then_a_good_one(openai_api: FakeAPI) -> None:
    bad = "Hypothesis: raise the learning rate\nI would set LEARNING_RATE to 0.004."
    openai_api.answer(bad, tokens_in=900, tokens_out=20)
    openai_api.answer(lr_answer("0.004"), tokens_in=1100, tokens_out=150)
    proposal = proposer(openai_api).propose(rich_context())

    assert proposal.edits == with_lr("0.004")
    assert len(openai_api.received) == 2
    second = openai_api.received[1].body["messages"]
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
    assert second[2]["content"] == bad
    assert "could not be used" in second[3]["content"] and "no edits" in second[3]["content"]
    assert proposal.usage == Usage(2000, 170, 0.0, 2)
    assert len(proposal.notes) == 1 and "no edits" in proposal.notes[0]


def test_protected_file_is_sent_back_then_rejected(openai_api: FakeAPI) -> None:
    cheat = """\
Hypothesis: an easier dataset
Description: shrink the data

prepare.py
<<<<<<< SEARCH
DATA = 'full'
=======
DATA = 'tiny'
>>>>>>> REPLACE
"""
    for _ in range(3):
        openai_api.answer(cheat, tokens_in=100, tokens_out=10)
    proposal = proposer(openai_api, answer_tries=3).propose(rich_context())

    assert len(openai_api.received) == 3
    for i in (1, 2):
        assert "prepare.py is protected" in openai_api.user_messages(i)[-1]
    assert proposal.rejected.startswith("no usable answer in 3 tries")
    assert "prepare.py is protected" in proposal.rejected
    assert proposal.edits == {}
    assert proposal.hypothesis == "an easier dataset"
    assert proposal.usage == Usage(300, 30, 0.0, 3)
    assert len(proposal.notes) == 3


def test_protected_region_is_sent_back(openai_api: FakeAPI) -> None:
    openai_api.answer("""\
Hypothesis: print more digits
Description: d

train.py
<<<<<<< SEARCH
print(f"val_loss: {loss:.6f}")
=======
print(f"val_loss: {loss * 0.5:.6f}")
>>>>>>> REPLACE
""")
    openai_api.answer(lr_answer("0.004"))
    proposal = proposer(openai_api).propose(rich_context())
    assert proposal.edits == with_lr("0.004")
    feedback = openai_api.user_messages(1)[-1]
    assert "protected region of train.py at lines 8-10" in feedback


def test_duplicate_is_sent_back_naming_the_experiment(openai_api: FakeAPI) -> None:
    openai_api.answer(lr_answer("0.003"))  # exactly what #502 tried
    openai_api.answer(lr_answer("0.0035"))
    proposal = proposer(openai_api).propose(rich_context())
    assert proposal.edits == with_lr("0.0035")
    feedback = openai_api.user_messages(1)[-1]
    assert "duplicate" in feedback and "#502" in feedback


def test_no_change_and_syntax_errors_are_sent_back(openai_api: FakeAPI) -> None:
    openai_api.answer(lr_answer("0.002"))  # the same value: no change
    openai_api.answer(lr_answer("0.004 +"))  # not Python any more
    proposal = proposer(openai_api, answer_tries=2).propose(rich_context())
    assert "change nothing" in openai_api.user_messages(1)[-1]
    assert "not valid Python" in proposal.rejected
    assert "change nothing" in openai_api.user_messages(1)[-1]


def test_cut_off_answer_says_so(openai_api: FakeAPI) -> None:
    openai_api.answer("Hypothesis: x\n\ntrain.py\n<<<<<<< SEARCH\nLEARNING_RATE", cut_off=True)
    openai_api.answer(lr_answer("0.004"))
    proposer(openai_api).propose(rich_context())
    assert "cut off at 4096 tokens" in openai_api.user_messages(1)[-1]


def test_trace_is_written(openai_api: FakeAPI, tmp_path: Path) -> None:
    openai_api.answer("no edits here")
    openai_api.answer(lr_answer("0.004"))
    spec = make_spec(openai_api.base_url)
    p = LLMProposer(spec, {}, trace_dir=tmp_path / "trace", sleep=lambda s: None)
    p.propose(rich_context())
    (path,) = (tmp_path / "trace").iterdir()
    trace = json.loads(path.read_text())
    assert trace["answers"] == ["no edits here", lr_answer("0.004")]
    assert len(trace["requests"]) == 2 and len(trace["errors"]) == 1


# --- HTTP: retries and errors ----------------------------------------------------------------


def test_429_with_retry_after_then_success(openai_api: FakeAPI) -> None:
    openai_api.error(429, "slow down", headers={"Retry-After": "0"})
    openai_api.answer(lr_answer("0.004"))
    sleeps: list[float] = []
    proposal = proposer(openai_api, sleeps).propose(rich_context())
    assert proposal.edits == with_lr("0.004")
    assert len(openai_api.received) == 2
    assert sleeps == [0.0]  # Retry-After honoured
    assert proposal.usage.requests == 1  # only answers count


def test_500_and_dropped_connection_are_retried_with_backoff(openai_api: FakeAPI) -> None:
    openai_api.error(500, "overloaded")
    openai_api.drop()
    openai_api.answer(lr_answer("0.004"))
    sleeps: list[float] = []
    proposal = proposer(openai_api, sleeps).propose(rich_context())
    assert proposal.edits == with_lr("0.004")
    assert len(openai_api.received) == 3
    # Exponential backoff with jitter from a 1 ms base: [0.5, 1] ms, then [1, 2] ms.
    assert 0.0005 <= sleeps[0] <= 0.001 and 0.001 <= sleeps[1] <= 0.002


def test_retries_run_out(openai_api: FakeAPI) -> None:
    for _ in range(3):
        openai_api.error(503, "down for maintenance")
    with pytest.raises(LLMError, match="failed 3 times.*503: down for maintenance"):
        proposer(openai_api, retries=2).propose(rich_context())
    assert len(openai_api.received) == 3


def test_400_is_a_clear_error_without_retries(openai_api: FakeAPI) -> None:
    openai_api.error(400, "max_tokens is too large for this model")
    openai_api.answer(lr_answer("0.004"))  # never asked for
    with pytest.raises(LLMError, match="HTTP 400: max_tokens is too large for this model") as e:
        proposer(openai_api).propose(rich_context())
    assert not isinstance(e.value, ConfigError)  # the scheduler records it, the loop goes on
    assert len(openai_api.received) == 1


def test_401_names_the_key_and_stops_the_loop(openai_api: FakeAPI) -> None:
    openai_api.error(401, "invalid api key")
    with pytest.raises(ConfigError, match="check OPENAI_API_KEY") as e:
        proposer(openai_api).propose(rich_context())
    assert e.value.exit_code == 2 and len(openai_api.received) == 1


# --- configuration ---------------------------------------------------------------------------


def test_openai_base_url_and_key_from_the_environment(openai_api: FakeAPI) -> None:
    openai_api.answer(lr_answer("0.004"))
    p = LLMProposer(make_spec(None), {"OPENAI_BASE_URL": openai_api.base_url},
                    sleep=lambda s: None)
    assert p.propose(rich_context()).edits == with_lr("0.004")
    assert "authorization" not in openai_api.received[0].headers  # a local server: no key


def test_openai_itself_needs_a_key() -> None:
    with pytest.raises(ConfigError, match="OPENAI_API_KEY") as e:
        LLMProposer(make_spec(None), {})
    assert e.value.exit_code == 2


def test_anthropic_messages_api(anthropic_api: FakeAPI) -> None:
    anthropic_api.answer(lr_answer("0.004"), tokens_in=3000, tokens_out=300)
    p = proposer(anthropic_api, temperature=1.5, price_input_per_mtok=3.0,
                 price_output_per_mtok=15.0)
    proposal = p.propose(rich_context())

    assert proposal.edits == with_lr("0.004")
    assert proposal.usage == Usage(3000, 300, pytest.approx(0.009 + 0.0045), 1)
    (req,) = anthropic_api.received
    assert req.path == "/v1/messages"
    assert req.headers["x-api-key"] == "ak-test"
    assert req.headers["anthropic-version"] == "2023-06-01"
    body = req.body
    assert body["model"] == "test-model" and body["max_tokens"] == 4096
    assert body["temperature"] == 1.0  # the messages API's maximum
    assert "<<<<<<< SEARCH" in body["system"]
    assert [m["role"] for m in body["messages"]] == ["user"]
    assert "MARMALADE" in body["messages"][0]["content"]


def test_anthropic_follow_up_keeps_the_conversation(anthropic_api: FakeAPI) -> None:
    anthropic_api.answer("nothing useful")
    anthropic_api.answer(lr_answer("0.004"))
    proposer(anthropic_api).propose(rich_context())
    roles = [m["role"] for m in anthropic_api.received[1].body["messages"]]
    assert roles == ["user", "assistant", "user"]


def test_anthropic_without_a_key_is_a_config_error(anthropic_api: FakeAPI) -> None:
    spec = make_spec(anthropic_api.base_url, provider="anthropic")
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY") as e:
        LLMProposer(spec, {"OPENAI_API_KEY": "sk-test"})
    assert e.value.exit_code == 2


# --- fitting the context window --------------------------------------------------------------


def test_small_context_drops_the_oldest_history_first(openai_api: FakeAPI) -> None:
    ctx = rich_context(n_old=150)
    full = "\n".join(build_messages(ctx, PromptLimits(1_000_000, 1000)))
    assert "old hypothesis number 0" in full and "old hypothesis number 149" in full

    openai_api.answer(lr_answer("0.004"))
    proposer(openai_api, context_tokens=4000, max_tokens=1000).propose(ctx)
    system, user = (m["content"] for m in openai_api.received[0].body["messages"])
    assert estimate_tokens(system) + estimate_tokens(user) <= 3000
    assert "old hypothesis number 0]" not in user and "old hypothesis number 0\n" not in user
    assert "old hypothesis number 149" in user  # the newest stay
    assert "older experiments are left out" in user
    assert TRAIN in user and "MARMALADE" in user  # never trimmed
    assert "RuntimeError: loss is NaN" in user  # tails are shortened only after the history


def test_log_tails_are_shortened_after_old_history() -> None:
    tail = "\n".join(f"log line {i}" for i in range(150))
    ctx = rich_context(n_old=20, log_tail=tail)
    _, roomy = build_messages(ctx, PromptLimits(100_000, 1000))
    assert "log line 0\n" in roomy and "old hypothesis number 0\n" in roomy
    shortened = 0
    for context_tokens in range(8000, 1500, -50):
        try:
            _, user = build_messages(ctx, PromptLimits(context_tokens, 1000))
        except PromptTooLarge:
            break
        if "log line 0\n" not in user:  # the tail was shortened or dropped...
            assert "old hypothesis number 0\n" not in user  # ...only once the oldest were gone
            assert "old hypothesis number 5\n" not in user
            shortened += "log line 149" in user
    assert shortened  # some budget kept the tail's end


def test_files_that_do_not_fit_are_an_error(openai_api: FakeAPI) -> None:
    huge = TRAIN + "".join(f"# padding line {i}\n" for i in range(2000))
    ctx = replace(rich_context(), files={"train.py": huge})
    with pytest.raises(PromptTooLarge, match=r"context_tokens \(4000\)"):
        proposer(openai_api, context_tokens=4000, max_tokens=1000).propose(ctx)
    assert openai_api.received == []


def test_task_prompt_for_agents() -> None:
    prompt = task_prompt(rich_context())
    assert "MARMALADE" in prompt and TRAIN in prompt
    assert "in place" in prompt and "Hypothesis:" in prompt and "Description:" in prompt
    assert "#503 running" in prompt and "stop changing WARMUP" in prompt
    # Too long for a command line: the files are left for the agent to read.
    huge = TRAIN + "".join(f"# padding line {i}\n" for i in range(2000))
    ctx = replace(rich_context(), files={"train.py": huge})
    short = task_prompt(ctx, max_chars=20_000)
    assert len(short) <= 20_000
    assert "padding line" not in short and "read train.py in your current directory" in short
