"""What `overnight init` learns from a repository before the first run: where the metric is
printed (and the pattern that reads it), which interpreter can run the script, how long a
run lasts, and a search space that does not waste a night.

Everything here reads source text (Python's `ast`), except `interpreter`, which asks each
candidate interpreter whether it can import the script's imports. Nothing runs the script.
"""

from __future__ import annotations

import ast
import math
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from overnight.knobs import Knob, Scope, read_knobs
from overnight.spec import Bound

# -- the metric ------------------------------------------------------------------------------

_NUMBER = r"([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)"
# The words just before a formatted value: `val loss ` in f", val loss {x:.4f}".
_WORD = r"[A-Za-z][A-Za-z0-9_]*"
_PHRASE = re.compile(rf"(?<![\w%])({_WORD}(?:[ \t]+{_WORD}){{0,3}})[ \t]*[:=]?[ \t]*$")


@dataclass(frozen=True)
class Printed:
    """One value a print statement formats, and the words before it."""

    phrase: str  # "val loss", "val_bpb"
    line_start: bool  # the words start the printed line: `val_bpb: {x}` is a summary line
    path: str
    line: int

    @property
    def name(self) -> str:
        return "_".join(self.phrase.lower().split())


@dataclass(frozen=True)
class MetricFinding:
    metric: str | None
    pattern: str | None = None
    where: str = ""  # "train.py:412"
    note: str = ""  # what init should tell the user


def printed_values(sources: Mapping[str, str]) -> list[Printed]:
    """Every `words {value}` in the string templates of the Python sources."""
    found = []
    for path, text in sources.items():
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                found += _joined(node, path)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                found += _formatted(node.value, path, node.lineno)
    return found


def _joined(node: ast.JoinedStr, path: str) -> list[Printed]:
    out, before = [], ""
    for part in node.values:
        if isinstance(part, ast.Constant) and isinstance(part.value, str):
            before += part.value
        elif isinstance(part, ast.FormattedValue):
            out += _phrase_before(before, path, node.lineno)
            before = ""
    return out


def _formatted(text: str, path: str, line: int) -> list[Printed]:
    """`"... val loss %.4f"` and `"... val loss {:.4f}"` templates."""
    out = []
    for m in re.finditer(r"%[-+ #0-9.]*[dfegs]|\{[^{}]*\}", text):
        out += _phrase_before(text[:m.start()], path, line)
    return out


def _phrase_before(text: str, path: str, line: int) -> list[Printed]:
    last = text.replace("\r", "\n").split("\n")[-1]
    m = _PHRASE.search(last)
    if not m:
        return []
    start = last[:m.start()]
    line_start = start.strip() == ""
    return [Printed(m.group(1), line_start, path, line)]


def find_metric(sources: Mapping[str, str], metric: str | None,
                pattern: str | None = None) -> MetricFinding:
    """The metric the script prints, and a pattern when it is not a `name: value` line.

    Given a metric, check that something prints it; not given, prefer val_bpb, val_loss, then
    any name starting with val, summary lines before phrases."""
    printed = printed_values(sources)
    if pattern is not None:
        return MetricFinding(metric, pattern, note="" if metric else "")
    if metric is not None:
        return _given(metric, printed)
    summary = [p for p in printed if p.line_start and " " not in p.phrase]
    phrases = [p for p in printed if p not in summary]
    for group in (summary, phrases):
        for preferred in ("val_bpb", "val_loss"):
            hit = next((p for p in group if p.name == preferred), None)
            if hit:
                return _finding(hit)
        hit = next((p for p in group if p.name.startswith("val")), None)
        if hit:
            return _finding(hit)
    return MetricFinding(None)


def _given(metric: str, printed: list[Printed]) -> MetricFinding:
    hits = [p for p in printed if p.name == metric.lower()]
    summary = next((p for p in hits if p.line_start and p.phrase == metric), None)
    if summary:
        return _finding(summary)
    if hits:
        return _finding(hits[0])
    return MetricFinding(metric, note=(
        f"could not find where {metric} is printed in the script's source: a run must print "
        f"`{metric}: <number>` on a line of its own, or pass --pattern with a regular "
        f"expression whose group is the number (e.g. --pattern '{metric} ([0-9.]+)')"))


