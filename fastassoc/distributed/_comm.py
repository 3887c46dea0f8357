"""Shard layouts, the counted collectives and the chunked query search shared by the sharded ops.

Every sharded op follows one pattern (faiss ``IndexShards`` with exact merging):

1. the shard sizes are all-gathered once, so every rank knows every block's global offset;
2. the queries are all-gathered in chunks of ``query_chunk`` rows per rank, so each rank
   searches every rank's queries against its own block with the single-process op;
3. each rank sends back, for each query, only its ``k`` best candidates (per list) with their
   exact distances and global indices (``all_to_all_single``);
4. the query's owner merges the ``W k`` candidates by (distance, global index).

Why the merge is exact: the single-process kernels give each pair a distance that is a
function of the pair's two rows alone (``fastassoc.kernels.reference._tiles``), and the
local op breaks ties by the smaller local index, which is the global order inside a block.
So a block's local top-k are the first k of the global ranking restricted to that block,
the global top-k are among the union of the blocks' lists, and ordering that union by
(distance, global index) reproduces the single-process ranking. Distances travel in the
compute dtype (float32; float64 inputs: float64), the dtype the single-process op ranks in.

Bytes sent per rank are counted as a direct exchange would send them: ``all_gather`` of an
``s``-byte tensor sends ``(W - 1) s``; ``all_to_all_single`` sends the splits addressed to
the other ranks. :data:`BYTES_SENT` accumulates them in this process.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

# Bytes this process has sent through the sharded ops' collectives (see the module docstring).
BYTES_SENT = [0]

# Default number of query rows each rank contributes per gathered chunk.
QUERY_CHUNK = 4096


def _group_size(group) -> int:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("fastassoc.distributed needs an initialised process group: call "
                           "torch.distributed.init_process_group (torchrun sets the environment) first")
    return dist.get_world_size(group)


def all_gather_padded(tensor: torch.Tensor, sizes: list[int], group=None) -> list[torch.Tensor]:
    """All-gather rows of ``tensor`` whose row count differs per rank (``sizes[r]`` on rank ``r``).

    gloo and NCCL gather equal shapes only, so rows are padded to ``max(sizes)`` and cut after.
    Sends ``(W - 1) max(sizes) row_bytes``.
    """
    width = max(sizes) if sizes else 0
    rows = tensor.shape[0]
    if width == 0:
        return [tensor.new_empty((0,) + tuple(tensor.shape[1:])) for _ in sizes]
    padded = tensor.new_zeros((width,) + tuple(tensor.shape[1:]))
    padded[:rows] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    BYTES_SENT[0] += (len(sizes) - 1) * padded.numel() * padded.element_size()
    dist.all_gather(parts, padded.contiguous(), group=group)
    return [part[:size] for part, size in zip(parts, sizes)]


def all_to_all_rows(parts: list[torch.Tensor], receive_rows: list[int], group=None) -> list[torch.Tensor]:
    """Send ``parts[r]`` (rows of one trailing shape) to rank ``r``; return the rows received from each rank.

    ``receive_rows[r]`` is the number of rows rank ``r`` sends here (known to both sides).
    Sends ``sum over r != rank of parts[r]`` bytes.
    """
    rank = dist.get_rank(group)
    template = parts[0]
    tail = tuple(template.shape[1:])
    row_elems = math.prod(tail)
    send = torch.cat([p.reshape(-1) for p in parts]) if parts else template.new_empty(0)
    out = template.new_empty(sum(receive_rows) * row_elems)
    send_splits = [p.shape[0] * row_elems for p in parts]
    BYTES_SENT[0] += sum(s for r, s in enumerate(send_splits) if r != rank) * template.element_size()
    dist.all_to_all_single(out, send.contiguous(), [n * row_elems for n in receive_rows], send_splits,
                           group=group)
    return list(out.view((-1,) + tail).split(receive_rows)) if row_elems else \
        [template.new_empty((n,) + tail) for n in receive_rows]


def route_to_owners(owners: torch.Tensor, payloads: list[torch.Tensor], world_size: int, group=None
                    ) -> tuple[list[torch.Tensor], list[int], list[int]]:
    """Send row ``i`` of every payload to rank ``owners[i]``; return what this rank receives.

    A stable sort by owner keeps each rank's rows in their order, and the received rows are
    concatenated in sending-rank order: a row's receiver sees the rows in the order of the
    ranks' inputs concatenated in rank order (what makes the sharded ops' sums the
    single-process ones).

    Parameters
    ----------
    owners : Tensor [R], int64 in [0, world_size), the destination of each row
    payloads : Tensors [R, ...], rows sent together (each keeps its dtype and trailing shape)
    world_size : int, the size of ``group``

    Returns
    -------
    received : list of Tensor [S, ...], one per payload, ``S`` rows from all ranks
    send_counts : list of int, rows sent to each rank (what a reply to the senders gets back)
    receive_counts : list of int, rows received from each rank

    Sends ``8 (W - 1)`` (the counts) plus, per row owned by another rank, the row's bytes of
    every payload.
    """
    order = torch.argsort(owners, stable=True)
    send = torch.bincount(owners, minlength=world_size)
    receive_counts = torch.cat(all_to_all_rows(list(send.view(-1, 1).split(1)), [1] * world_size, group)
                               ).view(-1).tolist()
    send_counts = send.tolist()
    received = [torch.cat(all_to_all_rows(list(p[order].split(send_counts)), receive_counts, group))
                for p in payloads]
    return received, send_counts, receive_counts


@dataclass(frozen=True)
class ShardLayout:
    """Where every rank's contiguous block of rows sits in the concatenated (global) array.

    Attributes
    ----------
    sizes : list of int, rows per rank (0 allowed)
    offsets : list of int, ``len(sizes) + 1`` cumulative sizes: rank ``r`` holds global rows
        ``offsets[r] : offsets[r + 1]``
    rank : int, this process's rank in the group
    """

    sizes: list[int]
    offsets: list[int]
    rank: int

    @property
    def world_size(self) -> int:
        return len(self.sizes)

    @property
    def total(self) -> int:
        return self.offsets[-1]

    @property
    def offset(self) -> int:
        return self.offsets[self.rank]

    @property
    def size(self) -> int:
        return self.sizes[self.rank]

    def owner(self, index: torch.Tensor) -> torch.Tensor:
        """The rank holding each global row ``index`` (int64, in ``[0, total)``)."""
        starts = torch.tensor(self.offsets[1:], dtype=torch.int64, device=index.device)
        return torch.searchsorted(starts, index.contiguous(), right=True)


def exchange_counts(values: list[int], group=None, device=None) -> list[list[int]]:
    """All-gather a few integers per rank: ``result[r]`` is rank ``r``'s ``values``. Sends ``8 (W - 1) len(values)``.

    ``device``: where the collective runs (a CUDA device for NCCL, the CPU for gloo).
    """
    world = _group_size(group)
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    BYTES_SENT[0] += (world - 1) * mine.numel() * 8
    dist.all_gather(parts, mine, group=group)
    return [part.tolist() for part in parts]


def layout_from_sizes(sizes: list[int], group=None) -> ShardLayout:
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    return ShardLayout(sizes=list(sizes), offsets=offsets, rank=dist.get_rank(group))


def check_same(name: str, values: list, what: str) -> None:
    """Raise when ranks disagree on something that must be the same on every rank."""
    if any(v != values[0] for v in values):
        raise ValueError(f"{name} must be the same on every rank ({what}); got {values} over the ranks")


def merge_candidates(values: torch.Tensor, indices: torch.Tensor, extras: list[torch.Tensor], k: int
                     ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The ``k`` best of each row's candidates by (value, global index); padding ``(inf, -1)`` last.

    values, indices : Tensor [R, C]; extras : Tensors [R, C] carried along (e.g. edge weights).
    """
    key = torch.where(indices < 0, torch.iinfo(torch.int64).max, indices)
    by_index = torch.argsort(key, dim=1, stable=True)
    order = by_index.gather(1, torch.argsort(values.gather(1, by_index), dim=1, stable=True))[:, :k]
    return values.gather(1, order), indices.gather(1, order), [e.gather(1, order) for e in extras]


