"""scripts/readme_figures.py rewrites README's demo table between its markers and nothing else."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "readme_figures.py"


@pytest.fixture(scope="module")
def figures():
    spec = importlib.util.spec_from_file_location("readme_figures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SUMMARY = {"preset": "demo", "seconds": 162.0, "methods": [
    {"method": "dal", "seconds": 19.4, "rank1": 0.7083, "mAP": 0.725, "baseline_rank1": 0.4417,
     "baseline_mAP": 0.4818},
    {"method": "tssl", "error": "RuntimeError: out of | memory"}]}
README = "# fastassoc\n\nintro  \n<!-- demo-table:start -->\nold table\n<!-- demo-table:end -->\n\ntail text\n"


def test_rewrites_only_between_markers(figures, tmp_path):
    out = tmp_path / "runs"
    (out / "dal").mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps(SUMMARY))
    env = {"cpu_model": "Test CPU 9000", "cpu_count": 2, "torch": "9.9", "fastassoc": "0.1.0",
           "git_commit": "0123456789abcdef", "git_dirty": False}
    (out / "dal" / "report.json").write_text(json.dumps({"environment": env}))
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert figures.main(["--summary", str(out / "summary.json"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    head, rest = text.split("<!-- demo-table:start -->\n")
    block, tail = rest.split("\n<!-- demo-table:end -->")
    assert head == "# fastassoc\n\nintro  \n" and tail == "\n\ntail text\n"
    assert "| DAL | 44.2 → 70.8 | 48.2 → 72.5 | 19 s |" in block
    assert "| TSSL | failed: RuntimeError: out of / memory | | |" in block
    assert "Test CPU 9000, 2 cores" in block and "0123456789" in block and "2.7 min" in block
    assert "old table" not in text
    # A second run over its own output changes nothing but the block.
    assert figures.main(["--summary", str(out / "summary.json"), "--readme", str(readme)]) == 0
    assert readme.read_text().endswith("\n\ntail text\n")


@pytest.mark.parametrize("text, problem", [
    ("no markers\n", "exactly once"),
    ("<!-- demo-table:start -->\n<!-- demo-table:start -->\n<!-- demo-table:end -->\n", "exactly once"),
    ("<!-- demo-table:end -->\n<!-- demo-table:start -->\n", "comes before"),
])
def test_refuses_a_readme_without_proper_markers(figures, text, problem):
    with pytest.raises(ValueError, match=problem):
        figures.replace_between_markers(text, "table")
