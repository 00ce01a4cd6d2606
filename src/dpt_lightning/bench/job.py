"""One cell of a grid, executed through the ``dpt`` command's own code.

`run_cell` is the one way a cell runs, whoever runs it (the ``dpt-bench`` process itself, a local
worker process, a SLURM array task): claim the cell (`lock.CellClaim`), skip it if it finished
meanwhile, find its own ``last.ckpt`` to resume, execute its stages, store its row atomically in
``runs/<run id>/result.json``, release the claim.

A stage is ``dpt fit`` (which tests the last epoch's model, as ``dpt fit`` does) or ``dpt test``;
for base-to-novel the learned prompt is then tested on the novel classes from the fit's last
checkpoint. `run_stages` builds the ``dpt`` command (`cli.build_cli` with ``run=False``: parsed
and instantiated, nothing run) and calls ``trainer.fit`` / ``trainer.test`` itself; argument
errors raise (the parser does not exit) and are recorded with the failed cell.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import resource
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch import Callback

from dpt_lightning.backbone.loading import keep_loaded_model
from dpt_lightning.bench.folder import CELL, cell_dir, is_done, read_result, write_result
from dpt_lightning.bench.grid import Run
from dpt_lightning.bench.lock import CellClaim
from dpt_lightning.files import atomic_write

#: Metric names logged by every method at test time (``test_<name>``), as results.csv columns.
METRICS = ("acc", "macro_acc", "f1", "auroc")
METER = "dpt_lightning.bench.job.RunMeter"


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
    """Seconds spent in training and in testing, peak RSS and peak CUDA memory of one stage.

    Added to every benchmark stage as ``--trainer.callbacks+=dpt_lightning.bench.job.RunMeter``.
    Training time is the fit loop (from the first to the last training batch, validation included,
    model loading and data checks excluded); evaluation time is every test loop.
    """

    def __init__(self) -> None:
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        self.peak_rss_mb = 0.0
        self.rss_scope = "run"
        self.cuda_max_allocated_mb: float | None = None
        self._started: dict[str, float] = {}
        self._peaks_reset = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        import torch

        if not self._peaks_reset:
            self.rss_scope = "run" if reset_peak_rss() else "process"
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self._peaks_reset = True

    def teardown(self, trainer, pl_module, stage: str) -> None:
        import torch

        self.peak_rss_mb = max(self.peak_rss_mb, peak_rss_mb())
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            self.cuda_max_allocated_mb = torch.cuda.max_memory_allocated(pl_module.device) / 2**20

    def on_train_start(self, trainer, pl_module) -> None:
        self._started["train"] = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.train_seconds += time.perf_counter() - self._started.pop("train")

    def on_test_start(self, trainer, pl_module) -> None:
        self._started["test"] = time.perf_counter()

    def on_test_end(self, trainer, pl_module) -> None:
        self.eval_seconds += time.perf_counter() - self._started.pop("test")


# ------------------------------------------------------------------------------- running
class RunFailed(RuntimeError):
    """A stage that could not run (argument error, no metrics): the message goes into results.csv."""


class GridInterrupted(KeyboardInterrupt):
    """Ctrl+C, SIGTERM or a scheduler's preemption during a cell: Lightning shut the run down;
    the cell is not recorded (it runs again, resuming its own last checkpoint). ``code`` is the
    exit code the process was asked to exit with (a submitit task exits with it)."""

    def __init__(self, message: str = "interrupted", code=None):
        super().__init__(message)
        self.code = code


#: Every cell serves the image features of fixed image paths from the feature store
#: (`dpt_lightning.features`: bit-identical results, each view through the tower once per grid),
#: unless the grid's or the entry's own args set these flags.
FEATURE_STORE_FLAGS = ("cache_eval_features", "cache_train_features")


def with_feature_store(args: list[str]) -> list[str]:
    given = " ".join(args)
    return [*args, *(f"--model.init_args.{flag}=true" for flag in FEATURE_STORE_FLAGS if flag not in given)]


def build(args: list[str]):
    """The ``dpt`` command for ``args`` (config files and settings, no subcommand), parsed and
    instantiated but not run: ``cli.model``, ``cli.datamodule``, ``cli.trainer``; the feature
    store on (`with_feature_store`). An argument error raises `RunFailed` with the parser's message."""
    from dpt_lightning import cli

    try:
        return cli.build_cli(with_feature_store(args), run=False, parser_kwargs={"exit_on_error": False})
    except argparse.ArgumentError as err:
        message = " ".join(str(err).split())
        raise RunFailed(f"the dpt command exited with an argument error: {message}") from None


