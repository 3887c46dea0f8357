"""The base trainer shared by DAL, UTAL, UGA, EEA and TSSL.

A method is a :class:`Trainer` subclass with a config dataclass (a :class:`TrainConfig`
subclass holding the method's hyper-parameters with the paper's defaults), presets, and a few
hooks; the base class owns everything else:

- data: the synthetic world or a dataset on disk (:mod:`fastassoc.data`), the camera layout of
  the training tracklets (:class:`fastassoc.segments.CameraLayout`: camera-sorted rows, the segments every
  per-camera op takes), camera-balanced batches of ``frames_per_tracklet`` frames;
- model: a torchvision ResNet-50 / MobileNetV2 (ImageNet weights only from a local file,
  ``weights=PATH``, never downloaded) or :class:`SmallReidNet` for CPU runs, followed by the
  method's own layers (:meth:`Trainer.build_model`) and trainable heads (:meth:`Trainer.build_heads`);
- optimisation: SGD / Adam / RMSprop, a per-epoch step / multi-step / exponential schedule;
- the epoch loop: tqdm bars per epoch and per association step (:meth:`Trainer.association`),
  one log line per epoch, per-epoch loss means and association diagnostics;
- evaluation: tracklet features pooled over frames (mean, or max for DAL), optionally
  L2-normalised, ranked with :func:`fastassoc.evaluate_ranking`; the untrained network is
  evaluated on the same split first (``baseline_rank1`` / ``baseline_mAP``);
- outputs in ``out_dir``: ``report.json``, ``losses.png``, ``diagnostics.png``, ``cmc.png``,
  and ``checkpoint.pt`` written atomically after every epoch (model, heads, optimiser,
  scheduler, method state, history, RNG states of torch / NumPy / Python, the sampler's epoch).
  ``Trainer.resume(out_dir)`` continues a run to the same result as an uninterrupted one.

Writing a method
----------------
::

    @dataclass
    class MyConfig(TrainConfig):
        margin: float = 0.2

    class MyTrainer(Trainer):
        name = "mine"
        Config = MyConfig
        PRESETS = {"smoke": {...}, "demo": {...}, "paper": {...}}   # overrides of BASE_PRESETS

        def setup(self):                     # after model + data, before epoch 0 (not on resume)
            self.memory = self.train_features()       # [T, D], rows in self.train order
        def on_epoch_start(self, epoch):     # association steps (graphs, soft labels, clusters)
            ...
        def train_step(self, frames, index, cameras, epoch):   # -> {"loss": scalar, ...}
            feats = self.frame_features(frames)                  # [B, n, D]
            ...
        def on_epoch_end(self, epoch):       # -> dict of diagnostics (floats)
            return self.pair_diagnostics(ia, ib)
        def method_state(self):              # tensors / python objects to checkpoint
            return {"memory": self.memory}
        def load_method_state(self, state):
            self.memory = state["memory"]

Every association step goes through the fastassoc ops with ``backend=self.backend``.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from .. import data as fdata
from .. import evaluate_ranking
# Re-exported: trainers and user code imported these from here before they became public.
from ..segments import CameraLayout, csr_rows, one_hot_csr  # noqa: F401

BACKBONES = ("small", "resnet50", "mobilenet_v2")
OPTIMIZERS = ("sgd", "adam", "rmsprop")
SCHEDULERS = ("none", "step", "multistep", "exponential")


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
    backbone : {"small", "resnet50", "mobilenet_v2"}
    weights : str or None
        Local file of ImageNet weights for a torchvision backbone (never downloaded).
    small_width : int
        Channels of :class:`SmallReidNet`'s first stage (output dim = 8 x small_width).
    optimizer : {"sgd", "adam", "rmsprop"}
    lr, momentum, weight_decay : float
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
    progress : bool
        tqdm progress bars.
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
    small_width: int = 32
    optimizer: str = "adam"
    lr: float = 3.5e-4
    momentum: float = 0.9
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
    progress: bool = True
    checkpoint: bool = True
    plots: bool = True

    def to_dict(self) -> dict:
        return _jsonable(dataclasses.asdict(self))


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


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# -- models --------------------------------------------------------------------------------------

class SmallReidNet(nn.Module):
    """A small CNN for CPU runs: conv-BN-ReLU stages of width, 2, 4 and 8 x width channels with
    max-pooling between them, a second conv at the coarsest scale, global average pooling.

    About 12 M multiply-adds per 64 x 32 frame at width 16 (49 M at 32).

    Parameters
    ----------
    width : int
        Channels of the first stage.

    Input [b, 3, H, W] -> output [b, 8 * width] (``out_dim``).
    """

    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        w = width
        self.features = nn.Sequential(
            *block(3, w), nn.MaxPool2d(2), *block(w, 2 * w), nn.MaxPool2d(2), *block(2 * w, 4 * w), nn.MaxPool2d(2),
            *block(4 * w, 8 * w), *block(8 * w, 8 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = 8 * w
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class _TorchvisionBackbone(nn.Module):
    def __init__(self, body: nn.Module, out_dim: int):
        super().__init__()
        self.body = body
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def build_backbone(name: str, *, weights: str | None = None, small_width: int = 32) -> nn.Module:
    """A feature extractor [b, 3, H, W] -> [b, out_dim] with an ``out_dim`` attribute.

    Parameters
    ----------
    name : {"small", "resnet50", "mobilenet_v2"}
        ``resnet50`` (2048-d) and ``mobilenet_v2`` (1280-d) are torchvision's, classifier removed.
    weights : str, optional
        A local ``state_dict`` file (torchvision's ImageNet checkpoint) for the torchvision
        backbones; the classifier's keys are ignored. Nothing is ever downloaded.
    small_width : int
        Width of :class:`SmallReidNet`.
    """
    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")
    if name == "small":
        if weights:
            raise ValueError("weights are for the torchvision backbones (resnet50, mobilenet_v2), not 'small'")
        return SmallReidNet(small_width)
    import torchvision

    if name == "resnet50":
        net = torchvision.models.resnet50(weights=None)
        classifier_prefix, out_dim = "fc.", 2048
    else:
        net = torchvision.models.mobilenet_v2(weights=None)
        classifier_prefix, out_dim = "classifier.", 1280
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith(classifier_prefix)}
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(classifier_prefix)]
        if missing or unexpected:
            raise ValueError(f"{weights} does not hold {name} weights: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    if name == "resnet50":
        net.fc = nn.Identity()
    else:
        net.classifier = nn.Identity()
    return _TorchvisionBackbone(net, out_dim)


class ReidModel(nn.Module):
    """Backbone followed by an optional embedding head; ``forward`` gives the test feature.

    Attributes
    ----------
    backbone : nn.Module with ``out_dim``
    head : nn.Module or None
    out_dim : int
    """

    def __init__(self, backbone: nn.Module, head: nn.Module | None = None, out_dim: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.out_dim = out_dim if out_dim is not None else backbone.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.backbone(x)
        return self.head(x) if self.head is not None else x


# -- diagnostics (ground truth only) ----------------------------------------------------------------

def pair_diagnostics(ia: torch.Tensor, ib: torch.Tensor, pids: torch.Tensor, prefix: str = "pairs") -> dict:
    """Count and precision of discovered pairs of training tracklets.

    Parameters
    ----------
    ia, ib : Tensor [P], integer
        Tracklet indices (rows of ``pids``) of each discovered pair.
    pids : Tensor [T], integer ground-truth identities (negative: unknown, counted as wrong).

    Returns
    -------
    dict
        ``{prefix}``: P, ``{prefix}_precision``: fraction of pairs with one identity (nan when P = 0).
    """
    pids = pids.cpu()
    ia, ib = ia.cpu().long(), ib.cpu().long()
    count = int(ia.numel())
    if count == 0:
        return {prefix: 0, f"{prefix}_precision": float("nan")}
    same = (pids[ia] == pids[ib]) & (pids[ia] >= 0)
    return {prefix: count, f"{prefix}_precision": float(same.double().mean())}


def graph_diagnostics(graph: torch.Tensor, pids: torch.Tensor, cameras: torch.Tensor | None = None,
                      prefix: str = "pairs") -> dict:
    """:func:`pair_diagnostics` of the off-diagonal edges of a symmetric sparse graph, each
    unordered pair counted once; with ``cameras`` only cross-camera edges count.

    Parameters
    ----------
    graph : Tensor [T, T], sparse CSR (or COO)
    pids : Tensor [T]
    cameras : Tensor [T], optional
    """
    coo = graph.to_sparse_coo().coalesce().cpu()
    rows, cols = coo.indices()
    keep = rows < cols
    if cameras is not None:
        cameras = cameras.cpu()
        keep &= cameras[rows] != cameras[cols]
    return pair_diagnostics(rows[keep], cols[keep], pids, prefix)


def soft_label_diagnostics(soft: torch.Tensor, pids: torch.Tensor, cameras: torch.Tensor) -> dict:
    """How well per-camera soft labels (UTAL Eqs. 4-6) group same-identity tracklets.

    Parameters
    ----------
    soft : Tensor [T, T], sparse CSR, rows = soft labels (block-diagonal per camera)
    pids, cameras : Tensor [T]

    Returns
    -------
    dict
        ``soft_same_id_similarity``: mean cosine similarity of the soft-label vectors of
        same-identity tracklet pairs of one camera (the only pairs whose block-diagonal
        labels can overlap; nan when a camera never sees one identity twice);
        ``soft_label_precision``: mean over rows of the weight a row puts on other tracklets
        of its own identity, divided by the weight it puts on other tracklets.
    """
    coo = soft.to_sparse_coo().coalesce().cpu().double()
    rows, cols = coo.indices()
    values = coo.values()
    pids, cameras = pids.cpu(), cameras.cpu()
    num = soft.shape[0]
    off = rows != cols
    off_weight = torch.zeros(num, dtype=torch.float64).index_add_(0, rows[off], values[off])
    same = off & (pids[rows] == pids[cols]) & (pids[rows] >= 0)
    same_weight = torch.zeros(num, dtype=torch.float64).index_add_(0, rows[same], values[same])
    has_off = off_weight > 0
    precision = float((same_weight[has_off] / off_weight[has_off]).mean()) if has_off.any() else float("nan")

    # Ordered same-(identity, camera) pairs i != j; their similarity comes from the sparse Gram matrix.
    group = pids * (int(cameras.max()) + 1 if num else 1) + cameras
    valid = pids >= 0
    _, counts = torch.unique(group[valid], return_counts=True)
    num_pairs = int((counts * (counts - 1)).sum())
    if num_pairs == 0:
        return {"soft_same_id_similarity": float("nan"), "soft_label_precision": precision}
    norms = torch.zeros(num, dtype=torch.float64).index_add_(0, rows, values * values).sqrt()
    gram = torch.sparse.mm(coo, coo.t()).coalesce()
    gi, gj = gram.indices()
    gv = gram.values()
    keep = (gi != gj) & (group[gi] == group[gj]) & valid[gi]
    cosine = gv[keep] / (norms[gi[keep]] * norms[gj[keep]]).clamp_min(1e-12)
    return {"soft_same_id_similarity": float(cosine.sum() / num_pairs), "soft_label_precision": precision}


def cluster_diagnostics(labels: torch.Tensor, pids: torch.Tensor) -> dict:
    """Cluster count and purity of a clustering of the training tracklets.

    Returns
    -------
    dict
        ``clusters``: number of clusters; ``purity``: fraction of tracklets whose identity is
        their cluster's majority identity; ``ids``: number of true identities.
    """
    labels, pids = labels.cpu().long(), pids.cpu().long()
    if labels.numel() == 0:
        return {"clusters": 0, "purity": float("nan"), "ids": 0}
    _, cluster = torch.unique(labels, return_inverse=True)
    _, identity = torch.unique(pids, return_inverse=True)
    num_ids = int(identity.max()) + 1
    _, counts = torch.unique(cluster * num_ids + identity, return_counts=True, sorted=True)
    pair_cluster = torch.unique(cluster * num_ids + identity, sorted=True) // num_ids
    majority = torch.zeros(int(cluster.max()) + 1, dtype=torch.int64).scatter_reduce_(
        0, pair_cluster, counts, reduce="amax")
    return {"clusters": int(cluster.max()) + 1, "purity": float(majority.sum()) / labels.numel(), "ids": num_ids}


# -- the trainer ---------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _atomic_write_text(text: str, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def load_data(config: TrainConfig) -> fdata.TrackletDataset:
    """The dataset a config names (the synthetic world is rebuilt deterministically)."""
    options = dict(config.data_options)
    if config.data == "synthetic":
        options.setdefault("image_size", tuple(config.image_size))
        return fdata.SyntheticTracklets(**options)
    if not config.root:
        raise ValueError(f"dataset {config.data!r} needs root= (the folder holding it)")
    return fdata.load_dataset(config.data, config.root, **options)


class Trainer:
    """Base trainer; see the module docstring for the hooks a method overrides.

    Parameters
    ----------
    config : TrainConfig (the method's Config subclass)
    out_dir : path, optional
        Where report, plots and checkpoint go (nothing is written without it).
    dataset : TrackletDataset, optional
        Use this dataset instead of building the one ``config`` names (tests; it must be the
        same one when resuming).
    log : callable str -> None
        Receives the per-epoch log lines (``print`` by default, through tqdm.write).

    Attributes set by :meth:`prepare`
    -----------------------------------
    dataset, train (tuple of Tracklet), layout (CameraLayout on ``device``), train_pids /
    train_cameras (Tensor [T] on ``device``; pids are ground truth, diagnostics only),
    model (ReidModel), heads (nn.Module or None), optimizer, scheduler, loader, sampler,
    device, backend, history (list of per-epoch dicts), baseline (dict or None).
    """

    name = "base"
    Config = TrainConfig
    PRESETS: dict[str, dict] = {}

    def __init__(self, config: TrainConfig, out_dir: str | os.PathLike | None = None, *,
                 dataset: fdata.TrackletDataset | None = None, log: Callable[[str], None] | None = None):
        if not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} needs a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self._given_dataset = dataset
        self._log = log
        self.backend = config.backend
        self.device = resolve_device(config.device)
        self.history: list[dict] = []
        self.baseline: dict | None = None
        self.baseline_diagnostics: dict = {}
        self.final: dict | None = None
        self.start_epoch = 0
        self.prepared = False
        self._assoc_times: dict[str, float] = {}

    # ---- construction --------------------------------------------------------------------------

    @classmethod
    def make_config(cls, preset: str = "smoke", **overrides) -> TrainConfig:
        """The method's config for ``preset`` (``smoke`` | ``demo`` | ``paper``), then ``overrides``.

        ``data_options`` overrides are merged key by key into the preset's.
        """
        if preset not in BASE_PRESETS:
            raise ValueError(f"preset must be one of {PRESET_NAMES}, got {preset!r}")
        values: dict[str, Any] = {}
        for layer in (BASE_PRESETS[preset], cls.PRESETS.get(preset, {}), overrides):
            for key, value in layer.items():
                if key == "data_options" and isinstance(value, dict):
                    values["data_options"] = {**values.get("data_options", {}), **value}
                else:
                    values[key] = value
        values.update(method=cls.name, preset=preset)
        if values.get("data", "synthetic") != "synthetic":
            # The base presets' options describe the synthetic world; a dataset on disk keeps only the
            # method preset's options (e.g. tracklets="one_per_camera") and the caller's.
            values["data_options"] = {**cls.PRESETS.get(preset, {}).get("data_options", {}),
                                      **overrides.get("data_options", {})}
        known = {f.name for f in dataclasses.fields(cls.Config)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(f"{cls.__name__} config has no field(s) {unknown}")
        return cls.Config(**copy.deepcopy(values))

    def prepare(self) -> None:
        """Seed, build data, model, heads, optimiser, scheduler and loader (idempotent)."""
        if self.prepared:
            return
        config = self.config
        seed_everything(config.seed)
        self.dataset = self._given_dataset if self._given_dataset is not None else load_data(config)
        self.train = tuple(self.dataset.train)
        if not self.train:
            raise ValueError("the dataset has no training tracklets")
        pids, cameras = fdata.tracklet_labels(self.train)
        self.num_cameras = int(cameras.max()) + 1
        self.layout = CameraLayout.from_cameras(cameras, self.num_cameras).to(self.device)
        self.train_pids = pids.to(self.device)
        self.train_cameras = cameras.to(self.device)
        self.model = self.build_model().to(self.device)
        heads = self.build_heads()
        self.heads = heads.to(self.device) if heads is not None else None
        self.optimizer = self.build_optimizer()
        self.scheduler = self.build_scheduler(self.optimizer)
        self.loader = self.build_loader()
        self.sampler = self.loader.batch_sampler
        self.prepared = True

    def build_backbone(self) -> nn.Module:
        c = self.config
        return build_backbone(c.backbone, weights=c.weights, small_width=c.small_width)

    def build_model(self) -> nn.Module:
        """The embedding network; ``forward(frames [b, 3, H, W]) -> [b, D]`` is the test feature.
        Default: the backbone alone. Override to add layers (keep ``out_dim``)."""
        return ReidModel(self.build_backbone())

    def build_heads(self) -> nn.Module | None:
        """Trainable parameters outside the test network (classifiers, learnable memories)."""
        return None

    def parameter_groups(self) -> list[dict]:
        """Optimiser parameter groups: backbone at ``lr * backbone_lr_mult``, the rest at ``lr``."""
        c = self.config
        backbone = list(self.model.backbone.parameters()) if hasattr(self.model, "backbone") else []
        ids = {id(p) for p in backbone}
        rest = [p for p in self.model.parameters() if id(p) not in ids]
        if self.heads is not None:
            rest += list(self.heads.parameters())
        groups = []
        if backbone:
            groups.append({"params": backbone, "lr": c.lr * c.backbone_lr_mult})
        if rest:
            groups.append({"params": rest, "lr": c.lr})
        return groups

    def build_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        groups = self.parameter_groups()
        if c.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay, nesterov=True)
        if c.optimizer == "adam":
            return torch.optim.Adam(groups, lr=c.lr, weight_decay=c.weight_decay)
        if c.optimizer == "rmsprop":
            return torch.optim.RMSprop(groups, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay, eps=1.0)
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {c.optimizer!r}")

    def build_scheduler(self, optimizer):
        c = self.config
        if c.scheduler == "none":
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
        if c.scheduler == "step":
            return torch.optim.lr_scheduler.StepLR(optimizer, c.step_size, c.gamma)
        if c.scheduler == "multistep":
            return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(c.milestones), c.gamma)
        if c.scheduler == "exponential":
            return torch.optim.lr_scheduler.ExponentialLR(optimizer, c.gamma)
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {c.scheduler!r}")

    def train_transform(self):
        c = self.config
        h, w = c.image_size
        transform = fdata.train_transform(h, w, erasing=c.train_erasing)
        colour = []
        if c.train_colour_jitter > 0:
            from torchvision import transforms as T

            j = c.train_colour_jitter
            colour.append(T.ColorJitter(j, j, j, min(j / 4, 0.5)))
        if c.train_grayscale > 0:
            from torchvision import transforms as T

            colour.append(T.RandomGrayscale(c.train_grayscale))
        if colour:
            from torchvision import transforms as T

            return T.Compose([*colour, transform])
        return transform

    def test_transform(self):
        h, w = self.config.image_size
        # The data layer names it eval_transform (test_transform in early versions).
        make = getattr(fdata, "eval_transform", None) or getattr(fdata, "test_transform")
        return make(h, w)

    def build_loader(self) -> torch.utils.data.DataLoader:
        """Camera-balanced batches ``(frames [B, n, 3, H, W], tracklet index [B], camera [B])``.

        Override for other batches; the loader's ``batch_sampler`` must have ``set_epoch``.
        """
        c = self.config
        return fdata.train_loader(self.train, self.dataset.load_frame, tracklets_per_camera=c.tracklets_per_camera,
                                  frames_per_tracklet=c.frames_per_tracklet, transform=self.train_transform(),
                                  num_batches=c.batches_per_epoch, num_workers=c.num_workers, seed=c.seed,
                                  pin_memory=self.device.type == "cuda")

    # ---- hooks -------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Initialise method state (memories, anchors, labels) before epoch 0. Not called on resume."""

    def on_epoch_start(self, epoch: int) -> None:
        """Association steps run before epoch ``epoch`` (0-based)."""

    def train_step(self, frames: torch.Tensor, index: torch.Tensor, cameras: torch.Tensor,
                   epoch: int) -> dict[str, torch.Tensor]:
        """One batch: return the losses; ``"loss"`` (scalar) is back-propagated by the base."""
        raise NotImplementedError

    def after_step(self, frames: torch.Tensor, index: torch.Tensor, cameras: torch.Tensor, epoch: int) -> None:
        """Called after the optimiser step (e.g. memory updates that must see the new weights)."""

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        """Association steps after epoch ``epoch``; return diagnostics (floats, ints)."""
        return {}

    def initial_diagnostics(self) -> dict[str, float]:
        """Diagnostics of the state :meth:`setup` built from the untrained network (the
        association baseline, ``baseline_diagnostics`` in the report). Default: none."""
        return {}

    def method_state(self) -> dict:
        """Method state for the checkpoint (tensors, numbers, lists, dicts)."""
        return {}

    def load_method_state(self, state: dict) -> None:
        """Restore :meth:`method_state`."""

    # ---- helpers for methods -------------------------------------------------------------------

    def frame_features(self, frames: torch.Tensor, model: Callable | None = None) -> torch.Tensor:
        """Run the model on a batch of tracklet frames: [B, n, 3, H, W] -> [B, n, D]."""
        model = model or self.model
        batch, count = frames.shape[:2]
        out = model(frames.reshape(batch * count, *frames.shape[2:]))
        return out.reshape(batch, count, -1)

    def train_features(self, pooling: str = "mean", *, normalize: bool = False, desc: str = "train features",
                       model: Callable | None = None) -> torch.Tensor:
        """Features of every training tracklet (test transform), [T, D] float32 on ``device``,
        rows in ``self.train`` order."""
        c = self.config
        feats = fdata.extract_features(model or self.model, self.train, self.dataset.load_frame,
                                       transform=self.test_transform(), pooling=pooling,
                                       max_frames=c.eval_max_frames, batch_size=c.eval_batch_size,
                                       device=self.device, progress=c.progress, desc=desc)
        feats = feats.to(self.device)
        return nn.functional.normalize(feats, dim=1) if normalize else feats

    @contextlib.contextmanager
    def association(self, desc: str, total: int | None = None) -> Iterator[Any]:
        """Progress bar and timing of one association step: ``with self.association("graph") as bar:``.

        ``bar.update(n)`` advances it when ``total`` is given; the step's seconds are added to
        the epoch record under ``time_<desc>``.
        """
        from tqdm.auto import tqdm

        start = time.perf_counter()
        with tqdm(total=total if total is not None else 1, desc=f"  {desc}", leave=False,
                  disable=not self.config.progress) as bar:
            yield bar
            if total is None:
                bar.update(1)
        key = "time_" + "".join(ch if ch.isalnum() else "_" for ch in desc.lower()).strip("_")
        self._assoc_times[key] = self._assoc_times.get(key, 0.0) + time.perf_counter() - start

    def pair_diagnostics(self, ia: torch.Tensor, ib: torch.Tensor, prefix: str = "pairs") -> dict:
        """:func:`pair_diagnostics` against the training tracklets' ground truth (tracklet indices)."""
        return pair_diagnostics(ia, ib, self.train_pids, prefix)

    def graph_diagnostics(self, graph: torch.Tensor, prefix: str = "pairs", cross_camera: bool = True) -> dict:
        """:func:`graph_diagnostics` of a [T, T] graph over tracklets in ``self.train`` order."""
        return graph_diagnostics(graph, self.train_pids, self.train_cameras if cross_camera else None, prefix)

    def soft_label_diagnostics(self, soft: torch.Tensor) -> dict:
        """:func:`soft_label_diagnostics` of [T, T] soft labels over tracklets in ``self.train`` order."""
        return soft_label_diagnostics(soft, self.train_pids, self.train_cameras)

    def cluster_diagnostics(self, labels: torch.Tensor) -> dict:
        """:func:`cluster_diagnostics` of cluster labels [T] in ``self.train`` order."""
        return cluster_diagnostics(labels, self.train_pids)

    @property
    def has_ground_truth(self) -> bool:
        return bool((self.train_pids >= 0).any())

    def log(self, line: str) -> None:
        if self._log is not None:
            self._log(line)
            return
        from tqdm.auto import tqdm

        tqdm.write(line)

    def calibrate_batchnorm(self, batches: int) -> None:
        """Re-estimate every BatchNorm's running statistics from ``batches`` training batches
        (cumulative average, no gradient, no parameter change)."""
        norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms or batches <= 0:
            return
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        self.model.train()
        with torch.no_grad(), self.association("batchnorm warm-up", total=batches) as bar:
            for step, (frames, _, _) in enumerate(self.loader):
                if step >= batches:
                    break
                self.frame_features(frames.to(self.device))
                bar.update(1)
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum

    # ---- evaluation ------------------------------------------------------------------------------

    def evaluate(self, model: Callable | None = None, desc: str = "eval") -> dict:
        """Rank the gallery for every query with pooled tracklet features.

        Returns
        -------
        dict
            ``rank1``, ``rank5``, ``rank10``, ``mAP``, ``mINP``, ``cmc`` (list, 50 ranks),
            ``num_valid_queries``.
        """
        self.prepare()
        c = self.config
        model = model or self.model
        feats = {}
        for split in ("query", "gallery"):
            feats[split] = fdata.extract_features(
                model, self.dataset.split(split), self.dataset.load_frame, transform=self.test_transform(),
                pooling=c.eval_pooling, max_frames=c.eval_max_frames, batch_size=c.eval_batch_size,
                device=self.device, progress=c.progress, desc=f"{desc} {split}")
            if c.eval_normalize:
                feats[split] = nn.functional.normalize(feats[split], dim=1)
        qp, qc = fdata.tracklet_labels(self.dataset.query)
        gp, gc = fdata.tracklet_labels(self.dataset.gallery)
        result = evaluate_ranking(feats["query"], feats["gallery"], qp, gp, qc, gc, metric=c.eval_metric,
                                  max_rank=50, backend=self.backend)
        cmc = result.cmc.tolist()
        return {"rank1": cmc[0], "rank5": cmc[min(4, len(cmc) - 1)], "rank10": cmc[min(9, len(cmc) - 1)],
                "mAP": float(result.mAP), "mINP": float(result.mINP), "cmc": cmc,
                "num_valid_queries": int(result.num_valid_queries)}

    # ---- the loop --------------------------------------------------------------------------------

    def fit(self, stop_after: int | None = None) -> dict | None:
        """Train (from scratch, or on from a loaded checkpoint), evaluate, write outputs.

        Parameters
        ----------
        stop_after : int, optional
            Stop once this many epochs are done, without the final evaluation, as if the run
            had been interrupted (the checkpoint is written); :meth:`resume` continues it.

        Returns
        -------
        dict or None
            The report (also ``out_dir/report.json``); None when stopped early.
        """
        from tqdm.auto import tqdm

        c = self.config
        self.prepare()
        started = time.perf_counter()
        self._assoc_times = {}
        if self.start_epoch == 0 and not self.history:
            if c.bn_warmup_batches:
                self.calibrate_batchnorm(c.bn_warmup_batches)
            if c.baseline:
                self.baseline = self.evaluate(desc="baseline")
                self.log(f"[{self.name}] untrained network: rank-1 {100 * self.baseline['rank1']:.1f}  "
                         f"mAP {100 * self.baseline['mAP']:.1f}")
            self.setup()
            self.baseline_diagnostics = self.initial_diagnostics() or {}
            self._setup_times = dict(self._assoc_times)
        epochs = tqdm(range(self.start_epoch, c.epochs), desc=f"{self.name} epochs", initial=self.start_epoch,
                      total=c.epochs, disable=not c.progress)
        for epoch in epochs:
            record = self.run_epoch(epoch)
            self.history.append(record)
            self.log(self.format_record(record))
            self.start_epoch = epoch + 1
            if c.checkpoint and self.out_dir is not None:
                self.save_checkpoint()
            if stop_after is not None and self.start_epoch >= stop_after and self.start_epoch < c.epochs:
                epochs.close()
                return None
        epochs.close()
        self.final = self.evaluate(desc="final")
        report = self.report(time.perf_counter() - started)
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(json.dumps(_jsonable(report), indent=2), self.out_dir / "report.json")
            if c.plots:
                self.plot()
        base = f"baseline rank-1 {100 * self.baseline['rank1']:.1f} mAP {100 * self.baseline['mAP']:.1f} -> " \
            if self.baseline else ""
        self.log(f"[{self.name}] {base}final rank-1 {100 * self.final['rank1']:.1f} mAP {100 * self.final['mAP']:.1f}")
        return report

    def run_epoch(self, epoch: int) -> dict:
        from tqdm.auto import tqdm

        c = self.config
        self._assoc_times = {}
        start = time.perf_counter()
        self.model.train()
        if self.heads is not None:
            self.heads.train()
        self.on_epoch_start(epoch)
        self.sampler.set_epoch(epoch)
        sums: dict[str, float] = {}
        steps = 0
        bar = tqdm(self.loader, desc=f"  epoch {epoch + 1}/{c.epochs}", leave=False, disable=not c.progress)
        for frames, index, cameras in bar:
            frames = frames.to(self.device, non_blocking=True)
            index = index.to(self.device)
            cameras = cameras.to(self.device)
            losses = self.train_step(frames, index, cameras, epoch)
            loss = losses["loss"]
            self.optimizer.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()
                self.optimizer.step()
            self.after_step(frames, index, cameras, epoch)
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach() if isinstance(value, torch.Tensor) else value)
            steps += 1
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        bar.close()
        lr = self.optimizer.param_groups[-1]["lr"]
        self.scheduler.step()
        self.model.eval()
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "steps": steps}
        record.update({key: value / max(steps, 1) for key, value in sums.items()})
        diagnostics = self.on_epoch_end(epoch) or {}
        record.update(diagnostics)
        if c.eval_every and (epoch + 1) % c.eval_every == 0 and epoch + 1 < c.epochs:
            result = self.evaluate(desc=f"eval {epoch + 1}")
            record.update(rank1=result["rank1"], mAP=result["mAP"])
        record.update(self._assoc_times)
        record["time"] = time.perf_counter() - start
        return record

    def format_record(self, record: dict) -> str:
        parts = [f"[{self.name}] epoch {record['epoch']}/{self.config.epochs}"]
        for key, value in record.items():
            if key in ("epoch", "steps") or key.startswith("time_"):
                continue
            if isinstance(value, float):
                parts.append(f"{key} {value:.4g}")
            elif isinstance(value, int):
                parts.append(f"{key} {value}")
        return "  ".join(parts)

    def report(self, seconds: float | None = None) -> dict:
        report = {
            "method": self.name, "config": self.config.to_dict(), "device": str(self.device),
            "dataset": {"name": self.dataset.name, "train": len(self.dataset.train), "query": len(self.dataset.query),
                        "gallery": len(self.dataset.gallery), "num_cameras": self.dataset.num_cameras,
                        "num_train_pids": self.dataset.num_train_pids},
            "history": self.history, "setup_times": getattr(self, "_setup_times", {}),
            "baseline_diagnostics": self.baseline_diagnostics,
        }
        if self.final is not None:
            report.update({k: v for k, v in self.final.items()})
        if self.baseline is not None:
            report.update({f"baseline_{k}": v for k, v in self.baseline.items()})
        if seconds is not None:
            report["seconds"] = seconds
        return report

    # ---- plots -----------------------------------------------------------------------------------

    def plot(self) -> list[Path]:
        """Write ``losses.png``, ``diagnostics.png`` and ``cmc.png`` into ``out_dir``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        written = []
        epochs = [r["epoch"] for r in self.history]
        numeric = [k for k in dict.fromkeys(k for r in self.history for k in r)
                   if k not in ("epoch", "steps", "time", "lr") and not k.startswith("time_")
                   and all(isinstance(r.get(k, 0.0), (int, float)) for r in self.history)]
        losses = [k for k in numeric if k == "loss" or k.startswith("loss")]
        diagnostics = [k for k in numeric if k not in losses]

        def series(key):
            return [r.get(key, float("nan")) if r.get(key) is not None else float("nan") for r in self.history]

        if losses and epochs:
            fig, ax = plt.subplots(figsize=(6, 4))
            for key in losses:
                ax.plot(epochs, series(key), marker="o", label=key)
            ax.set_xlabel("epoch")
            ax.set_ylabel("mean loss")
            ax.set_title(f"{self.name}: training losses")
            ax.legend()
            fig.tight_layout()
            written.append(self.out_dir / "losses.png")
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
            fig.suptitle(f"{self.name}: association diagnostics")
            fig.tight_layout()
            written.append(self.out_dir / "diagnostics.png")
            fig.savefig(written[-1], dpi=100)
            plt.close(fig)
        if self.final is not None:
            fig, ax = plt.subplots(figsize=(6, 4))
            ranks = np.arange(1, len(self.final["cmc"]) + 1)
            if self.baseline is not None:
                ax.plot(ranks, 100 * np.asarray(self.baseline["cmc"]), label="untrained")
            ax.plot(ranks, 100 * np.asarray(self.final["cmc"]), label="trained")
            ax.set_xlabel("rank")
            ax.set_ylabel("matching rate (%)")
            ax.set_ylim(0, 102)   # a curve at 100 % stays visible above the frame line
            final = self.final
            ax.set_title(f"{self.name}: CMC (rank-1 {100 * final['rank1']:.1f}, mAP {100 * final['mAP']:.1f})")
            ax.legend()
            fig.tight_layout()
            written.append(self.out_dir / "cmc.png")
            fig.savefig(written[-1], dpi=100)
            plt.close(fig)
        return written

    # ---- checkpoints -----------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        if self.out_dir is None:
            raise ValueError("no out_dir: nowhere to checkpoint")
        return self.out_dir / "checkpoint.pt"

    def state_dict(self) -> dict:
        return {
            "format": 1, "method": self.name, "config": dataclasses.asdict(self.config), "epoch": self.start_epoch,
            "model": self.model.state_dict(), "heads": self.heads.state_dict() if self.heads is not None else None,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "method_state": self.method_state(), "history": self.history, "baseline": self.baseline,
            "baseline_diagnostics": self.baseline_diagnostics,
            "setup_times": getattr(self, "_setup_times", {}),
            "sampler": {"epoch": getattr(self.sampler, "epoch", None), "seed": getattr(self.sampler, "seed", None)},
            "rng": rng_state(),
        }

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        path = Path(path) if path is not None else self.checkpoint_path
        atomic_save(self.state_dict(), path)
        return path

    def load_state_dict(self, state: dict) -> None:
        self.prepare()
        self.model.load_state_dict(state["model"])
        if self.heads is not None and state.get("heads") is not None:
            self.heads.load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.load_method_state(_to_device(state["method_state"], self.device))
        self.history = list(state["history"])
        self.baseline = state["baseline"]
        self.baseline_diagnostics = state.get("baseline_diagnostics", {})
        self._setup_times = state.get("setup_times", {})
        self.start_epoch = int(state["epoch"])
        if state["sampler"]["epoch"] is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(state["sampler"]["epoch"])
        set_rng_state(state["rng"])

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                        dataset: fdata.TrackletDataset | None = None, log=None,
                        **overrides) -> "Trainer":
        """Rebuild a trainer from ``checkpoint.pt`` (``overrides`` change config fields such as
        ``device`` or ``progress``, or ``epochs`` to extend a run)."""
        state = torch.load(path, map_location="cpu", weights_only=False)
        config = cls.Config(**{**state["config"], **overrides})
        trainer = cls(config, out_dir if out_dir is not None else Path(path).parent, dataset=dataset, log=log)
        trainer.load_state_dict(state)
        return trainer

    @classmethod
    def resume(cls, out_dir: str | os.PathLike, **kwargs) -> "Trainer":
        """The trainer of ``out_dir/checkpoint.pt``, ready for :meth:`fit` to continue the run."""
        return cls.from_checkpoint(Path(out_dir) / "checkpoint.pt", out_dir, **kwargs)


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return value
