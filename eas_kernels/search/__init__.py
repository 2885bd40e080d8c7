"""Redundancy search (EAS_SPEC §5): which MHAs a task does not need."""

from .bandit import BanditSearch

__all__ = ["BanditSearch"]
