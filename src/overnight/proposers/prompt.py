"""What a model sees: the research instructions, the objective, the files, the history.

`build_messages` writes a chat model's system prompt and first user message; `task_prompt`
writes one prompt for a coding agent that edits files in place. Both are pure functions of
the Context, so a restarted loop asks exactly what the old one would have.

The prompt has to fit the model's context window. The editable files and program.md are
never cut (a model cannot edit what it cannot see); the history is: the oldest experiments go
first, then the log tails of failed runs get shorter, then the rest of the history goes, down
to the baseline and the incumbent. Read-only files (protected, `[files] context`) come after
the editable ones and are cut last: the largest are cut to a common length, as long as fits,
each with a marker saying how much is left out. A coding agent is only told their names: it
reads them in its checkout.

A program.md written for a stand-alone agent (make a branch, commit, run the script, log
results.tsv, loop forever) contradicts the harness, which owns all of that: the harness's
contract comes first (the system prompt or the agent's rules say it wins over program.md and
name what is void, then a note before the program names what this one asks for), and wins.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Protocol

from overnight.errors import ConfigError
from overnight.proposers.base import Context, Experiment
from overnight.regions import RegionError, regions
from overnight.status import ACTIVE, Status
from overnight.status import FAILED as STATUS_FAILED
from overnight.tree import SYMLINK, Tree

CHARS_PER_TOKEN = 3.5  # a rough average for English and code across common tokenizers
BEST_FEW = 5  # best experiments shown in detail
RECENT = 10  # most recent experiments shown in detail
MIN_RECENT = 3  # kept while log tails are shortened; dropped only as a last resort
TAIL_FULL = 3000  # characters of a failed run's log tail, before trimming
TAIL_SHORT = 600
AGENT_PROMPT_CHARS = 100_000  # Linux caps one argv string at 128 KiB
IN_FLIGHT = ACTIVE
FAILED = STATUS_FAILED | {Status.TAMPERED, Status.LOST}
WITH_LOG = STATUS_FAILED


class Limits(Protocol):
    """What the prompt may use: `[llm]` in the spec has both fields."""

    @property
    def context_tokens(self) -> int: ...

    @property
    def max_tokens(self) -> int: ...


@dataclass(frozen=True)
class PromptLimits:
    context_tokens: int
    max_tokens: int


class PromptTooLarge(ConfigError):
    """Even without any history, the prompt does not fit the model's context window."""


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


# --- chat models ----------------------------------------------------------------------------


def build_messages(ctx: Context, limits: Limits, reserve_tokens: int = 0) -> tuple[str, str]:
    """(system, user) for a chat model, together within `limits.context_tokens - max_tokens`
    (less `reserve_tokens`, room kept for a follow-up exchange). Raises PromptTooLarge when the
    files and program.md alone do not fit."""
    system = system_prompt(ctx)
    budget = limits.context_tokens - limits.max_tokens - reserve_tokens
    max_chars = int((budget - estimate_tokens(system)) * CHARS_PER_TOKEN)
    builder = _Builder(ctx, task=_llm_task(ctx))
    user = builder.fit(max_chars)
    if user is None:
        need = estimate_tokens(system) + estimate_tokens(builder.render(builder.total, 0))
        raise PromptTooLarge(
            f"the prompt needs about {need} tokens even without any history (the editable "
            f"files, program.md, the user's notes and the running experiments are never cut), "
            f"but [llm] context_tokens ({limits.context_tokens}) - max_tokens "
            f"({limits.max_tokens}) leaves {budget}: raise [llm] context_tokens if the model "
            "allows it, lower [llm] max_tokens, or make fewer or smaller files editable"
        )
    return system, user


