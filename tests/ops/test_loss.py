"""segmented_cross_entropy: camera-segmented soft cross-entropy (UTAL Eq. 7, UGA Eq. 8, EEA Eq. 10,
TSSL Eq. 7) on every backend.

The oracle is a dense float64 NumPy computation of the loss and of its analytic
gradient, written here independently of fastassoc:

    z = s F W^T,   L = (1/B) sum_bj t_bj (lse_seg(j)(z_b) - z_bj),
    dL/dz_bj = (1/B) (T_b,seg(j) softmax_seg(j)(z_b)_j - t_bj),   T_bs = sum_{j in s} t_bj,
    dL/dF = s G W,  dL/dW = s G^T F.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fastassoc
from conftest import require_backend

OP = "segmented_cross_entropy"

# Sparse CSR construction warns that the layout is in beta; that is not what these tests are about.
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")


# ----------------------------------------------------------------------------- oracle

def oracle(features: np.ndarray, weight: np.ndarray, targets: np.ndarray, offsets, scale: float):
    """Dense float64 loss and gradients (loss, d features, d weight)."""
    features = np.asarray(features, np.float64)
    weight = np.asarray(weight, np.float64)
    targets = np.asarray(targets, np.float64)
    num_rows = features.shape[0]
    if num_rows == 0:
        return 0.0, np.zeros_like(features), np.zeros_like(weight)
    logits = scale * features @ weight.T
    loss = 0.0
    grad_logits = np.zeros_like(logits)
    for lo, hi in zip(offsets[:-1], offsets[1:]):
        if lo == hi:
            continue
        segment = logits[:, lo:hi]
        top = segment.max(axis=1, keepdims=True)
        lse = top + np.log(np.exp(segment - top).sum(axis=1, keepdims=True))
        weights = targets[:, lo:hi]
        loss += float((weights * (lse - segment)).sum())
        grad_logits[:, lo:hi] = weights.sum(axis=1, keepdims=True) * np.exp(segment - lse) - weights
    grad_logits /= num_rows
    return loss / num_rows, scale * grad_logits @ weight, scale * grad_logits.T @ features


def assert_close(actual, expected, *, rtol: float, atol: float, what: str) -> None:
    if isinstance(actual, torch.Tensor):
        actual = actual.detach().to("cpu", torch.float64).numpy()
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    bad = ~(np.abs(actual - expected) <= atol + rtol * np.abs(expected))
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} mismatches; first at {first}: got {actual[first]!r}, "
                             f"expected {expected[first]!r} (rtol={rtol}, atol={atol})")


# ----------------------------------------------------------------------------- data

def make_problem(seed: int, num_rows: int, segment_sizes, dim: int, *, density: float = 0.3,
                 empty_rows: float = 0.2, scale_features: float = 1.0):
    """Random features, weight, dense non-negative targets (some rows without any) and offsets."""
    generator = np.random.default_rng(seed)
    num_classes = int(sum(segment_sizes))
    features = generator.standard_normal((num_rows, dim)) * scale_features
    weight = generator.standard_normal((num_classes, dim))
    targets = generator.random((num_rows, num_classes)) * (generator.random((num_rows, num_classes)) < density)
    targets[generator.random(num_rows) < empty_rows] = 0.0
    offsets = np.concatenate([[0], np.cumsum(segment_sizes)]).astype(np.int64)
    return features, weight, targets, offsets


def to_torch(features, weight, targets, offsets, *, dtype=torch.float32, device="cpu", requires_grad=True):
    f = torch.tensor(features, dtype=dtype, device=device, requires_grad=requires_grad)
    w = torch.tensor(weight, dtype=dtype, device=device, requires_grad=requires_grad)
    t = torch.tensor(targets, dtype=torch.float32, device=device).to_sparse_csr()
    o = torch.tensor(offsets, dtype=torch.int64, device=device)
    return f, w, t, o


def run(f, w, t, o, scale, backend):
    """Loss and gradients from the op under test."""
    loss = fastassoc.segmented_cross_entropy(f, w, t, class_offsets=o, scale=scale, backend=backend)
    grad_f, grad_w = torch.autograd.grad(loss, (f, w))
    return loss, grad_f, grad_w


def check_against_oracle(problem, scale, backend, device, *, dtype=torch.float32, rtol=2e-5, atol=2e-5, what=""):
    features, weight, targets, offsets = problem
    f, w, t, o = to_torch(features, weight, targets, offsets, dtype=dtype, device=device)
    loss, grad_f, grad_w = run(f, w, t, o, scale, backend)
    assert loss.shape == () and loss.dtype == dtype, f"{what}: loss shape {loss.shape}, dtype {loss.dtype}"
    assert grad_f.dtype == dtype and grad_w.dtype == dtype
    # The oracle sees exactly the values the op saw (targets rounded to float32 like the op's input).
    expected = oracle(f.detach().cpu().double().numpy(), w.detach().cpu().double().numpy(),
                      t.to_dense().cpu().double().numpy(), offsets, scale)
    assert_close(loss, np.array(expected[0]), rtol=rtol, atol=atol, what=f"{what} loss")
    assert_close(grad_f, expected[1], rtol=rtol, atol=atol, what=f"{what} d features")
    assert_close(grad_w, expected[2], rtol=rtol, atol=atol, what=f"{what} d weight")


# ----------------------------------------------------------------------------- against the oracle

SHAPES = {
    # name: (B, segment sizes, D)
    "one_segment": (13, [7], 5),
    "cameras": (17, [4, 6, 3, 5], 8),
    "empty_segment": (9, [3, 0, 4, 0], 6),
    "one_class": (6, [1], 3),
    "singleton_segments": (5, [1, 1, 1], 4),
    "wide": (3, [40, 33], 7),
    "one_row": (1, [5, 2], 9),
    "zero_dim": (4, [3, 2], 0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("scale", [1.0, 3.5])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_matches_dense_oracle(backend_device, shape, scale, dtype):
    backend, device = backend_device
    require_backend(OP, backend)
    num_rows, sizes, dim = SHAPES[shape]
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    check_against_oracle(make_problem(sum(map(ord, shape)), num_rows, sizes, dim), scale, backend, device,
                         dtype=dtype, rtol=tolerance, atol=tolerance, what=f"{backend} {shape} {dtype}")


def test_hypothesis_shapes_and_segments(backend_device):
    backend, device = backend_device
    require_backend(OP, backend)

    @settings(max_examples=12 if backend == "triton" else 50, deadline=None)
    @given(num_rows=st.integers(0, 9), sizes=st.lists(st.integers(0, 5), min_size=1, max_size=4),
           dim=st.integers(1, 6), density=st.sampled_from([0.0, 0.2, 0.6, 1.0]),
           scale=st.sampled_from([0.5, 1.0, 4.0]), seed=st.integers(0, 2**16))
    def check(num_rows, sizes, dim, density, scale, seed):
        problem = make_problem(seed, num_rows, sizes, dim, density=density)
        check_against_oracle(problem, scale, backend, device,
                             what=f"{backend} B={num_rows} sizes={sizes} D={dim} density={density}")

    check()


def test_large_logits_are_stable(backend_device):
    """Logits of +-200 overflow a naive exp in float32; the segment max shift must keep the loss finite."""
    backend, device = backend_device
    require_backend(OP, backend)
    features, weight, targets, offsets = make_problem(5, 8, [5, 4], 6, density=0.5, empty_rows=0.0)
    features = features / np.linalg.norm(features, axis=1, keepdims=True)
    weight = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    check_against_oracle((features, weight, targets, offsets), 200.0, backend, device, rtol=1e-4, atol=1e-3,
                         what=f"{backend} scale=200")


def test_no_targets_gives_zero_loss_and_zero_gradient(backend_device):
    backend, device = backend_device
    require_backend(OP, backend)
    f, w, t, o = to_torch(*make_problem(6, 5, [3, 3], 4, density=0.0), device=device)
    loss, grad_f, grad_w = run(f, w, t, o, 1.0, backend)
    assert float(loss.detach()) == 0.0 and not grad_f.any() and not grad_w.any()


def test_empty_batch_gives_zero_loss_with_a_gradient_path(backend_device):
    backend, device = backend_device
    require_backend(OP, backend)
    f, w, t, o = to_torch(*make_problem(7, 0, [3, 2], 4), device=device)
    loss, grad_f, grad_w = run(f, w, t, o, 1.0, backend)
    assert loss.shape == () and float(loss.detach()) == 0.0
    assert grad_f.shape == (0, 4) and grad_w.shape == (5, 4) and not grad_w.any()


def test_no_classes(backend_device):
    backend, device = backend_device
    require_backend(OP, backend)
    f, w, t, o = to_torch(*make_problem(8, 4, [0], 3), device=device)
    loss, grad_f, grad_w = run(f, w, t, o, 1.0, backend)
    assert float(loss.detach()) == 0.0 and grad_f.shape == (4, 3) and not grad_f.any() and grad_w.shape == (0, 3)


def test_default_class_offsets_is_one_segment(backend_device):
    backend, device = backend_device
    require_backend(OP, backend)
    f, w, t, o = to_torch(*make_problem(9, 6, [7], 5), device=device)
    with_offsets = fastassoc.segmented_cross_entropy(f, w, t, class_offsets=o, backend=backend)
    default = fastassoc.segmented_cross_entropy(f, w, t, backend=backend)
    assert torch.equal(with_offsets, default), f"{with_offsets} != {default}"


def test_one_hot_targets_equal_torch_cross_entropy_per_segment(backend_device):
    """A second, independent check: one-hot rows reduce to F.cross_entropy on the row's segment."""
    backend, device = backend_device
    require_backend(OP, backend)
    generator = np.random.default_rng(10)
    sizes, num_rows, dim = [4, 6, 5], 12, 7
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    labels = generator.integers(0, sum(sizes), size=num_rows)
    targets = np.zeros((num_rows, sum(sizes)))
    targets[np.arange(num_rows), labels] = 1.0
    features, weight = generator.standard_normal((num_rows, dim)), generator.standard_normal((sum(sizes), dim))
    f, w, t, o = to_torch(features, weight, targets, offsets, dtype=torch.float64, device=device)
    loss = fastassoc.segmented_cross_entropy(f, w, t, class_offsets=o, scale=2.0, backend=backend)
    expected = 0.0
    logits = 2.0 * torch.tensor(features) @ torch.tensor(weight).T
    for row, label in enumerate(labels):
        segment = int(np.searchsorted(offsets, label, side="right")) - 1
        lo, hi = offsets[segment], offsets[segment + 1]
        expected += float(torch.nn.functional.cross_entropy(logits[row:row + 1, lo:hi],
                                                            torch.tensor([label - lo])))
    assert abs(loss.item() - expected / num_rows) < 1e-10, f"{loss.item()} != {expected / num_rows}"


