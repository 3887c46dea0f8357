"""Tracklet records, dataset helpers, camera grouping and the sparse one-per-camera sampling."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastassoc.data import (Tracklet, TrackletDataset, group_by_camera, one_tracklet_per_camera,
                            tracklet_labels)


def make(pid_cameras):
    return [Tracklet(frames=(f"f{i}a", f"f{i}b"), camera=c, pid=p, tracklet_id=f"t{i}")
            for i, (p, c) in enumerate(pid_cameras)]


def test_dataset_helpers():
    train = make([(1, 0), (1, 2), (4, 2)])
    query = make([(7, 1)])
    gallery = make([(7, 3), (-1, 0), (0, 5)])
    ds = TrackletDataset("toy", train, query, gallery, frame_loader=lambda f: f.upper())
    assert ds.num_cameras == 6 and ds.num_train_pids == 2
    assert ds.load_frame("f0a") == "F0A"
    assert ds.split("gallery") == tuple(gallery) and isinstance(ds.train, tuple)
    with pytest.raises(ValueError):
        ds.split("validation")
    assert "toy" in ds.summary() and "gallery" in ds.summary() and "toy" in repr(ds)
    pids, cameras = tracklet_labels(gallery)
    assert pids.tolist() == [7, -1, 0] and cameras.tolist() == [3, 0, 5] and pids.dtype == torch.int64
    empty = TrackletDataset("empty", [], [], [])
    assert empty.num_cameras == 0 and empty.num_train_pids == 0
    assert len(train[0]) == 2


@given(st.lists(st.integers(0, 5), max_size=30))
@settings(max_examples=50, deadline=None)
def test_group_by_camera(cameras):
    tracklets = make([(0, c) for c in cameras])
    ordered, offsets = group_by_camera(tracklets, num_cameras=6)
    assert offsets.shape == (7,) and offsets[0] == 0 and offsets[-1] == len(cameras)
    for camera in range(6):
        run = ordered[offsets[camera]:offsets[camera + 1]]
        # Camera c's run holds exactly its tracklets, in their original order.
        assert list(run) == [t for t in tracklets if t.camera == camera]
    with pytest.raises(ValueError):
        group_by_camera(make([(0, 6)]), num_cameras=6)


def test_one_tracklet_per_camera():
    tracklets = make([(1, 0), (1, 0), (1, 1), (2, 0), (2, 0), (2, 0), (-1, 0), (3, 4)])
    picks = set()
    for seed in range(20):
        kept = one_tracklet_per_camera(tracklets, seed)
        assert Counter((t.pid, t.camera) for t in kept) == {(1, 0): 1, (1, 1): 1, (2, 0): 1, (3, 4): 1}
        positions = [tracklets.index(t) for t in kept]
        assert positions == sorted(positions)  # original order kept
        picks.add(tuple(positions))
        assert one_tracklet_per_camera(tracklets, seed) == kept
    assert len(picks) > 1
