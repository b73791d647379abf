"""The harness's own time per experiment: overnight vs a hand-written karpathy-style shell loop.

For a trivial workload (bench/workload/: val_loss from three knobs, a few ms of work), measure
per experiment

- dispatch: the slot is free (the previous experiment on it is recorded) until the next
  experiment's process starts;
- record: the experiment's process exits until its result is recorded (ledger row final,
  reporter told: the loop is ready for the next thing);

for overnight at --parallel 1 and 4 (the `Loop` driven from Python exactly as `overnight run`
wires it, with timing wrappers around the executor, ledger, repo and reporter: src/ is not
touched) and for a bash loop (sed the constants, `git commit -am`, run the command > log, grep
the metric, `git reset --hard HEAD~1` if not better, append to results.tsv) on an identical
fresh repository. The workload itself appends its start and exit instants to $BENCH_TIMES, so
both sides are timed by the same clock at the same points.

    python bench/overhead.py                  # 200 experiments per variant
    python bench/overhead.py --n 20           # a quick look
    python bench/overhead.py --rounds 3       # each variant 3 times, interleaved, pooled
    python bench/overhead.py --profile        # plus cProfile of overnight's loop
    python bench/overhead.py --work-seconds 1 --parallel 1 --n 30   # runs that take a while
    python bench/overhead.py --pad-lines 600 --parallel 1 --n 40    # a train.py of real length
    python bench/overhead.py --ledger-rows 10000 --parallel 2 --n 300  # a tag 10,000 deep

--ledger-rows R: the cost per experiment must not grow with the ledger. For each --parallel,
the same loop runs N experiments on a fresh tag and on a tag whose ledger already holds R
finished experiments (a random search's: discards, a few keeps confirmed by a repeat,
crashes, timeouts, rejected proposals; each with its knobs, fingerprint and candidate
commit, written through the Ledger API, the commits through one `git fast-import`), and the
two are printed side by side (unboxed by default, --sandbox: the harness's own time is what
could grow).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import platform
import pstats
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from overnight.executors.base import RunRequest, RunResult
from overnight.executors.local import LocalExecutor
from overnight.knobs import format_value, rewrite
from overnight.ledger import FINAL, Ledger, Row
from overnight.proposers import make_proposer
from overnight.proposers.base import fingerprint
from overnight.report import ConsoleReporter
from overnight.scheduler import Loop
from overnight.snapshot import Repo, branch_ref, candidate_ref
from overnight.spec import Spec, parse_spec
from overnight.status import NOT_COUNTED
from overnight.workspace import Workspace

WORKLOAD = Path(__file__).resolve().parent / "workload"
TAG = "bench"
TARGET_MS = 50.0  # the target for the median overhead per experiment

# Searched knobs and bounds: wide, log-uniform, 4 significant digits -> never runs dry.
BOUNDS = {
    "LEARNING_RATE": (1e-5, 1e-1),
    "WEIGHT_DECAY": (1e-4, 1.0),
    "WARMUP_RATIO": (1e-3, 0.5),
}

GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
    "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost",
}


# -- timing records --------------------------------------------------------------------------

@dataclass
class Exp:
    """Instants (time.time()) of one experiment."""

    key: str
    slot: int = 0
    status: str = ""
    start: float = 0.0  # the workload's first instruction
    exit: float = 0.0  # the workload's last instruction
    recorded: float = 0.0  # result recorded, loop free again: the slot is free from here
    marks: dict[str, float] = field(default_factory=dict)  # variant-specific sub-phases


@dataclass
class Variant:
    name: str
    slots: int
    wall_s: float
    exps: list[Exp]  # in the order they ran
    dispatch_phases: list[str]  # names of marks splitting [slot free, start]
    record_phases: list[str]  # names of marks splitting [exit, recorded]
    git_calls: Counter = field(default_factory=Counter)
    git_seconds: float = 0.0
    profile: str = ""


def read_times(path: Path) -> list[tuple[str, float, float]]:
    """`BENCH_TIMES <key> <start> <exit>` lines, as the workload prints them last."""
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("BENCH_TIMES "):
            _, key, t0, t1 = line.split()
            out.append((key, float(t0), float(t1)))
    return out


# -- the workload repository -----------------------------------------------------------------

def make_repo(root: Path, pad_lines: int = 0) -> None:
    root.mkdir(parents=True)
    for name in ("train.py", "run.sh"):
        shutil.copy(WORKLOAD / name, root / name)
    if pad_lines:
        with open(root / "train.py", "a") as f:
            f.write(padding(pad_lines))
    env = {**os.environ, **GIT_IDENTITY}
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "workload"]):
        subprocess.run(["git", *args], cwd=root, check=True, env=env)


def padding(lines: int) -> str:
    """Model-like code that is defined but never called: a train.py as long as a real one
    (hundreds of lines), for what reading and rewriting its knobs costs the harness."""
    out = ["\n\n# -- bench --pad-lines: code the workload never calls --\n"]
    i = 0
    while sum(s.count("\n") for s in out) < lines:
        out.append(
            f"\n\ndef block_{i}(x, w, b, eps=1e-5):\n"
            f"    h = [xi * wi + b for xi, wi in zip(x, w)]  # a linear layer, by hand\n"
            f"    m = sum(h) / len(h)\n"
            f"    v = sum((hi - m) ** 2 for hi in h) / len(h)\n"
            f"    return [(hi - m) / math.sqrt(v + eps) for hi in h]\n"
        )
        i += 1
    return "".join(out)


def workload_command(kind: str) -> str:
    if kind == "sh":
        return "bash run.sh"
    return f"{shlex.quote(sys.executable)} -S train.py"


# -- overnight, instrumented from the outside ------------------------------------------------

class Clock:
    """Per-experiment instants, written from the loop and the slot threads."""

    def __init__(self) -> None:
        self.marks: dict[int, dict[str, float]] = defaultdict(dict)
        self.info: dict[int, dict] = defaultdict(dict)
        self.lock = threading.Lock()

    def mark(self, eid: int, name: str, t: float | None = None) -> None:
        with self.lock:
            self.marks[eid].setdefault(name, time.time() if t is None else t)


class TimedLedger(Ledger):
    """The real ledger; notes when an experiment's final status is committed."""

    def __init__(self, path: Path, clock: Clock):
        super().__init__(path)
        self.clock = clock

    def update(self, experiment_id: int, **values) -> None:
        super().update(experiment_id, **values)
        if values.get("status") in FINAL:
            self.clock.mark(experiment_id, "ledger")


