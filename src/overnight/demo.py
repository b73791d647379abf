"""`overnight demo`: a fresh git repository from the bundled tinygpt example, and a loop in it."""

from __future__ import annotations

import importlib.util
import shlex
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

from overnight.errors import ConfigError
from overnight.snapshot import git_command
from overnight.spec import SPEC_FILE

EXAMPLE = "tinygpt"
FILES = ("train.py", "prepare.py", "input.txt", "program.md", "DATA.md")


def example_dir() -> Path:
    return Path(str(resources.files("overnight") / "examples" / EXAMPLE))


def create(dest: Path) -> bool:
    """Make the demo repository; False if `dest` already holds one (it is resumed)."""
    if importlib.util.find_spec("torch") is None:
        raise ConfigError(
            "the demo trains a tiny GPT with PyTorch, which is not installed: "
            "pip install 'overnight[examples]' (or, for the CPU build, pip install torch)"
        )
    if (dest / SPEC_FILE).exists() and (dest / ".git").exists():
        return False
    if dest.exists() and any(dest.iterdir()):
        raise ConfigError(f"{dest} exists and is not empty: choose another directory")
    dest.mkdir(parents=True, exist_ok=True)
    src = example_dir()
    for name in FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dest / name)
    # The example's spec runs `python train.py`; the demo pins the interpreter that has torch.
    spec = (src / SPEC_FILE).read_text().replace(
        'command = "python train.py"',
        f'command = "{_quoted(shlex.quote(sys.executable))} train.py"',
    )
    (dest / SPEC_FILE).write_text(spec)
    who = {"GIT_AUTHOR_NAME": "overnight demo", "GIT_AUTHOR_EMAIL": "demo@localhost",
           "GIT_COMMITTER_NAME": "overnight demo", "GIT_COMMITTER_EMAIL": "demo@localhost"}
    for args in (["init", "-q", "-b", "main"], ["add", "-A"],
                 ["commit", "-q", "-m", "tinygpt: baseline"]):
        argv, env = git_command(dest, *args)
        subprocess.run(argv, cwd=dest, check=True, env={**env, **who})
    return True


def _quoted(path: str) -> str:
    return path.replace("\\", "\\\\").replace('"', '\\"')