def system_prompt(ctx: Context) -> str:
    example = next(iter(sorted(ctx.files)), "train.py")
    metric = ctx.metric or "the metric"
    program = f"\n{PROGRAM_RULE}" if ctx.program.strip() else ""
    return f"""\
You are the research proposer of overnight, a harness that runs an autonomous research loop.
Each time you are asked, you propose ONE experiment: a change to the editable files. The
harness commits your change on top of the incumbent (the best version so far), runs it for a
fixed time budget, reads {metric} from its output, and keeps the change only if {metric} really
improves. Then it asks you again, with every result so far. You do not run anything yourself:
your answer is the experiment.

Rules:
- Change only the editable files. Protected files, and protected regions of editable files
  (the lines from `# overnight: protect` to `# overnight: end`), must stay exactly as they
  are: an answer that touches them is rejected.
- One idea per experiment, so that its effect can be attributed. Do not repeat an experiment
  that was already tried, or one that is queued or running.
- The code must still run within the budget and print {metric} as before: a crash wastes a run.
- Statuses: keep = better, kept; discard = ran, not better; crash = failed or printed no
  metric; timeout = ran past the hard limit; rejected = never ran (the edit was invalid);
  tampered = changed what it was not allowed to; lost = the worker vanished.{program}

Answer in exactly this format:

Hypothesis: <one sentence: what you change and why you expect {metric} to improve>
Description: <a short summary of the change, like a commit message, under 80 characters>

{example}
<<<<<<< SEARCH
<lines copied exactly from the current file>
=======
<the new lines>
>>>>>>> REPLACE

Put the file's path on its own line right before `<<<<<<< SEARCH`. The SEARCH part must
match the current file character for character (indentation and comments too) and match
exactly one place: keep it short, the lines you change plus a line or two around them. Use
one block per place you change, in file order. An empty REPLACE part deletes the lines.
Instead of SEARCH/REPLACE blocks you may give a unified diff in a ```diff fence
(`--- a/{example}`, `+++ b/{example}`, `@@` hunks with context lines). Write nothing after
the last block."""


def _llm_task(ctx: Context) -> str:
    metric = f"`{ctx.metric}`" if ctx.metric else "the metric"
    return (
        "## Your task\n\n"
        f"Propose the next experiment: one change to the editable files that you expect to "
        f"improve {metric} over the incumbent, and that differs from every experiment above "
        "and from those queued or running. Answer in the format of the system prompt: "
        "`Hypothesis:`, `Description:`, then SEARCH/REPLACE blocks."
    )


# The harness's contract over a user's program.md, stated with the rules (before the program).
PROGRAM_RULE = """\
- program.md (the research instructions that follow) is the user's guidance on what to try
  and what to respect. These rules win over it: its instructions to use git (branches,
  commits, resets), to run the script, to write results or logs (results.tsv, run.log), or
  to loop and never stop are void here, because the harness does all of that."""

_CONFLICTS = (  # (what it finds, its kind in a word, what the model is told)
    (re.compile(r"\bgit\s+(checkout|commit|reset|branch|switch|push|merge|rebase|stash)\b",
                re.I), "git", "git commands are void (the harness commits each proposal and "
                              "keeps or reverts it)"),
    (re.compile(r"(uv run|python3?)\s+[\w./-]+\.py[^\n]*(>|run\.log)|"
                r"\brun (the |each )?(experiment|training|script)\b", re.I),
     "running the script", "do not run the script (the harness runs and measures every "
                           "experiment)"),
    (re.compile(r"results\.tsv|\blog (the )?results\b|\brecord (the )?results\b", re.I),
     "recording results", "do not record results (the harness records every experiment in "
                          "its ledger)"),
    (re.compile(r"loop forever|never stop|indefinitely|until (you are|the human) "
                r"(manually )?(stop|interrupt)", re.I),
     "looping", "do not loop (you are asked for one experiment at a time)"),
)


def program_conflicts(text: str, kinds: bool = False) -> list[str]:
    """The loop instructions in a program.md that the harness's contract overrides: what
    the model is told about each kind found (`kinds`: the kinds, in a word or two). None for
    a program written for overnight."""
    return [kind if kinds else told for pattern, kind, told in _CONFLICTS
            if pattern.search(text)]


def readonly_texts(tree: Tree, paths: list[str]) -> dict[str, str | None]:
    """The text of each path that is a file of `tree` (a committed symlink followed while it
    stays inside the tree), None for one that is not UTF-8 text; a path that is no file
    there (missing, a directory, a link out of the tree) is left out."""
    out: dict[str, str | None] = {}
    for path in dict.fromkeys(paths):
        f = tree.resolve(path)
        if f is None or f.mode == SYMLINK:
            continue
        try:
            out[path] = f.data.decode("utf-8") if b"\0" not in f.data else None
        except UnicodeDecodeError:
            out[path] = None
    return out


