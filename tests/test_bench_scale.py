"""dpt-bench beyond one process: local workers, submitit job arrays (its local executor, no
SLURM needed), resuming a cell from its own checkpoint, the run folder's lock and per-cell claims,
the collector, the exact newest-folder match, source fingerprints and the published numbers.

Fast tests use stand-in executors (tests/helpers/bench_helpers.py); the slow ones run a tiny grid
for real (tiny backbone, demo data, 3 epochs) in worker processes and submitit tasks.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dpt_lightning import bench
from dpt_lightning.bench import collect, expand, load_grid, read_results, run_grid
from dpt_lightning.bench import folder as bench_folder
from dpt_lightning.bench import grid as bench_grid
from dpt_lightning.bench import job as bench_job
from dpt_lightning.bench import local as bench_local
from dpt_lightning.bench import lock as bench_lock
from dpt_lightning.bench import slurm as bench_slurm

ROOT = Path(__file__).resolve().parents[1]
HELPERS = Path(__file__).resolve().parent / "helpers"
METRICS = ["acc", "macro_acc", "f1", "auroc"]


# ---------------------------------------------------------------------------- helpers
def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.fixture
def configs(tmp_path) -> Path:
    write(tmp_path / "trainers/zs.yaml", {"model": {"class_path": "dpt_lightning.ZeroShot"}})
    write(tmp_path / "trainers/coop.yaml", {"model": {"class_path": "dpt_lightning.CoOp"}})
    for name in ("alpha", "busi"):
        write(tmp_path / f"datasets/{name}.yaml", {"data": {"class_path": "dpt_lightning.DemoDataModule"}})
    return tmp_path


def grid_file(folder: Path, **settings) -> Path:
    data = {"methods": ["../trainers/zs.yaml", "../trainers/coop.yaml"],
            "datasets": ["../datasets/alpha.yaml", "../datasets/busi.yaml"],
            "shots": [1, 4], "seeds": [1, 2, 3], "trainer": {"max_epochs": 3, "accelerator": "cpu"}, **settings}
    return write(folder / "grids/g.yaml", data)


class FakeExecutor:
    def __init__(self, sleep: float = 0.0):
        self.calls, self.sleep = [], sleep

    def __call__(self, stages, run_dir):
        self.calls.append((run_dir.name, stages))
        time.sleep(self.sleep)
        return {"status": "ok", "error": "", "acc": 0.5, "train_seconds": 1.0, "eval_seconds": 0.5}


@pytest.fixture
def helpers_on_path(monkeypatch):
    """Worker processes and submitit tasks import the stand-ins from tests/helpers."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(HELPERS), os.environ.get("PYTHONPATH")])))
    monkeypatch.syspath_prepend(str(HELPERS))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# -------------------------------------------------------- grid: folders, classes, sources
def test_newest_run_folder_is_matched_by_name_and_timestamp_exactly(configs, tmp_path):
    grid = load_grid(grid_file(configs, name="demo", output=str(tmp_path / "runs")))
    for name in ("demo_2030-01-01_00-00-00", "demo_big_2031-01-01_00-00-00", "demo_2031-01-01_00-00-00x",
                 "demox_2032-01-01_00-00-00"):
        write(tmp_path / "runs" / name / "grid.yaml", "name: x\n")
    assert bench_folder.latest_run_folder(grid).name == "demo_2030-01-01_00-00-00"
    write(tmp_path / "runs" / "demo_2030-06-01_00-00-00" / "grid.yaml", "name: x\n")
    assert bench_folder.latest_run_folder(grid).name == "demo_2030-06-01_00-00-00"
    big = load_grid(grid_file(configs, name="demo_big", output=str(tmp_path / "runs")))
    assert bench_folder.latest_run_folder(big).name == "demo_big_2031-01-01_00-00-00"


