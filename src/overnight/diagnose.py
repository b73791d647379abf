"""Why a baseline produced no result, in words, with the fix that fits the cause.

    advice(status, reason, log, command=..., metric=..., pattern=..., root=...) -> str

Read from the end of the run's log: the interpreter could not import a module (the spec's
`python` is not the one that has the packages), a file the script opens is not in the run
(git ignores it: `[run] data`), the run hit its timeout, or it ran but printed no metric (a
`[objective] pattern` for the lines that hold the number). Anything else: the last lines
speak for themselves.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

_MODULE = re.compile(r"ModuleNotFoundError: No module named '([\w.]+)'")
_MISSING = re.compile(r"(?:FileNotFoundError|No such file or directory)[^'\"]*['\"]([^'\"]+)['\"]")
_NUMBERS = re.compile(r"[-+]?\d+\.\d+")


def advice(status: str, reason: str, log: str, *, command: str, metric: str,
           pattern: str | None, root: Path, timeout: float) -> str:
    if m := _MODULE.search(log):
        return _interpreter(m.group(1), command)
    if m := _MISSING.search(log):
        return _missing_file(m.group(1), root)
    if status == "timeout":
        return (f"It ran past timeout_seconds ({timeout:g} s) and was killed: raise [run] "
                "timeout_seconds, or make the script stop in time (it is given "
                "OVERNIGHT_BUDGET_SECONDS; an iteration budget such as max_iters is yours to "
                "set smaller).")
    if f"no {metric} in the output" in reason:
        return _no_metric(log, metric, pattern)
    return (f"Fix the script so that it runs from a clean checkout of the commit, prints "
            f"`{metric}: <number>` and exits 0, commit, and run again.")


def _interpreter(module: str, command: str) -> str:
    words = shlex.split(command) if command.strip() else ["python"]
    first = words[0]
    found = shutil.which(first) or first
    text = (f"The command's interpreter cannot import {module}: `{first}` is {found} here. ")
    if first != sys.executable and _imports(sys.executable, module):
        text += (f"{sys.executable} (the Python overnight runs under) can: start [run] "
                 f"command with it, e.g. command = \"{sys.executable} {' '.join(words[1:])}\"")
    else:
        text += (f"Install {module} for it, or start [run] command with the interpreter that "
                 "has it (a virtual environment's bin/python, or `uv run`).")
    return text


def _imports(exe: str, module: str) -> bool:
    try:
        done = subprocess.run([exe, "-c", f"import importlib.util as u; "
                               f"raise SystemExit(u.find_spec({module.split('.')[0]!r}) is None)"],
                              capture_output=True, timeout=30, check=False,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _missing_file(name: str, root: Path) -> str:
    rel = os.path.normpath(name)
    if os.path.isabs(rel):
        return (f"The script opens {name}, which this machine or its box does not have: "
                "an absolute path outside the repository is not in the run.")
    here = root / rel
    if here.exists():
        where = Path(rel).parts[0] if len(Path(rel).parts) > 1 else rel
        parent = str(Path(rel).parent) if str(Path(rel).parent) != "." else rel
        return (f"The script opens {rel}, which is in your repository but not in the commit "
                f"(git ignores it), and a run is built from the commit: add [run] data = "
                f"[\"{parent}\"] to overnight.toml to make it available read-only in every "
                f"run (or commit it, if it is small and belongs with the code; under {where}/).")
    return (f"The script opens {rel}, which is neither in the commit nor in your repository: "
            "create it (a data preparation step?) and name it in [run] data, or fix the path.")


def _no_metric(log: str, metric: str, pattern: str | None) -> str:
    lines = [line.strip() for line in log.splitlines() if _NUMBERS.search(line)]
    named = [line for line in lines if any(w in line.lower() for w in metric.lower().split("_"))]
    shown = (named or lines)[-3:]
    text = (f"It ran but printed no {metric}" + (" that the pattern matches" if pattern else "")
            + f": print `{metric}: <number>` on a line of its own, or set [objective] pattern "
            "to a regular expression whose group is the number.")
    if shown:
        text += " Lines with numbers it did print:\n  " + "\n  ".join(shown)
    return text
