"""Reliability, round 3 (issue 27, items F-L and P): a feature store that degrades instead of failing
and never serves an altered shard, a job array that honours --array-parallelism, an idempotent
collector that names what it skipped, grid files checked by type with errors naming file and line,
and a dpt-prompts that imports nothing heavy."""
from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from lightning.pytorch import Trainer

from dpt_lightning import DemoDataModule, ZeroShot, features
from dpt_lightning.bench import GridError, collect, expand, load_grid, run_grid
from dpt_lightning.bench import command as bench_command
from dpt_lightning.bench import folder as bench_folder
from dpt_lightning.bench import job as bench_job
from dpt_lightning.bench import local as bench_local
from dpt_lightning.bench import slurm as bench_slurm
from dpt_lightning.cli import main as dpt_main

ROOT = Path(__file__).resolve().parents[1]
HELPERS = Path(__file__).resolve().parent / "helpers"
QUICK = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "1", "--data.num_workers", "0",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--test_after_fit", "false", "--data.num_shots", "1"]
STORE_ON = ["--model.init_args.cache_eval_features", "true", "--model.init_args.cache_train_features", "true"]


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


# ============================================================ F. the store degrades, never kills
@pytest.fixture
def store_root(tmp_path, monkeypatch) -> Path:
    """The feature store in a folder of this test (the generated backbones stay in the shared cache)."""
    root = tmp_path / "features"
    monkeypatch.setattr(features, "store_root", lambda: root)
    return root


def store_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "feature store" in str(w.message)]


