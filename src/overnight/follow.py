"""A loop started elsewhere: `overnight run --detach` starts one in the background, `overnight
status --follow` shows its progress from the ledger, as `overnight run` would have printed it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.text import Text

from overnight.human import loop_pid
from overnight.ledger import Ledger, Row, keeps_in_order
from overnight.report import _label, result_line
from overnight.spec import Objective
from overnight.status import FINAL, NOT_COUNTED, Status
from overnight.text import printable

DETACH_LOG = "detach.err"
START_WAIT_SECONDS = 300  # a preflight that takes longer is still said to be starting
POLL_SECONDS = 1.0
SAID_EVENTS = {"paused", "unpaused", "checkpoint", "approved", "stuck", "halt", "stop",
               "spec_change"}


def detach(state: Path, argv: list[str], ledger_of, console: Console,  # noqa: ANN001
           err_console: Console, dash_port: int | None = None) -> int:
    """Start `overnight run argv` in its own session, its output in .overnight/run.log; come
    back once it holds its tag's lock and passed its preflight (its `start` event), or say
    why it did not. The exit code to return."""
    state.mkdir(parents=True, exist_ok=True)
    err_path = state / DETACH_LOG
    with open(os.devnull, "rb") as nothing, open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "overnight.cli", "run", *argv],
                                stdin=nothing, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True, close_fds=True)
    deadline = time.monotonic() + START_WAIT_SECONDS
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            said = err_path.read_text(errors="replace").strip()
            err_console.print(Text(said or f"the loop exited with {code} before it started"))
            return code or 1
        tag = _started(ledger_of, proc.pid)
        if tag is not None:
            console.print(f"overnight runs tag {tag} in the background (pid {proc.pid}); its "
                          f"output goes to {state / 'run.log'}", highlight=False)
            console.print(f"follow it: `overnight status --follow --tag {tag}`; stop it: "
                          f"`overnight stop --tag {tag}`", highlight=False)
            if dash_port is not None:
                console.print(_dash_address(state, dash_port), highlight=False)
            return 0
        time.sleep(0.2)
    console.print(f"the loop (pid {proc.pid}) is still starting after {START_WAIT_SECONDS} s: "
                  f"see {state / 'run.log'}")
    return 0


def _dash_address(state: Path, port: int) -> str:
    """The detached loop's dashboard: its token is written before the loop starts."""
    from overnight.dashboard import TOKEN_FILE

    try:
        token = (state / TOKEN_FILE).read_text().strip()
    except OSError:
        token = ""
    if port == 0 or not token:
        return f"dashboard: its address is in {state / 'run.log'}"
    return f"dashboard: http://127.0.0.1:{port}/#token={token}"


def _started(ledger_of, pid: int) -> str | None:  # noqa: ANN001
    """The tag whose loop `pid` started, once its `start` event is recorded."""
    ledger: Ledger = ledger_of()
    try:
        row = ledger.db.execute("SELECT tag FROM events WHERE kind = 'start' AND message = ? "
                                "ORDER BY id DESC LIMIT 1", (f"pid {pid}",)).fetchone()
    finally:
        ledger.close()
    return row[0] if row else None


def follow(ledger_of, state: Path, tag: str, objective: Objective,  # noqa: ANN001
           console: Console) -> None:
    """Print the tag's progress as it is recorded, until its loop ends (or Ctrl-C)."""
    pid = loop_pid(state, tag)
    if pid is None:
        console.print(f"no loop is running tag {tag} now: `overnight run --tag {tag}` (or "
                      "--detach) resumes it")
        return
    console.print(f"following tag {tag} (pid {pid}); Ctrl-C stops following, not the loop",
                  highlight=False)
    ledger: Ledger = ledger_of()
    try:
        seen: dict[int, str] = {r.id: r.status for r in ledger.experiments(tag)}
        last_event = ledger.last_event_id()
        while True:
            rows = ledger.experiments(tag)
            _print_changes(console, objective, rows, seen)
            for e in ledger.events(tag, after=last_event):
                last_event = e["id"]
                if e["kind"] in SAID_EVENTS:
                    console.print(Text(f"{e['kind']}: {printable(e['message'])}",
                                       style="yellow"))
            if loop_pid(state, tag) is None:
                console.print("the loop stopped")
                return
            time.sleep(POLL_SECONDS)
    finally:
        ledger.close()


def _print_changes(console: Console, objective: Objective, rows: list[Row],
                   seen: dict[int, str]) -> None:
    keeps = keeps_in_order(rows)
    baseline = next((r for r in reversed(keeps) if r.is_baseline), None)
    best = keeps[-1] if keeps else None
    done = sum(1 for r in rows if r.status in FINAL - NOT_COUNTED)
    for row in rows:
        if seen.get(row.id) == row.status:
            continue
        seen[row.id] = row.status
        if row.status == Status.RUNNING:
            console.print(Text(f"{_label(row.id)}started  slot {row.slot}: "
                               f"{printable(row.description)}", style="dim"))
        elif row.status in FINAL or row.status == Status.CONFIRM:
            console.print(result_line(objective, row, best, baseline, done, None))

