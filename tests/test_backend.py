"""Tests of fastassoc._backend: backend choice, error messages, availability report, tile limit."""
from __future__ import annotations

import pytest
import torch

import fastassoc
from fastassoc import _backend

HAS_GPU = torch.cuda.is_available()
OPS = tuple(_backend.FAMILIES)


def _cpu_tensors():
    return {"bank": torch.zeros(3, 2), "index": torch.zeros(1, dtype=torch.int64), "values": torch.zeros(1, 2)}


def _fake_implementations(monkeypatch, table):
    """Make ``_implementation(op, backend)`` answer from ``table`` where it has an entry."""
    real = _backend._implementation

    def implementation(op, backend):
        if (op, backend) in table:
            return table[(op, backend)]
        return real(op, backend)

    monkeypatch.setattr(_backend, "_implementation", implementation)


# ----------------------------------------------------------------------------- auto

@pytest.mark.skipif(_backend.compiled_core() is None, reason="compiled core fastassoc._C not built")
def test_auto_picks_cpu_for_cpu_tensors_when_implemented(monkeypatch):
    def fake_cpu(*args):
        return None

    _fake_implementations(monkeypatch, {("ema_update_", "cpu"): fake_cpu})
    name, function = _backend.resolve("ema_update_", "auto", _cpu_tensors())
    assert (name, function) == ("cpu", fake_cpu), f"auto chose {name} ({function}) for CPU tensors"


def test_auto_falls_back_to_reference_when_cpu_lacks_the_op(monkeypatch):
    _fake_implementations(monkeypatch, {("ema_update_", "cpu"): None})
    name, function = _backend.resolve("ema_update_", "auto", _cpu_tensors())
    assert name == "reference", f"auto chose {name} although cpu does not implement ema_update_"
    assert function.__name__ == "ema_update_reference", function.__name__


def test_auto_falls_back_to_reference_without_compiled_core(monkeypatch):
    monkeypatch.setattr(_backend, "compiled_core", lambda: None)
    name, _ = _backend.resolve("ema_update_", "auto", _cpu_tensors())
    assert name == "reference", f"auto chose {name} with no compiled core"


@pytest.mark.parametrize("op", OPS)
def test_auto_follows_the_availability_report_on_cpu(op):
    report = _backend.available_backends(op)[op]
    if report["cpu"] is not True and report["reference"] is not True:
        pytest.skip(f"{op} has neither a cpu nor a reference implementation yet "
                    "(test_every_backend_implements_every_op fails for it)")
    expected = "cpu" if report["cpu"] is True else "reference"
    name, function = _backend.resolve(op, "auto", {"x": torch.zeros(2, 2)})
    assert name == expected, f"{op}: auto chose {name}, expected {expected}"
    assert function.__name__ == f"{op.rstrip('_')}_{name}", f"{op}: auto returned {function.__name__}"


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("op", OPS)
def test_auto_on_cuda_tensors_prefers_triton_then_cuda_then_reference(op):
    report = _backend.available_backends(op)[op]
    expected = next(b for b in ("triton", "cuda", "reference") if report[b] is True)
    name, _ = _backend.resolve(op, "auto", {"x": torch.zeros(2, 2, device="cuda")})
    assert name == expected, f"{op}: auto chose {name} on CUDA tensors, expected {expected}"


def test_auto_with_no_tensors_resolves_to_a_cpu_backend():
    name, _ = _backend.resolve("ema_update_", "auto", {"bank": None})
    assert name in ("cpu", "reference"), name


def test_trailing_underscore_is_stripped_from_the_implementation_name():
    name, function = _backend.resolve("ema_update_", "reference", _cpu_tensors())
    assert (name, function.__name__) == ("reference", "ema_update_reference")


# ----------------------------------------------------------------------------- explicit backends

@pytest.mark.parametrize("bad", ["gpu", "Reference", "", "torch"])
def test_unknown_backend_raises_value_error_listing_the_options(bad):
    with pytest.raises(ValueError) as raised:
        _backend.resolve("ema_update_", bad, _cpu_tensors())
    message = str(raised.value)
    for option in ("auto",) + _backend.BACKENDS:
        assert repr(option) in message, f"option {option!r} missing from: {message}"
    assert repr(bad) in message, f"the rejected value {bad!r} is not named in: {message}"


def test_unknown_backend_through_a_public_op():
    bank = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="'reference'.*'cpu'.*'triton'.*'cuda'"):
        fastassoc.ema_update_(bank, torch.tensor([0]), torch.ones(1, 2), 0.5, backend="gpu")


def test_backend_must_be_a_string():
    with pytest.raises(TypeError, match="backend"):
        _backend.resolve("ema_update_", None, _cpu_tensors())


def test_unknown_op_raises_key_error():
    with pytest.raises(KeyError, match="no_such_op"):
        _backend.resolve("no_such_op", "auto", _cpu_tensors())


def test_cuda_backend_on_cpu_tensors_says_what_to_do(monkeypatch):
    # Pretend the CUDA core is built so the device check itself is exercised on any machine.
    real_built = _backend._built
    monkeypatch.setattr(_backend, "_built", lambda b: (True, "") if b == "cuda" else real_built(b))
    with pytest.raises(ValueError) as raised:
        _backend.resolve("ema_update_", "cuda", _cpu_tensors())
    message = str(raised.value)
    assert "CUDA tensors" in message and "backend='auto'" in message, message


