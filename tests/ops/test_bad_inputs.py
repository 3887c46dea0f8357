"""Bad inputs through the public ops on every backend, and the validation helpers themselves.

Malformed CSR targets (every kind of corruption torch lets a user build with
``check_invariants=False``, and the same as a ``CSRMatrix``), finite inputs whose squared
norms or logits overflow, sizes that cannot be allocated and meta tensors must give a
``ValueError``/``TypeError`` naming the argument: never a crash, never a result. Inputs at
the edge of what is accepted must give the answer of an independent float64 oracle.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import re

import pytest
import torch

import fastassoc
from fastassoc.ops import _checks
from fastassoc.ops._sparse import CSRMatrix

from conftest import require_backend

FLOAT32_MAX = torch.finfo(torch.float32).max
PHYSICAL_MEMORY = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ---------------------------------------------------------------------------------------------
# CSR targets
# ---------------------------------------------------------------------------------------------

def _random_csr(rng: random.Random, num_rows: int, num_classes: int) -> tuple[list[int], list[int], list[float]]:
    crow, cols, values = [0], [], []
    for _ in range(num_rows):
        row_cols = sorted(rng.sample(range(num_classes), rng.randint(0, min(3, num_classes))))
        cols += row_cols
        values += [rng.uniform(0.1, 1.0) for _ in row_cols]
        crow.append(len(cols))
    return crow, cols, values


def _corrupt(kind: str, rng: random.Random, num_rows: int, num_classes: int):
    """(crow, col, values, size) of a malformed [num_rows, num_classes] target matrix."""
    crow, cols, values = _random_csr(rng, num_rows, num_classes)
    if not cols:  # every corruption below has an entry to work on
        crow, cols, values = [0] + [1] * num_rows, [0], [1.0]
    nnz = len(cols)
    size = (num_rows, num_classes)
    crow_t = torch.tensor(crow)
    cols_t = torch.tensor(cols)
    values_t = torch.tensor(values)
    entry = rng.randrange(nnz)
    if kind == "crow_end_huge":
        crow_t[-1] = 10**8
    elif kind == "crow_end_600":
        crow_t[-1] = 600
    elif kind == "crow_end_short":
        crow_t[-1] = nnz - 1
    elif kind == "crow_start":
        crow_t[0] = rng.choice([-1, 1])
    elif kind == "crow_decreasing":
        position = rng.randrange(1, num_rows + 1)
        crow_t[position] = crow_t[position - 1] - 1 - rng.randrange(3)
        if position == num_rows:  # keep the end at nnz: only monotonicity is broken
            crow_t[position - 1] = nnz + 1
    elif kind == "crow_interior_past_nnz":
        crow_t[rng.randrange(1, num_rows)] = nnz + 5
    elif kind == "crow_too_long":
        crow_t = torch.cat([crow_t, crow_t[-1:]])
    elif kind == "crow_too_short":
        crow_t = crow_t[:-1]
    elif kind == "crow_float":
        crow_t = crow_t.double()
    elif kind == "crow_2d":
        crow_t = crow_t[None]
    elif kind == "col_too_large":
        cols_t[entry] = num_classes + rng.randrange(3)
    elif kind == "col_negative":
        cols_t[entry] = -1 - rng.randrange(3)
    elif kind == "col_huge":
        cols_t[entry] = 2**62
    elif kind == "col_short":
        cols_t = cols_t[:-1]
    elif kind == "col_float":
        cols_t = cols_t.float()
    elif kind == "values_negative":
        values_t[entry] = -rng.uniform(0.1, 2.0)
    elif kind == "values_nan":
        values_t[entry] = float("nan")
    elif kind == "values_inf":
        values_t[entry] = float("inf")
    elif kind == "values_integer":
        values_t = torch.ones(nnz, dtype=torch.int64)
    elif kind == "values_short":
        values_t = values_t[:-1]
    elif kind == "values_2d":
        values_t = values_t[:, None]
    elif kind == "shape_rows":
        size = (num_rows + 1, num_classes)
        crow_t = torch.cat([crow_t, crow_t[-1:]])
    elif kind == "shape_cols":
        size = (num_rows, num_classes + 1)
    elif kind == "meta_values":
        values_t = values_t.to("meta")
    else:
        raise AssertionError(kind)
    return crow_t, cols_t, values_t, size


CORRUPTIONS = ("crow_end_huge", "crow_end_600", "crow_end_short", "crow_start", "crow_decreasing",
               "crow_interior_past_nnz", "crow_too_long", "crow_too_short", "crow_float", "crow_2d",
               "col_too_large", "col_negative", "col_huge", "col_short", "col_float", "values_negative",
               "values_nan", "values_inf", "values_integer", "values_short", "values_2d", "shape_rows",
               "shape_cols", "meta_values")


def _forms(parts):
    """The malformed matrix as every form a user can pass: CSRMatrix, and torch sparse when torch builds it."""
    crow, cols, values, size = parts
    forms = [CSRMatrix(crow, cols, values, size)]
    with contextlib.suppress(Exception):  # torch refuses some corruptions itself; the tuple form still has them
        forms.append(torch.sparse_csr_tensor(crow, cols, values, size=size, check_invariants=False))
    return forms


def _loss_inputs(device, num_rows=5, num_classes=7, dim=4, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(num_rows, dim, generator=generator, dtype=dtype).to(device)
    weight = torch.randn(num_classes, dim, generator=generator, dtype=dtype).to(device)
    return features, weight


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_malformed_csr_targets_are_rejected(backend_device, kind):
    backend, device = backend_device
    require_backend("segmented_cross_entropy", backend)
    rng = random.Random(f"{kind}-{backend}")
    for trial in range(6):
        num_rows, num_classes = rng.randint(2, 6), rng.randint(2, 9)
        features, weight = _loss_inputs(device, num_rows, num_classes, seed=trial)
        parts = _corrupt(kind, rng, num_rows, num_classes)
        parts = tuple(p.to(device) if isinstance(p, torch.Tensor) and p.device.type != "meta" else p for p in parts)
        for targets in _forms(parts):
            with pytest.raises((ValueError, TypeError), match=r"\btargets\b"):
                fastassoc.segmented_cross_entropy(features, weight, targets, scale=2.0, backend=backend)


@pytest.mark.parametrize("targets", [
    pytest.param(lambda: torch.eye(5, 7), id="dense"),
    pytest.param(lambda: torch.eye(5, 7).to_sparse_coo(), id="coo"),
    pytest.param(lambda: torch.eye(5, 7).to_sparse_csc(), id="csc"),
    pytest.param(lambda: [[0, 1], [1, 0]], id="list"),
    pytest.param(lambda: torch.stack([torch.eye(5, 7)] * 2).to_sparse_csr(), id="batched-csr"),
])
def test_targets_that_are_not_a_csr_matrix_are_rejected(backend_device, targets):
    backend, device = backend_device
    require_backend("segmented_cross_entropy", backend)
    features, weight = _loss_inputs(device)
    targets = targets()
    if isinstance(targets, torch.Tensor):
        targets = targets.to(device)
    with pytest.raises((ValueError, TypeError), match=r"\btargets\b"):
        fastassoc.segmented_cross_entropy(features, weight, targets, backend=backend)


def _dense_loss(features, weight, dense_targets, class_offsets, scale):
    """Independent float64 oracle: sum_b sum_j t_bj (lse_seg(j)(z_b) - z_bj) / B."""
    logits = scale * features.double() @ weight.double().T
    lse = torch.empty_like(logits)
    for start, stop in zip(class_offsets[:-1].tolist(), class_offsets[1:].tolist()):
        if stop > start:
            lse[:, start:stop] = torch.logsumexp(logits[:, start:stop], dim=1, keepdim=True)
    return (dense_targets.double() * (lse - logits)).sum() / features.shape[0]


def test_duplicate_and_unsorted_columns_add_up(backend_device):
    """Duplicates mean their sum (as to_dense()); every backend must agree in loss and gradients."""
    backend, device = backend_device
    require_backend("segmented_cross_entropy", backend)
    crow = torch.tensor([0, 3, 3, 5, 8])
    cols = torch.tensor([2, 0, 2, 6, 6, 5, 1, 5])       # row 0: 2 twice; row 2: 6 twice; row 3 unsorted, 5 twice
    values = torch.tensor([0.5, 0.25, 0.75, 1.0, 0.5, 0.2, 0.3, 0.4])
    num_rows, num_classes = 4, 7
    dense = torch.zeros(num_rows, num_classes, dtype=torch.float64)
    rows = torch.repeat_interleave(torch.arange(num_rows), crow[1:] - crow[:-1])
    dense.index_put_((rows, cols), values.double(), accumulate=True)
    class_offsets = torch.tensor([0, 3, 3, 7])
    features, weight = _loss_inputs("cpu", num_rows, num_classes, dim=5, seed=3)
    reference_features = features.double().requires_grad_()
    reference_weight = weight.double().requires_grad_()
    expected = _dense_loss(reference_features, reference_weight, dense, class_offsets, 1.5)
    expected.backward()
    parts = (crow.to(device), cols.to(device), values.to(device), (num_rows, num_classes))
    forms = _forms(parts)
    assert len(forms) == 2  # torch builds duplicates without checking invariants
    for targets in forms:
        f = features.clone().to(device).requires_grad_()
        w = weight.clone().to(device).requires_grad_()
        loss = fastassoc.segmented_cross_entropy(f, w, targets, class_offsets=class_offsets.to(device),
                                                 scale=1.5, backend=backend)
        loss.backward()
        torch.testing.assert_close(loss.double().cpu(), expected.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(f.grad.double().cpu(), reference_features.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(w.grad.double().cpu(), reference_weight.grad, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Finite inputs whose squared norms or logits overflow
# ---------------------------------------------------------------------------------------------

def _ids(n, device, modulo=None):
    """arange(n) (% modulo); a stride-0 view for the 2**31-row cases, where only the features may fail."""
    if n > 2**20:
        return torch.zeros(1, dtype=torch.int64, device=device).expand(n)
    ids = torch.arange(n, device=device)
    return ids % modulo if modulo else ids


def _cameras(n, device):
    return _ids(n, device, 3)


def _same_camera(n, device, camera):
    return torch.full((1,), camera, dtype=torch.int64, device=device).expand(n)


DISTANCE_OPS = {
    # op name -> (argument the error must name, call(x, other, device, backend))
    "topk_anchors/queries": ("topk_anchors", "queries",
                             lambda x, y, d, b: fastassoc.topk_anchors(x, y, k=2, backend=b)),
    "topk_anchors/anchors": ("topk_anchors", "anchors",
                             lambda x, y, d, b: fastassoc.topk_anchors(y, x, k=2, backend=b)),
    "mutual_knn/a": ("mutual_knn", "a", lambda x, y, d, b: fastassoc.mutual_knn(x, y, k=2, backend=b)),
    "mutual_knn/b": ("mutual_knn", "b", lambda x, y, d, b: fastassoc.mutual_knn(y, x, k=2, backend=b)),
    "cross_camera_graph": ("cross_camera_graph", "x",
                           lambda x, y, d, b: fastassoc.cross_camera_graph(x, _cameras(x.shape[0], d), k=1,
                                                                           backend=b)),
    "knn_soft_labels": ("knn_soft_labels", "x",
                        lambda x, y, d, b: fastassoc.knn_soft_labels(x, _cameras(x.shape[0], d), k=1, backend=b)),
    "agglomerative_merge": ("agglomerative_merge", "x",
                            lambda x, y, d, b: fastassoc.agglomerative_merge(
                                x, _ids(x.shape[0], d), 1, backend=b)),
    "evaluate_ranking/query": ("evaluate_ranking", "query", lambda x, y, d, b: fastassoc.evaluate_ranking(
        x, y, _ids(x.shape[0], d), _ids(y.shape[0], d), _same_camera(x.shape[0], d, 0), _same_camera(y.shape[0], d, 1),
        backend=b)),
    "evaluate_ranking/gallery": ("evaluate_ranking", "gallery", lambda x, y, d, b: fastassoc.evaluate_ranking(
        y, x, _ids(y.shape[0], d), _ids(x.shape[0], d), _same_camera(y.shape[0], d, 0), _same_camera(x.shape[0], d, 1),
        backend=b)),
}


@pytest.mark.parametrize("case", sorted(DISTANCE_OPS))
@pytest.mark.parametrize("dtype, factor", [(torch.float32, 1e30), (torch.float64, 1e200)])
def test_huge_finite_features_are_rejected(backend_device, case, dtype, factor):
    backend, device = backend_device
    op, name, call = DISTANCE_OPS[case]
    require_backend(op, backend)
    generator = torch.Generator().manual_seed(1)
    x = (torch.randn(6, 4, generator=generator, dtype=torch.float64) * factor).to(dtype).to(device)
    y = torch.randn(6, 4, generator=generator, dtype=torch.float64).to(dtype).to(device)
    assert bool(torch.isfinite(x).all())
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}\b.*overflow"):
        call(x, y, device, backend)


def test_features_at_the_overflow_bound_give_exact_neighbours(backend_device):
    """Rows with |x|^2 just under finfo.max / 4 are accepted and every distance stays right."""
    backend, device = backend_device
    require_backend("topk_anchors", backend)
    big = math.sqrt(FLOAT32_MAX / 4) * 0.99
    x = torch.tensor([[big, 0.0], [-big, 0.0], [0.0, 0.0], [big / 2, 0.0], [0.0, -big / 4]])
    distances, indices = fastassoc.topk_anchors(x.to(device), x.to(device), k=5, backend=backend)
    exact = torch.cdist(x.double(), x.double()) ** 2
    expected_indices = torch.stack([torch.tensor(sorted(range(5), key=lambda j: (float(exact[i, j]), j)))
                                    for i in range(5)])
    assert torch.equal(indices.cpu(), expected_indices)
    assert bool(torch.isfinite(distances).all())
    torch.testing.assert_close(distances.double().cpu(), exact.gather(1, expected_indices), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_beyond_float32_is_rejected(backend_device, dtype):
    backend, device = backend_device
    require_backend("segmented_cross_entropy", backend)
    features, weight = _loss_inputs(device, dtype=dtype)
    targets = torch.eye(5, 7, device=device).to_sparse_csr()
    with pytest.raises(ValueError, match=r"\bscale\b.*float32"):
        fastassoc.segmented_cross_entropy(features, weight, targets, scale=1e39, backend=backend)


def test_scale_whose_logits_overflow_is_rejected(backend_device):
    backend, device = backend_device
    require_backend("segmented_cross_entropy", backend)
    features, weight = _loss_inputs(device)
    targets = torch.eye(5, 7, device=device).to_sparse_csr()
    # |f| |w| is about 4 here: 2 * 1e38 * 4 > 3.4e38
    with pytest.raises(ValueError, match=r"\bscale\b.*overflow"):
        fastassoc.segmented_cross_entropy(features * 2, weight, targets, scale=1e38, backend=backend)


def test_large_scale_that_fits_gives_the_oracle_loss(backend_device):
    backend, device = backend_device
    require_backend("segmented_cross_entropy", backend)
    features, weight = _loss_inputs("cpu")
    dense = torch.eye(5, 7) * 0.5
    expected = _dense_loss(features, weight, dense, torch.tensor([0, 7]), 1e30)
    loss = fastassoc.segmented_cross_entropy(features.to(device), weight.to(device), dense.to(device).to_sparse_csr(),
                                             scale=1e30, backend=backend)
    assert math.isfinite(float(loss))
    torch.testing.assert_close(loss.double().cpu(), expected, rtol=1e-4, atol=0)


def test_float64_scale_beyond_float32_is_computed_in_float64(backend_device):
    backend, device = backend_device
    require_backend("segmented_cross_entropy", backend)
    features, weight = _loss_inputs("cpu", dtype=torch.float64)
    dense = torch.eye(5, 7)
    expected = _dense_loss(features, weight, dense, torch.tensor([0, 7]), 1e39)
    loss = fastassoc.segmented_cross_entropy(features.to(device), weight.to(device), dense.to(device).to_sparse_csr(),
                                             scale=1e39, backend=backend)
    torch.testing.assert_close(loss.cpu(), expected, rtol=1e-9, atol=0)


# ---------------------------------------------------------------------------------------------
# Sizes that cannot be allocated
# ---------------------------------------------------------------------------------------------

def test_topk_anchors_with_k_2_pow_40_is_rejected(backend_device):
    backend, device = backend_device
    require_backend("topk_anchors", backend)
    x = torch.randn(6, 4, device=device)
    with pytest.raises(ValueError, match=r"^k\b"):
        fastassoc.topk_anchors(x, x, k=2**40, backend=backend)


def test_mutual_knn_with_k_2_pow_40_keeps_every_pair(backend_device):
    """k beyond both sets makes every pair mutual: the all-pairs oracle, not an allocation."""
    backend, device = backend_device
    require_backend("mutual_knn", backend)
    generator = torch.Generator().manual_seed(2)
    a, b = torch.randn(5, 3, generator=generator), torch.randn(4, 3, generator=generator)
    ia, ib, distances = fastassoc.mutual_knn(a.to(device), b.to(device), k=2**40, backend=backend)
    pairs = torch.cartesian_prod(torch.arange(5), torch.arange(4))
    assert torch.equal(ia.cpu(), pairs[:, 0]) and torch.equal(ib.cpu(), pairs[:, 1])
    exact = ((a.double()[pairs[:, 0]] - b.double()[pairs[:, 1]]) ** 2).sum(1)
    torch.testing.assert_close(distances.double().cpu(), exact, rtol=1e-5, atol=1e-5)


def test_cross_camera_graph_with_k_2_pow_40_links_every_cross_camera_pair(backend_device):
    backend, device = backend_device
    require_backend("cross_camera_graph", backend)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(7, 3, generator=generator)
    cameras = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    graph = fastassoc.cross_camera_graph(x.to(device), cameras.to(device), k=2**40, backend=backend)
    unit = torch.nn.functional.normalize(x.double(), dim=1)
    expected = torch.where(cameras[:, None] != cameras[None, :], unit @ unit.T, torch.zeros(()))
    expected.fill_diagonal_(1.0)
    torch.testing.assert_close(graph.to_dense().double().cpu(), expected, rtol=1e-5, atol=1e-6)


def test_max_rank_2_pow_40_is_rejected(backend_device):
    backend, device = backend_device
    require_backend("evaluate_ranking", backend)
    x = torch.randn(6, 4, device=device)
    pids = torch.arange(6, device=device)
    with pytest.raises(ValueError, match=r"^max_rank\b"):
        fastassoc.evaluate_ranking(x, x, pids, pids, torch.zeros(6, dtype=torch.int64, device=device),
                                   torch.ones(6, dtype=torch.int64, device=device), max_rank=2**40, backend=backend)


@pytest.mark.parametrize("op", ["cross_camera_graph", "knn_soft_labels"])
def test_camera_ids_up_to_2_pow_40_are_only_labels(backend_device, op):
    """Only which rows share a camera matters: huge ids give the compact ids' result, no allocation."""
    backend, device = backend_device
    require_backend(op, backend)
    call = getattr(fastassoc, op)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(8, 3, generator=generator).to(device)
    compact = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1], device=device)
    huge = torch.tensor([7, 2**40, 2**40 + 3, 0, 0, 2**62 - 1, 3])[compact.cpu()].to(device)
    expected = call(x, compact, k=1, backend=backend).to_dense()
    assert torch.equal(call(x, huge, k=1, backend=backend).to_dense(), expected)
    assert torch.equal(call(x, compact, k=1, num_cameras=2**40, backend=backend).to_dense(), expected)


