"""Command line: ``fastassoc demo | train | eval | ops-tour``.

``fastassoc demo``
    The README's main job: trains every method (DAL, UTAL, UGA, EEA, TSSL) with its ``demo``
    preset on the synthetic tracklet world and prints a table of the untrained network's
    rank-1 / mAP against the trained one's, with each method's time (outputs in ``--out``).
``fastassoc train --method M (--data synthetic | --dataset NAME --root PATH) --preset P --out DIR``
    One training run: progress bars, one log line per epoch, ``DIR/report.json``, PNG plots,
    ``DIR/checkpoint.pt`` after every epoch; ``--resume`` continues from it.
``fastassoc eval (--checkpoint CKPT | --features FILE | --distances FILE [--labels FILE]) --out DIR``
    Ranks a query / gallery split and prints the CMC table (rank-1/5/10/20), mAP and mINP;
    writes ``DIR/eval.json`` and ``DIR/cmc.png``. A checkpoint is evaluated on its dataset
    (``--root`` moves it) and needs the ``[train]`` extra; feature and distance files (keys in
    :mod:`fastassoc.eval.files`) need only fastassoc. ``--rerank`` re-ranks features.
``fastassoc ops-tour``
    Runs every op on random data on every available backend.

``torchrun --nproc_per_node N -m fastassoc.cli train ...``
    Multi-process (data-parallel) training: with ``WORLD_SIZE > 1`` in the environment every
    process joins one process group (NCCL on CUDA, each process on ``cuda:$LOCAL_RANK``; gloo
    on CPUs), trains on its share of every batch, and rank 0 alone writes the outputs and prints
    (see :mod:`fastassoc.methods.trainer`). A checkpoint resumes under any number of processes.

Every argument (``--set`` values included) is checked before any work; an error prints one
line, ``fastassoc: error: ...``, and exits with status 2 (1 for a failure during the work);
``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import json
import os
import sys
import tempfile
import time
import types
import typing
from pathlib import Path

BACKEND_NAMES = ("auto", "reference", "cpu", "triton", "cuda")
METRIC_NAMES = ("euclidean", "sqeuclidean", "cosine")
# fastassoc.data.layouts.MARS_PROTOCOLS, spelled here so that --help needs no torch import.
MARS_PROTOCOL_NAMES = ("official", "torchreid")
# Config fields the command line sets itself (the trainer's registry name and the preset).
_RESERVED_FIELDS = {"method": "--method", "preset": "--preset"}


class UsageError(Exception):
    """A bad argument: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


# ---- checks shared by the commands ---------------------------------------------------------------

def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"wants an int >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = f"int >= {minimum}"
    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {value}")
    return value


