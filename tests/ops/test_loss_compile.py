"""segmented_cross_entropy as torch custom ops: opcheck, torch.compile(fullgraph=True), autograd.

The loss runs as ``fastassoc::segmented_cross_entropy_forward`` and ``_backward`` with
autograd registered between them. These tests check the registration itself
(``torch.library.opcheck``: schema, fake implementations, autograd, AOT dispatch), that a
compiled training step equals the eager one (loss and both gradients) without graph
breaks, float64 gradcheck with several tiles on every CPU-runnable backend, and the
edges of the autograd contract (constants are not differentiated, double backward
raises). Values are compared with the eager op, whose own correctness against a dense
oracle is tests/ops/test_loss.py's subject.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import fastassoc
from conftest import require_backend

OP = "segmented_cross_entropy"
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")


def make_problem(seed: int, num_rows: int, segment_sizes, dim: int, *, dtype=torch.float32, density: float = 0.4):
    """Features, weight, a CSRMatrix of non-negative targets (some rows empty, some duplicates) and offsets."""
    generator = torch.Generator().manual_seed(seed)
    num_classes = sum(segment_sizes)
    features = torch.randn(num_rows, dim, generator=generator, dtype=torch.float64).to(dtype)
    weight = torch.randn(num_classes, dim, generator=generator, dtype=torch.float64).to(dtype)
    keep = torch.rand(num_rows, num_classes, generator=generator) < density
    dense = torch.rand(num_rows, num_classes, generator=generator, dtype=torch.float64) * keep
    dense[::5] = 0
    sparse = dense.to(dtype).to_sparse_csr()
    # values() is a view whose base is the sparse tensor, which dynamo cannot wrap (it fails
    # inside its automatic-dynamic bookkeeping): the components must not be views of it.
    targets = fastassoc.CSRMatrix(sparse.crow_indices().detach(), sparse.col_indices().detach(),
                                  sparse.values().detach(), tuple(sparse.shape))
    offsets = torch.tensor([0] + list(segment_sizes)).cumsum(0)
    return features, weight, targets, offsets


def loss_and_grads(function, features, weight, targets, offsets, scale, backend):
    f = features.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss = function(f, w, targets, offsets, scale, backend)
    loss.backward()
    return loss.detach(), f.grad, w.grad


def eager_step(f, w, targets, offsets, scale, backend):
    return fastassoc.segmented_cross_entropy(f, w, targets, class_offsets=offsets, scale=scale, backend=backend)


def assert_same(actual, expected, what, *, rtol=1e-6, atol=1e-7):
    for name, got, want in zip(("loss", "d features", "d weight"), actual, expected):
        assert got is not None, f"{what}: no {name}"
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{what} {name}: {m}")


# ----------------------------------------------------------------------------- opcheck

def _forward_samples(backend):
    for dtype, sizes, offsets_given in ((torch.float32, [3, 0, 4], True), (torch.float64, [5], False)):
        features, weight, targets, offsets = make_problem(1, 6, sizes, 4, dtype=dtype)
        yield (features.requires_grad_(True), weight.requires_grad_(True), targets.crow_indices,
               targets.col_indices, targets.values, offsets if offsets_given else None, 1.7, backend)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck_forward_and_backward_ops(backend):
    require_backend(OP, backend)
    for args in _forward_samples(backend):
        torch.library.opcheck(torch.ops.fastassoc.segmented_cross_entropy_forward.default, args)
        with torch.no_grad():
            _, lse, mass = torch.ops.fastassoc.segmented_cross_entropy_forward(*args)
        features, weight, crow, col, values, offsets, scale, _ = args
        for need_features, need_weight in ((True, True), (True, False), (False, True)):
            backward_args = (torch.tensor(0.5, dtype=features.dtype), features.detach(), weight.detach(), crow, col,
                             values, offsets, lse, mass, scale, backend, need_features, need_weight)
            torch.library.opcheck(torch.ops.fastassoc.segmented_cross_entropy_backward.default, backward_args)


def test_opcheck_triton_forward_under_the_interpreter():
    require_backend(OP, "triton")
    args = next(_forward_samples("triton"))
    # The interpreter is slow: schema, fake and autograd registration, not the AOT round trips.
    torch.library.opcheck(torch.ops.fastassoc.segmented_cross_entropy_forward.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ----------------------------------------------------------------------------- torch.compile

def compiled(backend_compiler: str):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return torch.compile(eager_step, fullgraph=True, backend=backend_compiler)


def graph_breaks() -> int:
    return sum(torch._dynamo.utils.counters["graph_break"].values())


@pytest.mark.parametrize("tile", [None, 7], ids=["one-tile", "tiled"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_compiled_step_equals_eager_without_graph_breaks(backend, tile):
    require_backend(OP, backend)
    problem = make_problem(2, 11, [4, 0, 6, 3], 5)
    step = compiled("aot_eager")
    with fastassoc.tile_limit(tile) if tile else contextlib.nullcontext():
        expected = loss_and_grads(eager_step, *problem, 2.5, backend)
        actual = loss_and_grads(step, *problem, 2.5, backend)
    assert graph_breaks() == 0, dict(torch._dynamo.utils.counters["graph_break"])
    assert_same(actual, expected, f"{backend} tile={tile} aot_eager")


def test_compiled_graph_holds_one_forward_and_one_backward_node():
    """The forward graph calls the forward op once; the backward graph calls the backward op once."""
    problem = make_problem(3, 6, [3, 4], 3)
    forward_graphs, backward_graphs = [], []

    def forward_compiler(graph, example_inputs):
        forward_graphs.append(graph)
        return make_boxed_func(graph.forward)

    def backward_compiler(graph, example_inputs):
        backward_graphs.append(graph)
        return make_boxed_func(graph.forward)

    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    step = torch.compile(eager_step, fullgraph=True,
                         backend=aot_autograd(fw_compiler=forward_compiler, bw_compiler=backward_compiler))
    loss_and_grads(step, *problem, 1.0, "reference")

    def calls(graphs, op):
        return sum(node.target is op for graph in graphs for node in graph.graph.nodes)

    forward_op = torch.ops.fastassoc.segmented_cross_entropy_forward.default
    backward_op = torch.ops.fastassoc.segmented_cross_entropy_backward.default
    assert (len(forward_graphs), len(backward_graphs)) == (1, 1)
    assert calls(forward_graphs, forward_op) == 1 and calls(forward_graphs, backward_op) == 0
    assert calls(backward_graphs, backward_op) == 1 and calls(backward_graphs, forward_op) == 0


def test_compiled_step_with_autograd_grad_inside_the_graph():
    """The whole step, gradients included, in one fullgraph compile (dynamo's traced autograd.grad)."""
    problem = make_problem(4, 9, [5, 2], 4)

    def whole_step(f, w, targets, offsets):
        loss = fastassoc.segmented_cross_entropy(f, w, targets, class_offsets=offsets, scale=3.0, backend="cpu")
        grad_f, grad_w = torch.autograd.grad(loss, (f, w))
        return loss.detach(), grad_f, grad_w

    require_backend(OP, "cpu")
    features, weight, targets, offsets = problem
    f, w = features.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    expected = whole_step(f, w, targets, offsets)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        actual = torch.compile(whole_step, fullgraph=True, backend="aot_eager")(f, w, targets, offsets)
    assert graph_breaks() == 0
    assert_same([a.detach() for a in actual], [e.detach() for e in expected], "autograd.grad inside the graph")


def test_compiled_step_with_inductor():
    require_backend(OP, "cpu")
    problem = make_problem(5, 8, [3, 5], 4)

    def step_with_math(f, w, targets, offsets, scale, backend):
        # Surrounding ops give inductor something to fuse around the opaque loss nodes.
        f = torch.nn.functional.normalize(f * 2.0, dim=1)
        return eager_step(f, w.tanh(), targets, offsets, scale, backend) * 0.5

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    expected = loss_and_grads(step_with_math, *problem, 4.0, "cpu")
    actual = loss_and_grads(torch.compile(step_with_math, fullgraph=True, backend="inductor"), *problem, 4.0, "cpu")
    assert graph_breaks() == 0
    assert_same(actual, expected, "inductor", rtol=1e-5, atol=1e-6)


def test_compiled_step_recompiles_for_new_targets_without_graph_breaks():
    """A second batch with another number of target entries reuses or recompiles, never breaks."""
    require_backend(OP, "reference")
    step = compiled("aot_eager")
    for seed, density in ((6, 0.3), (7, 0.8)):
        problem = make_problem(seed, 10, [4, 6], 3, density=density)
        expected = loss_and_grads(eager_step, *problem, 1.5, "reference")
        actual = loss_and_grads(step, *problem, 1.5, "reference")
        assert_same(actual, expected, f"density {density}")
    assert graph_breaks() == 0


# ----------------------------------------------------------------------------- autograd contract

@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_gradcheck_float64_over_several_tiles(backend, monkeypatch):
    require_backend(OP, backend)
    if backend == "triton":
        # Triton's forward splits segments into class chunks of its own; one class per chunk here.
        monkeypatch.setattr("fastassoc.kernels.triton.loss.CLASS_CHUNK", 1)
    features, weight, targets, offsets = make_problem(8, 5, [3, 0, 4], 3, dtype=torch.float64, density=0.6)
    f, w = features.requires_grad_(True), weight.requires_grad_(True)

    def loss(f, w):
        return fastassoc.segmented_cross_entropy(f, w, targets, class_offsets=offsets, scale=1.3, backend=backend)

    # 4 logits per tile: every row spans two tiles and the batch several row chunks.
    with fastassoc.tile_limit(4):
        assert torch.autograd.gradcheck(loss, (f, w), eps=1e-6, atol=1e-7, rtol=1e-5,
                                        fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_sparse_tensor_and_csrmatrix_targets_agree(backend):
    require_backend(OP, backend)
    features, weight, targets, offsets = make_problem(9, 7, [2, 5], 4)
    as_tensor = targets.to_sparse_csr()
    expected = loss_and_grads(eager_step, features, weight, as_tensor, offsets, 2.0, backend)
    actual = loss_and_grads(eager_step, features, weight, targets, offsets, 2.0, backend)
    assert_same(actual, expected, backend, rtol=0, atol=0)


def test_only_features_and_weight_get_gradients():
    features, weight, targets, offsets = make_problem(10, 6, [3, 3], 4)
    values = targets.values.clone().requires_grad_(True)
    f = features.clone().requires_grad_(True)
    loss = fastassoc.segmented_cross_entropy(f, weight, targets._replace(values=values), class_offsets=offsets,
                                             backend="reference")
    loss.backward()
    assert values.grad is None, "targets must not be differentiated"
    assert f.grad is not None and f.grad.abs().sum() > 0
    # Only weight requires grad: features get none, weight gets the same gradient as when both do.
    w = weight.clone().requires_grad_(True)
    (grad_w,) = torch.autograd.grad(fastassoc.segmented_cross_entropy(features, w, targets, class_offsets=offsets,
                                                                      backend="reference"), (w,))
    both = loss_and_grads(eager_step, features, weight, targets, offsets, 1.0, "reference")
    torch.testing.assert_close(grad_w, both[2], rtol=0, atol=0)


def test_no_grad_needed_runs_the_forward_only():
    features, weight, targets, offsets = make_problem(11, 5, [2, 3], 3)
    loss = fastassoc.segmented_cross_entropy(features, weight, targets, class_offsets=offsets, backend="reference")
    assert not loss.requires_grad and loss.grad_fn is None


def test_double_backward_raises_clearly():
    features, weight, targets, offsets = make_problem(12, 5, [2, 3], 3, dtype=torch.float64)
    f, w = features.requires_grad_(True), weight.requires_grad_(True)
    loss = fastassoc.segmented_cross_entropy(f, w, targets, class_offsets=offsets, backend="reference")
    (grad_f,) = torch.autograd.grad(loss, (f,), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_f.sum().backward()


def test_meta_tensors_give_shapes():
    features, weight, targets, offsets = make_problem(13, 5, [2, 3], 3)
    meta = [t.to("meta") for t in (features, weight, targets.crow_indices, targets.col_indices, targets.values,
                                   offsets)]
    f, w = meta[0].requires_grad_(True), meta[1].requires_grad_(True)
    loss = fastassoc.segmented_cross_entropy(f, w, fastassoc.CSRMatrix(meta[2], meta[3], meta[4], (5, 5)),
                                             class_offsets=meta[5])
    assert loss.device.type == "meta" and loss.shape == () and loss.dtype == torch.float32
    grad_f, grad_w = torch.autograd.grad(loss, (f, w))
    assert grad_f.shape == (5, 3) and grad_w.shape == (5, 3)


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_value_checks_run_inside_the_op_also_under_compile(mode):
    """Checks that read values are not traced away: the compiled step raises what eager raises."""
    features, weight, targets, offsets = make_problem(14, 6, [2, 4], 3)
    step = eager_step if mode == "eager" else compiled("aot_eager")
    negative = targets._replace(values=targets.values.clone())
    negative.values[1] = -0.25
    with pytest.raises(ValueError, match=r"\btargets\b.*non-negative"):
        step(features, weight, negative, offsets, 1.0, "reference")
    broken = targets._replace(col_indices=targets.col_indices.clone())
    broken.col_indices[0] = 6
    with pytest.raises(ValueError, match=r"\btargets\.col_indices\b"):
        step(features, weight, broken, offsets, 1.0, "cpu")
    with pytest.raises(ValueError, match=r"\bclass_offsets\b"):
        step(features, weight, targets, torch.tensor([0, 4, 5]), 1.0, "reference")
    with pytest.raises(ValueError, match=r"\bscale\b"):
        step(features, weight, targets, offsets, 1e39, "reference")
    assert mode == "eager" or graph_breaks() == 0