def feedback(error: str) -> str:
    """The follow-up message after an unusable answer."""
    return (
        f"Your answer could not be used: {error}\n\n"
        "Answer again, fixing this. The files are unchanged: SEARCH text must match them as "
        "shown in my first message. Use the same format: `Hypothesis:`, `Description:`, then "
        "SEARCH/REPLACE blocks."
    )


# --- coding agents --------------------------------------------------------------------------


def task_prompt(ctx: Context, max_chars: int = AGENT_PROMPT_CHARS) -> str:
    """One prompt for a coding agent run in a checkout of the incumbent: edit the files in
    place, print `Hypothesis:` and `Description:` at the end. The files are included in full
    when they fit in `max_chars`; otherwise the agent reads them where it stands."""
    editable = ", ".join(sorted(ctx.files))
    program = f"\n{PROGRAM_RULE}" if ctx.program.strip() else ""
    head = f"""\
You are the research proposer of overnight, a harness that runs an autonomous research loop.
Your current directory holds the project at the incumbent (the best version so far). Make ONE
change to the editable files, editing them in place: {editable}. The harness then commits
your change, runs it for a fixed time budget, reads the metric from its output, and keeps it
only if the metric really improves.

Rules:
- Edit only the editable files ({editable}). Changes to any other file are discarded, new
  files included. Protected regions of editable files (the lines from
  `# overnight: protect` to `# overnight: end`) must stay exactly as they are: a change to
  them is rejected.
- One idea per experiment, different from everything already tried and from what is queued
  or running (listed below).
- Do not run the experiment itself: the harness runs and measures it. A quick syntax check
  is fine. Do not commit.{program}
- When you are done, print these two lines at the very end of your output:
  Hypothesis: <one sentence: what you changed and why you expect the metric to improve>
  Description: <a short summary of the change, under 80 characters>
"""
    task = (
        "## Your task\n\n"
        f"Edit {editable} in place to make the next experiment, then print the "
        "`Hypothesis:` and `Description:` lines."
    )
    for in_full in (True, False):
        builder = _Builder(ctx, task=task, files_in_full=in_full, readonly_in_full=False)
        body = builder.fit(max_chars - len(head) - 2)
        if body is not None:
            return head + "\n" + body
    builder = _Builder(ctx, task=task, files_in_full=False, readonly_in_full=False)
    return head + "\n" + builder.render(10**9, 0)


# --- the user message -----------------------------------------------------------------------


