"""``dpt-bench GRID.yaml``: every method side by side over datasets, shots and seeds.

A grid (`grid`: its keys, checks and expansion into cells; `schema`: the typed check of its file)
is run into one run folder (`folder`: its layout). Each cell runs through the ``dpt`` command's own
code (`job.run_cell`), whoever runs it: this process, N local worker processes (`local`,
``--workers N``) or a SLURM job array through submitit (`slurm`, ``--launcher submitit``). A cell
is claimed before it runs and stores its own result file atomically (`lock`: the run folder's lock
and the per-cell claims), so no cell runs twice and a rerun skips the finished ones; ``results.csv``,
``summary.md`` and the plots are built from those files (`collect`, `report`; the papers' numbers in
``published.csv``).
"""
from dpt_lightning.bench.command import main
from dpt_lightning.bench.collect import collect, collect_results
from dpt_lightning.bench.folder import read_results
from dpt_lightning.bench.grid import Grid, GridError, Run, expand, load_grid
from dpt_lightning.bench.local import run_grid

__all__ = ["Grid", "GridError", "Run", "collect", "collect_results", "expand", "load_grid", "main", "read_results",
           "run_grid"]
