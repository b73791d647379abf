"""Judging under noise: greedy one-run judging vs the default judge, on known-truth objectives.

The workload is a train.py with four knobs whose true loss is a known smooth function (a
bowl with its minimum inside the search box; see TRUE below). Each run prints
`val_loss: <true value + Gaussian noise>`, the noise fresh from the OS in every run, its
sigma a fraction of the achievable improvement (true value at HEAD minus the optimum).
Both judges face the same proposer, overnight's built-in `perturb` search (it knows nothing
of the truth), with the same seeds and the same number of runs (`-n`, repeats included),
through the real `overnight run`: a fresh git repository per loop.

For each loop, from the ledger:
- keeps: candidates kept (the baseline not counted);
- false keeps: keeps whose true value is not better than the true value of the incumbent
  they replaced (the keep before them, in the order they were decided);
- gain: the share of the achievable true gain reached, (true(HEAD) - true(final incumbent))
  / (true(HEAD) - optimum);
- repeats: runs spent measuring again (the baseline's and confirm runs).

    python bench/noise.py                      # 5 seeds x 3 noise levels x 2 judges, 60 runs
    python bench/noise.py --seeds 10 --runs 60 --noise 0,0.02,0.05
    python bench/noise.py --quick              # a small smoke configuration

Target (issue 8): at noise 0.02 the default judge keeps false keeps under 5% and reaches
at least 90% of the achievable gain in 60 runs; at noise 0 it costs at most the baseline's
repeats.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# The truth: a weighted bowl in (log10 LR, log10 WD, WARMUP, DROPOUT), minimum 1.0 at OPT.
OPT = {"LR": 3e-3, "WD": 0.05, "WARMUP": 0.1, "DROPOUT": 0.15}
HEAD = {"LR": 3e-4, "WD": 0.5, "WARMUP": 0.4, "DROPOUT": 0.45}
BOUNDS = {"LR": (1e-5, 1e-1), "WD": (1e-4, 1.0), "WARMUP": (0.0, 0.5), "DROPOUT": (0.0, 0.5)}
WEIGHTS = {"LR": 0.3, "WD": 0.1, "WARMUP": 0.8, "DROPOUT": 0.4}
OPTIMUM = 1.0


def true_value(k: dict[str, float]) -> float:
    return (OPTIMUM
            + WEIGHTS["LR"] * math.log10(k["LR"] / OPT["LR"]) ** 2
            + WEIGHTS["WD"] * math.log10(k["WD"] / OPT["WD"]) ** 2
            + WEIGHTS["WARMUP"] * (k["WARMUP"] - OPT["WARMUP"]) ** 2 / 0.25
            + WEIGHTS["DROPOUT"] * (k["DROPOUT"] - OPT["DROPOUT"]) ** 2 / 0.25)


RANGE = true_value(HEAD) - OPTIMUM  # the achievable improvement

TRAIN = f"""\
import math
import os
import random

LR = {HEAD["LR"]}
WD = {HEAD["WD"]}
WARMUP = {HEAD["WARMUP"]}
DROPOUT = {HEAD["DROPOUT"]}

true = ({OPTIMUM} + {WEIGHTS["LR"]} * math.log10(LR / {OPT["LR"]}) ** 2
        + {WEIGHTS["WD"]} * math.log10(WD / {OPT["WD"]}) ** 2
        + {WEIGHTS["WARMUP"]} * (WARMUP - {OPT["WARMUP"]}) ** 2 / 0.25
        + {WEIGHTS["DROPOUT"]} * (DROPOUT - {OPT["DROPOUT"]}) ** 2 / 0.25)
sigma = float(os.environ["NOISE_SIGMA"])
print(f"val_loss: {{true + random.Random(os.urandom(16)).gauss(0, sigma):.8f}}")
"""


def spec(noise_sigma: float, seed: int, judge: str, parallel: int) -> str:
    bounds = ", ".join(f"{k} = [{lo}, {hi}]" for k, (lo, hi) in BOUNDS.items())
    return f"""\
[objective]
metric = "val_loss"
direction = "lower"

[run]
command = "{sys.executable} -S train.py"
budget_seconds = 30
timeout_seconds = 60
parallel = {parallel}
sandbox = "none"
attest = false
env = {{ NOISE_SIGMA = "{noise_sigma!r}" }}

[files]
editable = ["train.py"]

[judge]
mode = "{judge}"
{os.environ.get("BENCH_JUDGE_EXTRA", "").replace(";", chr(10))}

