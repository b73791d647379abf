"""The progress chart of a tag: every experiment a dot, the running best a step line, kept
changes labelled with their description; one panel per hardware class when there are several.

Two renderers over the same data (`panels`): `svg` writes a standalone SVG (inline in the
HTML report, or served as an image file) with no scripts, and `png` draws it with matplotlib
for `progress.png`. Descriptions come from the proposer (a model, an agent): every string
from an experiment is made printable and escaped before it is written into markup.
"""

from __future__ import annotations

import html
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from overnight import judge
from overnight.ledger import Row
from overnight.spec import Objective
from overnight.status import FAILED, MEASURED, NOT_COUNTED, Status
from overnight.text import printable

LABEL_CHARS = 32  # a kept change's label: its description, cut to this
# Candidates whose number is plotted; the rest of those that ran are marked as failures.
PLOTTED = frozenset({Status.KEEP, Status.DISCARD, Status.CONFIRM, Status.CHECKS_FAILED})
MARKED = FAILED | {Status.TAMPERED}  # ran and has no number to trust: a mark at the edge

KEEP_COLOR = "#2e7d32"
DISCARD_COLOR = "#9e9e9e"
CONFIRM_COLOR = "#1565c0"
CHECKS_COLOR = "#ef6c00"
FAIL_COLOR = "#c62828"
DOT_COLOR = {Status.KEEP: KEEP_COLOR, Status.DISCARD: DISCARD_COLOR,
             Status.CONFIRM: CONFIRM_COLOR, Status.CHECKS_FAILED: CHECKS_COLOR}


@dataclass(frozen=True)
class Point:
    """One candidate in one panel: x is its place among the tag's candidates that ran."""

    id: int
    x: int
    value: float | None  # None: it ran and gave no number to trust (crash, timeout, ...)
    status: str
    description: str
    baseline: bool


@dataclass(frozen=True)
class Panel:
    """What one chart panel shows: every candidate of one hardware class ("" with one)."""

    hw_class: str
    points: list[Point]  # with a value, in x order
    failed: list[Point]  # without one
    total: int  # candidates that ran (the x axis runs to it)
    uncounted: int  # rejected or lost: nothing ran, nothing drawn

    def best_steps(self, objective: Objective) -> list[tuple[int, float]]:
        """The running best: (x, value) at each kept change that improved on the best
        before it (a keep judged on another class can look worse on this one)."""
        steps: list[tuple[int, float]] = []
        for p in self.points:
            if p.status != Status.KEEP or p.value is None:
                continue
            if not steps or _better(objective, p.value, steps[-1][1]):
                steps.append((p.x, p.value))
        return steps


def _better(objective: Objective, a: float, b: float) -> bool:
    return a < b if objective.direction == "lower" else a > b


def candidates(rows: list[Row]) -> list[Row]:
    """The tag's candidates that ran (the baseline first), in order: repeat runs, failed
    starts, rejected proposals, lost and unfinished runs are not experiments of the chart."""
    return [r for r in rows if r.repeat_of is None and not r.failed_start
            and r.status not in NOT_COUNTED]


def classes(rows: list[Row]) -> list[str]:
    """The hardware classes with a measured run, in the order they first measured."""
    return list(dict.fromkeys(r.hw_class for r in rows if r.hw_class and r.metric is not None))


def panels(rows: list[Row]) -> list[Panel]:
    """One panel, or one per hardware class when runs measured on several: numbers compare
    only within a class, so each shows its candidates' estimates from that class's runs.
    A candidate's x is its place among all the tag's candidates, the same in every panel."""
    cands = sorted(candidates(rows), key=lambda r: r.id)
    order = {r.id: i + 1 for i, r in enumerate(cands)}
    uncounted = sum(1 for r in rows if r.repeat_of is None and not r.failed_start
                    and r.status in (Status.REJECTED, Status.LOST))
    found = classes(rows)
    if len(found) < 2:
        return [_panel("", cands, order, {r.id: r.value for r in cands}, uncounted)]
    # Where each candidate ran, first or again; one that ran on no class found (a crash on
    # a slot without one) goes in the first panel.
    ran_on: dict[int, set[str]] = {}
    for r in rows:
        ran_on.setdefault(r.id if r.repeat_of is None else r.repeat_of, set()).add(r.hw_class)
    out = []
    for cls in found:
        here = [r for r in cands if cls in ran_on[r.id]
                or (cls == found[0] and not ran_on[r.id] & set(found))]
        out.append(_panel(cls, here, order, _values_on(rows, here, cls), uncounted))
    return out


