"""UGA: Unsupervised Graph Association (Wu, Zhu and Gong, arXiv 2019).

The network is a backbone followed by an embedding block BN - dropout - FC (2048 -> 1024) - BN
(:func:`embedding_block`); its output is the test feature. One classifier branch per camera
over that camera's tracklets (pseudo labels; the paper samples one tracklet per identity
and camera, SSTT, the ``tracklets="one_per_camera"`` data option of the paper preset). The
branches are one camera-sorted weight matrix without bias (Eq. 1 is ``W^T phi``), evaluated
by :func:`fastassoc.segmented_cross_entropy` with one softmax per camera. Two stages
(Algorithm 1):

1. Intra-camera learning, ``intra_epochs`` epochs (80 of 160 in the paper; None, the default,
   takes the first half of ``epochs``): Eqs. 1-2, each frame's
   cross-entropy over its own camera's branch with its tracklet's one-hot label, averaged
   over the batch.
2. Inter-camera learning, the remaining ``epochs - intra_epochs`` epochs (80):

   - Eq. 3, tracklet centres ``c`` = mean of the tracklet's frame features; the classifier
     weights are replaced by the centres (and the optimiser's state of that weight reset),
     so the centres are then learned by back-propagation with the network (Eqs. 10-12).
   - Eqs. 4-5, the cross-view graph (CVG) over the centres: edge ``i - j`` between
     different cameras with weight ``cos(c_i, c_j)`` when ``j`` is ``i``'s nearest centre in
     ``j``'s camera and vice versa (symmetric constraint, K = 1) and the cosine exceeds
     lambda = 0.65; self loops of weight 1 (:func:`fastassoc.cross_camera_graph`, sparse).
     Refreshed from the learned centres before every epoch of the stage.
   - Eqs. 7-9, graph-weighted cross-camera loss: for a frame of tracklet ``i``,
     ``sum_{a in N(i)} e(c_i, c_a) CE_m(a)``, ``CE_m(a)`` the cross-entropy over camera
     ``m``'s centres with target ``a``, the self loop (alpha = e(c_i, c_i) = 1) giving the
     self-camera term; averaged over the batch's frames. One
     :func:`fastassoc.segmented_cross_entropy` with the graph rows as sparse targets; the
     self-camera and cross-camera parts are logged as ``loss_self`` and ``loss_cross``.

The learning-rate schedule restarts with the second stage ("Reset ep <- 0"): Adam 3.5e-4,
x0.1 at epochs 40 and 60 of each stage (``restart_schedule``).

Readings and options
--------------------
``graph_mode``
    ``"pairwise"`` (default): Eq. 4's local KNN set is per camera pair; ``"pooled"``: the
    K nearest over all other cameras at once.
``graph_k``, ``threshold``, ``self_loops``
    K = 1, lambda = 0.65, self loops on (the paper).
``centre_scale``
    Multiplier applied to the centres when they replace the classifier weights. The paper
    copies them as they are (1.0, default); the centres of a 1024-d BN output are long
    vectors, so the second stage starts with large logits.
``restart_schedule``
    True (default): the step / multi-step / exponential schedule counts epochs from the
    start of each stage; False: from the start of training.

``sampling``, ``batch_size``
    ``"camera_images"`` (the paper preset): batches of ``batch_size`` single frames, the same
    number from every camera ("randomly sampling the same number images from each camera in a
    mini batch. The batch size of our experiments is set to 60", Sec. 4.2), an epoch one pass
    over the training frames (:class:`fastassoc.data.FrameSampler`); 60 frames hold on any
    number of cameras (10 per camera on MARS, 30 on PRID2011 / iLIDS-VID, 7 or 8 on the 8
    cameras of DukeMTMC). ``"tracklets"`` (default, smoke / demo): ``tracklets_per_camera`` x
    ``frames_per_tracklet`` frames of every camera, an epoch one pass over the tracklets.
``train_flip``, ``train_pad``
    The paper resizes to 256 x 128 and states no flip, crop or erasing: 0 in the paper preset
    (with ``train_erasing=0``); the smoke / demo presets keep flip 0.5, pad-crop and erasing.

Why an epoch passes over the frames
    On MARS a tracklet epoch is ~66 batches of 60 frames (SSTT keeps ~2k tracklets); 160 such
    epochs are ~10.6k iterations, minutes on a 1080 Ti, where EEA's Table 7 reports 12.6 GPU
    hours for UGA's 160 epochs (and 6.3 for EEA's 80 with the same batches). A pass over the
    ~120k frames (~2k batches) fits those hours, so the paper preset's epochs pass over the
    frames and the paper's epoch counts (80 + 80, decays at 40 and 60) apply unchanged.

Presets
-------
``paper``: ResNet-50 + embedding block (1024-d, dropout 0.5), Adam 3.5e-4 x0.1 at epochs 40 and
60 of each 80-epoch stage, batches of 60 frames evenly over the cameras, epochs over the frames,
resize only, SSTT tracklets. Ours, where the paper is silent: weight decay 5e-4, dropout 0.5,
Adam's betas (torch's defaults). ``smoke`` / ``demo`` (small CNN
from scratch, synthetic world, SSTT tracklets): Adam 1e-3, 20 / 30 epochs split in half,
dropout 0.2, ``centre_scale = 0.1`` (the second stage then starts from a loss near the first
stage's instead of about 30 times it). Demo preset, rank-1 / mAP: 88.3 / 89.9 with
``centre_scale = 0.1``, 80.8 / 81.1 with the paper's 1.0; untrained 46.7 / 51.6.

Diagnostics each epoch of the second stage (ground truth known): ``pairs`` /
``pairs_precision`` (cross-camera CVG edges and the fraction joining one identity),
``stage`` (1 or 2) every epoch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import cross_camera_graph, segmented_cross_entropy
from .. import data as fdata
from .base import ReidModel, Trainer, TrainConfig, csr_rows, one_hot_csr

GRAPH_MODES = ("pairwise", "pooled")


def embedding_block(in_dim: int, out_dim: int, dropout: float, normalize: bool = False) -> nn.Module:
    """UGA / EEA embedding block: BN - dropout - FC - BN (- L2 normalisation for EEA)."""
    layers = [nn.BatchNorm1d(in_dim), nn.Dropout(dropout), nn.Linear(in_dim, out_dim), nn.BatchNorm1d(out_dim)]
    if normalize:
        layers.append(L2Normalize())
    return nn.Sequential(*layers)


class L2Normalize(nn.Module):
    """Rows to unit length."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, dim=1)


