"""Speed of every method against the reference-style computation and the hardware bound.

For each method, at its reference batch size, on the full-size BiomedCLIP architecture with random
weights (``random-biomedclip``: the numbers mean nothing as accuracy), three variants are measured
in the same run:

* ``ours``: the method as shipped;
* ``reference``: the same module with ``reference_compute=True`` (prompts padded to the tokenizer's
  full context, class text features recomputed for every evaluation batch), nothing else changed;
* ``bound``: what the method cannot avoid, computed directly on its frozen backbone: the image-tower
  pass (forward only where the image path learns nothing, forward+backward where learnable prompts
  sit inside the ViT) plus the text tower forward+backward on the trimmed prompts where the text
  side learns. No loss, no optimizer, no Lightning.

Time: one process per method holds ``ours`` and ``reference`` (and the bound on ours' backbone) and
runs their steps INTERLEAVED, round after round (order rotated), so that load from other programs
on the machine hits all three alike. A training step is the module's own ``on_train_batch_start``,
``training_step``, backward and SGD step (what a fit runs, minus Lightning's loop); evaluation is
its ``test_step`` under ``inference_mode``. Medians after warm-up, wall time and process CPU time.

Memory, trainable parameters and checkpoint bytes: each variant and phase in its own fresh process
(so peaks do not mix), through Lightning itself: ``Trainer.fit`` (2 steps) then a real checkpoint,
and ``Trainer.test``. Peak = RSS high-water mark (``getrusage``), or CUDA max allocated on a GPU.

Grid: a test set of N image files evaluated by S runs (seeds x shots) with the evaluation feature
cache and with re-encoding, runs interleaved, each a ``Trainer.predict`` with every per-process
cache reset; the class probabilities of both paths are compared.

Training grid (`train_grid.py`): CoOp, CoCoOp, KgCoOp, ProGrad and BiomedCoOp fitted and tested
through `dpt-bench`'s cell code with the feature store off and on, against the grid bound.

    python benchmarks/speed.py                            # all methods (~30 min on 2 CPU cores)
    python benchmarks/speed.py --methods coop biomed_dpt  # the done-when check
    python benchmarks/speed.py --methods coop@4           # a method at another batch size
    python benchmarks/speed.py --quick                    # CoOp and Biomed-DPT at batch 4, a few minutes
    python benchmarks/speed.py --train-grid-only          # the training grid alone (~15 min on 2 CPU cores)

Results go to ``benchmarks/results/speed_<cpu|cuda>.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: method key -> (class name in dpt_lightning, reference training batch size; None: nothing trains)
METHODS = {
    "zeroshot": ("ZeroShot", None),
    "coop": ("CoOp", 32),
    "vpt": ("VPT", 32),
    "maple": ("MaPLe", 32),
    "biomed_coop": ("BiomedCoOp", 4),
    "biomed_dpt": ("BiomedDPT", 4),
}
VARIANTS = ("ours", "reference", "bound")
CPU_KEY = {"step_s": "step_cpu_s", "eval_ips": "eval_cpu_ips"}  #: wall-time figure -> its CPU-time twin
#: Done-when targets of issue 7 (training step on 4 classes; grid evaluation).
TARGET_METHODS, TARGET_REF_OVER_OURS, TARGET_OURS_OVER_BOUND, TARGET_GRID = ("coop", "biomed_dpt"), 3.0, 1.3, 5.0


# ================================================================================ worker side
def _setup_worker(task: dict):
    """Quiet warnings, threads, device; returns (device, synchronise, peak-memory reader)."""
    import torch

    from dpt_lightning.cli import quiet_known_warnings

    quiet_known_warnings()
    warnings.filterwarnings("ignore", message=".*self.log.*")  # module steps run without a Trainer
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(task["threads"])
    if task["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return "cuda", torch.cuda.synchronize, torch.cuda.max_memory_allocated
    return "cpu", lambda: None, lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _autocast(task: dict):
    """The autocast context Lightning's ``*-mixed`` precision would open (none for 32-true)."""
    import torch

    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(task["precision"])
    return torch.autocast(task["device"], dtype=dtype) if dtype else contextlib.nullcontext()


