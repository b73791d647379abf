"""Metric parsing: every summary and METRIC line; never a guess. Safe reads of run files."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
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
    read_regular_text,
    tail,
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
LOG_VALUES = {
    "val_bpb": 0.9979, "training_seconds": 300.1, "peak_vram_mb": 45060.2,
    "num_steps": 953.0, "accuracy": 0.91, "tiny": 0.001,
}
MiB = 1 << 20


def test_summary_and_metric_lines():
    m = parse_text(LOG)
    assert m.values == LOG_VALUES
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


def test_a_long_run_of_digits_is_rejected_in_linear_time():
    # The old number pattern backtracked quadratically: 16k digits took 9 s.
    line = "val_bpb: " + "1" * 60_000 + "x"
    started = time.monotonic()
    assert parse_text(line).values == {}
    assert time.monotonic() - started < 1.0


# --- MetricStream -----------------------------------------------------------------


def _streamed(*chunks: bytes) -> MetricStream:
    stream = MetricStream()
    for chunk in chunks:
        stream.feed(chunk)
    stream.close()
    return stream


def test_stream_finds_what_parse_text_finds_split_at_every_byte():
    data = ("naïve: 1.5\n" + LOG + "é: not\nlast: 7").encode()  # multi-byte chars, no final EOL
    expected = dict(LOG_VALUES, last=7.0, naïve=1.5)
    for cut in range(len(data) + 1):
        assert _streamed(data[:cut], data[cut:]).metrics.values == expected, cut
    assert _streamed(*(data[i:i + 1] for i in range(len(data)))).metrics.values == expected


def test_carriage_returns_end_lines_like_a_progress_bar_redraw():
    out = (b"epoch 1  10%|#    | loss: 3.0\r"
           b"epoch 1 100%|#####|\rval_loss: 2.5\r\n"
           b"METRIC accuracy=0.5\r\n"
           b"\r 50%|###  |\r100%|#####|")
    stream = _streamed(out)
    assert stream.metrics.values == {"val_loss": 2.5, "accuracy": 0.5}


def test_metrics_are_current_while_feeding_and_the_last_line_counts_at_close():
    stream = MetricStream()
    stream.feed(b"val_loss: 2.0\nval_loss: 1.")
    assert stream.metrics.values == {"val_loss": 2.0}
    stream.feed(b"5")
    assert stream.close().values == {"val_loss": 1.5}
    with pytest.raises(ValueError, match="after close"):
        stream.feed(b"more\n")


def test_a_metric_followed_by_five_mib_of_output_is_found(tmp_path: Path):
    noise = b"step 123 | loss 2.345 | lr 0.001 | 12.3ms\n" * (5 * MiB // 41)
    stream = MetricStream()
    stream.feed(b"val_bpb: 0.75\n")
    for i in range(0, len(noise), 64 * 1024):
        stream.feed(noise[i:i + 64 * 1024])
    assert stream.close().values == {"val_bpb": 0.75}
    log = tmp_path / "run.log"
    log.write_bytes(b"val_bpb: 0.75\n" + noise)
    assert parse_log(log).values == {"val_bpb": 0.75}


def test_a_fifty_mib_line_is_not_a_metric_and_memory_stays_bounded():
    chunk = b"9" * (64 * 1024)
    stream = MetricStream()
    tracemalloc.start()
    try:
        stream.feed(b"val_bpb: ")
        for _ in range(50 * MiB // len(chunk)):
            stream.feed(chunk)
        stream.feed(b"\nval_loss: 0.5\n")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * MiB, peak
    assert stream.close().values == {"val_loss": 0.5}  # the long line was not one
    assert stream.overlong_lines == 1


def test_a_line_just_over_the_cap_is_not_a_metric():
    stream = MetricStream(max_line=64)
    stream.feed(b"val_bpb: 1.0" + b" " * 60 + b"\nok: 2\n")
    assert stream.close().values == {"ok": 2.0}


def test_distinct_names_are_capped_but_the_objective_is_always_kept():
    stream = MetricStream(objective="val_bpb", max_names=100)
    stream.feed(b"".join(b"m%d: 1\n" % i for i in range(1000)))
    stream.feed(b"val_bpb: 0.5\nm5: 2\n")
    m = stream.close()
    assert len(m.values) == 101 and m.values["val_bpb"] == 0.5 and m.values["m5"] == 2.0
    assert "m500" not in m.values and stream.dropped_names == 900


def test_the_default_name_cap_holds_ten_thousand():
    stream = MetricStream()
    block = b"".join(b"name_%07d: 1\n" % i for i in range(100_000))
    stream.feed(block)
    assert len(stream.close().values) == 10_000
    assert stream.dropped_names == 90_000


def test_a_pattern_records_its_last_match_under_the_objective():
    pattern = re.compile(r"loss=([-+.\deE]+)")
    stream = MetricStream("val_loss", pattern)
    stream.feed(b"step 1 loss=3.0\nstep 2 loss=2.5 then loss=2.25\nstep 3 loss=oops\n")
    assert stream.close().values == {"val_loss": 2.25}
    with pytest.raises(ValueError, match="exactly one group"):
        MetricStream("val_loss", re.compile(r"loss=(\d+)\.(\d+)"))
    with pytest.raises(ValueError, match="objective"):
        MetricStream(None, pattern)


def test_parse_log_reads_a_metric_far_from_the_end(tmp_path: Path):
    log = tmp_path / "run.log"
    log.write_text("val_bpb: 1.5\n" + "noise line\n" * 200_000)
    assert parse_log(log).values == {"val_bpb": 1.5}
    assert parse_log(tmp_path / "absent.log").values == {}


# --- safe reads -------------------------------------------------------------------


def test_read_regular_reads_a_file_up_to_its_cap(tmp_path: Path):
    f = tmp_path / "r.json"
    f.write_bytes(b"x" * 100)
    assert read_regular(f, 100) == b"x" * 100
    assert read_regular_text(f, 1000) == "x" * 100
    with pytest.raises(UnsafeFile, match="101 bytes, over the 100-byte limit") as e:
        f.write_bytes(b"x" * 101)
        read_regular(f, 100)
    assert e.value.kind == "too large"
    with pytest.raises(FileNotFoundError):
        read_regular(tmp_path / "absent", 100)


def test_a_fifo_with_no_writer_is_refused_at_once(tmp_path: Path):
    fifo = tmp_path / "metrics.json"
    os.mkfifo(fifo)
    # In a child process with a deadline: a read that blocks must fail, not hang the suite.
    script = f"""
