"""The trainer loop (:class:`Trainer`) shared by DAL, UTAL, UGA, EEA and TSSL.

A method is a :class:`Trainer` subclass with a config dataclass (a :class:`TrainConfig`
subclass holding the method's hyper-parameters with the paper's defaults), presets, and a few
hooks; the base class owns everything else:

- data: the synthetic world or a dataset on disk (:mod:`fastassoc.data`), the camera layout of
  the training tracklets (:class:`fastassoc.segments.CameraLayout`: camera-sorted rows, the segments every
  per-camera op takes), camera-balanced batches of ``frames_per_tracklet`` frames;
- model: a torchvision ResNet-50 / MobileNetV2 or :class:`~fastassoc.methods.backbones.MobileNetV1`
  (ImageNet weights only from a local file, ``weights=PATH``, never downloaded; the ``paper``
  preset refuses to start without them unless ``from_scratch=True``) or
  :class:`~fastassoc.methods.backbones.SmallReidNet` for CPU runs, followed by the method's own
  layers (:meth:`Trainer.build_model`) and trainable heads (:meth:`Trainer.build_heads`);
- optimisation: SGD / Adam / RMSprop, a per-epoch step / multi-step / exponential schedule;
- the epoch loop: tqdm bars per epoch and per association step (:meth:`Trainer.association`)
  when stderr is a terminal (``progress=None``), one log line per epoch with the loss means,
  association diagnostics and where the time went (``association_seconds``,
  ``training_seconds``, ``association_share``);
- evaluation: tracklet features pooled over frames (mean, or max for DAL), optionally
  L2-normalised, ranked with :func:`fastassoc.evaluate_ranking`; the untrained network is
  evaluated on the same split first (``baseline_rank1`` / ``baseline_mAP``); evaluations a
  method makes during training go to the report through :meth:`Trainer.record_step_eval`;
- outputs in ``out_dir``: ``report.json`` (environment: versions, commit, machine; the full
  config; history; wall time per phase), ``losses.png``, ``diagnostics.png``, ``timing.png``,
  ``cmc.png``, and ``checkpoint.pt`` after every epoch (:mod:`fastassoc.methods.checkpoint`:
  sealed with a SHA-256, plain types only; model, heads, optimiser, scheduler, method state,
  history, RNG states of torch / NumPy / Python, the sampler's epoch).
  ``Trainer.resume(out_dir)`` continues a run to the same result as an uninterrupted one, and
  refuses other settings unless ``override=True``.

Multi-process training (``torchrun --nproc_per_node N -m fastassoc.cli train ...``, or any
code that calls :func:`torch.distributed.init_process_group` before building the trainer) is
data parallel with the model left unwrapped, so that ``state_dict`` keys and checkpoints do not
depend on the world size and a run resumes under any world size (DistributedDataParallel would
overlap the all-reduce with the backward pass, but renames the keys ``module.*`` and expects a
backward after every train-mode forward, which the methods' bank extractions and BatchNorm
warm-up are not):

- every rank draws the same global batches and trains on its strided share
  (:class:`~fastassoc.distributed.training.RankSplitSampler`, through ``rank_split``), so the
  batch sizes of a preset are global (they must divide by the world size);
- after ``loss.backward()`` the gradients are averaged over the ranks (DDP's all-reduce,
  :func:`~fastassoc.distributed.training.average_gradients`) and after the optimiser step the
  BatchNorm running statistics too (:func:`~fastassoc.distributed.training.average_buffers`),
  so the ranks' models stay identical;
- the methods' banks (memories, anchors, exemplars, cluster memories: at most ``T x D``, 68 MB
  for MARS' 8,298 tracklets at D = 2,048) are small next to the network, so every rank keeps
  a full replica: batch updates gather every rank's rows first
  (:func:`~fastassoc.distributed.training.replicated_ema_update_`), hence equal the
  one-process update of the global batch, and every association step (kNN, graphs, soft
  labels, merging) runs on every rank on identical inputs, so needs no communication;
- features of all tracklets (:meth:`Trainer.train_features`, :meth:`Trainer.evaluate`) are
  extracted for this rank's block of tracklets (:func:`~fastassoc.distributed.training.shard_range`)
  and all-gathered, so every rank holds the same bank;
- rank 0 alone writes ``checkpoint.pt``, ``report.json``, the plots and the log.

What differs from a one-process run of the same seed: the training batches' frames and
augmentations are drawn by each rank's own torch generator (seeded alike) for its share; BatchNorm
normalises with the statistics of the rank's share; in-batch terms (TSSL's negatives, DAL's
per-camera mean rank-1 distance when ``bar_gradient`` is set) see the rank's share only.
The logged losses are the means over the ranks.

Configs and presets live in :mod:`fastassoc.methods.config`, backbones in
:mod:`fastassoc.methods.backbones`, diagnostics in :mod:`fastassoc.methods.diagnostics`,
plots in :mod:`fastassoc.methods.plots`.

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
        def method_state(self):              # tensors, numbers, strings, lists, dicts to checkpoint
            return {"memory": self.memory}
        def load_method_state(self, state):
            self.memory = state["memory"]

Every association step goes through the fastassoc ops with ``backend=self.backend``.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .. import data as fdata
from .. import evaluate_ranking
from ..distributed.training import (RankSplitSampler, all_gather_batch, average_buffers, average_gradients,
                                    is_rank_zero, on_rank_zero, shard_range, world)
from ..segments import CameraLayout
from .backbones import ReidModel, build_backbone
from .checkpoint import (FORMAT_VERSION, CheckpointError, atomic_write_text, read_checkpoint, remove_stale_temporaries,
                         rng_state, seed_everything, set_rng_state, to_device, write_checkpoint)
from .config import (OPTIMIZERS, RUNTIME_FIELDS, SCHEDULERS, TrainConfig, check_pretraining, config_differences,
                     jsonable, resolve_config)
from .diagnostics import cluster_diagnostics, graph_diagnostics, pair_diagnostics, soft_label_diagnostics
from .environment import run_environment
from .plots import plot_run


def progress_enabled(progress: bool | None) -> bool:
    """Whether to draw progress bars: ``progress``, or for None tqdm's ``disable=None``
    convention (bars only when stderr, where tqdm draws, is a terminal)."""
    if progress is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    return bool(progress)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
        check_pretraining(config)
        self.config = config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self._given_dataset = dataset
        self._log = log
        self.backend = config.backend
        self.device = resolve_device(config.device)
        self.show_progress = progress_enabled(config.progress)
        self.history: list[dict] = []
        self.baseline: dict | None = None
        self.baseline_diagnostics: dict = {}
        self.final: dict | None = None
        self.start_epoch = 0
        self.prepared = False
        self._assoc_times: dict[str, float] = {}
        self._assoc_total = 0.0          # seconds inside association() since construction
        self.timing: dict[str, Any] = {}  # wall time per phase (report["timing"]), kept across resumes
        self.step_evaluations: list[dict] = []

    # ---- construction --------------------------------------------------------------------------

    @classmethod
    def make_config(cls, preset: str = "smoke", **overrides) -> TrainConfig:
        """The method's config for ``preset`` (``smoke`` | ``demo`` | ``paper``), then ``overrides``.

        ``data_options`` overrides are merged key by key into the preset's
        (:func:`~fastassoc.methods.config.resolve_config`).
        """
        return resolve_config(cls.Config, cls.name, cls.PRESETS, preset, overrides)

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
        if self.rank_split is not None and not isinstance(self.sampler, RankSplitSampler):
            raise TypeError(f"{type(self).__name__}.build_loader must split its batches over the ranks in a "
                            f"multi-process run: pass rank_split=self.rank_split to the fastassoc.data loader "
                            f"builders, or wrap the batch sampler in fastassoc.distributed.training.RankSplitSampler")
        self.prepared = True

    @property
    def rank_split(self) -> tuple[int, int] | None:
        """``(rank, world_size)`` of the initialised process group when it has several ranks, else None."""
        rank, world_size = world()
        return (rank, world_size) if world_size > 1 else None

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
            return torch.optim.RMSprop(groups, lr=c.lr, alpha=c.rmsprop_alpha, momentum=c.momentum,
                                       weight_decay=c.weight_decay, eps=1.0)
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
        """PIL image -> Tensor [3, H, W]: the augmentation the config's ``train_*`` fields ask for."""
        return fdata.config_train_transform(self.config)

    def test_transform(self):
        h, w = self.config.image_size
        # The data layer names it eval_transform (test_transform in early versions).
        make = getattr(fdata, "eval_transform", None) or getattr(fdata, "test_transform")
        return make(h, w)

    def build_loader(self) -> torch.utils.data.DataLoader:
        """Camera-balanced batches ``(frames [B, n, 3, H, W], tracklet index [B], camera [B])``.

        Override for other batches; the loader's ``batch_sampler`` must have ``set_epoch``, and
        in a multi-process run be split over the ranks (``rank_split=self.rank_split``).
        """
        c = self.config
        return fdata.train_loader(self.train, self.dataset.load_frame, tracklets_per_camera=c.tracklets_per_camera,
                                  frames_per_tracklet=c.frames_per_tracklet, transform=self.train_transform(),
                                  num_batches=c.batches_per_epoch, num_workers=c.num_workers, seed=c.seed,
                                  pin_memory=self.device.type == "cuda", rank_split=self.rank_split)

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
        feats = self.extract_features(self.train, pooling, desc=desc, model=model)
        return nn.functional.normalize(feats, dim=1) if normalize else feats

    def extract_features(self, tracklets, pooling: str = "mean", *, desc: str = "features",
                         model: Callable | None = None) -> torch.Tensor:
        """Pooled features of ``tracklets`` (test transform), [len, D] float32 on ``device``.

        In a multi-process run each rank extracts its contiguous block of the tracklets
        (:func:`~fastassoc.distributed.training.shard_range`) and the blocks are all-gathered in
        rank order, so every rank holds the same tensor. A tracklet's feature does not depend on
        the others (eval mode), so this is the one-process result up to the floating-point
        rounding of the frame batches' other sizes.
        """
        c = self.config
        tracklets = list(tracklets)
        start, stop = shard_range(len(tracklets)) if self.rank_split is not None else (0, len(tracklets))
        feats = fdata.extract_features(model or self.model, tracklets[start:stop], self.dataset.load_frame,
                                       transform=self.test_transform(), pooling=pooling,
                                       max_frames=c.eval_max_frames, batch_size=c.eval_batch_size,
                                       device=self.device, progress=self.show_progress, desc=desc)
        feats = feats.to(self.device).float()
        if stop == start and self.rank_split is not None:
            # An empty block comes back as [0, 0]; the gather needs the feature width.
            feats = feats.new_zeros(0, getattr(model or self.model, "out_dim"))
        if self.rank_split is not None:
            feats, = all_gather_batch(feats.contiguous())
        return feats

    @contextlib.contextmanager
    def association(self, desc: str, total: int | None = None) -> Iterator[Any]:
        """Progress bar and timing of one association step: ``with self.association("graph") as bar:``.

        ``bar.update(n)`` advances it when ``total`` is given; the step's seconds are added to
        the epoch record under ``time_<desc>``.
        """
        from tqdm.auto import tqdm

        start = time.perf_counter()
        with tqdm(total=total if total is not None else 1, desc=f"  {desc}", leave=False,
                  disable=not self.show_progress) as bar:
            yield bar
            if total is None:
                bar.update(1)
        key = "time_" + "".join(ch if ch.isalnum() else "_" for ch in desc.lower()).strip("_")
        elapsed = time.perf_counter() - start
        self._assoc_times[key] = self._assoc_times.get(key, 0.0) + elapsed
        self._assoc_total += elapsed

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
        """Write one log line (rank 0 only in a multi-process run)."""
        if not is_rank_zero():
            return
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
        # Cumulative means of equal shares: their mean is the global batches' mean.
        average_buffers(self.model)

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
            feats[split] = self.extract_features(self.dataset.split(split), c.eval_pooling, desc=f"{desc} {split}",
                                                 model=model)
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
        started = time.perf_counter()
        if self.out_dir is not None and is_rank_zero():
            for stale in remove_stale_temporaries(self.out_dir):
                self.log(f"[{self.name}] removed {stale.name}, left by an interrupted write")
        self.prepare()
        timing = self.timing
        timing["setup_seconds"] = timing.get("setup_seconds", 0.0) + time.perf_counter() - started
        self._assoc_times = {}
        if self.start_epoch == 0 and not self.history:
            if c.bn_warmup_batches:
                with self._timed("batchnorm_warmup_seconds"):
                    self.calibrate_batchnorm(c.bn_warmup_batches)
            if c.baseline:
                with self._timed("baseline_eval_seconds"):
                    self.baseline = self.evaluate(desc="baseline")
                self.log(f"[{self.name}] untrained network: rank-1 {100 * self.baseline['rank1']:.1f}  "
                         f"mAP {100 * self.baseline['mAP']:.1f}")
            with self._timed("method_setup_seconds"):
                self.setup()
                self.baseline_diagnostics = self.initial_diagnostics() or {}
            self._setup_times = dict(self._assoc_times)
        epochs = tqdm(range(self.start_epoch, c.epochs), desc=f"{self.name} epochs", initial=self.start_epoch,
                      total=c.epochs, disable=not self.show_progress)
        for epoch in epochs:
            record = self.run_epoch(epoch)
            self.history.append(record)
            self.log(self.format_record(record))
            self.start_epoch = epoch + 1
            if c.checkpoint and self.out_dir is not None:
                # Rank 0 writes; the others wait, so no rank runs ahead of a checkpoint being written.
                on_rank_zero(self.save_checkpoint)
            if stop_after is not None and self.start_epoch >= stop_after and self.start_epoch < c.epochs:
                epochs.close()
                timing["wall_seconds"] = timing.get("wall_seconds", 0.0) + time.perf_counter() - started
                return None
        epochs.close()
        with self._timed("final_eval_seconds"):
            self.final = self.evaluate(desc="final")
        if self.out_dir is not None and c.plots and is_rank_zero():
            with self._timed("plots_seconds"):
                self.out_dir.mkdir(parents=True, exist_ok=True)
                self.plot()
        seconds = time.perf_counter() - started
        timing["wall_seconds"] = timing.get("wall_seconds", 0.0) + seconds
        report = self.report(seconds)
        if self.out_dir is not None and is_rank_zero():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(json.dumps(jsonable(report), indent=2), self.out_dir / "report.json")
        base = f"baseline rank-1 {100 * self.baseline['rank1']:.1f} mAP {100 * self.baseline['mAP']:.1f} -> " \
            if self.baseline else ""
        self.log(f"[{self.name}] {base}final rank-1 {100 * self.final['rank1']:.1f} mAP {100 * self.final['mAP']:.1f}")
        return report

    def step(self, frames: torch.Tensor, index: torch.Tensor, cameras: torch.Tensor, epoch: int) -> dict:
        """One optimisation step on a batch (this rank's share in a multi-process run).

        :meth:`train_step`, back-propagation of ``"loss"``, the gradients averaged over the
        ranks, the optimiser step, the BatchNorm statistics averaged over the ranks, then
        :meth:`after_step`. Returns :meth:`train_step`'s losses (this rank's).
        """
        losses = self.train_step(frames, index, cameras, epoch)
        loss = losses["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
            average_gradients(self.model, self.heads)
            self.optimizer.step()
        average_buffers(self.model, self.heads)
        self.after_step(frames, index, cameras, epoch)
        return losses

    def run_epoch(self, epoch: int) -> dict:
        from tqdm.auto import tqdm

        c = self.config
        self._assoc_times = {}
        start = time.perf_counter()
        self.model.train()
        if self.heads is not None:
            self.heads.train()
        self._epoch = epoch
        assoc_start = self._assoc_total
        self.on_epoch_start(epoch)
        self.sampler.set_epoch(epoch)
        sums: dict[str, float] = {}
        steps = 0
        loop_start, loop_assoc_start = time.perf_counter(), self._assoc_total
        bar = tqdm(self.loader, desc=f"  epoch {epoch + 1}/{c.epochs}", leave=False, disable=not self.show_progress)
        for frames, index, cameras in bar:
            frames = frames.to(self.device, non_blocking=True)
            index = index.to(self.device)
            cameras = cameras.to(self.device)
            losses = self.step(frames, index, cameras, epoch)
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach() if isinstance(value, torch.Tensor) else value)
            steps += 1
            bar.set_postfix(loss=f"{float(losses['loss'].detach()):.3f}")
        bar.close()
        if self.rank_split is not None and sums:
            # Every rank's share has the same size: the mean of the ranks' means is the global mean.
            keys = sorted(sums)
            gathered, = all_gather_batch(torch.tensor([[sums[k] for k in keys]], dtype=torch.float64,
                                                      device=self.device))
            sums = dict(zip(keys, (gathered.mean(0)).tolist()))
        # Association steps a method runs inside its batches are association time, not training.
        training_seconds = time.perf_counter() - loop_start - (self._assoc_total - loop_assoc_start)
        lr = self.optimizer.param_groups[-1]["lr"]
        self.scheduler.step()
        self.model.eval()
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "steps": steps}
        record.update({key: value / max(steps, 1) for key, value in sums.items()})
        diagnostics = self.on_epoch_end(epoch) or {}
        record.update(diagnostics)
        association_seconds = self._assoc_total - assoc_start
        if c.eval_every and (epoch + 1) % c.eval_every == 0 and epoch + 1 < c.epochs:
            eval_start = time.perf_counter()
            result = self.evaluate(desc=f"eval {epoch + 1}")
            record.update(rank1=result["rank1"], mAP=result["mAP"], eval_seconds=time.perf_counter() - eval_start)
        record.update(self._assoc_times)
        busy = association_seconds + training_seconds
        record.update(association_seconds=association_seconds, training_seconds=training_seconds,
                      association_share=association_seconds / busy if busy > 0 else float("nan"))
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

    @contextlib.contextmanager
    def _timed(self, key: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.timing[key] = self.timing.get(key, 0.0) + time.perf_counter() - start

    def record_step_eval(self, step: int, result: dict, **extra) -> dict:
        """Record an evaluation made inside training (e.g. after every merging step) in the
        report's ``step_evaluations``; the best one is reported as ``best_step``.

        Parameters
        ----------
        step : int
            The method's step number (merging step, iteration...).
        result : dict
            :meth:`evaluate`'s result (``rank1``, ``mAP``...; ``cmc`` is dropped).
        **extra
            Numbers to keep with it (``clusters=413``...).

        Returns
        -------
        dict
            The recorded entry: ``step``, ``epoch`` (epochs done when it was made, 1-based
            epoch of the current one while training), the metrics and ``extra``.
        """
        entry = {"step": int(step), "epoch": getattr(self, "_epoch", self.start_epoch - 1) + 1,
                 **{key: value for key, value in result.items() if key != "cmc"}, **extra}
        self.step_evaluations.append(entry)
        return entry

    # The figure best_step is chosen by; a method may override it.
    step_selection_metric = "rank1"

    def best_step(self) -> dict | None:
        """The entry of :attr:`step_evaluations` with the highest :attr:`step_selection_metric`
        (the earliest among equals), or None."""
        key = self.step_selection_metric
        scored = [entry for entry in self.step_evaluations if entry.get(key) is not None]
        return max(scored, key=lambda entry: entry[key]) if scored else None

    def timing_summary(self) -> dict:
        """``report["timing"]``: seconds per phase (setup, batchnorm warm-up, baseline
        evaluation, method setup, final evaluation, plots, wall), per epoch association vs
        training seconds and the association share, and their totals over the epochs."""
        epochs = [{"epoch": r["epoch"], **{key: r[key] for key in ("association_seconds", "training_seconds",
                                                                   "association_share", "eval_seconds") if key in r}}
                  for r in self.history]
        association = sum(r.get("association_seconds", 0.0) for r in epochs)
        training = sum(r.get("training_seconds", 0.0) for r in epochs)
        return {**self.timing, "epochs": epochs, "association_seconds": association, "training_seconds": training,
                "association_share": association / (association + training) if association + training > 0
                else float("nan")}

    def report(self, seconds: float | None = None) -> dict:
        """The run's report (``report.json``): method, environment (versions, commit, machine),
        the full resolved config, dataset sizes, per-epoch history, timing per phase, the
        final and untrained evaluations, step evaluations when a method recorded any."""
        report = {
            "method": self.name, "environment": run_environment(self.device), "config": self.config.to_dict(),
            "device": str(self.device),
            # Processes that trained it (data parallel; rank 0's device above), 1 without a process group.
            "world_size": world()[1],
            "dataset": {"name": self.dataset.name, "train": len(self.dataset.train), "query": len(self.dataset.query),
                        "gallery": len(self.dataset.gallery), "num_cameras": self.dataset.num_cameras,
                        "num_train_pids": self.dataset.num_train_pids,
                        # MARS: "official" (all test tracklets, same-id-same-camera junk) or "torchreid".
                        "protocol": getattr(self.dataset, "protocol", None)},
            "history": self.history, "setup_times": getattr(self, "_setup_times", {}),
            "baseline_diagnostics": self.baseline_diagnostics,
        }
        if self.final is not None:
            report.update({k: v for k, v in self.final.items()})
            report["final"] = {k: v for k, v in self.final.items() if k != "cmc"}
        if self.baseline is not None:
            report.update({f"baseline_{k}": v for k, v in self.baseline.items()})
        if self.step_evaluations:
            best = self.best_step()
            report["step_evaluations"] = self.step_evaluations
            report["best_step"] = None if best is None else {
                **best, "selected_by": self.step_selection_metric,
                "note": "chosen on the test set (query / gallery), as the paper's model selection does: an "
                        "optimistic figure; 'final' is the last model's"}
        report["timing"] = self.timing_summary()
        if seconds is not None:
            report["seconds"] = seconds
        return report

    # ---- plots -----------------------------------------------------------------------------------

    def plot(self) -> list[Path]:
        """Write ``losses.png``, ``diagnostics.png``, ``timing.png`` and ``cmc.png`` into ``out_dir``
        (:func:`~fastassoc.methods.plots.plot_run`)."""
        return plot_run(self.out_dir, self.name, self.history, self.final, self.baseline)

    # ---- checkpoints -----------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        if self.out_dir is None:
            raise ValueError("no out_dir: nowhere to checkpoint")
        return self.out_dir / "checkpoint.pt"

    def state_dict(self) -> dict:
        """Everything :meth:`load_state_dict` needs to continue the run exactly (plain types)."""
        return {
            "format": FORMAT_VERSION, "method": self.name, "config": dataclasses.asdict(self.config),
            "epoch": self.start_epoch,
            "model": self.model.state_dict(), "heads": self.heads.state_dict() if self.heads is not None else None,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "method_state": self.method_state(), "history": self.history, "baseline": self.baseline,
            "baseline_diagnostics": self.baseline_diagnostics,
            "setup_times": getattr(self, "_setup_times", {}), "timing": self.timing,
            "step_evaluations": self.step_evaluations,
            "sampler": {"epoch": getattr(self.sampler, "epoch", None), "seed": getattr(self.sampler, "seed", None)},
            "rng": rng_state(),
        }

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        """Write :meth:`state_dict` as a sealed checkpoint (:func:`~fastassoc.methods.checkpoint.write_checkpoint`)."""
        path = Path(path) if path is not None else self.checkpoint_path
        return write_checkpoint(self.state_dict(), path)

    def load_state_dict(self, state: dict) -> None:
        self.prepare()
        self.model.load_state_dict(state["model"])
        if self.heads is not None and state.get("heads") is not None:
            self.heads.load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if isinstance(getattr(self.scheduler, "milestones", None), dict):
            # MultiStepLR keeps a Counter; the checkpoint stores it as a plain dict.
            self.scheduler.milestones = collections.Counter(self.scheduler.milestones)
        self.load_method_state(to_device(state["method_state"], self.device))
        self.history = list(state["history"])
        self.baseline = state["baseline"]
        self.baseline_diagnostics = state.get("baseline_diagnostics", {})
        self._setup_times = state.get("setup_times", {})
        self.timing = dict(state.get("timing", {}))
        self.step_evaluations = list(state.get("step_evaluations", []))
        self.start_epoch = int(state["epoch"])
        if state["sampler"]["epoch"] is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(state["sampler"]["epoch"])
        set_rng_state(state["rng"])

    @classmethod
    def config_from_checkpoint(cls, state: dict, path: str | os.PathLike, *, requested: dict | TrainConfig | None = None,
                               override: bool = False, **runtime) -> TrainConfig:
        """The config a checkpoint's run continues with.

        Parameters
        ----------
        state : dict
            :func:`~fastassoc.methods.read_checkpoint`'s result.
        path : path
            The checkpoint (error messages).
        requested : dict or TrainConfig, optional
            Settings the caller asks for (some or all config fields). Each that differs from
            the saved one is an error unless ``override``; with ``override`` the requested
            values apply.
        override : bool
        **runtime
            Fields of :data:`~fastassoc.methods.config.RUNTIME_FIELDS` (device, backend,
            progress, ...), applied without a check; any other config field given here counts
            as requested.

        Raises
        ------
        CheckpointError
            The checkpoint holds another method's run, or fields this config lacks.
        SettingsMismatchError
            Requested settings differ from the saved ones and ``override`` is False.
        TypeError
            A requested key is not a config field.
        """
        if state["method"] != cls.name:
            raise CheckpointError(f"{path}: holds a {state['method']!r} run, not {cls.name!r} "
                                  f"(resume it with the {state['method']!r} trainer)")
        known = {f.name for f in dataclasses.fields(cls.Config)}
        saved = dict(state["config"])
        foreign = sorted(set(saved) - known)
        if foreign:
            raise CheckpointError(f"{path}: its config has field(s) {foreign} that {cls.Config.__name__} lacks "
                                  f"(written by another version of the {cls.name!r} trainer)")
        if isinstance(requested, TrainConfig):
            requested = dataclasses.asdict(requested)
        requested = dict(requested or {})
        applied = {key: value for key, value in runtime.items() if key in RUNTIME_FIELDS}
        requested.update({key: value for key, value in runtime.items() if key not in RUNTIME_FIELDS})
        unknown = sorted(set(requested) - known)
        if unknown:
            raise TypeError(f"{cls.__name__} config has no field(s) {unknown}")
        if requested.get("method", cls.name) != cls.name:
            raise CheckpointError(f"{path}: holds a {cls.name!r} run; method {requested['method']!r} was requested")
        requested = {key: value for key, value in requested.items() if key not in RUNTIME_FIELDS}
        differences = config_differences(saved, requested)
        if differences and not override:
            raise SettingsMismatchError(path, differences)
        values = saved
        for key, _, value in differences:
            values[key] = value
        values.update(applied)
        return cls.Config(**values)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                        dataset: fdata.TrackletDataset | None = None, log=None, requested: dict | None = None,
                        override: bool = False, **runtime) -> "Trainer":
        """Rebuild a trainer from a checkpoint (:func:`~fastassoc.methods.read_checkpoint`).

        ``requested`` / ``override`` / ``runtime`` as in :meth:`config_from_checkpoint`:
        runtime fields (``device``, ``progress``...) apply freely; other settings that differ
        from the saved run (``epochs`` to extend it, ``lr``...) need ``override=True``.
        """
        state = read_checkpoint(path)
        config = cls.config_from_checkpoint(state, path, requested=requested, override=override, **runtime)
        trainer = cls(config, out_dir if out_dir is not None else Path(path).parent, dataset=dataset, log=log)
        trainer.load_state_dict(state)
        return trainer

    @classmethod
    def resume(cls, out_dir: str | os.PathLike, *, requested: dict | None = None, override: bool = False,
               **runtime) -> "Trainer":
        """The trainer of ``out_dir/checkpoint.pt``, ready for :meth:`fit` to continue the run.

        Parameters
        ----------
        out_dir : path
        requested : dict, optional
            Config fields the caller asks for; any that differ from the saved run raise
            :class:`SettingsMismatchError` listing each (saved vs requested) unless
            ``override=True``, which applies them.
        override : bool
        **runtime
            ``dataset``, ``log``, and runtime config fields (``device``, ``backend``,
            ``progress``, ``num_workers``, ``eval_batch_size``, ``plots``, ``checkpoint``).
        """
        return cls.from_checkpoint(Path(out_dir) / "checkpoint.pt", out_dir, requested=requested, override=override,
                                   **runtime)


class SettingsMismatchError(ValueError):
    """Resuming with settings that differ from the saved run's; ``differences`` lists
    ``(field, saved, requested)``."""

    def __init__(self, path, differences: list[tuple[str, Any, Any]]):
        self.path = path
        self.differences = differences
        listed = "; ".join(f"{key}: saved {saved!r}, requested {value!r}" for key, saved, value in differences)
        super().__init__(f"{path} was saved with other settings ({listed}); pass override=True (--override) to "
                         f"continue with the requested ones")