def _stride0_width() -> int:
    """Width D of a 2**31-row stride-0 view whose float32 contiguous copy exceeds this machine's memory."""
    return max(8, PHYSICAL_MEMORY // (2**31 * 4) + 8)


@pytest.mark.parametrize("case", sorted(DISTANCE_OPS))
def test_expanded_view_too_large_to_copy_is_rejected(backend_device, case):
    backend, device = backend_device
    op, name, call = DISTANCE_OPS[case]
    require_backend(op, backend)
    width = _stride0_width()
    view = torch.randn(1, width, device=device).expand(2**31, width)
    small = torch.randn(3, width, device=device)
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}\b.*memory"):
        call(view, small, device, backend)


# ---------------------------------------------------------------------------------------------
# The helpers themselves
# ---------------------------------------------------------------------------------------------

def test_features_names_the_first_non_finite_entry():
    x = torch.randn(4, 5)
    x[2, 3] = float("inf")
    x[3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"x contains NaN or inf \(first at index \(2, 3\)\)"):
        _checks.features("x", x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_features_squared_norm_bound_is_exact(dtype):
    """Many columns make the one-pass bound fail, so the exact float64 row-norm check decides."""
    limit = torch.finfo(dtype).max
    edge = math.sqrt(limit / 4)
    x = torch.zeros(3, 64, dtype=dtype)
    x[1, :2] = edge * 0.99 / math.sqrt(2)
    assert torch.equal(_checks.features("x", x), x)
    x[2, :2] = edge * 1.01 / math.sqrt(2)
    with pytest.raises(ValueError, match=r"x is too large: its squared row norms overflow .*\(row 2 has norm"):
        _checks.features("x", x)


def test_features_rejects_meta_tensors_and_expanded_views_before_copying():
    with pytest.raises(ValueError, match="x is a meta tensor: fastassoc ops need data"):
        _checks.features("x", torch.empty(3, 4, device="meta"))
    width = _stride0_width()
    with pytest.raises(ValueError, match=r"^x asks for a contiguous copy .* more than the .* of memory on cpu"):
        _checks.features("x", torch.randn(1, width).expand(2**31, width))
    # a view that fits is copied and checked as usual
    view = torch.randn(1, 3).expand(4, 3)
    assert torch.equal(_checks.features("x", view), view.contiguous())


def test_allocation_limits():
    _checks.allocation("k", 10, 8)
    with pytest.raises(ValueError, match=r"^k asks for \[6, k\] outputs of 6597069766656 elements"):
        _checks.allocation("k", 6 * 2**40, 12, what="[6, k] outputs")
    with pytest.raises(ValueError, match=r"^max_rank asks for .* beyond the int64 range"):
        _checks.allocation("max_rank", 2**62, 8)
    _checks.allocation("k", 2**50, 8, device="meta")  # meta tensors hold no memory


def test_logit_scale():
    f = torch.randn(4, 3)
    assert _checks.logit_scale(30, f, f) == 30.0
    with pytest.raises(ValueError, match="scale must be finite in float32"):
        _checks.logit_scale(1e39, f, f)
    assert _checks.logit_scale(1e39, f.double(), f.double()) == 1e39
    with pytest.raises(TypeError, match="scale must be a real number"):
        _checks.logit_scale("1", f, f)
    # exact fallback: one large entry in a wide matrix fits although max|f| * max|w| * D does not
    wide = torch.zeros(2, 4096)
    wide[0, 0] = 1e18
    assert _checks.logit_scale(1e-2, wide, wide) == 1e-2
    with pytest.raises(ValueError, match=r"scale=1000.0 makes the logits"):
        _checks.logit_scale(1e3, wide, wide)


def test_csr_accepts_both_forms_and_normalises():
    dense = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 3.0]])
    sparse = dense.to_sparse_csr()
    sparse32 = torch.sparse_csr_tensor(sparse.crow_indices().int(), sparse.col_indices().int(), sparse.values(),
                                       size=(2, 3))
    for form in (sparse, sparse32, CSRMatrix.from_sparse_csr(sparse32)):
        matrix = _checks.csr("targets", form, shape=(2, 3))
        assert isinstance(matrix, CSRMatrix)
        assert matrix.crow_indices.dtype == matrix.col_indices.dtype == torch.int64
        assert matrix.size == (2, 3)
        assert torch.equal(matrix.to_sparse_csr().to_dense(), dense)
    empty = _checks.csr("targets", torch.zeros(0, 3).to_sparse_csr(), shape=(0, 3))
    assert empty.crow_indices.tolist() == [0]


