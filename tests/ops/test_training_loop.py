"""The ops inside a training loop: inputs that require grad, and ema_update_ as an in-place op.

Every op but segmented_cross_entropy is non-differentiable and must behave as under
``torch.no_grad``: inputs that require grad (the features a network just produced) give
exactly the result of the detached inputs, on every backend, and the outputs carry no
autograd history. ``ema_update_`` must be an in-place op as torch's own are: the oracle
for its autograd errors is the error a plain torch in-place op raises in the same place.
"""
from __future__ import annotations

import pytest
import torch

import fastassoc
from conftest import require_backend

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")


def _features(rows: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=generator)


def _torch_error(action) -> str:
    """The message torch itself raises for ``action`` (the oracle of our autograd errors)."""
    with pytest.raises(RuntimeError) as error:
        action()
    return str(error.value)


# ----------------------------------------------------------------------------- inputs that require grad

def test_issue_example_topk_anchors_on_features_that_require_grad(backend_device):
    backend, device = backend_device
    require_backend("topk_anchors", backend)
    x = _features(20, 8, 0).to(device).requires_grad_(True)
    distances, indices = fastassoc.topk_anchors(x, x, k=3, backend=backend)
    want_distances, want_indices = fastassoc.topk_anchors(x.detach(), x.detach(), k=3, backend=backend)
    assert torch.equal(indices, want_indices) and torch.equal(distances, want_distances)
    # Each row's nearest anchor is itself: an independent property of the answer.
    assert torch.equal(indices[:, 0].cpu(), torch.arange(20))
    assert not distances.requires_grad and distances.grad_fn is None and x.grad is None


def _op_calls(device, backend):
    """op name -> function(x1, x2) calling the op on two float inputs (which may require grad)."""
    cameras = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2], device=device)
    labels = torch.tensor([0, 0, 1, 2, 2, 3, 4, 5, 5, 6, 7, 7], device=device)
    pids = torch.arange(12, device=device) % 4
    return {
        "topk_anchors": lambda a, b: fastassoc.topk_anchors(
            a, b, k=3, anchor_offsets=torch.tensor([0, 5, 12], device=device),
            query_segments=cameras % 2, exclude=torch.arange(12, device=device) % 5, backend=backend),
        "mutual_knn": lambda a, b: fastassoc.mutual_knn(a, b, k=2, metric="cosine", backend=backend),
        "cross_camera_graph": lambda a, b: _dense(fastassoc.cross_camera_graph(a, cameras, k=2,
                                                                               backend=backend)),
        "knn_soft_labels": lambda a, b: _dense(fastassoc.knn_soft_labels(a, cameras, k=2, backend=backend)),
        "agglomerative_merge": lambda a, b: fastassoc.agglomerative_merge(a, labels, 3, backend=backend),
        "evaluate_ranking": lambda a, b: _ranking(fastassoc.evaluate_ranking(
            a, b, pids, pids, torch.zeros(12, dtype=torch.int64, device=device), torch.ones(12, dtype=torch.int64,
                                                                                          device=device),
            max_rank=5, backend=backend)),
    }


