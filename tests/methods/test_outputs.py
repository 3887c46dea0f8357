"""What a run writes: progress bars only on a terminal with one log line per epoch, the
report's provenance and timing, labelled plots, per-step evaluations."""
from __future__ import annotations

import re

from fastassoc.methods.base import tiny_config

from ._shared import ToyTrainer


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
