"""Human-readable views of the ledger: live progress, status, one experiment."""

from __future__ import annotations

import re
import time
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from overnight import judge
from overnight.ledger import Ledger, Row, keeps_in_order
from overnight.metrics import tail
from overnight.spec import Judge as JudgeSpec
from overnight.spec import Objective
from overnight.status import ACTIVE, NOT_COUNTED, Status
from overnight.text import printable

STATUS_STYLE = {
    "keep": "bold green", "discard": "yellow", "crash": "red", "timeout": "red",
    "tampered": "bold red", "rejected": "magenta", "checks_failed": "red", "lost": "dim",
    "running": "cyan", "queued": "dim", "confirm": "bold cyan", "repeat": "blue",
}


def fmt_metric(v: float | None) -> str:
    return "-" if v is None else f"{v:.6f}"


def _label(experiment_id: int) -> str:
    """`#12  `: the id in a column that stays aligned (one width up to #999, one past it)."""
    label = f"#{experiment_id}"
    return label.ljust(5) if experiment_id < 1000 else label.ljust(7)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def evidence(row: Row) -> str:
    """How well a row's value is known: "± 0.0011 (3 runs, noise σ 0.0019)"; "" for a value
    that rests on one run judged alone (greedy judging, or a first run)."""
    if row.spread == 0:
        return f"({_plural(max(row.runs, 1), 'run')}, exact: its repeats measure the same)"
    if row.runs <= 1 and row.spread is None:
        return ""
    plus = f"± {row.spread:.2g} " if row.spread is not None else ""
    noise = f", noise σ {row.noise:.2g}" if row.noise else ""
    return f"{plus}({_plural(row.runs, 'run')}{noise})"


def fmt_value(objective: Objective, row: Row) -> str:
    """"val_bpb 0.991200 ± 0.0011 (3 runs, noise σ 0.0019)": the row's value and its evidence."""
    shown = f"{objective.metric} {fmt_metric(row.value)}"
    more = evidence(row)
    return f"{shown} {more}" if more else shown


def fmt_delta(objective: Objective, row: Row, baseline: Row | None) -> str:
    if row.value is None or baseline is None or baseline.value is None or row.is_baseline:
        return ""
    pct = judge.improvement_pct(objective, baseline.value, row.value)
    return f"{pct:+.2f}% vs baseline"


def result_line(objective: Objective, row: Row, best: Row | None, baseline: Row | None,
                done: int, total: int | None) -> Text:
    """One progress line: a decided candidate, a confirm (it runs again) or a repeat run."""
    t = Text()
    t.append(_label(row.id), style="bold")
    t.append(f"{row.status:<9}", style=STATUS_STYLE.get(row.status, ""))
    if row.repeat_of is not None:
        t.append(f"repeat of #{row.repeat_of}: ")
        if row.metric is not None:
            t.append(f"{objective.metric} {row.metric:.6f}")
        else:
            t.append(f"{printable(row.reason)[:60]}", style="dim")
    elif row.status == Status.CONFIRM:
        t.append(f"{objective.metric} {fmt_metric(row.metric)} "
                 f"({_plural(max(row.runs, 1), 'run')}) looks better: running again")
        t.append(f"  {printable(row.description)[:70]}")
    elif row.value is not None:
        t.append(f"{fmt_value(objective, row)} ")
        t.append(f"{fmt_delta(objective, row, baseline):<20}", style="dim")
        if row.reason.startswith("constraint"):
            t.append(f" {printable(row.reason)[:70]}", style="yellow")
        elif row.status == Status.DISCARD and "within the noise" in row.reason:
            t.append(" (within the noise)", style="yellow")
        if "the edit changed nothing" in row.reason or "the edit did not reach" in row.reason:
            untested = row.reason.split("the edit ", 1)[1].rstrip(")")
            t.append(f" (the edit {printable(untested)[:70]})", style="yellow")
        t.append(f" {printable(row.description)[:70]}")
    else:
        if row.reason:
            t.append(f"{printable(row.reason)[:60]:<40} ", style="dim")
        t.append(f" {printable(row.description)[:70]}")
    if row.duration_s is not None:
        t.append(f"  {row.duration_s:.1f}s", style="dim")
    counter = f"{done}/{total}" if total else f"{done}"
    if best is not None and best.value is not None:
        t.append(f"  [{counter} runs, best {best.value:.6f}]", style="dim")
    return t


