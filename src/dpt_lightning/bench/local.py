"""Running a grid's cells on this machine: one after another in this process (``--workers 1``),
or N at once in worker processes (``--workers N``).

Each worker process claims cells itself (`job.run_cell`, the same code as every other way of
running a cell) until none is left, so the workers never run a cell twice and a ``dpt-bench`` or
SLURM task working on the same folder is respected. The workers share the machine fairly: on
GPUs each gets one (``CUDA_VISIBLE_DEVICES`` round-robin), and the CPU cores are split between
them (a CPU affinity and ``OMP_NUM_THREADS``/``torch.set_num_threads`` per worker), so N workers
do not oversubscribe the cores. Ctrl+C (or SIGTERM) stops every worker cleanly: each interrupts
its cell (Lightning's graceful shutdown), releases its claim and exits; a worker that does not
within `GRACE_SECONDS` is killed. A worker that dies (killed, out of memory) has its cell recorded
as failed and is replaced; the other workers go on.
"""
from __future__ import annotations

import json
import os
import uuid
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

from dpt_lightning.bench.collect import collect_results
from dpt_lightning.bench.folder import GRID_COPY, cell_dir, read_result, write_if_changed
from dpt_lightning.bench.grid import Grid, Run, expand
from dpt_lightning.bench.lock import CellClaim, release_claims_of

GRACE_SECONDS = 60.0
MAX_RESTARTS = 3  # per worker slot


# ------------------------------------------------------------------------- progress
class GridProgress:
    """A one-line progress bar over the grid, printed when a cell starts (Lightning draws its own
    bar inside the cell, so the grid's bar is a plain line that never fights with it)."""

    def __init__(self, total: int, stream=None, width: int = 24):
        self.total, self.width, self.done, self.begun = total, width, 0, 0
        self.stream = stream or sys.stdout
        self.started = time.perf_counter()

    def _bar(self) -> str:
        filled = round(self.width * self.done / max(self.total, 1))
        return "[" + "#" * filled + "-" * (self.width - filled) + "]"

    def start(self, label: str, worker: int | None = None) -> None:
        elapsed = time.perf_counter() - self.started
        eta = f", about {_clock(elapsed / self.done * (self.total - self.done))} left" if self.done else ""
        self.begun += 1
        who = f" on worker {worker}" if worker is not None else ""
        print(f"\ndpt-bench {self._bar()} {self.done}/{self.total} ({_clock(elapsed)} elapsed{eta})\n"
              f"  run {self.begun}/{self.total}{who}: {label}", file=self.stream, flush=True)

    def finish(self, run_id: str, row: dict) -> None:
        self.done += 1
        result = f"acc {100 * float(row['acc']):.2f}%" if row.get("acc") not in (None, "") else ""
        if row.get("novel_acc") not in (None, ""):
            result += f", novel {100 * float(row['novel_acc']):.2f}%"
        status = result if row.get("status") == "ok" else f"FAILED: {str(row.get('error', ''))[:300]}"
        print(f"  done {run_id} in {_clock(row.get('total_seconds') or 0)}: {status}", file=self.stream, flush=True)


def _clock(seconds: float) -> str:
    seconds = int(round(float(seconds)))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _counts(runs: int, todo: int) -> dict:
    return {"runs": runs, "skipped": runs - todo, "executed": 0, "failed": 0}


def pending(grid: Grid, folder: Path, session: str | None = None) -> list[Run]:
    """The grid's cells without an ``ok`` result under their current fingerprint (nor a result
    of this ``session``)."""
    from dpt_lightning.bench.job import ended

    return [run for run in expand(grid) if not ended(read_result(folder, run.run_id), run, run.fingerprint(), session)]