def test_fit_or_test_comes_from_the_class_and_the_fingerprint_covers_its_source(configs, tmp_path, monkeypatch):
    module = write(tmp_path / "usermethods" / "my_methods.py",
                   "from dpt_lightning import CoOp\n\n\nclass Frozen(CoOp):\n    learns = False\n\n\n"
                   "class Tuned(CoOp):\n    pass\n")
    monkeypatch.syspath_prepend(str(module.parent))
    write(configs / "trainers/frozen.yaml", {"model": {"class_path": "my_methods.Frozen"}})
    write(configs / "trainers/tuned.yaml", {"model": {"class_path": "my_methods.Tuned"}})
    grid = load_grid(grid_file(configs, methods=["../trainers/frozen.yaml", "../trainers/tuned.yaml",
                                                 {"config": "../trainers/zs.yaml", "fit": True, "name": "zs_fit"}]))
    assert [m.fit for m in grid.methods] == [False, True, True]  # learns = False; a subclass; fit: overrides
    sources = bench_grid.method_source("my_methods.Tuned")
    assert "my_methods" in sources and any(m.startswith("dpt_lightning.") for m in sources)
    assert not any(m.split(".")[0] in ("torch", "lightning") for m in sources)
    before = {r.run_id: r.fingerprint() for r in expand(grid)}
    module.write_text(module.read_text() + "\n# an edit of the method's file\n")
    after = {r.run_id: r.fingerprint() for r in expand(grid)}
    changed = {i for i in before if before[i] != after[i]}
    assert changed and all(i.startswith(("frozen_", "tuned_")) for i in changed)
    assert all(before[i] == after[i] for i in before if i.startswith("zs_fit_"))


def test_published_numbers_come_from_the_shipped_csv(configs, tmp_path):
    from dpt_lightning.bench import report

    table = report.published()
    assert {"method", "protocol", "dataset", "shots", "metric", "value", "reference"} <= set(table.columns)
    assert table["reference"].str.len().min() > 0
    grid = load_grid(grid_file(configs, protocol=["fewshot", "base2novel"], shots=[4]))
    rows = [{"run_id": "a", "status": "ok", "method": "coop", "dataset": "busi", "protocol": "fewshot",
             "shots": "4", "seed": "1", "acc": "0.5"}]
    text, _, _ = report.summary_markdown(grid, rows, tmp_path)
    assert "published.csv" in text and "methods.md" not in text
    assert "| *published:* Biomed-DPT | 66.12 | 66.12 |" in text
    assert "| *published:* zero-shot BiomedCLIP (approx.) | 42.00 | 42.00 |" in text  # no shots: every K
    assert f"| *published:* Biomed-DPT | 78.06 | 75.97 | {report.harmonic_mean(78.06, 75.97):.2f} |" in text


# ----------------------------------------------------------------------- lock and claims
def test_a_second_dpt_bench_on_the_same_folder_exits_with_a_message_or_waits(configs, tmp_path, monkeypatch,
                                                                              capsys):
    grid = grid_file(configs)
    out = tmp_path / "out"
    executed = []
    monkeypatch.setattr(bench_local, "run_grid", lambda g, f, **kw: executed.append(f) or
                        run_grid(g, f, executor=FakeExecutor()))
    holder = bench_lock.FolderLock(out).acquire()
    assert bench.main([str(grid), "--out", str(out)]) == 3
    said = capsys.readouterr().err
    assert "is in use by dpt-bench pid" in said and str(os.getpid()) in said and "--wait-lock" in said
    assert executed == []
    threading.Timer(1.0, holder.release).start()
    started = time.monotonic()
    assert bench.main([str(grid), "--out", str(out), "--wait-lock"]) == 0
    assert time.monotonic() - started >= 0.9 and executed == [out]
    assert "waiting for it to finish" in capsys.readouterr().err
    assert len(read_results(out)) == 14