class ConsoleReporter:
    """Progress for `overnight run`: a live panel on a terminal, one line per event otherwise."""

    def __init__(self, console: Console, ledger: Ledger, objective: Objective, tag: str,
                 total: int | None):
        self.console = console
        self.ledger = ledger
        self.objective = objective
        self.tag = tag
        self.total = total
        self.running: dict[int, Row] = {}
        self.best: Row | None = None
        self.done = 0
        self.live: Live | None = None
        if console.is_terminal:
            self.live = Live(self._panel(), console=console, refresh_per_second=2,
                             transient=True, get_renderable=self._panel)

    def __enter__(self) -> ConsoleReporter:
        if self.live:
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.live.stop()

    def _baseline(self) -> Row | None:
        rows = [r for r in self.ledger.experiments(self.tag, statuses=("keep",)) if r.is_baseline]
        return rows[-1] if rows else None

    def _panel(self) -> Group:
        table = Table(box=None, show_header=True, header_style="dim", pad_edge=False)
        for col in ("id", "slot", "elapsed", "change"):
            table.add_column(col)
        now = time.time()
        for row in self.running.values():
            started = row.started_at or row.created_at
            table.add_row(f"#{row.id}", str(row.slot), f"{now - started:5.0f}s",
                          Text(printable(row.description)[:80]))
        counter = f"{self.done}/{self.total}" if self.total else str(self.done)
        best = fmt_metric(self.best.value) if self.best else "-"
        head = Text(f"overnight/{self.tag}: {counter} runs done, best "
                    f"{self.objective.metric} {best}, {len(self.running)} running", style="bold")
        return Group(head, table)

    def started(self, row: Row) -> None:
        self.running[row.id] = row.__class__(**{**row.__dict__, "started_at": time.time()})
        if not self.live:
            self.console.print(Text(f"{_label(row.id)}started  slot {row.slot}: "
                                    f"{printable(row.description)}", style="dim"))

    def finished(self, row: Row, best: Row | None, done: int) -> None:
        self.running.pop(row.id, None)
        self.best, self.done = best, done
        line = result_line(self.objective, row, best, self._baseline(), done, self.total)
        self.console.print(line)

    def note(self, text: str) -> None:
        self.console.print(Text(printable(text), style="yellow"))


def _counts(rows: list[Row]) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def how_to_read(spec: JudgeSpec | None, keep: bool = True) -> str:
    """What the numbers of the judge mean, in one line (`keep`: say what a keep means)."""
    if spec is not None and spec.mode == "greedy":
        return ("greedy judging: each keep beat its incumbent on one run, with no repeats and "
                "so no uncertainty")
    text = ("± is one standard error of the estimate (the mean of its runs; a candidate's first "
            "run only selected it and is left out)")
    if keep:
        confidence = f" at {spec.confidence:.0%} confidence" if spec is not None else ""
        text += f"; a keep beat its incumbent{confidence}"
    return text


