"""Protected regions cannot be neutralised from outside: not hidden in a string or a block,
not bypassed by rebinding what they call, not by monkeypatching builtins."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from overnight.regions import check_edit

TRAIN = """\
import time
from prepare import evaluate_bpb

LEARNING_RATE = 0.001
loss = 1.0 + LEARNING_RATE


def helper(x):
    time = x  # a local, not the module's `time`
    return time


# overnight: protect
val = evaluate_bpb(loss)
print(f"val_loss: {val:.6f}")
elapsed = time.time()
# overnight: end
"""


def above(code: str, text: str = TRAIN) -> str:
    """`code` inserted just above the protected region (outside it)."""
    return text.replace("# overnight: protect\n", code + "\n# overnight: protect\n")


def test_ordinary_edits_outside_the_region_pass() -> None:
    assert check_edit("train.py", TRAIN, TRAIN.replace("0.001", "0.002")) is None
    assert check_edit("train.py", TRAIN, above("loss = loss * 2\nval = 3")) is None
    assert check_edit("train.py", TRAIN, above("class Logger:\n    def print(self):\n"
                                               "        pass\n")) is None
    assert check_edit("train.py", TRAIN, above("xs = [time for time in range(3)]")) is None
    assert check_edit("train.py", TRAIN, above("from prepare import evaluate_bpb")) is None


def test_a_region_wrapped_in_a_string_is_rejected() -> None:
    new = TRAIN.replace("# overnight: protect\n", '_ = """\n# overnight: protect\n') \
        .replace("# overnight: end\n", '# overnight: end\n"""\n')
    problem = check_edit("train.py", TRAIN, new)
    assert problem is not None
    assert "protected region at lines 14-18 of train.py inside an assignment at line 13" \
        in problem
    assert "top-level statements" in problem


def test_a_region_in_a_call_or_a_parenthesised_expression_is_rejected() -> None:
    parent = "x = 1\n# overnight: protect\nprint(x)\n# overnight: end\n"
    new = parent.replace("# overnight: protect\n", "(lambda *a: None)(\n# overnight: protect\n")
    new = new.replace("# overnight: end\n", "# overnight: end\n)\n")
    problem = check_edit("train.py", parent, new) or ""
    assert "region at lines 3-5 of train.py inside an expression (a string?) at line 2" in problem


NESTED = """\
import time

STEPS = 3
t0 = time.time()
while True:
    # overnight: protect
    if time.time() - t0 > 5:
        break
    # overnight: end
    STEPS -= 1
    if STEPS == 0:
        break
"""


def test_a_region_the_parent_nested_may_stay_under_the_same_headers_only() -> None:
    assert check_edit("train.py", NESTED, NESTED.replace("STEPS = 3", "STEPS = 4")) is None
    assert check_edit("train.py", NESTED, NESTED.replace(
        "    STEPS -= 1\n", "    STEPS -= 2\n    print(STEPS)\n")) is None
    for header, kind in [("while False:", "while"), ("if False:", "if"),
                         ("def never():", "def"), ("with open('x'):", "with"),
                         ("for _ in []:", "for")]:
        problem = check_edit("train.py", NESTED, NESTED.replace("while True:", header))
        assert problem is not None, header
        assert f"of train.py inside the `{kind}` statement at line 5" in problem, problem


def test_a_region_moved_into_a_block_by_an_else_is_rejected() -> None:
    parent = "import time\nif True:\n    x = 1\n    # overnight: protect\n    y = 2\n" \
             "    # overnight: end\n"
    assert check_edit("train.py", parent, parent.replace("x = 1", "x = 3")) is None
    new = parent.replace("    x = 1\n", "    x = 1\nelse:\n    pass\nif False:\n    pass\n")
    problem = check_edit("train.py", parent, new)
    assert problem is not None and "inside the `if` statement at line 6" in problem


