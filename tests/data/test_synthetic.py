"""The synthetic tracklet world: determinism, splits, fragmentation, difficulty."""
from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

import fastassoc
from fastassoc.data import SyntheticTracklets, tracklet_labels

SMALL = dict(num_train_ids=12, num_test_ids=10, num_cameras=4, image_size=(16, 8))


def world(**overrides):
    return SyntheticTracklets(**{**SMALL, **overrides})


def test_same_seed_same_world_different_seed_different_world():
    a, b, c = world(seed=7), world(seed=7), world(seed=8)
    assert a.train == b.train and a.query == b.query and a.gallery == b.gallery
    assert np.array_equal(a.pixels, b.pixels)
    assert a.pixels.shape != c.pixels.shape or not np.array_equal(a.pixels, c.pixels)
    assert [(t.pid, t.camera, len(t)) for t in a.train] != [(t.pid, t.camera, len(t)) for t in c.train]


def test_image_size_changes_pixels_not_the_world():
    small, large = world(seed=3), world(seed=3, image_size=(32, 16))
    assert small.train == large.train and small.query == large.query and small.gallery == large.gallery
    assert small.pixels.shape[1:] == (16, 8, 3) and large.pixels.shape[1:] == (32, 16, 3)


def test_load_frame_returns_the_stored_pixels():
    ds = world(seed=1)
    key = ds.gallery[-1].frames[-1]
    image = ds.load_frame(key)
    assert image.mode == "RGB" and image.size == (8, 16)
    assert np.array_equal(np.asarray(image), ds.pixels[ds.frame_index[key]])
    assert len(ds.frame_index) == len(ds.pixels) == sum(len(t) for t in ds.train + ds.query + ds.gallery)
    with pytest.raises(KeyError, match="no synthetic frame"):
        ds.load_frame("nope")


def test_identities_disjoint_and_counted():
    ds = world(seed=2, num_distractors=3)
    train, query, gallery = ({t.pid for t in split} for split in (ds.train, ds.query, ds.gallery))
    assert train == set(range(12)) and ds.num_train_pids == 12
    assert query == set(range(12, 22))
    assert gallery == set(range(12, 25))
    assert ds.num_cameras == 4
    ids = [t.tracklet_id for t in ds.train + ds.query + ds.gallery]
    assert len(set(ids)) == len(ids)


def test_query_gallery_built_as_in_mars():
    ds = world(seed=4, fragment_rate=0.8, num_distractors=4)
    test_ids = set(range(12, 22))
    # One query per (identity, camera); query and gallery partition the test tracklets.
    query_visits = Counter((t.pid, t.camera) for t in ds.query)
    assert max(query_visits.values()) == 1
    assert not set(ds.query) & set(ds.gallery)
    # Every camera an identity visits has a query, except one whose tracklets all stay in the gallery,
    # and every query has a true match in another camera.
    visits = defaultdict(set)
    for t in ds.query + ds.gallery:
        visits[t.pid].add(t.camera)
    for pid in test_ids:
        query_cameras = {c for p, c in query_visits if p == pid}
        assert len(visits[pid]) >= 2 and len(visits[pid] - query_cameras) == 1
    for q in ds.query:
        assert any(g.pid == q.pid and g.camera != q.camera for g in ds.gallery), q.tracklet_id
    # Distractors: gallery only, one camera each, identities no query has.
    distractors = [t for t in ds.gallery if t.pid not in test_ids]
    assert {t.pid for t in distractors} == set(range(22, 26))
    assert all(len({t.camera for t in distractors if t.pid == pid}) == 1 for pid in range(22, 26))


def test_camera_and_length_ranges():
    ds = world(seed=5, num_cameras=6, cameras_per_id=(3, 5), frames_per_tracklet=(2, 4))
    per_id = defaultdict(set)
    for t in ds.train + ds.query + ds.gallery:
        per_id[t.pid].add(t.camera)
        assert 2 <= len(t) <= 4
    assert all(3 <= len(cameras) <= 5 for cameras in per_id.values())
    assert {c for cameras in per_id.values() for c in cameras} <= set(range(6))


def test_fragmentation_rate():
    # Tracklets per (identity, camera) visit: 1 + Poisson(rate) capped at max_fragments.
    none = world(seed=6, fragment_rate=0.0)
    assert max(Counter((t.pid, t.camera) for t in none.train).values()) == 1
    ds = SyntheticTracklets(num_train_ids=400, num_test_ids=0, num_cameras=4, image_size=(8, 8),
                            frames_per_tracklet=(1, 1), fragment_rate=1.0, max_fragments=50, seed=0)
    fragments = np.array(list(Counter((t.pid, t.camera) for t in ds.train).values()))
    mean, error = fragments.mean() - 1, fragments.std() / np.sqrt(len(fragments))
    assert abs(mean - 1.0) < 4 * error + 1e-9, (mean, error, len(fragments))
    capped = SyntheticTracklets(num_train_ids=100, num_test_ids=0, num_cameras=3, image_size=(8, 8),
                                frames_per_tracklet=(1, 1), fragment_rate=3.0, max_fragments=2, seed=0)
    assert set(Counter((t.pid, t.camera) for t in capped.train).values()) == {1, 2}


def test_one_tracklet_per_camera_option():
    full = world(seed=9, fragment_rate=1.5)
    sparse = world(seed=9, fragment_rate=1.5, tracklets="one_per_camera", sampling_seed=2)
    assert set(sparse.train) <= set(full.train)
    assert Counter((t.pid, t.camera) for t in sparse.train) == Counter({(t.pid, t.camera): 1 for t in full.train})
    assert sparse.query == full.query and sparse.gallery == full.gallery


@pytest.mark.parametrize("bad", [dict(num_cameras=1), dict(image_size=(4, 8)), dict(frames_per_tracklet=(5, 2)),
                                 dict(cameras_per_id=(1, 1)), dict(fragment_rate=-1.0), dict(occlusion_rate=2.0),
                                 dict(tracklets="some")])
def test_invalid_arguments_raise(bad):
    with pytest.raises(ValueError):
        world(**bad)


def raw_pixel_ranking(ds):
    qp, qc = tracklet_labels(ds.query)
    gp, gc = tracklet_labels(ds.gallery)
    return fastassoc.evaluate_ranking(ds.mean_frames("query"), ds.mean_frames("gallery"), qp, gp, qc, gc,
                                      metric="euclidean", backend="reference")


def test_mean_frames_match_pixels():
    ds = world(seed=10)
    means = ds.mean_frames("query")
    rows = [ds.frame_index[f] for f in ds.query[0].frames]
    assert means.shape == (len(ds.query), 16 * 8 * 3) and means.dtype == torch.float32
    assert torch.allclose(means[0], torch.from_numpy(ds.pixels[rows].astype(np.float64).mean(0).ravel()).float())


def test_cameras_dominate_raw_pixels():
    """The default world is hard for raw pixels; without camera effects identity shows in raw pixels."""
    hard = raw_pixel_ranking(SyntheticTracklets(seed=0))
    easy = raw_pixel_ranking(SyntheticTracklets(seed=0, camera_strength=0.0))
    assert hard.rank1 < 0.1 and hard.mAP < 0.1, (hard.rank1, hard.mAP)
    assert easy.rank1 > 0.5, easy.rank1