class _Builder:
    """Renders the user message with some of the history left out (oldest first)."""

    def __init__(self, ctx: Context, task: str, files_in_full: bool = True,
                 readonly_in_full: bool = True) -> None:
        self.ctx = ctx
        self.task = task
        self.files_in_full = files_in_full
        self.readonly_in_full = readonly_in_full  # else named only (an agent reads them)
        self.readonly_cap: int | None = None  # characters shown of each read-only file
        running = {e.id for e in ctx.in_flight}
        self.past = [e for e in ctx.history if e.status not in IN_FLIGHT and e.id not in running]
        self.baseline = next((e for e in self.past if e.is_baseline), None)
        anchors = {ctx.incumbent.id} | ({self.baseline.id} if self.baseline else set())
        rest = [e for e in self.past if e.id not in anchors]
        self.best = _best(rest, ctx.direction)
        best_ids = {e.id for e in self.best}
        self.recent = [e for e in rest[-RECENT:] if e.id not in best_ids]
        kept = best_ids | {e.id for e in rest[-MIN_RECENT:]}
        # What trimming drops, in order: old experiments first; the best few and the last
        # few only once the log tails are already short.
        self.order = [e.id for e in rest if e.id not in kept] + [e.id for e in rest
                                                                 if e.id in kept]
        self.soft = len(self.order) - len(kept)
        self.total = len(self.order)
        self.foot = "\n\n".join(s for s in (self._in_flight(), self._notes(), self._stuck(),
                                             task) if s)

    @property
    def head(self) -> str:
        return "\n\n".join(s for s in (self._program(), self._objective(), self._files(),
                                       self._readonly()) if s)

    def fit(self, max_chars: int) -> str | None:
        """The fullest message within max_chars, or None if nothing fits: the history is
        cut first, then the read-only files, the largest first: each is cut to the longest
        common length that fits (with the history then filling what room is left)."""
        self.readonly_cap = None
        found = self._fit_history(max_chars)
        longest = max((len(t) for t in self.ctx.readonly.values() if t), default=0)
        if found is not None or not longest or not self.readonly_in_full:
            return found
        lo, hi = 0, longest - 1  # the largest cap that fits, if any
        self.readonly_cap = 0
        if self._fit_history(max_chars) is None:
            self.readonly_cap = None
            return None
        while lo < hi:
            mid = (lo + hi + 1) // 2
            self.readonly_cap = mid
            if self._fit_history(max_chars) is not None:
                lo = mid
            else:
                hi = mid - 1
        self.readonly_cap = lo
        return self._fit_history(max_chars)

    def _fit_history(self, max_chars: int) -> str | None:
        stages = [(TAIL_FULL, 0, self.soft), (TAIL_SHORT, self.soft, self.soft),
                  (0, self.soft, self.soft), (0, self.soft, self.total)]
        for tail, lo, hi in stages:
            if len(self.render(hi, tail)) > max_chars:
                continue
            while lo < hi:  # the fewest experiments dropped that fit
                mid = (lo + hi) // 2
                if len(self.render(mid, tail)) <= max_chars:
                    hi = mid
                else:
                    lo = mid + 1
            return self.render(hi, tail)
        return None

    def render(self, dropped: int, tail: int) -> str:
        gone = set(self.order[:dropped])
        history = "\n\n".join(s for s in (self._standing(), self._results(gone, tail),
                                          self._hypotheses(gone)) if s)
        if gone:
            history += (f"\n\n({len(gone)} older experiments are left out here to fit the "
                        "context window.)")
        if self.ctx.omitted:
            history += (f"\n\n({self.ctx.omitted} older experiments are not shown: only the "
                        "most recent, the best and the kept ones are.)")
        return "\n\n".join(s for s in (self.head, history, self.foot) if s)

    # -- fixed sections ----------------------------------------------------------------

    def _program(self) -> str:
        if not self.ctx.program.strip():
            return ""
        head = "## Research instructions (program.md, from the user)\n\n"
        conflicts = program_conflicts(self.ctx.program)
        if conflicts:
            head += ("(These instructions were written for an agent that runs its own loop. "
                     "Here the harness owns that loop, and where the two disagree the harness "
                     f"wins: {'; '.join(conflicts)}. Read the rest as research guidance: what "
                     "to try, what to respect, what matters.)\n\n")
        return head + self.ctx.program.strip()

    def _objective(self) -> str:
        ctx = self.ctx
        metric = f"`{ctx.metric}`" if ctx.metric else "the metric"
        word = "Minimize" if ctx.direction == "lower" else "Maximize"
        better = "lower" if ctx.direction == "lower" else "higher"
        lines = [f"{word} {metric} ({better} is better). A change is kept only if it beats the "
                 f"incumbent by more than {ctx.min_delta:g} (min_delta). Δ below is an "
                 f"experiment's metric minus the incumbent's when it ran: "
                 f"{'negative' if better == 'lower' else 'positive'} is better."]
        if ctx.budget_seconds:
            lines.append(f"Each experiment runs for a fixed budget of {ctx.budget_seconds:g} s; "
                         "a change that makes it faster buys more work within the budget.")
        if ctx.hardware:
            lines.append(f"Hardware: {ctx.hardware}.")
        if ctx.slots > 1:
            lines.append(f"Up to {ctx.slots} experiments run at once.")
        return "## Objective\n\n" + "\n".join(lines)

    def _files(self) -> str:
        ctx = self.ctx
        title = f"## Editable files, as of the incumbent (commit {ctx.incumbent.commit[:12]})"
        parts = [title]
        for path in sorted(ctx.files):
            text = ctx.files[path]
            parts.append(f"### {path}")
            note = _protected_note(path, text)
            if note:
                parts.append(note)
            if self.files_in_full:
                parts.append(_fenced(path, text))
            else:
                n = len(text.splitlines())
                parts.append(f"({n} lines: too long to include here; read {path} in your "
                             "current directory.)")
        return "\n\n".join(parts)

    def _readonly(self) -> str:
        """Protected and context files: shown for reference (the evaluation, the budget the
        model must respect), never to be edited."""
        ctx = self.ctx
        names = sorted(set(ctx.protected) | set(ctx.readonly))
        if not names:
            return ""
        if not self.readonly_in_full:
            return self._readonly_names(names)
        parts = ["## Read-only files (for reference: never edit these; an answer that "
                 "changes a protected one is rejected)"]
        for path in names:
            text = ctx.readonly.get(path)
            kind = "protected" if path in ctx.protected else "context"
            if text is None:
                why = "not UTF-8 text" if path in ctx.readonly else "not a file at this commit"
                parts.append(f"### {path} ({kind}; {why}: not shown)")
                continue
            parts.append(f"### {path} ({kind}, read-only)")
            parts.append(_cut(path, text, self.readonly_cap))
        return "\n\n".join(parts)

    def _readonly_names(self, names: list[str]) -> str:
        """For an agent: the files are in its checkout, so their names are enough (those not
        at this commit are left out: there is nothing to read)."""
        ctx = self.ctx
        items = [f"- {path} ({'protected' if path in ctx.protected else 'context'})"
                 + (" (not UTF-8 text)" if ctx.readonly[path] is None else "")
                 for path in names if path in ctx.readonly]
        if not items:
            return ""
        return "\n".join(["## Read-only files", "",
                          "In your current directory, for reference: read them as you need, "
                          "never edit them (changes to them are discarded).", *items])

    def _in_flight(self) -> str:
        siblings = ""
        if self.ctx.siblings:
            siblings = (f"{self.ctx.siblings} other proposal(s) are being prepared at the same "
                        "time as this one, from the same information: the most obvious next "
                        "step is likely taken; choose a different direction.")
        if not self.ctx.in_flight:
            return f"## Proposed at the same time\n\n{siblings}" if siblings else ""
        lines = ["## Queued or running right now",
                 "",
                 "Propose something different from these: their results are not in yet."]
        for e in self.ctx.in_flight:
            line = f"- #{e.id} {e.status}: {e.description or '(no description)'}"
            if e.hypothesis:
                line += f" (hypothesis: {e.hypothesis})"
            lines.append(line)
        if siblings:
            lines += ["", siblings]
        return "\n".join(lines)

    def _stuck(self) -> str:
        if not self.ctx.stuck:
            return ""
        lines = [f"## You are stuck: the last {len(self.ctx.stuck)} ideas did not improve",
                 "",
                 "None of these beat the incumbent. Do not propose variations of them. Step "
                 "back and try a clearly different direction (another part of the script, "
                 "another kind of change), and say in the hypothesis why it should work where "
                 "these did not.", ""]
        lines += [f"- {_one_line(t)}" for t in self.ctx.stuck]
        return "\n".join(lines)

    def _notes(self) -> str:
        if not self.ctx.notes:
            return ""
        lines = ["## Notes from the user (sent while the loop runs; most recent last, and "
                 "the most recent wins where they disagree)", ""]
        lines += [f"- {_one_line(n)}" for n in self.ctx.notes]
        return "\n".join(lines)

    # -- history -----------------------------------------------------------------------

    def _standing(self) -> str:
        ctx = self.ctx
        inc = ctx.incumbent
        lines = ["## Where things stand", ""]
        if self.baseline is not None and self.baseline.id != inc.id:
            lines.append(f"- Baseline: #{self.baseline.id}, {self._metric(self.baseline)}")
        inc_line = f"- Incumbent (the best so far; your change applies to it): #{inc.id}, "
        inc_line += self._metric(inc)
        if inc.is_baseline:
            inc_line += " (the baseline: nothing has beaten it yet)"
        elif self.baseline is not None and inc.metric is not None and self.baseline.metric \
                is not None:
            inc_line += f", Δ {_delta(inc.metric - self.baseline.metric)} vs the baseline"
        lines.append(inc_line)
        if not inc.is_baseline:
            lines.append(f"  Description: {_one_line(inc.description)}")
            if inc.hypothesis:
                lines.append(f"  Hypothesis: {_one_line(inc.hypothesis)}")
        counts = dict(ctx.counts)  # the whole tag's, when the scheduler counted them
        if not counts:
            for e in self.past:
                if not e.is_baseline:
                    counts[e.status] = counts.get(e.status, 0) + 1
        if counts:
            summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            lines.append(f"- Finished experiments: {summary}")
        return "\n".join(lines)

    def _results(self, gone: set[int], tail: int) -> str:
        parts = []
        best = [e for e in self.best if e.id not in gone]
        recent = [e for e in self.recent if e.id not in gone]
        if best:
            parts.append("## Best other experiments\n\n"
                         + "\n".join(self._detail(e, tail) for e in best))
        if recent:
            parts.append("## Most recent experiments (oldest first)\n\n"
                         + "\n".join(self._detail(e, tail) for e in recent))
        return "\n\n".join(parts)

    def _detail(self, e: Experiment, tail: int) -> str:
        lines = [f"- #{e.id} {e.status}: {self._metric(e)}"
                 + (f", Δ {_delta(e.delta)}" if _finite(e.delta) else "")]
        lines.append(f"  Description: {_one_line(e.description) or '(none)'}")
        if e.hypothesis:
            lines.append(f"  Hypothesis: {_one_line(e.hypothesis)}")
        if e.reason:
            lines.append(f"  Reason: {_one_line(e.reason)}")
        ran = _runtime_differences(e)
        if ran:
            lines.append(f"  Ran with (differs from the proposed values): {ran}")
        if tail > 0 and e.status in WITH_LOG and e.log_tail.strip():
            text = e.log_tail.strip()
            if len(text) > tail:
                text = "..." + text[-tail:]
            lines.append("  Log tail:")
            lines += [f"    {line}" for line in text.splitlines()]
        return "\n".join(lines)

    def _hypotheses(self, gone: set[int]) -> str:
        lines = []
        for e in self.past:
            if e.is_baseline or e.id in gone:
                continue
            outcome = e.status
            if _finite(e.delta):
                outcome += f", Δ {_delta(e.delta)}"
            elif e.status in FAILED or e.status == "rejected":
                outcome += f": {_one_line(e.reason)[:100]}" if e.reason else ""
            said = _one_line(e.hypothesis) or f"(no hypothesis) {_one_line(e.description)}"
            lines.append(f"- #{e.id} [{outcome}] {said}")
        if not lines:
            return ""
        return "## Hypothesis log (every hypothesis tried, oldest first)\n\n" + "\n".join(lines)

    def _metric(self, e: Experiment) -> str:
        name = self.ctx.metric or "metric"
        if not _finite(e.metric):
            return f"{name} = none"
        return f"{name} = {e.metric:.6g}"


