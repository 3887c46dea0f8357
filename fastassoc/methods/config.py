"""Trainer configuration: :class:`TrainConfig`, the shared presets and the preset machinery.

A method's config is a :class:`TrainConfig` subclass; :func:`resolve_config` layers the base
preset (:data:`BASE_PRESETS`), the method's own preset and the caller's overrides into one
(:meth:`fastassoc.methods.Trainer.make_config` calls it). :func:`tiny_config` shrinks a smoke
config for unit tests.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

OPTIMIZERS = ("sgd", "adam", "rmsprop")
SCHEDULERS = ("none", "step", "multistep", "exponential")
# Fields that change how a run executes but not what it computes (the backends equal the
# reference by contract): a resumed run may set them freely.
RUNTIME_FIELDS = ("device", "backend", "progress", "num_workers", "eval_batch_size", "plots", "checkpoint")

# -- configuration ---------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Settings every trainer shares; methods subclass it to add their hyper-parameters.

    Attributes
    ----------
    method : str
        Registry name of the trainer (set by :meth:`Trainer.make_config`).
    preset : str
        Preset the config started from (``smoke`` | ``demo`` | ``paper`` | ``custom``).
    data : str
        ``"synthetic"`` or a dataset name of :data:`fastassoc.data.DATASETS`.
    root : str or None
        Dataset folder (datasets on disk).
    data_options : dict
        Keyword arguments of :class:`~fastassoc.data.SyntheticTracklets` (``image_size`` is
        taken from ``image_size``) or of :func:`~fastassoc.data.load_dataset`.
    image_size : (int, int)
        (height, width) frames are resized to.
    backbone : {"small", "resnet50", "mobilenet_v2", "mobilenet_v1"}
    weights : str or None
        Local file of ImageNet weights for an ImageNet backbone (never downloaded).
    from_scratch : bool
        Knowingly train the ``paper`` preset without ImageNet weights. All five papers start
        from ImageNet; a ``paper`` config without ``weights`` is refused unless this is set
        (:func:`check_pretraining`).
    small_width : int
        Channels of :class:`SmallReidNet`'s first stage (output dim = 8 x small_width).
    optimizer : {"sgd", "adam", "rmsprop"}
    lr, momentum, weight_decay : float
    rmsprop_alpha : float
        RMSprop's squared-gradient decay (torch's ``alpha``); used with ``optimizer="rmsprop"``.
    backbone_lr_mult : float
        Learning-rate multiplier of the backbone's parameters (pretrained backbones are
        often trained at 0.1x the new layers).
    scheduler : {"none", "step", "multistep", "exponential"}
        Stepped once per epoch: ``step`` multiplies by ``gamma`` every ``step_size`` epochs,
        ``multistep`` at every epoch of ``milestones``, ``exponential`` every epoch.
    step_size, gamma, milestones
    epochs : int
    tracklets_per_camera : int
        Camera-balanced batches hold this many tracklets from every camera.
    frames_per_tracklet : int
    batches_per_epoch : int or None
        None: one pass over the tracklets in expectation.
    train_flip : float
        Horizontal-flip probability of the training transform (0: none).
    train_pad : int or None
        Pad-crop padding of the training transform; None: ``round(height / 25.6)``, 0: none.
    train_erasing : float
        Random-erasing probability of the training transform.
    train_colour_jitter : float
        Strength of a colour jitter applied to training frames before the usual transform
        (brightness, contrast, saturation +- this, hue +- a quarter of it); 0 disables it.
        Teaches invariance to the cameras' colour casts when no pretrained network does.
    train_grayscale : float
        Probability of turning a training frame grey.
    num_workers : int
    eval_pooling : {"mean", "max"}
    eval_normalize : bool
        L2-normalise tracklet features before ranking.
    eval_metric : {"euclidean", "sqeuclidean", "cosine"}
    eval_max_frames : int or None
        Evenly spaced frames per tracklet at test time (all when None).
    eval_batch_size : int
    eval_every : int
        Also evaluate every this many epochs (0: only before and after training); the
        figures go into the history (``rank1`` / ``mAP`` columns).
    baseline : bool
        Evaluate the untrained network first.
    bn_warmup_batches : int
        Before anything else, re-estimate the BatchNorm running statistics of the untrained
        network from this many training batches (no gradient step). A network trained from
        scratch otherwise has running statistics (0, 1) that make its eval-mode features
        (memory initialisation, baseline) unrelated to its train-mode ones. 0 disables it.
    backend : str
        Backend of every fastassoc op (``auto`` | ``reference`` | ``cpu`` | ``triton`` | ``cuda``).
    device : str
        ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``...
    seed : int
    progress : bool or None
        tqdm progress bars: on, off, or None for tqdm's ``disable=None`` convention (bars
        only when stderr is a terminal). Either way the log gets one line per epoch.
    checkpoint : bool
        Write ``checkpoint.pt`` after every epoch (needs an output directory).
    plots : bool
        Write PNG plots at the end.
    """

    method: str = ""
    preset: str = "custom"
    data: str = "synthetic"
    root: str | None = None
    data_options: dict = field(default_factory=dict)
    image_size: tuple = (64, 32)
    backbone: str = "small"
    weights: str | None = None
    from_scratch: bool = False
    small_width: int = 32
    optimizer: str = "adam"
    lr: float = 3.5e-4
    momentum: float = 0.9
    rmsprop_alpha: float = 0.99
    weight_decay: float = 5e-4
    backbone_lr_mult: float = 1.0
    scheduler: str = "none"
    step_size: int = 1
    gamma: float = 0.1
    milestones: tuple = ()
    epochs: int = 10
    tracklets_per_camera: int = 4
    frames_per_tracklet: int = 4
    batches_per_epoch: int | None = None
    train_flip: float = 0.5
    train_pad: int | None = None
    train_erasing: float = 0.5
    train_colour_jitter: float = 0.0
    train_grayscale: float = 0.0
    num_workers: int = 0
    eval_pooling: str = "mean"
    eval_normalize: bool = True
    eval_metric: str = "euclidean"
    eval_max_frames: int | None = None
    eval_batch_size: int = 256
    eval_every: int = 0
    baseline: bool = True
    bn_warmup_batches: int = 0
    backend: str = "auto"
    device: str = "auto"
    seed: int = 0
    progress: bool | None = None
    checkpoint: bool = True
    plots: bool = True

    def to_dict(self) -> dict:
        return jsonable(dataclasses.asdict(self))