def test_targets_with_int32_indices_and_float64_values(backend_device):
    backend, device = backend_device
    require_backend(OP, backend)
    features, weight, targets, offsets = make_problem(11, 7, [3, 4], 5)
    f, w, t, o = to_torch(features, weight, targets, offsets, device=device)
    dense64 = torch.tensor(targets, dtype=torch.float64, device=device)
    t32 = torch.sparse_csr_tensor(t.crow_indices().to(torch.int32), t.col_indices().to(torch.int32),
                                  dense64.to_sparse_csr().values(), size=t.shape,
                                  check_invariants=True)
    loss = fastassoc.segmented_cross_entropy(f, w, t32, class_offsets=o.to(torch.int32), backend=backend)
    expected = oracle(features.astype(np.float32), weight.astype(np.float32), targets, offsets, 1.0)[0]
    assert_close(loss, np.array(expected), rtol=2e-5, atol=2e-5, what=f"{backend} int32 CSR")


# ----------------------------------------------------------------------------- low precision

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_within_twice_the_error_of_a_low_precision_reference(backend_device, dtype):
    """flash-attention's rule: error vs the float64 oracle <= 2x that of a computation run in ``dtype`` + atol."""
    backend, device = backend_device
    require_backend(OP, backend)
    features, weight, targets, offsets = make_problem(12, 24, [9, 7, 11], 32, density=0.4)
    f, w, t, o = to_torch(features, weight, targets, offsets, dtype=dtype, device=device)
    scale = 2.0
    loss, grad_f, grad_w = run(f, w, t, o, scale, backend)
    assert loss.dtype == grad_f.dtype == grad_w.dtype == dtype

    f64, w64 = f.detach().cpu().double().numpy(), w.detach().cpu().double().numpy()
    dense = t.to_dense().cpu().double().numpy()
    expected = oracle(f64, w64, dense, offsets, scale)

    # The same math, every step in ``dtype`` (dense logits, per-segment logsumexp).
    f_low, w_low = f.detach().cpu().clone().requires_grad_(), w.detach().cpu().clone().requires_grad_()
    logits = scale * (f_low @ w_low.T)
    t_low = t.to_dense().cpu().to(dtype)
    naive = logits.new_zeros(())
    for lo, hi in zip(offsets[:-1], offsets[1:]):
        if lo < hi:
            lse = torch.logsumexp(logits[:, lo:hi], dim=1, keepdim=True)
            naive = naive + (t_low[:, lo:hi] * (lse - logits[:, lo:hi])).sum()
    naive = naive / f_low.shape[0]
    naive_grad_f, naive_grad_w = torch.autograd.grad(naive, (f_low, w_low))

    for what, got, low, exact in [("loss", loss, naive, np.array(expected[0])),
                                  ("d features", grad_f, naive_grad_f, expected[1]),
                                  ("d weight", grad_w, naive_grad_w, expected[2])]:
        error = np.abs(got.detach().cpu().double().numpy() - exact).max()
        low_error = np.abs(low.detach().double().numpy() - exact).max()
        atol = float(torch.finfo(dtype).eps) * max(1.0, float(np.abs(exact).max()))
        assert error <= 2 * low_error + atol, (f"{backend} {dtype} {what}: error {error:.3g} > "
                                               f"2 x low-precision error {low_error:.3g} + {atol:.3g}")