def benchmark_dataset(num_classes: int) -> tuple[str, list[str]]:
    """The first benchmark dataset with at least ``num_classes`` classes and its first class names
    (so that Biomed-DPT and BiomedCoOp find their clinical template and description bank)."""
    from dpt_lightning.data.facts import BENCHMARK_DATASETS

    for facts in BENCHMARK_DATASETS.values():
        if len(facts.classnames) >= num_classes:
            return facts.name, list(facts.classnames[:num_classes])
    raise SystemExit(f"--classes {num_classes}: no benchmark dataset has that many classes")


def build_module(task: dict, variant: str):
    """The method's LightningModule; ``reference`` differs only by ``reference_compute=True``."""
    import dpt_lightning

    dataset, classnames = benchmark_dataset(task["classes"])
    cls = getattr(dpt_lightning, METHODS[task["method"]][0])
    return cls(classnames=classnames, dataset=dataset, backbone=task["backbone"],
               reference_compute=variant == "reference")


def synthetic_batch(batch_size: int, num_classes: int, image_size: int, device: str = "cpu") -> dict:
    """A fixed batch of random images (data loading is not what is measured)."""
    import torch

    g = torch.Generator().manual_seed(0)
    return {"image": torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device),
            "label": torch.randint(0, num_classes, (batch_size,), generator=g).to(device),
            "path": [f"/nonexistent/{i}.png" for i in range(batch_size)]}


class _SameBatch:
    """A map-style dataset of ``n`` identical ready-made batches, for ``DataLoader(batch_size=None)``."""

    def __init__(self, batch: dict, n: int):
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        return self.batch


class Bound:
    """The passes ``module``'s configuration cannot avoid, run straight on its frozen backbone.

    Everything is read from the built module, so the bound follows its settings: the visual prompt
    tokens and their placement, whether the image path learns (then forward+backward with the
    prompts as leaves), the learnable text prompt (trimmed, as ``ours``) and deep text prompts, and
    the method's BERT-dropout setting during training.
    """

    def __init__(self, module, task: dict):
        self.backbone, self.task = module.backbone, task
        self.prompts = [p.detach() for p in module.visual_prompts()]
        self.mode = module.visual_mode
        self.image_learns = module.image_path_key() is None  # a learnable image path: forward + backward
        self.text = getattr(module, "prompt", None)  # a learnable ContextPrompt, or None
        self.deep = [p.detach() for p in getattr(module, "deep_text", [])]
        self.dropout = module.backbone_dropout

    def _image(self, images, grad: bool):
        import torch

        leaves = [p.clone().requires_grad_(grad) for p in self.prompts]
        with torch.set_grad_enabled(grad):
            return self.backbone.encode_image(images, leaves, mode=self.mode).float().sum()

    def train_step(self, images) -> None:
        self.backbone.train(self.dropout)
        with _autocast(self.task):
            out = self._image(images, self.image_learns)
            if self.text is not None:
                deep = [p.clone().requires_grad_() for p in self.deep]
                out = out + self.backbone.encode_text_embeddings(self.text(), self.text.attention_mask,
                                                                 deep_prompts=deep).float().sum()
        if out.requires_grad:
            out.backward()
        if self.text is not None:
            self.text.zero_grad(set_to_none=True)

    def eval_step(self, images) -> None:
        import torch

        self.backbone.eval()
        with torch.inference_mode(), _autocast(self.task):
            self._image(images, False)


def module_train_step(module, optimizer, batch: dict, index: int, task: dict) -> None:
    """One training step as a fit runs it: the module's hooks, training_step, backward, SGD step."""
    module.on_train_epoch_start()  # train mode, backbone dropout per method (cheap, every step)
    module.on_train_batch_start(batch, index)
    optimizer.zero_grad(set_to_none=True)
    with _autocast(task):
        loss = module.training_step(batch, index)
    loss.backward()
    optimizer.step()


def module_eval_step(module, batch: dict, index: int, task: dict) -> None:
    """One evaluation batch as ``trainer.test`` runs it: ``test_step`` under inference mode."""
    import torch

    module.eval()
    with torch.inference_mode(), _autocast(task):
        module.test_step(batch, index)


