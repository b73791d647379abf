"""The `overnight` command: thin Typer commands over the rooms that do the work."""

from __future__ import annotations

import errno
import functools
import signal
import sqlite3
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from overnight import __version__
from overnight.errors import ConfigError, IntegrityHalt, OvernightError
from overnight.text import printable

app = typer.Typer(
    name="overnight",
    help="Autonomous research loops you can leave alone overnight: a proposer edits your "
    "script, every candidate runs under a fixed budget, real improvements are kept on the "
    "git branch overnight/TAG, and everything is recorded in .overnight/ledger.sqlite.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
console = Console(soft_wrap=True)  # long lines stay whole in logs
err_console = Console(stderr=True, soft_wrap=True)

RepoOpt = Annotated[Path, typer.Option("--repo", "-C", help="Repository to work in.",
                                       show_default=False)]
TagOpt = Annotated[str | None, typer.Option("--tag", "-t",
                   help="Loop tag (branch overnight/TAG). Default: the most recent tag.")]


def _version(value: bool) -> None:
    if value:
        console.print(f"overnight {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version,
                                                is_eager=True, help="Show the version.")] = False
          ) -> None:
    pass


def command(fn):  # noqa: ANN001, ANN201
    """Register a command whose expected failures print one message and exit with their code."""

    @functools.wraps(fn)
    def guarded(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        try:
            try:
                return fn(*args, **kwargs)
            except typer.Exit:
                raise
            except Exception as e:
                translated = _environment_error(e, Path(kwargs.get("repo") or "."))
                if translated is None:
                    raise
                raise translated from e
        except OvernightError as e:
            err_console.print(f"[bold red]error:[/] {escape(printable(str(e)))}", highlight=False)
            raise typer.Exit(e.exit_code) from None

    return app.command()(guarded)


def _environment_error(e: Exception, repo: Path) -> OvernightError | None:
    """The last line of defence: a full disk, or a ledger or file that cannot be written,
    whatever raised it, becomes one message saying what to do. None: not such a failure."""
    from overnight.ledger import disk_full, unwritable
    from overnight.workspace import LEDGER_FILE, STATE_DIR

    if isinstance(e, (ConfigError, IntegrityHalt)):
        return None
    state = repo.resolve() / STATE_DIR
    if disk_full(state):  # whatever failed (git, SQLite, a log, a thread), this is why
        return OvernightError(f"the disk holding {state} is full: free space and run the same "
                              "command again; nothing recorded is lost")
    text = str(e).lower()
    if isinstance(e, sqlite3.OperationalError) and "readonly" in text:
        why = unwritable(state / LEDGER_FILE)
        return OvernightError(f"the ledger {state / LEDGER_FILE} cannot be written: "
                              f"{why or 'make it writable, then run the same command again'}")
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        where = Path(e.filename).parent if e.filename else state
        return OvernightError(f"the disk holding {where} is full: free space and run the same "
                              "command again; nothing recorded is lost")
    if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        what = e.filename or state
        why = "is on a read-only file system" if e.errno == errno.EROFS else \
            "cannot be written by this user (or is immutable: see `lsattr`)"
        return OvernightError(f"{what} {why}: make it writable, then run the same command again")
    return None


class Direction(str, Enum):
    lower = "lower"
    higher = "higher"


class Executor(str, Enum):
    local = "local"
    ray = "ray"


class Format(str, Enum):
    tsv = "tsv"
    jsonl = "jsonl"


@command
def init(
    command: Annotated[str | None, typer.Option(help="How to run one experiment. "
                       "Default: `python train.py` (`uv run train.py` with a uv.lock).")] = None,
    metric: Annotated[str | None, typer.Option(help="Metric the script prints. "
                      "Default: guessed from its print statements.")] = None,
    direction: Annotated[Direction | None, typer.Option(help="Is lower or higher better?")] = None,
    editable: Annotated[list[str] | None, typer.Option(help="File the proposer may edit "
                        "(repeatable). Default: train.py.")] = None,
    protected: Annotated[list[str] | None, typer.Option(help="File nobody may edit "
                         "(repeatable). Default: prepare.py if present.")] = None,
    pattern: Annotated[str | None, typer.Option(help="Regular expression with one group "
                       "around the number, for output that is not `metric: value` lines, e.g. "
                       "'val loss ([0-9.]+)'. Default: proposed from the script's prints.")]
    = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing overnight.toml.")] = False,
    repo: RepoOpt = Path("."),
) -> None:
    """Write overnight.toml for this repository and keep .overnight/ out of git.

    Reads the script: where the metric is printed (and the pattern that reads it), which
    interpreter imports what it imports, whether it reads OVERNIGHT_BUDGET_SECONDS, and which
    constants are worth searching, in which bounds; each choice is commented in the file.
    """
    from overnight.workspace import write_init

    init = write_init(repo, command, metric, direction.value if direction else None,
                      editable or [], protected or [], force, pattern)
    spec = init.spec
    console.print(escape(
        f"wrote {init.path}: {spec.objective.direction} {spec.objective.metric} is better; "
        f"runs `{spec.run.command}`; edits {', '.join(spec.files.editable)}"
        + (f"; protects {', '.join(spec.files.protected)}" if spec.files.protected else "")
        + (f"; searches {', '.join(spec.search.knobs)}" if spec.search.knobs else "")))
    for note in init.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    console.print("next: review it, `git add overnight.toml && git commit`, then `overnight run`")


@command
def run(
    max_experiments: Annotated[int | None, typer.Option("--max-experiments", "-n", min=1,
                               help="Stop after this many runs for the tag: the baseline's, "
                               "candidates' and confirm runs all count, rejected proposals "
                               "(which run nothing) do not; a resumed run counts what is "
                               "already done. Default: until stopped.")] = None,
    parallel: Annotated[int | None, typer.Option(min=1, help="Slots running at once "
                        "(overrides parallel in overnight.toml).")] = None,
    tag: TagOpt = None,
    budget: Annotated[float | None, typer.Option(min=0.001, help="Seconds per experiment "
                      "(overrides budget_seconds in overnight.toml).")] = None,
    executor: Annotated[Executor | None, typer.Option(
        help="Where experiments run: this machine's slots, or the Ray cluster of the [ray] "
        "section (overrides [run] executor).")] = None,
    accept_spec_change: Annotated[bool, typer.Option(
        "--accept-spec-change", help="Resume a tag although overnight.toml now measures "
        "differently (command, budget, objective, files...) than when its baseline ran; "
        "the change is recorded.")] = False,
    dash: Annotated[bool, typer.Option("--dash", help="Serve the live dashboard beside the "
                    "loop (as `overnight dash` would, on 127.0.0.1).")] = False,
    dash_port: Annotated[int, typer.Option(min=0, max=65535, help="The dashboard's port "
                         "with --dash.")] = 8765,
    detach: Annotated[bool, typer.Option("--detach", help="Run in the background, in a "
                      "session of its own: come back once the loop holds its tag and passed "
                      "its checks (or say why not). Follow it with `overnight status "
                      "--follow`, stop it with `overnight stop`.")] = False,
    repo: RepoOpt = Path("."),
) -> None:
    """Run the research loop: baseline first, then propose, run, judge, keep or revert.

    Ctrl-C kills running experiments and records them; running the same command
    again resumes the tag, redoing lost work and never counting anything twice.
    The loop outlives its terminal (a dropped SSH session, `| head`): everything it
    prints is also in .overnight/run.log.
    """
    from overnight.session import run_loop
    from overnight.terminal import outliving
    from overnight.workspace import STATE_DIR, Workspace

    ws = Workspace.open(repo)
    ws.repo.exclude(f"/{STATE_DIR}/")  # its log is there: never an untracked file
    if detach:
        from overnight.follow import detach as start_detached

        argv = [a for a in sys.argv[sys.argv.index("run") + 1:] if a != "--detach"] \
            if "run" in sys.argv else []
        raise typer.Exit(start_detached(ws.state, argv, ws.ledger, console, err_console,
                                        dash_port if dash else None))
    server = _dash_server(ws, tag, "127.0.0.1", dash_port) if dash else None
    with outliving(console, err_console, ws.repo.root / STATE_DIR / "run.log"):
        if server is not None:
            server.start()
            console.print(f"dashboard: {server.url}", highlight=False)
        try:
            outcome = run_loop(ws, console, tag, max_experiments, parallel, budget,
                               accept_spec_change=accept_spec_change,
                               executor_kind=executor.value if executor else None)
        finally:
            if server is not None:
                server.stop()
        _summary(ws, outcome.tag)
        console.print(f"stopped: {outcome.stopped_because}")
    if outcome.interrupted:
        raise typer.Exit(130)


def _summary(ws, tag: str) -> None:  # noqa: ANN001
    from overnight.report import status_view

    if ws.spec.run.sandbox == "none":
        err_console.print('[bold yellow]warning:[/] [run] sandbox = "none": experiments run '
                          "unboxed and could have read or changed anything overnight can; "
                          "`overnight doctor` says what this machine allows")
    ledger = ws.ledger()
    try:
        hw = ws.spec.hardware
        console.print(status_view(ledger, tag, ws.spec.objective, ws.spec.judge,
                                  hw.confirm or hw.reference))
    finally:
        ledger.close()


@command
def status(
    tag: TagOpt = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Then print the loop's "
                      "progress as it is recorded, until it stops (a loop started elsewhere: "
                      "--detach, another terminal).")] = False,
    repo: RepoOpt = Path("."),
) -> None:
    """Runs and candidates by status; baseline and best with their estimates, uncertainty
    and number of runs; the noise; what is confirming and running.

    Verifies the ledger first: exit 3 if it was changed outside overnight.
    """
    from overnight.workspace import Workspace, known_tag

    ws = Workspace.open(repo)
    ledger = ws.ledger()
    try:
        ledger.verify()
        if not ledger.tags():
            console.print("no experiments yet: start with `overnight run`")
            return
        tag = known_tag(ledger, tag)
    finally:
        ledger.close()
    _summary(ws, tag)
    _loop_line(ws, tag)
    if follow:
        from overnight.follow import follow as follow_loop

        try:
            follow_loop(ws.ledger, ws.state, tag, ws.spec.objective, console)
        except KeyboardInterrupt:
            pass


