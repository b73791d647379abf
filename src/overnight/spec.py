"""The research spec, `overnight.toml`: schema, defaults, and errors that name the key."""

from __future__ import annotations

import math
import operator
import re
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from overnight.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SPEC_FILE = "overnight.toml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_LIMIT = re.compile(r"^\s*(<=|>=|<|>|==)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt,
        "==": operator.eq}


class Objective(_Section):
    metric: str = Field(min_length=1)
    direction: Literal["lower", "higher"] = "lower"
    min_delta: float = Field(default=0.0, ge=0.0)
    # Hard limits on other recorded metrics, e.g. { peak_vram_mb = "<= 40960" }.
    constraints: dict[str, str] = Field(default_factory=dict)
    # For output that does not print `metric: value`: a regular expression whose one group is
    # the value, e.g. "val loss ([0-9.]+)" for `step 750: train loss 2.21, val loss 2.37`.
    # The last match in the output wins.
    pattern: str | None = None

    @field_validator("pattern")
    @classmethod
    def _one_group(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            compiled = re.compile(v)
        except re.error as e:
            raise ValueError(f"{v!r} is not a regular expression: {e}") from None
        if compiled.groups != 1:
            raise ValueError(f"{v!r} must have exactly one group, around the number (it has "
                             f"{compiled.groups}), e.g. \"val loss ([0-9.]+)\"")
        return v

    @field_validator("constraints")
    @classmethod
    def _limits(cls, v: dict[str, str]) -> dict[str, str]:
        for name, limit in v.items():
            if not _LIMIT.match(limit):
                raise ValueError(f'{name} = "{limit}": write a comparison and a number, '
                                 'e.g. "<= 40960" (one of <=, <, >=, >, ==)')
        return v

    def violated(self, metrics: dict[str, float]) -> str | None:
        """Why these metrics break a constraint, or None."""
        for name, limit in self.constraints.items():
            op, number = _LIMIT.match(limit).groups()  # type: ignore[union-attr]
            if name not in metrics:
                return f"constraint {name} {op} {number}: the run recorded no {name}"
            if not _OPS[op](metrics[name], float(number)):
                return f"constraint {name} {op} {number} broken: {name} = {metrics[name]:.6g}"
        return None

    def better(self, a: float, b: float) -> bool:
        """True if `a` beats `b` by more than min_delta."""
        if self.direction == "lower":
            return a < b - self.min_delta
        return a > b + self.min_delta


class Run(_Section):
    command: str = Field(min_length=1)
    budget_seconds: float = Field(default=300, gt=0)
    timeout_seconds: float = Field(default=600, gt=0)
    parallel: int | Literal["gpus"] = 1
    kill_grace_seconds: float = Field(default=5, ge=0)
    metrics_file: str | None = None
    keep_workdirs: Literal["kept", "all", "none"] = "kept"
    env: dict[str, str] = Field(default_factory=dict)
    allow_env: list[str] = Field(default_factory=list)  # more of the harness's variables to pass
    sandbox: Literal["auto", "bwrap", "user", "none"] = "auto"
    network: bool = False  # may the experiment reach the network (sandboxed modes)
    devices: list[str] = Field(default_factory=list)  # device nodes besides the GPUs found
    tmp_size_mb: int = Field(default=4096, gt=0)  # the box's private /tmp and /dev/shm, each
    max_processes: int = Field(default=4096, ge=16)  # processes and threads of one run
    checks: str | None = None  # run on a candidate that beat the incumbent; failing -> not kept
    checks_timeout_seconds: float = Field(default=600, gt=0)
    # Run on each candidate before it takes a slot (an import-only or dry-run mode), boxed,
    # with no GPU: a failure is `rejected`, having spent no slot time.
    precheck: str | None = None
    precheck_timeout_seconds: float = Field(default=120, gt=0)
    on_tamper: Literal["halt", "continue"] = "halt"
    attest: bool = True  # record what Python actually executed (sitecustomize hook)
    executor: Literal["local", "ray"] = "local"  # ray: the [ray] section's cluster
    # Paths git ignores (datasets), read-only in every run at the same relative path.
    data: list[str] = Field(default_factory=list)
    # Kept up to date as experiments finish: the running tag's results.tsv (relative to the
    # repository root, git-ignored), what `overnight export` prints.
    results_tsv: str | None = None

    @field_validator("parallel")
    @classmethod
    def _parallel_positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError('must be >= 1 or "gpus"')
        return v

    @model_validator(mode="after")
    def _timeout_covers_budget(self) -> Run:
        if self.timeout_seconds < self.budget_seconds:
            raise ValueError(
                f"timeout_seconds ({self.timeout_seconds:g}) must be >= budget_seconds "
                f"({self.budget_seconds:g}): the timeout is the hard kill after the budget"
            )
        return self


class Evaluate(_Section):
    """A protected evaluator: the metric comes from it, not from the training script."""

    command: str = Field(min_length=1)
    timeout_seconds: float = Field(default=600, gt=0)


class Files(_Section):
    editable: list[str] = Field(min_length=1)
    protected: list[str] = Field(default_factory=list)
    # Files a model should read but not edit (a README, the model definition); protected
    # files are shown to it read-only too.
    context: list[str] = Field(default_factory=list)

    @field_validator("editable", "protected", "context")
    @classmethod
    def _inside(cls, v: list[str]) -> list[str]:
        for path in v:
            parts = path.replace("\\", "/").split("/")
            if not path.strip() or path.startswith("/") or ".." in parts:
                raise ValueError(f"must name files by their path inside the repository, "
                                 f"relative to its root: {path!r} is not one")
        return v

    @model_validator(mode="after")
    def _disjoint(self) -> Files:
        both = sorted(set(self.editable) & set(self.protected))
        if both:
            raise ValueError(f"{', '.join(both)} cannot be both editable and protected")
        shown = sorted(set(self.editable) & set(self.context))
        if shown:
            raise ValueError(f"{', '.join(shown)} is editable: the model sees it already; "
                             "drop it from [files] context")
        return self


class Proposer(_Section):
    kind: Literal["search", "llm", "agent"] = "search"
    # Proposals prepared ahead of free slots; default: half the slots, at least 1 (runs that
    # end together need their next candidates at once).
    prefetch: int | None = Field(default=None, ge=0)
    # Proposer calls at once (a model, an agent); default: the number of slots.
    max_concurrent: int | None = Field(default=None, ge=1)
    program: str = "program.md"  # research instructions for llm and agent proposers
    max_cost_usd: float | None = Field(default=None, gt=0)  # stop cleanly past this spend


class LLM(_Section):
    """A chat model: OpenAI's chat-completions API (vLLM, llama.cpp, Ollama, hosted) or
    Anthropic's messages API."""

    provider: Literal["openai", "anthropic"] = "openai"
    model: str = Field(min_length=1)
    base_url: str | None = None  # default: $OPENAI_BASE_URL, or the provider's own
    temperature: float = Field(default=0.7, ge=0, le=2)
    max_tokens: int = Field(default=4096, gt=0)
    context_tokens: int = Field(default=128_000, gt=1000)  # what the prompt may use
    timeout_seconds: float = Field(default=300, gt=0)
    retries: int = Field(default=5, ge=0)  # on 429, 5xx and dropped connections, with backoff
    answer_tries: int = Field(default=3, ge=1)  # malformed answers sent back with the error
    price_input_per_mtok: float = Field(default=0.0, ge=0)  # dollars per million tokens
    price_output_per_mtok: float = Field(default=0.0, ge=0)


class Agent(_Section):
    """An external coding agent run as a command in a scratch worktree at the parent."""

    command: str = Field(min_length=1)  # e.g. "claude -p {prompt}"; {prompt} is shell-quoted
    timeout_seconds: float = Field(default=900, gt=0)
    # The agent runs boxed like an experiment, with the network: only these of the harness's
    # secret variables reach it (its own API key), and these paths are bound in read-only.
    allow_env: list[str] = Field(default_factory=lambda: [
        "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL"])
    readable: list[str] = Field(default_factory=list)


class Bound(_Section):
    """Where a searched knob may go: `[low, high]`, or a table with a scale.

    scale: "auto" (log when low > 0, else linear; ints: log when high/low >= 8), "linear",
    "log", "log1m" (log scale on 1 - x: betas and momenta, where 0.99 -> 0.999 is as big a
    step as 0.9 -> 0.99), or "pow2" (integers that are powers of two move by powers of two).
    """

    low: float
    high: float
    scale: Literal["auto", "linear", "log", "log1m", "pow2"] = "auto"

    def shown(self) -> str:
        pair = f"[{self.low:g}, {self.high:g}]"
        return pair if self.scale == "auto" else f"{pair} on a {self.scale} scale"


class Search(_Section):
    strategy: Literal["tpe", "perturb", "random", "grid"] = "tpe"
    # Default: every UPPER_CASE numeric constant; names listed here may be lowercase.
    knobs: list[str] | None = None
    bounds: dict[str, Bound] = Field(default_factory=dict)
    seed: int | None = None

    @field_validator("bounds", mode="before")
    @classmethod
    def _pairs(cls, v: object) -> object:
        """`NAME = [low, high]` is short for `NAME = { low = .., high = .. }`."""
        if not isinstance(v, dict):
            return v
        out = {}
        for name, b in v.items():
            if isinstance(b, (list, tuple)):
                if len(b) != 2:
                    raise ValueError(f"{name}: write [low, high] (two numbers), or "
                                     '{ low = .., high = .., scale = "log1m" }')
                b = {"low": b[0], "high": b[1]}
            out[name] = b
        return out

    @field_validator("bounds")
    @classmethod
    def _ordered(cls, v: dict[str, Bound]) -> dict[str, Bound]:
        for name, b in v.items():
            lo, hi = b.low, b.high
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(f"{name} = [{lo:g}, {hi:g}]: bounds must be finite numbers")
            if not lo < hi:
                raise ValueError(f"{name}: lower bound {lo:g} must be < upper bound {hi:g}")
            if b.scale == "log" and lo <= 0:
                raise ValueError(f"{name}: a log scale needs low > 0, got {lo:g}")
            if b.scale == "log1m" and hi >= 1:
                raise ValueError(f"{name}: a log1m scale (log of 1 - x) needs high < 1, "
                                 f"got {hi:g}")
            if b.scale == "pow2" and lo < 1:
                raise ValueError(f"{name}: a pow2 scale needs low >= 1, got {lo:g}")
        return v


class Judge(_Section):
    """How a run's number becomes a keep (judge.py)."""

    mode: Literal["confirm", "greedy"] = "confirm"  # greedy: one run, keep if better
    confidence: float = Field(default=0.95, gt=0.5, lt=1)  # one-sided, for a keep
    baseline_runs: int = Field(default=3, ge=1)  # runs of the baseline: the first noise figure
    max_runs: int = Field(default=3, ge=2)  # runs of one candidate before it is discarded
    prefer_simpler: bool = False  # keep an as-good candidate with fewer lines of code


class RaySpec(_Section):
    """The Ray cluster the experiments run on ([run] executor = "ray")."""

    address: str = "auto"  # "auto": the cluster this machine is part of; or "ray://head:10001"
    # What one slot (one experiment) asks Ray for: { GPU = 1 }, { CPU = 2 }, custom resources.
    slot_resources: dict[str, float] = Field(default_factory=lambda: {"GPU": 1.0})
    max_slots: int | None = Field(default=None, ge=1)  # default: as many as the cluster holds
    # Passed to ray.init: how workers get the experiment's environment when the cluster's
    # image does not have it (env_vars, pip, conda, ...). Default: the image's.
    runtime_env: dict[str, Any] = Field(default_factory=dict)

    @field_validator("slot_resources")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        if not v or any(not (x > 0 and math.isfinite(x)) for x in v.values()):
            raise ValueError("must name at least one resource, each a positive number, "
                             "e.g. { GPU = 1 } or { CPU = 1 }")
        return v


class Hardware(_Section):
    """Hardware classes: results are compared only within a class (Ray executor)."""

    # Class name -> the Ray resource its nodes have, e.g. { fast = "accelerator_type:H100",
    # big = "big" }. Default: one class per accelerator type in the cluster (or "cpu").
    classes: dict[str, str] = Field(default_factory=dict)
    reference: str | None = None  # the class whose numbers are reported
    screen: str | None = None  # first runs of new candidates go here...
    confirm: str | None = None  # ...their confirm runs here; a keep needs this class's word

    @model_validator(mode="after")
    def _tiers(self) -> Hardware:
        if (self.screen is None) != (self.confirm is None):
            raise ValueError("screen and confirm go together: name both classes, or neither")
        named = [c for c in (self.reference, self.screen, self.confirm) if c is not None]
        unknown = [c for c in named if self.classes and c not in self.classes]
        if unknown:
            raise ValueError(f"{', '.join(unknown)} is not one of the classes "
                             f"({', '.join(self.classes)})")
        if self.screen is not None and self.screen == self.confirm:
            raise ValueError("screen and confirm must be two different classes")
        if self.confirm is not None and self.reference not in (None, self.confirm):
            raise ValueError(f"with screen and confirm tiers the reference is the confirm "
                             f"class ({self.confirm}), so that a kept number is never a "
                             f"screening draw; got reference = {self.reference!r}")
        return self

    @property
    def tiers(self) -> bool:
        return self.confirm is not None


_EVERY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(experiments?|runs?|h|hours?|m|min|minutes?)\s*$")


class Human(_Section):
    """Where a person comes in: checkpoints to approve, a command that tells them, and what
    the loop does when it stops finding improvements."""

    # "50 experiments" (runs that count, as for --max-experiments) or a duration ("2h",
    # "90m"): the loop finishes what runs, writes the report, runs `notify` and waits for
    # `overnight approve`.
    checkpoint_every: str | None = None
    # A shell command run at checkpoints, when the loop gets stuck, halts, ends or its
    # baseline fails; OVERNIGHT_EVENT, OVERNIGHT_TAG, OVERNIGHT_MESSAGE, OVERNIGHT_REPORT set.
    notify: str | None = None
    notify_timeout_seconds: float = Field(default=60, gt=0)
    # Decided candidates in a row without a keep before the loop changes tactics (0: never).
    stuck_after: int = Field(default=30, ge=0)

    @field_validator("checkpoint_every")
    @classmethod
    def _every(cls, v: str | None) -> str | None:
        if v is not None and _EVERY.match(v) is None:
            raise ValueError('must be a number of experiments or a duration, e.g. '
                             '"50 experiments", "2h" or "90m"')
        return v

    def every(self) -> tuple[str, float] | None:
        """("runs", n) or ("seconds", s), or None without checkpoints."""
        if self.checkpoint_every is None:
            return None
        m = _EVERY.match(self.checkpoint_every)
        amount, unit = float(m.group(1)), m.group(2)
        if unit.startswith(("experiment", "run")):
            return ("runs", max(1.0, amount))
        return ("seconds", amount * (3600 if unit.startswith("h") else 60))


class Spec(_Section):
    objective: Objective
    run: Run
    files: Files
    proposer: Proposer = Field(default_factory=Proposer)
    search: Search = Field(default_factory=Search)
    judge: Judge = Field(default_factory=Judge)
    evaluate: Evaluate | None = None
    llm: LLM | None = None
    agent: Agent | None = None
    ray: RaySpec = Field(default_factory=RaySpec)
    hardware: Hardware = Field(default_factory=Hardware)
    human: Human = Field(default_factory=Human)

    @model_validator(mode="after")
    def _proposer_configured(self) -> Spec:
        if self.proposer.kind == "llm" and self.llm is None:
            raise ValueError('[proposer] kind = "llm" needs an [llm] section with a model')
        if self.proposer.kind == "agent" and self.agent is None:
            raise ValueError('[proposer] kind = "agent" needs an [agent] section with a '
                             'command, e.g. command = "claude -p {prompt}"')
        return self


def _loc(loc: tuple[int | str, ...]) -> str:
    """('run', 'budget_seconds') -> '[run] budget_seconds'."""
    parts = [str(p) for p in loc]
    if not parts:
        return "(top level)"
    if len(parts) == 1:
        return f"[{parts[0]}]"
    return f"[{parts[0]}] " + ".".join(parts[1:])


def parse_spec(data: dict, source: str = SPEC_FILE) -> Spec:
    try:
        return Spec.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            where = _loc(err["loc"])
            if err["type"] == "extra_forbidden":
                lines.append(f"{source}: {where} is not a known key (check the spelling)")
            elif err["type"] == "missing":
                lines.append(f"{source}: {where} is required")
            else:
                got = err.get("input")
                shown = "" if isinstance(got, dict) else f", got {got!r}"
                msg = err["msg"].removeprefix("Value error, ")
                lines.append(f"{source}: {where} {msg}{shown}")
        raise ConfigError("\n".join(lines)) from None


def load_spec(repo: Path) -> Spec:
    path = repo / SPEC_FILE
    if path.is_dir():
        raise ConfigError(f"{path} is a directory, not the spec file: move it away and run "
                          "`overnight init` to write one")
    if not path.exists():
        raise ConfigError(
            f"no {SPEC_FILE} in {repo}: run `overnight init` there to write one"
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{SPEC_FILE} is not UTF-8 text (byte {raw[e.start]:#04x} on line "
                          f"{line}): save it as UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{SPEC_FILE} is not valid TOML: {e}") from None
    return parse_spec(data)
