"""Tracklet records and the dataset object every loader returns.

A :class:`Tracklet` is an immutable record: its frames (file paths for datasets on disk,
string keys for the in-memory synthetic world), its camera (0-based), its ground-truth
identity ``pid`` and a ``tracklet_id`` string unique within its split. A
:class:`TrackletDataset` holds the ``train``, ``query`` and ``gallery`` splits as tuples
of tracklets and knows how to turn a frame into a PIL image (:meth:`load_frame`).

``pid`` is ground truth: for evaluation and diagnostics only, never a trainer's learning
signal. Conventions shared by every loader: ``pid == -1`` marks junk (removed from the
ranking by :func:`fastassoc.evaluate_ranking`), ``pid == 0`` in Market-1501 / MARS test
splits marks distractors (a normal identity no query has).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

SPLITS = ("train", "query", "gallery")
TRACKLET_MODES = ("all", "one_per_camera")


@dataclass(frozen=True)
class Tracklet:
    """One tracklet: a time-ordered run of frames of one person in one camera.

    Attributes
    ----------
    frames : tuple of str
        Frame paths (datasets on disk) or in-memory keys (synthetic world), in time order.
    camera : int
        Camera index, 0-based.
    pid : int
        Ground-truth identity (-1 junk, 0 distractor where the dataset has them). For
        evaluation and diagnostics only.
    tracklet_id : str
        Identifier unique within the tracklet's split, named after the dataset's own
        naming (e.g. ``"0001C1T0003"`` for MARS, ``"0002_c1"`` for a Market-1501 training
        tracklet, the image name for a Market-1501 query).
    """

    frames: tuple[str, ...]
    camera: int
    pid: int
    tracklet_id: str

    def __len__(self) -> int:
        return len(self.frames)


def _open_image(path: str):
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError) as error:
        # PIL names neither the file of a truncated JPEG ("image file is truncated") nor of an unknown format.
        raise OSError(f"cannot decode image {path}: {error}") from error


class TrackletDataset:
    """Train / query / gallery tracklets of one dataset and the way to read their frames.

    Parameters
    ----------
    name : str
        Dataset name (``"mars"``, ``"market1501"``, ``"synthetic"``, ...).
    train, query, gallery : sequence of Tracklet
        The splits, stored as tuples. Train and test identities are disjoint; query and
        gallery follow the dataset's official protocol.
    frame_loader : callable str -> PIL.Image.Image, optional
        Reads one frame; by default the frame is a path, opened with PIL and converted to RGB
        (a file PIL cannot decode raises :class:`OSError` naming it).
    protocol : str, optional
        The evaluation protocol the query / gallery follow when a dataset has several (e.g.
        ``"mars-official"`` or ``"mars-torchreid"``; ``"split 3"`` style names for random
        splits); reports copy it.
    """

    def __init__(self, name: str, train: Sequence[Tracklet], query: Sequence[Tracklet],
                 gallery: Sequence[Tracklet], frame_loader: Callable[[str], object] | None = None,
                 protocol: str | None = None):
        self.name = name
        self.protocol = protocol
        self.train = tuple(train)
        self.query = tuple(query)
        self.gallery = tuple(gallery)
        self._frame_loader = frame_loader or _open_image

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, train={len(self.train)}, query={len(self.query)}, "
                f"gallery={len(self.gallery)}, num_cameras={self.num_cameras})")

    def load_frame(self, frame: str):
        """Return frame ``frame`` (a path or in-memory key of a tracklet) as an RGB PIL image."""
        return self._frame_loader(frame)

    def split(self, name: str) -> tuple[Tracklet, ...]:
        """The tracklets of split ``name`` in ``("train", "query", "gallery")``."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)

    @property
    def num_cameras(self) -> int:
        """1 + the largest camera index over all splits (0 when the dataset is empty)."""
        cameras = [t.camera for split in (self.train, self.query, self.gallery) for t in split]
        return max(cameras) + 1 if cameras else 0

    @property
    def num_train_pids(self) -> int:
        """Number of distinct ground-truth identities (pid >= 0) among the training tracklets."""
        return len({t.pid for t in self.train if t.pid >= 0})

    def summary(self) -> str:
        """A small table: tracklets, identities, cameras and frames of every split."""
        lines = [f"{self.name}: {'split':<8}{'tracklets':>10}{'ids':>7}{'cameras':>9}{'frames':>10}"]
        for split in SPLITS:
            tracklets = self.split(split)
            lines.append(f"{'':<{len(self.name) + 2}}{split:<8}{len(tracklets):>10}"
                         f"{len({t.pid for t in tracklets}):>7}{len({t.camera for t in tracklets}):>9}"
                         f"{sum(len(t) for t in tracklets):>10}")
        return "\n".join(lines)


