"""`overnight report`: the morning report of real loops, opened in a real headless Chromium;
the progress chart (chart.py) on hand-made rows; what a report says when there is little to
say."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from browser import page, screenshot
from conftest import create_repo, rows, run_cli, spec_toml, train_py

from overnight import chart
from overnight.ledger import Row
from overnight.morning import summary, write_report
from overnight.spec import Objective
from overnight.workspace import Workspace

TAG = "t"
LOWER = Objective(metric="val_loss")
HIGHER = Objective(metric="acc", direction="higher")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SVG = "{http://www.w3.org/2000/svg}"

# Hostile text from a proposer: markup that would run, and terminal escapes.
HOSTILE = "<img src=x onerror=\"document.title='pwned'\">"
HOSTILE_HYP = "</td><script>document.title='pwned'</script>\x1b]0;owned\x07"
# A learning rate in (0.0035, 0.005) exits non-zero: some perturbations crash.
CRASHY = "if 0.0035 < LEARNING_RATE < 0.005:\n    sys.exit(3)\n"


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real loop (perturb search, greedy judge): keeps, discards and crashes; then two rows
    a hostile proposer could have written (one kept), through the ledger's own API."""
    repo = create_repo(tmp_path_factory.mktemp("night") / "repo",
                       {"train.py": train_py(0.001, CRASHY)}, spec_toml("perturb"))
    out = run_cli("run", "-t", TAG, "-n", "10", cwd=repo)
    assert out.returncode == 0, out.stderr
    statuses = [r["status"] for r in rows(repo, TAG)]
    assert "crash" in statuses and statuses.count("keep") >= 2, statuses
    kept = [r for r in rows(repo, TAG) if r["status"] == "keep" and not r["is_baseline"]][-1]
    ledger = Workspace.open(repo).ledger()
    try:
        for status, metric in (("discard", 1.25), ("keep", kept["metric"] - 0.01)):
            ledger.insert(TAG, status, description=HOSTILE, hypothesis=HOSTILE_HYP,
                          parent=kept["parent"], commit_sha=kept["commit_sha"], metric=metric,
                          reason=HOSTILE, started_at=kept["finished_at"] + 1,
                          finished_at=kept["finished_at"] + 2, slot=0,
                          decided_at=kept["decided_at"] + 2,
                          kept_commit=kept["kept_commit"] if status == "keep" else None)
    finally:
        ledger.close()
    return repo


@pytest.fixture(scope="module")
def written(night: Path) -> Path:
    out = run_cli("report", "-t", TAG, cwd=night)
    assert out.returncode == 0, out.stderr
    page_path = night / ".overnight" / "reports" / TAG / "report.html"
    assert f"wrote {page_path}" in out.stdout
    assert f"wrote {page_path.parent / 'progress.png'}" in out.stdout
    return page_path


def plotted(repo: Path) -> list[dict]:
    """The ledger's candidates that have a number to draw."""
    return [r for r in rows(repo, TAG) if r["repeat_of"] is None and r["metric"] is not None
            and r["status"] in ("keep", "discard", "confirm", "checks_failed")]