def write_grid_copy(grid: Grid, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_if_changed(folder / GRID_COPY, grid.to_yaml())


# ---------------------------------------------------------------------- the grid loop
def run_grid(grid: Grid, folder: Path, executor=None, fail_fast: bool = False, stream=None, workers: int = 1,
             executor_spec: str | None = None) -> dict:
    """Execute every cell of ``grid`` not yet finished in ``folder``; returns counts
    ``{runs, skipped, executed, failed}`` (cells held by another process are neither).

    ``workers == 1``: in this process; ``executor(stages, run_dir) -> row fields`` defaults to
    `job.execute` (the dpt code; tests pass their own). ``workers > 1``: that many worker
    processes; ``executor_spec`` ("module:function") names a stand-in executor for them.
    ``results.csv`` is rewritten after every cell (and on Ctrl+C) from the cells' result files.
    """
    folder = Path(folder)
    write_grid_copy(grid, folder)
    runs = expand(grid)
    todo = pending(grid, folder)
    out = stream or sys.stdout
    if len(todo) < len(runs):
        print(f"dpt-bench: {len(runs) - len(todo)} of {len(runs)} runs already finished in {folder}; "
              f"{len(todo)} to run", file=out, flush=True)
    if workers > 1:
        if executor is not None:
            raise ValueError("worker processes cannot use an executor object; give executor_spec='module:function'")
        return WorkerPool(grid, folder, workers, out, fail_fast, executor_spec).run(len(runs), todo)
    return _run_here(grid, folder, runs, todo, executor, fail_fast, out)


def _run_here(grid, folder, runs, todo, executor, fail_fast, out) -> dict:
    from dpt_lightning.bench.job import environment, run_cell

    counts = _counts(len(runs), len(todo))
    progress = GridProgress(len(todo), out)
    machine = environment()
    session = uuid.uuid4().hex[:12]
    try:
        for run in todo:
            outcome = run_cell(folder, run, executor, on_start=lambda r: progress.start(r.label()), machine=machine,
                               session=session)
            if outcome.state == "busy":
                holder = outcome.holder or {}
                print(f"  {run.run_id}: running elsewhere (pid {holder.get('pid')} on {holder.get('host')}); "
                      "skipped", file=out, flush=True)
                continue
            if outcome.state == "finished":
                counts["skipped"] += 1
                continue
            counts["executed"] += 1
            counts["failed"] += outcome.row["status"] != "ok"
            collect_results(folder, grid)
            progress.finish(run.run_id, outcome.row)
            if fail_fast and outcome.row["status"] != "ok":
                break
    finally:
        collect_results(folder, grid)
    return counts


# ------------------------------------------------------------------ worker processes
def visible_gpus() -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else every device."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def usable_cores() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def plan_workers(count: int, cores: list[int] | None = None, gpus: list[str] | None = None) -> list[dict]:
    """Per worker: its CPU cores (consecutive blocks, as even as possible; shared round-robin
    when there are more workers than cores), its thread count and its GPU (round-robin)."""
    cores = usable_cores() if cores is None else cores
    gpus = visible_gpus() if gpus is None else gpus
    plans = []
    if count <= len(cores):
        size, extra = divmod(len(cores), count)
        start = 0
        for i in range(count):
            block = cores[start:start + size + (1 if i < extra else 0)]
            start += len(block)
            plans.append({"cores": block})
    else:
        plans = [{"cores": [cores[i % len(cores)]]} for i in range(count)]
    for i, plan in enumerate(plans):
        plan["threads"] = len(plan["cores"])
        plan["gpu"] = gpus[i % len(gpus)] if gpus else None
    return plans


def worker_env(plan: dict) -> dict:
    env = dict(os.environ)
    threads = str(plan["threads"])
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads,
               NUMEXPR_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
    if plan["gpu"] is not None:
        env["CUDA_VISIBLE_DEVICES"] = plan["gpu"]
    return env


class _Worker:
    def __init__(self, slot: int, process: subprocess.Popen, fd: int, log: Path):
        self.slot, self.process, self.fd, self.log = slot, process, fd, log
        self.buffer = b""
        self.current: str | None = None  # the cell it reported starting and not yet finishing
        self.eof = False


class WorkerPool:
    """N worker processes on one run folder (see the module docstring)."""

    def __init__(self, grid: Grid, folder: Path, count: int, stream, fail_fast: bool = False,
                 executor_spec: str | None = None):
        self.grid, self.folder, self.count, self.stream = grid, Path(folder), count, stream
        self.fail_fast, self.executor_spec = fail_fast, executor_spec
        self.plans = plan_workers(count)
        self.workers: dict[int, _Worker] = {}
        self.restarts = {slot: 0 for slot in range(count)}
        self.selector = selectors.DefaultSelector()
        self.runs = {run.run_id: run for run in expand(grid)}
        self.stopping = False
        self.session = uuid.uuid4().hex[:12]  # the workers run a cell that fails in this session once

    # -- processes
    def spawn(self, slot: int) -> None:
        plan = self.plans[slot]
        logs = self.folder / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"worker-{slot}.log"
        read_fd, write_fd = os.pipe()
        command = [sys.executable, "-m", "dpt_lightning.bench.worker", str(self.folder), "--slot", str(slot),
                   "--status-fd", str(write_fd), "--parent", str(os.getpid()), "--threads", str(plan["threads"]),
                   "--cores", ",".join(map(str, plan["cores"])), "--session", self.session]
        if self.executor_spec:
            command += ["--executor", self.executor_spec]
        with open(log, "ab") as out:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                       env=worker_env(plan), pass_fds=(write_fd,), start_new_session=True,
                                       cwd=os.getcwd())
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        worker = _Worker(slot, process, read_fd, log)
        self.workers[slot] = worker
        self.selector.register(read_fd, selectors.EVENT_READ, worker)
        gpu = f", GPU {plan['gpu']}" if plan["gpu"] is not None else ""
        print(f"dpt-bench: worker {slot} (pid {process.pid}; cores {plan['cores']}, {plan['threads']} thread(s){gpu}); "
              f"log {log}", file=self.stream, flush=True)

    def run(self, total_runs: int, todo: list[Run]) -> dict:
        self.counts = _counts(total_runs, len(todo))
        self.progress = GridProgress(len(todo), self.stream)
        if not todo:
            collect_results(self.folder, self.grid)
            return self.counts
        for slot in range(min(self.count, len(todo))):
            self.spawn(slot)
        try:
            while self.workers:
                self._pump(1.0)
                self._reap()
                if self.fail_fast and self.counts["failed"] and not self.stopping:
                    print("dpt-bench: a run failed (--fail-fast): stopping the workers", file=self.stream, flush=True)
                    self.stop()
        except KeyboardInterrupt:
            self.stop()
            raise
        finally:
            self.selector.close()
            collect_results(self.folder, self.grid)
        return self.counts

    def stop(self) -> None:
        """Interrupt every worker (SIGINT: each stops its cell and releases its claim), wait up
        to `GRACE_SECONDS`, then kill what is left. A second Ctrl+C kills at once."""
        self.stopping = True
        for worker in self.workers.values():
            _signal(worker.process, signal.SIGINT)
        deadline = time.monotonic() + GRACE_SECONDS
        try:
            while self.workers and time.monotonic() < deadline:
                self._pump(0.5)
                self._reap()
        except KeyboardInterrupt:
            pass
        for worker in list(self.workers.values()):
            _signal(worker.process, signal.SIGKILL)
            worker.process.wait()
            self._forget(worker)

    # -- events
    def _pump(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            worker: _Worker = key.data
            try:
                chunk = os.read(worker.fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                worker.eof = True
                self.selector.unregister(worker.fd)
                continue
            worker.buffer += chunk
            *lines, worker.buffer = worker.buffer.split(b"\n")
            for line in lines:
                if line.strip():
                    self._event(worker, json.loads(line))

    def _event(self, worker: _Worker, event: dict) -> None:
        kind, run_id = event.get("event"), event.get("run_id")
        if kind == "start":
            worker.current = run_id
            self.progress.start(self.runs[run_id].label() if run_id in self.runs else run_id, worker.slot)
        elif kind == "done":
            worker.current = None
            self.counts["executed"] += 1
            self.counts["failed"] += event.get("status") != "ok"
            self.progress.finish(run_id, event)
        elif kind == "busy" and event.get("pid") not in {w.process.pid for w in self.workers.values()}:
            print(f"  {run_id}: running elsewhere (pid {event.get('pid')} on {event.get('host')}); skipped",
                  file=self.stream, flush=True)

    def _reap(self) -> None:
        for worker in list(self.workers.values()):
            code = exit_status(worker.process)  # not reaped yet: its claim still counts as alive
            if code is None:
                continue
            if not worker.eof:  # read what it said before it ended
                self._pump(0.0)
                if not worker.eof:
                    continue
            lost = code != 0 and not self.stopping
            if lost:  # record its cell's failure before another worker could take the cell over
                self._record_lost(worker, code)
            worker.process.wait()
            self._forget(worker)
            if lost:
                self._replace(worker)

    def _forget(self, worker: _Worker) -> None:
        if not worker.eof:
            self.selector.unregister(worker.fd)
        os.close(worker.fd)
        self.workers.pop(worker.slot, None)
        if worker.current:
            release_claims_of(cell_dir(self.folder, worker.current), {worker.process.pid})

    def _record_lost(self, worker: _Worker, code: int) -> None:
        """A worker that died: its cell is recorded as failed (its claim taken over directly)."""
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        if worker.current in self.runs:
            from dpt_lightning.bench.job import record_failure

            message = (f"the worker process running this cell died ({how}; killed, or out of memory?); "
                       f"its output: {worker.log}")
            row = record_failure(self.folder, self.runs[worker.current], message, session=self.session,
                                 dead_pid=worker.process.pid)
            if row is not None:
                self.counts["executed"] += 1
                self.counts["failed"] += 1
                self.progress.finish(worker.current, row)
        else:
            print(f"dpt-bench: worker {worker.slot} ended with {how}; see {worker.log}", file=self.stream, flush=True)

    def _replace(self, worker: _Worker) -> None:
        """A replacement for a dead worker, if cells remain."""
        left = [run for run in pending(self.grid, self.folder, self.session)
                if CellClaim(cell_dir(self.folder, run.run_id)).holder() is None]
        if left and self.restarts[worker.slot] < MAX_RESTARTS:
            self.restarts[worker.slot] += 1
            self.spawn(worker.slot)


def exit_status(process: subprocess.Popen) -> int | None:
    """The exit status of a child (negative: the signal), or None while it runs, WITHOUT reaping
    it where the system allows (``waitid`` with ``WNOWAIT``): until reaped, its pid stays taken and
    its claims count as alive for other processes."""
    if process.returncode is not None or not hasattr(os, "waitid"):
        return process.poll()
    try:
        info = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return process.poll()
    if info is None or info.si_pid == 0:
        return None
    killed = info.si_code in (os.CLD_KILLED, os.CLD_DUMPED)
    return -info.si_status if killed else info.si_status


def _signal(process: subprocess.Popen, sig: int) -> None:
    try:
        process.send_signal(sig)
    except ProcessLookupError:
        pass
