"""A synthetic tracklet world with ground truth: person-like frames rendered with NumPy.

Generation is deterministic from ``seed`` and vectorised (frames are drawn camera by camera in
chunks of whole arrays: a label map of body parts, then one colour lookup, then the camera), so
the default world (60 + 60 identities, 5 cameras, about 600 tracklets and 5,300 frames) takes
about 1 s of CPU time at 64 x 32 and 4-5 s at 128 x 64. Frames are kept in memory
(``pixels``, uint8) under string keys.

What carries identity, what does not
------------------------------------
Identity lives in the clothes: skin tone, hair colour and length, an optional hat, torso
colour + second colour + pattern (solid, horizontal / vertical stripes, checks, a front logo,
two-tone, open jacket over a shirt), sleeve length, trousers / shorts / skirt colour, shoes,
and accessories that some viewpoints hide (a backpack seen from behind and the side, only its
straps from the front; a shoulder bag on one side of the body, hidden in the side view facing
away; the logo and the open jacket only seen from the front; hair seen whole from behind, long
hair covering the upper back).
Everything else belongs to the camera or the frame: each camera has its own scene
(wall / floor colours, horizon, tiles, fixtures: the background of the crops, panned as the
person walks), colour response (a 3 x 3 channel mix plus offset, then gamma), illumination
(gain and a linear gradient), blur, sensor noise, person scale and vertical placement, and its
own mix of viewpoints (front / back / side). Frames jitter in position and scale, legs and arms
swing with a walking phase, one frame in ten turns to another viewpoint, and some frames are
occluded by a box or a pole in the camera's colours.

Identities visit a random subset of ``cameras_per_id`` cameras (camera popularity differs, as
in MARS). Each (identity, camera) visit is one trajectory that fragments into
``1 + min(Poisson(fragment_rate), max_fragments - 1)`` tracklets; the fragments share the
trajectory's viewpoint and walking direction and each starts elsewhere in the scene. Train and
test identities are disjoint (pids ``0 .. num_train_ids - 1`` train, the next ``num_test_ids``
test, then ``num_distractors`` gallery-only distractors seen in one camera each).
Query / gallery as in MARS: one query tracklet (a random fragment) per test identity per camera
it visits, except in one random camera per identity whose tracklets all stay in the gallery, so
that every query has a true match in another camera even when visits do not fragment; the
gallery holds every other test tracklet and the distractors. The evaluation treats the query
identity's other tracklets in the query's camera as junk.

Difficulty, measured
--------------------
Raw pixels fail across cameras because each camera's scene and colour response dominate them:
:func:`fastassoc.evaluate_ranking` (reference backend, metric euclidean) on flattened mean
frames (:meth:`SyntheticTracklets.mean_frames`), default arguments, mean over seeds 0-4 (about
120 queries and 150 gallery tracklets per seed):

===============  ===========  =======  =======
camera_strength  image_size   rank-1   mAP
===============  ===========  =======  =======
1 (default)      (64, 32)     1.3 %    6.3 %
1 (default)      (128, 64)    1.2 %    6.4 %
0 (no cameras)   (64, 32)     84.7 %   85.5 %
0.5              (64, 32)     31.6 %   38.3 %
1.5              (64, 32)     0.0 %    3.2 %
===============  ===========  =======  =======

Rank-1 at the default is chance level (about 1.5 %): the nearest raw-pixel neighbours of a
query are other people in its own camera. Identity is still learnable from the clothes: a
small CNN (four conv-BN-ReLU-pool blocks of 16-128 channels, about 120k parameters) trained with
identity labels on the training split (12 epochs, flip + pad-crop, 2 CPU minutes) reaches
57.5 % rank-1 / 64.3 % mAP on the test split of seed 0 at 64 x 32.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .tracklets import TRACKLET_MODES, Tracklet, TrackletDataset, select_train_tracklets

# Clothing palette (RGB in [0, 1]); identities perturb these slightly.
_CLOTHES = np.array([
    [0.08, 0.08, 0.09], [0.92, 0.92, 0.90], [0.50, 0.50, 0.52], [0.10, 0.14, 0.38], [0.15, 0.35, 0.80],
    [0.55, 0.75, 0.92], [0.80, 0.10, 0.12], [0.45, 0.06, 0.10], [0.12, 0.55, 0.22], [0.42, 0.45, 0.15],
    [0.95, 0.82, 0.15], [0.95, 0.50, 0.10], [0.95, 0.55, 0.70], [0.45, 0.20, 0.60], [0.45, 0.28, 0.14],
    [0.85, 0.75, 0.55], [0.10, 0.55, 0.55], [0.70, 0.70, 0.72],
], dtype=np.float32)
_SKIN = np.array([[0.96, 0.80, 0.69], [0.88, 0.67, 0.52], [0.72, 0.52, 0.38], [0.50, 0.34, 0.24],
                  [0.33, 0.22, 0.16]], dtype=np.float32)
_HAIR = np.array([[0.06, 0.05, 0.05], [0.28, 0.18, 0.10], [0.55, 0.38, 0.20], [0.85, 0.72, 0.45],
                  [0.60, 0.60, 0.60], [0.55, 0.15, 0.08]], dtype=np.float32)

FRONT, BACK, SIDE = 0, 1, 2
_PATTERNS = 7  # solid, h-stripes, v-stripes, checks, front logo, two-tone, open jacket
_CHUNK_PIXELS = 2**19  # pixels rendered at once: keeps the working arrays in cache
_NOISE_FIELDS = 64  # noise fields per camera


@dataclass(frozen=True)
class _Frames:
    """Per-frame parameters of the whole world (arrays of length num_frames)."""

    identity: np.ndarray
    camera: np.ndarray
    view: np.ndarray       # FRONT / BACK / SIDE
    facing: np.ndarray     # +1 / -1: which way a side view faces (mirrors the body)
    shift_x: np.ndarray    # person centre offset, fraction of image width
    shift_y: np.ndarray    # fraction of image height
    scale: np.ndarray      # multiplicative jitter of the person height
    phase: np.ndarray      # walking phase, radians
    pan_x: np.ndarray      # background crop offset, fraction of the extra canvas width
    pan_y: np.ndarray
    occluder: np.ndarray   # 0 none, 1 box from below, 2 pole
    occ_a: np.ndarray      # box: top edge (fraction of H); pole: left edge (fraction of W)
    occ_b: np.ndarray      # box: left edge; pole: width (fractions of W)
    occ_c: np.ndarray      # box: right edge (fraction of W)


class SyntheticTracklets(TrackletDataset):
    """A deterministic synthetic tracklet world with train / query / gallery splits.

    Frames live in memory (``pixels``, uint8 [F, H, W, 3]) and are addressed by string keys
    such as ``"0012C3T0002F005"`` (pid 12, camera 3 counted from 1, tracklet 2 of that visit,
    frame 5); :meth:`load_frame` returns them as PIL images.

    Parameters
    ----------
    num_train_ids, num_test_ids : int
        Identities of the training split and of the test split (disjoint).
    num_cameras : int >= 2
    image_size : (int, int)
        (height, width) of the frames; (64, 32) and (128, 64) are the tuned sizes. The same
        seed gives the same world at every size.
    cameras_per_id : (int, int)
        Inclusive range of the number of cameras an identity visits (clipped to num_cameras;
        at least 2 for test identities so every query has a true match).
    fragment_rate : float >= 0
        Mean number of extra tracklets one (identity, camera) trajectory breaks into
        (Poisson); 0 gives exactly one tracklet per identity per camera.
    max_fragments : int >= 1
        Cap on the tracklets of one trajectory.
    frames_per_tracklet : (int, int)
        Inclusive range of tracklet lengths.
    occlusion_rate : float in [0, 1]
        Probability that a frame is partly occluded.
    num_distractors : int
        Extra gallery-only identities, each seen in one camera.
    camera_strength : float >= 0
        Scales every camera effect (colour response, illumination, blur, noise, scene colours
        and contrast); 1 is the tuned default, 0 gives identical neutral grey cameras (raw
        pixels then find the identity: see the module docstring for rank-1 per strength).
    tracklets : {"all", "one_per_camera"}
        Training tracklets: all, or one random tracklet per identity per camera (the sparse
        sampling of UGA / EEA), chosen with ``sampling_seed``.
    sampling_seed : int
    seed : int
        Seeds everything else.

    Attributes
    ----------
    train, query, gallery : tuple of Tracklet
    pixels : ndarray [F, H, W, 3], uint8
        Every frame; ``frame_index[key]`` is a frame's row.
    frame_index : dict str -> int
    identity_cameras : dict int -> tuple of int
        Cameras each identity visits (ground truth, for diagnostics).
    """

    def __init__(self, num_train_ids: int = 60, num_test_ids: int = 60, num_cameras: int = 5, *,
                 image_size: tuple[int, int] = (64, 32), cameras_per_id: tuple[int, int] = (2, 4),
                 fragment_rate: float = 0.5, max_fragments: int = 4, frames_per_tracklet: tuple[int, int] = (6, 12),
                 occlusion_rate: float = 0.15, num_distractors: int = 0, camera_strength: float = 1.0,
                 tracklets: str = "all", sampling_seed: int = 0, seed: int = 0):
        _check_args(num_train_ids, num_test_ids, num_cameras, image_size, cameras_per_id, fragment_rate,
                    max_fragments, frames_per_tracklet, occlusion_rate, num_distractors, camera_strength)
        if tracklets not in TRACKLET_MODES:
            raise ValueError(f"tracklets must be one of {TRACKLET_MODES}, got {tracklets!r}")
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.seed = seed
        streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(6)]
        id_rng, camera_rng, visit_rng, frame_rng, render_rng, query_rng = streams
        num_ids = num_train_ids + num_test_ids + num_distractors
        self._identities = _draw_identities(id_rng, num_ids)
        self._cameras = _draw_cameras(camera_rng, num_cameras, camera_strength)

        # Visits: identity -> cameras; camera popularity differs as in MARS.
        popularity = visit_rng.uniform(0.4, 1.6, num_cameras)
        low, high = min(cameras_per_id[0], num_cameras), min(cameras_per_id[1], num_cameras)
        self.identity_cameras: dict[int, tuple[int, ...]] = {}
        for pid in range(num_ids):
            if pid >= num_train_ids + num_test_ids:
                count = 1
            else:
                count = int(visit_rng.integers(max(low, 2 if pid >= num_train_ids else 1), high + 1))
            chosen = visit_rng.choice(num_cameras, size=count, replace=False, p=popularity / popularity.sum())
            self.identity_cameras[pid] = tuple(sorted(int(c) for c in chosen))

        # Tracklets: each visit (one trajectory) fragments into tracklets.
        records = []  # (pid, camera, fragment, num_frames)
        for pid in range(num_ids):
            for camera in self.identity_cameras[pid]:
                fragments = 1 + min(int(visit_rng.poisson(fragment_rate)), max_fragments - 1)
                for fragment in range(fragments):
                    length = int(visit_rng.integers(frames_per_tracklet[0], frames_per_tracklet[1] + 1))
                    records.append((pid, camera, fragment, length))
        self._frames = _draw_frames(frame_rng, records, self._cameras, occlusion_rate)

        all_tracklets, keys = [], []
        for pid, camera, fragment, length in records:
            tracklet_id = f"{pid:04d}C{camera + 1}T{fragment + 1:04d}"
            frames = tuple(f"{tracklet_id}F{j + 1:03d}" for j in range(length))
            keys.extend(frames)
            all_tracklets.append(Tracklet(frames=frames, camera=camera, pid=pid, tracklet_id=tracklet_id))
        self.frame_index = {key: row for row, key in enumerate(keys)}
        self.pixels = _render(render_rng, self._frames, self._identities, self._cameras, self.image_size)

        train = [t for t in all_tracklets if t.pid < num_train_ids]
        test = [t for t in all_tracklets if num_train_ids <= t.pid < num_train_ids + num_test_ids]
        query_positions = _mars_queries(test, query_rng)
        query = [t for i, t in enumerate(test) if i in query_positions]
        gallery = [t for i, t in enumerate(test) if i not in query_positions]
        gallery += [t for t in all_tracklets if t.pid >= num_train_ids + num_test_ids]
        super().__init__("synthetic", select_train_tracklets(train, tracklets, sampling_seed), query, gallery,
                         frame_loader=self._load_frame)

    def _load_frame(self, frame: str):
        from PIL import Image

        return Image.fromarray(self.frame_array(frame))

    def frame_array(self, frame: str) -> np.ndarray:
        """Frame ``frame`` as a read-only uint8 array [H, W, 3] (no copy)."""
        try:
            row = self.frame_index[frame]
        except KeyError:
            raise KeyError(f"no synthetic frame {frame!r} in this world") from None
        view = self.pixels[row]
        view.flags.writeable = False
        return view

    def mean_frames(self, split: str) -> torch.Tensor:
        """Raw-pixel tracklet descriptors: the mean frame of each tracklet of ``split``, flattened.

        Returns
        -------
        Tensor [T, H*W*3], float32, values in [0, 255]
        """
        tracklets = self.split(split)
        out = np.zeros((len(tracklets), int(np.prod(self.pixels.shape[1:]))), dtype=np.float32)
        for i, tracklet in enumerate(tracklets):
            rows = [self.frame_index[f] for f in tracklet.frames]
            out[i] = self.pixels[rows].reshape(len(rows), -1).mean(0, dtype=np.float64)
        return torch.from_numpy(out)


def _mars_queries(test: list[Tracklet], rng: np.random.Generator) -> set[int]:
    """Positions of the query tracklets: one random tracklet per (identity, camera) visit, as in MARS,
    except in one random camera per identity whose tracklets all stay in the gallery, so that
    every query has a true match in another camera even when visits do not fragment."""
    visits: dict[int, dict[int, list[int]]] = {}
    for position, tracklet in enumerate(test):
        visits.setdefault(tracklet.pid, {}).setdefault(tracklet.camera, []).append(position)
    queries = set()
    for pid in sorted(visits):
        cameras = sorted(visits[pid])
        gallery_camera = cameras[int(rng.integers(len(cameras)))]
        for camera in cameras:
            members = visits[pid][camera]
            choice = members[int(rng.integers(len(members)))]
            if camera != gallery_camera:
                queries.add(choice)
    return queries


def _check_args(num_train_ids, num_test_ids, num_cameras, image_size, cameras_per_id, fragment_rate, max_fragments,
                frames_per_tracklet, occlusion_rate, num_distractors, camera_strength) -> None:
    for name, value, minimum in (("num_train_ids", num_train_ids, 0), ("num_test_ids", num_test_ids, 0),
                                 ("num_cameras", num_cameras, 2), ("max_fragments", max_fragments, 1),
                                 ("num_distractors", num_distractors, 0)):
        if not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    for name, pair, minimum in (("image_size", image_size, 8), ("cameras_per_id", cameras_per_id, 1),
                                ("frames_per_tracklet", frames_per_tracklet, 1)):
        if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and v >= minimum for v in pair):
            raise ValueError(f"{name} must be two integers >= {minimum}, got {pair!r}")
    if cameras_per_id[0] > cameras_per_id[1] or frames_per_tracklet[0] > frames_per_tracklet[1]:
        raise ValueError("cameras_per_id and frames_per_tracklet are (low, high) ranges with low <= high")
    if num_test_ids and min(cameras_per_id[1], num_cameras) < 2:
        raise ValueError("test identities need at least 2 cameras (cameras_per_id[1] >= 2) so queries have a match")
    if not fragment_rate >= 0 or not 0 <= occlusion_rate <= 1 or not camera_strength >= 0:
        raise ValueError("fragment_rate and camera_strength must be >= 0 and occlusion_rate in [0, 1]")


# -- world parameters ----------------------------------------------------------------------------------

def _pick(rng: np.random.Generator, palette: np.ndarray, count: int, jitter: float) -> np.ndarray:
    colours = palette[rng.integers(len(palette), size=count)] + rng.normal(0, jitter, (count, 3))
    return np.clip(colours, 0, 1).astype(np.float32)


def _draw_identities(rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    torso = rng.integers(len(_CLOTHES), size=count)
    # A second colour different from the first, so patterns are visible.
    second = (torso + rng.integers(1, len(_CLOTHES), size=count)) % len(_CLOTHES)
    jitter = lambda: rng.normal(0, 0.04, (count, 3))  # noqa: E731
    return {
        "skin": _pick(rng, _SKIN, count, 0.03),
        "hair": _pick(rng, _HAIR, count, 0.03),
        "long_hair": rng.random(count) < 0.3,
        "hat": rng.random(count) < 0.2,
        "hat_colour": _pick(rng, _CLOTHES, count, 0.04),
        "torso": np.clip(_CLOTHES[torso] + jitter(), 0, 1).astype(np.float32),
        "torso2": np.clip(_CLOTHES[second] + jitter(), 0, 1).astype(np.float32),
        "pattern": rng.integers(_PATTERNS, size=count),
        "stripes": rng.uniform(2.5, 5.0, count).astype(np.float32),
        "long_sleeves": rng.random(count) < 0.6,
        "legs": _pick(rng, _CLOTHES, count, 0.04),
        "leg_style": rng.choice(3, size=count, p=[0.7, 0.15, 0.15]),  # trousers, shorts, skirt
        "shoes": _pick(rng, _CLOTHES[[0, 1, 14, 2]], count, 0.03),
        "backpack": rng.random(count) < 0.3,
        "backpack_colour": _pick(rng, _CLOTHES, count, 0.04),
        "bag": rng.random(count) < 0.25,
        "bag_side": rng.choice([-1.0, 1.0], size=count).astype(np.float32),
        "bag_colour": _pick(rng, _CLOTHES, count, 0.04),
        "build": rng.uniform(0.9, 1.12, count).astype(np.float32),
        "height": rng.uniform(0.93, 1.04, count).astype(np.float32),
    }


def _draw_cameras(rng: np.random.Generator, count: int, strength: float) -> dict[str, np.ndarray]:
    s = 0.75 * strength  # the ranges below at 0.75 are the tuned default (camera_strength=1)
    mix = np.eye(3, dtype=np.float32)[None] * (1 + s * rng.uniform(-0.35, 0.3, (count, 1, 3)))
    mix = mix + s * rng.normal(0, 0.08, (count, 3, 3))
    num_fixtures = 6

    def scene_colour(shape):  # muted scene colours: a grey level plus some tint
        grey = rng.uniform(0.2, 0.8, (*shape, 1))
        colour = grey + rng.normal(0, 0.12, (*shape, 3))
        return np.clip(0.5 + s * (colour - 0.5), 0, 1).astype(np.float32)

    return {
        "wall": scene_colour((count,)),
        "floor": scene_colour((count,)),
        "horizon": rng.uniform(0.35, 0.7, count).astype(np.float32),
        "tile_period": rng.uniform(0.08, 0.25, count).astype(np.float32),
        "tile_contrast": (s * rng.uniform(0.03, 0.12, count)).astype(np.float32),
        "wall_stripe_period": rng.uniform(0.1, 0.5, count).astype(np.float32),
        "wall_stripe_contrast": (s * rng.uniform(0.0, 0.1, count)).astype(np.float32),
        # Fixtures (doors, windows, posters): ((top, bottom), (left, right)) in canvas fractions, colours.
        "fixtures": np.sort(rng.uniform(0, 1, (count, num_fixtures, 2, 2)), axis=3).astype(np.float32),
        "fixture_colours": scene_colour((count, num_fixtures)),
        "occluder_colour": scene_colour((count,)),
        "mix": mix.astype(np.float32),
        "offset": (s * rng.uniform(-0.08, 0.08, (count, 3))).astype(np.float32),
        "gain": (1 + s * rng.uniform(-0.35, 0.25, count)).astype(np.float32),
        "gamma": np.exp(s * rng.uniform(-0.3, 0.3, count)).astype(np.float32),
        "gradient_angle": rng.uniform(0, 2 * np.pi, count).astype(np.float32),
        "gradient": (s * rng.uniform(0.0, 0.35, count)).astype(np.float32),
        "blur": (s * rng.uniform(0.0, 2.5, count)).astype(np.float32),  # box radius in pixels at height 128
        "noise": (s * rng.uniform(0.01, 0.05, count)).astype(np.float32),
        "person_scale": rng.uniform(0.74, 0.94, count).astype(np.float32),
        "person_y": rng.uniform(0.3, 0.7, count).astype(np.float32),
        "views": rng.dirichlet(np.full(3, 0.8), size=count),
    }


def _draw_frames(rng: np.random.Generator, records: list[tuple[int, int, int, int]], cameras: dict[str, np.ndarray],
                 occlusion_rate: float) -> _Frames:
    lengths = np.array([r[3] for r in records], dtype=np.int64)
    num = len(records)
    tracklet_of = np.repeat(np.arange(num), lengths)
    step = np.arange(len(tracklet_of)) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # frame number in tracklet
    identity = np.array([r[0] for r in records], dtype=np.int64)[tracklet_of]
    camera = np.array([r[1] for r in records], dtype=np.int64)[tracklet_of]
    # Per trajectory (all fragments of one visit): a viewpoint from its camera's mix and a walking
    # direction; per tracklet: a start position and a pace; some frames turn to another viewpoint.
    visit = np.cumsum(np.array([i == 0 or records[i][:2] != records[i - 1][:2] for i in range(num)],
                               dtype=np.int64)) - 1
    num_visits = int(visit[-1]) + 1 if num else 0
    visit_camera = np.zeros(num_visits, dtype=np.int64)
    visit_camera[visit] = [r[1] for r in records]
    cumulative = np.cumsum(cameras["views"], axis=1)[visit_camera]
    view = (rng.random((num_visits, 1)) > cumulative).sum(1).clip(0, 2)[visit][tracklet_of]
    turns = rng.random(len(tracklet_of)) < 0.1
    view = np.where(turns, rng.integers(0, 3, len(tracklet_of)), view)
    facing = rng.choice([-1.0, 1.0], size=num_visits)[visit][tracklet_of]
    pace = rng.uniform(-0.06, 0.06, num)[tracklet_of]
    frames = len(tracklet_of)
    occluded = rng.random(frames) < occlusion_rate
    kind = np.where(occluded, 1 + (rng.random(frames) < 0.4), 0)
    box_left = rng.uniform(-0.3, 0.5, frames)
    return _Frames(
        identity=identity, camera=camera, view=view, facing=facing.astype(np.float32),
        shift_x=rng.normal(0, 0.05, frames).astype(np.float32), shift_y=rng.normal(0, 0.025, frames).astype(np.float32),
        scale=np.exp(rng.normal(0, 0.04, frames)).astype(np.float32),
        phase=(rng.uniform(0, 2 * np.pi, num)[tracklet_of] + 0.9 * step).astype(np.float32),
        pan_x=np.clip(rng.uniform(0, 1, num)[tracklet_of] + pace * step, 0, 1).astype(np.float32),
        pan_y=np.clip(rng.uniform(0.3, 0.7, num)[tracklet_of] + rng.normal(0, 0.03, frames), 0, 1).astype(np.float32),
        occluder=kind.astype(np.int64),
        occ_a=np.where(kind == 1, rng.uniform(0.55, 0.85, frames), rng.uniform(-0.1, 0.8, frames)).astype(np.float32),
        occ_b=np.where(kind == 1, box_left, rng.uniform(0.15, 0.3, frames)).astype(np.float32),
        occ_c=(box_left + rng.uniform(0.5, 1.2, frames)).astype(np.float32),
    )


# -- rendering -----------------------------------------------------------------------------------------

def _scene(cameras: dict[str, np.ndarray], camera: int, height: int, width: int) -> np.ndarray:
    """The camera's scene as a canvas [2H, 3W, 3]: crops of it are the crops' background."""
    canvas_h, canvas_w = 2 * height, 3 * width
    y = (np.arange(canvas_h, dtype=np.float32) + 0.5) / canvas_h
    x = (np.arange(canvas_w, dtype=np.float32) + 0.5) / canvas_w
    # Lengths in units of the canvas height so the scene looks the same at every resolution.
    xs = x * canvas_w / canvas_h
    horizon = cameras["horizon"][camera]
    stripes = np.sign(np.sin(2 * np.pi * xs / cameras["wall_stripe_period"][camera]))
    wall = cameras["wall"][camera] * (1 + cameras["wall_stripe_contrast"][camera] * stripes)[None, :, None]
    period = cameras["tile_period"][camera]
    tiles = np.sign(np.sin(np.pi * xs / period))[None, :] * np.sign(np.sin(np.pi * y / period))[:, None]
    floor = cameras["floor"][camera] * (1 + cameras["tile_contrast"][camera] * tiles)[..., None]
    canvas = np.where((y < horizon)[:, None, None], np.broadcast_to(wall, (canvas_h, canvas_w, 3)), floor)
    for index in range(cameras["fixtures"].shape[1]):
        (top, bottom), (left, right) = cameras["fixtures"][camera, index]
        top, bottom = top * horizon, bottom * horizon  # fixtures hang on the wall
        inside = ((y >= top) & (y < bottom))[:, None] & ((x >= left) & (x < right))[None, :]
        canvas = np.where(inside[..., None], cameras["fixture_colours"][camera, index], canvas)
    return canvas.astype(np.float32)


def _box_blur(images: np.ndarray, radius: int) -> np.ndarray:
    """Separable box blur of [F, H, W, 3] with edge replication, radius in pixels (small)."""
    if radius <= 0:
        return images
    for axis in (1, 2):
        total = images.copy()
        for shift in range(1, radius + 1):
            def cut(start, stop):  # noqa: E306  images[..., start:stop, ...] along `axis`
                return images[(slice(None),) * axis + (slice(start, stop),)]
            total[(slice(None),) * axis + (slice(shift, None),)] += cut(None, -shift)
            total[(slice(None),) * axis + (slice(None, shift),)] += cut(0, 1)
            total[(slice(None),) * axis + (slice(None, -shift),)] += cut(shift, None)
            total[(slice(None),) * axis + (slice(-shift, None),)] += cut(-1, None)
        total *= np.float32(1 / (2 * radius + 1))
        images = total
    return images


# Body parts of the label map each frame is drawn into before colouring (0: background).
SKIN, LEGS, SHOES, TORSO, TORSO2, BACKPACK, BAG, HAIR, HAT, OCCLUDER = range(1, 11)


def _render(rng: np.random.Generator, frames: _Frames, identities: dict[str, np.ndarray],
            cameras: dict[str, np.ndarray], image_size: tuple[int, int]) -> np.ndarray:
    height, width = image_size
    num_frames = len(frames.identity)
    pixels = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    rows = np.arange(height, dtype=np.float32) + 0.5
    cols = np.arange(width, dtype=np.float32) + 0.5
    chunk_size = max(1, _CHUNK_PIXELS // (height * width))
    for camera in range(len(cameras["gain"])):
        # Noise comes from a per-camera stream so it does not depend on other cameras' frame counts.
        noise_rng = np.random.default_rng(rng.integers(2**63))
        # Sensor noise: frames draw from a bank of noise fields (drawing fresh noise per frame costs more
        # than the rest of the rendering).
        noise = cameras["noise"][camera] * noise_rng.standard_normal((_NOISE_FIELDS, height, width, 3),
                                                                     dtype=np.float32)
        members = np.flatnonzero(frames.camera == camera)
        scene = _camera_colour(_scene(cameras, camera, height, width), cameras, camera)
        # Illumination: gain times a linear gradient, through the camera's gamma like the colours.
        angle = cameras["gradient_angle"][camera]
        ramp = np.cos(angle) * (cols[None, :] / width - 0.5) + np.sin(angle) * (rows[:, None] / height - 0.5)
        light = (cameras["gain"][camera] * (1 + cameras["gradient"][camera] * ramp)) ** cameras["gamma"][camera]
        for start in range(0, members.size, chunk_size):
            chunk = members[start:start + chunk_size]
            pixels[chunk] = _render_chunk(chunk, frames, identities, cameras, camera, scene,
                                          light.astype(np.float32), noise, rows, cols, height, width, noise_rng)
    return pixels


def _camera_colour(colours: np.ndarray, cameras: dict[str, np.ndarray], camera: int) -> np.ndarray:
    """The camera's colour response [..., 3] -> [..., 3]: channel mix plus offset, clipped, then gamma."""
    mixed = colours @ cameras["mix"][camera].T + cameras["offset"][camera]
    return (np.clip(mixed, 0, 1) ** cameras["gamma"][camera]).astype(np.float32)