def sharded_search(queries: torch.Tensor, query_meta: torch.Tensor, layout_q: ShardLayout, k: int, num_lists: int,
                   local_search: Callable, value_dtype: torch.dtype, num_extras: int = 0, *, query_chunk: int,
                   group=None) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Search every rank's queries against every rank's block; merge each query's lists on its owner.

    Parameters
    ----------
    queries : Tensor [b, D], this rank's queries (``layout_q.sizes[rank] == b``)
    query_meta : Tensor [b, M], int64, per-query integers the local search needs (segments, ...)
    layout_q : ShardLayout of the queries
    k : int, candidates kept per list
    num_lists : int, lists per query (1, or one per camera)
    local_search : callable ``(queries [q, D], meta [q, M]) -> (values [q, L, k] value_dtype,
        global indices [q, L, k] int64, extras list of [q, L, k] float)`` on this rank's block
    value_dtype : dtype of the distances (the compute dtype)
    num_extras : how many extra per-candidate float tensors ``local_search`` returns (sent as float64)
    query_chunk : int >= 1, query rows per rank per gathered chunk

    Returns
    -------
    values [b, L, k], indices [b, L, k], extras: each query's merged lists.

    Bytes sent per rank: per chunk ``(W - 1) c (D e + 8 M)`` for the gathered queries
    (``c = min(query_chunk, max_r b_r)``, ``e`` the feature element size), and
    ``sum_{r != rank} b_r L k (8 + v (1 + X))`` for the returned candidates (``v`` = 4 for float32
    distances without extras, else 8: the payload then travels as float64; ``X = num_extras``).
    """
    world, rank = layout_q.world_size, layout_q.rank
    num_local, dim = queries.shape
    device = queries.device
    out_values = torch.full((num_local, num_lists, k), math.inf, dtype=value_dtype, device=device)
    out_indices = torch.full((num_local, num_lists, k), -1, dtype=torch.int64, device=device)
    out_extras = [torch.zeros((num_local, num_lists, k), dtype=torch.float64, device=device)
                  for _ in range(num_extras)]
    most = max(layout_q.sizes)
    if most == 0 or k == 0:
        return out_values, out_indices, out_extras
    chunk = min(query_chunk, most)
    for start in range(0, most, chunk):
        counts = [max(0, min(chunk, size - start)) for size in layout_q.sizes]
        gathered = all_gather_padded(queries[start:start + counts[rank]], [chunk] * world, group)
        metas = all_gather_padded(query_meta[start:start + counts[rank]], [chunk] * world, group)
        rows = torch.cat([g[:n] for g, n in zip(gathered, counts)])
        meta = torch.cat([m[:n] for m, n in zip(metas, counts)])
        values, indices, extras = local_search(rows, meta)
        # One float64 payload row per candidate: value, then the extras (index travels as int64).
        payload = torch.stack([values.to(torch.float64)] + [e.to(torch.float64) for e in extras], -1)
        if value_dtype == torch.float32 and not extras:
            payload = values.to(torch.float32).unsqueeze(-1)
        back_payload = all_to_all_rows(list(payload.split(counts)), [counts[rank]] * world, group)
        back_indices = all_to_all_rows(list(indices.split(counts)), [counts[rank]] * world, group)
        mine = counts[rank]
        if mine == 0:
            continue
        # [W, mine, L, k, P] -> [mine * L, W k]
        stacked = torch.stack(back_payload).permute(1, 2, 0, 3, 4).reshape(mine * num_lists, world * k, -1)
        cand_indices = torch.stack(back_indices).permute(1, 2, 0, 3).reshape(mine * num_lists, world * k)
        cand_values = stacked[..., 0].to(value_dtype)
        merged_values, merged_indices, merged_extras = merge_candidates(
            cand_values, cand_indices, [stacked[..., 1 + x] for x in range(num_extras)], k)
        out_values[start:start + mine] = merged_values.view(mine, num_lists, k)
        out_indices[start:start + mine] = merged_indices.view(mine, num_lists, k)
        for x in range(num_extras):
            out_extras[x][start:start + mine] = merged_extras[x].view(mine, num_lists, k)
    return out_values, out_indices, out_extras
