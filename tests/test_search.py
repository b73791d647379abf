"""Search proposer: real knob rewrites, real Optuna, contexts built like the ledger would."""

from __future__ import annotations

import ast
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest
from optuna.trial import TrialState

from overnight.errors import ConfigError
from overnight.knobs import list_knobs, read_knobs
from overnight.proposers.base import Context, Experiment, Proposal
from overnight.proposers.search import SearchProposer
from overnight.spec import Spec, parse_spec

TRAIN = '''"""A toy training script."""
import time

LEARNING_RATE = 3e-4   # peak learning rate
BATCH_SIZE = 32        # sequences per step
WEIGHT_DECAY = 0.0
DEPTH: int = 4         # transformer blocks


def main() -> None:
    STEPS = 10  # not a knob: inside a function
    time.sleep(0)
    print("val_bpb:", 1.0)
'''

STRATEGIES = ["perturb", "random", "tpe", "grid"]


def make_spec(**search: object) -> Spec:
    return parse_spec(
        {
            "objective": {"metric": "val_bpb", "direction": "lower"},
            "run": {"command": "python train.py"},
            "files": {"editable": ["train.py"]},
            "search": search,
        }
    )


def head_values(files: dict[str, str]) -> dict[str, int | float]:
    py = {p: t for p, t in files.items() if p.endswith(".py")}
    return {n: k.value for n, k in read_knobs(py).items()}


def first_context(files: dict[str, str], direction: str = "lower") -> Context:
    """The context of a fresh loop: only the baseline, which is the incumbent."""
    base = Experiment(0, "c0", None, "keep", 1.0, "baseline", head_values(files), True)
    return Context(base, dict(files), [base], [], direction, 1)


@dataclass
class Loop:
    """A stand-in for the scheduler: proposes, 'runs' with a score function, keeps the best."""

    proposer: SearchProposer
    score: Callable[[dict[str, int | float]], float]
    files: dict[str, str]
    direction: str = "lower"
    history: list[Experiment] = field(default_factory=list)

    def __post_init__(self) -> None:
        knobs = head_values(self.files)
        base = Experiment(0, "c0", None, "keep", self.score(knobs), "baseline", knobs, True)
        self.history.append(base)
        self.incumbent = base
        self.incumbent_files = dict(self.files)

    def ctx(self) -> Context:
        in_flight = [e for e in self.history if e.status in ("queued", "running")]
        return Context(
            incumbent=self.incumbent,
            files=dict(self.incumbent_files),
            history=list(self.history),
            in_flight=in_flight,
            direction=self.direction,
            slots=1,
        )

    def step(self, finish: bool = True) -> Proposal | None:
        proposal = self.proposer.propose(self.ctx())
        if proposal is None:
            return None
        eid = len(self.history)
        exp = Experiment(
            eid, f"c{eid}", proposal.parent, "running", None, proposal.description, proposal.knobs
        )
        self.history.append(exp)
        if finish:
            self.finish(eid, proposal)
        return proposal

    def finish(self, eid: int, proposal: Proposal) -> None:
        exp = self.history[eid]
        # Score what the files say, as a real run would: the proposal may not list every knob.
        metric = self.score(head_values({**self.incumbent_files, **proposal.edits}))
        assert self.incumbent.metric is not None
        better = metric < self.incumbent.metric if self.direction == "lower" else (
            metric > self.incumbent.metric
        )
        exp = replace(exp, status="keep" if better else "discard", metric=metric)
        self.history[eid] = exp
        if better:
            self.incumbent = exp
            self.incumbent_files = {**self.incumbent_files, **proposal.edits}


def bowl(knobs: dict[str, int | float]) -> float:
    """A smooth objective with its optimum inside the bounds used below."""
    lr = math.log10(knobs["LEARNING_RATE"]) - math.log10(6e-4)
    bs = (knobs["BATCH_SIZE"] - 48) / 16
    return 1.0 + lr * lr + bs * bs + 0.1 * knobs["WEIGHT_DECAY"] ** 2 + 0.01 * knobs["DEPTH"]


