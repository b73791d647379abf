"""Why a baseline produced no number, in words, with the fix that fits the cause.

    cause = classify(log, status, returncode, metric)     # pure: what the log and exit say
    found = explain(cause, setting)                        # the fix, with what this machine has

The causes, read from the end of the run's log and its exit: the command's program is not
there (exit 127), its interpreter cannot import a module (the spec's `python` is not the one
that has the packages), a file the script opens is not in the run (git ignores it: `[run]
data`), the run hit its timeout, it exited 0 without printing the metric (an `[objective]
pattern` for the lines that hold the number), or something else (the last lines speak for
themselves). `explain` looks around to make the advice concrete: which interpreter the
command's first word is in the run's PATH, which interpreter here can import the module, whether
git ignores the missing file.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from overnight.survey import _NUMBER
from overnight.survey import _missing as cannot_import

# What a failed run's log says, most specific first; the one nearest the end wins.
_MODULE = re.compile(r"ModuleNotFoundError: No module named '([\w.]+)'")
_MISSING = re.compile(r"(?:FileNotFoundError|No such file or directory)[^'\"\n]*['\"]([^'\"\n]+)"
                      r"['\"]|can't open file ['\"]([^'\"\n]+)['\"]")
_NO_PROGRAM = re.compile(r"^[^\n]*?\b(?:ba)?sh\b[^\n]*?:\s*([^\s:]+): (?:command )?not found$",
                         re.MULTILINE)  # dash's `/bin/sh: 1: python: not found`, bash's
_NUMBERS = re.compile(r"\d+\.\d+|\d+[eE][-+]?\d+")  # a number a metric could be


@dataclass(frozen=True)
class Cause:
    """What went wrong, as far as the log and the exit say."""

    kind: str  # no_program | import | missing_file | timeout | non_finite | no_metric | other
    detail: str = ""  # the program, the module, the path
    lines: tuple[str, ...] = ()  # no_metric: the last lines that hold numbers


@dataclass(frozen=True)
class Setting:
    """Where the run ran, for advice that names real paths."""

    command: str
    path: str  # the run's PATH
    root: Path  # the repository
    workdir: Path | None  # the run's work tree: an absolute path under it is a repo path
    metric: str
    pattern: str | None
    timeout: float
    ignored: Callable[[str], bool]  # does git ignore this repository path?
    in_commit: Callable[[str], bool]  # is this path in the commit that ran?


@dataclass(frozen=True)
class Diagnosis:
    summary: str  # one line, kept with the failed start (status, show)
    advice: str  # what to do, in full


def classify(log: str, status: str, returncode: int | None, metric: str) -> Cause:
    """The cause, from the end of a failed run's log, its status and its exit code."""
    if status == "timeout":
        return Cause("timeout")
    found: list[tuple[int, Cause]] = []
    if returncode == 127:
        found += [(m.start(), Cause("no_program", m.group(1))) for m in _NO_PROGRAM.finditer(log)]
    found += [(m.start(), Cause("import", m.group(1))) for m in _MODULE.finditer(log)]
    found += [(m.start(), Cause("missing_file", m.group(1) or m.group(2)))
              for m in _MISSING.finditer(log)]
    if found:
        return max(found, key=lambda f: f[0])[1]
    if returncode == 0:
        words = r"[ _]".join(re.escape(w) for w in metric.split("_"))
        bad = re.findall(rf"(?i)\b{words}\s*[:=]\s*([-+]?(?:nan|inf(?:inity)?))\b", log)
        if bad:
            return Cause("non_finite", bad[-1])
        return Cause("no_metric", metric, numbered_lines(log))
    return Cause("other")


def numbered_lines(log: str, keep: int = 3) -> tuple[str, ...]:
    """The last `keep` lines that hold a number with a fraction or an exponent (a loss, not a
    step count)."""
    lines = [line.strip() for line in log.splitlines() if _NUMBERS.search(line)]
    return tuple(lines[-keep:])


def suggest_pattern(lines: tuple[str, ...], metric: str) -> str | None:
    """An `[objective] pattern` for `metric` printed as a phrase (`val loss 2.37` for
    val_loss), in the form `overnight init` writes; None when no line has one."""
    words = [w for w in re.split(r"[_\W]+", metric) if w]
    if not words:
        return None
    phrase = re.compile(r"(?<![\w])(" + r"[ _]".join(re.escape(w) for w in words) + r")"
                        r"\s*[:=]?\s*[-+]?(?:\d|\.\d)", re.IGNORECASE)
    for line in reversed(lines):
        if m := phrase.search(line):
            printed = m.group(1)
            return " ".join(re.escape(w) for w in printed.split()) + r"\s*[:=]?\s*" + _NUMBER
    return None


