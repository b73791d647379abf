"""[objective] pattern: the metric from output that does not print `name: value`."""

from __future__ import annotations

import pytest
from conftest import PYTHON, rows

from overnight.errors import ConfigError
from overnight.spec import parse_spec

# Prints its loss the way many training scripts do (nanoGPT's shape), never `val_loss: x`.
TRAIN = """\
LEARNING_RATE = {lr}

loss = 1.0 + 100 * abs(LEARNING_RATE - 0.004)
for step in (0, 250, 500):
    print(f"step {{step}}: train loss {{loss + 0.5 - step / 1000:.4f}}, val loss "
          f"{{loss + 0.6 - step / 1000:.4f}}")
"""

SPEC = f"""\
[objective]
metric = "val_loss"
pattern = 'val loss ([0-9.]+)'

[run]
command = "{PYTHON} train.py"
budget_seconds = 20
timeout_seconds = 30
sandbox = "none"

[files]
editable = ["train.py"]

[judge]
mode = "greedy"

[search]
strategy = "grid"
bounds = {{ LEARNING_RATE = [0.0005, 0.016] }}
"""


def test_the_last_match_of_the_pattern_is_the_metric(make_repo, cli):
    repo = make_repo({"train.py": TRAIN.format(lr=0.001)}, SPEC)
    out = cli("run", "-t", "p", "-n", "3", cwd=repo, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    rs = rows(repo, "p")
    assert rs[0]["status"] == "keep"
    assert rs[0]["metric"] == pytest.approx(1.3 + 0.6 - 0.5)  # step 500's val loss
    assert {r["status"] for r in rs} <= {"keep", "discard"}


@pytest.mark.parametrize(("pattern", "why"), [
    ("val loss [0-9.]+", "exactly one group"),
    ("(val) loss ([0-9.]+)", "exactly one group"),
    ("val loss ([0-9.]+", "not a regular expression"),
])
def test_a_pattern_must_compile_with_one_group(pattern, why):
    with pytest.raises(ConfigError, match=rf"\[objective\] pattern .*{why}"):
        parse_spec({"objective": {"metric": "val_loss", "pattern": pattern},
                    "run": {"command": "true"}, "files": {"editable": ["a.py"]}})
