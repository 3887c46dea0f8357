"""The build works beyond this machine's defaults, and an installation says what it holds.

* CMakeLists.txt: CPU flags only where they apply (``-march=x86-64-v2`` on x86-64 by
  default, nothing for aarch64), the CUDA architectures of a release build, and a serial
  build without OpenMP whose objects need no OpenMP runtime. These configure the project
  into a temporary folder (a few seconds each); one compiles a single translation unit.
* The pure-Python fallback: a source build with no usable C++ compiler gives a
  ``py3-none-any`` wheel carrying LICENSE and ``py.typed``, which imports, answers with the
  reference backend and says the core is missing (``python -m fastassoc --require cpu``
  fails with one line).
* ``python -m fastassoc``: versions, the compiled core and the backend table.

The platform wheel itself (compiled core inside) is built and tested by ``make wheel-check``
(.ci/wheel_check.sh), which CI runs after the tests.
"""
from __future__ import annotations

import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile

import pytest

from fastassoc import __main__ as fastassoc_main
from fastassoc import _backend

ROOT = pathlib.Path(__file__).resolve().parents[1]
NEEDS_CMAKE = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None,
                                 reason="needs cmake and a C++ compiler")


def _pybind11_dir() -> str:
    pybind11 = pytest.importorskip("pybind11")
    return pybind11.get_cmake_dir()