# --- helpers --------------------------------------------------------------------------------


def _best(experiments: list[Experiment], direction: str) -> list[Experiment]:
    measured = [e for e in experiments if e.status in ("keep", "discard") and _finite(e.metric)]
    sign = 1 if direction == "lower" else -1
    return sorted(measured, key=lambda e: sign * (e.metric or 0.0))[:BEST_FEW]


def _protected_note(path: str, text: str) -> str:
    try:
        spans = regions(text)
    except RegionError as e:
        return f"Note: the protect markers of {path} are broken ({e}); do not touch them."
    if not spans:
        return ""
    where = ", ".join(f"{a}-{b}" for a, b in spans)
    return (f"Protected in {path}: lines {where} (from `# overnight: protect` to "
            "`# overnight: end`, markers included). Do not change, move or remove these lines.")


def _fenced(path: str, text: str) -> str:
    # A fence longer than any run of backticks inside, so the file cannot close it early.
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    lang = "python" if path.endswith(".py") else ""
    body = text if text.endswith("\n") or not text else text + "\n"
    return f"{fence}{lang}\n{body}{fence}"


def _cut(path: str, text: str, cap: int | None) -> str:
    """The file fenced, cut after at most `cap` characters (at a line end where one is near),
    with a marker saying how much is left out."""
    if cap is None or len(text) <= cap:
        return _fenced(path, text)
    if cap == 0:
        return f"[all {len(text)} characters of {path} left out to fit the context window]"
    end = text.rfind("\n", 0, cap) + 1
    shown = text[:end] if end > cap // 2 else text[:cap]
    left = len(text) - len(shown)
    return (_fenced(path, shown) + f"\n[... {left} more characters of {path} left out to "
            "fit the context window ...]")


def _runtime_differences(e: Experiment) -> str:
    diffs = []
    for name, value in sorted(e.runtime_knobs.items()):
        proposed = e.knobs.get(name)
        if proposed is not None and proposed != value:
            diffs.append(f"{name}={value} (proposed {proposed})")
    return ", ".join(diffs)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _delta(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.4g}"


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)
