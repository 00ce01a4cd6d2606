"""Stand-ins for the benchmark runner's tests (tests/test_bench_scale.py), importable by worker
processes and submitit tasks (the tests put this folder on PYTHONPATH).

* `KillOnce`, `PreemptOnce`: Lightning callbacks that, the first time a cell reaches a given epoch
  and batch, kill its process (SIGKILL: no warning) or send it the scheduler's preemption signal
  (SIGUSR2, as SLURM does before a time limit). A marker file in the cell's folder makes them act
  once, so the resumed cell runs through.
* `fake_execute`: an executor that trains nothing; it records each call in the cell's folder,
  fails, dies or sleeps for the cells named in ``$BENCH_FAKE_FAIL``, ``$BENCH_FAKE_DIE`` and
  ``$BENCH_FAKE_SLEEP`` (``run_id=seconds,...``).
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from lightning.pytorch import Callback


class _Once(Callback):
    signal_number = signal.SIGKILL

    def __init__(self, epoch: int = 1, batch: int = 0):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            marker = Path(trainer.default_root_dir) / f"{type(self).__name__}.done"
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), self.signal_number)
                time.sleep(5)  # the signal's handler runs here (SIGUSR2) or the process is gone (SIGKILL)


class KillOnce(_Once):
    signal_number = signal.SIGKILL


class PreemptOnce(_Once):
    signal_number = signal.SIGUSR2


def _listed(variable: str) -> dict[str, float]:
    out = {}
    for item in filter(None, os.environ.get(variable, "").split(",")):
        name, _, value = item.partition("=")
        out[name] = float(value or 0)
    return out


def fake_execute(stages, run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "calls.txt", "a") as f:
        f.write(f"{os.getpid()}\n")
    name = run_dir.name
    if name in _listed("BENCH_FAKE_DIE"):
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(_listed("BENCH_FAKE_SLEEP").get(name, 0.05))
    if name in _listed("BENCH_FAKE_FAIL"):
        return {"status": "failed", "error": "RuntimeError: boom"}
    return {"status": "ok", "error": "", "acc": 0.5, "train_seconds": 1.0, "eval_seconds": 0.5}


def timed_execute(stages, run_dir: Path) -> dict:
    """`fake_execute` that also writes when the cell started and ended (``interval.txt``)."""
    started = time.time()
    row = fake_execute(stages, run_dir)
    (Path(run_dir) / "interval.txt").write_text(f"{started} {time.time()}\n")
    return row