def tracklet_labels(tracklets: Sequence[Tracklet]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground-truth identities and cameras of ``tracklets``, as :func:`fastassoc.evaluate_ranking` takes them.

    Returns
    -------
    pids : Tensor [T], int64
    cameras : Tensor [T], int64
    """
    pids = torch.tensor([t.pid for t in tracklets], dtype=torch.int64)
    cameras = torch.tensor([t.camera for t in tracklets], dtype=torch.int64)
    return pids, cameras


def group_by_camera(tracklets: Sequence[Tracklet], num_cameras: int | None = None
                    ) -> tuple[tuple[Tracklet, ...], torch.Tensor]:
    """Tracklets stably sorted by camera, with the offsets of each camera's run.

    The layout the segmented ops take: with classes (or anchors) in this order, camera ``c``'s
    tracklets are rows ``offsets[c]:offsets[c + 1]``, the ``class_offsets`` of
    :func:`fastassoc.segmented_cross_entropy` for per-camera tracklet classes (UTAL, EEA) and
    the ``anchor_offsets`` of :func:`fastassoc.topk_anchors`.

    Parameters
    ----------
    tracklets : sequence of Tracklet
    num_cameras : int, optional
        Number of segments (cameras without tracklets give empty segments); default
        1 + the largest camera.

    Returns
    -------
    ordered : tuple of Tracklet
    offsets : Tensor [num_cameras + 1], int64
    """
    cameras = [t.camera for t in tracklets]
    if num_cameras is None:
        num_cameras = max(cameras) + 1 if cameras else 0
    if cameras and (min(cameras) < 0 or max(cameras) >= num_cameras):
        raise ValueError(f"cameras must lie in [0, {num_cameras}), got {min(cameras)}..{max(cameras)}")
    order = sorted(range(len(tracklets)), key=lambda i: cameras[i])
    counts = torch.bincount(torch.tensor(cameras, dtype=torch.int64), minlength=num_cameras)
    offsets = torch.zeros(num_cameras + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    return tuple(tracklets[i] for i in order), offsets


def one_tracklet_per_camera(tracklets: Iterable[Tracklet], seed: int = 0) -> tuple[Tracklet, ...]:
    """Keep one randomly chosen tracklet per (identity, camera): the sparse sampling of UGA and EEA.

    This is the sampling the papers apply to MARS ("we randomly sample one tracklet for a
    person in one camera"); like them it reads the ground-truth ``pid``, so it is a data
    protocol, not something a trainer may do with its own pseudo labels. Tracklets with a
    negative pid (junk) are dropped. The kept tracklets stay in their original order.

    Parameters
    ----------
    tracklets : iterable of Tracklet
    seed : int
        Seed of the choice among a (pid, camera)'s tracklets.

    Returns
    -------
    tuple of Tracklet
    """
    tracklets = [t for t in tracklets if t.pid >= 0]
    groups: dict[tuple[int, int], list[int]] = {}
    for position, tracklet in enumerate(tracklets):
        groups.setdefault((tracklet.pid, tracklet.camera), []).append(position)
    rng = np.random.default_rng(seed)
    keep = sorted(members[int(rng.integers(len(members)))] for _, members in sorted(groups.items()))
    return tuple(tracklets[position] for position in keep)


def select_train_tracklets(tracklets: Sequence[Tracklet], mode: str, seed: int) -> tuple[Tracklet, ...]:
    """Apply the ``tracklets=`` option of the loaders: ``"all"`` or ``"one_per_camera"``."""
    if mode not in TRACKLET_MODES:
        raise ValueError(f"tracklets must be one of {TRACKLET_MODES}, got {mode!r}")
    if mode == "one_per_camera":
        return one_tracklet_per_camera(tracklets, seed)
    return tuple(tracklets)