def _configure(build_dir: pathlib.Path, *defines: str, env: dict | None = None) -> dict:
    """Configure the project into ``build_dir`` and return its ``_build_info.json``."""
    import sysconfig
    command = ["cmake", "-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
               f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={_pybind11_dir()}",
               f"-DPython_INCLUDE_DIR={sysconfig.get_paths()['include']}", *defines]
    if shutil.which("ninja"):
        command += ["-G", "Ninja"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((build_dir / "_build_info.json").read_text())


# ----------------------------------------------------------------------------- CMake

@NEEDS_CMAKE
def test_serial_build_compiles_without_openmp(tmp_path):
    """FASTASSOC_OPENMP=OFF: configure records no OpenMP, and a kernel file calling omp_*
    compiles to an object with no reference to an OpenMP runtime (GOMP_*, omp_*, __kmpc_*)."""
    info = _configure(tmp_path, "-DFASTASSOC_OPENMP=OFF", "-DFASTASSOC_CUDA=OFF")
    assert info["openmp"] is False and info["openmp_version"] == ""
    source = "csrc/cpu/core.cpp"
    assert "omp_get_num_threads" in (ROOT / source).read_text(), "pick a translation unit that calls omp_*"
    if not shutil.which("ninja"):
        pytest.skip("compiling a single object needs the Ninja generator")
    target = f"CMakeFiles/_C.dir/{source}.o"
    result = subprocess.run(["cmake", "--build", str(tmp_path), "--target", target], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    if shutil.which("nm") is None:
        pytest.skip("nm is needed to list the object's undefined symbols")
    symbols = subprocess.run(["nm", "-u", str(tmp_path / target)], capture_output=True, text=True,
                             check=True).stdout.split()
    openmp = [s for s in symbols if s.startswith(("GOMP_", "omp_", "__kmpc_"))]
    assert not openmp, f"a serial object still needs the OpenMP runtime: {openmp[:5]}"


@NEEDS_CMAKE
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="host default checked on x86-64")
def test_x86_64_defaults_to_the_portable_baseline_and_release_cuda_architectures(tmp_path):
    with_cuda = shutil.which("nvcc") is not None
    info = _configure(tmp_path, f"-DFASTASSOC_CUDA={'ON' if with_cuda else 'OFF'}",
                      "-DFASTASSOC_CUDA_ARCHITECTURES=release")
    assert info["target_processor"] == "x86_64"
    assert info["cpu_flags"] == "-march=x86-64-v2"
    if sys.platform.startswith("linux"):    # GCC and LLVM clang on Linux ship an OpenMP runtime
        assert info["openmp"] is True, "the default build uses OpenMP where the compiler has it"
    if not with_cuda:
        assert info["cuda"] is False
        pytest.skip("no nvcc: CUDA architectures not checked")
    assert info["cuda"] is True
    architectures = info["cuda_architectures"].split()
    # SASS for A100, RTX 30xx/A40, L4/RTX 40xx, H100 and PTX that newer GPUs JIT-compile.
    assert {"80-real", "86-real", "89-real", "90-real"} <= set(architectures)
    assert any(arch.endswith("-virtual") for arch in architectures)


@NEEDS_CMAKE
def test_cross_configure_for_aarch64_passes_no_x86_flags(tmp_path):
    """A cross build for aarch64 (GH200, Graviton) gets no -march and no x86 run-time clones.
    With an aarch64 cross compiler on PATH the configure uses it; otherwise the host compiler
    stands in (the flags are chosen from CMAKE_SYSTEM_PROCESSOR, not from the compiler)."""
    cross = shutil.which("aarch64-linux-gnu-g++")
    toolchain = tmp_path / "aarch64.cmake"
    toolchain.write_text(textwrap.dedent(f"""\
        set(CMAKE_SYSTEM_NAME Linux)
        set(CMAKE_SYSTEM_PROCESSOR aarch64)
        set(CMAKE_CXX_COMPILER {cross or shutil.which("c++")})
        """))
    info = _configure(tmp_path / "build", f"-DCMAKE_TOOLCHAIN_FILE={toolchain}", "-DFASTASSOC_CUDA=OFF")
    assert info["target_processor"] == "aarch64"
    assert info["cpu_flags"] == "", f"x86 flags leaked into an aarch64 build: {info['cpu_flags']}"
    if not cross:
        pytest.skip("no aarch64-linux-gnu-g++: flags checked, nothing compiled for aarch64")
    assert info["runtime_isa_dispatch"] is False, "target_clones(avx2, ...) cannot work on aarch64"
    if not shutil.which("ninja"):
        pytest.skip("compiling a single object needs the Ninja generator")
    # Kernel files compiled for aarch64 with OpenMP and the project's flags: core.cpp, and
    # knn.cpp, whose x86 run-time clones must drop out where they cannot work.
    for source in ("core.cpp", "knn.cpp"):
        target = f"CMakeFiles/_C.dir/csrc/cpu/{source}.o"
        result = subprocess.run(["cmake", "--build", str(tmp_path / "build"), "--target", target],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert (tmp_path / "build" / target).read_bytes()[18:20] == (183).to_bytes(2, "little"), \
            f"{source}: not an aarch64 object"


@NEEDS_CMAKE
def test_explicit_arch_options(tmp_path):
    assert _configure(tmp_path / "none", "-DFASTASSOC_ARCH=none", "-DFASTASSOC_CUDA=OFF")["cpu_flags"] == ""
    command = ["cmake", "-S", str(ROOT), "-B", str(tmp_path / "bad"), f"-DPython_EXECUTABLE={sys.executable}",
               f"-Dpybind11_DIR={_pybind11_dir()}", "-DFASTASSOC_CUDA=OFF", "-DFASTASSOC_ARCH=no-such-cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    message = " ".join(result.stderr.split())      # CMake wraps long messages
    assert "FASTASSOC_ARCH=no-such-cpu" in message and "rejects -march=no-such-cpu" in message


# ----------------------------------------------------------------------------- packaging

def test_license_and_cibuildwheel_configuration():
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert (ROOT / "fastassoc" / "py.typed").exists()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    linux = config["tool"]["cibuildwheel"]["linux"]
    assert set(linux["archs"]) >= {"x86_64", "aarch64"}
    assert config["tool"]["cibuildwheel"]["environment"]["FASTASSOC_REQUIRE_CORE"] == "1"


@pytest.fixture(scope="module")
def pure_wheel(tmp_path_factory):
    """The wheel `pip` builds from source on a machine whose C++ compiler does not work."""
    pytest.importorskip("scikit_build_core")
    out = tmp_path_factory.mktemp("pure")
    env = {**os.environ, "CXX": "/bin/false", "FASTASSOC_REQUIRE_CORE": "0", "PIP_NO_INPUT": "1"}
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                             "--no-cache-dir", "-q", "-w", str(out / "dist"), f"-Cbuild-dir={out / 'build'}",
                             str(ROOT)], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    wheels = list((out / "dist").glob("fastassoc-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_no_compiler_gives_a_pure_python_wheel_with_license_and_py_typed(pure_wheel):
    assert pure_wheel.name.endswith("-py3-none-any.whl"), pure_wheel.name
    names = zipfile.ZipFile(pure_wheel).namelist()
    assert "fastassoc/py.typed" in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") or name.endswith(".dist-info/LICENSE")
               for name in names), [n for n in names if "dist-info" in n]
    assert not any(name.startswith("fastassoc/_C") for name in names)


def _run_installed(site: pathlib.Path, code: str, cwd: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    """Run Python with ``site`` as the only fastassoc: ``-S`` skips the .pth files, among them
    the development checkout's editable finder, which would shadow the installed package;
    the dependencies (torch, numpy) come from this interpreter's site-packages."""
    import sysconfig
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]])}
    env.pop("FASTASSOC_EXTENSION", None)
    command = [sys.executable, "-S", code] if code.endswith(".py") else [sys.executable, "-S", "-c", code]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def test_pure_install_runs_the_reference_backend_and_says_what_is_missing(pure_wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(pure_wheel) as wheel:      # what `pip install` unpacks for a pure wheel
        wheel.extractall(site)
    check = textwrap.dedent("""\
        import json, sys, warnings
        import torch
        import fastassoc
        assert fastassoc.__file__.startswith(sys.argv[1]), fastassoc.__file__
        x = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            distances, indices = fastassoc.topk_anchors(x, x, 3)
            fastassoc.topk_anchors(x, x, 3)
        messages = [str(w.message) for w in caught if "fastassoc._C" in str(w.message)]
        assert len(messages) == 1 and "C++17 compiler" in messages[0], messages
        order = torch.cdist(x, x).argsort(dim=1, stable=True)[:, :3]
        assert torch.equal(indices, order), (indices, order)
        print(json.dumps(fastassoc.available_backends("topk_anchors")["topk_anchors"]))
        """)
    script = tmp_path / "check.py"
    script.write_text(check)
    result = _run_installed(site, str(script), tmp_path, str(site))
    assert result.returncode == 0, result.stderr[-3000:]
    backends = json.loads(result.stdout.strip().splitlines()[-1])
    assert backends["reference"] is True and "not built" in backends["cpu"]
    report = _run_installed(site, "import runpy; runpy.run_module('fastassoc', run_name='__main__')", tmp_path,
                            "--require", "cpu")
    assert report.returncode == 1
    assert "compiled core: no" in report.stdout
    error_lines = [line for line in report.stderr.splitlines() if line.strip()]
    assert error_lines[-1].startswith("fastassoc: error: required backend not built: cpu:"), report.stderr


# ----------------------------------------------------------------------------- python -m fastassoc

# The subprocesses run outside the checkout: from its root, `python -m fastassoc` would import
# the source tree instead of an installed wheel (cibuildwheel's test step).

def test_python_m_fastassoc_reports_versions_core_and_backends(tmp_path):
    import torch
    core = _backend.compiled_core()
    result = subprocess.run([sys.executable, "-m", "fastassoc", "--json", "--require", "cpu"], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    # --require cpu: status 1 exactly when this environment has no compiled core.
    assert result.returncode == (0 if core is not None else 1), result.stderr[-3000:]
    info = json.loads(result.stdout)
    assert info["versions"]["torch"] == torch.__version__
    assert info["versions"]["torch_cuda"] == torch.version.cuda
    assert info["core"]["built"] is (core is not None)
    assert set(info["backends"]) == set(_backend.FAMILIES)
    assert all(entry["reference"] is True for entry in info["backends"].values())
    text = subprocess.run([sys.executable, "-m", "fastassoc"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert text.returncode == 0 and f"torch {torch.__version__}" in text.stdout
    assert ("compiled core: yes" if core is not None else "compiled core: no") in text.stdout
    for op in _backend.FAMILIES:
        assert op in text.stdout


def test_python_m_fastassoc_rejects_an_unknown_backend(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "fastassoc", "--require", "gpu"], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode == 2 and "--require must name one of" in bad.stderr


def test_cpu_features_are_read_from_cpuinfo():
    x86 = "processor\t: 0\nflags\t\t: fpu sse4_2 avx2 fma avx512f avx512_vnni\nprocessor\t: 1\nflags\t: fpu\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd asimddp sve i8mm\n"
    assert fastassoc_main.cpu_features(x86) == ["sse4_2", "avx2", "fma", "avx512f", "avx512_vnni"]
    assert fastassoc_main.cpu_features(arm) == ["asimd", "asimddp", "sve", "i8mm"]
    assert fastassoc_main.cpu_features("") == []


def test_report_names_the_wait_policy_and_rejects_an_unknown_one(monkeypatch, capsys):
    core = _backend.compiled_core()
    if core is None or not hasattr(core, "wait_policy"):
        pytest.skip("the compiled core is not built")
    previous = core.wait_policy()
    try:
        core.set_wait_policy("passive")
        assert fastassoc_main.report()["core"]["wait_policy"] == "passive"
        assert "wait policy: passive" in fastassoc_main.format_report(fastassoc_main.report())
    finally:
        core.set_wait_policy(previous)
    monkeypatch.setenv("FASTASSOC_WAIT_POLICY", "sometimes")
    with pytest.raises(SystemExit) as stop:
        fastassoc_main.main([])
    assert stop.value.code == 2
    assert "FASTASSOC_WAIT_POLICY must be one of auto, active, passive; got 'sometimes'" in capsys.readouterr().err
