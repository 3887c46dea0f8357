"""Transforms and extract_features against manual computation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastassoc.data import (IMAGENET_MEAN, IMAGENET_STD, SyntheticTracklets, extract_features, eval_transform,
                            train_transform)


@pytest.fixture(scope="module")
def small_world():
    return SyntheticTracklets(num_train_ids=6, num_test_ids=4, num_cameras=3, image_size=(16, 8),
                              frames_per_tracklet=(1, 7), seed=3)


def to_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


# -- transforms ------------------------------------------------------------------------------------------

def test_transforms_shapes_and_normalisation():
    image = Image.new("RGB", (20, 50), (255, 128, 0))
    out = eval_transform(64, 32)(image)
    assert out.shape == (3, 64, 32) and out.dtype == torch.float32
    expected = (torch.tensor([255, 128, 0]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(out[:, 10, 10], expected, atol=1e-6)
    torch.manual_seed(0)
    for _ in range(5):
        assert train_transform(64, 32)(image).shape == (3, 64, 32)
    # Without its random parts the training transform is the test transform.
    plain = train_transform(64, 32, flip=0.0, pad=0, erasing=0.0)(image)
    assert torch.equal(plain, out)


def test_train_transform_flips_and_erases():
    array = np.zeros((16, 8, 3), dtype=np.uint8)
    array[:, :4] = 255  # left half white
    image = Image.fromarray(array)
    flipped = train_transform(16, 8, flip=1.0, pad=0, erasing=0.0, mean=(0, 0, 0), std=(1, 1, 1))(image)
    assert torch.equal(flipped, torch.flip(to_tensor(image), dims=[2]))
    torch.manual_seed(1)
    erased = train_transform(16, 8, flip=0.0, pad=0, erasing=1.0, mean=(0, 0, 0), std=(1, 1, 1))(image)
    assert (erased != to_tensor(image)).any() and ((erased == 0) | (erased == to_tensor(image))).all()
    torch.manual_seed(2)
    shifted = [train_transform(16, 8, flip=0.0, pad=3, erasing=0.0)(image) for _ in range(8)]
    assert any(not torch.equal(shifted[0], s) for s in shifted[1:])


# -- extract_features ------------------------------------------------------------------------------------

class TinyNet(torch.nn.Module):
    """Conv + BatchNorm (so eval mode matters) + pooling -> [b, 5]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 5, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(5)
        with torch.no_grad():
            self.norm.running_mean.uniform_(-0.5, 0.5)
            self.norm.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return torch.tanh(self.norm(self.conv(x))).mean((2, 3))


def manual_features(model, world, tracklets, pooling, transform=to_tensor, positions=None):
    model.eval()
    rows = []
    with torch.no_grad():
        for tracklet in tracklets:
            frames = tracklet.frames if positions is None else [tracklet.frames[p] for p in positions(len(tracklet))]
            out = torch.stack([model(transform(world.load_frame(f))[None])[0] for f in frames])
            rows.append(out.mean(0) if pooling == "mean" else out.amax(0))
    return torch.stack(rows)


@pytest.mark.parametrize("pooling", ["mean", "max"])
@pytest.mark.parametrize("batch_size", [3, 1000])
def test_extract_features_pools_like_manual(small_world, pooling, batch_size):
    model = TinyNet().train()
    tracklets = small_world.query + small_world.gallery
    got = extract_features(model, tracklets, small_world.load_frame, pooling=pooling, batch_size=batch_size,
                           progress=False)
    expected = manual_features(TinyNet(), small_world, tracklets, pooling)
    assert got.shape == (len(tracklets), 5) and got.dtype == torch.float32 and got.device.type == "cpu"
    worst = (got - expected).abs().max(1).values
    assert torch.all(worst < 1e-5), f"tracklet {int(worst.argmax())} differs by {float(worst.max())}"
    assert model.training  # training mode restored


def test_extract_features_max_frames_and_transform(small_world):
    model = TinyNet()
    transform = eval_transform(16, 8)
    tracklets = small_world.train
    got = extract_features(model, tracklets, small_world.load_frame, transform=transform, max_frames=3,
                           progress=True, desc="test")

    def centres(n):  # centres of 3 equal segments, all frames when shorter
        return [(2 * i + 1) * n // 6 for i in range(3)] if n > 3 else list(range(n))

    expected = manual_features(TinyNet(), small_world, tracklets, "mean", transform, centres)
    assert torch.allclose(got, expected, atol=1e-5)


def test_extract_features_with_a_function_and_empty_input(small_world):
    flat = extract_features(lambda x: x, small_world.query, small_world.load_frame, progress=False)
    assert flat.shape == (len(small_world.query), 3 * 16 * 8)
    means = small_world.mean_frames("query").view(-1, 16, 8, 3).permute(0, 3, 1, 2).reshape(len(flat), -1) / 255
    assert torch.allclose(flat, means, atol=1e-5)
    assert extract_features(TinyNet(), [], small_world.load_frame, progress=False).shape == (0, 0)
    with pytest.raises(ValueError, match="pooling"):
        extract_features(TinyNet(), small_world.query, small_world.load_frame, pooling="median")