def test_the_report_renders_in_chromium_and_lists_the_kept_experiments(night, written):
    requests: list[str] = []
    with page() as pg:
        pg.on("request", lambda req: requests.append(req.url))
        pg.goto(written.as_uri())
        assert pg.title() == f"overnight report: {TAG}"
        chart_svg = pg.locator(".chart svg")
        assert chart_svg.is_visible()
        box = chart_svg.bounding_box()
        assert box is not None and box["width"] > 400 and box["height"] > 200
        # Every experiment with a number is a dot; the kept changes are labelled.
        dots = pg.locator("svg circle.exp")
        assert dots.count() == len(plotted(night))
        ids = {int(dots.nth(i).get_attribute("data-id")) for i in range(dots.count())}
        assert ids == {r["id"] for r in plotted(night)}
        crashes = [r["id"] for r in rows(night, TAG) if r["status"] == "crash"]
        assert pg.locator("svg g.failed").count() == len(crashes)
        kept = [r["id"] for r in sorted(rows(night, TAG), key=lambda r: (
            r["decided_at"] or 0, r["id"])) if r["status"] == "keep" and not r["is_baseline"]]
        assert pg.locator("svg .kept-label").count() == len(kept)
        assert pg.locator("svg .kept-label").first.is_visible()
        # The table lists exactly the kept experiments, in the order kept, each with its diff.
        table_ids = [int(x) for x in pg.locator("#kept tbody tr").evaluate_all(
            "rows => rows.map(r => r.dataset.id)")]
        assert table_ids == kept
        first = pg.locator("#kept tbody tr").first
        first.locator("summary").click()
        diff = first.locator("pre").inner_text()
        assert "-LEARNING_RATE = 0.001" in diff and "+LEARNING_RATE = " in diff
        shot = screenshot(pg, "report")
        # Nothing was fetched but the page itself: it is whole offline.
        assert requests == [written.as_uri()]
    assert shot.read_bytes().startswith(PNG_MAGIC) and shot.stat().st_size > 10_000


def test_hostile_descriptions_show_as_text_and_never_run(night, written):
    with page() as pg:
        pg.goto(written.as_uri())
        assert pg.title() == f"overnight report: {TAG}"  # no handler ran
        assert pg.locator("img").count() == 0
        assert pg.locator("script").count() == 0
        text = pg.locator("body").inner_text()
        assert HOSTILE in text  # shown, as the text it is
        assert "</td><script>document.title='pwned'</script>]0;owned" not in text
        assert "</td><script>document.title='pwned'</script>" in text  # escapes stripped
        hostile = [r["id"] for r in rows(night, TAG) if r["description"] == HOSTILE]
        for rid in hostile:
            tip = pg.locator(f'svg circle.exp[data-id="{rid}"] title').text_content()
            assert HOSTILE in tip
        label = pg.locator(f'svg .kept-label[data-id="{hostile[-1]}"]')
        assert label.count() == 1 and label.text_content().endswith("…")
    html = written.read_text()
    assert "default-src 'none'" in html
    assert HOSTILE not in html and "\x1b" not in html and "\x07" not in html


def test_progress_png_is_a_real_png_beside_the_page(written):
    png = written.parent / "progress.png"
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert '<a href="progress.png">' in written.read_text()


def test_the_summary_is_plain_data_that_agrees_with_the_ledger(night):
    ws = Workspace.open(night)
    ledger = ws.ledger()
    try:
        data = summary(ledger, TAG, ws.spec)
    finally:
        ledger.close()
    assert json.loads(json.dumps(data)) == data
    rs = rows(night, TAG)
    assert [k["id"] for k in data["kept"]] == [r["id"] for r in rs
                                              if r["status"] == "keep" and not r["is_baseline"]]
    base = data["baseline"]
    for before, k in zip([base, *data["kept"]], data["kept"], strict=False):
        assert k["delta_vs_previous"] == pytest.approx(k["value"] - before["value"])
        assert k["delta_vs_baseline"] == pytest.approx(k["value"] - base["value"])
        assert k["spread"] is None  # greedy judging: no uncertainty to show
    assert [f["id"] for f in data["failures"]["crash"]] == [r["id"] for r in rs
                                                           if r["status"] == "crash"]
    assert all(f["reason"] == "exit code 3" for f in data["failures"]["crash"])
    assert len(data["hypotheses"]) == len(rs) - 1
    t = data["throughput"]
    assert t["slots"] == 1 and t["runs"] == len(rs)
    assert 0 < t["busy_fraction"] <= 1 and t["experiments_per_hour"] > 0
    assert data["cost"] == {"tokens_in": 0, "tokens_out": 0, "usd": 0, "kept_improvements":
                            len(data["kept"]), "usd_per_kept": 0.0, "tokens_per_kept": 0.0}
    assert data["noise"] == {} and data["classes"] == []
    assert data["spec"]["proposer"] == "search" and data["spec"]["strategy"] == "perturb"


