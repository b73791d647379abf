"""The harness's handle on the attestation injected into experiment processes.

This directory goes first on an experiment's PYTHONPATH: its sitecustomize.py (which runs the
sitecustomize it hides) loads _overnight_attest.py, which records what the process executed
into the JSON file named by OVERNIGHT_ATTEST_OUT. Those two files are stdlib only and never
import overnight: they run inside the experiment's own interpreter. This one is the harness's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

DIR = Path(__file__).resolve().parent
OUT_ENV = "OVERNIGHT_ATTEST_OUT"
ROOT_ENV = "OVERNIGHT_ATTEST_ROOT"
KNOBS_ENV = "OVERNIGHT_ATTEST_KNOBS"


def environ(out: Path, root: Path, base: Mapping[str, str] | None = None,
            knobs: Iterable[str] = ()) -> dict[str, str]:
    """`base` (default: os.environ) with the attestation switched on for one run: it writes
    `out` (which must not exist yet) and covers the Python files under `root`; `knobs`:
    lowercase names whose values at exit it records too (UPPER_CASE ones always are)."""
    env = dict(os.environ if base is None else base)
    rest = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(DIR) + (os.pathsep + rest if rest else "")
    env[OUT_ENV] = str(out)
    env[ROOT_ENV] = str(root)
    env[KNOBS_ENV] = ",".join(sorted(knobs))
    return env


def secondary_outputs(out: Path) -> list[Path]:
    """Attestations of the run's other processes (a subprocess, a sibling worker running a
    script under the root): `<stem>.<pid><suffix>` next to `out`, by pid."""
    found = []
    for path in out.parent.glob(f"{out.stem}.*{out.suffix}"):
        pid = path.name[len(out.stem) + 1:len(path.name) - len(out.suffix)]
        if pid.isdigit():
            found.append((int(pid), path))
    return [path for _, path in sorted(found)]
