"""Proposers turn the history of a loop into the next candidate change."""

from __future__ import annotations

from pathlib import Path

from overnight.proposers.base import Context, Experiment, Proposal, Proposer, Usage
from overnight.snapshot import Repo
from overnight.spec import Spec

__all__ = ["Context", "Experiment", "Proposal", "Proposer", "Usage", "make_proposer"]


def make_proposer(spec: Spec, files: dict[str, str], repo: Repo, scratch: Path) -> Proposer:
    """The proposer the spec asks for. `files`: the editable files at the baseline."""
    if spec.proposer.kind == "llm":
        from overnight.proposers.llm import LLMProposer

        return LLMProposer(spec, trace_dir=scratch.parent / "llm")
    if spec.proposer.kind == "agent":
        from overnight.proposers.agent_cli import AgentProposer

        return AgentProposer(spec, repo, scratch)
    from overnight.proposers.search import SearchProposer

    return SearchProposer(spec, files)
