"""Agent proposer: an external coding agent (Claude Code, Codex, aider, ...) edits a checkout.

Each proposal runs `[agent] command` once, in a fresh checkout of the incumbent under
`scratch_root`, with `{prompt}` replaced by the shell-quoted task prompt (and `{prompt_file}`
by the path of a file holding it, for prompts too long for a command line). The harness, not
the agent, decides what the proposal is: it compares the checkout with the commit afterwards
and takes only the changes to editable files. Changes anywhere else are discarded and named
in the proposal's notes; a change to a protected region, no change, or a repeat of an earlier
experiment makes the proposal `rejected`.

The agent runs in its own process group, and the whole group is killed on timeout and after
it exits, so nothing it started outlives the proposal. Its output goes to
`<scratch_root>/<name>.log`, which is kept; the checkout is removed.
"""

from __future__ import annotations

import itertools
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from overnight import admission
from overnight.errors import ConfigError
from overnight.executors.runner import Launch, spawn
from overnight.integrity import Manifest, verify
from overnight.metrics import tail
from overnight.proposers.base import Context, Proposal, Proposer, Usage
from overnight.proposers.edits import (
    EditError,
    check_syntax,
    describe_edits,
    find_duplicate,
    knob_values,
    parse_fields,
    real_changes,
)
from overnight.proposers.prompt import AGENT_PROMPT_CHARS, task_prompt
from overnight.regions import check_edit
from overnight.sandbox import experiment_env, resolve
from overnight.snapshot import GitError, Repo, git_command
from overnight.spec import Spec

log = logging.getLogger(__name__)

ARG_MAX_BYTES = 120_000  # Linux refuses one argv string over 128 KiB (MAX_ARG_STRLEN)
MAX_NOTES = 20  # discarded paths named one by one; beyond that, a count
AGENT_SLOTS = range(520, 584)  # sandbox "user": the slot uids agents run as, apart from runs
TAIL_CHARS = 800  # of the agent's output, in the notes of a failed proposal


@dataclass(frozen=True)
class AgentRun:
    returncode: int | None  # None: killed on timeout
    seconds: float
    output: str  # everything the agent printed (stdout and stderr)
    log_path: Path


@dataclass(frozen=True)
class TreeChanges:
    """What the agent left in its checkout, compared with the commit."""

    edits: dict[str, str]  # editable path -> new text
    discarded: list[str]  # notes on changes that are not taken
    problem: str = ""  # a change that makes the proposal unusable (an editable file deleted)