def test_output_to_a_file_or_a_directory_and_the_errors(night, tmp_path):
    out = run_cli("report", "-t", TAG, "-o", str(tmp_path / "morning.html"), cwd=night)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "morning.html").is_file() and (tmp_path / "progress.png").is_file()
    folder = tmp_path / "folder"
    folder.mkdir()
    out = run_cli("report", "-t", TAG, "-o", str(folder), cwd=night)
    assert out.returncode == 0, out.stderr
    assert (folder / "report.html").is_file() and (folder / "progress.png").is_file()

    out = run_cli("report", "-t", TAG, "-o", str(tmp_path / "nowhere" / "r.html"), cwd=night)
    assert out.returncode == 2
    assert "nowhere does not exist" in out.stderr and "mkdir -p" in out.stderr
    out = run_cli("report", "-t", TAG, "-o", str(tmp_path / "progress.png"), cwd=night)
    assert out.returncode == 2 and "name the page otherwise" in out.stderr
    out = run_cli("report", "-t", "nosuch", cwd=night)
    assert out.returncode == 2
    assert "no experiments with tag 'nosuch'; tags: t" in out.stderr
    assert "Traceback" not in out.stderr
    out = run_cli("report", "--help", cwd=night)
    assert out.returncode == 0 and "progress.png" in out.stdout


def test_a_repository_with_no_experiments_says_so(make_repo, cli):
    repo = make_repo({"train.py": train_py()}, spec_toml("grid"))
    out = cli("report", cwd=repo)
    assert out.returncode == 2
    assert "no experiments yet" in out.stderr and "overnight run" in out.stderr


def test_a_tag_with_only_its_baseline(make_repo, cli):
    repo = make_repo({"train.py": train_py()}, spec_toml("grid"))
    out = cli("run", "-t", TAG, "-n", "1", cwd=repo)
    assert out.returncode == 0, out.stderr
    out = cli("report", cwd=repo)  # the most recent tag
    assert out.returncode == 0, out.stderr
    html = (repo / ".overnight" / "reports" / TAG / "report.html").read_text()
    assert "no improvement kept" in html
    assert html.count('class="exp"') == 1 and "kept-label" not in html
    assert "baseline-label" in html
    with page() as pg:
        pg.goto((repo / ".overnight" / "reports" / TAG / "report.html").as_uri())
        assert pg.locator("#kept tbody tr").count() == 0
        assert pg.locator("svg circle.exp").count() == 1
        screenshot(pg, "report-baseline-only")


def test_a_baseline_that_failed_is_reported_as_not_started(make_repo, cli):
    repo = make_repo({"train.py": train_py(0.001, "sys.exit(4)")}, spec_toml("grid"))
    out = cli("run", "-t", TAG, "-n", "3", cwd=repo)
    assert out.returncode == 2
    out = cli("report", "-t", TAG, cwd=repo)
    assert out.returncode == 0, out.stderr
    html = (repo / ".overnight" / "reports" / TAG / "report.html").read_text()
    assert "Not started: the baseline failed (1 try)" in html
    assert "no experiment has a number yet" in html
    assert "exit code 4" in html  # under what failed, and why


NOISY = "import random\nloss += random.gauss(0, 0.002)\n"


