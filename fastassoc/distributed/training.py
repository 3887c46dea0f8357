"""Pieces for multi-process training (``torchrun`` + DistributedDataParallel) of the trainers.

* :class:`RankSplitSampler`: every rank draws the same global camera-balanced batch (same seed
  and epoch) and keeps its strided share, so each rank's part is camera-balanced too and the
  union over ranks is the one-process batch.
* :func:`gather_global_batch`: the split batch rebuilt on every rank in its one-process order.
* :func:`all_gather_batch` / :func:`replicated_ema_update_`: a replicated memory bank (the
  methods' tracklet memories are small: 8,298 x 2,048 float32 is 68 MB) updated with every
  rank's batch in rank order, hence equal on all ranks and to the one-process update of the
  concatenated batch. Banks too large to replicate use :func:`fastassoc.distributed.ema_update_`
  on row shards instead.
* :func:`shard_range`, :func:`save_row_shards`, :func:`load_row_range`: a row-sharded bank in
  checkpoints that reload under any world size (each file records its global rows).
* :func:`is_rank_zero`, :func:`on_rank_zero`: rank 0 writes checkpoints, reports and logs.
* :func:`average_gradients`: DistributedDataParallel's gradient averaging for modules that stay
  unwrapped (their ``state_dict`` keys then do not change with the world size, so checkpoints
  resume under any world size); :func:`average_buffers` keeps their BatchNorm statistics equal.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .. import ops as _ops
from ._comm import all_gather_padded, exchange_counts


def world(group=None) -> tuple[int, int]:
    """``(rank, world_size)`` of ``group``; ``(0, 1)`` without an initialised process group."""
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def is_rank_zero(group=None) -> bool:
    """True on rank 0 (and in a process without a process group)."""
    return world(group)[0] == 0


def on_rank_zero(function: Callable[..., Any], *args, group=None, **kwargs) -> Any:
    """Call ``function`` on rank 0 only, then wait for it on every rank (a barrier); rank 0's result, else None."""
    result = function(*args, **kwargs) if is_rank_zero(group) else None
    if world(group)[1] > 1:
        dist.barrier(group)
    return result


class RankSplitSampler(Sampler[list[int]]):
    """This rank's share of every batch of a batch sampler (e.g. :class:`fastassoc.data.CameraBalancedSampler`).

    All ranks must build ``batch_sampler`` identically (same data, seed and epoch), so they draw
    the same global batches; rank ``r`` keeps positions ``r, r + W, r + 2W, ...`` of each. With
    :class:`~fastassoc.data.CameraBalancedSampler` a batch is grouped by camera in blocks of
    ``tracklets_per_camera``, so when ``W`` divides ``tracklets_per_camera`` every rank gets
    ``tracklets_per_camera / W`` tracklets of every camera.

    Parameters
    ----------
    batch_sampler : iterable of list of int, with ``__len__`` (and ``set_epoch``, forwarded)
    rank, world_size : int, default: the initialised process group's
    """

    def __init__(self, batch_sampler, rank: int | None = None, world_size: int | None = None):
        own_rank, own_world = world()
        self.batch_sampler = batch_sampler
        self.rank = own_rank if rank is None else int(rank)
        self.world_size = own_world if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        per_camera = getattr(batch_sampler, "tracklets_per_camera", None)
        if per_camera is not None and per_camera % self.world_size:
            raise ValueError(f"tracklets_per_camera ({per_camera}) must be a multiple of the world size "
                             f"({self.world_size}) so that every rank's share is camera-balanced")
        # Equal shares make the mean of the ranks' mean losses the global batch's mean loss.
        size = getattr(batch_sampler, "batch_size", None)
        if per_camera is None and size is not None and size % self.world_size:
            raise ValueError(f"batch_size ({size}) must be a multiple of the world size ({self.world_size}) "
                             f"so that every rank gets the same number of frames")

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)

    @property
    def epoch(self):
        return getattr(self.batch_sampler, "epoch", None)

    @property
    def seed(self):
        return getattr(self.batch_sampler, "seed", None)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batch_sampler:
            yield list(batch)[self.rank::self.world_size]


