"""Argument agreement across ranks: a bad argument on one rank raises on every rank instead of
leaving the others waiting in a collective."""
from __future__ import annotations

import torch

from ._comm import ShardLayout, exchange_counts, layout_from_sizes


def value_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the single-process ops rank distances in: float64 stays float64, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def agree(error: BaseException | None, values: list[int] | None, width: int, group=None, device=None
          ) -> list[list[int]]:
    """All-gather ``values`` (``width`` integers) with an ok flag; raise on every rank when any rank failed.

    The rank whose own check failed re-raises its error; the others raise a ValueError naming
    the failing ranks. Sends ``8 (W - 1) (width + 1)`` bytes.
    """
    mine = [0] + [0] * width if error is not None else [1] + [int(v) for v in values]
    if len(mine) != width + 1:
        raise AssertionError(f"agree: {len(mine) - 1} values for width {width}")
    gathered = exchange_counts(mine, group, device)
    failed = [rank for rank, row in enumerate(gathered) if row[0] == 0]
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"the arguments of rank(s) {failed} were refused there (see their error); every rank "
                         "stops so that none waits in a collective")
    return [row[1:] for row in gathered]


def agree_rows(error: BaseException | None, name: str, x, extra: list[int] | None, width: int, group=None
               ) -> tuple[ShardLayout, list[list[int]]]:
    """:func:`agree` on this rank's rows of ``x`` [n, D] and ``width`` more integers ``extra``.

    ``extra`` is read only when ``error`` is None. Raises when the ranks' ``D`` differ. Returns
    the rows' layout and each rank's ``extra``. Sends ``8 (W - 1) (width + 3)`` bytes.
    """
    device = x.device if isinstance(x, torch.Tensor) else None
    stats = agree(error, None if error else [x.shape[0], x.shape[1], *extra], width + 2, group, device)
    if len({s[1] for s in stats}) > 1:
        raise ValueError(f"{name} must have the same feature dimension on every rank; got {[s[1] for s in stats]}")
    return layout_from_sizes([s[0] for s in stats], group), [s[2:] for s in stats]