@pytest.mark.parametrize("parts, message", [
    ((torch.tensor([0, 1, 600]), torch.tensor([0, 2]), torch.ones(2)),
     r"targets.crow_indices must end at nnz \(2\), got 600"),
    ((torch.tensor([1, 1, 2]), torch.tensor([0, 2]), torch.ones(2)), r"targets.crow_indices must start at 0, got 1"),
    ((torch.tensor([0, 2, 1]), torch.tensor([0, 2]), torch.ones(2)),
     r"targets.crow_indices must be non-decreasing, but entry 2 \(1\) is below entry 1 \(2\)"),
    ((torch.tensor([0, 1, 2]), torch.tensor([0, 3]), torch.ones(2)),
     r"targets.col_indices values must lie in \[0, 3\), found 3 at position 1"),
    ((torch.tensor([0, 1, 2]), torch.tensor([-2, 0]), torch.ones(2)),
     r"targets.col_indices values must lie in \[0, 3\), found -2 at position 0"),
    ((torch.tensor([0, 1, 2]), torch.tensor([0, 1]), torch.tensor([1.0, -0.5])),
     r"targets values must be finite and non-negative, found -0.5 at entry 1"),
    ((torch.tensor([0, 1, 2]), torch.tensor([0, 1]), torch.tensor([float("nan"), 1.0])),
     r"targets values must be finite and non-negative, found nan at entry 0"),
    ((torch.tensor([0, 1]), torch.tensor([0]), torch.ones(1)), r"targets.crow_indices must have length rows \+ 1 = 3"),
    ((torch.tensor([0, 1, 2]), torch.tensor([0, 1]), torch.ones(3)), r"targets has 2 col_indices but 3 values"),
    ((torch.tensor([0, 1, 2]), torch.tensor([0.0, 1.0]), torch.ones(2)),
     r"targets.col_indices must have an integer dtype"),
    ((torch.tensor([0, 1, 2]), torch.tensor([0, 1]), torch.ones(2, dtype=torch.int64)),
     r"targets values must be floating point"),
    ((torch.tensor([0, 1, 2]), torch.tensor([0, 1], device="meta"), torch.ones(2)),
     r"targets.col_indices is a meta tensor"),
])
def test_csr_errors_name_the_part_and_position(parts, message):
    with pytest.raises((ValueError, TypeError), match=message):
        _checks.csr("targets", CSRMatrix(*parts, (2, 3)), shape=(2, 3))


