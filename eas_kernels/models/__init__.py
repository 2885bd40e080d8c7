"""Model definitions that EAS patches."""

from . import lavin

__all__ = ["lavin"]
