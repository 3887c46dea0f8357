"""Compatibility shim: the base trainer's pieces now live in modules named for what they hold.

- :mod:`fastassoc.methods.config`: :class:`TrainConfig`, presets, :func:`tiny_config`;
- :mod:`fastassoc.methods.backbones`: :class:`SmallReidNet`, :func:`build_backbone`, :class:`ReidModel`;
- :mod:`fastassoc.methods.diagnostics`: pair / graph / soft-label / cluster diagnostics;
- :mod:`fastassoc.methods.checkpoint`: RNG states, atomic writes, checkpoint files;
- :mod:`fastassoc.methods.trainer`: :class:`Trainer` (the epoch loop, evaluation, reports);
- :mod:`fastassoc.methods.plots`: the PNG plots;
- :mod:`fastassoc.segments`: :class:`CameraLayout`, :func:`csr_rows`, :func:`one_hot_csr`.

Everything importable from here before the split still is.
"""
from __future__ import annotations

from ..segments import CameraLayout, csr_rows, one_hot_csr
from .backbones import BACKBONES, ReidModel, SmallReidNet, build_backbone
from .checkpoint import (CheckpointError, atomic_save, read_checkpoint, rng_state, seed_everything, set_rng_state,
                         write_checkpoint)
from .config import (BASE_PRESETS, DEMO_WORLD, OPTIMIZERS, PRESET_NAMES, SCHEDULERS, SMOKE_WORLD,
                     TINY_OVERRIDES, TINY_WORLD, TrainConfig, resolve_config, tiny_config)
from .diagnostics import (cluster_diagnostics, graph_diagnostics, pair_diagnostics,
                          soft_label_diagnostics)
from .plots import plot_run
from .trainer import SettingsMismatchError, Trainer, load_data, resolve_device

__all__ = [
    "CameraLayout", "csr_rows", "one_hot_csr", "BACKBONES", "ReidModel", "SmallReidNet", "build_backbone",
    "atomic_save", "rng_state", "seed_everything", "set_rng_state", "BASE_PRESETS", "DEMO_WORLD", "OPTIMIZERS",
    "PRESET_NAMES", "SCHEDULERS", "SMOKE_WORLD", "TINY_OVERRIDES", "TINY_WORLD", "TrainConfig", "resolve_config",
    "tiny_config", "cluster_diagnostics", "graph_diagnostics", "pair_diagnostics", "soft_label_diagnostics",
    "plot_run", "Trainer", "load_data", "resolve_device", "CheckpointError", "read_checkpoint", "write_checkpoint",
    "SettingsMismatchError",
]
