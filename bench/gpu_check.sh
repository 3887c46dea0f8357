#!/usr/bin/env bash
# One-command GPU check: build, CUDA tests, GPU benchmarks, one JSON + markdown summary.
#
#   bench/gpu_check.sh [--dry-run] [OUTDIR]      (make gpu-check OUT=OUTDIR)
#
# For a CUDA machine with no package index: torch, triton, nvcc, cmake and pybind11 are
# already installed (CuPy optional). Every stage runs under its own `timeout`, so one hang
# cannot eat the budget (about 7 minutes with the defaults); a failed or timed-out stage is
# recorded and the next stage still runs. OUTDIR (default: $OUT when set, else
# gpu-check-results/) receives one log per stage, stages.tsv, summary.json and summary.md.
#
# --dry-run (or GPU_CHECK_DRY_RUN=1): for a machine without a GPU. No build, a two-test
# subset and one benchmark id (skipped without a GPU), so the stage plumbing and the
# summary writer can be tested on CPU (tests/test_cuda_build.py does).
#
# Limits in seconds (override through the environment): GPU_CHECK_TOTAL_S (450: the whole
# run; each stage's limit is clamped to what is left, and a stage with under 10 s left is
# recorded as skipped), GPU_CHECK_BUILD_S (200), GPU_CHECK_TEST_S (120 per test stage),
# GPU_CHECK_BENCH_S (50 per workload); GPU_CHECK_PRECISIONS ("fp32 bf16"; the fp32
# workloads and W-ce run first, add tf32 for the third column). Tests run with
# FASTASSOC_TRITON_AUTOTUNE=0 (one config per kernel, so they do not spend the budget
# compiling every candidate; bench/triton_registers.py compiles all of them on any machine).
set -u
START=$(date +%s)

DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
OUTDIR=${1:-${OUT:-gpu-check-results}}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
TOTAL_S=${GPU_CHECK_TOTAL_S:-450}
BUILD_S=${GPU_CHECK_BUILD_S:-200}
TEST_S=${GPU_CHECK_TEST_S:-120}
BENCH_S=${GPU_CHECK_BENCH_S:-50}
PRECISIONS=${GPU_CHECK_PRECISIONS:-"fp32 bf16"}

mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$ROOT" || exit 2
export PYTHONUNBUFFERED=1
STAGES="$OUTDIR/stages.tsv"
printf 'stage\trc\tseconds\tlimit_s\tlog\n' >"$STAGES"

# stage NAME LIMIT_S LOGFILE COMMAND...: run under timeout, record rc and wall time.
# rc -1 = skipped: the total budget had less than 10 s left.
stage() {
    local name=$1 limit=$2 log=$3
    shift 3
    local start end rc left
    start=$(date +%s)
    left=$((TOTAL_S - (start - START) - 10))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -lt 10 ]; then
        echo "== $name skipped: the ${TOTAL_S}s budget is spent"
        printf '%s\t-1\t0\t0\t%s\n' "$name" "$log" >>"$STAGES"
        return 0
    fi
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$OUTDIR/$log" 2>&1
    rc=$?
    end=$(date +%s)
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$((end - start))" "$limit" "$log" >>"$STAGES"
    echo "   rc=$rc in $((end - start))s (log: $log)"
    return 0
}

# 1. environment: GPU name, driver, versions.
stage environment 60 environment.log "$PY" "$ROOT/bench/gpu_check_summary.py" environment \
    --out "$OUTDIR/environment.json"
if [ "$DRY_RUN" != 1 ]; then
    stage nvidia-smi 30 nvidia-smi.log nvidia-smi
fi

# 2. build the compiled core (CPU + CUDA kernels), unless the installed one already has CUDA.
if [ "$DRY_RUN" = 1 ]; then
    echo "== build skipped (dry run)"
elif "$PY" -c "import fastassoc._C as C, sys; sys.exit(0 if C.has_cuda() else 1)" 2>/dev/null; then
    echo "== build: the installed fastassoc._C has CUDA, reused" | tee "$OUTDIR/build.log"
    printf 'build\t0\t0\t%s\tbuild.log\n' "$BUILD_S" >>"$STAGES"
else
    stage build "$BUILD_S" build.log "$PY" -m pip install --no-build-isolation --no-deps -e .
fi

# 3. tests on the CUDA device: every parametrised case whose id names cuda (BACKEND_DEVICES:
# triton-cuda, cuda-cuda, reference-cuda) plus the GPU-specific files, which run on CUDA
# tensors whenever a GPU is present.
if [ "$DRY_RUN" = 1 ]; then
    stage tests "$TEST_S" tests.log "$PY" -m pytest -v -p no:cacheprovider tests/test_cuda_build.py \
        -k "cuda_device_count or has_cuda_iff"
else
    export FASTASSOC_TRITON_AUTOTUNE=0
    stage tests "$TEST_S" tests.log "$PY" -m pytest -v -p no:cacheprovider \
        tests/ops/test_triton_kernels.py tests/ops/test_triton_loss_memory.py tests/ops/test_triton_rerank.py \
        tests/test_cuda_build.py
    stage tests-cuda "$TEST_S" tests-cuda.log "$PY" -m pytest -v -p no:cacheprovider tests -k cuda \
        --deselect tests/ops/test_triton_kernels.py --deselect tests/ops/test_triton_loss_memory.py \
        --deselect tests/ops/test_triton_rerank.py \
        --deselect tests/test_cuda_build.py
    unset FASTASSOC_TRITON_AUTOTUNE
fi

# 4. GPU benchmarks at the named workloads: triton against the GEMM floor, one stage per
# workload and precision so that a slow one cannot starve the others.
bench() {   # bench NAME FILE SELECTION
    stage "bench $1" "$BENCH_S" "bench-$1.log" "$PY" -m pytest -q -p no:cacheprovider "$2" --benchmark-only \
        -k "$3" --benchmark-json "$OUTDIR/bench-$1.json" --benchmark-min-rounds=3 --benchmark-max-time=1.0
}
if [ "$DRY_RUN" = 1 ]; then
    bench W-rank-1M-fp32 bench/bench_gpu.py "W-rank-1M-fp32-triton or W-rank-1M-fp32-gemm"
else
    first=1
    for precision in $PRECISIONS; do
        for workload in W-rank-1M W-mutual-100k W-eval-MSMT W-merge-100k; do
            bench "$workload-$precision" bench/bench_gpu.py \
                "$workload-$precision-triton or $workload-$precision-gemm"
        done
        if [ "$first" = 1 ]; then bench W-ce bench/bench_gpu_loss.py "triton or gemm or torch"; first=0; fi
    done
    bench W-jaccard-gpu bench/bench_gpu_rerank.py "all"
fi

# 5. one summary.
"$PY" "$ROOT/bench/gpu_check_summary.py" summarize "$OUTDIR"