def _check_device(name: str | None, flag: str = "--device"):
    """The torch.device ``name`` stands for, refused when this machine cannot use it."""
    import torch

    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag} {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"{flag} {name}: torch sees no CUDA device here (torch.cuda.is_available() is False)")
        if device.index is not None and device.index >= count:
            raise UsageError(f"{flag} {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"{flag} {name}: the MPS device is not available on this machine")
    elif device.type != "cpu":
        raise UsageError(f"{flag} {name}: fastassoc runs on cpu, cuda or mps devices, got {device.type}")
    return device


def _check_backend(backend: str, device, flag: str = "--backend") -> None:
    """Refuse a backend that is unknown, not built, or unusable on ``device`` (before any work)."""
    from . import _backend

    if backend not in BACKEND_NAMES:
        raise UsageError(f"{flag} must be one of {', '.join(BACKEND_NAMES)}; got {backend!r}")
    if backend == "auto":
        return
    built, reason = _backend._built(backend)
    if not built:
        raise UsageError(f"{flag} {backend} is not available: {reason}")
    usable, reason = _backend._device_ok(backend, device.type)
    if not usable:
        raise UsageError(f"{flag} {backend} cannot run on {device}: {reason}")


def _check_out(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` as a folder that can be created and written, refused before any work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} exists and is not a folder")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{flag} {path} cannot be created: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path} is not writable ({probe} does not allow writing)")
    try:  # os.access does not see read-only mounts, nor everything root is refused
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as error:
        raise UsageError(f"{flag} {path} is not writable ({probe}: {error.strerror or error})") from None
    return path


def _check_file(path: str | None, flag: str) -> None:
    if path is not None and not Path(path).is_file():
        raise UsageError(f"{flag} {path}: no such file")


def _check_folder(path: str | None, flag: str) -> None:
    if path is not None and not Path(path).is_dir():
        raise UsageError(f"{flag} {path}: no such folder")


def _missing_train_extras(*extra: str) -> list[str]:
    modules = ("torchvision", "PIL", "tqdm") + extra
    return [name for name in modules if importlib.util.find_spec(name) is None]


def _require_train_extras(what: str, *extra: str) -> None:
    missing = _missing_train_extras(*extra)
    if missing:
        names = ", ".join("pillow" if name == "PIL" else name for name in missing)
        raise UsageError(f"{what} needs the [train] extra (missing: {names}); pip install fastassoc[train]")


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _progress(args):
    # None: the trainer decides (tqdm's disable=None convention: bars only on a terminal).
    return False if args.no_progress else None


# ---- --set KEY=VALUE -----------------------------------------------------------------------------

def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _split_pairs(pairs: list[str]) -> list[tuple[str, str, object]]:
    """(key, text, parsed value) of every ``--set KEY=VALUE``; values parse as JSON, else as text."""
    out = []
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--set wants KEY=VALUE, got {pair!r}")
        out.append((key.strip(), text, _value(text)))
    return out


def _type_name(kind) -> str:
    return getattr(kind, "__name__", str(kind))


def _coerce(key: str, text: str, value, kind):
    """``value`` as the config field ``key`` of type ``kind`` wants it, or a UsageError naming both."""
    origin, arguments = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        options = [argument for argument in arguments if argument is not type(None)]
        for option in options:
            try:
                return _coerce(key, text, value, option)
            except UsageError:
                pass
        wanted = " or ".join(_type_name(option) for option in options)
        nullable = " (or null)" if type(None) in arguments else ""
        raise UsageError(f"--set {key}={text}: {key} wants {_article(wanted)}{nullable}, got {text!r}")
    kind = origin or kind
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        tuple: isinstance(value, list),
        list: isinstance(value, list),
        dict: isinstance(value, dict),
    }.get(kind, True)
    if not ok:
        hint = {bool: " (true or false)", tuple: " (a JSON list such as [1, 2])", list: " (a JSON list)",
                dict: " (a JSON object)"}.get(kind, "")
        raise UsageError(f"--set {key}={text}: {key} wants {_article(_type_name(kind))}{hint}, got {text!r}")
    if kind is float:
        return float(value)
    if kind is tuple:
        return tuple(value)
    return value


def _article(name: str) -> str:
    return f"an {name}" if name[:1] in "aeiou" else f"a {name}"


def config_overrides(pairs: list[str], config_class) -> dict:
    """``--set`` pairs as typed config overrides, checked against ``config_class``'s fields.

    ``KEY=VALUE`` values are JSON (``lr=0.5``, ``image_size=[32, 16]``, ``weights=null``) or
    plain text (``optimizer=sgd``). ``data_options.num_cameras=3`` sets one key of a dict
    field. Unknown fields and values of the wrong type are refused naming the field and the
    type its dataclass declares.
    """
    hints = typing.get_type_hints(config_class)
    fields = [field.name for field in dataclasses.fields(config_class)]
    out: dict = {}
    for key, text, value in _split_pairs(pairs):
        head, _, tail = key.partition(".")
        if head in _RESERVED_FIELDS:
            raise UsageError(f"--set {key}: set it with {_RESERVED_FIELDS[head]}")
        if head not in hints:
            close = difflib.get_close_matches(head, fields, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UsageError(f"--set {key}={text}: {config_class.__name__} has no field {head!r}{hint}")
        if tail:
            if hints[head] is not dict:
                raise UsageError(f"--set {key}={text}: {head} is {_article(_type_name(hints[head]))}, not a dict; "
                                 f"set it as {head}=VALUE")
            out.setdefault(head, {})[tail] = value
        else:
            out[head] = _coerce(key, text, value, hints[head])
    return out


def _check_ranges(values: dict, source: str) -> None:
    epochs, seed = values.get("epochs"), values.get("seed")
    if epochs is not None and epochs < 1:
        raise UsageError(f"{source} epochs must be >= 1, got {epochs}")
    if seed is not None and seed < 0:
        raise UsageError(f"{source} seed must be >= 0, got {seed}")


def _merge_flags(overrides: dict, flags: dict) -> dict:
    """``--set`` overrides with the dedicated flags' values; the same field given twice differently is refused."""
    for key, value in flags.items():
        if value is None:
            continue
        if key in overrides and overrides[key] != value:
            raise UsageError(f"{key} is given twice: --{key.replace('_', '-')} {value} and --set {key}="
                             f"{json.dumps(overrides[key])}")
        overrides[key] = value
    return overrides


def _make_config(trainer_class, preset: str, overrides: dict):
    try:
        return trainer_class.make_config(preset, **overrides)
    except (TypeError, ValueError) as error:
        raise UsageError(" ".join(str(error).split())) from error


# Shared config fields that only take these values (the trainer would fail on others mid-run).
def _config_choices() -> dict[str, tuple]:
    from .data import DATASETS
    from .methods.backbones import BACKBONES
    from .methods.config import OPTIMIZERS, SCHEDULERS

    return {"data": ("synthetic",) + tuple(DATASETS), "backbone": BACKBONES, "optimizer": OPTIMIZERS,
            "scheduler": SCHEDULERS, "eval_pooling": ("mean", "max"), "eval_metric": METRIC_NAMES}


# Shared count fields and their least value (0 workers: load in the main process).
_CONFIG_MINIMUMS = {"epochs": 1, "seed": 0, "small_width": 1, "tracklets_per_camera": 1, "frames_per_tracklet": 1,
                    "batches_per_epoch": 1, "num_workers": 0, "eval_max_frames": 1, "eval_batch_size": 1,
                    "eval_every": 0, "bn_warmup_batches": 0, "step_size": 1}
_CONFIG_FRACTIONS = ("train_erasing", "train_grayscale")


def _check_config(config) -> None:
    """What a resolved config names, checked on this machine before any work: device, backend,
    the choices and counts of the shared fields, the dataset folder and the weights file."""
    from .methods.config import check_pretraining

    device = _check_device(config.device, "device")
    _check_backend(config.backend, device)
    try:
        check_pretraining(config)  # the paper preset without --weights or --from-scratch
    except ValueError as error:
        raise UsageError(_one_line(error)) from error
    for key, options in _config_choices().items():
        value = getattr(config, key, None)
        if value is not None and value not in options:
            raise UsageError(f"{key} must be one of {', '.join(options)}; got {value!r}")
    for key, minimum in _CONFIG_MINIMUMS.items():
        value = getattr(config, key, None)
        if value is not None and value < minimum:
            raise UsageError(f"{key} must be >= {minimum}, got {value}")
    for key in _CONFIG_FRACTIONS:
        value = getattr(config, key, None)
        if value is not None and not 0.0 <= value <= 1.0:
            raise UsageError(f"{key} must lie in [0, 1], got {value}")
    if config.lr <= 0:
        raise UsageError(f"lr must be > 0, got {config.lr}")
    if config.data != "synthetic":
        if not config.root:
            raise UsageError(f"data={config.data} needs root (--root, the folder holding the dataset)")
        _check_folder(config.root, "root")
    if config.weights is not None:
        _check_file(config.weights, "weights")


# ---- multi-process runs --------------------------------------------------------------------------

_STARTED_GROUP = [False]


def _launched_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when absent)."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(text)
    except ValueError:
        raise UsageError(f"WORLD_SIZE must be an integer (torchrun sets it), got {text!r}") from None
    if size < 1:
        raise UsageError(f"WORLD_SIZE must be >= 1, got {size}")
    return size


def _start_process_group(device: str | None) -> str | None:
    """Join torchrun's process group when WORLD_SIZE > 1 (and none is initialised yet).

    Returns the device this process trains on (``cuda:$LOCAL_RANK`` or ``cpu``), or None for a
    one-process run (and when the caller initialised the group: its device setting stands).
    """
    if _launched_world_size() == 1:
        return None
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return None
    if device not in (None, "auto", "cuda", "cpu"):
        raise UsageError(f"--device {device}: under torchrun each process trains on cuda:$LOCAL_RANK; pass --device "
                         f"cuda, cpu or nothing")
    cuda = device != "cpu" and torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise UsageError("--device cuda: no CUDA device is available")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if not 0 <= local < torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK={local}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    _STARTED_GROUP[0] = True
    return f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"


def _stop_process_group() -> None:
    """Leave the process group :func:`_start_process_group` joined (one the caller made stays)."""
    if not _STARTED_GROUP[0]:
        return
    import torch.distributed as dist

    _STARTED_GROUP[0] = False
    if dist.is_initialized():
        dist.destroy_process_group()


def _is_rank_zero() -> bool:
    from .distributed.training import is_rank_zero

    return is_rank_zero()


def _mars_protocol(args, data: str | None) -> dict:
    """``data_options`` setting ``--mars-protocol`` (empty without it); refused for other data."""
    if args.mars_protocol is None:
        return {}
    if data != "mars":
        raise UsageError(f"--mars-protocol applies to the MARS dataset; this run uses data={data or 'synthetic'}")
    return {"protocol": args.mars_protocol}


# ---- commands ------------------------------------------------------------------------------------

def _train(args) -> int:
    from .methods import get_trainer

    trainer_class = get_trainer(args.method)
    out = Path(args.out)
    runtime = {"progress": _progress(args)}
    if args.device:
        _check_device(args.device)
        runtime["device"] = args.device
    _check_file(args.weights, "--weights")
    _check_file(args.split_file, "--split-file")
    if args.dataset and not args.root:
        raise UsageError("--dataset needs --root (the folder holding the dataset)")
    _check_folder(args.root, "--root")
    overrides = config_overrides(args.set, trainer_class.Config)
    if args.mars_protocol is not None:
        if args.resume:
            raise UsageError("--mars-protocol applies to a new run (a resumed run keeps its protocol; "
                             "fastassoc eval --checkpoint --mars-protocol evaluates under the other)")
        protocol = _mars_protocol(args, args.dataset or overrides.get("data"))
        options = dict(overrides.get("data_options") or {})
        if options.get("protocol", protocol["protocol"]) != protocol["protocol"]:
            raise UsageError(f"the MARS protocol is given twice: --mars-protocol {args.mars_protocol} and --set "
                             f"data_options.protocol={json.dumps(options['protocol'])}")
        overrides["data_options"] = {**options, **protocol}
    flags = {"epochs": args.epochs, "seed": args.seed, "backend": args.backend, "weights": args.weights}
    if args.dataset:
        flags["data"] = args.dataset
    if args.root:
        flags["root"] = args.root
    if args.from_scratch:
        flags["from_scratch"] = True
    overrides = _merge_flags(overrides, flags)
    _check_ranges(overrides, "--set")
    if args.override and not args.resume:
        raise UsageError("--override applies to --resume (it resumes a run whose settings differ)")
    if _launched_world_size() > 1 and (args.splits > 1 or args.split_file):
        raise UsageError("--splits / --split-file run in one process; launch them without torchrun")
    if args.resume:
        if args.splits > 1 or args.split_file:
            raise UsageError("--resume continues one run; --splits / --split-file runs cannot be resumed this way")
        checkpoint = out / "checkpoint.pt"
        if not checkpoint.is_file():
            raise UsageError(f"--resume: no checkpoint at {checkpoint}")
        requested = dict(overrides)
        if args.preset is not None:
            requested["preset"] = args.preset
        # The trainer treats these as runtime settings of a resumed run, not settings to compare.
        from .methods.config import RUNTIME_FIELDS

        for key in RUNTIME_FIELDS:
            if key in requested:
                runtime[key] = requested.pop(key)
        device = _check_device(runtime.get("device"), "device")
        if "backend" in runtime:
            _check_backend(runtime["backend"], device)
        _check_out(out)
        _require_train_extras("training")
        _set_threads(args.threads)
        rank_device = _start_process_group(runtime.get("device"))
        if rank_device is not None:
            runtime["device"] = rank_device
        try:
            trainer = trainer_class.resume(out, requested=requested, override=args.override, **runtime)
        except ValueError as error:
            raise UsageError(" ".join(str(error).split())) from error
        if _is_rank_zero():
            print(f"resuming {args.method} from epoch {trainer.start_epoch} in {out}")
        report = trainer.fit()
    else:
        config = _make_config(trainer_class, args.preset or "smoke", {**overrides, **runtime})
        if args.root and config.data == "synthetic":
            raise UsageError("--root applies to a dataset on disk (--dataset NAME); this run uses the synthetic world")
        _check_config(config)
        if args.splits > 1 or args.split_file:
            from .methods.protocols import SPLIT_DATASETS

            if config.data not in SPLIT_DATASETS:
                raise UsageError(f"--splits / --split-file need a dataset with random train/test splits "
                                 f"(--dataset {' or '.join(SPLIT_DATASETS)}); this run uses data={config.data}")
        _check_out(out)
        _require_train_extras("training", *(("matplotlib",) if config.plots else ()),
                              *(("scipy",) if config.data != "synthetic" else ()))
        _set_threads(args.threads)
        if args.splits > 1 or args.split_file:
            from .methods.protocols import train_splits

            report = train_splits(trainer_class, config, out, splits=args.splits, split_file=args.split_file,
                                  log=print)
            # The protocol's own summary (means, deviations, per-split figures): its scalars in one line.
            print(json.dumps({k: v for k, v in report.items() if isinstance(v, (int, float, str))}))
            return 0
        else:
            rank_device = _start_process_group(config.device)
            if rank_device is not None:
                config.device = rank_device
            report = trainer_class(config, out).fit()
    if _is_rank_zero():
        print(json.dumps({k: report[k] for k in ("rank1", "mAP", "mINP", "baseline_rank1", "baseline_mAP")
                          if k in report}))
    return 0


def _eval_options_fit(args) -> None:
    """Refuse options that do not apply to the chosen source (they would be silently ignored)."""
    source = "--checkpoint" if args.checkpoint else "--features" if args.features else "--distances"
    misplaced = {
        "--root": (args.root, ("--checkpoint",)),
        "--mars-protocol": (args.mars_protocol, ("--checkpoint",)),
        "--labels": (args.labels, ("--distances",)),
        "--rerank": (args.rerank or None, ("--features",)),
        "--k1": (args.k1, ("--features",)),
        "--k2": (args.k2, ("--features",)),
        "--lambda": (args.lambda_value, ("--features",)),
        "--metric": (args.metric, ("--features",)),
        "--normalize": (args.normalize or None, ("--features",)),
        "--max-rank": (args.max_rank, ("--features", "--distances")),
        "--allow-pickle": (args.allow_pickle or None, ("--features", "--distances")),
    }
    for flag, (value, sources) in misplaced.items():
        if value is not None and source not in sources:
            raise UsageError(f"{flag} applies to {' and '.join(sources)}, not {source}")
    for flag, value in (("--k1", args.k1), ("--k2", args.k2), ("--lambda", args.lambda_value)):
        if value is not None and not args.rerank:
            raise UsageError(f"{flag} is a re-ranking parameter; add --rerank")
    if args.rerank:
        k1 = args.k1 if args.k1 is not None else 20
        k2 = args.k2 if args.k2 is not None else 6
        if k2 > k1:
            raise UsageError(f"--k2 must be <= --k1 ({k1}): query expansion averages over the k1-nearest lists; "
                             f"got {k2}")


def _eval(args) -> int:
    _eval_options_fit(args)
    device = _check_device(args.device) if args.device else None
    if args.backend is not None:
        import torch

        _check_backend(args.backend, device or (torch.device("cpu") if not args.checkpoint else _check_device(None)))
    for flag, path in (("--checkpoint", args.checkpoint), ("--features", args.features),
                       ("--distances", args.distances), ("--labels", args.labels)):
        if path is not None and not Path(path).exists():
            raise UsageError(f"{flag} {path}: no such file")
    _check_folder(args.root, "--root")
    out = _check_out(args.out)
    _set_threads(args.threads)
    if args.checkpoint:
        summary = _eval_checkpoint(args)
    else:
        summary = _eval_file(args, device)
    from . import eval as feval

    out.mkdir(parents=True, exist_ok=True)
    json_path = feval.write_json(summary, out / "eval.json")
    png_path = feval.plot_cmc(summary, out / "cmc.png", title=summary.get("title", "CMC"))
    print(feval.cmc_table(summary))
    print(f"{summary['num_valid_queries']} valid queries (with a true match in the gallery)")
    if png_path is None:
        print(f"wrote {json_path}; cmc.png not drawn: matplotlib is not installed (pip install matplotlib)")
    else:
        print(f"wrote {json_path} and {png_path}")
    return 0


def _eval_checkpoint(args) -> dict:
    from . import eval as feval
    from .methods import get_trainer
    from .methods import read_checkpoint

    _require_train_extras("evaluating a checkpoint (it rebuilds the network and reads the dataset's images)")
    path = Path(args.checkpoint)
    if path.is_dir():
        path = path / "checkpoint.pt"
    try:
        state = read_checkpoint(path)
    except (ValueError, OSError) as error:
        raise UsageError(_one_line(error)) from error
    method, config = state["method"], state["config"]
    overrides = {"progress": _progress(args)}
    if args.device:
        overrides["device"] = args.device
    if args.backend:
        overrides["backend"] = args.backend
    if args.root:
        if config.get("data", "synthetic") == "synthetic":
            raise UsageError(f"--root: {path} was trained on the synthetic world, which has no dataset folder")
        overrides["root"] = args.root
    protocol = _mars_protocol(args, config.get("data", "synthetic"))
    requested = {"data_options": {**dict(config.get("data_options") or {}), **protocol}} if protocol else None
    trainer_class = get_trainer(method)
    del state
    # The evaluation protocol is not a training setting: the requested one applies without --override.
    trainer = trainer_class.from_checkpoint(path, requested=requested, override=requested is not None, **overrides)
    result = trainer.evaluate(desc="eval")
    return feval.summarise(result["cmc"], mAP=result["mAP"], mINP=result["mINP"],
                           num_valid_queries=result["num_valid_queries"], source="checkpoint",
                           checkpoint=str(path), method=method, epoch=trainer.start_epoch,
                           data=trainer.config.data, title=f"{method} epoch {trainer.start_epoch}")


def _eval_file(args, device) -> dict:
    from . import eval as feval

    try:
        return _rank_file(args, device)
    except (ValueError, TypeError) as error:
        # Bad arrays in the user's file (shapes, dtypes, NaN): the op's message names the key.
        if isinstance(error, feval.EvalFileError):
            raise UsageError(_one_line(error)) from error
        raise UsageError(f"{args.features or args.distances}: {_one_line(error)}") from error


def _rank_file(args, device) -> dict:
    import torch

    from . import eval as feval
    from . import evaluate_ranking

    max_rank = args.max_rank or 50
    # The table reads rank 20 whatever length of curve eval.json keeps.
    ranked = max(max_rank, max(feval.TABLE_RANKS))
    backend = args.backend or "auto"
    if args.features:
        arrays = feval.load_features(args.features, allow_pickle=args.allow_pickle)
        if device is not None:
            arrays = {key: value.to(device) for key, value in arrays.items()}
        query, gallery = arrays["query"], arrays["gallery"]
        if args.normalize:
            query = torch.nn.functional.normalize(query.float() if not query.is_floating_point() else query, dim=1)
            gallery = torch.nn.functional.normalize(gallery.float() if not gallery.is_floating_point() else gallery,
                                                    dim=1)
        rerank = None
        if args.rerank:
            rerank = {key: value for key, value in (("k1", args.k1), ("k2", args.k2),
                                                    ("lambda_value", args.lambda_value)) if value is not None}
        metric = args.metric or "euclidean"
        result = evaluate_ranking(query, gallery, arrays["query_pids"], arrays["gallery_pids"],
                                  arrays["query_cameras"], arrays["gallery_cameras"], metric=metric,
                                  max_rank=ranked, rerank=rerank, backend=backend)
        from .ops.evaluation import RERANK_DEFAULTS

        extra = {"source": "features", "file": str(args.features), "metric": metric,
                 "normalize": bool(args.normalize), "rerank": {**RERANK_DEFAULTS, **rerank} if rerank is not None
                 else None, "title": Path(args.features).name + (" re-ranked" if rerank is not None else "")}
    else:
        arrays = feval.load_distances(args.distances, args.labels, allow_pickle=args.allow_pickle)
        if device is not None:
            arrays = {key: value.to(device) for key, value in arrays.items()}
        result = evaluate_ranking(query_pids=arrays["query_pids"], gallery_pids=arrays["gallery_pids"],
                                  query_cameras=arrays["query_cameras"], gallery_cameras=arrays["gallery_cameras"],
                                  distances=arrays["distances"], max_rank=ranked, backend=backend)
        extra = {"source": "distances", "file": str(args.distances),
                 "labels": str(args.labels) if args.labels else None, "title": Path(args.distances).name}
    return feval.summarise(result.cmc.tolist(), mAP=result.mAP, mINP=result.mINP,
                           num_valid_queries=result.num_valid_queries, max_rank=max_rank, **extra)


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

    methods = args.methods or list(METHODS)
    out = Path(args.out)
    overrides = {"progress": _progress(args)}
    if args.device:
        _check_device(args.device)
        overrides["device"] = args.device
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    # Every method's config is built (and checked) before the first one trains.
    configs = {}
    for method in methods:
        trainer_class = get_trainer(method)
        configs[method] = (trainer_class, _make_config(trainer_class, args.preset, overrides))
        _check_config(configs[method][1])
    _check_out(out)
    _require_train_extras("the demo", "matplotlib")
    _set_threads(args.threads)
    rows, failed = [], False
    started = time.perf_counter()
    for method, (trainer_class, config) in configs.items():
        print(f"== {method}: preset {args.preset} on the synthetic world ==", flush=True)
        begin = time.perf_counter()
        try:
            report = trainer_class(config, out / method).fit()
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


def _ops_tour(args) -> int:
    from . import ops_tour

    ops_tour.run(seed=args.seed)
    return 0


# ---- the parser ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from .data import DATASETS
    from .methods import METHODS, PRESET_NAMES

    parser = _Parser(prog="fastassoc", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    positive = _int_at_least(1)

    def common(sub, *, device_help="auto (default), cpu, cuda, cuda:1, ..."):
        sub.add_argument("--device", help=device_help)
        sub.add_argument("--threads", type=positive, metavar="N", help="torch CPU threads")
        sub.add_argument("--no-progress", action="store_true",
                         help="no progress bars (default: bars on a terminal, one line per epoch otherwise)")
        # SUPPRESS: an absent sub-command flag must not reset a `fastassoc --debug ...` given before it.
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show the traceback of an error")

    demo = commands.add_parser("demo", help="train every method on the synthetic world; table of rank-1 / mAP")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument("--methods", nargs="+", choices=METHODS, metavar="METHOD",
                      help=f"subset of methods: {', '.join(METHODS)} (default: all)")
    demo.add_argument("--preset", default="demo", choices=("smoke", "demo"))
    demo.add_argument("--epochs", type=positive, help="override the preset's epochs")
    common(demo)
    demo.set_defaults(run=_demo)

    train = commands.add_parser("train", help="train one method")
    train.add_argument("--method", required=True, choices=METHODS)
    source = train.add_mutually_exclusive_group()
    source.add_argument("--data", choices=("synthetic",), help="the synthetic tracklet world (default)")
    source.add_argument("--dataset", choices=DATASETS, metavar="NAME",
                        help=f"a dataset on disk: {', '.join(DATASETS)}")
    train.add_argument("--root", help="folder holding --dataset")
    train.add_argument("--preset", choices=PRESET_NAMES, help="default smoke (on --resume: the checkpoint's)")
    train.add_argument("--out", required=True, help="output folder: report.json, plots, checkpoint.pt")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    train.add_argument("--override", action="store_true",
                       help="with --resume: continue even though the given settings differ from the checkpoint's")
    train.add_argument("--weights", help="local ImageNet weights file for resnet50 / mobilenet_v2 (never downloaded)")
    train.add_argument("--from-scratch", action="store_true",
                       help="train a torchvision backbone without ImageNet weights (the paper preset wants --weights)")
    train.add_argument("--backend", choices=BACKEND_NAMES, help="fastassoc op backend (default auto)")
    train.add_argument("--epochs", type=positive)
    train.add_argument("--seed", type=_int_at_least(0))
    train.add_argument("--splits", type=positive, default=1,
                       help="the paper protocol's repeated random train/test splits (mean and std reported)")
    train.add_argument("--split-file", help="a file of fixed splits (the paper protocol's; see methods.protocols)")
    train.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                       help="config overrides, values as JSON (e.g. margin=0.5 data_options.num_cameras=3)")
    train.add_argument("--mars-protocol", choices=MARS_PROTOCOL_NAMES,
                       help="with --dataset mars: official (default; the gallery holds every test tracklet) or "
                            "torchreid (the gallery excludes the query tracklets)")
    common(train)
    train.set_defaults(run=_train)

    evaluate = commands.add_parser(
        "eval", help="CMC / mAP / mINP of a checkpoint, a feature file or a distance matrix",
        description="Evaluate a fastassoc checkpoint on its dataset, or anyone's model from a feature file or a "
                    "precomputed distance matrix (keys: see fastassoc.eval.files). Prints the CMC table, mAP and "
                    "mINP; writes OUT/eval.json and OUT/cmc.png.")
    what = evaluate.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", metavar="PATH",
                      help="checkpoint.pt (or the run folder holding it); needs fastassoc[train]")
    what.add_argument("--features", metavar="FILE",
                      help="a .pt / .npy / .npz file with query, gallery, query_pids, gallery_pids, query_cameras, "
                           "gallery_cameras")
    what.add_argument("--distances", metavar="FILE",
                      help="a .pt / .npy / .npz file with a Q x G distances matrix (and the four label keys, or "
                           "--labels)")
    evaluate.add_argument("--labels", metavar="FILE", help="with --distances: a file holding the four label keys")
    evaluate.add_argument("--root", metavar="DIR", help="with --checkpoint: the dataset's folder on this machine")
    evaluate.add_argument("--mars-protocol", choices=MARS_PROTOCOL_NAMES,
                          help="with --checkpoint of a MARS run: official (default) or torchreid gallery")
    evaluate.add_argument("--out", default="runs/eval", metavar="DIR",
                          help="output folder for eval.json and cmc.png (default runs/eval)")
    evaluate.add_argument("--metric", choices=METRIC_NAMES, help="with --features (default euclidean)")
    evaluate.add_argument("--normalize", action="store_true", help="with --features: L2-normalise the features")
    evaluate.add_argument("--rerank", action="store_true",
                          help="with --features: k-reciprocal re-ranking (Zhong et al.) before ranking")
    evaluate.add_argument("--k1", type=positive, metavar="K1", help="re-ranking k1 (default 20)")
    evaluate.add_argument("--k2", type=positive, metavar="K2", help="re-ranking k2 (default 6)")
    evaluate.add_argument("--lambda", dest="lambda_value", type=_fraction, metavar="LAMBDA",
                          help="re-ranking weight of the original distance (default 0.3)")
    evaluate.add_argument("--max-rank", type=positive, metavar="N",
                          help="length of the CMC curve in eval.json (default 50)")
    evaluate.add_argument("--backend", choices=BACKEND_NAMES, help="fastassoc op backend (default auto)")
    evaluate.add_argument("--allow-pickle", action="store_true",
                          help="load pickled content (np.save of a dict, NumPy arrays in a .pt): only for "
                               "files you trust")
    common(evaluate, device_help="where the ranking runs (default: a checkpoint's own device setting; for files, "
                                 "the CPU)")
    evaluate.set_defaults(run=_eval)

    tour = commands.add_parser("ops-tour", help="run every op on random data on every available backend")
    tour.add_argument("--seed", type=_int_at_least(0), default=0)
    tour.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    tour.set_defaults(run=_ops_tour)
    return parser


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, (UsageError, ValueError, OSError)) and text:
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, 1 for a failed run, 2 for bad arguments)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        try:
            return args.run(args)
        finally:
            _stop_process_group()
    except UsageError as error:
        if debug:
            raise
        print(f"fastassoc: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - one line instead of a traceback; --debug shows it
        if debug:
            raise
        print(f"fastassoc: error: {_one_line(error)} (--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