def average_gradients(*modules: torch.nn.Module | None, group=None) -> None:
    """Replace every parameter gradient of ``modules`` by its mean over the ranks (one flat all-reduce).

    Call after ``loss.backward()`` and before ``optimizer.step()``: with equal per-rank batches
    the result is the gradient of the global batch's mean loss, as DDP computes it (up to the
    float summation order). A parameter without a gradient is skipped; one that has a gradient
    on some ranks only is an error (raised on every rank). Sends ``8 (W - 1) P`` (which of the
    ``P`` parameters have a gradient) and about ``2 (W - 1) / W`` times the gradients' bytes (ring all-reduce).
    """
    rank, world_size = world(group)
    if world_size == 1:
        return
    parameters = [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]
    present = [p.grad is not None for p in parameters]
    flags = torch.tensor(present, dtype=torch.int64)
    every = [torch.empty_like(flags) for _ in range(world_size)]
    dist.all_gather(every, flags, group=group)
    if any(not torch.equal(e, flags) for e in every):
        raise RuntimeError("average_gradients: the ranks' parameters differ in which have a gradient; run the same "
                           "forward on every rank (unused parameters need a zero loss term)")
    _average_in_place([p.grad for p in parameters if p.grad is not None], world_size, group)


def average_buffers(*modules: torch.nn.Module | None, group=None) -> None:
    """Replace every floating-point buffer of ``modules`` (BatchNorm running statistics) by its mean over the ranks.

    DistributedDataParallel broadcasts rank 0's buffers instead; the mean keeps every rank's
    batches: a running mean is linear in the batch means, so with equal per-rank batches the
    averaged ``running_mean`` is the one the global batch would give, and ``running_var`` the
    mean of the ranks' variances (without the spread of the ranks' means). Integer buffers
    (``num_batches_tracked``) are equal on all ranks already. Call after every optimiser step,
    so that the ranks' models stay identical; sends about ``2 (W - 1) / W`` times the buffers' bytes.
    """
    world_size = world(group)[1]
    if world_size == 1:
        return
    _average_in_place([b for m in modules if m is not None for b in m.buffers() if b.is_floating_point()],
                      world_size, group)


