"""Camera-segmented soft cross-entropy (UTAL Eq. 7, UGA Eq. 8, EEA Eq. 10, TSSL Eq. 7)."""
from __future__ import annotations

import torch

from .. import _backend
from . import _checks


def segmented_cross_entropy(features: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                            class_offsets: torch.Tensor | None = None, scale: float = 1.0,
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

    Parameters
    ----------
    features : Tensor [B, D], float; differentiable
    weight : Tensor [C, D], same dtype and device; differentiable
    targets : Tensor [B, C], sparse CSR, non-negative weights
    class_offsets : Tensor [S+1], integer, optional
        Classes ``class_offsets[s] : class_offsets[s+1]`` share one softmax. Default: one segment.
    scale : float
        Logit scale ``s`` (``1/tau`` for temperature ``tau``).
    backend : {"auto", "reference", "cpu", "triton", "cuda"}

    Returns
    -------
    Tensor [], the loss, in ``features``' dtype (float32 accumulation).
    """
    features = _checks.features("features", features)
    weight = _checks.features("weight", weight)
    _checks.same_device(features=features, weight=weight, targets=targets)
    _checks.same_dtype(features=features, weight=weight)
    _checks.same_feature_dim(features=features, weight=weight)
    num_rows, num_classes = features.shape[0], weight.shape[0]
    targets = _checks.csr("targets", targets, shape=(num_rows, num_classes), device=features.device)
    if class_offsets is None:
        class_offsets = torch.tensor([0, num_classes], dtype=torch.int64, device=features.device)
    else:
        class_offsets = _checks.offsets("class_offsets", class_offsets, total=num_classes,
                                        device=features.device)
    scale = _checks.real("scale", scale)
    _, impl = _backend.resolve("segmented_cross_entropy", backend, {
        "features": features, "weight": weight, "targets": targets, "class_offsets": class_offsets})
    return impl(features, weight, targets, class_offsets, scale)