def _render_chunk(chunk, frames: _Frames, ids: dict[str, np.ndarray], cameras: dict[str, np.ndarray], camera: int,
                  scene: np.ndarray, light: np.ndarray, noise: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                  height: int, width: int,
                  noise_rng: np.random.Generator) -> np.ndarray:
    count = len(chunk)
    who = frames.identity[chunk]
    view = frames.view[chunk][:, None, None]
    front, back, side = view == FRONT, view == BACK, view == SIDE
    col = lambda a: a[:, None, None]  # noqa: E731  per-frame scalar -> broadcastable [F, 1, 1]
    # Parts are painted as labels (1 byte a pixel) in back-to-front order, coloured once at the end.
    label = np.zeros((count, height, width), dtype=np.int8)
    paint = lambda mask, part: np.copyto(label, np.int8(part), where=mask)  # noqa: E731

    # Person coordinates in units of its height: v from head (0) to feet (1), u horizontal from its centre.
    person_h = cameras["person_scale"][camera] * height * ids["height"][who] * frames.scale[chunk]
    person_top = (height - person_h) * cameras["person_y"][camera] + frames.shift_y[chunk] * height
    centre = width / 2 + frames.shift_x[chunk] * width
    v = ((rows[None, :, None] - col(person_top)) / col(person_h)).astype(np.float32)
    facing = col(np.where(frames.view[chunk] == SIDE, frames.facing[chunk], 1.0).astype(np.float32))
    # Side views mirror with the walking direction: u > 0 is always the way the person faces.
    u = ((cols[None, None, :] - col(centre)) / col(person_h) * facing).astype(np.float32)
    build = col(ids["build"][who])
    swing = np.sin(col(frames.phase[chunk]))

    # Legs: two columns; the side view spreads them with the walking phase. Shorts and skirts show skin.
    torso_half = np.where(side, 0.085, 0.13 - 0.03 * np.clip((v - 0.16) / 0.37, 0, 1)) * build
    spread = np.where(side, 0.45 * swing * np.clip(v - 0.53, 0, None), 0.0)
    leg_centre = np.where(side, 0.0, 0.055) * build
    leg_half = 0.048 * build
    in_leg = (v >= 0.53) & (v < 0.98) & ((np.abs(u - leg_centre - spread) < leg_half)
                                         | (np.abs(u + leg_centre + spread) < leg_half))
    style = col(ids["leg_style"][who])
    paint(in_leg, LEGS)
    paint(in_leg & (((style == 1) & (v >= 0.72)) | ((style == 2) & (v >= 0.76))), SKIN)
    paint((style == 2) & (v >= 0.53) & (v < 0.76) & (np.abs(u) < (0.11 + 0.25 * (v - 0.53)) * build), LEGS)
    paint(in_leg & (v >= 0.93), SHOES)

    # Torso with its pattern, in torso coordinates (tu across, tv down).
    in_torso = (v >= 0.16) & (v < 0.53) & (np.abs(u) < torso_half)
    tu = u / np.maximum(torso_half, 1e-3)
    tv = (v - 0.16) / 0.37
    freq = col(ids["stripes"][who])
    pattern = col(ids["pattern"][who])
    rows_on = np.sin(2 * np.pi * freq * tv) > 0
    cols_on = np.sin(np.pi * freq * (tu + 1)) > 0
    second = ((pattern == 1) & rows_on) | ((pattern == 2) & cols_on) | ((pattern == 3) & (rows_on ^ cols_on)) \
        | ((pattern == 4) & front & (np.abs(tu) < 0.45) & (tv > 0.2) & (tv < 0.55)) \
        | ((pattern == 5) & (tv > 0.55)) | ((pattern == 6) & front & (np.abs(tu) < 0.3))
    paint(in_torso, TORSO)
    paint(in_torso & second, TORSO2)

    # Arms: beside the torso from the front / back; one swinging arm over the torso from the side.
    arm_offset = np.where(side, 0.12 * swing * np.clip(v - 0.17, 0, None) / 0.33, 0.0)
    arm_u = np.where(side, np.abs(u - arm_offset), np.abs(u) - torso_half - 0.022 * build)
    in_arm = (v >= 0.17) & (v < 0.5) & (np.abs(arm_u) < 0.022 * build + np.where(side, 0.012, 0.0))
    paint(in_arm, SKIN)
    paint(in_arm & (v < np.where(col(ids["long_sleeves"][who]), 0.46, 0.27)), TORSO)

    # Accessories, each hidden by some viewpoints: backpack (straps only from the front), shoulder bag.
    backpack = col(ids["backpack"][who])
    pack_v = (v >= 0.19) & (v < 0.46)
    paint(backpack & pack_v & back & (np.abs(u) < 0.095 * build), BACKPACK)
    paint(backpack & pack_v & side & (u > -torso_half - 0.07) & (u < -torso_half + 0.01), BACKPACK)
    paint(backpack & front & (v >= 0.17) & (v < 0.33) & (np.abs(np.abs(u) - 0.07 * build) < 0.011), BACKPACK)
    bag_side = col(ids["bag_side"][who]) * np.where(back, -1.0, 1.0)
    bag_front = (~side) & (u * bag_side > torso_half) & (u * bag_side < torso_half + 0.08)
    # From the side the bag shows only when it hangs on the side facing the camera.
    bag_side_view = side & (col(ids["bag_side"][who]) * facing > 0) & (np.abs(u) < 0.06)
    paint(col(ids["bag"][who]) & (v >= 0.42) & (v < 0.58) & (bag_front | bag_side_view), BAG)

    # Head, hair (seen whole from behind, long hair over the upper back), hat.
    in_head = ((u / 0.068) ** 2 + ((v - 0.085) / 0.075) ** 2) <= 1
    paint(in_head, SKIN)
    long_hair = col(ids["long_hair"][who])
    hair = in_head & ((v < 0.055) | back | (side & (u < -0.02)))
    hair |= long_hair & (back | side) & (v >= 0.05) & (v < 0.27) & (np.abs(u + np.where(side, 0.03, 0.0)) < 0.07)
    hair |= long_hair & front & ~in_head & (v >= 0.04) & (v < 0.2) & (np.abs(u) < 0.085)
    paint(hair, HAIR)
    paint(col(ids["hat"][who]) & (v >= -0.01) & (v < 0.045) & (np.abs(u) < 0.085), HAT)

    # Occluders in the camera's colours: a box rising from below or a pole.
    y_frac = rows[None, :, None] / height
    x_frac = cols[None, None, :] / width
    kind = col(frames.occluder[chunk])
    box = (kind == 1) & (y_frac >= col(frames.occ_a[chunk])) & (x_frac >= col(frames.occ_b[chunk])) \
        & (x_frac < col(frames.occ_c[chunk]))
    pole = (kind == 2) & (x_frac >= col(frames.occ_a[chunk])) \
        & (x_frac < col(frames.occ_a[chunk] + frames.occ_b[chunk]))
    paint(box | pole, OCCLUDER)

    # Colour the labels; background pixels come from a crop of the camera's scene that pans with the person.
    palette = np.zeros((count, OCCLUDER + 1, 3), dtype=np.float32)
    for part, colours in ((SKIN, ids["skin"]), (LEGS, ids["legs"]), (SHOES, ids["shoes"]), (TORSO, ids["torso"]),
                          (TORSO2, ids["torso2"]), (BACKPACK, ids["backpack_colour"]), (BAG, ids["bag_colour"]),
                          (HAIR, ids["hair"]), (HAT, ids["hat_colour"])):
        palette[:, part] = colours[who]
    palette[:, OCCLUDER] = cameras["occluder_colour"][camera]
    palette = _camera_colour(palette, cameras, camera).reshape(-1, 3)
    # One gather colours every pixel: person parts index the palette, background pixels index the scene
    # crop (scene rows appended after the palette's).
    table = np.concatenate([palette, scene.reshape(-1, 3)])
    top = (frames.pan_y[chunk] * height).astype(np.int32)
    left = (frames.pan_x[chunk] * 2 * width).astype(np.int32)
    scene_index = len(palette) + (top[:, None] + np.arange(height, dtype=np.int32))[:, :, None] * scene.shape[1] \
        + (left[:, None] + np.arange(width, dtype=np.int32))[:, None, :]
    part_index = label + (np.arange(count, dtype=np.int32) * (OCCLUDER + 1))[:, None, None]
    image = np.take(table, np.where(label > 0, part_index, scene_index), axis=0)

    # The rest of the camera: illumination, blur, noise.
    image *= light[None, :, :, None]
    image = _box_blur(image, int(round(cameras["blur"][camera] * height / 128)))
    image += noise[noise_rng.integers(_NOISE_FIELDS, size=count)]
    image *= 255
    image += 0.5
    return np.clip(image, 0, 255, out=image).astype(np.uint8)
