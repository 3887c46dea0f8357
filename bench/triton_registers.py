"""Registers and spills of the distance-family Triton kernels compiled for sm_90, without a GPU.

Compiles ``_fused_topk_kernel`` and ``_distance_tile_kernel`` ahead of time for
``GPUTarget("cuda", 90, 32)`` (H100/H200) with explicit signatures and constexprs, then
runs Triton's bundled ``ptxas -v`` on the produced PTX and reads its resource report
(registers, spill stores/loads, stack frame). The metadata's ``n_regs`` / ``n_spills`` are
filled only when a driver loads the cubin, which needs a GPU; ``ptxas -v`` is the same
assembler on the same PTX, so the figures are those the GPU would report.

Usage::

    python bench/triton_registers.py                 # markdown table on stdout
    python bench/triton_registers.py --json out.json # and the rows as JSON
    python bench/triton_registers.py --quick         # k = 1 and 16 only (the test uses it)

Must run without ``TRITON_INTERPRET`` (the script clears it for itself).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastassoc.kernels.triton import _common  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)

_TOPK_SIGNATURE = dict(
    rows_ptr="*fp32", cols_ptr="*fp32", row_aux_ptr="*fp32", col_aux_ptr="*fp32", row_ids_ptr="*i64",
    row_ref_ptr="*i64", row_group_ptr="*i64", col_group_ptr="*i64", row_bias_ptr="*fp32", col_bias_ptr="*fp32",
    bias_scale_ptr="*fp32", lower_value_ptr="*fp32", lower_index_ptr="*i64", work_ptr="*i64",
    out_value_ptr="*fp32", out_index_ptr="*i32", col_value_ptr="*fp32", col_index_ptr="*i32",
    dim="i32", num_slots="i32", position_base="i32", col_pass_start="i32", col_pass_size="i32",
    stride_row="i32", stride_col="i32")

_TILE_SIGNATURE = dict(
    rows_ptr="*fp32", cols_ptr="*fp32", row_aux_ptr="*fp32", col_aux_ptr="*fp32", row_ids_ptr="*i64",
    row_pid_ptr="*i64", row_cam_ptr="*i64", col_pid_ptr="*i64", col_cam_ptr="*i64", row_ref_ptr="*i64",
    out_ptr="*fp32", num_rows="i32", num_cols="i32", dim="i32", stride_row="i32", stride_col="i32",
    stride_out="i32")


def ptxas_path() -> str:
    from triton.backends.nvidia import compiler
    return compiler.get_ptxas(90).path


def compile_kernel(fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int):
    full = dict(signature, **{name: "constexpr" for name in constexprs})
    positions = {(fn.arg_names.index(name),): value for name, value in constexprs.items()}
    source = ASTSource(fn=fn, signature=full, constexprs=positions)
    return triton.compile(source, target=TARGET, options=dict(num_warps=num_warps, num_stages=num_stages))


_REPORT = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def resources(kernel) -> dict:
    """Registers, spill bytes and stack frame from ``ptxas -v`` on the kernel's PTX."""
    ptx = kernel.asm["ptx"]
    arch = "sm_90a"
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as handle:
            handle.write(ptx)
        result = subprocess.run([ptxas_path(), "-v", f"--gpu-name={arch}", path, "-o", os.path.join(folder, "k.o")],
                                capture_output=True, text=True, check=True)
    registers = _REPORT.search(result.stderr)
    spill = _SPILL.search(result.stderr)
    if registers is None or spill is None:
        raise RuntimeError(f"unexpected ptxas report:\n{result.stderr}")
    return dict(registers=int(registers.group(1)), stack=int(spill.group(1)), spill_stores=int(spill.group(2)),
                spill_loads=int(spill.group(3)), shared=kernel.metadata.shared)


def _configs(k_pad: int, block_m: int, half: bool = False) -> list:
    if hasattr(_common, "gpu_configs"):
        return _common.gpu_configs(k_pad, block_m, half)
    return _common._gpu_configs()   # before per-k configs existed


def _block_m(k_pad: int) -> int:
    if hasattr(_common, "block_m_for_gpu"):
        return _common.block_m_for_gpu(k_pad)
    return 64 if k_pad <= 32 else 32


def _with_optional(fn, constexprs: dict) -> dict:
    """Drop constexprs an older version of the kernel does not take (before/after runs)."""
    return {name: value for name, value in constexprs.items() if name in fn.arg_names}