def _clock(sync, fn) -> tuple[float, float]:
    """Wall and process CPU seconds (all threads) of ``fn()``."""
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def _interleaved(steps: dict, rounds: int, sync) -> dict[str, list[tuple[float, float]]]:
    """Run one step of every variant per round (order rotated each round); times per variant."""
    names, times = list(steps), {name: [] for name in steps}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(_clock(sync, lambda: steps[name](r)))
    return times


def measure_timing(task: dict) -> dict:
    """Interleaved timing of ours, reference and bound, training then evaluation."""
    device, sync, _ = _setup_worker(task)
    modules = {v: build_module(task, v).to(device) for v in ("ours", "reference")}
    bound = Bound(modules["ours"], task)
    size = modules["ours"].backbone.image_size
    result: dict = {v: {} for v in VARIANTS}
    if task["batch_size"]:
        batch = synthetic_batch(task["batch_size"], task["classes"], size, device)
        optimizers = {}
        for v, module in modules.items():
            module.on_fit_start()  # the teacher of Biomed-DPT / BiomedCoOp: once per fit, not per step
            optimizers[v] = module.configure_optimizers()["optimizer"]
        steps = {v: (lambda i, v=v: module_train_step(modules[v], optimizers[v], batch, i, task)) for v in modules}
        steps["bound"] = lambda i: bound.train_step(batch["image"])
        for v, times in _interleaved(steps, task["warmup"] + task["steps"], sync).items():
            kept = times[task["warmup"]:]
            result[v].update(step_s=statistics.median(t[0] for t in kept),
                             step_cpu_s=statistics.median(t[1] for t in kept), step_all_s=[t[0] for t in times])
    batch = synthetic_batch(task["eval_batch_size"], task["classes"], size, device)
    steps = {v: (lambda i, v=v: module_eval_step(modules[v], batch, i, task)) for v in modules}
    steps["bound"] = lambda i: bound.eval_step(batch["image"])
    for v, times in _interleaved(steps, 1 + task["eval_batches"], sync).items():
        n = task["eval_batch_size"]
        result[v].update(eval_ips=n / statistics.median(t[0] for t in times[1:]),
                         eval_cpu_ips=n / statistics.median(t[1] for t in times[1:]), eval_all_s=[t[0] for t in times])
    return result


def _trainer(task: dict, **kwargs):
    from lightning.pytorch import Trainer

    return Trainer(accelerator="gpu" if task["device"] == "cuda" else "cpu", devices=1, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, limit_val_batches=0, precision=task["precision"], **kwargs)


def measure_memory(task: dict) -> dict:
    """Peak memory of one variant and phase in this fresh process, through Lightning itself; for
    training also the trainable parameters and the bytes of a real checkpoint (``trainer.save_checkpoint``)."""
    from torch.utils.data import DataLoader

    device, sync, peak = _setup_worker(task)
    variant, train = task["variant"], task["kind"] == "memory_train"
    module = build_module(task, "ours" if variant == "bound" else variant)
    size = module.backbone.image_size
    batch = synthetic_batch(task["batch_size"] if train else task["eval_batch_size"], task["classes"], size)
    if variant == "bound":
        module.to(device)
        bound, images = Bound(module, task), batch["image"].to(device)
        for _ in range(2):
            if train:
                bound.train_step(images)
            else:
                bound.eval_step(images)
        sync()
        return {"train_peak" if train else "eval_peak": peak()}
    loader = DataLoader(_SameBatch(batch, 2), batch_size=None)
    if not train:
        _trainer(task).test(module, loader, verbose=False)
        return {"eval_peak": peak()}
    trainer = _trainer(task, max_steps=2, max_epochs=1)
    trainer.fit(module, train_dataloaders=loader)
    sync()
    result = {"train_peak": peak(), "trainable": sum(p.numel() for p in module.trainable_parameters()),
              "state_bytes_with_backbone": sum(t.numel() * t.element_size() for t in module.state_dict().values())}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "last.ckpt"
        trainer.save_checkpoint(path)
        result["checkpoint_bytes"] = path.stat().st_size
    return result