def _loop_line(ws, tag: str) -> None:  # noqa: ANN001
    """Whether a loop runs the tag now, and whether it is paused or waits for approval."""
    from overnight.human import loop_pid, loop_state

    pid = loop_pid(ws.state, tag)
    if pid is None:
        console.print("  loop        stopped (`overnight run` resumes the tag)")
        return
    ledger = ws.ledger()
    try:
        state = loop_state(ledger, tag)
    finally:
        ledger.close()
    if state.checkpoint:
        how = f"waiting at a checkpoint ({state.checkpoint}): `overnight approve` goes on"
    elif state.paused:
        how = "paused: what ran has finished or will; `overnight unpause` goes on"
    else:
        how = "running"
    console.print(escape(f"  loop        pid {pid}, {how}"), highlight=False)


@command
def export(
    format: Annotated[Format, typer.Option("--format", "-f", help="tsv: the autoresearch "
                      "results.tsv columns; jsonl: every field.")] = Format.tsv,
    output: Annotated[Path | None, typer.Option("--output", "-o",
                      help="Write here instead of standard output.")] = None,
    tag: TagOpt = None,
    repo: RepoOpt = Path("."),
) -> None:
    """Export the ledger of a tag as results.tsv (one row per decided candidate, its
    estimate as the metric) or JSONL (every row, repeats included, every field)."""
    from overnight.ledger import export_jsonl, export_tsv
    from overnight.workspace import Workspace

    ws = Workspace.open(repo)
    rows = ws.tag_rows(tag)
    if format == Format.tsv:
        text = export_tsv(rows, ws.spec.objective.metric)
        decided = text.count("\n") - 1  # less the header
        written = f"{decided} decided candidates"
    else:
        text = export_jsonl(rows)
        written = f"{len(rows)} experiments"
    if output:
        _write_output(output, text)
        err_console.print(f"wrote {written} to {escape(str(output))}")
    else:
        sys.stdout.write(printable(text) if sys.stdout.isatty() else text)


