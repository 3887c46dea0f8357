"""Loading tracklets for training: frame sampling, camera-balanced batches, a frame Dataset.

UTAL builds every mini-batch from the same number of tracklets per camera and the same number
of frames per tracklet ("randomly selected the same number of tracklets per camera and the
same number of frame images (4 images) per chosen tracklet", UTAL Sec. 4.1), so that every
camera's branch or memory is updated at the same speed. UGA and EEA sample *images*: "randomly
sampling the same number images from each camera in a mini batch" (UGA Sec. 4.2, EEA Sec. 4.2),
batches of 60; DAL "randomly sample[s] a mini-batch of image frames" (Algorithm 1), 64 of them.
Their epochs are passes over the training frames (:class:`FrameSampler`). The pieces:

- :func:`sample_frames`: which frame positions of one tracklet to use (random for training,
  evenly spaced for testing, a consecutive run for temporal models).
- :class:`CameraBalancedSampler`: a batch sampler yielding lists of tracklet indices,
  ``tracklets_per_camera`` from every camera that has training tracklets.
- :class:`FrameSampler`: a batch sampler yielding lists of ``(tracklet, frame position)``
  pairs, single frames drawn over the cameras evenly (or over all frames at random); an epoch
  is one pass over the training frames.
- :class:`TrackletFrames`: a :class:`torch.utils.data.Dataset` whose item ``i`` is
  ``(frames [n, 3, H, W] float32, i, camera)`` with ``n`` sampled frames of tracklet ``i``, and
  whose item ``(i, p)`` is frame ``p`` of tracklet ``i`` alone (``n = 1``).
- :func:`train_loader` / :func:`frame_loader`: a sampler and the Dataset in a
  :class:`~torch.utils.data.DataLoader` (with workers), yielding
  ``(frames [B, n, 3, H, W], tracklet indices [B], cameras [B])``.

Randomness: the sampler draws from NumPy generators seeded by ``(seed, epoch)``, so batches
are reproducible; frame choice and transforms use torch's generator, which the DataLoader
seeds per worker from ``torch.manual_seed``.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .tracklets import Tracklet

FRAME_MODES = ("random", "evenly", "consecutive", "all")
SAMPLINGS = ("tracklets", "camera_images", "images")


def sample_frames(num_frames: int, count: int | None, mode: str = "random",
                  generator: torch.Generator | None = None) -> list[int]:
    """Positions of the frames to use from a tracklet of ``num_frames`` frames.

    Parameters
    ----------
    num_frames : int >= 1
    count : int >= 1 or None
        How many positions; None means all of them (like ``mode="all"``).
    mode : {"random", "evenly", "consecutive", "all"}
        ``random``: distinct positions chosen uniformly (all positions, then repeats drawn
        at random, when the tracklet is shorter than ``count``); ``evenly``: the centres of
        ``count`` equal segments of the tracklet, deterministic; ``consecutive``: a run starting at a random
        position (the last frame repeated when the tracklet is too short); ``all``: every
        position.
    generator : torch.Generator, optional
        Source of randomness (torch's default generator when None).

    Returns
    -------
    list of int
        Positions in time order, ``count`` of them (``num_frames`` for ``all`` / None).
    """
    if mode not in FRAME_MODES:
        raise ValueError(f"mode must be one of {FRAME_MODES}, got {mode!r}")
    if num_frames < 1:
        raise ValueError(f"a tracklet needs at least one frame, got num_frames={num_frames}")
    if count is None or mode == "all":
        return list(range(num_frames))
    if count < 1:
        raise ValueError(f"count must be >= 1 or None, got {count}")
    if mode == "evenly":
        return [(2 * i + 1) * num_frames // (2 * count) for i in range(count)]
    if mode == "consecutive":
        start = int(torch.randint(max(num_frames - count, 0) + 1, (1,), generator=generator))
        return [min(start + i, num_frames - 1) for i in range(count)]
    if num_frames >= count:
        return sorted(torch.randperm(num_frames, generator=generator)[:count].tolist())
    extra = torch.randint(num_frames, (count - num_frames,), generator=generator).tolist()
    return sorted(list(range(num_frames)) + extra)


def _cameras_of(tracklets_or_cameras) -> np.ndarray:
    items = list(tracklets_or_cameras) if not isinstance(tracklets_or_cameras, torch.Tensor) \
        else tracklets_or_cameras.tolist()
    cameras = [t.camera if isinstance(t, Tracklet) else int(t) for t in items]
    return np.asarray(cameras, dtype=np.int64)


class CameraBalancedSampler(Sampler[list[int]]):
    """Batches with the same number of tracklets from every camera.

    Each batch holds ``tracklets_per_camera`` tracklet indices from each camera present,
    grouped by camera in increasing camera order. Within a camera the tracklets are visited
    in a fresh random order each cycle, so every tracklet is used before any repeats, and a
    batch never holds one tracklet twice unless its camera has fewer than
    ``tracklets_per_camera`` tracklets (then all of them plus random repeats).

    Parameters
    ----------
    tracklets_or_cameras : sequence of Tracklet, or of int, or Tensor [T]
        The tracklets (or just their cameras) the indices refer to.
    tracklets_per_camera : int >= 1
    num_batches : int, optional
        Batches per epoch; by default ``ceil(T / (tracklets_per_camera * num_cameras))``,
        one pass over the data in expectation.
    seed : int
        Batches of epoch ``e`` come from a generator seeded with ``(seed, e)``.

    Notes
    -----
    Iterating starts the next epoch; :meth:`set_epoch` picks one explicitly (as
    :class:`torch.utils.data.distributed.DistributedSampler` does).
    """

    def __init__(self, tracklets_or_cameras, tracklets_per_camera: int, *, num_batches: int | None = None,
                 seed: int = 0):
        if not isinstance(tracklets_per_camera, (int, np.integer)) or tracklets_per_camera < 1:
            raise ValueError(f"tracklets_per_camera must be an integer >= 1, got {tracklets_per_camera!r}")
        cameras = _cameras_of(tracklets_or_cameras)
        self.cameras = sorted(set(cameras.tolist()))
        self.members = {camera: np.flatnonzero(cameras == camera) for camera in self.cameras}
        self.tracklets_per_camera = int(tracklets_per_camera)
        if num_batches is None:
            per_batch = self.tracklets_per_camera * max(len(self.cameras), 1)
            num_batches = -(-len(cameras) // per_batch)
        if not isinstance(num_batches, (int, np.integer)) or num_batches < 0:
            raise ValueError(f"num_batches must be an integer >= 0, got {num_batches!r}")
        self.num_batches = int(num_batches)
        self.seed = seed
        self.epoch = 0

    @property
    def batch_size(self) -> int:
        """Tracklets per batch: tracklets_per_camera x number of cameras."""
        return self.tracklets_per_camera * len(self.cameras)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration yield epoch ``epoch``'s batches."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        queues = {camera: deque() for camera in self.cameras}
        k = self.tracklets_per_camera
        for _ in range(self.num_batches):
            batch = []
            for camera in self.cameras:
                members, queue = self.members[camera], queues[camera]
                if len(members) < k:
                    chosen = rng.permutation(members).tolist()
                    chosen += rng.choice(members, size=k - len(members)).tolist()
                    batch += chosen
                    continue
                chosen, deferred = [], []
                while len(chosen) < k:
                    if not queue:
                        queue.extend(rng.permutation(members).tolist())
                    candidate = queue.popleft()
                    # A repeat within the batch can only come from the next cycle: keep it for the next batch.
                    (deferred if candidate in chosen else chosen).append(candidate)
                queue.extendleft(reversed(deferred))
                batch += chosen
            yield batch


class FrameSampler(Sampler[list[tuple[int, int]]]):
    """Batches of single frames, ``(tracklet index, frame position)`` pairs; an epoch is one
    pass over the training frames.

    ``camera_balanced=True`` (UGA, EEA: "the same number images from each camera in a mini
    batch"): slot ``s`` of an epoch's stream of ``num_batches * batch_size`` frames comes from
    camera ``s mod C`` (``C`` = cameras with training frames), each camera's frames visited in
    a fresh random order per cycle, so every batch holds ``batch_size // C`` or one more frames
    of every camera and any ``C`` consecutive batches exactly ``batch_size`` frames of each
    (every batch when ``C`` divides ``batch_size``). A camera with fewer frames cycles sooner.
    ``camera_balanced=False`` (DAL: "randomly sample a mini-batch of image frames"): frames in
    a fresh random order of all training frames per cycle.

    Parameters
    ----------
    tracklets : sequence of Tracklet
    batch_size : int >= 1
        Frames per batch (60 in UGA / EEA, 64 in DAL).
    camera_balanced : bool
    num_batches : int, optional
        Batches per epoch; by default ``ceil(total frames / batch_size)``, one pass over the frames.
    seed : int
        Batches of epoch ``e`` come from a generator seeded with ``(seed, e)``.
    """

    def __init__(self, tracklets: Sequence[Tracklet], batch_size: int, *, camera_balanced: bool = True,
                 num_batches: int | None = None, seed: int = 0):
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        tracklets = tuple(tracklets)
        lengths = np.asarray([len(t) for t in tracklets], dtype=np.int64)
        if (lengths < 1).any():
            raise ValueError(f"tracklet {int(np.flatnonzero(lengths < 1)[0])} has no frames")
        self.frame_tracklet = np.repeat(np.arange(len(tracklets), dtype=np.int64), lengths)
        starts = np.cumsum(lengths) - lengths
        self.frame_position = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)
        cameras = np.repeat(_cameras_of(tracklets), lengths)
        self.camera_balanced = bool(camera_balanced)
        self.cameras = sorted(set(cameras.tolist())) if self.camera_balanced else [0]
        self.members = ({camera: np.flatnonzero(cameras == camera) for camera in self.cameras}
                        if self.camera_balanced else {0: np.arange(len(cameras))})
        self.batch_size = int(batch_size)
        if num_batches is None:
            num_batches = -(-len(cameras) // self.batch_size)
        if not isinstance(num_batches, (int, np.integer)) or num_batches < 0:
            raise ValueError(f"num_batches must be an integer >= 0, got {num_batches!r}")
        self.num_batches = int(num_batches)
        self.num_frames = len(cameras)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration yield epoch ``epoch``'s batches."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        num_cameras = len(self.cameras)
        orders = {camera: np.empty(0, dtype=np.int64) for camera in self.cameras}
        used = dict.fromkeys(self.cameras, 0)
        for batch_index in range(self.num_batches):
            first = batch_index * self.batch_size
            batch = []
            for slot, camera in enumerate(self.cameras):
                # Slots first..first+B-1 whose index is `slot` mod C.
                count = (first + self.batch_size - 1 - slot) // num_cameras - (first - 1 - slot) // num_cameras
                while count > 0:
                    if used[camera] == len(orders[camera]):
                        orders[camera], used[camera] = rng.permutation(self.members[camera]), 0
                    take = orders[camera][used[camera]:used[camera] + count]
                    used[camera] += len(take)
                    count -= len(take)
                    batch += [(int(self.frame_tracklet[f]), int(self.frame_position[f])) for f in take]
            yield batch


def _to_tensor(image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)


class TrackletFrames(Dataset):
    """Tracklets as training items: item ``i`` is ``(frames [n, 3, H, W], i, camera)``.

    Parameters
    ----------
    tracklets : sequence of Tracklet
    load_frame : callable str -> PIL.Image.Image
        Usually ``dataset.load_frame``.
    frames_per_tracklet : int or None
        ``n``; None takes every frame (variable ``n``: use batch size 1).
    transform : callable PIL.Image -> Tensor [3, H, W], optional
        Applied to every frame independently (e.g. :func:`~fastassoc.data.train_transform`);
        by default the frame becomes a float tensor in [0, 1].
    frame_mode : str
        How frames are chosen, see :func:`sample_frames` (``"random"`` for training).
    """

    def __init__(self, tracklets: Sequence[Tracklet], load_frame: Callable[[str], object],
                 frames_per_tracklet: int | None = 4, transform: Callable | None = None, frame_mode: str = "random"):
        if frame_mode not in FRAME_MODES:
            raise ValueError(f"frame_mode must be one of {FRAME_MODES}, got {frame_mode!r}")
        if frames_per_tracklet is not None and frames_per_tracklet < 1:
            raise ValueError(f"frames_per_tracklet must be >= 1 or None, got {frames_per_tracklet}")
        self.tracklets = tuple(tracklets)
        self.load_frame = load_frame
        self.frames_per_tracklet = frames_per_tracklet
        self.transform = transform or _to_tensor
        self.frame_mode = frame_mode

    def __len__(self) -> int:
        return len(self.tracklets)

    def __getitem__(self, index) -> tuple[torch.Tensor, int, int]:
        if isinstance(index, tuple):
            # (tracklet, frame position): one frame, as FrameSampler yields them.
            index, position = index
            positions = [int(position)]
            tracklet = self.tracklets[index]
        else:
            tracklet = self.tracklets[index]
            positions = sample_frames(len(tracklet), self.frames_per_tracklet, self.frame_mode)
        frames = torch.stack([self.transform(self.load_frame(tracklet.frames[p])) for p in positions])
        return frames, int(index), tracklet.camera


def _split(sampler, rank_split: tuple[int, int] | None):
    """``sampler``, or for ``rank_split=(rank, world_size)`` this rank's share of it
    (:class:`~fastassoc.distributed.training.RankSplitSampler`)."""
    if rank_split is None:
        return sampler
    from ..distributed.training import RankSplitSampler

    rank, world_size = rank_split
    return RankSplitSampler(sampler, rank, world_size)


def train_loader(tracklets: Sequence[Tracklet], load_frame: Callable[[str], object], *, tracklets_per_camera: int,
                 frames_per_tracklet: int = 4, transform: Callable | None = None, num_batches: int | None = None,
                 num_workers: int = 0, seed: int = 0, pin_memory: bool = False,
                 rank_split: tuple[int, int] | None = None) -> DataLoader:
    """A DataLoader of camera-balanced batches of tracklet frames.

    Parameters
    ----------
    tracklets, load_frame, frames_per_tracklet, transform
        As :class:`TrackletFrames` (frames drawn with ``frame_mode="random"``).
    tracklets_per_camera, num_batches, seed
        As :class:`CameraBalancedSampler`.
    num_workers : int
        DataLoader worker processes (kept alive across epochs when > 0).
    pin_memory : bool
    rank_split : (rank, world_size), optional
        Multi-process training: every rank draws the same global batches and keeps its strided
        share (:class:`~fastassoc.distributed.training.RankSplitSampler`), ``tracklets_per_camera
        / world_size`` tracklets of every camera; ``tracklets_per_camera`` must be a multiple of
        ``world_size`` (ValueError otherwise).

    Returns
    -------
    DataLoader
        Yields ``(frames [B, n, 3, H, W] float32, tracklet indices [B] int64, cameras [B] int64)``
        with ``B = tracklets_per_camera * num_cameras`` (divided by the world size with
        ``rank_split``); its ``batch_sampler`` is the :class:`CameraBalancedSampler` (wrapped
        in a RankSplitSampler with ``rank_split``).
    """
    sampler = _split(CameraBalancedSampler(tracklets, tracklets_per_camera, num_batches=num_batches, seed=seed),
                     rank_split)
    return DataLoader(TrackletFrames(tracklets, load_frame, frames_per_tracklet, transform), batch_sampler=sampler,
                      num_workers=num_workers, persistent_workers=num_workers > 0, pin_memory=pin_memory)


def frame_loader(tracklets: Sequence[Tracklet], load_frame: Callable[[str], object], *, batch_size: int,
                 camera_balanced: bool = True, transform: Callable | None = None, num_batches: int | None = None,
                 num_workers: int = 0, seed: int = 0, pin_memory: bool = False,
                 rank_split: tuple[int, int] | None = None) -> DataLoader:
    """A DataLoader of single-frame batches (:class:`FrameSampler`), an epoch a pass over the frames.

    Parameters
    ----------
    tracklets, load_frame, transform
        As :class:`TrackletFrames`.
    batch_size, camera_balanced, num_batches, seed
        As :class:`FrameSampler`.
    num_workers, pin_memory
        As :func:`train_loader`.
    rank_split : (rank, world_size), optional
        As :func:`train_loader`: rank ``r`` keeps frames ``r, r + W, ...`` of every global batch
        (a batch lists its frames camera by camera, so every rank's share holds about
        ``batch_size / (W C)`` frames of every camera); ``batch_size`` must be a multiple of
        ``world_size`` (ValueError otherwise).

    Returns
    -------
    DataLoader
        Yields ``(frames [B, 1, 3, H, W] float32, tracklet indices [B] int64, cameras [B] int64)``
        with ``B = batch_size`` (divided by the world size with ``rank_split``; a tracklet may
        appear several times); its ``batch_sampler`` is the :class:`FrameSampler` (wrapped in a
        RankSplitSampler with ``rank_split``).
    """
    sampler = _split(FrameSampler(tracklets, batch_size, camera_balanced=camera_balanced, num_batches=num_batches,
                                  seed=seed), rank_split)
    return DataLoader(TrackletFrames(tracklets, load_frame, 1, transform), batch_sampler=sampler,
                      num_workers=num_workers, persistent_workers=num_workers > 0, pin_memory=pin_memory)


def config_loader(config, tracklets: Sequence[Tracklet], load_frame: Callable[[str], object], *,
                  transform: Callable | None = None, pin_memory: bool = False,
                  rank_split: tuple[int, int] | None = None) -> DataLoader:
    """The training loader a trainer config asks for, by its ``sampling`` field.

    ``"tracklets"`` (default when the config has no ``sampling``): :func:`train_loader`,
    ``tracklets_per_camera`` x ``frames_per_tracklet`` frames of every camera per batch.
    ``"camera_images"``: :func:`frame_loader` with ``camera_balanced=True`` and
    ``"images"``: with ``camera_balanced=False``, ``batch_size`` frames per batch, an epoch a
    pass over the training frames. ``batches_per_epoch``, ``num_workers`` and ``seed`` as named;
    ``rank_split`` as in :func:`train_loader` (multi-process training).
    """
    sampling = getattr(config, "sampling", "tracklets")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    common = dict(transform=transform, num_batches=config.batches_per_epoch, num_workers=config.num_workers,
                  seed=config.seed, pin_memory=pin_memory, rank_split=rank_split)
    if sampling == "tracklets":
        return train_loader(tracklets, load_frame, tracklets_per_camera=config.tracklets_per_camera,
                            frames_per_tracklet=config.frames_per_tracklet, **common)
    batch_size = getattr(config, "batch_size", None)
    if batch_size is None:
        raise ValueError(f"sampling={sampling!r} needs batch_size (frames per batch), got None")
    return frame_loader(tracklets, load_frame, batch_size=batch_size, camera_balanced=sampling == "camera_images",
                        **common)