import json
from pathlib import Path
from overnight.metrics import Metrics, UnsafeFile, merge_json_file, parse_log, read_regular, tail
p = Path({str(fifo)!r})
try:
    read_regular(p, 1024)
    kind = None
except UnsafeFile as e:
    kind = e.kind
try:
    parse_log(p)
    log_kind = None
except UnsafeFile as e:
    log_kind = e.kind
print(json.dumps([kind, log_kind, merge_json_file(p, Metrics()), tail(p)]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    kind, log_kind, merged, shown = json.loads(done.stdout)
    assert kind == log_kind == "named pipe (FIFO)"
    assert merged == ("metrics file metrics.json is a named pipe (FIFO), not a regular file; "
                      "it is not read")
    assert "named pipe (FIFO)" in shown


def test_a_sparse_gibibyte_file_is_refused_by_its_size_without_reading(tmp_path: Path):
    big = tmp_path / "metrics.json"
    big.touch()
    os.truncate(big, 1 << 30)
    tracemalloc.start()
    try:
        with pytest.raises(UnsafeFile, match="1073741824 bytes, over the 1048576-byte limit"):
            read_regular(big, MiB)
        message = merge_json_file(big, Metrics())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024, peak
    assert message is not None and "over the 1048576-byte limit" in message


def test_a_symlink_to_a_valid_file_is_refused(tmp_path: Path):
    real = tmp_path / "real.json"
    real.write_text('{"val_bpb": 1.0}')
    link = tmp_path / "metrics.json"
    link.symlink_to(real)
    with pytest.raises(UnsafeFile, match="is a symbolic link") as e:
        read_regular(link, MiB)
    assert e.value.kind == "symbolic link"
    m = Metrics()
    assert "symbolic link" in merge_json_file(link, m)
    assert m.values == {}
    log = tmp_path / "run.log"
    log.symlink_to(real)
    with pytest.raises(UnsafeFile, match="symbolic link"):
        parse_log(log)
    assert "symbolic link" in tail(log)


@pytest.mark.parametrize("path, kind", [("/dev/zero", "character device"),
                                        ("/dev/null", "character device")])
def test_a_device_is_refused(path: str, kind: str):
    with pytest.raises(UnsafeFile, match=kind) as e:
        read_regular(Path(path), MiB)
    assert e.value.kind == kind


def test_a_directory_and_a_socket_are_refused(tmp_path: Path):
    with pytest.raises(UnsafeFile, match="is a directory"):
        read_regular(tmp_path, MiB)
    where = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(where))
        with pytest.raises(UnsafeFile, match="is a socket"):
            read_regular(where, MiB)
        assert "socket" in merge_json_file(where, Metrics())


def test_json_metrics_file(tmp_path: Path):
    m = Metrics()
    assert "was not written" in merge_json_file(tmp_path / "r.json", m)
    (tmp_path / "r.json").write_text('{"val_bpb": 1.25, "ok": true, "name": "x"}')
    assert merge_json_file(tmp_path / "r.json", m) is None
    assert m.values == {"val_bpb": 1.25}
    (tmp_path / "r.json").write_text("[1, 2]")
    assert "JSON object" in merge_json_file(tmp_path / "r.json", m)


def test_hostile_json_is_an_error_or_no_value_never_a_crash(tmp_path: Path):
    f = tmp_path / "r.json"
    f.write_text("[" * 200_000)
    assert "nested too deeply" in merge_json_file(f, Metrics())
    f.write_bytes(b'{"val_bpb": \xff}')
    assert "not valid JSON" in merge_json_file(f, Metrics())
    m = Metrics()
    f.write_text('{"val_bpb": 1' + "0" * 400 + ', "neg": -1' + "0" * 400 + "}")
    assert merge_json_file(f, m) is None
    assert m.objective("val_bpb") == (None, "val_bpb is inf")
    assert m.non_finite == {"val_bpb": "inf", "neg": "-inf"}


def test_tail_shows_the_last_lines(tmp_path: Path):
    log = tmp_path / "run.log"
    log.write_text("".join(f"line {i}\n" for i in range(100_000)))
    assert tail(log, 3) == "line 99997\nline 99998\nline 99999"
    assert tail(tmp_path / "absent.log") == ""