def _write_output(output: Path, text: str) -> None:
    if output.is_dir():
        raise ConfigError(f"--output {output} is a directory: name a file, e.g. "
                          f"--output {output / 'results.tsv'}")
    if not output.parent.is_dir():
        raise ConfigError(f"--output {output}: the directory {output.parent} does not exist: "
                          f"create it (`mkdir -p {output.parent}`) or write somewhere else")
    output.write_text(text)


@command
def hypotheses(tag: TagOpt = None, repo: RepoOpt = Path(".")) -> None:
    """The hypothesis log: every proposal's hypothesis, its outcome and the measured delta;
    for the grid strategy, each complete wave's main effects."""
    from overnight.report import hypotheses_view, wave_effects
    from overnight.workspace import Workspace

    ws = Workspace.open(repo)
    rows = ws.tag_rows(tag)
    console.print(hypotheses_view(rows, ws.spec.objective))
    for line in wave_effects(rows, ws.spec.objective):
        console.print(escape(line), highlight=False)


@command
def report(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the page "
                      "here (a file name, or a directory to hold it); progress.png goes "
                      "beside it. Default: .overnight/reports/TAG/report.html.")] = None,
    tag: TagOpt = None,
    repo: RepoOpt = Path("."),
) -> None:
    """The morning report: one self-contained HTML page (no network needed to view it) and
    progress.png beside it.

    The progress chart (every experiment, the running best, kept changes labelled; per
    hardware class when there are several), the kept improvements with their diffs and
    measured deltas (± when the judge has it), hypotheses and outcomes, what failed and
    why, throughput, cost and noise. Verifies the ledger first: exit 3 if it was changed
    outside overnight.
    """
    from overnight.morning import PNG_FILE, write_report
    from overnight.workspace import Workspace

    ws = Workspace.open(repo)
    page = write_report(ws, tag, output)
    console.print(escape(f"wrote {page}"), highlight=False)
    console.print(escape(f"wrote {page.parent / PNG_FILE}"), highlight=False)


