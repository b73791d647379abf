"""A user's repository as overnight sees it: spec, ledger, preflight checks, `init`."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from overnight import sandbox
from overnight.data import Data, unreadable_to_others
from overnight.data import resolve as resolve_data
from overnight.errors import ConfigError, OvernightError
from overnight.ledger import Ledger, Row, unwritable
from overnight.snapshot import Repo
from overnight.spec import SPEC_FILE, Spec, load_spec, parse_spec, tomllib

if TYPE_CHECKING:
    from overnight.survey import Space

STATE_DIR = ".overnight"
LEDGER_FILE = "ledger.sqlite"
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class Workspace:
    repo: Repo
    spec: Spec

    @classmethod
    def open(cls, path: Path) -> Workspace:
        repo = Repo.open(path)
        return cls(repo, load_spec(repo.root))

    @property
    def state(self) -> Path:
        return self.repo.root / STATE_DIR

    def ledger(self) -> Ledger:
        # The chain's head lives in git's own directory, out of reach of a rewrite of .overnight/.
        git_dir = Path(self.repo.git("rev-parse", "--absolute-git-dir"))
        return Ledger(self.state / LEDGER_FILE, head=git_dir / "overnight" / "ledger-head")

    def tag_rows(self, tag: str | None) -> list[Row]:
        """Every experiment of a tag (default: the most recent tag), oldest first."""
        ledger = self.ledger()
        try:
            return ledger.experiments(tag or default_tag(ledger))
        finally:
            ledger.close()

    def data(self) -> Data:
        """`[run] data`, resolved and checked."""
        return resolve_data(self.repo, self.spec.run.data)

    def results_tsv(self) -> Path | None:
        """Where `[run] results_tsv` is written, checked: in the repository, not git's or
        overnight's, not a committed file."""
        name = self.spec.run.results_tsv
        if name is None:
            return None
        where = f"overnight.toml: [run] results_tsv = {name!r}"
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts:
            raise ConfigError(f"{where}: give a path inside the repository, relative to its "
                              "root (e.g. \"results.tsv\")")
        if parts[0] in (".git", STATE_DIR):
            raise ConfigError(f"{where}: that is git's or overnight's own state")
        if self.repo.tracked("HEAD", [name]):
            raise ConfigError(f"{where} is a committed file: overnight rewrites it as "
                              "experiments finish; pick an untracked name (it is git-ignored "
                              "for you)")
        path = self.repo.root / name
        root = self.repo.root.resolve()
        parent = path.parent.resolve()
        if parent != root and root not in parent.parents:
            raise ConfigError(f"{where}: its directory leads out of the repository ({parent})")
        if not parent.is_dir():
            raise ConfigError(f"{where}: the directory {path.parent} does not exist: create it "
                              "or write the file elsewhere")
        if path.is_dir() and not path.is_symlink():
            raise ConfigError(f"{where} is a directory: name a file (e.g. \"{name}/results.tsv\")")
        return path

    def _check_context(self) -> None:
        """[files] context names committed files (a model is shown what it would run)."""
        context = self.spec.files.context
        found = self.repo.tracked("HEAD", context) if context else set()
        for path in context:
            if path in found:
                continue
            if any(f.startswith(path.rstrip("/") + "/") for f in found):
                raise ConfigError(
                    f"[files] context names {path}, a directory: name the files in it that a "
                    "model should read, one by one")
            raise ConfigError(
                f"[files] context names {path}, which is not committed at HEAD: the model is "
                "shown committed files only; fix the path or commit the file")

    def preflight(self) -> None:
        """Refuse to run on files that differ from what is committed."""
        self.repo.head()
        paths = self.spec.files.editable + self.spec.files.protected
        dirty = self.repo.dirty(paths)
        if dirty:
            raise ConfigError(
                f"uncommitted changes in {', '.join(dirty)}: overnight runs what is committed, "
                "so commit (or stash) them first"
            )
        missing = sorted(set(self.spec.files.editable) - self.repo.tracked("HEAD", paths))
        if missing:
            raise ConfigError(
                f"[files] editable names {', '.join(missing)}, which is not committed at HEAD: "
                "fix the path in overnight.toml or commit the file"
            )
        self._check_context()
        mode = sandbox.resolve(self.spec.run.sandbox)  # exit 2 now, not in every run
        data = self.data()  # exit 2 now: a dataset that is missing or is not one
        closed = unreadable_to_others(data) if mode == "user" else None
        if closed is not None:
            raise ConfigError(
                f"[run] data: {closed} is closed to other users, and with sandbox \"user\" "
                "each run is an unprivileged uid of its own: open it (chmod o+rX for the data, "
                "o+x for each directory above it)")
        tsv = self.results_tsv()
        if tsv is not None:
            self.repo.exclude("/" + tsv.relative_to(self.repo.root).as_posix())
        why = unwritable(self.state / LEDGER_FILE)
        if why is not None:
            raise OvernightError(f"overnight run records every experiment in "
                                 f"{self.state / LEDGER_FILE}, which cannot be written: {why}")
        self.repo.exclude(f"/{STATE_DIR}/")


