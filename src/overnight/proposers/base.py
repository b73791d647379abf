"""What a proposer sees (Context) and what it returns (Proposal)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Experiment:
    """One finished or in-flight experiment, as the ledger holds it."""

    id: int
    commit: str
    parent: str | None
    status: str  # queued running keep discard crash timeout rejected lost ...
    metric: float | None
    description: str
    knobs: dict[str, float | int]  # knob values of the candidate (what was proposed)
    is_baseline: bool = False


@dataclass(frozen=True)
class Context:
    """Everything a proposer may know when it proposes. Rebuilt from the ledger every time."""

    incumbent: Experiment  # the best kept experiment (the baseline at first)
    files: dict[str, str]  # editable path -> text at the incumbent's commit
    history: list[Experiment]  # every experiment of this tag, oldest first, in-flight included
    in_flight: list[Experiment]  # queued or running right now
    direction: str  # "lower" | "higher"
    slots: int  # how many experiments can run at once


@dataclass(frozen=True)
class Proposal:
    """A change to try: new full text for some editable files, on top of `parent`."""

    parent: str  # commit the edits apply to
    edits: dict[str, str]  # path -> new full text
    description: str
    hypothesis: str = ""
    knobs: dict[str, float | int] = field(default_factory=dict)  # full knob values after edits


class Proposer(ABC):
    """Small interface: state lives in the ledger (Context), never only in memory."""

    name: str = "proposer"

    @abstractmethod
    def propose(self, ctx: Context) -> Proposal | None:
        """The next candidate, or None when there is nothing new left to try."""
