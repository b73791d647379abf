"""Keep or discard: the decision, and nothing else (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass

from overnight.spec import Objective


@dataclass(frozen=True)
class Decision:
    status: str  # keep | discard | crash | timeout | lost
    metric: float | None
    delta: float | None  # metric - incumbent, in the metric's own units
    reason: str


def decide(objective: Objective, run_status: str, value: float | None, why_none: str | None,
           incumbent: float | None, run_reason: str = "") -> Decision:
    """Judge one finished run against the incumbent's metric (None for the baseline)."""
    if run_status in ("timeout", "lost"):
        return Decision(run_status, None, None, run_reason)
    if run_status == "crash":
        return Decision("crash", None, None, run_reason)
    if value is None:
        # Exit 0 without a usable objective is a crash, never a number.
        why = "; ".join(w for w in (why_none, run_reason) if w)
        return Decision("crash", None, None, why)
    if incumbent is None:
        return Decision("keep", value, None, "baseline")
    delta = value - incumbent
    if objective.better(value, incumbent):
        return Decision("keep", value, delta, f"better than the incumbent {incumbent:.6g}")
    return Decision("discard", value, delta, _not_better(objective, value, incumbent))


def _not_better(objective: Objective, value: float, incumbent: float) -> str:
    if objective.min_delta:
        return (f"not better than the incumbent {incumbent:.6g} by more than "
                f"min_delta {objective.min_delta:g}")
    return f"not better than the incumbent {incumbent:.6g}"


def improvement_pct(objective: Objective, baseline: float, best: float) -> float:
    """Positive when `best` is an improvement, whatever the direction."""
    if baseline == 0:
        return 0.0
    sign = -1 if objective.direction == "lower" else 1
    return sign * (best - baseline) / abs(baseline) * 100
