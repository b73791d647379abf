"""A tag's history as the proposers see it, kept up to date row by row.

The Loop hands every row of its tag to `History.add` whenever it writes or rereads one, so a
proposer's Context costs the same at the ten-thousandth experiment as at the first:

- `experiments()`, what a proposer reads: at most RECENT + BEST + KEEPS + TAILS + 1
  experiments, oldest first (the most recent RECENT, the BEST best measured ones, the last
  KEEPS keeps, the last TAILS crashes and timeouts with their log tails, the baseline), plus
  every one queued or running. A prompt never needs 10,000 rows, and
  prompt.py trims further to fit the model's window.
- `tried`: the fingerprint of every candidate of the tag, however old: duplicates are caught
  across the whole history. It is a frozen view of an append-only log, so taking it copies
  nothing, and a proposer reading it on a thread sees exactly what its Context was built on.
- A repeat run of a candidate (`repeat_of`) is evidence for the judge, not an experiment:
  it is never in `experiments()`; its candidate carries the result of all its runs
  (`Row.value`). It is a run, though: `runs()` counts every row, repeats included.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Set
from dataclasses import replace

from overnight.ledger import Row
from overnight.proposers.base import Experiment
from overnight.status import ACTIVE, Status

RECENT = 200  # the most recent experiments a proposer sees
BEST = 50  # the best measured experiments it sees, however old
KEEPS = 100  # the most recent keeps it sees (each was an incumbent once)
TAILS = 10  # the latest crashed or timed-out runs it sees, with their log tails
RANKED = frozenset({Status.KEEP, Status.DISCARD, Status.CONFIRM})  # candidates with a number
TAILED = frozenset({Status.CRASH, Status.TIMEOUT})  # their log tails say why


def experiment(r: Row, log_tail: str = "") -> Experiment:
    """A ledger row as a proposer sees it; its metric is the candidate's estimate from all
    its runs when it has one (`Row.value`)."""
    return Experiment(
        id=r.id, commit=r.commit_sha or "", parent=r.parent, status=r.status,
        metric=r.value, description=r.description, knobs=r.knobs, is_baseline=r.is_baseline,
        hypothesis=r.hypothesis, delta=r.delta, reason=r.reason,
        runtime_knobs=r.runtime_knobs, log_tail=log_tail, fingerprint=r.fingerprint,
    )


class Tried(Set[str]):
    """The fingerprints tried when the view was taken: the first `n` entries of an
    append-only log. Membership is a dict lookup; nothing is copied."""

    __slots__ = ("_first", "_log", "_n")

    def __init__(self, first: dict[str, tuple[int, int]], log: list[str], n: int):
        self._first = first  # fingerprint -> (position in the log, first experiment's id)
        self._log = log
        self._n = n

    def __contains__(self, fp: object) -> bool:
        entry = self._first.get(fp) if isinstance(fp, str) else None
        return entry is not None and entry[0] < self._n

    def __iter__(self) -> Iterator[str]:
        return iter(self._log[:self._n])

    def runs(self, exclude: Set[str]) -> int:
        """Rows of the tag, repeats included, whose status is not in `exclude`."""
        return sum(n for status, n in self._rows_by_status.items() if status not in exclude)

    def __len__(self) -> int:
        return self._n

    @classmethod
    def _from_iterable(cls, it: Iterable[str]) -> frozenset[str]:
        return frozenset(it)  # set operations give plain frozensets

    def first(self, fp: str) -> int | None:
        """The id of the first experiment that tried exactly these files, or None."""
        entry = self._first.get(fp)
        return entry[1] if entry is not None and entry[0] < self._n else None


class History:
    """What the proposers may know of one tag, fed one row at a time (`add`)."""

    def __init__(self, direction: str, tail: Callable[[str], str] = lambda _path: ""):
        """`direction`: the objective's ("lower" | "higher"), to rank the best; `tail(log
        path)`: the end of a failed run's log, as the proposer may see it."""
        self._sign = 1.0 if direction == "lower" else -1.0
        self._tail = tail
        self._exp: dict[int, Experiment] = {}  # every experiment (not repeats), by id
        self._order: list[int] = []  # their ids, ascending
        self._active: set[int] = set()
        self._keeps: list[int] = []  # ascending
        self._kept: Counter[str] = Counter()  # commits of keeps: the incumbents so far
        self._ranked: list[tuple[float, int]] = []  # (signed value, id), best first
        self._rank: dict[int, tuple[float, int]] = {}
        self._failed: list[int] = []  # crashed or timed out, ascending
        self._logs: dict[int, str] = {}  # log paths of failed runs, until their tail is read
        self._counts: Counter[str] = Counter()  # finished experiments by status, baseline aside
        self._baseline: int | None = None  # the last baseline row
        self._first: dict[str, tuple[int, int]] = {}
        self._log: list[str] = []
        self._status: dict[int, str] = {}  # every row's status, repeats included
        self._rows_by_status: Counter[str] = Counter()

    # -- feeding -----------------------------------------------------------------------

    def add(self, row: Row) -> None:
        """A row of the tag as the ledger holds it now (new, or changed since it was added)."""
        if row.failed_start:
            self._drop(row.id)  # a baseline that never got its number is no part of the tag
            return
        was = self._status.get(row.id)
        if was != row.status:
            if was is not None:
                self._rows_by_status[was] -= 1
            self._rows_by_status[row.status] += 1
            self._status[row.id] = row.status
        if row.fingerprint:
            entry = self._first.get(row.fingerprint)
            if entry is None:
                self._first[row.fingerprint] = (len(self._log), row.id)
                self._log.append(row.fingerprint)
            elif row.id < entry[1]:
                self._first[row.fingerprint] = (entry[0], row.id)
        if row.repeat_of is not None:
            return  # evidence for its candidate, not an experiment
        old = self._exp.get(row.id)
        if old is None:
            _insert(self._order, row.id)
        else:
            self._forget(old)
        e = experiment(row)
        self._exp[row.id] = e
        self._remember(e, row)

    def _drop(self, experiment_id: int) -> None:
        """Forget a row entirely (its fingerprint stays: the log of what was tried is
        append-only)."""
        was = self._status.pop(experiment_id, None)
        if was is not None:
            self._rows_by_status[was] -= 1
            if not self._rows_by_status[was]:
                del self._rows_by_status[was]
        old = self._exp.pop(experiment_id, None)
        if old is None:
            return
        self._forget(old)
        self._order.remove(experiment_id)
        self._logs.pop(experiment_id, None)
        if self._baseline == experiment_id:
            self._baseline = max((i for i, e in self._exp.items() if e.is_baseline),
                                 default=None)

    def _forget(self, e: Experiment) -> None:
        """Undo what `_remember` noted of an experiment's previous state."""
        self._active.discard(e.id)
        if e.status == Status.KEEP:
            self._keeps.remove(e.id)
            self._kept[e.commit] -= 1
            if self._kept[e.commit] <= 0:
                del self._kept[e.commit]
        rank = self._rank.pop(e.id, None)
        if rank is not None:
            del self._ranked[bisect.bisect_left(self._ranked, rank)]
        if e.status in TAILED:
            self._failed.remove(e.id)
        if not e.is_baseline and e.status not in ACTIVE:
            self._counts[e.status] -= 1
            if not self._counts[e.status]:
                del self._counts[e.status]

    def _remember(self, e: Experiment, row: Row) -> None:
        if e.status in ACTIVE:
            self._active.add(e.id)
        if e.status == Status.KEEP:
            _insert(self._keeps, e.id)
            self._kept[e.commit] += 1
        if e.status in RANKED and e.metric is not None and math.isfinite(e.metric):
            rank = (self._sign * e.metric, e.id)
            bisect.insort(self._ranked, rank)
            self._rank[e.id] = rank
        if e.status in TAILED:
            _insert(self._failed, e.id)
            if row.log_path:
                self._logs[e.id] = row.log_path
        if e.is_baseline:
            self._baseline = max(self._baseline or 0, e.id)
        elif e.status not in ACTIVE:
            self._counts[e.status] += 1

    # -- reading -----------------------------------------------------------------------

    def experiments(self) -> list[Experiment]:
        """What a proposer sees, oldest first: the most recent, the best, the keeps, the
        latest failures, the baseline, and everything in flight (see the module docstring)."""
        ids = set(self._order[-RECENT:])
        ids.update(i for _, i in self._ranked[:BEST])
        ids.update(self._keeps[-KEEPS:])
        ids.update(self._active)
        if self._baseline is not None:
            ids.add(self._baseline)
        for i in self._failed[-TAILS:]:
            self._read_tail(i)
            ids.add(i)
        return [self._exp[i] for i in sorted(ids)]

    def in_flight(self) -> list[Experiment]:
        """Experiments queued or running, oldest first (repeat runs are not experiments)."""
        return [self._exp[i] for i in sorted(self._active)]

    @property
    def tried(self) -> Tried:
        """Every fingerprint tried so far, as a frozen view (costs nothing to take)."""
        return Tried(self._first, self._log, len(self._log))

    def first_with(self, fp: str) -> int | None:
        """The id of the first experiment that tried exactly these files, or None."""
        entry = self._first.get(fp)
        return entry[1] if entry is not None else None

    def counts(self) -> dict[str, int]:
        """Finished experiments by status, the baseline aside, over the whole tag."""
        return dict(self._counts)

    def runs(self, exclude: Set[str]) -> int:
        """Rows of the tag, repeats included, whose status is not in `exclude`."""
        return sum(n for status, n in self._rows_by_status.items() if status not in exclude)

    def __len__(self) -> int:
        """Experiments of the tag (repeat runs are not), in flight included."""
        return len(self._order)

    def was_incumbent(self, commit: str) -> bool:
        """True if a keep of this tag has this commit."""
        return bool(commit) and commit in self._kept

    def get(self, experiment_id: int) -> Experiment | None:
        return self._exp.get(experiment_id)

    def _read_tail(self, experiment_id: int) -> None:
        """A failed run's log never changes: its tail is read once, when first shown."""
        path = self._logs.pop(experiment_id, None)
        if path:
            e = self._exp[experiment_id]
            self._exp[experiment_id] = replace(e, log_tail=self._tail(path))


def _insert(ids: list[int], i: int) -> None:
    """Insert into an ascending list: an append, unless rows came out of order."""
    if not ids or ids[-1] < i:
        ids.append(i)
    else:
        bisect.insort(ids, i)
