"""``dpt-bench GRID --launcher submitit``: the grid's unfinished cells as ONE job array.

Each array task runs one cell through `job.run_cell` (the same code as a local run) and ends; the
SLURM options (partition, time, GPUs and CPUs per task, memory, array parallelism, extra
``#SBATCH`` flags, setup lines) go to submitit, which writes the sbatch script. ``--cluster local``
uses submitit's local executor instead (this machine, no SLURM: for machines without a cluster and
for the tests). That executor starts every task at once and knows no array parallelism, so with
``--array-parallelism N`` the cells are dealt round-robin into N tasks ("lanes") that each run
their cells one after another: never more than N cells at once, and no idle process per cell.

Preemption and time limits: SLURM signals the task (``USR2``, 90 s before the limit); submitit
calls `CellTask.checkpoint`, which names the cell's OWN last checkpoint
(``runs/<run id>/lightning_logs/version_<n>/checkpoints/last.ckpt``, the last finished epoch), requeues the task and exits; the requeued task resumes from that file
and no other. A task killed without warning leaves its claim behind: on this host it is stale at
once (its process is gone), elsewhere after ``$DPT_BENCH_STALE_AFTER`` seconds without heartbeat,
and for the same requeued array task at once. Submitting the grid again sends only the cells
without a result, and resumes each from its own checkpoint.

Each task stores its row; the last task to end builds results.csv, summary.md and the plots
(`collect.collect_if_complete`); ``dpt-bench --collect RUN_FOLDER`` does it at any time.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dpt_lightning.bench.folder import RESULT, cell_dir, read_result
from dpt_lightning.bench.grid import Grid, GridError, Run, find_run
from dpt_lightning.bench.job import GridInterrupted, own_last_checkpoint
from dpt_lightning.bench.lock import CellClaim, job_identity

SUBMITIT = "submitit"
SUBMISSIONS = "submissions.jsonl"
LOCAL_TIMEOUT_MIN = 7 * 24 * 60  # submitit's local executor would otherwise stop a task after 2 minutes


@dataclass
class SlurmOptions:
    """What the job array asks of the scheduler (``None``: the cluster's default)."""

    cluster: str = "slurm"  # slurm | local (submitit's local executor)
    partition: str | None = None
    time_min: int | None = None
    gpus_per_task: int | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    array_parallelism: int | None = None
    sbatch: dict[str, str] = field(default_factory=dict)  # extra #SBATCH flags: {"account": "abc", "qos": "high"}
    setup: list[str] = field(default_factory=list)  # shell lines run before each task

    def parameters(self, name: str) -> dict:
        params = {"name": name, "nodes": 1, "tasks_per_node": 1, "timeout_min": self.time_min,
                  "gpus_per_node": self.gpus_per_task, "cpus_per_task": self.cpus_per_task, "mem_gb": self.mem_gb}
        if self.cluster == "slurm":
            params |= {"slurm_partition": self.partition, "slurm_array_parallelism": self.array_parallelism,
                       "slurm_additional_parameters": dict(self.sbatch) or None,
                       "slurm_setup": list(self.setup) or None}
        else:
            params["timeout_min"] = self.time_min or LOCAL_TIMEOUT_MIN
            params["local_setup"] = list(self.setup) or None
        return {k: v for k, v in params.items() if v is not None}


def parse_time(text: str) -> int:
    """A SLURM time limit in minutes: ``90``, ``HH:MM:SS``, ``MM:SS``... as sbatch, or ``D-HH[:MM[:SS]]``."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise GridError(f"--time {text!r}: give minutes (90), HH:MM:SS (4:00:00) or D-HH:MM:SS (1-12:00:00)")
    days, a, b, c = (int(g) if g else None for g in match.groups())
    if days is None and b is None:
        minutes = a  # "90": minutes
    elif days is None and c is None:
        minutes = a + (1 if b else 0)  # "MM:SS"
    elif days is None:
        minutes = a * 60 + b + (1 if c else 0)  # "HH:MM:SS"
    else:
        minutes = days * 1440 + a * 60 + (b or 0) + (1 if c else 0)  # "D-HH[:MM[:SS]]"
    if minutes < 1:
        raise GridError(f"--time {text!r} is shorter than a minute")
    return minutes


def parse_sbatch(items: list[str]) -> dict[str, str]:
    """``--sbatch account=abc --sbatch qos=high`` (or ``--sbatch=--account=abc``) as a mapping."""
    out = {}
    for item in items or []:
        key, sep, value = item.lstrip("-").partition("=")
        if not key:
            raise GridError(f"--sbatch {item!r}: give KEY=VALUE, e.g. --sbatch account=myproject")
        out[key.replace("-", "_")] = value if sep else True
    return out


# -------------------------------------------------------------------------- one task
@dataclass
class CellTask:
    """One array task: run the cells ``run_ids`` of the run folder one after another (one cell on
    SLURM, a lane of cells on the local executor), the first resuming ``resume`` if given
    (picklable, for submitit). ``executor_spec`` ("module:function") stands in for `job.execute`
    (tests)."""

    folder: str
    run_ids: tuple[str, ...]
    resume: str | None = None
    executor_spec: str | None = None
    current: int = field(default=0, init=False, repr=False)  # the index of the cell running now

    def __call__(self) -> list[dict]:
        from dpt_lightning.bench.collect import collect_if_complete

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if os.getcwd() not in sys.path:  # user method modules in the submission folder, as `dpt` finds them
            sys.path.insert(0, os.getcwd())
        outcomes = []
        for index, run_id in enumerate(self.run_ids):
            self.current = index
            outcomes.append(self._run(run_id, self.resume if index == 0 else None))
        try:
            written = collect_if_complete(Path(self.folder))
        except Exception as err:  # noqa: BLE001 - the cells' own results are stored; collecting can be redone
            print(f"dpt-bench task: collecting failed ({err}); run dpt-bench --collect {self.folder}", flush=True)
            written = None
        if written is not None:
            print(f"dpt-bench task: the grid is complete; wrote {[str(p) for p in written]}", flush=True)
        return outcomes

    def _run(self, run_id: str, resume: str | None) -> dict:
        from dpt_lightning.bench.collect import load_run_folder
        from dpt_lightning.bench.job import run_cell

        run = find_run(load_run_folder(self.folder), run_id)
        job = job_identity()
        executor = None
        if self.executor_spec:
            module, _, name = self.executor_spec.partition(":")
            executor = getattr(importlib.import_module(module), name)
        print(f"dpt-bench task {job or os.getpid()}: cell {run.label()}" + (f", resuming {resume}" if resume else ""),
              flush=True)
        try:
            outcome = run_cell(Path(self.folder), run, executor, job=job, resume=resume)
        except GridInterrupted as err:  # preemption / time limit: exit as submitit asked (it requeues)
            if err.code is not None:
                raise SystemExit(err.code) from None
            raise
        if outcome.state == "busy":
            holder = outcome.holder or {}
            print(f"dpt-bench task: {run_id} is running elsewhere (pid {holder.get('pid')} on "
                  f"{holder.get('host')}); nothing to do", flush=True)
        elif outcome.state == "finished":
            print(f"dpt-bench task: {run_id} had finished already", flush=True)
        row = outcome.row or read_result(Path(self.folder), run_id) or {}
        return {"run_id": run_id, "state": outcome.state, "status": row.get("status", "")}

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on preemption or time-out: requeue this task's cells from the one
        running now, which resumes from its own last checkpoint (if an epoch finished)."""
        from submitit.helpers import DelayedSubmission

        remaining = self.run_ids[self.current:]
        own = own_last_checkpoint(cell_dir(Path(self.folder), remaining[0]))
        return DelayedSubmission(CellTask(self.folder, remaining, str(own) if own is not None else None,
                                          self.executor_spec))


# ---------------------------------------------------------------------- submitting
def make_executor(folder: Path, grid: Grid, options: SlurmOptions):
    import submitit

    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if options.cluster == "slurm" and missing:
        raise GridError(f"--launcher submitit: {' and '.join(missing)} not found, so this is not a SLURM login "
                        "node. Submit from one, or add --cluster local to run the job array on this machine")
    if options.cluster == "slurm" and options.time_min is None:
        raise GridError("--launcher submitit: give the time limit of one cell, e.g. --time 4:00:00 (a task that "
                        "reaches it is requeued and resumes from its last checkpoint)")
    executor = submitit.AutoExecutor(folder=Path(folder) / SUBMITIT, cluster=options.cluster)
    executor.update_parameters(**options.parameters(f"dpt-bench-{grid.name}"))
    return executor


def queued_cells(folder: Path) -> dict[str, str]:
    """Cells of earlier submissions into this folder whose task is still pending or running
    (``{run_id: job id}``), so that submitting again does not queue them twice."""
    path = Path(folder) / SUBMITIT / SUBMISSIONS
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    active: dict[str, str] = {}
    slurm_jobs = {r["job_id"].split("_")[0] for r in records if r.get("cluster") == "slurm"}
    alive_slurm = _squeue(slurm_jobs) if slurm_jobs else set()
    for record in records:
        job_id = str(record["job_id"])
        if record.get("cluster") == "slurm":
            alive = job_id in alive_slurm or job_id.split("_")[0] in alive_slurm
        else:
            alive = job_id.isdigit() and _pid_alive(int(job_id))
        if alive:
            active[record["run_id"]] = job_id
    return active


def _squeue(array_ids: set[str]) -> set[str]:
    try:
        listing = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", ",".join(sorted(array_ids))],
                                 capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return {line.strip() for line in listing.splitlines() if line.strip()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lanes(cells: list[Run], options: SlurmOptions) -> list[list[Run]]:
    """The cells of each array task: one each, or on the local executor with a parallelism N below
    their number, N lanes dealt round-robin (the executor itself would start them all at once)."""
    count = options.array_parallelism
    if options.cluster != "local" or not count or count >= len(cells):
        return [[run] for run in cells]
    return [cells[i::count] for i in range(count)]


def submit(folder: Path, grid: Grid, todo: list[Run], options: SlurmOptions, stream=None,
           executor_spec: str | None = None) -> list[tuple[object, str]]:
    """Submit the cells ``todo`` (not finished, not running) as one job array; returns the
    ``(job, run_id)`` pairs. ``executor_spec`` ("module:function") stands in for `job.execute`."""
    out = stream or sys.stdout
    folder = Path(folder)
    queued = queued_cells(folder)
    if queued:
        print(f"dpt-bench: {len(queued)} cell(s) are still queued or running from an earlier submission "
              f"(jobs {sorted(set(queued.values()))[:5]}...); not submitted again", file=out, flush=True)
    cells = [run for run in todo if run.run_id not in queued
             and CellClaim(cell_dir(folder, run.run_id)).holder() is None]
    if not cells:
        print("dpt-bench: nothing to submit", file=out, flush=True)
        return []
    executor = make_executor(folder, grid, options)
    groups = lanes(cells, options)
    tasks = [CellTask(str(folder), tuple(run.run_id for run in group), executor_spec=executor_spec) for group in groups]
    jobs = executor.submit_array(tasks)
    submitted = [(job, run.run_id) for job, group in zip(jobs, groups) for run in group]
    records = "".join(json.dumps({"job_id": str(job.job_id), "run_id": run_id, "cluster": options.cluster,
                                  "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n"
                      for job, run_id in submitted)
    with open(folder / SUBMITIT / SUBMISSIONS, "a") as f:
        f.write(records)
    if options.cluster == "slurm":
        array = str(jobs[0].job_id).split("_")[0]
        parallel = f", at most {options.array_parallelism} at once" if options.array_parallelism else ""
        print(f"dpt-bench: submitted {len(cells)} cell(s) as SLURM job array {array}{parallel} (squeue -j {array}); "
              f"task logs in {folder / SUBMITIT}", file=out, flush=True)
    else:
        how = "one process each, all at once" if len(groups) == len(cells) else \
            f"in {len(groups)} processes that each run their cells one after another (--array-parallelism)"
        print(f"dpt-bench: started {len(cells)} cell(s) with submitit's local executor ({how}); task logs in "
              f"{folder / SUBMITIT}", file=out, flush=True)
    return submitted


def wait(folder: Path, submitted: list[tuple[object, str]], stream=None, poll: float = 5.0) -> dict:
    """Wait for the submitted tasks (``(job, run_id)`` pairs), printing each cell as its result
    file appears or changes; returns counts ``{executed, failed, missing}``."""
    from dpt_lightning.bench.local import GridProgress

    out = stream or sys.stdout
    folder = Path(folder)

    def stamp(run_id: str) -> int | None:
        try:
            return (cell_dir(folder, run_id) / RESULT).stat().st_mtime_ns
        except FileNotFoundError:
            return None

    before = {run_id: stamp(run_id) for _, run_id in submitted}
    progress = GridProgress(len(submitted), out)
    reported: set[str] = set()
    counts = {"executed": 0, "failed": 0, "missing": 0}

    def report() -> None:
        for run_id, old in before.items():
            if run_id in reported or stamp(run_id) in (None, old):
                continue
            row = read_result(folder, run_id) or {}
            reported.add(run_id)
            counts["executed"] += 1
            counts["failed"] += row.get("status") != "ok"
            progress.finish(run_id, row)

    while not all(job.done() for job, _ in submitted):
        report()
        time.sleep(poll)
    report()
    for job, run_id in submitted:
        if run_id not in reported:
            counts["missing"] += 1
            print(f"  {run_id}: task {job.job_id} ended without a new result (it had finished, or it died: see "
                  f"{folder / SUBMITIT})", file=out, flush=True)
    return counts
