"""UTAL: Unsupervised Tracklet Association Learning (Li, Zhu and Gong, TPAMI 2019).

The network is a backbone followed by a shared fully-connected layer (2048-d in the paper,
``embed_dim``), whose output is the camera-shared representation used at test time
(Euclidean distance). Every camera ``t`` has its own classification branch over the ``M_t``
tracklets of that camera; the branches are stored as one camera-sorted weight matrix so
that all of them are evaluated by one :func:`fastassoc.segmented_cross_entropy` call with one
softmax per camera (``class_offsets`` = the cameras' row ranges).

Per mini-batch (frames ``x`` of tracklets ``i`` in cameras ``t``):

1. Eq. 3, tracklet memory ``s_i <- (s_i + alpha * mean_k x_k) / (1 + alpha)`` from the batch's
   frame features (no gradient), alpha = 1: :func:`fastassoc.ema_update_` with momentum
   ``1 / (1 + alpha)``, ``reduce="mean"``, no normalisation. The memory starts as the
   mean-pooled features of the untrained network.
2. Eqs. 7-8, PCTD: soft-target cross-entropy of every frame over its camera's branch,
   averaged over the batch's frames (:func:`fastassoc.segmented_cross_entropy`).
3. Eqs. 9-10, CCTA, in the second half of training only (``ccta_start_epoch``, default
   ``epochs // 2``): ``L_ccta = sum_{s in R(s_i)} ||s_i - s||_2`` where ``R(s_i)`` holds the
   reciprocal cross-camera nearest neighbours of tracklet ``i`` in the memory; ``s_i`` is
   the batch's representation of tracklet ``i`` (mean of its frames' features, carrying
   the gradient) and ``s`` the partner's memory row (a constant). The loss is averaged over
   the batch's tracklets, tracklets without a partner contributing 0 ("applies only to
   those tracklets with cross-camera matches").
4. Eq. 11, ``L = L_pctd + lambda L_ccta`` with lambda = 10.

Once per epoch (before it, from the memory), the association steps:

- Eqs. 4-6, per-camera soft labels: every tracklet's ``K = 4`` nearest other tracklets of its
  camera, weights ``exp(-d^2 / sigma_t^2)`` with the camera's mean squared neighbour
  distance as ``sigma_t^2``, L1-normalised rows (:func:`fastassoc.knn_soft_labels`, a sparse
  block-diagonal [T, T] matrix, never dense).
- Eq. 9, reciprocal cross-camera nearest neighbours of the memory rows (squared Euclidean):
  :func:`fastassoc.topk_anchors` against each camera's rows (``"pooled"``) or
  :func:`fastassoc.mutual_knn` per camera pair (``"per_camera"``).

Readings and options
--------------------
``ccta_search``
    ``"pooled"`` (default): ``N^1(s)`` is the single nearest neighbour of ``s`` among the
    tracklets of all other cameras and a pair is kept when each is the other's (the paper's
    "reciprocal 2-way 1-NN", at most one partner per tracklet). ``"per_camera"``: Eq. 9 read
    per camera pair, the mutual nearest neighbour in every other camera (up to ``C - 1``
    partners per tracklet).
``soft_labels``
    True (default, Eqs. 4-7); False gives the one-hot labels of Eq. 1 (Table 5's ablation).
``classifier_bias``
    The branches are "one FC classification layer" each; True (default) gives them a bias
    (implemented exactly by a constant 1 appended to the features), False uses ``W^T x``
    as Eq. 1 writes it.
``embed_norm``
    The paper's shared layer is a bare FC layer (False, default); True adds a BatchNorm
    after it, which helps networks trained from scratch.
``ccta_distance``
    ``"l2"`` (default): Eq. 10 as typeset, the plain Euclidean norm ``||s_i - s||_2`` (Eq. 10
    carries one subscript 2, where Eq. 4's squared distance is typeset ``||.||_2^2``);
    ``"squared"``: its square, the reading of earlier versions (with lambda = 10 about 100
    times the PCTD loss on long features).
``ccta_normalize``
    False (default): Eq. 10's distance of the features as they are; True: of the
    L2-normalised features (the squared distance is then bounded by 4, so that lambda = 10
    does not let CCTA swamp PCTD when the features are long).
``train_flip``, ``train_pad``
    Flip probability and pad-crop padding of the training transform; the paper states none
    (0 and 0 in the paper preset, with ``train_erasing=0``).
``batch_size``
    Frames per batch; when set, ``tracklets_per_camera`` becomes ``batch_size / (cameras x
    frames_per_tracklet)`` rounded to the nearest whole number (at least 1) once the cameras
    are known, since every camera gives the same number of tracklets. The paper preset sets
    the paper's 128 on PRID2011 / iLIDS-VID and 384 elsewhere ("we set the batch size to 128
    for PRID2011, iLIDS-VID and CUHK03, and 384 for MSMT17, Market-1501, MARS,
    DukeMTMC-ReID"): 16 tracklets per camera on 2 and 6 cameras, 12 on DukeMTMC's 8; on
    MSMT17's 15 cameras 384 is not a multiple of 60 and the batch holds 360 frames.
``ccta_start_epoch``
    None: the second half of training (the paper); an integer starts CCTA at that epoch.

Presets
-------
``paper``: ResNet-50 + 2048-d FC, Adam 3.5e-4, 200 epochs, batches of 384 frames (128 on
PRID2011 / iLIDS-VID; ``batch_size``) as the same number of tracklets of 4 frames from every
camera (16 on MARS), alpha = 1, K = 4, lambda = 10, Eq. 10's plain L2 distance of the raw
features; frames resized to 256 x 128 with no flip, crop or erasing (the paper states none).
Ours, where the paper is silent: weight decay 5e-4, Adam's betas (torch's defaults).
``smoke`` / ``demo`` train the small CNN from scratch on the synthetic world and change four
things, measured to matter there: a BatchNorm after the shared layer (``embed_norm``), CCTA as the
squared distance (``ccta_distance="squared"``) of L2-normalised features (``ccta_normalize``) and
lambda = 1 (with raw squared distances and lambda = 10 the CCTA term is about 100 times PCTD and
the pair precision collapses); flip, pad-crop and random erasing; Adam 1e-3, 20 / 30 epochs. Demo preset, rank-1 / mAP: 91.7 / 93.2 with these choices, 75.0 / 79.4 with the paper's
CCTA (raw distances, lambda = 10); untrained 46.7 / 50.9.

Diagnostics each epoch (ground truth known): ``pairs`` / ``pairs_precision`` (reciprocal
cross-camera pairs found in the memory and the fraction with one identity, the paper's
Fig. 6), ``soft_same_id_similarity`` (mean pairwise cosine of same-identity soft labels of
one camera, Fig. 4's MPS), ``soft_label_precision``, ``ccta_active``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .. import data as fdata
from .. import ema_update_, knn_soft_labels, mutual_knn, segmented_cross_entropy, topk_anchors
from ..distributed.training import gather_global_batch
from .base import ReidModel, Trainer, TrainConfig, csr_rows, one_hot_csr

CCTA_SEARCHES = ("pooled", "per_camera")
CCTA_DISTANCES = ("l2", "squared")


@dataclass
class UTALConfig(TrainConfig):
    """UTAL hyper-parameters (paper defaults); the rest as :class:`TrainConfig`."""

    embed_dim: int = 2048
    embed_norm: bool = False
    alpha: float = 1.0
    k: int = 4
    lambda_ccta: float = 10.0
    ccta_start_epoch: int | None = None
    ccta_search: str = "pooled"
    ccta_distance: str = "l2"
    ccta_normalize: bool = False
    soft_labels: bool = True
    classifier_bias: bool = True
    classifier_std: float = 0.001
    batch_size: int | None = None
    eval_metric: str = "euclidean"
    eval_normalize: bool = False


class PerCameraClassifier(nn.Module):
    """All cameras' classification branches as one camera-sorted weight matrix.

    Parameters
    ----------
    num_classes : int
        Training tracklets (one class each), rows in camera-sorted order.
    dim : int
        Feature dimension.
    bias : bool
        Append a bias column: logits ``W x + b`` equal ``[W b] [x 1]``.
    std : float
        Standard deviation of the normal initialisation.
    """

    def __init__(self, num_classes: int, dim: int, bias: bool = True, std: float = 0.001):
        super().__init__()
        self.bias = bias
        self.weight = nn.Parameter(torch.randn(num_classes, dim + int(bias)) * std)

    def inputs(self, features: torch.Tensor) -> torch.Tensor:
        """The features the weight multiplies: [B, D] -> [B, D (+1)]."""
        if not self.bias:
            return features
        return torch.cat([features, features.new_ones(features.shape[0], 1)], dim=1)


class UTALTrainer(Trainer):
    """Unsupervised Tracklet Association Learning; see the module docstring."""

    name = "utal"
    Config = UTALConfig
    PRESETS = {
        # Small CNN from scratch on the synthetic world: a BN after the shared layer, CCTA on normalised
        # features with lambda = 1 (the paper's lambda = 10 on raw squared distances swamps PCTD here).
        "smoke": dict(optimizer="adam", lr=1e-3, embed_dim=128, embed_norm=True, ccta_distance="squared",
                      ccta_normalize=True, lambda_ccta=1.0, epochs=20),
        "demo": dict(optimizer="adam", lr=1e-3, embed_dim=256, embed_norm=True, ccta_distance="squared",
                     ccta_normalize=True, lambda_ccta=1.0, epochs=30),
        # ResNet-50 (ImageNet, --weights) + 2048-d FC; Adam 3.5e-4, 200 epochs, 4 frames per tracklet,
        # batches of 384 frames: 16 tracklets per camera on MARS's 6 cameras.
        # Resize only ("resized to 256x128"); weight_decay 5e-4 is ours (the paper gives none).
        "paper": dict(optimizer="adam", lr=3.5e-4, weight_decay=5e-4, epochs=200, embed_dim=2048,
                      tracklets_per_camera=16, frames_per_tracklet=4, batch_size=384, ccta_distance="l2", train_flip=0.0,
                      train_pad=0, train_erasing=0.0, eval_metric="euclidean", eval_normalize=False),
    }
    # "we set the batch size to 128 for PRID2011, iLIDS-VID and CUHK03, and 384 for [the others]".
    PAPER_BATCH_SIZES = {"prid2011": 128, "ilidsvid": 128}

    @classmethod
    def make_config(cls, preset: str = "smoke", **overrides) -> UTALConfig:
        config = super().make_config(preset, **overrides)
        if preset == "paper" and "batch_size" not in overrides:
            config.batch_size = cls.PAPER_BATCH_SIZES.get(config.data, 384)
        return config

    # ---- construction ------------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        c = self.config
        backbone = self.build_backbone()
        layers = [nn.Linear(backbone.out_dim, c.embed_dim)]
        if c.embed_norm:
            layers.append(nn.BatchNorm1d(c.embed_dim))
        return ReidModel(backbone, head=nn.Sequential(*layers), out_dim=c.embed_dim)

    def build_heads(self) -> nn.Module:
        c = self.config
        return PerCameraClassifier(len(self.train), self.model.out_dim, c.classifier_bias, c.classifier_std)

    def build_loader(self):
        c = self.config
        if c.batch_size is not None:
            if c.batch_size < 1:
                raise ValueError(f"batch_size must be >= 1 or None, got {c.batch_size}")
            cameras = int(torch.unique(self.train_cameras).numel())
            c.tracklets_per_camera = max(1, round(c.batch_size / (cameras * c.frames_per_tracklet)))
        return super().build_loader()

    @property
    def ccta_start(self) -> int:
        c = self.config
        return c.epochs // 2 if c.ccta_start_epoch is None else c.ccta_start_epoch

    def setup(self) -> None:
        c = self.config
        if c.ccta_search not in CCTA_SEARCHES:
            raise ValueError(f"ccta_search must be one of {CCTA_SEARCHES}, got {c.ccta_search!r}")
        if c.ccta_distance not in CCTA_DISTANCES:
            raise ValueError(f"ccta_distance must be one of {CCTA_DISTANCES}, got {c.ccta_distance!r}")
        with self.association("init memory"):
            self.memory = self.train_features("mean", desc="init memory").contiguous()   # [T, D], tracklet order
        self.associate()

    # ---- association steps -------------------------------------------------------------------

    def associate(self) -> None:
        """Soft labels (Eqs. 4-6) and reciprocal cross-camera pairs (Eq. 9) from the memory."""
        c = self.config
        with self.association("soft labels"):
            if c.soft_labels:
                self.soft = knn_soft_labels(self.memory, self.train_cameras, c.k, num_cameras=self.num_cameras,
                                            backend=self.backend)
            else:
                self.soft = one_hot_csr(torch.arange(len(self.train), device=self.device), len(self.train))
        with self.association("cross-camera pairs"):
            self.partners = self.reciprocal_neighbours(self.memory)

    def reciprocal_neighbours(self, memory: torch.Tensor) -> torch.Tensor:
        """Eq. 9 over memory rows [T, D] (tracklet order).

        Returns
        -------
        Tensor [T, C], int64
            ``partners[i, m]``: the tracklet of camera ``m`` paired with ``i`` (-1: none).
            ``"pooled"`` keeps at most one partner per row.
        """
        c = self.config
        layout, cameras = self.layout, self.train_cameras
        num, num_cameras = memory.shape[0], self.num_cameras
        partners = torch.full((num, num_cameras), -1, dtype=torch.int64, device=memory.device)
        offsets = layout.offsets.tolist()
        members = [layout.order[offsets[m]:offsets[m + 1]] for m in range(num_cameras)]
        if c.ccta_search == "per_camera":
            for t in range(num_cameras):
                for m in range(t + 1, num_cameras):
                    if len(members[t]) == 0 or len(members[m]) == 0:
                        continue
                    ia, ib, _ = mutual_knn(memory[members[t]], memory[members[m]], 1, metric="sqeuclidean",
                                           backend=self.backend)
                    a, b = members[t][ia], members[m][ib]
                    partners[a, m] = b
                    partners[b, t] = a
            return partners
        # pooled: nearest tracklet of every camera, then the nearest over the other cameras.
        dist = torch.full((num, num_cameras), float("inf"), device=memory.device)
        nearest = torch.full((num, num_cameras), -1, dtype=torch.int64, device=memory.device)
        for m in range(num_cameras):
            if len(members[m]) == 0:
                continue
            d, j = topk_anchors(memory, memory[members[m]], 1, metric="sqeuclidean", backend=self.backend)
            dist[:, m], nearest[:, m] = d[:, 0], members[m][j[:, 0]]
        dist[torch.arange(num, device=memory.device), cameras] = float("inf")
        closest = dist.min(1).values
        # Ties between cameras go to the smaller tracklet index, as within a camera.
        tied = (dist == closest[:, None]) & (nearest >= 0)
        forward = torch.where(tied, nearest, torch.full_like(nearest, num)).min(1).values
        valid = torch.isfinite(closest) & (forward < num)
        forward = torch.where(valid, forward, torch.full_like(forward, -1))
        back = forward.clamp_min(0)
        mutual = valid & (forward[back] == torch.arange(num, device=memory.device))
        rows = mutual.nonzero().squeeze(1)
        partners[rows, cameras[forward[rows]]] = forward[rows]
        return partners

    # ---- training ----------------------------------------------------------------------------

    def train_step(self, frames, index, cameras, epoch):
        c = self.config
        feats = self.frame_features(frames)                                   # [B, n, D]
        count = feats.shape[1]
        flat = feats.flatten(0, 1)
        rows = index.repeat_interleave(count)
        num = len(self.train)
        targets = csr_rows(self.soft, rows, columns=self.layout.position, num_columns=num)
        loss_pctd = segmented_cross_entropy(self.heads.inputs(flat), self.heads.weight, targets,
                                            class_offsets=self.layout.offsets, backend=self.backend)   # Eq. 8
        losses = {"loss_pctd": loss_pctd.detach()}
        loss = loss_pctd
        if epoch >= self.ccta_start:
            partners = self.partners[index]                                   # [B, C]
            has = partners >= 0
            mine, theirs = feats.mean(1), self.memory[partners.clamp_min(0)]
            if c.ccta_normalize:
                mine, theirs = F.normalize(mine, dim=1), F.normalize(theirs, dim=2)
            squared = (mine[:, None, :] - theirs).pow(2).sum(2)
            # sqrt has an infinite gradient at 0: a partner equal to the batch mean contributes none.
            distance = squared if c.ccta_distance == "squared" else squared.clamp_min(1e-12).sqrt()
            loss_ccta = (distance * has).sum() / len(index)                   # Eq. 10
            loss = loss + c.lambda_ccta * loss_ccta                           # Eq. 11
            losses["loss_ccta"] = loss_ccta.detach()
        with torch.no_grad():
            # Replicated memory: every rank applies the global batch, in its one-process order.
            rows, update = gather_global_batch(rows, flat.detach().float(), rows_per_item=count)
            ema_update_(self.memory, rows, update, 1.0 / (1.0 + c.alpha), normalize=False,
                        reduce="mean", backend=self.backend)                  # Eq. 3
        losses["loss"] = loss
        return losses

    def on_epoch_end(self, epoch):
        self.associate()        # the next epoch's soft labels and pairs
        diagnostics = {"ccta_active": int(epoch >= self.ccta_start)}
        if self.has_ground_truth:
            diagnostics.update(self.partner_diagnostics())
            if self.config.soft_labels:
                diagnostics.update(self.soft_label_diagnostics(self.soft))
        return diagnostics

    def partner_diagnostics(self) -> dict:
        rows, cols = (self.partners >= 0).nonzero(as_tuple=True)
        partner = self.partners[rows, cols]
        once = rows < partner
        return self.pair_diagnostics(rows[once], partner[once])

    # ---- checkpoints ---------------------------------------------------------------------------

    def method_state(self) -> dict:
        return {"memory": self.memory}

    def load_method_state(self, state: dict) -> None:
        self.memory = state["memory"].contiguous()
        self.associate()
