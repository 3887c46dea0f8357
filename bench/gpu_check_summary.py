"""The summary writer of ``bench/gpu_check.sh``: environment facts and one JSON + markdown summary.

Subcommands
-----------
``environment --out FILE``
    Device name, capability and memory, driver, torch / triton / CuPy / nvcc versions as JSON
    (works without a GPU: the device fields are then null).
``summarize OUTDIR``
    Reads what the stages left in ``OUTDIR`` (``stages.tsv``, ``environment.json``, the
    pytest ``-v`` logs ``tests*.log`` and the pytest-benchmark files ``bench-*.json``) and
    writes ``summary.json`` and ``summary.md``: per stage its exit code and time, per test
    log the outcome counts and the failing test ids, per benchmark the median and the
    ratio to the GEMM floor of its group.

Test outcomes are parsed from the ``-v`` lines (``path::test[id] PASSED``), not from a
junit file, so a stage stopped by its timeout still reports every test that finished.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
_TEST_LINE = re.compile(r"^(?P<id>\S+::\S+?)\s+(?P<outcome>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_OUTCOME_NAMES = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped",
                  "XFAIL": "xfailed", "XPASS": "xpassed"}
# "SKIPPED [1] tests/x.py:12: reason" lines of -rs summaries are not per-test lines.
_FLOOR_PROVIDER = "gemm"


def environment() -> dict:
    """Facts about this machine's GPU stack (no GPU needed)."""
    info: dict = {"python": sys.version.split()[0]}
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        available = torch.cuda.is_available()
        info["cuda_available"] = available
        info["device_count"] = torch.cuda.device_count() if available else 0
        if available:
            properties = torch.cuda.get_device_properties(0)
            info["device_name"] = torch.cuda.get_device_name(0)
            info["capability"] = f"{properties.major}.{properties.minor}"
            info["memory_gib"] = round(properties.total_memory / 2**30, 1)
            info["multiprocessors"] = properties.multi_processor_count
        else:
            info["device_name"] = None
    except Exception as error:   # the summary must still be written
        info["torch_error"] = f"{type(error).__name__}: {error}"
    for module in ("triton", "cupy", "numpy"):
        try:
            info[module] = __import__(module).__version__
        except Exception:
            info[module] = None
    for tool, args in (("nvcc", ["--version"]), ("nvidia-smi", ["--query-gpu=name,driver_version",
                                                                "--format=csv,noheader"])):
        path = shutil.which(tool)
        if path is None:
            info[tool] = None
            continue
        try:
            result = subprocess.run([path, *args], capture_output=True, text=True, timeout=20)
            info[tool] = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr.strip()
        except Exception as error:
            info[tool] = f"{type(error).__name__}: {error}"
    try:
        import fastassoc._C as core
        info["fastassoc_core_has_cuda"] = bool(core.has_cuda())
    except Exception as error:
        info["fastassoc_core_has_cuda"] = f"{type(error).__name__}: {error}"
    return info


def parse_test_log(text: str) -> dict:
    """Outcome counts and failing ids from a ``pytest -v`` log (last outcome per id wins)."""
    outcomes: dict[str, str] = {}
    for line in text.splitlines():
        match = _TEST_LINE.match(line.strip())
        if match:
            outcomes[match.group("id")] = _OUTCOME_NAMES[match.group("outcome")]
    counts = {name: 0 for name in OUTCOMES}
    for outcome in outcomes.values():
        counts[outcome] += 1
    return {"counts": counts, "total": len(outcomes),
            "failed": sorted(i for i, o in outcomes.items() if o in ("failed", "error"))}


def parse_benchmarks(data: dict) -> list[dict]:
    """Rows (name, group, provider, median_s, ratio_to_gemm) of one pytest-benchmark JSON file."""
    rows = []
    for bench in data.get("benchmarks", []):
        extra = bench.get("extra_info", {}) or {}
        name = bench.get("name", "")
        provider = extra.get("provider") or bench.get("params", {}).get("provider") or name.rsplit("-", 1)[-1]
        rows.append({"name": name, "group": bench.get("group"), "provider": str(provider).strip("]"),
                     "median_s": bench["stats"]["median"], "rounds": bench["stats"].get("rounds"),
                     "ratio_to_gemm": extra.get("ratio_to_gemm"), "gpu": extra.get("gpu"),
                     "gemm_floor_s": extra.get("gemm_floor_s")})
    # Groups without a ratio in extra_info (W-ce): the group's gemm provider is the floor.
    floors = {row["group"]: row["median_s"] for row in rows if row["provider"].endswith(_FLOOR_PROVIDER)}
    for row in rows:
        if row["ratio_to_gemm"] is None and row["group"] in floors and floors[row["group"]] > 0:
            row["gemm_floor_s"] = floors[row["group"]]
            row["ratio_to_gemm"] = row["median_s"] / floors[row["group"]]
    return rows


