"""Proposers turn the history of a loop into the next candidate change."""

from overnight.proposers.base import Context, Experiment, Proposal, Proposer

__all__ = ["Context", "Experiment", "Proposal", "Proposer", "make_proposer"]


def make_proposer(spec, repo_files) -> Proposer:  # noqa: ANN001
    """Build the proposer the spec asks for. `repo_files` maps editable path -> text at HEAD."""
    from overnight.proposers.search import SearchProposer

    return SearchProposer(spec, repo_files)
