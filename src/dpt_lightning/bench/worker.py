"""A local worker process of ``dpt-bench --workers N`` (started by `local.WorkerPool`).

``python -m dpt_lightning.bench.worker RUN_FOLDER --slot I --status-fd FD ...``: pins itself to
its CPU cores and thread count, then claims and runs the grid's cells (`job.run_cell`) until none
is left, reporting each start and end as a JSON line on ``FD``. It stops between cells when the
``dpt-bench`` process that started it is gone, and on SIGINT stops its cell and releases its claim.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpt-bench worker")
    parser.add_argument("folder")
    parser.add_argument("--slot", type=int, default=0)
    parser.add_argument("--status-fd", type=int, required=True)
    parser.add_argument("--parent", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cores", default="")
    parser.add_argument("--session", default=None, help="the dpt-bench invocation (a cell failed in it runs once)")
    parser.add_argument("--executor", default=None, help="module:function standing in for job.execute (tests)")
    args = parser.parse_args(argv)
    if args.cores and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {int(c) for c in args.cores.split(",")})
        except OSError:
            pass
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if os.getcwd() not in sys.path:  # user method modules in the working folder, as `dpt` finds them
        sys.path.insert(0, os.getcwd())
    from dpt_lightning.bench.collect import load_run_folder
    from dpt_lightning.bench.grid import expand
    from dpt_lightning.bench.job import environment, run_cell

    status = os.fdopen(args.status_fd, "w", buffering=1)

    def emit(event: str, run_id: str, **fields) -> None:
        status.write(json.dumps({"event": event, "run_id": run_id, "slot": args.slot, **fields}, default=str) + "\n")

    executor = None
    if args.executor:
        module, _, name = args.executor.partition(":")
        executor = getattr(importlib.import_module(module), name)
    grid = load_run_folder(args.folder)
    machine = environment()
    try:
        for run in expand(grid):
            if args.parent is not None and os.getppid() != args.parent:
                print("dpt-bench worker: the dpt-bench process that started me is gone; stopping", flush=True)
                break
            outcome = run_cell(args.folder, run, executor, on_start=lambda r: emit("start", r.run_id),
                               machine=machine, session=args.session)
            if outcome.state == "executed":
                row = outcome.row
                emit("done", run.run_id, **{k: row.get(k) for k in ("status", "error", "acc", "novel_acc",
                                                                     "total_seconds")})
            elif outcome.state == "busy":
                holder = outcome.holder or {}
                emit("busy", run.run_id, pid=holder.get("pid"), host=holder.get("host"))
    except KeyboardInterrupt:
        print("dpt-bench worker: interrupted; the cell's claim is released", flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