def explain(cause: Cause, where: Setting) -> Diagnosis:
    """The summary and the advice for `cause`, naming what this machine has."""
    if cause.kind == "no_program":
        return _no_program(cause.detail, where)
    if cause.kind == "import":
        return _interpreter(cause.detail, where)
    if cause.kind == "missing_file":
        return _missing_file(cause.detail, where)
    if cause.kind == "timeout":
        return Diagnosis(
            f"ran past timeout_seconds ({where.timeout:g} s)",
            f"It ran past timeout_seconds ({where.timeout:g} s) and was killed: raise [run] "
            "timeout_seconds, or make the script stop in time (it is given "
            "OVERNIGHT_BUDGET_SECONDS; an iteration budget such as max_iters is yours to set "
            "smaller).")
    if cause.kind == "non_finite":
        return Diagnosis(
            f"printed {where.metric} {cause.detail}",
            f"It printed {where.metric} {cause.detail}: the unchanged script diverges (or "
            "divides by zero) as it runs here. Fix it so that the baseline gives a finite "
            "number; a NaN is never a result.")
    if cause.kind == "no_metric":
        return _no_metric(cause, where)
    return Diagnosis("", f"Fix the script so that it runs from a clean checkout of the commit, "
                         f"prints `{where.metric}: <number>` and exits 0.")


# -- the interpreter ----------------------------------------------------------------------------

def _no_program(program: str, where: Setting) -> Diagnosis:
    first = _first_word(where.command)
    python = re.fullmatch(r"python[\d.]*", os.path.basename(program)) is not None
    better = _can_import(None, where) if program == first and python else None
    use = (f": start [run] command with the full path of an interpreter, e.g. "
           f"command = \"{_replace_first(where.command, better)}\"" if better else
           ": start [run] command with the full path of the interpreter or program to run")
    return Diagnosis(f"`{program}` is not on the run's PATH",
                     f"The run's shell found no `{program}` on its PATH{use}.")


def _interpreter(module: str, where: Setting) -> Diagnosis:
    top = module.split(".")[0]
    local = next((p for p in (f"{top}.py", top) if (where.root / p).exists()), None)
    if local is not None and not where.in_commit(local):
        return _missing_file(local, where)  # a module of the repository, not committed
    first = _first_word(where.command)
    if first == "uv":
        return Diagnosis(
            f"`uv run` cannot import {module}",
            f"`uv run` runs the project's environment, which cannot import {module}: add it "
            f"(uv add {top}) and `uv sync`, then run again.")
    exe = _resolve(first, where)
    real = _executable(exe, where) if exe else None
    said = f"`{first}` is {real or exe or 'not found'} in the run's environment"
    better = _can_import(top, where, besides=(exe, real))
    if better:
        return Diagnosis(
            f"{said} and cannot import {module}; {better} can",
            f"The command's interpreter cannot import {module}: {said}. {better} can: start "
            f"[run] command with it, e.g. command = \"{_replace_first(where.command, better)}\""
            + (" (or `uv run`, as the repository has a uv.lock)"
               if (where.root / "uv.lock").exists() else "") + ".")
    return Diagnosis(
        f"{said} and cannot import {module}",
        f"The command's interpreter cannot import {module}: {said}, and no other interpreter "
        f"found here can. Install {top} for it, or start [run] command with the full path of "
        "an interpreter that has it (a virtual environment's bin/python), or `uv run`.")


def _first_word(command: str) -> str:
    """The program the command starts (after any `NAME=value` assignments)."""
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    words = [w for w in words if not re.fullmatch(r"[A-Za-z_]\w*=.*", w)]
    return words[0] if words else ""


def _replace_first(command: str, exe: str) -> str:
    first = _first_word(command)
    if first and first in command:
        return command.replace(first, shlex.quote(exe), 1)
    return f"{shlex.quote(exe)} {command}"


def _resolve(program: str, where: Setting) -> str | None:
    """What the run's shell starts for `program`: a path (relative to the work tree, which
    mirrors the repository), or the first hit on the run's PATH."""
    if not program:
        return None
    if "/" in program:
        path = Path(program) if os.path.isabs(program) else where.root / program
        return str(path) if os.access(path, os.X_OK) else None
    return shutil.which(program, path=where.path)


