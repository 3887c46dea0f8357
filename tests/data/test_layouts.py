"""Dataset layouts: tiny fixture trees in each dataset's official naming, parsed by load_dataset.

Every expectation below is written out by hand from the fixture names (the oracle), never
taken from the parser.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from fastassoc.data import DATASETS, load_dataset

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _image_bytes(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 8), (200, 30, 60)).save(buffer, format=fmt)
    return buffer.getvalue()


JPEG, PNG = _image_bytes("JPEG"), _image_bytes("PNG")


def touch(path: Path, data: bytes | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(JPEG if data is None else data)
    return path


def as_set(tracklets):
    """{(pid, camera, tuple of frame file names)} of a split."""
    return {(t.pid, t.camera, tuple(Path(f).name for f in t.frames)) for t in tracklets}


def test_known_names_and_aliases(tmp_path):
    assert set(DATASETS) == {"mars", "prid2011", "ilidsvid", "dukevideo", "market1501", "dukemtmc", "msmt17"}
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("cuhk99", tmp_path)
    with pytest.raises(FileNotFoundError, match="bounding_box_train"):
        load_dataset("Market-1501", tmp_path)  # alias resolved, then the missing folder is named


def test_missing_root_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    for name in DATASETS:
        with pytest.raises(FileNotFoundError, match="nowhere"):
            load_dataset(name, missing)


def test_unknown_option_raises(tmp_path):
    with pytest.raises(TypeError, match="split"):
        load_dataset("market1501", tmp_path, split=3)


# -- Market-1501 / DukeMTMC-reID --------------------------------------------------------------------

MARKET = {
    "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c1s1_000551_01.jpg", "0002_c2s1_000301_01.jpg",
                           "0007_c2s3_070952_01.jpg", "0007_c6s3_071002_02.jpg"],
    "query": ["0003_c1s1_000001_00.jpg", "0004_c2s1_000016_00.jpg"],
    "bounding_box_test": ["0003_c2s1_000101_01.jpg", "0003_c1s1_000201_02.jpg", "0000_c1s1_000301_03.jpg",
                          "-1_c3s1_000401_04.jpg", "0004_c5s2_000501_05.jpg"],
}


def build_market(root: Path) -> Path:
    for folder, names in MARKET.items():
        for name in names:
            touch(root / folder / name)
    (root / "bounding_box_train" / "Thumbs.db").write_bytes(b"not an image")
    return root


def test_market1501(tmp_path):
    ds = load_dataset("market1501", build_market(tmp_path))
    assert as_set(ds.train) == {
        (2, 0, ("0002_c1s1_000451_03.jpg", "0002_c1s1_000551_01.jpg")), (2, 1, ("0002_c2s1_000301_01.jpg",)),
        (7, 1, ("0007_c2s3_070952_01.jpg",)), (7, 5, ("0007_c6s3_071002_02.jpg",))}
    assert as_set(ds.query) == {(3, 0, ("0003_c1s1_000001_00.jpg",)), (4, 1, ("0004_c2s1_000016_00.jpg",))}
    # Distractors (0000) stay, junk (-1) goes; same-camera entries stay (the evaluation drops them).
    assert as_set(ds.gallery) == {(3, 1, ("0003_c2s1_000101_01.jpg",)), (3, 0, ("0003_c1s1_000201_02.jpg",)),
                                  (0, 0, ("0000_c1s1_000301_03.jpg",)), (4, 4, ("0004_c5s2_000501_05.jpg",))}
    assert ds.num_cameras == 6 and ds.num_train_pids == 2
    assert len({t.tracklet_id for t in ds.gallery}) == len(ds.gallery)
    with_junk = load_dataset("market1501", tmp_path, keep_junk=True)
    assert (-1, 2, ("-1_c3s1_000401_04.jpg",)) in as_set(with_junk.gallery)
    # Image datasets have one tracklet per identity per camera already.
    assert as_set(load_dataset("market1501", tmp_path, tracklets="one_per_camera").train) == as_set(ds.train)
    image = ds.load_frame(ds.train[0].frames[0])
    assert image.mode == "RGB" and image.size == (4, 8)


def test_market1501_archive_folder_and_missing_folder(tmp_path):
    build_market(tmp_path / "Market-1501-v15.09.15")
    assert len(load_dataset("market1501", tmp_path).train) == 4
    for name in MARKET["query"]:
        (tmp_path / "Market-1501-v15.09.15" / "query" / name).unlink()
    (tmp_path / "Market-1501-v15.09.15" / "query").rmdir()
    with pytest.raises(FileNotFoundError, match="query"):
        load_dataset("market1501", tmp_path)


def test_market1501_bad_name_raises(tmp_path):
    build_market(tmp_path)
    touch(tmp_path / "query" / "person7.jpg")
    with pytest.raises(ValueError, match="person7.jpg"):
        load_dataset("market1501", tmp_path)


def test_dukemtmc(tmp_path):
    root = tmp_path / "DukeMTMC-reID"
    for name in ["0001_c2_f0046182.jpg", "0001_c2_f0046302.jpg", "0001_c6_f0061181.jpg", "0005_c8_f0000101.jpg"]:
        touch(root / "bounding_box_train" / name)
    touch(root / "query" / "0008_c1_f0003321.jpg")
    touch(root / "bounding_box_test" / "0008_c7_f0004421.jpg")
    touch(root / "bounding_box_test" / "0009_c3_f0000021.jpg")
    ds = load_dataset("dukemtmc", tmp_path)
    assert as_set(ds.train) == {(1, 1, ("0001_c2_f0046182.jpg", "0001_c2_f0046302.jpg")),
                                (1, 5, ("0001_c6_f0061181.jpg",)), (5, 7, ("0005_c8_f0000101.jpg",))}
    assert as_set(ds.query) == {(8, 0, ("0008_c1_f0003321.jpg",))}
    assert as_set(ds.gallery) == {(8, 6, ("0008_c7_f0004421.jpg",)), (9, 2, ("0009_c3_f0000021.jpg",))}
    assert ds.num_cameras == 8


# -- MSMT17 ------------------------------------------------------------------------------------------

def build_msmt(root: Path, train_dir: str, test_dir: str) -> None:
    lists = {
        "list_train.txt": [("0000/0000_000_01_0303morning_0015_0.jpg", 0),
                           ("0000/0000_001_01_0303morning_0016_1.jpg", 0),
                           ("0000/0000_002_07_0303noon_0101_0.jpg", 0),
                           ("0001/0001_000_15_0113afternoon_0001_0.jpg", 1)],
        "list_val.txt": [("0002/0002_000_03_0303morning_0200_0.jpg", 2)],
        "list_query.txt": [("0000/0000_000_02_0303morning_0015_0.jpg", 0)],
        "list_gallery.txt": [("0000/0000_001_05_0303noon_0015_0.jpg", 0),
                             ("0001/0001_000_02_0303noon_0015_1.jpg", 1)],
    }
    for list_name, entries in lists.items():
        folder = train_dir if list_name in ("list_train.txt", "list_val.txt") else test_dir
        for relative, _ in entries:
            touch(root / folder / relative)
        (root / list_name).write_text("".join(f"{relative} {label}\n" for relative, label in entries))


@pytest.mark.parametrize("version,train_dir,test_dir", [("MSMT17_V1", "train", "test"),
                                                         ("MSMT17_V2", "mask_train_v2", "mask_test_v2")])
def test_msmt17(tmp_path, version, train_dir, test_dir):
    build_msmt(tmp_path / version, train_dir, test_dir)
    ds = load_dataset("msmt17", tmp_path)
    assert as_set(ds.train) == {
        (0, 0, ("0000_000_01_0303morning_0015_0.jpg", "0000_001_01_0303morning_0016_1.jpg")),
        (0, 6, ("0000_002_07_0303noon_0101_0.jpg",)), (1, 14, ("0001_000_15_0113afternoon_0001_0.jpg",)),
        (2, 2, ("0002_000_03_0303morning_0200_0.jpg",))}
    assert all(Path(f).parent.parent.name == train_dir for t in ds.train for f in t.frames)
    assert as_set(ds.query) == {(0, 1, ("0000_000_02_0303morning_0015_0.jpg",))}
    assert as_set(ds.gallery) == {(0, 4, ("0000_001_05_0303noon_0015_0.jpg",)),
                                  (1, 1, ("0001_000_02_0303noon_0015_1.jpg",))}
    assert {t.pid for t in load_dataset("msmt17", tmp_path, include_val=False).train} == {0, 1}


def test_msmt17_missing_list_is_named(tmp_path):
    build_msmt(tmp_path, "train", "test")
    (tmp_path / "list_gallery.txt").unlink()
    with pytest.raises(FileNotFoundError, match="list_gallery.txt"):
        load_dataset("msmt17", tmp_path)


# -- MARS ----------------------------------------------------------------------------------------------

# (pid, camera 1-based, tracklet, frames); names PPPPCcTttttFfff.jpg, junk folder 00-1.
MARS_TRAIN = [(1, 1, 1, 3), (1, 2, 1, 2), (1, 2, 2, 2), (2, 1, 1, 2)]
MARS_TEST = [(3, 1, 1, 2), (3, 2, 1, 2), (3, 2, 2, 1), (0, 3, 1, 1), (-1, 1, 1, 1), (4, 1, 1, 1), (4, 6, 1, 1)]
MARS_QUERY_IDX = [1, 6]  # 1-based rows of MARS_TEST


def mars_name(pid, camera, tracklet, frame):
    return f"{'00-1' if pid == -1 else f'{pid:04d}'}C{camera}T{tracklet:04d}F{frame:03d}.jpg"


def build_mars(root: Path) -> None:
    for folder, tracks, list_name, mat_name, key in (
            ("bbox_train", MARS_TRAIN, "train_name.txt", "tracks_train_info.mat", "track_train_info"),
            ("bbox_test", MARS_TEST, "test_name.txt", "tracks_test_info.mat", "track_test_info")):
        names, rows = [], []
        for pid, camera, tracklet, length in tracks:
            start = len(names) + 1
            names += [mars_name(pid, camera, tracklet, f + 1) for f in range(length)]
            rows.append([start, len(names), pid, camera])
        for name in names:
            touch(root / folder / name[:4] / name)
        touch(root / "info" / list_name, "".join(n + "\n" for n in names).encode())
        scipy.io.savemat(str(root / "info" / mat_name), {key: np.array(rows, dtype=np.float64)})
    scipy.io.savemat(str(root / "info" / "query_IDX.mat"), {"query_IDX": np.array([MARS_QUERY_IDX], dtype=np.float64)})


def mars_set(tracks):
    return {(pid, camera - 1, tuple(mars_name(pid, camera, tracklet, f + 1) for f in range(length)))
            for pid, camera, tracklet, length in tracks}


def test_mars(tmp_path):
    build_mars(tmp_path)
    ds = load_dataset("mars", tmp_path)
    assert as_set(ds.train) == mars_set(MARS_TRAIN)
    assert as_set(ds.query) == mars_set([MARS_TEST[0], MARS_TEST[5]])
    # Official protocol: every test track is in the gallery, the queries' own included (junk row 4 dropped).
    assert as_set(ds.gallery) == mars_set([MARS_TEST[i] for i in (0, 1, 2, 3, 5, 6)])
    assert ds.protocol == "mars-official"
    torchreid = load_dataset("mars", tmp_path, protocol="torchreid")
    assert as_set(torchreid.gallery) == mars_set([MARS_TEST[i] for i in (1, 2, 3, 6)])
    assert torchreid.protocol == "mars-torchreid"
    assert [t.tracklet_id for t in ds.query] == ["0003C1T0001", "0004C1T0001"]
    assert all(Path(f).parent.name == Path(f).name[:4] and Path(f).parent.parent.name == "bbox_train"
               for t in ds.train for f in t.frames)
    junk = load_dataset("mars", tmp_path, keep_junk=True, protocol="torchreid")
    assert as_set(junk.gallery) == mars_set([MARS_TEST[i] for i in (1, 2, 3, 4, 6)])
    with pytest.raises(ValueError, match="protocol"):
        load_dataset("mars", tmp_path, protocol="prid")
    sparse = load_dataset("mars", tmp_path, tracklets="one_per_camera", sampling_seed=3)
    assert sorted((t.pid, t.camera) for t in sparse.train) == [(1, 0), (1, 1), (2, 0)]
    assert as_set(sparse.train) <= as_set(ds.train)
    assert as_set(load_dataset("mars", tmp_path, min_frames=3).train) == mars_set([MARS_TRAIN[0]])


def test_mars_one_per_camera_seeds_pick_both_fragments(tmp_path):
    build_mars(tmp_path)
    picked = {next(t.tracklet_id for t in load_dataset("mars", tmp_path, tracklets="one_per_camera",
                                                       sampling_seed=seed).train if t.camera == 1)
              for seed in range(16)}
    assert picked == {"0001C2T0001", "0001C2T0002"}


def test_mars_missing_info_file_and_mismatch(tmp_path):
    build_mars(tmp_path)
    (tmp_path / "info" / "query_IDX.mat").unlink()
    with pytest.raises(FileNotFoundError, match="query_IDX.mat"):
        load_dataset("mars", tmp_path)
    build_mars(tmp_path)
    rows = [[1, 3, 1, 1], [4, 5, 2, 2], [6, 7, 1, 2], [8, 9, 2, 1]]  # pid 2 claims pid 1's frames
    scipy.io.savemat(str(tmp_path / "info" / "tracks_train_info.mat"),
                     {"track_train_info": np.array(rows, dtype=np.float64)})
    with pytest.raises(ValueError, match="row 1"):
        load_dataset("mars", tmp_path)


def _oracle_mars_rank1(query, gallery, distance):
    """The MARS authors' rule per query: rank the gallery by distance (ties by position), drop
    junk (same identity and camera, the query's own track among them; identity -1), and score
    a hit when the first remaining track has the query's identity."""
    hits = []
    for qi, q in enumerate(query):
        order = sorted(range(len(gallery)), key=lambda g: (distance[qi][g], g))
        kept = [g for g in order if not ((gallery[g].pid == q.pid and gallery[g].camera == q.camera)
                                         or gallery[g].pid == -1)]
        if any(gallery[g].pid == q.pid for g in kept):
            hits.append(gallery[kept[0]].pid == q.pid)
    return float(np.mean(hits)), len(hits)


@pytest.mark.parametrize("protocol", ["official", "torchreid"])
def test_mars_protocol_junk_rules_on_the_fixture_tree(tmp_path, protocol):
    """Features that put every query's own track (and same-camera tracks of its identity) first:
    the ranking must skip them as junk, under the official protocol as under torchreid's."""
    import torch

    from fastassoc import data, evaluate_ranking

    build_mars(tmp_path)
    ds = load_dataset("mars", tmp_path, protocol=protocol)
    rng = np.random.default_rng(0)

    def feature(t):
        # Identity and camera in the first coordinates: same-camera same-identity tracks are nearest.
        return np.array([10.0 * t.pid, 3.0 * t.camera, *rng.normal(scale=0.01, size=2)])

    qf = np.stack([feature(t) for t in ds.query])
    gf = np.stack([feature(t) for t in ds.gallery])
    qp, qc = data.tracklet_labels(ds.query)
    gp, gc = data.tracklet_labels(ds.gallery)
    result = evaluate_ranking(torch.from_numpy(qf).float(), torch.from_numpy(gf).float(), qp, gp, qc, gc,
                              backend="reference")
    distance = np.linalg.norm(qf[:, None] - gf[None], axis=-1)
    rank1, valid = _oracle_mars_rank1(ds.query, ds.gallery, distance)
    assert int(result.num_valid_queries) == valid
    assert float(result.cmc[0]) == pytest.approx(rank1)


def test_mars_missing_frames_are_counted_and_named(tmp_path):
    build_mars(tmp_path)
    (tmp_path / "bbox_train" / "0001" / "0001C1T0001F002.jpg").unlink()
    (tmp_path / "bbox_test" / "0004" / "0004C6T0001F001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"2 of 18 frame files .* missing.*0001C1T0001F002\.jpg"):
        load_dataset("mars", tmp_path)


def test_corrupt_mat_file_is_named(tmp_path):
    build_mars(tmp_path)
    (tmp_path / "info" / "tracks_test_info.mat").write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(ValueError, match="tracks_test_info.mat"):
        load_dataset("mars", tmp_path)


def test_undecodable_image_is_named(tmp_path):
    build_mars(tmp_path)
    broken = tmp_path / "bbox_train" / "0001" / "0001C1T0001F001.jpg"
    broken.write_bytes(JPEG[: len(JPEG) // 2])           # a truncated JPEG
    ds = load_dataset("mars", tmp_path)
    with pytest.raises(OSError, match="0001C1T0001F001.jpg"):
        ds.load_frame(str(broken))
    (tmp_path / "bbox_train" / "0001" / "0001C1T0001F002.jpg").write_bytes(b"garbage")
    with pytest.raises(OSError, match="0001C1T0001F002.jpg"):
        ds.load_frame(str(tmp_path / "bbox_train" / "0001" / "0001C1T0001F002.jpg"))


def test_msmt17_missing_listed_image_is_named(tmp_path):
    build_msmt(tmp_path, "train", "test")
    (tmp_path / "test" / "0001" / "0001_000_02_0303noon_0015_1.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="1 of .* missing.*0001_000_02_0303noon_0015_1.jpg"):
        load_dataset("msmt17", tmp_path)


# -- PRID2011 / iLIDS-VID ----------------------------------------------------------------------------

def build_prid(root: Path) -> None:
    # person: (frames in cam_a, frames in cam_b); 0 = absent. Person 3 is too short in cam_b,
    # person 201 is beyond the 200 shared persons, person 6 is seen in cam_b only.
    persons = {1: (28, 30), 2: (40, 28), 3: (35, 27), 4: (29, 29), 5: (31, 33), 6: (0, 30), 201: (30, 30)}
    for person, lengths in persons.items():
        for camera, length in zip(("cam_a", "cam_b"), lengths):
            for frame in range(length):
                touch(root / "prid_2011" / "multi_shot" / camera / f"person_{person:04d}" / f"{frame + 1:04d}.png", PNG)


def test_prid2011(tmp_path):
    build_prid(tmp_path)
    partitions = set()
    for split in range(8):
        ds = load_dataset("prid2011", tmp_path, split=split)
        train, test = {t.pid for t in ds.train}, {t.pid for t in ds.query}
        assert train | test == {1, 2, 4, 5} and not train & test and len(train) == len(test) == 2
        assert {t.pid for t in ds.gallery} == test
        assert {t.camera for t in ds.query} == {0} and {t.camera for t in ds.gallery} == {1}
        assert sorted((t.pid, t.camera) for t in ds.train) == sorted((p, c) for p in train for c in (0, 1))
        lengths = {1: (28, 30), 2: (40, 28), 4: (29, 29), 5: (31, 33)}
        assert all(len(t) == lengths[t.pid][t.camera] for t in ds.train + ds.query + ds.gallery)
        assert all([Path(f).name for f in t.frames] == sorted(Path(f).name for f in t.frames) for t in ds.train)
        assert as_set(load_dataset("prid2011", tmp_path, split=split).train) == as_set(ds.train)
        partitions.add(frozenset(train))
    assert len(partitions) > 1  # the split index changes the halves
    relaxed = load_dataset("prid2011", tmp_path, min_frames=27)
    assert {t.pid for t in relaxed.train + relaxed.query} == {1, 2, 3, 4, 5}


def test_prid2011_split_file(tmp_path):
    import json

    build_prid(tmp_path)
    splits = [{"train": ["person_0001", "person_0004"], "test": ["person_0002", "person_0005"]},
              {"train": [2, 5], "test": [1, 4]}]
    (tmp_path / "splits.json").write_text(json.dumps(splits))
    for split, (train, test) in enumerate([({1, 4}, {2, 5}), ({2, 5}, {1, 4})]):
        ds = load_dataset("prid2011", tmp_path, split=split, split_file=tmp_path / "splits.json")
        assert {t.pid for t in ds.train} == train and {t.pid for t in ds.query} == test
        assert "splits.json" in ds.protocol
    with pytest.raises(ValueError, match="split must be"):
        load_dataset("prid2011", tmp_path, split=2, split_file=tmp_path / "splits.json")
    (tmp_path / "bad.json").write_text(json.dumps([{"train": [1, 3], "test": [2]}]))   # person 3 is too short
    with pytest.raises(ValueError, match="does not hold"):
        load_dataset("prid2011", tmp_path, split_file=tmp_path / "bad.json")


def test_ilidsvid(tmp_path):
    base = tmp_path / "i-LIDS-VID" / "sequences"
    for person in (1, 2, 3, 4):
        for camera in (1, 2):
            for frame in (317, 318, 400):
                name = f"cam{camera}_person{person:03d}_{frame:05d}.png"
                touch(base / f"cam{camera}" / f"person{person:03d}" / name, PNG)
    touch(base / "cam1" / "person005" / "cam1_person005_00001.png", PNG)
    ds = load_dataset("ilidsvid", tmp_path, split=1)
    train, test = {t.pid for t in ds.train}, {t.pid for t in ds.query}
    assert train | test == {1, 2, 3, 4} and not train & test and len(train) == 2
    assert {(t.pid, t.camera) for t in ds.gallery} == {(p, 1) for p in test}
    assert {(t.pid, t.camera) for t in ds.query} == {(p, 0) for p in test}
    first = ds.train[0]
    assert [Path(f).name for f in first.frames] == [f"cam{first.camera + 1}_person{first.pid:03d}_{f:05d}.png"
                                                    for f in (317, 318, 400)]
    assert first.tracklet_id == f"cam{first.camera + 1}_person{first.pid:03d}"
    only_cam1 = tmp_path / "only_cam1"
    touch(only_cam1 / "sequences" / "cam1" / "person001" / "cam1_person001_00001.png", PNG)
    with pytest.raises(FileNotFoundError, match="cam2"):
        load_dataset("ilidsvid", only_cam1)


# -- DukeMTMC-VideoReID --------------------------------------------------------------------------------

def test_dukevideo(tmp_path):
    root = tmp_path / "DukeMTMC-VideoReID"
    # Frame names out of lexical order of their X part; one track in the old naming.
    for frame, x in ((2, 30823), (1, 99999), (10, 11)):
        touch(root / "train" / "0001" / "0001" / f"0001_C6_F{frame:04d}_X{x:05d}.jpg")
    touch(root / "train" / "0001" / "0002" / "0001_C2_F0001_X00001.jpg")
    touch(root / "train" / "0023" / "0001" / "0023C1F0005X00100.jpg")
    touch(root / "train" / "0023" / "0001" / "0023C1F0004X00200.jpg")
    touch(root / "query" / "0100" / "0003" / "0100_C1_F0001_X00001.jpg")
    touch(root / "gallery" / "0100" / "0001" / "0100_C3_F0001_X00001.jpg")
    touch(root / "gallery" / "0100" / "0002" / "0100_C1_F0007_X00001.jpg")
    touch(root / "gallery" / "0200" / "0001" / "0200_C8_F0001_X00001.jpg")
    ds = load_dataset("dukevideo", tmp_path)
    assert as_set(ds.train) == {
        (1, 5, ("0001_C6_F0001_X99999.jpg", "0001_C6_F0002_X30823.jpg", "0001_C6_F0010_X00011.jpg")),
        (1, 1, ("0001_C2_F0001_X00001.jpg",)), (23, 0, ("0023C1F0004X00200.jpg", "0023C1F0005X00100.jpg"))}
    assert {t.tracklet_id for t in ds.train} == {"0001/0001", "0001/0002", "0023/0001"}
    assert as_set(ds.query) == {(100, 0, ("0100_C1_F0001_X00001.jpg",))}
    assert {(t.pid, t.camera) for t in ds.gallery} == {(100, 2), (100, 0), (200, 7)}
    assert len(load_dataset("dukevideo", tmp_path, min_frames=2).train) == 2
    touch(root / "train" / "0001" / "0002" / "0001_C3_F0002_X00001.jpg")
    with pytest.raises(ValueError, match="mixes cameras"):
        load_dataset("dukevideo", tmp_path)
