"""Feature and distance files that ``fastassoc eval`` reads: their keys, formats and checks.

A **feature file** holds six arrays under these keys:

=================  ===========  =========================================================
key                shape        meaning
=================  ===========  =========================================================
``query``          [Q, D] float query features (one row per query image or tracklet)
``gallery``        [G, D] float gallery features, same D
``query_pids``     [Q] int      query identities
``gallery_pids``   [G] int      gallery identities (-1: junk, never counted)
``query_cameras``  [Q] int      query cameras (>= 0)
``gallery_cameras`` [G] int     gallery cameras (>= 0)
=================  ===========  =========================================================

A **distance file** holds ``distances`` [Q, G] (float; smaller ranks first, e.g. a
re-ranked matrix) and the four label keys. A bare ``.npy`` matrix holds no labels: they
come from a separate labels file (``--labels``) with the four label keys. Other keys are
ignored.

Formats: ``.pt`` (``torch.save`` of a dict of tensors; loaded with ``weights_only=True``),
``.npz`` (``np.savez(path, query=..., ...)``) and ``.npy`` (a bare array, or
``np.save(path, dict)``, which pickles the dict). Pickled content (a ``.npy`` dict, NumPy
arrays inside a ``.pt``) can run code when loaded, so it is read only with
``allow_pickle=True`` (``--allow-pickle``): pass it only for files you trust.

Examples
--------
>>> import tempfile, numpy as np
>>> path = tempfile.mkdtemp() + "/features.npz"
>>> np.savez(path, query=np.eye(2, dtype=np.float32), gallery=np.eye(2, dtype=np.float32),
...          query_pids=[0, 1], gallery_pids=[1, 0], query_cameras=[0, 0], gallery_cameras=[1, 1])
>>> sorted(load_features(path))
['gallery', 'gallery_cameras', 'gallery_pids', 'query', 'query_cameras', 'query_pids']
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

LABEL_KEYS = ("query_pids", "gallery_pids", "query_cameras", "gallery_cameras")
FEATURE_KEYS = ("query", "gallery") + LABEL_KEYS
DISTANCE_KEYS = ("distances",) + LABEL_KEYS
SUFFIXES = (".pt", ".npy", ".npz")


class EvalFileError(ValueError):
    """A feature, distance or labels file that cannot be used; the message names the file."""


def check_path(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path, refused unless it is an existing file with a known suffix."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise EvalFileError(f"{path}: a {what} must be a .pt, .npy or .npz file, got suffix {path.suffix!r}")
    if not path.is_file():
        raise EvalFileError(f"{path}: no such {what}" if not path.exists() else f"{path}: not a file")
    return path


def read_arrays(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict | torch.Tensor:
    """The content of a ``.pt`` / ``.npy`` / ``.npz`` file: a dict of tensors, or one tensor.

    NumPy arrays become tensors (copied when torch cannot share their memory). Raises
    :class:`EvalFileError` naming the file for what cannot be read.
    """
    path = Path(path)
    pickle_hint = ("it holds pickled objects, which can run code when loaded; pass --allow-pickle "
                   "(allow_pickle=True) if you trust the file, or save plain arrays (np.savez, or a dict of "
                   "torch tensors)")
    try:
        if path.suffix == ".pt":
            try:
                content = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
            except pickle.UnpicklingError as error:
                if not allow_pickle and "weights only" in str(error).lower():
                    raise EvalFileError(f"{path}: {pickle_hint}") from None
                raise
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=allow_pickle) as archive:
                content = {key: archive[key] for key in archive.files}
        else:
            content = np.load(path, allow_pickle=allow_pickle)
            if isinstance(content, np.ndarray) and content.dtype == object and content.shape == ():
                content = content.item()
    except EvalFileError:
        raise
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise EvalFileError(f"{path}: {pickle_hint}") from None
        raise EvalFileError(f"{path}: cannot be read ({' '.join(str(error).split())[:200]})") from error
    except Exception as error:  # noqa: BLE001 - any reader failure becomes one line naming the file
        raise EvalFileError(f"{path}: cannot be read ({type(error).__name__}: "
                            f"{' '.join(str(error).split())[:200]})") from error
    if isinstance(content, dict):
        return {str(key): _tensor(path, str(key), value) for key, value in content.items()
                if isinstance(value, (torch.Tensor, np.ndarray, list))}
    if isinstance(content, (torch.Tensor, np.ndarray)):
        return _tensor(path, "array", content)
    raise EvalFileError(f"{path}: holds a {type(content).__name__}; expected a dict of arrays (see "
                        f"fastassoc.eval.files for the keys)")


def _tensor(path: Path, key: str, value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    array = np.asarray(value)
    if array.dtype == object or array.dtype.kind in "USV":
        raise EvalFileError(f"{path}: {key!r} holds {array.dtype} values; it must be numbers")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("=")))


def _pick(path: Path, content, keys: tuple[str, ...], what: str) -> dict[str, torch.Tensor]:
    if not isinstance(content, dict):
        raise EvalFileError(f"{path}: holds a bare array; a {what} needs the keys {', '.join(keys)}")
    missing = [key for key in keys if key not in content]
    if missing:
        held = ", ".join(sorted(content)) or "nothing"
        raise EvalFileError(f"{path}: a {what} needs the keys {', '.join(keys)}; missing {', '.join(missing)} "
                            f"(it holds {held})")
    return {key: content[key] for key in keys}


def load_features(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The six arrays of a feature file (:data:`FEATURE_KEYS`), as CPU tensors.

    Values are checked by :func:`fastassoc.evaluate_ranking` (its errors name the key).
    """
    path = check_path(path, "feature file")
    return _pick(path, read_arrays(path, allow_pickle=allow_pickle), FEATURE_KEYS, "feature file")


def load_distances(path: str | os.PathLike, labels: str | os.PathLike | None = None, *,
                   allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """``distances`` and the four label arrays (:data:`DISTANCE_KEYS`), as CPU tensors.

    Parameters
    ----------
    path : path
        A dict file holding :data:`DISTANCE_KEYS`, or a bare [Q, G] matrix (``.npy`` /
        ``.pt`` of one tensor) when ``labels`` is given.
    labels : path, optional
        A file holding :data:`LABEL_KEYS`; the distance file must then hold no labels itself
        (two sources of labels would be a guess).
    """
    path = check_path(path, "distance file")
    content = read_arrays(path, allow_pickle=allow_pickle)
    if labels is None:
        if not isinstance(content, dict):
            raise EvalFileError(f"{path}: holds a bare matrix without identities and cameras; pass a labels file "
                                f"(--labels) with the keys {', '.join(LABEL_KEYS)}")
        return _pick(path, content, DISTANCE_KEYS, "distance file")
    labels = check_path(labels, "labels file")
    if isinstance(content, dict):
        duplicated = [key for key in LABEL_KEYS if key in content]
        if duplicated:
            raise EvalFileError(f"{path}: holds {', '.join(duplicated)} and a labels file ({labels}) was given too; "
                                f"use one source of labels")
        matrix = _pick(path, content, ("distances",), "distance file")["distances"]
    else:
        matrix = content
    return {"distances": matrix,
            **_pick(labels, read_arrays(labels, allow_pickle=allow_pickle), LABEL_KEYS, "labels file")}
