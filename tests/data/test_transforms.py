"""The training transform a trainer config asks for (flip, pad-crop, erasing switched off for
the papers that state no augmentation)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from fastassoc.data import IMAGENET_MEAN, IMAGENET_STD, config_train_transform


def _image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(40, 20, 3), dtype=np.uint8))


def test_resize_only_config_is_deterministic_and_equals_resize_then_normalise():
    config = SimpleNamespace(image_size=(32, 16), train_flip=0.0, train_pad=0, train_erasing=0.0)
    transform = config_train_transform(config)
    image = _image()
    torch.manual_seed(0)
    outputs = [transform(image) for _ in range(5)]
    # Oracle: PIL bilinear resize, scale to [0, 1], normalise with the ImageNet statistics.
    resized = np.asarray(image.resize((16, 32), Image.BILINEAR), dtype=np.float64) / 255.0
    want = (resized - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    for out in outputs:
        np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), want, atol=2e-2)
        torch.testing.assert_close(out, outputs[0])


def test_default_config_keeps_flip_crop_and_erasing():
    config = SimpleNamespace(image_size=(32, 16), train_erasing=0.5)
    transform = config_train_transform(config)
    names = [type(step).__name__ for step in transform.transforms]
    assert {"RandomHorizontalFlip", "RandomCrop", "RandomErasing"} <= set(names)
