"""Redundancy search (EAS_SPEC §5): which MHAs (or FFNs, or blocks) a task does not need."""

from .bandit import BanditSearch
from .candidates import Candidates

__all__ = ["BanditSearch", "Candidates"]