def topk_cases(quick: bool, parts: str) -> list[dict]:
    """Configurations the GPU launcher can pick (see ``_common.fused_topk`` / ``gpu_configs``)."""
    cases = []
    ks = (1, 16) if quick else (1, 8, 16, 32, 64)
    for k in ks if "fp32" in parts else ():
        k_pad = max(triton.next_power_of_2(k), 2)
        block_m = _block_m(k_pad)
        for col_k in (0, k):
            for config in _configs(k_pad, block_m):
                cases.append(dict(kernel="_fused_topk_kernel", K=k, K_PAD=k_pad, COL_K=col_k, BLOCK_M=block_m,
                                  BLOCK_N=config.kwargs["BLOCK_N"], BLOCK_K=config.kwargs["BLOCK_K"],
                                  num_warps=config.num_warps, num_stages=config.num_stages, inputs="fp32"))
    # Tensor-core inputs (tf32 dots, bf16 rows) at k = 16, same configs.
    for inputs in ("tf32", "bf16") if "tensor-core" in parts else ():
        for config in _configs(16, _block_m(16), inputs == "bf16"):
            cases.append(dict(kernel="_fused_topk_kernel", K=16, K_PAD=16, COL_K=0, BLOCK_M=_block_m(16),
                              BLOCK_N=config.kwargs["BLOCK_N"], BLOCK_K=config.kwargs["BLOCK_K"],
                              num_warps=config.num_warps, num_stages=config.num_stages, inputs=inputs))
    return cases


def run_topk(case: dict) -> dict:
    constexprs = dict(METRIC=0, LINKAGE=0, REF_MODE=_common.REF_EXCLUDE, GROUP_MASK=False, LOWER=False,
                      K=case["K"], K_PAD=case["K_PAD"], COL_K=case["COL_K"],
                      PRECISION="tf32" if case.get("inputs") == "tf32" else "ieee", CAST_F32=False,
                      ACC_DTYPE=tl.float32, PACKED=True, INTERPRET_DOT=False, BLOCK_M=case["BLOCK_M"],
                      BLOCK_N=case["BLOCK_N"], BLOCK_K=case["BLOCK_K"])
    constexprs = _with_optional(_common._fused_topk_kernel, constexprs)
    signature = dict(_TOPK_SIGNATURE)
    if case.get("inputs") == "bf16":
        signature.update(rows_ptr="*bf16", cols_ptr="*bf16")
    kernel = compile_kernel(_common._fused_topk_kernel, signature, constexprs, case["num_warps"],
                            case["num_stages"])
    return resources(kernel)


def run_tile(config) -> dict:
    constexprs = dict(METRIC=0, JUNK=True, EXCLUDE=False, PRECISION="ieee", CAST_F32=False, ACC_DTYPE=tl.float32,
                      INTERPRET_DOT=False, BLOCK_M=64, BLOCK_N=config.kwargs["BLOCK_N"],
                      BLOCK_K=config.kwargs["BLOCK_K"])
    constexprs = _with_optional(_common._distance_tile_kernel, constexprs)
    kernel = compile_kernel(_common._distance_tile_kernel, _TILE_SIGNATURE, constexprs, config.num_warps,
                            config.num_stages)
    return resources(kernel)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--quick", action="store_true", help="k = 1 and 16 only, no distance-tile kernel")
    parser.add_argument("--parts", default="fp32,tensor-core,tile",
                        help="comma list of: fp32 (top-k, fp32 rows), tensor-core (top-k, tf32/bf16), tile")
    args = parser.parse_args(argv)
    rows = []
    for case in topk_cases(args.quick, args.parts):
        started = time.perf_counter()
        case.update(run_topk(case))
        case["compile_s"] = round(time.perf_counter() - started, 1)
        rows.append(case)
        print(json.dumps(case), file=sys.stderr, flush=True)
    if not args.quick and "tile" in args.parts:
        tile_configs = _common.tile_configs() if hasattr(_common, "tile_configs") else _common._gpu_configs()
        for config in tile_configs:
            case = dict(kernel="_distance_tile_kernel", K=None, K_PAD=None, COL_K=None, BLOCK_M=64,
                        BLOCK_N=config.kwargs["BLOCK_N"], BLOCK_K=config.kwargs["BLOCK_K"],
                        num_warps=config.num_warps, num_stages=config.num_stages, inputs="fp32")
            case.update(run_tile(config))
            rows.append(case)
            print(json.dumps(case), file=sys.stderr, flush=True)
    print("| kernel | inputs | K | COL_K | BLOCK_M x N x K | warps | stages | registers | spill st/ld (B) | "
          "stack (B) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['kernel']} | {r.get('inputs', 'fp32')} | {r['K'] if r['K'] is not None else '-'} | "
              f"{r['COL_K'] if r['COL_K'] is not None else '-'} | {r['BLOCK_M']}x{r['BLOCK_N']}x{r['BLOCK_K']} | "
              f"{r['num_warps']} | {r['num_stages']} | {r['registers']} | {r['spill_stores']}/{r['spill_loads']} | "
              f"{r['stack']} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
