"""Where a person comes in while the loop runs: pause, stop, checkpoints to approve, the
notify command, and what the loop does when it stops finding improvements.

Actions (`overnight pause`, the dashboard's buttons...) are `control` events in the ledger,
written by whoever acts and read by the loop every second: the ledger is the one channel
both sides already trust, every action is recorded with who sent it, and nothing else (no
socket, no signal) needs to reach the loop. The loop answers with events of its own:
`paused`, `unpaused`, `checkpoint` (waiting for approval), `approved`, `stuck`.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from overnight.errors import ConfigError
from overnight.ledger import Ledger, Row
from overnight.spec import Human as HumanSpec
from overnight.status import Status

CONTROL = "control"
ACTIONS = ("pause", "unpause", "approve", "stop", "stop-now")
FAILED_TRIES = (Status.DISCARD, Status.CRASH, Status.TIMEOUT, Status.CHECKS_FAILED)
NOTIFY_LOG = "notify.log"


# -- the acting side: the CLI and the dashboard -------------------------------------------

def loop_pid(state_dir: Path, tag: str) -> int | None:
    """The pid of the `overnight run` holding the tag's lock, or None when none runs."""
    import fcntl

    path = state_dir / f"run-{tag}.lock"
    try:
        f = open(path)  # noqa: SIM115 - closed below, the lock test needs the descriptor
    except OSError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = f.read().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def request(ledger: Ledger, state_dir: Path, tag: str, action: str, note: str = "",
            by: str = "cli") -> str:
    """Send an action to the loop running `tag`; what it will do, in words. ConfigError
    (exit 2) when no loop runs the tag, or when there is no checkpoint to approve."""
    if action not in ACTIONS:
        raise ConfigError(f"unknown action {action!r}: one of {', '.join(ACTIONS)}")
    if loop_pid(state_dir, tag) is None:
        raise ConfigError(f"no `overnight run` is running tag '{tag}': there is nothing to "
                          f"{action}. Start one with `overnight run --tag {tag}`")
    state = loop_state(ledger, tag)
    if action == "approve" and state.checkpoint is None:
        raise ConfigError(f"tag '{tag}' has no checkpoint waiting for approval"
                          + (" (it is paused: `overnight unpause` resumes it)"
                             if state.paused else "")
                          + ": nothing to approve")
    if note:
        ledger.add_note(note, tag)
    ledger.event(tag, CONTROL, json.dumps({"action": action, "by": by}))
    return {
        "pause": "the loop finishes what runs and launches nothing new until `overnight "
                 "unpause`",
        "unpause": "the loop launches experiments again",
        "approve": "the checkpoint is approved: the loop goes on"
                   + (" with your note" if note else ""),
        "stop": "the loop finishes what runs, then stops (the same `overnight run` resumes)",
        "stop-now": "the loop kills what runs and stops (the same `overnight run` resumes, "
                    "redoing it)",
    }[action]


@dataclass
class LoopState:
    running: bool
    paused: bool
    checkpoint: str | None  # why the loop waits for approval


def loop_state(ledger: Ledger, tag: str, state_dir: Path | None = None) -> LoopState:
    """Paused? Waiting at a checkpoint? From the loop's own events since it last started."""
    paused, checkpoint = False, None
    for e in ledger.events(tag):
        kind = e["kind"]
        if kind in ("start", "stop", "unpaused"):
            paused = False
            if kind != "unpaused":
                checkpoint = None
        elif kind == "paused":
            paused = True
        elif kind == "checkpoint":
            checkpoint = e["message"]
        elif kind == "approved":
            checkpoint = None
    running = state_dir is None or loop_pid(state_dir, tag) is not None
    return LoopState(running, paused and running, checkpoint if running else None)


# -- the loop's side ----------------------------------------------------------------------

