"""What a run writes: progress bars only on a terminal with one log line per epoch, the
report's provenance and timing, labelled plots, per-step evaluations."""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

import fastassoc
from fastassoc.methods import plots
from fastassoc.methods.base import tiny_config

from ._shared import ToyTrainer, quiet


def test_non_terminal_run_draws_no_bars_and_logs_one_line_per_epoch(capsys, world):
    # capsys replaces stdout / stderr with non-terminals: progress=None must turn every bar off.
    config = tiny_config(ToyTrainer, epochs=3, progress=None, checkpoint=False)
    assert config.progress is None
    trainer = ToyTrainer(config, dataset=world)   # log=None: lines go through tqdm.write
    assert trainer.show_progress is False
    trainer.fit()
    out, err = capsys.readouterr()
    assert "\r" not in out + err and not re.search(r"\d+%\|", out + err), f"bar frames written: {err[:300]!r}"
    lines = out.splitlines()
    for epoch in (1, 2, 3):
        assert sum(f"epoch {epoch}/3" in line for line in lines) == 1, lines
    assert len(lines) == 3 + 2, lines   # the epochs, the untrained network's line and the final line


def test_progress_defaults_to_terminal_detection_and_true_forces_bars(capsys, world):
    assert ToyTrainer.make_config("smoke").progress is None and ToyTrainer.Config().progress is None
    config = tiny_config(ToyTrainer, epochs=1, progress=True, checkpoint=False, baseline=False)
    ToyTrainer(config, dataset=world).fit()
    _, err = capsys.readouterr()
    assert re.search(r"\d+%\|", err), "progress=True should draw bars even off a terminal"


# -- report.json ------------------------------------------------------------------------------------

def _cpu_model_from_proc():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def test_report_carries_environment_config_and_phase_times(tmp_path, world):
    config = tiny_config(ToyTrainer, epochs=2, lr=1e-3, checkpoint=False)
    lines = []
    report = ToyTrainer(config, tmp_path, dataset=world, log=lines.append).fit()
    on_disk = json.loads((tmp_path / "report.json").read_text())
    env = on_disk["environment"]
    assert (env["fastassoc"], env["torch"], env["cuda"], env["device"]) == \
        (fastassoc.__version__, torch.__version__, torch.version.cuda, "cpu")
    if _cpu_model_from_proc() is not None:
        assert env["cpu_model"] == _cpu_model_from_proc()
    repo = Path(fastassoc.__file__).resolve().parents[1]
    git = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    if git.returncode == 0 and (repo / ".git").exists():
        assert env["git_commit"] == git.stdout.strip()
    # The full resolved config, every field.
    assert on_disk["config"] == json.loads(json.dumps(dataclasses.asdict(config)))
    timing = on_disk["timing"]
    for phase in ("setup_seconds", "batchnorm_warmup_seconds", "baseline_eval_seconds", "method_setup_seconds",
                  "final_eval_seconds", "wall_seconds"):
        assert timing[phase] >= 0, phase
    assert timing["wall_seconds"] >= timing["setup_seconds"] + timing["baseline_eval_seconds"]
    for record, row in zip(report["history"], timing["epochs"]):
        association, training = record["association_seconds"], record["training_seconds"]
        assert association > 0 and training > 0 and association + training <= record["time"]
        assert record["association_share"] == pytest.approx(association / (association + training))
        assert association >= record["time_renormalise_memory"]
        assert row["association_seconds"] == association and row["epoch"] == record["epoch"]
    total_association = sum(r["association_seconds"] for r in report["history"])
    total_training = sum(r["training_seconds"] for r in report["history"])
    assert timing["association_seconds"] == pytest.approx(total_association)
    assert timing["association_share"] == pytest.approx(total_association / (total_association + total_training))
    epoch_lines = [line for line in lines if "epoch 1/2" in line or "epoch 2/2" in line]
    assert len(epoch_lines) == 2 and all("association_share" in line and "training_seconds" in line
                                         for line in epoch_lines)
    assert report["final"]["rank1"] == report["rank1"] and "cmc" not in report["final"]


class _StepToy(ToyTrainer):
    """Evaluates after every epoch, as TSSL does after every merging step."""

    def on_epoch_end(self, epoch):
        record = super().on_epoch_end(epoch)
        self.record_step_eval(10 * (epoch + 1), self.evaluate(desc="step"), clusters=epoch)
        return record