def _values_on(rows: list[Row], cands: list[Row], cls: str) -> dict[int, float | None]:
    """Each candidate's estimate from its runs on `cls`, as the judge forms it (a first run
    that selected the candidate is left out once there are others)."""
    runs = judge.Runs()
    for r in sorted(rows, key=lambda r: r.id):
        if r.hw_class == cls and r.metric is not None and r.status in MEASURED:
            runs.add(r.id, r.repeat_of, r.metric)
    out: dict[int, float | None] = {}
    for c in cands:
        selected = not c.is_baseline and c.hw_class == cls
        ev = runs.of(c.id, baseline=not selected)
        out[c.id] = ev.estimate if ev.values else None
    return out


def _panel(cls: str, cands: list[Row], order: dict[int, int], values: dict[int, float | None],
           uncounted: int) -> Panel:
    points, failed = [], []
    for r in cands:
        value = values.get(r.id)
        if value is None or not math.isfinite(value) or r.status not in PLOTTED:
            value = None
        p = Point(r.id, order[r.id], value, str(r.status), r.description, r.is_baseline)
        if p.value is not None:
            points.append(p)
        elif r.status in MARKED:
            failed.append(p)
    return Panel(cls, points, failed, len(order), uncounted)


def label(text: str, limit: int = LABEL_CHARS) -> str:
    """A description as one short printable line (not yet escaped)."""
    one = " ".join(_clean(text).split())
    return one if len(one) <= limit else one[: limit - 1] + "…"


# Characters XML 1.0 does not allow even escaped (besides the controls printable removes).
_NOT_XML = re.compile("[\ufffe\uffff\ud800-\udfff]")


def _clean(text: str) -> str:
    return _NOT_XML.sub("", printable(text or ""))


def esc(text: str) -> str:
    """Untrusted text, safe in SVG or HTML text and attribute values."""
    return html.escape(_clean(text), quote=True)


# -- scales --------------------------------------------------------------------------------

def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]: steps of 1, 2 or 5 times a power of ten."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9)
    last = math.floor(hi / step + 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]


def y_range(panel: Panel, objective: Objective) -> tuple[float, float]:
    """The y axis: every kept value and the bulk of the others (a wild outlier is drawn at
    the edge, not allowed to flatten the rest), with room for labels on the better side."""
    values = sorted(p.value for p in panel.points if p.value is not None)
    if not values:
        return 0.0, 1.0
    kept = [p.value for p in panel.points if p.status == Status.KEEP and p.value is not None]
    if len(values) >= 4:  # Tukey's far-out fences: never a kept value
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        scale = max(q3 - q1, max(kept, default=0.0) - min(kept, default=0.0))
        if scale > 0:
            values = [v for v in values if q1 - 3 * scale <= v <= q3 + 3 * scale]
    lo, hi = min(values + kept), max(values + kept)
    span = hi - lo
    if span <= 0:
        span = abs(hi) * 0.05 or 1.0
        lo, hi = lo - span / 2, hi + span / 2
    pad, room = span * 0.08, span * 0.35  # room: where the labels of kept changes go
    if objective.direction == "lower":
        return lo - room, hi + pad
    return lo - pad, hi + room


def _fmt(v: float) -> str:
    return f"{v:.6g}"


# -- SVG -----------------------------------------------------------------------------------

MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 78, 24, 58, 48


