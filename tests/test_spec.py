"""overnight.toml: defaults, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from overnight.errors import ConfigError
from overnight.spec import load_spec, parse_spec

GOOD = {
    "objective": {"metric": "val_bpb", "direction": "lower"},
    "run": {"command": "python train.py", "budget_seconds": 20, "timeout_seconds": 60},
    "files": {"editable": ["train.py"], "protected": ["prepare.py"]},
    "search": {"strategy": "perturb", "knobs": ["LR"], "bounds": {"LR": [1e-5, 1.0]}},
}


def with_(section: str, **values) -> dict:
    data = {k: dict(v) for k, v in GOOD.items()}
    data[section].update(values)
    return data


def test_good_spec_and_defaults():
    spec = parse_spec(GOOD)
    assert spec.objective.min_delta == 0.0
    assert spec.run.parallel == 1
    assert spec.proposer.kind == "search"
    assert (spec.search.bounds["LR"].low, spec.search.bounds["LR"].high) == (1e-5, 1.0)
    assert spec.objective.better(0.9, 1.0) and not spec.objective.better(1.0, 1.0)


@pytest.mark.parametrize(
    ("section", "values", "expected"),
    [
        ("run", {"budget_seconds": -5}, "[run] budget_seconds"),
        ("run", {"budget_seconds": "fast"}, "[run] budget_seconds"),
        ("run", {"parallel": 0}, "[run] parallel"),
        ("run", {"parallel": "all"}, "[run] parallel"),
        ("run", {"timeout_seconds": 5}, "timeout_seconds (5) must be >= budget_seconds"),
        ("objective", {"direction": "up"}, "[objective] direction"),
        ("objective", {"min_delta": -1}, "[objective] min_delta"),
        ("run", {"budgett": 3}, "[run] budgett is not a known key"),
        ("search", {"strategy": "bayes"}, "[search] strategy"),
        ("search", {"bounds": {"LR": [1.0, 0.1]}}, "lower bound 1 must be < upper bound 0.1"),
        ("files", {"protected": ["train.py"]}, "cannot be both editable and protected"),
    ],
)
def test_bad_values_name_the_key(section, values, expected):
    with pytest.raises(ConfigError) as e:
        parse_spec(with_(section, **values))
    assert expected in str(e.value)
    assert e.value.exit_code == 2


def test_missing_section_and_unknown_section():
    data = {k: v for k, v in GOOD.items() if k != "files"}
    with pytest.raises(ConfigError, match=r"\[files\] is required"):
        parse_spec(data)
    with pytest.raises(ConfigError, match=r"\[proposr\] is not a known key"):
        parse_spec({**GOOD, "proposr": {"kind": "search"}})


def test_load_spec_reports_toml_syntax_and_absence(tmp_path: Path):
    with pytest.raises(ConfigError, match="overnight init"):
        load_spec(tmp_path)
    (tmp_path / "overnight.toml").write_text("[objective\nmetric = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_spec(tmp_path)
