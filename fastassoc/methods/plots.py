"""The PNG plots of a training run: losses, association diagnostics, where time goes, CMC.

Per-epoch series are sorted by :func:`classify_series`: losses share one panel; every other
varying diagnostic gets its own labelled panel; on/off flags (``ccta_active``, a two-stage
``stage``) are drawn as shaded spans on every panel instead of as curves; series that never
change are left out (named in the figure's footnote); timings go to ``timing.png``.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

# Bookkeeping columns of an epoch record that are not curves.
_NOT_SERIES = ("epoch", "steps", "time", "lr")
_TIMING = ("association_seconds", "training_seconds", "association_share", "eval_seconds")


def _values(history: list[dict], key: str) -> list:
    return [r.get(key) for r in history]


def _is_flag(key: str, values: list) -> bool:
    present = [v for v in values if v is not None]
    if not present or not all(isinstance(v, (bool, int, np.integer)) for v in present):
        return False
    distinct = {int(v) for v in present}
    return distinct <= {0, 1} or (len(distinct) == 2 and (key.endswith("_active") or key == "stage"))


def _is_constant(values: list) -> bool:
    present = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return len(set(present)) <= 1


def classify_series(history: list[dict]) -> dict[str, list[str]]:
    """Sort the numeric columns of per-epoch records for plotting.

    Returns
    -------
    dict
        ``losses`` (``loss*`` keys), ``diagnostics`` (other varying series), ``flags``
        (integer series with values in {0, 1}, or two values for ``*_active`` / ``stage``),
        ``constant`` (series with one value, NaN ignored), ``timing`` (``*_seconds``,
        ``association_share``, ``time_*``). Bookkeeping columns (epoch, steps, time, lr) are
        in none of them.

    Examples
    --------
    >>> history = [{"epoch": 1, "loss": 2.0, "pairs": 5, "ccta_active": 0, "k": 3},
    ...            {"epoch": 2, "loss": 1.5, "pairs": 9, "ccta_active": 1, "k": 3}]
    >>> classify_series(history)
    {'losses': ['loss'], 'diagnostics': ['pairs'], 'flags': ['ccta_active'], 'constant': ['k'], 'timing': []}
    """
    out: dict[str, list[str]] = {"losses": [], "diagnostics": [], "flags": [], "constant": [], "timing": []}
    for key in dict.fromkeys(k for r in history for k in r):
        values = _values(history, key)
        if key in _NOT_SERIES or not all(v is None or isinstance(v, (int, float, np.number)) for v in values):
            continue
        if key in _TIMING or key.startswith("time_"):
            out["timing"].append(key)
        elif _is_flag(key, values) and not _is_constant(values):
            out["flags"].append(key)
        elif _is_constant(values):
            out["constant"].append(key)
        elif key == "loss" or key.startswith("loss"):
            out["losses"].append(key)
        else:
            out["diagnostics"].append(key)
    return out


def axis_label(key: str, values: list) -> str:
    """A y-axis label for a diagnostic: its name and what its numbers are."""
    name = key.replace("_", " ")
    present = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if present and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in present):
        return f"{name} (count)"
    if any(word in key for word in ("precision", "purity", "rate", "share", "rank1", "mAP", "similarity")) \
            and all(0.0 <= float(v) <= 1.0 for v in present):
        return f"{name} (fraction)"
    return name


def _first_value(history: list[dict], key: str) -> str:
    value = next((v for v in _values(history, key) if v is not None), None)
    return "none" if value is None else f"{value:.4g}"


def _spans(epochs: list[int], values: list) -> list[tuple[float, float]]:
    """Epoch intervals where a flag is on (its larger value), consecutive epochs merged."""
    present = [int(v) for v in values if v is not None]
    on_value = max(present) if present else 1
    spans: list[tuple[float, float]] = []
    for epoch, value in zip(epochs, values):
        if value is not None and int(value) == on_value:
            if spans and spans[-1][1] == epoch - 0.5:
                spans[-1] = (spans[-1][0], epoch + 0.5)
            else:
                spans.append((epoch - 0.5, epoch + 0.5))
    return spans


def _shade(ax, epochs, history, flags, colours) -> None:
    for key, colour in zip(flags, colours):
        values = _values(history, key)
        on_value = max(int(v) for v in values if v is not None)
        label = key if on_value == 1 else f"{key} = {on_value}"
        for i, (left, right) in enumerate(_spans(epochs, values)):
            ax.axvspan(left, right, color=colour, alpha=0.15, lw=0, label=label if i == 0 else None)


def plot_run(out_dir: Path, name: str, history: list[dict], final: dict | None, baseline: dict | None) -> list[Path]:
    """Write ``losses.png``, ``diagnostics.png``, ``timing.png`` and ``cmc.png`` into ``out_dir``
    (each only when there is something to draw).

    Parameters
    ----------
    out_dir : Path
    name : str
        Method name (titles).
    history : list of dict
        Per-epoch records.
    final, baseline : dict or None
        Evaluations of the trained and untrained network (``cmc``, ``rank1``, ``mAP``).

    Returns
    -------
    list of Path
        The files written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    epochs = [r["epoch"] for r in history]
    kinds = classify_series(history)
    flags = kinds["flags"]
    colours = [plt.get_cmap("tab10")(i + 3) for i in range(len(flags))]

    def series(key):
        return [float(v) if v is not None else float("nan") for v in _values(history, key)]

    def save(fig, filename):
        fig.tight_layout()
        written.append(out_dir / filename)
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)

    if kinds["losses"] and epochs:
        fig, ax = plt.subplots(figsize=(6, 4))
        _shade(ax, epochs, history, flags, colours)
        for key in kinds["losses"]:
            ax.plot(epochs, series(key), marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean loss per batch")
        ax.set_title(f"{name}: training losses")
        ax.legend(fontsize="small")
        save(fig, "losses.png")
    diagnostics = kinds["diagnostics"]
    if diagnostics and epochs:
        cols = min(3, len(diagnostics))
        rows = -(-len(diagnostics) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows + 0.4), squeeze=False)
        for ax, key in zip(axes.flat, diagnostics):
            _shade(ax, epochs, history, flags, colours)
            ax.plot(epochs, series(key), marker="o")
            ax.set_title(key)
            ax.set_xlabel("epoch")
            ax.set_ylabel(axis_label(key, _values(history, key)))
        for ax in list(axes.flat)[len(diagnostics):]:
            ax.axis("off")
        if flags:
            handles, labels = axes.flat[0].get_legend_handles_labels()
            fig.legend(handles, labels, loc="upper right", fontsize="small", title="shaded: on")
        fig.suptitle(f"{name}: association diagnostics")
        if kinds["constant"]:
            constant = ", ".join(f"{key} = {_first_value(history, key)}" for key in kinds["constant"])
            fig.text(0.01, 0.005, f"constant (not drawn): {constant}", fontsize="small")
        save(fig, "diagnostics.png")
    if epochs and any("association_seconds" in r for r in history):
        fig, ax = plt.subplots(figsize=(6, 4))
        association = np.nan_to_num(series("association_seconds"))
        training = np.nan_to_num(series("training_seconds"))
        ax.bar(epochs, association, label="association steps")
        ax.bar(epochs, training, bottom=association, label="training (batches)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("wall time (s)")
        total = association.sum() + training.sum()
        share = f"{100 * association.sum() / total:.0f} %" if total > 0 else "n/a"
        ax.set_title(f"{name}: where time goes (association {share})")
        ax.legend(fontsize="small")
        save(fig, "timing.png")
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
        save(fig, "cmc.png")
    return written
