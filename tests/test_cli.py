"""The command line: train (fresh and --resume), checkpoint eval, demo, and argument errors.

Every bad argument must be refused in one line (``fastassoc: error: ...``, exit status 2)
before any work: the tests below replace ``Trainer.fit`` with a tripwire where a refusal
must come before training.
"""
from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from fastassoc import cli
from fastassoc.methods import base
from fastassoc.methods.dal import DALTrainer


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_training(monkeypatch):
    """Training must not start: fit raises, and the fixture's list records any attempt."""
    attempts = []

    def fit(self, *args, **kwargs):
        attempts.append(self)
        raise AssertionError("training started although the arguments were bad")

    monkeypatch.setattr(DALTrainer, "fit", fit)
    return attempts


def _tiny_args(**extra) -> list[str]:
    settings = {**base.TINY_OVERRIDES, "plots": True, **extra}
    settings.pop("progress")
    world = settings.pop("data_options")
    pairs = [f"{key}={json.dumps(value)}" for key, value in settings.items()]
    pairs += [f"data_options.{key}={json.dumps(value)}" for key, value in world.items()]
    return ["--set", *pairs]


def _refused(capsys, argv, message):
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}, stderr {err!r}"
    assert len(err.splitlines()) == 1 and err.startswith("fastassoc: error: "), err
    assert message in err, err
    return err


def test_train_resume_and_eval(tmp_path, capsys):
    out = tmp_path / "dal"
    code = cli.main(["train", "--method", "dal", "--data", "synthetic", "--preset", "smoke", "--out", str(out),
                     "--no-progress", "--epochs", "1", "--backend", "reference", *_tiny_args(epochs=1)])
    assert code == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"rank1", "mAP", "baseline_rank1", "baseline_mAP"} <= set(first)
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["epochs"] == 1 and report["config"]["backend"] == "reference"
    assert report["config"]["data_options"]["num_train_ids"] == base.TINY_WORLD["num_train_ids"]
    # (losses.png and diagnostics.png leave out series that one epoch cannot vary: the trainer's tests cover them.)
    for name in ("cmc.png", "checkpoint.pt"):
        assert (out / name).exists(), f"{name} missing"

    # --resume of a finished run evaluates again without training more epochs.
    assert cli.main(["train", "--method", "dal", "--out", str(out), "--resume", "--no-progress"]) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["rank1"] == pytest.approx(first["rank1"]) and resumed["mAP"] == pytest.approx(first["mAP"])

    # Other settings on resume are refused in one line, naming the field (H6's SettingsMismatchError).
    _refused(capsys, ["train", "--method", "dal", "--out", str(out), "--resume", "--seed", "5"], "seed")

    evaluated = tmp_path / "eval"
    assert cli.main(["eval", "--checkpoint", str(out), "--out", str(evaluated), "--no-progress"]) == 0
    summary = json.loads((evaluated / "eval.json").read_text())
    assert summary["method"] == "dal" and summary["epoch"] == 1 and summary["source"] == "checkpoint"
    assert summary["mAP"] == pytest.approx(first["mAP"], abs=1e-6)
    assert len(summary["cmc"]) == 50 and (evaluated / "cmc.png").exists()
    assert "| rank-1 | rank-5 | rank-10 | rank-20 | mAP | mINP |" in capsys.readouterr().out
    # The synthetic world has no folder to move.
    _refused(capsys, ["eval", "--checkpoint", str(out), "--root", str(tmp_path), "--out", str(evaluated)],
             "trained on the synthetic world")


def test_resume_passes_the_requested_settings(tmp_path, capsys, monkeypatch):
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    seen = {}

    def resume(cls, out_dir, *, requested=None, override=False, **runtime):
        seen.update(requested=requested, override=override, runtime=runtime)
        raise ValueError(f"{out_dir}/checkpoint.pt was saved with other settings (epochs: saved 2, requested 4)")

    monkeypatch.setattr(DALTrainer, "resume", classmethod(resume))
    _refused(capsys, ["train", "--method", "dal", "--out", str(tmp_path), "--resume", "--epochs", "4",
                      "--preset", "demo", "--backend", "reference", "--set", "lr=0.1"], "epochs: saved 2, requested 4")
    assert seen["requested"] == {"epochs": 4, "preset": "demo", "lr": 0.1} and seen["override"] is False
    assert seen["runtime"] == {"progress": None, "backend": "reference"}
    cli.main(["train", "--method", "dal", "--out", str(tmp_path), "--resume", "--override", "--no-progress"])
    assert seen["override"] is True and seen["requested"] == {} and seen["runtime"] == {"progress": False}


