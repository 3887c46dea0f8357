"""In-place exponential-moving-average memory update (DAL Eq. 1, UTAL Eq. 3, TSSL Eq. 6)."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from . import _checks
from ._custom import backend_name, fake_features, fake_index, fake_same_feature_dim, flag, tensor_input

REDUCTIONS = ("mean", "sum", "sequential")


def _refuse_autograd_bank(bank: torch.Tensor) -> None:
    """Refuse what torch refuses for an in-place op on ``bank``, and what it cannot differentiate.

    The op has no derivative, so a bank inside an autograd graph would keep its old
    ``grad_fn`` while its values change: gradients through it would be silently wrong.
    Under ``torch.no_grad`` both are allowed, as they are for torch's own in-place ops.
    """
    if not (bank.requires_grad and torch.is_grad_enabled()):
        return
    if bank.is_leaf:
        raise RuntimeError("a leaf Variable that requires grad is being used in an in-place operation. "
                           "(fastassoc.ema_update_: bank is a leaf that requires grad; pass a buffer that does "
                           "not require grad, or call it under torch.no_grad())")
    raise RuntimeError(f"fastassoc.ema_update_ is not differentiable, but bank is part of an autograd graph "
                       f"(grad_fn={type(bank.grad_fn).__name__}); updating it in place would silently cut the "
                       "gradient through it. Update a detached buffer (bank.detach()) or call it under "
                       "torch.no_grad()")


def ema_update_(bank: torch.Tensor, index: torch.Tensor, values: torch.Tensor, momentum: float, *,
                normalize: bool = True, reduce: str = "mean", backend: str = "auto") -> torch.Tensor:
    r"""Update rows of a memory bank in place by exponential moving average.

    For every distinct ``i`` in ``index``:
    :math:`\mathrm{bank}_i \leftarrow m\,\mathrm{bank}_i + (1-m)\,\mathrm{reduce}(\{v_b : \mathrm{index}_b = i\})`.

    Not differentiable: behaves as under ``torch.no_grad`` (``values`` that require grad
    are accepted and detached). It is an in-place op on every backend, as torch's own:
    ``bank``'s version counter is bumped, so a graph that saved ``bank`` for backward
    raises torch's "modified by an inplace operation" error on ``backward()``; under
    grad mode a ``bank`` that is a leaf requiring grad is rejected with torch's error,
    and one that is part of an autograd graph is rejected too (its gradient would be
    silently wrong). Runs as the custom op ``torch.ops.fastassoc.ema_update_``
    (``mutates_args=("bank",)``), so ``torch.compile`` traces it.

    Parameters
    ----------
    bank : Tensor [M, D], float, contiguous; updated in place
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
    if not isinstance(bank, torch.Tensor):
        _checks.features("bank", bank)  # raises its TypeError
    _refuse_autograd_bank(bank)
    index = tensor_input("index", index)
    values = tensor_input("values", values)
    momentum = _checks.real("momentum", momentum, low=0.0, high=1.0)
    normalize = flag("normalize", normalize)
    reduce = _checks.choice("reduce", reduce, REDUCTIONS)
    torch.ops.fastassoc.ema_update_(bank, index, values, momentum, normalize, reduce, backend_name(backend))
    return bank


@torch.library.custom_op("fastassoc::ema_update_", mutates_args=("bank",))
def _ema_update_op(bank: Tensor, index: Tensor, values: Tensor, momentum: float, normalize: bool, reduce: str,
                   backend: str) -> None:
    if not bank.is_contiguous():
        raise ValueError("bank must be contiguous so it can be updated in place")
    bank = _checks.features("bank", bank)
    values = _checks.features("values", values)
    _checks.same_device(bank=bank, values=values)
    _checks.same_dtype(bank=bank, values=values)
    _checks.same_feature_dim(bank=bank, values=values)
    index = _checks.index_vector("index", index, length=values.shape[0], low=0, high=bank.shape[0],
                                 device=bank.device)
    momentum = _checks.real("momentum", momentum, low=0.0, high=1.0)
    normalize = flag("normalize", normalize)
    reduce = _checks.choice("reduce", reduce, REDUCTIONS)
    _, impl = _backend.resolve("ema_update_", backend, {"bank": bank, "index": index, "values": values})
    impl(bank, index, values, momentum, normalize, reduce)


@_ema_update_op.register_fake
def _ema_update_fake(bank, index, values, momentum, normalize, reduce, backend):
    if not bank.is_contiguous():
        raise ValueError("bank must be contiguous so it can be updated in place")
    fake_features("bank", bank)
    fake_features("values", values)
    _checks.same_device(bank=bank, values=values)
    _checks.same_dtype(bank=bank, values=values)
    fake_same_feature_dim(bank=bank, values=values)
    fake_index("index", index, length=values.shape[0], device=bank.device)
    return None
