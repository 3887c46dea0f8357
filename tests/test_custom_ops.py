"""The ops as torch custom ops: opcheck, torch.compile without graph breaks, meta tensors.

Every public op is registered as ``torch.ops.fastassoc.<op>``; ``torch.library.opcheck``
checks each registration (schema and mutation declaration, autograd registration, the
fake implementation against the real one, AOT dispatch with dynamic shapes) on the
``reference`` and ``cpu`` backends. A training-step-like function calling topk_anchors,
mutual_knn, knn_soft_labels (as a CSRMatrix) and ema_update_ must compile with
``fullgraph=True`` (any graph break is an error), count no graph break, and give the
eager results. Ops whose output shapes follow from input shapes run on meta tensors;
ops with data-dependent output sizes raise a ValueError naming the op.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

import fastassoc
from conftest import require_backend
from fastassoc.ops._sparse import CSRMatrix

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")

OPS = ("topk_anchors", "mutual_knn", "cross_camera_graph", "knn_soft_labels", "agglomerative_merge",
       "ema_update_", "evaluate_ranking")


def _features(rows: int, dim: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=generator).to(dtype)


def _opcheck_cases(backend: str):
    """(op name, id, positional arguments of torch.ops.fastassoc.<op>) on small inputs."""
    cameras = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1])
    labels = torch.tensor([0, 0, 1, 2, 2, 3, 4, 4, 5, 6, 6])
    for dtype in (torch.float32, torch.float64):
        name = str(dtype).removeprefix("torch.")
        q, a = _features(6, 4, 0, dtype), _features(9, 4, 1, dtype)
        x = _features(11, 5, 2, dtype)
        yield "topk_anchors", f"plain-{name}", (q, a, 3, "sqeuclidean", None, None, None, "highest", backend)
        yield "topk_anchors", f"segments-{name}", (
            q, a, 2, "cosine", torch.tensor([0, 4, 9]), torch.tensor([0, 1, 1, 0, 1, 0], dtype=torch.int32),
            torch.tensor([-1, 5, 2, -1, -1, 0]), "highest", backend)
        yield "topk_anchors", f"k-past-segment-{name}", (q, a, 12, "euclidean", None, None, None, "highest",
                                                         backend)
        yield "mutual_knn", f"plain-{name}", (q, a, 3, "sqeuclidean", None, "highest", backend)
        yield "mutual_knn", f"max-distance-{name}", (q, a, 2, "cosine", 0.9, "highest", backend)
        yield "cross_camera_graph", f"pairwise-{name}", (x, cameras, 2, None, True, "pairwise", None, "highest",
                                                         backend)
        yield "cross_camera_graph", f"pooled-{name}", (x, cameras.to(torch.int32), 3, 0.1, False, "pooled", 4,
                                                       "highest", backend)
        yield "knn_soft_labels", f"k2-{name}", (x, cameras, 2, None, "highest", backend)
        yield "knn_soft_labels", f"k0-{name}", (x, cameras, 0, 3, "highest", backend)
        for linkage in ("tssl", "tssl_typeset", "centroid", "buc", "buc_l2"):
            yield "agglomerative_merge", f"{linkage}-{name}", (x, labels, 3, linkage, 2, 0.1, "highest", backend)
        yield "agglomerative_merge", f"no-merge-{name}", (x, labels, 0, "tssl", 2, 0.0, "highest", backend)
        for reduce in ("mean", "sum", "sequential"):
            yield "ema_update_", f"{reduce}-{name}", (_features(7, 4, 3, dtype), torch.tensor([1, 5, 1, 0]),
                                                      _features(4, 4, 4, dtype), 0.3, True, reduce, backend)
        yield "evaluate_ranking", f"euclidean-{name}", (
            q, _features(15, 4, 5, dtype), torch.tensor([0, 1, 2, 3, 0, 1]), torch.arange(15) % 5 - 1,
            torch.zeros(6, dtype=torch.int64), torch.arange(15) % 2, "euclidean", 4, "highest", backend)
    # Empty inputs: the fake implementations must give the real (empty) shapes too.
    empty = torch.zeros(0, 4)
    yield "topk_anchors", "empty-queries", (empty, _features(5, 4, 6), 2, "sqeuclidean", None, None, None,
                                            "highest", backend)
    yield "mutual_knn", "empty-a", (empty, _features(5, 4, 6), 2, "sqeuclidean", None, "highest", backend)
    yield "knn_soft_labels", "empty", (empty, torch.zeros(0, dtype=torch.int64), 2, 1, "highest", backend)
    yield "ema_update_", "empty-index", (_features(3, 4, 7), torch.zeros(0, dtype=torch.int64), empty, 0.5,
                                         False, "mean", backend)


CASES = [pytest.param(backend, op, arguments, id=f"{backend}-{op}-{case}")
         for backend in ("reference", "cpu") for op, case, arguments in _opcheck_cases(backend)]


def test_every_public_op_is_covered_by_opcheck():
    covered = {op for _, op, _ in (case.values for case in CASES)}
    assert covered == set(OPS), f"opcheck misses {set(OPS) - covered}"
    for op in OPS:
        assert hasattr(torch.ops.fastassoc, op), f"torch.ops.fastassoc.{op} is not registered"


@pytest.mark.parametrize("backend, op, arguments", CASES)
def test_opcheck(backend, op, arguments):
    require_backend(op, backend)
    # All of opcheck's default test utils apply: test_schema (declared mutations, no
    # aliasing), test_autograd_registration, test_faketensor and test_aot_dispatch_dynamic.
    torch.library.opcheck(getattr(torch.ops.fastassoc, op).default, arguments)


# ----------------------------------------------------------------------------- torch.compile

def _step(features, bank, cameras, offsets, backend):
    distances, indices = fastassoc.topk_anchors(features, bank, k=3, anchor_offsets=offsets,
                                                query_segments=cameras, backend=backend)
    ia, ib, pair_distances = fastassoc.mutual_knn(features, bank, k=2, backend=backend)
    soft = fastassoc.knn_soft_labels(bank, cameras, k=2, as_tuple=True, backend=backend)
    fastassoc.ema_update_(bank, torch.arange(features.shape[0]), features, 0.5, backend=backend)
    loss = (features * bank[indices[:, 0]]).sum() + soft.values.sum()
    return loss, distances, indices, ia, ib, pair_distances, soft.crow_indices, soft.col_indices, soft.values


def _step_inputs(seed: int = 0, rows: int = 24, dim: int = 8, num_cameras: int = 3):
    generator = torch.Generator().manual_seed(seed)
    cameras = torch.arange(rows) % num_cameras
    cameras = torch.sort(cameras, stable=True).values
    offsets = torch.zeros(num_cameras + 1, dtype=torch.int64)
    offsets[1:] = torch.bincount(cameras, minlength=num_cameras).cumsum(0)
    features = torch.randn(rows, dim, generator=generator).requires_grad_(True)
    bank = torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator), dim=1)
    return features, bank, cameras, offsets


def _compare_with_eager(backend: str, compiler: str):
    features, bank, cameras, offsets = _step_inputs()
    eager_bank, compiled_bank = bank.clone(), bank.clone()
    eager = _step(features, eager_bank, cameras, offsets, backend)
    eager[0].backward()
    eager_grad = features.grad
    features.grad = None
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(_step, backend=compiler, fullgraph=True)(features, compiled_bank, cameras, offsets,
                                                                       backend)
    compiled[0].backward()
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    names = ("loss", "distances", "indices", "ia", "ib", "pair_distances", "crow", "col", "values")
    for name, want, got in zip(names[1:], eager[1:], compiled[1:]):
        assert torch.equal(want, got), f"{backend}/{compiler}: compiled {name} differs from eager"
    assert torch.equal(eager_bank, compiled_bank), f"{backend}/{compiler}: compiled ema_update_ differs"
    # The loss is a float reduction the compiler may reorder.
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(features.grad, eager_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ("reference", "cpu", "triton"))
@pytest.mark.parametrize("compiler", ("eager", "aot_eager"))
def test_compiled_step_has_no_graph_break_and_equals_eager(backend, compiler):
    for op in ("topk_anchors", "mutual_knn", "knn_soft_labels", "ema_update_"):
        require_backend(op, backend)
    _compare_with_eager(backend, compiler)


def test_compiled_step_with_inductor_equals_eager():
    for op in ("topk_anchors", "mutual_knn", "knn_soft_labels", "ema_update_"):
        require_backend(op, "cpu")
    _compare_with_eager("cpu", "inductor")


def test_compiled_step_follows_new_batch_sizes_with_symbolic_shapes():
    # A second size recompiles once with symbolic sizes (the fake implementations must
    # handle SymInts); a third reuses that graph.
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(_step, backend="aot_eager", fullgraph=True)
    for rows in (24, 30, 36):
        features, bank, cameras, offsets = _step_inputs(rows=rows)
        eager_bank, compiled_bank = bank.clone(), bank.clone()
        eager = _step(features, eager_bank, cameras, offsets, "reference")
        got = compiled(features, compiled_bank, cameras, offsets, "reference")
        assert all(torch.equal(want, have) for want, have in zip(eager[1:], got[1:])), f"{rows} rows"
        assert torch.equal(eager_bank, compiled_bank), f"{rows} rows"
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


def test_explain_counts_one_graph():
    # Without fullgraph=True dynamo only captures ops with data-dependent output sizes
    # (mutual_knn's pairs, CSR nnz; torch.nonzero alike) when told to.
    torch._dynamo.reset()
    features, bank, cameras, offsets = _step_inputs()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        explanation = torch._dynamo.explain(_step)(features, bank, cameras, offsets, "reference")
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1, explanation.graph_count


def test_graph_and_soft_labels_as_tuple_match_the_sparse_result():
    x = _features(11, 5, 2)
    cameras = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1])
    for function in (fastassoc.cross_camera_graph, fastassoc.knn_soft_labels):
        sparse = function(x, cameras, k=2, backend="reference")
        parts = function(x, cameras, k=2, backend="reference", as_tuple=True)
        assert isinstance(parts, CSRMatrix) and parts.size == (11, 11)
        assert sparse.layout == torch.sparse_csr
        assert torch.equal(parts.to_sparse_csr().to_dense(), sparse.to_dense()), function.__name__


def test_as_tuple_must_be_a_bool():
    with pytest.raises(TypeError, match="as_tuple"):
        fastassoc.knn_soft_labels(_features(4, 2, 0), torch.zeros(4, dtype=torch.int64), k=1, as_tuple=1)


# ----------------------------------------------------------------------------- meta and fake tensors

def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def test_shape_determined_ops_run_on_meta_tensors():
    distances, indices = fastassoc.topk_anchors(_meta(5, 3), _meta(7, 3), k=4)
    assert (distances.shape, distances.dtype, indices.shape, indices.dtype) == (
        (5, 4), torch.float32, (5, 4), torch.int64)
    assert distances.is_meta and indices.is_meta
    labels = fastassoc.agglomerative_merge(_meta(6, 3), _meta(6, dtype=torch.int64), 2)
    assert labels.is_meta and labels.shape == (6,) and labels.dtype == torch.int64
    bank = _meta(6, 3)
    assert fastassoc.ema_update_(bank, _meta(2, dtype=torch.int64), _meta(2, 3), 0.5) is bank


@pytest.mark.parametrize("op, call", [
    ("mutual_knn", lambda: fastassoc.mutual_knn(_meta(5, 3), _meta(7, 3), k=2)),
    ("cross_camera_graph", lambda: fastassoc.cross_camera_graph(_meta(5, 3), _meta(5, dtype=torch.int64))),
    ("knn_soft_labels", lambda: fastassoc.knn_soft_labels(_meta(5, 3), _meta(5, dtype=torch.int64), k=1)),
    ("evaluate_ranking", lambda: fastassoc.evaluate_ranking(
        _meta(2, 3), _meta(4, 3), _meta(2, dtype=torch.int64), _meta(4, dtype=torch.int64),
        _meta(2, dtype=torch.int64), _meta(4, dtype=torch.int64))),
])
def test_data_dependent_ops_refuse_meta_tensors_naming_the_op(op, call):
    with pytest.raises(ValueError, match=op) as error:
        call()
    assert "meta" in str(error.value), str(error.value)


def test_fake_tensors_get_symbolic_pair_and_nnz_sizes():
    with FakeTensorMode(shape_env=ShapeEnv()):
        ia, ib, distances = torch.ops.fastassoc.mutual_knn(torch.empty(5, 3), torch.empty(7, 3), 2, "sqeuclidean",
                                                           None, "highest", "auto")
        crow, col, values = torch.ops.fastassoc.knn_soft_labels(torch.empty(5, 3), torch.zeros(5, dtype=torch.int64),
                                                                1, None, "highest", "auto")
    # One unbacked size (printed u0, u1, ...) shared by the outputs of one call.
    assert isinstance(ia.shape[0], torch.SymInt)
    assert str(ia.shape[0]) == str(ib.shape[0]) == str(distances.shape[0])
    assert crow.shape == (6,) and isinstance(col.shape[0], torch.SymInt)
    assert str(col.shape[0]) == str(values.shape[0]) != str(ia.shape[0])
    assert (ia.dtype, distances.dtype, crow.dtype, col.dtype, values.dtype) == (
        torch.int64, torch.float32, torch.int64, torch.int64, torch.float32)


@pytest.mark.parametrize("call, name", [
    (lambda: fastassoc.topk_anchors(_meta(4, 3), _meta(6, 4)), "feature dimensions"),
    (lambda: fastassoc.topk_anchors(_meta(4, 3), _meta(6, 3, dtype=torch.float64)), "dtype"),
    (lambda: fastassoc.topk_anchors(_meta(4), _meta(6, 3)), "queries"),
    (lambda: fastassoc.topk_anchors(_meta(4, 3), _meta(6, 3), query_segments=_meta(3, dtype=torch.int64)),
     "query_segments"),
    (lambda: fastassoc.agglomerative_merge(_meta(6, 3), _meta(5, dtype=torch.int64), 1), "labels"),
    (lambda: fastassoc.agglomerative_merge(_meta(6, 3, dtype=torch.int64), _meta(6, dtype=torch.int64), 1), "x"),
    (lambda: fastassoc.ema_update_(_meta(6, 3), _meta(2, dtype=torch.float32), _meta(2, 3), 0.5), "index"),
    (lambda: fastassoc.ema_update_(_meta(6, 3), _meta(2, dtype=torch.int64), _meta(3, 3), 0.5), "index"),
    (lambda: fastassoc.mutual_knn(_meta(5, 3), _meta(7, 2)), "feature dimensions"),
])
def test_fake_implementations_check_metadata_naming_the_argument(call, name):
    with pytest.raises((ValueError, TypeError), match=name):
        call()
