"""The loss-curve PNG of a run (matplotlib, part of the `train` extra)."""

from __future__ import annotations

from pathlib import Path

from vaeinfer._fs import atomic_path


def plot_history(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    epochs = [row["epoch"] for row in history]
    keys = [k for k in history[-1] if k not in ("epoch", "step", "beta", "lr", "seconds")]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key in keys:
        ax.plot(epochs, [row.get(key, float("nan")) for row in history], marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per image" if "val_elbo" in keys else "value")
    ax.set_yscale("symlog")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