@command
def steer(
    note: Annotated[str, typer.Argument(help="What the proposer should know or try, in words.")],
    tag: Annotated[str | None, typer.Option("--tag", "-t", help="Only for this tag. "
                   "Default: every tag.")] = None,
    repo: RepoOpt = Path("."),
) -> None:
    """Leave a note for the proposer; the next proposals of a running loop see it."""
    from overnight.workspace import Workspace

    ws = Workspace.open(repo)
    ledger = ws.ledger()
    try:
        ledger.add_note(note, tag)
    finally:
        ledger.close()
    console.print(f"noted for {'tag ' + tag if tag else 'every tag'}: {escape(note)}")


def _dash_server(ws, tag: str | None, host: str, port: int):  # noqa: ANN001, ANN202
    from overnight.dashboard import Server

    return Server(ws, tag, host, port)


@command
def dash(
    tag: TagOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on. Keep loopback; reach it "
                    "from elsewhere with `ssh -L 8765:127.0.0.1:8765 host`.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")]
    = 8765,
    repo: RepoOpt = Path("."),
) -> None:
    """The live dashboard: the progress chart updating as experiments finish, what runs on
    which slot with its log, the ledger (sortable; a row opens its diff and log), and the
    actions: pause, unpause, approve, stop, steer.

    Runs beside `overnight run` (or use `overnight run --dash`) until Ctrl-C. Actions need
    the token it prints (also in .overnight/dash.token, readable by you only); the URL it
    prints carries it. The page runs no command and shows nothing secret.
    """
    from overnight.workspace import Workspace, known_tag

    ws = Workspace.open(repo)
    ledger = ws.ledger()
    try:
        ledger.verify()  # exit 3 on a ledger changed behind overnight's back
        if tag is not None:
            known_tag(ledger, tag)
    finally:
        ledger.close()
    server = _dash_server(ws, tag, host, port)
    if host not in ("127.0.0.1", "localhost", "::1", "[::1]"):
        err_console.print(f"[bold yellow]warning:[/] listening on {escape(host)}: whoever "
                          "reaches it can read the ledger, diffs and logs (actions still need "
                          "the token)", highlight=False)
    console.print(f"dashboard: {server.url}", highlight=False)
    console.print(f"token in {ws.state / 'dash.token'}; Ctrl-C stops the dashboard (not the "
                  "loop)", highlight=False)
    try:
        server.serve()
    except KeyboardInterrupt:
        pass