[search]
strategy = "perturb"
seed = {seed}
bounds = {{ {bounds} }}
"""


@dataclass
class Result:
    keeps: int
    false_keeps: int
    gain: float
    runs: int
    repeats: int
    seconds: float


GIT = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
       "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}


def one_loop(root: Path, noise: float, seed: int, judge: str, runs: int,
             parallel: int) -> Result:
    repo = root / f"{judge}-{noise}-{seed}"
    repo.mkdir(parents=True)
    (repo / "train.py").write_text(TRAIN)
    (repo / "overnight.toml").write_text(spec(noise * RANGE, seed, judge, parallel))
    env = {**os.environ, **GIT, "GIT_CEILING_DIRECTORIES": str(root)}
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "head"]):
        subprocess.run(["git", *args], cwd=repo, check=True, env=env)
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "overnight.cli", "run", "-t", "b", "-n",
                          str(runs)], cwd=repo, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - t0
    if out.returncode != 0:
        raise SystemExit(f"overnight run failed in {repo}:\n{out.stdout}\n{out.stderr}")
    return score(repo / ".overnight" / "ledger.sqlite", seconds)


def score(ledger: Path, seconds: float) -> Result:
    db = sqlite3.connect(ledger)
    db.row_factory = sqlite3.Row
    rows = [dict(r) for r in db.execute("SELECT * FROM experiments ORDER BY id")]
    db.close()
    ran = [r for r in rows if r["status"] not in ("rejected", "lost", "queued", "running")]
    # The order the keeps were made in: the branch's first-parent chain, oldest first.
    chain = subprocess.run(["git", "rev-list", "--first-parent", "--reverse", "overnight/b"],
                           cwd=ledger.parent.parent, capture_output=True, text=True,
                           check=True).stdout.split()
    by_commit = {r["kept_commit"]: r for r in rows if r["status"] == "keep"}
    keeps = [by_commit[c] for c in chain if c in by_commit]
    truths = [true_value({**HEAD, **json.loads(r["knobs"])}) for r in keeps]
    pairs = zip(truths, truths[1:], strict=False)
    false_keeps = sum(1 for before, after in pairs if after >= before)
    final = truths[-1] if truths else true_value(HEAD)
    return Result(keeps=len(keeps) - 1, false_keeps=false_keeps,
                  gain=(true_value(HEAD) - final) / RANGE, runs=len(ran),
                  repeats=sum(1 for r in ran if r["repeat_of"] is not None), seconds=seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5, help="loops per cell (default 5)")
    ap.add_argument("--runs", type=int, default=60, help="runs per loop, repeats included")
    ap.add_argument("--noise", default="0,0.02,0.05",
                    help="noise sigmas as fractions of the achievable improvement")
    ap.add_argument("--parallel", type=int, default=2, help="slots per loop (default 2)")
    ap.add_argument("--jobs", type=int, default=2, help="loops at once (default 2)")
    ap.add_argument("--quick", action="store_true", help="1 seed, 16 runs, noise 0.02")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.runs, args.noise = 1, 16, "0.02"
    levels = [float(x) for x in args.noise.split(",")]
    judges = ["greedy", "confirm"]
    cells = [(n, j, s) for n in levels for j in judges for s in range(args.seeds)]
    print(f"{len(cells)} loops of {args.runs} runs: noise {levels} x judges {judges} x "
          f"{args.seeds} seeds; achievable improvement {RANGE:.4f}", flush=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="overnight-noise-") as tmp, \
            ThreadPoolExecutor(args.jobs) as pool:
        futures = {c: pool.submit(one_loop, Path(tmp), c[0], c[2], c[1], args.runs,
                                  args.parallel) for c in cells}
        results = {c: f.result() for c, f in futures.items()}
    print()
    head = (f"{'noise':>6} {'judge':<8} {'keeps':>6} {'false keeps':>12} {'false %':>8} "
            f"{'gain reached':>13} {'runs':>5} {'repeats':>8}")
    print(head)
    print("-" * len(head))
    for n in levels:
        for j in judges:
            rs = [results[(n, j, s)] for s in range(args.seeds)]
            keeps = sum(r.keeps for r in rs)
            false = sum(r.false_keeps for r in rs)
            pct = 100 * false / keeps if keeps else 0.0
            gain = 100 * sum(r.gain for r in rs) / len(rs)
            runs = sum(r.runs for r in rs) / len(rs)
            repeats = sum(r.repeats for r in rs) / len(rs)
            print(f"{n:>6g} {j:<8} {keeps / len(rs):>6.1f} {false / len(rs):>12.1f} "
                  f"{pct:>7.1f}% {gain:>12.1f}% {runs:>5.0f} {repeats:>8.1f}")
    print(f"\nper loop, averaged over {args.seeds} seed(s); keeps and false keeps summed before "
          f"the %. {time.monotonic() - t0:.0f}s wall.")


if __name__ == "__main__":
    main()
