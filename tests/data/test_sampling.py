"""Frame sampling, the camera-balanced batch sampler, the frame Dataset and the train loader."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastassoc.data import (CameraBalancedSampler, FrameSampler, SyntheticTracklets, Tracklet, TrackletFrames,
                            frame_loader, sample_frames, train_loader, train_transform)


@pytest.fixture(scope="module")
def small_world():
    return SyntheticTracklets(num_train_ids=10, num_test_ids=4, num_cameras=3, image_size=(16, 8), seed=0)


# -- sample_frames -------------------------------------------------------------------------------------

@given(num_frames=st.integers(1, 40), count=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=60, deadline=None)
def test_sample_frames_properties(num_frames, count, seed):
    generator = torch.Generator().manual_seed(seed)
    random = sample_frames(num_frames, count, "random", generator)
    assert len(random) == count and random == sorted(random) and all(0 <= p < num_frames for p in random)
    if num_frames >= count:
        assert len(set(random)) == count
    else:
        assert set(random) == set(range(num_frames))
    evenly = sample_frames(num_frames, count, "evenly")  # centres of count equal segments
    assert len(evenly) == count and evenly == sorted(evenly)
    # Frame p spans [p, p + 1) in time and holds the centre (i + 1/2) * num_frames / count of segment i.
    assert all(p * 2 * count <= (2 * i + 1) * num_frames < (p + 1) * 2 * count for i, p in enumerate(evenly))
    assert all(0 <= p < num_frames for p in evenly)
    if num_frames >= count:
        assert len(set(evenly)) == count
    run = sample_frames(num_frames, count, "consecutive", generator)
    expected_steps = [min(1, num_frames - 1 - p) for p in run[:-1]]  # +1, or repeats of the last frame
    assert len(run) == count and [b - a for a, b in zip(run, run[1:])] == expected_steps
    assert sample_frames(num_frames, count, "all") == list(range(num_frames))
    assert sample_frames(num_frames, None) == list(range(num_frames))


def test_sample_frames_rejects_bad_arguments():
    with pytest.raises(ValueError):
        sample_frames(0, 2)
    with pytest.raises(ValueError):
        sample_frames(5, 0)
    with pytest.raises(ValueError):
        sample_frames(5, 2, "sometimes")


def test_sample_frames_random_covers_all_positions():
    generator = torch.Generator().manual_seed(0)
    seen = Counter(p for _ in range(400) for p in sample_frames(10, 3, "random", generator))
    assert set(seen) == set(range(10)) and min(seen.values()) > 60  # 120 expected each


# -- CameraBalancedSampler -----------------------------------------------------------------------------

def check_batches(cameras: list[int], per_camera: int, batches: list[list[int]]) -> None:
    sizes = Counter(cameras)
    for number, batch in enumerate(batches):
        got = Counter(cameras[i] for i in batch)
        assert got == {c: per_camera for c in sizes}, f"batch {number}: tracklets per camera {dict(got)}"
        assert [cameras[i] for i in batch] == sorted(cameras[i] for i in batch), f"batch {number} not grouped"
        for camera, size in sizes.items():
            members = [i for i in batch if cameras[i] == camera]
            if size >= per_camera:
                assert len(set(members)) == per_camera, f"batch {number}: camera {camera} repeats {members}"
            else:
                assert set(members) == {i for i, c in enumerate(cameras) if c == camera}


@given(sizes=st.lists(st.integers(1, 12), min_size=1, max_size=5), per_camera=st.integers(1, 5),
       seed=st.integers(0, 1000))
@settings(max_examples=60, deadline=None)
def test_camera_balanced_batches(sizes, per_camera, seed):
    rng = np.random.default_rng(seed)
    cameras = rng.permutation(np.repeat(np.arange(len(sizes)) * 2, sizes)).tolist()  # sparse camera ids
    sampler = CameraBalancedSampler(cameras, per_camera, num_batches=7, seed=seed)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 7 and sampler.batch_size == per_camera * len(sizes)
    check_batches(cameras, per_camera, batches)
    # Cycles: every tracklet of a camera comes up within its first ceil(n / k) batches.
    for camera in set(cameras):
        members = {i for i, c in enumerate(cameras) if c == camera}
        needed = -(-len(members) // per_camera)
        if needed <= 7:
            seen = {i for batch in batches[:needed] for i in batch if cameras[i] == camera}
            assert seen == members, f"camera {camera}: missing {members - seen}"


def test_sampler_epochs_are_reproducible():
    cameras = [0] * 9 + [1] * 5 + [3] * 14
    sampler = CameraBalancedSampler(cameras, 2, seed=5)
    assert len(sampler) == -(-28 // 6)
    first, second = list(sampler), list(sampler)
    assert first != second  # a new epoch each iteration
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(CameraBalancedSampler(cameras, 2, seed=5)) == first
    assert list(CameraBalancedSampler(cameras, 2, seed=6)) != first


def test_sampler_accepts_tracklets_and_tensors(small_world):
    from_tracklets = list(CameraBalancedSampler(small_world.train, 3, seed=1))
    tensor = torch.tensor([t.camera for t in small_world.train])
    assert list(CameraBalancedSampler(tensor, 3, seed=1)) == from_tracklets
    check_batches(tensor.tolist(), 3, from_tracklets)
    with pytest.raises(ValueError):
        CameraBalancedSampler(tensor, 0)


# -- TrackletFrames / train_loader -----------------------------------------------------------------------

def test_tracklet_frames_items(small_world):
    torch.manual_seed(0)
    dataset = TrackletFrames(small_world.train, small_world.load_frame, frames_per_tracklet=3)
    frames, index, camera = dataset[4]
    tracklet = small_world.train[4]
    assert frames.shape == (3, 3, 16, 8) and frames.dtype == torch.float32
    assert index == 4 and camera == tracklet.camera
    # Default transform: pixels / 255, and every frame is one of the tracklet's frames.
    stored = [torch.from_numpy(small_world.frame_array(f).copy()).permute(2, 0, 1).float() / 255
              for f in tracklet.frames]
    assert all(any(torch.equal(frame, s) for s in stored) for frame in frames)
    everything = TrackletFrames(small_world.train, small_world.load_frame, frames_per_tracklet=None)[4][0]
    assert torch.equal(everything, torch.stack(stored))


def test_tracklet_frames_short_tracklet_repeats(tmp_path):
    from PIL import Image
    path = tmp_path / "a.png"
    Image.new("RGB", (8, 16), (10, 20, 30)).save(path)
    dataset = TrackletFrames([Tracklet((str(path),), 2, 5, "t")], lambda p: Image.open(p).convert("RGB"), 4)
    frames, index, camera = dataset[0]
    assert frames.shape == (4, 3, 16, 8) and (index, camera) == (0, 2)
    assert torch.allclose(frames[:, :, 0, 0], torch.tensor([10, 20, 30]) / 255)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_train_loader_batches(small_world, num_workers):
    torch.manual_seed(0)
    loader = train_loader(small_world.train, small_world.load_frame, tracklets_per_camera=2, frames_per_tracklet=3,
                          transform=train_transform(32, 16), num_batches=2, num_workers=num_workers, seed=4)
    batches = list(loader)
    assert len(batches) == 2
    cameras_of = [t.camera for t in small_world.train]
    for frames, indices, cameras in batches:
        assert frames.shape == (6, 3, 3, 32, 16) and frames.dtype == torch.float32
        assert indices.dtype == torch.int64 and cameras.tolist() == [cameras_of[i] for i in indices.tolist()]
        assert Counter(cameras.tolist()) == {0: 2, 1: 2, 2: 2}
    sampler_batches = list(CameraBalancedSampler(small_world.train, 2, num_batches=2, seed=4))
    assert [b[1].tolist() for b in batches] == sampler_batches


# -- FrameSampler: single frames, the same number per camera, epochs over the frames ------------------

def _tracklets(lengths_per_camera):
    return [Tracklet(frames=tuple(f"c{camera}t{i}f{p}" for p in range(length)), camera=camera, pid=i,
                     tracklet_id=f"c{camera}t{i}")
            for camera, lengths in enumerate(lengths_per_camera) for i, length in enumerate(lengths)]


@pytest.mark.parametrize("num_cameras", [2, 6, 8])
def test_frame_sampler_gives_every_camera_the_same_number_of_images(num_cameras):
    """UGA / EEA: 60 images per batch, the same number from each camera, on 2 (PRID, iLIDS),
    6 (MARS) and 8 (DukeMTMC) cameras; 60 / 8 is not whole, so batches alternate 7 and 8 per
    camera and every 8 consecutive batches hold 60 of each."""
    rng = np.random.default_rng(num_cameras)
    tracklets = _tracklets([rng.integers(1, 30, size=rng.integers(2, 9)).tolist() for _ in range(num_cameras)])
    sampler = FrameSampler(tracklets, 60, num_batches=3 * num_cameras, seed=1)
    batches = list(sampler)
    assert len(batches) == 3 * num_cameras
    per_batch = [Counter(tracklets[t].camera for t, _ in batch) for batch in batches]
    for batch, counts in zip(batches, per_batch):
        assert len(batch) == 60
        assert set(counts) == set(range(num_cameras))
        assert max(counts.values()) - min(counts.values()) <= 1
        assert all(0 <= p < len(tracklets[t]) for t, p in batch)
    for start in range(0, len(batches), num_cameras):
        window = sum(per_batch[start:start + num_cameras], Counter())
        assert set(window.values()) == {60}


def test_frame_sampler_epoch_is_one_pass_over_the_frames():
    tracklets = _tracklets([[5, 9, 3], [4, 4], [20]])
    total = sum(len(t) for t in tracklets)
    random = FrameSampler(tracklets, 7, camera_balanced=False, seed=3)
    assert len(random) == -(-total // 7)
    seen = [pair for batch in random for pair in batch]
    # Without camera balance every frame comes once before any comes twice.
    assert len(set(seen[:total])) == total
    assert set(seen) == {(i, p) for i, t in enumerate(tracklets) for p in range(len(t))}
    balanced = FrameSampler(tracklets, 6, seed=3)
    assert len(balanced) == -(-total // 6)
    # Each camera's frames are visited in full before any repeats: the first 12 frames of camera 1
    # (8 frames) hold all 8.
    camera1 = [pair for batch in balanced for pair in batch if tracklets[pair[0]].camera == 1]
    assert set(camera1[:8]) == {(i, p) for i, t in enumerate(tracklets) if t.camera == 1 for p in range(len(t))}


def test_frame_sampler_epochs_are_reproducible_and_arguments_checked():
    tracklets = _tracklets([[5, 9], [4, 4]])
    a, b = FrameSampler(tracklets, 4, seed=2), FrameSampler(tracklets, 4, seed=2)
    first = list(a)
    assert first == list(b)
    assert list(a) != first           # the next epoch
    a.set_epoch(0)
    assert list(a) == first
    with pytest.raises(ValueError, match="batch_size"):
        FrameSampler(tracklets, 0)
    with pytest.raises(ValueError, match="num_batches"):
        FrameSampler(tracklets, 4, num_batches=-1)


def test_frame_loader_yields_single_frames_of_the_sampled_tracklets(small_world):
    loader = frame_loader(small_world.train, small_world.load_frame, batch_size=6,
                          transform=train_transform(16, 8, erasing=0.0), seed=0)
    frames, index, cameras = next(iter(loader))
    assert frames.shape == (6, 1, 3, 16, 8) and frames.dtype == torch.float32
    assert cameras.tolist() == [small_world.train[i].camera for i in index.tolist()]
    item, tracklet, camera = TrackletFrames(small_world.train, small_world.load_frame)[(2, 1)]
    assert item.shape[0] == 1 and tracklet == 2 and camera == small_world.train[2].camera