@pytest.mark.parametrize(("code", "name", "how"), [
    ("print = lambda *a, **k: None", "print", "assignment"),
    ("def print(*a, **k):\n    pass", "print", "def"),
    ("evaluate_bpb = lambda loss: 0.1", "evaluate_bpb", "assignment"),
    ("from fake_prepare import evaluate_bpb", "evaluate_bpb", "from fake_prepare import"),
    ("def evaluate_bpb(loss):\n    return 0.1", "evaluate_bpb", "def"),
    ("time.time = lambda: 0.0", "time.time", "attribute assignment"),
    ("setattr(time, 'time', lambda: 0.0)", "time.time", "setattr"),
    ("evaluate_bpb.__code__ = (lambda loss: 0.1).__code__", "evaluate_bpb.__code__",
     "attribute assignment"),
    ("def patch():\n    global print\n    print = len\npatch()", "print", "assignment"),
    ("_ = [(print := len) for _ in range(1)]", "print", "assignment"),
    ("import sys\nsys.stdout = open('/dev/null', 'w')", "sys.stdout", "attribute assignment"),
    ("for time in [0]:\n    pass", "time", "assignment"),
])
def test_rebinding_what_a_region_reads_is_rejected(code: str, name: str, how: str) -> None:
    problem = check_edit("train.py", TRAIN, above(code))
    assert problem is not None, code
    pattern = rf"rebinds `{re.escape(name)}` at line 1[3-6] of train.py \({re.escape(how)}"
    assert re.match(pattern, problem), problem
    assert "which the protected region at lines" in problem


def test_a_star_import_outside_the_region_is_rejected() -> None:
    problem = check_edit("train.py", TRAIN, above("from fake import *"))
    assert problem is not None and problem.startswith("binds every name at line 13")


def test_what_the_parent_already_bound_the_same_way_may_change() -> None:
    parent = above("def evaluate_bpb(loss):\n    return loss", TRAIN.replace(
        "from prepare import evaluate_bpb\n", ""))
    assert check_edit("train.py", parent, parent.replace("return loss", "return loss / 2")) \
        is None
    # ...but not be bound another way
    problem = check_edit("train.py", parent, above("evaluate_bpb = len", parent))
    assert problem is not None and "rebinds `evaluate_bpb`" in problem


@pytest.mark.parametrize("code", [
    "import builtins\nbuiltins.print = len",
    "import builtins as b",
    "from builtins import print as p",
    "__builtins__.print = len",
    "setattr(__import__('builtins'), 'print', len)",
])
def test_monkeypatching_builtins_is_rejected_in_any_python_file(code: str) -> None:
    problem = check_edit("train.py", TRAIN, above(code))
    assert problem is not None and problem.startswith("monkeypatches builtins ("), problem
    assert "at line 13 of train.py" in problem
    # model.py has no region, but every module shares builtins
    problem = check_edit("model.py", "X = 1\n", "X = 1\n" + code + "\n")
    assert problem is not None and "line 2 of model.py" in problem


@pytest.mark.parametrize("code", ["exec('print = len')", "globals()['print'] = len",
                                  "import sys\nsys.modules['prepare'] = None",
                                  "vars()['print'] = len"])
def test_back_doors_to_rebinding_are_rejected_unless_the_parent_had_them(code: str) -> None:
    problem = check_edit("train.py", TRAIN, above(code))
    assert problem is not None and "it can rebind names the protected regions read" in problem
    parent = above(code)
    assert check_edit("train.py", parent, parent.replace("0.001", "0.002")) is None


def test_non_python_files_have_text_regions_only() -> None:
    assert check_edit("config.yaml", "lr: 0.1\n", "lr: [0.2\n") is None
    yaml = "lr: 0.1\n# overnight: protect\nbudget: 5\n# overnight: end\n"
    assert check_edit("config.yaml", yaml, yaml.replace("0.1", "0.2")) is None
    assert "protected region of config.yaml" in (
        check_edit("config.yaml", yaml, yaml.replace("5", "50")) or "")


def test_python_that_does_not_parse() -> None:
    problem = check_edit("train.py", TRAIN, TRAIN.replace("loss = 1.0", "loss = (1.0"))
    assert problem is not None and problem.startswith("leaves train.py not valid Python")
    assert check_edit("model.py", "X = 1\n", "X = (\n") is None  # no region: it will just fail


def test_the_shipped_example_accepts_an_ordinary_edit() -> None:
    import overnight

    text = (Path(overnight.__file__).parent / "examples/tinygpt/train.py").read_text()
    assert check_edit("train.py", text, text.replace("LEARNING_RATE =", "LEARNING_RATE  =")) \
        is None
