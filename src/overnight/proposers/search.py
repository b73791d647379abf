"""Search proposer: tune the knobs of the editable files with perturb, random, TPE or grid.

Every proposal is a full knob configuration (all searched knobs), written into the files with
`overnight.knobs.rewrite`. Values are rounded with `format_value` before use, so the knob
values a proposal reports are exactly what its files say.

Strategies ([search] strategy, seeded by [search] seed):

- perturb: move 1 knob (70%) or 2 around the incumbent. Log ranges: multiply by
  exp(N(0, ln 2)); linear float ranges: add N(0, (hi-lo)/4); ints: +-1 or 2 steps of
  max(1, round(|v|/4)).
- random: every knob uniform in its bounds (log-uniform on log ranges).
- tpe: Optuna's TPE, its study rebuilt from the history on every call (see `build_study`),
  from a bounded part of it: the TPE_BEST best measured trials of the Context and its
  TPE_RECENT most recent other ones, plus everything in flight. TPE's good set is the best
  trials, so the best are kept whatever their age; its cost per proposal stays flat however
  long the tag runs.
- grid: waves of a 3-level factorial design on two knobs at a time (cycling through the
  knobs) around the incumbent: x0.5/x2 on log ranges, +-(hi-lo)/4 on linear ones, +-1 step
  for ints; 8 points a wave (2 with a single knob). Stops when a full cycle of waves has
  nothing new.

State lives in the ledger: a proposal is never a configuration already tried (any status,
in flight included) or equal to the incumbent; after 50 draws without a new one it returns
None. The configurations recorded are gathered from the Context's history incrementally (only
entries newer than the last call's); older ones than a Context holds (it is bounded) are
caught by their fingerprint, in `ctx.tried`, which covers the whole tag. What is kept in
memory (the grid's current wave, proposals not yet recorded in the history) only avoids
repeats between records; a proposer rebuilt after a restart loses nothing the ledger holds.

Default bounds, from the value a knob has at HEAD (override with `[search] bounds`):

- positive float v: [v/10, v*10], log scale
- float 0.0: [0, 1], linear (a zero stays non-negative)
- negative float v: [v-1, v+1], linear
- int v > 0: [max(1, v//4), max(4v, v+4)]
- int 0: [0, 4]
- int v < 0: the mirror image of |v|: [-max(4|v|, |v|+4), -max(1, |v|//4)]

Declared bounds (`NAME = [lo, hi]` or `{ low, high, scale }`) for an int knob are narrowed to
whole numbers. On the "auto" scale a float range is searched on a log scale when lo > 0; an
int range when lo >= 1 and hi/lo >= 8 (batch sizes, widths), so small int ranges such as
[1, 4] stay uniform. "log1m" searches 1 - x on a log scale (betas: 0.9, 0.99, 0.999 are
evenly spaced); "pow2" moves an int by factors of two and keeps it a power of two. A HEAD
value outside its bounds is fine for the baseline; proposals are always inside.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from decimal import Decimal
from itertools import product
from typing import TYPE_CHECKING, Literal

from overnight.errors import ConfigError
from overnight.knobs import Knob, Scope, format_value, python_files, read_knobs, rewrite
from overnight.proposers.base import Context, Experiment, Proposal, Proposer, fingerprint
from overnight.spec import Bound, Spec
from overnight.status import ACTIVE, FAILED, MEASURED, Status

if TYPE_CHECKING:
    import optuna

MAX_TRIES = 50  # draws per proposal before concluding nothing new is left
TPE_BEST = 25  # tpe: the best measured trials it is given, however old
TPE_RECENT = 75  # tpe: the most recent other finished trials it is given
COMPLETE_STATUSES = MEASURED - {Status.REPEAT}  # candidates with a number
FAIL_STATUSES = FAILED
IN_FLIGHT_STATUSES = ACTIVE

Config = dict[str, int | float]
Key = tuple[int | float, ...]


Scale = Literal["linear", "log", "log1m", "pow2"]


@dataclass(frozen=True)
class KnobRange:
    """Where one searched knob may go, and on which scale it moves."""

    name: str
    kind: Literal["int", "float"]
    lo: int | float
    hi: int | float
    scale: Scale = "linear"

    @property
    def log(self) -> bool:
        return self.scale == "log"

    def contains(self, v: int | float) -> bool:
        if self.kind == "int" and not float(v).is_integer():
            return False
        if self.scale == "pow2" and not _is_pow2(v):
            return False
        return self.lo <= v <= self.hi

    def snap(self, x: float) -> int | float:
        """x clipped into the range and rounded the way it will be written."""
        if self.scale == "pow2":
            x = min(max(float(x), float(self.lo)), float(self.hi))
            return 1 << max(0, round(math.log2(x)))
        if self.kind == "int":
            return min(max(int(round(x)), int(self.lo)), int(self.hi))
        x = min(max(float(x), float(self.lo)), float(self.hi))
        # 4 significant digits (of 1 - x on a log1m scale: 0.99912 is 0.9991), unless rounding
        # would leave the range (bounds like 1.23456e-4).
        for digits in (4, 6, 9, 17):
            if self.scale == "log1m":  # in decimal: 1 - 0.1377 is 0.8623, not 0.86230000001
                v = float(Decimal(1) - Decimal(format_value(1 - x, digits=digits)))
            else:
                v = float(format_value(x, digits=digits))
            if self.lo <= v <= self.hi:
                return v
        return x

    def keep_inside(self, v: int | float) -> int | float:
        """v itself when it is inside, else the nearest written value inside."""
        return v if self.contains(v) else self.snap(v)

    # TPE sees a log1m knob as 1 - x on a log scale, a pow2 knob as its exponent.

    def to_param(self, v: int | float) -> int | float:
        if self.scale == "log1m":
            return 1 - float(v)
        if self.scale == "pow2":
            return round(math.log2(v))
        return int(v) if self.kind == "int" else float(v)

    def from_param(self, p: int | float) -> float:
        if self.scale == "log1m":
            return 1 - p
        if self.scale == "pow2":
            return float(2 ** int(p))
        return p

    def distribution(self) -> optuna.distributions.BaseDistribution:
        from optuna.distributions import FloatDistribution, IntDistribution

        if self.scale == "log1m":
            return FloatDistribution(1 - float(self.hi), 1 - float(self.lo), log=True)
        if self.scale == "pow2":
            return IntDistribution(round(math.log2(self.lo)), round(math.log2(self.hi)))
        if self.kind == "int":
            return IntDistribution(int(self.lo), int(self.hi), log=self.log)
        return FloatDistribution(float(self.lo), float(self.hi), log=self.log)


def default_range(knob: Knob) -> KnobRange:
    """Bounds derived from the HEAD value (see the module docstring)."""
    v = knob.value
    if knob.kind == "float":
        if v > 0:
            return _range(knob, v / 10, v * 10)
        if v == 0:
            return _range(knob, 0.0, 1.0)  # a zero stays non-negative
        return _range(knob, v - 1, v + 1)
    v = int(v)
    if v > 0:
        return _range(knob, max(1, v // 4), max(v * 4, v + 4))
    if v == 0:
        return _range(knob, 0, 4)
    a = -v
    return _range(knob, -max(a * 4, a + 4), -max(1, a // 4))


def declared_range(knob: Knob, bound: Bound) -> KnobRange:
    """Bounds from `[search] bounds`; int knobs keep the whole numbers inside [lo, hi]."""
    lo, hi = bound.low, bound.high
    scale = None if bound.scale == "auto" else bound.scale
    where = f"overnight.toml: [search] bounds.{knob.name} = [{lo:g}, {hi:g}]"
    if scale == "pow2":
        if knob.kind != "int":
            raise ConfigError(f'{where}: scale = "pow2" is for int knobs; {knob.name} is a '
                              "float")
        plo, phi = 1 << math.ceil(math.log2(lo)), 1 << math.floor(math.log2(hi))
        if plo > phi:
            raise ConfigError(f"{where} holds no power of two")
        return _range(knob, plo, phi, "pow2")
    if scale == "log1m" and knob.kind == "int":
        raise ConfigError(f'{where}: scale = "log1m" is for float knobs; {knob.name} is an int')
    if knob.kind == "int":
        ilo, ihi = math.ceil(lo), math.floor(hi)
        if ilo > ihi:
            raise ConfigError(f"{where} holds no whole number, but {knob.name} is an int knob")
        return _range(knob, ilo, ihi, scale)
    return _range(knob, float(lo), float(hi), scale)


def _range(knob: Knob, lo: int | float, hi: int | float,
           scale: Scale | None = None) -> KnobRange:
    if scale is None:  # "auto"
        if knob.kind == "int":
            scale = "log" if lo >= 1 and hi / lo >= 8 else "linear"
        else:
            scale = "log" if lo > 0 else "linear"
    return KnobRange(name=knob.name, kind=knob.kind, lo=lo, hi=hi, scale=scale)


def _is_pow2(v: int | float) -> bool:
    return float(v).is_integer() and v >= 1 and (int(v) & (int(v) - 1)) == 0


class SearchProposer(Proposer):
    """Proposes knob configurations; `files` is the editable files' text at HEAD."""

    name = "search"

    def __init__(self, spec: Spec, files: dict[str, str]) -> None:
        self.strategy = spec.search.strategy
        self.metric = spec.objective.metric
        self.scope = Scope.of(spec)
        head = read_knobs(python_files(files), self.scope)
        self.names = _searched_names(spec.search.knobs, head, files, self.scope)
        self.ranges = _ranges(self.names, head, spec.search.bounds)
        self._rng = random.Random(spec.search.seed)  # seed None: fresh entropy
        self._pending: set[Key] = set()  # proposed here, not yet seen in ctx.history
        self._recorded: set[Key] = set()  # configurations seen in the history (or tried)
        self._newest: int | None = None  # the newest experiment id gathered into _recorded
        self._wave: list[Config] = []  # grid: partial configs still to try
        self._wide = 1.0  # step width: wider while stuck
        self._waves = 0
        self._next_axis = 0
        self.study: optuna.Study | None = None  # tpe: the study behind the last proposal
        if self.strategy == "tpe":
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)

    def propose(self, ctx: Context) -> Proposal | None:
        current = read_knobs(python_files(ctx.files), self.scope)
        center = self._incumbent_values(ctx, current)
        seen = self._seen(ctx, center, current)
        strategies: dict[str, Callable[[Context, Config, _Seen], tuple[Config, str] | None]]
        strategies = {
            "perturb": self._perturb,
            "random": self._random,
            "tpe": self._tpe,
            "grid": self._grid,
        }
        found = self._unstick(ctx, center, seen) if ctx.stuck else None
        found = found or strategies[self.strategy](ctx, center, seen)
        if found is None:
            return None
        config, hypothesis = found
        self._pending.add(self._key(config))
        return self._proposal(ctx, current, config, hypothesis)

    # --- strategies: each returns (config, hypothesis) or None -------------------------------

    def _unstick(self, ctx: Context, center: Config, seen: _Seen) -> tuple[Config, str] | None:
        """Stuck ([human] stuck_after failures in a row): half the proposals restart
        anywhere in the space, half take wider steps around another kept point (or the
        incumbent when it is the only one)."""
        n = len(ctx.stuck)
        if self._rng.random() < 0.5:
            found = self._random(ctx, center, seen)
            if found is not None:
                return found[0], f"stuck after {n} failures: restart at a fresh point"
            return None
        kept = [e for e in ctx.history if e.status == "keep" and e.id != ctx.incumbent.id
                and all(name in e.knobs for name in self.names)]
        other = self._rng.choice(kept) if kept else None
        base = {n_: other.knobs[n_] for n_ in self.names} if other else center
        self._wide = 3.0
        try:
            found = self._perturb(ctx, base, seen)
        finally:
            self._wide = 1.0
        if found is None:
            return None
        around = f"kept #{other.id}" if other else "the incumbent"
        return found[0], f"stuck after {n} failures: wider steps around {around}"

    def _perturb(self, ctx: Context, center: Config, seen: _Seen) -> tuple[Config, str] | None:
        """Local moves of one knob (70%) or two around the incumbent."""
        base = self._inside(center)

        def draw() -> tuple[Config, str]:
            count = 1 if len(self.names) == 1 or self._rng.random() < 0.7 else 2
            config = dict(base)
            moved = []
            for name in self._rng.sample(self.names, count):
                r = self.ranges[name]
                config[name] = r.snap(self._move(r, base[name]))
                if config[name] != base[name]:
                    word = "larger" if config[name] > base[name] else "smaller"
                    moved.append(f"{word} {name}")
            if not moved:  # only possible when the incumbent sat outside its bounds
                return config, "perturb: the incumbent pulled inside its bounds"
            return config, f"perturb: {' and '.join(moved)} may {self._goal(ctx)}"

        return self._first_new(draw, seen)

    def _random(self, ctx: Context, center: Config, seen: _Seen) -> tuple[Config, str] | None:
        """Every knob drawn afresh, uniform (log-uniform on log ranges) within bounds."""

        def draw() -> tuple[Config, str]:
            config = {n: self.ranges[n].snap(self._uniform(self.ranges[n])) for n in self.names}
            number = len(ctx.history) + ctx.omitted + 1
            return config, f"random sample #{number}: a fresh point in the space"

        return self._first_new(draw, seen)

    def _tpe(self, ctx: Context, center: Config, seen: _Seen) -> tuple[Config, str] | None:
        """Optuna TPE over a study rebuilt from ctx.history on every call."""
        study = self.build_study(ctx)
        self.study = study
        number = len(ctx.history) + ctx.omitted + 1
        distributions = self._distributions()
        for _ in range(MAX_TRIES):
            trial = study.ask(distributions)
            config = {n: self.ranges[n].snap(self.ranges[n].from_param(trial.params[n]))
                      for n in self.names}
            if config not in seen:
                return config, f"tpe sample #{number}: where TPE expects to {self._goal(ctx)}"
            # A duplicate stays RUNNING: the constant liar then steers the next ask away.
        return None

    def _grid(self, ctx: Context, center: Config, seen: _Seen) -> tuple[Config, str] | None:
        """Waves of a 3-level factorial design on up to two knobs around the incumbent."""
        base = self._inside(center)
        # Each wave varies different knobs; a full cycle with nothing new means we are done.
        waves_left = math.ceil(len(self.names) / 2) + 1
        while True:
            if not self._wave:
                if waves_left == 0:
                    return None
                waves_left -= 1
                self._wave = self._build_wave(base)
                continue
            # A wave holds only its own knobs, so it follows an incumbent that moved meanwhile.
            partial = self._wave.pop(0)
            config = {**base, **partial}
            if config not in seen:
                varied = " and ".join(partial)
                return config, f"grid wave #{self._waves}: vary {varied} around the incumbent"

    # --- tpe -------------------------------------------------------------------------------

    def build_study(self, ctx: Context) -> optuna.Study:
        """A fresh in-memory study of ctx's experiments: the TPE_BEST best measured, the
        TPE_RECENT most recent other finished ones, and everything in flight.

        Rebuilding on each call keeps the study a pure function of the ledger: a proposer
        started after a restart sees exactly the trials the old one saw. Bounding it keeps
        TPE's cost per proposal flat however long the tag runs. In-flight experiments (and
        proposals not yet recorded) go in as RUNNING trials, which the constant-liar TPE
        treats as bad results, so parallel proposals spread out.
        """
        import optuna
        from optuna.trial import TrialState, create_trial

        sampler = optuna.samplers.TPESampler(
            seed=self._rng.getrandbits(32),
            n_startup_trials=min(10, 2 * len(self.names) + 2),
            constant_liar=True,
            multivariate=True,
        )
        direction = "minimize" if ctx.direction == "lower" else "maximize"
        study = optuna.create_study(direction=direction, sampler=sampler)
        distributions = self._distributions()
        for params, state, value in self._history_trials(ctx):
            trial = create_trial(
                state=state, value=value, params=params, distributions=distributions
            )
            study.add_trial(trial)
        for key in self._pending:
            params = {n: self.ranges[n].to_param(v) for n, v in zip(self.names, key, strict=True)}
            trial = create_trial(
                state=TrialState.RUNNING, params=params, distributions=distributions
            )
            study.add_trial(trial)
        return study

    def _history_trials(
        self, ctx: Context
    ) -> list[tuple[Config, optuna.trial.TrialState, float | None]]:
        from optuna.trial import TrialState

        in_flight_ids = {e.id for e in ctx.in_flight}
        history_ids = {e.id for e in ctx.history}
        experiments = [*ctx.history, *(e for e in ctx.in_flight if e.id not in history_ids)]
        running: list[tuple[Config, TrialState, float | None]] = []
        finished: list[tuple[int, Config, TrialState, float | None]] = []
        for e in experiments:
            params = self._params(e)
            if params is None:
                continue  # missing knobs or outside the search space
            if e.status in IN_FLIGHT_STATUSES or e.id in in_flight_ids:
                running.append((params, TrialState.RUNNING, None))
            elif e.status in COMPLETE_STATUSES and _finite(e.metric):
                finished.append((e.id, params, TrialState.COMPLETE, e.metric))
            elif e.status in FAIL_STATUSES:
                finished.append((e.id, params, TrialState.FAIL, None))
            # lost, rejected, tampered: nothing was measured that we can trust
        sign = 1.0 if ctx.direction == "lower" else -1.0
        complete = [t for t in finished if t[2] == TrialState.COMPLETE]
        best = {t[0] for t in sorted(complete, key=lambda t: sign * t[3])[:TPE_BEST]}
        recent = {t[0] for t in [t for t in finished if t[0] not in best][-TPE_RECENT:]}
        kept = [t[1:] for t in finished if t[0] in best or t[0] in recent]
        return [*kept, *running]

    def _params(self, e: Experiment) -> Config | None:
        """The experiment's knob values as trial params, or None if it does not fit. The
        values that ran win over the proposed ones: an edit that a config file or the command
        set again tested the value that ran, not the one proposed."""
        params: Config = {}
        for name in self.names:
            v = e.knobs.get(name)
            ran = e.runtime_knobs.get(name)  # what really ran, when the attestation saw it
            if isinstance(ran, (int, float)) and not isinstance(ran, bool):
                v = ran
            r = self.ranges[name]
            if v is None or isinstance(v, bool) or not r.contains(v):
                return None
            params[name] = r.to_param(v)
        return params

    def _distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        return {name: r.distribution() for name, r in self.ranges.items()}

    # --- grid ------------------------------------------------------------------------------

    def _build_wave(self, base: Config) -> list[Config]:
        """Full factorial of {lower, center, upper} on the next one or two knobs, minus the
        center point: 8 points for two knobs, 2 for one. Levels collapsed by bounds dedupe."""
        n = len(self.names)
        axes = [self.names[(self._next_axis + i) % n] for i in range(min(2, n))]
        self._next_axis = (self._next_axis + len(axes)) % n
        self._waves += 1
        levels = [self._levels(self.ranges[a], base[a]) for a in axes]
        center = tuple(base[a] for a in axes)
        points: list[Config] = []
        done: set[Key] = {center}
        for combo in product(*levels):
            if combo not in done:
                done.add(combo)
                points.append(dict(zip(axes, combo, strict=True)))
        return points

    def _levels(self, r: KnobRange, v: int | float) -> list[int | float]:
        if r.scale == "pow2":
            lower, upper = v / 2, v * 2
        elif r.scale == "log1m":
            lower, upper = 1 - (1 - v) * 2, 1 - (1 - v) * 0.5
        elif r.kind == "int":
            step = _int_step(v)
            lower, upper = v - step, v + step
        elif r.log:
            lower, upper = v * 0.5, v * 2
        else:
            lower, upper = v - 0.25 * (r.hi - r.lo), v + 0.25 * (r.hi - r.lo)
        return [r.snap(lower), v, r.snap(upper)]

    # --- shared helpers --------------------------------------------------------------------

    def _first_new(
        self, draw: Callable[[], tuple[Config, str]], seen: _Seen
    ) -> tuple[Config, str] | None:
        for _ in range(MAX_TRIES):
            config, hypothesis = draw()
            if config not in seen:
                return config, hypothesis
        return None

    def _move(self, r: KnobRange, v: int | float) -> float:
        w = self._wide
        if r.scale == "pow2":
            return v * 2.0 ** (self._rng.choice((1, 2)) * self._rng.choice((-1, 1)) * round(w))
        if r.scale == "log1m":
            return 1 - (1 - v) * math.exp(self._rng.gauss(0.0, w * math.log(2)))
        if r.kind == "int":
            k = self._rng.choice((1, 2)) * self._rng.choice((-1, 1)) * round(w)
            return v + k * _int_step(v)
        # Scale-free moves on a log range; on a linear one a value near 0 could never cross it.
        if r.log:
            return v * math.exp(self._rng.gauss(0.0, w * math.log(2)))
        return v + self._rng.gauss(0.0, w * 0.25 * (r.hi - r.lo))

    def _uniform(self, r: KnobRange) -> float:
        if r.scale == "pow2":
            return float(2 ** self._rng.randint(round(math.log2(r.lo)), round(math.log2(r.hi))))
        if r.scale == "log1m":
            return 1 - math.exp(self._rng.uniform(math.log(1 - r.hi), math.log(1 - r.lo)))
        if r.kind == "int":
            if r.log:
                # Discrete log-uniform: P(k) ~ log((k+1)/k).
                x = math.exp(self._rng.uniform(math.log(r.lo), math.log(r.hi + 1)))
                return min(math.floor(x), r.hi)
            return self._rng.randint(int(r.lo), int(r.hi))
        if r.log:
            return math.exp(self._rng.uniform(math.log(r.lo), math.log(r.hi)))
        return self._rng.uniform(r.lo, r.hi)

    def _inside(self, center: Config) -> Config:
        """The incumbent, with any value outside its bounds (HEAD may be) pulled inside."""
        return {n: self.ranges[n].keep_inside(center[n]) for n in self.names}

    def _goal(self, ctx: Context) -> str:
        return f"{'lower' if ctx.direction == 'lower' else 'raise'} {self.metric}"

    def _key(self, config: Config) -> Key:
        """A full configuration as a hashable tuple, in the order of self.names."""
        return tuple(config[n] for n in self.names)

    def _recorded_key(self, values: Mapping[str, int | float]) -> Key | None:
        """Like _key for a recorded experiment's knobs; None when some are missing."""
        if any(values.get(n) is None or isinstance(values[n], bool) for n in self.names):
            return None
        return tuple(values[n] for n in self.names)

    def _incumbent_values(self, ctx: Context, current: dict[str, Knob]) -> Config:
        values: Config = {}
        for name in self.names:
            v = ctx.incumbent.knobs.get(name)
            if v is None and name in current:
                v = current[name].value
            if v is None:
                raise ConfigError(
                    f"knob {name} is not in the incumbent's files any more "
                    f"(commit {ctx.incumbent.commit[:12]}): restore it or drop it from "
                    f"[search] knobs"
                )
            # A ledger may hand back 32.0 for an int knob; ints must stay ints.
            int_kind = self.ranges[name].kind == "int" and float(v).is_integer()
            values[name] = int(v) if int_kind else v
        return values

    def _seen(self, ctx: Context, center: Config, current: dict[str, Knob]) -> _Seen:
        """Configurations not to propose: recorded ones (any status), pending ones, the
        incumbent, the files on disk, and any whose files were tried (`ctx.tried`)."""
        newest = self._newest
        fresh = []
        for e in reversed(ctx.history):  # oldest first: the new entries are at the end
            if newest is not None and e.id <= newest:
                break
            fresh.append(e)
        fresh += [e for e in ctx.in_flight if newest is None or e.id > newest]
        for e in fresh:
            key = self._recorded_key(e.knobs)
            if key is not None:
                self._recorded.add(key)
                self._pending.discard(key)  # recorded now: the ledger remembers it for us
            self._newest = e.id if self._newest is None else max(self._newest, e.id)
        also = {self._key(center)}
        on_disk = self._recorded_key({n: k.value for n, k in current.items()})
        if on_disk is not None:
            also.add(on_disk)

        def seen(config: Config) -> bool:
            key = self._key(config)
            return key in self._recorded or key in self._pending or key in also \
                or self._tried(ctx, current, config)

        return _Seen(seen)

    def _tried(self, ctx: Context, current: dict[str, Knob], config: Config) -> bool:
        """True if the files this config gives were tried already, however long ago (the
        Context's history is bounded; its `tried` is not). Remembered if so."""
        if not ctx.tried:
            return False
        edits = self._edits(ctx, current, config)
        if fingerprint({**ctx.files, **edits}) not in ctx.tried:
            return False
        self._recorded.add(self._key(config))
        return True

    def _proposal(
        self, ctx: Context, current: dict[str, Knob], config: Config, hypothesis: str
    ) -> Proposal:
        described = [f"{name} {_show(current[name].value)} -> {_show(config[name])}"
                     for name in self.names if current[name].value != config[name]]
        return Proposal(
            parent=ctx.incumbent.commit,
            edits=self._edits(ctx, current, config),
            description=", ".join(described),
            hypothesis=hypothesis,
            knobs=dict(config),
        )


    def _edits(self, ctx: Context, current: dict[str, Knob], config: Config) -> dict[str, str]:
        """The editable files that change when the incumbent's knobs become `config`."""
        changes: dict[str, dict[str, int | float]] = {}
        for name in self.names:
            knob = current.get(name)
            if knob is None:
                raise ConfigError(f"knob {name} is not in the incumbent's files any more")
            if knob.value != config[name]:
                changes.setdefault(knob.path, {})[name] = config[name]
        edits = {path: rewrite(ctx.files[path], vals, self.scope)
                 for path, vals in changes.items()}
        return {path: text for path, text in edits.items() if text != ctx.files[path]}


