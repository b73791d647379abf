"""Human-readable views of the ledger: live progress, status, one experiment."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from overnight import judge
from overnight.ledger import Ledger, Row
from overnight.metrics import tail
from overnight.spec import Objective
from overnight.text import printable

STATUS_STYLE = {
    "keep": "bold green", "discard": "yellow", "crash": "red", "timeout": "red",
    "tampered": "bold red", "rejected": "magenta", "checks_failed": "red", "lost": "dim",
    "running": "cyan", "queued": "dim",
}


def fmt_metric(v: float | None) -> str:
    return "-" if v is None else f"{v:.6f}"


def fmt_delta(objective: Objective, row: Row, baseline: Row | None) -> str:
    if row.metric is None or baseline is None or baseline.metric is None or row.is_baseline:
        return ""
    pct = judge.improvement_pct(objective, baseline.metric, row.metric)
    return f"{pct:+.2f}% vs baseline"


def result_line(objective: Objective, row: Row, best: Row | None, baseline: Row | None,
                done: int, total: int | None) -> Text:
    t = Text()
    t.append(f"#{row.id:<4}", style="bold")
    t.append(f"{row.status:<9}", style=STATUS_STYLE.get(row.status, ""))
    if row.metric is not None:
        t.append(f"{objective.metric} {row.metric:.6f} ")
        t.append(f"{fmt_delta(objective, row, baseline):<20}", style="dim")
    elif row.reason:
        t.append(f"{printable(row.reason)[:60]:<40} ", style="dim")
    t.append(f" {printable(row.description)[:70]}")
    if row.duration_s is not None:
        t.append(f"  {row.duration_s:.1f}s", style="dim")
    counter = f"{done}/{total}" if total else f"{done}"
    if best is not None and best.metric is not None:
        t.append(f"  [{counter} done, best {best.metric:.6f}]", style="dim")
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
        best = fmt_metric(self.best.metric) if self.best else "-"
        head = Text(f"overnight/{self.tag}: {counter} experiments done, best "
                    f"{self.objective.metric} {best}, {len(self.running)} running", style="bold")
        return Group(head, table)

    def started(self, row: Row) -> None:
        self.running[row.id] = row.__class__(**{**row.__dict__, "started_at": time.time()})
        if not self.live:
            self.console.print(Text(f"#{row.id:<4}started  slot {row.slot}: "
                                    f"{printable(row.description)}", style="dim"))

    def finished(self, row: Row, best: Row | None, done: int) -> None:
        self.running.pop(row.id, None)
        self.best, self.done = best, done
        line = result_line(self.objective, row, best, self._baseline(), done, self.total)
        self.console.print(line)

    def note(self, text: str) -> None:
        self.console.print(Text(printable(text), style="yellow"))


def status_view(ledger: Ledger, tag: str, objective: Objective) -> Group:
    rows = ledger.experiments(tag)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    baseline = next((r for r in reversed(rows) if r.is_baseline and r.status == "keep"), None)
    keeps = [r for r in rows if r.status == "keep"]
    best = keeps[-1] if keeps else None
    lines: list = [Text(f"tag {tag}: {len(rows)} experiments", style="bold")]
    lines.append(Text("  " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))))
    if baseline:
        lines.append(Text(f"  baseline  #{baseline.id}  {objective.metric} "
                          f"{fmt_metric(baseline.metric)}"))
    if best and baseline and best.id == baseline.id:
        lines.append(Text("  best      the baseline: no improvement kept yet"))
    elif best and baseline and best.metric is not None and baseline.metric is not None:
        pct = judge.improvement_pct(objective, baseline.metric, best.metric)
        lines.append(Text(f"  best      #{best.id}  {objective.metric} {fmt_metric(best.metric)}"
                          f"  ({pct:+.2f}% vs baseline, {len(keeps) - 1} kept improvements)",
                          style="green"))
        lines.append(Text(f"  branch    overnight/{tag} at {(best.kept_commit or '')[:10]}"))
    tokens_in = sum(r.tokens_in for r in rows)
    tokens_out = sum(r.tokens_out for r in rows)
    if tokens_in or tokens_out:
        cost = sum(r.cost_usd for r in rows)
        improvements = max(len(keeps) - 1, 0)
        per = (f"{(tokens_in + tokens_out) / improvements:,.0f} tokens, ${cost / improvements:.2f}"
               f" per kept improvement" if improvements else "no kept improvement yet")
        lines.append(Text(f"  proposer  {tokens_in:,} tokens in, {tokens_out:,} out, "
                          f"${cost:.2f}; {per}"))
    given_up = [r for r in rows if r.status == "lost" and r.reason.startswith("given up")]
    if given_up:
        lines.append(Text("  given up (never measured):", style="yellow"))
        for r in given_up:
            lines.append(Text(f"    #{r.id} {r.reason}: {r.description}", style="yellow"))
    running = [r for r in rows if r.status in ("running", "queued")]
    if running:
        lines.append(Text("  running:"))
        now = time.time()
        for r in running:
            since = f"{now - r.started_at:.0f}s" if r.started_at else "queued"
            lines.append(Text(f"    #{r.id} slot {r.slot} {since}: {printable(r.description)}"))
    return Group(*lines)


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


def _safe(text: str, style: str = "") -> Text:
    """A line of show's output: every field in it may come from the experiment or a model."""
    return Text(printable(text), style=style)


def show_view(row: Row, objective: Objective, diff: str, log_lines: int = 20) -> Group:
    out: list = []
    out.append(_safe(f"experiment #{row.id} ({row.tag})", style="bold"))
    out.append(_safe(f"  status       {row.status}", style=STATUS_STYLE.get(row.status, "")))
    if row.reason:
        out.append(_safe(f"  reason       {row.reason}"))
    out.append(_safe(f"  description  {row.description}"))
    if row.hypothesis:
        out.append(_safe(f"  hypothesis   {row.hypothesis}"))
    out.append(_safe(f"  commit       {row.commit_sha or '-'} (parent {(row.parent or '-')[:10]})"))
    if row.kept_commit and not row.is_baseline:
        out.append(_safe(f"  kept as      {row.kept_commit} on overnight/{row.tag}"))
    out.append(_safe(f"  {objective.metric:<12} {fmt_metric(row.metric)}"
                    + (f"  (delta {row.delta:+.6f})" if row.delta is not None else "")))
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