def svg(rows: list[Row], objective: Objective, *, width: int = 960, height: int = 420,
        title: str = "") -> str:
    """The chart as one standalone SVG document (one panel of `height` per hardware class).

    Dots have class "exp" and data-id (the experiment id), failure marks class "failed",
    labels of kept changes class "kept-label"; each dot's tooltip says what it is.
    """
    shown = panels(rows)
    total_h = height * len(shown)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total_h}" '
             f'viewBox="0 0 {width} {total_h}" font-family="sans-serif" font-size="12" '
             'role="img" class="progress-chart">',
             f"<title>{esc(title or 'progress')}</title>",
             f'<rect width="{width}" height="{total_h}" fill="#ffffff"/>']
    for i, panel in enumerate(shown):
        heading = title if i == 0 else ""
        parts.append(f'<g class="panel" data-class="{esc(panel.hw_class)}" '
                     f'transform="translate(0,{i * height})">')
        parts.extend(_svg_panel(panel, objective, width, height, heading, len(shown) > 1))
        parts.append("</g>")
    parts.append("</svg>")
    return "\n".join(parts)


@dataclass(frozen=True)
class _Frame:
    """Data coordinates to pixels inside one panel."""

    left: float
    top: float
    width: float
    height: float
    x_max: int
    y_lo: float
    y_hi: float

    def x(self, v: float) -> float:
        return self.left + (v - 0.5) / self.x_max * self.width

    def y(self, v: float) -> float:
        v = min(max(v, self.y_lo), self.y_hi)  # an outlier sits on the edge
        return self.top + (self.y_hi - v) / (self.y_hi - self.y_lo) * self.height

    def inside(self, v: float) -> bool:
        return self.y_lo <= v <= self.y_hi


def _svg_panel(panel: Panel, objective: Objective, width: int, height: int, title: str,
               several: bool) -> list[str]:
    y_lo, y_hi = y_range(panel, objective)
    f = _Frame(MARGIN_LEFT, MARGIN_TOP, width - MARGIN_LEFT - MARGIN_RIGHT,
               height - MARGIN_TOP - MARGIN_BOTTOM, max(panel.total, 1), y_lo, y_hi)
    out = _svg_heading(panel, objective, width, title, several)
    out.extend(_svg_axes(f, objective))
    if not panel.points and not panel.failed:
        out.append(f'<text x="{f.left + f.width / 2:.1f}" y="{f.top + f.height / 2:.1f}" '
                   'text-anchor="middle" fill="#757575" class="empty">no experiment has a '
                   'number yet</text>')
        return out
    out.extend(_svg_best(panel, objective, f))
    out.extend(_svg_dots(panel, objective, f))
    out.extend(_svg_failed(panel, f))
    out.extend(_svg_labels(panel, objective, f))
    return out


def _svg_heading(panel: Panel, objective: Objective, width: int, title: str,
                 several: bool) -> list[str]:
    out = []
    if title:
        out.append(f'<text x="{MARGIN_LEFT}" y="20" font-size="15" font-weight="bold">'
                   f"{esc(title)}</text>")
    kept = sum(1 for p in panel.points if p.status == Status.KEEP and not p.baseline)
    counts = [f"{len(panel.points) + len(panel.failed)} experiments", f"{kept} kept"]
    if panel.failed:
        counts.append(f"{len(panel.failed)} failed (× at the top)")
    if panel.uncounted:
        counts.append(f"{panel.uncounted} rejected or lost (not drawn)")
    where = f"hardware class {panel.hw_class}: " if several else ""
    better = "lower" if objective.direction == "lower" else "higher"
    out.append(f'<text x="{MARGIN_LEFT}" y="40" fill="#424242" class="subtitle">'
               f"{esc(where)}{esc(objective.metric)}, {better} is better; "
               f"{esc(', '.join(counts))}</text>")
    legend = [("kept", KEEP_COLOR), ("discarded", DISCARD_COLOR), ("confirming",
                                                                    CONFIRM_COLOR)]
    x = width - MARGIN_RIGHT - 250
    for name, color in legend:
        out.append(f'<circle cx="{x}" cy="36" r="4" fill="{color}"/>'
                   f'<text x="{x + 7}" y="40" font-size="11" fill="#424242">{name}</text>')
        x += 80
    return out


