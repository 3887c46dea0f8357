"""The split driver: PRID2011 / iLIDS-VID evaluated over several train/test splits, averaged."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastassoc.methods.base import tiny_config
from fastassoc.methods.dal import DALTrainer
from fastassoc.methods.protocols import METRICS, train_splits


def _png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 16), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def build_prid(root: Path, persons: int = 6, frames: int = 3) -> None:
    rng = np.random.default_rng(0)
    for person in range(1, persons + 1):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        for camera in ("cam_a", "cam_b"):
            folder = root / "multi_shot" / camera / f"person_{person:04d}"
            folder.mkdir(parents=True)
            for frame in range(frames):
                (folder / f"{frame + 1:04d}.png").write_bytes(_png(colour))


def _config(root: Path):
    return tiny_config(DALTrainer, data="prid2011", root=str(root), data_options={"min_frames": 2}, epochs=1,
                       baseline=False, checkpoint=False, tracklets_per_camera=2, bn_warmup_batches=1)


def test_split_average_is_the_mean_of_the_per_split_results(tmp_path):
    build_prid(tmp_path / "prid")
    lines = []
    report = train_splits(DALTrainer, _config(tmp_path / "prid"), tmp_path / "out", splits=3, log=lines.append)
    per_split = [json.loads((tmp_path / "out" / f"split_{i}" / "report.json").read_text()) for i in range(3)]
    assert [row["split"] for row in report["splits"]] == [0, 1, 2]
    assert [r["config"]["data_options"]["split"] for r in per_split] == [0, 1, 2]
    for key in ("rank1", "rank5", "rank10", "mAP", "mINP"):
        values = np.array([r[key] for r in per_split], dtype=np.float64)
        assert [row[key] for row in report["splits"]] == pytest.approx(values.tolist())
        assert report["mean"][key] == pytest.approx(values.mean())
        assert report["std"][key] == pytest.approx(values.std())
    assert set(report["mean"]) == set(METRICS)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["mean"] == report["mean"]
    assert "3 random splits" in report["protocol"]
    # A rerun reads the finished splits back instead of training them again.
    again = []
    assert train_splits(DALTrainer, _config(tmp_path / "prid"), tmp_path / "out", splits=3,
                        log=again.append)["mean"] == report["mean"]
    assert sum("read back" in line for line in again) == 3


def test_split_file_and_bad_arguments(tmp_path):
    build_prid(tmp_path / "prid")
    config = _config(tmp_path / "prid")
    splits = [{"train": [1, 2, 3], "test": [4, 5, 6]}, {"train": [4, 5, 6], "test": [1, 2, 3]}]
    (tmp_path / "splits.json").write_text(json.dumps(splits))
    with pytest.raises(ValueError, match="holds 2 splits"):
        train_splits(DALTrainer, config, tmp_path / "out", splits=3, split_file=tmp_path / "splits.json")
    report = train_splits(DALTrainer, config, tmp_path / "out", splits=1, split_file=tmp_path / "splits.json",
                          log=lambda line: None)
    saved = json.loads((tmp_path / "out" / "split_0" / "report.json").read_text())
    assert saved["config"]["data_options"]["split_file"] == str(tmp_path / "splits.json")
    assert "splits.json" in report["protocol"] and report["std"]["rank1"] == 0.0
    with pytest.raises(ValueError, match="splits need a dataset"):
        train_splits(DALTrainer, tiny_config(DALTrainer), tmp_path / "x", splits=2)
    with pytest.raises(ValueError, match="splits must be"):
        train_splits(DALTrainer, config, tmp_path / "x", splits=0)