def test_step_evaluations_and_best_step_survive_resume(tmp_path, world):
    config = tiny_config(_StepToy, epochs=3, lr=3e-3)
    _StepToy(config, tmp_path, dataset=world, log=quiet).fit(stop_after=2)
    resumed = _StepToy.resume(tmp_path, dataset=world, log=quiet)
    assert [e["step"] for e in resumed.step_evaluations] == [10, 20]
    report = resumed.fit()
    steps = report["step_evaluations"]
    assert [(e["step"], e["epoch"], e["clusters"]) for e in steps] == [(10, 1, 0), (20, 2, 1), (30, 3, 2)]
    assert all("cmc" not in e and 0 <= e["rank1"] <= 1 for e in steps)
    best = max(range(3), key=lambda i: (steps[i]["rank1"], -i))   # highest rank-1, earliest among equals
    assert report["best_step"]["step"] == steps[best]["step"] and report["best_step"]["selected_by"] == "rank1"
    assert "test set" in report["best_step"]["note"]
    # The last step evaluated the final network: the same figures as "final".
    assert steps[-1]["mAP"] == pytest.approx(report["final"]["mAP"], abs=1e-9)
    # Phases of the first session are kept across the resume.
    assert report["timing"]["baseline_eval_seconds"] > 0 and len(report["timing"]["epochs"]) == 3


# -- plots ------------------------------------------------------------------------------------------

def test_series_are_sorted_into_losses_diagnostics_flags_and_constants():
    history = [{"epoch": e, "lr": 0.1, "steps": 9, "loss": 3.0 - e, "pairs": [None, 4, 7, 7][e - 1],
                "pairs_precision": [float("nan"), 0.5, 0.6, 0.7][e - 1], "ccta_active": int(e >= 3),
                "stage": 1 + (e >= 2), "merges": [0, 22, 0, 22][e - 1], "k": 3, "time_graph": 0.1,
                "association_seconds": 0.2, "association_share": 0.3, "threshold": 0.5}
               for e in (1, 2, 3, 4)]
    kinds = plots.classify_series(history)
    assert kinds == {"losses": ["loss"], "diagnostics": ["pairs", "pairs_precision", "merges"],
                     "flags": ["ccta_active", "stage"], "constant": ["k", "threshold"],
                     "timing": ["time_graph", "association_seconds", "association_share"]}
    assert plots._spans([1, 2, 3, 4, 5], [0, 1, 1, 0, 1]) == [(1.5, 3.5), (4.5, 5.5)]
    assert plots._spans([1, 2, 3], [1, 2, 2]) == [(1.5, 3.5)]
    assert plots.axis_label("pairs", [None, 4, 7]) == "pairs (count)"
    assert plots.axis_label("pairs_precision", [0.5, 0.7]) == "pairs precision (fraction)"


def test_diagnostics_figure_has_labelled_panels_shaded_flags_and_no_constant_panel(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    saved = {}
    original = Figure.savefig

    def keep(self, path, *args, **kwargs):
        saved[Path(path).name] = self
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    history = [{"epoch": e, "loss": 1.0 / e, "pairs": 3 * e, "purity": 0.5 + 0.1 * e, "ccta_active": int(e > 2),
                "k": 20, "association_seconds": 0.1, "training_seconds": 0.3} for e in (1, 2, 3, 4)]
    cmc = [0.5] * 10
    written = plots.plot_run(tmp_path, "toy", history, {"cmc": cmc, "rank1": 0.5, "mAP": 0.4}, None)
    assert sorted(p.name for p in written) == ["cmc.png", "diagnostics.png", "losses.png", "timing.png"]
    panels = [ax for ax in saved["diagnostics.png"].axes if ax.axison]
    assert [ax.get_title() for ax in panels] == ["pairs", "purity"]   # no panel for the flag or the constant
    assert all(ax.get_ylabel() for ax in panels)
    for ax in panels:   # the flag is one shaded span over epochs 3-4, not a curve
        spans = [patch for patch in ax.patches if patch.get_label() == "ccta_active"]
        assert len(spans) == 1
        box = spans[0].get_bbox()   # x in data coordinates (epochs)
        assert (box.x0, box.x1) == (2.5, 4.5)
    footnote = " ".join(text.get_text() for text in saved["diagnostics.png"].texts)
    assert "k = 20" in footnote
    assert saved["losses.png"].axes[0].get_ylabel() and saved["timing.png"].axes[0].get_ylabel() == "wall time (s)"
