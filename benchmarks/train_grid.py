"""The training-grid section of `speed.py`: a grid of text-side methods with the feature store on
and off, through the code `dpt-bench` runs (`bench.grid` expands the cells, `bench.job.execute`
runs each one: the ``dpt`` command's parser, ``Trainer.fit`` then ``Trainer.test``).

The grid: CoOp, CoCoOp, KgCoOp, ProGrad and BiomedCoOp, each in its shipped configuration (its
reference batch size) but ``--trainer.max_epochs`` reduced so that it fits CPU time, on the demo
pictures (4 classes, K shots, one seed, no validation as in the shipped configs, the test split at
the end), on the backbone of the run (`random-biomedclip`: the full-size architecture, random weights; accuracy
means nothing). Each method runs twice, interleaved (off, on, off, on, ...), in the same process:

* ``off``: ``cache_eval_features=false cache_train_features=false``: every view through the tower;
* ``on``: both true, one store shared by the grid (empty at the start): the first method computes
  and stores every view, the next ones read them.

The grid bound: one image-tower pass per view (measured directly: the tower's forward over every
view the fits and tests see, once) plus what each method pays with every image feature served (its
``on`` run with a full store: text passes, loss, optimiser, data loading, the backbone copy,
Lightning). The first method's ``on`` run filled the store, so it is run once more with the full
store for the bound. The backbone is read once: every cell gets a copy of the model the process
keeps, as in ``dpt-bench`` (`keep_loaded_model`); the load times are reported. Both paths' test
accuracies are compared cell by cell.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("coop", "cocoop", "kgcoop", "prograd", "biomed_coop")
STORE = {"off": "false", "on": "true"}


def _store_args(state: str) -> list[str]:
    return [f"--model.init_args.{flag}={STORE[state]}" for flag in ("cache_eval_features", "cache_train_features")]


def _scratch_cache(folder: Path) -> Path:
    """A cache folder with an empty feature store that sees the generated models and demo data of
    the real cache (linked, not copied: random-biomedclip is 800 MB)."""
    from dpt_lightning.files import cache_root

    folder.mkdir(parents=True)
    for entry in cache_root().iterdir() if cache_root().is_dir() else ():
        if entry.name != "features":
            (folder / entry.name).symlink_to(entry)
    return folder


def _image_pass(task: dict, runs, scratch: Path) -> float:
    """Seconds of one forward pass of the frozen image tower over as many views as the grid's fits
    see: the training split once per epoch, the validation split once per epoch if the trainer
    validates (the shipped configs do not), the test split once (the first cell's data: same
    demo pictures, shots and seed). The batches are loaded first:
    data loading is paid by every run alike and is not part of the bound."""
    import torch

    from dpt_lightning.bench import job

    cli = job.build([*runs[0].stages(scratch)[0][1], *_store_args("off")])
    model, data = cli.model, cli.datamodule
    data.use_transforms(model.backbone.train_transform(), model.backbone.test_transform())
    data.setup("fit")
    per_epoch = [b["image"] for b in data.train_dataloader()]
    if cli.trainer.limit_val_batches != 0:  # the shipped configs never validate
        per_epoch += [b["image"] for b in data.val_dataloader()]
    data.setup("test")
    batches = per_epoch * int(task["train_grid_epochs"]) + [b["image"] for b in data.test_dataloader()]
    backbone = model.backbone.eval()
    started = time.perf_counter()
    with torch.inference_mode():
        for images in batches:
            backbone.pool_image(images)
    return time.perf_counter() - started


def _load_seconds(name: str, repeats: int = 3) -> dict:
    """Median seconds of loading the backbone three ways: building it with its random
    initialisation (as before `SkipRandomInit`), without it (a cold load now), and as a copy of
    the model a `dpt-bench` process keeps (every later cell)."""
    import contextlib
    import statistics

    from dpt_lightning.backbone import loading

    def timed(load) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            load()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    skip = loading.SkipRandomInit
    loading.SkipRandomInit = contextlib.nullcontext
    try:
        initialised = timed(lambda: loading.load_open_clip(name))
    finally:
        loading.SkipRandomInit = skip
    cold = timed(lambda: loading.load_open_clip(name))
    with loading.keep_loaded_model():
        loading.load_open_clip(name)
        kept = timed(lambda: loading.load_open_clip(name))
    loading.forget_loaded_model()
    return {"random_init": initialised, "cold": cold, "kept": kept}


def measure_training_grid(task: dict) -> dict:
    """Wall seconds of every cell with the store off and on (interleaved), the grid bound, and the
    test accuracy of each cell on both paths."""
    from dpt_lightning.bench import expand, job, load_grid

    grid_config = {
        "name": "store", "protocol": "fewshot",
        "methods": [str(ROOT / "trainers" / f"{m}.yaml") for m in task["train_grid_methods"]],
        "datasets": [str(ROOT / "datasets" / "demo.yaml")], "shots": [task["train_grid_shots"]], "seeds": [1],
        "model": {"backbone": task["backbone"]},
        "trainer": {"max_epochs": task["train_grid_epochs"], "accelerator": "cpu" if task["device"] == "cpu" else "gpu",
                    "devices": 1, "precision": task["precision"], "enable_progress_bar": False,
                    "enable_model_summary": False, "logger": False},
    }
    result: dict = {"cells": {}, "store_bytes": 0}
    with tempfile.TemporaryDirectory(prefix="dpt-train-grid-") as tmp:
        tmp = Path(tmp)
        os.environ["DPT_CACHE_DIR"] = str(_scratch_cache(tmp / "cache"))
        (tmp / "grid.yaml").write_text(yaml.safe_dump(grid_config))
        runs = expand(load_grid(tmp / "grid.yaml"))
        result["load_s"] = _load_seconds(task["backbone"])
        result["image_pass_s"] = _image_pass(task, runs, tmp / "image_pass")

        def cell(run, state: str, tag: str = "") -> dict:
            run_dir = tmp / "runs" / f"{run.run_id}_{state}{tag}"
            stages = [(sub, [*args, *_store_args(state)], prefix) for sub, args, prefix in run.stages(run_dir)]
            started = time.perf_counter()
            row = job.execute(stages, run_dir)
            if row["status"] != "ok":
                raise RuntimeError(f"{run.run_id} ({state}) failed: {row['error']}")
            shutil.rmtree(run_dir, ignore_errors=True)
            return {"wall_s": time.perf_counter() - started, "acc": float(row["acc"]),
                    "train_s": float(row.get("train_seconds", 0.0)), "eval_s": float(row.get("eval_seconds", 0.0))}

        for index, run in enumerate(runs):
            order = ("off", "on") if index % 2 == 0 else ("on", "off")
            result["cells"][run.method.name] = {state: cell(run, state) for state in order}
        result["cells"][runs[0].method.name]["on_full_store"] = cell(runs[0], "on", "_again")
        from dpt_lightning.features import store_size

        result["store_bytes"], result["store_shards"] = store_size()
    return result


def report_training_grid(args, grid: dict) -> list[str]:
    """The markdown section of `measure_training_grid`'s result."""
    cells = grid["cells"]
    first = next(iter(cells))
    off = sum(c["off"]["wall_s"] for c in cells.values())
    on = sum(c["on"]["wall_s"] for c in cells.values())
    bound = grid["image_pass_s"] + cells[first]["on_full_store"]["wall_s"] + sum(
        c["on"]["wall_s"] for name, c in cells.items() if name != first)
    same = all(c["off"]["acc"] == c["on"]["acc"] for c in cells.values())
    out = ["", "## Training grid: the feature store", "",
           f"{len(cells)} text-side methods, each in its shipped configuration (reference batch size) with "
           f"`--trainer.max_epochs {args.train_grid_epochs}`, on the demo pictures (4 classes, K={args.train_grid_shots}, "
           f"seed 1, no validation as in the shipped configs, the test split at the end), through `dpt-bench`'s cell code "
           "(`bench.job.execute`: parse, fit, test). Store off / on alternate cell by cell in one process; "
           "the store starts empty. Bound: one image-tower forward over every view of the grid "
           f"({grid['image_pass_s']:.1f} s, measured directly) plus each method's run with every image feature "
           "served (the first method rerun with the full store).", "",
           "| method | store off (s) | store on (s) | off/on | test acc off | test acc on |", "|---|---|---|---|---|---|"]
    for name, c in cells.items():
        note = f" (full store: {c['on_full_store']['wall_s']:.1f})" if "on_full_store" in c else ""
        out.append(f"| {name} | {c['off']['wall_s']:.1f} | {c['on']['wall_s']:.1f}{note} | "
                   f"{c['off']['wall_s'] / c['on']['wall_s']:.2f} | {c['off']['acc']:.4f} | {c['on']['acc']:.4f} |")
    out += ["", "| grid | store off (s) | store on (s) | bound (s) | off/on | on/bound |", "|---|---|---|---|---|---|",
            f"| {len(cells)} methods | {off:.1f} | {on:.1f} | {bound:.1f} | {off / on:.2f} | {on / bound:.2f} |", "",
            f"Test accuracies {'identical on both paths for every method' if same else 'DIFFER between the paths'}. "
            f"Store after the grid: {grid['store_bytes'] / 2**20:.1f} MiB in {grid['store_shards']} shard(s). "
            "Targets (issue 17): off/on >= 3 and on/bound <= 1.3."]
    if "load_s" in grid:
        load = grid["load_s"]
        out += ["", "Each cell's backbone (median of 3 loads, measured before the grid): "
                f"{load['random_init']:.2f} s built with its random initialisation, {load['cold']:.2f} s without it "
                f"(a cold load: `SkipRandomInit`), {load['kept']:.2f} s as a copy of the model the process keeps "
                "(`keep_loaded_model`: every cell after the first, with the store off or on)."]
    return out
