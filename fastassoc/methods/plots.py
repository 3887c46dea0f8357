"""The PNG plots of a training run: losses, association diagnostics, CMC."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_run(out_dir: Path, name: str, history: list[dict], final: dict | None, baseline: dict | None) -> list[Path]:
    """Write ``losses.png``, ``diagnostics.png`` and ``cmc.png`` into ``out_dir``.

    Parameters
    ----------
    out_dir : Path
    name : str
        Method name (titles).
    history : list of dict
        Per-epoch records.
    final, baseline : dict or None
        Evaluations of the trained and untrained network (``cmc``, ``rank1``, ``mAP``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    epochs = [r["epoch"] for r in history]
    numeric = [k for k in dict.fromkeys(k for r in history for k in r)
               if k not in ("epoch", "steps", "time", "lr") and not k.startswith("time_")
               and all(isinstance(r.get(k, 0.0), (int, float)) for r in history)]
    losses = [k for k in numeric if k == "loss" or k.startswith("loss")]
    diagnostics = [k for k in numeric if k not in losses]

    def series(key):
        return [r.get(key, float("nan")) if r.get(key) is not None else float("nan") for r in history]

    if losses and epochs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in losses:
            ax.plot(epochs, series(key), marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean loss")
        ax.set_title(f"{name}: training losses")
        ax.legend()
        fig.tight_layout()
        written.append(out_dir / "losses.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    if diagnostics and epochs:
        cols = min(3, len(diagnostics))
        rows = -(-len(diagnostics) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
        for ax, key in zip(axes.flat, diagnostics):
            ax.plot(epochs, series(key), marker="o")
            ax.set_title(key)
            ax.set_xlabel("epoch")
        for ax in list(axes.flat)[len(diagnostics):]:
            ax.axis("off")
        fig.suptitle(f"{name}: association diagnostics")
        fig.tight_layout()
        written.append(out_dir / "diagnostics.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    if final is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        ranks = np.arange(1, len(final["cmc"]) + 1)
        if baseline is not None:
            ax.plot(ranks, 100 * np.asarray(baseline["cmc"]), label="untrained")
        ax.plot(ranks, 100 * np.asarray(final["cmc"]), label="trained")
        ax.set_xlabel("rank")
        ax.set_ylabel("matching rate (%)")
        ax.set_ylim(0, 102)   # a curve at 100 % stays visible above the frame line
        ax.set_title(f"{name}: CMC (rank-1 {100 * final['rank1']:.1f}, mAP {100 * final['mAP']:.1f})")
        ax.legend()
        fig.tight_layout()
        written.append(out_dir / "cmc.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written