class CountingRepo(Repo):
    """The real git plumbing; counts and times the git processes it starts, per subcommand."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.calls: Counter = Counter()
        self.seconds = 0.0
        self._lock = threading.Lock()
        self._local = threading.local()  # git() calls made inside the current outer call

    def _timed(self, name: str, call, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        outer = not getattr(self._local, "depth", 0)
        if outer:
            self._local.inner = 0
        self._local.depth = getattr(self._local, "depth", 0) + 1
        t0 = time.perf_counter()
        try:
            return call(*args, **kw)
        finally:
            self._local.depth -= 1
            is_git = name.startswith("git ")
            with self._lock:
                if is_git or not self._local.inner:  # read_files, materialize: their own process
                    self.calls[name.removeprefix("git ")] += 1
                if outer:
                    self.seconds += time.perf_counter() - t0
            if is_git:
                self._local.inner += 1

    def git(self, *args: str, **kw) -> str:  # noqa: ANN003
        return self._timed(f"git {args[0]}", super().git, *args, **kw)

    def read_files(self, *args, **kw) -> dict[str, str]:  # noqa: ANN002, ANN003
        return self._timed("cat-file --batch", super().read_files, *args, **kw)

    def materialize(self, *args, **kw) -> None:  # noqa: ANN002, ANN003
        return self._timed("archive", super().materialize, *args, **kw)


class TimedExecutor:
    """The real LocalExecutor behind a proxy; notes when a run is submitted and what its
    result says. Everything else (slots, cancel_all, shutdown, ...) goes straight through."""

    def __init__(self, inner: LocalExecutor, clock: Clock):
        self.inner = inner
        self.clock = clock

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.inner, name)

    def submit(self, request: RunRequest) -> Future[RunResult]:
        eid = request.experiment_id
        self.clock.mark(eid, "submit")
        fut = self.inner.submit(request)

        def resolved(f: Future[RunResult]) -> None:
            r = f.result()
            self.clock.mark(eid, "popen", r.started_at)
            self.clock.mark(eid, "reaped", getattr(r, "exited_at", None) or r.finished_at)
            self.clock.mark(eid, "parsed", r.finished_at)

        fut.add_done_callback(resolved)
        return fut


class TimedReporter:
    """The real ConsoleReporter (non-terminal: one line per event, to /dev/null); notes when
    the loop is done with a finished experiment."""

    def __init__(self, inner: ConsoleReporter, clock: Clock):
        self.inner = inner
        self.clock = clock

    def started(self, row: Row) -> None:
        self.inner.started(row)

    def finished(self, row: Row, best: Row | None, done: int) -> None:
        self.inner.finished(row, best, done)
        self.clock.mark(row.id, "recorded")
        self.clock.info[row.id].update(slot=row.slot, status=row.status,
                                       created=row.created_at)

    def note(self, text: str) -> None:
        self.inner.note(text)


def overnight_spec(command: str, parallel: int, seed: int, sandbox: str = "auto") -> Spec:
    return parse_spec({
        "objective": {"metric": "val_loss", "direction": "lower"},
        "run": {"command": command, "budget_seconds": 60, "timeout_seconds": 120,
                "parallel": parallel, "sandbox": sandbox, "allow_env": ["BENCH_WORK_SECONDS"]},
        "files": {"editable": ["train.py"], "protected": ["run.sh"]},
        "search": {"strategy": "random", "knobs": list(BOUNDS),
                   "bounds": {k: list(v) for k, v in BOUNDS.items()}, "seed": seed},
    })


def run_overnight(root: Path, n: int, parallel: int, command: str, env: dict[str, str],
                  seed: int, pad_lines: int = 0, profile: bool = False,
                  sandbox: str = "auto", ledger_rows: int = 0) -> Variant:
    """N experiments of the loop, timed; with ledger_rows, on a tag that already holds that
    many finished experiments (only the N new ones are measured)."""
    make_repo(root, pad_lines)
    os.environ.update(env)  # the runner passes LC_ALL on; BENCH_WORK_SECONDS is allowed
    spec = overnight_spec(command, parallel, seed, sandbox)
    Workspace(Repo(root), spec).preflight()  # what `overnight run` does first
    path = root / ".overnight" / "ledger.sqlite"
    last_old = prefill(root, spec, path, ledger_rows, seed) if ledger_rows else 0
    repo = CountingRepo(root)
    clock = Clock()
    ledger = TimedLedger(path, clock)
    before = ledger.count(TAG, exclude=tuple(NOT_COUNTED))
    executor = TimedExecutor(LocalExecutor(parallel, []), clock)
    devnull = open(os.devnull, "w")
    console = Console(file=devnull, force_terminal=False)
    reporter = TimedReporter(ConsoleReporter(console, ledger, spec.objective, TAG, n), clock)
    loop = Loop(repo, spec, ledger, executor, TAG,
                proposer_factory=lambda files: make_proposer(
                    spec, files, repo, root / ".overnight" / "scratch"),
                max_experiments=before + n, reporter=reporter,
                runs_root=root / ".overnight" / "runs")
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    try:
        if prof:
            prof.enable()
        outcome = loop.run()
        if prof:
            prof.disable()
    finally:
        executor.shutdown()
        wall = time.perf_counter() - t0
        ledger.close()
        devnull.close()
    if outcome.done != before + n:
        print(f"  note: overnight p{parallel} counted {outcome.done - before} experiments, asked "
              f"for {n} ({outcome.stopped_because})", flush=True)

    exps = []
    logs = sorted((root / ".overnight" / "runs" / TAG).glob("*/run.log"))
    for key, start, exit_ in (t for log in logs for t in read_times(log)):
        eid = int(key)
        if eid <= last_old:
            continue  # the prefill's baseline runs
        m, info = clock.marks[eid], clock.info[eid]
        marks = {"created": info["created"], **m}
        exps.append(Exp(key=key, slot=info["slot"], status=info["status"], start=start,
                        exit=exit_, recorded=m["recorded"], marks=marks))
    exps.sort(key=lambda e: e.start)
    text = ""
    if prof:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(30)
        buf2 = io.StringIO()
        pstats.Stats(prof, stream=buf2).sort_stats("tottime").print_stats(15)
        text = buf.getvalue() + buf2.getvalue()
    name = f"overnight p{parallel}" + ("" if sandbox == "auto" else f" {sandbox}")
    if ledger_rows:
        name += f" +{ledger_rows} rows"
    return Variant(
        name=name, slots=parallel, wall_s=wall, exps=exps,
        # slot free -> ledger row inserted (context + propose + check) -> submit (candidate
        # commit, refs, ledger) -> Popen (thread hand-off, git archive, extract) -> start
        dispatch_phases=["created", "submit", "popen"],
        # exit -> reaped (poll) -> parsed (log) -> ledger row final (wake, judge) -> recorded
        record_phases=["reaped", "parsed", "ledger"],
        git_calls=repo.calls, git_seconds=repo.seconds, profile=text,
    )


# -- a tag 10,000 experiments deep -----------------------------------------------------------

def prefill(root: Path, spec: Spec, path: Path, count: int, seed: int,
            head: Path | None = None) -> int:
    """Give tag `bench` a history of `count` finished experiments, as a long random search
    leaves it; returns the last id written.

    The baseline runs for real (its runs, the pinned spec, the branch); then every row goes
    in through `Ledger.insert`, each candidate with a real commit and its ref (one `git
    fast-import` for all of them), each keep on the branch, confirmed by a repeat row.
    """
    repo = Repo(root)
    ledger = Ledger(path, head=head)  # head: where a Workspace keeps the chain's head
    executor = LocalExecutor(1, [])
    try:
        Loop(repo, spec, ledger, executor, TAG,
             proposer_factory=lambda files: make_proposer(spec, files, repo, root / "scratch"),
             max_experiments=spec.judge.baseline_runs,
             runs_root=root / ".overnight" / "runs").run()
    finally:
        executor.shutdown()
    base = ledger.last(TAG, "keep")
    text = repo.read_files(base.commit_sha, ["train.py"])["train.py"]
    rows = _history(count, base, text, seed, ledger.experiments(TAG)[-1].id + 1)
    _write_commits(root, repo.ref(branch_ref(TAG)), rows)
    marks = {}
    for line in (root.parent / f"{root.name}.marks").read_text().splitlines():
        mark, sha = line.split()
        marks[mark] = sha
    for row in rows:
        values = {k: v for k, v in row.items() if not k.startswith("_")}
        if "_mark" in row:
            values["commit_sha"] = marks[row["_mark"]]
        if "_kept" in row:
            values["kept_commit"] = marks[row["_kept"]]
        if "_parent" in row:
            values["parent"] = marks.get(row["_parent"], row["_parent"])
        rid = ledger.insert(TAG, row["_status"], **values)
        if rid != row["_id"]:
            raise SystemExit(f"prefill: the ledger gave id {rid}, expected {row['_id']}")
    ledger.close()
    return rows[-1]["_id"]


def _history(count: int, base: Row, text: str, seed: int, first_id: int) -> list[dict]:
    """The rows of a random search over the bench's knobs: about 2% rejected proposals, 3%
    crashes, 1% timeouts, the rest measured (a keep when it beats the incumbent)."""
    rng = random.Random(seed)
    best, parent = base.metric, base.commit_sha
    rows: list[dict] = []
    rid = first_id
    while len(rows) < count:
        knobs = {k: float(format_value(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
                 for k, (lo, hi) in BOUNDS.items()}
        files = rewrite(text, knobs)
        desc = ", ".join(f"{k} -> {format_value(v)}" for k, v in knobs.items())
        row: dict = dict(_id=rid, _parent=parent, description=desc, proposer="search",
                         hypothesis="random sample: a fresh point in the space", knobs=knobs)
        u = rng.random()
        now = time.time()
        if u < 0.02:
            row.update(_status="rejected", reason=f"duplicate of experiment #{rid - 1}: the "
                       "same files were already tried")
            rows.append(row)
            rid += 1
            continue
        row.update(_mark=f":{rid}", _text=files, fingerprint=fingerprint({"train.py": files}),
                   started_at=now - 0.05, finished_at=now, hardware="cpu")
        if u < 0.05:
            row.update(_status="crash", returncode=1, reason="exit code 1")
        elif u < 0.06:
            row.update(_status="timeout", returncode=-9, reason="timed out after 120 s")
        else:
            metric = round(1.0 + sum((math.log10(v) - c) ** 2 for v, c in
                                     zip(knobs.values(), (-2.5, -1.0, -1.5), strict=True)), 6)
            row.update(metric=metric, delta=metric - best, returncode=0,
                       metrics={"val_loss": metric})
            if metric < best:
                row.update(_status="keep", _kept=f":{rid + 10**9}", estimate=metric, runs=2,
                           spread=0.0, noise=0.0, reason="confirmed over 2 runs")
                rows.append(row)
                rows.append(dict(  # its confirm run: a row of its own, not an experiment
                    _id=rid + 1, _status="repeat", _same=row["_mark"], _parent=parent,
                    repeat_of=rid, description=f"repeat of #{rid}: {desc}", proposer="search",
                    knobs=knobs, metric=metric, metrics={"val_loss": metric}, returncode=0,
                    started_at=now, finished_at=now + 0.05))
                best, parent = metric, row["_mark"]
                rid += 2
                continue
            row.update(_status="discard", reason="not better than the incumbent")
        rows.append(row)
        rid += 1
    return rows[:count]


def _write_commits(root: Path, tip: str, rows: list[dict]) -> None:
    """Every candidate's commit and ref, every keep's commit on the branch: one fast-import."""
    out = io.BytesIO()

    def data(text: str) -> None:
        raw = text.encode()
        out.write(b"data %d\n%s\n" % (len(raw), raw))

    branch = tip
    for row in rows:
        if "_same" in row:  # a repeat runs its candidate's commit; it has a ref of its own
            out.write(b"reset %s\nfrom %s\n\n" % (candidate_ref(TAG, row["_id"]).encode(),
                                                   row["_same"].encode()))
            row["_mark"] = row["_same"]
            continue
        if "_mark" not in row:
            continue
        for mark, ref, parent, message in (
                (row["_mark"], candidate_ref(TAG, row["_id"]), row["_parent"],
                 f"{row['description']}\n\nOvernight-Tag: {TAG}\n"
                 f"Overnight-Experiment: {row['_id']}\n"),
                (row.get("_kept"), branch_ref(TAG), branch,
                 f"kept: {row['description']}\n\nOvernight-Tag: {TAG}\n")):
            if mark is None:
                continue
            out.write(b"commit %s\nmark %s\ncommitter bench <bench@localhost> %d +0000\n"
                      % (ref.encode(), mark.encode(), int(time.time())))
            data(message)
            out.write(b"from %s\nM 100644 inline train.py\n" % parent.encode())
            data(row["_text"])
            out.write(b"\n")
        if "_kept" in row:
            branch = row["_kept"]
    marks = root.parent / f"{root.name}.marks"
    subprocess.run(["git", "fast-import", "--quiet", f"--export-marks={marks}"], cwd=root,
                   input=out.getvalue(), check=True, env={**os.environ, **GIT_IDENTITY})


# -- the baseline: a karpathy-style bash loop ------------------------------------------------

SHELL_LOOP = r"""
# karpathy/autoresearch by hand: edit, commit, run, grep, keep or reset. Timestamps cost no fork.
cd "$REPO"
printf 'commit\tval_loss\tmemory_gb\tstatus\tdescription\n' > results.tsv
t_a=$EPOCHREALTIME
{command} > run.log 2>&1
grep '^BENCH_TIMES' run.log >> "$BENCH_TIMES"
t_c=$EPOCHREALTIME
best=$(grep '^val_loss:' run.log | cut -d' ' -f2)
printf '%s\t%s\t0.0\tkeep\tbaseline\n' "$(git rev-parse --short HEAD)" "$best" >> results.tsv
echo "$t_a $t_a $t_c $EPOCHREALTIME keep" >> "$PHASES"
while read -r lr wd wu; do
  t_a=$EPOCHREALTIME
  sed -i -e "s/^LEARNING_RATE = .*/LEARNING_RATE = $lr/" \
         -e "s/^WEIGHT_DECAY = .*/WEIGHT_DECAY = $wd/" \
         -e "s/^WARMUP_RATIO = .*/WARMUP_RATIO = $wu/" train.py
  git commit -qam "LEARNING_RATE=$lr WEIGHT_DECAY=$wd WARMUP_RATIO=$wu"
  t_b=$EPOCHREALTIME
  {command} > run.log 2>&1
  grep '^BENCH_TIMES' run.log >> "$BENCH_TIMES"
  t_c=$EPOCHREALTIME
  val=$(grep '^val_loss:' run.log | cut -d' ' -f2)
  commit=$(git rev-parse --short HEAD)
  if [ -n "$val" ] && awk -v a="$val" -v b="$best" 'BEGIN {{ exit !(a < b) }}'; then
    best=$val; status=keep
  else
    status=discard; git reset -q --hard HEAD~1
  fi
  printf '%s\t%s\t0.0\t%s\t%s\n' "$commit" "${{val:-0}}" "$status" "lr=$lr wd=$wd wu=$wu" \
    >> results.tsv
  echo "$t_a $t_b $t_c $EPOCHREALTIME $status" >> "$PHASES"
