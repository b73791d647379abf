"""The morning report of a tag: what happened overnight, at a glance, in one HTML file.

`summary` reads the ledger into plain data (JSON-able: a dashboard or a notify hook can use
it as is); `write_report` renders it with the progress chart (chart.py) and the diffs of the
kept changes into one self-contained page, `report.html`, and writes `progress.png` beside
it. The page needs no network and runs no script: its Content-Security-Policy allows none,
and every string that came from an experiment or a model is escaped where it is written.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from overnight import chart, judge
from overnight.errors import ConfigError
from overnight.ledger import Ledger, Row, keeps_in_order
from overnight.pins import pinned_spec, spec_record
from overnight.spec import Objective, Spec
from overnight.status import MEASURED, NOT_COUNTED, Status

if TYPE_CHECKING:
    from overnight.workspace import Workspace

REPORT_FILE = "report.html"
PNG_FILE = "progress.png"
DIFF_CHARS = 60_000  # a kept change's diff in the page, cut past this (`overnight diff` has all)
# How each way of failing is named in the report, in the order it is shown.
FAILURES = {Status.CRASH: "crashed", Status.TIMEOUT: "timed out",
            Status.CHECKS_FAILED: "failed its checks", Status.REJECTED: "rejected",
            Status.TAMPERED: "tampered", Status.LOST: "lost"}


# -- the data --------------------------------------------------------------------------------

def summary(ledger: Ledger, tag: str, spec: Spec) -> dict:
    """Everything the report says about `tag`, as plain data. Raises ConfigError for a tag
    with no experiments."""
    rows = ledger.experiments(tag)
    if not rows:
        tags = ledger.tags()
        known = f"; tags: {', '.join(tags)}" if tags else "; there are no experiments yet"
        raise ConfigError(f"no experiments with tag '{tag}'{known}")
    pinned = pinned_spec(ledger, tag)
    objective = tag_objective(pinned, spec)
    counted = [r for r in rows if not r.failed_start]
    cands = chart.candidates(counted)
    baseline = next((r for r in reversed(counted) if r.is_baseline and r.status == Status.KEEP),
                    None)
    kept = [r for r in keeps_in_order(counted) if not r.is_baseline]
    return {
        "tag": tag,
        "generated_at": _when(dt.datetime.now().timestamp()),
        "spec": spec_summary(pinned or spec_record(spec)),
        "objective": {"metric": objective.metric, "direction": objective.direction},
        "counts": _counts(rows, cands),
        "baseline": _measured(baseline) if baseline else None,
        "best": _best(objective, baseline, kept),
        "kept": _kept(objective, baseline, kept),
        "hypotheses": _hypotheses(counted),
        "failures": _failures(rows),
        "throughput": throughput(rows),
        "cost": _cost(rows, len(kept)),
        "noise": noise(rows),
        "classes": _classes(rows, objective, spec.hardware.confirm or spec.hardware.reference),
    }


def tag_objective(pinned: dict | None, spec: Spec) -> Objective:
    """The objective the tag measures: as pinned when its baseline ran (overnight.toml may
    have moved on since), else the spec's."""
    if pinned is not None:
        try:
            return Objective(**pinned["measure"]["objective"])
        except (KeyError, TypeError, ValueError):
            pass  # a pin from an older release: the spec's objective is the best guess
    return spec.objective


def spec_summary(record: dict) -> dict[str, object]:
    """The settings a reader needs to know what was measured and how it was searched."""
    measure, settings = record.get("measure", {}), record.get("settings", {})
    files = measure.get("files") or {}
    return {
        "command": measure.get("run.command"),
        "budget_seconds": measure.get("run.budget_seconds"),
        "timeout_seconds": measure.get("run.timeout_seconds"),
        "editable": list(files.get("editable") or []),
        "sandbox": measure.get("run.sandbox"),
        "proposer": settings.get("proposer.kind"),
        "strategy": settings.get("search.strategy"),
        "judge": settings.get("judge.mode"),
        "parallel": settings.get("run.parallel"),
        "executor": settings.get("run.executor"),
    }


