"""The ``Examples`` sections of every fastassoc module run as doctests (STYLE.md, "Words").

A module whose examples print something else than its docstring says fails here; modules
without examples are listed too, so that adding one makes it run.
"""
from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import fastassoc

MODULES = sorted(info.name for info in pkgutil.walk_packages(fastassoc.__path__, "fastassoc.")
                 if not info.name.endswith("__main__"))


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")
@pytest.mark.parametrize("name", MODULES)
def test_module_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples in {name} failed"


def test_public_ops_have_examples():
    # The public API's examples live in these modules; if they vanish the test above proves nothing.
    attempted = {name: doctest.testmod(importlib.import_module(name), report=False).attempted
                 for name in ("fastassoc.ops.loss", "fastassoc.ops.rerank", "fastassoc.segments",
                              "fastassoc.compat", "fastassoc.ops._sparse")}
    assert all(attempted.values()), attempted
