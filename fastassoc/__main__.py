"""``python -m fastassoc``: what this installation holds, so a user sees what they got.

Prints the versions of fastassoc, Python, torch (and the CUDA it was built with), triton and
NumPy; whether the compiled core ``fastassoc._C`` is built and how (the CPU flags and run-time
ISA dispatch it was compiled with, OpenMP, CUDA and its architectures, read from the
``_build_info.json`` that CMakeLists.txt writes beside the module); the vector extensions
of the CPU it runs on; and :func:`fastassoc.available_backends`, each op's backends with the
reason for any that cannot run.

``--json`` prints the same as one JSON object. ``--require BACKEND`` (repeatable) exits
with status 1 unless every named backend is built here; cibuildwheel uses it to prove a
wheel carries its compiled core.

Examples
--------
>>> from fastassoc.__main__ import report
>>> info = report()
>>> sorted(info)
['backends', 'core', 'cpu', 'versions']
>>> info["versions"]["fastassoc"] == __import__("fastassoc").__version__
True
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib
import platform
import sys
import warnings

# CPU features that change which code runs: the core's AVX2 / AVX-512 clones, int8 screening
# (VNNI, AMX) on x86; NEON dot products, SVE and int8 matrix multiply on aarch64.
_INTERESTING_CPU_FLAGS = ("sse4_2", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile",
                          "amx_int8", "asimd", "asimddp", "sve", "sve2", "i8mm", "bf16")


def _distribution_version(name: str) -> str | None:
    """Installed version of ``name`` without importing it (triton's import takes seconds)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_features(cpuinfo: str | None = None) -> list[str]:
    """Vector extensions of this CPU that matter to the kernels (from /proc/cpuinfo on Linux;
    empty where it cannot be read). ``cpuinfo`` is the file's text, for tests."""
    if cpuinfo is None:
        try:
            cpuinfo = pathlib.Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        # x86 calls the list "flags", aarch64 "Features"; one CPU's line is enough.
        if key.strip() in ("flags", "Features"):
            flags = set(value.split())
            break
    return [flag for flag in _INTERESTING_CPU_FLAGS if flag in flags]


def core_build_info(core) -> dict | None:
    """How the compiled core ``core`` was built: the JSON CMake wrote beside it, or None when
    it is missing (a core built before the file existed)."""
    path = pathlib.Path(core.__file__).with_name("_build_info.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def report() -> dict:
    """Everything ``python -m fastassoc`` prints, as a dict with keys ``versions``, ``core``,
    ``cpu`` and ``backends`` (op -> backend -> True or the reason it is unavailable)."""
    import numpy
    import torch

    import fastassoc
    from fastassoc import _backend

    versions = {
        "fastassoc": fastassoc.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _distribution_version("triton"),
        "numpy": numpy.__version__,
    }
    with warnings.catch_warnings():
        # The report says it itself when the core is missing; no need for the run-time warning.
        warnings.simplefilter("ignore")
        try:
            core = _backend.compiled_core()
            load_error = None
        except ImportError as error:      # a FASTASSOC_EXTENSION path that does not load
            core, load_error = None, str(error)
        backends = fastassoc.available_backends()
    core_info: dict = {"built": core is not None}
    if core is not None:
        core_info["path"] = core.__file__
        core_info["cuda"] = bool(core.has_cuda())
        core_info["build"] = core_build_info(core)
        has_openmp = getattr(core, "has_openmp", None)
        core_info["openmp"] = (core_info["build"]["openmp"] if core_info["build"] is not None
                               else bool(has_openmp()) if has_openmp is not None else None)
        wait_policy = getattr(core, "wait_policy", None)
        core_info["wait_policy"] = wait_policy() if wait_policy is not None else None
    elif load_error:
        core_info["error"] = load_error
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    cpu = {"machine": platform.machine(), "system": platform.system(), "features": cpu_features(),
           "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpus": gpus}
    return {"versions": versions, "core": core_info, "cpu": cpu, "backends": backends}


def format_report(info: dict) -> str:
    """The human-readable form of :func:`report`."""
    versions, core, cpu = info["versions"], info["core"], info["cpu"]

    def shown(value) -> str:
        return "not installed" if value is None else str(value)

    lines = [f"fastassoc {versions['fastassoc']} (Python {versions['python']})",
             f"torch {versions['torch']} (CUDA {versions['torch_cuda'] or 'none: CPU build'}), "
             f"triton {shown(versions['triton'])}, numpy {versions['numpy']}",
             f"CPU: {cpu['machine']} {cpu['system']}, {cpu['logical_cpus']} logical CPUs, torch threads "
             f"{cpu['torch_threads']}, features: {' '.join(cpu['features']) or 'unknown'}",
             f"GPUs: {', '.join(cpu['gpus']) or 'none visible'}"]
    if not core["built"]:
        lines.append("compiled core: no" + (f" ({core['error']})" if core.get("error") else "")
                     + " -- only the reference and triton backends run; install CMake >= 3.18 and a C++17 "
                       "compiler, then `pip install --force-reinstall --no-deps --no-cache-dir fastassoc`")
    else:
        build = core["build"]
        lines.append(f"compiled core: yes ({core['path']})")
        if build is None:
            lines.append("  build details: unknown (no _build_info.json beside the module; rebuild to record them)")
        else:
            dispatch = "AVX2/AVX-512 clones chosen at run time" if build["runtime_isa_dispatch"] else "none"
            lines.append(f"  C++: {build['cxx_compiler']}, {build['build_type']}, target {build['target_processor']}, "
                         f"flags {build['cpu_flags'] or '(compiler default)'}, run-time ISA dispatch: {dispatch}")
            openmp = f"yes ({build['openmp_version']})" if build["openmp"] else "no (kernels run on one thread)"
            lines.append(f"  OpenMP: {openmp}")
            cuda = (f"yes (nvcc {build['cuda_compiler_version']}, architectures {build['cuda_architectures']})"
                    if build["cuda"] else "no")
            lines.append(f"  CUDA kernels: {cuda}")
        if build is None:
            openmp = {True: "yes", False: "no (kernels run on one thread)", None: "unknown"}[core["openmp"]]
            lines.append(f"  OpenMP: {openmp}")
            lines.append(f"  CUDA kernels: {'yes' if core['cuda'] else 'no'}")
    if core.get("wait_policy"):
        lines.append(f"  wait policy: {core['wait_policy']} (FASTASSOC_WAIT_POLICY or fastassoc._C.set_wait_policy: "
                     "auto, passive, active; README, In a training loop)")
    backend_names = list(next(iter(info["backends"].values()), {}))   # BACKENDS order
    width = max(len(op) for op in info["backends"])
    lines.append("")
    lines.append(f"{'op':<{width}}  " + "  ".join(f"{name:<9}" for name in backend_names))
    reasons: dict[str, str] = {}
    for op, entry in info["backends"].items():
        cells = []
        for name in backend_names:
            status = entry.get(name)
            if status is True:
                cells.append(f"{'yes':<9}")
            else:
                number = reasons.setdefault(str(status), str(len(reasons) + 1))
                cells.append(f"{'no [' + number + ']':<9}")
        lines.append(f"{op:<{width}}  " + "  ".join(cells))
    for reason, number in reasons.items():
        lines.append(f"[{number}] {reason}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastassoc",
                                     description="Show what this fastassoc installation holds.")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--require", action="append", default=[], metavar="BACKEND",
                        help="exit with status 1 unless BACKEND (cpu, cuda, triton) is built here")
    args = parser.parse_args(argv)
    from fastassoc import _backend
    unknown = [name for name in args.require if name not in _backend.BACKENDS]
    if unknown:
        parser.error(f"--require must name one of {', '.join(_backend.BACKENDS)}; got {', '.join(unknown)}")
    try:
        _backend.wait_policy_from_env()
    except ValueError as error:
        parser.error(f"{error} (every op would raise the same)")
    info = report()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    missing = []
    for name in args.require:
        ok, reason = _backend._built(name)
        if not ok:
            missing.append(f"{name}: {reason}")
    if missing:
        print("fastassoc: error: required backend not built: " + "; ".join(missing), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