# --- every strategy ------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_proposals_stay_in_bounds_are_new_and_edit_the_file_faithfully(strategy: str) -> None:
    bounds = {"LEARNING_RATE": (1e-4, 2e-3), "BATCH_SIZE": (16, 64)}
    proposer = SearchProposer(make_spec(strategy=strategy, seed=1, bounds=bounds), {
        "train.py": TRAIN
    })
    loop = Loop(proposer, bowl, {"train.py": TRAIN})
    limits = {**bounds, "WEIGHT_DECAY": (-1.0, 1.0), "DEPTH": (1, 16)}  # the last two: defaults

    proposals = []
    for _ in range(60):
        seen = [e.knobs for e in loop.history] + [loop.incumbent.knobs]
        proposal = loop.step()
        if proposal is None:
            break
        proposals.append(proposal)

        assert proposal.knobs not in seen, "proposed a configuration already tried"
        for name, (lo, hi) in limits.items():
            assert lo <= proposal.knobs[name] <= hi, (name, proposal.knobs[name])
        assert isinstance(proposal.knobs["BATCH_SIZE"], int)
        assert isinstance(proposal.knobs["DEPTH"], int)
        assert proposal.edits and set(proposal.edits) == {"train.py"}
        text = proposal.edits["train.py"]
        ast.parse(text)
        written = {k.name: k for k in list_knobs(text, "train.py")}
        assert {n: k.value for n, k in written.items()} == proposal.knobs
        assert written["BATCH_SIZE"].kind == "int" and written["DEPTH"].kind == "int"
        assert written["LEARNING_RATE"].kind == "float"
        assert "# peak learning rate" in text and "STEPS = 10" in text

    assert len(proposals) >= (16 if strategy == "grid" else 60)
    assert loop.incumbent.metric is not None and loop.incumbent.metric < bowl(head_values(
        {"train.py": TRAIN}
    )), "the loop should find something better than the baseline"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_nothing_new_left_returns_none(strategy: str) -> None:
    # One int knob in [1, 3] with HEAD at 2: only 1 and 3 are left to try.
    spec = make_spec(strategy=strategy, seed=0, knobs=["DEPTH"], bounds={"DEPTH": (1, 3)})
    files = {"train.py": TRAIN.replace("DEPTH: int = 4", "DEPTH: int = 2")}
    loop = Loop(SearchProposer(spec, files), bowl, files)

    first = loop.step(finish=False)  # still in flight: must count as tried
    second = loop.step(finish=False)
    third = loop.step()

    assert first is not None and second is not None
    assert {first.knobs["DEPTH"], second.knobs["DEPTH"]} == {1, 3}
    assert third is None


def test_description_and_parent() -> None:
    proposer = SearchProposer(make_spec(strategy="perturb", seed=3), {"train.py": TRAIN})
    loop = Loop(proposer, bowl, {"train.py": TRAIN})

    proposal = loop.step()

    assert proposal is not None and proposal.parent == "c0"
    head = head_values({"train.py": TRAIN})
    changed = [n for n in head if proposal.knobs[n] != head[n]]
    expected = ", ".join(f"{n} {head[n]!r} -> {proposal.knobs[n]!r}" for n in changed)
    assert proposal.description == expected
    assert proposal.hypothesis.startswith("perturb: ")
    assert "val_bpb" in proposal.hypothesis


def test_edits_only_the_files_that_change() -> None:
    files = {"train.py": "LEARNING_RATE = 0.001\n", "model.py": "WIDTH = 64\n", "notes.md": "#"}
    spec = make_spec(strategy="random", seed=5, knobs=["WIDTH"])

    proposal = SearchProposer(spec, files).propose(first_context(files))

    assert proposal is not None
    assert set(proposal.edits) == {"model.py"}
    assert proposal.knobs.keys() == {"WIDTH"}
    assert proposal.edits["model.py"] == f"WIDTH = {proposal.knobs['WIDTH']}\n"