def _dense(matrix: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return matrix.crow_indices(), matrix.col_indices(), matrix.values()


def _ranking(result) -> tuple[torch.Tensor, ...]:
    return result.cmc, torch.tensor([result.mAP, result.mINP, result.num_valid_queries], dtype=torch.float64)


@pytest.mark.parametrize("op", ["topk_anchors", "mutual_knn", "cross_camera_graph", "knn_soft_labels",
                                "agglomerative_merge", "evaluate_ranking"])
def test_inputs_that_require_grad_give_the_detached_result(backend_device, op):
    backend, device = backend_device
    require_backend(op, backend)
    call = _op_calls(device, backend)[op]
    a, b = _features(12, 6, 1).to(device), _features(12, 6, 2).to(device)
    weight = torch.eye(6, device=device).requires_grad_(True)
    # Non-leaf features that require grad, as a network's output is.
    with_grad = call(a @ weight, b @ weight)
    detached = call(a, b)
    for got, want in zip(with_grad if isinstance(with_grad, tuple) else (with_grad,),
                         detached if isinstance(detached, tuple) else (detached,)):
        assert not got.requires_grad and got.grad_fn is None, f"{op} ({backend}) output carries autograd history"
        assert torch.equal(got, want), f"{op} ({backend}) differs when its inputs require grad"
    assert weight.grad is None


# ----------------------------------------------------------------------------- ema_update_ in autograd

def _bank_inputs(device):
    bank = torch.nn.functional.normalize(_features(6, 4, 3), dim=1).to(device)
    index = torch.tensor([1, 4, 1], device=device)
    values = _features(3, 4, 4).to(device)
    return bank, index, values


def test_ema_update_bumps_the_version_counter_so_backward_raises_as_for_torch(backend_device):
    backend, device = backend_device
    require_backend("ema_update_", backend)
    bank, index, values = _bank_inputs(device)
    features = _features(5, 4, 5).to(device).requires_grad_(True)

    # torch's own in-place op on a tensor saved for backward: the oracle.
    plain = bank.clone()
    plain_loss = (features @ plain.T).sum()
    with torch.no_grad():
        plain.index_copy_(0, index[:1], values[:1])
    expected = _torch_error(plain_loss.backward)

    loss = (features @ bank.T).sum()
    version = bank._version
    assert fastassoc.ema_update_(bank, index, values, 0.5, backend=backend) is bank
    assert bank._version > version, f"{backend}: ema_update_ did not bump bank's version counter"
    message = _torch_error(loss.backward)
    prefix = "one of the variables needed for gradient computation has been modified by an inplace operation"
    assert expected.startswith(prefix) and message.startswith(prefix), message


def test_ema_update_after_the_graph_is_used_leaves_backward_working(backend_device):
    backend, device = backend_device
    require_backend("ema_update_", backend)
    bank, index, values = _bank_inputs(device)
    features = _features(5, 4, 5).to(device).requires_grad_(True)
    loss = (features @ bank.T).sum()
    loss.backward()
    fastassoc.ema_update_(bank, index, values.requires_grad_(True), 0.5, backend=backend)
    torch.testing.assert_close(features.grad, bank.new_ones(5, 6) @ _bank_inputs(device)[0])
    assert values.grad is None and not bank.requires_grad


def test_ema_update_rejects_a_leaf_bank_that_requires_grad_with_torchs_error(backend_device):
    backend, device = backend_device
    require_backend("ema_update_", backend)
    bank, index, values = _bank_inputs(device)
    leaf = bank.clone().requires_grad_(True)
    expected = _torch_error(lambda: leaf.mul_(1.0))
    assert expected.startswith("a leaf Variable that requires grad is being used in an in-place operation.")
    with pytest.raises(RuntimeError) as error:
        fastassoc.ema_update_(leaf, index, values, 0.5, backend=backend)
    assert str(error.value).startswith(expected), str(error.value)
    assert "bank" in str(error.value)
    assert torch.equal(leaf.detach(), bank) and leaf._version == 0, "the rejected bank was written"


def test_ema_update_rejects_a_bank_inside_an_autograd_graph(backend_device):
    backend, device = backend_device
    require_backend("ema_update_", backend)
    bank, index, values = _bank_inputs(device)
    weight = torch.ones((), device=device, requires_grad=True)
    non_leaf = bank * weight
    # torch's no_grad in-place write would keep MulBackward0 and give weight a wrong
    # gradient silently; a non-differentiable op must refuse instead.
    with pytest.raises(RuntimeError, match="bank is part of an autograd graph") as error:
        fastassoc.ema_update_(non_leaf, index, values, 0.5, backend=backend)
    assert "torch.no_grad()" in str(error.value)
    assert torch.equal(non_leaf.detach(), bank), "the rejected bank was written"


def test_ema_update_under_no_grad_updates_a_bank_that_requires_grad(backend_device):
    backend, device = backend_device
    require_backend("ema_update_", backend)
    bank, index, values = _bank_inputs(device)
    plain = bank.clone()
    fastassoc.ema_update_(plain, index, values, 0.5, backend=backend)
    leaf = bank.clone().requires_grad_(True)
    with torch.no_grad():
        assert fastassoc.ema_update_(leaf, index, values, 0.5, backend=backend) is leaf
    assert torch.equal(leaf.detach(), plain) and leaf.is_leaf and leaf.grad_fn is None
    # The rows the update touched really changed (the oracle is the index, not the op).
    changed = (leaf.detach() != bank).any(dim=1)
    assert changed.tolist() == [False, True, False, False, True, False]


def test_ema_update_with_values_that_require_grad_equals_detached_values(backend_device):
    backend, device = backend_device
    require_backend("ema_update_", backend)
    bank, index, values = _bank_inputs(device)
    detached_bank = bank.clone()
    fastassoc.ema_update_(detached_bank, index, values, 0.25, reduce="sequential", backend=backend)
    weight = torch.ones((), device=device, requires_grad=True)
    fastassoc.ema_update_(bank, index, values * weight, 0.25, reduce="sequential", backend=backend)
    assert torch.equal(bank, detached_bank) and bank.grad_fn is None and not bank.requires_grad