def _svg_axes(f: _Frame, objective: Objective) -> list[str]:
    out = [f'<rect x="{f.left}" y="{f.top}" width="{f.width:.1f}" height="{f.height:.1f}" '
           'fill="none" stroke="#bdbdbd"/>']
    for v in nice_ticks(f.y_lo, f.y_hi, 6):
        y = f.y(v)
        out.append(f'<line x1="{f.left}" x2="{f.left + f.width:.1f}" y1="{y:.1f}" '
                   f'y2="{y:.1f}" stroke="#eeeeee"/>'
                   f'<text x="{f.left - 6}" y="{y + 4:.1f}" text-anchor="end" '
                   f'font-size="11" class="tick">{_fmt(v)}</text>')
    for v in nice_ticks(1, f.x_max, 10):
        if v != int(v):
            continue
        x = f.x(v)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{f.top + f.height:.1f}" '
                   f'y2="{f.top + f.height + 4:.1f}" stroke="#757575"/>'
                   f'<text x="{x:.1f}" y="{f.top + f.height + 16:.1f}" text-anchor="middle" '
                   f'font-size="11" class="tick">{int(v)}</text>')
    out.append(f'<text x="{f.left + f.width / 2:.1f}" y="{f.top + f.height + 36:.1f}" '
               'text-anchor="middle" fill="#424242">experiment (in order; repeat runs are '
               "in each one's estimate)</text>")
    cy = f.top + f.height / 2
    out.append(f'<text x="16" y="{cy:.1f}" text-anchor="middle" fill="#424242" '
               f'transform="rotate(-90 16 {cy:.1f})">{esc(objective.metric)}</text>')
    return out


def _svg_best(panel: Panel, objective: Objective, f: _Frame) -> list[str]:
    steps = panel.best_steps(objective)
    if not steps:
        return []
    coords = []
    for i, (x, v) in enumerate(steps):
        if i:
            coords.append(f"{f.x(x):.1f},{f.y(steps[i - 1][1]):.1f}")
        coords.append(f"{f.x(x):.1f},{f.y(v):.1f}")
    coords.append(f"{f.x(panel.total + 0.5):.1f},{f.y(steps[-1][1]):.1f}")
    return [f'<polyline class="best" points="{" ".join(coords)}" fill="none" '
            f'stroke="{KEEP_COLOR}" stroke-width="2" stroke-opacity="0.7"/>']


def _svg_dots(panel: Panel, objective: Objective, f: _Frame) -> list[str]:
    out = []
    for p in sorted(panel.points, key=lambda p: p.status == Status.KEEP):  # keeps on top
        if p.value is None:
            continue
        color = DOT_COLOR.get(p.status, DISCARD_COLOR)
        r = 5 if p.status == Status.KEEP else 3.5
        off = "" if f.inside(p.value) else " (off the scale)"
        tip = f"#{p.id} {p.status} {objective.metric} {_fmt(p.value)}{off}: {p.description}"
        shape = "exp clipped" if off else "exp"
        out.append(f'<circle class="{shape}" data-id="{p.id}" data-status="{esc(p.status)}" '
                   f'cx="{f.x(p.x):.1f}" cy="{f.y(p.value):.1f}" r="{r}" fill="{color}" '
                   f'stroke="#ffffff" stroke-width="0.8"><title>{esc(tip)}</title></circle>')
    return out


def _svg_failed(panel: Panel, f: _Frame) -> list[str]:
    out = []
    y = f.top - 7
    for p in panel.failed:
        x = f.x(p.x)
        tip = f"#{p.id} {p.status}: {p.description}"
        out.append(f'<g class="failed" data-id="{p.id}" data-status="{esc(p.status)}">'
                   f'<title>{esc(tip)}</title>'
                   f'<path d="M{x - 3:.1f},{y - 3:.1f}L{x + 3:.1f},{y + 3:.1f}M{x - 3:.1f},'
                   f'{y + 3:.1f}L{x + 3:.1f},{y - 3:.1f}" stroke="{FAIL_COLOR}" '
                   'stroke-width="1.6"/></g>')
    return out


