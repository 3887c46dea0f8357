"""NumPy, SciPy-sparse, CuPy and DLPack arrays through the public ops (fastassoc._arrays).

Each op is called twice on the same data: once with NumPy arrays, once with torch
tensors made from them. The NumPy call must return NumPy (or SciPy sparse) results holding
exactly the torch call's values, so the conversion neither changes data nor loses any.
Zero-copy is checked on memory addresses; topk_anchors is also checked against a NumPy
brute-force oracle. CuPy tests skip themselves without CuPy or a GPU.
"""
from __future__ import annotations

import dataclasses
import inspect
import typing
import warnings

import numpy as np
import pytest
import scipy.sparse
import torch

import fastassoc
from fastassoc import _arrays
from fastassoc.ops import _sparse, cluster, evaluation, graph, knn, loss, memory

OPS = {
    "topk_anchors": knn.topk_anchors, "mutual_knn": knn.mutual_knn,
    "cross_camera_graph": graph.cross_camera_graph, "knn_soft_labels": graph.knn_soft_labels,
    "segmented_cross_entropy": loss.segmented_cross_entropy,
    "agglomerative_merge": cluster.agglomerative_merge, "ema_update_": memory.ema_update_,
    "evaluate_ranking": evaluation.evaluate_ranking,
}


def features(rows: int, dim: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)


def as_torch(value):
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value


def assert_numpy_equal(result, expected: torch.Tensor, what: str) -> None:
    assert isinstance(result, np.ndarray), f"{what}: expected a NumPy array, got {type(result).__name__}"
    expected = expected.detach().numpy()
    assert result.dtype == expected.dtype, f"{what}: dtype {result.dtype} != {expected.dtype}"
    assert result.shape == expected.shape, f"{what}: shape {result.shape} != {expected.shape}"
    mismatch = np.argwhere(~((result == expected) | (np.isnan(result) & np.isnan(expected)))
                           if result.dtype.kind == "f" else result != expected)
    assert mismatch.size == 0, (f"{what}: first mismatch at {tuple(mismatch[0])}: "
                                f"{result[tuple(mismatch[0])]} != {expected[tuple(mismatch[0])]}")


def assert_scipy_equals_torch_csr(result, expected: torch.Tensor, what: str) -> None:
    assert isinstance(result, scipy.sparse.csr_array), f"{what}: got {type(result).__name__}"
    assert result.shape == tuple(expected.shape)
    np.testing.assert_array_equal(result.indptr, expected.crow_indices().numpy(), err_msg=f"{what} indptr")
    np.testing.assert_array_equal(result.indices, expected.col_indices().numpy(), err_msg=f"{what} indices")
    assert_numpy_equal(result.data, expected.values(), f"{what} data")


# ----------------------------------------------------------------------------- wrapping

@pytest.mark.parametrize("name", sorted(OPS))
def test_wrapped_op_keeps_name_doc_and_signature(name):
    wrapped, original = getattr(fastassoc, name), OPS[name]
    assert wrapped is not original, f"fastassoc.{name} is not wrapped"
    assert wrapped.__wrapped__ is original
    assert wrapped.__name__ == original.__name__ == name
    assert wrapped.__doc__ == original.__doc__ and wrapped.__doc__
    assert inspect.signature(wrapped) == inspect.signature(original)
    assert getattr(fastassoc.ops, name) is wrapped


def test_torch_call_is_a_pass_through():
    received = {}

    def op(x, y, *, k=1):
        received.update(x=x, y=y, k=k)
        return x

    wrapped = _arrays.accepts_arrays(op)
    x, y = torch.ones(3), torch.zeros(3)
    assert wrapped(x, y=y, k=np.int64(2)) is x
    assert received["x"] is x and received["y"] is y and received["k"] == 2


# ----------------------------------------------------------------------------- every op, NumPy in

def oracle_topk_indices(queries: np.ndarray, anchors: np.ndarray, k: int) -> np.ndarray:
    squared = ((queries[:, None, :].astype(np.float64) - anchors[None, :, :]) ** 2).sum(-1)
    return np.stack([np.lexsort((np.arange(len(anchors)), row))[:k] for row in squared])


