"""Soak benchmark: a long fit of the tiny model must keep memory flat.

    python benchmarks/soak.py [--epochs 200] [--out benchmarks/results/soak.md]

Runs CoOp on the offline demo data through the same Lightning code a `dpt fit` runs, reads the
process's resident memory (RSS, /proc/self/statm) after every epoch, and reports RSS after the
first epoch, after the last and the largest growth between them. Not a test: a figure for the README.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--out", default="benchmarks/results/soak.md")
    args = parser.parse_args()

    from lightning.pytorch import Callback, Trainer

    from dpt_lightning import CoOp, DemoDataModule
    from dpt_lightning.cli import quiet_known_warnings

    quiet_known_warnings()

    class RSSRecorder(Callback):
        def __init__(self):
            self.rss = []

        def on_train_epoch_end(self, trainer, pl_module):
            self.rss.append(rss_mib())

    recorder = RSSRecorder()
    data = DemoDataModule(num_shots=16, batch_size=8, num_workers=0)
    model = CoOp(classnames=data.classnames, backbone="tiny")
    trainer = Trainer(max_epochs=args.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, callbacks=[recorder])
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    rss = recorder.rss
    tenth = max(1, len(rss) // 10)
    lines = [
        "# Soak: CoOp, tiny backbone, demo data (4 classes x 16 shots, batch 8)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch threads {__import__('torch').get_num_threads()}; {time.strftime('%Y-%m-%d')}",
        "",
        "| epochs | steps | seconds | RSS after epoch 1 (MiB) | RSS after last epoch (MiB) | "
        "mean RSS first 10% (MiB) | mean RSS last 10% (MiB) | max RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|",
        f"| {len(rss)} | {trainer.global_step} | {seconds:.0f} | {rss[0]:.1f} | {rss[-1]:.1f} | "
        f"{sum(rss[:tenth]) / tenth:.1f} | {sum(rss[-tenth:]) / tenth:.1f} | {max(rss):.1f} |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