def status_view(ledger: Ledger, tag: str, objective: Objective,
                judge_spec: JudgeSpec | None = None, reference: str | None = None) -> Group:
    """`overnight status`: runs and candidates, baseline, best, noise, what is in flight."""
    rows = ledger.experiments(tag)
    failed_starts = [r for r in rows if r.failed_start]
    rows = [r for r in rows if not r.failed_start]  # the tag is what came after them
    ran = [r for r in rows if r.status not in NOT_COUNTED]
    candidates = [r for r in ran if r.repeat_of is None]
    repeats = [r for r in ran if r.repeat_of is not None]
    uncounted = [r for r in rows if r.status in NOT_COUNTED - ACTIVE]
    baseline = next((r for r in reversed(rows) if r.is_baseline and r.status == "keep"), None)
    keeps = keeps_in_order(rows)
    best = keeps[-1] if keeps else None
    lines: list = [Text(f"tag {tag}: {_plural(len(ran), 'run')}: "
                        f"{_plural(len(candidates), 'candidate')}, "
                        f"{_plural(len(repeats), 'repeat')}", style="bold")]
    if failed_starts and baseline is None:
        last = failed_starts[-1]
        n = len(failed_starts)
        tries = f"{n} {'try' if n == 1 else 'tries'}"
        if any(r.status in ACTIVE for r in rows):
            said = f"not started: a fresh baseline is on its way ({tries} before it)"
        elif last.status == Status.LOST:
            said = f"not started: the baseline was interrupted ({tries}); run the same command"
        else:
            said = (f"not started: the baseline failed ({tries}); fix it and run the same "
                    "command again")
        lines.append(Text(f"  {said}", style="yellow"))
        lines.append(Text(f"    #{last.id} {last.status}: {printable(last.reason)[:300]} "
                          f"(`overnight show {last.id}` has its log)", style="yellow"))
    if candidates:
        lines.append(Text(f"  candidates  {_counts(candidates)}"))
    if repeats:
        lines.append(Text(f"  repeats     {_counts(repeats)}"))
    if uncounted:
        lines.append(Text(f"  not counted {_counts(uncounted)} (no run to count)", style="dim"))
    if baseline:
        lines.append(Text(f"  baseline    #{baseline.id}  {fmt_value(objective, baseline)}"))
    if best and baseline and best.id == baseline.id:
        lines.append(Text("  best        the baseline: no improvement kept yet"))
    elif best and baseline and best.value is not None and baseline.value is not None:
        pct = judge.improvement_pct(objective, baseline.value, best.value)
        lines.append(Text(f"  best        #{best.id}  {fmt_value(objective, best)}"
                          f"  ({pct:+.2f}% vs baseline, "
                          f"{_plural(len(keeps) - 1, 'kept improvement')})",
                          style="green"))
        lines.append(Text(f"  branch      overnight/{tag} at {(best.kept_commit or '')[:10]}"))
    lines.extend(_class_lines(rows, objective, baseline, best, reference))
    lines.extend(_noise_lines(rows, objective, judge_spec))
    lines.extend(_spend_lines(rows, len(keeps)))
    given_up = [r for r in rows if r.status == "lost" and r.reason.startswith("given up")]
    if given_up:
        lines.append(Text("  given up (never measured):", style="yellow"))
        for r in given_up:
            lines.append(Text(f"    #{r.id} {r.reason}: {r.description}", style="yellow"))
    confirming = [r for r in rows if r.status == Status.CONFIRM]
    if confirming:
        lines.append(Text("  confirming (looked better once, running again):"))
        for r in confirming:
            lines.append(Text(f"    #{r.id} {objective.metric} {fmt_metric(r.metric)} first, "
                              f"{_plural(max(r.runs, 1), 'run')} so far: "
                              f"{printable(r.description)}"))
    running = [r for r in rows if r.status == Status.RUNNING]
    if running:
        lines.append(Text("  running:"))
        now = time.time()
        for r in running:
            slot = f"slot {r.slot} " if r.slot is not None else ""
            since = f"{slot}{now - r.started_at:.0f}s" if r.started_at else "starting"
            lines.append(Text(f"    #{r.id} {since}: {printable(r.description)}"))
    queued = [r for r in rows if r.status == Status.QUEUED]
    if queued:
        lines.append(Text("  queued (waiting for a slot, not running):"))
        for r in queued:
            lines.append(Text(f"    #{r.id} {printable(r.description)}"))
    return Group(*lines)


def _class_lines(rows: list[Row], objective: Objective, baseline: Row | None,
                 best: Row | None, reference: str | None) -> list[Text]:
    """With several hardware classes, the baseline and the best on each: numbers compare
    only within a class; the reference class's are the ones to quote."""
    classes = list(dict.fromkeys(r.hw_class for r in rows if r.hw_class and r.metric is not None))
    if len(classes) < 2 or baseline is None:
        return []

    def on(row: Row, cls: str) -> str:
        values = [r.metric for r in rows if r.metric is not None and r.hw_class == cls
                  and (r.id == row.id or r.repeat_of == row.id)
                  and r.status in (Status.KEEP, Status.DISCARD, Status.CONFIRM,
                                   Status.REPEAT)]
        if not values:
            return "not measured yet"
        return f"{sum(values) / len(values):.6f} ({_plural(len(values), 'run')})"

    out = [Text("  classes     numbers compare only within a class"
                + (f"; {reference} is the reference" if reference else ""))]
    for cls in sorted(classes, key=lambda c: (c != reference, c)):
        line = f"    {cls:<10} baseline {on(baseline, cls)}"
        if best is not None and best.id != baseline.id:
            line += f", best #{best.id} {on(best, cls)}"
        out.append(Text(line, style="bold" if cls == reference else ""))
    return out


