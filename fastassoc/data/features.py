"""Tracklet features from any frame model, extracted in batches and pooled per tracklet.

Every frame of every tracklet (or ``max_frames`` evenly spaced ones) goes through ``model`` in
batches of ``batch_size`` frames, regardless of tracklet boundaries; frame features are pooled
into their tracklet's row on the fly (mean or element-wise max), so memory holds one batch of
frames plus the [T, D] result. A tqdm bar counts frames.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .sampling import _to_tensor, sample_frames
from .tracklets import Tracklet

POOLINGS = ("mean", "max")


class _FrameList(Dataset):
    def __init__(self, frames: list[str], owners: list[int], load_frame: Callable, transform: Callable):
        self.frames, self.owners, self.load_frame, self.transform = frames, owners, load_frame, transform

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int):
        return self.transform(self.load_frame(self.frames[index])), self.owners[index]


def extract_features(model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor], tracklets: Sequence[Tracklet],
                     load_frame: Callable[[str], object], *, transform: Callable | None = None,
                     pooling: str = "mean", max_frames: int | None = None, batch_size: int = 256,
                     device: torch.device | str | None = None, num_workers: int = 0, progress: bool = True,
                     desc: str = "features") -> torch.Tensor:
    """Features of ``tracklets``: ``model`` applied to their frames, pooled per tracklet.

    Parameters
    ----------
    model : nn.Module or callable
        Maps a batch of frames [b, 3, H, W] to features [b, D] (trailing dimensions are
        flattened). Run in eval mode under ``torch.no_grad()``; its training mode is
        restored afterwards.
    tracklets : sequence of Tracklet
    load_frame : callable str -> PIL.Image.Image
        Usually ``dataset.load_frame``.
    transform : callable PIL.Image -> Tensor [3, H, W], optional
        Usually :func:`~fastassoc.data.eval_transform`; by default a float tensor in [0, 1].
    pooling : {"mean", "max"}
        Mean or element-wise max of a tracklet's frame features.
    max_frames : int, optional
        Use at most this many frames per tracklet, the centres of equal segments
        (:func:`sample_frames` ``"evenly"``); all frames by default.
    batch_size : int
        Frames per forward pass.
    device : torch.device or str, optional
        Where the model runs; by default the device of its first parameter (CPU without any).
    num_workers : int
        DataLoader workers reading and transforming frames.
    progress : bool
        Show a tqdm progress bar (frames).
    desc : str
        Label of the progress bar.

    Returns
    -------
    Tensor [T, D], float32, on the CPU
        Row ``i`` pools tracklet ``i``'s frames; ``[0, 0]`` when ``tracklets`` is empty.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    frames, owners = [], []
    for index, tracklet in enumerate(tracklets):
        if len(tracklet) == 0:
            raise ValueError(f"tracklet {index} ({tracklet.tracklet_id}) has no frames")
        if max_frames and len(tracklet) > max_frames:
            positions = sample_frames(len(tracklet), max_frames, "evenly")
        else:
            positions = range(len(tracklet))
        frames += [tracklet.frames[p] for p in positions]
        owners += [index] * len(positions)
    num_tracklets = len(tracklets)
    if num_tracklets == 0:
        return torch.empty(0, 0)
    if device is None:
        parameter = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
        device = parameter.device if parameter is not None else torch.device("cpu")
    device = torch.device(device)

    from tqdm.auto import tqdm

    loader = DataLoader(_FrameList(frames, owners, load_frame, transform or _to_tensor), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda")
    was_training = isinstance(model, torch.nn.Module) and model.training
    if isinstance(model, torch.nn.Module):
        model.eval()
    pooled = None
    try:
        with torch.no_grad(), tqdm(total=len(frames), unit="frame", desc=desc, disable=not progress) as bar:
            for images, owner in loader:
                owner = owner.to(device, non_blocking=True)
                output = model(images.to(device, non_blocking=True))
                output = output.reshape(output.shape[0], -1).float()
                if pooled is None:
                    fill = 0.0 if pooling == "mean" else float("-inf")
                    pooled = torch.full((num_tracklets, output.shape[1]), fill, device=device)
                if pooling == "mean":
                    pooled.index_add_(0, owner, output)
                else:
                    pooled.scatter_reduce_(0, owner[:, None].expand_as(output), output, "amax")
                bar.update(len(owner))
    finally:
        if was_training:
            model.train()
    if pooling == "mean":
        counts = torch.bincount(torch.tensor(owners), minlength=num_tracklets).to(pooled)
        pooled /= counts[:, None]
    return pooled.cpu()