def write_images(folder: Path, count: int, size: int) -> list:
    """``count`` JPEG files (random pictures) as dataset items of 4 classes."""
    import numpy as np
    from PIL import Image

    from dpt_lightning.data import Item

    rng = np.random.default_rng(0)
    items = []
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:04d}.jpg")
        items.append(Item(f"{i:04d}.jpg", i % 4, f"class {i % 4}"))
    return items


def measure_grid(task: dict) -> dict:
    """A grid of S evaluations (seeds x shots) of N image files: feature cache vs re-encoding.

    Each run is ``trainer.predict`` of the CoOp module with another prompt (another run's
    checkpoint) and every per-process cache reset (text features, the feature-cache object, the
    weights digest), as a new process would start; only the backbone load is shared, which both
    paths pay alike. The two paths alternate run by run; their probabilities are compared.
    """
    import torch
    from torch.utils.data import DataLoader

    from dpt_lightning.data.dataset import ImageListDataset
    from dpt_lightning.features import weights_digest

    _, sync, _ = _setup_worker(task)
    module = build_module({**task, "method": "coop"}, "ours")
    paths = {"reencode": False, "cached": True}
    result = {name: {"runs_s": [], "runs_cpu_s": []} for name in paths}
    worst = 0.0
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "images").mkdir()
        items = write_images(folder / "images", task["grid_images"], 256)
        os.environ["DPT_CACHE_DIR"] = str(folder / "cache")  # an empty feature cache (the model is loaded)
        loader = DataLoader(ImageListDataset(folder / "images", items, module.backbone.test_transform()),
                            batch_size=task["eval_batch_size"], num_workers=0)
        # fixed costs every run of the cached path still pays (profiled once)
        result["digest_s"] = _clock(sync, lambda: weights_digest(module.backbone))[0]
        result["load_images_s"] = _clock(sync, lambda: [None for _ in loader])[0]
        for run in range(task["grid_runs"]):
            with torch.no_grad():
                g = torch.Generator().manual_seed(run)
                module.prompt.ctx.copy_(torch.randn(module.prompt.ctx.shape, generator=g) * 0.02)
            probs = {}
            for name in (list(paths) if run % 2 == 0 else list(paths)[::-1]):
                module.hparams.cache_eval_features = paths[name]
                module.text_cache.clear()
                module._feature_stores = {}  # a new run: reads the store from disk again
                module.backbone.__dict__.pop("_dpt_weights_digest", None)
                out = []
                wall, cpu = _clock(sync, lambda: out.extend(_trainer(task).predict(module, loader)))
                result[name]["runs_s"].append(wall)
                result[name]["runs_cpu_s"].append(cpu)
                probs[name] = torch.cat([o["probs"] for o in out])
            worst = max(worst, float((probs["reencode"] - probs["cached"]).abs().max()))
    for name in paths:
        result[name]["total_s"] = sum(result[name]["runs_s"])
        result[name]["total_cpu_s"] = sum(result[name]["runs_cpu_s"])
    result["max_prob_difference"] = worst
    return result


def measure_train_grid(task: dict) -> dict:
    from train_grid import measure_training_grid

    _setup_worker(task)
    return measure_training_grid(task)


WORKERS = {"timing": measure_timing, "memory_train": measure_memory, "memory_eval": measure_memory,
           "grid": measure_grid, "train_grid": measure_train_grid}


# ================================================================================ orchestration
def spawn(task: dict, log) -> dict:
    """Run one measurement in a fresh Python process; its result is the last stdout line."""
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(task)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    log.write(f"--- {task}\n{proc.stderr[-4000:]}\n")
    log.flush()
    if proc.returncode != 0:
        raise RuntimeError(f"measurement {task} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_methods(names: list[str], batch_override: int | None) -> list[tuple[str, int | None]]:
    """``coop`` or ``coop@4`` -> (method, training batch size; None for zero-shot)."""
    out = []
    for name in names:
        key, _, size = name.partition("@")
        if key not in METHODS:
            raise SystemExit(f"--methods: unknown method {key!r}; choose from {', '.join(METHODS)}")
        batch = int(size) if size else batch_override or METHODS[key][1]
        out.append((key, None if METHODS[key][1] is None else batch))
    return out


def machine(args) -> list[str]:
    import lightning
    import open_clip
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    lines = [f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
             f"- CPU: {cpu}, {os.cpu_count()} logical CPUs visible; torch threads: {args.threads} "
             f"(`torch.set_num_threads({args.threads})`)",
             f"- torch {torch.__version__}, lightning {lightning.__version__}, open_clip {open_clip.__version__}, "
             f"Python {platform.python_version()}"]
    if args.device == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name(0)}")
    return lines


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    return format(value if scale == 1 else value / scale, spec)


