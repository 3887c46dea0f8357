"""Evaluation of anyone's model: feature / distance files and the reports of ``fastassoc eval``.

:mod:`fastassoc.eval.files` defines the file formats (keys, shapes) and reads them;
:mod:`fastassoc.eval.report` makes the CMC table, ``eval.json`` and ``cmc.png``. The ranking
itself is :func:`fastassoc.evaluate_ranking` (features, or ``distances=`` a precomputed matrix).
"""
from .files import (DISTANCE_KEYS, FEATURE_KEYS, LABEL_KEYS, EvalFileError, load_distances, load_features,
                    read_arrays)
from .report import TABLE_RANKS, cmc_table, plot_cmc, summarise, write_json

__all__ = ["FEATURE_KEYS", "DISTANCE_KEYS", "LABEL_KEYS", "EvalFileError", "load_features", "load_distances",
           "read_arrays", "TABLE_RANKS", "summarise", "cmc_table", "write_json", "plot_cmc"]