def _noise_lines(rows: list[Row], objective: Objective, spec: JudgeSpec | None) -> list[Text]:
    """The latest noise figure, and how to read the ± (when there is one to read)."""
    out: list[Text] = []
    measured = [r for r in rows if r.noise is not None]
    if measured:
        latest = max(measured, key=lambda r: (r.finished_at or 0.0, r.id))
        if latest.noise:
            out.append(Text(f"  noise       one run of {objective.metric} varies by σ "
                            f"{latest.noise:.2g} (pooled over every commit that ran twice)"))
        else:
            out.append(Text("  noise       none: repeats measure exactly the same, so each "
                            "candidate is judged on one run"))
    if any(r.spread for r in rows) or (spec is not None and spec.mode == "greedy"):
        out.append(Text(f"  reading     {how_to_read(spec)}", style="dim"))
    return out


def _spend_lines(rows: list[Row], keeps: int) -> list[Text]:
    tokens_in = sum(r.tokens_in for r in rows)
    tokens_out = sum(r.tokens_out for r in rows)
    if not (tokens_in or tokens_out):
        return []
    cost = sum(r.cost_usd for r in rows)
    improvements = max(keeps - 1, 0)
    per = (f"{(tokens_in + tokens_out) / improvements:,.0f} tokens, ${cost / improvements:.2f}"
           f" per kept improvement" if improvements else "no kept improvement yet")
    return [Text(f"  proposer    {tokens_in:,} tokens in, {tokens_out:,} out, ${cost:.2f}; {per}")]


def hypotheses_view(rows: list[Row], objective: Objective) -> Table:
    """Every hypothesis tried, what came of it and the measured delta."""
    table = Table(box=None, header_style="dim", pad_edge=False)
    for col in ("id", "status", f"delta {objective.metric}", "hypothesis", "change"):
        table.add_column(col, overflow="fold")
    for r in rows:
        if r.is_baseline or not (r.hypothesis or r.description):
            continue
        delta = f"{r.delta:+.6f}" if r.delta is not None else "-"
        table.add_row(f"#{r.id}", Text(r.status, style=STATUS_STYLE.get(r.status, "")), delta,
                      Text(printable(r.hypothesis) or "-"), Text(printable(r.description)))
    return table


_WAVE = re.compile(r"^grid wave #(\d+): vary (.+) around the incumbent$")


def wave_effects(rows: list[Row], objective: Objective, only: int | None = None) -> list[str]:
    """The main effects of each complete grid wave: for each knob it varied, the mean of the
    objective at each of its levels (over the other knob's levels), and the best level."""
    waves: dict[int, tuple[list[str], list[Row]]] = {}
    for r in rows:
        m = _WAVE.match(r.hypothesis or "")
        if m and r.repeat_of is None and not r.is_baseline:
            waves.setdefault(int(m[1]), (m[2].split(" and "), []))[1].append(r)
    out = []
    for n, (knobs, members) in sorted(waves.items()):
        if only is not None and n != only:
            continue
        if any(r.status in ACTIVE or r.status == Status.CONFIRM for r in members):
            continue  # not complete yet
        measured = [r for r in members if r.value is not None]
        parts = []
        for k in knobs:
            levels: dict[float, list[float]] = {}
            for r in measured:
                v = r.knobs.get(k)
                if isinstance(v, (int, float)):
                    levels.setdefault(v, []).append(r.value)  # type: ignore[arg-type]
            if len(levels) < 2:
                continue
            means = {v: sum(xs) / len(xs) for v, xs in levels.items()}
            pick = min if objective.direction == "lower" else max
            best = pick(means, key=lambda v: means[v])
            shown = ", ".join(f"{v:g} -> {m:.6g}" for v, m in sorted(means.items()))
            parts.append(f"{k}: {shown} (best {best:g})")
        effects = "; ".join(parts) or "too few runs measured to say"
        out.append(f"wave #{n} ({len(measured)} of {len(members)} measured), main effects on "
                   f"{objective.metric}: {effects}")
    return out


def _measured(row: Row, objective: Objective, repeats: list[Row],
              spec: JudgeSpec | None) -> list[Text]:
    """show's lines about the measurement: the value and its evidence, every run, how to
    read them."""
    delta = f"  (delta {row.delta:+.6f})" if row.delta is not None else ""
    more = "" if row.repeat_of is not None else evidence(row)
    value = row.metric if row.repeat_of is not None else row.value
    out = [_safe(f"  {objective.metric:<12} {fmt_metric(value)}{' ' + more if more else ''}"
                 f"{delta}")]
    if repeats:
        left_out = not row.is_baseline and row.spread != 0
        first = "first, left out of the estimate" if left_out else "first"
        runs = [f"#{row.id} {fmt_metric(row.metric)} ({first})"]
        runs += [f"#{r.id} " + (fmt_metric(r.metric) if r.status == Status.REPEAT else r.status)
                 for r in repeats]
        out.append(_safe(f"  runs         {', '.join(runs)}"))
    if more and row.spread:
        reading = how_to_read(spec, keep=row.status == Status.KEEP and not row.is_baseline)
        out.append(_safe(f"  reading      {reading}", style="dim"))
    return out


