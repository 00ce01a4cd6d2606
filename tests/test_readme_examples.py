"""The README's new-method examples run as written, from a scratch folder that holds only the
user's module: the real ``dpt`` console script imports it from the working directory."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("tiny_demo_backbone")
README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLE = re.compile(r"```python\n(# (\w+)\.py\n.*?)```\n\n```bash\n(dpt fit [^\n]*)\n```", re.S)
QUICK = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--data.num_workers", "0",
         "--trainer.enable_progress_bar", "false"]


def examples() -> list[tuple[str, str, str]]:
    return EXAMPLE.findall(README.read_text())


def test_the_readme_has_both_examples():
    kinds = {name for _, name, _ in examples()}
    assert {"image_shift", "pixel_frame"} <= kinds


@pytest.mark.slow
@pytest.mark.parametrize("code, name, command", examples(), ids=lambda v: v if re.fullmatch(r"\w+", str(v)) else "")
def test_readme_example_runs_as_written_from_a_scratch_folder(tmp_path, code, name, command):
    (tmp_path / f"{name}.py").write_text(code)
    dpt = shutil.which("dpt", path=str(Path(sys.executable).parent))
    assert dpt, "the dpt console script is not installed"
    args = shlex.split(command)[1:]
    result = subprocess.run([dpt, *args, *QUICK, "--trainer.default_root_dir", str(tmp_path / "runs")],
                            cwd=tmp_path, capture_output=True, text=True, env=os.environ.copy(), timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "test_acc" in result.stdout