def check_tag(tag: str) -> str:
    """A tag that names a git branch, overnight/<tag>, or ConfigError saying what to change."""
    if not TAG_RE.match(tag):
        raise ConfigError(
            f"--tag {tag!r} is not a valid tag: use letters, digits, '.', '_' or '-', starting "
            "with a letter or digit (it becomes the branch overnight/<tag>)"
        )
    problem = ref_name_problem(f"refs/heads/overnight/{tag}")
    if problem:
        raise ConfigError(f"--tag {tag!r} cannot name the git branch overnight/{tag}: {problem}; "
                          "choose another tag")
    return tag


def ref_name_problem(name: str) -> str | None:
    """Which rule of `git check-ref-format` the ref `name` breaks, or None if it is valid."""
    if name == "@":
        return "a ref cannot be the single character '@'"
    if name.startswith("/") or name.endswith("/") or "//" in name:
        return "a ref cannot begin or end with '/' or contain '//'"
    if name.endswith("."):
        return "a ref cannot end with '.'"
    if ".." in name:
        return "a ref cannot contain '..'"
    if "@{" in name:
        return "a ref cannot contain '@{'"
    bad = sorted({c for c in name if ord(c) < 0x20 or ord(c) == 0x7f or c in " ~^:?*[\\"})
    if bad:
        return f"a ref cannot contain {', '.join(repr(c) for c in bad)}"
    for part in name.split("/"):
        if part.startswith("."):
            return f"a part of a ref cannot begin with '.' ({part!r})"
        if part.endswith(".lock"):
            return f"a part of a ref cannot end with '.lock' ({part!r})"
    return None


def default_tag(ledger: Ledger) -> str:
    """Resume the most recent tag; a first run is named after today's date, e.g. nov23."""
    tags = ledger.tags()
    if tags:
        return tags[-1]
    return dt.date.today().strftime("%b%d").lower()


def known_tag(ledger: Ledger, tag: str | None) -> str:
    """`tag` (default: the most recent), as long as the ledger has experiments with it;
    ConfigError naming the tags otherwise."""
    tags = ledger.tags()
    if not tags:
        raise ConfigError("no experiments yet: start with `overnight run`")
    tag = tag or tags[-1]
    if tag not in tags:
        raise ConfigError(f"no experiments with tag '{tag}'; tags: {', '.join(tags)}")
    return tag


# -- init --------------------------------------------------------------------

_LOWER = ("loss", "bpb", "bpc", "error", "err", "perplexity", "ppl", "time", "seconds", "mse",
          "mae")
_HIGHER = ("acc", "accuracy", "score", "reward", "f1", "auc", "bleu", "throughput", "tflops")


def guess_direction(metric: str) -> str | None:
    low = metric.lower()
    if any(w in low for w in _HIGHER):
        return "higher"
    if any(w in low for w in _LOWER):
        return "lower"
    return None


@dataclass
class Init:
    """What `overnight init` wrote, and what the user should know about it."""

    path: Path
    spec: Spec
    notes: list[str]


