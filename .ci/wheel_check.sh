#!/usr/bin/env bash
# CI, after `make test`: build the platform wheel users get and test it outside the checkout.
#
# The wheel comes from the same CMake build tree as the editable install (build/<wheel tag>),
# so the C++ objects are reused. WHEEL_CUDA_ARCHITECTURES (default release: sm_80/86/89/90 +
# PTX) recompiles the CUDA objects for the release list; CI passes "dev", the editable
# install's own set, so nothing recompiles (nvcc takes ~5x longer for the release list). The wheel is unpacked into a
# throwaway folder and imported with `python -S` (no .pth files, so the checkout's editable
# finder cannot shadow it); torch and numpy come from the virtual environment. The
# no-compiler (pure-Python) install is exercised by tests/test_build.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

start=$(date +%s)
# FASTASSOC_REQUIRE_CORE: a failed C++ build must fail here, not fall back to a pure wheel.
# WHEEL_CHECK_ARGS: extra pip arguments, e.g. -Cbuild-dir=/tmp/x -Ccmake.define.FASTASSOC_CUDA=OFF.
# shellcheck disable=SC2086
FASTASSOC_REQUIRE_CORE=1 "$PY" -m pip wheel -q --no-build-isolation --no-deps --no-cache-dir -w "$WORK/dist" \
    -Ccmake.define.FASTASSOC_CUDA_ARCHITECTURES="${WHEEL_CUDA_ARCHITECTURES:-release}" ${WHEEL_CHECK_ARGS:-} .
wheel=$(ls "$WORK"/dist/fastassoc-*.whl)
echo "wheel-check: built $(basename "$wheel") in $(( $(date +%s) - start )) s"
case "$(basename "$wheel")" in
  *-py3-none-any.whl) echo "wheel-check: error: a pure-Python wheel, the compiled core is missing" >&2; exit 1 ;;
esac

"$PY" - "$wheel" <<'PYEOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
required = {"fastassoc/py.typed": "py.typed", "fastassoc/_build_info.json": "the core's build record"}
missing = [what for name, what in required.items() if name not in names]
if not any(n.startswith("fastassoc/_C.") and n.endswith((".so", ".pyd")) for n in names):
    missing.append("the compiled core fastassoc/_C")
if not any(n.endswith(("dist-info/licenses/LICENSE", "dist-info/LICENSE")) for n in names):
    missing.append("LICENSE")
if missing:
    sys.exit("wheel-check: error: the wheel lacks " + ", ".join(missing))
PYEOF

"$PY" -m zipfile -e "$wheel" "$WORK/site"
purelib=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cd "$WORK"
export PYTHONPATH="$WORK/site:$purelib"
unset FASTASSOC_EXTENSION
"$PY" -S -m fastassoc --require cpu
"$PY" -S - "$WORK/site" <<'PYEOF'
import sys
import torch
import fastassoc
from fastassoc import _backend
assert fastassoc.__file__.startswith(sys.argv[1]), f"imported {fastassoc.__file__}, not the wheel"
assert _backend.compiled_core().__file__.startswith(sys.argv[1])
x = torch.randn(300, 32, generator=torch.Generator().manual_seed(0))
segments = torch.tensor([0, 100, 300])
cpu = fastassoc.topk_anchors(x, x, 5, anchor_offsets=segments, query_segments=(torch.arange(300) >= 100).long(),
                             exclude=torch.arange(300), backend="cpu")
reference = fastassoc.topk_anchors(x, x, 5, anchor_offsets=segments, query_segments=(torch.arange(300) >= 100).long(),
                                   exclude=torch.arange(300), backend="reference")
assert torch.equal(cpu[1], reference[1]) and torch.allclose(cpu[0], reference[0], rtol=1e-5, atol=1e-5)
print("wheel-check: the wheel's compiled core agrees with the reference")
PYEOF
echo "wheel-check: ok in $(( $(date +%s) - start )) s"