def test_cuda_backend_on_cpu_tensors_in_this_build_says_what_to_do():
    # Without the CUDA core the build problem is reported first; either way the message says what to do.
    with pytest.raises((ValueError, RuntimeError)) as raised:
        _backend.resolve("ema_update_", "cuda", _cpu_tensors())
    message = str(raised.value)
    assert "backend='auto'" in message or "reinstall" in message, message


def test_unbuilt_backend_raises_runtime_error_saying_how_to_build(monkeypatch):
    monkeypatch.setattr(_backend, "compiled_core", lambda: None)
    with pytest.raises(RuntimeError, match="pip install"):
        _backend.resolve("ema_update_", "cpu", _cpu_tensors())


@pytest.mark.skipif(_backend.compiled_core() is None, reason="compiled core fastassoc._C not built")
def test_backend_without_the_op_raises_not_implemented_pointing_to_auto(monkeypatch):
    _fake_implementations(monkeypatch, {("ema_update_", "cpu"): None})
    with pytest.raises(NotImplementedError, match="backend='auto'"):
        _backend.resolve("ema_update_", "cpu", _cpu_tensors())


@pytest.mark.skipif(not _backend._triton_importable(), reason="triton not installed")
def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        _backend.resolve("ema_update_", "triton", _cpu_tensors())


# ----------------------------------------------------------------------------- devices

@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_mixed_devices_raise_naming_the_tensors(backend):
    tensors = {"bank": torch.zeros(3, 2), "values": torch.zeros(1, 2, device="meta")}
    with pytest.raises(ValueError) as raised:
        _backend.resolve("ema_update_", backend, tensors)
    message = str(raised.value)
    for needle in ("bank on cpu", "values on meta", ".to(device)"):
        assert needle in message, f"{needle!r} missing from: {message}"


def test_mixed_devices_through_a_public_op():
    with pytest.raises(ValueError, match="index.*meta"):
        fastassoc.ema_update_(torch.zeros(3, 2), torch.tensor([0], device="meta"), torch.ones(1, 2), 0.5)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_mixed_cpu_and_cuda_features_raise():
    with pytest.raises(ValueError, match="device"):
        fastassoc.ema_update_(torch.zeros(3, 2), torch.tensor([0]), torch.ones(1, 2, device="cuda"), 0.5)


# ----------------------------------------------------------------------------- availability

def test_available_backends_reports_every_op_and_backend():
    report = _backend.available_backends()
    assert set(report) == set(OPS), f"ops reported: {sorted(report)}, expected {sorted(OPS)}"
    for op, entry in report.items():
        assert set(entry) == set(_backend.BACKENDS), f"{op}: backends reported {sorted(entry)}"
        for backend, status in entry.items():
            assert status is True or (isinstance(status, str) and status), \
                f"{op}/{backend}: status must be True or a reason, got {status!r}"
    assert fastassoc.available_backends is _backend.available_backends


def test_available_backends_for_one_op():
    report = _backend.available_backends("segmented_cross_entropy")
    assert list(report) == ["segmented_cross_entropy"], list(report)


def test_every_backend_implements_every_op():
    """Every op has a reference, a cpu kernel when the core is built, and a triton kernel when triton imports.

    require_backend() in the op tests skips unavailable backends; this test is what
    stops those skips from hiding a missing kernel.
    """
    required = ["reference"]
    if _backend.compiled_core() is not None:
        required.append("cpu")
    if _backend._triton_importable():
        required.append("triton")
    report = _backend.available_backends()
    missing = [f"{op}/{backend}: {report[op][backend]}" for op in OPS for backend in required
               if report[op][backend] is not True and (op, backend) not in _backend.PENDING]
    assert not missing, f"{len(missing)} op/backend pairs missing:\n" + "\n".join(missing)
    # A kernel that exists must leave the pending list, so the list cannot hide anything.
    landed = [f"{op}/{backend}" for (op, backend) in _backend.PENDING
              if backend in required and report[op][backend] is True]
    assert not landed, f"implemented but still listed in _backend.PENDING: {landed}"
    for (op, backend), issue in _backend.PENDING.items():
        if backend in required:
            assert issue in report[op][backend], (op, backend, report[op][backend])


# ----------------------------------------------------------------------------- tile limit

def test_tile_limit_default():
    assert _backend.tile_elements() == 1 << 24


@pytest.mark.parametrize("bad", [0, -1, 2.5, "8", None])
def test_tile_limit_rejects_non_positive_or_non_int(bad):
    before = _backend.tile_elements()
    with pytest.raises(ValueError, match="max_elements"):
        with fastassoc.tile_limit(bad):
            pass
    assert _backend.tile_elements() == before


def test_tile_limit_sets_and_restores_nested():
    before = _backend.tile_elements()
    with fastassoc.tile_limit(7):
        assert _backend.tile_elements() == 7
        with fastassoc.tile_limit(3):
            assert _backend.tile_elements() == 3
        assert _backend.tile_elements() == 7
    assert _backend.tile_elements() == before


def test_tile_limit_restores_after_an_exception():
    before = _backend.tile_elements()
    with pytest.raises(RuntimeError, match="inside"):
        with fastassoc.tile_limit(11):
            raise RuntimeError("inside")
    assert _backend.tile_elements() == before