def test_cell_claims_are_exclusive_and_stale_ones_are_taken_over(tmp_path, monkeypatch):
    cell = tmp_path / "cell"
    first, second = bench_lock.CellClaim(cell), bench_lock.CellClaim(cell)
    assert first.acquire() and not second.acquire()
    assert second.holder()["pid"] == os.getpid()
    first.release()
    assert second.acquire() and second.path.name == ".claim.0"
    second.release()
    # a claim of a process that is gone (this host): taken over at once, as claim n + 1
    info = bench_lock.holder_info() | {"pid": dead_pid(), "pid_started": None}
    write(cell / ".claim.0", __import__("json").dumps(info))
    third = bench_lock.CellClaim(cell)
    assert third.holder() is None and third.acquire() and third.path.name == ".claim.1"
    assert not (cell / ".claim.0").exists()
    third.release()
    # another host: stale only after the heartbeat stopped for `stale_after` seconds
    info = bench_lock.holder_info() | {"host": "elsewhere"}
    write(cell / ".claim.4", __import__("json").dumps(info))
    assert not bench_lock.CellClaim(cell, stale_after=60).acquire()
    old = time.time() - 120
    os.utime(cell / ".claim.4", (old, old))
    assert bench_lock.CellClaim(cell, stale_after=60).holder() is None
    # the same scheduler task, requeued on another node, takes over its previous life's claim
    os.utime(cell / ".claim.4", None)
    write(cell / ".claim.4", __import__("json").dumps(info | {"job": "slurm:77_3"}))
    assert not bench_lock.CellClaim(cell, stale_after=60, job="slurm:77_4").acquire()
    mine = bench_lock.CellClaim(cell, stale_after=60, job="slurm:77_3")
    assert mine.acquire() and mine.path.name == ".claim.5"
    mine.release()


def test_a_live_claim_keeps_every_runner_off_the_cell(configs, tmp_path):
    grid = load_grid(grid_file(configs))
    out = tmp_path / "out"
    run = expand(grid)[3]
    claim = bench_lock.CellClaim(bench_folder.cell_dir(out, run.run_id))
    assert claim.acquire()
    try:
        executor = FakeExecutor()
        counts = run_grid(grid, out, executor=executor)
        assert run.run_id not in [name for name, _ in executor.calls] and counts["executed"] == 13
        assert bench_job.run_cell(out, run, executor).state == "busy"
    finally:
        claim.release()
    executor = FakeExecutor()
    run_grid(grid, out, executor=executor)
    assert [name for name, _ in executor.calls] == [run.run_id]


def test_two_runners_on_one_folder_never_run_a_cell_twice(configs, tmp_path):
    grid = load_grid(grid_file(configs))
    out = tmp_path / "out"
    executors = [FakeExecutor(sleep=0.05), FakeExecutor(sleep=0.05)]
    threads = [threading.Thread(target=run_grid, args=(grid, out), kwargs={"executor": e, "stream": open(os.devnull, "w")})
               for e in executors]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    names = [name for e in executors for name, _ in e.calls]
    assert sorted(names) == sorted(r.run_id for r in expand(grid))  # each cell once, in total
    assert all(e.calls for e in executors)  # both did work
    assert not list(out.glob("runs/*/.claim.*"))


# ------------------------------------------------------------------------ resume, collect
def test_a_cell_resumes_only_its_own_checkpoint_written_under_its_fingerprint(configs, tmp_path):
    grid = load_grid(grid_file(configs))
    out = tmp_path / "out"
    run = next(r for r in expand(grid) if r.method.fit)
    cell = bench_folder.cell_dir(out, run.run_id)
    assert bench_job.prepare_cell(cell, run.fingerprint()) is None  # a new cell starts from scratch
    write(cell / "checkpoints" / "last.ckpt", "epoch 1")
    executor = FakeExecutor()
    row = bench_job.run_cell(out, run, executor).row
    (_, args, _), = executor.calls[0][1]
    assert args[args.index("--ckpt_path") + 1] == str(cell / "checkpoints" / "last.ckpt")
    assert row["resumed_from"] == str(cell / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match="not the cell's own checkpoint"):
        other = bench_folder.cell_dir(out, expand(grid)[-1].run_id)
        bench_job.prepare_cell(cell, run.fingerprint(), resume=other / "checkpoints" / "last.ckpt")
    # settings changed: the old checkpoint belongs to other settings and is moved aside, not resumed
    assert bench_job.prepare_cell(cell, "another fingerprint") is None
    assert not (cell / "checkpoints").exists() and list(cell.glob("checkpoints.replaced-*/last.ckpt"))