# Shared presets; a trainer's PRESETS[preset] overrides these keys.
# The synthetic worlds of the smoke / demo presets use half the default camera effects
# (camera_strength=0.5): at full strength the cameras' colour casts and scenes dominate the
# frames so much that an untrained network's cross-camera neighbours are almost never right
# (raw pixels: rank-1 ~1 %), and methods that bootstrap from them (all five) have nothing to
# start from without the ImageNet pretraining the papers rely on.
SMOKE_WORLD = dict(num_train_ids=24, num_test_ids=24, num_cameras=3, cameras_per_id=(2, 3), fragment_rate=0.3,
                   frames_per_tracklet=(4, 8), camera_strength=0.5, seed=0)
DEMO_WORLD = dict(num_train_ids=60, num_test_ids=60, num_cameras=4, cameras_per_id=(2, 4), fragment_rate=0.5,
                  frames_per_tracklet=(6, 10), camera_strength=0.5, seed=0)
BASE_PRESETS: dict[str, dict] = {
    "smoke": dict(data="synthetic", data_options=SMOKE_WORLD, image_size=(64, 32), backbone="small", small_width=16,
                  bn_warmup_batches=10, train_colour_jitter=0.4, epochs=3, tracklets_per_camera=4,
                  frames_per_tracklet=2, eval_max_frames=4),
    "demo": dict(data="synthetic", data_options=DEMO_WORLD, image_size=(64, 32), backbone="small", small_width=16,
                 bn_warmup_batches=20, train_colour_jitter=0.4, epochs=15, tracklets_per_camera=8,
                 frames_per_tracklet=2, eval_max_frames=6),
    "paper": dict(data="mars", image_size=(256, 128), backbone="resnet50", eval_max_frames=None, eval_batch_size=128,
                  num_workers=4),
}
PRESET_NAMES = tuple(BASE_PRESETS)

# A world and network small enough for unit tests (seconds per run on one core).
TINY_WORLD = dict(num_train_ids=10, num_test_ids=8, num_cameras=3, cameras_per_id=(2, 3), fragment_rate=0.3,
                  frames_per_tracklet=(3, 5), camera_strength=0.5, seed=0)
TINY_OVERRIDES = dict(data="synthetic", data_options=TINY_WORLD, image_size=(32, 16), backbone="small", small_width=8,
                      epochs=2, tracklets_per_camera=3, frames_per_tracklet=2, eval_max_frames=3, eval_batch_size=64,
                      bn_warmup_batches=2, progress=False, plots=False)


