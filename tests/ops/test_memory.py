"""ema_update_: in-place memory EMA (DAL Eq. 1, UTAL Eq. 3, TSSL Eq. 6) on every backend.

The oracle is a plain Python loop over ``index`` in order, in float64 NumPy, written
here independently of fastassoc.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastassoc
from conftest import require_backend

OP = "ema_update_"
REDUCTIONS = ("mean", "sum", "sequential")
NORM_EPS = 1e-12


# ----------------------------------------------------------------------------- oracle

def _unit(row: np.ndarray) -> np.ndarray:
    return row / max(float(np.linalg.norm(row)), NORM_EPS)


def oracle_ema(bank: np.ndarray, index, values: np.ndarray, momentum: float, normalize: bool,
               reduce: str) -> np.ndarray:
    """Python-loop EMA in float64; returns the updated copy of ``bank``."""
    bank = np.array(bank, dtype=np.float64, copy=True)
    values = np.array(values, dtype=np.float64, copy=True)
    index = [int(i) for i in index]
    if normalize:
        values = np.stack([_unit(v) for v in values]) if len(values) else values
    if reduce == "sequential":
        for position, row in enumerate(index):
            bank[row] = momentum * bank[row] + (1.0 - momentum) * values[position]
            if normalize:
                bank[row] = _unit(bank[row])
        return bank
    grouped: dict[int, list[np.ndarray]] = {}
    for position, row in enumerate(index):
        grouped.setdefault(row, []).append(values[position])
    for row, members in grouped.items():
        combined = np.sum(members, axis=0)
        if reduce == "mean":
            combined = combined / len(members)
        bank[row] = momentum * bank[row] + (1.0 - momentum) * combined
        if normalize:
            bank[row] = _unit(bank[row])
    return bank


def assert_close(actual: torch.Tensor, expected: np.ndarray, *, rtol: float, atol: float, what: str) -> None:
    actual = actual.detach().to("cpu", torch.float64).numpy()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    bad = ~(np.abs(actual - expected) <= atol + rtol * np.abs(expected))
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} mismatches; first at {first}: got {actual[first]!r}, "
                             f"expected {expected[first]!r} (rtol={rtol}, atol={atol})")


def _data(seed: int, num_rows: int, dim: int, index, dtype=torch.float32, device="cpu"):
    generator = np.random.default_rng(seed)
    bank = generator.standard_normal((num_rows, dim))
    values = generator.standard_normal((len(index), dim)) * 2.0
    bank_t = torch.tensor(bank, dtype=dtype, device=device)
    values_t = torch.tensor(values, dtype=dtype, device=device)
    index_t = torch.tensor(list(index), dtype=torch.int64, device=device)
    return bank_t, index_t, values_t


def _tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return (1e-12, 1e-12) if dtype == torch.float64 else (2e-6, 2e-6)


# ----------------------------------------------------------------------------- against the oracle

INDEX_PATTERNS = {
    "distinct": [4, 0, 7, 2],
    "duplicates": [3, 1, 3, 5, 1, 3, 0],
    "all_same": [2, 2, 2, 2, 2],
    "single": [6],
}


@pytest.mark.parametrize("pattern", sorted(INDEX_PATTERNS))
@pytest.mark.parametrize("momentum", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_matches_python_loop(backend_device, reduce, normalize, momentum, pattern):
    backend, device = backend_device
    require_backend(OP, backend)
    index = INDEX_PATTERNS[pattern]
    bank, index_t, values = _data(1, 9, 5, index, device=device)
    expected = oracle_ema(bank.cpu().numpy(), index, values.cpu().numpy(), momentum, normalize, reduce)
    out = fastassoc.ema_update_(bank, index_t, values, momentum, normalize=normalize, reduce=reduce,
                                backend=backend)
    assert out is bank, "ema_update_ must return the bank it updated"
    rtol, atol = _tolerance(torch.float32)
    assert_close(bank, expected, rtol=rtol, atol=atol, what=f"{backend} {reduce} normalize={normalize}")


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_float64_matches_python_loop_tightly(backend_device, reduce):
    backend, device = backend_device
    require_backend(OP, backend)
    index = INDEX_PATTERNS["duplicates"]
    bank, index_t, values = _data(2, 8, 3, index, dtype=torch.float64, device=device)
    expected = oracle_ema(bank.cpu().numpy(), index, values.cpu().numpy(), 0.7, True, reduce)
    fastassoc.ema_update_(bank, index_t, values, 0.7, reduce=reduce, backend=backend)
    rtol, atol = _tolerance(torch.float64)
    assert_close(bank, expected, rtol=rtol, atol=atol, what=f"{backend} float64 {reduce}")


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_opposite_unit_values_cancel_exactly(backend_device, reduce):
    # 49 * (1 / 49) != 1 in float64: normalising by a reciprocal left a 1e-16 residue that
    # the row normalisation (eps 1e-12) blew up to 5.6e-5 where the oracle has 0
    # (found by the hypothesis test below).
    backend, device = backend_device
    require_backend(OP, backend)
    bank = torch.tensor([[0.5], [2.0]], device=device)
    values = torch.tensor([[49.0], [-1.0], [49.0]], device=device)
    index = [1, 1, 0]
    expected = oracle_ema(bank.cpu().numpy(), index, values.cpu().numpy(), 0.0, True, reduce)
    fastassoc.ema_update_(bank, torch.tensor(index, device=device), values, 0.0, normalize=True, reduce=reduce,
                          backend=backend)
    assert expected[1, 0] == 0.0
    assert_close(bank, expected, rtol=1e-6, atol=1e-6, what=f"{backend} {reduce}")


def test_hypothesis_against_python_loop(backend_device):
    backend, device = backend_device
    require_backend(OP, backend)

    @settings(max_examples=15 if backend == "triton" else 60, deadline=None)
    @given(num_rows=st.integers(1, 7), dim=st.integers(1, 6),
           index=st.lists(st.integers(0, 6), max_size=12), momentum=st.floats(0.0, 1.0),
           normalize=st.booleans(), reduce=st.sampled_from(REDUCTIONS), seed=st.integers(0, 2**16))
    def check(num_rows, dim, index, momentum, normalize, reduce, seed):
        index = [i % num_rows for i in index]
        bank, index_t, values = _data(seed, num_rows, dim, index, device=device)
        expected = oracle_ema(bank.cpu().numpy(), index, values.cpu().numpy(), momentum, normalize, reduce)
        fastassoc.ema_update_(bank, index_t, values, momentum, normalize=normalize, reduce=reduce,
                              backend=backend)
        # Sums of up to 12 values of size ~2 without normalisation: scale the tolerance.
        assert_close(bank, expected, rtol=1e-5, atol=1e-5,
                     what=f"{backend} {reduce} normalize={normalize} m={momentum} index={index}")

    check()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_low_precision_within_twice_the_error_of_a_low_precision_loop(backend_device, dtype, reduce):
    """flash-attention's rule: error vs the float64 oracle <= 2x that of a loop run in ``dtype`` + atol."""
    backend, device = backend_device
    require_backend(OP, backend)
    index = INDEX_PATTERNS["duplicates"] * 3
    bank, index_t, values = _data(3, 8, 16, index, dtype=dtype, device=device)
    expected = oracle_ema(bank.cpu().double().numpy(), index, values.cpu().double().numpy(), 0.6, True, reduce)

    naive = bank.cpu().clone()
    naive_values = torch.nn.functional.normalize(values.cpu(), dim=1)
    if reduce == "sequential":
        for position, row in enumerate(index):
            naive[row] = torch.nn.functional.normalize(
                0.6 * naive[row] + 0.4 * naive_values[position], dim=0)
    else:
        for row in sorted(set(index)):
            members = naive_values[torch.tensor([i == row for i in index])]
            combined = members.sum(0) if reduce == "sum" else members.mean(0)
            naive[row] = torch.nn.functional.normalize(0.6 * naive[row] + 0.4 * combined, dim=0)

    fastassoc.ema_update_(bank, index_t, values, 0.6, reduce=reduce, backend=backend)
    assert bank.dtype == dtype
    error = np.abs(bank.cpu().double().numpy() - expected).max()
    naive_error = np.abs(naive.double().numpy() - expected).max()
    atol = float(torch.finfo(dtype).eps)
    assert error <= 2 * naive_error + atol, \
        f"{backend} {dtype} {reduce}: error {error:.3g} > 2 x low-precision loop error {naive_error:.3g} + {atol:.3g}"