def test_the_collector_is_idempotent(configs, tmp_path):
    grid = load_grid(grid_file(configs))
    out = tmp_path / "out"
    run_grid(grid, out, executor=FakeExecutor())
    first = collect(out)
    assert {p.name for p in first} >= {"summary.md", "accuracy_vs_shots.png"}
    files = {p: p.read_bytes() for p in (out / "results.csv", out / "summary.md", out / "plots" / "accuracy_vs_shots.png")}
    assert collect(out) == []  # nothing changed, nothing written
    assert all(p.read_bytes() == data for p, data in files.items())
    for path in files:
        path.unlink()
    collect(out)
    assert all(p.read_bytes() == data for p, data in files.items())  # rebuilt from the cells' files alone
    assert bench.main(["--collect", str(out)]) == 0
    assert bench.main(["--collect", str(tmp_path)]) == 2  # not a run folder: a message, not a traceback


def test_worker_plan_splits_cores_and_gpus():
    plans = bench_local.plan_workers(2, cores=[0, 1, 2, 3, 4], gpus=["0", "1", "2"])
    assert [p["cores"] for p in plans] == [[0, 1, 2], [3, 4]] and [p["threads"] for p in plans] == [3, 2]
    assert [p["gpu"] for p in plans] == ["0", "1"]
    plans = bench_local.plan_workers(3, cores=[4, 5], gpus=["7"])
    assert [p["cores"] for p in plans] == [[4], [5], [4]] and {p["threads"] for p in plans} == {1}
    assert [p["gpu"] for p in plans] == ["7", "7", "7"]
    env = bench_local.worker_env(plans[0])
    assert env["OMP_NUM_THREADS"] == "1" and env["CUDA_VISIBLE_DEVICES"] == "7"
    assert bench_local.plan_workers(2, cores=[0, 1], gpus=[])[0]["gpu"] is None