def _ratio(a, b) -> float | None:
    return None if a is None or b is None else a / b


def report(args, rows: dict, grid: dict | None, elapsed: float, load: list[float], train_grid: dict | None = None) -> str:
    memory = "CUDA max allocated" if args.device == "cuda" else "peak RSS"
    model = ("Full-size BiomedCLIP architecture with random weights" if args.backbone == "random-biomedclip"
             else "Backbone")
    out = [f"# Speed: ours vs reference-style computation vs bound ({args.device})", "",
           f"{model} (`{args.backbone}`), {args.classes} classes, "
           f"precision {args.precision}. Training: {args.warmup} warm-up + {args.steps} timed steps per variant, "
           f"evaluation: batch {args.eval_batch_size}, 1 warm-up + {args.eval_batches} timed batches; medians. "
           "The three variants of a method run interleaved in one process (wall time and process CPU time, "
           f"all threads); {memory}, parameters and checkpoints come from fresh processes through Lightning.", "",
           *machine(args), f"- command: `python benchmarks/speed.py {' '.join(sys.argv[1:])}`",
           f"- total benchmark time: {elapsed / 60:.1f} min; 1-minute load average at start / end: "
           f"{load[0]:.1f} / {load[-1]:.1f} (other programs on the machine inflate wall times)"]
    out += _method_sections(args, rows, memory) if rows else []
    out += _evaluation_grid_section(args, grid) if grid else []
    if train_grid:
        from train_grid import report_training_grid

        out += report_training_grid(args, train_grid)
    return "\n".join(out) + "\n"