def test_head_value_outside_declared_bounds_is_only_the_baseline() -> None:
    bounds = {"LEARNING_RATE": (1e-3, 1e-2), "BATCH_SIZE": (64, 256)}  # HEAD: 3e-4 and 32
    spec = make_spec(strategy="perturb", seed=2, bounds=bounds)
    loop = Loop(SearchProposer(spec, {"train.py": TRAIN}), bowl, {"train.py": TRAIN})

    for _ in range(20):
        proposal = loop.step()
        assert proposal is not None
        assert 1e-3 <= proposal.knobs["LEARNING_RATE"] <= 1e-2
        assert 64 <= proposal.knobs["BATCH_SIZE"] <= 256


def test_int_bounds_are_narrowed_to_whole_numbers() -> None:
    spec = make_spec(strategy="random", seed=4, knobs=["DEPTH"], bounds={"DEPTH": (1.5, 5.5)})
    loop = Loop(SearchProposer(spec, {"train.py": TRAIN}), bowl, {"train.py": TRAIN})

    seen = set()
    while (proposal := loop.step()) is not None:
        seen.add(proposal.knobs["DEPTH"])

    assert seen == {2, 3, 5}  # 4 is the baseline


def test_bounds_finer_than_four_digits_are_still_respected() -> None:
    bounds = {"LEARNING_RATE": (1.23456e-4, 1.23458e-4)}  # no 4-digit value inside
    spec = make_spec(strategy="random", seed=8, knobs=["LEARNING_RATE"], bounds=bounds)
    loop = Loop(SearchProposer(spec, {"train.py": TRAIN}), bowl, {"train.py": TRAIN})

    tried = set()
    while (proposal := loop.step()) is not None:
        written = {k.name: k.value for k in list_knobs(proposal.edits["train.py"], "t.py")}
        assert written["LEARNING_RATE"] == proposal.knobs["LEARNING_RATE"]
        tried.add(proposal.knobs["LEARNING_RATE"])

    # Rounding falls back to 6 digits, which leaves exactly three values to try.
    assert tried == {1.23456e-4, 1.23457e-4, 1.23458e-4}


def test_int_knob_read_back_as_float_from_the_ledger_stays_int() -> None:
    files = {"train.py": TRAIN}
    ctx = first_context(files, direction="higher")
    incumbent = replace(ctx.incumbent, knobs={**ctx.incumbent.knobs, "BATCH_SIZE": 32.0})
    ctx = replace(ctx, incumbent=incumbent, history=[incumbent])
    proposer = SearchProposer(make_spec(strategy="grid", knobs=["BATCH_SIZE"]), files)

    proposal = proposer.propose(ctx)

    assert proposal is not None and proposal.knobs["BATCH_SIZE"] in (24, 40)
    assert isinstance(proposal.knobs["BATCH_SIZE"], int)
    assert f"BATCH_SIZE = {proposal.knobs['BATCH_SIZE']}        #" in proposal.edits["train.py"]
    assert "raise val_bpb" not in proposal.hypothesis  # grid says what it varies instead
    assert proposal.hypothesis.startswith("grid wave #1: vary BATCH_SIZE")


# --- perturb -------------------------------------------------------------------------------


