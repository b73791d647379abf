"""The statuses an experiment row goes through, in one place.

A row is `queued`, then `running`, then final. A candidate whose first run looked better
than the incumbent waits in `confirm` while the same commit runs again; each of those runs
is a row of its own (`repeat_of` names the candidate) that ends as `repeat` when it measured.
"""

from __future__ import annotations

from enum import Enum


class Status(str, Enum):
    QUEUED = "queued"  # committed, waiting for a slot
    RUNNING = "running"
    CONFIRM = "confirm"  # looked better once: running again before it is judged
    KEEP = "keep"
    DISCARD = "discard"
    CRASH = "crash"
    TIMEOUT = "timeout"
    TAMPERED = "tampered"  # what ran is not what was committed
    CHECKS_FAILED = "checks_failed"
    REJECTED = "rejected"  # a proposal that never ran
    LOST = "lost"  # the run's process went away (interrupt, crash of the harness): redone
    REPEAT = "repeat"  # a further measurement of a candidate (or the baseline)

    def __str__(self) -> str:
        return self.value


ACTIVE = frozenset({Status.QUEUED, Status.RUNNING})
FINAL = frozenset(Status) - ACTIVE - {Status.CONFIRM}
MEASURED = frozenset({Status.KEEP, Status.DISCARD, Status.CONFIRM, Status.REPEAT})
FAILED = frozenset({Status.CRASH, Status.TIMEOUT, Status.CHECKS_FAILED})  # the code's fault
UNFINISHED = ACTIVE | {Status.CONFIRM}  # not decided yet
NOT_COUNTED = frozenset({Status.REJECTED, Status.LOST}) | ACTIVE  # ran nothing (yet)
# results.tsv speaks karpathy's four statuses: one row per decided candidate.
TSV_STATUS = {Status.KEEP: "keep", Status.DISCARD: "discard", Status.CRASH: "crash",
              Status.TIMEOUT: "crash", Status.TAMPERED: "crash",
              Status.CHECKS_FAILED: "discard"}
