"""``benchmarks/speed.py`` runs end to end (tiny backbone, ``--quick``) and writes its report; the
cached and re-encoding evaluation paths of its grid give the same probabilities."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_speed_benchmark_quick_run_on_the_tiny_backbone(tmp_path):
    report = tmp_path / "speed.md"
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # its raw results and logs stay in the test folder
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/speed.py"), "--quick", "--backbone", "tiny",
                             "--grid-runs", "2", "--output", str(report)],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    text = report.read_text()
    for variant in ("ours", "reference", "bound"):
        assert f"| coop | 4 | {variant} |" in text and f"| biomed_dpt | 4 | {variant} |" in text
    assert "## Ratios" in text and "does not judge the targets" in text
    difference = float(re.search(r"class probabilities: ([0-9.e+-]+)\.", text).group(1))
    assert difference < 1e-6


@pytest.mark.slow
def test_training_grid_section_runs_the_bench_cells_with_the_store_off_and_on(tmp_path, monkeypatch):
    """The training-grid measurement (tiny backbone, CoOp, one epoch): both paths give the same test
    accuracy, the store holds the grid's views afterwards, and the report states the ratios."""
    import argparse

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setenv("DPT_CACHE_DIR", os.environ["DPT_CACHE_DIR"])  # the measurement points it elsewhere
    import train_grid

    task = {"backbone": "tiny", "device": "cpu", "precision": "32-true", "train_grid_methods": ["coop"],
            "train_grid_epochs": 1, "train_grid_shots": 1}
    result = train_grid.measure_training_grid(task)
    coop = result["cells"]["coop"]
    assert coop["off"]["acc"] == coop["on"]["acc"] == coop["on_full_store"]["acc"]
    assert result["store_shards"] >= 2 and result["image_pass_s"] > 0  # training views and test views
    text = "\n".join(train_grid.report_training_grid(
        argparse.Namespace(train_grid_epochs=1, train_grid_shots=1), result))
    assert "| coop |" in text and "identical on both paths" in text and "| 1 methods |" in text
