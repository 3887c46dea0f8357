"""Where a run ran: library versions, source commit, device and CPU, for ``report.json``.

Every probe tolerates failure (no git, no ``/proc``, no CUDA): a missing fact is ``None``,
never an error, because a report must be written whatever the machine lacks.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import torch


def git_commit(package_dir: str | os.PathLike | None = None) -> dict:
    """The commit of the source checkout fastassoc was imported from.

    Returns
    -------
    dict
        ``commit`` (40 hex digits or None) and ``dirty`` (tracked files modified; None when
        unknown). None / None when fastassoc is not imported from a git work tree (an
        installed wheel), even if the current folder is one: the commit must be fastassoc's.
    """
    package_dir = Path(package_dir) if package_dir is not None else Path(__file__).resolve().parents[1]
    unknown = {"commit": None, "dirty": None}

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(package_dir), *args], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if not top or not (Path(top) / package_dir.name / "__init__.py").exists():
        return unknown
    try:
        if not (Path(top) / package_dir.name).samefile(package_dir):
            return unknown
    except OSError:
        return unknown
    commit = git("rev-parse", "HEAD")
    if commit is None:
        return unknown
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def cpu_model() -> str | None:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, ``sysctl`` on macOS), or None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Processor") and value.strip():
                    return value.strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            done = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5)
            if done.returncode == 0 and done.stdout.strip():
                return done.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or None


def run_environment(device: torch.device | str | None = None) -> dict:
    """Versions and machine of a run.

    Parameters
    ----------
    device : torch.device or str, optional
        The run's device; its name is looked up when it is a CUDA device.

    Returns
    -------
    dict
        ``fastassoc`` (version), ``git_commit``, ``git_dirty``, ``python``, ``platform``,
        ``torch``, ``cuda`` (the CUDA version torch was built with, or None), ``cuda_available``,
        ``device``, ``device_name``, ``cpu_model``, ``cpu_count``, ``torch_threads``,
        ``backends`` (:func:`fastassoc.available_backends`: per op, per backend, True or why not).

    Examples
    --------
    >>> env = run_environment("cpu")
    >>> env["device"], env["torch"] == torch.__version__
    ('cpu', True)
    """
    import fastassoc

    device = torch.device(device) if device is not None else None
    device_name = None
    if device is not None and device.type == "cuda":
        try:
            device_name = torch.cuda.get_device_name(device)
        except Exception:  # a report must not fail over a name lookup
            device_name = None
    try:
        backends = {op: dict(status) for op, status in fastassoc.available_backends().items()}
    except Exception:
        backends = None
    source = git_commit()
    return {
        "fastassoc": getattr(fastassoc, "__version__", None), "git_commit": source["commit"],
        "git_dirty": source["dirty"], "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "device": str(device) if device is not None else None, "device_name": device_name,
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "backends": backends,
    }
