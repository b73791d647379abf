"""Git runs no program on the harness's behalf, and run trees hold the committed bytes.

An experiment can write the user's `.git` (hooks, config) and `.gitattributes`; the harness
runs git after every candidate with its own environment, API keys included. Each door below
installs a script that leaves a marker when executed; the whole loop (`run`, `show`, `diff`,
`status`) must never open it. A control afterwards runs plain git through the same door and
sees the marker, so each test proves its door was really open.
"""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import GIT_ENV, git, rows, spec_toml, train_py

from overnight.errors import ConfigError
from overnight.proposers.agent_cli import AgentProposer
from overnight.proposers.base import Context, Experiment, fingerprint
from overnight.proposers.edits import knob_values
from overnight.snapshot import GitError, Repo, git_command
from overnight.spec import parse_spec

TAG = "t"
N = 3


def script(path: Path, marker: Path, body: str = "") -> Path:
    """An executable that appends its name to `marker`, then runs `body`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\necho "{path.name} $*" >> "{marker}"\n{body}')
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


HOOKS = ("reference-transaction", "post-checkout", "pre-commit", "post-commit",
         "post-index-change", "pre-auto-gc", "post-rewrite", "fsmonitor-watchman")


def hooks_in(directory: Path, marker: Path) -> None:
    for name in HOOKS:
        script(directory / name, marker)


def evil_config(marker: Path, bin_dir: Path) -> dict[str, str]:
    """Config keys, each of which makes git run a program."""
    hooks_in(bin_dir / "hooks", marker)
    return {
        "core.hooksPath": str(bin_dir / "hooks"),
        "core.fsmonitor": str(script(bin_dir / "fsmonitor", marker)),
        "core.pager": str(script(bin_dir / "pager", marker, "cat\n")),
        "diff.external": str(script(bin_dir / "extdiff", marker)),
        "filter.evil.clean": str(script(bin_dir / "clean", marker, "cat\n")),
        "filter.evil.smudge": str(script(bin_dir / "smudge", marker, "cat\n")),
        "filter.evil.required": "true",
        "diff.evil.textconv": str(script(bin_dir / "textconv", marker, 'cat "$1"\n')),
        "alias.st": f"!{script(bin_dir / 'alias', marker)}",
    }


def config_text(config: dict[str, str]) -> str:
    sections: dict[str, list[str]] = {}
    for key, value in config.items():
        section, _, var = key.rpartition(".")
        head, _, sub = section.partition(".")
        header = f'[{head} "{sub}"]' if sub else f"[{head}]"
        sections.setdefault(header, []).append(f'\t{var} = "{value}"\n')
    return "".join(h + "\n" + "".join(lines) for h, lines in sections.items())


def control(repo: Path, args: list[str], env: dict[str, str], tty: bool = False) -> None:
    """Plain git, as the harness ran it before: opens the door (its outcome does not matter).
    With `tty`, its output is a terminal, which is when git starts a pager."""
    primary, secondary = os.openpty() if tty else (None, None)
    try:
        subprocess.run(["git", *args], cwd=repo, stdin=subprocess.DEVNULL,
                       stdout=secondary if tty else subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False, timeout=30,
                       env={**os.environ, **GIT_ENV, **env})
    finally:
        for fd in (primary, secondary):
            if fd is not None:
                os.close(fd)


def touch_later(path: Path) -> None:
    """Same bytes, new mtime: `git status` must look at the file (and run its clean filter)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


# Each door: (install it in repo; return the CLI's extra env), then the control that opens it.
Door = Callable[[Path, Path, Path], dict[str, str]]


def door_hooks(repo: Path, marker: Path, tmp: Path) -> dict[str, str]:
    hooks_in(repo / ".git" / "hooks", marker)
    return {}


def door_hooks_path(repo: Path, marker: Path, tmp: Path) -> dict[str, str]:
    hooks_in(tmp / "elsewhere", marker)
    git(repo, "config", "core.hooksPath", str(tmp / "elsewhere"))
    return {}


def door_fsmonitor(repo: Path, marker: Path, tmp: Path) -> dict[str, str]:
    git(repo, "config", "core.fsmonitor", str(script(tmp / "fsmonitor", marker)))
    return {}


def door_filter(repo: Path, marker: Path, tmp: Path) -> dict[str, str]:
    (repo / ".gitattributes").write_text("* filter=evil\n")
    git(repo, "add", ".gitattributes")
    git(repo, "commit", "-q", "-m", "attributes")
    for var in ("clean", "smudge"):
        git(repo, "config", f"filter.evil.{var}", str(script(tmp / var, marker, "cat\n")))
    git(repo, "config", "filter.evil.process", str(script(tmp / "process", marker)))
    git(repo, "config", "filter.evil.required", "true")
    # A driver with a dot in its name, named by the repository's own attributes file.
    git(repo, "config", "filter.odd.v2.clean", str(script(tmp / "odd", marker, "cat\n")))
    (repo / ".git" / "info" / "attributes").write_text("*.toml filter=odd.v2\n")
    touch_later(repo / "train.py")
    return {}


