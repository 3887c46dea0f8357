"""Exact int8 / bf16 screening of the CPU backend (fastassoc/kernels/cpu/_screen.py, csrc/cpu/screen.cpp).

The shared op tests already run every op with screening forced (backend ``cpu-screened``)
against their oracles. This file checks the pieces screening rests on, against float64
NumPy oracles:

* quantisation: int8 levels and scales, bf16 rounding, and the error norms the bounds use;
* the error bounds hold for every pair, on rows built to stress them (heavy tails, mixed
  norms, zero rows, tiny dimensions);
* the exact rescoring is correct, symmetric and row-determined;
* rows that fail certification fall back to exact distances, and the result does not depend
  on which rows were certified;
* screened evaluation recomputes negatives in a true match's error band, and only those;
* the screened merging step (exact neighbour lists, proven head of the pair order) is used
  and equals the reference;
* non-finite inputs and the mode switch;
* int8 screening only where torch._int_mm is exact (the probe's decision against a model of
  oneDNN's saturating kernels, and the int8 tests rerun under ``DNNL_MAX_CPU_ISA=AVX2``),
  and "auto" only where oneDNN may use the fast instructions.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastassoc
from fastassoc import _backend

pytestmark = pytest.mark.skipif(_backend.compiled_core() is None, reason="fastassoc._C is not built")

if _backend.compiled_core() is not None:
    from fastassoc.kernels.cpu import _core, _screen, knn
    from fastassoc.kernels.cpu import evaluation as cpu_evaluation


def stress_rows(seed: int, n: int, dim: int) -> torch.Tensor:
    """Rows that stress the bounds: Gaussian, heavy-tailed (one huge coordinate), scaled
    by norms spanning 1e-3..1e3, a zero row and a duplicated row."""
    g = np.random.default_rng(seed)
    x = g.standard_normal((n, dim))
    x[: n // 3] = g.standard_t(1.5, (n // 3, dim))
    x[n // 3: n // 2, 0] *= 50.0
    x *= 10.0 ** g.uniform(-3, 3, (n, 1))
    x[1] = 0.0
    x[2] = x[3]
    return torch.from_numpy(x.astype(np.float32))


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=1)


def exact_distances(rows: torch.Tensor, cols: torch.Tensor, metric: str) -> np.ndarray:
    """float64 distances with the kernels' squared norms (float32, as the kernels use them)."""
    r, c = rows.numpy().astype(np.float64), cols.numpy().astype(np.float64)
    dots = r @ c.T
    if metric == "cosine":
        return 1.0 - dots
    rn = _core.squared_norms(rows, "sqeuclidean").numpy().astype(np.float64)
    cn = _core.squared_norms(cols, "sqeuclidean").numpy().astype(np.float64)
    return np.maximum(rn[:, None] + cn[None, :] - 2.0 * dots, 0.0)


def approx_distances(quantized_rows, quantized_cols, rows, cols, metric: str) -> np.ndarray:
    """The approximate distances the tile kernels see (float32 formula on the screening GEMM)."""
    tiles = _core.DotTiles(rows.shape[0] * cols.shape[0], torch.float32)
    dots = tiles.mm(quantized_rows, quantized_cols).clone()
    if metric == "cosine":
        return (1.0 - dots).double().numpy()
    rn = _core.squared_norms(rows, "sqeuclidean")
    cn = _core.squared_norms(cols, "sqeuclidean")
    return ((rn[:, None] + cn[None, :]) - 2.0 * dots).clamp_min(0).double().numpy()


def require_int8_levels(levels: int) -> None:
    """Skip where this process's int8 GEMM is not exact for columns in [-levels, levels]
    (test_int8_probe_matches_the_gemm_in_use checks that decision)."""
    if _screen.int8_column_levels() < levels:
        pytest.skip(f"torch._int_mm is exact here for columns up to {_screen.int8_column_levels()} only")


# ----------------------------------------------------------------------------- quantisation