def write_init(root: Path, command: str | None, metric: str | None, direction: str | None,
               editable: list[str], protected: list[str], force: bool,
               pattern: str | None = None) -> Init:
    from overnight import survey
    from overnight.knobs import Scope

    repo = Repo.open(root)
    repo.head()
    spec_path = repo.root / SPEC_FILE
    if spec_path.exists() and not force:
        raise ConfigError(f"{SPEC_FILE} already exists: edit it, or pass --force to overwrite it")
    root = repo.root
    notes: list[str] = []
    if not editable:
        if (root / "train.py").exists():
            editable = ["train.py"]
        else:
            raise ConfigError("no train.py here: name the file(s) to edit with --editable FILE")
    if command is not None:  # config files the command hands to the script are editable too
        for config in Scope.for_command(command, _py_files(root)).config:
            if config not in editable and config not in protected:
                editable.append(config)
                notes.append(f"{config} is passed to the script by the command: it is editable "
                             "too, and its values win over the script's own")
    if not protected and (root / "prepare.py").exists() and "prepare.py" not in editable:
        protected = ["prepare.py"]
    for path in editable + protected:
        if not (root / path).exists():
            raise ConfigError(f"{path} does not exist in {root}")
    dirty = repo.dirty(editable + protected)
    if dirty:
        raise ConfigError(f"uncommitted changes in {', '.join(dirty)}: commit them first")
    texts = {p: (root / p).read_text(errors="replace") for p in editable}
    guarded = {p: (root / p).read_text(errors="replace") for p in protected
               if (root / p).is_file()}
    uv = (root / "uv.lock").exists()
    if command is None:
        found = survey.interpreter(root, texts[editable[0]], uv)
        command = f"{found.runner} {editable[0]}"
        notes += [found.note] if found.note else []
    elif (first := command.split()[0]) in ("python", "python3") or first.endswith("/python"):
        found = survey.interpreter(root, texts[editable[0]], uv=False, given=first)
        notes += [found.note] if found.note else []
    finding = survey.find_metric({**texts, **guarded}, metric, pattern)
    if finding.metric is None:
        raise ConfigError(
            f"could not tell which metric {editable[0]} prints: pass --metric NAME (the script "
            "must print `NAME: <number>`, or pass --pattern with a regular expression whose "
            "group is the number, e.g. --pattern 'val loss ([0-9.]+)')")
    metric, pattern = finding.metric, finding.pattern
    notes += [finding.note] if finding.note else []
    if direction is None:
        direction = guess_direction(metric)
        if direction is None:
            raise ConfigError(
                f"is a lower or a higher {metric} better? pass --direction lower|higher")
    scope = Scope.for_command(command, editable)
    knobs = survey.all_constants(texts, scope)
    budget = survey.budget(texts, guarded, knobs, scope.overridden)
    notes += list(budget.notes)
    space = survey.search_space(texts, scope, budget, metric)
    seconds = budget.seconds or 300
    ignored = repo.git("ls-files", "--others", "--ignored", "--exclude-standard",
                       "--directory").splitlines()
    data = survey.ignored_data(ignored, texts.values())
    if data:
        one = len(data) == 1
        notes.append(f"{', '.join(data)} {'is' if one else 'are'} ignored by git, so runs "
                     f"(built from the commit) would not have {'it' if one else 'them'}: "
                     f"[run] data makes {'it' if one else 'them'} available read-only in "
                     "every run")
    text = render_spec(command, metric, direction, editable, protected, budget=seconds,
                       timeout=max(600, 2 * seconds), pattern=pattern, space=space, data=data)
    spec = parse_spec(tomllib.loads(text))
    spec_path.write_text(text)
    program = repo.root / spec.proposer.program
    if not program.exists():
        program.write_text(render_program(spec))
    else:
        notes += _program_notes(spec.proposer.program, program.read_text(errors="replace"))
    repo.exclude(f"/{STATE_DIR}/")
    return Init(spec_path, spec, notes)


