"""CUDA C++ memory EMA launcher: ``ema_update_cuda`` -> ``fastassoc._C.cuda_ema_update``.

The kernel (csrc/cuda/memory.cu) runs one warp per distinct row of ``index``: the
host side here only sorts ``index`` stably on the device (no host sync) and hands
pointers, sizes and torch's current stream to the compiled core. Duplicates are
handled deterministically (one owner warp per row, values in ``index`` order).
Must equal ``fastassoc.kernels.reference.memory.ema_update_reference`` within
float32 rounding.
"""
from __future__ import annotations

import torch

from ... import _backend

# Rows wider than this leave registers for a global scratch buffer (see memory.cu).
_REGISTER_DIM_LIMIT = 2048

_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
                torch.bfloat16: "bfloat16"}


def ema_update_cuda(bank: torch.Tensor, index: torch.Tensor, values: torch.Tensor, momentum: float,
                    normalize: bool, reduce: str) -> None:
    """In-place memory EMA with the CUDA C++ kernel (see the module docstring).

    Parameters
    ----------
    bank : Tensor [M, D], float, contiguous, CUDA; updated in place
    index : Tensor [B], int64 in [0, M); duplicates allowed
    values : Tensor [B, D], bank's dtype
    momentum : float in [0, 1]
    normalize : bool
    reduce : {"mean", "sum", "sequential"}
    """
    count, dim = values.shape
    if count == 0 or dim == 0:
        return
    core = _backend.compiled_core()
    values = values.detach().contiguous()
    sorted_index, order = torch.sort(index, stable=True)
    scratch = None
    if dim > _REGISTER_DIM_LIMIT:
        accumulator = torch.float64 if bank.dtype == torch.float64 else torch.float32
        padded = -(-dim // 32) * 32  # whole warps per row, as memory.cu expects
        scratch = torch.empty((count, 2 * padded), dtype=accumulator, device=bank.device)
    stream = torch.cuda.current_stream(bank.device).cuda_stream
    with torch.cuda.device(bank.device):
        core.cuda_ema_update(bank.data_ptr(), values.data_ptr(), order.data_ptr(), sorted_index.data_ptr(),
                             count, dim, float(momentum), bool(normalize), reduce, _DTYPE_NAMES[bank.dtype],
                             0 if scratch is None else scratch.data_ptr(), stream)
