"""DAL: Deep Association Learning (Chen, Zhu and Gong, BMVC 2018).

Two sets of anchors live in camera-sorted memory banks of L2-normalised vectors, one row per
training tracklet: intra-camera anchors ``x`` (the tracklet's own representation) and
cross-camera anchors ``a`` (the tracklet merged with its cyclic-ranking match in another
camera). Every mini-batch of frames ``f`` (camera ``k``, source tracklet ``p``):

1. Eq. 2, rank-1 intra-camera anchor ``t`` of each frame among its camera's anchors
   (:func:`fastassoc.topk_anchors`, one segment per camera), distances
   ``D = ||l2(f) - l2(x)||``.
2. Eq. 3, intra-camera top-push loss ``[D_pp - D_pt + m]+`` when ``t != p``, else
   ``[D_pp - mean_j D_jt + m]+`` with the mean of the rank-1 distances of the batch's frames
   of camera ``k``; Eq. 6, the same with the cross-camera anchor ``a_p`` in place of ``x_p``;
   ``L = L_I + lambda L_C`` (Eq. 7, lambda = 1). Losses use the anchors before this batch's
   updates (Algorithm 1), gradients reach the network only (anchors are memory).
3. Eq. 1, EMA of the source anchors, ``x_p <- (1 - eta) x_p + eta l2(f)`` renormalised,
   eta = 0.5 (:func:`fastassoc.ema_update_`).
4. Eqs. 4-5, cyclic ranking of the batch's tracklets from their updated anchors: rank-1
   ``t`` in another camera, then ``t``'s rank-1 back in camera ``k``; when it is ``p`` again,
   ``a_p <- (l2(x_p) + l2(x_t)) / 2``, otherwise ``a_p <- x_p``. The merged anchor is
   L2-normalised (``cross_normalize``): Eq. 2's distances are between ``l2(.)`` of both sides,
   and the public code normalises the merged anchor before it is used.

At test time tracklets are max-pooled over frames and L2-normalised (the paper's protocol).
Anchors start as the mean-pooled frame features of the untrained network ("initialised as
the mean of the frame representations").

Where the paper and its public TensorFlow code differ (options)
---------------------------------------------------------------
``margin``
    0.2 in the paper (default); the public code's flag default is 0.5.
``distance``
    ``"euclidean"``: the paper's l2 distance (default); ``"sqeuclidean"``: the public code's
    squared distance of the normalised vectors (the rankings are the same either way).
``cyclic_search``
    ``"pooled"`` (default, as the public code): the forward search looks at every other
    camera's anchors at once; the back search at camera ``k``. ``"per_camera"``: Eq. 4
    read per camera pair, forward and back search for every other camera ``l`` separately;
    a tracklet consistent with several cameras merges with its nearest consistent match.
``anchor_reduce``
    How several frames of one tracklet in a batch update its anchor: ``"mean"`` (default,
    one EMA step with their mean), ``"sequential"`` (one EMA step per frame, Eq. 1 read
    literally), ``"sum"`` (the summed values, close to the public code's ``scatter_sub``).
``cross_start_epoch``
    The public code can hold the cross-camera merging back (``start_sign``); the paper
    merges from the start (default 0).
``cross_normalize``
    True (default, paper preset): the merged cross-camera anchor has unit norm. False: the
    plain mean of two unit vectors (shorter than 1), the reading of earlier versions, kept by the
    smoke / demo presets whose figures were measured with it.
``sampling``, ``batch_size``
    ``"images"`` (paper preset): "Randomly sample a mini-batch of image frames" (Algorithm 1),
    "The batch size is all set to 64": 64 frames drawn from all training frames in a random
    order (:class:`fastassoc.data.FrameSampler`, ``camera_balanced=False``), an epoch one pass
    over the frames unless ``batches_per_epoch`` is set. ``"tracklets"`` (default, smoke /
    demo): camera-balanced batches of ``tracklets_per_camera`` x ``frames_per_tracklet`` frames.
``train_flip``, ``train_pad``
    The paper states no augmentation: the paper preset resizes only (0, 0, no erasing).
``iterations``
    Total iterations; when set, ``epochs`` becomes ``ceil(iterations / batches per epoch)``
    once the loader is built (the small-data schedule counts iterations, its decay epochs).
``bar_gradient``
    Whether the mean rank-1 distance of Eq. 3 carries gradient. The public code's ``top_k``
    lets it through; then, for frames already ranked to their source, the push on the mean
    (every frame of the camera away from its rank-1, i.e. mostly its own anchor) cancels the
    pull of ``D_pp`` on average, and training from scratch degraded in our runs. Default False:
    the mean is a constant target, as the paper's text reads ("minimise the intra-tracklet
    variation w.r.t. the averaged rank-1 distance").

Presets
-------
``paper`` on MARS: SGD 0.01 for 1e5 iterations of 64 random frames, 0.001 for the last 5e4
(100 epochs of 1000 iterations, x0.1 after 50), margin 0.2, eta 0.5, lambda 1, max-pooled
tracklet features; resize only. ``paper`` on PRID2011 / iLIDS-VID (the small-data schedule,
applied by :meth:`DALTrainer.make_config` when ``data`` is one of them): RMSProp at 0.045,
x0.94 every 2 epochs (epochs over the training frames), 2e4 iterations. Backbones: ResNet-50 or
MobileNet (the paper's best MARS row is MobileNet v1, ``backbone="mobilenet_v1"``; the public
code's default too; ``mobilenet_v2`` is offered as well), ImageNet weights via ``--weights``. From the
public code (``train_dal.py``), not the paper: weight decay 4e-5, SGD with Nesterov momentum
0.9, RMSProp decay 0.9 (``rmsprop_alpha``), momentum 0.9 and epsilon 1.0, the RMSProp decay
counted in epochs of ``num_samples / batch_size`` batches (frames).
The public code also clips gradients at 2.0 and evaluates an exponential moving average of
the weights (0.9999); the paper states neither and neither is applied here.

Diagnostics each epoch (ground truth known): ``assoc_rate`` (fraction of tracklets whose
cross-camera anchor currently is a merge, the paper's Fig. 4a), ``pairs`` / ``pairs_precision``
(cyclic-consistent cross-camera matches over the whole anchor bank and the fraction with one
identity, Fig. 4b), ``source_rank1`` (fraction of frames whose rank-1 anchor is their source).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .. import data as fdata
from .. import ema_update_, topk_anchors
from ..distributed.training import all_gather_batch, gather_global_batch
from .base import Trainer, TrainConfig

DISTANCES = ("euclidean", "sqeuclidean")
CYCLIC_SEARCHES = ("pooled", "per_camera")


@dataclass
class DALConfig(TrainConfig):
    """DAL hyper-parameters (paper defaults); the rest as :class:`TrainConfig`."""

    margin: float = 0.2
    lambda_cross: float = 1.0
    eta: float = 0.5
    distance: str = "euclidean"
    cyclic_search: str = "pooled"
    anchor_reduce: str = "mean"
    cross_start_epoch: int = 0
    bar_gradient: bool = False
    cross_normalize: bool = True
    sampling: str = "tracklets"
    batch_size: int | None = None
    iterations: int | None = None
    eval_pooling: str = "max"


class DALTrainer(Trainer):
    """Deep Association Learning; see the module docstring."""

    name = "dal"
    Config = DALConfig
    PRESETS = {
        "smoke": dict(optimizer="adam", lr=3e-4, weight_decay=5e-4, epochs=3, cross_normalize=False),
        "demo": dict(optimizer="adam", lr=3e-4, weight_decay=5e-4, epochs=15, cross_normalize=False),
        # MARS: SGD at 0.01 for 1e5 iterations of 64 random frames, 0.001 for the last 5e4 (epochs of 1000
        # iterations); MobileNet / ResNet-50 pretrained on ImageNet (--weights); resize only. weight_decay 4e-5
        # and Nesterov momentum 0.9 are the public code's.
        "paper": dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=4e-5, scheduler="multistep",
                      milestones=(50,), gamma=0.1, epochs=100, batches_per_epoch=1000, sampling="images",
                      batch_size=64, cross_normalize=True, train_flip=0.0, train_pad=0, train_erasing=0.0,
                      eval_pooling="max"),
    }
    # PRID2011 / iLIDS-VID: "RMSProp ... 2x10^4 iterations, with an initial learning rate of 0.045 and decayed
    # exponentially by 0.94 every 2 epochs" (epochs over the frames). alpha 0.9, momentum 0.9 and epsilon 1.0: public code.
    SMALL_DATA = ("prid2011", "ilidsvid")
    PAPER_SMALL_DATA = dict(optimizer="rmsprop", lr=0.045, rmsprop_alpha=0.9, momentum=0.9, scheduler="step", step_size=2, gamma=0.94,
                            milestones=(), batches_per_epoch=None, iterations=20000)

    @classmethod
    def make_config(cls, preset: str = "smoke", **overrides) -> DALConfig:
        """As :meth:`Trainer.make_config`; the paper preset on PRID2011 / iLIDS-VID takes the
        small-data schedule (:attr:`PAPER_SMALL_DATA`) under the caller's overrides."""
        config = super().make_config(preset, **overrides)
        if preset == "paper" and config.data in cls.SMALL_DATA:
            for key, value in cls.PAPER_SMALL_DATA.items():
                if key not in overrides:
                    setattr(config, key, value)
        return config

    def build_loader(self):
        c = self.config
        loader = fdata.config_loader(c, self.train, self.dataset.load_frame, transform=self.train_transform(),
                                     pin_memory=self.device.type == "cuda", rank_split=self.rank_split)
        if c.iterations is not None:
            if c.iterations < 1:
                raise ValueError(f"iterations must be >= 1 or None, got {c.iterations}")
            c.epochs = -(-c.iterations // max(len(loader), 1))
        return loader

    def setup(self) -> None:
        c = self.config
        if c.distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {c.distance!r}")
        if c.cyclic_search not in CYCLIC_SEARCHES:
            raise ValueError(f"cyclic_search must be one of {CYCLIC_SEARCHES}, got {c.cyclic_search!r}")
        with self.association("init anchors"):
            feats = self.train_features("mean", normalize=True, desc="init anchors")
        rows = feats[self.layout.order].contiguous()
        self.intra = rows                               # x, camera-sorted rows, unit norm
        self.cross = rows.clone()                       # a
        self.partner = torch.full((len(rows),), -1, dtype=torch.int64, device=self.device)  # row merged into a
        self._source_hits = 0
        self._frames_seen = 0

    # ---- ops -------------------------------------------------------------------------------------

    def _distance(self, f: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        squared = (f - anchors).pow(2).sum(1)
        if self.config.distance == "sqeuclidean":
            return squared
        return (squared + 1e-12).sqrt()

    def cyclic_ranking(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eq. 4 for anchor rows ``rows`` [R] of the intra-camera bank.

        Returns
        -------
        match : Tensor [R], int64, the row of the rank-1 anchor in another camera
        consistent : Tensor [R], bool, whether ranking ``match`` back in the query's camera gives the query
        distance : Tensor [R], float32, distance to ``match``
        """
        layout, bank = self.layout, self.intra
        num_cameras = layout.num_cameras
        own = layout.sorted_cameras[rows]
        queries = bank[rows]
        count = len(rows)
        # One query per (row, camera l): the forward ranking in every camera with one topk_anchors call.
        segments = torch.arange(num_cameras, device=self.device).repeat(count)
        dist, match = topk_anchors(queries.repeat_interleave(num_cameras, 0), bank, 1, metric="euclidean",
                                   anchor_offsets=layout.offsets, query_segments=segments, backend=self.backend)
        dist, match = dist.view(count, num_cameras), match.view(count, num_cameras)
        dist = dist.masked_fill(segments.view(count, num_cameras) == own[:, None], float("inf"))
        if self.config.cyclic_search == "pooled":
            # Nearest over all other cameras; ties go to the smaller row, i.e. the smaller camera.
            best = dist.argmin(1)
            forward_dist = dist.gather(1, best[:, None]).squeeze(1)
            forward = match.gather(1, best[:, None]).squeeze(1)
            valid = torch.isfinite(forward_dist) & (forward >= 0)
            back_query = torch.where(valid, forward, rows)
            _, back = topk_anchors(bank[back_query], bank, 1, metric="euclidean", anchor_offsets=layout.offsets,
                                   query_segments=own, backend=self.backend)
            consistent = valid & (back[:, 0] == rows)
            return forward, consistent, forward_dist
        # per_camera: back-rank every camera's match in the query's camera, keep the nearest consistent one.
        valid = torch.isfinite(dist) & (match >= 0)
        back_query = torch.where(valid, match, rows[:, None]).reshape(-1)
        _, back = topk_anchors(bank[back_query], bank, 1, metric="euclidean", anchor_offsets=layout.offsets,
                               query_segments=own.repeat_interleave(num_cameras), backend=self.backend)
        ok = valid & (back.view(count, num_cameras) == rows[:, None])
        best = dist.masked_fill(~ok, float("inf")).argmin(1)
        forward = match.gather(1, best[:, None]).squeeze(1)
        return forward, ok.any(1), dist.gather(1, best[:, None]).squeeze(1)

    # ---- training --------------------------------------------------------------------------------

    def train_step(self, frames, index, cameras, epoch):
        c = self.config
        count = frames.shape[1]
        feats = F.normalize(self.frame_features(frames).flatten(0, 1), dim=1)     # [M, D]
        rows = self.layout.position[index].repeat_interleave(count)                 # source anchor rows
        frame_cameras = cameras.repeat_interleave(count)

        # Eq. 2: rank-1 intra-camera anchor of each frame.
        _, rank1 = topk_anchors(feats.detach(), self.intra, 1, metric="euclidean", anchor_offsets=self.layout.offsets,
                                query_segments=frame_cameras, backend=self.backend)
        rank1 = rank1[:, 0]
        d_source = self._distance(feats, self.intra[rows])
        d_cross = self._distance(feats, self.cross[rows])
        d_rank1 = self._distance(feats, self.intra[rank1])
        # Mean rank-1 distance over the batch's frames of each camera.
        num_cameras = self.layout.num_cameras
        bar_input = d_rank1 if c.bar_gradient else d_rank1.detach()
        sums = torch.zeros(num_cameras, device=self.device, dtype=feats.dtype).index_add(0, frame_cameras, bar_input)
        counts = torch.bincount(frame_cameras, minlength=num_cameras)
        if self.rank_split is not None:
            # The global batch's per-camera means; the other ranks' sums carry no gradient (with
            # bar_gradient their share of it is lost: the one difference to the one-process step).
            every_sums, every_counts = all_gather_batch(sums.detach()[None], counts[None])
            sums = sums + (every_sums.sum(0) - sums.detach())
            counts = every_counts.sum(0)
        d_bar = (sums / counts.clamp_min(1).to(feats.dtype))[frame_cameras]
        hit = rank1 == rows
        negative = torch.where(hit, d_bar, d_rank1)
        loss_intra = F.relu(d_source - negative + c.margin).mean()                  # Eq. 3
        loss_cross = F.relu(d_cross - negative + c.margin).mean()                   # Eq. 6
        loss = loss_intra + c.lambda_cross * loss_cross                             # Eq. 7

        with torch.no_grad():
            if self.rank_split is not None:
                # Replicated banks take the global batch, in its one-process order, on every rank.
                rows, hit, update = gather_global_batch(rows, hit.long(), feats.detach(), rows_per_item=count)
            else:
                update = feats.detach()
            # Eq. 1: EMA of the source anchors (momentum 1 - eta keeps the old anchor's share).
            ema_update_(self.intra, rows, update, 1.0 - c.eta, normalize=True, reduce=c.anchor_reduce,
                        backend=self.backend)
            # Eqs. 4-5: cross-camera anchors of the batch's tracklets from the updated intra anchors.
            unique_rows = torch.unique(rows)
            if epoch >= c.cross_start_epoch and num_cameras > 1:
                match, consistent, _ = self.cyclic_ranking(unique_rows)
            else:
                match = torch.full_like(unique_rows, -1)
                consistent = torch.zeros_like(unique_rows, dtype=torch.bool)
            own = self.intra[unique_rows]
            merged = (own + self.intra[match.clamp_min(0)]) / 2
            if c.cross_normalize:
                merged = F.normalize(merged, dim=1)
            self.cross[unique_rows] = torch.where(consistent[:, None], merged, own)
            self.partner[unique_rows] = torch.where(consistent, match, torch.full_like(match, -1))
            self._source_hits += int(hit.sum())
            self._frames_seen += int(hit.numel())
        return {"loss": loss, "loss_intra": loss_intra.detach(), "loss_cross": loss_cross.detach()}

    def bank_diagnostics(self) -> dict:
        """Cyclic-consistent cross-camera matches over the whole intra-anchor bank and their precision."""
        if not self.has_ground_truth or self.layout.num_cameras < 2:
            return {}
        with self.association("cyclic ranking"):
            rows = torch.arange(len(self.intra), device=self.device)
            match, consistent, _ = self.cyclic_ranking(rows)
        order = self.layout.order
        return self.pair_diagnostics(order[rows[consistent]], order[match[consistent]])

    def initial_diagnostics(self):
        return self.bank_diagnostics()

    def on_epoch_end(self, epoch):
        diagnostics = {"source_rank1": self._source_hits / max(self._frames_seen, 1),
                       "assoc_rate": float((self.partner >= 0).double().mean())}
        self._source_hits = self._frames_seen = 0
        diagnostics.update(self.bank_diagnostics())
        if self.has_ground_truth and self.layout.num_cameras > 1:
            order = self.layout.order
            merged = self.partner >= 0
            diagnostics.update(self.pair_diagnostics(order[merged.nonzero().squeeze(1)], order[self.partner[merged]],
                                                     prefix="merged"))
            diagnostics.pop("merged", None)
        return diagnostics

    def method_state(self) -> dict:
        return {"intra": self.intra, "cross": self.cross, "partner": self.partner,
                "counters": (self._source_hits, self._frames_seen)}

    def load_method_state(self, state: dict) -> None:
        self.intra = state["intra"].contiguous()
        self.cross = state["cross"].contiguous()
        self.partner = state["partner"]
        self._source_hits, self._frames_seen = state["counters"]