def _py_files(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*.py") if ".git" not in p.parts]


def _program_notes(name: str, text: str) -> list[str]:
    """What a user's own program.md says that overnight's contract overrides."""
    try:
        from overnight.proposers.prompt import program_conflicts
    except ImportError:
        return []
    found = program_conflicts(text, kinds=True)
    if not found:
        return []
    return [f"{name} was written for an agent that runs its own loop ({', '.join(found)}): "
            "overnight owns git, the runs and the records, so the model is told the harness's "
            "contract first and that it wins; the rest of the program is its research guidance"]


def render_program(spec: Spec) -> str:
    """A starting program.md: the research instructions a model or coding agent reads."""
    o, files = spec.objective, spec.files
    protected = ", ".join(files.protected) or "none"
    return f"""# Research program

You are running experiments to make `{o.metric}` {o.direction} (better by more than
{o.min_delta:g} to count). Each experiment runs `{spec.run.command}` with a fixed time
budget of {spec.run.budget_seconds:g} s (given as OVERNIGHT_BUDGET_SECONDS), so the question
is always: what does best within this budget?

## What you may change
- Only these files: {", ".join(files.editable)}.
- Never: {protected}, nor the lines between `# overnight: protect` and `# overnight: end`
  (the time budget, the evaluation). Edits there are rejected before they run.

## How to work
- One idea per experiment, stated as a hypothesis you can be wrong about.
- Read the history first: do not repeat what was tried; build on what worked; learn from
  crashes (the log tail is shown) before retrying an idea.
- Prefer changes whose effect is larger than the run-to-run noise you see in the history.
- Simpler is better: a small gain that adds a lot of complexity is rarely worth keeping.
- If an experiment crashed for a trivial reason (a typo, a shape mismatch), fix it and try
  again; if the idea itself is broken, move on.

## Notes from the user
Write here what you know that the model should: ideas to try, things that failed before,
constraints of the hardware. `overnight steer "..."` adds notes while a loop runs.
"""


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(_toml_str(i) for i in items) + "]"


def render_spec(command: str, metric: str, direction: str, editable: list[str],
                protected: list[str], budget: float = 300, timeout: float = 600,
                strategy: str = "perturb", pattern: str | None = None,
                space: Space | None = None, data: list[str] | None = None) -> str:
    how = ("read with the pattern below" if pattern else
           f"printed as `{metric}: <number>` or `METRIC {metric}=<n>`")
    lines = [
        "# overnight research spec: what to improve, how to run it, what may change.",
        "[objective]",
        f'metric = "{metric}"          # {how}',
        f'direction = "{direction}"',
        "min_delta = 0.0              # improvement needed to keep a change",
    ]
    if pattern:
        lines.append(f"pattern = {_toml_str(pattern)}  # its group is the value; the last "
                     "match wins")
    lines += [
        "",
        "[run]",
        f"command = {_toml_str(command)}",
        f"budget_seconds = {budget:g}          # given to the script as OVERNIGHT_BUDGET_SECONDS",
        f"timeout_seconds = {timeout:g}        # hard kill of the whole process group",
        "parallel = 1                 # slots; \"gpus\" for one slot per visible GPU",
        *([f"data = {_toml_list(data)}  # ignored by git: read-only in every run"]
          if data else []),
        "",
        "[files]",
        f"editable = {_toml_list(editable)}",
        f"protected = {_toml_list(protected)}",
        "",
        "[proposer]",
        'kind = "search"',
        "",
        "[search]",
        "# perturb: each proposal moves one or two knobs around the best so far, so each run",
        "# tests one idea; tpe models the whole space once there are a few dozen runs.",
        f'strategy = "{strategy}"           # perturb | tpe | random | grid',
    ]
    chosen = space.chosen if space else []
    if chosen:
        lines.append("knobs = [")
        lines += [f"    {_toml_str(c.knob.name)}," for c in chosen]
        lines.append("]")
    else:
        lines.append('# knobs = ["LEARNING_RATE"]  # default: every UPPER_CASE numeric constant')
    for name, why in (space.skipped if space else []):
        lines.append(f"# not searched: {name}: {why}")
    lines.append("")
    lines.append("[search.bounds]")
    for c in chosen:
        b = c.bound
        scale = "" if b.scale == "auto" else f', scale = "{b.scale}"'
        where = f"{c.knob.path}:{c.knob.line}"
        lines.append(f"{c.knob.name} = {{ low = {_num(b.low, c.knob.kind)}, high = "
                     f"{_num(b.high, c.knob.kind)}{scale} }}  # {c.knob.value:g} at {where}: "
                     f"{c.why}")
    if not chosen:
        lines.append("# LEARNING_RATE = [1e-5, 1.0]")
    return "\n".join(lines) + "\n"


def _num(v: float, kind: str) -> str:
    return str(int(v)) if kind == "int" and float(v).is_integer() else repr(float(v))


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