def test_a_noise_aware_tag_shows_uncertainty_and_noise(make_repo, cli):
    repo = make_repo({"train.py": train_py(0.001, NOISY)}, spec_toml("perturb", judge=""))
    out = cli("run", "-t", TAG, "-n", "14", cwd=repo, timeout=120)
    assert out.returncode == 0, out.stderr
    rs = rows(repo, TAG)
    assert any(r["repeat_of"] is not None for r in rs)
    page_path = write_report(Workspace.open(repo), TAG)
    html = page_path.read_text()
    keeps = [r for r in rs if r["status"] == "keep" and not r["is_baseline"]]
    assert keeps, [(r["status"], r["reason"]) for r in rs]
    for r in keeps:
        assert f"{r['spread']:.2g}" in html  # "± 0.0014 (2 runs)"
    assert "± is one standard error" in html
    assert "varies by σ" in html
    # Repeat runs are not dots: each candidate is one, at its estimate.
    assert html.count('class="exp"') + html.count('class="exp clipped"') == len(
        [r for r in rs if r["repeat_of"] is None and r["metric"] is not None
         and r["status"] in ("keep", "discard", "confirm")])
    with page() as pg:
        pg.goto(page_path.as_uri())
        assert pg.locator("#kept tbody tr").count() == len(keeps)
        screenshot(pg, "report-noise-aware")


# -- the chart on hand-made rows -----------------------------------------------------------

def row(rid: int, status: str, metric: float | None = None, *, desc: str = "",
        baseline: bool = False, hw: str = "", repeat_of: int | None = None,
        estimate: float | None = None) -> Row:
    return Row(id=rid, tag=TAG, parent="a" * 40, commit_sha="b" * 40, status=status,
               is_baseline=baseline, description=desc or f"change {rid}", hypothesis="",
               proposer="search", knobs={}, metric=metric, metrics={}, delta=None, reason="",
               returncode=0, peak_rss_mb=None, peak_vram_mb=None, slot=0, hardware="",
               log_path="", run_dir="", retry_of=None, kept_commit=None, runtime_knobs={},
               integrity={}, fingerprint="", tokens_in=0, tokens_out=0, cost_usd=0.0,
               created_at=float(rid), started_at=float(rid), finished_at=rid + 0.5,
               repeat_of=repeat_of, estimate=estimate, hw_class=hw)


def parse(svg: str) -> ET.Element:
    """The SVG as XML: it must be well-formed to be served as an image file."""
    return ET.fromstring(svg)


def having(root: ET.Element, tag: str, cls: str) -> list[ET.Element]:
    return [el for el in root.iter(f"{SVG}{tag}") if cls in el.get("class", "").split()]


def test_chart_of_no_rows_is_an_empty_chart():
    root = parse(chart.svg([], LOWER, title="nothing"))
    assert root.tag == f"{SVG}svg"
    assert having(root, "circle", "exp") == []
    assert "no experiment has a number yet" in "".join(root.itertext())


def test_chart_of_a_baseline_alone():
    root = parse(chart.svg([row(1, "keep", 1.3, baseline=True, desc="baseline")], LOWER))
    assert [c.get("data-id") for c in having(root, "circle", "exp")] == ["1"]
    assert having(root, "text", "kept-label") == []
    assert len(having(root, "text", "baseline-label")) == 1


def test_chart_when_everything_crashed_marks_each_failure():
    rs = [row(1, "keep", 1.3, baseline=True)] + [row(i, "crash") for i in range(2, 6)] \
        + [row(6, "timeout"), row(7, "tampered"), row(8, "rejected"), row(9, "lost")]
    root = parse(chart.svg(rs, LOWER))
    assert len(having(root, "circle", "exp")) == 1
    assert [g.get("data-id") for g in having(root, "g", "failed")] == [str(i) for i in
                                                                       range(2, 8)]
    text = "".join(root.itertext())
    assert "6 failed" in text and "2 rejected or lost (not drawn)" in text