def unwritable(monkeypatch, root: Path, error: OSError) -> list[str]:
    """Make writes into the store fail as a read-only folder or a full disk does: ``chmod`` where it
    bites, and (for root, whom chmod does not stop) the temporary file of every write under ``root``
    raising ``error``. Returns the folders where a write was attempted."""
    root.mkdir(parents=True, exist_ok=True)
    attempts = []
    original = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).is_relative_to(root):
            attempts.append(str(dir))
            raise type(error)(error.errno, error.strerror, os.path.join(dir, kwargs.get("prefix", "") + "tmp"))
        return original(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    if isinstance(error, PermissionError):
        root.chmod(0o555)
    return attempts


@pytest.mark.parametrize("error", [PermissionError(errno.EACCES, "Permission denied"),
                                   OSError(errno.ENOSPC, "No space left on device")], ids=["read-only", "disk-full"])
def test_predict_with_an_unwritable_store_writes_its_csv_and_exits_0(error, store_root, tmp_path, monkeypatch,
                                                                     tiny_demo_backbone):
    attempts = unwritable(monkeypatch, store_root, error)
    out = tmp_path / "predictions.csv"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dpt_main(["predict", "--config", str(ROOT / "trainers/zeroshot.yaml"), "--config",
                      str(ROOT / "datasets/demo.yaml"), *QUICK, *STORE_ON, "--predictions.path", str(out),
                      "--trainer.default_root_dir", str(tmp_path / "run")])
    finally:
        store_root.chmod(0o755)
    assert len(pd.read_csv(out)) == 48
    message, = store_warnings(caught)  # one warning, naming the folder and the reason
    assert str(store_root) in message and error.strerror in message and "without storing" in message
    assert len(attempts) <= 1  # after the first failure it stops trying


def test_fit_with_a_full_disk_under_the_store_finishes_with_its_checkpoint(store_root, tmp_path, monkeypatch,
                                                                          tiny_demo_backbone):
    attempts = unwritable(monkeypatch, store_root, OSError(errno.ENOSPC, "No space left on device"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dpt_main(["fit", "--config", str(ROOT / "trainers/coop.yaml"), "--config", str(ROOT / "datasets/demo.yaml"),
                  *QUICK, *STORE_ON, "--trainer.default_root_dir", str(tmp_path / "run")])
    assert list((tmp_path / "run").glob("lightning_logs/version_0/checkpoints/last.ckpt"))
    message, = store_warnings(caught)  # two epochs, one warning
    assert "No space left on device" in message and str(store_root) in message
    assert len(attempts) == 1


def test_a_bad_store_size_setting_warns_at_start_and_the_run_stores_nothing(store_root, monkeypatch, tmp_path,
                                                                            tiny_demo_backbone):
    for value in ("-1", "inf", "lots"):
        monkeypatch.setenv("DPT_FEATURE_STORE_GB", value)
        with pytest.warns(UserWarning, match=rf"DPT_FEATURE_STORE_GB='{value}'.*without storing"):
            assert features.FeatureStore("digest", "plain").read_only  # at start, not at the first flush
    out = tmp_path / "predictions.csv"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dpt_main(["predict", "--config", str(ROOT / "trainers/zeroshot.yaml"), "--config",
                  str(ROOT / "datasets/demo.yaml"), *QUICK, *STORE_ON, "--predictions.path", str(out),
                  "--trainer.default_root_dir", str(tmp_path / "run")])
    assert len(pd.read_csv(out)) == 48 and len(store_warnings(caught)) == 1
    assert not list(store_root.rglob("*.pt"))


# ================================================= G. an altered shard is a miss, never served
def _predict(model, data) -> torch.Tensor:
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    return torch.cat([batch["probs"] for batch in trainer.predict(model, datamodule=data)])


@pytest.mark.slow
def test_a_shard_whose_bytes_were_altered_is_recomputed_not_served(store_root):
    data = DemoDataModule(num_shots=1, num_workers=0, test_batch_size=16)
    plain = _predict(ZeroShot(classnames=data.classnames, backbone="tiny"), data)
    first = ZeroShot(classnames=data.classnames, backbone="tiny", cache_eval_features=True)
    _predict(first, data)  # fills the store
    stored = [t for store in first._feature_stores.values() for t in store.entries.values()]
    shard, = store_root.rglob("*.pt")
    raw = bytearray(shard.read_bytes())
    places = [raw.index(t.numpy().tobytes()) for t in stored]
    for place, other in zip(places, stored[1:] + stored[:1]):  # every feature swapped with another image's
        raw[place:place + other.numel() * 4] = other.numpy().tobytes()
    shard.write_bytes(bytes(raw))

    second = ZeroShot(classnames=data.classnames, backbone="tiny", cache_eval_features=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        served = _predict(second, data)
    assert torch.equal(served, plain)  # the store-off predictions, not the altered features'
    message, = store_warnings(caught)
    assert shard.name in message and "checksum" in message
    assert sum(s.hits for s in second._feature_stores.values()) == 0
    fresh, = store_root.rglob("*.pt")  # the altered shard removed, the recomputed features stored again
    assert fresh != shard and len(features.decode_shard(fresh.read_bytes())) == 48


# ===================================================== H. the local job array honours its parallelism
@pytest.fixture
def configs(tmp_path) -> Path:
    write(tmp_path / "trainers/zs.yaml", {"model": {"class_path": "dpt_lightning.ZeroShot"}})
    write(tmp_path / "trainers/coop.yaml", {"model": {"class_path": "dpt_lightning.CoOp"}})
    write(tmp_path / "datasets/alpha.yaml", {"data": {"class_path": "dpt_lightning.DemoDataModule"}})
    return tmp_path


def grid_file(folder: Path, **settings) -> Path:
    data = {"methods": ["../trainers/zs.yaml", "../trainers/coop.yaml"], "datasets": ["../datasets/alpha.yaml"],
            "shots": [1, 4], "seeds": [1, 2], "trainer": {"max_epochs": 3}, **settings}
    return write(folder / "grids/g.yaml", data)


def fake_executor(stages, run_dir) -> dict:
    """Stands in for `job.execute`: trains nothing."""
    return {"status": "ok", "error": "", "acc": 0.5, "train_seconds": 1.0, "eval_seconds": 0.5}


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_local_array_cells_are_dealt_into_array_parallelism_lanes(configs):
    cells = expand(load_grid(grid_file(configs, methods=["../trainers/coop.yaml"], shots=[1], seeds=[1, 2, 3, 4, 5])))
    local = bench_slurm.lanes(cells, bench_slurm.SlurmOptions(cluster="local", array_parallelism=2))
    assert [[c.seed for c in lane] for lane in local] == [[1, 3, 5], [2, 4]]
    assert len(bench_slurm.lanes(cells, bench_slurm.SlurmOptions(cluster="local"))) == 5  # not asked: all at once
    assert len(bench_slurm.lanes(cells, bench_slurm.SlurmOptions(array_parallelism=2))) == 5  # SLURM's own %2


@pytest.mark.slow
def test_the_local_job_array_runs_at_most_array_parallelism_cells_at_once(configs, tmp_path, monkeypatch):
    """submitit's local executor starts every task at once (4 cells of 3 s each: 3 or 4 at once
    before the fix); with --array-parallelism 2 never more than 2 cells run at once."""
    parallelism = 2
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(HELPERS), os.environ.get("PYTHONPATH")])))
    grid = load_grid(grid_file(configs, methods=["../trainers/coop.yaml"], shots=[1], seeds=[1, 2, 3, 4]))
    out = tmp_path / "out"
    bench_local.write_grid_copy(grid, out)
    todo = expand(grid)
    options = bench_slurm.SlurmOptions(cluster="local", array_parallelism=parallelism)
    monkeypatch.setenv("BENCH_FAKE_SLEEP", ",".join(f"{run.run_id}=3" for run in todo))
    submitted = bench_slurm.submit(out, grid, todo, options, executor_spec="bench_helpers:timed_execute")
    counts = bench_slurm.wait(out, submitted, stream=io.StringIO(), poll=0.2)
    assert counts == {"executed": 4, "failed": 0, "missing": 0}
    intervals = [tuple(map(float, (bench_folder.cell_dir(out, run.run_id) / "interval.txt").read_text().split()))
                 for run in todo]
    assert most_at_once(intervals) <= parallelism
    records = [json.loads(line) for line in (out / "submitit" / "submissions.jsonl").read_text().splitlines()]
    assert sorted(r["run_id"] for r in records) == sorted(run.run_id for run in todo)
    assert len({r["job_id"] for r in records}) == parallelism  # one task per lane, each cell recorded
    assert (out / "summary.md").is_file()  # the last lane to end collected


