"""The command line: train (fresh and --resume), eval, demo's table, argument errors."""
from __future__ import annotations

import json

import pytest
import torch

from fastassoc import cli
from fastassoc.methods import base


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_args(**extra) -> list[str]:
    settings = {**base.TINY_OVERRIDES, "plots": True, **extra}
    settings.pop("progress")
    world = settings.pop("data_options")
    pairs = [f"{key}={json.dumps(value)}" for key, value in settings.items()]
    pairs += [f"data_options.{key}={json.dumps(value)}" for key, value in world.items()]
    return ["--set", *pairs]


def test_train_resume_and_eval(tmp_path, capsys):
    out = tmp_path / "dal"
    code = cli.main(["train", "--method", "dal", "--data", "synthetic", "--preset", "smoke", "--out", str(out),
                     "--no-progress", "--epochs", "1", "--backend", "reference", *_tiny_args()])
    assert code == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"rank1", "mAP", "baseline_rank1", "baseline_mAP"} <= set(first)
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["epochs"] == 1 and report["config"]["backend"] == "reference"
    assert report["config"]["data_options"]["num_train_ids"] == base.TINY_WORLD["num_train_ids"]
    for name in ("losses.png", "diagnostics.png", "cmc.png", "checkpoint.pt"):
        assert (out / name).exists(), f"{name} missing"

    # --resume of a finished run evaluates again without training more epochs.
    assert cli.main(["train", "--method", "dal", "--out", str(out), "--resume", "--no-progress"]) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["rank1"] == pytest.approx(first["rank1"]) and resumed["mAP"] == pytest.approx(first["mAP"])

    assert cli.main(["eval", "--checkpoint", str(out), "--out", str(tmp_path / "eval.json"), "--no-progress"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["method"] == "dal" and evaluated["epoch"] == 1
    assert evaluated["mAP"] == pytest.approx(first["mAP"], abs=1e-6)
    assert len(json.loads((tmp_path / "eval.json").read_text())["cmc"]) == 50


def test_resume_without_checkpoint_fails(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint"):
        cli.main(["train", "--method", "tssl", "--out", str(tmp_path), "--resume"])


def test_dataset_needs_root(tmp_path):
    with pytest.raises(SystemExit, match="--root"):
        cli.main(["train", "--method", "dal", "--dataset", "mars", "--out", str(tmp_path)])


def test_set_parses_json_values_and_nested_keys():
    assert cli._overrides(["lr=0.5", "image_size=[32, 16]", "data_options.num_cameras=3", "optimizer=sgd"]) == \
        {"lr": 0.5, "image_size": [32, 16], "data_options": {"num_cameras": 3}, "optimizer": "sgd"}
    with pytest.raises(SystemExit):
        cli._overrides(["lr"])


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
    from fastassoc.methods.dal import DALTrainer

    monkeypatch.setitem(DALTrainer.PRESETS, "smoke", {**DALTrainer.PRESETS["smoke"], **base.TINY_OVERRIDES,
                                                      "epochs": 1})
    code = cli.main(["demo", "--preset", "smoke", "--methods", "dal", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [row["method"] for row in summary["methods"]] == ["dal"]
    assert "| dal |" in (tmp_path / "summary.md").read_text()
    assert "| dal |" in capsys.readouterr().out
