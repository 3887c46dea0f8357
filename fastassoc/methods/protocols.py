"""Evaluation protocols over several training runs: the random splits of PRID2011 and iLIDS-VID.

PRID2011 and iLIDS-VID are small (178 and 300 persons in two cameras); every paper of this
family follows Wang et al. (ECCV 2014): "we repeat 10 random training/testing ID splits ... The
average Cumulated Matching Characteristics (CMC) are adopted" (DAL Sec. 4.1), the persons split
in halves each time. :func:`train_splits` trains and evaluates one model per split and reports
every split and their mean and standard deviation.

Splits are the loaders' own (:func:`fastassoc.data.load_dataset`'s ``split`` option): seeded
halves ``0 .. splits - 1`` by default, or the entries of a canonical split file
(``split_file``, JSON, see :mod:`fastassoc.data.layouts`) when a user has the one of the
original protocol. Published numbers used the original files; seeded halves give the same
protocol with other partitions, so their mean is comparable, single splits are not.

MARS has one fixed split; its query / gallery convention (the official one, the default, or
torchreid's) is the loader's ``protocol`` option and each report records it
(``dataset_protocol``).

Output (``out_dir``)
    ``split_<i>/`` holds split ``i``'s own run (report.json, plots, checkpoint); ``report.json``
    holds the config, the protocol, every split's figures (``splits``), and ``mean`` / ``std``
    of rank-1, rank-5, rank-10, rank-20, mAP and mINP over the splits (std with ``ddof=0``,
    NumPy's default; 0 for one split). A split whose ``report.json`` exists with the same
    config is read back instead of trained again, so an interrupted driver can be rerun.
"""
from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from .base import TrainConfig

SPLIT_DATASETS = ("prid2011", "ilidsvid")
METRICS = ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP")


def _figures(report: dict) -> dict:
    cmc = report.get("cmc") or []
    figures = {"rank1": report["rank1"], "rank5": report["rank5"], "rank10": report["rank10"],
               "rank20": cmc[min(19, len(cmc) - 1)] if cmc else None, "mAP": report["mAP"], "mINP": report["mINP"]}
    return {key: (float(value) if value is not None else None) for key, value in figures.items()}


def train_splits(trainer_class, config: TrainConfig, out_dir: str | os.PathLike, *, splits: int,
                 split_file: str | os.PathLike | None = None, log: Callable[[str], None] = print) -> dict:
    """Train and evaluate ``trainer_class`` on ``splits`` splits of PRID2011 / iLIDS-VID.

    Parameters
    ----------
    trainer_class : type
        A :class:`~fastassoc.methods.base.Trainer` subclass.
    config : TrainConfig
        The run's config (``data`` must be ``"prid2011"`` or ``"ilidsvid"``); split ``i`` runs
        it with ``data_options["split"] = i`` (and ``split_file``).
    out_dir : path
        Where ``report.json`` and the ``split_<i>/`` folders go.
    splits : int >= 1
        Number of splits (10 in the papers): splits ``0 .. splits - 1``.
    split_file : path, optional
        A JSON file of canonical splits; it must hold at least ``splits`` entries.
    log : callable str -> None
        Receives one line per split, the trainers' lines and the summary.

    Returns
    -------
    dict
        The report also written to ``out_dir/report.json``: ``method``, ``dataset``,
        ``protocol``, ``config``, ``splits`` (one dict per split: ``split``, ``out_dir``,
        ``dataset_protocol``, the figures of :data:`METRICS`, ``baseline_rank1``,
        ``baseline_mAP``), ``mean`` and ``std`` (each over the splits, per metric),
        ``num_splits``.

    Examples
    --------
    >>> from fastassoc.methods.dal import DALTrainer
    >>> config = DALTrainer.make_config("paper", data="prid2011", root="/data/prid_2011")
    >>> report = train_splits(DALTrainer, config, "runs/dal-prid", splits=10)   # doctest: +SKIP
    >>> print(f"{100 * report['mean']['rank1']:.1f} +- {100 * report['std']['rank1']:.1f}")  # doctest: +SKIP
    """
    if not isinstance(config, trainer_class.Config):
        raise TypeError(f"config must be a {trainer_class.Config.__name__}, got {type(config).__name__}")
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise ValueError(f"splits must be an integer >= 1, got {splits!r}")
    if config.data not in SPLIT_DATASETS:
        raise ValueError(f"splits need a dataset with random train/test splits {SPLIT_DATASETS}, got data="
                         f"{config.data!r} (MARS and the image datasets have one fixed split)")
    if split_file is not None:
        split_file = Path(split_file).expanduser()
        if not split_file.is_file():
            raise FileNotFoundError(f"split_file {split_file} does not exist")
        entries = json.loads(split_file.read_text())
        count = len(entries) if isinstance(entries, list) else 1
        if count < splits:
            raise ValueError(f"split_file {split_file} holds {count} splits, fewer than splits={splits}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    protocol = (f"{splits} splits of {split_file}" if split_file is not None
                else f"{splits} random splits (seeded halves 0..{splits - 1})")
    rows = []
    for split in range(splits):
        options = {**config.data_options, "split": split}
        if split_file is not None:
            options["split_file"] = str(split_file)
        split_config = copy.deepcopy(config)
        split_config.data_options = options
        split_dir = out_dir / f"split_{split}"
        report = _existing_report(split_dir, split_config)
        if report is None:
            trainer = trainer_class(split_config, split_dir, log=log)
            report = trainer.fit()
            dataset_protocol = getattr(trainer.dataset, "protocol", None)
        else:
            dataset_protocol = (report.get("dataset") or {}).get("protocol")
            log(f"[{trainer_class.name}] split {split}: read back from {split_dir / 'report.json'}")
        row = {"split": split, "out_dir": str(split_dir), "dataset_protocol": dataset_protocol, **_figures(report),
               "baseline_rank1": report.get("baseline_rank1"), "baseline_mAP": report.get("baseline_mAP")}
        rows.append(row)
        log(f"[{trainer_class.name}] split {split + 1}/{splits}: rank-1 {100 * row['rank1']:.1f}  "
            f"mAP {100 * row['mAP']:.1f}")
    mean, std = {}, {}
    for key in METRICS:
        values = [row[key] for row in rows if row[key] is not None]
        mean[key] = float(np.mean(values)) if values else None
        std[key] = float(np.std(values)) if values else None
    result = {"method": trainer_class.name, "dataset": config.data, "protocol": protocol, "num_splits": splits,
              "std_ddof": 0, "config": config.to_dict(), "splits": rows, "mean": mean, "std": std}
    _write_json(result, out_dir / "report.json")
    log(f"[{trainer_class.name}] {config.data}, {protocol}: rank-1 {100 * mean['rank1']:.1f} +- "
        f"{100 * std['rank1']:.1f}  mAP {100 * mean['mAP']:.1f} +- {100 * std['mAP']:.1f}")
    return result


def _write_json(value: dict, path: Path) -> None:
    """JSON (non-finite floats as null) written to a temporary file, then renamed over ``path``."""
    def clean(item):
        if isinstance(item, dict):
            return {str(k): clean(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [clean(v) for v in item]
        if isinstance(item, float) and not math.isfinite(item):
            return None
        return item

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(clean(value), handle, indent=2)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _existing_report(split_dir: Path, config: TrainConfig) -> dict | None:
    """A finished split's report when it was made with ``config`` (None otherwise)."""
    path = split_dir / "report.json"
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except ValueError:
        return None
    if report.get("config") != json.loads(json.dumps(config.to_dict())) or "rank1" not in report:
        return None
    return report
