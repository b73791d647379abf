"""Integrity around one run (being built: manifests, live watch, attestation)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from overnight.snapshot import Repo


@dataclass
class Verdict:
    report: dict = field(default_factory=dict)
    summary: str = ""  # one line when tampered, else ""
    runtime_knobs: dict = field(default_factory=dict)


class RunGuard:
    def __init__(self, repo: Repo, commit: str, workdir: Path):
        self.repo, self.commit, self.workdir = repo, commit, workdir

    def __enter__(self) -> RunGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def verdict(self, attest_path: Path | None) -> Verdict:
        return Verdict()


def attest_env(out: Path, root: Path, pythonpath: str | None) -> dict[str, str]:
    return {}
