"""What the proposers are told about a tag, kept up to date one row at a time.

The Loop feeds every row it writes (`update`); building a proposer's Context then costs the
same at the start of a tag and after 10,000 experiments: the history it carries is bounded
(the baseline, every keep, and the RECENT latest candidates; a prompt never needs more, and
TPE's cost grows with what it sees), while the fingerprints of everything ever tried are
kept whole, so a duplicate is caught however old its twin is. Repeat runs are not
experiments of their own here: they show as their candidate's estimate (`Row.value`).
"""

from __future__ import annotations

from bisect import insort

from overnight.ledger import Row
from overnight.proposers.base import Experiment
from overnight.status import ACTIVE, FAILED, Status

RECENT = 200  # latest candidates in a proposer's history (plus the baseline and every keep)
FAILED_TAILS = 10  # crashes whose log tail a proposer sees


class History:
    def __init__(self) -> None:
        self._experiments: dict[int, Experiment] = {}
        self._recent: list[int] = []  # candidate ids, oldest first, at most RECENT
        self._keeps: list[int] = []  # the baseline's and every keep's id, oldest first
        self._active: set[int] = set()  # queued or running candidates
        self._failed: list[int] = []  # latest failed candidates, at most FAILED_TAILS
        self.tried: set[str] = set()  # fingerprints of every candidate ever proposed
        self.by_fingerprint: dict[str, int] = {}  # fingerprint -> the first row with it
        self.kept_commits: set[str] = set()  # commits that were incumbents of the tag

    def update(self, row: Row, log_tail: str = "") -> None:
        """A row as just written (inserted or changed)."""
        if row.repeat_of is not None:
            return  # a repeat changes its candidate's row, which is fed too
        old = self._experiments.get(row.id)
        self._experiments[row.id] = experiment(row, log_tail or (old.log_tail if old else ""))
        if row.fingerprint:
            self.tried.add(row.fingerprint)
            self.by_fingerprint.setdefault(row.fingerprint, row.id)
        if row.status == Status.KEEP:
            if row.id not in self._keeps:
                insort(self._keeps, row.id)
            self.kept_commits.add(row.commit_sha or "")
        if row.status in ACTIVE:
            self._active.add(row.id)
        else:
            self._active.discard(row.id)
        if row.status in FAILED and row.id not in self._failed:
            self._failed = sorted([*self._failed, row.id])[-FAILED_TAILS:]
        if row.id not in self._recent:
            insort(self._recent, row.id)
            if len(self._recent) > RECENT:
                self._forget(self._recent.pop(0))

    def _forget(self, rid: int) -> None:
        """Out of the recent window: only keeps, the active and the failed stay."""
        if rid not in self._keeps and rid not in self._active and rid not in self._failed:
            self._experiments.pop(rid, None)

    def experiments(self) -> list[Experiment]:
        """The bounded history, oldest first, in-flight included."""
        ids = sorted(set(self._recent) | set(self._keeps) | self._active | set(self._failed))
        return [self._experiments[i] for i in ids if i in self._experiments]

    def in_flight(self) -> list[Experiment]:
        return [self._experiments[i] for i in sorted(self._active)]

    def failed_without_tail(self) -> list[int]:
        return [i for i in self._failed if not self._experiments[i].log_tail]

    def __len__(self) -> int:
        return len(self._experiments)


def experiment(r: Row, log: str = "") -> Experiment:
    return Experiment(
        id=r.id, commit=r.commit_sha or "", parent=r.parent, status=r.status,
        metric=r.value, description=r.description, knobs=r.knobs, is_baseline=r.is_baseline,
        hypothesis=r.hypothesis, delta=r.delta, reason=r.reason,
        runtime_knobs=r.runtime_knobs, log_tail=log, fingerprint=r.fingerprint,
    )
