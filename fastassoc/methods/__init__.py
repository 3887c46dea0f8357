"""Trainers of the five methods (DAL, UTAL, UGA, EEA, TSSL) built on fastassoc ops.

``get_trainer(name)`` returns a method's :class:`~fastassoc.methods.trainer.Trainer` subclass
(imported on first use); ``METHODS`` lists the registered names.

>>> from fastassoc.methods import get_trainer
>>> DAL = get_trainer("dal")
>>> report = DAL(DAL.make_config("smoke"), out_dir="runs/dal").fit()   # doctest: +SKIP
"""
from __future__ import annotations

import importlib

from ..segments import CameraLayout
from .backbones import ReidModel, SmallReidNet, build_backbone
from .checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from .config import BASE_PRESETS, PRESET_NAMES, TrainConfig
from .diagnostics import cluster_diagnostics, graph_diagnostics, pair_diagnostics, soft_label_diagnostics
from .trainer import SettingsMismatchError, Trainer

# name -> (module, class); modules are imported lazily so one broken method does not hide the others.
_REGISTRY: dict[str, tuple[str, str]] = {
    "dal": ("fastassoc.methods.dal", "DALTrainer"),
    "utal": ("fastassoc.methods.utal", "UTALTrainer"),
    "uga": ("fastassoc.methods.uga", "UGATrainer"),
    "eea": ("fastassoc.methods.eea", "EEATrainer"),
    "tssl": ("fastassoc.methods.tssl", "TSSLTrainer"),
}
METHODS = tuple(_REGISTRY)


def register(name: str, module: str, cls: str) -> None:
    """Register a trainer class ``module:cls`` under ``name``."""
    global METHODS
    _REGISTRY[name] = (module, cls)
    METHODS = tuple(_REGISTRY)


def get_trainer(name: str) -> type[Trainer]:
    """The trainer class registered as ``name`` (``dal``, ``utal``, ``uga``, ``eea``, ``tssl``)."""
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(_REGISTRY)}")
    module, cls = _REGISTRY[key]
    return getattr(importlib.import_module(module), cls)


__all__ = [
    "METHODS", "get_trainer", "register", "Trainer", "TrainConfig", "BASE_PRESETS", "PRESET_NAMES",
    "CameraLayout", "ReidModel", "SmallReidNet", "build_backbone", "pair_diagnostics", "graph_diagnostics",
    "soft_label_diagnostics", "cluster_diagnostics", "read_checkpoint", "write_checkpoint", "CheckpointError",
    "SettingsMismatchError",
]