# ----------------------------------------------------------------------------- properties and edges

@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_rows_not_in_index_are_untouched_and_update_is_in_place(backend_device, reduce):
    backend, device = backend_device
    require_backend(OP, backend)
    index = [5, 1, 5]
    bank, index_t, values = _data(4, 8, 4, index, device=device)
    before = bank.clone()
    pointer = bank.data_ptr()
    fastassoc.ema_update_(bank, index_t, values, 0.5, reduce=reduce, backend=backend)
    assert bank.data_ptr() == pointer, "the bank was reallocated instead of updated in place"
    untouched = [row for row in range(8) if row not in index]
    assert torch.equal(bank[untouched], before[untouched]), "rows outside index changed"
    assert not torch.equal(bank[[1, 5]], before[[1, 5]]), "rows in index did not change"


@pytest.mark.parametrize("reduce", REDUCTIONS)
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
def test_empty_index_leaves_bank_unchanged(backend_device, reduce, normalize):
    backend, device = backend_device
    require_backend(OP, backend)
    bank, index_t, values = _data(5, 6, 3, [], device=device)
    before = bank.clone()
    out = fastassoc.ema_update_(bank, index_t, values, 0.5, normalize=normalize, reduce=reduce, backend=backend)
    assert out is bank and torch.equal(bank, before)


