"""One benchmark run, executed through the ``dpt`` command's own code (`cli.build_cli`).

A run is ``dpt fit`` (which tests the last epoch's model) or, for a method that learns nothing,
``dpt test``; for base-to-novel the learned prompt is then tested on the novel classes with
``dpt test --data.subsample new --ckpt_path <last checkpoint>``. Nothing here trains or evaluates
by itself: it composes command-line arguments, adds the `RunMeter` callback (time and memory per
stage) and reads the results back from the trainer.
"""
from __future__ import annotations

import gc
import io
import os
import resource
import sys
import time
import traceback
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

#: Metric names logged by every method at test time (``test_<name>``), as results.csv columns.
METRICS = ("acc", "macro_acc", "f1", "auroc")
METER = "dpt_lightning.bench_run.RunMeter"


# ------------------------------------------------------------------------------- memory
def reset_peak_rss() -> bool:
    """Reset the process's peak resident memory (Linux: ``/proc/self/clear_refs``). False where
    the system cannot (the peak is then the process's peak since it started)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory in MiB: ``VmHWM`` where /proc exists, else ``getrusage``'s maximum."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


class RunMeter(Callback):
    """Seconds spent in training and in testing, peak RSS and peak CUDA memory of one run.

    Added to every benchmark run as ``--trainer.callbacks+=dpt_lightning.bench_run.RunMeter``.
    Training time is the fit loop (from the first to the last training batch, validation included,
    model loading and data checks excluded); evaluation time is every test loop.
    """

    #: How many meters were built since `invoke_cli` started a run (0: the CLI never got past parsing).
    instances = 0

    def __init__(self) -> None:
        RunMeter.instances += 1
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        self.peak_rss_mb = 0.0
        self.rss_scope = "run"
        self.cuda_max_allocated_mb: float | None = None
        self._started: dict[str, float] = {}
        self._peaks_reset = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self._peaks_reset:
            self.rss_scope = "run" if reset_peak_rss() else "process"
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self._peaks_reset = True

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.peak_rss_mb = max(self.peak_rss_mb, peak_rss_mb())
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            self.cuda_max_allocated_mb = torch.cuda.max_memory_allocated(pl_module.device) / 2**20

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._started["train"] = time.perf_counter()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.train_seconds += time.perf_counter() - self._started.pop("train")

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._started["test"] = time.perf_counter()

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.eval_seconds += time.perf_counter() - self._started.pop("test")


# ------------------------------------------------------------------------------- running
class StderrTail(io.TextIOBase):
    """Passes writes through to the real stderr and keeps the last ``limit`` characters, so that
    an argument error the CLI prints before exiting can be recorded with the failed run."""

    def __init__(self, stream, limit: int = 4000):
        self.stream, self.limit, self.tail = stream, limit, ""

    def write(self, text: str) -> int:
        self.tail = (self.tail + text)[-self.limit:]
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


class RunFailed(RuntimeError):
    """A run that raised (or whose CLI exited): the message goes into results.csv."""


class GridInterrupted(KeyboardInterrupt):
    """Ctrl+C or SIGTERM during a run: Lightning shuts the run down and exits; the grid stops."""


def invoke_cli(args: list[str]):
    """``dpt <args>`` in this process (`build_cli`); returns the CLI object (trainer, model, data).

    The CLI exits (``SystemExit``) in two cases. Before the classes exist it is an argument error:
    `RunFailed` with the message it printed. Once the run is built (our `RunMeter` exists) it is
    Lightning's graceful shutdown after Ctrl+C or SIGTERM: `GridInterrupted`, which stops the grid.
    """
    from dpt_lightning.cli import build_cli

    RunMeter.instances = 0
    tail = StderrTail(sys.stderr)
    sys.stderr, argv = tail, sys.argv
    sys.argv = argv[:1]  # the arguments are ``args``, not this process's command line
    try:
        return build_cli(args)
    except SystemExit as exit_:
        if RunMeter.instances:
            raise GridInterrupted(f"run interrupted ({type(exit_).__name__})") from None
        lines = [line for line in tail.tail.strip().splitlines() if line.strip()]
        raise RunFailed(f"the dpt command exited (code {exit_.code}): {' | '.join(lines[-3:])}") from None
    finally:
        sys.stderr, sys.argv = tail.stream, argv


def find_meter(cli) -> RunMeter:
    return next(c for c in cli.trainer.callbacks if isinstance(c, RunMeter))


def read_test_metrics(cli, prefix: str = "") -> dict[str, float]:
    """The ``test_*`` metrics the trainer logged, renamed ``<prefix><metric>``."""
    logged = cli.trainer.callback_metrics
    return {f"{prefix}{name}": float(logged[f"test_{name}"]) for name in METRICS if f"test_{name}" in logged}


def last_checkpoint(cli, run_dir: Path) -> Path:
    """The last epoch's checkpoint written by the CLI's ModelCheckpoint; saved here if none was."""
    callback = cli.trainer.checkpoint_callback
    path = Path(callback.last_model_path) if callback is not None and callback.last_model_path else None
    if path is None or not path.is_file():
        path = run_dir / "last.ckpt"
        cli.trainer.save_checkpoint(path)
    return path


def run_stages(stages: list[tuple[str, list[str], str]], run_dir: Path) -> dict:
    """Execute the run's stages and collect its row fields.

    ``stages``: ``(subcommand, args, prefix)``. The first stage is ``fit`` or ``test``; a later
    ``test`` stage with ``{ckpt}`` in its args gets the first stage's last checkpoint.
    """
    row: dict = {"eval_seconds": 0.0, "peak_rss_mb": 0.0}
    checkpoint: Path | None = None
    for index, (subcommand, args, prefix) in enumerate(stages):
        if "{ckpt}" in args:
            if checkpoint is None:
                raise RunFailed("a stage needs the checkpoint of a fit, but the run has no fit")
            args = [str(checkpoint) if a == "{ckpt}" else a for a in args]
        cli = invoke_cli([subcommand, *args, f"--trainer.callbacks+={METER}"])
        meter = find_meter(cli)
        metrics = read_test_metrics(cli, prefix)
        if not metrics:
            raise RunFailed(f"'{subcommand}' logged no test metrics (test_acc missing)")
        row.update(metrics)
        if subcommand == "fit":
            row["train_seconds"] = row.get("train_seconds", 0.0) + meter.train_seconds
        row["eval_seconds"] += meter.eval_seconds
        row["peak_rss_mb"] = max(row["peak_rss_mb"], meter.peak_rss_mb)
        row["peak_rss_scope"] = meter.rss_scope
        if meter.cuda_max_allocated_mb is not None:
            row["cuda_max_allocated_mb"] = max(row.get("cuda_max_allocated_mb", 0.0), meter.cuda_max_allocated_mb)
        if index == 0:
            model = cli.model
            row["method_class"] = type(model).__name__
            row["dataset_name"] = getattr(cli.datamodule, "dataset_name", None) or ""
            row["backbone"] = model.hparams.get("backbone", "")
            row["device"] = str(cli.trainer.strategy.root_device)
            row["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            row["max_epochs"] = cli.trainer.max_epochs if subcommand == "fit" else ""
            row["log_dir"] = str(cli.trainer.log_dir or "")
            if subcommand == "fit":
                checkpoint = last_checkpoint(cli, run_dir)
                row["checkpoint"] = str(checkpoint)
                row["checkpoint_bytes"] = checkpoint.stat().st_size
        del cli, meter
        release_memory()
    return row


def release_memory() -> None:
    """Drop what the finished stage left (models, loaders) before the next run."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def execute(stages: list[tuple[str, list[str], str]], run_dir: Path) -> dict:
    """`run_stages`, with any error recorded instead of raised (``status`` ok / failed)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        row = {**run_stages(stages, run_dir), "status": "ok", "error": ""}
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001 - any failure of a run is recorded, the grid goes on
        (run_dir / "error.txt").write_text("".join(traceback.format_exception(err)))
        message = str(err) if isinstance(err, RunFailed) else f"{type(err).__name__}: {err}"
        row = {"status": "failed", "error": " ".join(message.split())[:2000]}
        release_memory()
    row["total_seconds"] = time.perf_counter() - started
    return row


def environment() -> dict:
    """Facts about the machine recorded with every row."""
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    return {"host_cpus": os.cpu_count() or 0, "cuda_device": cuda, "torch": torch.__version__}