def _finding(p: Printed) -> MetricFinding:
    where = f"{p.path}:{p.line}"
    if p.line_start and " " not in p.phrase:
        return MetricFinding(p.phrase, None, where)
    pattern = " ".join(re.escape(w) for w in p.phrase.split()) + r"\s*[:=]?\s*" + _NUMBER
    return MetricFinding(p.name, pattern, where, note=(
        f"{where} prints `{p.phrase} <number>`, not a `{p.name}: <number>` line: the metric "
        f"is read with [objective] pattern = {pattern!r} (the last match in the output wins)"))


# -- the interpreter ---------------------------------------------------------------------------

_CHECK = ("import importlib.util as u, sys; "
          "print(','.join(m for m in sys.argv[1:] if u.find_spec(m) is None))")


@dataclass(frozen=True)
class Interpreter:
    runner: str  # what the command starts with: "python", "uv run", an absolute path
    note: str = ""


def third_party_imports(source: str, root: Path) -> list[str]:
    """Top-level modules the script imports when it starts (not in a function or an `if`:
    nanoGPT imports wandb only when asked to) that are neither the standard library nor
    files of the repository."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module.split(".")[0])
    local = {p.stem for p in root.glob("*.py")} | {p.name for p in root.iterdir() if p.is_dir()}
    std = set(sys.stdlib_module_names) | {"__future__"}
    return sorted({n for n in names if n not in std and n not in local})


def interpreter(root: Path, script_source: str, uv: bool,
                given: str | None = None) -> Interpreter:
    """The interpreter a run's `python` should be: the first of `python` on PATH, the
    repository's .venv, the one overnight runs under, `python3`, that imports everything.
    `given`: the interpreter a user's command starts with; kept, with a note if it cannot
    import the script's imports and another one can."""
    if uv:
        return Interpreter("uv run")
    modules = third_party_imports(script_source, root)
    if given is not None:
        exe = shutil.which(given) or given
        missing = _missing(exe, modules)
        if missing == []:
            return Interpreter(given)
        better = interpreter(root, script_source, uv=False)
        lacks = f"cannot import {', '.join(missing)}" if missing else "does not run"
        use = (f"; {better.runner} can: start the command with it" if better.runner != "python"
               else "")
        return Interpreter(given, f"`{given}` here ({exe}) {lacks}{use}")
    on_path = shutil.which("python")
    candidates: list[tuple[str, str]] = []  # (what to write, the executable)
    if on_path:
        candidates.append(("python", on_path))
    venv = root / ".venv" / "bin" / "python"
    if venv.exists():
        candidates.append((str(venv), str(venv)))
    candidates.append((sys.executable, sys.executable))
    if (python3 := shutil.which("python3")):
        candidates.append((python3, python3))
    missing_by: dict[str, list[str]] = {}
    for written, exe in candidates:
        missing = _missing(exe, modules)
        if missing is None:
            continue
        if not missing:
            note = "" if written == "python" else (
                f"`python` here {'is ' + on_path if on_path else 'is not on PATH'}"
                + (f" and cannot import {', '.join(missing_by.get('python', []))}"
                   if missing_by.get("python") else "")
                + f": the command runs {written}, which can import "
                + (", ".join(modules) or "the script's imports"))
            return Interpreter(written, note)
        missing_by[written] = missing
    first = missing_by.get("python") or next(iter(missing_by.values()), modules)
    return Interpreter("python", (
        f"no interpreter found here imports {', '.join(first)}: install them, then make "
        "[run] command start with the interpreter that has them (e.g. /path/to/venv/bin/python)"))