def _method_sections(args, rows: dict, memory: str) -> list[str]:
    """Figures and ratios of the per-method measurements."""
    out = ["", "## Figures", "",
           f"| method | train batch | variant | train step wall (s) | train step CPU (s) | eval wall (img/s) | "
           f"eval CPU (img/s) | {memory} train (GB) | {memory} eval (GB) | trainable params | checkpoint (kB) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (method, batch), variants in rows.items():
        for variant, r in variants.items():
            out.append(f"| {method} | {batch or '-'} | {variant} | {_fmt(r.get('step_s'), '.3f')} | "
                       f"{_fmt(r.get('step_cpu_s'), '.3f')} | {_fmt(r.get('eval_ips'), '.2f')} | "
                       f"{_fmt(r.get('eval_cpu_ips'), '.2f')} | {_fmt(r.get('train_peak'), '.2f', 1e9)} | "
                       f"{_fmt(r.get('eval_peak'), '.2f', 1e9)} | {_fmt(r.get('trainable'), ',d')} | "
                       f"{_fmt(r.get('checkpoint_bytes'), '.1f', 1e3)} |")
    out += ["", "## Ratios", "",
            "Training step time and evaluation time per image, wall (CPU). reference/ours > 1: ours is faster; "
            "ours/bound close to 1: ours does little beyond what the method cannot avoid.", "",
            "| method | train batch | step reference/ours | step ours/bound | eval reference/ours | eval ours/bound "
            "| training-step target |", "|---|---|---|---|---|---|---|"]
    for (method, batch), v in rows.items():
        o, ref, b = v["ours"], v["reference"], v["bound"]

        def pair(num: dict, den: dict, key: str, invert: bool = False) -> str:
            """Wall (CPU) ratio num/den of ``key`` (den/num for rates, so that it is a time ratio)."""
            ratios = [_ratio(den.get(k), num.get(k)) if invert else _ratio(num.get(k), den.get(k))
                      for k in (key, CPU_KEY[key])]
            return "-" if None in ratios else f"{ratios[0]:.2f} ({ratios[1]:.2f})"

        target = "-"
        if method in TARGET_METHODS and args.classes == 4 and o.get("step_s") and not args.quick:
            checks = [(ref[k] / o[k] >= TARGET_REF_OVER_OURS, o[k] / b[k] <= TARGET_OURS_OVER_BOUND)
                      for k in ("step_s", "step_cpu_s")]
            verdict = ["met" if all(c) else "NOT met" for c in checks]
            target = f"{verdict[0]} ({verdict[1]})"
        out.append(f"| {method} | {batch or '-'} | {pair(ref, o, 'step_s')} | {pair(o, b, 'step_s')} | "
                   f"{pair(ref, o, 'eval_ips', invert=True)} | {pair(o, b, 'eval_ips', invert=True)} | {target} |")
    out += ["", f"Training-step target (issue 7, CoOp and Biomed-DPT on 4 classes): reference/ours >= "
            f"{TARGET_REF_OVER_OURS:g} and ours/bound <= {TARGET_OURS_OVER_BOUND:g}."]
    if args.quick:
        out += ["", "A `--quick` run (few steps, a small grid) is a smoke check: it does not judge the targets. "
                "The grid's speed-up grows with the number of runs, since the first run encodes every image; "
                "the full run (`python benchmarks/speed.py`) judges them."]
    with_backbone = next((r["ours"].get("state_bytes_with_backbone") for r in rows.values()
                          if r["ours"].get("state_bytes_with_backbone")), None)
    if with_backbone:
        out += ["", f"A checkpoint that kept the frozen backbone would hold at least {with_backbone / 1e6:.0f} MB "
                "(the module's full state dict); ours keep the prompt parameters only."]
    return out


def _evaluation_grid_section(args, grid: dict) -> list[str]:
    """The evaluation-cache grid: re-encoding vs the feature cache."""
    re, ca = grid["reencode"], grid["cached"]
    speedup, speedup_cpu = re["total_s"] / ca["total_s"], re["total_cpu_s"] / ca["total_cpu_s"]
    out = ["", "## Evaluation of a grid", "",
            f"CoOp, {args.grid_images} test images (JPEG files, 256 px, test batch {args.eval_batch_size}) "
            f"evaluated by {args.grid_runs} runs (e.g. 3 seeds x 5 shots); each run is `Trainer.predict` of "
            "another prompt with the per-process caches reset; the cached path starts with an empty cache; "
            "the two paths alternate run by run.", "",
            "| path | total wall (s) | total CPU (s) | first run (s) | later runs, median (s) | speed-up wall (CPU) "
            "| target |", "|---|---|---|---|---|---|---|",
            f"| re-encode | {re['total_s']:.1f} | {re['total_cpu_s']:.1f} | {re['runs_s'][0]:.2f} | "
            f"{statistics.median(re['runs_s'][1:]):.2f} | 1.00 | |",
            f"| feature cache | {ca['total_s']:.1f} | {ca['total_cpu_s']:.1f} | {ca['runs_s'][0]:.2f} | "
            f"{statistics.median(ca['runs_s'][1:]):.2f} | {speedup:.2f} ({speedup_cpu:.2f}) | "
            f"{'-' if args.quick else 'met' if speedup >= TARGET_GRID else 'NOT met'} (>= {TARGET_GRID:g}x) |", "",
            f"Largest difference between the two paths' class probabilities: {grid['max_prob_difference']:.2e}.",
            "", f"Fixed costs of every run that the cache does not remove (profiled in the same process): the "
            f"backbone weights digest that keys the cache, {grid['digest_s']:.2f} s, and decoding + transforming "
            f"the {args.grid_images} images, {grid['load_images_s']:.2f} s (the loader still reads every image)."]
    return out


def write_report(output: Path, text: str) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(text)
    print(f"written to {output}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        help="methods, optionally with a batch size: coop@4 (default: all, reference batch sizes)")
    parser.add_argument("--batch-size", type=int, help="training batch size for every method (default: reference)")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--eval-batches", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backbone", default="random-biomedclip")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--grid-images", type=int, default=100, help="test images of the grid (reference test batch)")
    parser.add_argument("--grid-runs", type=int, default=15)
    parser.add_argument("--no-grid", action="store_true")
    parser.add_argument("--train-grid-methods", nargs="+", default=["coop", "cocoop", "kgcoop", "prograd", "biomed_coop"],
                        help="trainers/<name>.yaml of the training grid")
    parser.add_argument("--train-grid-epochs", type=int, default=2, help="max_epochs of every training-grid cell")
    parser.add_argument("--train-grid-shots", type=int, default=4, help="K of the training grid (demo data, 4 classes)")
    parser.add_argument("--no-train-grid", action="store_true")
    parser.add_argument("--train-grid-only", action="store_true",
                        help="only the training grid (results/speed_<device>_train_grid.md)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory/checkpoint processes")
    parser.add_argument("--output", help="markdown file (default benchmarks/results/speed_<device>.md)")
    parser.add_argument("--render", help="only write the report from the raw results JSON of an earlier run")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke check in a few minutes (judges no target): CoOp and Biomed-DPT at "
                             "batch 4, fewer steps, no memory processes, a 6-run grid of 24 images "
                             "(results/speed_<device>_quick.md)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(methods=["coop@4", "biomed_dpt"], warmup=1, steps=2, eval_batch_size=8, eval_batches=2,
                            grid_images=24, grid_runs=6, no_memory=True)
        args = parser.parse_args(argv)  # the quick defaults, and what the command line sets on top of them
    if args.worker:
        task = json.loads(args.worker)
        print(json.dumps(WORKERS[task["kind"]](task)))
        return
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    suffix = "_train_grid" if args.train_grid_only else "_quick" if args.quick else ""
    if args.train_grid_only and args.train_grid_epochs != 10:  # 10: the README's measurement
        suffix += f"_{args.train_grid_epochs}_epochs"
    output = Path(args.output or HERE / "results" / f"speed_{args.device}{suffix}.md")
    raw_path = Path(tempfile.gettempdir()) / f"dpt_speed_{args.device}.json"
    if args.render:
        raw = json.loads(Path(args.render).read_text())
        rows = {(m, b): v for m, b, v in raw["rows"]}
        write_report(output, report(args, rows, raw["grid"], raw["elapsed"], raw["load"], raw.get("train_grid")))
        return
    common = {key: getattr(args, key) for key in ("classes", "warmup", "steps", "eval_batch_size", "eval_batches",
                                                 "threads", "backbone", "precision", "device")}
    start, load = time.perf_counter(), [os.getloadavg()[0]]
    rows: dict = {}
    log_path = Path(tempfile.gettempdir()) / f"dpt_speed_{args.device}.log"
    print(f"worker logs: {log_path}", flush=True)
    with open(log_path, "w") as log:
        for method, batch in [] if args.train_grid_only else parse_methods(args.methods, args.batch_size):
            task = {**common, "method": method, "batch_size": batch}
            row = spawn({**task, "kind": "timing"}, log)
            for variant in VARIANTS if not args.no_memory else ():
                for kind in (("memory_train",) if batch else ()) + ("memory_eval",):
                    row[variant].update(spawn({**task, "variant": variant, "kind": kind}, log))
            rows[(method, batch)] = row
            for variant, r in row.items():
                print(f"{method:12s} batch {batch or '-'} {variant:9s} step {_fmt(r.get('step_s'), '.3f')} s "
                      f"(CPU {_fmt(r.get('step_cpu_s'), '.3f')}), eval {r['eval_ips']:.2f} img/s", flush=True)
        grid = train_grid = None
        if not args.no_grid and not args.train_grid_only:
            grid = spawn({**common, "method": "coop", "batch_size": None, "kind": "grid",
                          "grid_images": args.grid_images, "grid_runs": args.grid_runs}, log)
        if not args.no_train_grid and not args.quick:
            train_grid = spawn({**common, "kind": "train_grid", "train_grid_methods": args.train_grid_methods,
                                "train_grid_epochs": args.train_grid_epochs,
                                "train_grid_shots": args.train_grid_shots}, log)
    load.append(os.getloadavg()[0])
    elapsed = time.perf_counter() - start
    raw_path.write_text(json.dumps({"rows": [[m, b, v] for (m, b), v in rows.items()], "grid": grid,
                                    "train_grid": train_grid, "elapsed": elapsed, "load": load}))
    print(f"raw results: {raw_path}")
    write_report(output, report(args, rows, grid, elapsed, load, train_grid))


if __name__ == "__main__":
    main()
