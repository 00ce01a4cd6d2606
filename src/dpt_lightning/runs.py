"""Finding a run's own checkpoint for ``--ckpt_path last``.

Every ``dpt`` run writes the config it ran with (``config.yaml``) into its log folder, beside
``checkpoints/last.ckpt``. ``last`` means: the newest ``last.ckpt`` of the runs under
``--trainer.default_root_dir`` whose model, data and seed are this command's (settings that
cannot change a result, such as loader workers, and the backbone's location, are not compared:
the checkpoint's backbone digest is checked on loading). A run resumed from another one continues
it; two runs of the same settings started from scratch are ambiguous, and so is nothing at all:
both are errors that list what was found.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

#: Settings left out of the comparison (``section.init_args.name``): they cannot change a result.
IGNORED = {"model": {"backbone", "cache_eval_features", "cache_train_features", "classnames", "dataset", "protocol", "reference_compute"},
           "data": {"num_workers", "test_batch_size", "check_images"}}
COMPARED = ("model", "data", "seed_everything")


class RunNotFoundError(FileNotFoundError):
    """``--ckpt_path last`` found no run of this config, or several."""


@dataclass(frozen=True)
class Run:
    folder: Path
    settings: dict
    resumed_from: str | None

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoints" / "last.ckpt"


def comparable(config: dict) -> dict:
    """The part of a run config that decides its result (see `IGNORED`)."""
    out = {}
    for key in COMPARED:
        value = config.get(key)
        if isinstance(value, dict) and key in IGNORED:
            init_args = {k: v for k, v in (value.get("init_args") or {}).items() if k not in IGNORED[key]}
            value = {"class_path": value.get("class_path"), "init_args": init_args}
        out[key] = value
    return out


def runs_under(root: Path) -> list[Run]:
    """Every run under ``root`` that has a ``config.yaml`` and a ``checkpoints/last.ckpt``."""
    runs = []
    for config in sorted(root.glob("**/config.yaml")):
        if not (config.parent / "checkpoints" / "last.ckpt").is_file():
            continue
        try:
            saved = yaml.safe_load(config.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(saved, dict):
            runs.append(Run(config.parent, comparable(saved), saved.get("ckpt_path")))
    return runs


def last_checkpoint(root: str | Path, config: dict) -> Path:
    """This config's own ``last.ckpt`` under ``root`` (module docstring), or `RunNotFoundError`."""
    root = Path(root).resolve()
    runs = runs_under(root)
    mine = [run for run in runs if run.settings == comparable(config)]
    if not runs:
        raise RunNotFoundError(f"--ckpt_path last: no checkpoints/last.ckpt under {root}; pass the "
                               "--trainer.default_root_dir of the run to resume, or the checkpoint's path")
    if not mine:
        found = "; ".join(str(run.folder) for run in runs[:10]) or "none"
        raise RunNotFoundError(
            f"--ckpt_path last: no run under {root} has this model, data and seed (runs with a last.ckpt: {found}); "
            "pass the checkpoint's path, or the --trainer.default_root_dir and settings of the run to resume")
    fresh = [run for run in mine if not run.resumed_from]
    if len(fresh) > 1:
        listed = "; ".join(f"{run.checkpoint}" for run in fresh)
        raise RunNotFoundError(f"--ckpt_path last is ambiguous: {len(fresh)} runs under {root} with these settings "
                               f"started from scratch: {listed}; pass the checkpoint's path")
    return max(mine, key=lambda run: run.checkpoint.stat().st_mtime_ns).checkpoint
