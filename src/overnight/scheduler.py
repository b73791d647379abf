"""The loop: propose, commit, run, judge, record; resume after any stop.

State lives in the ledger and in git, never only here: a restarted scheduler
rebuilds everything from them, marks what a dead process left running as
`lost`, redoes that work, and repairs refs so that git agrees with the ledger.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from overnight import judge, regions
from overnight.errors import ConfigError, IntegrityHalt, OvernightError
from overnight.executors.base import CheckResult, Executor, RunRequest, RunResult
from overnight.knobs import read_knobs
from overnight.ledger import Ledger, Row
from overnight.metrics import tail
from overnight.proposers.base import Context, Experiment, Proposal, Proposer
from overnight.snapshot import Repo, branch_ref, candidate_ref
from overnight.spec import Spec

MAX_LOST_RETRIES = 2  # a candidate whose run is lost is redone at most this many times
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
                 reporter: Reporter | None = None, runs_root: Path | None = None):
        self.repo = repo
        self.spec = spec
        self.ledger = ledger
        self.executor = executor
        self.tag = tag
        self.make_proposer = proposer_factory  # (files at the baseline) -> Proposer
        self.max = max_experiments
        self.report = reporter or SilentReporter()
        self.runs_root = runs_root or repo.root / ".overnight" / "runs"
        self.proposer: Proposer | None = None
        self._pending: dict[Future, _Job] = {}
        self._redo: list[Row] = []  # queued rows to launch, or lost/tampered rows to retry
        self._free_slots = list(range(executor.slots))
        self._files_cache: dict[str, dict[str, str]] = {}
        # This tag's rows, refreshed after every write: one loop per tag (a lock), so the
        # cache is the ledger, without rereading the whole history for every proposal.
        self._rows: dict[int, Row] = {}

    # -- the main path -----------------------------------------------------------

    def run(self) -> Outcome:
        with _TagLock(self.repo.root / ".overnight", self.tag):
            self.ledger.event(self.tag, "start", f"pid {os.getpid()}")
            self._redo = self._resume()
            try:
                why = self._loop()
                interrupted = False
            except KeyboardInterrupt:
                self._interrupt()
                why, interrupted = "interrupted", True
            except IntegrityHalt as e:
                self._interrupt()
                self.ledger.event(self.tag, "halt", str(e))
                raise
            self.ledger.event(self.tag, "stop", why)
            return Outcome(self.tag, self._counted(), interrupted, why)

    def _loop(self) -> str:
        rejected_in_a_row = 0
        exhausted = False
        while True:
            while self._free_slots and not exhausted and not self._reached_max():
                if self._drain():
                    continue  # a finished run is recorded before anything new is launched
                if self._redo:
                    first = self._redo.pop(0)
                    self._launch(first if first.status == "queued" else self._retry_row(first))
                    continue
                if self._baseline_pending():
                    break  # nothing is proposed until the baseline has a number
                row = self._next_candidate()
                if row is None:
                    exhausted = True
                elif row.status == "rejected":
                    rejected_in_a_row += 1
                    if rejected_in_a_row >= MAX_REJECTED_IN_A_ROW:
                        exhausted = True
                        self.report.note(f"{MAX_REJECTED_IN_A_ROW} proposals in a row were "
                                         "rejected; stopping")
                else:
                    rejected_in_a_row = 0
                    self._launch(row)
            if not self._pending:
                break
            wait(list(self._pending), return_when=FIRST_COMPLETED)
            self._drain()
        if self._reached_max():
            return f"reached {self.max} experiments"
        return "the proposer has nothing new to try" if exhausted else "done"

    def _drain(self) -> bool:
        """Record every finished run or check; True if there was any."""
        done = [fut for fut in self._pending if fut.done()]
        for fut in done:
            job = self._pending.pop(fut)
            if job.result is None:
                self._record(job, fut.result())
            else:
                self._checked(job, fut.result())
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
        self._rows = {r.id: r for r in rows}
        redo = []
        if not any(r.status == "keep" for r in rows):
            baseline = self._start_baseline(rows)
            if baseline is not None:
                redo.append(baseline)
            rows = self.ledger.experiments(self.tag)
            self._rows = {r.id: r for r in rows}
        self._repair_refs(rows)
        retried = {r.retry_of for r in rows if r.retry_of is not None}
        for r in rows:
            if r.status == "lost" and r.id not in retried and r.commit_sha:
                if self._retry_depth(r, rows) < MAX_LOST_RETRIES + 1:
                    redo.append(r)
        base = self._baseline()
        if base is not None:
            self.proposer = self.make_proposer(self._files(base.commit_sha))
        return redo

    def _start_baseline(self, rows: list[Row]) -> Row | None:
        """A tag with no kept experiment starts (over) from HEAD, unchanged."""
        head = self.repo.head()
        existing = self.repo.ref(branch_ref(self.tag))
        if existing and not rows:
            raise ConfigError(
                f"branch overnight/{self.tag} exists but the ledger has no experiments for tag "
                f"'{self.tag}': choose another --tag, or delete the branch "
                f"(git branch -D overnight/{self.tag})"
            )
        if any(r.is_baseline and r.status == "lost" for r in rows):
            return None  # the lost baseline is redone through the redo queue
        self.repo.set_ref(branch_ref(self.tag), head)
        rid = self.ledger.insert(self.tag, "queued", is_baseline=1, commit_sha=head,
                                 description="baseline", proposer="baseline",
                                 knobs=self._knobs_of(head), kept_commit=head)
        return self._get(rid)

    def _repair_refs(self, rows: list[Row]) -> None:
        """Git follows the ledger: the branch tip is the last keep; one ref per candidate."""
        keeps = [r for r in rows if r.status == "keep" and r.kept_commit]
        if keeps:
            tip = self.repo.ref(branch_ref(self.tag))
            if tip != keeps[-1].kept_commit:
                self.repo.set_ref(branch_ref(self.tag), keeps[-1].kept_commit)
                if tip is not None:
                    self.report.note(f"branch overnight/{self.tag} moved back to the last "
                                     "recorded keep")
        known = {candidate_ref(self.tag, r.id): r.commit_sha for r in rows if r.commit_sha}
        prefix = f"refs/overnight/{self.tag}/"
        for ref, sha in self.repo.refs(prefix).items():
            if known.get(ref) != sha:
                self.repo.delete_ref(ref)
        have = self.repo.refs(prefix)
        for ref, sha in known.items():
            if have.get(ref) != sha:
                self.repo.set_ref(ref, sha)

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
        )
        self.repo.pin(candidate_ref(self.tag, new_id), lost.commit_sha)
        return self._get(new_id)

    # -- proposing -------------------------------------------------------------

    def _context(self) -> Context:
        inc = self._incumbent()
        history = [_experiment(r) for _, r in sorted(self._rows.items())]
        return Context(
            incumbent=_experiment(inc),
            files=self._files(inc.commit_sha),
            history=history,
            in_flight=[e for e in history if e.status in ("queued", "running")],
            direction=self.spec.objective.direction,
            slots=self.executor.slots,
        )

    def _next_candidate(self) -> Row | None:
        if self.proposer is None:
            return None
        ctx = self._context()
        proposal = self.proposer.propose(ctx)
        if proposal is None:
            return None
        problem = self._check(proposal, ctx)
        if problem:
            rid = self.ledger.insert(
                self.tag, "rejected", parent=proposal.parent, description=proposal.description,
                hypothesis=proposal.hypothesis, proposer=self.proposer.name,
                knobs=proposal.knobs, reason=problem,
            )
            row = self._get(rid)
            self.report.finished(row, self._incumbent(), self._counted())
            return row
        rid = self.ledger.insert(
            self.tag, "queued", parent=proposal.parent, description=proposal.description,
            hypothesis=proposal.hypothesis, proposer=self.proposer.name, knobs=proposal.knobs,
        )
        message = f"{proposal.description}\n\n"
        if proposal.hypothesis:
            message += f"Hypothesis: {proposal.hypothesis}\n\n"
        message += f"Overnight-Tag: {self.tag}\nOvernight-Experiment: {rid}\n"
        sha = self.repo.commit_candidate(proposal.parent, proposal.edits, message)
        self.ledger.update(rid, commit_sha=sha)
        self.repo.pin(candidate_ref(self.tag, rid), sha)
        return self._get(rid)

    def _check(self, p: Proposal, ctx: Context) -> str | None:
        """Why a proposal must not run, or None. Nothing is spent on a rejected proposal."""
        if p.parent != ctx.incumbent.commit:
            return f"stale parent {p.parent[:10]}: the incumbent is {ctx.incumbent.commit[:10]}"
        files = self.spec.files
        for path in p.edits:
            if path in files.protected:
                return f"edits {path}, which is protected"
            if path not in files.editable:
                return f"edits {path}, which is not in [files] editable"
        changed = {path: text for path, text in p.edits.items() if ctx.files.get(path) != text}
        if not changed:
            return "changes nothing"
        for path, text in changed.items():
            problem = regions.check_edit(path, ctx.files.get(path, ""), text)
            if problem:
                return problem
        bounds = self.spec.search.bounds
        if bounds:
            try:
                knobs = read_knobs({**ctx.files, **p.edits})
            except OvernightError as e:
                return f"cannot read knobs: {e}"
            for name, (lo, hi) in bounds.items():
                k = knobs.get(name)
                unchanged = k is not None and k.value == ctx.incumbent.knobs.get(name)
                if k is not None and not lo <= k.value <= hi and not unchanged:
                    return f"{name} = {k.value:g} is outside its bounds [{lo:g}, {hi:g}]"
        return None

    # -- running and recording -------------------------------------------------------

    def _launch(self, row: Row) -> None:
        slot = self._free_slots.pop(0)
        run_dir = self.runs_root / self.tag / str(row.id)
        req = RunRequest(
            experiment_id=row.id, commit=row.commit_sha, run_dir=run_dir,
            command=self.spec.run.command, env=dict(self.spec.run.env),
            budget_seconds=self.spec.run.budget_seconds,
            timeout_seconds=self.spec.run.timeout_seconds,
            kill_grace_seconds=self.spec.run.kill_grace_seconds,
            slot=slot, metrics_file=self.spec.run.metrics_file,
            allow_env=tuple(self.spec.run.allow_env), sandbox=self.spec.run.sandbox,
            attest=self.spec.run.attest,
            evaluate=self.spec.evaluate.command if self.spec.evaluate else None,
            evaluate_commit=self._baseline_commit(),
            evaluate_timeout=self.spec.evaluate.timeout_seconds if self.spec.evaluate else 600,
        )
        self.ledger.update(row.id, status="running", slot=slot, run_dir=str(run_dir),
                           log_path=str(req.log_path))
        row = self._get(row.id)
        self._pending[self.executor.submit(req)] = _Job(row, req)
        self.report.started(row)

    def _record(self, job: _Job, result: RunResult) -> None:
        """Judge a finished run; a would-be keep goes through the checks gate first."""
        row = job.row
        if result.status == "lost" and result.reason.startswith("harness error"):
            self._finish(row, result, judge.Decision("lost", None, None, result.reason), None)
            raise OvernightError(f"experiment #{row.id} could not be run: {result.reason}")
        if result.tampered:
            self._tampered(row, result)
            return
        value, why = result.metrics.objective(self.spec.objective.metric)
        inc = None if row.is_baseline else self._incumbent()
        decision = judge.decide(self.spec.objective, result.status, value, why,
                                inc.metric if inc else None, result.reason)
        if decision.status == "keep" and not row.is_baseline and self.spec.run.checks:
            fut = self.executor.submit_checks(job.request, self.spec.run.checks,
                                              self.spec.run.checks_timeout_seconds)
            self._pending[fut] = _Job(row, job.request, result)
            self.report.note(f"#{row.id} beat the incumbent; running checks")
            return
        self._finish(row, result, decision, inc)

    def _checked(self, job: _Job, check: CheckResult) -> None:
        row, result = job.row, job.result
        if not check.ok:
            decision = judge.Decision("checks_failed", None, None, check.reason)
            self._finish(row, result, decision, None)
            return
        # Judge again: the incumbent may have moved while the checks ran.
        value, why = result.metrics.objective(self.spec.objective.metric)
        inc = self._incumbent()
        decision = judge.decide(self.spec.objective, result.status, value, why,
                                inc.metric if inc else None, result.reason)
        self._finish(row, result, decision, inc)

    def _tampered(self, row: Row, result: RunResult) -> None:
        """What ran is not what was committed: never a result. Retry once, then halt."""
        self._free(row)
        self.ledger.update(
            row.id, status="tampered", metric=None, delta=None, metrics=result.metrics.values,
            reason=result.tampered, returncode=result.returncode, integrity=result.integrity,
            runtime_knobs=result.runtime_knobs, hardware=result.hardware,
            started_at=result.started_at, finished_at=result.finished_at,
        )
        row = self._get(row.id)
        self.report.finished(row, self._incumbent(), self._counted())
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

    def _finish(self, row: Row, result: RunResult, decision: judge.Decision,
                inc: Row | None) -> None:
        self._free(row)
        update = dict(
            status=decision.status, metric=decision.metric, delta=decision.delta,
            metrics=result.metrics.values, reason=decision.reason,
            returncode=result.returncode, peak_rss_mb=result.peak_rss_mb,
            peak_vram_mb=result.metrics.values.get("peak_vram_mb"),
            hardware=result.hardware, started_at=result.started_at,
            finished_at=result.finished_at, runtime_knobs=result.runtime_knobs,
            integrity=result.integrity,
        )
        if decision.status == "keep" and not row.is_baseline:
            kept = self._keep_commit(row, inc, decision)
            self.ledger.update(row.id, kept_commit=kept, **update)
            self.repo.set_ref(branch_ref(self.tag), kept)  # after the ledger: resume repairs
        else:
            self.ledger.update(row.id, **update)
        row = self._get(row.id)
        self._tidy(row)
        if row.is_baseline and row.status not in ("keep", "lost"):
            raise ConfigError(self._baseline_failed(row))
        self.report.finished(row, self._incumbent(), self._counted())

    def _keep_commit(self, row: Row, inc: Row, d: judge.Decision) -> str:
        metric = self.spec.objective.metric
        pct = judge.improvement_pct(self.spec.objective, inc.metric, d.metric)
        message = (
            f"{metric} {inc.metric:.6f} -> {d.metric:.6f} ({pct:+.2f}%): {row.description}\n\n"
        )
        if row.hypothesis:
            message += f"Hypothesis: {row.hypothesis}\n\n"
        message += (f"Overnight-Tag: {self.tag}\nOvernight-Experiment: {row.id}\n"
                    f"Overnight-Candidate: {row.commit_sha}\n")
        tip = self.repo.ref(branch_ref(self.tag)) or inc.kept_commit
        # The kept commit's tree is exactly the tree that was measured.
        return self.repo.commit_tree(self.repo.tree_of(row.commit_sha), tip, message)

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
        """Ctrl-C or a halt: kill what runs, record it as lost (a later run redoes it)."""
        self.report.note("stopping: killing running experiments...")
        self.executor.cancel_all()
        for fut, job in list(self._pending.items()):
            result = job.result or fut.result()
            result.status, result.reason = "lost", "interrupted (the loop was stopped)"
            result.tampered = ""
            self._finish(job.row, result, judge.Decision("lost", None, None, result.reason),
                         None)
        self._pending.clear()
        self.ledger.mark_lost(self.tag, "interrupted (the loop was stopped)")

    # -- reading the state -------------------------------------------------------------

    def _get(self, experiment_id: int) -> Row | None:
        row = self.ledger.get(experiment_id)
        if row is not None and row.tag == self.tag:
            self._rows[row.id] = row
        return row

    def _incumbent(self) -> Row | None:
        return self.ledger.last(self.tag, "keep")  # each keep beats the one before

    def _baseline(self) -> Row | None:
        rows = [r for _, r in sorted(self._rows.items()) if r.is_baseline]
        return rows[-1] if rows else None

    def _baseline_commit(self) -> str | None:
        base = self._baseline()
        return base.commit_sha if base else None

    def _baseline_pending(self) -> bool:
        return self._incumbent() is None

    def _counted(self) -> int:
        return self.ledger.count(self.tag, exclude=("lost", "queued", "running"))

    def _reached_max(self) -> bool:
        if self.max is None:
            return False
        return self._counted() + len(self._pending) >= self.max

    def _files(self, commit: str) -> dict[str, str]:
        if commit not in self._files_cache:
            self._files_cache[commit] = self.repo.read_files(commit, self.spec.files.editable)
        return self._files_cache[commit]

    def _knobs_of(self, commit: str) -> dict[str, float | int]:
        try:
            return {k: v.value for k, v in read_knobs(self._files(commit)).items()}
        except OvernightError:
            return {}

    def _baseline_failed(self, row: Row) -> str:
        log = tail(Path(row.log_path), 15) if row.log_path else ""
        return (
            f"the baseline (HEAD {row.commit_sha[:10]}, unchanged) did not produce a result: "
            f"{row.status}: {row.reason}\n"
            f"Command: {self.spec.run.command}\nLog: {row.log_path}\n"
            + (f"--- last lines ---\n{log}\n---\n" if log else "")
            + f"Fix the script so that it prints `{self.spec.objective.metric}: <number>` "
            "and exits 0, commit, and run again."
        )


@dataclass
class _Job:
    """Something in flight: a run (result None) or the checks of a finished run."""

    row: Row
    request: RunRequest
    result: RunResult | None = None


def _experiment(r: Row) -> Experiment:
    return Experiment(
        id=r.id, commit=r.commit_sha or "", parent=r.parent, status=r.status,
        metric=r.metric, description=r.description, knobs=r.knobs, is_baseline=r.is_baseline,
    )


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