def tiny_config(trainer_class, **overrides) -> TrainConfig:
    """``trainer_class``'s smoke config shrunk for tests (:data:`TINY_OVERRIDES`), then ``overrides``."""
    return trainer_class.make_config("smoke", **{**TINY_OVERRIDES, **overrides})


def jsonable(value):
    """``value`` with tensors, NumPy scalars and tuples turned into JSON types (non-finite floats: None)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value



def resolve_config(config_class: type, method: str, method_presets: dict[str, dict], preset: str,
                   overrides: dict) -> TrainConfig:
    """``config_class`` for ``preset``: :data:`BASE_PRESETS` [preset], then ``method_presets``
    [preset], then ``overrides``; ``data_options`` dicts are merged key by key.

    Raises
    ------
    ValueError
        Unknown preset.
    TypeError
        A key that is not a field of ``config_class``.
    """
    if preset not in BASE_PRESETS:
        raise ValueError(f"preset must be one of {PRESET_NAMES}, got {preset!r}")
    values: dict[str, Any] = {}
    for layer in (BASE_PRESETS[preset], method_presets.get(preset, {}), overrides):
        for key, value in layer.items():
            if key == "data_options" and isinstance(value, dict):
                values["data_options"] = {**values.get("data_options", {}), **value}
            else:
                values[key] = value
    values.update(method=method, preset=preset)
    method_preset = method_presets.get(preset, {})
    preset_data = method_preset.get("data", BASE_PRESETS[preset].get("data", "synthetic"))
    if values.get("data", "synthetic") != "synthetic":
        # The base presets' options describe the synthetic world; a dataset on disk keeps only the
        # method preset's options (e.g. tracklets="one_per_camera") and the caller's.
        values["data_options"] = {**method_preset.get("data_options", {}), **overrides.get("data_options", {})}
    elif preset_data != "synthetic":
        # An explicit data="synthetic" over a preset made for a dataset on disk: that dataset's
        # options (and root) do not describe the synthetic world; only the caller's apply.
        values["data_options"] = dict(overrides.get("data_options", {}))
        values["root"] = overrides.get("root")
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(f"{config_class.__name__} config has no field(s) {unknown}")
    return config_class(**copy.deepcopy(values))


def config_differences(saved: dict, requested: dict) -> list[tuple[str, Any, Any]]:
    """``(field, saved value, requested value)`` for each field of ``requested`` whose value
    differs from ``saved`` (both dicts of config fields; tuples and lists compare equal;
    a requested ``data_options`` is merged into the saved one first)."""
    out = []
    for key, value in requested.items():
        old = saved.get(key)
        if key == "data_options" and isinstance(value, dict) and isinstance(old, dict):
            value = {**old, **value}
        if jsonable(value) != jsonable(old):
            out.append((key, old, value))
    return out


def check_pretraining(config: TrainConfig) -> None:
    """Refuse a ``paper`` config that would silently train a randomly initialised network.

    All five papers start from ImageNet weights; without them the ``paper`` preset is not the
    papers' procedure, so it needs ``weights`` (a local file) or an explicit ``from_scratch``.

    Raises
    ------
    ValueError
        ``preset="paper"`` with neither ``weights`` nor ``from_scratch=True``; or both given.

    Examples
    --------
    >>> check_pretraining(TrainConfig(preset="paper", backbone="resnet50"))
    Traceback (most recent call last):
    ...
    ValueError: preset 'paper' starts from ImageNet weights, as all five papers do: pass weights=PATH (--weights, a local resnet50 state_dict file; nothing is downloaded), or from_scratch=True (--from-scratch) to train a randomly initialised resnet50 knowingly
    >>> check_pretraining(TrainConfig(preset="paper", from_scratch=True))
    """
    if config.from_scratch and config.weights:
        raise ValueError(f"from_scratch=True contradicts weights={config.weights!r}: give one or the other")
    if config.preset == "paper" and not config.weights and not config.from_scratch:
        raise ValueError(f"preset 'paper' starts from ImageNet weights, as all five papers do: pass weights=PATH "
                         f"(--weights, a local {config.backbone} state_dict file; nothing is downloaded), or "
                         f"from_scratch=True (--from-scratch) to train a randomly initialised {config.backbone} "
                         f"knowingly")
