"""diagnose.py: the cause of a failed baseline from its log and exit, and advice that fits it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from overnight.diagnose import Cause, Setting, classify, explain, numbered_lines, suggest_pattern

TRACEBACK = """\
Traceback (most recent call last):
  File "/repo/.overnight/runs/t/1/work/train.py", line 1, in <module>
    {line}
{error}
"""


def traceback(error: str, line: str = "import x") -> str:
    return TRACEBACK.format(error=error, line=line)


def setting(root: Path, *, command: str = "python train.py", path: str = "",
            ignored: set[str] = frozenset(), committed: set[str] = frozenset(),
            pattern: str | None = None, workdir: Path | None = None) -> Setting:
    return Setting(command=command, path=path, root=root, workdir=workdir, metric="val_loss",
                   pattern=pattern, timeout=7,
                   ignored=lambda p: any(p == i or p.startswith(i + "/") for i in ignored),
                   in_commit=lambda p: p in committed)


# -- classify: pure ---------------------------------------------------------------------------

@pytest.mark.parametrize(("log", "status", "rc", "cause"), [
    (traceback("ModuleNotFoundError: No module named 'torch'"), "crash", 1,
     Cause("import", "torch")),
    (traceback("ModuleNotFoundError: No module named 'torch.nn'"), "crash", 1,
     Cause("import", "torch.nn")),
    (traceback("FileNotFoundError: [Errno 2] No such file or directory: "
               "'data/shakespeare_char/train.bin'"), "crash", 1,
     Cause("missing_file", "data/shakespeare_char/train.bin")),
    ("python: can't open file '/repo/.overnight/runs/t/1/work/train2.py': [Errno 2] No such "
     "file or directory\n", "crash", 2,
     Cause("missing_file", "/repo/.overnight/runs/t/1/work/train2.py")),
    ("/bin/sh: 1: python: not found\n", "crash", 127, Cause("no_program", "python")),
    ("bash: line 1: .venv/bin/python: command not found\n", "crash", 127,
     Cause("no_program", ".venv/bin/python")),
    ("step 1\n", "timeout", None, Cause("timeout")),
    ("step 10: train loss 2.2177, val loss 2.3790\nstep 20\n", "crash", 0,
     Cause("no_metric", "val_loss", ("step 10: train loss 2.2177, val loss 2.3790",))),
    ("val_loss: nan\n", "crash", 0, Cause("non_finite", "nan")),
    ("Segmentation fault\n", "crash", 139, Cause("other")),
])
def test_classify(log: str, status: str, rc: int | None, cause: Cause) -> None:
    assert classify(log, status, rc, "val_loss") == cause


def test_the_error_nearest_the_end_wins() -> None:
    handled = "FileNotFoundError: [Errno 2] No such file or directory: 'cache.json' (ignored)\n"
    log = handled + traceback("ModuleNotFoundError: No module named 'numpy'")
    assert classify(log, "crash", 1, "val_loss") == Cause("import", "numpy")
    log = traceback("ModuleNotFoundError: No module named 'numpy'") + traceback(
        "FileNotFoundError: [Errno 2] No such file or directory: 'a/b.bin'")
    assert classify(log, "crash", 1, "val_loss") == Cause("missing_file", "a/b.bin")


def test_not_found_counts_only_for_exit_127() -> None:
    assert classify("sh: 1: wandb: not found\n", "crash", 1, "val_loss") == Cause("other")


def test_numbered_lines_are_the_last_three_with_a_fraction() -> None:
    log = "\n".join(["iter 1", "loss 3.5", "iter 2", "loss 3.1", "lr 6e-4", "val loss 2.9",
                     "done"])
    assert numbered_lines(log) == ("loss 3.1", "lr 6e-4", "val loss 2.9")


@pytest.mark.parametrize(("lines", "metric", "value"), [
    (("step 750: train loss 2.2177, val loss 2.3790",), "val_loss", "2.3790"),
    (("epoch 3 | VAL LOSS = 1.5e-2 | acc 0.91",), "val_loss", "1.5e-2"),
    (("val_bpb 0.9979 (ema)",), "val_bpb", "0.9979"),
])
def test_suggest_pattern_reads_the_printed_phrase(lines, metric: str, value: str) -> None:
    pattern = suggest_pattern(lines, metric)
    assert pattern is not None
    assert re.findall(pattern, lines[-1])[-1] == value


def test_suggest_pattern_needs_the_metric_s_words() -> None:
    assert suggest_pattern(("train loss 2.2177",), "val_loss") is None
    assert suggest_pattern((), "val_loss") is None


# -- explain: the advice, naming what is there ------------------------------------------------

def test_a_file_git_ignores_is_named_in_run_data(tmp_path: Path) -> None:
    (tmp_path / "data" / "set").mkdir(parents=True)
    (tmp_path / "data" / "set" / "train.bin").write_text("x")
    where = setting(tmp_path, ignored={"data"})
    found = explain(Cause("missing_file", "data/set/train.bin"), where)
    assert 'add [run] data = ["data/set"]' in found.advice
    assert "ignored by git" in found.summary


def test_an_absolute_path_in_the_work_tree_is_a_repository_path(tmp_path: Path) -> None:
    (tmp_path / "data.bin").write_text("x")
    work = tmp_path / ".overnight" / "runs" / "t" / "1" / "work"
    where = setting(tmp_path, ignored={"data.bin"}, workdir=work)
    found = explain(Cause("missing_file", f"{work}/data.bin"), where)
    assert '[run] data = ["data.bin"]' in found.advice


def test_a_file_nowhere_and_one_outside_the_repository(tmp_path: Path) -> None:
    nowhere = explain(Cause("missing_file", "data/x.bin"), setting(tmp_path))
    assert "neither in the commit nor in your repository" in nowhere.advice
    outside = explain(Cause("missing_file", "/home/me/data/x.bin"), setting(tmp_path))
    assert "outside the repository" in outside.advice and "[run] data" in outside.advice


def test_an_untracked_file_is_to_be_committed(tmp_path: Path) -> None:
    (tmp_path / "vocab.json").write_text("{}")
    found = explain(Cause("missing_file", "vocab.json"), setting(tmp_path))
    assert "not committed" in found.advice


def test_a_module_of_the_repository_that_is_not_committed_is_a_missing_file(
        tmp_path: Path) -> None:
    (tmp_path / "configurator.py").write_text("")
    found = explain(Cause("import", "configurator"), setting(tmp_path))
    assert "configurator.py" in found.advice and "not committed" in found.advice


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment with nothing installed: `python` there imports no packages."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    return venv / "bin"


def test_an_interpreter_without_the_module_and_one_that_has_it(tmp_path: Path,
                                                                bare_python: Path) -> None:
    where = setting(tmp_path, command="python train.py --fast", path=str(bare_python))
    found = explain(Cause("import", "rich"), where)  # overnight's own dependency
    assert f"`python` is {bare_python / 'python'} in the run's environment" in found.advice
    assert f'command = "{sys.executable} train.py --fast"' in found.advice
    assert sys.executable in found.summary


def test_an_interpreter_nobody_here_can_fix(tmp_path: Path, bare_python: Path) -> None:
    where = setting(tmp_path, path=str(bare_python))
    found = explain(Cause("import", "no_such_package_anywhere"), where)
    assert "no other interpreter found here can" in found.advice
    assert "Install no_such_package_anywhere" in found.advice


def test_uv_run_is_told_to_add_the_package(tmp_path: Path) -> None:
    found = explain(Cause("import", "torch"), setting(tmp_path, command="uv run train.py"))
    assert "uv add torch" in found.advice


def test_no_python_on_path_suggests_one_by_its_full_path(tmp_path: Path) -> None:
    found = explain(Cause("no_program", "python"), setting(tmp_path, path=str(tmp_path)))
    assert f'command = "{sys.executable} train.py"' in found.advice


def test_a_timeout_and_no_metric(tmp_path: Path) -> None:
    assert "timeout_seconds (7 s)" in explain(Cause("timeout"), setting(tmp_path)).advice
    line = "step 10: train loss 2.2177, val loss 2.3790"
    found = explain(Cause("no_metric", "val_loss", (line,)), setting(tmp_path))
    assert "printed no val_loss" in found.advice and line in found.advice
    assert "[objective] pattern = 'val loss" in found.advice and "would read it" in found.summary
    nothing = explain(Cause("no_metric", "val_loss", ()), setting(tmp_path))
    assert "print `val_loss: <number>`" in nothing.advice and nothing.summary == ""