def test_csr_shape_and_layout_errors():
    with pytest.raises(ValueError, match=r"targets must have shape \(2, 4\), got \(2, 3\)"):
        _checks.csr("targets", torch.eye(2, 3).to_sparse_csr(), shape=(2, 4))
    with pytest.raises(TypeError, match="targets must be a torch sparse CSR tensor .* got layout torch.strided"):
        _checks.csr("targets", torch.eye(2, 3), shape=(2, 3))
    with pytest.raises(TypeError, match="targets must be a torch sparse CSR tensor .* got layout torch.sparse_coo"):
        _checks.csr_components("targets", torch.eye(2, 3).to_sparse())
    # csr_components reads nothing: a meta matrix passes it (the op's fake implementation takes it)
    meta = CSRMatrix(torch.empty(3, dtype=torch.int64, device="meta"), torch.empty(0, dtype=torch.int64, device="meta"),
                     torch.empty(0, device="meta"), (2, 3))
    assert _checks.csr_components("targets", meta) is meta


def test_index_checks_name_the_first_offender():
    with pytest.raises(ValueError, match=r"labels values must lie in \[0, 5\), found 7 at position 2"):
        _checks.index_vector("labels", torch.tensor([0, 4, 7, 9]), length=4, low=0, high=5)
    with pytest.raises(ValueError, match=r"offsets must be non-decreasing, but entry 2 \(1\) is below entry 1 \(3\)"):
        _checks.offsets("offsets", torch.tensor([0, 3, 1, 4]), total=4)
    with pytest.raises(ValueError, match=r"offsets must end at the number of rows it splits \(5\), got 4"):
        _checks.offsets("offsets", torch.tensor([0, 3, 4]), total=5)
    with pytest.raises(ValueError, match=r"cameras is a meta tensor"):
        _checks.index_vector("cameras", torch.empty(3, dtype=torch.int64, device="meta"), length=3, low=0, high=5)
    view = torch.zeros(1, dtype=torch.int32).expand(2**40)
    with pytest.raises(ValueError, match=r"^cameras asks for an int64 contiguous copy"):
        _checks.index_vector("cameras", view, length=2**40, low=0, high=5)