def test_perturb_moves_one_or_two_knobs_near_the_incumbent() -> None:
    proposer = SearchProposer(make_spec(strategy="perturb", seed=7), {"train.py": TRAIN})
    loop = Loop(proposer, bowl, {"train.py": TRAIN})
    head = head_values({"train.py": TRAIN})

    moved_counts = []
    lr_ratios = []
    for _ in range(200):
        proposal = proposer.propose(loop.ctx())  # incumbent never changes
        assert proposal is not None
        moved = {n for n in head if proposal.knobs[n] != head[n]}
        moved_counts.append(len(moved))
        if "BATCH_SIZE" in moved:  # step max(1, round(0.25 * 32)) = 8, one or two steps
            assert proposal.knobs["BATCH_SIZE"] in {16, 24, 40, 48}
        if "DEPTH" in moved:
            assert proposal.knobs["DEPTH"] in {2, 3, 5, 6}
        if "LEARNING_RATE" in moved:
            lr_ratios.append(abs(math.log2(proposal.knobs["LEARNING_RATE"] / 3e-4)))

    assert set(moved_counts) <= {1, 2}
    assert 0.55 <= moved_counts.count(1) / len(moved_counts) <= 0.85
    lr_ratios.sort()
    assert lr_ratios[len(lr_ratios) // 2] < 1.0  # typical move: within a factor of 2


# --- tpe -----------------------------------------------------------------------------------


def mixed_history(files: dict[str, str]) -> list[Experiment]:
    """Experiments of every status, a few outside the bounds, as a ledger would return them."""
    rng = random.Random(11)
    head = head_values(files)
    history = [Experiment(0, "c0", None, "keep", bowl(head), "baseline", head, True)]
    statuses = ["discard", "discard", "keep", "crash", "timeout", "lost", "rejected", "running"]
    for i in range(1, 25):
        knobs = {
            "LEARNING_RATE": float(f"{10 ** rng.uniform(-4, -2.5):.4g}"),
            "BATCH_SIZE": rng.randint(16, 64),
            "WEIGHT_DECAY": round(rng.uniform(0, 1), 3),  # 0.0 at HEAD: stays >= 0
            "DEPTH": rng.randint(1, 16),
        }
        if i % 7 == 0:
            knobs["LEARNING_RATE"] = 0.5  # outside the bounds: must be skipped
        status = statuses[i % len(statuses)]
        metric = bowl(knobs) if status in ("keep", "discard") else None
        history.append(Experiment(i, f"c{i}", "c0", status, metric, f"exp {i}", knobs))
    return history


def finished_trials(proposer: SearchProposer) -> list[tuple[str, dict, float | None]]:
    assert proposer.study is not None
    states = (TrialState.COMPLETE, TrialState.FAIL)
    trials = proposer.study.get_trials(deepcopy=False, states=states)
    return [(t.state.name, t.params, t.value) for t in trials]


def test_tpe_rebuilds_the_same_trials_after_a_restart() -> None:
    files = {"train.py": TRAIN}
    history = mixed_history(files)
    ctx = Context(
        incumbent=history[0], files=files, history=history,
        in_flight=[e for e in history if e.status == "running"], direction="lower", slots=2,
    )
    spec = make_spec(strategy="tpe", seed=9, bounds={"LEARNING_RATE": (1e-4, 1e-2)})

    before = SearchProposer(spec, files)
    after = SearchProposer(spec, files)  # a restart: a fresh object, the same ledger
    assert before.propose(ctx) is not None
    assert after.propose(ctx) is not None

    trials = finished_trials(before)
    assert trials == finished_trials(after)
    fitting = [e for e in history if e.knobs["LEARNING_RATE"] != 0.5]
    complete = [e for e in fitting if e.status in ("keep", "discard")]
    failed = [e for e in fitting if e.status in ("crash", "timeout")]
    assert [t for t in trials if t[0] == "COMPLETE"] == [
        ("COMPLETE", e.knobs, e.metric) for e in complete
    ]
    assert len([t for t in trials if t[0] == "FAIL"]) == len(failed)
    assert before.study is not None
    running = before.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    assert len(running) >= len([e for e in fitting if e.status == "running"])


def test_tpe_resume_midway_loses_nothing() -> None:
    files = {"train.py": TRAIN}
    spec = make_spec(strategy="tpe", seed=13)
    loop = Loop(SearchProposer(spec, files), bowl, files)
    for _ in range(15):
        assert loop.step() is not None

    fresh = SearchProposer(spec, files)
    proposal = fresh.propose(loop.ctx())
    assert loop.proposer.propose(loop.ctx()) is not None

    assert finished_trials(fresh) == finished_trials(loop.proposer)
    assert len(finished_trials(fresh)) == 16  # baseline + 15
    assert proposal is not None and proposal.knobs not in [e.knobs for e in loop.history]


def test_tpe_concentrates_where_the_history_is_good() -> None:
    # Higher LEARNING_RATE is clearly better; BATCH_SIZE does not matter.
    files = {"train.py": TRAIN}
    spec = make_spec(
        strategy="tpe", seed=21, knobs=["LEARNING_RATE", "BATCH_SIZE"],
        bounds={"LEARNING_RATE": (1e-4, 1e-2), "BATCH_SIZE": (16, 64)},
    )

    def score(knobs: dict[str, int | float]) -> float:
        return 2.0 - math.log10(knobs["LEARNING_RATE"])  # lower is better: 1e-2 scores 4.0

    loop = Loop(SearchProposer(spec, files), score, files)
    rng = random.Random(5)
    for i in range(1, 13):  # a random start, as the startup trials would give
        knobs = {"LEARNING_RATE": float(f"{10 ** rng.uniform(-4, -2):.4g}"),
                 "BATCH_SIZE": rng.randint(16, 64)}
        loop.history.append(Experiment(i, f"c{i}", "c0", "discard", score(knobs), "", knobs))

    proposals = [loop.step() for _ in range(12)]

    high = [p for p in proposals if p is not None and p.knobs["LEARNING_RATE"] > 1e-3]
    assert len(high) >= 9, [p.knobs for p in proposals if p is not None]


def test_tpe_parallel_proposals_differ() -> None:
    files = {"train.py": TRAIN}
    loop = Loop(SearchProposer(make_spec(strategy="tpe", seed=1), files), bowl, files)
    for _ in range(12):
        loop.step()

    in_flight = [loop.step(finish=False) for _ in range(4)]

    configs = [tuple(sorted(p.knobs.items())) for p in in_flight if p is not None]
    assert len(set(configs)) == 4


# --- grid ----------------------------------------------------------------------------------


def test_grid_first_wave_is_the_factorial_around_the_incumbent() -> None:
    spec = make_spec(strategy="grid", knobs=["LEARNING_RATE", "BATCH_SIZE"])
    files = {"train.py": TRAIN}
    loop = Loop(SearchProposer(spec, files), bowl, files)

    wave = [loop.step(finish=False) for _ in range(8)]

    points = [(p.knobs["LEARNING_RATE"], p.knobs["BATCH_SIZE"]) for p in wave if p is not None]
    expected = {(lr, bs) for lr in (1.5e-4, 3e-4, 6e-4) for bs in (24, 32, 40)} - {(3e-4, 32)}
    assert len(points) == 8 and set(points) == expected
    # Around the same incumbent every neighbour is tried: nothing new is left.
    assert loop.step() is None


def test_grid_follows_a_new_incumbent_and_survives_a_restart() -> None:
    spec = make_spec(strategy="grid", knobs=["LEARNING_RATE", "BATCH_SIZE"])
    files = {"train.py": TRAIN}
    loop = Loop(SearchProposer(spec, files), bowl, files)
    for _ in range(8):
        assert loop.step() is not None
    best = loop.incumbent.knobs  # bowl's best neighbour of the baseline
    assert (best["LEARNING_RATE"], best["BATCH_SIZE"]) == (6e-4, 40)

    restarted = SearchProposer(spec, files)
    proposal = restarted.propose(loop.ctx())

    assert proposal is not None
    assert proposal.knobs not in [e.knobs for e in loop.history]
    assert proposal.knobs["LEARNING_RATE"] in (3e-4, 6e-4, 0.0012)
    assert proposal.knobs["BATCH_SIZE"] in (30, 40, 50)  # step max(1, round(0.25 * 40)) = 10


# --- configuration errors ------------------------------------------------------------------


def test_unknown_knob_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError, match=r"LR\b.*available knobs: BATCH_SIZE, DEPTH, "):
        SearchProposer(make_spec(knobs=["LR"]), {"train.py": TRAIN})