def test_chart_draws_estimates_and_the_running_best_labels_each_keep():
    rs = [row(1, "keep", 1.0, baseline=True, estimate=1.01),
          row(2, "repeat", 1.02, repeat_of=1),  # a repeat run is no dot of its own
          row(3, "keep", 0.95, estimate=0.96, desc="wider MLP"),
          row(4, "discard", 0.99),
          row(5, "keep", 0.90, desc="x" * 80),
          row(6, "discard", 500.0)]  # wild: at the edge, not flattening the rest
    svg = chart.svg(rs, LOWER)
    root = parse(svg)
    dots = {c.get("data-id"): c for c in having(root, "circle", "exp")}
    assert sorted(dots) == ["1", "3", "4", "5", "6"]
    assert "clipped" in dots["6"].get("class") and "500" in dots["6"][0].text
    assert "0.96" in dots["3"][0].text  # the estimate, not the first run's 0.95
    labels = [t[0].tail for t in having(root, "text", "kept-label")]  # after the <title>
    assert labels == ["wider MLP", "x" * (chart.LABEL_CHARS - 1) + "…"]
    (best,) = having(root, "polyline", "best")
    assert len(best.get("points").split()) == 2 * 3  # three steps down, flat to the end
    # Higher is better: the same rows draw too, and the running best goes only up.
    higher = chart.panels(rs)[0].best_steps(HIGHER)
    assert [x for x, _ in higher] == [1]


def test_chart_with_several_hardware_classes_has_a_panel_each():
    rs = [row(1, "keep", 1.00, baseline=True, hw="fast", estimate=1.0),
          row(2, "repeat", 2.00, repeat_of=1, hw="big"),
          row(3, "discard", 1.10, hw="fast"),
          row(4, "keep", 0.90, hw="fast", desc="kept on fast"),
          row(5, "repeat", 1.80, repeat_of=4, hw="big"),
          row(6, "discard", 2.20, hw="big"),
          row(7, "crash", hw="big")]
    root = parse(chart.svg(rs, LOWER, height=300))
    assert root.get("height") == "600"
    panels = [g for g in root.iter(f"{SVG}g") if g.get("class") == "panel"]
    assert [p.get("data-class") for p in panels] == ["fast", "big"]
    fast, big = ({c.get("data-id"): c for c in having(p, "circle", "exp")} for p in panels)
    assert sorted(fast) == ["1", "3", "4"] and sorted(big) == ["1", "4", "6"]
    assert "1.8" in big["4"][0].text and "0.9" in fast["4"][0].text  # each class its own
    assert [g.get("data-id") for g in having(panels[1], "g", "failed")] == ["7"]
    assert "hardware class big" in "".join(panels[1].itertext())
    assert len(having(panels[1], "text", "kept-label")) == 1


def test_chart_text_is_escaped_and_stripped_of_controls():
    evil = "<script>alert(1)</script>\x1b[2J\x00 & \"q\" \ufffe]]>"
    rs = [row(1, "keep", 1.0, baseline=True), row(2, "keep", 0.9, desc=evil)]
    svg = chart.svg(rs, LOWER, title=evil)
    root = parse(svg)
    assert not list(root.iter(f"{SVG}script")) and not list(root.iter("script"))
    assert "<script>" not in svg and "\x1b" not in svg and "\x00" not in svg
    (lab,) = having(root, "text", "kept-label")
    tip, shown = lab[0].text, lab[0].tail  # <text><title>tip</title>shown</text>
    assert shown == "<script>alert(1)</script> & \"q\"…"
    assert "<script>alert(1)</script> & \"q\" ]]>" in tip


def test_png_of_hand_made_rows_with_mathtext_in_a_description(tmp_path):
    rs = [row(1, "keep", 0.5, baseline=True),
          row(2, "keep", 0.6, desc=r"$\frac{unclosed lr x2 $$ ^_^"),
          row(3, "crash"),
          row(4, "discard", 0.55, hw="")]
    path = chart.png(rs, HIGHER, tmp_path / "p.png", title="$x")
    assert path.read_bytes().startswith(PNG_MAGIC)
    assert chart.png([], LOWER, tmp_path / "empty.png").read_bytes().startswith(PNG_MAGIC)


def test_nice_ticks():
    assert chart.nice_ticks(0.93, 1.31, 5) == pytest.approx([1.0, 1.1, 1.2, 1.3])
    assert chart.nice_ticks(1, 60, 10) == [10, 20, 30, 40, 50, 60]
    assert chart.nice_ticks(2.0, 2.0) == [2.0]