def _when(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _counts(rows: list[Row], cands: list[Row]) -> dict[str, object]:
    by_status: dict[str, int] = {}
    for r in cands:
        by_status[str(r.status)] = by_status.get(str(r.status), 0) + 1
    return {
        "candidates": len(cands),
        "repeats": sum(1 for r in rows if r.repeat_of is not None
                       and r.status not in NOT_COUNTED),
        "by_status": by_status,
        "in_flight": sum(1 for r in rows if r.status in (Status.QUEUED, Status.RUNNING)),
        "failed_starts": sum(1 for r in rows if r.failed_start),
    }


def _measured(row: Row) -> dict[str, object]:
    return {"id": row.id, "value": row.value, "spread": row.spread, "runs": row.runs,
            "noise": row.noise, "hw_class": row.hw_class}


def _best(objective: Objective, baseline: Row | None, kept: list[Row]) -> dict | None:
    best = kept[-1] if kept else baseline
    if best is None:
        return None
    out = _measured(best)
    out["pct_vs_baseline"] = _pct(objective, baseline, best)
    out["kept_commit"] = best.kept_commit
    return out


def _pct(objective: Objective, baseline: Row | None, row: Row) -> float | None:
    if baseline is None or baseline.value is None or row.value is None:
        return None
    return judge.improvement_pct(objective, baseline.value, row.value)


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _kept(objective: Objective, baseline: Row | None, kept: list[Row]) -> list[dict]:
    """The kept improvements in order, each with how far it moved the metric."""
    out, previous = [], baseline
    for r in kept:
        out.append({
            **_measured(r),
            "description": r.description,
            "hypothesis": r.hypothesis,
            "proposer": r.proposer,
            "parent": r.parent,
            "commit": r.commit_sha,
            "kept_commit": r.kept_commit,
            "delta_vs_previous": _minus(r.value, previous.value if previous else None),
            "previous_id": previous.id if previous else None,
            "delta_vs_baseline": _minus(r.value, baseline.value if baseline else None),
            "pct_vs_baseline": _pct(objective, baseline, r),
            "judged_delta": r.delta,  # against the incumbent's estimate when it was judged
            "reason": r.reason,
        })
        previous = r
    return out


def _hypotheses(rows: list[Row]) -> list[dict]:
    """Every proposal (repeat runs are not proposals) and what came of it."""
    return [{"id": r.id, "status": str(r.status), "hypothesis": r.hypothesis,
             "description": r.description, "value": r.value, "delta": r.delta,
             "reason": r.reason}
            for r in rows if not r.is_baseline and r.repeat_of is None]


def _failures(rows: list[Row]) -> dict[str, list[dict]]:
    """What crashed, timed out, failed its checks, was rejected, tampered or lost, and why."""
    redone = {r.retry_of: r.id for r in rows if r.retry_of is not None}
    out: dict[str, list[dict]] = {}
    for status in FAILURES:
        group = []
        for r in rows:
            if r.status != status:
                continue
            problems = (r.integrity or {}).get("problems") or []
            group.append({"id": r.id, "description": r.description,
                          "reason": "; ".join(str(p) for p in problems) or r.reason,
                          "repeat_of": r.repeat_of, "baseline": r.is_baseline,
                          "redone_as": redone.get(r.id)})
        if group:
            out[str(status)] = group
    return out


def throughput(rows: list[Row]) -> dict[str, object] | None:
    """Experiments an hour over the tag's wall time (first start to last finish, pauses
    between runs of `overnight run` included) and the share of slot time spent running.
    The number of slots is the number of distinct slots that ran something."""
    ran = [r for r in rows if r.started_at is not None and r.finished_at is not None]
    if not ran:
        return None
    start = min(r.started_at for r in ran if r.started_at is not None)
    end = max(r.finished_at for r in ran if r.finished_at is not None)
    wall = end - start
    slots = len({r.slot for r in ran if r.slot is not None}) or 1
    busy = sum(max(r.duration_s or 0.0, 0.0) for r in ran)
    hours = wall / 3600
    candidates = sum(1 for r in ran if r.repeat_of is None)
    return {
        "started": _when(start), "finished": _when(end), "wall_seconds": wall,
        "runs": len(ran), "candidates": candidates, "slots": slots,
        "run_seconds": busy,
        "experiments_per_hour": candidates / hours if hours > 0 else None,
        "runs_per_hour": len(ran) / hours if hours > 0 else None,
        "busy_fraction": min(busy / (slots * wall), 1.0) if wall > 0 else None,
    }


def _cost(rows: list[Row], kept: int) -> dict[str, object]:
    tokens_in = sum(r.tokens_in for r in rows)
    tokens_out = sum(r.tokens_out for r in rows)
    usd = sum(r.cost_usd for r in rows)
    return {"tokens_in": tokens_in, "tokens_out": tokens_out, "usd": usd,
            "kept_improvements": kept,
            "usd_per_kept": usd / kept if kept else None,
            "tokens_per_kept": (tokens_in + tokens_out) / kept if kept else None}


def _runs_by_class(rows: list[Row]) -> dict[str, judge.Runs]:
    """Every measured run grouped by commit, per hardware class, as the judge groups them."""
    out: dict[str, judge.Runs] = {}
    for r in sorted(rows, key=lambda r: r.id):
        if r.metric is not None and r.status in MEASURED:
            out.setdefault(r.hw_class, judge.Runs()).add(r.id, r.repeat_of, r.metric)
    return out


def noise(rows: list[Row]) -> dict[str, dict]:
    """Run-to-run noise per hardware class ("" on one machine): the standard deviation of
    one run, pooled over every commit that ran more than once (the judge's own figure), and
    the latest one a decision recorded."""
    out: dict[str, dict] = {}
    for cls, runs in _runs_by_class(rows).items():
        sigma = runs.noise.sigma
        if sigma is None:
            continue
        out[cls] = {"sigma": sigma, "df": runs.noise.df, "exact": runs.noise.exact}
    recorded = [r for r in rows if r.noise is not None]
    if recorded and len(chart.classes(rows)) < 2:  # with several, which class it was is lost
        latest = max(recorded, key=lambda r: (r.finished_at or 0.0, r.id))
        out.setdefault(latest.hw_class, {})["recorded"] = latest.noise
    return out


def _classes(rows: list[Row], objective: Objective, reference: str | None) -> list[dict]:
    """With several hardware classes, each one's baseline and best (numbers compare only
    within a class)."""
    found = chart.classes(rows)
    if len(found) < 2:
        return []
    out = []
    for panel in chart.panels(rows):
        base = next((p for p in panel.points if p.baseline), None)
        keeps = [p for p in panel.points if p.status == Status.KEEP and not p.baseline]
        best = keeps[-1] if keeps else None
        pct = None
        if base is not None and best is not None and base.value is not None \
                and best.value is not None:
            pct = judge.improvement_pct(objective, base.value, best.value)
        out.append({"hw_class": panel.hw_class, "reference": panel.hw_class == reference,
                    "runs": sum(1 for r in rows if r.hw_class == panel.hw_class
                                and r.metric is not None and r.status in MEASURED),
                    "baseline": base.value if base else None,
                    "best_id": best.id if best else None,
                    "best": best.value if best else None, "pct_vs_baseline": pct})
    return out


# -- the page --------------------------------------------------------------------------------

def report_paths(ws: Workspace, tag: str, out: Path | None) -> tuple[Path, Path]:
    """Where report.html and progress.png go: `out` (a file, or a directory to hold both),
    by default .overnight/reports/<tag>/."""
    if out is None:
        folder = ws.state / "reports" / tag
        folder.mkdir(parents=True, exist_ok=True)
        return folder / REPORT_FILE, folder / PNG_FILE
    if out.is_dir():
        return out / REPORT_FILE, out / PNG_FILE
    if out.name == PNG_FILE:
        raise ConfigError(f"-o {out}: the chart is written as {PNG_FILE} beside the page: "
                          "name the page otherwise, e.g. report.html")
    if not out.parent.is_dir():
        raise ConfigError(f"-o {out}: the directory {out.parent} does not exist: create it "
                          f"(`mkdir -p {out.parent}`) or write the report somewhere else")
    return out, out.parent / PNG_FILE


def write_report(ws: Workspace, tag: str | None, out: Path | None = None) -> Path:
    """Write report.html and progress.png for `tag` (default: the most recent) and return
    the page's path. Verifies the ledger first: a report is only as true as its ledger."""
    from overnight.workspace import known_tag

    ledger = ws.ledger()
    try:
        ledger.verify()
        tag = known_tag(ledger, tag)
        data = summary(ledger, tag, ws.spec)
        rows = ledger.experiments(tag)
    finally:
        ledger.close()
    page, picture = report_paths(ws, tag, out)
    objective = Objective(**data["objective"])
    title = f"overnight/{tag}"
    diffs = {k["id"]: _diff(ws, k) for k in data["kept"]}
    html = render(data, chart.svg(rows, objective, title=title), diffs, picture.name)
    with _replacing(picture) as tmp:
        chart.png(rows, objective, tmp, title=title)
    with _replacing(page) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return page


def _diff(ws: Workspace, kept: dict) -> str:
    """The kept change as a git diff against its parent (cut short past DIFF_CHARS)."""
    from overnight.snapshot import GitError

    if not kept["parent"] or not kept["commit"]:
        return ""
    try:
        text = ws.repo.diff(kept["parent"], kept["commit"])
    except GitError as e:
        return f"(no diff: {e})"
    if len(text) > DIFF_CHARS:
        text = (text[:DIFF_CHARS] + f"\n… cut at {DIFF_CHARS:,} characters: "
                f"`overnight diff {kept['id']}` shows all of it")
    return text


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` that replaces it once written: a page served while
    it is rewritten is never half written, and a link planted at `path` is replaced, not
    followed."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def e(value: object) -> str:
    """Any value as escaped text: untrusted strings made printable first."""
    return chart.esc("" if value is None else str(value))


def num(v: float | None, digits: int = 6) -> str:
    return "–" if v is None else f"{v:.{digits}g}"


def signed(v: float | None) -> str:
    return "–" if v is None else f"{v:+.4g}"


def pct(v: float | None) -> str:
    return "–" if v is None else f"{v:+.2f}%"


def duration(seconds: float) -> str:
    """"42 s", "17 min", "7.5 h"."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _plus(spread: float | None, runs: int) -> str:
    """"± 0.0011 (3 runs)": a value's uncertainty when the judge has one."""
    more = f"{runs} run{'' if runs == 1 else 's'}" if runs else ""
    if spread is None:
        return f" ({more})" if runs > 1 else ""
    return f" ± {spread:.2g}" + (f" ({more})" if more else "")


STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #212121;
       margin: 24px auto; max-width: 1100px; padding: 0 16px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px;
     border-bottom: 1px solid #e0e0e0; padding-bottom: 4px; }
.muted { color: #757575; } .good { color: #2e7d32; } .bad { color: #c62828; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 8px 0; }
dl.facts dt { color: #616161; } dl.facts dd { margin: 0; }
.headline { font-size: 16px; margin: 12px 0; }
table { border-collapse: collapse; width: 100%; margin: 6px 0; }
th, td { text-align: left; vertical-align: top; padding: 5px 8px; border-bottom: 1px solid #eee; }
th { color: #616161; font-weight: 600; } td.num { font-variant-numeric: tabular-nums;
     white-space: nowrap; }
pre { background: #fafafa; border: 1px solid #eee; padding: 8px; overflow-x: auto;
      font-size: 12px; white-space: pre; max-height: 480px; }
details summary { cursor: pointer; color: #1565c0; }
.chart svg { max-width: 100%; height: auto; border: 1px solid #eee; }
.status-keep { color: #2e7d32; font-weight: 600; } .status-discard { color: #757575; }
.status-crash, .status-timeout, .status-tampered, .status-checks_failed { color: #c62828; }
.status-rejected { color: #6a1b9a; } .status-confirm { color: #1565c0; }
.hyp { color: #616161; font-size: 13px; }
"""
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:"


def render(data: dict, svg: str, diffs: dict[int, str], png_name: str) -> str:
    """The page: header, headline, chart, kept changes with their diffs, classes,
    hypotheses, failures, throughput, cost and noise."""
    metric = data["objective"]["metric"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="referrer" content="no-referrer">',
        f"<title>overnight report: {e(data['tag'])}</title>",
        f"<style>{STYLE}</style></head><body>",
        *_header(data),
        '<h2 id="progress">Progress</h2>',
        f'<div class="chart">{svg}</div>',
        f'<p class="muted">The same chart as a picture: <a href="{e(png_name)}">'
        f"{e(png_name)}</a>. Hover a dot for its experiment.</p>",
        *_kept_table(data, diffs, metric),
        *_class_table(data, metric),
        *_hypothesis_table(data),
        *_failure_lists(data),
        *_facts(data, metric),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _dl(items: Iterable[tuple[str, str]]) -> str:
    """A definition list of already escaped pairs."""
    return '<dl class="facts">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items) \
        + "</dl>"


def _header(data: dict) -> list[str]:
    spec = data["spec"]
    obj = data["objective"]
    t = data["throughput"] or {}
    period = f"{e(t.get('started'))} to {e(t.get('finished'))}" if t else "nothing ran yet"
    facts = [("measures", f"{e(obj['metric'])}, {e(obj['direction'])} is better"),
             ("command", f"<code>{e(spec['command'])}</code>"),
             ("budget", f"{e(spec['budget_seconds'])} s per run (timeout "
                        f"{e(spec['timeout_seconds'])} s)"),
             ("edits", e(", ".join(spec["editable"]))),
             ("proposer", e(" / ".join(str(v) for v in (spec["proposer"], spec["strategy"])
                                       if v))),
             ("judge", e(spec["judge"])),
             ("isolation", e(spec["sandbox"])),
             ("ran", period)]
    return [f"<h1>overnight report: tag {e(data['tag'])}</h1>",
            f'<p class="muted">branch <code>overnight/{e(data["tag"])}</code>; written '
            f"{e(data['generated_at'])}</p>",
            _headline(data), _dl(facts)]


def _headline(data: dict) -> str:
    base, best = data["baseline"], data["best"]
    c = data["counts"]
    ran = f"{c['candidates']} experiments ({c['repeats']} repeat runs besides)"
    if base is None:
        n = c["failed_starts"]
        why = "the baseline has no number yet" if not n else \
            f"the baseline failed ({n} {'try' if n == 1 else 'tries'}): see the failures below"
        return f'<p class="headline bad">Not started: {e(why)}. {e(ran)}.</p>'
    metric = e(data["objective"]["metric"])
    if best is None or best["id"] == base["id"]:
        return (f'<p class="headline">{ran}; no improvement kept: the baseline\'s '
                f"{metric} {num(base['value'])} is still the best.</p>")
    return (f'<p class="headline">{ran}; {len(data["kept"])} improvements kept: {metric} '
            f"{num(base['value'])} → <b class=\"good\">{num(best['value'])}</b> "
            f"({pct(best['pct_vs_baseline'])} vs baseline, #{best['id']}).</p>")


def _kept_table(data: dict, diffs: dict[int, str], metric: str) -> list[str]:
    out = ['<h2 id="kept-changes">Kept improvements</h2>']
    if not data["kept"]:
        out.append('<p class="muted">None yet.</p>')
    base = data["baseline"]
    if base is not None:
        out.append(f'<p>Baseline #{base["id"]}: {e(metric)} {num(base["value"])}'
                   f"{e(_plus(base['spread'], base['runs']))}.</p>")
    out.append('<table id="kept"><thead><tr><th>#</th><th>change</th>'
               f'<th>{e(metric)}</th><th>Δ vs previous</th><th>Δ vs baseline</th></tr>'
               "</thead><tbody>")
    for k in data["kept"]:
        diff = diffs.get(k["id"], "")
        shown = (f"<details><summary>diff against #{e(k['previous_id'])}</summary>"
                 f"<pre>{e(diff)}</pre></details>") if diff else ""
        hyp = f'<div class="hyp">{e(k["hypothesis"])}</div>' if k["hypothesis"] else ""
        out.append(
            f'<tr data-id="{k["id"]}"><td>#{k["id"]}</td>'
            f"<td>{e(k['description'])}{hyp}{shown}</td>"
            f'<td class="num">{num(k["value"])}{e(_plus(k["spread"], k["runs"]))}</td>'
            f'<td class="num">{signed(k["delta_vs_previous"])}</td>'
            f'<td class="num">{signed(k["delta_vs_baseline"])} '
            f"({pct(k['pct_vs_baseline'])})</td></tr>")
    out.append("</tbody></table>")
    if any(k["spread"] for k in data["kept"]):
        out.append('<p class="muted">± is one standard error of the estimate (the mean of '
                   "its runs; a candidate's first run only selected it and is left out).</p>")
    return out


def _class_table(data: dict, metric: str) -> list[str]:
    if not data["classes"]:
        return []
    out = ['<h2 id="classes">Hardware classes</h2>',
           '<p class="muted">Numbers compare only within a class.</p>',
           '<table id="hw-classes"><thead><tr><th>class</th><th>runs</th>'
           f"<th>baseline {e(metric)}</th><th>best</th><th>vs baseline</th></tr></thead><tbody>"]
    for c in data["classes"]:
        name = e(c["hw_class"]) + (" (reference)" if c["reference"] else "")
        best = f"#{c['best_id']} {num(c['best'])}" if c["best_id"] is not None else "–"
        out.append(f"<tr><td>{name}</td><td class=\"num\">{c['runs']}</td>"
                   f'<td class="num">{num(c["baseline"])}</td><td class="num">{best}</td>'
                   f'<td class="num">{pct(c["pct_vs_baseline"])}</td></tr>')
    out.append("</tbody></table>")
    return out


def _hypothesis_table(data: dict) -> list[str]:
    out = ['<h2 id="hypotheses">Hypotheses and outcomes</h2>']
    if not data["hypotheses"]:
        return [*out, '<p class="muted">No proposal yet.</p>']
    out.append('<table id="hypotheses-table"><thead><tr><th>#</th><th>outcome</th>'
               "<th>Δ</th><th>hypothesis</th><th>change</th></tr></thead><tbody>")
    for h in data["hypotheses"]:
        status = e(h["status"])
        out.append(f'<tr data-id="{h["id"]}"><td>#{h["id"]}</td>'
                   f'<td class="status-{status}">{status}</td>'
                   f'<td class="num">{signed(h["delta"])}</td>'
                   f"<td>{e(h['hypothesis']) or '–'}</td><td>{e(h['description'])}</td></tr>")
    out.append("</tbody></table>")
    return out


def _failure_lists(data: dict) -> list[str]:
    out = ['<h2 id="failures">What failed, and why</h2>']
    if not data["failures"]:
        return [*out, '<p class="muted">Nothing crashed, timed out, was rejected, tampered or '
                "was lost.</p>"]
    for status, group in data["failures"].items():
        out.append(f'<h3 id="failed-{e(status)}">{e(FAILURES[Status(status)])} '
                   f"({len(group)})</h3><ul>")
        for f in group:
            what = "the baseline" if f["baseline"] else e(f["description"])
            if f["repeat_of"] is not None:
                what = f"a repeat run of #{f['repeat_of']}"
            redone = f" (redone as #{f['redone_as']})" if f["redone_as"] else ""
            out.append(f'<li data-id="{f["id"]}">#{f["id"]} {what}{redone}: '
                       f'<span class="muted">{e(f["reason"]) or "no reason recorded"}</span></li>')
        out.append("</ul>")
    return out


def _facts(data: dict, metric: str) -> list[str]:
    t, c = data["throughput"], data["cost"]
    out = ['<h2 id="throughput">Throughput</h2>']
    if t is None:
        out.append('<p class="muted">Nothing has run yet.</p>')
    else:
        per_hour = "–" if t["experiments_per_hour"] is None else \
            f"{t['experiments_per_hour']:.1f} experiments ({t['runs_per_hour']:.1f} runs)"
        busy = "–" if t["busy_fraction"] is None else f"{t['busy_fraction']:.0%}"
        out.append(_dl([
            ("wall time", f"{duration(t['wall_seconds'])} from the first start to the last "
                          "finish (pauses between runs of <code>overnight run</code> "
                          "included)"),
            ("an hour", per_hour),
            ("slots busy", f"{busy} of {t['slots']} slot{'' if t['slots'] == 1 else 's'} × "
                           f"wall time ({duration(t['run_seconds'])} of runs)")]))
    out.append('<h2 id="cost">Cost</h2>')
    if not (c["tokens_in"] or c["tokens_out"] or c["usd"]):
        out.append('<p class="muted">No model was paid for proposals (a search proposer, or '
                   "no price set).</p>")
    else:
        per = "no kept improvement yet" if c["usd_per_kept"] is None else \
            f"${c['usd_per_kept']:.2f} ({c['tokens_per_kept']:,.0f} tokens)"
        out.append(_dl([("tokens", f"{c['tokens_in']:,} in, {c['tokens_out']:,} out"),
                        ("dollars", f"${c['usd']:.2f}"), ("per kept improvement", per)]))
    out.append('<h2 id="noise">Noise</h2>')
    if not data["noise"]:
        out.append('<p class="muted">No commit ran twice: no noise estimate (greedy judging, '
                   "or too early).</p>")
    else:
        rows = []
        for cls, n in data["noise"].items():
            where = e(cls) if cls else "this machine"
            if n.get("exact"):
                said = "none: repeats measure exactly the same"
            elif "sigma" in n:
                said = (f"one run of {e(metric)} varies by σ {n['sigma']:.3g} (pooled over "
                        f"every commit that ran twice, {n['df']} degrees of freedom)")
            else:
                said = f"σ {n['recorded']:.3g}, as last recorded by the judge"
            rows.append((where, said))
        out.append(_dl(rows))
    return out