def test_bound_for_a_knob_that_is_not_searched() -> None:
    spec = make_spec(knobs=["LEARNING_RATE"], bounds={"DEPTH": (1, 8)})
    with pytest.raises(ConfigError, match="bounds names DEPTH"):
        SearchProposer(spec, {"train.py": TRAIN})


def test_no_knobs_at_all() -> None:
    with pytest.raises(ConfigError, match="no knobs found") as e:
        SearchProposer(make_spec(), {"train.py": "print('hi')\n"})
    assert "lowercase" not in str(e.value)


def test_lowercase_globals_are_named_in_the_no_knobs_error() -> None:
    """nanoGPT's hyperparameters are lowercase globals: the error says why they are not
    knobs and what to do."""
    train = "learning_rate = 6e-4\nbeta2 = 0.99\nout_dir = 'out'\nmax_iters = 5000\n"
    with pytest.raises(ConfigError, match=r"learning_rate, beta2, max_iters are lowercase: "
                                          r"name the ones to tune in \[search\] knobs") as e:
        SearchProposer(make_spec(), {"train.py": train})
    assert "out_dir" not in str(e.value)
    assert 'knobs = ["learning_rate", "beta2", "max_iters"]' in str(e.value)


def test_lowercase_knobs_when_named() -> None:
    """Named in [search] knobs, nanoGPT's lowercase globals are knobs; others stay out."""
    train = "learning_rate = 6e-4\nbeta2 = 0.99\nout_dir = 'out'\nmax_iters = 5000\n"
    spec = make_spec(strategy="perturb", knobs=["learning_rate", "beta2"],
                     bounds={"beta2": {"low": 0.9, "high": 0.999, "scale": "log1m"}})
    proposer = SearchProposer(spec, {"train.py": train})
    assert proposer.names == ["learning_rate", "beta2"]
    ctx = first_context({"train.py": train})
    for _ in range(20):
        p = proposer.propose(ctx)
        assert p is not None
        assert "max_iters = 5000" in p.edits["train.py"]
        assert 0.9 <= p.knobs["beta2"] <= 0.999


