"""In-place exponential-moving-average memory update (DAL Eq. 1, UTAL Eq. 3, TSSL Eq. 6)."""
from __future__ import annotations

import torch

from .. import _backend
from . import _checks

REDUCTIONS = ("mean", "sum", "sequential")


def ema_update_(bank: torch.Tensor, index: torch.Tensor, values: torch.Tensor, momentum: float, *,
                normalize: bool = True, reduce: str = "mean", backend: str = "auto") -> torch.Tensor:
    r"""Update rows of a memory bank in place by exponential moving average.

    For every distinct ``i`` in ``index``:
    :math:`\mathrm{bank}_i \leftarrow m\,\mathrm{bank}_i + (1-m)\,\mathrm{reduce}(\{v_b : \mathrm{index}_b = i\})`.

    Parameters
    ----------
    bank : Tensor [M, D], float; updated in place
    index : Tensor [B], integer in [0, M); duplicates allowed
    values : Tensor [B, D], same dtype and device as ``bank``
    momentum : float in [0, 1]
    normalize : bool
        L2-normalise the values first and every updated row after.
    reduce : {"mean", "sum", "sequential"}
        How several values for one row combine: their mean, their sum (DAL's public
        code), or one update per value in ``index`` order (normalising after each one
        when ``normalize``).
    backend : {"auto", "reference", "cpu", "triton", "cuda"}

    Returns
    -------
    bank (the same tensor).
    """
    if isinstance(bank, torch.Tensor) and not bank.is_contiguous():
        raise ValueError("bank must be contiguous so it can be updated in place")
    bank = _checks.features("bank", bank)
    values = _checks.features("values", values)
    _checks.same_device(bank=bank, values=values)
    _checks.same_dtype(bank=bank, values=values)
    _checks.same_feature_dim(bank=bank, values=values)
    index = _checks.index_vector("index", index, length=values.shape[0], low=0, high=bank.shape[0],
                                 device=bank.device)
    momentum = _checks.real("momentum", momentum, low=0.0, high=1.0)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    reduce = _checks.choice("reduce", reduce, REDUCTIONS)
    _, impl = _backend.resolve("ema_update_", backend, {"bank": bank, "index": index, "values": values})
    impl(bank, index, values, momentum, normalize, reduce)
    return bank
