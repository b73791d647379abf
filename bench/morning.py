"""The morning report and the dashboard on a deep tag: do they stay quick as the ledger grows?

For tags of R finished experiments (a long random search's history, written as
bench/overhead.py's --ledger-rows does: real commits, keeps confirmed by repeats, crashes,
rejected proposals), time

- report: `overnight report` (report.html with its SVG chart and the kept diffs, and
  progress.png through matplotlib);
- dash state: what the dashboard sends on every ledger change (`/api/state`, as JSON);
- dash chart: the chart the page reloads on every change (`/chart.svg`);

against the baseline measured in the same run on the same ledger: `overnight export` (the
tag's rows read and written as results.tsv), the cheapest whole-tag read there is.

    python bench/morning.py                    # R = 1000 and 10000
    python bench/morning.py --rows 300         # a quick look

Targets: at SkyPilot's scale (~910 experiments a night, one finishing every ~30 s) the page's
refresh (state + chart) stays under a second; the report, written at checkpoints and at the
end, under 10 s at 10,000 experiments.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import TAG, machine, make_repo, overnight_spec, prefill, workload_command  # noqa: E402

from overnight.dashboard import Dash  # noqa: E402
from overnight.ledger import export_tsv  # noqa: E402
from overnight.morning import write_report  # noqa: E402
from overnight.workspace import Workspace  # noqa: E402

SPEC = """\
[objective]
metric = "val_loss"
direction = "lower"

[run]
command = "{command}"
budget_seconds = 60
timeout_seconds = 120
sandbox = "none"

[files]
editable = ["train.py"]
protected = ["run.sh"]
"""


def timed(fn, repeat: int = 3) -> tuple[float, object]:  # noqa: ANN001
    """The best of `repeat` wall times (seconds) of fn(), and its last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def measure(root: Path, rows: int) -> dict[str, float]:
    command = workload_command("python")
    make_repo(root)
    (root / "overnight.toml").write_text(SPEC.format(command=command))
    import subprocess

    subprocess.run(["git", "add", "overnight.toml"], cwd=root, check=True)
    subprocess.run(["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm",
                    "spec"], cwd=root, check=True)
    spec = overnight_spec(command, 1, seed=1, sandbox="none")
    prefill(root, spec, root / ".overnight" / "ledger.sqlite", rows, seed=1,
            head=root / ".git" / "overnight" / "ledger-head")
    ws = Workspace.open(root)
    dash = Dash(ws, TAG, "token", set())
    export_s, tsv = timed(lambda: export_tsv(ws.tag_rows(TAG), "val_loss"))
    report_s, page = timed(lambda: write_report(ws, TAG), repeat=2)
    state_s, state = timed(lambda: json.dumps(dash.state(TAG)))
    chart_s, svg = timed(lambda: dash.chart(TAG))
    return {"rows": len(ws.tag_rows(TAG)), "export": export_s, "report": report_s,
            "report_kb": page.stat().st_size / 1024, "state": state_s,
            "state_kb": len(state) / 1024, "chart": chart_s, "chart_kb": len(svg) / 1024,
            "tsv_kb": len(tsv) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 10000])
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"{'experiments':>11} {'export (baseline)':>18} {'report':>16} {'dash state':>18} "
          f"{'dash chart':>16} {'refresh/export':>15}")
    with tempfile.TemporaryDirectory(prefix="bench-morning-") as tmp:
        for n in args.rows:
            m = measure(Path(tmp) / f"r{n}", n)
            refresh = m["state"] + m["chart"]
            print(f"{m['rows']:>11} {m['export'] * 1000:>9.0f} ms {m['tsv_kb']:>5.0f} kB "
                  f"{m['report']:>6.2f} s {m['report_kb']:>5.0f} kB "
                  f"{m['state'] * 1000:>7.0f} ms {m['state_kb']:>6.0f} kB "
                  f"{m['chart'] * 1000:>6.0f} ms {m['chart_kb']:>5.0f} kB "
                  f"{refresh / m['export']:>14.1f}x")
            verdict = []
            if m["rows"] <= 2000:
                verdict.append(f"page refresh {refresh:.2f} s (target < 1 s): "
                               f"{'ok' if refresh < 1 else 'OVER'}")
            if m["rows"] >= 5000:
                verdict.append(f"report {m['report']:.1f} s (target < 10 s): "
                               f"{'ok' if m['report'] < 10 else 'OVER'}")
            if verdict:
                print(" " * 12 + "; ".join(verdict))


if __name__ == "__main__":
    main()