@dataclass(frozen=True)
class _Label:
    id: int
    text: str  # the description cut short, or "#id" where it would overlap another label
    full: str  # the whole description, for the tooltip
    x: float  # the kept dot, in pixels
    y: float
    leftward: bool  # runs to the left of the dot (past a third of the width)


CHAR_PX = 5.8  # about how wide a character of the labels' font is
LINE_PX = 12.0  # and how tall


def _labels(panel: Panel, objective: Objective, f: _Frame) -> list[_Label]:
    """Kept changes labelled toward the better side, leaning away from the nearer edge; a
    label that would run over one already placed shrinks to the experiment's number."""
    out: list[_Label] = []
    placed: list[tuple[tuple[float, float], tuple[float, float]]] = []  # label baselines
    down = objective.direction == "lower"
    for p in panel.points:
        if p.status != Status.KEEP or p.value is None:
            continue
        x, y = f.x(p.x), f.y(p.value)
        leftward = x - f.left > f.width * 0.35
        text = "baseline" if p.baseline else label(p.description)
        segment = _segment(x, y, text, down, leftward)
        if any(_distance(segment, other) < LINE_PX for other in placed):
            text = f"#{p.id}"
            segment = _segment(x, y, text, down, leftward)
        placed.append(segment)
        out.append(_Label(p.id, text, "baseline" if p.baseline else p.description, x, y,
                          leftward))
    return out


def _segment(x: float, y: float, text: str, down: bool,
             leftward: bool) -> tuple[tuple[float, float], tuple[float, float]]:
    """Where a label's text runs on screen, as a line from the dot."""
    angle = math.radians(_angle(down, leftward))
    length = len(text) * CHAR_PX * (-1 if leftward else 1)
    return (x, y), (x + length * math.cos(angle), y + length * math.sin(angle))


def _distance(a: tuple[tuple[float, float], tuple[float, float]],
              b: tuple[tuple[float, float], tuple[float, float]]) -> float:
    """The shortest distance between two line segments (0 where they cross)."""
    def cross(o: tuple[float, float], p: tuple[float, float], q: tuple[float, float]) -> float:
        return (p[0] - o[0]) * (q[1] - o[1]) - (p[1] - o[1]) * (q[0] - o[0])

    def to_segment(p: tuple[float, float], s: tuple[tuple[float, float],
                                                    tuple[float, float]]) -> float:
        (x1, y1), (x2, y2) = s
        dx, dy = x2 - x1, y2 - y1
        span = dx * dx + dy * dy
        t = 0.0 if span == 0 else max(0.0, min(1.0, ((p[0] - x1) * dx + (p[1] - y1) * dy)
                                                / span))
        return math.hypot(p[0] - (x1 + t * dx), p[1] - (y1 + t * dy))

    (a1, a2), (b1, b2) = a, b
    if cross(a1, a2, b1) * cross(a1, a2, b2) < 0 and cross(b1, b2, a1) * cross(b1, b2, a2) < 0:
        return 0.0
    return min(to_segment(a1, b), to_segment(a2, b), to_segment(b1, a), to_segment(b2, a))


def _angle(down: bool, leftward: bool) -> float:
    """The labels' slant in degrees, clockwise on screen (SVG's rotate)."""
    return (-20 if leftward else 20) if down else (20 if leftward else -20)


def _svg_labels(panel: Panel, objective: Objective, f: _Frame) -> list[str]:
    out = []
    down = objective.direction == "lower"
    for lab in _labels(panel, objective, f):
        dx = -7 if lab.leftward else 7
        x, y = lab.x + dx, lab.y + (12 if down else -6)
        cls = "baseline-label" if lab.full == "baseline" and lab.text == "baseline" \
            else "kept-label"
        out.append(f'<text class="{cls}" data-id="{lab.id}" x="{x:.1f}" y="{y:.1f}" '
                   f'text-anchor="{"end" if lab.leftward else "start"}" font-size="10.5" '
                   f'fill="#1b5e20" transform="rotate({_angle(down, lab.leftward)} {x:.1f} '
                   f'{y:.1f})" stroke="#ffffff" stroke-width="3" paint-order="stroke">'
                   f"<title>#{lab.id}: {esc(lab.full)}</title>{esc(lab.text)}</text>")
    return out


