"""Triton memory EMA: ``ema_update_triton``, one kernel, deterministic with duplicates.

Algorithm
---------
The host stably sorts ``index`` (``torch.sort(stable=True)``), so equal rows form
runs whose entries keep their ``index`` order, and marks for every sorted position
the end of its run when it is the run's first entry (``run_end[p] = p`` otherwise).
All of this is sync-free torch work on the tensors' device: no host round trip, so the
update can be captured in a CUDA graph.

The kernel runs one program per sorted position ``p``; only run heads do work. A head
loads its bank row once into registers (``BLOCK_D = next_power_of_2(D)`` lanes), walks
its run's values in ``index`` order and

* ``sum`` / ``mean``: adds the (L2-normalised when ``normalize``) values, divides by
  the run length for ``mean``, then ``row <- m * row + (1 - m) * total``;
* ``sequential``: applies ``row <- m * row + (1 - m) * value`` per value, normalising
  after each step when ``normalize``;

and finally normalises (``sum``/``mean`` with ``normalize``) and stores the row once.
Distinct programs write distinct rows, so there are no races and no atomics: results
are bit-identical from run to run and independent of how duplicates are spread.

Must equal ``fastassoc.kernels.reference.memory.ema_update_reference`` (same
``x / max(|x|, 1e-12)`` normalisation, same summation order); values agree within
float32 rounding (the kernel keeps the row in float32 across sequential steps, as the
reference does, and rounds to the bank dtype once).

Limits: the row lives in registers, so very wide rows (D above ~16k) spill to local
memory (slower, still correct); ``D`` at most 2**20 (Triton's block limit).
Arithmetic is float32 (float64 banks stay float64).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._backend import triton_interpret
from ._common import launch

_EPS = tl.constexpr(1e-12)  # torch.nn.functional.normalize's eps
_MAX_BLOCK_D = 1 << 20


@triton.jit
def _bfloat16_rne(x):
    """float32 -> bfloat16 rounding to nearest even, by bit arithmetic.

    GPUs round ``.to(tl.bfloat16)`` to nearest even, as torch does; the Triton CPU
    interpreter truncates instead, so interpreted kernels use this (finite inputs).
    """
    bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _ema_update_kernel(
    # pointers
    bank_ptr, values_ptr, order_ptr, sorted_index_ptr, run_end_ptr, momentum_ptr,
    # sizes
    dim,
    # strides
    stride_bank, stride_values,
    # meta-parameters
    NORMALIZE: tl.constexpr, REDUCE: tl.constexpr, ACC_DTYPE: tl.constexpr, BF16_RNE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # REDUCE: 0 = mean, 1 = sum, 2 = sequential.
    position = tl.program_id(0)
    run_start = position
    run_end = tl.load(run_end_ptr + position)
    is_head = run_end > run_start
    row = tl.load(sorted_index_ptr + position)

    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    bank_ptrs = bank_ptr + row * stride_bank + offs_d
    keep = tl.load(momentum_ptr).to(ACC_DTYPE)
    mix = tl.load(momentum_ptr + 1).to(ACC_DTYPE)
    state = tl.load(bank_ptrs, mask=mask_d & is_head, other=0.0).to(ACC_DTYPE)
    total = tl.zeros([BLOCK_D], dtype=ACC_DTYPE)

    for k in range(run_start, run_end):
        source = tl.load(order_ptr + k)
        value = tl.load(values_ptr + source * stride_values + offs_d, mask=mask_d, other=0.0).to(ACC_DTYPE)
        if NORMALIZE:
            value = value / tl.maximum(tl.sqrt(tl.sum(value * value, axis=0)), _EPS)
        if REDUCE == 2:
            state = keep * state + mix * value
            if NORMALIZE:
                state = state / tl.maximum(tl.sqrt(tl.sum(state * state, axis=0)), _EPS)
        else:
            total += value

    if REDUCE != 2:
        if REDUCE == 0:
            # Non-heads have an empty run; max(., 1) keeps their (unstored) row finite.
            total = total / tl.maximum(run_end - run_start, 1).to(ACC_DTYPE)
        state = keep * state + mix * total
        if NORMALIZE:
            state = state / tl.maximum(tl.sqrt(tl.sum(state * state, axis=0)), _EPS)

    if BF16_RNE:
        stored = _bfloat16_rne(state)
    else:
        stored = state.to(bank_ptr.dtype.element_ty)
    tl.store(bank_ptrs, stored, mask=mask_d & is_head)


_REDUCE_CODES = {"mean": 0, "sum": 1, "sequential": 2}


def sorted_runs(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group duplicates of ``index`` without a host sync.

    Parameters
    ----------
    index : Tensor [B], int64

    Returns
    -------
    order : Tensor [B], int64
        Positions into ``index`` sorted stably by value (duplicates keep ``index`` order).
    sorted_index : Tensor [B], int64
        ``index[order]``.
    run_end : Tensor [B], int64
        For the first sorted position of each run of equal values, the position one
        past the run's end; for every other position, the position itself (empty run).
    """
    sorted_index, order = torch.sort(index, stable=True)
    count = index.shape[0]
    positions = torch.arange(count, device=index.device)
    is_head = torch.ones(count, dtype=torch.bool, device=index.device)
    is_head[1:] = sorted_index[1:] != sorted_index[:-1]
    # next_head[p] = first head strictly after p (count if none): a reversed running min.
    head_positions = torch.where(is_head, positions, torch.full_like(positions, count))
    following = torch.cat([head_positions[1:], head_positions.new_full((1,), count)])
    next_head = torch.flip(torch.cummin(torch.flip(following, (0,)), 0).values, (0,))
    run_end = torch.where(is_head, next_head, positions)
    return order, sorted_index, run_end


def ema_update_triton(bank: torch.Tensor, index: torch.Tensor, values: torch.Tensor, momentum: float,
                      normalize: bool, reduce: str) -> None:
    """Triton launcher of the in-place memory EMA (see the module docstring).

    Parameters as ``ema_update_reference`` (``bank`` updated in place); feature
    dimensions above ``_MAX_BLOCK_D`` raise ``ValueError``.
    """
    count, dim = values.shape
    if count == 0 or dim == 0:
        return
    block_d = triton.next_power_of_2(dim)
    if block_d > _MAX_BLOCK_D:
        raise ValueError(f"ema_update_ (triton): feature dimension {dim} exceeds {_MAX_BLOCK_D}; "
                         "use backend='reference'")
    acc_dtype = torch.float64 if bank.dtype == torch.float64 else torch.float32
    values = values.detach().contiguous()
    order, sorted_index, run_end = sorted_runs(index)
    # Through memory so float64 banks keep a float64 momentum (Triton passes floats as
    # fp32); filled on the device, without a host-to-device copy.
    momentum_pair = torch.full((2,), momentum, dtype=acc_dtype, device=bank.device)
    momentum_pair[1] = 1.0 - momentum
    num_warps = 4 if block_d <= 2048 else 8
    launch(
        _ema_update_kernel, (count,),
        bank, values, order, sorted_index, run_end, momentum_pair,
        dim,
        bank.stride(0), values.stride(0), device=bank.device, op="ema_update_",
        NORMALIZE=normalize, REDUCE=_REDUCE_CODES[reduce],
        ACC_DTYPE=tl.float64 if acc_dtype == torch.float64 else tl.float32,
        BF16_RNE=bank.dtype == torch.bfloat16 and triton_interpret(),
        BLOCK_D=block_d, num_warps=num_warps,
    )