def read_stages(path: str) -> list[dict]:
    stages = []
    if not os.path.exists(path):
        return stages
    with open(path) as handle:
        lines = handle.read().splitlines()
    for line in lines[1:]:
        parts = line.split("\t")
        if len(parts) != 5:
            continue
        name, rc, seconds, limit, log = parts
        rc_value = int(rc)
        if rc_value == -1:
            status = "skipped"   # the total time budget was spent before this stage
        else:
            status = "ok" if rc_value == 0 else ("timeout" if rc_value in (124, 137) else "failed")
        stages.append({"stage": name, "rc": rc_value, "status": status, "seconds": int(seconds),
                       "limit_s": int(limit), "log": log})
    return stages


def summarize(outdir: str) -> dict:
    summary: dict = {"outdir": outdir, "stages": read_stages(os.path.join(outdir, "stages.tsv"))}
    env_path = os.path.join(outdir, "environment.json")
    summary["environment"] = json.load(open(env_path)) if os.path.exists(env_path) else {}
    tests = {}
    pytest_logs = {stage["log"] for stage in summary["stages"] if stage["stage"].startswith("tests")}
    for log in sorted(pytest_logs):
        path = os.path.join(outdir, log)
        if os.path.exists(path):
            tests[log] = parse_test_log(open(path, errors="replace").read())
    summary["tests"] = tests
    totals = {name: sum(t["counts"][name] for t in tests.values()) for name in OUTCOMES}
    summary["test_totals"] = totals
    benchmarks = []
    for name in sorted(os.listdir(outdir)):
        if name.startswith("bench-") and name.endswith(".json"):
            try:
                benchmarks.extend(parse_benchmarks(json.load(open(os.path.join(outdir, name)))))
            except (ValueError, KeyError) as error:
                benchmarks.append({"name": name, "error": f"{type(error).__name__}: {error}"})
    summary["benchmarks"] = benchmarks
    # Benchmarks skipped for lack of time are reported, not failures; a test stage must run.
    summary["ok"] = (all(stage["status"] in ("ok", "skipped") for stage in summary["stages"])
                     and all(stage["status"] == "ok" for stage in summary["stages"]
                             if stage["stage"].startswith(("tests", "build")))
                     and totals["failed"] == 0 and totals["error"] == 0)
    with open(os.path.join(outdir, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=1)
    with open(os.path.join(outdir, "summary.md"), "w") as handle:
        handle.write(markdown(summary))
    return summary


def markdown(summary: dict) -> str:
    env = summary["environment"]
    lines = ["# GPU check", "",
             f"- device: {env.get('device_name')} (capability {env.get('capability')}, "
             f"{env.get('memory_gib')} GiB, {env.get('multiprocessors')} SMs)",
             f"- driver: {env.get('nvidia-smi')}; nvcc: {env.get('nvcc')}",
             f"- torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), triton {env.get('triton')}, "
             f"cupy {env.get('cupy')}; compiled core has CUDA: {env.get('fastassoc_core_has_cuda')}",
             f"- overall: {'OK' if summary['ok'] else 'NOT OK'}", "",
             "## Stages", "", "| stage | status | rc | seconds | limit |", "| --- | --- | --- | --- | --- |"]
    for stage in summary["stages"]:
        lines.append(f"| {stage['stage']} | {stage['status']} | {stage['rc']} | {stage['seconds']} | "
                     f"{stage['limit_s']} |")
    lines += ["", "## Tests", "", "| log | " + " | ".join(OUTCOMES) + " |",
              "| --- |" + " --- |" * len(OUTCOMES)]
    for log, result in summary["tests"].items():
        lines.append(f"| {log} | " + " | ".join(str(result["counts"][o]) for o in OUTCOMES) + " |")
    for log, result in summary["tests"].items():
        for test_id in result["failed"][:50]:
            lines.append(f"- FAILED ({log}): `{test_id}`")
    lines += ["", "## Benchmarks", "", "| benchmark | median (ms) | rounds | ratio to GEMM floor |",
              "| --- | --- | --- | --- |"]
    for row in summary["benchmarks"]:
        if "error" in row:
            lines.append(f"| {row['name']} | unreadable: {row['error']} | | |")
            continue
        ratio = f"{row['ratio_to_gemm']:.2f}x" if row.get("ratio_to_gemm") is not None else "-"
        lines.append(f"| {row['name']} | {row['median_s'] * 1e3:.2f} | {row['rounds']} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    env_parser = commands.add_parser("environment")
    env_parser.add_argument("--out", required=True)
    sum_parser = commands.add_parser("summarize")
    sum_parser.add_argument("outdir")
    args = parser.parse_args(argv)
    if args.command == "environment":
        info = environment()
        with open(args.out, "w") as handle:
            json.dump(info, handle, indent=1)
        print(json.dumps(info, indent=1))
        return 0
    summary = summarize(args.outdir)
    print(markdown(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