class AgentProposer(Proposer):
    name = "agent"
    slow = True

    def __init__(self, spec: Spec, repo: Repo, scratch_root: Path) -> None:
        if spec.agent is None:
            raise ConfigError('the agent proposer needs an [agent] section in overnight.toml, '
                              'e.g. [agent] command = "claude -p {prompt}"')
        self.cfg = spec.agent
        self.spec = spec
        self.protected = tuple(spec.files.protected)
        self.kill_grace = spec.run.kill_grace_seconds
        self.repo = repo
        self.scratch_root = scratch_root
        self.isolation = resolve(spec.run.sandbox)
        self._swept = False
        self._agents = itertools.count()  # agents at once get uids of their own (sandbox user)

    def propose(self, ctx: Context) -> Proposal:
        self.scratch_root.mkdir(parents=True, exist_ok=True)
        if not self._swept:
            sweep(self.scratch_root)
            self._swept = True
        tree = Path(tempfile.mkdtemp(prefix=f"agent-{os.getpid()}-", dir=self.scratch_root))
        try:
            self.repo.materialize(ctx.incumbent.commit, tree)
            run = self._run(self._prompt(ctx), tree)
            return self._proposal(ctx, tree, run)
        finally:
            _remove(tree)

    # -- running the agent -------------------------------------------------------------

    def _prompt(self, ctx: Context) -> str:
        """The task prompt, short enough to pass on the command line when {prompt} is used."""
        limit = AGENT_PROMPT_CHARS
        prompt = task_prompt(ctx, limit)
        if "{prompt}" not in self.cfg.command:
            return prompt
        # Quoting and non-ASCII text make the argument longer than the prompt: measure it.
        while len(shlex.quote(prompt).encode()) > ARG_MAX_BYTES and limit > 10_000:
            limit = limit * 3 // 4
            prompt = task_prompt(ctx, limit)
        size = len(shlex.quote(prompt).encode())
        if size > ARG_MAX_BYTES:
            raise ConfigError(
                f"the agent's prompt is {size} bytes, too long for a command line even without "
                "the files: pass it in a file instead, with {prompt_file} in [agent] command "
                '(e.g. command = "claude -p < {prompt_file}")'
            )
        return prompt

    def _run(self, prompt: str, tree: Path) -> AgentRun:
        """The agent runs boxed like an experiment: its own checkout writable, the network
        reachable, only its own API key, no GPU, no view of the repository, `.overnight/` or
        other runs."""
        log_path = tree.parent / f"{tree.name}.log"
        prompt_file = tree.parent / f"{tree.name}.prompt.md"
        prompt_file.write_text(prompt)
        # {prompt_file} first: the prompt text itself may contain the string "{prompt_file}".
        command = self.cfg.command.replace("{prompt_file}", shlex.quote(str(prompt_file)))
        command = command.replace("{prompt}", shlex.quote(prompt))
        env, _ = experiment_env(dict(os.environ), self.cfg.allow_env)
        # Stop git's upward search at the checkout: an agent's `git checkout` cannot reach
        # the user's tree (unboxed, where the repository is visible).
        env.update(GIT_CEILING_DIRECTORIES=str(tree.parent.resolve()), CUDA_VISIBLE_DEVICES="")
        launch = Launch(command, tree, log_path, self.cfg.timeout_seconds, self.kill_grace,
                        readable=[prompt_file, *map(Path, self.cfg.readable)],
                        hidden=[self.repo.root, self.scratch_root], network=True,
                        slot=AGENT_SLOTS[0] + next(self._agents) % len(AGENT_SLOTS))
        ran = spawn(self.isolation, launch, env, threading.Event(), f"agent-{tree.name}")
        output = tail(log_path, 10_000)
        returncode = None if ran.timed_out else ran.returncode
        return AgentRun(returncode, ran.seconds, output, log_path)

    # -- turning the checkout into a proposal ----------------------------------------------

    def _proposal(self, ctx: Context, tree: Path, run: AgentRun) -> Proposal:
        hypothesis, description = parse_fields(run.output, last=True)
        notes = [f"the agent ran for {run.seconds:.0f}s; its output: {run.log_path}"]

        def rejected(reason: str) -> Proposal:
            tail = run.output.strip()[-TAIL_CHARS:]
            if tail:  # what the agent said last usually explains why
                notes.append(f"the agent's output ends with: {tail}")
            return Proposal(
                parent=ctx.incumbent.commit, edits={},
                description=description or "agent: no usable change",
                hypothesis=hypothesis, usage=Usage(requests=1), rejected=reason,
                notes=tuple(notes),
            )

        if run.returncode is None:
            return rejected(f"agent timed out after {self.cfg.timeout_seconds:g}s")
        changes = self._changes(ctx, tree)
        notes += changes.discarded
        if changes.problem:
            return rejected(changes.problem)
        edits = real_changes(ctx.files, changes.edits)
        if not edits:
            if run.returncode != 0:
                return rejected(f"the agent exited with status {run.returncode} and changed "
                                "nothing")
            return rejected("the agent changed nothing")
        for path, text in edits.items():
            problem = check_edit(path, ctx.files[path], text)
            if problem:
                return rejected(f"the agent {problem}")
        try:
            check_syntax(ctx.files, edits)
        except EditError as e:
            return rejected(str(e).replace("after your edits", "after the agent's edits"))
        if ctx.is_duplicate(edits):
            same = find_duplicate(ctx, edits)
            which = f"experiment #{same.id}" if same is not None else "an earlier proposal"
            return rejected(f"duplicate of {which}")
        why = admission.problem(admission.Rules.of(self.spec), ctx.files, edits)
        if why:
            return rejected(f"the agent's change {why}")
        if run.returncode != 0:
            notes.append(f"the agent exited with status {run.returncode}; its edits are used")
        return Proposal(
            parent=ctx.incumbent.commit,
            edits=edits,
            description=" ".join(description.split())[:200]
            or f"agent edit: {describe_edits(ctx.files, edits)}",
            hypothesis=" ".join(hypothesis.split()),
            knobs=knob_values({**ctx.files, **edits}),
            usage=Usage(requests=1),
            notes=tuple(notes),
        )

    def _changes(self, ctx: Context, tree: Path) -> TreeChanges:
        edits: dict[str, str] = {}
        for path in ctx.files:
            f = tree / path
            if not f.is_file():
                return TreeChanges({}, [], f"the agent deleted {path}, an editable file "
                                           "(editable files may be changed, not removed)")
            try:
                edits[path] = f.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                return TreeChanges({}, [], f"the agent left {path} as a file that is not "
                                           "UTF-8 text")
        protected = {*ctx.protected, *self.protected}
        modified, added = self._other_changes(ctx.incumbent.commit, tree)
        discarded = []
        for path in modified:
            if path in ctx.files:
                continue
            why = "protected" if path in protected else "not editable"
            discarded.append(f"discarded the agent's changes to {path} ({why})")
        for path in added:
            discarded.append(f"discarded the agent's new file {path} (not editable)")
        if len(discarded) > MAX_NOTES:
            more = len(discarded) - MAX_NOTES
            discarded = discarded[:MAX_NOTES] + [f"... and {more} more discarded changes"]
        return TreeChanges(edits, discarded)

    def _other_changes(self, commit: str, tree: Path) -> tuple[list[str], list[str]]:
        """(modified or deleted committed paths, new paths) of the checkout against `commit`.

        Compared with the committed bytes in Python, not through git's index: nothing is
        written to the repository, and no filter or hook the agent left in its checkout runs.
        New files the ignore rules cover are left out, as `git status` would leave them; a
        new directory is named once ("wandb/"), not walked.
        """
        changes = verify(Manifest.of_tree(self.repo.tree(commit)), tree)
        modified = sorted(c.path for c in changes if c.kind != "added")
        added = [c.path for c in changes
                 if c.kind == "added" and c.path.split("/")[0] != ".git"]
        return modified, self._not_ignored(tree, added)

    def _not_ignored(self, tree: Path, paths: list[str]) -> list[str]:
        if not paths:
            return []
        argv, env = git_command(self.repo.root, "check-ignore", "--no-index", "-z", "--stdin",
                                work_tree=tree.resolve())
        proc = subprocess.run(argv, cwd=self.repo.root, env=env, capture_output=True,
                              input=b"".join(os.fsencode(p) + b"\0" for p in paths), check=False)
        if proc.returncode not in (0, 1):  # 1: none of them ignored
            raise GitError(f"git check-ignore failed: {proc.stderr.decode(errors='replace')}")
        ignored = set(_split_z(os.fsdecode(proc.stdout)))
        return sorted(p for p in paths if p not in ignored)


def sweep(scratch_root: Path) -> list[Path]:
    """Remove the checkouts a killed harness left behind (named after its pid); the logs
    and prompts stay. Returns what was removed."""
    gone = []
    for path in scratch_root.glob("agent-*-*"):
        pid = path.name.split("-")[1]
        if path.is_dir() and not path.is_symlink() and pid.isdigit() and not _alive(int(pid)):
            _remove(path)
            gone.append(path)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _split_z(out: str) -> list[str]:
    return sorted(p for p in out.split("\0") if p)


def _remove(tree: Path) -> None:
    try:
        shutil.rmtree(tree)
        return
    except OSError:
        pass  # an agent may leave read-only folders behind: make them writable, try again
    for root, dirs, _ in os.walk(tree):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o700)
    try:
        shutil.rmtree(tree)
    except OSError as e:
        log.warning("could not remove the agent's checkout %s: %s", tree, e)
