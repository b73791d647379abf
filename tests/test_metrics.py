"""Metric parsing: every summary and METRIC line; never a guess."""

from __future__ import annotations

import os
import re
import time
import tracemalloc
from pathlib import Path

import pytest

from overnight.metrics import (
    Metrics,
    MetricStream,
    UnsafeFile,
    merge_json_file,
    parse_log,
    parse_text,
    read_regular,
)

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


# -- the stream parser and safe reads -------------------------------------------------------


def test_a_metric_split_at_every_byte_is_still_found():
    data = b"step 1\nval_bpb: 0.9979\rMETRIC acc=0.5\r\nloss: nan\n"
    for cut in range(len(data) + 1):
        s = MetricStream()
        s.feed(data[:cut])
        s.feed(data[cut:])
        m = s.close()
        assert m.values == {"val_bpb": 0.9979, "acc": 0.5}, cut
        assert m.non_finite == {"loss": "nan"}


def test_a_metric_followed_by_megabytes_of_output_is_found():
    s = MetricStream()
    s.feed(b"val_loss: 1.25\n")
    for _ in range(80):
        s.feed(b"noise " * 10_000 + b"\n")
    assert s.close().values == {"val_loss": 1.25}


def test_one_endless_line_stays_in_bounded_memory():
    s = MetricStream()
    chunk = b"x" * (64 * 1024)
    tracemalloc.start()
    for _ in range(800):  # 50 MiB without a newline
        s.feed(chunk)
    s.feed(b"\nval_loss: 2.0\n")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20
    assert s.close().values == {"val_loss": 2.0}


def test_a_pattern_reads_output_the_user_already_prints():
    s = MetricStream(re.compile(r"val loss (\d+\.\d+)"), "val_loss")
    s.feed(b"step 0: train loss 4.2, val loss 4.3\nstep 250: train loss 2.1, val loss 2.25\n")
    assert s.close().values == {"val_loss": 2.25}


def test_files_that_are_not_regular_are_refused_at_once(tmp_path: Path):
    fifo = tmp_path / "r.json"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(UnsafeFile, match="FIFO"):
        read_regular(fifo, 1 << 20)  # no writer: an ordinary open would hang forever
    assert time.monotonic() - t0 < 1
    assert "FIFO" in merge_json_file(fifo, Metrics())
    link = tmp_path / "link.json"
    (tmp_path / "real.json").write_text('{"a": 1}')
    link.symlink_to(tmp_path / "real.json")
    with pytest.raises(UnsafeFile, match="symlink"):
        read_regular(link, 1 << 20)
    with pytest.raises(UnsafeFile, match="device"):
        read_regular(Path("/dev/zero"), 1 << 20)
    sparse = tmp_path / "huge.json"
    with open(sparse, "wb") as f:
        f.truncate(1 << 30)
    tracemalloc.start()
    with pytest.raises(UnsafeFile, match="over the"):
        read_regular(sparse, 1 << 20)  # refused by its size, never read
    assert tracemalloc.get_traced_memory()[1] < 1 << 20
    tracemalloc.stop()