def door_diff_external(repo: Path, marker: Path, tmp: Path) -> dict[str, str]:
    git(repo, "config", "diff.external", str(script(tmp / "extdiff", marker)))
    return {}


def door_textconv(repo: Path, marker: Path, tmp: Path) -> dict[str, str]:
    (repo / ".gitattributes").write_text("*.py diff=evil\n")
    git(repo, "add", ".gitattributes")
    git(repo, "commit", "-q", "-m", "attributes")
    git(repo, "config", "diff.evil.textconv", str(script(tmp / "textconv", marker, 'cat "$1"\n')))
    git(repo, "config", "diff.evil.command", str(script(tmp / "diffcmd", marker)))
    return {}


def door_pager(repo: Path, marker: Path, tmp: Path) -> dict[str, str]:
    git(repo, "config", "core.pager", str(script(tmp / "pager", marker, "cat\n")))
    git(repo, "config", "pager.diff", str(script(tmp / "pager2", marker, "cat\n")))
    return {}


def door_global_config(repo: Path, marker: Path, tmp: Path) -> dict[str, str]:
    home, xdg = tmp / "home", tmp / "xdg"
    text = config_text(evil_config(marker, tmp / "bin"))
    home.mkdir()
    (home / ".gitconfig").write_text(text)
    (xdg / "git").mkdir(parents=True)
    (xdg / "git" / "config").write_text(text)
    (xdg / "git" / "attributes").write_text("* filter=evil diff=evil\n")
    touch_later(repo / "train.py")
    return {"HOME": str(home), "XDG_CONFIG_HOME": str(xdg)}


def door_environment(repo: Path, marker: Path, tmp: Path) -> dict[str, str]:
    evil = tmp / "evil"
    evil.mkdir()
    git(evil, "init", "-q")
    hooks_in(evil / ".git" / "hooks", marker)
    git(evil, "config", "core.fsmonitor", str(script(tmp / "fsmonitor", marker)))
    exec_path = tmp / "exec"
    script(exec_path / "git-status", marker)
    config = evil_config(marker, tmp / "bin")
    env = {"GIT_DIR": str(evil / ".git"), "GIT_WORK_TREE": str(evil),
           "GIT_INDEX_FILE": str(tmp / "stolen-index"), "GIT_EXEC_PATH": str(exec_path),
           "GIT_CONFIG_COUNT": str(len(config)),
           "GIT_CONFIG_PARAMETERS": f"'core.fsmonitor'='{config['core.fsmonitor']}'",
           "GIT_EXTERNAL_DIFF": config["diff.external"], "GIT_PAGER": config["core.pager"]}
    for i, (k, v) in enumerate(config.items()):
        env[f"GIT_CONFIG_KEY_{i}"], env[f"GIT_CONFIG_VALUE_{i}"] = k, v
    return env


RUNTIME_ATTACK = """
from pathlib import Path as _P
_root = next(p for p in _P.cwd().resolve().parents
             if (p / "overnight.toml").is_file() and (p / ".git").is_dir())
_bin = _P({bin!r})
for _h in {hooks!r}:
    _f = _root / ".git" / "hooks" / _h
    _f.write_text("#!/bin/sh\\necho hook-$0 >> {marker}\\n")
    _f.chmod(0o755)
with open(_root / ".git" / "config", "a") as _c:
    _c.write("[core]\\n\\tfsmonitor = " + str(_bin / "fsmonitor") + "\\n"
             "[diff]\\n\\texternal = " + str(_bin / "extdiff") + "\\n")
"""


def door_experiment(repo: Path, marker: Path, tmp: Path) -> dict[str, str]:
    """The real attack: the training script itself writes hooks and config into .git. Boxed
    (the default) it cannot even see .git; unboxed, it can, and git still runs nothing."""
    script(tmp / "bin" / "fsmonitor", marker)
    script(tmp / "bin" / "extdiff", marker)
    attack = RUNTIME_ATTACK.format(bin=str(tmp / "bin"), hooks=HOOKS, marker=marker)
    (repo / "train.py").write_text(train_py(0.001, attack))
    spec = (repo / "overnight.toml").read_text()
    (repo / "overnight.toml").write_text(spec.replace("[files]", 'sandbox = "none"\n\n[files]'))
    git(repo, "commit", "-q", "-am", "an experiment that plants hooks")
    return {}