def test_camera_ids_compact_only_when_needed():
    ids, count = _checks.camera_ids("cameras", torch.tensor([2, 0, 1, 2]), num_rows=4)
    assert ids.tolist() == [2, 0, 1, 2] and count == 3
    ids, count = _checks.camera_ids("cameras", torch.tensor([2**40, 5, 2**40, 0]), num_rows=4)
    assert ids.tolist() == [2, 1, 2, 0] and count == 3
    ids, count = _checks.camera_ids("cameras", torch.tensor([1, 0]), num_rows=2, num_cameras=2**40)
    assert ids.tolist() == [1, 0] and count == 2
    ids, count = _checks.camera_ids("cameras", torch.zeros(0, dtype=torch.int64), num_rows=0)
    assert ids.numel() == 0 and count == 0
    with pytest.raises(ValueError, match=r"cameras values must lie in \[0, 2\), found 3"):
        _checks.camera_ids("cameras", torch.tensor([1, 3]), num_rows=2, num_cameras=2)


@contextlib.contextmanager
def _deferred_and_no_host_reads(monkeypatch):
    """Take the CUDA path on CPU tensors, and fail on any host read of a tensor value."""
    monkeypatch.setattr(_checks, "_deferred", lambda t: True)

    def host_read(self, *args, **kwargs):
        raise AssertionError("a deferred check read a tensor value on the host")

    with monkeypatch.context() as patch:
        for method in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist"):
            patch.setattr(torch.Tensor, method, host_read)
        yield


