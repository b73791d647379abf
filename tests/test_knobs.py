"""Knobs: list, read and rewrite module-level constants without touching anything else."""

from __future__ import annotations

import ast

import pytest

from overnight.errors import ConfigError
from overnight.knobs import Knob, format_value, list_knobs, read_knobs, rewrite

TRAIN = '''"""A tiny training script."""
import math

# --- knobs ---------------------------------------------------------------
LEARNING_RATE = 3e-4      # peak lr, tuned by hand
BATCH_SIZE    = 32        # sequences per step
WEIGHT_DECAY: float = 0.1
WARMUP = -1               # -1: no warmup
DEPTH = 4; WIDTH = 256    # two on one line
SCALE = (2.5)
USE_AMP = True            # a bool is not a knob
SEQ_LEN = 2 ** 10         # an expression is not a knob
A = B = 3                 # two names, one literal: not a knob
lower_case = 7
STEPS = 100
STEPS = 200               # assigned twice: not a constant

def train():
    INNER = 5             # not top level
    return LEARNING_RATE * INNER

class Config:
    HIDDEN = 64

if __name__ == "__main__":
    EPOCHS = 3
'''


def test_list_knobs_finds_top_level_numeric_constants_only() -> None:
    knobs = {k.name: k for k in list_knobs(TRAIN, "train.py")}

    assert set(knobs) == {
        "LEARNING_RATE", "BATCH_SIZE", "WEIGHT_DECAY", "WARMUP", "DEPTH", "WIDTH", "SCALE"
    }
    assert knobs["LEARNING_RATE"] == Knob("LEARNING_RATE", 3e-4, "float", "train.py", 5)
    assert knobs["BATCH_SIZE"] == Knob("BATCH_SIZE", 32, "int", "train.py", 6)
    assert knobs["WEIGHT_DECAY"].value == 0.1 and knobs["WEIGHT_DECAY"].kind == "float"
    assert knobs["WARMUP"].value == -1 and knobs["WARMUP"].kind == "int"
    assert knobs["WIDTH"].line == 9
    assert knobs["SCALE"].value == 2.5


def test_rewrite_changes_only_the_value() -> None:
    out = rewrite(TRAIN, {"LEARNING_RATE": 0.0006, "BATCH_SIZE": 48})

    # The spacing before each comment is kept as written, so the comment moves with the value.
    expected = TRAIN.replace("= 3e-4      #", "= 0.0006      #").replace(
        "= 32        #", "= 48        #"
    )
    assert out == expected


def test_rewrite_negative_annotated_and_parenthesized_values() -> None:
    out = rewrite(TRAIN, {"WARMUP": 10, "WEIGHT_DECAY": -0.05, "SCALE": -1e-05, "WIDTH": -8})

    assert "WARMUP = 10               # -1: no warmup\n" in out
    assert "WEIGHT_DECAY: float = -0.05\n" in out
    assert "SCALE = (-1e-05)\n" in out
    assert "DEPTH = 4; WIDTH = -8    # two on one line\n" in out
    knobs = {k.name: k.value for k in list_knobs(out, "train.py")}
    assert knobs["WARMUP"] == 10 and knobs["WEIGHT_DECAY"] == -0.05
    assert knobs["SCALE"] == -1e-05 and knobs["WIDTH"] == -8
    # Every other line is untouched.
    changed = [a for a, b in zip(TRAIN.splitlines(), out.splitlines(), strict=True) if a != b]
    assert len(changed) == 4


def test_rewrite_keeps_kinds() -> None:
    out = rewrite(TRAIN, {"BATCH_SIZE": 64.0, "LEARNING_RATE": 1})

    assert "BATCH_SIZE    = 64 " in out  # an int knob stays an int
    assert "LEARNING_RATE = 1.0 " in out  # a float knob stays a float
    with pytest.raises(ConfigError, match="BATCH_SIZE is an int knob"):
        rewrite(TRAIN, {"BATCH_SIZE": 40.5})


def test_rewrite_ignores_same_names_below_top_level() -> None:
    src = "INNER = 1\n\ndef f():\n    INNER = 2\n    return INNER\n"

    out = rewrite(src, {"INNER": 9})

    assert out == "INNER = 9\n\ndef f():\n    INNER = 2\n    return INNER\n"


@pytest.mark.parametrize("name", ["USE_AMP", "SEQ_LEN", "INNER", "HIDDEN", "EPOCHS", "STEPS", "A"])
def test_rewrite_of_a_non_knob_names_it(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        rewrite(TRAIN, {name: 1})


def test_round_trip_through_rewrite_and_list() -> None:
    values = {"LEARNING_RATE": 0.00123, "BATCH_SIZE": 7, "WEIGHT_DECAY": 0.0, "WARMUP": 0}

    out = rewrite(TRAIN, values)
    back = {k.name: k.value for k in list_knobs(out, "train.py") if k.name in values}

    assert back == values
    assert rewrite(out, {"LEARNING_RATE": 3e-4, "BATCH_SIZE": 32, "WEIGHT_DECAY": 0.1,
                         "WARMUP": -1}) != TRAIN  # literal spelling is normalized ...
    assert rewrite(TRAIN, {}) == TRAIN  # ... but an empty rewrite is byte-identical
    ast.parse(out)


def test_read_knobs_over_files_rejects_a_name_defined_twice() -> None:
    files = {"train.py": "LR = 0.1\nSTEPS = 10\n", "model.py": "WIDTH = 64\n"}
    assert {n: k.path for n, k in read_knobs(files).items()} == {
        "LR": "train.py", "STEPS": "train.py", "WIDTH": "model.py"
    }

    files["model.py"] = "WIDTH = 64\nLR = 0.2\n"
    with pytest.raises(ConfigError, match=r"LR is defined in both train\.py .* and model\.py"):
        read_knobs(files)


def test_invalid_python_is_a_config_error_naming_the_file() -> None:
    with pytest.raises(ConfigError, match="train.py"):
        list_knobs("LR = = 1\n", "train.py")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.0006, "0.0006"),
        (1e-05, "1e-05"),
        (3.0, "3.0"),
        (0.000123456, "0.0001235"),
        (0.1 + 0.2, "0.3"),
        (123456.7, "123500.0"),
        (-2.5, "-2.5"),
        (1e20, "1e+20"),
        (0.0, "0.0"),
        (48, "48"),
        (123456789, "123456789"),
    ],
)
def test_format_value(value: float, text: str) -> None:
    assert format_value(value) == text
    literal = ast.literal_eval(text)
    assert type(literal) is type(value)


def test_format_value_rejects_values_with_no_literal() -> None:
    with pytest.raises(ValueError):
        format_value(float("nan"))
    with pytest.raises(TypeError):
        format_value(True)


def test_rewrite_counts_columns_in_characters_not_bytes() -> None:
    src = 'NAME = "café"; LR = 0.1  # ünïcode\fCOMMENT = 1\nBS = 8\n'
    out = rewrite(src, {"LR": 0.25, "BS": 16})
    assert out == 'NAME = "café"; LR = 0.25  # ünïcode\fCOMMENT = 1\nBS = 16\n'