@pytest.mark.parametrize("column_levels", [127, 64])
@pytest.mark.parametrize("dim", [1, 3, 64])
def test_int8_quantisation_matches_numpy(dim, column_levels):
    x = stress_rows(0, 40, dim)
    q = _screen.QRows.quantize(x, column_levels)
    xn = x.numpy().astype(np.float64)
    scale = (np.abs(xn).max(1) / column_levels).astype(np.float32).astype(np.float64)
    safe = np.where(scale > 0, scale, 1.0)
    levels = np.clip(np.rint(xn / safe[:, None]), -column_levels, column_levels)
    assert q.levels == column_levels
    assert q.shape == (40, dim)
    np.testing.assert_array_equal(q.q.numpy()[:, :dim].astype(np.float64), levels)
    assert not q.q.numpy()[:, dim:].any(), "padding columns must be zero"
    np.testing.assert_array_equal(q.scale.numpy().astype(np.float64), scale)
    x_hat = levels * scale[:, None]
    np.testing.assert_allclose(q.norm.numpy(), np.linalg.norm(xn, axis=1), rtol=1e-12)
    np.testing.assert_allclose(q.norm_hat.numpy(), np.linalg.norm(x_hat, axis=1), rtol=1e-12)
    np.testing.assert_allclose(q.err.numpy(), np.linalg.norm(x_hat - xn, axis=1), rtol=1e-9, atol=1e-300)