def split_option(args: list[str], option: str) -> tuple[list[str], str | None]:
    """``args`` without ``option VALUE`` / ``option=VALUE`` (the last one given), and the value."""
    rest, value, skip = [], None, False
    for i, arg in enumerate(args):
        if skip:
            skip = False
        elif arg == option and i + 1 < len(args):
            value, skip = args[i + 1], True
        elif arg.startswith(option + "="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return rest, value


def read_test_metrics(trainer, prefix: str = "") -> dict[str, float]:
    """The ``test_*`` metrics the trainer logged, renamed ``<prefix><metric>``."""
    logged = trainer.callback_metrics
    return {f"{prefix}{name}": float(logged[f"test_{name}"]) for name in METRICS if f"test_{name}" in logged}


def last_checkpoint(trainer, run_dir: Path) -> Path:
    """The last epoch's checkpoint written by the ModelCheckpoint callback; saved here if none was."""
    callback = trainer.checkpoint_callback
    path = Path(callback.last_model_path) if callback is not None and callback.last_model_path else None
    if path is None or not path.is_file():
        path = run_dir / "last.ckpt"
        trainer.save_checkpoint(path)
    return path


def own_last_checkpoint(directory: Path) -> Path | None:
    """The newest ``last.ckpt`` the cell's own fit wrote (``runs/<run id>/lightning_logs/
    version_<n>/checkpoints/last.ckpt``, beside the config the run saved); never one of the
    base-to-novel test stage (``novel/``) or of replaced settings."""
    found = [path for path in Path(directory).glob("**/checkpoints/last.ckpt")
             if not any(part == "novel" or ".replaced-" in part for part in path.relative_to(directory).parts)]
    return max(found, key=lambda path: path.stat().st_mtime_ns) if found else None


def run_stages(stages: list[tuple[str, list[str], str]], run_dir: Path) -> dict:
    """Execute the cell's stages and collect its row fields.

    ``stages``: ``(subcommand, args, prefix)``. The first stage is ``fit`` or ``test``; a later
    ``test`` stage with ``{ckpt}`` in its args gets the first stage's last checkpoint;
    ``--ckpt_path`` in a stage's args is passed to ``trainer.fit`` / ``trainer.test``.
    The process keeps the backbone it loaded (`keep_loaded_model`): the grid's next stage or cell
    on the same backbone gets a copy instead of loading it again.
    """
    with keep_loaded_model():
        return _run_stages(stages, run_dir)


def _run_stages(stages: list[tuple[str, list[str], str]], run_dir: Path) -> dict:
    row: dict = {"eval_seconds": 0.0, "peak_rss_mb": 0.0}
    checkpoint: Path | None = None
    for index, (subcommand, args, prefix) in enumerate(stages):
        if "{ckpt}" in args:
            if checkpoint is None:
                raise RunFailed("a stage needs the checkpoint of a fit, but the run has no fit")
            args = [str(checkpoint) if a == "{ckpt}" else a for a in args]
        args, ckpt_path = split_option(args, "--ckpt_path")
        try:
            cli = build([*args, f"--trainer.callbacks+={METER}"])
            trainer, model = cli.trainer, cli.model
            meter = next(c for c in trainer.callbacks if isinstance(c, RunMeter))
            if subcommand == "fit":
                trainer.fit(model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
                if trainer.interrupted:
                    raise GridInterrupted("the fit was interrupted")
                trainer.test(model, datamodule=cli.datamodule)
            elif subcommand == "test":
                trainer.test(model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
            else:
                raise RunFailed(f"unknown stage '{subcommand}' (fit or test)")
        except SystemExit as exit_:  # Lightning's graceful shutdown (Ctrl+C), or a scheduler's requeue
            raise GridInterrupted(f"the run was interrupted (exit {exit_.code})", code=exit_.code) from None
        metrics = read_test_metrics(trainer, prefix)
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
            row["method_class"] = type(model).__name__
            row["dataset_name"] = getattr(cli.datamodule, "dataset_name", None) or ""
            row["backbone"] = model.hparams.get("backbone", "")
            row["device"] = str(trainer.strategy.root_device)
            row["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            row["max_epochs"] = trainer.max_epochs if subcommand == "fit" else ""
            row["log_dir"] = str(trainer.log_dir or "")
            if subcommand == "fit":
                checkpoint = last_checkpoint(trainer, run_dir)
                row["checkpoint"] = str(checkpoint)
                row["checkpoint_bytes"] = checkpoint.stat().st_size
        del cli, trainer, model, meter
        release_memory()
    return row


def release_memory() -> None:
    """Drop what the finished stage left (models, loaders) before the next cell."""
    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def execute(stages: list[tuple[str, list[str], str]], run_dir: Path) -> dict:
    """`run_stages`, with any error recorded instead of raised (``status`` ok / failed; the
    traceback in ``runs/<run id>/error.txt``). Interruptions are raised, not recorded."""
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        row = {**run_stages(stages, run_dir), "status": "ok", "error": ""}
    except Exception as err:  # noqa: BLE001 - any failure of a cell is recorded, the grid goes on
        atomic_write(run_dir / "error.txt", "".join(traceback.format_exception(err)))
        message = str(err) if isinstance(err, RunFailed) else f"{type(err).__name__}: {err}"
        row = {"status": "failed", "error": " ".join(message.split())[:2000]}
        release_memory()
    row["total_seconds"] = time.perf_counter() - started
    return row


def environment() -> dict:
    """Facts about the machine recorded with every row."""
    import torch

    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    return {"host_cpus": os.cpu_count() or 0, "cuda_device": cuda, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------ one cell
@dataclass
class Outcome:
    """What `run_cell` did: ``executed`` (``row`` is the stored row), ``finished`` (a result
    under the current fingerprint was there already) or ``busy`` (another live process holds
    the cell; ``holder`` says which)."""

    state: str
    row: dict | None = None
    holder: dict | None = None


def prepare_cell(directory: Path, fingerprint: str, resume: str | Path | None = None) -> Path | None:
    """The checkpoint to resume the cell from, or None to start it from scratch.

    Only the cell's own last checkpoint is ever resumed (`own_last_checkpoint`; an explicit
    ``resume`` must lie in the cell's folder), and only when it was written under the same
    fingerprint (``cell.json``); the folders of checkpoints of other settings or code are moved
    aside (``<folder>.replaced-<date>``).
    """
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / CELL
    try:
        previous = json.loads(marker.read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        previous = None
    if previous != fingerprint:
        stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        while (old := own_last_checkpoint(directory)) is not None:
            top = directory / old.relative_to(directory).parts[0]
            target, n = directory / f"{top.name}.replaced-{stamp}", 1
            while target.exists():
                target, n = directory / f"{top.name}.replaced-{stamp}-{n}", n + 1
            top.rename(target)
        atomic_write(marker, json.dumps({"fingerprint": fingerprint}) + "\n")
        return None
    if resume is not None:
        path = Path(resume).resolve()
        if not path.is_relative_to(directory.resolve()):
            raise ValueError(f"refusing to resume cell {directory.name} from {path}: not the cell's own checkpoint")
        return path if path.is_file() else None
    return own_last_checkpoint(directory)


def ended(row: dict | None, run: Run, fingerprint: str, session: str | None = None) -> bool:
    """Nothing to do for this cell: it finished, or it ended (failed) in this same session."""
    return is_done(row, run, fingerprint) or (session is not None and row is not None
                                              and row.get("session") == session)


def run_cell(folder: Path, run: Run, executor=None, job: str = "", resume: str | Path | None = None,
             on_start=None, machine: dict | None = None, session: str | None = None) -> Outcome:
    """Run one cell of the grid in ``folder`` unless it is finished or held by another process
    (see the module docstring). ``executor(stages, run_dir) -> row fields`` defaults to
    `execute`; ``job`` is the scheduler task's identity (`lock.job_identity`) for a task;
    ``session`` names one ``dpt-bench`` invocation (its workers run a cell that failed in it
    only once)."""
    folder = Path(folder)
    directory = cell_dir(folder, run.run_id)
    fingerprint = run.fingerprint()
    if ended(read_result(folder, run.run_id), run, fingerprint, session):
        return Outcome("finished")
    claim = CellClaim(directory, job=job)
    if not claim.acquire():
        return Outcome("busy", holder=claim.holder())
    try:
        if ended(read_result(folder, run.run_id), run, fingerprint, session):  # finished while we claimed it
            return Outcome("finished")
        checkpoint = prepare_cell(directory, fingerprint, resume)
        stages = run.stages(directory)
        if checkpoint is not None and stages[0][0] == "fit":
            subcommand, args, prefix = stages[0]
            stages[0] = (subcommand, [*args, "--ckpt_path", str(checkpoint)], prefix)
        if on_start is not None:
            on_start(run)
        started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        fields = (executor or execute)(stages, directory)
        row = {**run.settings(), "status": fields.get("status", "failed"), "error": fields.get("error", ""),
               **{k: v for k, v in fields.items() if k not in ("status", "error")},
               "resumed_from": str(checkpoint or ""), "started": started,
               **(machine if machine is not None else environment()),
               "host": socket.gethostname(), "job": job, "session": session or "", "fingerprint": fingerprint}
        write_result(folder, run.run_id, row)
        return Outcome("executed", row)
    finally:
        claim.release()


def record_failure(folder: Path, run: Run, message: str, job: str = "", session: str | None = None,
                   dead_pid: int | None = None) -> dict | None:
    """Store a failed row for a cell whose process died without recording one (a killed worker);
    None if the cell finished meanwhile or another live process holds it. ``dead_pid``: the dead
    process, not yet reaped, whose claim is taken over directly (so that no other worker can
    claim the cell before its failure is recorded)."""
    folder = Path(folder)
    claim = CellClaim(cell_dir(folder, run.run_id), job=job)
    if not claim.acquire(dead=frozenset() if dead_pid is None else frozenset({dead_pid})):
        return None
    try:
        fingerprint = run.fingerprint()
        if is_done(read_result(folder, run.run_id), run, fingerprint):
            return None
        row = {**run.settings(), "status": "failed", "error": message,
               "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
               "host": socket.gethostname(), "job": job, "session": session or "", "fingerprint": fingerprint}
        write_result(folder, run.run_id, row)
        return row
    finally:
        claim.release()
