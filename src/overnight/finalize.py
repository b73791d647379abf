"""`overnight finalize`: the kept chain of a tag as branches a reviewer can take.

`overnight-final/<tag>` starts at the commit the tag's baseline ran and holds one commit per
kept improvement, in the order they were kept, each with exactly the tree that was measured:
each commit is then the minimal diff against the one before, and its message says what that
change measured. Beside it, each kept change that applies to the baseline on its own (it
touches lines no earlier change touched) gets a branch of its own from the baseline,
`overnight-final/<tag>-<n>-<slug>`, so a reviewer can take one change and not another.

Only git objects and refs are written (commit-tree, a temporary index, one update-ref
transaction): the user's working tree, index and HEAD are never touched, and nothing is
pushed. The commits are deterministic (dated when their experiment finished), so finalizing
the same ledger twice makes the same branches. Each commit's last line is the trailer
`Overnight-Final: <tag>`: that is how a later finalize knows a branch is its own to replace
(with --force), and never one of another tag whose name looks like one of ours (tag `a`'s
change 1 "b" is `overnight-final/a-1-b`, which is also tag `a-1-b`'s final branch: the
final branch of a tag wins, the other tag's change goes without a branch of its own).

`--verify N` runs the final tree and the baseline N times each, alternating, on the
executor's slots in the tag's box and budget, and reports the gain with its uncertainty; the
runs are recorded as one `finalize_verify` event and change no experiment of the tag.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import textwrap
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from overnight import judge
from overnight.errors import ConfigError, IntegrityHalt
from overnight.ledger import Ledger, Row
from overnight.report import fmt_value
from overnight.snapshot import Repo, branch_ref
from overnight.spec import Objective
from overnight.status import Status
from overnight.text import printable
from overnight.workspace import known_tag, ref_name_problem

if TYPE_CHECKING:
    from rich.console import Console

    from overnight.executors.base import Executor, RunRequest, RunResult
    from overnight.scheduler import Loop
    from overnight.workspace import Workspace

PREFIX = "overnight-final/"
OWNER = "Overnight-Final"  # the trailer naming the tag whose finalize made a commit
VERIFY_EVENT = "finalize_verify"
_OWNER_LINE = re.compile(rf"{OWNER}: (\S+)")


@dataclass(frozen=True)
class Change:
    """One kept improvement, in the chain."""

    n: int  # its place in the chain, from 1
    row: Row  # the kept experiment
    before: Row  # what it improved on: the keep before it, or the baseline
    tree: str  # the tree that was measured
    commit: str  # its commit on overnight-final/<tag>


@dataclass(frozen=True)
class Branch:
    name: str  # e.g. overnight-final/t
    commit: str
    subject: str
    base: str  # the commit it starts from: its diff against it is what to review
    change: int | None = None  # the change it holds alone; None: the whole chain


@dataclass
class Plan:
    """What finalize makes of a tag (its commits are written, its branches not yet)."""

    tag: str
    base: Row
    changes: list[Change]
    branches: list[Branch]  # the chain first, then one per change that stands alone
    alone: dict[int, str]  # change n -> why it has no branch of its own
    notes: list[str]  # what the user should know (where overnight/<tag> is, ...)
    existing: dict[str, str] = field(default_factory=dict)  # name -> commit, already there
    stale: dict[str, str] = field(default_factory=dict)  # ours from before, not made again

    @property
    def final(self) -> Change:
        return self.changes[-1]

    def differing(self) -> list[str]:
        """Branches already there that this finalize would replace or delete."""
        out = [b.name for b in self.branches
               if b.name in self.existing and self.existing[b.name] != b.commit]
        return out + sorted(self.stale)


@dataclass(frozen=True)
class Written:
    branch: Branch
    state: str  # created | replaced | unchanged
    was: str | None = None  # the commit it pointed at before


# -- the plan ------------------------------------------------------------------


def plan(repo: Repo, ledger: Ledger, objective: Objective, tag: str | None) -> Plan:
    """The branches of a tag's kept chain, as commits; ConfigError for a tag with nothing to
    finalize, IntegrityHalt for a ledger changed outside overnight."""
    ledger.verify()
    tag = known_tag(ledger, tag)
    rows = ledger.experiments(tag)
    base = next((r for r in reversed(rows) if r.is_baseline and r.status == Status.KEEP), None)
    if base is None or not base.commit_sha:
        raise ConfigError(f"tag '{tag}' has no measured baseline, so nothing was kept: "
                          "nothing to finalize")
    keeps = [r for r in rows if r.status == Status.KEEP and not r.is_baseline]
    if not keeps:
        raise ConfigError(f"tag '{tag}' has no kept improvement (only its baseline, #{base.id}):"
                          f" nothing to finalize; `overnight status --tag {tag}` shows what "
                          "was tried")
    ordered, notes = _in_order(repo, base, keeps)
    changes = _chain(repo, objective, tag, base, ordered)
    notes += _tip_notes(repo, tag, ordered)
    chain = Branch(PREFIX + tag, changes[-1].commit, _subject(changes[-1].row), base.commit_sha)
    found = _final_branches(repo)
    owner = found.get(chain.name, ("", None))[1]
    if owner not in (None, tag):
        raise ConfigError(
            f"{chain.name} is a branch `overnight finalize --tag {owner}` made for one of its "
            f"changes (tag '{owner}' + its change number + a slug spells '{tag}'): delete it "
            f"(`git branch -D {chain.name}`) and run again; finalizing '{owner}' again will "
            "leave that name to this tag")
    alone_ones, alone = _independent(repo, objective, tag, base, changes,
                                     _taken(tag, set(ledger.tags()), found))
    branches = [chain, *alone_ones]
    names = {b.name for b in branches}
    for name in names:
        problem = ref_name_problem(f"refs/heads/{name}")
        if problem:
            raise ConfigError(f"cannot name the branch {name}: {problem}")
    existing = {n: sha for n, (sha, _) in found.items() if n in names}
    stale = {n: sha for n, (sha, who) in found.items() if who == tag and n not in names}
    return Plan(tag, base, changes, branches, alone, notes, existing, stale)


def _in_order(repo: Repo, base: Row, keeps: list[Row]) -> tuple[list[Row], list[str]]:
    """The keeps in the order they were kept: each kept commit's parent is the kept commit
    before it (the baseline's for the first). That is the ledger's order unless keeps were
    decided out of order (parallel slots); a chain that does not link up is taken in the
    ledger's order, and said."""
    wanted = "".join(f"{r.kept_commit}\n" for r in keeps if r.kept_commit)
    # Nothing is listed when git no longer has a kept commit (overnight/<tag> deleted, then
    # gc): the candidate commits, which hold the same trees, are what the chain is built of.
    listed = repo.git("rev-list", "--no-walk=unsorted", "--parents", "--stdin",
                      input=wanted.encode(), check=False)
    parent = {line.split()[0]: (line.split()[1:] or [""])[0] for line in listed.splitlines()}
    after: dict[str, Row] = {}
    for r in keeps:
        p = parent.get(r.kept_commit or "")
        if p is None or p in after:
            after = {}
            break
        after[p] = r
    order, at = [], base.commit_sha
    while at in after:
        order.append(after.pop(at))
        at = order[-1].kept_commit
    if len(order) == len(keeps):
        return order, []
    return keeps, [f"the kept commits of tag '{base.tag}' do not form one chain from its "
                   "baseline (or git no longer has some of them): the changes are taken in "
                   "the ledger's order"]


def _chain(repo: Repo, objective: Objective, tag: str, base: Row,
           keeps: list[Row]) -> list[Change]:
    """One commit per keep on the baseline's commit, each holding the tree that ran."""
    out: list[Change] = []
    parent, before = base.commit_sha or "", base
    for n, row in enumerate(keeps, 1):
        # The candidate commit is what ran; its kept commit on overnight/<tag> has the same
        # tree on another parent.
        tree = repo.tree_of(row.commit_sha or row.kept_commit or "")
        commit = repo.commit_tree(tree, parent, _message(objective, tag, n, row, before),
                                  when=_when(row))
        out.append(Change(n, row, before, tree, commit))
        parent, before = commit, row
    return out


def _tip_notes(repo: Repo, tag: str, keeps: list[Row]) -> list[str]:
    """Does overnight/<tag> end where the ledger's last keep does? Say why not."""
    last = keeps[-1]
    tip = repo.ref(branch_ref(tag))
    if tip is None:
        return [f"the branch overnight/{tag} is gone; the final branch is built from the "
                "ledger's commits, which git still has"]
    if repo.tree_of(tip) == repo.tree_of(last.commit_sha or ""):  # the kept commit's tree
        return []
    earlier = {r.kept_commit: r for r in keeps}
    if tip in earlier:
        return [f"overnight/{tag} is at the keep of #{earlier[tip].id}, not at the last one "
                f"(#{last.id}): a loop stopped between recording a keep and moving the "
                "branch (the next `overnight run` moves it); the final branch follows the "
                "ledger"]
    return [f"overnight/{tag} is at {tip[:10]}, a commit the ledger never recorded as a keep "
            f"(moved by hand, or by something else): the final branch follows the ledger, "
            f"whose last keep is #{last.id}; `git log overnight/{tag}` shows what is there"]


def _independent(repo: Repo, objective: Objective, tag: str, base: Row,
                 changes: list[Change], taken: Callable[[str], str | None]
                 ) -> tuple[list[Branch], dict[int, str]]:
    """A branch from the baseline per change that applies to it alone; why not for others."""
    base_commit = base.commit_sha or ""
    base_tree = repo.tree_of(base_commit)
    alone: dict[int, str] = {}  # change n -> its tree applied alone to the baseline
    branches: list[Branch] = []
    why: dict[int, str] = {}
    before = base_tree
    for c in changes:
        patch = repo.patch(before, c.tree)
        before = c.tree
        if not patch.strip():
            why[c.n] = "it changes no file against the change before it"
            continue
        tree = repo.apply_to(base_tree, patch)
        if tree is None:
            why[c.n] = _dependency(repo, changes, alone, c, patch)
            continue
        alone[c.n] = tree
        name = f"{PREFIX}{tag}-{c.n}-{slug(c.row.description)}"
        clash = taken(name)
        if clash:
            why[c.n] = clash
            continue
        message = _message(objective, tag, c.n, c.row, c.before, alone=True)
        commit = repo.commit_tree(tree, base_commit, message, when=_when(c.row))
        branches.append(Branch(name, commit, _subject(c.row), base_commit, c.n))
    return branches, why


def _dependency(repo: Repo, changes: list[Change], alone: dict[int, str], change: Change,
                patch: bytes) -> str:
    """Which earlier change a change that does not apply to the baseline alone needs: the
    latest one on whose lone branch it applies."""
    for k in range(change.n - 1, 0, -1):
        if k in alone and repo.apply_to(alone[k], patch) is not None:
            row = changes[k - 1].row
            return f"it builds on change {k} (#{row.id}: {_subject(row)})"
    return "it builds on earlier changes (no one of them alone is enough for it to apply)"


def _taken(tag: str, tags: set[str],
           found: dict[str, tuple[str, str | None]]) -> Callable[[str], str | None]:
    """Why a lone branch's name is not ours to use: another tag's final branch has it."""
    def why(name: str) -> str | None:
        other = name[len(PREFIX):]
        if other in tags:
            return f"its branch name {name} is the final branch of tag '{other}'"
        owner = found.get(name, ("", None))[1]
        if owner not in (None, tag):
            return f"its branch name {name} is taken by a branch of tag '{owner}'"
        return None
    return why


def _final_branches(repo: Repo) -> dict[str, tuple[str, str | None]]:
    """Branches under overnight-final/: name -> (commit, the tag whose finalize made it, or
    None for one it did not make: someone committed on it, or made it by hand)."""
    out = repo.git("for-each-ref", "--format=%(objectname) %(refname:strip=2)%00%(contents)%00",
                   f"refs/heads/{PREFIX}")
    parts = out.split("\0")
    found: dict[str, tuple[str, str | None]] = {}
    for head, message in zip(parts[0::2], parts[1::2], strict=False):
        sha, _, name = head.strip().partition(" ")
        lines = [line for line in message.splitlines() if line.strip()]
        m = _OWNER_LINE.fullmatch(lines[-1].strip()) if lines else None
        found[name] = (sha, m[1] if m else None)
    return found


# -- commit messages -----------------------------------------------------------


def slug(text: str) -> str:
    """A branch-name form of a description: lowercase, [a-z0-9-], at most 40 characters."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40].rstrip("-") or "change"


def _subject(row: Row) -> str:
    return _one_line(row.description) or f"experiment #{row.id}"


def _one_line(text: str) -> str:
    """Text from a proposer, as one line with nothing a terminal acts on."""
    return " ".join(printable(text).split())


def _when(row: Row) -> float:
    """A commit's date: when its experiment was decided, so the same ledger makes the same
    commits."""
    return row.finished_at or row.created_at


def _message(objective: Objective, tag: str, n: int, row: Row, before: Row,
             alone: bool = False) -> str:
    """The description, then what the change is and measured; trailers last (the last one
    names the tag: proposer text is folded into paragraphs, so it cannot end the message)."""
    was = "the baseline" if before.is_baseline else f"kept improvement {n - 1}"
    body = [f"Kept improvement {n} of tag {tag}: experiment #{row.id}, proposed by "
            f"{_one_line(row.proposer) or 'an unnamed proposer'}."]
    if row.hypothesis:
        body.append(textwrap.fill(f"Hypothesis: {_one_line(row.hypothesis)}", 72))
    measured = [f"Measured: {fmt_value(objective, row)}",
                f"Before it: {fmt_value(objective, before)} (#{before.id}, {was})",
                f"Delta: {_delta(objective, row, before)}"]
    body.append("\n".join(measured))
    if alone:
        body.append(textwrap.fill(
            f"This branch holds change {n} alone, applied to the baseline. " + (
                "It was measured exactly so." if n == 1 else
                f"It was measured on top of {_earlier(n)}, not alone: alone it is "
                "untested."), 72))
    trailers = [f"Overnight-Tag: {tag}", f"Overnight-Experiment: {row.id}",
                f"Overnight-Candidate: {row.commit_sha}", f"{OWNER}: {tag}"]
    return "\n\n".join([_subject(row), *body, "\n".join(trailers)]) + "\n"


def _earlier(n: int) -> str:
    return "kept improvement 1" if n == 2 else f"kept improvements 1 to {n - 1}"


def _delta(objective: Objective, row: Row, before: Row) -> str:
    """The change in the objective, with the standard error of the difference when the
    judge recorded one for both values."""
    if row.value is None or before.value is None:
        return "unknown: a value is missing"
    pct = judge.improvement_pct(objective, before.value, row.value)
    text = (f"{objective.metric} {row.value - before.value:+.6f} "
            f"({pct:+.2f}% {'improvement' if pct >= 0 else 'worse'})")
    if row.spread is not None and before.spread is not None:
        text += f" ± {math.hypot(row.spread, before.spread):.2g} (standard error)"
    return text


# -- writing the branches ------------------------------------------------------


def check(repo: Repo, plan: Plan, force: bool) -> None:
    """Refuse (ConfigError) to replace what a finalize made before, unless `force`; never
    move a branch that is checked out."""
    differing = plan.differing()
    if differing and not force:
        shown = ", ".join(f"{n} (at {plan.existing.get(n) or plan.stale[n]})"
                          for n in differing)
        raise ConfigError(
            f"tag '{plan.tag}' was finalized before, and these branches differ from what "
            f"finalizing it now makes (a keep since, or a commit on them): {shown}. They are "
            "left alone: review them, or run again with --force to replace them (the "
            "commits they are at are listed here: `git branch NAME COMMIT` brings one back)")
    out = _checked_out(repo)
    busy = [n for n in differing if n in out]
    if busy:
        raise ConfigError(
            f"{', '.join(busy)} is checked out ({', '.join(out[n] for n in busy)}): check out "
            "another branch there first; finalize never touches a working tree")


def _checked_out(repo: Repo) -> dict[str, str]:
    """Branches checked out in any worktree of the repository: name -> its directory."""
    out: dict[str, str] = {}
    where = ""
    for line in repo.git("worktree", "list", "--porcelain").splitlines():
        if line.startswith("worktree "):
            where = line[len("worktree "):]
        elif line.startswith("branch refs/heads/"):
            out[line[len("branch refs/heads/"):]] = where
    return out


def write(repo: Repo, plan: Plan) -> tuple[list[Written], dict[str, str]]:
    """Move every branch of the plan in one update-ref transaction (all or none): what each
    became, and the stale branches deleted (name -> the commit it was at). `check` first."""
    written: list[Written] = []
    commands: list[str] = []
    for b in plan.branches:
        ref, was = f"refs/heads/{b.name}", plan.existing.get(b.name)
        if was == b.commit:
            written.append(Written(b, "unchanged", was))
        elif was is None:
            written.append(Written(b, "created"))
            commands.append(f"create {ref} {b.commit}")
        else:
            written.append(Written(b, "replaced", was))
            commands.append(f"update {ref} {b.commit} {was}")
    commands += [f"delete refs/heads/{name} {sha}" for name, sha in plan.stale.items()]
    if commands:
        repo.git("update-ref", "-m", "overnight finalize", "--stdin",
                 input="".join(c + "\n" for c in commands).encode())
    return written, dict(plan.stale)


def describe(plan: Plan, written: list[Written], removed: dict[str, str],
             objective: Objective) -> list[str]:
    """What finalize made, each branch with its commit, subject and how to review it."""
    base = plan.base.commit_sha or ""
    n = len(plan.changes)
    lines = [f"tag {plan.tag}: {n} kept improvement{'s' if n != 1 else ''} on its baseline "
             f"#{plan.base.id} ({fmt_value(objective, plan.base)}, commit {base[:10]})"]
    for w in written:
        b = w.branch
        state = w.state + (f", was {w.was[:10]}" if w.state == "replaced" and w.was else "")
        if b.change is None:
            lines.append(f"{b.name} ({state}) at {b.commit[:10]}: the {n} change"
                         f"{'s' if n != 1 else ''} in order, one commit each")
            for c in plan.changes:
                lines.append(f"  {c.n}. {c.commit[:10]} {_subject(c.row)} "
                             f"(#{c.row.id}; {_delta(objective, c.row, c.before)})")
            lines.append(f"  review: git log -p --reverse {base[:10]}..{b.name}")
        else:
            lines.append(f"{b.name} ({state}) at {b.commit[:10]}: change {b.change} alone: "
                         f"{b.subject}")
            lines.append(f"  review: git show {b.name}")
    for k, why in sorted(plan.alone.items()):
        row = plan.changes[k - 1].row
        lines.append(f"change {k} (#{row.id}: {_subject(row)}) has no branch of its own: {why}")
    for name, sha in removed.items():
        lines.append(f"{name} deleted (--force): it was at {sha[:10]}, from an earlier "
                     "finalize; `git branch NAME COMMIT` brings it back")
    lines.append(f"nothing was pushed; to share a branch: git push <remote> {PREFIX}{plan.tag}")
    return lines


# -- --verify N ------------------------------------------------------------------


@dataclass(frozen=True)
class Gain:
    """The final tree against the baseline, measured again side by side."""

    final: tuple[float, ...]
    base: tuple[float, ...]
    gain: float  # how much better the final tree is, in metric units (positive: better)
    pct: float
    se: float | None  # its standard error; None with one run on each side
    low: float | None  # the interval at `confidence`, two-sided
    high: float | None
    confidence: float
    exact: bool = False  # repeats measured exactly the same: a deterministic objective
    failed: tuple[str, ...] = ()  # runs that gave no number, and why

    def summary(self) -> dict[str, object]:
        """The numbers the ledger records (the runs' values are recorded beside them)."""
        return {"gain": self.gain, "pct": self.pct, "se": self.se,
                "interval": [self.low, self.high], "confidence": self.confidence,
                "exact": self.exact}


def gain(objective: Objective, confidence: float, final: tuple[float, ...],
         base: tuple[float, ...]) -> Gain:
    """The mean gain and its standard error, from the noise pooled over both sides (the
    judge's robust pooling) with Student's t for the interval."""
    mean_f, mean_b = sum(final) / len(final), sum(base) / len(base)
    better = mean_b - mean_f if objective.direction == "lower" else mean_f - mean_b
    noise = judge.Noise()
    noise.set(0, final)
    noise.set(1, base)
    pct = judge.improvement_pct(objective, mean_b, mean_f)
    if noise.sigma is None:
        return Gain(final, base, better, pct, None, None, None, confidence)
    if noise.exact:
        return Gain(final, base, better, pct, 0.0, better, better, confidence, exact=True)
    se = noise.sigma * math.sqrt(1 / len(final) + 1 / len(base))
    half = judge.t_quantile(1 - (1 - confidence) / 2, max(noise.df, 1)) * se
    return Gain(final, base, better, pct, se, better - half, better + half, confidence)


def verify(ws: Workspace, ledger: Ledger, plan: Plan, n: int, console: Console,
           note: Callable[[str], None]) -> Gain:
    """Run the final tree and the baseline `n` times each, alternating, on the slots of one
    hardware class, each run built exactly as the loop builds its runs (same box, budget,
    data and evaluator); record the numbers as a `finalize_verify` event."""
    # The loop's own request builder and tag lock: the runs are the loop's runs, minus
    # the judging; while they run no loop may run the tag (it would share the slots).
    from overnight import sandbox
    from overnight.scheduler import Loop, _TagLock
    from overnight.session import _executor, runs_root

    spec = ws.spec
    _note_spec_change(ledger, plan.tag, ws, note)
    box = sandbox.resolve(spec.run.sandbox)
    with _TagLock(ws.state, plan.tag):
        executor, where = _executor(spec, spec.run, None, console)
        try:
            loop = Loop(ws.repo, spec, ledger, executor, plan.tag, lambda files: None,
                        runs_root=runs_root(ws, box), data=ws.data())
            loop._adopt(ledger.experiments(plan.tag))  # the baseline: an evaluator's tree
            loop.data.start(False, note, True)
            note(f"verifying: the final tree (#{plan.final.row.id}) and the baseline "
                 f"(#{plan.base.id}), {n} runs each, alternating, on {where}, budget "
                 f"{spec.run.budget_seconds:g}s, isolation {box}")
            values, failed = _runs(loop, executor, plan, n)
        except BaseException:
            executor.cancel_all()
            raise
        finally:
            executor.shutdown()
    record = {"runs": n, "failed": failed,
              "final": {"experiment": plan.final.row.id, "commit": plan.final.row.commit_sha,
                        "values": values["final"]},
              "base": {"experiment": plan.base.id, "commit": plan.base.commit_sha,
                       "values": values["base"]}}
    if not values["final"] or not values["base"]:
        ledger.event(plan.tag, VERIFY_EVENT, json.dumps(record, sort_keys=True))
        side = "final tree" if not values["final"] else "baseline"
        raise ConfigError(f"--verify: no run of the {side} gave a number ({'; '.join(failed)})")
    result = replace(gain(spec.objective, spec.judge.confidence, tuple(values["final"]),
                          tuple(values["base"])), failed=tuple(failed))
    ledger.event(plan.tag, VERIFY_EVENT, json.dumps({**record, **result.summary()},
                                                    sort_keys=True))
    return result


def _runs(loop: Loop, executor: Executor, plan: Plan,
          n: int) -> tuple[dict[str, list[float]], list[str]]:
    """The verify runs, `n` of each side, alternating over the free slots of one class."""
    classes = executor.slot_classes
    hw = loop.spec.hardware
    cls = hw.confirm or hw.reference or classes[0]
    free = [s for s, c in enumerate(classes) if c == cls] or [0]
    order = [side for _ in range(n) for side in ("final", "base")]
    rows = {"final": plan.final.row, "base": plan.base}
    values: dict[str, list[float]] = {"final": [], "base": []}
    failed: list[str] = []
    pending: dict[Future[RunResult], tuple[str, int, RunRequest]] = {}
    k = 0
    while order or pending:
        while order and free:
            side, slot = order.pop(0), free.pop(0)
            k += 1
            # A negative id: the run is no experiment of the ledger.
            req = loop._request(replace(rows[side], id=-k),
                                loop.runs_root / plan.tag / f"verify-{k}", slot)
            pending[executor.submit(req)] = (side, slot, req)
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            side, slot, req = pending.pop(future)
            free = sorted([*free, slot])
            _measured(loop, side, req, future.result(), values, failed)
    return values, failed


def _measured(loop: Loop, side: str, req: RunRequest, result: RunResult,
              values: dict[str, list[float]], failed: list[str]) -> None:
    loop.data.after_run()
    if result.tampered:
        raise IntegrityHalt(f"--verify: a run of the {side} was tampered with: "
                            f"{result.tampered}; its log is {req.log_path}")
    run = judge.outcome(result, loop.spec.objective.metric)
    if run.value is not None and run.status == "ok":
        values[side].append(run.value)
    else:
        failed.append(f"a run of the {side}: {run.status}, "
                      f"{run.reason or run.why_none or 'no number'} (log {req.log_path})")
    if loop.spec.run.keep_workdirs != "all":
        shutil.rmtree(req.workdir, ignore_errors=True)


def _note_spec_change(ledger: Ledger, tag: str, ws: Workspace,
                      note: Callable[[str], None]) -> None:
    """Both sides run under today's overnight.toml: say so when it measures differently
    from when the tag's baseline ran."""
    from overnight.pins import pinned_spec, spec_record

    pinned = pinned_spec(ledger, tag)
    if pinned is None:
        return
    was, now = pinned["measure"], spec_record(ws.spec)["measure"]
    changed = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
    if changed:
        note(f"overnight.toml measures differently now than when tag '{tag}' ran "
             f"({', '.join(changed)}): both sides run under today's settings, so they compare "
             "with each other, not with the numbers of the night")


def describe_gain(objective: Objective, plan: Plan, g: Gain) -> list[str]:
    """The verified gain: the means, the gain ± its standard error and its interval; the
    runs that gave no number."""
    runs = f"{len(g.final)} runs of the final tree, {len(g.base)} of the baseline"
    mean_b, mean_f = sum(g.base) / len(g.base), sum(g.final) / len(g.final)
    text = (f"verified: {objective.metric} {mean_b:.6f} (baseline #{plan.base.id}) -> "
            f"{mean_f:.6f} (final #{plan.final.row.id}): gain {g.gain:+.6f} ({g.pct:+.2f}%)")
    if g.exact:
        text += f", exactly: repeats measure the same ({runs})"
    elif g.se is None:
        text += f", with no uncertainty from one run each ({runs}): use --verify 2 or more"
    else:
        text += (f" ± {g.se:.2g} (standard error; {g.confidence:.0%} interval "
                 f"{g.low:+.6f} to {g.high:+.6f}; {runs})")
        if g.low is not None and g.low <= 0:
            text += f": not distinguishable from no gain at {g.confidence:.0%}"
    return [text, *(f"  no number from {why}" for why in g.failed)]
