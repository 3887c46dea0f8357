"""Standard re-id datasets read from disk in their official layouts (nothing is downloaded).

:func:`load_dataset` parses what is on disk into a :class:`~fastassoc.data.TrackletDataset`.
``root`` is the folder holding the dataset's own top-level entries; the folder the
official archive extracts to (named in brackets below) is accepted one level down too.
A missing root, folder or list file raises :class:`FileNotFoundError` naming the path.

Video datasets (one tracklet per track, frames in time order):

``mars`` [``MARS``]
    ``bbox_train/PPPP/PPPPCcTttttFfff.jpg``, ``bbox_test/...``, ``info/train_name.txt``,
    ``info/test_name.txt``, ``info/tracks_train_info.mat`` (``track_train_info``),
    ``info/tracks_test_info.mat`` (``track_test_info``), rows ``start, end, pid, camid``
    (1-based, inclusive rows of the name list), and ``info/query_IDX.mat`` (``query_IDX``,
    1-based rows of the test tracks). Query = the ``query_IDX`` tracks. ``protocol="official"``
    (default, the MARS authors' evaluation code): the gallery is every test track, the queries'
    own tracks included, and a query's same-identity same-camera tracks (its own among them)
    are junk, which :func:`fastassoc.evaluate_ranking` removes from its ranking.
    ``protocol="torchreid"``: the gallery is every test track not in ``query_IDX`` (torchreid's
    and most PyTorch code's convention; a query's same-identity tracks of other queries are then
    missing from its gallery). pid 0: distractors, kept; pid -1: junk, kept only with
    ``keep_junk=True`` (junk for every query either way). The dataset's ``protocol`` attribute
    says which was used.
``prid2011`` [``prid_2011``]
    ``multi_shot/cam_a|cam_b/person_NNNN/NNNN.png``. Only the first 200 person folders of each
    camera show the same people; the protocol keeps those seen in both cameras with more than
    27 frames in each (``min_frames=28``: 178 persons; here ``min_frames`` selects persons, test
    ones included), shuffles them with ``split`` as seed and trains on the first half.
    Query = the test persons' ``cam_a`` tracklets, gallery = their ``cam_b`` tracklets.
``ilidsvid`` [``i-LIDS-VID``]
    ``sequences/cam1|cam2/personNNN/cam1_personNNN_FFFFF.png``; persons in both cameras, halves
    split with ``split`` as seed; query ``cam1``, gallery ``cam2``.
``dukevideo`` [``DukeMTMC-VideoReID``]
    ``train/ query/ gallery/`` as ``PPPP/TTTT/PPPP_Cc_Fffff_Xxxxxx.jpg`` (the old names
    ``PPPPCcFffffXxxxxx.jpg`` too); frames ordered by ``F``.

Image datasets, where every training image of one person in one camera forms one training
tracklet (as UTAL, UGA and EEA do) and every query / gallery image is a one-frame tracklet
(the official single-image protocol):

``market1501`` [``Market-1501-v15.09.15``]
    ``bounding_box_train/ bounding_box_test/ query/`` named ``PPPP_cCsS_FFFFFF_NN.jpg``;
    gallery pid 0000 are distractors (kept), pid -1 junk (kept only with ``keep_junk=True``).
``dukemtmc`` [``DukeMTMC-reID``]
    ``bounding_box_train/ bounding_box_test/ query/`` named ``PPPP_cC_fFFFFFFF.jpg``.
``msmt17`` [``MSMT17_V1`` or ``MSMT17_V2``]
    ``train/ test/`` (V2: ``mask_train_v2/ mask_test_v2/``) and ``list_train.txt``,
    ``list_val.txt``, ``list_query.txt``, ``list_gallery.txt`` with lines
    ``PPPP/PPPP_NNN_CC_..._N.jpg label``; the camera is the third ``_`` field. Training uses
    train + val (1,041 identities) unless ``include_val=False``. Train and test labels are the
    lists' own, separate label spaces.

Options every loader takes: ``tracklets="all"`` (UTAL, DAL, TSSL) or ``"one_per_camera"`` (one
randomly chosen training tracklet per identity per camera, seeded by ``sampling_seed``: the
sparse sampling UGA and EEA assume; a no-op for image datasets). Video datasets also take
``min_frames`` (drop shorter *training* tracklets). PRID2011 and iLIDS-VID take ``split`` (a
seed of the random halves) or ``split_file`` (a JSON file of canonical splits, below).

Validation when the index loads: every frame a list file names (MARS, MSMT17) must exist; the
error gives how many are missing and the first paths (other layouts list their folders, so
their files exist). A ``.mat`` file that cannot be read, and later an image that cannot be
decoded, raise an error naming the file.

Split files (PRID2011, iLIDS-VID)
    JSON: a list of splits, each ``{"train": [person numbers], "test": [person numbers]}``
    (the layout of the files distributed with the iLIDS-VID / PRID2011 protocols, and of
    torchreid's ``splits_*.json`` with ``"train"`` / ``"test"`` lists of person numbers);
    ``split`` then picks the entry. Persons must be ones the dataset holds.
"""
from __future__ import annotations