class Human:
    """What the loop owes the person: it reads their actions, holds at checkpoints, says
    when it is stuck, and runs their notify command."""

    def __init__(self, ledger: Ledger, tag: str, spec: HumanSpec, state_dir: Path,
                 note: Callable[[str], None]):
        self.ledger, self.tag, self.spec = ledger, tag, spec
        self.state_dir = state_dir
        self.note = note
        self.seen = ledger.last_event_id()  # actions sent before this loop are not its own
        self.paused = False
        self.stop: str | None = None  # why the person stopped the loop
        self.checkpoint: str | None = None  # due: the loop drains, then waits for approval
        self.waiting = False  # the checkpoint was announced: report written, notify ran
        self._next_runs: float | None = None
        self._next_time: float | None = None
        self._failed: list[Row] = []  # candidates decided since the last keep, failed
        self._stuck_at = 0  # failures in a row when the loop last said it was stuck

    # checkpoints

    def begin(self, counted: int, rows: Iterable[Row]) -> None:
        """The loop starts (or resumes) with `counted` runs: the next checkpoint; a tag
        already stuck is not announced again until `stuck_after` more fail."""
        self._failed = failures_since_keep(rows)
        if self.spec.stuck_after and len(self._failed) >= self.spec.stuck_after:
            self._stuck_at = len(self._failed)
        every = self.spec.every()
        if every is None:
            return
        kind, amount = every
        if kind == "runs":
            self._next_runs = (counted // amount + 1) * amount
        else:
            self._next_time = time.monotonic() + amount

    def due(self, counted: int) -> None:
        """A checkpoint falls due once `counted` reaches the next multiple, or its time came."""
        if self.checkpoint is not None:
            return
        if self._next_runs is not None and counted >= self._next_runs:
            n = self.spec.every()[1]
            self.checkpoint = f"{counted} runs"
            self._next_runs = (counted // n + 1) * n  # the next multiple
        elif self._next_time is not None and time.monotonic() >= self._next_time:
            hours = self.spec.every()[1] / 3600
            self.checkpoint = f"{hours:g} h" if hours >= 1 else f"{hours * 60:g} min"
        if self.checkpoint is not None:
            self.note(f"checkpoint ({self.checkpoint}): finishing what runs, then waiting for "
                      "`overnight approve`")

    def announce(self, report: Path | None) -> None:
        """Nothing runs any more: record the checkpoint, tell the person, wait."""
        self.waiting = True
        message = f"checkpoint after {self.checkpoint}"
        self.ledger.event(self.tag, "checkpoint", self.checkpoint or "")
        where = f"; report: {report}" if report else ""
        self.note(f"{message}: waiting for `overnight approve --tag {self.tag}`{where}")
        self.notify("checkpoint", f"{message} on tag {self.tag}: `overnight approve --tag "
                    f"{self.tag}` goes on", report)

    def _approved(self) -> None:
        self.ledger.event(self.tag, "approved", self.checkpoint or "")
        self.note(f"checkpoint ({self.checkpoint}) approved: going on")
        self.checkpoint, self.waiting = None, False
        if self._next_time is not None:  # the next one a whole period after this approval
            self._next_time = time.monotonic() + self.spec.every()[1]

    @property
    def held(self) -> bool:
        """Launch nothing: paused, or at a checkpoint."""
        return self.stop is None and (self.paused or self.checkpoint is not None)

    # actions

    def poll(self) -> None:
        """Apply the actions sent since the last look. KeyboardInterrupt for `stop-now`:
        the loop stops as on Ctrl-C."""
        for e in self.ledger.events(self.tag, after=self.seen):
            self.seen = e["id"]
            if e["kind"] != CONTROL:
                continue
            try:
                sent = json.loads(e["message"])
                action, by = sent.get("action"), sent.get("by", "?")
            except (ValueError, AttributeError):
                continue
            if action == "pause" and not self.paused:
                self.paused = True
                self.ledger.event(self.tag, "paused", by)
                self.note(f"paused ({by}): running experiments finish, nothing new starts "
                          "until `overnight unpause`")
            elif action == "unpause" and self.paused:
                self.paused = False
                self.ledger.event(self.tag, "unpaused", by)
                self.note(f"unpaused ({by})")
            elif action == "approve" and self.waiting:
                self._approved()
            elif action == "stop":
                self.stop = f"stopped by `overnight stop` ({by})"
                self.note(f"{self.stop}: finishing what runs")
            elif action == "stop-now":
                self.note(f"stopped by `overnight stop --now` ({by})")
                raise KeyboardInterrupt

    # stuck

    def stuck(self) -> list[Row]:
        """The failed candidates since the last keep, in the order decided, once there are
        `stuck_after` of them (else [])."""
        n = self.spec.stuck_after
        return list(self._failed) if n and len(self._failed) >= n else []

    def decided(self, row: Row) -> None:
        """A candidate was decided: a keep ends a streak of failures; a failure extends it,
        and at `stuck_after` of them (and every `stuck_after` more) the loop says it is
        stuck (recorded, notified)."""
        if row.status == Status.KEEP:
            self._failed, self._stuck_at = [], 0
            return
        if row.status not in FAILED_TRIES or (self._failed and self._failed[-1].id == row.id):
            return
        self._failed.append(row)
        n = self.spec.stuck_after
        if not n or len(self._failed) < self._stuck_at + n:
            return
        self._stuck_at = len(self._failed)
        message = (f"{len(self._failed)} candidates in a row without a keep: the proposer is "
                   "told and changes tactics")
        self.ledger.event(self.tag, "stuck", message)
        self.note(f"stuck: {message}")
        self.notify("stuck", f"tag {self.tag}: {message}")

    # notify

    def notify(self, event: str, message: str, report: Path | None = None) -> None:
        """Run `[human] notify` (the user's command) with what happened in its environment;
        its output goes to .overnight/notify.log. A failure is said, never fatal."""
        command = self.spec.notify
        if not command:
            return
        env = {**os.environ, "OVERNIGHT_EVENT": event, "OVERNIGHT_TAG": self.tag,
               "OVERNIGHT_MESSAGE": message, "OVERNIGHT_REPORT": str(report or "")}
        log = self.state_dir / NOTIFY_LOG
        try:
            with open(log, "ab") as out:
                out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {event}: "
                          f"{message}\n".encode())
                out.flush()
                done = subprocess.run(command, shell=True, env=env, stdin=subprocess.DEVNULL,
                                      cwd=self.state_dir.parent,
                                      stdout=out, stderr=subprocess.STDOUT,
                                      timeout=self.spec.notify_timeout_seconds,
                                      start_new_session=True, check=False)
        except subprocess.TimeoutExpired:
            self.note(f"[human] notify ran past {self.spec.notify_timeout_seconds:g} s and was "
                      f"stopped; its output is in {log}")
            return
        except OSError as e:
            self.note(f"[human] notify could not run: {e}")
            return
        if done.returncode != 0:
            self.note(f"[human] notify exited with {done.returncode} ({event}); its output is "
                      f"in {log}")


def failures_since_keep(rows: Iterable[Row]) -> list[Row]:
    """Decided candidates since the last keep (or the baseline), in the order decided: what
    ran and did not improve. Rejected proposals ran nothing and do not count."""
    out: list[Row] = []
    for row in sorted(rows, key=lambda r: (r.decided_at or 0.0, r.id)):
        if row.repeat_of is not None:
            continue
        if row.status == Status.KEEP:
            out = []
        elif row.status in FAILED_TRIES and not row.is_baseline:
            out.append(row)
    return out