# -- PNG -----------------------------------------------------------------------------------

def png(rows: list[Row], objective: Objective, path: Path, title: str = "") -> Path:
    """The same chart as a PNG, drawn with matplotlib (imported here: only the report
    needs it)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    shown = panels(rows)
    fig, axes = plt.subplots(len(shown), 1, figsize=(12, 5 * len(shown)), squeeze=False)
    try:
        for i, panel in enumerate(shown):
            _png_panel(axes[i][0], panel, objective, title if i == 0 else "", len(shown) > 1)
        fig.tight_layout()
        fig.savefig(path, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path


def _png_panel(ax, panel: Panel, objective: Objective, title: str,  # noqa: ANN001
               several: bool) -> None:
    plain = {"parse_math": False}  # a `$` in a description is text, not mathtext
    heading = f"hardware class {panel.hw_class}: " if several else ""
    better = "lower" if objective.direction == "lower" else "higher"
    ax.set_title(_clean(f"{title}\n{heading}" if title else heading)
                 + f"{objective.metric}, {better} is better", loc="left", **plain)
    ax.set_xlabel("experiment (in order)")
    ax.set_ylabel(_clean(objective.metric), **plain)
    ax.set_xlim(0.5, max(panel.total, 1) + 0.5)
    if not panel.points and not panel.failed:
        ax.text(0.5, 0.5, "no experiment has a number yet", ha="center", va="center",
                transform=ax.transAxes, color="#757575")
        return
    y_lo, y_hi = y_range(panel, objective)
    ax.set_ylim(y_lo, y_hi)
    ax.grid(axis="y", color="#eeeeee")
    clip = [min(max(p.value or 0.0, y_lo), y_hi) for p in panel.points]
    for status, color, size in ((Status.DISCARD, DISCARD_COLOR, 18),
                                (Status.CHECKS_FAILED, CHECKS_COLOR, 18),
                                (Status.CONFIRM, CONFIRM_COLOR, 22),
                                (Status.KEEP, KEEP_COLOR, 40)):
        xs = [p.x for p in panel.points if p.status == status]
        ys = [v for p, v in zip(panel.points, clip, strict=True) if p.status == status]
        if xs:
            ax.scatter(xs, ys, s=size, color=color, zorder=3, label=str(status))
    steps = panel.best_steps(objective)
    if steps:
        xs = [x for x, _ in steps] + [panel.total + 0.5]
        ys = [v for _, v in steps] + [steps[-1][1]]
        ax.step(xs, ys, where="post", color=KEEP_COLOR, alpha=0.7, linewidth=2,
                label="running best")
    if panel.failed:
        ax.scatter([p.x for p in panel.failed], [y_hi] * len(panel.failed), marker="x",
                   color=FAIL_COLOR, clip_on=False, zorder=3, label="failed")
    down = objective.direction == "lower"
    # The same labels as the SVG's, decided on its default frame.
    frame = _Frame(MARGIN_LEFT, MARGIN_TOP, 960 - MARGIN_LEFT - MARGIN_RIGHT,
                   420 - MARGIN_TOP - MARGIN_BOTTOM, max(panel.total, 1), y_lo, y_hi)
    at = {p.id: p for p in panel.points}
    for lab in _labels(panel, objective, frame):
        p = at[lab.id]
        ax.annotate(_clean(lab.text), (p.x, min(max(p.value or 0.0, y_lo), y_hi)),
                    textcoords="offset points", xytext=(-5 if lab.leftward else 5,
                                                        -8 if down else 5),
                    ha="right" if lab.leftward else "left", va="center", fontsize=8,
                    color="#1b5e20", rotation=-_angle(down, lab.leftward),
                    rotation_mode="anchor", annotation_clip=False, **plain)
    ax.legend(loc="upper right", fontsize=8)