# ======================================================= I. --collect is idempotent during a run
def test_collect_during_a_run_then_after_it_leaves_one_complete_summary(configs, tmp_path):
    grid = load_grid(grid_file(configs))
    out = tmp_path / "out"
    bench_local.write_grid_copy(grid, out)
    runs = expand(grid)
    for run in runs[:3]:  # the run is under way: 3 of its cells have a result
        bench_job.run_cell(out, run, fake_executor)
    assert out / "summary.md" in collect(out)
    assert "still running or to do" in (out / "summary.md").read_text()
    run_grid(grid, out, executor=fake_executor, stream=io.StringIO())
    complete = collect(out)  # the grid finished: the partial summary is replaced, nothing dated beside it
    assert out / "summary.md" in complete and not list(out.glob("summary-*.md"))
    text = (out / "summary.md").read_text()
    assert "still running or to do" not in text and f"{len(runs)} finished run(s)" in text
    def files() -> dict:  # every file but the collectors' lock
        return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")}

    before = files()
    assert collect(out) == [] and collect(out) == []
    assert files() == before  # nothing written

    # a finished summary is kept; a change of results writes one dated summary, once
    bench_folder.write_result(out, runs[-1].run_id, {**bench_folder.read_result(out, runs[-1].run_id), "acc": 0.9})
    changed = collect(out)
    dated = [p for p in changed if p.suffix == ".md"]
    assert len(dated) == 1 and dated[0].name.startswith("summary-") and (out / "summary.md").read_text() == text
    assert collect(out) == []  # nothing changed since the dated summary


# ======================================================= J. a corrupted result file is named
def test_collect_names_a_corrupted_result_file_and_what_to_do(configs, tmp_path, capsys):
    grid = load_grid(grid_file(configs))
    out = tmp_path / "out"
    run_grid(grid, out, executor=fake_executor, stream=io.StringIO())
    broken = bench_folder.cell_dir(out, expand(grid)[1].run_id) / "result.json"
    broken.write_text('{"status": "ok", "acc": 0.')
    capsys.readouterr()
    assert bench_command.main(["--collect", str(out)]) == 0
    err = capsys.readouterr().err
    assert str(broken) in err and "not valid JSON" in err and f"dpt-bench --resume {out}" in err
    assert "unreadable result" in (out / "summary.md").read_text().lower()