def test_topk_anchors_numpy():
    queries, anchors = features(7, seed=1), features(11, seed=2)
    offsets = np.array([0, 4, 11], dtype=np.int32)
    segments = np.array([0, 1, 1, 0, 1, 0, 1])
    exclude = np.array([-1, 5, -1, 2, -1, -1, 10])
    kwargs = dict(anchor_offsets=offsets, query_segments=segments, exclude=exclude)
    distances, indices = fastassoc.topk_anchors(queries, anchors, 3, **kwargs)
    expected = fastassoc.topk_anchors(torch.from_numpy(queries), torch.from_numpy(anchors), 3,
                                      **{key: torch.from_numpy(value) for key, value in kwargs.items()})
    assert_numpy_equal(distances, expected[0], "distances")
    assert_numpy_equal(indices, expected[1], "indices")

    plain_distances, plain_indices = fastassoc.topk_anchors(queries, anchors, k=4)
    np.testing.assert_array_equal(plain_indices, oracle_topk_indices(queries, anchors, 4))
    assert plain_distances.dtype == np.float32


def test_mutual_knn_numpy():
    a, b = features(9, seed=3), features(12, seed=4)
    result = fastassoc.mutual_knn(a, b, 3, max_distance=12.0)
    expected = fastassoc.mutual_knn(torch.from_numpy(a), torch.from_numpy(b), 3, max_distance=12.0)
    assert type(result) is type(expected) and len(result) == 3
    for name, got, want in zip(("ia", "ib", "distances"), result, expected):
        assert_numpy_equal(got, want, name)
    assert len(result[0]) > 0, "the test data should give some mutual pairs"


@pytest.mark.parametrize("op", ["cross_camera_graph", "knn_soft_labels"])
def test_sparse_results_are_scipy_csr_arrays(op):
    x, cameras = features(14, seed=5), np.array([0, 1, 2] * 4 + [1, 0])
    result = getattr(fastassoc, op)(x, cameras, 2)
    expected = getattr(fastassoc, op)(torch.from_numpy(x), torch.from_numpy(cameras), 2)
    assert_scipy_equals_torch_csr(result, expected, op)
    np.testing.assert_array_equal(result.toarray(), expected.to_dense().numpy())


@pytest.mark.parametrize("op", ["cross_camera_graph", "knn_soft_labels"])
def test_csr_tuple_results_have_numpy_components(op):
    x, cameras = features(10, seed=6), np.array([0, 1] * 5)
    result = getattr(fastassoc, op)(x, cameras, 2, as_tuple=True)
    expected = getattr(fastassoc, op)(torch.from_numpy(x), torch.from_numpy(cameras), 2, as_tuple=True)
    assert isinstance(result, _sparse.CSRMatrix)
    for field in ("crow_indices", "col_indices", "values"):
        assert_numpy_equal(getattr(result, field), getattr(expected, field), field)
    assert tuple(result.size) == tuple(expected.size)


