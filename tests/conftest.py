"""Shared fixtures: real git repositories, the real `overnight` CLI, the real ledger."""

from __future__ import annotations

import os
import shlex
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

# Test repositories may live where no git identity is configured.
GIT_ENV = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
}

PYTHON = shlex.quote(sys.executable)

# The standard workload: a constant, a metric computed from it, printed like autoresearch.
# The best LEARNING_RATE is 0.004; val_loss = 1 + 100 * |lr - 0.004|.
TRAIN = """\
import os
import sys
import time

LEARNING_RATE = {lr}

loss = 1.0 + abs(LEARNING_RATE - 0.004) * 100
print("training with", LEARNING_RATE, "budget", os.environ.get("OVERNIGHT_BUDGET_SECONDS"))
{extra}
print(f"val_loss: {{loss:.6f}}")
"""


def train_py(lr: float = 0.001, extra: str = "") -> str:
    return TRAIN.format(lr=lr, extra=extra)


# The loop's mechanics (refs, resume, isolation, detection) are tested on deterministic
# scripts with one run per candidate (judge = "greedy"), so that each test can say exactly
# which rows it expects; the noise-aware default, with its repeats, is tested in test_judge.py.
GREEDY = '[judge]\nmode = "greedy"\n'


def spec_toml(strategy: str = "grid", budget: float = 5, timeout: float = 10,
              grace: float = 1, extra_run: str = "", extra: str = "",
              judge: str = GREEDY) -> str:
    return f"""\
[objective]
metric = "val_loss"
direction = "lower"

[run]
command = "{PYTHON} train.py"
budget_seconds = {budget}
timeout_seconds = {timeout}
kill_grace_seconds = {grace}
{extra_run}

[files]
editable = ["train.py"]

{judge}
[search]
strategy = "{strategy}"
seed = 7
{extra}
"""


def git(repo: Path, *args: str, check: bool = True) -> str:
    out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                         env={**os.environ, **GIT_ENV}, check=False)
    if check and out.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {out.stderr}")
    return out.stdout.strip()


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie waiting to be reaped."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(predicate: Callable[[], object], timeout: float, what: str,
               interval: float = 0.05) -> object:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def rows(repo: Path, tag: str | None = None) -> list[dict]:
    """Experiments straight from .overnight/ledger.sqlite (plain sqlite3, not our Ledger)."""
    path = repo / ".overnight" / "ledger.sqlite"
    if not path.exists():
        return []
    db = sqlite3.connect(path, timeout=10)
    db.row_factory = sqlite3.Row
    try:
        sql, args = "SELECT * FROM experiments", ()
        if tag is not None:
            sql, args = sql + " WHERE tag = ?", (tag,)
        return [dict(r) for r in db.execute(sql + " ORDER BY id", args)]
    except sqlite3.OperationalError:  # the schema is not there yet
        return []
    finally:
        db.close()


def create_repo(repo: Path, files: dict[str, str], toml: str | None = None) -> Path:
    """A git repository at `repo` holding `files` (and overnight.toml), all committed."""
    repo.mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    all_files = dict(files)
    if toml is not None:
        all_files["overnight.toml"] = toml
    for path, text in all_files.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "initial")
    return repo


CLI = [sys.executable, "-m", "overnight.cli"]


def cli_environ(tmp: Path, **extra: str) -> dict[str, str]:
    """Environment for the CLI: a git identity, and no git repository above `tmp`."""
    return {**os.environ, **GIT_ENV, "GIT_CEILING_DIRECTORIES": str(tmp.parent),
            "COLUMNS": "200", **extra}


def run_cli(*args: str, cwd: Path, timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real `overnight` command as a subprocess; its output as text."""
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env or cli_environ(cwd), check=False)


@pytest.fixture
def make_repo(tmp_path: Path) -> Callable[..., Path]:
    """make_repo({"train.py": ...}, toml=...) -> a committed git repository in tmp_path."""
    counter = iter(range(1000))

    def make(files: dict[str, str], toml: str | None = None) -> Path:
        return create_repo(tmp_path / f"repo{next(counter)}", files, toml)

    return make


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    return cli_environ(tmp_path)


@pytest.fixture
def cli(cli_env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess]:
    """cli("run", "-n", "3", cwd=repo) -> the finished `overnight` process (text output)."""

    def run(*args: str, cwd: Path, timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return run_cli(*args, cwd=cwd, timeout=timeout, env={**cli_env, **(env or {})})

    return run