def _safe(text: str, style: str = "") -> Text:
    """A line of show's output: every field in it may come from the experiment or a model."""
    return Text(printable(text), style=style)


def show_view(row: Row, objective: Objective, diff: str, log_lines: int = 20, *,
              candidate: Row | None = None, repeats: list[Row] | None = None,
              judge_spec: JudgeSpec | None = None) -> Group:
    """`overnight show ID`. `candidate`: the row a repeat run measured again; `repeats`: a
    candidate's (or the baseline's) further runs."""
    out: list = []
    out.append(_safe(f"experiment #{row.id} ({row.tag})", style="bold"))
    out.append(_safe(f"  status       {row.status}", style=STATUS_STYLE.get(row.status, "")))
    if row.repeat_of is not None:
        of = f" ({candidate.status}: {candidate.description})" if candidate else ""
        out.append(_safe(f"  repeat of    #{row.repeat_of}{of}"))
    if row.reason:
        out.append(_safe(f"  reason       {row.reason}"))
    out.append(_safe(f"  description  {row.description}"))
    if row.hypothesis:
        out.append(_safe(f"  hypothesis   {row.hypothesis}"))
    out.append(_safe(f"  commit       {row.commit_sha or '-'} (parent {(row.parent or '-')[:10]})"))
    if row.kept_commit and not row.is_baseline:
        out.append(_safe(f"  kept as      {row.kept_commit} on overnight/{row.tag}"))
    out.extend(_measured(row, objective, repeats or [], judge_spec))
    if row.metrics:
        shown = ", ".join(f"{k}={v:g}" for k, v in row.metrics.items())
        out.append(_safe(f"  metrics      {shown}"))
    if row.knobs:
        out.append(_safe("  knobs        " + ", ".join(f"{k}={v}" for k, v in row.knobs.items())))
    if row.runtime_knobs:
        shown = ", ".join(f"{k}={v}" for k, v in row.runtime_knobs.items())
        out.append(_safe(f"  ran with     {shown}"))
    integrity = row.integrity or {}
    if integrity.get("problems"):
        for problem in integrity["problems"]:
            out.append(_safe(f"  TAMPERED     {problem}", style="bold red"))
    elif integrity:
        outputs = integrity.get("n_outputs", 0)
        out.append(_safe(f"  integrity    what ran is what was committed ({outputs} output "
                        "file(s) written)", style="green"))
    for note in integrity.get("notes", []):
        out.append(_safe(f"  note         {note}", style="yellow"))
    if integrity.get("watch_unavailable"):
        out.append(_safe(f"  note         live watch: {integrity['watch_unavailable']}",
                        style="yellow"))
    if integrity.get("sandbox"):
        out.append(Text(f"  isolation    {integrity['sandbox']}",
                        style="yellow" if integrity["sandbox"] == "none" else ""))
    withheld = integrity.get("withheld_env") or []
    if withheld and row.status in ("crash", "timeout"):
        out.append(Text(f"  withheld     {len(withheld)} of your variables were not passed to "
                        "the run (add a name to [run] allow_env to pass it): "
                        + ", ".join(withheld), style="yellow"))
    if row.tokens_in or row.tokens_out:
        out.append(_safe(f"  proposer     {row.proposer}: {row.tokens_in:,} tokens in, "
                        f"{row.tokens_out:,} out, ${row.cost_usd:.4f}"))
    if row.duration_s is not None:
        mem = f"{row.memory_gb:.2f} GB" if row.memory_gb is not None else "-"
        out.append(_safe(f"  timings      ran {row.duration_s:.1f}s, exit {row.returncode}, "
                        f"memory {mem}, slot {row.slot}, {row.hardware}"))
    if row.log_path:
        out.append(_safe(f"  log          {row.log_path}"))
    if diff:
        out.append(_safe("--- diff against parent ---", style="dim"))
        out.append(_safe(diff))
    if row.log_path and Path(row.log_path).exists():
        out.append(_safe(f"--- last {log_lines} lines of the log ---", style="dim"))
        out.append(_safe(tail(Path(row.log_path), log_lines)))
    return Group(*out)
