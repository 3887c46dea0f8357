"""A training step that calls the association ops, under ``torch.compile(fullgraph=True)``.

The step is what a memory-bank method runs: neighbour search of the batch in the bank
(``topk_anchors``), cross-set mutual neighbours (``mutual_knn``), per-camera soft labels
(``knn_soft_labels``, as a :class:`fastassoc.CSRMatrix`, the form dynamo can trace), the
camera-segmented loss with its backward (``segmented_cross_entropy``) and the in-place
memory update (``ema_update_``). ``fullgraph=True`` turns any graph break into an error,
so compiling at all is the no-graph-break check; the compiled step must then give the
eager step's outputs, gradients and updated bank.
"""
from __future__ import annotations

import pytest
import torch

import fastassoc
from conftest import require_backend

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")


def make_inputs(seed: int = 0, num_rows: int = 24, dim: int = 8, num_cameras: int = 3):
    generator = torch.Generator().manual_seed(seed)
    cameras = torch.arange(num_rows) % num_cameras
    cameras = cameras[torch.argsort(cameras, stable=True)]
    offsets = torch.zeros(num_cameras + 1, dtype=torch.int64)
    offsets[1:] = torch.bincount(cameras, minlength=num_cameras).cumsum(0)
    bank = torch.nn.functional.normalize(torch.randn(num_rows, dim, generator=generator), dim=1)
    weights = torch.randn(dim, dim, generator=generator) / dim ** 0.5
    classifier = torch.randn(num_rows, dim, generator=generator)
    inputs = torch.randn(num_rows, dim, generator=generator)
    return inputs, weights, classifier, bank, cameras, offsets


def step(inputs, weights, classifier, bank, cameras, offsets, backend: str):
    features = torch.nn.functional.normalize(inputs @ weights, dim=1)
    distances, indices = fastassoc.topk_anchors(features, bank, k=3, anchor_offsets=offsets,
                                                query_segments=cameras, backend=backend)
    ia, ib, pair_distances = fastassoc.mutual_knn(features, bank, k=2, backend=backend)
    soft = fastassoc.knn_soft_labels(bank, cameras, k=2, as_tuple=True, backend=backend)
    loss = fastassoc.segmented_cross_entropy(features, classifier, soft, class_offsets=offsets, scale=10.0,
                                             backend=backend)
    fastassoc.ema_update_(bank, torch.arange(features.shape[0]), features.detach(), 0.5, backend=backend)
    return loss, distances, indices, ia, ib, pair_distances, soft.values


def run(step_function, inputs, weights, classifier, bank, cameras, offsets, backend):
    """One step and its backward; returns the outputs and the parameters' gradients."""
    weights = weights.clone().requires_grad_(True)
    classifier = classifier.clone().requires_grad_(True)
    outputs = step_function(inputs, weights, classifier, bank, cameras, offsets, backend)
    outputs[0].backward()
    return outputs, weights.grad, classifier.grad


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_compiled_training_step_equals_eager(backend):
    for op in ("topk_anchors", "mutual_knn", "knn_soft_labels", "segmented_cross_entropy", "ema_update_"):
        require_backend(op, backend)
    torch._dynamo.reset()
    inputs, weights, classifier, bank, cameras, offsets = make_inputs()
    eager_bank, compiled_bank = bank.clone(), bank.clone()
    expected, *expected_grads = run(step, inputs, weights, classifier, eager_bank, cameras, offsets, backend)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    actual, *actual_grads = run(compiled, inputs, weights, classifier, compiled_bank, cameras, offsets, backend)

    names = ("loss", "distances", "indices", "ia", "ib", "pair distances", "soft label values")
    for name, got, want in zip(names, actual, expected):
        got, want = got.detach(), want.detach()
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} compiled vs {tuple(want.shape)} eager"
        if got.dtype.is_floating_point:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(got, want), f"{name}: compiled {got.tolist()} vs eager {want.tolist()}"
    for name, got, want in zip(("weights", "classifier"), actual_grads, expected_grads):
        assert got is not None and want is not None, f"{name} got no gradient"
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"grad of {name}: {m}")
    torch.testing.assert_close(compiled_bank, eager_bank, rtol=1e-6, atol=1e-6)
    assert not torch.equal(compiled_bank, bank), "ema_update_ under compile left the bank unchanged"
