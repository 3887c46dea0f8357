"""Command line: ``fastassoc demo | train | eval | ops-tour``.

``fastassoc demo``
    The README's main job: trains every method (DAL, UTAL, UGA, EEA, TSSL) with its ``demo``
    preset on the synthetic tracklet world and prints a table of the untrained network's
    rank-1 / mAP against the trained one's, with each method's time (outputs in ``--out``).
``fastassoc train --method M (--data synthetic | --dataset NAME --root PATH) --preset P --out DIR``
    One training run: progress bars, one log line per epoch, ``DIR/report.json``, PNG plots,
    ``DIR/checkpoint.pt`` after every epoch; ``--resume`` continues from it.
``fastassoc eval --checkpoint DIR/checkpoint.pt``
    Evaluates a checkpoint's network on its dataset's query / gallery split.
``fastassoc ops-tour``
    Runs every op on random data on every available backend.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"--set wants KEY=VALUE, got {pair!r}")
        key, text = pair.split("=", 1)
        value = _value(text)
        if "." in key:  # data_options.num_cameras=3
            head, tail = key.split(".", 1)
            out.setdefault(head, {})[tail] = value
        else:
            out[key] = value
    return out


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _train(args) -> int:
    from .methods import get_trainer

    _set_threads(args.threads)
    trainer_class = get_trainer(args.method)
    out = Path(args.out)
    runtime = {"progress": not args.no_progress}
    if args.device:
        runtime["device"] = args.device
    if args.resume:
        if not (out / "checkpoint.pt").exists():
            raise SystemExit(f"--resume: no checkpoint at {out / 'checkpoint.pt'}")
        trainer = trainer_class.resume(out, **runtime)
        print(f"resuming {args.method} from epoch {trainer.start_epoch} in {out}")
    else:
        overrides = _overrides(args.set)
        if args.dataset:
            if not args.root:
                raise SystemExit("--dataset needs --root (the folder holding the dataset)")
            overrides.update(data=args.dataset, root=args.root)
        for key in ("weights", "backend", "epochs", "seed"):
            if getattr(args, key) is not None:
                overrides[key] = getattr(args, key)
        config = trainer_class.make_config(args.preset, **overrides, **runtime)
        trainer = trainer_class(config, out)
    report = trainer.fit()
    print(json.dumps({k: report[k] for k in ("rank1", "mAP", "baseline_rank1", "baseline_mAP") if k in report}))
    return 0


def _eval(args) -> int:
    import torch

    from .methods import get_trainer

    _set_threads(args.threads)
    path = Path(args.checkpoint)
    if path.is_dir():
        path = path / "checkpoint.pt"
    method = torch.load(path, map_location="cpu", weights_only=False)["method"]
    runtime = {"progress": not args.no_progress}
    if args.device:
        runtime["device"] = args.device
    trainer = get_trainer(method).from_checkpoint(path, **runtime)
    result = trainer.evaluate()
    summary = {"method": method, "checkpoint": str(path), "epoch": trainer.start_epoch,
               **{k: result[k] for k in ("rank1", "rank5", "rank10", "mAP", "mINP", "num_valid_queries")}}
    print(json.dumps(summary))
    if args.out:
        Path(args.out).write_text(json.dumps({**summary, "cmc": result["cmc"]}, indent=2))
    return 0


def demo_table(rows: list[dict]) -> str:
    """Markdown table of demo results (fractions shown as percentages)."""
    lines = ["| method | untrained rank-1 | untrained mAP | trained rank-1 | trained mAP | rank-1 lift | time |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "error" in row:
            error = " ".join(str(row["error"]).split()).replace("|", "/")
            lines.append(f"| {row['method']} | failed: {error} | | | | | |")
            continue
        lines.append(f"| {row['method']} | {100 * row['baseline_rank1']:.1f} | {100 * row['baseline_mAP']:.1f} | "
                     f"{100 * row['rank1']:.1f} | {100 * row['mAP']:.1f} | "
                     f"{100 * (row['rank1'] - row['baseline_rank1']):+.1f} | {row['seconds']:.0f} s |")
    return "\n".join(lines)


def _demo(args) -> int:
    from .methods import METHODS, get_trainer

    _set_threads(args.threads)
    methods = args.methods or list(METHODS)
    out = Path(args.out)
    rows, failed = [], False
    started = time.perf_counter()
    for method in methods:
        print(f"== {method}: preset {args.preset} on the synthetic world ==", flush=True)
        begin = time.perf_counter()
        try:
            trainer_class = get_trainer(method)
            overrides = {"progress": not args.no_progress}
            if args.device:
                overrides["device"] = args.device
            if args.epochs is not None:
                overrides["epochs"] = args.epochs
            report = trainer_class(trainer_class.make_config(args.preset, **overrides), out / method).fit()
            rows.append({"method": method, "seconds": time.perf_counter() - begin,
                         **{k: report[k] for k in ("rank1", "mAP", "baseline_rank1", "baseline_mAP")}})
        except Exception as error:  # one broken method must not hide the others' figures
            failed = True
            rows.append({"method": method, "error": f"{type(error).__name__}: {error}"[:200]})
            print(f"{method} failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
    table = demo_table(rows)
    total = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"preset": args.preset, "seconds": total, "methods": rows}, indent=2))
    (out / "summary.md").write_text(table + "\n")
    print(f"\nSynthetic world, preset '{args.preset}' ({total / 60:.1f} min in all); outputs in {out}/<method>/\n")
    print(table)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastassoc", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub):
        sub.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
        sub.add_argument("--threads", type=int, help="torch CPU threads")
        sub.add_argument("--no-progress", action="store_true", help="no progress bars")

    demo = commands.add_parser("demo", help="train every method on the synthetic world; table of rank-1 / mAP")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument("--methods", nargs="+", help="subset of methods (default: all five)")
    demo.add_argument("--preset", default="demo", choices=("smoke", "demo"))
    demo.add_argument("--epochs", type=int, help="override the preset's epochs")
    common(demo)

    train = commands.add_parser("train", help="train one method")
    train.add_argument("--method", required=True, choices=("dal", "utal", "uga", "eea", "tssl"))
    source = train.add_mutually_exclusive_group()
    source.add_argument("--data", choices=("synthetic",), help="the synthetic tracklet world (default)")
    source.add_argument("--dataset", help="a dataset on disk: mars, prid2011, ilidsvid, dukevideo, market1501, ...")
    train.add_argument("--root", help="folder holding --dataset")
    train.add_argument("--preset", default="smoke", choices=("smoke", "demo", "paper"))
    train.add_argument("--out", required=True, help="output folder: report.json, plots, checkpoint.pt")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    train.add_argument("--weights", help="local ImageNet weights file for resnet50 / mobilenet_v2 (never downloaded)")
    train.add_argument("--backend", help="fastassoc op backend: auto, reference, cpu, triton, cuda")
    train.add_argument("--epochs", type=int)
    train.add_argument("--seed", type=int)
    train.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                       help="config overrides, values as JSON (e.g. margin=0.5 data_options.num_cameras=3)")
    common(train)

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint on its dataset's query / gallery")
    evaluate.add_argument("--checkpoint", required=True, help="checkpoint.pt (or the folder holding it)")
    evaluate.add_argument("--out", help="write the result (with the CMC curve) to this JSON file")
    common(evaluate)

    tour = commands.add_parser("ops-tour", help="run every op on random data on every available backend")
    tour.add_argument("--seed", type=int, default=0)

    args = parser.parse_args(argv)
    if args.command == "ops-tour":
        from . import ops_tour

        ops_tour.run(seed=args.seed)
        return 0
    if args.command == "train":
        return _train(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "demo":
        return _demo(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
