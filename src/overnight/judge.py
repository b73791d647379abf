"""Every decision about a run, and nothing else (no I/O).

A run's outcome (what the executor saw), the evidence (every measured run of the candidate and
of the incumbent) and the run-to-run noise of the tag go in; a `Decision` comes out: keep,
discard, confirm (run it again), repeat (a further measurement, recorded), crash, timeout,
lost, tampered or checks_failed. The scheduler only acts on decisions.

The keep rule (`[judge] mode = "confirm"`, the default):

- A candidate's first run only screens it: if it is not better than the incumbent's estimate
  (by more than `min_delta`), it is discarded; if it is, it becomes `confirm` and the same
  commit runs again.
- That first draw was chosen for looking good, so it is biased: the decision uses the confirm
  runs only. The candidate is kept when the one-sided test "its confirm runs' mean beats the
  incumbent's estimate by more than min_delta" passes at `confidence`, with the noise sigma
  pooled over every repeated commit of the tag and Student's t for the degrees of freedom the
  pool has. Otherwise it runs again while that is still possible (up to `max_runs` runs), and
  is discarded when it is not.
- The incumbent's estimate is the mean of its unbiased runs: all of the baseline's, a kept
  candidate's confirm runs. Never its luckiest draw.
- An objective whose repeats are identical (deterministic) is judged on one run, like
  `mode = "greedy"` (today's rule: keep if the one run beats the incumbent's number).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from statistics import NormalDist, median

from overnight.executors.base import RunResult
from overnight.spec import Judge as JudgeSpec
from overnight.spec import Objective
from overnight.status import Status

# Relative to the metric's size, a spread this small is float noise: the objective is exact.
EXACT = 1e-12
# A first run earns a confirm run when it beats the incumbent by this many standard errors
# of the difference: a candidate no better than the incumbent does so 16% of the time, not
# half, so fewer runs go to confirming noise (bench/noise.py: 13 repeats in 60 runs instead
# of 21, for the same gain).
SCREEN = 1.0


@dataclass(frozen=True)
class Outcome:
    """What one run produced, as far as judging goes."""

    status: str  # the executor's: ok | crash | timeout | lost | error
    value: float | None = None  # the objective, None if the run gave none
    why_none: str | None = None
    reason: str = ""  # the executor's explanation (exit code, deadline, ...)
    tampered: str = ""  # what ran is not what was committed
    metrics: Mapping[str, float] = field(default_factory=dict)  # every recorded metric


@dataclass(frozen=True)
class Evidence:
    """Every measured run of one commit, oldest first."""

    values: tuple[float, ...]
    selected: bool = True  # its first run selected it (a candidate): left out of the estimate

    @property
    def unbiased(self) -> tuple[float, ...]:
        if self.selected and len(self.values) > 1:
            return self.values[1:]
        return self.values

    @property
    def estimate(self) -> float:
        return _mean(self.unbiased)

    @property
    def n(self) -> int:
        return len(self.unbiased)


@dataclass(frozen=True)
class Decision:
    status: Status
    metric: float | None = None  # this run's own measurement
    delta: float | None = None  # estimate (or metric) minus the incumbent's estimate
    reason: str = ""
    estimate: float | None = None  # the candidate's value from its runs, once judged on them
    runs: int = 0  # measured runs behind the estimate
    spread: float | None = None  # standard error of the estimate
    noise: float | None = None  # the run-to-run sigma the decision used


class Noise:
    """Run-to-run noise of one tag (one per hardware class), pooled over every commit that
    ran more than once. Robust: a wild run is pulled in to 3 robust sigmas of its group before
    it counts, once there are enough pairs to say what wild is."""

    def __init__(self) -> None:
        self._groups: dict[int, tuple[float, ...]] = {}
        self._cached: tuple[float | None, int] | None = None

    def set(self, group: int, values: tuple[float, ...]) -> None:
        if len(values) >= 2:
            self._groups[group] = values
            self._cached = None

    def _fit(self) -> tuple[float | None, int]:
        if self._cached is None:
            self._cached = _pooled(list(self._groups.values()))
        return self._cached

    @property
    def sigma(self) -> float | None:
        """The estimated standard deviation of one run, None before any repeat."""
        return self._fit()[0]

    @property
    def df(self) -> int:
        return self._fit()[1]

    @property
    def exact(self) -> bool:
        """Repeats were identical: the objective is deterministic."""
        sigma = self.sigma
        if sigma is None:
            return False
        scale = max([1.0] + [abs(v) for g in self._groups.values() for v in g[:1]])
        return sigma <= EXACT * scale


class Runs:
    """Every measured run of a tag, grouped by commit (a candidate's first row id; repeats
    name it), and the noise they show. Fed one run at a time: nothing is rescanned."""

    def __init__(self) -> None:
        self._values: dict[int, list[float]] = {}
        self.noise = Noise()

    def add(self, row_id: int, repeat_of: int | None, value: float) -> None:
        group = repeat_of if repeat_of is not None else row_id
        values = self._values.setdefault(group, [])
        values.append(value)
        self.noise.set(group, tuple(values))

    def count(self, group: int) -> int:
        """How many measured runs the commit of row `group` has here."""
        return len(self._values.get(group, ()))

    def of(self, row_id: int, baseline: bool) -> Evidence:
        """The evidence for one candidate (or the baseline: none of its runs selected it)."""
        return Evidence(tuple(self._values.get(row_id, ())), selected=not baseline)


def _pooled(groups: list[tuple[float, ...]]) -> tuple[float | None, int]:
    if not groups:
        return None, 0
    diffs = [abs(a - b) for g in groups for i, a in enumerate(g) for b in g[i + 1:]]
    # |a - b| of two runs is half-normal with scale sigma*sqrt(2): its median is 0.954 sigma.
    robust = median(diffs) / 0.9539 if len(diffs) >= 6 else None
    ss, df = 0.0, 0
    for g in groups:
        if robust:
            mid = median(g)
            g = tuple(min(max(v, mid - 3 * robust), mid + 3 * robust) for v in g)
        m = _mean(g)
        ss += sum((v - m) ** 2 for v in g)
        df += len(g) - 1
    return math.sqrt(ss / df), df


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile: exact for 1 and 2 degrees of freedom, a Cornish-Fisher expansion
    above (within 1% from 3 on), the normal one for large df."""
    if df <= 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = NormalDist().inv_cdf(p)
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


