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


def plot_routes(
    routes: Sequence[Sequence[bool]],
    layers: Sequence[int],
    history: Sequence[dict[str, Any]],
    target: float,
    path: str | os.PathLike[str],
) -> Path:
    """Three panels of a routed model (ROE_SPEC §6): the skip frequency of each routed
    layer over the examples of ``routes`` (``(N, len(layers))`` bool), the distribution of
    skipped units per example, and ``ρ̂`` over training (``history`` of
    :class:`~eas_kernels.tuning.route_trainer.RouteTuner`) against the target."""
    plt = _pyplot()
    rows = [list(map(bool, row)) for row in routes]
    frequency = [sum(column) / len(rows) for column in zip(*rows, strict=True)] if rows else []
    figure, (heat, counts, ratio) = plt.subplots(3, 1, figsize=(8, 7.5))
    image = heat.imshow([frequency], aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=heat, label="share of examples skipping")
    heat.set_xticks(range(len(layers)), [str(layer) for layer in layers], fontsize=6)
    heat.set_yticks([])
    heat.set_xlabel("routed layer")
    heat.set_title("skip frequency per layer")
    skipped = [sum(row) for row in rows]
    counts.hist(skipped, bins=range(len(layers) + 2), align="left", rwidth=0.8)
    counts.set_xlabel("skipped units per example")
    counts.set_ylabel("examples")
    steps = [record["step"] for record in history]
    ratio.plot(steps, [record["realized_ratio"] for record in history], label="ρ̂ (batch)")
    ratio.axhline(target, color="black", linestyle="--", label=f"target ρ = {target}")
    ratio.set_xlabel("training step")
    ratio.set_ylabel("skip ratio")
    ratio.legend(loc="best")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
