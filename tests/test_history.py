"""What the proposers see of a long tag: bounded, yet duplicates are caught across all of it.

Rows come from a real ledger (SQLite); the loop-level test runs the real Loop on a real git
repository whose tag already holds hundreds of experiments."""

from __future__ import annotations

import re
import threading
from pathlib import Path

from conftest import create_repo, rows, spec_toml, train_py
from optuna.trial import TrialState

from overnight.executors.local import LocalExecutor
from overnight.history import BEST, KEEPS, RECENT, TAILS, History
from overnight.knobs import read_knobs, rewrite
from overnight.ledger import Ledger, Row
from overnight.proposers.base import Context, Experiment, Proposal, Proposer, fingerprint
from overnight.proposers.search import TPE_BEST, TPE_RECENT, SearchProposer
from overnight.scheduler import Loop
from overnight.snapshot import Repo, candidate_ref
from overnight.spec import load_spec, parse_spec

TAG = "t"
BOUND = RECENT + BEST + KEEPS + TAILS + 1  # most recent, best, keeps, failures, baseline


def add(ledger: Ledger, status: str, **values: object) -> Row:
    return ledger.get(ledger.insert(TAG, status, **values))


def fed(ledger: Ledger, direction: str = "lower", tail=lambda path: "") -> History:  # noqa: ANN001
    history = History(direction, tail)
    for r in ledger.experiments(TAG):
        history.add(r)
    return history


# -- the history a proposer sees ------------------------------------------------------------


def test_history_is_bounded_but_remembers_every_fingerprint(tmp_path: Path):
    ledger = Ledger(tmp_path / "l.sqlite")
    history = History("lower")

    def add_row(status: str, **kw) -> int:  # noqa: ANN003
        rid = ledger.insert(TAG, status, commit_sha=f"{kw.pop('n', 0):040x}", **kw)
        history.add(ledger.get(rid))
        return rid

    base = add_row("keep", is_baseline=1, metric=1.0, fingerprint="f-base")
    add_row("repeat", repeat_of=base, metric=1.01)
    first = add_row("discard", metric=1.2, fingerprint="f-first")
    kept = add_row("keep", metric=0.9, estimate=0.91, runs=2, fingerprint="f-kept", n=7)
    crash = add_row("crash", fingerprint="f-crash")
    for i in range(3 * RECENT):
        add_row("discard", metric=1.1, fingerprint=f"f{i}")
    running = add_row("running", fingerprint="f-running")

    shown = history.experiments()
    ids = [e.id for e in shown]
    assert len(shown) <= BOUND + 1
    assert ids == sorted(ids)
    assert {base, kept, crash, running} <= set(ids)  # baseline, keeps, failures, in flight
    assert first not in ids  # old and no better than 50 others: out of view
    assert all(e.status != "repeat" for e in shown)  # a repeat is its candidate's estimate
    assert next(e for e in shown if e.id == kept).metric == 0.91
    assert {"f-first", "f0", "f-running"} <= history.tried  # duplicates: every one, forever
    assert history.first_with("f-first") == first
    assert [e.id for e in history.in_flight()] == [running]
    assert history.was_incumbent(f"{7:040x}")
    ledger.close()