def test_slurm_options_become_one_job_array(configs, tmp_path, monkeypatch):
    """The sbatch script submitit writes for ``--launcher submitit`` (a stand-in ``sbatch`` records it)."""
    bin_dir = tmp_path / "bin"
    write(bin_dir / "sbatch", f"#!/bin/sh\ncp \"$1\" {tmp_path}/submitted.sh\necho Submitted batch job 4242\n")
    write(bin_dir / "srun", "#!/bin/sh\nexit 0\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    grid_path = grid_file(configs, shots=[1], seeds=[1, 2])
    out = tmp_path / "out"
    assert bench.main([str(grid_path), "--out", str(out), "--launcher", "submitit"]) == 2  # --time is required
    code = bench.main([str(grid_path), "--out", str(out), "--launcher", "submitit", "--partition", "gpu",
                       "--time", "2:30:00", "--gpus-per-task", "1", "--cpus-per-task", "8", "--mem-gb", "32",
                       "--array-parallelism", "3", "--sbatch", "account=proj", "--sbatch", "qos=high",
                       "--setup", "source ~/venv/bin/activate"])
    assert code == 0
    script = (tmp_path / "submitted.sh").read_text()
    cells = len(expand(load_grid(grid_path)))
    for flag in ("--partition=gpu", "--time=150", "--gpus-per-node=1", "--cpus-per-task=8", "--mem=32GB",
                 f"--array=0-{cells - 1}%3", "--account=proj", "--qos=high", "--signal=USR2@"):
        assert flag in script, flag
    assert "source ~/venv/bin/activate" in script
    records = (out / "submitit" / "submissions.jsonl").read_text().splitlines()
    assert len(records) == cells and '"job_id": "4242_0"' in records[0]
    assert bench_slurm.parse_time("90") == 90 and bench_slurm.parse_time("1-00:00:00") == 1440
    assert bench_slurm.parse_sbatch(["--constraint=a100"]) == {"constraint": "a100"}
    with pytest.raises(bench_grid.GridError, match="--time"):
        bench_slurm.parse_time("soon")


# ------------------------------------------------------------------ worker processes
@pytest.mark.slow
def test_workers_run_each_cell_once_and_record_failures_and_dead_workers(configs, tmp_path, monkeypatch,
                                                                               helpers_on_path):
    grid = load_grid(grid_file(configs, shots=[1], seeds=[1, 2, 3]))  # 2 zero-shot + 6 CoOp cells
    out = tmp_path / "out"
    monkeypatch.setenv("BENCH_FAKE_FAIL", "coop_alpha_fewshot_K1_seed2")
    monkeypatch.setenv("BENCH_FAKE_DIE", "coop_busi_fewshot_K1_seed1")
    counts = run_grid(grid, out, workers=2, executor_spec="bench_helpers:fake_execute")
    runs = [r.run_id for r in expand(grid)]
    assert counts == {"runs": 8, "skipped": 0, "executed": 8, "failed": 2}
    calls = {i: (out / "runs" / i / "calls.txt").read_text().split() for i in runs}
    assert all(len(c) == 1 for c in calls.values()), calls  # every cell exactly once
    rows = {r["run_id"]: r for r in read_results(out)}
    assert {i for i, r in rows.items() if r["status"] != "ok"} == {"coop_alpha_fewshot_K1_seed2",
                                                                    "coop_busi_fewshot_K1_seed1"}
    assert "died (signal SIGKILL" in rows["coop_busi_fewshot_K1_seed1"]["error"]
    assert not list(out.glob("runs/*/.claim.*"))


@pytest.mark.slow
def test_ctrl_c_stops_every_worker_cleanly(configs, tmp_path, monkeypatch, helpers_on_path):
    grid = load_grid(grid_file(configs, shots=[1], seeds=[1]))  # 4 cells
    out = tmp_path / "out"
    runs = [r.run_id for r in expand(grid)]
    monkeypatch.setenv("BENCH_FAKE_SLEEP", ",".join(f"{i}=120" for i in runs[1:]))

    def interrupt_when_busy():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (out / "runs" / runs[0] / "result.json").exists() and len(list(out.glob("runs/*/.claim.*"))) == 2:
                break
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_when_busy, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, out, workers=2, executor_spec="bench_helpers:fake_execute")
    assert time.monotonic() - started < 110  # the sleeping cells were interrupted, not waited for
    pids = {int(p) for i in runs for p in ((out / "runs" / i / "calls.txt").read_text().split()
                                            if (out / "runs" / i / "calls.txt").exists() else [])}
    assert pids and not any(bench_lock.pid_alive(p) for p in pids)  # no worker left behind
    assert not list(out.glob("runs/*/.claim.*"))  # every claim released
    assert [r["run_id"] for r in read_results(out)] == [runs[0]]  # the finished cell is kept
    logs = "".join(p.read_text() for p in (out / "logs").glob("worker-*.log"))
    assert "interrupted; the cell's claim is released" in logs


# ------------------------------------------------------------------------ for real (tiny)
@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-grid")
    return write(folder / "tiny.yaml", {
        "name": "tiny", "protocol": "fewshot",
        "methods": [str(ROOT / "trainers/zeroshot.yaml"), str(ROOT / "trainers/coop.yaml")],
        "datasets": [str(ROOT / "datasets/demo.yaml")], "shots": [2], "seeds": [1, 2],
        "model": {"backbone": "tiny"}, "data": {"num_workers": 0},
        "trainer": {"max_epochs": 3, "accelerator": "cpu", "enable_progress_bar": False,
                    "enable_model_summary": False},
    })