@dataclass(frozen=True)
class _Seen(Container[Config]):
    """`config in seen`: a configuration not to propose (see SearchProposer._seen)."""

    test: Callable[[Config], bool]

    def __contains__(self, config: object) -> bool:
        return isinstance(config, dict) and self.test(config)


# --- module helpers ------------------------------------------------------------------------


def _lowercase_numbers(files: dict[str, str]) -> list[str]:
    """Module-level `name = <number>` with a lowercase name (nanoGPT's style): not knobs."""
    import ast

    found: list[str] = []
    for path in python_files(files):
        try:
            tree = ast.parse(files[path])
        except (SyntaxError, ValueError):
            continue
        for node in tree.body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name)
                    and not node.targets[0].id.isupper()
                    and isinstance(node.value, ast.Constant)
                    and type(node.value.value) in (int, float)):
                found.append(node.targets[0].id)
    return found


def _searched_names(
    wanted: list[str] | None, head: dict[str, Knob], files: dict[str, str], scope: Scope
) -> list[str]:
    available = sorted(head)
    if not available:
        where = ", ".join(sorted(files)) or "no files"
        lower = _lowercase_numbers(files)
        hint = (f"; {', '.join(lower[:8])} {'is' if len(lower) == 1 else 'are'} lowercase: "
                f"name the ones to tune in [search] knobs, e.g. knobs = "
                f"[{', '.join(repr(n).replace(chr(39), chr(34)) for n in lower[:3])}] "
                "(`overnight init` writes a selection with bounds)" if lower else "")
        raise ConfigError(
            f"no knobs found in the editable files ({where}): the search proposer tunes "
            f"top-level numeric constants, by default those with UPPER_CASE names such as "
            f"`LEARNING_RATE = 3e-4`{hint}"
        )
    if wanted is None:
        return list(head)  # source order: the order the user reads them in
    names = list(dict.fromkeys(wanted))  # dedupe, keep the user's order
    fixed = [n for n in names if n in scope.overridden]
    if fixed:
        shown = ", ".join(f"--{n}={scope.overridden[n]}" for n in fixed)
        raise ConfigError(
            f"overnight.toml: [search] knobs names {', '.join(fixed)}, which the command sets "
            f"({shown}) after the files are read: an edit cannot change what runs. Drop it "
            "from the command or from [search] knobs"
        )
    unknown = [n for n in names if n not in head]
    if unknown:
        raise ConfigError(
            f"overnight.toml: [search] knobs names {', '.join(unknown)}, which is not a knob "
            f"of the editable files (a top-level `name = <number>`, set once in a file); "
            f"available knobs: {', '.join(available)}"
        )
    return names


def _ranges(
    names: list[str], head: dict[str, Knob], bounds: dict[str, Bound]
) -> dict[str, KnobRange]:
    stray = sorted(set(bounds) - set(names))
    if stray:
        raise ConfigError(
            f"overnight.toml: [search] bounds names {', '.join(stray)}, which is not a "
            f"searched knob; searched knobs: {', '.join(names)}"
        )
    ranges = {}
    for name in names:
        if name in bounds:
            ranges[name] = declared_range(head[name], bounds[name])
        else:
            ranges[name] = default_range(head[name])
    return ranges


def _int_step(v: int | float) -> int:
    return max(1, round(0.25 * abs(v)))


def _show(v: int | float) -> str:
    return format_value(v, digits=17)  # exact: the proposal already rounded its values


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)

