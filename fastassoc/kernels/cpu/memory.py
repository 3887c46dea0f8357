"""Compiled CPU launcher of ``ema_update_`` (csrc/cpu/memory.cpp).

The C++ kernel groups the positions of ``index`` by row with a stable counting sort
and updates the distinct rows in parallel (OpenMP), each row by one thread visiting
its values in ``index`` order: deterministic with duplicates and independent of the
thread count. It must equal
:func:`fastassoc.kernels.reference.memory.ema_update_reference` within float32
rounding (the kernel accumulates in double).

float32 and float64 banks are updated in place directly. float16/bfloat16 banks are
updated through a float32 copy of the touched rows only (never the whole bank),
rounded back once, as the reference does.
"""
from __future__ import annotations

import torch

from ._core import core, ptr

_REDUCE_CODES = {"mean": 0, "sum": 1, "sequential": 2}


def _launch(bank: torch.Tensor, index: torch.Tensor, values: torch.Tensor, momentum: float, normalize: bool,
            reduce: str) -> None:
    kernel = core().ema_update_f64 if bank.dtype == torch.float64 else core().ema_update_f32
    kernel(ptr(bank), bank.shape[0], bank.shape[1], ptr(index), index.shape[0], ptr(values), float(momentum),
           bool(normalize), _REDUCE_CODES[reduce])


@torch.no_grad()
def ema_update_cpu(bank: torch.Tensor, index: torch.Tensor, values: torch.Tensor, momentum: float,
                   normalize: bool, reduce: str) -> None:
    """Update ``bank`` rows in place by exponential moving average.

    Parameters
    ----------
    bank : Tensor [M, D], float, contiguous CPU; updated in place
    index : Tensor [B], int64 in [0, M); duplicates allowed
    values : Tensor [B, D], bank's dtype
    momentum : float in [0, 1]
    normalize : bool
    reduce : {"mean", "sum", "sequential"}
    """
    if index.shape[0] == 0 or bank.shape[1] == 0:
        return
    index = index.contiguous()
    values = values.detach().contiguous()
    if bank.dtype in (torch.float32, torch.float64):
        _launch(bank, index, values, momentum, normalize, reduce)
        return
    rows, local_index = torch.unique(index, sorted=True, return_inverse=True)
    state = bank.index_select(0, rows).to(torch.float32).contiguous()
    _launch(state, local_index.contiguous(), values.to(torch.float32).contiguous(), momentum, normalize, reduce)
    bank.index_copy_(0, rows, state.to(bank.dtype))