def test_deferred_checks_read_nothing_on_the_host_for_valid_inputs(monkeypatch):
    x = torch.randn(5, 4)
    targets = torch.eye(5, 7).to_sparse_csr()
    with _deferred_and_no_host_reads(monkeypatch):
        _checks.features("x", x)
        _checks.logit_scale(2.0, x, x)
        _checks.index_vector("labels", torch.tensor([0, 2, 1]), length=3, low=0, high=3)
        _checks.offsets("offsets", torch.tensor([0, 2, 5]), total=5)
        matrix = _checks.csr("targets", targets, shape=(5, 7))
    assert torch.equal(matrix.to_sparse_csr().to_dense(), torch.eye(5, 7))


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_deferred_checks_catch_every_value_corruption(monkeypatch, kind):
    """On CUDA the value checks are queued: a corrupted structure must still trip an assert."""
    rng = random.Random(kind)
    parts = _corrupt(kind, rng, 4, 6)
    with _deferred_and_no_host_reads(monkeypatch):
        with pytest.raises((ValueError, TypeError, RuntimeError), match=r"\btargets\b"):
            _checks.csr("targets", CSRMatrix(*parts), shape=(4, 6))


def test_deferred_feature_checks_trip_asserts(monkeypatch):
    x = torch.randn(4, 3)
    with _deferred_and_no_host_reads(monkeypatch):
        with pytest.raises(RuntimeError, match="x contains NaN or inf"):
            _checks.features("x", x.masked_fill(x > 1e9, 0).index_fill(0, torch.tensor([1]), float("nan")))
        with pytest.raises(RuntimeError, match="x is too large"):
            _checks.features("x", x * 1e30)
        with pytest.raises(RuntimeError, match=r"scale=1e\+38 makes the logits"):
            _checks.logit_scale(1e38, x, x)