def _missing(exe: str, modules: list[str]) -> list[str] | None:
    """The modules `exe` cannot import; None if it does not run."""
    try:
        done = subprocess.run([exe, "-c", _CHECK, *modules], capture_output=True, text=True,
                              timeout=30, stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    out = done.stdout.strip()
    return out.split(",") if out else []


# -- the budget --------------------------------------------------------------------------------

BUDGET_ENV = "OVERNIGHT_BUDGET_SECONDS"
_TIME_BUDGET = re.compile(r"(^|_)(time_budget|budget|time_limit|max_seconds|max_time|"
                          r"budget_seconds|train_seconds)($|_)", re.IGNORECASE)
_ITERATIONS = re.compile(r"^(max|num|n|total|train)_?(iters?|iterations|steps|epochs)$|"
                         r"^(epochs|iters|iterations|num_train_steps)$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    seconds: float | None = None  # a protected file's time budget: what really rules
    notes: tuple[str, ...] = ()
    iterations: tuple[str, ...] = ()  # knobs that set how long it trains, by steps


def budget(editable: Mapping[str, str], protected: Mapping[str, str],
           knobs: Mapping[str, Knob], overridden: Mapping[str, str] = {}) -> Budget:
    notes, seconds = [], None
    reads = any(BUDGET_ENV in text for text in [*editable.values(), *protected.values()])
    held = [(path, k) for path, text in protected.items() if path.endswith(".py")
            for k in _constants(text, path) if _TIME_BUDGET.search(k.name)]
    iterations = tuple(n for n in knobs if _ITERATIONS.match(n))
    if held:
        path, k = held[0]
        seconds = float(k.value)
        notes.append(f"{path} (protected) sets {k.name} = {k.value:g}: that is the time budget "
                     f"that rules each run, so budget_seconds is written as {k.value:g}; "
                     "changing budget_seconds alone changes nothing the script does")
    elif not reads:
        said = [f"--{n}={overridden[n]} in the command" if n in overridden else
                f"{n} = {knobs[n].value:g} in {knobs[n].path}" for n in iterations]
        how = f" ({', '.join(said)})" if said else ""
        notes.append(f"the script never reads {BUDGET_ENV}: each run lasts as long as the "
                     f"script decides{how}, and timeout_seconds is the only limit overnight "
                     "enforces. Compare like with like: a fixed number of iterations is a "
                     "budget too, so it is not searched")
    return Budget(seconds, tuple(notes), iterations if not reads else ())


def _state(text: str) -> set[str]:
    """Module-level names assigned inside a loop, or through `global` in a function."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return set()
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.For, ast.While, ast.AsyncFor)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Name) and isinstance(inner.ctx, ast.Store):
                    found.add(inner.id)
        elif isinstance(node, ast.Global):
            found.update(node.names)
    return found


def _constants(text: str, path: str) -> list[Knob]:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    names = [t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
             if isinstance(t, ast.Name)]
    try:
        return list(read_knobs({path: text}, Scope(frozenset(names))).values())
    except Exception:  # noqa: BLE001 - a file we cannot read has no budget to report
        return []


# -- the search space --------------------------------------------------------------------------

_MEASURE = {"eval", "val", "valid", "validation", "test", "interval", "budget", "seconds"}
_REPORT = {"peak", "flops", "seed", "port", "verbose", "print", "log", "save", "checkpoint",
           "ckpt", "wandb", "workers", "gpus", "rank", "world", "profile",
           "vocab"}
_SIZES = {"batch", "size", "dim", "width", "embd", "embed", "hidden", "heads", "block",
          "seq", "len", "ctx", "channels", "units"}
_FRACTION = {"ratio", "frac", "fraction", "dropout", "prob", "pct", "smoothing"}
_COMPUTE = {"batch", "accumulation", "accum"}  # with an iteration budget: more compute
_REPORTERS = {"print", "info", "debug", "warning", "log", "write", "add_scalar", "set_postfix",
              "set_description"}


@dataclass(frozen=True)
class Choice:
    knob: Knob
    bound: Bound
    why: str  # the comment written beside its bounds


@dataclass
class Space:
    chosen: list[Choice] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, why)


def all_constants(editable: Mapping[str, str], scope: Scope) -> dict[str, Knob]:
    """Every top-level numeric constant of the editable Python files, whatever its case,
    by its home (a config file the command passes wins). A lowercase name the script
    changes as it runs (`step = 0`, then `step += 1` in the loop) is state, not a setting."""
    names: set[str] = set()
    for path, text in editable.items():
        if path.endswith(".py"):
            state = _state(text)
            names |= {k.name for k in _constants(text, path)
                      if k.name not in state or k.name.isupper()}
    wide = Scope(frozenset(names) | scope.named, scope.config, scope.overridden)
    py = {p: t for p, t in editable.items() if p.endswith(".py")}
    return read_knobs(py, wide)


def search_space(editable: Mapping[str, str], scope: Scope, budget_: Budget,
                 metric: str = "") -> Space:
    """Which constants to search, in which bounds, and why the others are left alone."""
    knobs = all_constants(editable, scope)
    reporting = reporting_only(editable.values(), metric)
    space = Space()
    for name, k in knobs.items():
        why = _skip(name, k, scope, reporting, budget_)
        if why:
            space.skipped.append((name, why))
        else:
            space.chosen.append(_choose(k))
    return space


def _skip(name: str, k: Knob, scope: Scope, reporting: set[str], b: Budget) -> str | None:
    words = set(name.lower().split("_"))
    if name in scope.overridden:
        return f"set by the command (--{name}={scope.overridden[name]})"
    if name in b.iterations or _ITERATIONS.match(name):
        return "how long a run trains: a win by training longer is no win"
    if words & _MEASURE:
        return "defines the measurement (evaluation, logging or the budget)"
    if words & _REPORT:
        return "not a hyperparameter (hardware, reporting, seeds, I/O)"
    if name in reporting:
        return "only used in what the script prints"
    if b.iterations and words & _COMPUTE:
        return "with an iteration budget, a bigger batch trains on more data: no fair win"
    return None


def _choose(k: Knob) -> Choice:
    v, words = k.value, set(k.name.lower().split("_"))
    if k.kind == "int":
        if v >= 2 and _pow2(v) and (v >= 16 or words & _SIZES):
            up = 2 if words & _COMPUTE else 4  # a batch that grows 4x often does not fit
            return Choice(k, Bound(low=max(1, v // 4), high=v * up, scale="pow2"),
                          f"a power of two: moves by powers of two, up to x{up}")
        if v > 0:
            return Choice(k, Bound(low=max(1, v // 4), high=max(v * 4, v + 4)),
                          "an integer: from a quarter to four times its value")
        if v == 0:
            return Choice(k, Bound(low=0, high=4), "zero: stays non-negative")
        return Choice(k, Bound(low=-max(-v * 4, -v + 4), high=-max(1, -v // 4)),
                      "negative: stays negative")
    if 0.8 <= v < 1:
        low = max(0.5, 1 - (1 - v) * 10)
        return Choice(k, Bound(low=_round(low), high=_round(1 - (1 - v) / 10), scale="log1m"),
                      "close to 1 (a beta, a momentum): searched on log(1 - x)")
    if words & _FRACTION and 0 <= v <= 1:
        cap = 0.5 if "dropout" in words else 1.0
        if v == 0:
            return Choice(k, Bound(low=0.0, high=cap),
                          f"a fraction at zero: searched in [0, {cap:g}]")
        return Choice(k, Bound(low=_round(v / 10), high=min(cap, _round(v * 10))),
                      f"a fraction: a tenth to ten times its value, at most {cap:g}")
    if v > 0:
        return Choice(k, Bound(low=_round(v / 10), high=_round(v * 10)),
                      "a tenth to ten times its value, on a log scale")
    if v == 0:
        return Choice(k, Bound(low=0.0, high=1.0), "zero: stays non-negative")
    return Choice(k, Bound(low=v - 1, high=v + 1), "negative: within 1 of its value")


def _pow2(v: int | float) -> bool:
    return float(v).is_integer() and v >= 1 and int(v) & (int(v) - 1) == 0


def _round(x: float) -> float:
    return float(f"{x:.4g}") if x and math.isfinite(x) else x


def reporting_only(sources: Iterable[str], metric: str = "") -> set[str]:
    """Names whose every use ends in a print or a log call (directly, or through names that
    do): `H100_PEAK_FLOPS` feeding only `mfu`, which is only printed. A print that names the
    metric (`val_loss` or `val loss`) is the measurement, not a report: what feeds it counts
    as used. By identifier across the files: a coarse reading that errs towards 'used'."""
    words = {metric.lower(), metric.lower().replace("_", " ")} - {""}
    feeds: dict[str, set[str]] = {}  # name -> the names assigned from it
    used: set[str] = set()  # names read anywhere else (a condition, a call, an index...)
    reported: set[str] = set()
    for text in sources:
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                _classify(node, parents, feeds, used, reported, words)
    # A name is reporting-only when it is printed or feeds only reporting-only names.
    only = {n for n in reported | set(feeds) if n not in used}
    changed = True
    while changed:
        changed = False
        for n in list(only):
            if any(t not in only for t in feeds.get(n, ())):
                only.discard(n)
                changed = True
    return only


def _classify(node: ast.Name, parents: dict, feeds: dict[str, set[str]], used: set[str],
              reported: set[str], metric: set[str]) -> None:
    child, up = node, parents.get(node)
    while up is not None:
        if isinstance(up, ast.Call) and child is not up.func and _reporter(up.func):
            text = ast.unparse(up).lower()
            if not any(w in text for w in metric):
                reported.add(node.id)
                return
            break
        if isinstance(up, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and child is up.value:
            targets = up.targets if isinstance(up, ast.Assign) else [up.target]
            if all(isinstance(t, ast.Name) for t in targets):
                feeds.setdefault(node.id, set()).update(t.id for t in targets)
                return
            break
        if isinstance(up, (ast.stmt, ast.comprehension, ast.Lambda)):
            break
        child, up = up, parents.get(up)
    used.add(node.id)


def _reporter(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id == "print"
    return isinstance(func, ast.Attribute) and func.attr in _REPORTERS


# -- data git ignores ---------------------------------------------------------------------------

_NOT_DATA = {".overnight", ".venv", "venv", "__pycache__", ".pytest_cache", ".ruff_cache",
             ".mypy_cache", "node_modules", "wandb", "build", "dist", ".ipynb_checkpoints",
             "overnight-demo", ".git"}


def ignored_data(ignored: Iterable[str], sources: Iterable[str]) -> list[str]:
    """Of the paths git ignores (`git ls-files --others --ignored --exclude-standard
    --directory`), the directories (or files) the script seems to read: their first
    component is a string in its source (`os.path.join("data", dataset)`). A run is built
    from the commit, so without `[run] data` it would not have them."""
    literals: set[str] = set()
    for text in sources:
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        literals |= {n.value.strip("/") for n in ast.walk(tree)
                     if isinstance(n, ast.Constant) and isinstance(n.value, str)
                     and 0 < len(n.value) < 200}
    heads = {lit.split("/")[0] for lit in literals if lit}
    found: list[str] = []
    for path in ignored:
        path = path.rstrip("/")
        parts = path.split("/")
        outputs = ("out", "output", "checkpoint", "ckpt", "log", "runs", "results")
        if not path or any(p in _NOT_DATA or p.endswith(".egg-info") for p in parts) \
                or parts[0].lower().startswith(outputs):
            continue
        if parts[0] not in heads:
            continue
        where = "/".join(parts[:-1]) if len(parts) > 1 else path
        if where not in found:
            found.append(where)
    return [p for p in found if not any(p != q and p.startswith(q + "/") for q in found)]
