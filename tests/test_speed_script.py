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