def _act(action: str, tag: str | None, repo: Path, note: str = "") -> None:
    """Send an action to the loop running the tag (the dashboard sends the same ones)."""
    from overnight.human import request
    from overnight.workspace import Workspace, default_tag

    ws = Workspace.open(repo)
    ledger = ws.ledger()
    try:
        if not ledger.tags():
            raise ConfigError("no experiments yet: start with `overnight run`")
        tag = tag or default_tag(ledger)
        said = request(ledger, ws.state, tag, action, note, by="cli")
    finally:
        ledger.close()
    console.print(f"tag {escape(tag)}: {escape(said)}")


@command
def pause(tag: TagOpt = None, repo: RepoOpt = Path(".")) -> None:
    """Pause a running loop: what runs finishes and is judged, nothing new starts (no
    proposals either) until `overnight unpause`. Exit 2 when no loop runs the tag."""
    _act("pause", tag, repo)


@command
def unpause(tag: TagOpt = None, repo: RepoOpt = Path(".")) -> None:
    """Let a paused loop launch experiments again."""
    _act("unpause", tag, repo)


@command
def approve(
    note: Annotated[str | None, typer.Argument(help="A steering note for the proposer, "
                    "recorded with the approval (as `overnight steer` would).")] = None,
    tag: TagOpt = None,
    repo: RepoOpt = Path("."),
) -> None:
    """Approve the checkpoint a loop waits at ([human] checkpoint_every), optionally with a
    steering note; the loop goes on. Exit 2 when nothing waits for approval."""
    _act("approve", tag, repo, note or "")


@command
def stop(
    now: Annotated[bool, typer.Option("--now", help="Kill what runs instead of letting it "
                   "finish (as Ctrl-C would); the same `overnight run` resumes and redoes "
                   "it.")] = False,
    tag: TagOpt = None,
    repo: RepoOpt = Path("."),
) -> None:
    """Stop a running loop, wherever it was started: what runs finishes and is judged, then
    the loop ends. Exit 2 when no loop runs the tag."""
    _act("stop-now" if now else "stop", tag, repo)


def _row(ws, experiment_id: int):  # noqa: ANN001, ANN202
    ledger = ws.ledger()
    try:
        row = ledger.get(experiment_id)
    finally:
        ledger.close()
    if row is None:
        raise ConfigError(f"no experiment #{experiment_id}: `overnight export` lists them")
    return row


def _diff(ws, row) -> str:  # noqa: ANN001
    if not row.commit_sha or not row.parent:
        return ""
    return ws.repo.diff(row.parent, row.commit_sha)


@command
def show(experiment_id: Annotated[int, typer.Argument(metavar="ID")],
         repo: RepoOpt = Path(".")) -> None:
    """One experiment: description, diff against its parent, its estimate and runs, metrics,
    log tail, timings."""
    from overnight.report import show_view
    from overnight.workspace import Workspace

    ws = Workspace.open(repo)
    row = _row(ws, experiment_id)
    ledger = ws.ledger()
    try:
        candidate = ledger.get(row.repeat_of) if row.repeat_of is not None else None
        repeats = [r for r in ledger.experiments(row.tag) if r.repeat_of == row.id]
    finally:
        ledger.close()
    console.print(show_view(row, ws.spec.objective, _diff(ws, row), candidate=candidate,
                            repeats=repeats, judge_spec=ws.spec.judge))


@command
def diff(experiment_id: Annotated[int, typer.Argument(metavar="ID")],
         repo: RepoOpt = Path(".")) -> None:
    """The change an experiment made, as a git diff against its parent."""
    from overnight.workspace import Workspace

    ws = Workspace.open(repo)
    row = _row(ws, experiment_id)
    if row.is_baseline:
        err_console.print(f"#{experiment_id} is the baseline: HEAD, unchanged")
        return
    text = _diff(ws, row) + "\n"
    sys.stdout.write(printable(text) if sys.stdout.isatty() else text)


