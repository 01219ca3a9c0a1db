"""The loss-curve PNG of a run (matplotlib, part of the `train` extra)."""

from __future__ import annotations

import math
from pathlib import Path

from vaeinfer._fs import atomic_path

_NOT_PLOTTED = ("epoch", "step", "beta", "lr", "seconds")


def panels(history: list[dict]) -> dict[str, list[str]]:
    """One panel per metric, each on its own linear scale (nats differ by tenths late in a run);
    `val_X` shares the panel of the training metric `X` when there is one."""
    keys = [k for k in history[-1] if k not in _NOT_PLOTTED]
    groups: dict[str, list[str]] = {}
    for key in keys:
        base = key[4:] if key.startswith("val_") and key[4:] in keys else key
        groups.setdefault(base, []).append(key)
    return {base: sorted(group, key=lambda k: k.startswith("val_")) for base, group in groups.items()}


def plot_history(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    epochs = [row["epoch"] for row in history]
    groups = panels(history)
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), dpi=100, squeeze=False)
    for ax, (title, keys) in zip(axes.flat, groups.items()):
        paired = len(keys) > 1  # a training metric and its validation twin: a legend tells them apart
        for key in keys:
            label = ("validation" if key.startswith("val_") else "train") if paired else None
            ax.plot(epochs, [row.get(key, float("nan")) for row in history], marker="o", markersize=3, label=label)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        if paired:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("epoch", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