@pytest.fixture(scope="module")
def reference(tiny_grid, tiny):
    """The tiny grid run one cell after another in this process: the metrics every other way of
    running it must reproduce."""
    out = tiny_grid.parent / "reference"
    assert bench.main([str(tiny_grid), "--out", str(out)]) == 0
    return pd.read_csv(out / "results.csv").set_index("run_id")


@pytest.mark.slow
def test_two_workers_give_the_same_results_as_one(tiny_grid, reference, tmp_path):
    out = tmp_path / "workers2"
    assert bench.main([str(tiny_grid), "--out", str(out), "--workers", "2"]) == 0
    two = pd.read_csv(out / "results.csv").set_index("run_id")
    assert sorted(two.index) == sorted(reference.index) == sorted(
        ["zeroshot_demo_fewshot", "coop_demo_fewshot_K2_seed1", "coop_demo_fewshot_K2_seed2"])
    pd.testing.assert_frame_equal(two.loc[reference.index, METRICS], reference[METRICS])
    assert set(two["torch_threads"]) == {max(1, len(bench_local.usable_cores()) // 2)}
    assert (out / "summary.md").is_file() and (out / "plots" / "accuracy_vs_shots.png").is_file()


@pytest.mark.slow
def test_submitit_array_requeues_a_preempted_cell_and_resumes_a_killed_one_from_its_own_checkpoint(
        tiny_grid, reference, tmp_path, helpers_on_path):
    """submitit's local executor runs the array. The cell is preempted in epoch 1 (SIGUSR2, as SLURM
    warns before a time limit): submitit requeues it and it resumes from its own last.ckpt. Then it
    is killed without warning in epoch 2 (SIGKILL): the task ends without a result; submitting the
    grid again sends only that cell, which resumes from its own checkpoint of epoch 1. It ends with
    the metrics of the uninterrupted run."""
    grid = yaml.safe_load(tiny_grid.read_text())
    grid.update(name="array", seeds=[1], methods=[{"config": str(ROOT / "trainers/coop.yaml"), "args": [
        "--trainer.callbacks+=bench_helpers.PreemptOnce", "--trainer.callbacks.epoch=1",
        "--trainer.callbacks+=bench_helpers.KillOnce", "--trainer.callbacks.epoch=2"]}])
    grid_path = write(tmp_path / "array.yaml", grid)
    out = tmp_path / "array"
    cell = out / "runs" / "coop_demo_fewshot_K2_seed1"
    command = [str(grid_path), "--out", str(out), "--launcher", "submitit", "--cluster", "local", "--wait"]
    assert bench.main(command) == 1  # killed in epoch 2: the task ended without a result
    assert (cell / "PreemptOnce.done").is_file() and (cell / "KillOnce.done").is_file()
    assert bench_folder.read_result(out, "coop_demo_fewshot_K2_seed1") is None
    log = "".join(p.read_text() for p in (out / "submitit").glob("*_log.*"))
    first = cell / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert "Requeued job" in log and f"resuming {first}" in log  # the requeued task was told its own file
    assert bench.main(command) == 0  # submitted again: the cell resumes from its own checkpoint
    row = bench_folder.read_result(out, "coop_demo_fewshot_K2_seed1")
    assert row["status"] == "ok"
    assert row["resumed_from"] == str(cell / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt")
    assert len((out / "submitit" / "submissions.jsonl").read_text().splitlines()) == 2
    expected = reference.loc["coop_demo_fewshot_K2_seed1", METRICS]
    results = pd.read_csv(out / "results.csv").set_index("run_id")
    assert results.loc["coop_demo_fewshot_K2_seed1", METRICS].tolist() == expected.tolist()
    assert (out / "summary.md").is_file()