def test_the_history_keeps_the_baseline_the_best_the_keeps_the_failures_and_the_recent(
        tmp_path: Path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    base = add(ledger, "keep", is_baseline=1, metric=2.0, fingerprint="base")
    best = add(ledger, "discard", metric=0.5, fingerprint="best")  # old, but the best
    keep = add(ledger, "keep", metric=1.5, fingerprint="keep")
    old = add(ledger, "discard", metric=3.0, fingerprint="old")  # old and mediocre
    for i in range(1000):
        add(ledger, "crash" if i % 50 == 0 else "discard", metric=None if i % 50 == 0 else
            2.5 + i / 1000, fingerprint=f"fp{i}", log_path=str(tmp_path / f"{i}.log"))
    running = add(ledger, "running", fingerprint="now")
    read = []
    history = fed(ledger, tail=lambda path: read.append(path) or f"tail of {path}")

    seen = history.experiments()
    ids = [e.id for e in seen]
    assert len(seen) <= BOUND + 1 and ids == sorted(ids)
    assert {base.id, best.id, keep.id, running.id} <= set(ids)
    assert old.id not in ids
    assert set(range(running.id - RECENT + 1, running.id + 1)) <= set(ids)
    # The latest failures, however old: their log tails say why.
    crashes = [e.id for e in seen if e.status == "crash"]
    assert len(crashes) == TAILS
    assert [e.id for e in history.in_flight()] == [running.id]
    # Every fingerprint, however old, is tried; the counts are the whole tag's.
    assert "old" in history.tried and "fp0" in history.tried and len(history.tried) == 1005
    assert history.first_with("old") == old.id
    assert history.counts() == {"discard": 982, "keep": 1, "crash": 20}
    assert len(history) - len(seen) == 1005 - len(seen)
    # Only the last few failed runs' logs are read, once each.
    assert len(read) == TAILS
    history.experiments()
    assert len(read) == TAILS


def test_repeat_runs_are_not_experiments_and_the_candidate_carries_its_estimate(
        tmp_path: Path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    add(ledger, "keep", is_baseline=1, metric=2.0, fingerprint="base")
    cand = add(ledger, "confirm", metric=1.0, fingerprint="cand", commit_sha="c" * 40)
    first = add(ledger, "repeat", metric=1.4, repeat_of=cand.id)
    second = add(ledger, "running", repeat_of=cand.id)
    ledger.update(cand.id, estimate=1.2, runs=2)
    history = fed(ledger)

    seen = {e.id: e for e in history.experiments()}
    assert first.id not in seen and second.id not in seen
    assert seen[cand.id].metric == 1.2  # the estimate from all its runs, not its first draw
    assert history.in_flight() == []  # a running repeat is no new experiment
    assert history.counts() == {"confirm": 1}
    # Repeats are runs, though: compute is compute.
    assert history.runs(exclude=frozenset({"running", "queued"})) == 3

    # A row is fed again whenever it changes: nothing is counted twice.
    ledger.update(cand.id, status="keep")
    history.add(ledger.get(cand.id))
    assert history.counts() == {"keep": 1}
    assert history.was_incumbent("c" * 40)  # its commit may now be a proposal's parent
    assert [e.id for e in history.experiments()].count(cand.id) == 1


def test_tried_is_a_frozen_view_that_costs_nothing_to_take(tmp_path: Path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    one = add(ledger, "discard", metric=1.0, fingerprint="a")
    history = fed(ledger)
    before = history.tried
    history.add(add(ledger, "discard", metric=1.0, fingerprint="b"))
    history.add(add(ledger, "discard", metric=1.0, fingerprint="a"))  # a retry: same files
    assert "a" in before and "b" not in before and len(before) == 1
    now = history.tried
    assert set(now) == {"a", "b"} and now.first("a") == one.id
    assert now | {"c"} == frozenset({"a", "b", "c"})


# -- the loop: a tag hundreds of experiments deep ---------------------------------------------


class Recording(Proposer):
    """Proposes the given learning rates, one per call, and keeps every Context."""

    name = "recording"

    def __init__(self, values: list[float]):
        self.values = list(values)
        self.contexts: list[Context] = []
        self.lock = threading.Lock()

    def propose(self, ctx: Context) -> Proposal | None:
        with self.lock:
            self.contexts.append(ctx)
            if not self.values:
                return None
            value = self.values.pop(0)
        text = re.sub(r"LEARNING_RATE = \S+", f"LEARNING_RATE = {value}", ctx.files["train.py"])
        return Proposal(parent=ctx.incumbent.commit, edits={"train.py": text},
                        description=f"LEARNING_RATE -> {value}", knobs={"LEARNING_RATE": value})


def run(repo: Path, proposer: Proposer, n: int) -> None:
    ledger = Ledger(repo / ".overnight" / "ledger.sqlite")
    executor = LocalExecutor(1)
    try:
        Loop(Repo(repo), load_spec(repo), ledger, executor, TAG, lambda files: proposer,
             max_experiments=n).run()
    finally:
        executor.shutdown()
        ledger.close()


def test_a_duplicate_of_the_first_experiment_is_refused_hundreds_of_experiments_later(
        tmp_path: Path):
    repo = create_repo(tmp_path / "r", {"train.py": train_py(0.001)}, spec_toml("grid"))
    run(repo, Recording([0.0005]), n=2)  # val_loss 1.35: worse than the baseline's 1.3
    first = rows(repo, TAG)[1]
    assert first["status"] == "discard"

    # Hundreds of later experiments, all better than #2 and all worse than the baseline: #2
    # is neither recent, nor among the best, nor kept.
    ledger = Ledger(repo / ".overnight" / "ledger.sqlite")
    git = Repo(repo)
    filler = RECENT + BEST + 50
    for i in range(filler):
        rid = ledger.insert(TAG, "discard", parent=first["parent"],
                            commit_sha=first["commit_sha"], description=f"filler {i}",
                            knobs={"LEARNING_RATE": 0.00101 + i * 1e-7},
                            metric=1.301 + i * 1e-5, fingerprint=f"filler{i}")
        git.pin(candidate_ref(TAG, rid), first["commit_sha"])
    ledger.close()

    proposer = Recording([0.0005, 0.0045])
    run(repo, proposer, n=filler + 3)
    rs = rows(repo, TAG)
    dup, new = rs[-2], rs[-1]
    assert dup["status"] == "rejected"
    assert dup["reason"] == (f"duplicate of experiment #{first['id']}: the same files were "
                             "already tried")
    assert new["status"] == "keep"  # 0.0045: val_loss 1.05

    ctx = proposer.contexts[0]
    assert len(ctx.history) <= BOUND + len(ctx.in_flight)
    assert first["id"] not in {e.id for e in ctx.history}
    assert first["fingerprint"] in ctx.tried
    assert ctx.is_duplicate({"train.py": train_py(0.0005)})
    assert ctx.omitted == len(rs) - 2 - len(ctx.history)  # all but the rejected and the new
    assert ctx.counts["discard"] == filler + 1


# -- the search proposer -------------------------------------------------------------------------

TRAIN = "LEARNING_RATE = 0.001\nDEPTH = 2\n"


def search_spec(strategy: str, bounds: dict[str, list[float]]):  # noqa: ANN201
    return parse_spec({
        "objective": {"metric": "val_loss", "direction": "lower"},
        "run": {"command": "python train.py"}, "files": {"editable": ["train.py"]},
        "search": {"strategy": strategy, "seed": 3, "knobs": list(bounds), "bounds": bounds},
    })


def files_of(config: dict[str, int | float]) -> dict[str, str]:
    return {"train.py": rewrite(TRAIN, config)}


def test_search_never_reproposes_a_configuration_tried_long_before_its_context():
    # Three DEPTHs in [1, 3]; the baseline has 2. Depth 1 was tried thousands of experiments
    # ago: not in the (bounded) history, only in `tried`.
    spec = search_spec("grid", {"DEPTH": [1, 3]})
    knobs = {n: k.value for n, k in read_knobs({"train.py": TRAIN}).items()}
    base = Experiment(5000, "c0", None, "keep", 1.0, "baseline", knobs, True,
                      fingerprint=fingerprint({"train.py": TRAIN}))
    old = fingerprint(files_of({"DEPTH": 1}))
    ctx = Context(base, {"train.py": TRAIN}, [base], [], "lower", 1,
                  tried=frozenset({base.fingerprint, old}), omitted=4999)
    for strategy in ("grid", "perturb", "random"):
        proposer = SearchProposer(search_spec(strategy, {"DEPTH": [1, 3]}), {"train.py": TRAIN})
        first = proposer.propose(ctx)
        assert first is not None and first.knobs == {"DEPTH": 3}, strategy
        assert not ctx.is_duplicate(first.edits)
        # Once 3 is recorded too, nothing new is left.
        recorded = Experiment(5001, "c1", "c0", "discard", 1.1, first.description, first.knobs)
        later = Context(base, {"train.py": TRAIN}, [base, recorded], [], "lower", 1,
                        tried=ctx.tried, omitted=4999)
        assert proposer.propose(later) is None, strategy
    assert spec.search.strategy == "grid"


def test_search_gathers_recorded_configurations_from_new_entries_only():
    # 60 depths; the baseline has 2. Forty are proposed and recorded, then the Context only
    # shows the last ten: the older thirty are remembered from the calls that saw them.
    proposer = SearchProposer(search_spec("random", {"DEPTH": [1, 60]}), {"train.py": TRAIN})
    base = Experiment(1, "c0", None, "keep", 1.0, "baseline", {"DEPTH": 2}, True)
    history: list[Experiment] = []

    def propose(view: list[Experiment]) -> Proposal | None:
        p = proposer.propose(Context(base, {"train.py": TRAIN}, [base, *view], [], "lower", 1))
        if p is not None:
            assert p.knobs["DEPTH"] not in {2, *(e.knobs["DEPTH"] for e in history)}
            history.append(Experiment(len(history) + 2, "c", "c0", "discard", 2.0, "", p.knobs))
        return p

    for _ in range(40):
        assert propose(history) is not None
    while propose(history[-10:]) is not None:
        pass
    assert len(history) > 45


def test_tpe_sees_the_best_and_the_most_recent_trials_only():
    bounds = {"LEARNING_RATE": [1e-4, 1e-2]}
    proposer = SearchProposer(search_spec("tpe", bounds), {"train.py": TRAIN})
    base = Experiment(1, "c0", None, "keep", 1.0, "baseline", {"LEARNING_RATE": 0.001}, True)
    history = [base]
    for i in range(2, 502):  # the oldest are the best
        history.append(Experiment(i, f"c{i}", "c0", "discard", 1.0 + i / 1000, "",
                                  {"LEARNING_RATE": 1e-4 + i * 1e-5}))
    running = Experiment(502, "c502", "c0", "running", None, "", {"LEARNING_RATE": 0.0099})
    history.append(running)
    ctx = Context(base, {"train.py": TRAIN}, history, [running], "lower", 1)
    study = proposer.build_study(ctx)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == TPE_BEST + TPE_RECENT
    values = sorted(t.value for t in complete)
    assert values[0] == 1.0  # the baseline, the best of all
    assert values[TPE_BEST - 1] == 1.0 + (TPE_BEST) / 1000  # the best few, however old
    assert values[-1] == 1.501  # and the most recent
    assert sum(t.state == TrialState.RUNNING for t in study.trials) == 1
    assert proposer.propose(ctx) is not None