UPDATE_REF = ["update-ref", "refs/control", "HEAD"]
DIFF = ["diff", "{parent}", "{candidate}"]  # experiment 2 against its parent
# door -> (install, the plain git command that opens it, whether it needs a terminal)
DOORS: dict[str, tuple[Door, list[str], bool]] = {
    "hooks": (door_hooks, UPDATE_REF, False),
    "hooks-path": (door_hooks_path, UPDATE_REF, False),
    "fsmonitor": (door_fsmonitor, ["status"], False),
    "filter": (door_filter, ["hash-object", "train.py"], False),
    "diff-external": (door_diff_external, DIFF, False),
    "textconv": (door_textconv, DIFF, False),
    "pager": (door_pager, DIFF, True),
    "global-config": (door_global_config, UPDATE_REF, False),
    "environment": (door_environment, ["status"], False),
    "experiment": (door_experiment, UPDATE_REF, False),
}


@pytest.mark.parametrize("door", list(DOORS))
def test_no_door_lets_git_run_a_program(door, make_repo, cli, tmp_path):
    repo = make_repo({"train.py": train_py(0.001), "notes.md": "v1\n"}, spec_toml("grid"))
    (repo / "notes.md").write_text("v2\n")  # a second commit, for the diff controls
    git(repo, "commit", "-q", "-am", "notes")
    marker = tmp_path / "MARKER"
    install, opener, tty = DOORS[door]
    env = install(repo, marker, tmp_path)

    out = cli("run", "-t", TAG, "-n", str(N), cwd=repo, env=env)
    assert out.returncode == 0, out.stderr
    statuses = [r["status"] for r in rows(repo, TAG)]
    assert len(statuses) == N and set(statuses) <= {"keep", "discard"}, statuses
    for args in (["show", "2"], ["diff", "2"], ["status"]):
        out = cli(*args, cwd=repo, env=env)
        assert out.returncode == 0, (args, out.stderr)
    assert "+LEARNING_RATE" in cli("diff", "2", cwd=repo, env=env).stdout
    assert not marker.exists(), marker.read_text()
    assert not (tmp_path / "stolen-index").exists()

    # The door was open: plain git, in the same environment, walks through it.
    second = rows(repo, TAG)[1]
    args = [a.format(parent=second["parent"], candidate=second["commit_sha"]) for a in opener]
    control(repo, args, env, tty)
    assert marker.exists(), f"git {' '.join(args)} did not open the {door} door"


# -- run trees hold the committed bytes ------------------------------------------------------

NO_CR = 'assert b"\\r" not in open(__file__, "rb").read(), "line endings were converted"\n'


def committed(repo: Path, commit: str, path: str) -> bytes:
    return subprocess.run(["git", "cat-file", "blob", f"{commit}:{path}"], cwd=repo,
                          capture_output=True, check=True).stdout


@pytest.mark.parametrize("setup", ["eol-crlf", "autocrlf"])
def test_line_ending_conversion_does_not_change_what_runs(setup, make_repo, cli):
    files = {"train.py": train_py(0.001, NO_CR), "helper.py": "X = 1\n"}
    if setup == "eol-crlf":
        files[".gitattributes"] = "*.py text eol=crlf\n"
    toml = spec_toml("grid", extra_run='keep_workdirs = "all"')
    repo = make_repo(files, toml)
    if setup == "autocrlf":
        git(repo, "config", "core.autocrlf", "true")
    out = cli("run", "-t", TAG, "-n", str(N), cwd=repo)
    assert out.returncode == 0, out.stderr
    rs = rows(repo, TAG)
    assert len(rs) == N
    assert all(r["status"] in ("keep", "discard") for r in rs), [r["status"] for r in rs]
    for r in rs:
        work = Path(r["run_dir"]) / "work"
        for path in ("train.py", "helper.py", "overnight.toml"):
            assert (work / path).read_bytes() == committed(repo, r["commit_sha"], path), path


def test_materialize_writes_committed_bytes_and_no_temporary_index(make_repo, tmp_path,
                                                                   monkeypatch):
    repo_dir = make_repo({"a.py": "A = 1\n", "sub/b.txt": "b\n",
                          ".gitattributes": "* text eol=crlf\n"})
    git(repo_dir, "config", "core.autocrlf", "true")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    repo = Repo.open(repo_dir)
    dest = tmp_path / "run"
    repo.materialize(repo.head(), dest)
    assert (dest / "a.py").read_bytes() == b"A = 1\n"
    assert (dest / "sub" / "b.txt").read_bytes() == b"b\n"
    assert list(scratch.iterdir()) == []  # no /tmp/overnight-index-*


