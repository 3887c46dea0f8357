"""Checkpoint files: sealed writes, checked reads, RNG states, atomic file replacement.

File format (``FORMAT_VERSION`` 2)
----------------------------------
A checkpoint is the zip archive ``torch.save`` writes, holding only plain types (tensors,
numbers, strings, None, lists, tuples, dicts), so :func:`read_checkpoint` loads it with
``torch.load(weights_only=True)`` and no pickled code ever runs. The archive's zip comment
(the standard free-text field at the very end of a zip file) holds one ASCII line::

    fastassoc-checkpoint format=2 sha256=<64 hex digits>

where the digest is SHA-256 of the archive's bytes as ``torch.save`` wrote them (with an
empty comment). A file is thus still an ordinary ``torch.load``-able archive, and a reader
can tell an empty, truncated, damaged or foreign file apart and say so in one line
(:class:`CheckpointError`, a ``ValueError``, naming the file).

Writes go to a temporary ``.<name>.<random>.tmp`` in the same folder, are fsync'ed and renamed
over the target, so a reader never sees half a file; a process killed mid-write leaves the
temporary behind, and :func:`remove_stale_temporaries` (called when a trainer starts) deletes it.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import re
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

FORMAT_VERSION = 2
_MAGIC = b"fastassoc-checkpoint"
_COMMENT = re.compile(rb"^fastassoc-checkpoint format=(\d+) sha256=([0-9a-f]{64})$")
_END_RECORD = b"PK\x05\x06"     # zip end-of-central-directory signature
_END_RECORD_SIZE = 22           # without its comment


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: empty, truncated, damaged, foreign or from
    another method. The message is one line naming the file and what is wrong."""


# -- RNG ---------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The global generators' states as plain types (lists, tensors), loadable with
    ``weights_only=True``; :func:`set_rng_state` restores them exactly."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- atomic writes ------------------------------------------------------------------------------

