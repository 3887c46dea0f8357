"""Tracklet data: the synthetic tracklet world, the standard dataset layouts, loading for training.

Datasets
    ``load_dataset(name, root, **options)`` reads MARS, PRID2011, iLIDS-VID,
    DukeMTMC-VideoReID, Market-1501, DukeMTMC-reID or MSMT17 from disk in its official
    layout (:mod:`fastassoc.data.layouts`); ``SyntheticTracklets(...)`` builds a deterministic
    in-memory world with ground truth (:mod:`fastassoc.data.synthetic`). Both return a
    :class:`TrackletDataset`: ``train``, ``query``, ``gallery`` tuples of :class:`Tracklet`
    (``frames``, ``camera``, ``pid``, ``tracklet_id``), ``load_frame(frame) -> PIL image``,
    ``num_cameras``, ``num_train_pids``. ``pid`` is ground truth for evaluation and
    diagnostics only. ``tracklet_labels(tracklets)`` gives the (pids, cameras) tensors
    :func:`fastassoc.evaluate_ranking` takes; ``group_by_camera(tracklets)`` orders them by
    camera and returns the camera offsets the segmented ops take; ``one_tracklet_per_camera``
    is the sparse sampling of UGA / EEA (also the ``tracklets="one_per_camera"`` option of the
    loaders).

Training
    ``train_loader(tracklets, load_frame, tracklets_per_camera=..., frames_per_tracklet=4,
    transform=train_transform(h, w))`` yields camera-balanced batches
    ``(frames [B, n, 3, H, W], tracklet indices [B], cameras [B])``; its parts are
    :class:`CameraBalancedSampler`, :class:`TrackletFrames` and :func:`sample_frames`
    (:mod:`fastassoc.data.sampling`). ``frame_loader(..., batch_size=60)`` yields single-frame
    batches, the same number of images from every camera (UGA, EEA) or random frames (DAL),
    an epoch one pass over the frames (:class:`FrameSampler`); ``config_loader`` and
    ``config_train_transform`` build what a trainer config asks for. ``train_transform`` / ``eval_transform`` are the
    torchvision transforms of the literature (:mod:`fastassoc.data.transforms`).

Features
    ``extract_features(model, tracklets, load_frame, transform=eval_transform(h, w),
    pooling="mean" | "max")`` -> [T, D] float32 (:mod:`fastassoc.data.features`).

Example
-------
>>> from fastassoc import data, evaluate_ranking
>>> world = data.SyntheticTracklets(seed=0)
>>> loader = data.train_loader(world.train, world.load_frame, tracklets_per_camera=4,
...                            transform=data.train_transform(64, 32))
>>> frames, index, camera = next(iter(loader))         # [20, 4, 3, 64, 32], [20], [20]
>>> qp, qc = data.tracklet_labels(world.query)
>>> gp, gc = data.tracklet_labels(world.gallery)
>>> raw = evaluate_ranking(world.mean_frames("query"), world.mean_frames("gallery"), qp, gp, qc, gc)
"""
from .features import extract_features
from .layouts import DATASETS, load_dataset
from .sampling import (SAMPLINGS, CameraBalancedSampler, FrameSampler, TrackletFrames, config_loader, frame_loader,
                       sample_frames, train_loader)
from .synthetic import SyntheticTracklets
from .tracklets import Tracklet, TrackletDataset, group_by_camera, one_tracklet_per_camera, tracklet_labels
from .transforms import IMAGENET_MEAN, IMAGENET_STD, config_train_transform, eval_transform, train_transform

__all__ = [
    "Tracklet", "TrackletDataset", "load_dataset", "DATASETS", "SyntheticTracklets", "tracklet_labels",
    "one_tracklet_per_camera", "group_by_camera", "sample_frames", "CameraBalancedSampler", "TrackletFrames",
    "train_loader", "FrameSampler", "frame_loader", "config_loader", "SAMPLINGS",
    "train_transform", "eval_transform", "config_train_transform", "IMAGENET_MEAN", "IMAGENET_STD", "extract_features",
]
