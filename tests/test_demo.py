"""`overnight demo`: the bundled tinygpt example runs end to end on CPU, no network."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from overnight.knobs import list_knobs
from overnight.spec import load_spec

OVERNIGHT = [sys.executable, "-m", "overnight.cli"]


def test_demo_creates_a_repository_and_runs_the_loop(tmp_path: Path):
    demo = tmp_path / "demo"
    proc = subprocess.run([*OVERNIGHT, "demo", str(demo), "--max-experiments", "3",
                           "--budget", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    spec = load_spec(demo)
    assert spec.objective.metric == "val_bpb" and spec.files.protected == ["prepare.py"]
    knobs = {k.name for k in list_knobs((demo / "train.py").read_text(), "train.py")}
    assert set(spec.search.knobs or []) <= knobs and "LEARNING_RATE" in knobs

    out = subprocess.run([*OVERNIGHT, "export", "--format", "jsonl", "-C", str(demo)],
                         capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 3
    base = rows[0]
    assert base["is_baseline"] and base["status"] == "keep"
    assert 0.5 < base["metric"] < 8.0  # bits per byte of English text, from a real model
    assert base["metrics"]["num_steps"] > 0 and base["metrics"]["training_seconds"] >= 1.9
    # The default judge measures the noise first: the baseline runs three times.
    assert [r["status"] for r in rows] == ["keep", "repeat", "repeat"], rows
    assert all(r["repeat_of"] == base["id"] for r in rows[1:])
    # The user's side of the demo repository is untouched: one commit, clean tree.
    log = subprocess.run(["git", "log", "--oneline", "main"], cwd=demo, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert len(log) == 1
    status = subprocess.run(["git", "status", "--porcelain"], cwd=demo, capture_output=True,
                            text=True, check=True).stdout
    assert status == ""

    # The hint it ends with works in a shell where the venv is not activated.
    hint = next(line for line in proc.stdout.splitlines() if line.startswith("look around: "))
    looked = subprocess.run(["sh", "-c", hint.removeprefix("look around: ")], cwd=tmp_path,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
                            capture_output=True, text=True, timeout=60)
    assert looked.returncode == 0, hint + looked.stderr
    assert "tag demo" in looked.stdout and "commit\tval_bpb" in looked.stdout

    # Running it again resumes in place rather than failing or starting over.
    again = subprocess.run([*OVERNIGHT, "demo", str(demo), "--max-experiments", "3",
                            "--budget", "2"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stdout