def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to a temporary file next to ``path``, fsync, rename over ``path``.

    Raises
    ------
    OSError
        Any write failure (a full disk, a read-only folder), re-raised with ``path`` as its
        filename; the temporary is removed.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        _unlink_quietly(tmp)
        raise OSError(error.errno, f"cannot write {path}: {error.strerror or error}", str(path)) from error
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            os.unlink(path)


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` written atomically (:func:`atomic_write_bytes`); no checksum record."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(buffer.getvalue(), path)


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """``text`` (UTF-8) written atomically (:func:`atomic_write_bytes`)."""
    atomic_write_bytes(text.encode("utf-8"), path)


def remove_stale_temporaries(folder: str | os.PathLike, names: tuple[str, ...] = ("checkpoint.pt", "report.json")
                             ) -> list[Path]:
    """Delete ``.<name>.*.tmp`` files that a killed write left in ``folder``; returns them.

    Only one process may write a run folder at a time, so any such file is an orphan.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for name in names:
        for stale in folder.glob(f".{name}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
                removed.append(stale)
    return removed


# -- checkpoint files -----------------------------------------------------------------------------

def plain_state(value, where: str = "state"):
    """``value`` with NumPy arrays / scalars turned into tensors / Python numbers, so that
    ``torch.load(weights_only=True)`` accepts it.

    Raises
    ------
    TypeError
        An object of another type, named with its path in the state (``state.method_state.x``).
    """
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, OrderedDict):
        # A module's state_dict: keep its _metadata (per-module versions load_state_dict reads).
        out = OrderedDict((key, plain_state(item, f"{where}.{key}")) for key, item in value.items())
        if hasattr(value, "_metadata"):
            out._metadata = value._metadata
        return out
    if isinstance(value, dict):   # Counter, defaultdict... become plain dicts
        return {key: plain_state(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, list):
        return [plain_state(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(plain_state(item, f"{where}[{i}]") for i, item in enumerate(value))
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"a checkpoint holds tensors, numbers, strings, lists and dicts; {where} is a "
                    f"{type(value).__name__}")


def seal(archive: bytes) -> bytes:
    """``archive`` (a zip file with an empty comment, as ``torch.save`` writes it) with the
    format / SHA-256 comment of the module docstring."""
    if archive[-_END_RECORD_SIZE:-_END_RECORD_SIZE + 4] != _END_RECORD or archive[-2:] != b"\0\0":
        raise ValueError("seal() needs a zip archive without a comment (torch.save's output)")
    comment = _MAGIC + f" format={FORMAT_VERSION} sha256={hashlib.sha256(archive).hexdigest()}".encode()
    return archive[:-2] + len(comment).to_bytes(2, "little") + comment


def write_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` (plain types, see :func:`plain_state`) as a sealed checkpoint, atomically.

    Raises
    ------
    TypeError
        ``state`` holds an object that is not a plain type.
    OSError
        The write failed (the message names ``path``).
    """
    buffer = io.BytesIO()
    torch.save(plain_state(state), buffer)
    atomic_write_bytes(seal(buffer.getvalue()), path)
    return Path(path)


def _unseal(data: bytes, path: Path) -> bytes:
    """The archive bytes of a sealed file, after checking the seal; CheckpointError otherwise."""
    size = len(data)
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    if not data.startswith(b"PK\x03\x04"):
        raise CheckpointError(f"{path}: not a fastassoc checkpoint (not a zip archive as torch.save writes; "
                              f"first bytes {data[:8]!r})")
    # The end record sits in the last 22 + 65535 bytes; the last signature there whose comment
    # length reaches exactly to the end of the file is the real one.
    start = max(0, size - _END_RECORD_SIZE - 0xFFFF)
    position = data.rfind(_END_RECORD, start)
    while position >= 0 and position + _END_RECORD_SIZE + int.from_bytes(
            data[position + 20:position + 22], "little") != size:
        position = data.rfind(_END_RECORD, start, position)
    if position < 0:
        if _MAGIC in data[-(_END_RECORD_SIZE + 0xFFFF):]:
            raise CheckpointError(f"{path}: damaged (the zip archive's end record is unreadable)")
        raise CheckpointError(f"{path}: truncated ({size} bytes; the zip archive's end record is missing)")
    comment = data[position + _END_RECORD_SIZE:]
    if not comment.startswith(_MAGIC):
        raise CheckpointError(f"{path}: not a fastassoc checkpoint (a torch archive without fastassoc's "
                              f"checksum record: another program's file, or one from before format {FORMAT_VERSION})")
    match = _COMMENT.match(comment)
    if match is None:
        raise CheckpointError(f"{path}: damaged (unreadable checksum record {comment[:80]!r})")
    version = int(match.group(1))
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer fastassoc (format {version}; this one reads up to "
                              f"{FORMAT_VERSION})")
    archive = data[:position + 20] + b"\0\0"
    digest = hashlib.sha256(archive).hexdigest()
    if digest != match.group(2).decode():
        raise CheckpointError(f"{path}: damaged (SHA-256 {digest[:12]}... of its contents, "
                              f"{match.group(2).decode()[:12]}... recorded when written)")
    return archive


REQUIRED_KEYS = ("method", "config", "epoch", "model")


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read and check a checkpoint written by :func:`write_checkpoint` (a trainer's
    ``checkpoint.pt``), on the CPU.

    Parameters
    ----------
    path : path
        The file, or a run folder holding ``checkpoint.pt``.

    Returns
    -------
    dict
        ``format``, ``method``, ``config`` (dict of the config's fields), ``epoch`` (epochs
        done), ``model`` (state dict), and the optimiser / scheduler / method / RNG states.

    Raises
    ------
    FileNotFoundError
        No such file.
    CheckpointError
        Empty, truncated, damaged (checksum mismatch), foreign, or from a newer format; the
        message is one line naming the file.

    Examples
    --------
    >>> import tempfile, torch
    >>> folder = tempfile.mkdtemp()
    >>> _ = write_checkpoint({"method": "toy", "config": {}, "epoch": 1, "model": {"w": torch.ones(2)}},
    ...                      folder + "/checkpoint.pt")
    >>> read_checkpoint(folder)["model"]["w"]
    tensor([1., 1.])
    >>> _ = open(folder + "/empty.pt", "wb").close()
    >>> read_checkpoint(folder + "/empty.pt")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    fastassoc.methods.checkpoint.CheckpointError: .../empty.pt: empty file (0 bytes), not a checkpoint
    """
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    archive = _unseal(path.read_bytes(), path)
    try:
        state = torch.load(io.BytesIO(archive), map_location="cpu", weights_only=True)
    except Exception as error:  # a sealed archive torch cannot read: report it in one line
        reason = " ".join(str(error).split())[:200]
        raise CheckpointError(f"{path}: cannot be loaded ({type(error).__name__}: {reason})") from error
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        keys = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not a fastassoc trainer checkpoint (needs {list(REQUIRED_KEYS)}, "
                              f"holds {keys})")
    return state


def to_device(value, device):
    """``value`` with every tensor (inside dicts, lists, tuples) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    return value