def test_empty_bank_and_zero_dim(backend_device):
    backend, device = backend_device
    require_backend(OP, backend)
    bank = torch.zeros(0, 4, device=device)
    fastassoc.ema_update_(bank, torch.zeros(0, dtype=torch.int64, device=device), torch.zeros(0, 4, device=device),
                          0.5, backend=backend)
    bank = torch.zeros(3, 0, device=device)
    fastassoc.ema_update_(bank, torch.tensor([0, 2, 0], device=device), torch.zeros(3, 0, device=device), 0.5,
                          backend=backend)
    assert bank.shape == (3, 0)


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_zero_values_with_momentum_zero_give_zero_rows(backend_device, reduce):
    """normalize maps a zero vector to zero (x / max(|x|, eps)), never to NaN."""
    backend, device = backend_device
    require_backend(OP, backend)
    bank, _, _ = _data(6, 4, 3, [], device=device)
    index = torch.tensor([1, 1, 3], device=device)
    values = torch.zeros(3, 3, device=device)
    fastassoc.ema_update_(bank, index, values, 0.0, normalize=True, reduce=reduce, backend=backend)
    assert torch.equal(bank[[1, 3]], torch.zeros(2, 3, device=device)), bank


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_momentum_one_keeps_the_direction_of_updated_rows(backend_device, reduce):
    backend, device = backend_device
    require_backend(OP, backend)
    bank, index_t, values = _data(7, 5, 4, [0, 3, 0], device=device)
    before = bank.clone()
    fastassoc.ema_update_(bank, index_t, values, 1.0, normalize=True, reduce=reduce, backend=backend)
    expected = torch.nn.functional.normalize(before[[0, 3]].double(), dim=1).cpu().numpy()
    assert_close(bank[[0, 3]], expected, rtol=2e-6, atol=2e-6, what=f"{backend} m=1 {reduce}")


def test_momentum_one_without_normalize_changes_nothing(backend_device):
    backend, device = backend_device
    require_backend(OP, backend)
    for reduce in REDUCTIONS:
        bank, index_t, values = _data(8, 5, 4, [0, 3, 0, 4], device=device)
        before = bank.clone()
        fastassoc.ema_update_(bank, index_t, values, 1.0, normalize=False, reduce=reduce, backend=backend)
        assert torch.equal(bank, before), f"{backend} {reduce}: momentum 1 changed the bank"


def test_int32_index_and_non_contiguous_values_are_accepted(backend_device):
    backend, device = backend_device
    require_backend(OP, backend)
    index = [2, 0, 2]
    bank, index_t, values = _data(9, 4, 6, index, device=device)
    expected = oracle_ema(bank.cpu().numpy(), index, values.cpu().numpy(), 0.25, True, "mean")
    strided = torch.empty(6, 3, device=device).T  # values' shape, column-major
    strided.copy_(values)
    assert not strided.is_contiguous()
    fastassoc.ema_update_(bank, index_t.to(torch.int32), strided, 0.25, backend=backend)
    assert_close(bank, expected, rtol=2e-6, atol=2e-6, what=f"{backend} int32 index / strided values")


def test_values_requiring_grad_do_not_enter_autograd(backend_device):
    backend, device = backend_device
    require_backend(OP, backend)
    bank, index_t, values = _data(10, 4, 3, [1, 2], device=device)
    values.requires_grad_(True)
    fastassoc.ema_update_(bank, index_t, values, 0.5, backend=backend)
    assert bank.grad_fn is None and not bank.requires_grad