class ClassWeights(nn.Module):
    """One weight row per training tracklet, rows in camera-sorted order (all branches)."""

    def __init__(self, num_classes: int, dim: int, std: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim) * std)


def keep_preset_data_options(trainer_class, config: TrainConfig, preset: str, overrides: dict) -> TrainConfig:
    """Re-apply the method preset's ``data_options`` (SSTT sampling, ``tracklets="one_per_camera"``)
    that :meth:`Trainer.make_config` drops, with the synthetic world's options, for datasets on disk."""
    preset_options = trainer_class.PRESETS.get(preset, {}).get("data_options", {})
    if config.data != "synthetic" and "data_options" not in overrides:
        config.data_options = {**preset_options, **config.data_options}
    return config


class StageSchedule:
    """Learning-rate factor of a step / multi-step / exponential schedule that restarts at the
    second stage (epoch ``restart``). A callable object (not a lambda) so that ``LambdaLR``
    can checkpoint it."""

    def __init__(self, kind: str, restart: int, step_size: int, gamma: float, milestones):
        self.kind, self.restart, self.step_size, self.gamma = kind, restart, step_size, gamma
        self.milestones = tuple(int(m) for m in milestones)

    def __call__(self, epoch: int) -> float:
        local = epoch - self.restart if epoch >= self.restart > 0 else epoch
        if self.kind == "step":
            return self.gamma ** (local // max(self.step_size, 1))
        if self.kind == "multistep":
            return self.gamma ** sum(local >= m for m in self.milestones)
        if self.kind == "exponential":
            return self.gamma ** local
        return 1.0


@dataclass
class UGAConfig(TrainConfig):
    """UGA hyper-parameters (paper defaults); the rest as :class:`TrainConfig`."""

    embed_dim: int = 1024
    dropout: float = 0.5
    intra_epochs: int | None = None
    threshold: float = 0.65
    graph_k: int = 1
    graph_mode: str = "pairwise"
    self_loops: bool = True
    centre_scale: float = 1.0
    classifier_std: float = 0.001
    restart_schedule: bool = True
    sampling: str = "tracklets"
    batch_size: int | None = None
    eval_normalize: bool = True


class UGATrainer(Trainer):
    """Unsupervised Graph Association; see the module docstring."""

    name = "uga"
    Config = UGAConfig
    PRESETS = {
        # Small CNN from scratch on the synthetic world: centres scaled by 0.1 when they replace the classifier.
        "smoke": dict(optimizer="adam", lr=1e-3, embed_dim=128, dropout=0.2, epochs=20,
                      centre_scale=0.1, data_options=dict(tracklets="one_per_camera")),
        "demo": dict(optimizer="adam", lr=1e-3, embed_dim=256, dropout=0.2, epochs=30,
                     centre_scale=0.1, data_options=dict(tracklets="one_per_camera")),
        # ResNet-50 (ImageNet, --weights) + embedding block; Adam 3.5e-4 decayed x0.1 at epochs 40 and 60 of
        # each 80-epoch stage; batches of 60 frames sampled evenly over the cameras, an epoch a pass over the
        # frames; resize only; one tracklet per identity and camera (SSTT). weight_decay 5e-4 is ours.
        "paper": dict(optimizer="adam", lr=3.5e-4, weight_decay=5e-4, scheduler="multistep", milestones=(40, 60),
                      gamma=0.1, epochs=160, intra_epochs=80, embed_dim=1024, dropout=0.5, sampling="camera_images",
                      batch_size=60, train_flip=0.0, train_pad=0, train_erasing=0.0,
                      data_options=dict(tracklets="one_per_camera")),
    }

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def make_config(cls, preset: str = "smoke", **overrides) -> UGAConfig:
        return keep_preset_data_options(cls, super().make_config(preset, **overrides), preset, overrides)

    def build_model(self) -> nn.Module:
        c = self.config
        backbone = self.build_backbone()
        return ReidModel(backbone, head=embedding_block(backbone.out_dim, c.embed_dim, c.dropout),
                         out_dim=c.embed_dim)

    def build_heads(self) -> nn.Module:
        return ClassWeights(len(self.train), self.model.out_dim, self.config.classifier_std)

    def build_loader(self):
        return fdata.config_loader(self.config, self.train, self.dataset.load_frame, transform=self.train_transform(),
                                   pin_memory=self.device.type == "cuda", rank_split=self.rank_split)

    def build_scheduler(self, optimizer):
        c = self.config
        if not c.restart_schedule or c.scheduler == "none":
            return super().build_scheduler(optimizer)
        if c.scheduler not in ("step", "multistep", "exponential"):
            return super().build_scheduler(optimizer)      # raises with the list of schedulers
        schedule = StageSchedule(c.scheduler, self.intra_epochs, c.step_size, c.gamma, c.milestones)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    @property
    def intra_epochs(self) -> int:
        """Epochs of the intra-camera stage (``intra_epochs``; None: the first half, as the paper's 80 of 160)."""
        c = self.config
        return c.epochs // 2 if c.intra_epochs is None else c.intra_epochs

    def setup(self) -> None:
        c = self.config
        if c.graph_mode not in GRAPH_MODES:
            raise ValueError(f"graph_mode must be one of {GRAPH_MODES}, got {c.graph_mode!r}")
        if not 0 <= self.intra_epochs <= c.epochs:
            raise ValueError(f"intra_epochs must be in [0, epochs={c.epochs}], got {c.intra_epochs}")
        self.graph = None

    # ---- association steps -------------------------------------------------------------------

    def replace_classifier_with_centres(self) -> None:
        """Algorithm 1, stage 2 steps 1-2: Eq. 3 centres become the classifier weights."""
        with self.association("tracklet centres"):
            centres = self.train_features("mean", desc="tracklet centres")           # [T, D], tracklet order
        weight = self.heads.weight
        with torch.no_grad():
            weight.copy_(centres[self.layout.order] * self.config.centre_scale)
        # The old classifier's Adam moments do not belong to the centres.
        self.optimizer.state.pop(weight, None)

    def build_graph(self) -> torch.Tensor:
        """Eqs. 4-5 over the current centres: sparse CSR [T, T] in tracklet order."""
        c = self.config
        with self.association("cross-view graph"):
            centres = self.heads.weight.detach()[self.layout.position]
            return cross_camera_graph(centres, self.train_cameras, c.graph_k, min_similarity=c.threshold,
                                      self_loops=c.self_loops, mode=c.graph_mode, num_cameras=self.num_cameras,
                                      backend=self.backend)

    def on_epoch_start(self, epoch):
        if epoch < self.intra_epochs:
            return
        if epoch == self.intra_epochs:
            self.replace_classifier_with_centres()
        self.graph = self.build_graph()

    # ---- training ----------------------------------------------------------------------------

    def train_step(self, frames, index, cameras, epoch):
        feats = self.frame_features(frames)
        count = feats.shape[1]
        flat = feats.flatten(0, 1)
        rows = index.repeat_interleave(count)
        num = len(self.train)
        weight, offsets, position = self.heads.weight, self.layout.offsets, self.layout.position
        if epoch < self.intra_epochs:
            loss = segmented_cross_entropy(flat, weight, one_hot_csr(position[rows], num), class_offsets=offsets,
                                           backend=self.backend)                                          # Eq. 2
            return {"loss": loss}
        # Eq. 8: the whole graph row (self loop alpha = e(c_i, c_i) and cross-camera edges) weights the
        # cameras' cross-entropies in one call; the self term is evaluated first, for the log only.
        with torch.no_grad():
            loss_self = segmented_cross_entropy(flat, weight, one_hot_csr(position[rows], num, self._self_weight[rows]),
                                                class_offsets=offsets, backend=self.backend)
        targets = csr_rows(self.graph, rows, columns=position, num_columns=num)
        loss = segmented_cross_entropy(flat, weight, targets, class_offsets=offsets, backend=self.backend)
        return {"loss": loss, "loss_self": loss_self, "loss_cross": loss.detach() - loss_self}

    @property
    def graph(self) -> torch.Tensor | None:
        return self._graph

    @graph.setter
    def graph(self, graph: torch.Tensor | None) -> None:
        """Keep the graph's diagonal (self-loop weights) at hand as well."""
        self._graph = graph
        self._self_weight = split_diagonal(graph)[0] if graph is not None else None

    def on_epoch_end(self, epoch):
        diagnostics = {"stage": 1 if epoch < self.intra_epochs else 2}
        if self.graph is not None and self.has_ground_truth:
            diagnostics.update(self.graph_diagnostics(self.graph))
        return diagnostics

    # ---- checkpoints ---------------------------------------------------------------------------

    def method_state(self) -> dict:
        return {}

    def load_method_state(self, state: dict) -> None:
        self.graph = None


def split_diagonal(graph: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A square sparse CSR matrix as (diagonal [N] float32, the off-diagonal entries as CSR)."""
    import warnings

    crow, col, val = graph.crow_indices(), graph.col_indices(), graph.values()
    num = graph.shape[0]
    row = torch.repeat_interleave(torch.arange(num, device=crow.device), crow[1:] - crow[:-1],
                                  output_size=col.numel())
    on = row == col
    diagonal = torch.zeros(num, device=val.device, dtype=torch.float32).index_add_(0, row[on], val[on].float())
    keep = ~on
    counts = torch.bincount(row[keep], minlength=num)
    new_crow = torch.cat([torch.zeros(1, dtype=torch.int64, device=crow.device), counts.cumsum(0)])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        off = torch.sparse_csr_tensor(new_crow, col[keep], val[keep], size=graph.shape, check_invariants=False)
    return diagonal, off
