"""The loop: propose, commit, run, judge, record; resume after any stop.

State lives in the ledger and in git, never only here: a restarted scheduler
rebuilds everything from them, marks what a dead process left running as
`lost`, redoes that work, and repairs refs so that git agrees with the ledger.
"""

from __future__ import annotations

import fcntl
import math
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from overnight import admission, diagnose, judge, pins, report
from overnight.data import Data, Watch
from overnight.errors import ConfigError, IntegrityHalt, OvernightError
from overnight.executors.base import CheckResult, Executor, RunRequest, RunResult
from overnight.history import History, experiment
from overnight.human import Human
from overnight.judge import Decision
from overnight.knobs import Scope, unreached
from overnight.ledger import Ledger, Row, export_tsv
from overnight.metrics import tail
from overnight.proposers.base import Context, Proposal, Proposer, fingerprint
from overnight.proposers.edits import knob_values
from overnight.proposers.prompt import readonly_texts
from overnight.sandbox import redact, venv_paths
from overnight.snapshot import Repo, branch_ref, candidate_ref
from overnight.spec import Spec
from overnight.status import MEASURED, NOT_COUNTED, Status
from overnight.tree import Tree

MAX_LOST_RETRIES = 2  # a candidate whose run is lost is redone at most this many times
GROW_EVERY_SECONDS = 5.0  # how often the executor is asked whether it has more slots
CONTROL_POLL_SECONDS = 1.0  # how often the person's actions (pause, approve...) are read
# (then given up and reported); the baseline is redone until it runs: nothing goes without it
STUCK_SHOWN = 20  # the failed ideas a stuck proposer is shown, the most recent
MAX_REJECTED_IN_A_ROW = 20  # a proposer that only produces rejects is stopped


class Reporter(Protocol):
    def started(self, row: Row) -> None: ...
    def finished(self, row: Row, best: Row | None, done: int) -> None: ...
    def note(self, text: str) -> None: ...


class SilentReporter:
    def started(self, row: Row) -> None:
        pass

    def finished(self, row: Row, best: Row | None, done: int) -> None:
        pass

    def note(self, text: str) -> None:
        pass


@dataclass
class Outcome:
    tag: str
    done: int  # experiments that count (everything but lost)
    interrupted: bool
    stopped_because: str


