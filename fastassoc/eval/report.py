"""What ``fastassoc eval`` prints and writes: a CMC table, ``eval.json`` and ``cmc.png``.

Examples
--------
>>> summary = summarise([0.5] * 4 + [1.0] * 16, mAP=0.6, mINP=0.4, num_valid_queries=4)
>>> print(cmc_table(summary))
| rank-1 | rank-5 | rank-10 | rank-20 | mAP | mINP |
|---:|---:|---:|---:|---:|---:|
| 50.0 | 100.0 | 100.0 | 100.0 | 60.0 | 40.0 |
"""
from __future__ import annotations

import json
import os
from pathlib import Path

TABLE_RANKS = (1, 5, 10, 20)


def summarise(cmc, *, mAP: float, mINP: float, num_valid_queries: int, max_rank: int | None = None,
              **extra) -> dict:
    """A JSON-ready dict: ``rank1``, ``rank5``, ``rank10``, ``rank20``, ``mAP``, ``mINP``,
    ``num_valid_queries``, ``cmc`` (list, its first ``max_rank`` values), then ``extra``.

    ``cmc`` must reach rank 20 (as :func:`fastassoc.evaluate_ranking` curves do with
    ``max_rank >= 20``, repeating the last value past the gallery's size).
    """
    curve = [float(value) for value in cmc]
    if len(curve) < max(TABLE_RANKS):
        raise ValueError(f"the CMC table needs the curve up to rank {max(TABLE_RANKS)}, got {len(curve)} ranks")
    ranks = {f"rank{rank}": curve[rank - 1] for rank in TABLE_RANKS}
    return {**ranks, "mAP": float(mAP), "mINP": float(mINP), "num_valid_queries": int(num_valid_queries),
            "cmc": curve[:max_rank], **extra}


def cmc_table(summary: dict) -> str:
    """Markdown table of rank-1/5/10/20, mAP and mINP in percent."""
    names = [f"rank-{rank}" for rank in TABLE_RANKS] + ["mAP", "mINP"]
    values = [summary[f"rank{rank}"] for rank in TABLE_RANKS] + [summary["mAP"], summary["mINP"]]
    return "\n".join(["| " + " | ".join(names) + " |", "|" + "---:|" * len(names),
                      "| " + " | ".join(f"{100 * value:.1f}" for value in values) + " |"])


def write_json(summary: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def plot_cmc(summary: dict, path: str | os.PathLike, *, title: str = "CMC") -> Path | None:
    """The CMC curve as a PNG (matplotlib, Agg backend); None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = [100 * value for value in summary["cmc"]]
    ranks = list(range(1, len(curve) + 1))
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot(ranks, curve, marker="." if len(curve) <= 60 else None)
    axis.set_xlabel("rank")
    axis.set_ylabel("matching rate (%)")
    axis.set_xlim(1, max(len(curve), 2))
    axis.set_ylim(0, 102)  # a curve at 100 % stays visible above the frame
    axis.grid(alpha=0.3)
    axis.set_title(f"{title}: rank-1 {curve[0]:.1f} %, mAP {100 * summary['mAP']:.1f} %")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