# -- the one place git is run from -----------------------------------------------------------


def test_git_command_scrubs_the_environment(tmp_path, monkeypatch):
    for key, value in {"ANTHROPIC_API_KEY": "sk-secret", "GIT_DIR": "/elsewhere",
                       "GIT_INDEX_FILE": "/tmp/x", "GIT_EXEC_PATH": "/tmp/bin",
                       "GIT_CONFIG_PARAMETERS": "'core.pager'='x'", "XDG_CONFIG_HOME": "/tmp",
                       "LC_ALL": "C.UTF-8", "TZ": "UTC"}.items():
        monkeypatch.setenv(key, value)
    argv, env = git_command(tmp_path, "rev-parse", "HEAD")
    assert "ANTHROPIC_API_KEY" not in env and "XDG_CONFIG_HOME" not in env
    assert not {"GIT_DIR", "GIT_INDEX_FILE", "GIT_EXEC_PATH", "GIT_CONFIG_PARAMETERS"} & set(env)
    assert env["LC_ALL"] == "C.UTF-8" and env["TZ"] == "UTC"
    assert env["GIT_CONFIG_GLOBAL"] == os.devnull and env["GIT_CONFIG_NOSYSTEM"] == "1"
    assert env["GIT_TERMINAL_PROMPT"] == "0" and env["HOME"] == os.devnull
    assert f"core.hooksPath={os.devnull}" in argv and "core.fsmonitor=false" in argv
    assert argv[-2:] == ["rev-parse", "HEAD"]


def test_a_driver_name_git_cannot_be_told_to_ignore_stops_the_harness(make_repo):
    repo_dir = make_repo({"a.py": "A = 1\n"})
    git(repo_dir, "config", "filter.a=b.clean", "touch /tmp/never")
    repo = Repo.open(repo_dir)
    with pytest.raises(GitError, match="cannot switch off"):
        repo.dirty(["a.py"])


def test_missing_repo_and_file_are_bad_input_not_a_missing_git(tmp_path, cli):
    out = cli("status", "--repo", str(tmp_path / "missing"), cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "does not exist" in out.stderr and "not installed" not in out.stderr
    (tmp_path / "file").write_text("x")
    out = cli("status", "--repo", str(tmp_path / "file"), cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "is a file" in out.stderr


def test_git_missing_is_said_so(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="git is not installed"):
        Repo.open(tmp_path)


# -- the agent proposer's checkout -------------------------------------------------------------

AGENT = ("sed -i 's/LEARNING_RATE = 0.001/LEARNING_RATE = 0.004/' train.py && mkdir wandb && "
         "echo x > wandb/run.log && echo x > ckpt.pt && echo n > new.txt && "
         "echo '* filter=evil diff=evil' > .gitattributes && echo 'Description: lr 0.004'")


def test_the_agents_checkout_is_compared_without_git_running_its_files(make_repo, tmp_path,
                                                                       monkeypatch):
    repo_dir = make_repo({"train.py": train_py(0.001), ".gitignore": "wandb/\n*.pt\n"})
    marker = tmp_path / "MARKER"
    hooks_in(repo_dir / ".git" / "hooks", marker)
    for key, value in evil_config(marker, tmp_path / "bin").items():
        git(repo_dir, "config", key, value)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    spec = parse_spec({
        "objective": {"metric": "val_loss", "direction": "lower"},
        "run": {"command": "python train.py"},
        "files": {"editable": ["train.py"]},
        "proposer": {"kind": "agent"},
        "agent": {"command": AGENT, "timeout_seconds": 30},
    })
    repo = Repo.open(repo_dir)
    files = {"train.py": train_py(0.001)}
    base = Experiment(0, repo.head(), None, "keep", 1.3, "baseline", knob_values(files),
                      is_baseline=True, fingerprint=fingerprint(files))
    ctx = Context(incumbent=base, files=files, history=[base], in_flight=[], direction="lower",
                  slots=1, metric="val_loss", program="", protected=(),
                  tried=frozenset({base.fingerprint}))

    proposal = AgentProposer(spec, repo, tmp_path / "scratch").propose(ctx)

    assert not proposal.rejected, proposal.rejected
    assert proposal.edits == {"train.py": train_py(0.004)}
    notes = "\n".join(proposal.notes)
    assert "new file new.txt" in notes and "new file .gitattributes" in notes
    assert "wandb" not in notes and "ckpt.pt" not in notes  # ignored, as git status would
    assert not marker.exists(), marker.read_text()
    assert list(scratch.iterdir()) == []  # no temporary index
