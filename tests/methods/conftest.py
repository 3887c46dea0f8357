"""Fixtures shared by the trainer tests: one torch thread (convolutions on a shared
2-core box run faster and reproducibly on one) and the tiny synthetic world."""
from __future__ import annotations

import pytest
import torch

from fastassoc import data
from fastassoc.methods import base


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world():
    return data.SyntheticTracklets(**base.TINY_WORLD, image_size=(32, 16))