# ============================================ K. referenced configs: one message naming file and line
@pytest.mark.parametrize("content, expected", [
    (b"model:\n  class_path: dpt_lightning.CoOp\n  init_args: [unclosed\n", r"line [34]"),
    (b"- model\n- data\n", r"line 1.*mapping"),
    (b"model:\n  class_path: dpt_lightning.CoOp\n  init_args: {template: caf\xe9}\n", r"line 3.*UTF-8"),
], ids=["invalid-yaml", "top-level-list", "not-utf8"])
@pytest.mark.parametrize("kind", ["methods", "datasets"])
def test_a_broken_config_named_by_a_grid_is_one_message_naming_file_and_line(kind, content, expected, configs,
                                                                             capsys):
    broken = write(configs / kind / "broken.yaml", content)
    entry = {"methods": "../trainers/coop.yaml", "datasets": "../datasets/alpha.yaml"}
    grid = grid_file(configs, **{kind: [entry[kind], f"../{kind}/broken.yaml"]})
    with pytest.raises(GridError, match=expected) as error:
        load_grid(grid)
    assert str(broken) in str(error.value)
    assert bench_command.main([str(grid), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# ============================================================ L. grid values checked by type
@pytest.mark.parametrize("settings, expected", [
    ({"methods": [{"config": "../trainers/coop.yaml", "fit": "false"}]},
     r"line \d+: methods entry 1: 'fit' must be true or false, got 'false' \(a string"),
    ({"seeds": [1, 1]}, r"line \d+: 'seeds' has values that appear twice: \[1\]"),
    ({"seeds": None}, r"'seeds' must be a non-empty list"),
    ({"seeds": []}, r"'seeds' must be a non-empty list"),
    ({"shots": None}, r"'shots' is missing"),  # (null: the protocol's default, [16] for base2novel only)
    ({"shots": [4, 4]}, r"'shots' has values that appear twice: \[4\]"),
    ({"shots": ["4"]}, r"shots entry 1 must be an integer, got '4'"),
    ({"seeds": [1, True]}, r"seeds entry 2 must be an integer, got true"),
    ({"protocol": ["fewshot", "fewshot"]}, r"'protocol' has values that appear twice"),
    ({"methods": []}, r"'methods' must be a non-empty list"),
    ({"backbones": None}, r"'backbones' must be a non-empty list"),
    ({"args": "--trainer.max_epochs=3"}, r"'args' must be a list of strings"),
    ({"trainer": ["max_epochs", 3]}, r"'trainer' must be a mapping"),
    ({"datasets": [{"config": "../datasets/alpha.yaml", "root": 7}]}, r"datasets entry 1: 'root' must be a string"),
    ({"datasets": [{"config": "../datasets/alpha.yaml", "args": ["--data.x", 3]}]},
     r"datasets entry 1: 'args' entry 2 must be a string"),
    ({"published": "maybe"}, r"'published' must be one of auto, true, false"),
    ({"name": ["a"]}, r"'name' must be a string"),
], ids=lambda v: json.dumps(v) if isinstance(v, dict) else "")
def test_grid_values_are_checked_by_type(settings, expected, configs):
    with pytest.raises(GridError, match=expected) as error:
        load_grid(grid_file(configs, **settings))
    assert "grids/g.yaml" in str(error.value)


def test_well_typed_grids_still_load(configs):
    grid = load_grid(grid_file(configs, methods=["../trainers/zs.yaml", {"config": "../trainers/coop.yaml",
                                                                          "fit": False, "name": "c"}],
                               seeds=3, shots=4, published=True))
    assert [m.fit for m in grid.methods] == [False, False] and grid.seeds == [3] and grid.published == "true"
    no_seeds = yaml.safe_load(grid_file(configs).read_text())
    del no_seeds["seeds"]
    assert load_grid(write(configs / "grids/g.yaml", no_seeds)).seeds == [1]  # left out: one seed, 1
    again = write(configs / "grids/copy.yaml", load_grid(grid_file(configs)).to_yaml())
    assert [r.run_id for r in expand(load_grid(again))] == [r.run_id for r in expand(load_grid(grid_file(configs)))]


# =============================================================== P. dpt-prompts imports nothing heavy
PROBE = """
import json, sys
from dpt_lightning.bank_cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "lightning", "open_clip", "transformers", "numpy", "pandas") if m in sys.modules)
print("HEAVY=" + json.dumps(heavy))
sys.exit(code)
"""


@pytest.mark.parametrize("command", [["list"], ["check", "{bank}", "--classes", "glioma", "meningioma"],
                                     ["import", "{bank}", "-o", "{out}"]], ids=["list", "check", "import"])
def test_dpt_prompts_imports_nothing_heavy(command, tmp_path):
    bank = write(tmp_path / "bank.json", json.dumps({"glioma": ["a glioma."], "meningioma": ["a meningioma."]}))
    args = [a.format(bank=bank, out=tmp_path / "out.json") for a in command]
    result = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                                str(ROOT / "src"), os.environ.get("PYTHONPATH")]))})
    assert result.returncode == 0, result.stderr
    heavy, = [line for line in result.stdout.splitlines() if line.startswith("HEAVY=")]
    assert json.loads(heavy[len("HEAVY="):]) == []
