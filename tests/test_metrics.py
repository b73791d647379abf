"""Metric parsing: every summary and METRIC line; never a guess."""

from __future__ import annotations

from pathlib import Path

from overnight.metrics import Metrics, merge_json_file, parse_log, parse_text

LOG = """\
step 10 | loss 2.31 | 1.0s
---
val_bpb:          0.997900
training_seconds: 300.1
peak_vram_mb:     45060.2
num_steps:        953
METRIC accuracy=0.91
METRIC tiny=1e-3
note: this is not a number
"""


def test_summary_and_metric_lines():
    m = parse_text(LOG)
    assert m.values == {
        "val_bpb": 0.9979, "training_seconds": 300.1, "peak_vram_mb": 45060.2,
        "num_steps": 953.0, "accuracy": 0.91, "tiny": 0.001,
    }
    assert m.objective("val_bpb") == (0.9979, None)


def test_missing_and_non_finite_objective_have_no_value():
    m = parse_text("val_bpb: nan\nloss: inf\n")
    value, why = m.objective("val_bpb")
    assert value is None and "nan" in why
    value, why = m.objective("val_loss")
    assert value is None and "no val_loss" in why


def test_later_line_wins_and_can_turn_nan():
    m = parse_text("val_bpb: 1.0\nval_bpb: 0.9\n")
    assert m.values["val_bpb"] == 0.9
    m = parse_text("val_bpb: 1.0\nMETRIC val_bpb=NaN\n")
    assert m.objective("val_bpb")[0] is None


def test_parse_log_reads_the_tail_of_a_large_file(tmp_path: Path):
    log = tmp_path / "run.log"
    log.write_text("x" * 100 + "\n" + "noise line\n" * 200_000 + "val_bpb: 1.5\n")
    assert parse_log(log).values == {"val_bpb": 1.5}


def test_json_metrics_file(tmp_path: Path):
    m = Metrics()
    assert "was not written" in merge_json_file(tmp_path / "r.json", m)
    (tmp_path / "r.json").write_text('{"val_bpb": 1.25, "ok": true, "name": "x"}')
    assert merge_json_file(tmp_path / "r.json", m) is None
    assert m.values == {"val_bpb": 1.25}
    (tmp_path / "r.json").write_text("[1, 2]")
    assert "JSON object" in merge_json_file(tmp_path / "r.json", m)