def test_log1m_scale_spreads_proposals_between_the_bounds() -> None:
    """On a log scale beta2 in [0.9, 0.999] sat on a bound; on log(1 - x) it spreads."""
    train = "BETA2 = 0.99\n"
    spec = make_spec(strategy="random", bounds={"BETA2": {"low": 0.9, "high": 0.999,
                                                          "scale": "log1m"}}, seed=3)
    proposer = SearchProposer(spec, {"train.py": train})
    ctx = first_context({"train.py": train})
    values = [proposer.propose(ctx).knobs["BETA2"] for _ in range(40)]
    assert all(len(repr(v)) <= 8 for v in values), values  # 0.9871, never 0.98710000000001
    near_bounds = [v for v in values if v < 0.91 or v > 0.998]
    assert len(near_bounds) < 12, values
    assert any(v > 0.995 for v in values) and any(v < 0.95 for v in values)


def test_pow2_knob_stays_a_power_of_two() -> None:
    train = "BATCH_SIZE = 128\n"
    for strategy in ("perturb", "random", "tpe", "grid"):
        spec = make_spec(strategy=strategy, seed=1,
                         bounds={"BATCH_SIZE": {"low": 32, "high": 512, "scale": "pow2"}})
        proposer = SearchProposer(spec, {"train.py": train})
        ctx = first_context({"train.py": train})
        seen = set()
        for _ in range(4):
            p = proposer.propose(ctx)
            if p is None:
                break
            seen.add(p.knobs["BATCH_SIZE"])
        assert seen and seen <= {32, 64, 256, 512}, (strategy, seen)
