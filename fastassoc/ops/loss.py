"""Camera-segmented soft cross-entropy (UTAL Eq. 7, UGA Eq. 8, EEA Eq. 10, TSSL Eq. 7).

The loss is a pair of torch custom ops with autograd registered between them, so that
``torch.compile(fullgraph=True)`` sees two opaque nodes (one in the forward graph, one
in the backward graph) and the backends never appear to dynamo:

* ``fastassoc::segmented_cross_entropy_forward(features, weight, crow, col, values,
  class_offsets, scale, backend) -> (loss, lse, target_mass)``: validates every value
  (``_checks``), resolves the backend and runs its forward; ``lse`` and ``target_mass``
  [B, S] (per-(row, segment) logsumexp and target mass) are what the backward needs.
* ``fastassoc::segmented_cross_entropy_backward(grad_loss, features, weight, crow, col,
  values, class_offsets, lse, target_mass, scale, backend, need_features, need_weight)
  -> (grad_features, grad_weight)``: the same backend's backward (an output that is not
  needed comes back empty, shape [0]).

Only ``features`` and ``weight`` are differentiable. The backward op is not itself
differentiable (once-differentiable, like most fused losses): a double backward raises.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from . import _checks
from ._sparse import CSRMatrix
from ..segments import renumber_csr_columns, segments_from_labels
from ._custom import backend_name, fake_features, fake_index, fake_same_feature_dim, tensor_input

OP = "segmented_cross_entropy"


def segmented_cross_entropy(features: torch.Tensor, weight: torch.Tensor, targets, *,
                            class_offsets: torch.Tensor | None = None,
                            class_segments: torch.Tensor | None = None, scale: float = 1.0,
                            backend: str = "auto") -> torch.Tensor:
    r"""Soft-target cross-entropy with one softmax per class segment (camera).

    .. math::
        z_{bj} = s\, f_b \cdot w_j, \qquad
        L = \frac{1}{B} \sum_b \sum_j t_{bj}
            \Big(\log \sum_{j' \in \mathrm{seg}(j)} e^{z_{bj'}} - z_{bj}\Big)

    With one segment per camera this is UTAL's per-camera branch loss (Eq. 7 with the
    soft labels of Eqs. 4-6), UGA's graph-weighted cross-camera loss (Eq. 8) and EEA's
    weighted intra + inter camera loss (Eq. 10); with one segment, TSSL's cluster loss
    (Eq. 7, ``scale = 1 / tau``). Never holds the full ``B x C`` logits beyond a bounded tile.

    Differentiable in ``features`` and ``weight`` (once: a double backward raises);
    ``targets`` and ``class_offsets`` are constants. Runs as the custom ops
    ``torch.ops.fastassoc.segmented_cross_entropy_forward`` / ``_backward``, so
    ``torch.compile(fullgraph=True)`` traces it, backward included, without graph breaks
    (pass ``targets`` as a :class:`fastassoc.CSRMatrix` there: dynamo cannot take sparse
    tensors). Output shapes follow from input shapes, so it also runs on meta tensors.

    Parameters
    ----------
    features : Tensor [B, D], float; differentiable
    weight : Tensor [C, D], same dtype and device; differentiable
    targets : sparse CSR Tensor [B, C] or :class:`fastassoc.CSRMatrix` of size (B, C)
        Non-negative, finite target weights; repeated columns in a row add up.
    class_offsets : Tensor [S+1], integer, optional
        Classes ``class_offsets[s] : class_offsets[s+1]`` share one softmax. Default: one segment.
    class_segments : Tensor [C], integer >= 0, optional
        The segment label of every class (e.g. the camera of each class row), in any order,
        instead of ``class_offsets``: classes sharing a label share one softmax. Runs on the
        label-sorted rows of ``weight`` (one C x D gather; gradients reach the caller's rows)
        with ``targets``' columns renumbered to match; the loss is unchanged.
    scale : float
        Logit scale ``s`` (``1/tau`` for temperature ``tau``); refused when ``s f.w`` can
        overflow the compute dtype.
    backend : {"auto", "reference", "cpu", "triton", "cuda"}

    Returns
    -------
    Tensor [], the loss, in ``features``' dtype (float32 accumulation).

    Examples
    --------
    >>> import torch, fastassoc
    >>> features = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    >>> weight = torch.eye(2)
    >>> targets = fastassoc.CSRMatrix(torch.tensor([0, 1, 2]), torch.tensor([0, 1]), torch.ones(2), (2, 2))
    >>> loss = fastassoc.segmented_cross_entropy(features, weight, targets, backend="reference")
    >>> round(loss.item(), 4)  # log(1 + e^-1)
    0.3133
    >>> loss.backward(); features.grad.shape
    torch.Size([2, 2])
    """
    features = _differentiable_input("features", features)
    weight = _differentiable_input("weight", weight)
    crow, col, values = _target_components(targets, features, weight)
    class_offsets = None if class_offsets is None else tensor_input("class_offsets", class_offsets)
    if class_segments is not None:
        if class_offsets is not None:
            raise ValueError("give class_offsets (classes already grouped) or class_segments (a label per class), "
                             "not both")
        fake_features("features", features)
        fake_features("weight", weight)
        layout = segments_from_labels(tensor_input("class_segments", class_segments), length=weight.shape[0],
                                      device=weight.device, name="class_segments")
        weight = weight[layout.order]
        crow, col, values, _ = renumber_csr_columns(
            CSRMatrix(crow, col, values, (features.shape[0], weight.shape[0])), layout.inverse, name="targets")
        class_offsets = layout.offsets
    scale = _checks.real("scale", scale)
    loss, _, _ = torch.ops.fastassoc.segmented_cross_entropy_forward(
        features, weight, crow, col, values, class_offsets, scale, backend_name(backend))
    return loss


def _differentiable_input(name: str, value) -> Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__} {value!r:.80}")
    return value


def _target_components(targets, features: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``targets``' crow, col and (detached) values; the size is checked here, the rest by the op."""
    crow, col, values, size = _checks.csr_components("targets", targets)
    if features.dim() == 2 and weight.dim() == 2:
        # The components do not carry the column count: it is checked here, once.
        expected = (features.shape[0], weight.shape[0])
        if len(size) != 2 or size[0] != expected[0] or size[1] != expected[1]:
            raise ValueError(f"targets must have shape {tuple(expected)}, got {tuple(size)}")
    return (tensor_input("targets.crow_indices", crow), tensor_input("targets.col_indices", col),
            tensor_input("targets.values", values))


def _default_offsets(class_offsets: Tensor | None, num_classes: int, device) -> Tensor:
    if class_offsets is None:
        return torch.tensor([0, num_classes], dtype=torch.int64, device=device)
    return class_offsets


def _compute_dtype(features: Tensor) -> torch.dtype:
    return torch.float64 if features.dtype == torch.float64 else torch.float32


def _validated(features, weight, crow, col, values, class_offsets, scale):
    """Every check of the op's inputs, values included (runs eagerly, never traced)."""
    features, features_peak = _checks.features_with_peak("features", features)
    weight, weight_peak = _checks.features_with_peak("weight", weight)
    _checks.same_device(features=features, weight=weight)
    _checks.same_dtype(features=features, weight=weight)
    _checks.same_feature_dim(features=features, weight=weight)
    num_rows, num_classes = features.shape[0], weight.shape[0]
    device = features.device
    targets = _checks.csr("targets", CSRMatrix(crow, col, values, (num_rows, num_classes)),
                          shape=(num_rows, num_classes), device=device)
    if isinstance(targets, torch.Tensor):  # _checks.csr before it returned a CSRMatrix
        targets = CSRMatrix.from_sparse_csr(targets)
    if class_offsets is None:
        class_offsets = _default_offsets(None, num_classes, device)
    else:
        class_offsets = _checks.offsets("class_offsets", class_offsets, total=num_classes, device=device)
    scale = _checks.logit_scale(scale, features, weight, peaks=(features_peak, weight_peak))
    return features, weight, targets, class_offsets, scale


def _kernels(backend: str, features: Tensor, weight: Tensor, targets: CSRMatrix, class_offsets: Tensor):
    """The backend's ``LossKernels`` (forward, backward); "auto" resolves the same way both times."""
    _, kernels = _backend.resolve(OP, backend, {
        "features": features, "weight": weight, "targets": targets.values, "class_offsets": class_offsets})
    return kernels


def _fake_inputs(features, weight, crow, col, values, class_offsets) -> int:
    """The metadata checks a fake (or meta) tensor allows; returns the number of segments."""
    fake_features("features", features)
    fake_features("weight", weight)
    _checks.same_device(features=features, weight=weight)
    _checks.same_dtype(features=features, weight=weight)
    fake_same_feature_dim(features=features, weight=weight)
    device = features.device
    fake_index("targets.crow_indices", crow, length=features.shape[0] + 1, device=device)
    fake_index("targets.col_indices", col, device=device)
    if values.dim() != 1 or not values.dtype.is_floating_point:
        raise TypeError(f"targets.values must be a 1-D floating-point tensor, got {values.dtype} "
                        f"of shape {tuple(values.shape)}")
    if values.device != device:
        raise ValueError(f"targets.values is on {values.device} but the features are on {device}")
    if class_offsets is None:
        return 1
    fake_index("class_offsets", class_offsets, device=device)
    if class_offsets.shape[0] < 2:
        raise ValueError(f"class_offsets must be 1-D with at least 2 entries (S+1 for S segments), "
                         f"got shape {tuple(class_offsets.shape)}")
    return class_offsets.shape[0] - 1


# ----------------------------------------------------------------------------- forward op

@torch.library.custom_op("fastassoc::segmented_cross_entropy_forward", mutates_args=())
def _forward_op(features: Tensor, weight: Tensor, crow: Tensor, col: Tensor, values: Tensor,
                class_offsets: Optional[Tensor], scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    features, weight, targets, class_offsets, scale = _validated(features, weight, crow, col, values,
                                                                 class_offsets, scale)
    kernels = _kernels(backend, features, weight, targets, class_offsets)
    num_rows, num_segments = features.shape[0], class_offsets.shape[0] - 1
    if num_rows == 0 or targets.values.shape[0] == 0:
        # No target entry: the loss and both gradients are exactly 0, nothing to launch.
        dtype = _compute_dtype(features)
        return (features.new_zeros(()), features.new_zeros((num_rows, num_segments), dtype=dtype),
                features.new_zeros((num_rows, num_segments), dtype=dtype))
    return kernels.forward(features, weight, targets.crow_indices, targets.col_indices, targets.values,
                           class_offsets, scale)


@_forward_op.register_fake
def _forward_fake(features, weight, crow, col, values, class_offsets, scale, backend):
    num_segments = _fake_inputs(features, weight, crow, col, values, class_offsets)
    dtype = _compute_dtype(features)
    stats = (features.shape[0], num_segments)
    return features.new_empty(()), features.new_empty(stats, dtype=dtype), features.new_empty(stats, dtype=dtype)


# ----------------------------------------------------------------------------- backward op

@torch.library.custom_op("fastassoc::segmented_cross_entropy_backward", mutates_args=())
def _backward_op(grad_loss: Tensor, features: Tensor, weight: Tensor, crow: Tensor, col: Tensor, values: Tensor,
                 class_offsets: Optional[Tensor], lse: Tensor, target_mass: Tensor, scale: float, backend: str,
                 need_features: bool, need_weight: bool) -> tuple[Tensor, Tensor]:
    # The inputs are the forward's, already validated there; only normalised here.
    features, weight = features.contiguous(), weight.contiguous()
    crow, col = crow.to(torch.int64).contiguous(), col.to(torch.int64).contiguous()
    class_offsets = _default_offsets(class_offsets, weight.shape[0], features.device).to(torch.int64).contiguous()
    targets = CSRMatrix(crow, col, values.contiguous(), (features.shape[0], weight.shape[0]))
    kernels = _kernels(backend, features, weight, targets, class_offsets)
    if features.shape[0] == 0 or col.shape[0] == 0:
        grad_features, grad_weight = torch.zeros_like(features), torch.zeros_like(weight)
    else:
        grad_features, grad_weight = kernels.backward(grad_loss, features, weight, crow, col, targets.values,
                                                      class_offsets, lse, target_mass, scale,
                                                      need_features, need_weight)
    return (grad_features if need_features else features.new_empty(0),
            grad_weight if need_weight else weight.new_empty(0))


@_backward_op.register_fake
def _backward_fake(grad_loss, features, weight, crow, col, values, class_offsets, lse, target_mass, scale,
                   backend, need_features, need_weight):
    return (torch.empty_like(features) if need_features else features.new_empty(0),
            torch.empty_like(weight) if need_weight else weight.new_empty(0))


# ----------------------------------------------------------------------------- autograd

def _setup_context(ctx, inputs, output):
    features, weight, crow, col, values, class_offsets, scale, backend = inputs
    _, lse, target_mass = output
    ctx.mark_non_differentiable(lse, target_mass)
    ctx.save_for_backward(features, weight, crow, col, values, class_offsets, lse, target_mass)
    ctx.scale, ctx.backend = scale, backend


def _backward(ctx, grad_loss, grad_lse, grad_target_mass):
    need_features, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_features or need_weight):
        return (None,) * 8
    features, weight, crow, col, values, class_offsets, lse, target_mass = ctx.saved_tensors
    grad_features, grad_weight = torch.ops.fastassoc.segmented_cross_entropy_backward(
        grad_loss, features, weight, crow, col, values, class_offsets, lse, target_mass, ctx.scale, ctx.backend,
        need_features, need_weight)
    return (grad_features if need_features else None, grad_weight if need_weight else None,
            None, None, None, None, None, None)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("segmented_cross_entropy is differentiable once: its backward "
                       "(fastassoc::segmented_cross_entropy_backward) has no derivative, so double backward "
                       "(create_graph=True followed by another backward) is not supported")


_forward_op.register_autograd(_backward, setup_context=_setup_context)
_backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)