def _average_in_place(tensors: list[torch.Tensor], world_size: int, group) -> None:
    """Replace each tensor by its mean over the ranks: one all-reduce of them flattened together."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    flat /= world_size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def all_gather_batch(*tensors: torch.Tensor, group=None) -> tuple[torch.Tensor, ...]:
    """Every rank's rows of each tensor (same first dimension on one rank), concatenated in rank order.

    Sends ``8 (W - 1)`` plus ``(W - 1) max_r b_r`` rows of every tensor.
    """
    if world(group)[1] == 1:
        return tensors
    sizes = [row[0] for row in exchange_counts([tensors[0].shape[0]], group, tensors[0].device)]
    return tuple(torch.cat(all_gather_padded(t, sizes, group)) for t in tensors)


def gather_global_batch(*tensors: torch.Tensor, rows_per_item: int = 1, group=None) -> tuple[torch.Tensor, ...]:
    """The global batch that :class:`RankSplitSampler` split, rebuilt in its one-process order on every rank.

    Rank ``r`` holds items ``r, r + W, r + 2W, ...`` of the global batch, each item being
    ``rows_per_item`` consecutive rows of every tensor (e.g. the frames of one tracklet).
    Order matters to order-dependent updates (``ema_update_(..., reduce="sequential")``) and to
    float sums; with this order a replicated bank's update equals the one-process update
    exactly. Every rank must hold the same number of items (RankSplitSampler's divisibility
    checks make it so); otherwise ValueError on every rank. Sends what :func:`all_gather_batch` does.

    Parameters
    ----------
    *tensors : Tensor [b * rows_per_item, ...]
        This rank's rows; the same first dimension for all.
    rows_per_item : int >= 1
    """
    world_size = world(group)[1]
    if world_size == 1:
        return tensors
    if rows_per_item < 1 or tensors[0].shape[0] % rows_per_item:
        raise ValueError(f"rows_per_item must be >= 1 and divide the rank's {tensors[0].shape[0]} rows, "
                         f"got {rows_per_item}")
    sizes = [row[0] for row in exchange_counts([tensors[0].shape[0]], group, tensors[0].device)]
    if len(set(sizes)) != 1:
        raise ValueError(f"gather_global_batch needs the same number of rows on every rank, got {sizes}")
    items = sizes[0] // rows_per_item
    gathered = all_gather_batch(*tensors, group=group)
    # [W, items, rows_per_item, ...] -> [items, W, rows_per_item, ...]: item j of rank r is global item j W + r.
    return tuple(t.reshape(world_size, items, rows_per_item, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
                 for t in gathered)


def replicated_ema_update_(bank: torch.Tensor, index: torch.Tensor, values: torch.Tensor, momentum: float, *,
                           group=None, **options) -> torch.Tensor:
    """:func:`fastassoc.ema_update_` of a bank replicated on every rank with every rank's batch.

    The batches are all-gathered in rank order, so the bank stays identical on all ranks and
    equal to the one-process update with the concatenated batch. ``values`` are detached.
    """
    index, values = all_gather_batch(index, values.detach(), group=group)
    return _ops.ema_update_(bank, index, values, momentum, **options)


def shard_range(num_rows: int, rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s contiguous block of ``num_rows`` rows (sizes differ by at most 1)."""
    own_rank, own_world = world()
    rank = own_rank if rank is None else rank
    world_size = own_world if world_size is None else world_size
    return num_rows * rank // world_size, num_rows * (rank + 1) // world_size


def save_row_shards(local: torch.Tensor, directory: str | os.PathLike, name: str, *, num_rows: int,
                    group=None) -> Path:
    """Write this rank's block of a row-sharded tensor as ``name.rows-<start>-<stop>-of-<num_rows>.pt``.

    The block must be :func:`shard_range`'s (checked). :func:`load_row_range` reads any row
    range back from the files of one save, whatever world size wrote them.
    """
    rank, world_size = world(group)
    start, stop = shard_range(num_rows, rank, world_size)
    if local.shape[0] != stop - start:
        raise ValueError(f"local must hold rows {start}:{stop} of {num_rows} on rank {rank} of {world_size}, "
                         f"got {local.shape[0]} rows")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.rows-{start}-{stop}-of-{num_rows}.pt"
    temporary = path.with_suffix(".tmp")
    torch.save(local.detach().cpu(), temporary)
    os.replace(temporary, path)
    return path


def load_row_range(directory: str | os.PathLike, name: str, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of a tensor saved by :func:`save_row_shards` (any world size), on the CPU."""
    pattern = re.compile(re.escape(name) + r"\.rows-(\d+)-(\d+)-of-(\d+)\.pt$")
    files = []
    for path in Path(directory).iterdir():
        match = pattern.match(path.name)
        if match:
            files.append((int(match.group(1)), int(match.group(2)), int(match.group(3)), path))
    totals = {total for _, _, total, _ in files}
    if len(totals) != 1:
        raise ValueError(f"{directory}: expected the shards of one save of {name!r}, found row totals {sorted(totals)}")
    files.sort()
    covered = 0
    for first, last, _, _ in files:
        if first != covered:
            raise ValueError(f"{directory}: the shards of {name!r} leave rows {covered}:{first} uncovered")
        covered = last
    total = totals.pop()
    if covered != total or not 0 <= start <= stop <= total:
        raise ValueError(f"rows {start}:{stop} of {name!r}: the shards cover 0:{covered} of {total}")
    parts = [torch.load(path, weights_only=True)[max(start, first) - first:min(stop, last) - first]
             for first, last, _, path in files if first < stop and last > start]
    return torch.cat(parts) if parts else torch.load(files[0][3], weights_only=True)[:0]
