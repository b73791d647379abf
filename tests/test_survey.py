"""What init reads from source text: printed metrics, reporting-only constants, ignored data."""

from __future__ import annotations

from overnight.survey import find_metric, ignored_data, reporting_only


def test_metric_from_a_summary_line_and_from_a_phrase() -> None:
    summary = find_metric({"t.py": 'print(f"val_bpb:   {v:.6f}")\n'}, None)
    assert (summary.metric, summary.pattern) == ("val_bpb", None)
    phrase = find_metric({"t.py": 'print(f"step {i}: train loss {a:.4f}, val loss {b:.4f}")\n'},
                         None)
    assert phrase.metric == "val_loss" and phrase.pattern is not None
    import re
    line = "step 750: train loss 2.2177, val loss 2.3790"
    assert re.findall(phrase.pattern, line) == ["2.3790"]
    percent = find_metric({"t.py": 'print("epoch %d val acc %.3f" % (e, acc))\n'}, "val_acc")
    assert re.findall(percent.pattern, "epoch 3 val acc 0.912") == ["0.912"]


def test_only_reported_constants_are_found_and_the_metric_is_not_one() -> None:
    src = """
PEAK = 1e15
LR = 0.1
SCALE = 2.0
for step in range(3):
    loss = (LR - 0.05) ** 2 * SCALE
    mfu = step / PEAK
    print(f"mfu {mfu}")
print(f"val_loss: {loss}")
"""
    only = reporting_only([src], "val_loss")
    assert "PEAK" in only and "mfu" in only
    assert "LR" not in only and "SCALE" not in only and "loss" not in only


def test_ignored_data_the_script_reads() -> None:
    ignored = ["data/shakespeare_char/train.bin", "data/shakespeare_char/meta.pkl",
               "out/", ".venv/", "wandb/", "notes/private.txt"]
    sources = ["import os\nout_dir = 'out'\npath = os.path.join('data', dataset, 'train.bin')\n"]
    assert ignored_data(ignored, sources) == ["data/shakespeare_char"]
    assert ignored_data(ignored, ["print('hi')\n"]) == []