@command
def finalize(
    tag: TagOpt = None,
    verify: Annotated[int | None, typer.Option(
        min=1, metavar="N", help="First run the final tree and the baseline N times each, "
        "alternating, in the tag's box and budget, and report the gain with its "
        "uncertainty (recorded in the ledger as a finalize_verify event; the tag's "
        "decisions do not change).")] = None,
    force: Annotated[bool, typer.Option(help="Replace the branches an earlier finalize of "
                     "the tag made (without it they are left alone, and finalize exits 2 "
                     "when they differ).")] = False,
    repo: RepoOpt = Path("."),
) -> None:
    """Turn a tag's kept improvements into branches to review, from its baseline's commit.

    overnight-final/TAG: one commit per kept improvement, in order, each the diff against
    the one before, with its measured delta in the message. overnight-final/TAG-N-SLUG:
    change N alone on the baseline, for each change that applies without the ones before.
    Only refs are written: your working tree, index and checked-out branch stay as they are.
    Nothing is pushed anywhere: the branches are yours to push.
    """
    from overnight import finalize as fin
    from overnight.workspace import Workspace

    ws = Workspace.open(repo)
    objective = ws.spec.objective
    ledger = ws.ledger()
    try:
        plan = fin.plan(ws.repo, ledger, objective, tag)
        for note in plan.notes:
            console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
        fin.check(ws.repo, plan, force)
        if verify:
            def say(text: str) -> None:
                console.print(escape(text), highlight=False)

            gain = fin.verify(ws, ledger, plan, verify, console, say)
            for line in fin.describe_gain(objective, plan, gain):
                console.print(escape(line), highlight=False)
        written, removed = fin.write(ws.repo, plan)
    finally:
        ledger.close()
    for line in fin.describe(plan, written, removed, objective):
        console.print(escape(line), highlight=False)


@command
def demo(
    directory: Annotated[Path, typer.Argument(help="Where to create the demo repository.")]
    = Path("overnight-demo"),
    max_experiments: Annotated[int, typer.Option("--max-experiments", "-n", min=1,
                               help="Runs, the baseline's and confirm runs included.")] = 10,
    budget: Annotated[float, typer.Option(min=1, help="Training seconds per experiment.")] = 20,
) -> None:
    """Train a tiny GPT on CPU or GPU and improve it with the search proposer.

    No API key, no GPU and no network needed. Running it again resumes in the same directory.
    """
    from overnight import demo as demo_mod
    from overnight.session import run_loop
    from overnight.workspace import Workspace

    created = demo_mod.create(directory)
    console.print(f"{'created' if created else 'resuming'} the tinygpt demo in {directory}")
    ws = Workspace.open(directory)
    outcome = run_loop(ws, console, "demo", max_experiments, None, budget)
    _summary(ws, outcome.tag)
    me = _this_command()
    console.print(escape(f"look around: cd {directory} && {me} status && {me} export && "
                         "git log --oneline overnight/demo"), highlight=False)
    if outcome.interrupted:
        raise typer.Exit(130)


def _this_command() -> str:
    """How to run this overnight again from a shell: `overnight` when that is what PATH
    finds, else its full path (a virtual environment that is not activated)."""
    import shlex
    import shutil

    me = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    found = shutil.which("overnight")
    if me is not None and me.name == "overnight" and me.is_file():
        if found and Path(found).resolve() == me:
            return "overnight"
        return shlex.quote(str(me))
    if found and Path(found).parent == Path(sys.executable).parent:
        return "overnight"
    return f"{shlex.quote(sys.executable)} -m overnight"


@command
def doctor(
    json_out: Annotated[bool, typer.Option("--json", help="Print the findings as JSON.")] = False,
) -> None:
    """What isolation this machine gives experiments, by which mechanism, and why not more.

    Exit 0 when the default (`sandbox = "auto"`) gives full isolation (bubblewrap), 1 when
    it gives partial isolation (one unprivileged uid per slot), 2 when `overnight run` would
    refuse to start without `sandbox = "none"`.
    """
    import json

    from overnight import sandbox

    p = sandbox.probe()
    best = p.best()
    if json_out:
        sys.stdout.write(json.dumps(p.to_json(), indent=2) + "\n")
    else:
        for line in sandbox.explain(p):
            console.print(escape(line), highlight=False)
    if best != "bwrap":
        raise typer.Exit(1 if best else 2)


def _sigterm(signum, frame) -> None:  # noqa: ANN001
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _sigterm)  # a job system's stop is handled like Ctrl-C
    # A shell starts background jobs with SIGINT ignored, and Python keeps that: a stop is
    # a stop however the loop was started.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    app()


if __name__ == "__main__":
    main()
