"""What every public op's wrapper and fake implementation share.

Every public op of fastassoc is a torch custom op (``torch.ops.fastassoc.<op>``) so that
``torch.compile(fullgraph=True)`` sees one opaque node per call: the public function
only checks argument types, detaches the inputs of non-differentiable ops and calls the
op; the op's real implementation validates values (``_checks``), picks a backend and runs
the kernel; its fake implementation checks metadata with the helpers below and gives the
output shapes (an unbacked symbolic size where they depend on values).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _checks


def tensor_input(name: str, value) -> Tensor:
    """``value`` detached from autograd: the non-differentiable ops behave as under no_grad."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__} {value!r:.80}")
    return value.detach()


def optional_tensor_input(name: str, value) -> Tensor | None:
    return None if value is None else tensor_input(name, value)


def backend_name(backend) -> str:
    # The backend name itself is checked when the op resolves it; the schema needs a str.
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    return backend


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def fake_features(name: str, x: Tensor) -> None:
    """The metadata half of ``_checks.features``: what a fake (or meta) tensor can show."""
    if x.dim() != 2:
        raise ValueError(f"{name} must have 2 dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")


def fake_same_feature_dim(**tensors: Tensor) -> None:
    """``_checks.same_feature_dim`` for symbolic sizes (which are not hashable)."""
    dims = {name: t.shape[-1] for name, t in tensors.items()}
    first = next(iter(dims.values()))
    if any(dim != first for dim in dims.values()):
        described = ", ".join(f"{name} has {dim}" for name, dim in dims.items())
        raise ValueError(f"feature dimensions must match, got {described}")


def fake_index(name: str, t: Tensor | None, *, length=None, device=None) -> None:
    """The metadata half of ``_checks.index_vector`` / ``_checks.offsets``."""
    if t is None:
        return
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{name} must have length {length}, got {t.shape[0]}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but must be on {device} (with the features); "
                         "move it with .to(device)")


def dynamic_size(op: str, *tensors: Tensor):
    """An unbacked symbolic size for a data-dependent output of ``op``.

    Only fake tensors (torch.compile, FakeTensorMode) can carry one; plain meta tensors
    cannot, so ``op`` on meta tensors raises a ValueError naming it.
    """
    if torch._guards.detect_fake_mode(tensors) is None:
        raise ValueError(f"{op}: the size of its output depends on the input values, so it cannot run on "
                         "meta tensors; call it on real tensors (under torch.compile or FakeTensorMode it "
                         "traces with a symbolic size)")
    return torch.library.get_ctx().new_dynamic_size()