done < "$PROPOSALS"
"""


def shell_proposals(n: int, seed: int) -> list[tuple[str, ...]]:
    """Fresh log-uniform points with 4 significant digits, like the random search proposer."""
    rng = random.Random(seed)
    seen = {("0.001", "0.1", "0.05")}
    out: list[tuple[str, ...]] = []
    while len(out) < n:
        point = tuple(format_value(math.exp(rng.uniform(math.log(lo), math.log(hi))))
                      for lo, hi in BOUNDS.values())
        if point not in seen:
            seen.add(point)
            out.append(point)
    return out


def run_shell(root: Path, n: int, command: str, env: dict[str, str], seed: int,
              pad_lines: int = 0) -> Variant:
    make_repo(root, pad_lines)
    base = root.parent / root.name
    times, phases, proposals, script = (Path(f"{base}.{x}") for x in
                                        ("times", "phases", "proposals", "sh"))
    proposals.write_text("".join(" ".join(p) + "\n" for p in shell_proposals(n - 1, seed)))
    script.write_text(SHELL_LOOP.format(command=command))
    full_env = {**os.environ, **env, **GIT_IDENTITY, "REPO": str(root), "BENCH_TIMES": str(times),
                "PHASES": str(phases), "PROPOSALS": str(proposals)}
    t0 = time.perf_counter()
    subprocess.run(["bash", str(script)], env=full_env, check=True)
    wall = time.perf_counter() - t0

    runs = read_times(times)
    steps = [line.split() for line in phases.read_text().splitlines()]
    if len(runs) != n or len(steps) != n:
        raise SystemExit(f"shell loop: {len(runs)} runs and {len(steps)} iterations, expected {n}")
    exps = []
    for i, (run, step) in enumerate(zip(runs, steps, strict=True)):
        (_, start, exit_), (t_a, t_b, t_c, t_d, status) = run, step
        marks = {"loop": float(t_a), "committed": float(t_b), "returned": float(t_c)}
        exps.append(Exp(key=str(i), status=status, start=start, exit=exit_, recorded=float(t_d),
                        marks=marks))
    return Variant(name="shell loop p1", slots=1, wall_s=wall, exps=exps,
                   # slot free -> next iteration (read) -> sed + git commit -> start
                   dispatch_phases=["loop", "committed"],
                   # exit -> the shell gets control back -> grep, rev-parse, awk, reset, tsv
                   record_phases=["returned"])


# -- analysis --------------------------------------------------------------------------------

@dataclass
class Stats:
    """Seconds, pooled over the runs (rounds) of one variant."""

    runs: list[Variant]
    dispatch: list[float] = field(default_factory=list)  # experiments with a predecessor on
    record: list[float] = field(default_factory=list)  # ... their slot (dispatch, overhead)
    overhead: list[float] = field(default_factory=list)  # dispatch + record, same experiment
    workload: list[float] = field(default_factory=list)
    dispatch_parts: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    record_parts: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    first_quarter: list[float] = field(default_factory=list)  # dispatch + record, per run
    last_quarter: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.runs[0].name

    @property
    def n(self) -> int:
        return sum(len(v.exps) for v in self.runs)

    @property
    def wall_s(self) -> float:
        return sum(v.wall_s for v in self.runs)


def analyse(runs: list[Variant]) -> Stats:
    s = Stats(runs)
    for v in runs:
        last_on_slot: dict[int, Exp] = {}
        over = []
        for e in v.exps:
            s.workload.append(e.exit - e.start)
            s.record.append(e.recorded - e.exit)
            _split(s.record_parts, e.exit, [e.marks.get(k) for k in v.record_phases],
                   e.recorded, v.record_phases + ["recorded"])
            prev = last_on_slot.get(e.slot)
            if prev is not None:
                s.dispatch.append(e.start - prev.recorded)
                over.append(s.dispatch[-1] + s.record[-1])
                _split(s.dispatch_parts, prev.recorded,
                       [e.marks.get(k) for k in v.dispatch_phases], e.start,
                       v.dispatch_phases + ["start"])
            last_on_slot[e.slot] = e
        s.overhead += over
        q = max(1, len(over) // 4)
        s.first_quarter += over[:q]
        s.last_quarter += over[-q:]
    return s


def _split(into: dict[str, list[float]], first: float, middle: list[float | None], last: float,
           names: list[str]) -> None:
    points = [first, *middle, last]
    if any(p is None for p in points):
        return
    for name, a, b in zip(names, points, points[1:], strict=False):
        into[name].append(b - a)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def med(xs: list[float]) -> float:
    return pct(xs, 0.5)


def ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 1000:.1f}"


def table(stats: list[Stats]) -> str:
    w = max([14, *(len(s.name) for s in stats)])
    head = (f"{'variant':<{w}} {'n':>4} {'wall s':>6} {'exp/min':>7} | "
            f"{'dispatch med':>12} {'p90':>6} {'max':>6} | "
            f"{'record med':>10} {'p90':>6} {'max':>6} | "
            f"{'overhead med':>12} {'p90':>6} | {'workload':>8}")
    lines = [head, "-" * len(head)]
    for s in stats:
        lines.append(
            f"{s.name:<{w}} {s.n:>4} {s.wall_s:>6.1f} {s.n / s.wall_s * 60:>7.0f} | "
            f"{ms(med(s.dispatch)):>12} {ms(pct(s.dispatch, .9)):>6} {ms(max(s.dispatch)):>6} | "
            f"{ms(med(s.record)):>10} {ms(pct(s.record, .9)):>6} {ms(max(s.record)):>6} | "
            f"{ms(med(s.overhead)):>12} {ms(pct(s.overhead, .9)):>6} | "
            f"{ms(med(s.workload)):>8}"
        )
    return "\n".join(lines)


def breakdown(s: Stats) -> str:
    def parts(d: dict[str, list[float]]) -> str:
        return ", ".join(f"{k} {ms(med(xs))}" for k, xs in d.items())

    keeps = sum(1 for v in s.runs for e in v.exps if e.status == "keep")
    out = [f"{s.name}: {keeps} keeps of {s.n}; overhead median in the first/last quarter of a "
           f"run {ms(med(s.first_quarter))} / {ms(med(s.last_quarter))} ms",
           f"  dispatch, medians in ms from the slot being free up to: {parts(s.dispatch_parts)}",
           f"  record, medians in ms from the process exit up to:     {parts(s.record_parts)}"]
    calls = sum((v.git_calls for v in s.runs), Counter())
    if calls:
        git_s = sum(v.git_seconds for v in s.runs)
        per = ", ".join(f"{k} {c / s.n:.2f}" for k, c in calls.most_common())
        out.append(f"  git processes per experiment: {sum(calls.values()) / s.n:.1f} "
                   f"({git_s / s.n * 1000:.1f} ms): {per}")
    return "\n".join(out)


def steady_rate(s: Stats) -> float:
    """Experiments per second from the first start to the last result recorded (the loop's
    start-up, which reads the whole ledger once, is not in it)."""
    exps = [e for v in s.runs for e in v.exps]
    span = sum(max(e.recorded for e in v.exps) - min(e.start for e in v.exps)
               for v in s.runs if v.exps)
    return len(exps) / span if span > 0 else float("nan")


def growth_table(pairs: list[tuple[Stats, Stats]], rows: int) -> str:
    """Fresh tag vs a tag `rows` experiments deep, side by side, per slot count."""
    head = (f"{'slots':>5} | {'fresh: overhead med':>19} {'p90':>6} {'exp/s':>6} | "
            f"{f'+{rows} rows: overhead med':>25} {'p90':>6} {'exp/s':>6} | {'deep/fresh':>10} "
            f"| verdict")
    lines = [head, "-" * len(head)]
    for fresh, deep in pairs:
        a, b = med(fresh.overhead), med(deep.overhead)
        flat = b <= 1.25 * a + 0.002  # within a quarter, or 2 ms, of the fresh tag's
        lines.append(
            f"{fresh.runs[0].slots:>5} | {ms(a):>19} {ms(pct(fresh.overhead, .9)):>6} "
            f"{steady_rate(fresh):>6.1f} | {ms(b):>25} {ms(pct(deep.overhead, .9)):>6} "
            f"{steady_rate(deep):>6.1f} | {b / a:>10.2f} | {'flat' if flat else 'GROWS'}")
    return "\n".join(lines)


def main_growth(args: argparse.Namespace, command: str, env: dict[str, str], tmp: Path) -> None:
    """--ledger-rows: the same loop on a fresh tag and on a deep one, per --parallel."""
    results: dict[str, list[Variant]] = defaultdict(list)
    names: list[tuple[str, str]] = []
    for p in (int(x) for x in args.parallel.split(",")):
        for rows in (0, args.ledger_rows):
            name = f"p{p}+{rows}"
            if rows == 0:
                names.append((name, f"p{p}+{args.ledger_rows}"))
            for r in range(args.rounds):
                print(f"round {r + 1}: overnight p{p} {args.sandbox}, {rows} rows before ...",
                      flush=True)
                results[name].append(run_overnight(
                    tmp / f"overnight-p{p}-{rows}-{r}", args.n, p, command, env, args.seed + r,
                    args.pad_lines, sandbox=args.sandbox, ledger_rows=rows))
    pairs = [(analyse(results[a]), analyse(results[b])) for a, b in names]
    stats = [s for pair in pairs for s in pair]
    print()
    print(f"harness time per experiment in ms, `{command}`, sandbox {args.sandbox}, "
          f"n={args.n} x {args.rounds} round(s), on a fresh tag and on one whose ledger holds "
          f"{args.ledger_rows} finished experiments")
    print(table(stats))
    print()
    for s in stats:
        print(breakdown(s))
    print()
    print(growth_table(pairs, args.ledger_rows))


def machine() -> str:
    from overnight.executors.local import cpu_name

    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    git = subprocess.run(["git", "--version"], capture_output=True, text=True).stdout.strip()
    return (f"{cpu_name()}, nproc {nproc}, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, {git}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200,
                    help="experiments per variant and round, baseline included (default 200)")
    ap.add_argument("--parallel", default="1,4", help="overnight slot counts (default 1,4)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every variant this many times, in rotating order, and pool the "
                    "numbers (evens out a machine whose load drifts)")
    ap.add_argument("--workload", choices=("sh", "python"), default="sh",
                    help="sh: `bash run.sh` (bash + one awk); python: `python -S train.py`")
    ap.add_argument("--work-seconds", type=float, default=0.0,
                    help="make every run last this long (shows exit-polling latency)")
    ap.add_argument("--pad-lines", type=int, default=0,
                    help="pad train.py with this many lines of never-called code (a real "
                    "train.py is hundreds of lines; knob parsing cost grows with it)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--profile", action="store_true",
                    help="also run overnight p1 under cProfile and print the hot spots")
    ap.add_argument("--ledger-rows", type=int, default=0,
                    help="compare a fresh tag with one whose ledger already holds this many "
                    "finished experiments (does the cost per experiment grow with the ledger?)")
    ap.add_argument("--sandbox", choices=("none", "auto", "bwrap"), default="none",
                    help="the sandbox of the --ledger-rows runs (default none: the harness's "
                    "own time is what could grow)")
    ap.add_argument("--json", type=Path, help="write every instant measured to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temporary repositories")
    args = ap.parse_args()
    if args.n < 2:
        ap.error("--n must be >= 2 (the baseline and at least one candidate)")

    command = workload_command(args.workload)
    env = {"LC_ALL": "C", "BENCH_WORK_SECONDS": f"{args.work_seconds:g}"}
    tmp = Path(tempfile.mkdtemp(prefix="overnight-bench-"))
    print(f"machine: {machine()}")
    print(f"workload: `{command}` (+{args.work_seconds:g}s), train.py padded by "
          f"{args.pad_lines} lines, {args.n} experiments per variant, {args.rounds} round(s), "
          f"repos under {tmp}")

    if args.ledger_rows:
        try:
            main_growth(args, command, env, tmp)
        finally:
            if not args.keep:
                shutil.rmtree(tmp, ignore_errors=True)
        return

    def shell(r: int) -> Variant:
        return run_shell(tmp / f"shell-{r}", args.n, command, env, args.seed + r, args.pad_lines)

    def overnight(p: int, sandbox: str = "auto"):  # noqa: ANN202
        return lambda r: run_overnight(tmp / f"overnight-p{p}-{sandbox}-{r}", args.n, p,
                                       command, env, args.seed + r, args.pad_lines,
                                       sandbox=sandbox)

    makers = [("shell loop p1", shell)]
    makers += [(f"overnight p{p}", overnight(int(p))) for p in args.parallel.split(",")]
    # The cost of isolation: the same loop, unboxed, in the same run.
    makers.insert(2, ("overnight p1 none", overnight(1, "none")))
    results: dict[str, list[Variant]] = defaultdict(list)
    loads = []
    prof = None
    try:
        for r in range(args.rounds):
            order = makers[r % len(makers):] + makers[:r % len(makers)]
            for name, make in order:
                print(f"round {r + 1}: {name} ...", flush=True)
                before = os.getloadavg()[0]
                results[name].append(make(r))
                loads.append(f"{name} {before:.2f}/{os.getloadavg()[0]:.2f}")
        if args.profile:
            print("overnight p1 under cProfile ...", flush=True)
            prof = run_overnight(tmp / "overnight-profile", args.n, 1, command, env, args.seed,
                                 args.pad_lines, profile=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    stats = [analyse(results[name]) for name, _ in makers]
    print()
    print(f"harness time per experiment in ms, `{command}`, n={args.n} x {args.rounds} round(s)")
    print("dispatch: slot free -> process start; record: process exit -> result recorded; "
          "overhead: both, per experiment; workload: the process's own run time")
    print(table(stats))
    print()
    for s in stats:
        print(breakdown(s))
    print()
    shell_over = med(stats[0].overhead)
    by_name = {s.name: s for s in stats}
    for s in stats[1:]:
        over = med(s.overhead)
        ok = over < TARGET_MS / 1000
        print(f"target ({s.name}): median overhead {ms(over)} ms < {TARGET_MS:g} ms: "
              f"{'PASS' if ok else 'MISS'} (the shell loop: {ms(shell_over)} ms)")
    if "overnight p1" in by_name and "overnight p1 none" in by_name:
        cost = med(by_name["overnight p1"].overhead) - med(by_name["overnight p1 none"].overhead)
        print(f"isolation costs {ms(cost)} ms per experiment (overnight p1, boxed vs none)")
    print("1-minute load average before/after each run: " + ", ".join(loads))
    if prof is not None:
        print()
        print("overnight p1 under cProfile (slower than without; the loop's thread only):")
        print(breakdown(analyse([prof])))
        print(prof.profile)
    if args.json:
        args.json.write_text(json.dumps(
            [{"variant": v.name, "slots": v.slots, "wall_s": v.wall_s,
              "git_calls": dict(v.git_calls),
              "experiments": [e.__dict__ for e in v.exps]}
             for runs in results.values() for v in runs], indent=1))


if __name__ == "__main__":
    main()