def _executable(exe: str, where: Setting) -> str | None:
    """The interpreter behind `exe` (a pyenv or asdf shim is a script that picks one)."""
    try:
        done = subprocess.run([exe, "-c", "import sys; print(sys.executable)"],
                              capture_output=True, text=True, timeout=30, check=False,
                              stdin=subprocess.DEVNULL, cwd=where.root,
                              env={**os.environ, "PATH": where.path})
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = done.stdout.strip()
    return out if done.returncode == 0 and out else None


def _can_import(module: str | None, where: Setting,
                besides: tuple[str | None, ...] = ()) -> str | None:
    """The full path of an interpreter here that imports `module` (None: any that runs): the
    repository's virtual environment first, then the one overnight runs under, then PATH's."""
    candidates = [where.root / ".venv" / "bin" / "python", where.root / "venv" / "bin" / "python",
                  Path(sys.executable)]
    candidates += [Path(p) for name in ("python3", "python")
                   if (p := shutil.which(name, path=where.path))]
    skip = {b for b in besides if b}
    seen: set[str] = set()
    for path in candidates:
        exe = str(path)
        if exe in seen or exe in skip or not os.access(path, os.X_OK):
            continue
        seen.add(exe)
        if cannot_import(exe, [module] if module else []) == []:
            return exe
    return None


# -- files --------------------------------------------------------------------------------------

def _missing_file(name: str, where: Setting) -> Diagnosis:
    rel = _in_repository(name, where)
    if rel is None:
        return Diagnosis(
            f"it opens {name}, which is not in the run",
            f"The script opens {name}, an absolute path outside the repository: a boxed run "
            "does not see home directories or the repository, only the system, its work tree "
            "and what [run] data names. Put the file under the repository (git-ignored if it "
            "is large), open it by a relative path, and name it in [run] data.")
    entry = str(Path(rel).parent) if str(Path(rel).parent) != "." else rel
    if where.in_commit(rel):
        return Diagnosis(
            f"it opens {name}, which the commit has at {rel}",
            f"The script opens {name}, and the commit has {rel}, but not where the script "
            "looked: a run starts in the root of its work tree, as `cd <repository> && "
            "<command>` would. Open it relative to the repository root (or to __file__).")
    if (where.root / rel).exists() and where.ignored(rel):
        return Diagnosis(
            f"{rel} is ignored by git, so it is not in the run: add [run] data = [\"{entry}\"]",
            f"The script opens {rel}, which is in your repository but ignored by git, and a "
            f"run is built from the commit: add [run] data = [\"{entry}\"] to overnight.toml "
            "to make it available read-only in every run.")
    if (where.root / rel).exists():
        return Diagnosis(
            f"{rel} is not committed, so it is not in the run",
            f"The script opens {rel}, which is in your repository but not committed, and a "
            f"run is built from the commit: commit it, or (data) ignore it in git and add "
            f"[run] data = [\"{entry}\"] to overnight.toml.")
    return Diagnosis(
        f"{rel} does not exist",
        f"The script opens {rel}, which is neither in the commit nor in your repository: "
        f"create it (a data preparation step?) and name it in [run] data "
        f"([run] data = [\"{entry}\"]), or fix the path.")


def _in_repository(name: str, where: Setting) -> str | None:
    """`name` relative to the repository root, or None if it is outside it. A relative name
    is relative to the work tree, which mirrors the repository."""
    path = os.path.normpath(name)
    if not os.path.isabs(path):
        return None if path.startswith("..") else path
    for base in (where.workdir, where.root):
        if base is not None and (path + "/").startswith(str(base).rstrip("/") + "/"):
            return os.path.relpath(path, base)
    return None


# -- the metric ---------------------------------------------------------------------------------

def _no_metric(cause: Cause, where: Setting) -> Diagnosis:
    metric = where.metric
    matched = " that [objective] pattern matches" if where.pattern else ""
    suggested = suggest_pattern(cause.lines, metric)
    if suggested and suggested != where.pattern:
        fix = f"set [objective] pattern = {suggested!r} (the last match in the output wins)"
    else:
        fix = (f"print `{metric}: <number>` on a line of its own, or set [objective] pattern "
               "to a regular expression whose group is the number")
    advice = f"It ran and exited 0 but printed no {metric}{matched}: {fix}."
    if cause.lines:
        advice += " The last lines with numbers it printed:\n  " + "\n  ".join(cause.lines)
    summary = (f"[objective] pattern = {suggested!r} would read it"
               if suggested and suggested != where.pattern else "")
    return Diagnosis(summary, advice)
