"""What a proposer sees (Context) and what it returns (Proposal)."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Set
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Experiment:
    """One finished or in-flight experiment, as the ledger holds it."""

    id: int
    commit: str
    parent: str | None
    status: str  # queued running keep discard crash timeout tampered rejected lost ...
    metric: float | None
    description: str
    knobs: dict[str, float | int]  # knob values of the candidate (what was proposed)
    is_baseline: bool = False
    hypothesis: str = ""
    delta: float | None = None  # metric - incumbent's at the time it was judged
    reason: str = ""  # why it crashed, was rejected, ...
    runtime_knobs: dict[str, object] = field(default_factory=dict)  # what really ran
    log_tail: str = ""  # the end of the log, for crashes and timeouts
    fingerprint: str = ""  # normalized content of the editable files (see `fingerprint`)


@dataclass(frozen=True)
class Context:
    """Everything a proposer may know when it proposes, built from the ledger for every
    proposal. Its history is bounded (overnight/history.py): a proposal costs the same at
    the ten-thousandth experiment as at the first; `tried` alone covers the whole tag."""

    incumbent: Experiment  # the best kept experiment (the baseline at first)
    files: dict[str, str]  # editable path -> text at the incumbent's commit
    # This tag's experiments, oldest first, in-flight included: the most recent ones, the
    # best, the keeps and the baseline (history.py says how many). Repeat runs of a candidate
    # are not experiments: the candidate's metric is its estimate from all its runs.
    history: list[Experiment]
    in_flight: list[Experiment]  # queued or running right now
    direction: str  # "lower" | "higher"
    slots: int  # how many experiments can run at once
    metric: str = ""  # the objective's name
    min_delta: float = 0.0
    budget_seconds: float = 0.0
    hardware: str = ""  # e.g. "NVIDIA H100 80GB HBM3 (gpu 0)"
    program: str = ""  # program.md: the user's research instructions
    protected: tuple[str, ...] = ()  # files nobody may edit
    # Read-only files the model is shown (protected and [files] context): path -> text, or
    # None for a file that is not text.
    readonly: Mapping[str, str | None] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # what the user said with `overnight steer`
    # Fingerprints of every candidate of the tag, however old (not only those in history).
    tried: Set[str] = frozenset()
    # Finished experiments by status over the whole tag, the baseline aside ({}: unknown,
    # count `history` instead).
    counts: Mapping[str, int] = field(default_factory=dict)
    omitted: int = 0  # older experiments of the tag that are not in `history`
    siblings: int = 0  # other proposals being prepared at the same time as this one
    # Stuck ([human] stuck_after): the failed ideas since the last keep, most recent last, one
    # line each; empty while the loop is finding improvements.
    stuck: tuple[str, ...] = ()

    def is_duplicate(self, edits: dict[str, str]) -> bool:
        """True if these edits on the incumbent give files that were already tried."""
        return fingerprint({**self.files, **edits}) in self.tried


@dataclass(frozen=True)
class Usage:
    """What a proposal cost: tokens in and out, and dollars when prices are known."""

    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    requests: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.tokens_in + other.tokens_in, self.tokens_out + other.tokens_out,
                     self.cost_usd + other.cost_usd, self.requests + other.requests)


@dataclass(frozen=True)
class Proposal:
    """A change to try: new full text for some editable files, on top of `parent`.

    A proposer that could not produce a valid change (a malformed answer after every retry,
    say) returns a Proposal with `rejected` set: it is recorded, nothing runs.
    """

    parent: str  # commit the edits apply to
    edits: dict[str, str]  # path -> new full text
    description: str
    hypothesis: str = ""
    knobs: dict[str, float | int] = field(default_factory=dict)  # full knob values after edits
    usage: Usage = field(default_factory=Usage)
    rejected: str = ""  # why the proposer gave up; the proposal is recorded, never run
    notes: tuple[str, ...] = ()  # e.g. files an agent changed outside its scope


class Proposer(ABC):
    """Small interface: state lives in the ledger (Context), never only in memory."""

    name: str = "proposer"
    # Proposals are slow (a model) or fast (a search): slow ones are prepared ahead of free
    # slots, on threads, so that a slot never waits for the model.
    slow: bool = False

    @abstractmethod
    def propose(self, ctx: Context) -> Proposal | None:
        """The next candidate, or None when there is nothing new left to try."""


def normalize(text: str) -> str:
    """Text as far as a duplicate check cares: no trailing spaces, no trailing blank lines."""
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())


def fingerprint(files: dict[str, str]) -> str:
    """One id for a set of editable files: equal for edits that differ only in whitespace."""
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(path.encode() + b"\0" + normalize(files[path]).encode() + b"\0")
    return h.hexdigest()[:32]