def test_deterministic_with_many_duplicates(backend_device):
    backend, device = backend_device
    require_backend(OP, backend)
    generator = np.random.default_rng(11)
    index = generator.integers(0, 5, size=300).tolist()
    for reduce in REDUCTIONS:
        results = []
        for _ in range(2):
            bank, index_t, values = _data(12, 5, 8, index, device=device)
            fastassoc.ema_update_(bank, index_t, values, 0.9, reduce=reduce, backend=backend)
            results.append(bank)
        assert torch.equal(results[0], results[1]), f"{backend} {reduce}: two identical calls differ"
        expected = oracle_ema(_data(12, 5, 8, index)[0].numpy(), index, _data(12, 5, 8, index)[2].numpy(),
                              0.9, True, reduce)
        assert_close(results[0], expected, rtol=1e-5, atol=1e-5, what=f"{backend} {reduce} 300 duplicates")


# ----------------------------------------------------------------------------- bad inputs

def _good():
    return torch.zeros(4, 3), torch.tensor([0, 2]), torch.ones(2, 3)


@pytest.mark.parametrize("index, error, name", [
    (torch.tensor([0, 4]), ValueError, "index"),
    (torch.tensor([-1, 0]), ValueError, "index"),
    (torch.tensor([0.0, 1.0]), TypeError, "index"),
    (torch.tensor([True, False]), TypeError, "index"),
    (torch.tensor([0, 1, 2]), ValueError, "index"),
    (torch.tensor([[0, 1]]), ValueError, "index"),
    ([0, 1], TypeError, "index"),
    (torch.tensor([0, 1], device="meta"), ValueError, "index"),
], ids=["too_large", "negative", "float", "bool", "length", "2d", "list", "meta_device"])
def test_bad_index_raises_naming_it(index, error, name):
    bank, _, values = _good()
    with pytest.raises(error, match=rf"\b{name}\b"):
        fastassoc.ema_update_(bank, index, values, 0.5)


@pytest.mark.parametrize("momentum, error", [(-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError),
                                             ("0.5", TypeError), (None, TypeError)])
def test_bad_momentum_raises_naming_it(momentum, error):
    bank, index, values = _good()
    with pytest.raises(error, match="momentum"):
        fastassoc.ema_update_(bank, index, values, momentum)


def test_non_contiguous_bank_raises():
    bank = torch.zeros(3, 4).T
    with pytest.raises(ValueError, match="bank.*contiguous"):
        fastassoc.ema_update_(bank, torch.tensor([0]), torch.ones(1, 3), 0.5)


@pytest.mark.parametrize("bank, values, error, name", [
    (torch.zeros(4, 3), torch.ones(2, 3, dtype=torch.float64), TypeError, "values"),
    (torch.zeros(4, 3, dtype=torch.float16), torch.ones(2, 3), TypeError, "bank"),
    (torch.zeros(4, 3), torch.ones(2, 5), ValueError, "values"),
    (torch.zeros(4, 3, dtype=torch.int64), torch.ones(2, 3), TypeError, "bank"),
    (torch.zeros(4), torch.ones(2, 3), ValueError, "bank"),
    (torch.zeros(4, 3), torch.tensor([[1.0, float("nan"), 0.0], [0.0, 0.0, 0.0]]), ValueError, "values"),
    (torch.full((4, 3), float("inf")), torch.ones(2, 3), ValueError, "bank"),
], ids=["dtype_mismatch", "dtype_mismatch_half", "dim_mismatch", "int_bank", "1d_bank", "nan_values", "inf_bank"])
def test_bad_tensors_raise_naming_them(bank, values, error, name):
    with pytest.raises(error, match=rf"\b{name}\b"):
        fastassoc.ema_update_(bank, torch.tensor([0, 2]), values, 0.5)


def test_bad_reduce_and_normalize_raise_naming_them():
    bank, index, values = _good()
    with pytest.raises(ValueError, match="reduce"):
        fastassoc.ema_update_(bank, index, values, 0.5, reduce="max")
    with pytest.raises(TypeError, match="normalize"):
        fastassoc.ema_update_(bank, index, values, 0.5, normalize=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_values_on_another_device_raise():
    with pytest.raises(ValueError, match="device"):
        fastassoc.ema_update_(torch.zeros(4, 3), torch.tensor([0]), torch.ones(1, 3, device="cuda"), 0.5)