def soft_targets(rows: int, columns: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dense = rng.random((rows, columns)).astype(np.float32)
    dense[dense < 0.6] = 0.0
    return dense


@pytest.mark.parametrize("layout", ["csr_array", "csr_matrix", "coo_array", "csc_matrix"])
def test_segmented_cross_entropy_numpy_and_scipy_targets(layout):
    feats, weight = features(5, seed=7), features(8, seed=8)
    dense = soft_targets(5, 8, seed=9)
    offsets = np.array([0, 3, 8])
    targets = getattr(scipy.sparse, layout)(dense)
    result = fastassoc.segmented_cross_entropy(feats, weight, targets, class_offsets=offsets, scale=2.0)
    expected = fastassoc.segmented_cross_entropy(torch.from_numpy(feats), torch.from_numpy(weight),
                                                 torch.from_numpy(dense).to_sparse_csr(),
                                                 class_offsets=torch.from_numpy(offsets), scale=2.0)
    assert isinstance(result, np.ndarray) and result.shape == () and result.dtype == np.float32
    assert_numpy_equal(result, expected, "loss")


def test_scipy_duplicate_entries_add_up_as_scipy_defines():
    feats, weight = features(3, seed=10), features(4, seed=11)
    rows, cols, vals = np.array([0, 0, 1, 2, 2]), np.array([2, 2, 0, 3, 1]), np.array([0.25, 0.5, 1, 1, 2], np.float32)
    duplicated = scipy.sparse.csr_array((vals, (rows, cols)), shape=(3, 4))
    duplicated.has_canonical_format = False  # as a hand-built matrix would be
    dense = np.zeros((3, 4), np.float32)
    np.add.at(dense, (rows, cols), vals)
    result = fastassoc.segmented_cross_entropy(feats, weight, duplicated)
    expected = fastassoc.segmented_cross_entropy(torch.from_numpy(feats), torch.from_numpy(weight),
                                                 torch.from_numpy(dense).to_sparse_csr())
    assert_numpy_equal(result, expected, "loss")


def test_csr_matrix_of_numpy_components_is_accepted():
    feats, weight = features(4, seed=12), features(5, seed=13)
    dense = soft_targets(4, 5, seed=14)
    sparse = torch.from_numpy(dense).to_sparse_csr()
    targets = _sparse.CSRMatrix(sparse.crow_indices().numpy(), sparse.col_indices().numpy(),
                                sparse.values().numpy(), (4, 5))
    result = fastassoc.segmented_cross_entropy(feats, weight, targets)
    expected = fastassoc.segmented_cross_entropy(torch.from_numpy(feats), torch.from_numpy(weight), sparse)
    assert_numpy_equal(result, expected, "loss")
    op, seen = recording_op()
    op(feats, y=targets)
    assert isinstance(seen["y"], _sparse.CSRMatrix) and seen["y"].size == (4, 5)
    assert seen["y"].values.data_ptr() == targets.values.ctypes.data, "values were copied"
    for field in ("crow_indices", "col_indices", "values"):
        assert torch.equal(getattr(seen["y"], field), getattr(sparse, field)())


def test_agglomerative_merge_numpy():
    x, labels = features(12, seed=15), np.array([0, 0, 1, 2, 2, 3, 4, 4, 5, 6, 7, 7], dtype=np.int32)
    result = fastassoc.agglomerative_merge(x, labels, 3, linkage="centroid")
    expected = fastassoc.agglomerative_merge(torch.from_numpy(x), torch.from_numpy(labels), 3, linkage="centroid")
    assert_numpy_equal(result, expected, "labels")


def test_evaluate_ranking_returns_ranking_result_with_numpy_cmc():
    query, gallery = features(6, seed=16), features(15, seed=17)
    arrays = dict(query_pids=np.arange(6) % 4, gallery_pids=np.arange(15) % 5,
                  query_cameras=np.zeros(6, np.int64), gallery_cameras=np.arange(15) % 3)
    result = fastassoc.evaluate_ranking(query, gallery, max_rank=5, **arrays)
    expected = fastassoc.evaluate_ranking(torch.from_numpy(query), torch.from_numpy(gallery), max_rank=5,
                                          **{key: torch.from_numpy(value) for key, value in arrays.items()})
    assert type(result) is fastassoc.RankingResult
    assert_numpy_equal(result.cmc, expected.cmc, "cmc")
    assert (result.mAP, result.mINP, result.num_valid_queries) == (expected.mAP, expected.mINP,
                                                                   expected.num_valid_queries)
    assert result.rank1 == expected.rank1


# ----------------------------------------------------------------------------- ema_update_ in place

def test_ema_update_updates_the_callers_numpy_bank_in_place():
    bank, values = features(6, seed=18), features(4, seed=19)
    index = np.array([1, 4, 1, 0])
    expected = torch.from_numpy(bank.copy())
    fastassoc.ema_update_(expected, torch.from_numpy(index), torch.from_numpy(values), 0.75)
    address = bank.ctypes.data
    result = fastassoc.ema_update_(bank, index, values, 0.75)
    assert result is bank, "ema_update_ must return the caller's bank object"
    assert bank.ctypes.data == address
    assert_numpy_equal(bank, expected, "bank")
    assert not np.array_equal(bank[1], features(6, seed=18)[1]), "row 1 was not updated"


def test_ema_update_bank_view_is_updated_in_its_base():
    base = np.zeros((8, 6), np.float32)
    bank = base[2:6]  # contiguous rows of a larger buffer
    values = features(2, seed=20)
    fastassoc.ema_update_(bank, np.array([0, 3]), values, 0.0, normalize=False)
    assert np.shares_memory(bank, base)
    np.testing.assert_array_equal(base[2], values[0])
    np.testing.assert_array_equal(base[5], values[1])
    assert not base[[0, 1, 3, 4, 6, 7]].any()


def test_read_only_bank_is_a_clear_error_and_stays_unchanged():
    bank = features(4, seed=21)
    before = bank.copy()
    bank.flags.writeable = False
    with pytest.raises(ValueError, match=r"bank is updated in place.*read-only"):
        fastassoc.ema_update_(bank, np.array([0]), features(1, seed=22), 0.5)
    np.testing.assert_array_equal(bank, before)


def test_non_native_byte_order_bank_is_a_clear_error():
    bank = features(4, seed=23).astype(">f4")
    with pytest.raises(ValueError, match=r"bank is updated in place.*byte order"):
        fastassoc.ema_update_(bank, np.array([0]), features(1, seed=24).astype(">f4"), 0.5)


def test_read_only_values_are_copied_for_ema_update():
    bank, values = features(5, seed=25), features(2, seed=26)
    expected = torch.from_numpy(bank.copy())
    fastassoc.ema_update_(expected, torch.tensor([2, 3]), torch.from_numpy(values), 0.5)
    values.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastassoc.ema_update_(bank, np.array([2, 3]), values, 0.5)
    assert_numpy_equal(bank, expected, "bank")


# ----------------------------------------------------------------------------- zero-copy, copies

def recording_op():
    seen = {}

    @_arrays.accepts_arrays
    def op(x, y=None):
        seen["x"], seen["y"] = x, y
        return x

    return op, seen


def test_numpy_inputs_and_outputs_share_memory():
    op, seen = recording_op()
    x = features(5)
    result = op(x, y=np.arange(3))
    assert isinstance(seen["x"], torch.Tensor) and isinstance(seen["y"], torch.Tensor)
    assert seen["x"].data_ptr() == x.ctypes.data, "input was copied"
    assert isinstance(result, np.ndarray) and np.shares_memory(result, x), "output was copied"


@pytest.mark.parametrize("make", [
    pytest.param(lambda a: a.astype(a.dtype.newbyteorder(">" if a.dtype.byteorder != ">" else "<")),
                 id="byte-swapped"),
    pytest.param(lambda a: a[::-1], id="negative-strides"),
    pytest.param(lambda a: np.broadcast_to(a[:1], a.shape), id="read-only-broadcast"),
])
def test_unshareable_numpy_inputs_are_copied_with_their_values(make):
    op, seen = recording_op()
    source = features(5)
    x = make(source)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.from_numpy warns on read-only arrays
        result = op(x)
    np.testing.assert_array_equal(seen["x"].numpy(), x)
    assert seen["x"].dtype == torch.float32
    assert not np.shares_memory(result, source)


def test_strided_numpy_input_is_shared_not_copied():
    op, seen = recording_op()
    x = features(6, dim=8)[:, ::2]
    op(x)
    assert seen["x"].data_ptr() == x.ctypes.data
    np.testing.assert_array_equal(seen["x"].numpy(), x)


def test_named_tuple_and_dataclass_outputs_are_converted_elementwise():
    class Pair(typing.NamedTuple):
        first: torch.Tensor
        count: int

    @dataclasses.dataclass(frozen=True)
    class Box:
        tensor: torch.Tensor
        label: str

    @_arrays.accepts_arrays
    def op(x):
        return Pair(x + 1, 3), Box(x * 2, "b"), [x], _sparse.CSRMatrix(
            torch.tensor([0, 1]), torch.tensor([0]), x[:1], (1, 1))

    pair, box, listed, csr = op(np.arange(3.0))
    assert type(pair) is Pair and pair.count == 3
    np.testing.assert_array_equal(pair.first, [1.0, 2.0, 3.0])
    assert type(box) is Box and box.label == "b" and isinstance(box.tensor, np.ndarray)
    np.testing.assert_array_equal(box.tensor, [0.0, 2.0, 4.0])
    assert isinstance(listed[0], np.ndarray)
    assert isinstance(csr, _sparse.CSRMatrix) and all(isinstance(part, np.ndarray) for part in csr[:3])


# ----------------------------------------------------------------------------- errors

def test_python_list_is_rejected_naming_the_argument():
    with pytest.raises(TypeError, match=r"anchors must be a torch.Tensor, got list"):
        fastassoc.topk_anchors(features(3), [[0.0] * 6], k=1)


def test_object_array_is_rejected_naming_the_argument():
    with pytest.raises(TypeError, match=r"^anchors is a NumPy array of dtype object"):
        fastassoc.topk_anchors(features(3), np.empty((2, 6), dtype=object), k=1)


def test_masked_array_is_rejected():
    masked = np.ma.masked_array(features(3), mask=np.zeros((3, 6), bool))
    with pytest.raises(TypeError, match=r"queries is a NumPy masked array"):
        fastassoc.topk_anchors(masked, features(4), k=1)


def test_numpy_mixed_with_torch_is_rejected_naming_both():
    with pytest.raises(TypeError, match=r"NumPy arrays: queries.*torch tensors: anchors"):
        fastassoc.topk_anchors(features(3), torch.from_numpy(features(4)), k=1)
    sparse_targets = torch.from_numpy(soft_targets(3, 4, seed=0)).to_sparse_csr()
    with pytest.raises(TypeError, match=r"torch tensors: targets"):
        fastassoc.segmented_cross_entropy(features(3), features(4), sparse_targets)


def test_csr_matrix_of_mixed_components_is_rejected():
    mixed = _sparse.CSRMatrix(np.array([0, 1]), torch.tensor([0]), np.ones(1, np.float32), (1, 1))
    with pytest.raises(TypeError, match=r"components of targets are of different array types"):
        fastassoc.segmented_cross_entropy(features(1), features(1), mixed)


def test_numpy_scalars_are_numbers_not_arrays():
    distances, indices = fastassoc.topk_anchors(features(3), features(5), k=np.int64(2))
    assert isinstance(indices, np.ndarray) and indices.shape == (3, 2)
    distances, indices = fastassoc.topk_anchors(torch.from_numpy(features(3)), torch.from_numpy(features(5)),
                                                k=np.int64(2))
    assert isinstance(indices, torch.Tensor)


# ----------------------------------------------------------------------------- other DLPack objects

class DLPackOnly:
    """A foreign array known only through the DLPack protocol (as a JAX array is)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def __dlpack__(self, **kwargs):
        return self.tensor.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.tensor.__dlpack_device__()


def test_other_dlpack_objects_enter_zero_copy_and_give_torch_tensors():
    queries, anchors = torch.from_numpy(features(4, seed=27)), torch.from_numpy(features(6, seed=28))
    distances, indices = fastassoc.topk_anchors(DLPackOnly(queries), DLPackOnly(anchors), k=2)
    expected = fastassoc.topk_anchors(queries, anchors, k=2)
    assert isinstance(distances, torch.Tensor)
    assert torch.equal(distances, expected[0]) and torch.equal(indices, expected[1])
    op, seen = recording_op()
    op(DLPackOnly(queries))
    assert seen["x"].data_ptr() == queries.data_ptr()


def test_dlpack_bank_is_refused_for_in_place_update():
    bank = torch.from_numpy(features(3))
    before = bank.clone()
    with pytest.raises(TypeError, match=r"bank is updated in place"):
        fastassoc.ema_update_(DLPackOnly(bank), torch.tensor([0]), torch.from_numpy(features(1)), 0.5)
    assert torch.equal(bank, before)


# ----------------------------------------------------------------------------- torch.compile

def test_wrapper_adds_no_graph_break_under_fullgraph_compile():
    @_arrays.accepts_arrays
    def traceable(x, y, k: int = 1, *, scale: float = 1.0):
        return (x * k + y) * scale, x.sum()

    def step(x, y):
        first, second = traceable(x, y, 3, scale=0.5)
        return first + second

    x, y = torch.randn(4, 3), torch.randn(4, 3)
    explanation = torch._dynamo.explain(step)(x, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, y), step(x, y), rtol=0, atol=0)


def test_decorated_topk_anchors_compiles_without_graph_break():
    def step(queries, anchors):
        distances, indices = fastassoc.topk_anchors(queries, anchors, k=3)
        return distances.sum(), indices

    queries, anchors = torch.from_numpy(features(5, seed=29)), torch.from_numpy(features(9, seed=30))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, want = compiled(queries, anchors), step(queries, anchors)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])


# ----------------------------------------------------------------------------- CuPy (needs a GPU)

def cupy_or_skip():
    cupy = pytest.importorskip("cupy")
    try:
        has_device = cupy.cuda.runtime.getDeviceCount() > 0
    except cupy.cuda.runtime.CUDARuntimeError:
        has_device = False
    if not has_device or not torch.cuda.is_available():
        pytest.skip("CuPy tests need a CUDA GPU visible to both CuPy and torch")
    return cupy


def test_cupy_topk_anchors_zero_copy_on_device():
    cupy = cupy_or_skip()
    queries, anchors = cupy.asarray(features(6, seed=31)), cupy.asarray(features(10, seed=32))
    distances, indices = fastassoc.topk_anchors(queries, anchors, k=3)
    expected = fastassoc.topk_anchors(torch.from_dlpack(queries), torch.from_dlpack(anchors), k=3)
    assert isinstance(distances, cupy.ndarray) and isinstance(indices, cupy.ndarray)
    assert distances.device.id == queries.device.id
    cupy.testing.assert_array_equal(distances, cupy.from_dlpack(expected[0]))
    cupy.testing.assert_array_equal(indices, cupy.from_dlpack(expected[1]))
    op, seen = recording_op()
    result = op(queries)
    assert seen["x"].is_cuda and seen["x"].data_ptr() == queries.data.ptr, "input was copied"
    assert isinstance(result, cupy.ndarray) and result.data.ptr == queries.data.ptr, "output was copied"


def test_cupy_ema_update_in_place():
    cupy = cupy_or_skip()
    bank, values = cupy.asarray(features(5, seed=33)), cupy.asarray(features(2, seed=34))
    expected = torch.from_dlpack(bank).clone()
    fastassoc.ema_update_(expected, torch.tensor([1, 3], device="cuda"), torch.from_dlpack(values), 0.5)
    result = fastassoc.ema_update_(bank, cupy.asarray([1, 3]), values, 0.5)
    assert result is bank
    cupy.testing.assert_array_equal(bank, cupy.from_dlpack(expected))


def test_cupy_sparse_in_and_out():
    cupy = cupy_or_skip()
    import cupyx.scipy.sparse

    x, cameras = cupy.asarray(features(12, seed=35)), cupy.asarray(np.array([0, 1, 2] * 4))
    graph_result = fastassoc.knn_soft_labels(x, cameras, 2)
    expected = fastassoc.knn_soft_labels(torch.from_dlpack(x), torch.from_dlpack(cameras), 2)
    assert isinstance(graph_result, cupyx.scipy.sparse.csr_matrix)
    cupy.testing.assert_array_equal(graph_result.toarray(), cupy.from_dlpack(expected.to_dense()))

    weight = cupy.asarray(features(12, seed=36))
    loss_value = fastassoc.segmented_cross_entropy(x, weight, graph_result)
    expected_loss = fastassoc.segmented_cross_entropy(torch.from_dlpack(x), torch.from_dlpack(weight), expected)
    assert isinstance(loss_value, cupy.ndarray) and loss_value.shape == ()
    # GPU reductions may add in another order from call to call.
    assert float(loss_value) == pytest.approx(float(expected_loss), rel=1e-6)


def test_numpy_calls_under_fullgraph_compile_give_numpy_and_update_the_bank():
    def step(bank, index, values, cameras):
        bank = fastassoc.ema_update_(bank, index, values, 0.5)
        distances, indices = fastassoc.topk_anchors(values, bank, k=2)
        soft = fastassoc.knn_soft_labels(bank, cameras, 1, as_tuple=True)
        return bank, distances, indices, soft

    bank, values = features(6, seed=37), features(3, seed=38)
    index, cameras = np.array([0, 4, 4]), np.array([0, 0, 0, 1, 1, 1])
    eager_bank = bank.copy()
    want = step(eager_bank, index, values, cameras)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(bank, index, values, cameras)
    assert got[0] is bank, "the compiled step must return the caller's bank"
    np.testing.assert_array_equal(bank, eager_bank)
    for name, got_part, want_part in zip(("distances", "indices"), got[1:3], want[1:3]):
        assert isinstance(got_part, np.ndarray), name
        np.testing.assert_array_equal(got_part, want_part, err_msg=name)
    assert isinstance(got[3], _sparse.CSRMatrix)
    for field in ("crow_indices", "col_indices", "values"):
        assert isinstance(getattr(got[3], field), np.ndarray), field
        np.testing.assert_array_equal(getattr(got[3], field), getattr(want[3], field), err_msg=field)


def test_numpy_mixed_with_torch_under_compile_is_rejected():
    def step(queries, anchors):
        return fastassoc.topk_anchors(queries, anchors, k=1)

    with pytest.raises(Exception, match=r"NumPy arrays \(queries\) and torch tensors \(anchors\)"):
        torch.compile(step, fullgraph=True, backend="eager")(features(2), torch.from_numpy(features(3)))
