"""PNG plots of a search: the preferences over time and the final plan (paper Fig. 6)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pyplot():  # noqa: ANN202 - the module
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install matplotlib") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_preferences(
    updates: Sequence[dict[str, Any]], arm_names: Sequence[str], path: str | os.PathLike[str]
) -> Path:
    """Heat map of every arm's importance after each round of the search (x: step)."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(8, 0.18 * len(arm_names) + 1.8))
    if updates:
        scores = [list(arm) for arm in zip(*(u["scores"] for u in updates), strict=True)]
        steps = [u["step"] for u in updates]
        image = axes.imshow(
            scores,
            aspect="auto",
            cmap="coolwarm_r",
            extent=(steps[0] - 0.5, steps[-1] + 0.5, len(arm_names) - 0.5, -0.5),
            interpolation="nearest",
        )
        figure.colorbar(image, ax=axes, label="importance (low = redundant)")
    axes.set_yticks(range(len(arm_names)), arm_names, fontsize=6)
    axes.set_xlabel("training step of the search")
    axes.set_title("Importance of each arm during the search")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def plot_plan(
    scores: Sequence[float],
    skipped_arms: Sequence[int],
    arm_names: Sequence[str],
    path: str | os.PathLike[str],
) -> Path:
    """Bar chart of the final importances; the skipped arms highlighted (paper Fig. 6)."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(max(6, 0.25 * len(scores) + 2), 3.2))
    skipped = set(skipped_arms)
    colours = ["tab:red" if i in skipped else "tab:blue" for i in range(len(scores))]
    axes.bar(range(len(scores)), scores, color=colours)
    axes.set_xticks(range(len(scores)), arm_names, rotation=90, fontsize=6)
    axes.set_ylabel("final importance")
    axes.set_title(f"Final plan: {len(skipped)} skipped (red)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)