class Loop:
    def __init__(self, repo: Repo, spec: Spec, ledger: Ledger, executor: Executor, tag: str,
                 proposer_factory, max_experiments: int | None = None,
                 reporter: Reporter | None = None, runs_root: Path | None = None,
                 accept_spec_change: bool = False, data: Data | None = None,
                 results_tsv: Path | None = None,
                 write_report: Callable[[], Path | None] | None = None):
        self.repo = repo
        self.spec = spec
        self.ledger = ledger
        self.executor = executor
        self.tag = tag
        self.make_proposer = proposer_factory  # (files at the baseline) -> Proposer
        self.max = max_experiments
        self.report = reporter or SilentReporter()
        self.runs_root = runs_root or repo.root / ".overnight" / "runs"
        self.accept_spec_change = accept_spec_change  # measure differently than the pin
        self.data = Watch(ledger, tag, data or Data())  # [run] data: hashed, watched, pinned
        self.results_tsv = results_tsv  # rewritten as each experiment is decided
        self._tsv_failed = False  # said once, until it can be written again
        self.proposer: Proposer | None = None
        self._pending: dict[Future, _Job] = {}
        self._redo: list[Row] = []  # queued rows to launch, or lost/tampered rows to retry
        self._free_slots = list(range(executor.slots))
        self._files_cache: dict[str, dict[str, str]] = {}
        self._readonly_cache: dict[str, dict[str, str | None]] = {}
        # This tag's rows, refreshed after every write: one loop per tag (a lock), so the
        # cache is the ledger, without rereading the whole history for every proposal.
        self._rows: dict[int, Row] = {}
        self._ready: list[Row] = []  # candidates committed and waiting for a slot
        self._proposing: dict[Future, Context] = {}  # proposals being prepared on threads
        self._prechecking: dict[Future, Row] = {}  # candidates in their [run] precheck
        self._stop: str | None = None  # why no more proposals are asked for
        self._rejected_in_a_row = 0
        self._history = History(spec.objective.direction, _log_tail)  # what proposers see
        self._baseline_id: int | None = None  # the latest baseline row (a retry is a new one)
        self.judge = judge.Judge(spec.objective, spec.judge)
        self.scope = Scope.of(spec)  # which constants are knobs, and their homes
        # Every measured run, by hardware class, then by candidate; the noise they show.
        # Results are compared only within a class: one class ("") on one machine.
        self._runs_by: dict[str, judge.Runs] = {}
        self._slot_class = executor.slot_classes  # the class of each slot, by index
        self._classes = list(dict.fromkeys(self._slot_class))
        self._waiting: set[int] = set()  # confirm candidates waiting for the noise figure
        self._stopping = False  # interrupted: lost runs are left for the next resume
        self._class_waiting: set[int] = set()  # confirm candidates waiting for the incumbent
        self._grown_at = time.monotonic()  # when the executor was last asked for more slots
        # The person: pause/stop/approve actions, checkpoints, stuck, notify ([human]).
        self.human = Human(ledger, tag, spec.human, repo.root / ".overnight", self.report.note)
        self.write_report = write_report  # the morning report, at checkpoints and the end
        self._baseline_failure = False
        self._listened_at = -math.inf  # when the person's actions were last read

    # -- the main path -----------------------------------------------------------

    def run(self) -> Outcome:
        with _TagLock(self.repo.root / ".overnight", self.tag):
            self.ledger.verify()  # nothing runs on a ledger that was changed behind our back
            self._check_spec()
            self.ledger.event(self.tag, "start", f"pid {os.getpid()}")
            try:
                self._redo = self._resume()
                self._precheck_baseline()
                self.human.begin(self._counted(), self._rows.values())
                why = self._loop()
                self._check_branch()
                self.ledger.verify()
                interrupted = False
            except KeyboardInterrupt:
                self._interrupt()
                why, interrupted = "interrupted", True
            except IntegrityHalt as e:
                self._halt(e)
                self.human.notify("halt", f"tag {self.tag} halted on an integrity violation: "
                                  f"{e}", self._report_quietly())
                raise
            except ConfigError as e:
                if self._baseline_failure:
                    self.human.notify("baseline_failed", f"tag {self.tag}: {e}")
                raise
            self.ledger.event(self.tag, "stop", why)
            written = self._report_quietly()
            if written is not None:
                self.report.note(f"report: {written}")
            self.human.notify("end", f"tag {self.tag} stopped: {why}", written)
            return Outcome(self.tag, self._counted(), interrupted, why)

    def _loop(self) -> str:
        while True:
            self._listen()
            self._grow()
            self._drain()
            self._collect_proposals()
            if not self._baseline_pending() and not self._reached_max():
                self.human.due(self._counted())
            if not self.human.held:
                self._fill_slots()
                self._request_proposals()
            if not self._pending and not self._proposing and not self._prechecking:
                if self.human.held and not self._reached_max():
                    self._hold()
                    continue
                if self._ready and not self._reached_max() \
                        and self._slot_for(self._ready[0]) is not None:
                    continue
                break
            wait([*self._pending, *self._proposing, *self._prechecking],
                 timeout=CONTROL_POLL_SECONDS, return_when=FIRST_COMPLETED)
        self._drop_unrun()
        if self._reached_max():
            return f"reached {self.max} runs"
        return self._stop or "done"

    def _listen(self) -> None:
        """The person's actions since the last look, once a CONTROL_POLL_SECONDS at most
        (the loop goes round for every run that ends); a stop ends proposing."""
        now = time.monotonic()
        if now - self._listened_at < CONTROL_POLL_SECONDS:
            return
        self._listened_at = now
        self.human.poll()
        if self.human.stop and not self._stop:
            self._stop = self.human.stop

    def _hold(self) -> None:
        """Paused or at a checkpoint, with nothing running: a checkpoint is announced once
        (the report written, notify run), then the loop waits for the person."""
        if self.human.checkpoint is not None and not self.human.waiting:
            self.human.announce(self._report_quietly())
        time.sleep(CONTROL_POLL_SECONDS)

    def _report_quietly(self) -> Path | None:
        """The morning report, written now; a failure to write it is said, never fatal."""
        if self.write_report is None:
            return None
        try:
            return self.write_report()
        except Exception as e:  # noqa: BLE001 - a report must never stop the loop
            self.report.note(f"the report could not be written: {e}")
            return None

    def _fill_slots(self) -> None:
        """Free slots take, in order: redone work, prepared candidates, fresh proposals."""
        while self._free_slots and not self._reached_max():
            if self._drain():
                continue  # a finished run is recorded before anything new is launched
            if self._launch_redo():
                continue
            if self._baseline_pending():
                return  # nothing is proposed until the baseline has a number
            if self._ready:
                slot = self._slot_for(self._ready[0])
                if slot is None:
                    return  # the free slots are of classes that cannot judge it now
                self._launch(self._ready.pop(0), slot)
                continue
            if self._stop or self.proposer is None or self.proposer.slow:
                return
            if not self._judging_slots():
                return
            if len(self._prechecking) >= len(self._free_slots) or self._planned_max():
                return  # enough candidates are being prechecked for the free slots, or runs
            ctx = self._context()  # a fast proposer (search) proposes right here
            row = self._accept(self.proposer.propose(ctx), ctx)
            if row is not None and row.status == "queued":
                self._admit(row, now=True)

    def _request_proposals(self) -> None:
        """Slow proposers (a model, an agent) work ahead on threads so slots never wait."""
        if self._stop or self.proposer is None or not self.proposer.slow:
            return
        if self._baseline_pending():
            return
        # As many as the free slots and `prefetch` more need, prepared concurrently (up to
        # max_concurrent calls at once): with many slots one model call at a time cannot
        # keep up. Each sees what is queued and running, and how many siblings it has.
        prefetch = self.spec.proposer.prefetch
        if prefetch is None:
            prefetch = max(1, self.executor.slots // 2)
        want = len(self._free_slots) + prefetch
        want -= len(self._ready) + len(self._proposing) + len(self._prechecking)
        limit = self.spec.proposer.max_concurrent or self.executor.slots
        want = min(want, limit - len(self._proposing))
        if self.max is not None:
            planned = (self._counted() + len(self._pending) + len(self._ready)
                       + len(self._prechecking))
            want = min(want, self.max - planned - len(self._proposing))
        want = max(0, want)
        siblings = len(self._proposing) + want - 1
        for _ in range(want):
            ctx = replace(self._context(), siblings=siblings)
            self._proposing[_in_thread(self.proposer.propose, ctx)] = ctx

    def _collect_proposals(self) -> None:
        for fut in [f for f in self._proposing if f.done()]:
            ctx = self._proposing.pop(fut)
            try:
                proposal = fut.result()
            except ConfigError:
                raise  # a wrong key or model: every later proposal would fail the same way
            except Exception as e:  # noqa: BLE001 - a failed request is recorded, the loop goes on
                proposal = Proposal(parent=ctx.incumbent.commit, edits={}, description="",
                                    rejected=f"the proposer failed: {e}")
            row = self._accept(proposal, ctx)
            if row is not None and row.status == "queued":
                self._admit(row)

    def _drop_unrun(self) -> None:
        """Candidates prepared but never launched are lost: a later run redoes them (and
        queues again the repeats their confirmations still need)."""
        unrun = [*self._ready, *self._prechecking.values(),
                 *(r for r in self._redo if r.repeat_of is not None)]
        self._prechecking.clear()
        for row in unrun:
            self.ledger.update(row.id, status="lost", reason="not run: the loop stopped",
                               finished_at=time.time())
            self._get(row.id)
        self._ready.clear()
        self._redo = [r for r in self._redo if r.repeat_of is None]

    def _admit(self, row: Row, now: bool = False) -> None:
        """A new candidate takes a slot now, waits for one, or is prechecked first."""
        run = self.spec.run
        if run.precheck:
            req = self._request(row, self.runs_root / self.tag / f"{row.id}-precheck", None)
            fut = self.executor.precheck(req, run.precheck, run.precheck_timeout_seconds)
            self._prechecking[fut] = row
        elif now and (slot := self._slot_for(row)) is not None:
            self._launch(row, slot)
        else:
            self._ready.append(row)

    def _precheck_baseline(self) -> None:
        """A tag's first run is prechecked here, before anything else: a baseline that fails
        its precheck is a failed start (exit 2) that spent no slot time."""
        run = self.spec.run
        base = next((r for r in self._redo if r.is_baseline and r.status == "queued"), None)
        if not run.precheck or base is None:
            return
        req = self._request(base, self.runs_root / self.tag / f"{base.id}-precheck", None)
        check = self.executor.precheck(req, run.precheck, run.precheck_timeout_seconds).result()
        if check.ok:
            return
        self.ledger.update(base.id, status=Status.REJECTED, finished_at=time.time(),
                           reason=f"precheck {check.reason}")
        self._get(base.id)
        raise ConfigError(
            f"the baseline (HEAD {base.commit_sha[:10]}, unchanged) fails its precheck: "
            f"{check.reason}\nLog: {check.log_path}\nFix the script or [run] precheck, "
            "commit, and run the same command again (nothing else was recorded).")

    def _prechecked(self) -> bool:
        """Candidates whose precheck ended: ready for a slot, or rejected (nothing spent)."""
        done = [fut for fut in self._prechecking if fut.done()]
        for fut in done:
            row = self._prechecking.pop(fut)
            check = fut.result()
            if check.ok:
                self._ready.append(row)
                continue
            self.ledger.update(row.id, status=Status.REJECTED, finished_at=time.time(),
                               reason=f"precheck {check.reason}")
            row = self._get(row.id)
            self.report.finished(row, self._incumbent(), self._counted())
            self._write_tsv()
        return bool(done)

    def _drain(self) -> bool:
        """Record every finished run or check; True if there was any."""
        self._prechecked()
        done = [fut for fut in self._pending if fut.done()]
        for fut in done:
            job = self._pending.pop(fut)
            if job.checks:
                self._checked(job, fut.result())
            else:
                self._record(job, fut.result())
        return bool(done)

    # -- starting: baseline, resume, repair ---------------------------------------

    def _resume(self) -> list[Row]:
        """Mark what a dead run left behind as lost; return the lost work to redo."""
        newly_lost = self.ledger.mark_lost(self.tag, "the process running it stopped")
        if newly_lost:
            self.report.note(f"resuming: {len(newly_lost)} experiment(s) left running by a "
                             "stopped run are marked lost and will be redone")
            killed = self.executor.reap([Path(r.run_dir) for r in newly_lost if r.run_dir])
            if killed:
                self.report.note(f"killed {killed} orphaned process(es) of those experiments")
        rows = self.ledger.experiments(self.tag)
        self._adopt(rows)
        self._gather_evidence(rows)
        redo = []
        if not any(r.status == "keep" for r in rows):
            redo.append(self._start_baseline(rows))
            rows = self.ledger.experiments(self.tag)
            self._adopt(rows)
        self._repair_refs(rows)
        retried = {r.retry_of for r in rows if r.retry_of is not None}
        for r in rows:
            if r.status != "lost" or r.id in retried or r.repeat_of is not None:
                continue  # a lost repeat is not redone as such: its candidate asks again
            if r.failed_start:
                continue  # a baseline that never got its number: a fresh one starts instead
            depth = self._retry_depth(r, rows)
            if r.commit_sha and (r.is_baseline or depth < MAX_LOST_RETRIES):
                redo.append(r)
            else:
                self._give_up(r, depth + 1)
        base = self._baseline()
        if base is not None and self.proposer is None:
            self.proposer = self.make_proposer(self._files(base.commit_sha))
        self._redo = redo
        self._resume_confirmations()
        return self._redo

    def _adopt(self, rows: list[Row]) -> None:
        """The tag's rows as the ledger holds them: the cache everything else reads."""
        self._rows = {r.id: r for r in rows}
        self._history = History(self.spec.objective.direction, _log_tail)
        for r in rows:
            self._history.add(r)
        self._baseline_id = max((r.id for r in rows if r.is_baseline and not r.failed_start),
                                default=None)

    def _gather_evidence(self, rows: list[Row]) -> None:
        """Every measured run, grouped by the commit's first row: the judge's evidence."""
        for r in rows:
            if r.metric is None or r.status not in MEASURED:
                continue
            self._runs_of(r.hw_class).add(r.id, r.repeat_of, r.metric)

    def _resume_confirmations(self) -> None:
        """Confirmations a stopped run left open go on: the baseline gets the rest of its
        runs, and each candidate in `confirm` is decided on what it has, or runs again."""
        base = self._baseline()
        if base is None or base.status != Status.KEEP:
            return
        self._top_up_baseline(base)
        inc = self._incumbent()
        if inc is not None and not inc.is_baseline and len(self._classes) > 1:
            self._measure_everywhere(inc)  # its runs on other classes may have been lost
        for row in sorted(self._rows.values(), key=lambda r: r.id):
            if row.status == Status.CONFIRM:
                self._decide(row)

    def _start_baseline(self, rows: list[Row]) -> Row:
        """A tag with no kept experiment starts (over) from HEAD, unchanged, with a fresh
        baseline: the tag comes into being when it has a number. Until then there is no
        branch and no spec pin, and each failed start (crashed, interrupted, never run; its
        row kept with its log and reason) counts for nothing and is not redone: fixing the
        script or the spec and running again just works."""
        head = self.repo.head()
        if self.repo.ref(branch_ref(self.tag)):
            had = "has no measured baseline" if rows else "has no experiments"
            raise ConfigError(
                f"branch overnight/{self.tag} exists but tag '{self.tag}' {had} in the "
                f"ledger, so overnight did not make it: choose another --tag, or delete the "
                f"branch (git branch -D overnight/{self.tag})"
            )
        # The proposer is made before the row: a search space that cannot work stops the
        # start here, leaving nothing behind.
        self.proposer = self.make_proposer(self._files(head))
        rid = self.ledger.insert(self.tag, "queued", is_baseline=1, commit_sha=head,
                                 description="baseline", proposer="baseline",
                                 knobs=self._knobs_of(head),
                                 fingerprint=fingerprint(self._files(head)))
        return self._get(rid)

    def _repair_refs(self, rows: list[Row]) -> None:
        """Git follows the ledger: the branch tip is the last keep; one ref per candidate."""
        self._check_branch()
        known = {candidate_ref(self.tag, r.id): r.commit_sha for r in rows if r.commit_sha}
        prefix = f"refs/overnight/{self.tag}/"
        for ref, sha in self.repo.refs(prefix).items():
            if known.get(ref) != sha:
                self.repo.delete_ref(ref)
        have = self.repo.refs(prefix)
        for ref, sha in known.items():
            if have.get(ref) != sha:
                self.repo.set_ref(ref, sha)

    def _give_up(self, row: Row, interruptions: int) -> None:
        """A candidate lost too often is not redone again, and says so (once)."""
        if row.reason.startswith("given up"):
            return
        if row.commit_sha:
            reason = f"given up after {interruptions} interruptions (last: {row.reason})"
        else:
            reason = f"given up: the loop stopped before it was committed ({row.reason})"
        self.ledger.update(row.id, reason=reason)
        self.ledger.event(self.tag, "given_up", reason, row.id)
        self._get(row.id)
        self.report.note(f"#{row.id} {reason}")

    def _retry_depth(self, row: Row, rows: list[Row]) -> int:
        by_id = {r.id: r for r in rows}
        depth = 0
        while row.retry_of is not None and row.retry_of in by_id:
            row, depth = by_id[row.retry_of], depth + 1
        return depth

    def _retry_row(self, lost: Row) -> Row:
        new_id = self.ledger.insert(
            self.tag, "queued", parent=lost.parent, commit_sha=lost.commit_sha,
            is_baseline=int(lost.is_baseline), description=lost.description,
            hypothesis=lost.hypothesis, proposer=lost.proposer, knobs=lost.knobs,
            retry_of=lost.id, kept_commit=lost.kept_commit if lost.is_baseline else None,
            fingerprint=lost.fingerprint, repeat_of=lost.repeat_of,
            hw_class=lost.hw_class if lost.repeat_of is not None else "",
        )
        self.repo.pin(candidate_ref(self.tag, new_id), lost.commit_sha)
        return self._get(new_id)

    # -- proposing -------------------------------------------------------------

    def _context(self) -> Context:
        """What the proposer sees: bounded (history.py), whatever the ledger's size."""
        inc = self._incumbent()
        history = self._history.experiments()
        objective = self.spec.objective
        return Context(
            incumbent=experiment(inc),
            files=self._files(inc.commit_sha),
            history=history,
            in_flight=self._history.in_flight(),
            direction=objective.direction,
            slots=self.executor.slots,
            metric=objective.metric,
            min_delta=objective.min_delta,
            budget_seconds=self.spec.run.budget_seconds,
            hardware=getattr(self.executor, "hardware", ""),
            program=self._program(),
            protected=tuple(self.spec.files.protected),
            readonly=self._readonly(inc.commit_sha),
            notes=tuple(self.ledger.notes(self.tag)),
            stuck=tuple(_tried(r, objective.metric) for r in
                        self.human.stuck()[-STUCK_SHOWN:]),
            tried=self._history.tried,  # every fingerprint: a frozen view, never copied
            counts=self._history.counts(),
            omitted=len(self._history) - len(history),
        )

    def _readonly(self, commit: str) -> dict[str, str | None]:
        """Protected and [files] context files at `commit`, for a model to read (None: a
        file that is not UTF-8 text, named but not shown)."""
        files = self.spec.files
        if self.spec.proposer.kind == "search":
            return {}
        if commit not in self._readonly_cache:
            # One entry: they are the same files at every candidate, and may be large.
            self._readonly_cache = {commit: readonly_texts(self._tree(commit),
                                                           [*files.protected, *files.context])}
        return self._readonly_cache[commit]

    def _program(self) -> str:
        """program.md as the user has it now: editing it steers the next proposals."""
        path = self.repo.root / self.spec.proposer.program
        try:
            return path.read_text(errors="replace")
        except OSError:
            return ""

    def _accept(self, proposal: Proposal | None, ctx: Context) -> Row | None:
        """Check a proposal and turn it into a candidate commit (queued) or a rejected row."""
        if proposal is None:
            self._stop = "the proposer has nothing new to try"
            return None
        name = self.proposer.name if self.proposer else ""
        usage = dict(tokens_in=proposal.usage.tokens_in, tokens_out=proposal.usage.tokens_out,
                     cost_usd=proposal.usage.cost_usd)
        problem = proposal.rejected or self._check(proposal, ctx)
        if problem:
            rid = self.ledger.insert(
                self.tag, "rejected", parent=proposal.parent, description=proposal.description,
                hypothesis=proposal.hypothesis, proposer=name, knobs=proposal.knobs,
                reason=problem, **usage,
            )
            row = self._get(rid)
            self.report.finished(row, self._incumbent(), self._counted())
            self._rejected_in_a_row += 1
            if self._rejected_in_a_row >= MAX_REJECTED_IN_A_ROW:
                self._stop = f"{MAX_REJECTED_IN_A_ROW} proposals in a row were rejected"
            self._check_spend()
            return row
        self._rejected_in_a_row = 0
        files = {**self._files(proposal.parent), **proposal.edits}
        rid = self.ledger.insert(
            self.tag, "queued", parent=proposal.parent, description=proposal.description,
            hypothesis=proposal.hypothesis, proposer=name, knobs=proposal.knobs,
            fingerprint=fingerprint(files), **usage,
        )
        message = f"{proposal.description}\n\n"
        if proposal.hypothesis:
            message += f"Hypothesis: {proposal.hypothesis}\n\n"
        message += f"Overnight-Tag: {self.tag}\nOvernight-Experiment: {rid}\n"
        sha = self.repo.commit_candidate(proposal.parent, proposal.edits, message)
        self.ledger.update(rid, commit_sha=sha)
        self.repo.pin(candidate_ref(self.tag, rid), sha)
        for note in proposal.notes:
            self.report.note(f"#{rid}: {note}")
        self._check_spend()
        return self._get(rid)

    def _check_spend(self) -> None:
        cap = self.spec.proposer.max_cost_usd
        if cap is None:
            return
        spent = self.ledger.spend(self.tag)[2]
        if spent >= cap:
            self._stop = f"the proposer spent ${spent:.2f}, the max_cost_usd cap is ${cap:.2f}"

    def _check(self, p: Proposal, ctx: Context) -> str | None:
        """Why a proposal must not run, or None. Nothing is spent on a rejected proposal."""
        # Compare-and-swap: the edits must apply to exactly the tree they name, one that was
        # an incumbent of this tag (a prefetched proposal may name a former one).
        if not self._history.was_incumbent(p.parent):
            return f"stale parent {p.parent[:10]}: not an incumbent of tag {self.tag}"
        return admission.problem(admission.Rules.of(self.spec), self._files(p.parent),
                                 p.edits, self._history.first_with)

    # -- one candidate's life: launched, run, judged, confirmed, decided, recorded ----------

    def _grow(self) -> None:
        """Slots the executor gained (a Ray cluster that grew) join the pool; a new class
        first measures the baseline, or the incumbent, before it judges anything."""
        now = time.monotonic()
        if now - self._grown_at < GROW_EVERY_SECONDS:
            return
        self._grown_at = now
        new = self.executor.grow()
        if not new:
            return
        for cls in new:
            self._free_slots.append(len(self._slot_class))
            self._slot_class.append(cls)
        added = [c for c in dict.fromkeys(new) if c not in self._classes]
        self._classes += added
        self.report.note(f"the cluster grew: {len(new)} more slot(s)"
                         + (f", new class(es) {', '.join(added)}" if added else ""))
        base, inc = self._baseline(), self._incumbent()
        if added and base is not None and base.status == Status.KEEP:
            self._top_up_baseline(base)
        if added and inc is not None and not inc.is_baseline:
            self._measure_everywhere(inc)

    def _launch_redo(self) -> bool:
        """Launch the first redone or queued run a free slot of its class can take."""
        for i, row in enumerate(self._redo):
            slot = self._slot_for(row)
            if slot is not None:
                del self._redo[i]
                self._launch(row if row.status == "queued" else self._retry_row(row), slot)
                return True
        return False

    def _slot_for(self, row: Row) -> int | None:
        """A free slot that may run `row`: of its class when it has one (a repeat, a run of
        the baseline or the incumbent on a class), else of a class that judges now (with
        tiers: the screen class)."""
        hw = self.spec.hardware
        want = row.hw_class if row.repeat_of is not None else None
        if want is None and hw.tiers:
            want = hw.confirm if row.is_baseline else hw.screen
        if want is None and row.is_baseline and hw.reference in self._classes:
            want = hw.reference
        for slot in self._free_slots:
            cls = self._slot_class[slot]
            if want is not None:
                if cls == want:
                    return slot
            elif row.is_baseline or self._judges(cls):
                return slot
        return None

    def _judges(self, cls: str) -> bool:
        """Can class `cls` judge a first run now: the incumbent has a number there and no
        run of it is still queued or running there."""
        inc = self._incumbent()
        if inc is None or not self._runs_of(cls).count(inc.id):
            return False
        busy = [*(j.row for j in self._pending.values()), *self._redo]
        return not any(r.repeat_of == inc.id and r.hw_class == cls for r in busy)

    def _judging_slots(self) -> bool:
        if self.spec.hardware.tiers:
            return any(self._slot_class[s] == self.spec.hardware.screen
                       for s in self._free_slots)
        return any(self._judges(self._slot_class[s]) for s in self._free_slots)

    def _launch(self, row: Row, slot: int | None = None) -> None:
        slot = self._free_slots[0] if slot is None else slot
        self._free_slots.remove(slot)
        req = self._request(row, self.runs_root / self.tag / str(row.id), slot)
        self.ledger.update(row.id, status="running", slot=slot, run_dir=str(req.run_dir),
                           log_path=str(req.log_path), hw_class=self._slot_class[slot])
        row = self._get(row.id)
        self._pending[self.executor.submit(req)] = _Job(row, req)
        self.report.started(row)

    def _request(self, row: Row, run_dir: Path, slot: int | None) -> RunRequest:
        run = self.spec.run
        evaluate = self.spec.evaluate
        venv = self.repo.root / ".venv"
        return RunRequest(
            experiment_id=row.id, tree=self._tree(row.commit_sha), run_dir=run_dir,
            command=run.command, env=dict(run.env), budget_seconds=run.budget_seconds,
            timeout_seconds=run.timeout_seconds, kill_grace_seconds=run.kill_grace_seconds,
            slot=slot if slot is not None else 0, metrics_file=run.metrics_file,
            allow_env=tuple(run.allow_env),
            sandbox=run.sandbox, network=run.network, attest=run.attest,
            evaluate=evaluate.command if evaluate else None,
            evaluate_tree=self._tree(self._baseline_commit()) if evaluate else None,
            evaluate_timeout=evaluate.timeout_seconds if evaluate else 600,
            readable=tuple(venv_paths(venv)) if venv.is_dir() else (),
            hidden=(self.repo.root, self.runs_root),
            devices=tuple(run.devices), project_venv=venv if venv.is_dir() else None,
            tmp_bytes=run.tmp_size_mb << 20, max_processes=run.max_processes,
            objective=self.spec.objective.metric, pattern=self.spec.objective.pattern,
            knob_names=tuple(sorted(self.scope.named)), data=self.data.pairs,
            hw_class=self._slot_class[slot] if slot is not None else "",
        )

    def _record(self, job: _Job, result: RunResult) -> None:
        """Judge a finished run; a would-be keep goes through the checks gate first."""
        row = job.row
        self._verify_before_judging(row)
        self.data.after_run()
        run = judge.outcome(result, self.spec.objective.metric)
        if result.status == "error":
            self._finish(row, result, Decision(Status.LOST, reason=result.reason))
            raise OvernightError(f"experiment #{row.id} could not be run: {result.reason}")
        if row.repeat_of is not None:
            self._repeated(row, result, self.judge.repeat(run))
            return
        inc = None if row.is_baseline else self._incumbent()
        if inc is None:
            decision = self.judge.baseline(run)
        elif not self._runs_of(row.hw_class).count(inc.id) and self.judge.failure(run) is None:
            # A keep on another class made a new incumbent while this ran: it is judged once
            # the new incumbent has a number on this class.
            decision = Decision(Status.CONFIRM, metric=run.value, reason=(
                f"the incumbent changed while it ran: judged once #{inc.id} has a number on "
                f"{row.hw_class or 'this machine'}"))
            self._class_waiting.add(row.id)
        else:
            cls = row.hw_class
            decision = self.judge.first(run, self._evidence(inc, cls), self._noise(cls),
                                        self._simpler(row, inc))
            decision = self._reached(row, result, decision)
            hw = self.spec.hardware
            if hw.tiers and decision.status == Status.KEEP:  # a screening draw keeps nothing
                decision = replace(decision, status=Status.CONFIRM,
                                   reason=f"better on {hw.screen}: confirming on {hw.confirm}")
        if decision.status == Status.TAMPERED:
            self._tampered(row, result, decision)
        elif decision.status == Status.KEEP and self._gated(row):
            self._submit_checks(job, result, row)
        else:
            self._finish(row, result, decision, inc)
            if decision.status == Status.CONFIRM and row.id not in self._class_waiting:
                self._next_run(self._get(row.id))

    def _reached(self, row: Row, result: RunResult, decision: Decision) -> Decision:
        """Did the proposal's knob values reach the run? The attestation says what ran."""
        if not result.runtime_knobs or not row.parent:
            return decision
        lines, whole = unreached(row.knobs, self._knobs_of(row.parent), result.runtime_knobs)
        return self.judge.untested(decision, lines, whole) if lines else decision

    def _decide(self, cand: Row, failed: str = "", hold: _Job | None = None) -> None:
        """A candidate in `confirm` on all its evidence: keep (through the checks), discard,
        or one more run (later, if the baseline's noise figure is still being measured)."""
        inc = self._incumbent()
        cls = self._decision_class(cand)
        if not self._runs_of(cls).count(inc.id):
            self._class_waiting.add(cand.id)  # a new incumbent, not yet measured there
            return
        decision = self.judge.candidate(self._evidence(cand, cls), self._evidence(inc, cls),
                                        self._noise(cls),
                                        self._simpler(cand, inc), failed)
        if decision.status == Status.CONFIRM:
            self.ledger.update(cand.id, reason=decision.reason, **_stats(decision))
            self._next_run(self._get(cand.id))
        elif decision.status == Status.KEEP and self._gated(cand) and hold is None:
            self._submit_checks(None, None, cand)
        else:
            self._conclude(cand, decision, inc)

    def _next_run(self, cand: Row) -> None:
        """Queue the candidate's next run, unless the noise is still being measured: then
        it waits for the baseline's runs (an exact objective needs no more runs at all)."""
        if self._baseline_runs_pending():
            self._waiting.add(cand.id)
            return
        cls = self._decision_class(cand)
        if self._noise(cls).exact and self._runs_of(cls).count(cand.id):
            self._decide(cand)
            return
        self._queue_repeat(cand)

    def _queue_repeat(self, cand: Row, cls: str | None = None) -> None:
        """Another run of `cand` on class `cls` (default: where its keep is decided)."""
        cls = self._decision_class(cand) if cls is None else cls
        rid = self.ledger.insert(
            self.tag, "queued", parent=cand.parent, commit_sha=cand.commit_sha,
            is_baseline=0, description=f"repeat of #{cand.id}: {cand.description}",
            proposer=cand.proposer, knobs=cand.knobs, repeat_of=cand.id, hw_class=cls,
        )
        self.repo.pin(candidate_ref(self.tag, rid), cand.commit_sha)
        self._redo.append(self._get(rid))

    def _repeated(self, row: Row, result: RunResult, decision: Decision) -> None:
        """A repeat ended: record it, then decide its candidate on the new evidence."""
        if decision.status == Status.TAMPERED:
            self._tampered(row, result, decision)
            return
        row = self._finish(row, result, decision)
        if decision.status == Status.LOST:
            return  # redone like any lost run
        cand = self._get(row.repeat_of)
        if cand is None:
            return
        failed = "" if decision.status == Status.REPEAT and not decision.reason else (
            f"#{row.id} {decision.status}: {decision.reason}")
        if cand.is_baseline:
            self._update_baseline(cand)
            self._release_class_waiting()
            return
        if cand.status == Status.KEEP:  # the incumbent measured on another class
            self._release_class_waiting()
            return
        if cand.status == Status.CONFIRM:
            self._decide(cand, failed, hold=None)

    def _release_class_waiting(self) -> None:
        """Candidates that waited for the incumbent's number on their class go on."""
        inc = self._incumbent()
        for cid in sorted(self._class_waiting):
            cand = self._get(cid)
            if cand is None or cand.status != Status.CONFIRM:
                self._class_waiting.discard(cid)
            elif inc is not None and self._runs_of(self._decision_class(cand)).count(inc.id):
                self._class_waiting.discard(cid)
                self._next_run(cand)

    # -- the baseline's runs: the incumbent's estimate and the noise figure ------------

    def _update_baseline(self, base: Row) -> None:
        """Another run of the baseline: a better estimate of the incumbent and of the noise;
        candidates that waited for the noise figure go on once all of them are in."""
        ev = self._evidence(base, base.hw_class)
        noise = self._noise(base.hw_class)
        sigma = noise.sigma
        self.ledger.update(base.id, estimate=ev.estimate, runs=len(ev.values), noise=sigma,
                           spread=sigma / math.sqrt(ev.n) if sigma is not None else None)
        self._get(base.id)
        if self._baseline_runs_pending():
            return
        if noise.exact:
            self.report.note("the baseline's runs measured exactly the same: the objective "
                             "is deterministic, so candidates are judged on one run")
        elif sigma is not None:
            self.report.note(f"noise: one run of {self.spec.objective.metric} varies by "
                             f"about {sigma:.3g} (sigma, from {len(ev.values)} baseline runs)")
        for cid in sorted(self._waiting):
            cand = self._get(cid)
            if cand is not None and cand.status == Status.CONFIRM:
                self._waiting.discard(cid)
                self._decide(cand)
        self._waiting.clear()

    def _top_up_baseline(self, base: Row) -> None:
        """The baseline runs `baseline_runs` times in all (confirm mode) on every class: the
        first noise figure, and the first incumbent estimate, of each (greedy: once on each
        class). Its repeats take free slots while the first proposals are prepared."""
        want = 1 if self.judge.greedy else self.spec.judge.baseline_runs
        for cls in self._classes:
            have = sum(1 for r in self._rows.values()
                       if r.repeat_of == base.id and r.hw_class == cls
                       and r.status not in ("lost", "rejected"))
            have += cls == base.hw_class  # its own first run
            for _ in range(want - have):
                self._queue_repeat(base, cls)

    def _measure_everywhere(self, kept: Row) -> None:
        """A new incumbent is measured once on each other class before that class judges
        anything new: its estimate there is what the class's candidates must beat."""
        for cls in self._classes:
            if cls != kept.hw_class and not self._runs_of(cls).count(kept.id):
                self._queue_repeat(kept, cls)

    def _baseline_runs_pending(self) -> bool:
        base = self._baseline()
        if base is None:
            return False
        queued = (r.repeat_of for r in self._redo)
        running = (job.row.repeat_of for job in self._pending.values() if not job.checks)
        return any(of == base.id for of in (*queued, *running))

    # -- the checks gate of a would-be keep ---------------------------------------------

    def _gated(self, row: Row) -> bool:
        return bool(self.spec.run.checks) and not row.is_baseline

    def _submit_checks(self, job: _Job | None, result: RunResult | None, row: Row) -> None:
        """The checks of a would-be keep, on a fresh copy of its commit's tree (in its first
        run's directory when it was decided on its repeats)."""
        if job is not None:
            request = job.request
        else:
            request = self._request(row, Path(row.run_dir), None)
        fut = self.executor.submit_checks(request, self.spec.run.checks,
                                          self.spec.run.checks_timeout_seconds)
        self._pending[fut] = _Job(row, request, result, checks=True)
        self.report.note(f"#{row.id} beat the incumbent; running checks")

    def _checked(self, job: _Job, check: CheckResult) -> None:
        row = self._get(job.row.id)
        self._verify_before_judging(row)
        self.data.after_run()
        failed = self.judge.checks(check.ok, check.reason)
        if row.status == Status.CONFIRM:  # decided on its repeats; its runs are recorded
            if failed:
                self._conclude(row, failed, None)
            else:
                self._decide(row, hold=job)  # judged again: the incumbent may have moved
            return
        result = job.result
        if failed:
            self._finish(row, result, failed)
            return
        # Judge again: the incumbent may have moved while the checks ran.
        inc = self._incumbent()
        decision = self.judge.first(judge.outcome(result, self.spec.objective.metric),
                                    self._evidence(inc, row.hw_class), self._noise(row.hw_class),
                                    self._simpler(row, inc))
        self._finish(row, result, decision, inc)
        if decision.status == Status.CONFIRM:
            self._next_run(self._get(row.id))

    # -- recording a decision ----------------------------------------------------------

    def _finish(self, row: Row, result: RunResult, decision: Decision,
                inc: Row | None = None) -> Row:
        """Record a run and its decision (a keep also on the branch); the row as recorded."""
        self._free(row)
        facts = dict(
            metric=decision.metric, metrics=result.metrics.values, returncode=result.returncode,
            peak_rss_mb=result.peak_rss_mb,
            peak_vram_mb=result.metrics.values.get("peak_vram_mb"),
            hardware=result.hardware, started_at=result.started_at,
            finished_at=result.finished_at, runtime_knobs=result.runtime_knobs,
            integrity=result.integrity,
        )
        if decision.metric is not None and decision.status in MEASURED:
            self._runs_of(row.hw_class).add(row.id, row.repeat_of, decision.metric)
        row = self._settle(row, decision, inc, **facts)
        self._tidy(row)
        if row.is_baseline and row.status not in ("keep", "lost", "tampered"):
            self._baseline_failure = True
            raise ConfigError(self._baseline_failed(row))
        if row.is_baseline and row.status == Status.KEEP:
            self._top_up_baseline(row)
        self._write_tsv()
        self.report.finished(row, self._incumbent(), self._counted())
        self._wave_done(row)
        if row.status == Status.LOST and not self._stopping:
            self._rerun(row)
        return row

    def _write_tsv(self) -> None:
        """[run] results_tsv: what `overnight export` prints, replaced atomically (a link
        placed at its name is replaced, never written through). A file that cannot be
        written stops nothing: the ledger has every row."""
        if self.results_tsv is None:
            return
        rows = sorted(self._rows.values(), key=lambda r: r.id)
        try:
            atomic_write(self.results_tsv, export_tsv(rows, self.spec.objective.metric))
        except OSError as e:
            if not self._tsv_failed:
                self.report.note(f"could not write {self.results_tsv}: {e}; the ledger has "
                                 "every result (`overnight export`)")
            self._tsv_failed = True
        else:
            self._tsv_failed = False

    def _wave_done(self, row: Row) -> None:
        """When the last member of a grid wave is decided, its main effects go into the
        hypothesis log (an event) and the progress."""
        m = re.match(r"^grid wave #(\d+):", row.hypothesis or "")
        if not m or row.repeat_of is not None or row.status in (Status.CONFIRM, Status.LOST):
            return
        rows = sorted(self._rows.values(), key=lambda r: r.id)
        effects = report.wave_effects(rows, self.spec.objective, only=int(m[1]))
        if effects and not any(e["kind"] == "wave" and e["message"] == effects[0]
                               for e in self.ledger.events(self.tag)):
            self.ledger.event(self.tag, "wave", effects[0])
            self.report.note(effects[0])

    def _rerun(self, row: Row) -> None:
        """A run lost while the loop goes on (its Ray worker or node died): run it again, a
        bounded number of times; the retry is a row of its own (retry_of), never a silent
        second try."""
        rows = list(self._rows.values())
        if row.repeat_of is not None:
            cand = self._get(row.repeat_of)
            if cand is None:
                return
            lost = sum(1 for r in rows if r.repeat_of == cand.id and r.status == Status.LOST)
            if lost > MAX_LOST_RETRIES:
                if cand.status == Status.CONFIRM:
                    self._decide(cand, f"its runs were lost {lost} times")
                return
            if cand.is_baseline:
                self._top_up_baseline(cand)
            elif cand.status == Status.CONFIRM:
                self._queue_repeat(cand)
            return
        depth = self._retry_depth(row, rows)
        if row.commit_sha and (row.is_baseline or depth < MAX_LOST_RETRIES):
            self._redo.append(row)
        else:
            self._give_up(row, depth + 1)

    def _conclude(self, cand: Row, decision: Decision, inc: Row | None) -> None:
        """A candidate decided on all its runs (they are recorded already)."""
        self._waiting.discard(cand.id)
        row = self._settle(cand, decision, inc, finished_at=time.time())
        self._write_tsv()
        self._wave_done(row)
        self.report.finished(row, self._incumbent(), self._counted())

    def _settle(self, row: Row, decision: Decision, inc: Row | None, **facts) -> Row:
        if decision.status == Status.KEEP:
            self._branch_before_keep(row)
        if decision.status == Status.KEEP and row.is_baseline:
            # Pinned before the number is recorded: a tag with a measured baseline always
            # has its pin (one written by a start that died before this point binds nothing).
            self._pin_spec()
        update = dict(status=decision.status, delta=decision.delta, reason=decision.reason,
                      decided_at=time.time(), **_stats(decision), **facts)
        if decision.status == Status.KEEP:
            # The baseline is kept as itself: its number is what brings the tag (and its
            # branch) into being.
            kept = row.commit_sha if row.is_baseline else self._keep_commit(row, inc, decision)
            self.ledger.update(row.id, kept_commit=kept, **update)
            self.repo.set_ref(branch_ref(self.tag), kept)  # after the ledger: resume repairs
            if not row.is_baseline and len(self._classes) > 1:
                self._measure_everywhere(self._get(row.id))
        else:
            self.ledger.update(row.id, **update)
        row = self._get(row.id)
        if not row.is_baseline and row.repeat_of is None:
            self.human.decided(row)
        return row

    def _keep_commit(self, row: Row, inc: Row, d: Decision) -> str:
        metric = self.spec.objective.metric
        value = d.estimate if d.estimate is not None else d.metric
        pct = judge.improvement_pct(self.spec.objective, inc.value, value)
        message = f"{metric} {inc.value:.6f} -> {value:.6f} ({pct:+.2f}%)"
        if d.runs > 1 and d.spread is not None:
            message += f", +-{d.spread:.2g} over {d.runs} runs"
        message += f": {row.description}\n\n"
        if row.hypothesis:
            message += f"Hypothesis: {row.hypothesis}\n\n"
        message += (f"Overnight-Tag: {self.tag}\nOvernight-Experiment: {row.id}\n"
                    f"Overnight-Candidate: {row.commit_sha}\n")
        tip = self.repo.ref(branch_ref(self.tag)) or inc.kept_commit
        # The kept commit's tree is exactly the tree that was measured.
        return self.repo.commit_tree(self.repo.tree_of(row.commit_sha), tip, message)

    def _tampered(self, row: Row, result: RunResult, decision: Decision) -> None:
        """What ran is not what was committed: never a result. Retry once, then halt."""
        row = self._finish(row, result, decision)
        earlier = self._get(row.retry_of) if row.retry_of else None
        if earlier is None or earlier.status != "tampered":
            self.report.note(f"#{row.id} tampered: {result.tampered}; retrying it once from a "
                             "fresh directory")
            self._redo.insert(0, row)
            return
        message = (f"experiment #{row.id} was tampered with twice, so the loop stopped: "
                   f"{result.tampered}. Find what rewrites files in .overnight/runs (a "
                   "formatter, linter or sync tool) and stop it, or set [run] on_tamper = "
                   '"continue" to go on without those experiments.')
        if self.spec.run.on_tamper == "halt":
            raise IntegrityHalt(message)
        self.report.note(message)

    def _tidy(self, row: Row) -> None:
        """Drop work trees we need not keep (git can rebuild them); logs always stay."""
        policy = self.spec.run.keep_workdirs
        keep = policy == "all" or (policy == "kept" and row.status == "keep")
        work = Path(row.run_dir) / "work" if row.run_dir else None
        if work and work.exists() and not keep:
            shutil.rmtree(work, ignore_errors=True)

    def _free(self, row: Row) -> None:
        if row.slot is not None and row.slot not in self._free_slots:
            self._free_slots.append(row.slot)
            self._free_slots.sort()

    def _interrupt(self) -> None:
        """Ctrl-C or a halt: record what had already ended, kill what runs and record it as
        lost (a later run redoes it)."""
        self._stopping = True
        self.report.note("stopping: killing running experiments...")
        self._record_finished()
        self.executor.cancel_all()
        for fut, job in list(self._pending.items()):
            if job.checks and job.result is None:
                continue  # checks of a candidate in confirm: it stays so, resume decides it
            result = job.result or fut.result()
            result.status, result.reason = "lost", "interrupted (the loop was stopped)"
            result.tampered = ""
            self._finish(job.row, result, Decision(Status.LOST, reason=result.reason))
        self._pending.clear()
        self.ledger.mark_lost(self.tag, "interrupted (the loop was stopped)")

    def _record_finished(self) -> None:
        """Runs that ended before the stop are recorded as they ended, not as lost: a
        baseline that has its number is never thrown away."""
        for fut, job in list(self._pending.items()):
            if job.checks or not fut.done():
                continue
            del self._pending[fut]
            try:
                self._record(job, fut.result())
            except ConfigError as e:  # the baseline failed: say why; the loop stops anyway
                self.report.note(str(e))

    # -- what the judge is given ---------------------------------------------------------

    def _verify_before_judging(self, row: Row) -> None:
        """Judged against an incumbent nobody rewrote: the rows the judgment reads and what
        was written since the last check (the whole ledger is checked at start and exit)."""
        inc = self._incumbent()
        self.ledger.verify_rows([row.id] + ([inc.id] if inc else []))

    def _runs_of(self, cls: str) -> judge.Runs:
        return self._runs_by.setdefault(cls, judge.Runs())

    def _noise(self, cls: str) -> judge.Noise:
        return self._runs_of(cls).noise

    def _evidence(self, row: Row, cls: str) -> judge.Evidence:
        """The row's runs on class `cls`. Its first run selected it (it looked better) only
        on the class it ran on: confirm runs on another class carry no selection."""
        selected = not row.is_baseline and cls == row.hw_class and row.repeat_of is None
        return self._runs_of(cls).of(row.id, baseline=not selected)

    def _decision_class(self, cand: Row) -> str:
        """Where a candidate's keep is decided: the confirm class with tiers, else the class
        of its first run."""
        hw = self.spec.hardware
        return hw.confirm if hw.tiers and not cand.is_baseline else cand.hw_class

    def _simpler(self, row: Row, inc: Row) -> bool:
        """Fewer lines of code than the incumbent (for [judge] prefer_simpler)."""
        if not self.spec.judge.prefer_simpler:
            return False
        return _lines(self._files(row.commit_sha)) < _lines(self._files(inc.commit_sha))

    # -- detection: the spec, the branch, the halt ---------------------------------------

    def _pin_spec(self) -> None:
        pins.pin_spec(self.ledger, self.tag, self.spec)
        self.data.pin()

    def _check_spec(self) -> None:
        measured = self._incumbent() is not None  # else the tag does not exist yet
        if measured:
            pins.check_spec(self.ledger, self.tag, self.spec, self.accept_spec_change,
                            self.report.note)
        self.data.start(self.accept_spec_change, self.report.note, measured)

    def _check_branch(self) -> None:
        pins.check_branch(self.repo, self.ledger, self.tag, self.report.note)

    def _branch_before_keep(self, row: Row) -> None:
        """Never build a keep on a branch someone else moved; the run is redone later."""
        try:
            self._check_branch()
        except IntegrityHalt:
            self.ledger.update(row.id, status="lost", finished_at=time.time(),
                               reason="not recorded: the loop halted on a moved branch")
            self._get(row.id)
            raise

    def _halt(self, e: IntegrityHalt) -> None:
        """Stop everything on an integrity violation; record it if the ledger still can be."""
        try:
            self._interrupt()
            self.ledger.event(self.tag, "halt", str(e))
        except IntegrityHalt:
            # The ledger itself is what was tampered with: it refuses writes. Still, nothing
            # may keep running.
            self.executor.cancel_all()

    # -- reading the state -------------------------------------------------------------

    def _get(self, experiment_id: int) -> Row | None:
        row = self.ledger.get(experiment_id)
        if row is not None and row.tag == self.tag:
            self._rows[row.id] = row
            self._history.add(row)
            if row.is_baseline:
                self._baseline_id = max(self._baseline_id or 0, row.id)
        return row

    def _incumbent(self) -> Row | None:
        return self.ledger.last(self.tag, "keep")  # each keep beats the one kept before

    def _baseline(self) -> Row | None:
        return self._rows.get(self._baseline_id) if self._baseline_id else None

    def _baseline_commit(self) -> str | None:
        base = self._baseline()
        return base.commit_sha if base else None

    def _baseline_pending(self) -> bool:
        return self._incumbent() is None

    def _counted(self) -> int:
        """Runs that count: repeats too (compute is compute), rejected proposals and failed
        starts not (History leaves them out). From the rows the loop holds (every write is
        reread), not a count over the whole ledger."""
        return self._history.runs(exclude=NOT_COUNTED)

    def _planned_max(self) -> bool:
        """Runs counted, running, ready or in their precheck reach --max-experiments: one
        more candidate would never run."""
        if self.max is None:
            return False
        running = sum(1 for job in self._pending.values() if not job.checks)
        return self._counted() + running + len(self._ready) + len(self._prechecking) >= self.max

    def _reached_max(self) -> bool:
        if self.max is None:
            return False
        running = sum(1 for job in self._pending.values() if not job.checks)
        return self._counted() + running >= self.max

    def _tree(self, commit: str) -> Tree:
        return self.repo.tree(commit)

    def _files(self, commit: str) -> dict[str, str]:
        if commit not in self._files_cache:
            self._files_cache[commit] = self.repo.read_files(commit, self.spec.files.editable)
        return self._files_cache[commit]

    def _knobs_of(self, commit: str) -> dict[str, float | int]:
        return knob_values(self._files(commit), self.scope)

    def _baseline_failed(self, row: Row) -> str:
        """The failed start's message, with advice for its cause (also kept in its reason,
        for `status` and `show`)."""
        log = tail(Path(row.log_path), 15) if row.log_path else ""
        found = self._diagnose(row)
        if found.summary:
            self.ledger.update(row.id, reason=f"{row.reason}: {found.summary}")
            self._get(row.id)
        run = self.spec.run
        return (
            f"the baseline (HEAD {row.commit_sha[:10]}, unchanged) did not produce a result: "
            f"{row.status}: {row.reason}\n"
            f"Command: {run.command}\nLog: {row.log_path}\n"
            + (f"--- last lines ---\n{log}\n---\n" if log else "")
            + found.advice + "\nThis failed start created no branch, no spec pin and nothing "
            "that counts: fix it, commit, and run the same command again."
        )

    def _diagnose(self, row: Row) -> diagnose.Diagnosis:
        """Why the baseline gave no number, from its log's end and its exit code."""
        run, objective = self.spec.run, self.spec.objective
        log = tail(Path(row.log_path), 200) if row.log_path else ""
        cause = diagnose.classify(log, row.status, row.returncode, objective.metric)
        commit = row.commit_sha
        where = diagnose.Setting(
            command=run.command, path=run.env.get("PATH", os.environ.get("PATH", "")),
            root=self.repo.root, workdir=Path(row.run_dir) / "work" if row.run_dir else None,
            metric=objective.metric, pattern=objective.pattern, timeout=run.timeout_seconds,
            ignored=lambda path: bool(self.repo.git("check-ignore", "--", path, check=False)),
            in_commit=lambda path: bool(self.repo.tracked(commit, [path])))
        return diagnose.explain(cause, where)


@dataclass
class _Job:
    """Something in flight: a run (result None) or the checks of a finished run."""

    row: Row
    request: RunRequest
    result: RunResult | None = None  # the run's, when these are checks of its would-be keep
    checks: bool = False  # the checks of a would-be keep, not a run


def atomic_write(path: Path, text: str) -> None:
    """`text` at `path` whole or not at all: a new file beside it, renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # renamed whole: never an empty file after a power cut
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _tried(row: Row, metric: str) -> str:
    """One failed idea, for a proposer told it is stuck."""
    what = row.description or "(no description)"
    if row.hypothesis:
        what += f" (hypothesis: {row.hypothesis})"
    result = f"{metric} {row.value:.6g}" if row.value is not None else row.reason
    return f"#{row.id} {what} -> {row.status}: {result}"[:400]


def _log_tail(path: str) -> str:
    """The end of a failed run's log, for a model's prompt: no secret of ours rides along."""
    return redact(tail(Path(path), 30))


def _stats(d: Decision) -> dict[str, object]:
    return dict(estimate=d.estimate, runs=d.runs, spread=d.spread, noise=d.noise)


def _lines(files: dict[str, str]) -> int:
    """Lines of code: not blank, not a comment."""
    return sum(1 for text in files.values() for line in text.splitlines()
               if line.strip() and not line.lstrip().startswith("#"))


def _in_thread(fn, *args) -> Future:  # noqa: ANN001
    """Run fn on a daemon thread: a model still answering never holds up the exit."""
    fut: Future = Future()
    fut.set_running_or_notify_cancel()

    def work() -> None:
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to whoever reads the future
            fut.set_exception(e)

    threading.Thread(target=work, daemon=True, name="overnight-proposer").start()
    return fut


class _TagLock:
    """One `overnight run` per tag at a time. The OS drops the lock if the process dies."""

    def __init__(self, state_dir: Path, tag: str):
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / f"run-{tag}.lock"
        self.tag = tag

    def __enter__(self) -> _TagLock:
        self.f = open(self.path, "a+")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.f.seek(0)
            pid = self.f.read().strip() or "?"
            self.f.close()
            raise ConfigError(
                f"another `overnight run` (pid {pid}) is running tag '{self.tag}': wait for it, "
                "stop it, or use another --tag"
            ) from None
        self.f.seek(0)
        self.f.truncate()
        self.f.write(str(os.getpid()))
        self.f.flush()
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()
