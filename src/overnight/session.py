"""One `overnight run` session: spec overrides, the box, executor, proposer, reporter, loop.

(The runner, which runs one candidate, is `executors/runner.py`.)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from rich.console import Console

from overnight import sandbox
from overnight.errors import ConfigError
from overnight.executors import cgroups
from overnight.executors.local import LocalExecutor, resolve_slots
from overnight.morning import write_report
from overnight.proposers import make_proposer
from overnight.proposers.prompt import program_conflicts
from overnight.report import ConsoleReporter
from overnight.scheduler import Loop, Outcome
from overnight.spec import Spec
from overnight.workspace import Workspace, check_tag, default_tag

USER_RUNS = "/var/tmp"  # sandbox "user": run directories outside the repository


def runs_root(ws: Workspace, box: str) -> Path:
    """Where run directories go: `.overnight/runs`, or, when runs are another uid's (sandbox
    "user"), a directory outside the repository that uid can reach and nothing else of ours
    is in ($OVERNIGHT_USER_RUNS, default /var/tmp)."""
    if box != "user":
        return ws.state / "runs"
    root = user_runs(ws)
    root.mkdir(mode=0o711, parents=True, exist_ok=True)
    root.chmod(0o711)
    return root


def user_runs(ws: Workspace) -> Path:
    """The run directories of sandbox "user" for this repository (not created here)."""
    key = hashlib.sha256(str(ws.repo.root).encode()).hexdigest()[:16]
    return Path(os.environ.get("OVERNIGHT_USER_RUNS") or USER_RUNS) / f"overnight-runs-{key}"


def run_loop(ws: Workspace, console: Console, tag: str | None = None,
             max_experiments: int | None = None, parallel: int | None = None,
             budget: float | None = None, accept_spec_change: bool = False,
             executor_kind: str | None = None) -> Outcome:
    spec = ws.spec
    run = spec.run
    if executor_kind is not None:
        run = run.model_copy(update={"executor": executor_kind})
    if budget is not None:
        # A longer budget than the spec's timeout would be killed: stretch the timeout with it.
        timeout = max(run.timeout_seconds, budget * 2)
        run = run.model_copy(update={"budget_seconds": budget, "timeout_seconds": timeout})
    if parallel is not None:
        run = run.model_copy(update={"parallel": parallel})
    spec = spec.model_copy(update={"run": run})
    ws.preflight()
    leftovers = cgroups.sweep()  # what a harness killed with -9 left behind
    ledger = ws.ledger()
    try:
        tag = check_tag(tag or default_tag(ledger))
        executor, where = _executor(spec, run, parallel, console)
        total = f", up to {max_experiments} runs" if max_experiments else ""
        box = sandbox.resolve(run.sandbox)
        console.print(f"[bold]overnight[/] tag [bold]{tag}[/] on {where}, budget "
                      f"{run.budget_seconds:g}s{total}, isolation {box}; branch "
                      f"overnight/{tag}; Ctrl-C stops cleanly and the same command resumes")
        if box == "none":
            console.print('[bold yellow]warning:[/] sandbox = "none": experiments run '
                          "unboxed and can read and change everything overnight can (the "
                          "ledger, .git, your secrets); tampering is detected, not prevented")
        unread = _budget_unread(ws, spec)
        if unread:
            console.print(f"[yellow]note:[/] {unread}", highlight=False)
        loops = _program_loops(ws, spec)
        if loops:
            console.print(f"[yellow]note:[/] {loops}", highlight=False)
        if leftovers:
            console.print(f"killed {leftovers} orphaned process(es) a stopped `overnight run` "
                          "left behind")
        reporter = ConsoleReporter(console, ledger, spec.objective, tag, max_experiments)
        runs = runs_root(ws, box)
        # A coding agent's checkouts, like runs, must be where its uid can reach them.
        scratch = ws.state / "scratch" if box != "user" else runs.with_name(runs.name + "-agents")
        loop = Loop(ws.repo, spec, ledger, executor, tag,
                    proposer_factory=lambda files: make_proposer(
                        spec, files, ws.repo, scratch),
                    max_experiments=max_experiments, reporter=reporter,
                    runs_root=runs, accept_spec_change=accept_spec_change, data=ws.data(),
                    results_tsv=ws.results_tsv(),
                    write_report=lambda: write_report(ws, tag))
        try:
            with reporter:
                return loop.run()
        except BaseException:
            executor.cancel_all()  # an unexpected failure must not leave experiments running
            raise
        finally:
            executor.shutdown()
    finally:
        ledger.close()


def _executor(spec, run, parallel: int | None, console: Console):  # noqa: ANN001, ANN202
    """The executor the spec asks for, and where its slots are, in words."""
    if run.executor == "ray":
        from overnight.executors.ray import RayExecutor

        if parallel is not None or run.parallel != 1:
            console.print("[yellow]warning:[/] [run] parallel is ignored under Ray: "
                          "[ray] max_slots (default: what the cluster holds) says how many "
                          "experiments run at once", highlight=False)
        executor = RayExecutor(spec.ray, run.kill_grace_seconds, spec.hardware)
        classes = executor.slot_classes
        shown = ", ".join(f"{classes.count(c)} {c}" for c in dict.fromkeys(classes))
        _check_classes(spec, set(classes))
        return executor, (f"{executor.slots} Ray slot(s) of "
                          f"{', '.join(f'{k} {v:g}' for k, v in spec.ray.slot_resources.items())}"
                          + (f" ({shown})" if len(set(classes)) > 1 else ""))
    if spec.hardware.tiers or spec.hardware.classes:
        raise ConfigError("[hardware] classes and screen/confirm tiers need the Ray executor "
                          '([run] executor = "ray"): one machine is one class')
    slots, gpus = resolve_slots(run.parallel)
    executor = LocalExecutor(slots, gpus)
    return executor, f"{slots} GPU slot(s)" if gpus else f"{slots} CPU slot(s)"


def _program_loops(ws: Workspace, spec: Spec) -> str | None:
    """Say so when program.md was written for an agent that runs its own loop."""
    if spec.proposer.kind == "search":
        return None
    try:
        text = (ws.repo.root / spec.proposer.program).read_text(errors="replace")
    except OSError:
        return None
    kinds = program_conflicts(text, kinds=True)
    if not kinds:
        return None
    return (f"{spec.proposer.program} tells an agent to run its own loop ({', '.join(kinds)}): "
            "the model is told that overnight owns those and that its contract wins; the rest "
            "is its research guidance")


def _check_classes(spec: Spec, present: set[str]) -> None:
    """The classes the spec names must have slots in the cluster."""
    hw = spec.hardware
    for role, name in (("reference", hw.reference), ("screen", hw.screen),
                       ("confirm", hw.confirm)):
        if name is not None and name not in present:
            raise ConfigError(f"[hardware] {role} = {name!r}, but the cluster has no slot of "
                              f"that class (it has {', '.join(sorted(present)) or 'none'}): "
                              "add such nodes or fix the name")


def _budget_unread(ws: Workspace, spec: Spec) -> str | None:
    """Say so when nothing the run executes reads OVERNIGHT_BUDGET_SECONDS: the budget the
    header shows is then not what limits a run (its iterations, or a protected constant)."""
    from overnight.survey import BUDGET_ENV

    paths = sorted(ws.repo.tracked("HEAD", spec.files.editable + spec.files.protected))
    texts = ws.repo.read_files("HEAD", paths).values()
    if any(BUDGET_ENV in t for t in texts) or BUDGET_ENV in spec.run.command:
        return None
    return (f"{', '.join(paths)} never read {BUDGET_ENV}: a run lasts as long as the script "
            f"decides, up to timeout_seconds ({spec.run.timeout_seconds:g} s), whatever the "
            "budget above says")