class Judge:
    def __init__(self, objective: Objective, spec: JudgeSpec | None = None):
        self.objective = objective
        self.spec = spec or JudgeSpec()

    @property
    def greedy(self) -> bool:
        return self.spec.mode == "greedy"

    # -- a run ends --------------------------------------------------------------------

    def failure(self, run: Outcome) -> Decision | None:
        """A run that gave no usable number: lost, tampered, timeout, crash; else None."""
        if run.status in ("lost", "error"):
            return Decision(Status.LOST, reason=run.reason)
        if run.tampered:
            return Decision(Status.TAMPERED, reason=run.tampered)
        if run.status == "timeout":
            return Decision(Status.TIMEOUT, reason=run.reason)
        if run.status == "crash":
            return Decision(Status.CRASH, reason=run.reason)
        if run.value is None:
            # Exit 0 without a usable objective is a crash, never a number.
            return Decision(Status.CRASH, reason="; ".join(
                w for w in (run.why_none, run.reason) if w))
        return None

    def untested(self, first: Decision, unreached: list[str], whole: bool) -> Decision:
        """A first run whose edit did not reach what ran (a config file or the command set
        the knob again after it). `whole`: no edited knob ran with its new value, so the run
        measured the incumbent's configuration and tested nothing: discarded, whatever its
        number. Otherwise the decision stands, with the knobs that did not move named."""
        said = "; ".join(unreached)
        if first.status not in (Status.KEEP, Status.CONFIRM, Status.DISCARD):
            return first  # it failed: that is what it says
        if whole:
            return Decision(Status.DISCARD, metric=first.metric, delta=first.delta,
                            reason=f"the edit changed nothing at run time: {said}")
        return replace(first, reason=f"{first.reason} (the edit did not reach: {said})")

    def baseline(self, run: Outcome) -> Decision:
        """The unchanged HEAD: kept as the first incumbent if it measured at all."""
        failed = self.failure(run)
        if failed:
            return failed
        reason = "baseline"
        broken = self.objective.violated(dict(run.metrics))
        if broken:
            reason += f" (it breaks a constraint, candidates may not: {broken})"
        return Decision(Status.KEEP, run.value, None, reason, estimate=run.value, runs=1)

    def first(self, run: Outcome, incumbent: Evidence, noise: Noise,
              simpler: bool = False) -> Decision:
        """A candidate's first run: keep (greedy, or exact objective), confirm, or discard."""
        failed = self.failure(run)
        if failed:
            return failed
        value = run.value
        assert value is not None
        broken = self.objective.violated(dict(run.metrics))
        inc = incumbent.estimate
        delta = value - inc
        if broken:
            return Decision(Status.DISCARD, value, delta, broken)
        if self.greedy or noise.exact:
            if self.objective.better(value, inc):
                why = "better than the incumbent" + (" (the objective is exact)"
                                                     if noise.exact and not self.greedy else "")
                return Decision(Status.KEEP, value, delta, f"{why} {inc:.6g}",
                                estimate=value, runs=1, spread=0.0 if noise.exact else None,
                                noise=noise.sigma)
            if simpler and self.spec.prefer_simpler and noise.exact and value == inc:
                return Decision(Status.KEEP, value, delta, "as good as the incumbent and simpler",
                                estimate=value, runs=1, spread=0.0, noise=noise.sigma)
            return Decision(Status.DISCARD, value, delta, self._not_better(inc))
        if self._gain(value, inc) - self.objective.min_delta > self._screen(incumbent, noise):
            return Decision(Status.CONFIRM, value, delta,
                            f"looks better than the incumbent {inc:.6g}: running it again",
                            runs=1, noise=noise.sigma)
        if simpler and self.spec.prefer_simpler and self._plausibly_equal(value, incumbent,
                                                                          noise):
            return Decision(Status.CONFIRM, value, delta,
                            "as good as the incumbent within the noise and simpler: running "
                            "it again", runs=1, noise=noise.sigma)
        gain = self._gain(value, inc) - self.objective.min_delta
        reason = self._not_better(inc)
        if gain > 0:
            reason = (f"better than the incumbent {inc:.6g} by {gain:.3g}, within the noise: a "
                      f"confirm run needs {self._screen(incumbent, noise):.3g} (one standard "
                      "error of the difference)")
        return Decision(Status.DISCARD, value, delta, reason, runs=1, noise=noise.sigma)

    def repeat(self, run: Outcome) -> Decision:
        """A further run of a candidate or of the baseline: a measurement, or a failure."""
        failed = self.failure(run)
        if failed:
            return failed
        broken = self.objective.violated(dict(run.metrics))
        return Decision(Status.REPEAT, run.value, None, broken or "")

    def candidate(self, cand: Evidence, incumbent: Evidence, noise: Noise,
                  simpler: bool = False, failed: str = "") -> Decision:
        """A candidate in `confirm` after a repeat: keep, discard, or confirm (once more)."""
        inc = incumbent.estimate
        if failed:
            return self._discard(cand, incumbent, noise, f"a confirm run failed: {failed}")
        if noise.exact:
            value = cand.values[0]
            if self.objective.better(value, inc):
                return Decision(Status.KEEP, None, value - inc,
                                f"better than the incumbent {inc:.6g} (the objective is exact)",
                                estimate=value, runs=len(cand.values), spread=0.0, noise=0.0)
            return self._discard(cand, incumbent, noise, self._not_better(inc))
        sigma = noise.sigma
        if cand.n == 0 or len(cand.values) < 2 or sigma is None:
            return Decision(Status.CONFIRM, None, None, "waiting for another run",
                            runs=len(cand.values), noise=sigma)
        est = cand.estimate
        se = sigma * math.sqrt(1 / cand.n + 1 / incumbent.n)
        gain = self._gain(est, inc)
        t = t_quantile(1 - self.alpha, noise.df)
        stats = dict(estimate=est, runs=len(cand.values), spread=sigma / math.sqrt(cand.n),
                     noise=sigma)
        conf = f"{self.spec.confidence:.0%}"
        if gain - self.objective.min_delta > t * se:
            return Decision(Status.KEEP, None, est - inc,
                            f"better than the incumbent {inc:.6g} at {conf} confidence "
                            f"({cand.n} confirm run{'s' if cand.n > 1 else ''})", **stats)
        more = len(cand.values) < self.spec.max_runs
        if simpler and self.spec.prefer_simpler and gain + t * se >= 0:
            if not more:
                return Decision(Status.KEEP, None, est - inc,
                                f"as good as the incumbent {inc:.6g} within the noise, and "
                                "simpler", **stats)
            return Decision(Status.CONFIRM, None, est - inc,
                            "as good as the incumbent so far, and simpler: once more", **stats)
        if more and gain - self.objective.min_delta + t * se > 0:
            return Decision(Status.CONFIRM, None, est - inc,
                            "not yet clearly better than the incumbent: once more", **stats)
        return Decision(Status.DISCARD, None, est - inc,
                        f"not better than the incumbent {inc:.6g} at {conf} confidence over "
                        f"{cand.n} confirm run{'s' if cand.n > 1 else ''}"
                        + (f" (min_delta {self.objective.min_delta:g})"
                           if self.objective.min_delta else ""), **stats)

    def checks(self, ok: bool, reason: str) -> Decision | None:
        """The checks of a would-be keep: None when they pass (the keep stands)."""
        if ok:
            return None
        return Decision(Status.CHECKS_FAILED,
                        reason=f"checks {reason}" if reason.startswith("`") else reason)

    # -- helpers -----------------------------------------------------------------------

    @property
    def alpha(self) -> float:
        """The confirm runs' one-sided test level, at each look. A candidate no better than
        the incumbent passes the screen with probability 1 - Phi(SCREEN), and then one of
        the max_runs - 1 looks at its confirm runs with probability at most alpha each:
        kept with probability at most 1 - confidence in all."""
        passed_screen = 1 - NormalDist().cdf(SCREEN)
        looks = self.spec.max_runs - 1
        return min(0.5, (1 - self.spec.confidence) / passed_screen / looks)

    def _screen(self, incumbent: Evidence, noise: Noise) -> float:
        """How much better than the incumbent a first run must look to earn a confirm run:
        SCREEN standard errors of the difference (nothing while the noise is unknown)."""
        sigma = noise.sigma or 0.0
        return SCREEN * sigma * math.sqrt(1 + 1 / incumbent.n)

    def _gain(self, value: float, inc: float) -> float:
        """How much better `value` is than `inc`, positive when better, in metric units."""
        return inc - value if self.objective.direction == "lower" else value - inc

    def _plausibly_equal(self, value: float, incumbent: Evidence, noise: Noise) -> bool:
        sigma = noise.sigma
        if sigma is None:
            return False
        se = sigma * math.sqrt(1 + 1 / incumbent.n)
        return self._gain(value, incumbent.estimate) + t_quantile(self.spec.confidence,
                                                                   max(noise.df, 1)) * se >= 0

    def _discard(self, cand: Evidence, incumbent: Evidence, noise: Noise,
                 reason: str) -> Decision:
        est = cand.estimate
        return Decision(Status.DISCARD, None, est - incumbent.estimate, reason, estimate=est,
                        runs=len(cand.values), noise=noise.sigma,
                        spread=(noise.sigma / math.sqrt(cand.n)) if noise.sigma else None)

    def _not_better(self, inc: float) -> str:
        if self.objective.min_delta:
            return (f"not better than the incumbent {inc:.6g} by more than "
                    f"min_delta {self.objective.min_delta:g}")
        return f"not better than the incumbent {inc:.6g}"


def outcome(result: RunResult, metric: str) -> Outcome:
    """The judge's view of an executor's result."""
    value, why = result.metrics.objective(metric)
    metrics = dict(result.metrics.values)
    if result.peak_rss_mb is not None:
        metrics.setdefault("peak_rss_mb", result.peak_rss_mb)
    return Outcome(result.status, value, why, result.reason, result.tampered, metrics)


def _mean(values: tuple[float, ...]) -> float:
    return sum(values) / len(values)


def improvement_pct(objective: Objective, baseline: float, best: float) -> float:
    """Positive when `best` is an improvement, whatever the direction."""
    if baseline == 0:
        return 0.0
    sign = -1 if objective.direction == "lower" else 1
    return sign * (best - baseline) / abs(baseline) * 100
