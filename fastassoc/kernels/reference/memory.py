"""Reference in-place memory EMA: the spec and oracle of ``ema_update_``.

Algorithm
---------
For every distinct row ``i`` of ``index`` [B] (values [B, D]):

* ``mean`` / ``sum``: ``bank[i] <- m * bank[i] + (1 - m) * reduce(values b with index[b] = i)``;
* ``sequential``: one update ``bank[i] <- m * bank[i] + (1 - m) * values[b]`` per
  ``b`` in ``index`` order.

With ``normalize`` the values are L2-normalised first and each updated row after
every update (``x / max(|x|, 1e-12)``, as ``torch.nn.functional.normalize``; a zero
row stays zero). Rows not in ``index`` are untouched, bit for bit.

Determinism: duplicates are grouped by a stable sort and then visited by
*occurrence rank*: pass ``r`` handles the ``r``-th occurrence of every row at once.
Within a pass the rows are distinct, so no scatter ever races, and each row's
values are added (``sum``/``mean``) or applied (``sequential``) in ``index`` order,
the order a plain Python loop uses, on every device. Cost: O(B log B + B D) work in
``max multiplicity`` vectorised passes (one pass when ``index`` has no duplicates).

Arithmetic is float32 (float64 stays float64); the state of a row between
sequential updates is kept in that precision and rounded to the bank dtype once,
when written back. Runs under ``no_grad``: ``values`` may require grad, the bank is
a buffer.
"""
from __future__ import annotations

import torch

from ._tiles import compute_dtype


def _normalize_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=1, eps=1e-12)


def _occurrence_passes(index: torch.Tensor):
    """Group duplicates of ``index`` [B] by occurrence rank.

    Returns ``(rows, counts, order, group, pass_bounds)``: ``rows`` [U] the distinct
    indices (ascending) and ``counts`` [U] their multiplicities; ``order`` [B] positions
    into ``index`` sorted by (occurrence rank, row), so pass ``r`` is
    ``order[pass_bounds[r]:pass_bounds[r+1]]``; ``group`` [B], aligned with ``order``,
    the position in ``rows`` of each entry (distinct within a pass).
    """
    sorted_index, by_row = torch.sort(index, stable=True)
    rows, counts = torch.unique_consecutive(sorted_index, return_counts=True)
    group_sorted = torch.repeat_interleave(torch.arange(rows.shape[0], device=index.device), counts,
                                           output_size=index.shape[0])
    group_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(index.shape[0], device=index.device) - group_start[group_sorted]
    # Stable sort by rank keeps ascending row order inside a pass and, since by_row
    # is stable, the r-th pass holds exactly the r-th occurrence of every row.
    rank_sorted, by_rank = torch.sort(rank, stable=True)
    order = by_row[by_rank]
    group = group_sorted[by_rank]
    pass_sizes = torch.bincount(rank_sorted)
    pass_bounds = [0] + torch.cumsum(pass_sizes, 0).tolist()
    return rows, counts, order, group, pass_bounds


@torch.no_grad()
def ema_update_reference(bank: torch.Tensor, index: torch.Tensor, values: torch.Tensor, momentum: float,
                         normalize: bool, reduce: str) -> None:
    """Update ``bank`` rows in place by exponential moving average.

    Parameters
    ----------
    bank : Tensor [M, D], float, contiguous; updated in place
    index : Tensor [B], int64 in [0, M); duplicates allowed
    values : Tensor [B, D], bank's dtype
    momentum : float in [0, 1]
    normalize : bool
    reduce : {"mean", "sum", "sequential"}
    """
    if index.shape[0] == 0:
        return
    dtype = compute_dtype(bank)
    values = values.detach().to(dtype)
    if normalize:
        values = _normalize_rows(values)
    rows, counts, order, group, pass_bounds = _occurrence_passes(index)
    state = bank.index_select(0, rows).to(dtype)                                   # [U, D]

    if reduce == "sequential":
        for r in range(len(pass_bounds) - 1):
            lo, hi = pass_bounds[r], pass_bounds[r + 1]
            touched = group[lo:hi]
            updated = momentum * state[touched] + (1.0 - momentum) * values[order[lo:hi]]
            state[touched] = _normalize_rows(updated) if normalize else updated
    else:
        total = torch.zeros_like(state)
        for r in range(len(pass_bounds) - 1):
            lo, hi = pass_bounds[r], pass_bounds[r + 1]
            total[group[lo:hi]] += values[order[lo:hi]]
        if reduce == "mean":
            total /= counts.to(dtype).unsqueeze(1)
        state = momentum * state + (1.0 - momentum) * total
        if normalize:
            state = _normalize_rows(state)

    bank.index_copy_(0, rows, state.to(bank.dtype))