# ----------------------------------------------------------------------------- gradcheck

@pytest.mark.parametrize("sizes", [[3, 0, 2], [4]], ids=["segments", "one_segment"])
def test_gradcheck_float64(backend_device, sizes):
    backend, device = backend_device
    require_backend(OP, backend)
    features, weight, targets, offsets = make_problem(13, 4, sizes, 3, density=0.6, empty_rows=0.25)
    f, w, t, o = to_torch(features, weight, targets, offsets, dtype=torch.float64, device=device)

    def loss(f, w):
        return fastassoc.segmented_cross_entropy(f, w, t, class_offsets=o, scale=1.7, backend=backend)

    assert torch.autograd.gradcheck(loss, (f, w), eps=1e-6, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------- tiles and memory

@pytest.mark.parametrize("limit", [1, 5, 64])
def test_result_does_not_depend_on_the_tile_limit(backend_device, limit):
    backend, device = backend_device
    require_backend(OP, backend)
    problem = make_problem(14, 23, [6, 0, 9, 4], 8, density=0.4)
    f, w, t, o = to_torch(*problem, device=device)
    untiled = run(f, w, t, o, 2.0, backend)
    with fastassoc.tile_limit(limit):
        tiled = run(f, w, t, o, 2.0, backend)
    # Chunking only reorders float32 sums of the loss and of the weight gradient.
    for what, a, b in zip(("loss", "d features", "d weight"), tiled, untiled):
        assert_close(a, b.detach().cpu().double().numpy(), rtol=1e-6, atol=1e-6,
                     what=f"{backend} tile_limit({limit}) {what}")


class LargestTensor(TorchDispatchMode):
    """Records the largest strided tensor any aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.largest_op = None
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls += 1
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.layout == torch.strided and leaf.numel() > self.largest:
                self.largest, self.largest_op = leaf.numel(), func
        return out


def test_reference_never_allocates_full_logits_in_forward_or_backward():
    from fastassoc.kernels.reference.loss import (segmented_cross_entropy_backward_reference,
                                                  segmented_cross_entropy_forward_reference)

    num_rows, sizes, dim = 128, [40, 0, 56], 4
    num_classes = sum(sizes)
    num_segments = len(sizes)
    full_logits = num_rows * num_classes
    features, weight, targets, offsets = make_problem(15, num_rows, sizes, dim, density=0.02)
    f, w, t, o = to_torch(features, weight, targets, offsets)
    crow, col, values = t.crow_indices(), t.col_indices(), t.values()
    limit = 256
    # Everything the op legitimately holds whole: inputs, gradients, target entries, one tile.
    allowed = max(limit, num_classes, num_rows * dim, num_classes * dim, t.values().numel(), num_rows)
    assert allowed * 4 <= full_logits, "problem too small for the check to mean anything"

    # The public op is one custom-op call to a dispatch mode (its inside is opaque), so the
    # tiles are watched in the backend's forward and backward functions themselves.
    def kernels():
        with LargestTensor() as forward:
            loss, lse, mass = segmented_cross_entropy_forward_reference(f.detach(), w.detach(), crow, col, values, o,
                                                                        2.0)
        with LargestTensor() as backward:
            grads = segmented_cross_entropy_backward_reference(torch.ones(()), f.detach(), w.detach(), crow, col,
                                                               values, o, lse, mass, 2.0, True, True)
        return forward, backward, loss, grads

    with fastassoc.tile_limit(limit):
        forward, backward, kernel_loss, (kernel_grad_f, kernel_grad_w) = kernels()
    assert backward.calls > 0, "the dispatch mode saw no backward ops; the check is blind"
    for phase, record in (("forward", forward), ("backward", backward)):
        assert record.largest <= allowed, (f"{phase} created a tensor of {record.largest} elements "
                                           f"({record.largest_op}); bound {allowed}, full logits {full_logits}")

    # Tensors kept alive for backward by the public op, counted once per storage: the
    # inputs, the CSR components and the [B, S] logsumexp and target mass, never logits.
    saved_storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved_storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with fastassoc.tile_limit(limit):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = fastassoc.segmented_cross_entropy(f, w, t, class_offsets=o, scale=2.0, backend="reference")
        grad_f, grad_w = torch.autograd.grad(loss, (f, w))
    # The CSR components are the caller's (torch may over-allocate their storages).
    inputs = sum(x.untyped_storage().nbytes() for x in (f, w, crow, col, values, o))
    saved_bound = inputs + 2 * 4 * num_rows * num_segments
    saved = sum(saved_storages.values())
    assert saved <= saved_bound < 4 * full_logits, \
        f"{saved} bytes saved for backward; bound {saved_bound}, full float32 logits {4 * full_logits}"
    expected = oracle(features.astype(np.float32), weight.astype(np.float32), targets.astype(np.float32),
                      offsets, 2.0)
    for what, got in (("public", (loss, grad_f, grad_w)), ("kernel", (kernel_loss, kernel_grad_f, kernel_grad_w))):
        assert_close(got[0], np.array(expected[0]), rtol=2e-5, atol=2e-5, what=f"tiled {what} loss")
        assert_close(got[1], expected[1], rtol=2e-5, atol=2e-5, what=f"tiled {what} d features")
        assert_close(got[2], expected[2], rtol=2e-5, atol=2e-5, what=f"tiled {what} d weight")

    # Positive control: with the default limit one tile holds every logit, and the mode sees it.
    untiled, untiled_backward, _, _ = kernels()
    assert untiled.largest >= full_logits and untiled_backward.largest >= full_logits, \
        (untiled.largest, untiled_backward.largest)


# ----------------------------------------------------------------------------- bad inputs

def _good():
    features, weight, targets, offsets = make_problem(16, 4, [2, 3], 3)
    return to_torch(features, weight, targets, offsets, requires_grad=False)


def _call(f, w, t, **kwargs):
    return fastassoc.segmented_cross_entropy(f, w, t, **kwargs)


def test_targets_must_be_sparse_csr():
    f, w, t, o = _good()
    with pytest.raises(TypeError, match=r"\btargets\b.*CSR"):
        _call(f, w, t.to_dense(), class_offsets=o)
    with pytest.raises(TypeError, match=r"\btargets\b.*CSR"):
        _call(f, w, t.to_dense().to_sparse(), class_offsets=o)
    with pytest.raises(TypeError, match=r"\btargets\b"):
        _call(f, w, None, class_offsets=o)


def test_targets_shape_and_values_are_checked():
    f, w, t, o = _good()
    dense = t.to_dense()
    with pytest.raises(ValueError, match=r"\btargets\b.*shape"):
        _call(f, w, torch.cat([dense, dense]).to_sparse_csr(), class_offsets=o)
    with pytest.raises(ValueError, match=r"\btargets\b.*shape"):
        _call(f, w, dense[:, :4].to_sparse_csr(), class_offsets=torch.tensor([0, 2, 4]))
    negative = dense.clone()
    negative[1, 2] = -0.5
    with pytest.raises(ValueError, match=r"\btargets\b.*non-negative"):
        _call(f, w, negative.to_sparse_csr(), class_offsets=o)
    nan = dense.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"\btargets\b"):
        _call(f, w, nan.to_sparse_csr(), class_offsets=o)
    with pytest.raises(TypeError, match=r"\btargets\b.*floating"):
        _call(f, w, (dense > 0).to(torch.int64).to_sparse_csr(), class_offsets=o)


@pytest.mark.parametrize("offsets, error", [
    (torch.tensor([1, 5]), ValueError),               # does not start at 0
    (torch.tensor([0, 2, 4]), ValueError),            # does not end at C = 5
    (torch.tensor([0, 3, 2, 5]), ValueError),         # decreasing
    (torch.tensor([5]), ValueError),                  # fewer than 2 entries
    (torch.tensor([[0, 5]]), ValueError),             # 2-D
    (torch.tensor([0.0, 5.0]), TypeError),            # float
    ([0, 5], TypeError),                              # not a tensor
    (torch.tensor([0, 5], device="meta"), ValueError),  # another device
], ids=["start", "end", "decreasing", "short", "2d", "float", "list", "meta_device"])
def test_bad_class_offsets_raise_naming_them(offsets, error):
    f, w, t, _ = _good()
    with pytest.raises(error, match=r"\bclass_offsets\b"):
        _call(f, w, t, class_offsets=offsets)


def test_mismatched_features_and_weight_raise_naming_them():
    f, w, t, o = _good()
    with pytest.raises(ValueError, match=r"\bweight\b"):
        _call(f, torch.zeros(5, 4), t, class_offsets=o)
    with pytest.raises(TypeError, match=r"\bweight\b.*float64"):
        _call(f, w.double(), t, class_offsets=o)
    with pytest.raises(ValueError, match=r"\btargets\b"):
        _call(f, torch.zeros(6, 3), t, class_offsets=torch.tensor([0, 6]))
    with pytest.raises(TypeError, match=r"\bfeatures\b"):
        _call(f.to(torch.int32), w, t, class_offsets=o)
    with pytest.raises(ValueError, match=r"\bfeatures\b"):
        _call(f[0], w, t, class_offsets=o)


def test_non_finite_inputs_raise_naming_them():
    f, w, t, o = _good()
    bad_f = f.clone()
    bad_f[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"\bfeatures\b.*NaN"):
        _call(bad_f, w, t, class_offsets=o)
    bad_w = w.clone()
    bad_w[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"\bweight\b"):
        _call(f, bad_w, t, class_offsets=o)
    for scale, error in ((float("nan"), ValueError), ("2", TypeError)):
        with pytest.raises(error, match=r"\bscale\b"):
            _call(f, w, t, class_offsets=o, scale=scale)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_inputs_on_another_device_raise():
    f, w, t, o = _good()
    with pytest.raises(ValueError, match="device"):
        _call(f, w.cuda(), t, class_offsets=o)
    with pytest.raises(ValueError, match=r"\btargets\b"):
        _call(f.cuda(), w.cuda(), t, class_offsets=o.cuda())


def test_no_warnings_besides_the_csr_beta_notice():
    f, w, t, o = _good()
    f.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        loss = _call(f, w, t, class_offsets=o, backend="reference")
        loss.backward()