def test_bf16_rounding_matches_torch():
    x = stress_rows(1, 40, 37)
    b = _screen.BRows.quantize(x)
    assert torch.equal(b.q, x.to(torch.bfloat16))
    xn, x_hat = x.double().numpy(), x.to(torch.bfloat16).double().numpy()
    np.testing.assert_allclose(b.err.numpy(), np.linalg.norm(x_hat - xn, axis=1), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(b.norm_hat.numpy(), np.linalg.norm(x_hat, axis=1), rtol=1e-12)


@pytest.mark.parametrize("kind", ["int8", "bf16"])
def test_non_finite_rows_are_not_screened(kind):
    if kind == "int8":
        require_int8_levels(1)
    x = stress_rows(2, 10, 8)
    x[4, 3] = float("nan") if kind == "int8" else float("inf")
    cls = _screen.QRows if kind == "int8" else _screen.BRows
    assert cls.quantize(x) is None


# ----------------------------------------------------------------------------- bounds

@pytest.mark.parametrize("column_levels", [127, 64])
@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine"])
@pytest.mark.parametrize("dim", [2, 16, 300])
def test_int8_bound_covers_every_pair(metric, dim, column_levels):
    # Rows are always the first operand (full range); columns as wide as the GEMM allows.
    require_int8_levels(column_levels)
    rows, cols = stress_rows(3, 30, dim), stress_rows(4, 50, dim)
    if metric == "cosine":
        rows, cols = unit(rows), unit(cols)
    qr, qc = _screen.QRows.quantize(rows, 127), _screen.QRows.quantize(cols, column_levels)
    error = np.abs(approx_distances(qr, qc, rows, cols, metric) - exact_distances(rows, cols, metric))
    bound = _screen.row_bounds(qr, qc, metric, _core.squared_norms(rows, "sqeuclidean"),
                               _core.squared_norms(cols, "sqeuclidean")).numpy()
    assert (error <= bound[:, None]).all(), f"worst error / bound {np.max(error / bound[:, None])}"
    # The bound is not vacuous: within a small factor of the worst error on Gaussian rows.
    assert np.median(bound / (error.max(1) + 1e-300)) < 200


@pytest.mark.parametrize("kind", ["int8", "bf16", "fp32"])
@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine"])
@pytest.mark.parametrize("dim", [3, 64, 700])
def test_lower_bound_outside_the_list_holds_for_every_pair(kind, metric, dim):
    # lower_outside(last) must not exceed the exact distance of any column whose approximate
    # distance is >= last; check it with last = each column's own approximate distance.
    # fp32: the float32 GEMM's own bound, used to certify the fallback's candidates.
    rows, cols = stress_rows(5, 25, dim), stress_rows(6, 60, dim)
    if metric == "cosine":
        rows, cols = unit(rows), unit(cols)
    if kind == "fp32":
        approx = approx_distances(rows, cols, rows, cols, metric)
        qr, qc = _screen.FRows(rows), _screen.FRows(cols)
    else:
        if kind == "int8":
            require_int8_levels(1)
        cls = _screen.QRows if kind == "int8" else _screen.BRows
        qr, qc = cls.quantize(rows), cls.quantize(cols)
        approx = approx_distances(qr, qc, rows, cols, metric)
    exact = exact_distances(rows, cols, metric)
    row_sq, col_sq = _core.squared_norms(rows, "sqeuclidean"), _core.squared_norms(cols, "sqeuclidean")
    for j in range(cols.shape[0]):
        lower = _screen.lower_outside(qr, qc, metric, torch.from_numpy(approx[:, j]), row_sq, col_sq).numpy()
        assert (lower <= exact[:, j]).all(), f"column {j}: lower bound above the exact distance"


# ----------------------------------------------------------------------------- exact rescoring

@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine"])
def test_rescore_is_exact_symmetric_and_row_determined(metric):
    rows, cols = stress_rows(7, 20, 45), stress_rows(8, 30, 45)
    if metric == "cosine":
        rows, cols = unit(rows), unit(cols)
    cols[5] = rows[2]
    row_sq, col_sq = _core.squared_norms(rows, "sqeuclidean"), _core.squared_norms(cols, "sqeuclidean")
    kwargs = dict(row_norms=row_sq, col_norms=col_sq) if metric == "sqeuclidean" else {}
    indices = torch.arange(30).repeat(20, 1)
    indices[:, -1] = -1
    got = _screen.rescore(rows, cols, indices, metric, **kwargs)
    expected = exact_distances(rows, cols, metric)
    assert torch.isinf(got[:, -1]).all()
    np.testing.assert_allclose(got[:, :-1].double().numpy(), expected[:, :-1],
                               rtol=1e-6, atol=1e-6 * np.abs(expected).max())
    swapped = dict(row_norms=col_sq, col_norms=row_sq) if metric == "sqeuclidean" else {}
    back = _screen.rescore(cols, rows, torch.arange(20).repeat(30, 1), metric, **swapped)
    assert torch.equal(got[:, :-1], back.T[:, :-1]), "x.y and y.x must give the same bits"
    pairs = _screen.exact_distances(rows, cols, torch.tensor([2, 2]), torch.tensor([5, 5]), metric, **kwargs)
    assert pairs[0] == pairs[1] == got[2, 5]


def test_rescore_of_columns_past_the_cache_block_is_exact_and_thread_independent():
    # D = 2048: 512 column rows per 4 MiB block, so 1,400 columns take screen_rescore's
    # bucketed path (entries sorted by column block). Each entry must still be the exact
    # distance of its own pair, whatever block order or thread computed it.
    from fastassoc import _backend
    g = torch.Generator().manual_seed(31)
    rows, cols = torch.randn(300, 2048, generator=g), torch.randn(1400, 2048, generator=g)
    cols[1399] = rows[7]
    indices = torch.randint(0, 1400, (300, 40), generator=g)
    indices[::7, -3:] = -1
    indices[7, 0] = 1399
    row_sq, col_sq = _core.squared_norms(rows, "sqeuclidean"), _core.squared_norms(cols, "sqeuclidean")
    got = _screen.rescore(rows, cols, indices, "sqeuclidean", row_norms=row_sq, col_norms=col_sq)
    present = (indices >= 0).numpy()
    assert torch.isinf(got[~torch.from_numpy(present)]).all()
    expected = exact_distances(rows, cols, "sqeuclidean")
    r = np.repeat(np.arange(300)[:, None], 40, axis=1)
    np.testing.assert_allclose(got.numpy()[present], expected[r[present], indices.numpy()[present]],
                               rtol=1e-5, atol=1e-5 * expected.max())
    assert got[7, 0] == 0.0, "a copy of the row must be at distance 0 exactly"
    pairs = _screen.exact_distances(rows, cols, torch.from_numpy(r[present]), indices[torch.from_numpy(present)],
                                    "sqeuclidean", row_norms=row_sq, col_norms=col_sq)
    assert torch.equal(got[torch.from_numpy(present)], pairs), "the bucketed order changed a distance's bits"
    core = _backend.compiled_core()
    core.set_num_threads(1)
    try:
        single = _screen.rescore(rows, cols, indices, "sqeuclidean", row_norms=row_sq, col_norms=col_sq)
    finally:
        core.set_num_threads(None)
    assert torch.equal(single, got)


@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine"])
def test_pruned_rescoring_keeps_the_k_nearest_of_the_full_rescoring(monkeypatch, metric):
    # Separated rows (identity centres) rule most of their tails out; the crowded ones
    # (closer than the bf16 error) cannot, and rescore their whole list.
    g = torch.Generator().manual_seed(13)
    centres = unit(torch.randn(100, 256, generator=g))
    separated = centres[torch.randint(0, 100, (300,), generator=g)] + 0.035 * torch.randn(300, 256, generator=g)
    x = torch.cat([separated, crowded_rows(100, 256)]).contiguous()
    norms = _core.squared_norms(x, "sqeuclidean") if metric == "sqeuclidean" else None
    k, width = 3, 3 + _screen.SLACK
    quantized = _screen.BRows.quantize(x)
    approx_values, candidates = knn.new_lists(400, width, torch.float32)
    knn.self_join_topk(quantized, metric, width, (approx_values, candidates), norms=norms, exclude_self=True)
    knn.sort_lists(approx_values, candidates)
    calls = []
    original = _screen.rescore

    def spy(rows, cols, indices, *args, **kwargs):
        calls.append(int((indices >= 0).any(1).sum()))   # rows with a candidate to rescore
        return original(rows, cols, indices, *args, **kwargs)

    monkeypatch.setattr(_screen, "rescore", spy)
    pruned = _screen.rescore_pruned(x, x, candidates, approx_values, quantized, quantized, metric, k,
                                    row_norms=norms, col_norms=norms)
    full = original(x, x, candidates, metric, row_norms=norms, col_norms=norms)
    assert calls[0] == 400 and 0 < calls[1] < 400, f"rows rescored in full: {calls[1:]}"
    skipped = torch.isinf(pruned) & ~torch.isinf(full)
    assert skipped[:300].any(1).float().mean() > 0.5, "separated rows should skip their tails"
    for exact in (pruned, full):
        knn.sort_lists(exact, index := candidates.clone())
        exact.index = index
    assert torch.equal(pruned.index[:, :k], full.index[:, :k])
    assert torch.equal(pruned[:, :k], full[:, :k])


# ----------------------------------------------------------------------------- certification

def crowded_rows(n: int, dim: int) -> torch.Tensor:
    """Rows around one point, much closer to each other than the screening error: every
    list must fail certification (and some still pass where a row's neighbours stand out)."""
    g = torch.Generator().manual_seed(9)
    centre = unit(torch.randn(1, dim, generator=g))
    spread = 10.0 ** torch.empty(n, 1).uniform_(-3, -1, generator=g)
    return (centre + spread * unit(torch.randn(n, dim, generator=g))).contiguous()


@pytest.mark.parametrize("kind", ["bf16", "int8"])
@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine"])
def test_fallback_rows_are_exact_and_path_independent(monkeypatch, metric, kind):
    # int8: what knn.self_join_screen would pick for an int8-screened self-join (not by
    # default: bench/bench_avx2_rerank.py), with columns as wide as the GEMM is exact for.
    if kind == "int8":
        require_int8_levels(1)
        monkeypatch.setattr(knn, "self_join_screen", lambda rows, n, width: "int8")
    x = crowded_rows(400, 512)
    norms = _core.squared_norms(x, "sqeuclidean") if metric == "sqeuclidean" else None
    k = 5
    fell_back = []
    original = knn._fall_back

    def spy(*args, **kwargs):
        fell_back.append(int(args[5].numel()))
        return original(*args, **kwargs)

    monkeypatch.setattr(knn, "_fall_back", spy)
    with _screen.forced("always"):
        lists = knn.new_lists(400, k, torch.float32)
        knn.topk_self_join(x, metric, k, lists, norms=norms, base=0, exclude_self=True)
    assert sum(fell_back) > 0, "the crowded rows were meant to fail certification"
    # Oracle: the kernels' float32 formula on correctly rounded inner products (the
    # rows are so close that the formula's own rounding decides the order), self
    # excluded, ties by index.
    dots = (x.double().numpy() @ x.double().numpy().T).astype(np.float32)
    if metric == "cosine":
        exact = np.float32(1) - dots
    else:
        sq = norms.numpy()
        exact = np.maximum((sq[:, None] + sq[None, :]) - np.float32(2) * dots, np.float32(0))
    exact = exact.astype(np.float64)
    np.fill_diagonal(exact, np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(400), exact.shape), exact), axis=1)[:, :k]
    np.testing.assert_array_equal(lists[1].numpy(), order)
    # Every row through the fallback gives the same bits as the screened mixture.
    monkeypatch.setattr(_screen, "certify", lambda approx, kth, lower, available: torch.zeros(
        approx.shape[0], dtype=torch.bool))
    with _screen.forced("always"):
        all_fallback = knn.new_lists(400, k, torch.float32)
        knn.topk_self_join(x, metric, k, all_fallback, norms=norms, base=0, exclude_self=True)
    assert torch.equal(all_fallback[1], lists[1]) and torch.equal(all_fallback[0], lists[0])


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_screened_soft_labels_and_anchors_equal_reference_on_separated_data(monkeypatch, kind):
    if kind == "int8":
        require_int8_levels(1)
        monkeypatch.setattr(knn, "self_join_screen", lambda rows, n, width: "int8")
    g = torch.Generator().manual_seed(10)
    centres = unit(torch.randn(40, 256, generator=g))
    ids = torch.randint(0, 40, (600,), generator=g)
    x = centres[ids] + 0.05 * torch.randn(600, 256, generator=g)
    cameras = torch.randint(0, 3, (600,), generator=g)
    expected = fastassoc.knn_soft_labels(x, cameras, 4, backend="reference")
    with _screen.forced("always"):
        got = fastassoc.knn_soft_labels(x, cameras, 4, backend="cpu")
    assert torch.equal(got.crow_indices(), expected.crow_indices())
    assert torch.equal(got.col_indices(), expected.col_indices())
    torch.testing.assert_close(got.values(), expected.values(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("linkage", ["tssl", "centroid", "buc"])
def test_screened_merge_equals_reference_and_is_used(monkeypatch, linkage):
    from fastassoc.kernels.cpu import cluster

    g = torch.Generator().manual_seed(12)
    centres = unit(torch.randn(60, 96, generator=g))
    ids = torch.randint(0, 60, (700,), generator=g)
    x = centres[ids] + 0.2 * torch.randn(700, 96, generator=g)
    x[5] = x[9]                                   # an exact tie
    labels = torch.arange(700)
    used = []
    original = cluster._merge_screened

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        used.append(result is not None)
        return result

    monkeypatch.setattr(cluster, "_merge_screened", spy)
    expected = fastassoc.agglomerative_merge(x, labels, 60, linkage=linkage, backend="reference")
    with _screen.forced("always"):
        got = fastassoc.agglomerative_merge(x, labels, 60, linkage=linkage, backend="cpu")
    assert used == [True], "the screened merge should have proven enough of the pair order here"
    assert torch.equal(got, expected)


# ----------------------------------------------------------------------------- evaluation

@pytest.mark.parametrize("noise", [0.05, 1.0])
def test_screened_evaluation_recomputes_only_the_error_band(noise):
    require_int8_levels(1)
    g = torch.Generator().manual_seed(11)
    centres = torch.randn(30, 128, generator=g)
    qp, gp = torch.randint(0, 30, (120,), generator=g), torch.randint(-1, 30, (900,), generator=g)
    q = centres[qp] + noise * torch.randn(120, 128, generator=g)
    gal = centres[gp.clamp_min(0)] + noise * torch.randn(900, 128, generator=g)
    qc, gc = torch.randint(0, 4, (120,), generator=g), torch.randint(0, 4, (900,), generator=g)
    expected = fastassoc.evaluate_ranking(q, gal, qp, gp, qc, gc, metric="euclidean", backend="reference")
    with _screen.forced("always"):
        got = fastassoc.evaluate_ranking(q, gal, qp, gp, qc, gc, metric="euclidean", backend="cpu")
    assert torch.equal(got.cmc, expected.cmc)
    assert got.mAP == pytest.approx(expected.mAP, abs=1e-12) and got.mINP == pytest.approx(expected.mINP, abs=1e-12)
    # How many negatives needed an exact distance: none far from every match on separated
    # data, some (but far from all) on noisy data.
    queries, gallery = _core.prepare(q, "euclidean"), _core.prepare(gal, "euclidean")
    qn, gn = _core.squared_norms(queries, "euclidean"), _core.squared_norms(gallery, "euclidean")
    first_rank = torch.zeros(120, dtype=torch.int64)
    ap, inp = torch.zeros(120, dtype=torch.float64), torch.zeros(120, dtype=torch.float64)
    recomputed = cpu_evaluation._rank_screened(queries, gallery, _screen.QRows.quantize(queries),
                                               _screen.QRows.quantize(gallery), qn, gn, qp, gp, qc, gc,
                                               "euclidean", first_rank, ap, inp)
    negatives = int(((gp[None, :] != qp[:, None]) & (gp[None, :] != -1)).sum())
    if noise < 1:
        assert recomputed == 0
    else:
        assert 0 < recomputed < negatives / 4


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_screened_evaluation_of_saturating_rows_equals_reference(metric):
    # Binary-like codes (each coordinate near 0 or near the row's peak) put most int8 levels
    # at the extremes, where oneDNN's kernels without VNNI saturate their int16 pair sums
    # (under DNNL_MAX_CPU_ISA=AVX2 full-range columns gave mAP off by 0.36): screening must
    # still give the reference's figures, or not screen at all.
    g = torch.Generator().manual_seed(15)
    centres = (torch.rand(30, 96, generator=g) < 0.5).float()
    qp, gp = torch.randint(0, 30, (100,), generator=g), torch.randint(-1, 30, (700,), generator=g)
    q = (centres[qp] - (torch.rand(100, 96, generator=g) < 0.25).float()).abs()
    gal = (centres[gp.clamp_min(0)] - (torch.rand(700, 96, generator=g) < 0.25).float()).abs()
    q, gal = q + 0.01 * torch.rand(100, 96, generator=g), gal + 0.01 * torch.rand(700, 96, generator=g)
    qc, gc = torch.randint(0, 4, (100,), generator=g), torch.randint(0, 4, (700,), generator=g)
    expected = fastassoc.evaluate_ranking(q, gal, qp, gp, qc, gc, metric=metric, backend="reference")
    with _screen.forced("always"):
        got = fastassoc.evaluate_ranking(q, gal, qp, gp, qc, gc, metric=metric, backend="cpu")
    assert torch.equal(got.cmc, expected.cmc)
    assert got.mAP == pytest.approx(expected.mAP, abs=1e-12) and got.mINP == pytest.approx(expected.mINP, abs=1e-12)


def test_auto_evaluation_ranks_float32_tiles_as_the_reference(monkeypatch):
    # The reference ranks float32 GEMM values; an exactly rounded ranking can swap a
    # negative and a true match inside the GEMM's rounding, so auto never screens here.
    g = torch.Generator().manual_seed(14)
    centres = torch.randn(40, 256, generator=g)
    qp, gp = torch.randint(0, 40, (200,), generator=g), torch.randint(-1, 40, (1500,), generator=g)
    q = centres[qp] + 2.0 * torch.randn(200, 256, generator=g)
    gal = centres[gp.clamp_min(0)] + 2.0 * torch.randn(1500, 256, generator=g)
    qc, gc = torch.randint(0, 4, (200,), generator=g), torch.randint(0, 4, (1500,), generator=g)
    monkeypatch.setattr(_screen, "_cpu_flags", lambda: frozenset({"avx512_vnni", "avx512_bf16"}))
    screened = []
    original = cpu_evaluation._rank_screened
    monkeypatch.setattr(cpu_evaluation, "_rank_screened", lambda *a: screened.append(1) or original(*a))
    expected = fastassoc.evaluate_ranking(q, gal, qp, gp, qc, gc, metric="sqeuclidean", backend="reference")
    with _screen.forced("auto"):
        got = fastassoc.evaluate_ranking(q, gal, qp, gp, qc, gc, metric="sqeuclidean", backend="cpu")
    assert not screened
    assert torch.equal(got.cmc, expected.cmc) and got.mAP == expected.mAP and got.mINP == expected.mINP
    with _screen.forced("always"):
        fastassoc.evaluate_ranking(q, gal, qp, gp, qc, gc, metric="sqeuclidean", backend="cpu")
    assert screened


# ----------------------------------------------------------------------------- mode

def test_mode_switch_is_validated(monkeypatch):
    monkeypatch.setenv("FASTASSOC_CPU_SCREEN", "sometimes")
    with pytest.raises(ValueError, match="FASTASSOC_CPU_SCREEN"):
        _screen.mode()
    with pytest.raises(ValueError, match="screening mode"):
        with _screen.forced("sometimes"):
            pass
    monkeypatch.setenv("FASTASSOC_CPU_SCREEN", "off")
    assert not _screen.worthwhile(torch.randn(100, 64), 10_000, 5)
    with _screen.forced("always"):
        assert _screen.worthwhile(torch.randn(3, 2), 1, 5, "bf16")
        assert _screen.worthwhile(torch.randn(3, 2), 1, 5) == bool(_screen.int8_column_levels())
        assert not _screen.worthwhile(torch.randn(3, 2, dtype=torch.float64), 1, 5)


# ----------------------------------------------------------------------------- int8 GEMM exactness

def exact_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # float64 products and sums of int8 values are exact integers below 2^53.
    return torch.from_numpy((a.numpy().astype(np.float64) @ b.numpy().astype(np.float64)).astype(np.int32))


def pair_saturating_int_mm(a: torch.Tensor, b: torch.Tensor, shifted: str = "a") -> torch.Tensor:
    """A model of an int8 GEMM without VNNI (vpmaddubsw): the ``shifted`` operand made
    unsigned (+128), adjacent products along k summed in int16 with saturation, the pair
    sums added in int32 and the shift's contribution (128 x the other operand's sums) taken off."""
    if shifted == "b":
        return pair_saturating_int_mm(b.T, a.T).T
    unsigned, signed = a.numpy().astype(np.int64) + 128, b.numpy().astype(np.int64)
    if unsigned.shape[1] % 2:
        unsigned = np.pad(unsigned, ((0, 0), (0, 1)), constant_values=128)
        signed = np.pad(signed, ((0, 1), (0, 0)))
    total = np.zeros((unsigned.shape[0], signed.shape[1]), dtype=np.int64)
    for p in range(0, unsigned.shape[1], 2):
        pair = unsigned[:, p, None] * signed[None, p] + unsigned[:, p + 1, None] * signed[None, p + 1]
        total += np.clip(pair, -32768, 32767)
    return torch.from_numpy((total - 128 * signed.sum(0)[None]).astype(np.int32))


def wrong_for_single_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    result = exact_int_mm(a, b)
    return result + 1 if a.shape[0] == 1 else result


def raises(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("_int_mm: not implemented for this CPU")


@pytest.mark.parametrize("int_mm, levels", [
    (exact_int_mm, 127),                                       # VNNI / AMX: exact
    (pair_saturating_int_mm, 64),                              # AVX2: exact for 7-bit columns only
    (lambda a, b: pair_saturating_int_mm(a, b, "b"), 0),       # the shift on the columns: never exact
    (wrong_for_single_rows, 0),                                # one kernel (GEMV) wrong: no int8
    (raises, 0),
])
def test_int8_probe_decision(int_mm, levels):
    # The model is exact for columns in [-64, 64] and wrong for full range: check it first.
    g = torch.Generator().manual_seed(3)
    a = torch.randint(-127, 128, (9, 41), generator=g, dtype=torch.int8)
    a[0] = 127
    b = torch.randint(-64, 65, (41, 5), generator=g, dtype=torch.int8)
    b[:, 0] = 64
    assert torch.equal(pair_saturating_int_mm(a, b), exact_int_mm(a, b))
    full = torch.full((4, 10), 127, dtype=torch.int8)
    assert not torch.equal(pair_saturating_int_mm(full, full.T.contiguous()), exact_int_mm(full, full.T.contiguous()))
    # Small shapes keep the NumPy models fast; single rows and columns, odd depths, one block.
    assert _screen.probe_int_mm(int_mm, ((1, 30, 7), (7, 30, 1), (9, 37, 5), (40, 130, 24))) == levels


def test_int8_probe_matches_the_gemm_in_use():
    # The process's own decision, against products the probe did not try (other shapes and data).
    levels = _screen.int8_column_levels()
    expected = os.environ.get("FASTASSOC_TEST_INT8_LEVELS")
    if expected is not None:    # set by test_int8_screening_is_exact_under_onednn_avx2_kernels
        assert levels == int(expected)
    g = torch.Generator().manual_seed(4)
    if levels:
        for m, depth, n in [(45, 333, 29), (2, 1999, 130), (300, 96, 7)]:
            a = torch.randint(-127, 128, (m, depth), generator=g, dtype=torch.int8)
            a[0] = 127
            b = torch.randint(-levels, levels + 1, (depth, n), generator=g, dtype=torch.int8)
            b[:, 0] = levels
            assert torch.equal(torch._int_mm(a, b), exact_int_mm(a, b)), (m, depth, n)
    if levels < 127:     # not needlessly narrow: the next wider range is wrong somewhere
        wider = 127 if levels == 64 else 64
        a, b = torch.full((48, 256), 127, dtype=torch.int8), torch.full((256, 40), wider, dtype=torch.int8)
        assert not torch.equal(torch._int_mm(a, b), exact_int_mm(a, b))


def test_no_int8_screening_where_the_gemm_is_not_exact(monkeypatch):
    monkeypatch.setattr(_screen, "int8_column_levels", lambda: 0)
    quantized = []
    monkeypatch.setattr(_screen.QRows, "quantize", classmethod(lambda cls, *a, **k: quantized.append(1)))
    g = torch.Generator().manual_seed(16)
    q, gal = torch.randn(50, 64, generator=g), torch.randn(400, 64, generator=g)
    qp, gp = torch.randint(0, 10, (50,), generator=g), torch.randint(0, 10, (400,), generator=g)
    qc, gc = torch.zeros(50, dtype=torch.int64), torch.ones(400, dtype=torch.int64)
    with _screen.forced("always"):
        assert not _screen.worthwhile(q, 400, 1, "int8")
        assert _screen.worthwhile(q, 400, 1, "bf16")
        got = fastassoc.evaluate_ranking(q, gal, qp, gp, qc, gc, backend="cpu")
    expected = fastassoc.evaluate_ranking(q, gal, qp, gp, qc, gc, backend="reference")
    assert not quantized
    assert torch.equal(got.cmc, expected.cmc) and got.mAP == pytest.approx(expected.mAP, abs=1e-12)


def test_int8_rows_refuse_columns_the_gemm_is_not_exact_for(monkeypatch):
    require_int8_levels(64)
    x = stress_rows(17, 6, 32)
    rows, cols = _screen.QRows.quantize(x, 127), _screen.QRows.quantize(x, 127)
    monkeypatch.setattr(_screen, "int8_column_levels", lambda: 64)
    with pytest.raises(RuntimeError, match="exact here only for"):
        rows.gram_into(cols, torch.empty(6, 6))
    rows.gram_into(_screen.QRows.quantize(x), torch.empty(6, 6))     # default: the probed 64
    monkeypatch.setattr(_screen, "int8_column_levels", lambda: 0)
    with pytest.raises(RuntimeError, match="not exact on this CPU"):
        _screen.QRows.quantize(x)


@pytest.mark.parametrize("onednn, dnnl, flags, int8, bf16", [
    (None, None, {"avx2", "avx512_vnni", "avx512_bf16"}, True, True),
    (None, "AVX2", {"avx2", "avx512_vnni", "avx512_bf16"}, False, False),
    (None, "AVX512_CORE_VNNI", {"avx2", "avx512_vnni", "avx512_bf16"}, True, False),
    (None, "avx512_core_bf16", {"avx2", "avx512_vnni", "avx512_bf16"}, True, True),
    ("AVX2", "ALL", {"avx2", "avx512_vnni", "avx512_bf16"}, False, False),     # ONEDNN_ first
    ("", "AVX2", {"avx2", "avx512_vnni", "avx512_bf16"}, False, False),        # empty: DNNL_
    ("DEFAULT", "AVX2", {"avx2", "avx512_vnni", "avx512_bf16"}, True, True),
    (None, "AVX10_2_512", {"avx2", "avx512_vnni", "avx512_bf16"}, True, True),  # newer than our table
    (None, "AVX2_VNNI", {"avx2", "avx_vnni", "avx512_vnni", "avx512_bf16"}, True, False),
    (None, "AVX2_VNNI", {"avx2", "avx512_vnni", "avx512_bf16"}, False, False),  # AVX2_VNNI uses avx_vnni
    (None, "AVX512_CORE_BF16", {"avx2", "amx_int8", "amx_bf16"}, False, False),
    (None, "AVX512_CORE_AMX", {"avx2", "amx_int8", "amx_bf16"}, True, True),
    (None, None, {"avx2", "fma"}, False, False),
])
def test_auto_counts_a_gemm_fast_only_where_onednn_may_use_it(monkeypatch, onednn, dnnl, flags, int8, bf16):
    # Expected values from oneDNN's CPU dispatcher documentation (dnnl_cpu_isa_t masks).
    for name, value in (("ONEDNN_MAX_CPU_ISA", onednn), ("DNNL_MAX_CPU_ISA", dnnl)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.setattr(_screen, "_cpu_flags", lambda: frozenset(flags))
    assert (_screen.fast_gemm("int8"), _screen.fast_gemm("bf16")) == (int8, bf16)
    with _screen.forced("auto"):
        assert _screen.worthwhile(torch.randn(10, 64), 10_000, 5, "bf16") == bf16


@pytest.mark.skipif(_backend.compiled_core() is None or "avx2" not in _screen._cpu_flags(),
                    reason="DNNL_MAX_CPU_ISA=AVX2 selects oneDNN's AVX2 kernels on x86 CPUs with AVX2 only")
def test_int8_screening_is_exact_under_onednn_avx2_kernels():
    # oneDNN's int8 GEMM on AVX2-only CPUs (no VNNI) saturates int16 pair sums; the cap, read
    # when the process starts, makes this CPU run those kernels. The int8 tests run there.
    env = dict(os.environ, DNNL_MAX_CPU_ISA="AVX2", FASTASSOC_TEST_INT8_LEVELS="64")
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    tests = ["test_int8_probe_matches_the_gemm_in_use", "test_int8_quantisation_matches_numpy",
             "test_int8_bound_covers_every_pair", "test_lower_bound_outside_the_list_holds_for_every_pair",
             "test_screened_evaluation_recomputes_only_the_error_band",
             "test_screened_evaluation_of_saturating_rows_equals_reference",
             "test_int8_rows_refuse_columns_the_gemm_is_not_exact_for",
             "test_fallback_rows_are_exact_and_path_independent",
             "test_screened_soft_labels_and_anchors_equal_reference_on_separated_data"]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                             *[f"{__file__}::{name}" for name in tests]],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" in result.stdout   # the 127-column cases skip there