def test_progress_defaults_to_auto(tmp_path, capsys, monkeypatch):
    configs = []

    def fit(self):
        configs.append(self.config)
        return {"rank1": 0.5, "mAP": 0.25}

    monkeypatch.setattr(DALTrainer, "fit", fit)
    assert cli.main(["train", "--method", "dal", "--out", str(tmp_path / "a"), "--epochs", "1"]) == 0
    assert cli.main(["train", "--method", "dal", "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert configs[0].progress is None and configs[0].epochs == 1 and configs[1].progress is False
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"rank1": 0.5, "mAP": 0.25}


def test_splits_and_from_scratch_reach_their_callees(tmp_path, capsys, monkeypatch, no_training):
    calls, overrides_seen = [], []
    protocols = types.ModuleType("fastassoc.methods.protocols")

    def train_splits(trainer_class, config, out_dir, *, splits, split_file=None, log=print):
        calls.append((trainer_class, config.epochs, str(out_dir), splits, split_file))
        return {"rank1": 0.5, "mAP": 0.25}

    protocols.train_splits = train_splits
    protocols.SPLIT_DATASETS = ("synthetic",)  # the stub splits the synthetic world; the real one refuses it
    monkeypatch.setitem(sys.modules, "fastassoc.methods.protocols", protocols)
    split_file = tmp_path / "splits.json"
    split_file.write_text("[]")
    assert cli.main(["train", "--method", "dal", "--out", str(tmp_path / "s"), "--epochs", "2", "--splits", "3"]) == 0
    assert cli.main(["train", "--method", "dal", "--out", str(tmp_path / "f"), "--split-file", str(split_file)]) == 0
    assert calls == [(DALTrainer, 2, str(tmp_path / "s"), 3, None),
                     (DALTrainer, DALTrainer.make_config("smoke").epochs, str(tmp_path / "f"), 1, str(split_file))]

    original = DALTrainer.make_config.__func__

    def make_config(cls, preset="smoke", **overrides):
        overrides_seen.append(dict(overrides))
        overrides.pop("from_scratch", None)
        return original(cls, preset, **overrides)

    monkeypatch.setattr(DALTrainer, "make_config", classmethod(make_config))
    assert cli.main(["train", "--method", "dal", "--out", str(tmp_path / "x"), "--from-scratch", "--splits", "2"]) == 0
    assert overrides_seen[-1]["from_scratch"] is True
    assert not no_training


# The start of most refused command lines: a plain train run into the test's folder.
_TRAIN = ["train", "--method", "dal", "--out", "{out}"]


@pytest.mark.parametrize("argv, message", [
    (["demo", "--methods", "foo"], "argument --methods: invalid choice: 'foo' (choose from 'dal', 'utal', 'uga', "
                                   "'eea', 'tssl')"),
    (_TRAIN + ["--epochs", "-1"], "argument --epochs: must be >= 1, got -1"),
    (_TRAIN + ["--epochs", "two"], "argument --epochs: wants an int >= 1"),
    (_TRAIN + ["--seed", "-3"], "argument --seed: must be >= 0"),
    (_TRAIN + ["--threads", "0"], "argument --threads: must be >= 1"),
    (_TRAIN + ["--set", "epochs=zero"], "--set epochs=zero: epochs wants an int, got 'zero'"),
    (_TRAIN + ["--set", "epochs=0"], "epochs must be >= 1, got 0"),
    (_TRAIN + ["--set", "plots=yes"], "plots wants a bool (true or false)"),
    (_TRAIN + ["--set", "lr=fast"], "lr wants a float, got 'fast'"),
    (_TRAIN + ["--set", "eval_max_frames=many"], "eval_max_frames wants an int (or null), got 'many'"),
    (_TRAIN + ["--set", "image_size=64"], "image_size wants a tuple"),
    (_TRAIN + ["--set", "epoch=3"], "DALConfig has no field 'epoch' (did you mean epochs"),
    (_TRAIN + ["--set", "lr"], "--set wants KEY=VALUE, got 'lr'"),
    (_TRAIN + ["--set", "method=uga"], "--set method: set it with --method"),
    (_TRAIN + ["--set", "lr.x=1"], "lr is a float, not a dict"),
    (_TRAIN + ["--epochs", "2", "--set", "epochs=3"], "epochs is given twice"),
    (_TRAIN + ["--set", "backend=gpu"], "--backend must be one of"),
    (_TRAIN + ["--preset", "huge"], "argument --preset: invalid choice"),
    (_TRAIN + ["--device", "tpu"], "--device 'tpu' is not a device"),
    (_TRAIN + ["--dataset", "mars"], "--dataset needs --root"),
    (_TRAIN + ["--dataset", "mars", "--root", "{out}/nowhere"], "--root {out}/nowhere: no such folder"),
    (_TRAIN + ["--weights", "{out}/w.pth"], "--weights {out}/w.pth: no such file"),
    (_TRAIN + ["--override"], "--override applies to --resume"),
    (_TRAIN + ["--preset", "paper", "--dataset", "mars", "--root", "{out}"],
     "preset 'paper' starts from ImageNet weights"),
    (_TRAIN + ["--splits", "3"],
     "--splits / --split-file need a dataset with random train/test splits (--dataset prid2011 or ilidsvid)"),
    (_TRAIN + ["--split-file", "{out}/none.json"], "--split-file {out}/none.json: no such file"),
    (_TRAIN + ["--resume"], "--resume: no checkpoint at {out}/checkpoint.pt"),
    (["train", "--method", "dal", "--out", "{out}/file.txt/run"], "{out}/file.txt is a file, not a folder"),
    (["train", "--method", "dal", "--out", "{out}/file.txt"], "--out {out}/file.txt exists and is not a folder"),
    (["demo", "--out", "{out}/file.txt/demo", "--methods", "dal"], "is a file, not a folder"),
    (["demo", "--epochs", "-1"], "argument --epochs: must be >= 1, got -1"),
    (["train", "--method", "nope", "--out", "{out}"], "argument --method: invalid choice: 'nope'"),
    (_TRAIN + ["--dataset", "foo", "--root", "{out}"], "argument --dataset: invalid choice: 'foo'"),
    (_TRAIN + ["--set", "data=mars"], "data=mars needs root"),
    (_TRAIN + ["--root", "{out}"], "--root applies to a dataset on disk"),
    (_TRAIN + ["--set", "optimizer=adamw"], "optimizer must be one of sgd, adam, rmsprop; got 'adamw'"),
    (_TRAIN + ["--set", "train_erasing=2"], "train_erasing must lie in [0, 1]"),
    (_TRAIN + ["--set", "lr=0"], "lr must be > 0"),
    (_TRAIN + ["--set", "eval_batch_size=0"], "eval_batch_size must be >= 1"),
    (_TRAIN + ["--set", "weights={out}/w.pth"], "weights {out}/w.pth: no such"),
    ([], "the following arguments are required: COMMAND"),
])
def test_bad_arguments_are_refused_in_one_line_before_any_work(tmp_path, capsys, no_training, argv, message):
    (tmp_path / "file.txt").write_text("not a folder")
    argv = [part.replace("{out}", str(tmp_path)) for part in argv]
    _refused(capsys, argv, message.replace("{out}", str(tmp_path)))
    assert not no_training


def test_backend_that_cannot_run_here_is_refused_before_any_work(tmp_path, capsys, monkeypatch, no_training):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _refused(capsys, ["train", "--method", "dal", "--out", str(tmp_path), "--backend", "triton"],
             "--backend triton")
    _refused(capsys, ["train", "--method", "dal", "--out", str(tmp_path), "--set", "backend=cuda"], "--backend cuda")
    _refused(capsys, ["train", "--method", "dal", "--out", str(tmp_path), "--device", "cuda"],
             "--device cuda: torch sees no CUDA device")
    _refused(capsys, ["demo", "--out", str(tmp_path), "--methods", "dal", "--device", "cuda:1"], "no CUDA device")
    assert not no_training


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(cli.UsageError, match="invalid choice: 'foo'"):
        cli.main(["--debug", "demo", "--methods", "foo"])
    with pytest.raises(cli.UsageError, match="epochs wants an int"):
        cli.main(["train", "--method", "dal", "--out", str(tmp_path), "--set", "epochs=zero", "--debug"])


def test_failures_during_the_work_are_one_line_with_status_1(tmp_path, capsys, monkeypatch):
    def fit(self):
        raise RuntimeError("the loader died\n  in worker 3")

    monkeypatch.setattr(DALTrainer, "fit", fit)
    code = cli.main(["train", "--method", "dal", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and err == ("fastassoc: error: RuntimeError: the loader died in worker 3 "
                                 "(--debug shows the traceback)\n")
    with pytest.raises(RuntimeError, match="loader died"):
        cli.main(["train", "--method", "dal", "--out", str(tmp_path), "--debug"])


def test_training_without_the_train_extra_says_how_to_get_it(tmp_path, capsys, monkeypatch, no_training):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    _refused(capsys, ["train", "--method", "dal", "--out", str(tmp_path)],
             "training needs the [train] extra (missing: torchvision); pip install fastassoc[train]")
    assert not no_training


def test_set_values_take_the_config_field_types():
    from fastassoc.methods.dal import DALTrainer as Trainer

    overrides = cli.config_overrides(["lr=1", "image_size=[32, 16]", "data_options.num_cameras=3", "optimizer=sgd",
                                      "weights=null", "eval_max_frames=4", "plots=false"], Trainer.Config)
    assert overrides == {"lr": 1.0, "image_size": (32, 16), "data_options": {"num_cameras": 3}, "optimizer": "sgd",
                         "weights": None, "eval_max_frames": 4, "plots": False}
    assert isinstance(overrides["lr"], float)


def test_demo_table_reports_lift_and_failures():
    table = cli.demo_table([
        {"method": "dal", "baseline_rank1": 0.1, "baseline_mAP": 0.05, "rank1": 0.35, "mAP": 0.2, "seconds": 61.0},
        {"method": "uga", "error": "ValueError: boom"},
        {"method": "eea", "error": "TypeError: f(): bad\n    1. (a: int | None)"},
    ])
    lines = table.splitlines()
    assert lines[2] == "| dal | 10.0 | 5.0 | 35.0 | 20.0 | +25.0 | 61 s |"
    assert "failed: ValueError: boom" in lines[3]
    assert len(lines) == 5 and lines[4].startswith("| eea | failed: TypeError: f(): bad 1. (a: int / None)")


def test_demo_runs_methods_and_writes_summary(tmp_path, capsys, monkeypatch):
    # The demo's own presets take minutes; here the demo loop runs the tiny config.
    monkeypatch.setitem(DALTrainer.PRESETS, "smoke", {**DALTrainer.PRESETS["smoke"], **base.TINY_OVERRIDES,
                                                      "epochs": 1})
    code = cli.main(["demo", "--preset", "smoke", "--methods", "dal", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [row["method"] for row in summary["methods"]] == ["dal"]
    assert "| dal |" in (tmp_path / "summary.md").read_text()
    assert "| dal |" in capsys.readouterr().out


def test_mars_protocol_reaches_the_dataset_options(tmp_path, capsys, monkeypatch, no_training):
    configs = []

    def fit(self):
        configs.append(self.config)
        return {"rank1": 0.5, "mAP": 0.25}

    monkeypatch.setattr(DALTrainer, "fit", fit)
    mars = ["train", "--method", "dal", "--dataset", "mars", "--root", str(tmp_path), "--no-progress"]
    assert cli.main([*mars, "--out", str(tmp_path / "a"), "--mars-protocol", "torchreid"]) == 0
    assert cli.main([*mars, "--out", str(tmp_path / "b")]) == 0
    assert cli.main([*mars, "--out", str(tmp_path / "c"), "--mars-protocol", "official",
                     "--set", "data_options.keep_junk=true"]) == 0
    assert configs[0].data == "mars" and configs[0].data_options["protocol"] == "torchreid"
    # Without the flag the loader's default (official) applies.
    assert "protocol" not in configs[1].data_options
    assert configs[2].data_options["protocol"] == "official" and configs[2].data_options["keep_junk"] is True
    # Refusals come before any training (fit would record another config).
    _refused(capsys, ["train", "--method", "dal", "--out", str(tmp_path / "d"), "--mars-protocol", "torchreid"],
             "--mars-protocol applies to the MARS dataset; this run uses data=synthetic")
    _refused(capsys, ["train", "--method", "dal", "--dataset", "ilidsvid", "--root", str(tmp_path), "--out",
                      str(tmp_path / "d"), "--mars-protocol", "official"], "this run uses data=ilidsvid")
    _refused(capsys, [*mars, "--out", str(tmp_path / "d"), "--mars-protocol", "torchreid", "--set",
                      'data_options.protocol="official"'], "the MARS protocol is given twice")
    _refused(capsys, [*mars, "--out", str(tmp_path / "d"), "--mars-protocol", "gallery"],
             "argument --mars-protocol: invalid choice: 'gallery'")
    (tmp_path / "a" / "checkpoint.pt").parent.mkdir(exist_ok=True)
    (tmp_path / "a" / "checkpoint.pt").write_bytes(b"")
    _refused(capsys, ["train", "--method", "dal", "--out", str(tmp_path / "a"), "--resume", "--mars-protocol",
                      "torchreid"], "--mars-protocol applies to a new run")
    assert len(configs) == 3


def test_eval_checkpoint_mars_protocol(tmp_path, capsys, monkeypatch):
    import dataclasses

    import fastassoc.methods

    saved = DALTrainer.make_config("smoke", data="mars", root=str(tmp_path), data_options={"keep_junk": True})
    synthetic = DALTrainer.make_config("smoke")
    states = {"mars": {"method": "dal", "config": dataclasses.asdict(saved)},
              "synthetic": {"method": "dal", "config": dataclasses.asdict(synthetic)}}
    seen = []

    def from_checkpoint(cls, path, out_dir=None, *, requested=None, override=False, **runtime):
        # The trainer's own settings check, on the saved config: the protocol must pass it.
        config = cls.config_from_checkpoint(states[path.stem], path, requested=requested, override=override,
                                            **runtime)
        seen.append(config)
        result = {"cmc": [0.5] * 50, "mAP": 0.4, "mINP": 0.1, "num_valid_queries": 3}
        return types.SimpleNamespace(config=config, start_epoch=2, evaluate=lambda desc: result)

    monkeypatch.setattr(fastassoc.methods, "read_checkpoint", lambda path: states[path.stem])
    monkeypatch.setattr(DALTrainer, "from_checkpoint", classmethod(from_checkpoint))
    for name in states:
        (tmp_path / f"{name}.pt").write_bytes(b"")
    out = str(tmp_path / "eval")
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "mars.pt"), "--out", out, "--mars-protocol",
                     "torchreid", "--no-progress"]) == 0
    assert seen[-1].data_options == {**saved.data_options, "protocol": "torchreid"}
    assert seen[-1].data_options["keep_junk"] is True and seen[-1].epochs == saved.epochs
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "mars.pt"), "--out", out, "--no-progress"]) == 0
    assert seen[-1].data_options == saved.data_options
    _refused(capsys, ["eval", "--checkpoint", str(tmp_path / "synthetic.pt"), "--out", out, "--mars-protocol",
                      "official"], "--mars-protocol applies to the MARS dataset; this run uses data=synthetic")
    features = tmp_path / "features.pt"
    features.write_bytes(b"")
    _refused(capsys, ["eval", "--features", str(features), "--out", out, "--mars-protocol", "official"],
             "--mars-protocol applies to --checkpoint, not --features")
