"""The loop around slow proposers: prefetching, duplicates, steering notes, the cost cap."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

from conftest import create_repo, rows, spec_toml, train_py

from overnight.executors.local import LocalExecutor
from overnight.ledger import Ledger
from overnight.proposers.base import Context, Proposal, Proposer, Usage
from overnight.report import status_view
from overnight.scheduler import Loop
from overnight.snapshot import Repo
from overnight.spec import load_spec

TAG = "t"
SLOW = train_py(0.001, "time.sleep(0.8)")


class ModelLike(Proposer):
    """Stands in for a model: answers after `delay` seconds, each answer costing `cost`."""

    name = "model"
    slow = True

    def __init__(self, values: list[float], delay: float = 0.0, cost: float = 0.0):
        self.values = list(values)
        self.delay, self.cost = delay, cost
        self.contexts: list[Context] = []
        self.lock = threading.Lock()

    def propose(self, ctx: Context) -> Proposal | None:
        with self.lock:
            if not self.values:
                return None
            value = self.values.pop(0)
            self.contexts.append(ctx)
        time.sleep(self.delay)
        text = re.sub(r"LEARNING_RATE = \S+", f"LEARNING_RATE = {value}", ctx.files["train.py"])
        return Proposal(parent=ctx.incumbent.commit, edits={"train.py": text},
                        description=f"LEARNING_RATE -> {value}", hypothesis=f"try {value}",
                        usage=Usage(tokens_in=1000, tokens_out=200, cost_usd=self.cost,
                                    requests=1))


def run(repo: Path, proposer: Proposer, n: int, slots: int = 1) -> None:
    spec = load_spec(repo)
    ledger = Ledger(repo / ".overnight" / "ledger.sqlite")
    executor = LocalExecutor(slots)
    try:
        Loop(Repo(repo), spec, ledger, executor, TAG, lambda files: proposer,
             max_experiments=n).run()
    finally:
        executor.shutdown()
        ledger.close()


def test_a_slow_model_never_keeps_a_slot_waiting(tmp_path: Path):
    repo = create_repo(tmp_path / "r", {"train.py": SLOW}, spec_toml("grid"))
    proposer = ModelLike([0.002, 0.003, 0.0035, 0.005, 0.006], delay=0.6)
    run(repo, proposer, n=6)
    rs = rows(repo, TAG)
    assert [r["status"] for r in rs].count("lost") == 0 and len(rs) == 6
    # After the first proposal, each next one was prepared while the previous ran: the slot
    # goes from one experiment to the next without waiting the model's 0.6 s.
    gaps = [b["started_at"] - a["finished_at"] for a, b in zip(rs[1:], rs[2:], strict=False)]
    assert max(gaps) < 0.45, gaps


def test_in_flight_and_steering_notes_reach_the_proposer(tmp_path: Path):
    repo = create_repo(tmp_path / "r", {"train.py": SLOW}, spec_toml("grid"))
    ledger = Ledger(repo / ".overnight" / "ledger.sqlite")
    ledger.add_note("try larger learning rates")
    ledger.add_note("only for another tag", tag="other")
    ledger.close()
    (repo / "program.md").write_text("Make val_loss lower.\n")
    proposer = ModelLike([0.002, 0.003, 0.0035, 0.005, 0.006, 0.007], delay=0.1)
    run(repo, proposer, n=7, slots=2)
    ctx = proposer.contexts[-1]
    assert ctx.notes == ("try larger learning rates",)
    assert ctx.program == "Make val_loss lower.\n"
    assert ctx.metric == "val_loss" and ctx.budget_seconds == 5
    # Later proposals are asked while others run: the model sees them, to propose otherwise.
    assert any(c.in_flight for c in proposer.contexts)
    assert all(e.status in ("queued", "running") for c in proposer.contexts
               for e in c.in_flight)
    assert ctx.incumbent.fingerprint in ctx.tried


def test_a_duplicate_is_refused_before_it_runs(tmp_path: Path):
    repo = create_repo(tmp_path / "r", {"train.py": train_py(0.001)}, spec_toml("grid"))
    run(repo, ModelLike([0.002, 0.002, 0.003]), n=4)
    rs = rows(repo, TAG)
    assert [r["status"] for r in rs][2] == "rejected"
    assert rs[2]["reason"] == f"duplicate of experiment #{rs[1]['id']}: the same files were " \
                              "already tried"
    assert rs[2]["commit_sha"] is None and rs[2]["started_at"] is None


def test_the_cost_cap_stops_the_loop_cleanly(tmp_path: Path, cli):
    toml = spec_toml("grid").replace("[files]", "[proposer]\nmax_cost_usd = 1.0\n\n[files]")
    repo = create_repo(tmp_path / "r", {"train.py": train_py(0.001)}, toml)
    run(repo, ModelLike([0.002, 0.003, 0.0035, 0.005, 0.006], cost=0.4), n=10)
    rs = rows(repo, TAG)
    proposed = [r for r in rs if not r["is_baseline"]]
    assert len(proposed) == 3  # 0.4 + 0.4 + 0.4 >= 1.0: no fourth request
    assert all(r["status"] in ("keep", "discard") for r in proposed)
    assert abs(sum(r["cost_usd"] for r in rs) - 1.2) < 1e-9
    assert sum(r["tokens_in"] for r in rs) == 3000
    ledger = Ledger(repo / ".overnight" / "ledger.sqlite")
    stops = [e["message"] for e in ledger.events(TAG) if e["kind"] == "stop"]
    spec = load_spec(repo)
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(status_view(ledger, TAG, spec.objective))
    ledger.close()
    assert "max_cost_usd" in stops[-1]
    text = console.export_text()
    assert "3,000 tokens in, 600 out, $1.20" in text
    kept = len([r for r in rs if r["status"] == "keep"]) - 1
    assert f"${1.2 / kept:.2f} per kept improvement" in text