import inspect
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np

from .tracklets import Tracklet, TrackletDataset, select_train_tracklets

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


# -- paths --------------------------------------------------------------------------------------------

def _locate(name: str, root: str | os.PathLike, entry: str, wrappers: tuple[str, ...]) -> Path:
    """The folder holding ``entry``: ``root`` itself or ``root/<wrapper>`` for the official archive folder."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{name}: dataset root {root} does not exist (or is not a folder)")
    for candidate in (root, *(root / wrapper for wrapper in wrappers)):
        if (candidate / entry).exists():
            return candidate
    raise FileNotFoundError(f"{name}: expected {root / entry} (the dataset's '{entry}' entry) under root {root}")


def _require_dir(name: str, path: Path) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{name}: missing folder {path}")
    return path


def _require_file(name: str, path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{name}: missing file {path}")
    return path


def _images(folder: Path) -> list[str]:
    """Sorted image file names directly inside ``folder``."""
    return sorted(entry.name for entry in os.scandir(folder)
                  if entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES))


def _subfolders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


def _split_persons(persons: list[int], split: int) -> tuple[list[int], list[int]]:
    """Seeded halves: shuffle the sorted persons with ``split`` as seed; train = first floor(n/2)."""
    if not isinstance(split, (int, np.integer)) or split < 0:
        raise ValueError(f"split must be an integer >= 0, got {split!r}")
    ordered = sorted(persons)
    shuffled = [ordered[i] for i in np.random.default_rng(int(split)).permutation(len(ordered))]
    half = len(shuffled) // 2
    return sorted(shuffled[:half]), sorted(shuffled[half:])


def _min_frames(tracklets: list[Tracklet], min_frames: int) -> list[Tracklet]:
    if not isinstance(min_frames, (int, np.integer)) or min_frames < 0:
        raise ValueError(f"min_frames must be an integer >= 0, got {min_frames!r}")
    return [t for t in tracklets if len(t) >= min_frames]


# -- video datasets -----------------------------------------------------------------------------------

def _read_lines(name: str, path: Path) -> list[str]:
    with open(_require_file(name, path)) as handle:
        return [line.strip() for line in handle if line.strip()]


def _load_mat(name: str, path: Path, key: str) -> np.ndarray:
    from scipy.io import loadmat

    try:
        content = loadmat(str(_require_file(name, path)))
    except FileNotFoundError:
        raise
    except Exception as error:   # scipy raises ValueError / MatReadError / OSError... for damaged files
        raise ValueError(f"{name}: cannot read {path}: {error}") from error
    if key not in content:
        keys = [k for k in content if not k.startswith("__")]
        if len(keys) != 1:
            raise KeyError(f"{name}: {path} has no variable {key!r} (found {keys})")
        key = keys[0]
    return np.asarray(content[key])


def _mars_tracks(root: Path, folder: str, names: list[str], meta: np.ndarray, info_path: Path
                 ) -> list[Tracklet]:
    if meta.ndim != 2 or meta.shape[1] < 4:
        raise ValueError(f"mars: {info_path} must hold an N x 4 array (start, end, pid, camid), got {meta.shape}")
    tracklets = []
    for row, (start, end, pid, camid) in enumerate(meta[:, :4].astype(np.int64).tolist()):
        if not 1 <= start <= end <= len(names):
            raise ValueError(f"mars: {info_path} row {row} spans names {start}..{end}, "
                             f"outside 1..{len(names)} of the name list")
        frames = names[start - 1:end]
        # Frame names carry pid (4 chars, '00-1' for junk) and camera: catch a list/info mismatch early.
        pid_text = "00-1" if pid == -1 else f"{pid:04d}"
        bad = [f for f in frames if f[:4] != pid_text or f[5:6] != str(camid)]
        if bad:
            raise ValueError(f"mars: {info_path} row {row} (pid {pid}, camera {camid}) lists frame {bad[0]!r} "
                             "of another person or camera")
        tracklets.append(Tracklet(frames=tuple(str(root / folder / f[:4] / f) for f in frames),
                                  camera=camid - 1, pid=pid, tracklet_id=frames[0][:11]))
    return tracklets


MARS_PROTOCOLS = ("official", "torchreid")


def check_frames_exist(name: str, tracklets, *, shown: int = 5) -> None:
    """Raise :class:`FileNotFoundError` when frames of ``tracklets`` are missing on disk: how many,
    of how many, and the first ``shown`` paths. One directory listing per folder, not one
    ``stat`` per frame."""
    by_folder: dict[str, list[str]] = {}
    for tracklet in tracklets:
        for frame in tracklet.frames:
            by_folder.setdefault(os.path.dirname(frame), []).append(frame)
    missing, total = [], 0
    for folder, frames in by_folder.items():
        total += len(frames)
        try:
            present = {entry.name for entry in os.scandir(folder) if entry.is_file()}
        except (FileNotFoundError, NotADirectoryError):
            present = set()
        missing += [frame for frame in frames if os.path.basename(frame) not in present]
    if missing:
        raise FileNotFoundError(f"{name}: {len(missing)} of {total} frame files the lists name are missing, e.g. "
                                + ", ".join(missing[:shown]))


def load_mars(root, *, tracklets: str = "all", sampling_seed: int = 0, min_frames: int = 0,
              keep_junk: bool = False, protocol: str = "official") -> TrackletDataset:
    """MARS (1,261 identities, 6 cameras, 20,478 tracklets); see the module docstring."""
    if protocol not in MARS_PROTOCOLS:
        raise ValueError(f"protocol must be one of {MARS_PROTOCOLS}, got {protocol!r}")
    base = _locate("mars", root, "info", ("MARS", "mars"))
    info = base / "info"
    for folder in ("bbox_train", "bbox_test"):
        _require_dir("mars", base / folder)
    train_names = _read_lines("mars", info / "train_name.txt")
    test_names = _read_lines("mars", info / "test_name.txt")
    train_meta = _load_mat("mars", info / "tracks_train_info.mat", "track_train_info")
    test_meta = _load_mat("mars", info / "tracks_test_info.mat", "track_test_info")
    query_rows = _load_mat("mars", info / "query_IDX.mat", "query_IDX").astype(np.int64).ravel() - 1
    train = _mars_tracks(base, "bbox_train", train_names, train_meta, info / "tracks_train_info.mat")
    test = _mars_tracks(base, "bbox_test", test_names, test_meta, info / "tracks_test_info.mat")
    if query_rows.size and (query_rows.min() < 0 or query_rows.max() >= len(test)):
        raise ValueError(f"mars: {info / 'query_IDX.mat'} indexes tracks outside 1..{len(test)}")
    check_frames_exist("mars", train + test)
    is_query = np.zeros(len(test), dtype=bool)
    is_query[query_rows] = True
    query = [test[i] for i in dict.fromkeys(query_rows.tolist())]  # query_IDX order, duplicates once
    # official: all test tracks (a query's own track is same-id same-camera junk for it); torchreid: the rest.
    gallery = list(test) if protocol == "official" else [t for t, q in zip(test, is_query) if not q]
    if not keep_junk:
        query = [t for t in query if t.pid != -1]
        gallery = [t for t in gallery if t.pid != -1]
    train = _min_frames([t for t in train if t.pid >= 0], min_frames)
    return TrackletDataset("mars", select_train_tracklets(train, tracklets, sampling_seed), query, gallery,
                           protocol=f"mars-{protocol}")


def _person_sequences(name: str, camera_dir: Path, pattern: str) -> dict[int, tuple[str, ...]]:
    """{person number: sorted frame paths} for the person folders of one camera."""
    sequences = {}
    for folder in _subfolders(_require_dir(name, camera_dir)):
        match = re.fullmatch(pattern, folder)
        if match:
            sequences[int(match.group(1))] = tuple(str(camera_dir / folder / f) for f in _images(camera_dir / folder))
    return sequences


def _person_number(name: str, path: Path, value) -> int:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    match = re.search(r"(\d+)\s*$", str(value))
    if match is None:
        raise ValueError(f"{name}: split file {path} lists {value!r}, neither a person number nor a person folder name")
    return int(match.group(1))


def read_split_file(name: str, path: str | os.PathLike, split: int, persons: list[int]
                    ) -> tuple[list[int], list[int]]:
    """Train and test persons of entry ``split`` of a JSON split file (module docstring)."""
    import json

    path = _require_file(name, Path(path).expanduser())
    try:
        splits = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{name}: cannot read split file {path}: {error}") from error
    if isinstance(splits, dict):
        splits = [splits]
    if not isinstance(splits, list) or not all(isinstance(s, dict) and {"train", "test"} <= set(s) for s in splits):
        raise ValueError(f"{name}: split file {path} must hold a list of {{'train': [...], 'test': [...]}} entries")
    if not isinstance(split, (int, np.integer)) or not 0 <= split < len(splits):
        raise ValueError(f"split must be an integer in [0, {len(splits)}) for {path}, got {split!r}")
    train = sorted({_person_number(name, path, v) for v in splits[split]["train"]})
    test = sorted({_person_number(name, path, v) for v in splits[split]["test"]})
    overlap = sorted(set(train) & set(test))
    if overlap:
        raise ValueError(f"{name}: split {split} of {path} puts persons {overlap[:5]} in both train and test")
    unknown = sorted(set(train + test) - set(persons))
    if unknown:
        raise ValueError(f"{name}: split {split} of {path} names {len(unknown)} persons this dataset does not hold "
                         f"(in both cameras, long enough), e.g. {unknown[:5]}")
    return train, test


def _two_camera_dataset(name: str, cameras: list[dict[int, tuple[str, ...]]], persons: list[int], split: int,
                        id_format: str, tracklets: str, sampling_seed: int, min_frames: int,
                        split_file: str | os.PathLike | None = None) -> TrackletDataset:
    if split_file is not None:
        train_persons, test_persons = read_split_file(name, split_file, split, persons)
        protocol = f"split {split} of {split_file}"
    else:
        train_persons, test_persons = _split_persons(persons, split)
        protocol = f"random split {split} (seeded halves)"

    def tracklet(person: int, camera: int) -> Tracklet:
        return Tracklet(frames=cameras[camera][person], camera=camera, pid=person,
                        tracklet_id=id_format.format(camera=camera + 1, person=person))

    train = _min_frames([tracklet(p, c) for p in train_persons for c in (0, 1)], min_frames)
    query = [tracklet(p, 0) for p in test_persons]
    gallery = [tracklet(p, 1) for p in test_persons]
    return TrackletDataset(name, select_train_tracklets(train, tracklets, sampling_seed), query, gallery,
                           protocol=protocol)


PRID_SHARED_PERSONS = 200  # person_0001..person_0200 are the same people in cam_a and cam_b


def load_prid2011(root, *, split: int = 0, min_frames: int = 28, tracklets: str = "all",
                  sampling_seed: int = 0, split_file: str | os.PathLike | None = None) -> TrackletDataset:
    """PRID2011 multi-shot (178 persons of the protocol, 2 cameras); see the module docstring.

    ``min_frames`` selects the protocol's persons (both tracklets at least that long), so unlike
    the other loaders it applies to test persons as well.
    """
    base = _locate("prid2011", root, "multi_shot", ("prid_2011", "prid2011"))
    cameras = [_person_sequences("prid2011", base / "multi_shot" / cam, r"person_(\d+)") for cam in ("cam_a", "cam_b")]
    persons = [p for p in sorted(set(cameras[0]) & set(cameras[1]))
               if p <= PRID_SHARED_PERSONS and min(len(cameras[0][p]), len(cameras[1][p])) >= min_frames]
    return _two_camera_dataset("prid2011", cameras, persons, split, "cam{camera}_person_{person:04d}", tracklets,
                               sampling_seed, 0, split_file)


def load_ilidsvid(root, *, split: int = 0, tracklets: str = "all", sampling_seed: int = 0,
                  min_frames: int = 0, split_file: str | os.PathLike | None = None) -> TrackletDataset:
    """iLIDS-VID (300 persons, 2 cameras); see the module docstring."""
    base = _locate("ilidsvid", root, "sequences", ("i-LIDS-VID", "iLIDS-VID"))
    cameras = [_person_sequences("ilidsvid", base / "sequences" / cam, r"person(\d+)") for cam in ("cam1", "cam2")]
    persons = sorted(set(cameras[0]) & set(cameras[1]))
    return _two_camera_dataset("ilidsvid", cameras, persons, split, "cam{camera}_person{person:03d}", tracklets,
                               sampling_seed, min_frames, split_file)


_DUKE_VIDEO_NAME = re.compile(r"(-?\d+)_?C(\d+)_?F(\d+)")


def _dukevideo_split(base: Path, folder: str) -> list[Tracklet]:
    split_dir = _require_dir("dukevideo", base / folder)
    tracklets = []
    for pid_name in _subfolders(split_dir):
        if not re.fullmatch(r"-?\d+", pid_name):
            continue
        for track_name in _subfolders(split_dir / pid_name):
            frames = []
            for image in _images(split_dir / pid_name / track_name):
                match = _DUKE_VIDEO_NAME.match(image)
                if match is None:
                    raise ValueError(f"dukevideo: {split_dir / pid_name / track_name / image} does not follow "
                                     "PPPP_Cc_Fffff_X....jpg")
                frames.append((int(match.group(3)), int(match.group(2)), image))
            if not frames:
                continue
            frames.sort()
            cameras = {camera for _, camera, _ in frames}
            if len(cameras) != 1:
                raise ValueError(f"dukevideo: track {split_dir / pid_name / track_name} mixes cameras "
                                 f"{sorted(cameras)}")
            tracklets.append(Tracklet(
                frames=tuple(str(split_dir / pid_name / track_name / image) for _, _, image in frames),
                camera=cameras.pop() - 1, pid=int(pid_name), tracklet_id=f"{pid_name}/{track_name}"))
    return tracklets


def load_dukevideo(root, *, tracklets: str = "all", sampling_seed: int = 0, min_frames: int = 0
                   ) -> TrackletDataset:
    """DukeMTMC-VideoReID (702 train / 702 test identities + 408 distractors, 8 cameras)."""
    base = _locate("dukevideo", root, "train", ("DukeMTMC-VideoReID",))
    train = _min_frames(_dukevideo_split(base, "train"), min_frames)
    return TrackletDataset("dukevideo", select_train_tracklets(train, tracklets, sampling_seed),
                           _dukevideo_split(base, "query"), _dukevideo_split(base, "gallery"))


# -- image datasets -----------------------------------------------------------------------------------

_MARKET_NAME = re.compile(r"(-?\d+)_c(\d+)")


def _parse_images(name: str, folder: Path) -> list[tuple[str, int, int]]:
    """(path, pid, camera 0-based) of every image in a Market-1501 style folder, sorted by name."""
    records = []
    for image in _images(_require_dir(name, folder)):
        match = _MARKET_NAME.match(image)
        if match is None:
            raise ValueError(f"{name}: {folder / image} does not follow PPPP_cC..., the dataset's naming")
        records.append((str(folder / image), int(match.group(1)), int(match.group(2)) - 1))
    return records


def _camera_tracklets(records: list[tuple[str, int, int]]) -> list[Tracklet]:
    """Every image of one person in one camera forms one training tracklet (junk dropped)."""
    groups: dict[tuple[int, int], list[str]] = {}
    for path, pid, camera in records:
        if pid >= 0:
            groups.setdefault((pid, camera), []).append(path)
    return [Tracklet(frames=tuple(paths), camera=camera, pid=pid, tracklet_id=f"{pid:04d}_c{camera + 1}")
            for (pid, camera), paths in sorted(groups.items())]


def _image_tracklets(records: list[tuple[str, int, int]], keep_junk: bool) -> list[Tracklet]:
    """One single-frame tracklet per query / gallery image."""
    return [Tracklet(frames=(path,), camera=camera, pid=pid, tracklet_id=Path(path).stem)
            for path, pid, camera in records if keep_junk or pid != -1]


def _load_market_style(name: str, root, wrappers: tuple[str, ...], tracklets: str, sampling_seed: int,
                       keep_junk: bool) -> TrackletDataset:
    base = _locate(name, root, "bounding_box_train", wrappers)
    train = _camera_tracklets(_parse_images(name, base / "bounding_box_train"))
    query = _image_tracklets(_parse_images(name, base / "query"), keep_junk)
    gallery = _image_tracklets(_parse_images(name, base / "bounding_box_test"), keep_junk)
    return TrackletDataset(name, select_train_tracklets(train, tracklets, sampling_seed), query, gallery)


def load_market1501(root, *, tracklets: str = "all", sampling_seed: int = 0, keep_junk: bool = False
                    ) -> TrackletDataset:
    """Market-1501 (751 train / 750 test identities, 6 cameras); see the module docstring."""
    return _load_market_style("market1501", root, ("Market-1501-v15.09.15", "Market-1501", "market1501"),
                              tracklets, sampling_seed, keep_junk)


def load_dukemtmc(root, *, tracklets: str = "all", sampling_seed: int = 0, keep_junk: bool = False
                  ) -> TrackletDataset:
    """DukeMTMC-reID (702 train / 1,110 test identities, 8 cameras); see the module docstring."""
    return _load_market_style("dukemtmc", root, ("DukeMTMC-reID", "dukemtmc-reid"), tracklets, sampling_seed,
                              keep_junk)


def _msmt_list(base: Path, image_dir: Path, list_name: str) -> list[tuple[str, int, int]]:
    records = []
    for number, line in enumerate(_read_lines("msmt17", base / list_name), start=1):
        parts = line.split()
        fields = Path(parts[0]).name.split("_") if parts else []
        if len(parts) != 2 or len(fields) < 3 or not fields[2].isdigit():
            raise ValueError(f"msmt17: {base / list_name} line {number} is not 'PPPP/PPPP_NNN_CC_..._N.jpg label': "
                             f"{line!r}")
        records.append((str(image_dir / parts[0]), int(parts[1]), int(fields[2]) - 1))
    return records


def load_msmt17(root, *, include_val: bool = True, tracklets: str = "all", sampling_seed: int = 0
                ) -> TrackletDataset:
    """MSMT17 V1 or V2 (1,041 train / 3,060 test identities, 15 cameras); see the module docstring."""
    base = _locate("msmt17", root, "list_train.txt", ("MSMT17_V1", "MSMT17_V2", "MSMT17"))
    train_dir, test_dir = ("train", "test") if (base / "train").is_dir() else ("mask_train_v2", "mask_test_v2")
    train_dir, test_dir = _require_dir("msmt17", base / train_dir), _require_dir("msmt17", base / test_dir)
    records = _msmt_list(base, train_dir, "list_train.txt")
    if include_val:
        records += _msmt_list(base, train_dir, "list_val.txt")
    train = _camera_tracklets(records)
    query = _image_tracklets(_msmt_list(base, test_dir, "list_query.txt"), True)
    gallery = _image_tracklets(_msmt_list(base, test_dir, "list_gallery.txt"), True)
    check_frames_exist("msmt17", train + query + gallery)
    return TrackletDataset("msmt17", select_train_tracklets(train, tracklets, sampling_seed), query, gallery)


# -- entry point --------------------------------------------------------------------------------------

LOADERS: dict[str, Callable[..., TrackletDataset]] = {
    "mars": load_mars, "prid2011": load_prid2011, "ilidsvid": load_ilidsvid, "dukevideo": load_dukevideo,
    "market1501": load_market1501, "dukemtmc": load_dukemtmc, "msmt17": load_msmt17,
}
DATASETS = tuple(LOADERS)
_ALIASES = {"market": "market1501", "dukemtmcreid": "dukemtmc", "duke": "dukemtmc",
            "dukemtmcvideoreid": "dukevideo", "prid": "prid2011", "ilids": "ilidsvid", "msmt": "msmt17"}


def load_dataset(name: str, root: str | os.PathLike, **options) -> TrackletDataset:
    """Read a standard re-id dataset from ``root`` in its official layout.

    Parameters
    ----------
    name : str
        One of ``DATASETS``: ``"mars"``, ``"prid2011"``, ``"ilidsvid"``, ``"dukevideo"``,
        ``"market1501"``, ``"dukemtmc"``, ``"msmt17"`` (case, ``-`` and ``_`` ignored).
    root : path
        Folder holding the dataset's top-level entries (e.g. ``bounding_box_train/`` for
        Market-1501), or the folder holding the official archive's folder.
    **options
        ``tracklets`` (``"all"`` | ``"one_per_camera"``) and ``sampling_seed`` for every
        dataset; ``min_frames`` for video datasets; ``split`` and ``split_file`` for prid2011 /
        ilidsvid; ``keep_junk`` for mars / market1501 / dukemtmc; ``protocol`` for mars;
        ``include_val`` for msmt17. See the
        module docstring for what each layout expects and how query / gallery are built.

    Returns
    -------
    TrackletDataset

    Raises
    ------
    FileNotFoundError
        Missing root, folder or list file (the message names the path).
    ValueError
        Unknown dataset name or a file that does not follow the dataset's naming.
    TypeError
        An option the dataset does not take.
    """
    key = re.sub(r"[-_\s]", "", str(name).lower())
    key = _ALIASES.get(key, key)
    if key not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    loader = LOADERS[key]
    accepted = [p for p in inspect.signature(loader).parameters if p != "root"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"load_dataset({key!r}) got unknown option(s) {unknown}; it takes {accepted}")
    return loader(root, **options)
