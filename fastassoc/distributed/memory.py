"""Sharded :func:`fastassoc.ema_update_`: every update routed to the rank that owns its bank row."""
from __future__ import annotations

import torch

from .. import ops as _ops
from ._checks import agree
from ._comm import layout_from_sizes, route_to_owners


def ema_update_(bank: torch.Tensor, index: torch.Tensor, values: torch.Tensor, momentum: float, *,
                normalize: bool = True, reduce: str = "mean", backend: str = "auto", group=None) -> torch.Tensor:
    r"""Sharded :func:`fastassoc.ema_update_` of a bank split by rows over ``group``.

    ``bank`` is this rank's block (global rows ``offset : offset + n``); ``index`` holds
    **global** rows and ``values`` the matching features of this rank's batch. The update
    equals the single-process ``ema_update_(cat(bank), cat(index), cat(values), ...)`` with
    every rank's batch concatenated in rank order: each entry travels to the owner of its
    row (a stable sort by owner keeps each rank's order, and the owner receives the ranks in
    rank order), so every row sees its values in the same order as the single-process op
    (``reduce="sequential"`` and the float sums of ``"mean"``/``"sum"`` included). Collective.

    Parameters
    ----------
    bank : Tensor [n, D], float, contiguous; this rank's block, updated in place (n may be 0)
    index : Tensor [B], integer in [0, N), global rows; duplicates allowed
    values : Tensor [B, D], same dtype as ``bank``
    momentum, normalize, reduce, backend : as in :func:`fastassoc.ema_update_`
    group : ProcessGroup, optional

    Returns
    -------
    bank (the same tensor)

    Communication
    -------------
    Bytes sent per rank: ``24 (W - 1)`` (sizes, argument check), ``8 (W - 1)`` (entry counts)
    and ``D e + 8`` per entry of this rank's batch owned by another rank (``e`` the bank's
    element size).
    """
    error = None
    try:
        bank_rows = _ops._checks.features("bank", bank)
        values = _ops._checks.features("values", values)
        _ops._checks.same_dtype(bank=bank_rows, values=values)
        _ops._checks.same_feature_dim(bank=bank_rows, values=values)
        index = _ops._checks.index_vector("index", index, length=values.shape[0], low=0, high=2 ** 62,
                                          device=bank.device)
        highest = int(index.max()) if index.numel() else -1
        _ops._checks.real("momentum", momentum, low=0.0, high=1.0)
        _ops._checks.choice("reduce", reduce, ("mean", "sum", "sequential"))
    except (TypeError, ValueError) as caught:
        error = caught
    stats = agree(error, None if error else [bank.shape[0], highest], 2, group,
                  bank.device if isinstance(bank, torch.Tensor) else None)
    layout = layout_from_sizes([s[0] for s in stats], group)
    if max(s[1] for s in stats) >= layout.total:
        raise ValueError(f"index must be in [0, {layout.total}) (global rows of the bank over all ranks); "
                         f"got {max(s[1] for s in stats)} on rank {max(range(len(stats)), key=lambda r: stats[r][1])}")
    (routed_index, routed_values), _, _ = route_to_owners(layout.owner(index), [index, values], layout.world_size,
                                                          group)
    if bank.shape[0]:
        _ops.ema_update_(bank, routed_index - layout.offset, routed_values, momentum, normalize=normalize,
                         reduce=reduce, backend=backend)
    return bank
