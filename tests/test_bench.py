"""dpt-bench: grid expansion, resume, failure recording and the aggregation arithmetic.

Most tests use a stand-in executor (no training), so they check the runner's own logic; one test
runs a small grid for real through the dpt command's code (tiny backbone, one epoch). Workers,
job arrays, locks and the collector: tests/test_bench_scale.py.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml

from dpt_lightning import bench
from dpt_lightning.bench import GridError, expand, load_grid, read_results, run_grid
from dpt_lightning.bench import command as bench_command
from dpt_lightning.bench import job as bench_job
from dpt_lightning.bench import local as bench_local
from dpt_lightning.bench import report as bench_report

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- helpers
def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.fixture
def configs(tmp_path) -> Path:
    """Small trainer and dataset configs beside a grid folder (the runner only reads class paths)."""
    write(tmp_path / "trainers/zs.yaml", {"model": {"class_path": "dpt_lightning.ZeroShot"}})
    write(tmp_path / "trainers/coop.yaml", {"model": {"class_path": "dpt_lightning.CoOp"}})
    write(tmp_path / "trainers/vpt.yaml", {"model": {"class_path": "dpt_lightning.trainers.vpt.VPT"}})
    for name in ("alpha", "busi"):
        write(tmp_path / f"datasets/{name}.yaml", {"data": {"class_path": "dpt_lightning.DemoDataModule"}})
    return tmp_path


def grid_file(folder: Path, **settings) -> Path:
    data = {"methods": ["../trainers/zs.yaml", "../trainers/coop.yaml"],
            "datasets": ["../datasets/alpha.yaml", {"config": "../datasets/busi.yaml", "root": "/data/x y"}],
            "shots": [1, 4], "seeds": [1, 2, 3], "trainer": {"max_epochs": 3, "accelerator": "cpu"},
            **settings}
    return write(folder / "grids/g.yaml", data)


class FakeExecutor:
    """Stands in for `job.execute`: records calls, fails the run ids it is told to."""

    def __init__(self, fail=()):
        self.calls, self.fail = [], set(fail)

    def __call__(self, stages, run_dir):
        self.calls.append((run_dir.name, stages))
        if run_dir.name in self.fail:
            return {"status": "failed", "error": "RuntimeError: boom"}
        return {"status": "ok", "error": "", "acc": 0.5, "train_seconds": 1.0, "eval_seconds": 0.5}


# ---------------------------------------------------------------------- grid expansion
def test_grid_expands_into_every_run(configs):
    grid = load_grid(grid_file(configs))
    runs = expand(grid)
    # ZeroShot learns nothing: once per dataset; CoOp: 2 datasets x 2 shots x 3 seeds
    assert len(runs) == 2 * 1 + 2 * 2 * 3
    assert [r.method.fit for r in runs].count(False) == 2
    ids = [r.run_id for r in runs]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", i) for i in ids), "run folders must be Windows-safe"
    assert "coop_alpha_fewshot_K4_seed2" in ids and "zs_busi_fewshot" in ids
    coop = next(r for r in runs if r.run_id == "coop_busi_fewshot_K1_seed3")
    (subcommand, args, prefix), = coop.stages(Path("/out/x"))
    assert subcommand == "fit" and prefix == ""
    assert args[:4] == ["--config", str(configs / "trainers/coop.yaml"), "--config", str(configs / "datasets/busi.yaml")]
    assert args[args.index("--data.root") + 1] == "/data/x y"  # one argument, spaces and all
    assert "--trainer.max_epochs=3" in args and "--trainer.accelerator=cpu" in args
    assert args[args.index("--data.num_shots") + 1] == "1" and args[args.index("--data.seed") + 1] == "3"
    assert args[args.index("--data.subsample") + 1] == "all"
    assert args[args.index("--trainer.default_root_dir") + 1] == str(Path("/out/x"))
    zs = next(r for r in runs if not r.method.fit)
    assert zs.stages(Path("/o"))[0][0] == "test" and "--data.num_shots" not in zs.stages(Path("/o"))[0][1]


def test_base2novel_fits_on_base_then_tests_the_checkpoint_on_novel(configs):
    grid = load_grid(grid_file(configs, protocol="base2novel", shots=None, seeds=[1]))
    assert grid.shots == {"base2novel": [16]}  # the protocol's K
    runs = expand(grid)
    assert len(runs) == 2 + 2
    coop = next(r for r in runs if r.method.name == "coop")
    fit, novel = coop.stages(Path("/r"))
    assert fit[0] == "fit" and fit[1][fit[1].index("--data.subsample") + 1] == "base"
    assert novel[0] == "test" and novel[2] == "novel_"
    assert novel[1][novel[1].index("--data.subsample") + 1] == "new"
    assert novel[1][novel[1].index("--ckpt_path") + 1] == "{ckpt}"
    assert novel[1][novel[1].index("--trainer.default_root_dir") + 1] == str(Path("/r/novel"))
    zs = next(r for r in runs if r.method.name == "zs")
    assert [s[0] for s in zs.stages(Path("/r"))] == ["test", "test"]
    assert "--ckpt_path" not in zs.stages(Path("/r"))[1][1]


def test_method_that_extends_zeroshot_with_prompts_still_learns(configs):
    grid = load_grid(grid_file(configs, methods=["../trainers/vpt.yaml", {"config": "../trainers/coop.yaml",
                                                                           "fit": False, "name": "frozen"}]))
    assert [m.fit for m in grid.methods] == [True, False]


@pytest.mark.parametrize("change, message", [
    ({"methods": ["../trainers/missing.yaml"]}, "missing.yaml not found"),
    ({"colour": "red"}, "unknown key(s) ['colour']"),
    ({"protocol": "zeroshot"}, "protocol must be"),
    ({"shots": [0, 2]}, "shots must be at least 1"),
    ({"seeds": "one"}, "'seeds' must be a list of integers"),
    ({"methods": ["../trainers/coop.yaml", "../trainers/coop.yaml"]}, "appear twice"),
    ({"trainer": ["max_epochs"]}, "'trainer' must be a mapping"),
    ({"methods": [{"config": "../trainers/coop.yaml", "selection_seed": "one"}]}, "'selection_seed' must be an integer"),
])
def test_bad_grids_are_clear_errors(configs, change, message):
    with pytest.raises(GridError) as err:
        load_grid(grid_file(configs, **change))
    assert message in str(err.value) and "g.yaml" in str(err.value)


def test_the_grid_copy_in_the_run_folder_reloads_to_the_same_runs(configs, tmp_path):
    grid = load_grid(grid_file(configs, protocol=["fewshot", "base2novel"]))
    copy = write(tmp_path / "copy.yaml", grid.to_yaml())
    again = load_grid(copy)
    assert [(r.run_id, r.stages(tmp_path)) for r in expand(again)] == [(r.run_id, r.stages(tmp_path))
                                                                       for r in expand(grid)]


# ---------------------------------------------------------------------- resume, failures
def test_second_invocation_skips_every_finished_run(configs, tmp_path):
    grid = load_grid(grid_file(configs))
    out = tmp_path / "run"
    first = FakeExecutor()
    counts = run_grid(grid, out, executor=first)
    assert counts == {"runs": 14, "skipped": 0, "executed": 14, "failed": 0} and len(first.calls) == 14
    second = FakeExecutor()
    counts = run_grid(load_grid(grid_file(configs)), out, executor=second)
    assert second.calls == [] and counts["skipped"] == 14 and counts["executed"] == 0
    assert len(read_results(out)) == 14


def test_failed_runs_are_recorded_and_only_they_rerun(configs, tmp_path):
    grid = load_grid(grid_file(configs))
    out = tmp_path / "run"
    bad = {"coop_alpha_fewshot_K4_seed2", "zs_busi_fewshot"}
    counts = run_grid(grid, out, executor=FakeExecutor(fail=bad))
    assert counts["failed"] == 2 and counts["executed"] == 14  # not fatal: the grid went on
    rows = {r["run_id"]: r for r in read_results(out)}
    assert {i for i, r in rows.items() if r["status"] == "failed"} == bad
    assert rows["zs_busi_fewshot"]["error"] == "RuntimeError: boom"
    retry = FakeExecutor()
    run_grid(grid, out, executor=retry)
    assert sorted(name for name, _ in retry.calls) == sorted(bad)
    rows = read_results(out)
    assert len(rows) == 14 and all(r["status"] == "ok" for r in rows)


def test_changed_settings_or_new_seeds_rerun_only_what_changed(configs, tmp_path):
    out = tmp_path / "run"
    run_grid(load_grid(grid_file(configs)), out, executor=FakeExecutor())
    extended = FakeExecutor()
    run_grid(load_grid(grid_file(configs, seeds=[1, 2, 3, 4])), out, executor=extended)
    assert sorted(n for n, _ in extended.calls) == ["coop_alpha_fewshot_K1_seed4", "coop_alpha_fewshot_K4_seed4",
                                                    "coop_busi_fewshot_K1_seed4", "coop_busi_fewshot_K4_seed4"]
    write(configs / "trainers/coop.yaml", {"model": {"class_path": "dpt_lightning.CoOp", "init_args": {"lr": 0.1}}})
    edited = FakeExecutor()
    run_grid(load_grid(grid_file(configs)), out, executor=edited)
    assert len(edited.calls) == 12 and all(n.startswith("coop_") for n, _ in edited.calls)


def test_a_run_that_raises_is_recorded_with_its_error(tmp_path, monkeypatch):
    def explode(args):
        raise ValueError("the data is on fire")

    monkeypatch.setattr(bench_job, "build", explode)
    row = bench_job.execute([("fit", ["--config", "x.yaml"], "")], tmp_path / "r")
    assert row["status"] == "failed" and row["error"] == "ValueError: the data is on fire"
    assert "the data is on fire" in (tmp_path / "r" / "error.txt").read_text()
    assert row["total_seconds"] >= 0


def test_a_cli_argument_error_is_a_failed_run_not_an_exit(tmp_path):
    row = bench_job.execute([("fit", ["--config", str(tmp_path / "nope.yaml")], "")], tmp_path / "r")
    assert row["status"] == "failed"
    assert "the dpt command exited" in row["error"] and "nope.yaml" in row["error"]


def test_ctrl_c_in_a_run_stops_the_grid_and_keeps_the_finished_rows(configs, tmp_path, monkeypatch):
    import dpt_lightning.cli

    def lightning_exits(args, **kwargs):  # the run was built (its meter exists), then Lightning's graceful exit
        bench_job.RunMeter()
        raise SystemExit(1)

    monkeypatch.setattr(dpt_lightning.cli, "build_cli", lightning_exits)
    with pytest.raises(bench_job.GridInterrupted):
        bench_job.execute([("fit", [], "")], tmp_path / "r")

    class StopsAtThird(FakeExecutor):
        def __call__(self, stages, run_dir):
            if len(self.calls) == 2:
                raise bench_job.GridInterrupted("Ctrl+C")
            return super().__call__(stages, run_dir)

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_grid(load_grid(grid_file(configs)), out, executor=StopsAtThird())
    assert [r["status"] for r in read_results(out)] == ["ok", "ok"]
    rest = FakeExecutor()
    run_grid(load_grid(grid_file(configs)), out, executor=rest)
    assert len(rest.calls) == 12


# ------------------------------------------------------------------------- arithmetic
def test_mean_and_sample_std_over_seeds():
    mean, std, n = bench_report.mean_std([70.0, 80.0, 90.0])
    assert (mean, n) == (80.0, 3)
    assert std == pytest.approx(10.0)  # sqrt(((-10)^2 + 0 + 10^2) / (3 - 1)); population std would be 8.165
    mean, std, n = bench_report.mean_std([55.0])
    assert mean == 55.0 and math.isnan(std) and n == 1


def test_harmonic_mean_is_the_true_one():
    assert bench_report.harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)  # 68.571..., not 70
    assert bench_report.harmonic_mean(0.0, 0.0) == 0.0
    assert bench_report.harmonic_mean(50.0, 100.0) == pytest.approx(66.6667, abs=1e-4)


def rows_b2n(method="m"):
    """Base/novel accuracies (fractions, as results.csv holds them) of 2 datasets x 2 seeds + BUSI."""
    values = {("alpha", 1): (0.80, 0.60), ("alpha", 2): (0.70, 0.50),
              ("beta", 1): (0.90, 0.30), ("beta", 2): (0.90, 0.50),
              ("BUSI", 1): (0.60, 1.00), ("BUSI", 2): (0.70, 1.00)}
    return [{"run_id": f"{method}_{d}_{s}", "status": "ok", "method": method, "dataset": d, "protocol": "base2novel",
             "shots": "16", "seed": str(s), "acc": str(b), "novel_acc": str(n)} for (d, s), (b, n) in values.items()]


def test_base2novel_averages_with_and_without_busi():
    table = bench_report.frame(rows_b2n())
    # per dataset (seed means): alpha B 75 N 55; beta B 90 N 40; BUSI B 65 N 100
    hm = bench_report.harmonic_mean
    without = bench_report.base2novel_average(table, ["alpha", "beta"])
    assert without["base"] == pytest.approx(82.5) and without["novel"] == pytest.approx(47.5)
    assert without["hm_of_averages"] == pytest.approx(2 * 82.5 * 47.5 / 130)
    assert without["mean_of_hms"] == pytest.approx((hm(75, 55) + hm(90, 40)) / 2)
    assert without["arithmetic"] == pytest.approx(65.0)
    everything = bench_report.base2novel_average(table, ["alpha", "beta", "BUSI"])
    assert everything["base"] == pytest.approx((75 + 90 + 65) / 3)
    assert everything["novel"] == pytest.approx((55 + 40 + 100) / 3)
    assert everything["mean_of_hms"] == pytest.approx((hm(75, 55) + hm(90, 40) + hm(65, 100)) / 3)
    assert everything["datasets"] == 3


def test_average_over_datasets_and_its_std_over_seeds():
    rows = [{"run_id": f"{d}{s}", "status": "ok", "method": "m", "dataset": d, "protocol": "fewshot",
             "shots": "4", "seed": str(s), "acc": str(a)}
            for (d, s), a in {("a", 1): 0.6, ("a", 2): 0.8, ("b", 1): 0.5, ("b", 2): 0.7}.items()]
    rows.append({**rows[0], "run_id": "failed", "status": "failed", "acc": "0.0"})  # failures never count
    mean, std, n = bench_report.average_over_datasets(bench_report.frame(rows), "acc", ["a", "b"])
    # dataset means 70 and 60 -> 65; per-seed averages 55 and 75 -> sample std 14.142
    assert mean == pytest.approx(65.0) and std == pytest.approx(math.sqrt(200)) and n == 2


def test_summary_tables(configs, tmp_path):
    grid = load_grid(grid_file(configs, protocol=["fewshot", "base2novel"], shots=[4], seeds=[1, 2],
                               datasets=["../datasets/alpha.yaml", "../datasets/busi.yaml"]))
    rows = []
    for dataset, accs in (("alpha", (0.6, 0.8)), ("busi", (0.5, 0.7))):
        rows.append({"run_id": f"zs_{dataset}_fewshot", "status": "ok", "method": "zs", "dataset": dataset,
                     "protocol": "fewshot", "shots": "", "seed": "", "acc": "0.3"})
        for seed, acc in zip((1, 2), accs):
            rows.append({"run_id": f"coop_{dataset}_{seed}", "status": "ok", "method": "coop", "dataset": dataset,
                         "protocol": "fewshot", "shots": "4", "seed": str(seed), "acc": str(acc)})
            rows.append({"run_id": f"coop_{dataset}_b{seed}", "status": "ok", "method": "coop", "dataset": dataset,
                         "protocol": "base2novel", "shots": "16", "seed": str(seed), "acc": str(acc),
                         "novel_acc": "1.0" if dataset == "busi" else "0.5"})
    rows.append({"run_id": "coop_x", "status": "failed", "method": "coop", "dataset": "alpha",
                 "protocol": "fewshot", "shots": "4", "seed": "3", "error": "RuntimeError: out of memory"})
    text, series, points = bench_report.summary_markdown(grid, rows, tmp_path)
    assert "| coop | 70.00 ± 14.14 | 60.00 ± 14.14 | 65.00 ± 14.14 |" in text  # K=4 per-dataset table
    assert "| zs | 30.00 | 30.00 | 30.00 |" in text  # test-only: one value, no std, shown at K=4
    assert series["coop"][4][0] == pytest.approx(65.0) and series["zs"][4][0] == pytest.approx(30.0)
    assert "sample** standard deviation" in text and "ddof = 1" in text
    # base2novel: alpha B70 N50 (HM 58.33), busi B60 N100 (HM 75); with BUSI and without
    hm = bench_report.harmonic_mean
    assert f"| coop | 65.00 | 75.00 | {hm(65, 75):.2f} | {(hm(70, 50) + hm(60, 100)) / 2:.2f} | 70.00 | 2 |" in text
    assert f"| coop | 70.00 | 50.00 | {hm(70, 50):.2f} | {hm(70, 50):.2f} | 60.00 | 1 |" in text
    assert "without BUSI" in text and "(B+N)/2 (not an HM)" in text
    assert "coop_x" in text and "out of memory" in text  # the failure is listed
    assert "published" in text  # the benchmark dataset BUSI is in the grid (published: auto)
    assert "*published:* Biomed-DPT | 59.03" not in text  # K=4 only: 66.12
    assert "| *published:* Biomed-DPT | 66.12 | 66.12 |" in text
    assert points["coop"]["average"] == pytest.approx((65.0, 75.0))


def test_report_never_overwrites_a_summary_unless_asked(configs, tmp_path):
    grid = load_grid(grid_file(configs, shots=[4], seeds=[1]))
    rows = [{"run_id": "a", "status": "ok", "method": "coop", "dataset": "alpha", "protocol": "fewshot",
             "shots": "4", "seed": "1", "acc": "0.5"}]
    first = bench_report.write_report(grid, rows, tmp_path)
    assert tmp_path / "summary.md" in first
    assert bench_report.write_report(grid, rows, tmp_path) == []  # unchanged: nothing rewritten
    rows[0]["acc"] = "0.9"
    second = bench_report.write_report(grid, rows, tmp_path)
    assert "50.00" in (tmp_path / "summary.md").read_text()  # the old one is kept
    new = [p for p in second if p.suffix == ".md"]
    assert len(new) == 1 and new[0].name.startswith("summary-") and "90.00" in new[0].read_text()
    bench_report.write_report(grid, rows, tmp_path, overwrite=True)
    assert "90.00" in (tmp_path / "summary.md").read_text()


# --------------------------------------------------------------------------- for real
@pytest.mark.slow
def test_real_grid_through_the_dpt_code_then_resume(tmp_path, capsys, monkeypatch):
    """CoOp and zero-shot, base-to-novel on the demo data: fit on base, the same checkpoint on novel;
    the cells share one feature store (in a cache of their own here), which --clear-cache empties,
    and one backbone load (each stage gets a copy of the model the process keeps)."""
    from dpt_lightning.backbone import loading
    from dpt_lightning.features import store_size

    monkeypatch.setenv("DPT_CACHE_DIR", str(tmp_path / "cache"))
    loading.forget_loaded_model()
    loads = []
    real_load = loading._load
    monkeypatch.setattr(loading, "_load", lambda *a: loads.append(a[0]) or real_load(*a))
    grid = write(tmp_path / "grid.yaml", {
        "name": "tiny", "protocol": "base2novel",
        "methods": [str(ROOT / "trainers/zeroshot.yaml"), str(ROOT / "trainers/coop.yaml")],
        "datasets": [str(ROOT / "datasets/demo.yaml")], "shots": [2], "seeds": [1],
        "model": {"backbone": "tiny"},
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False,
                    "enable_model_summary": False},
    })
    out = tmp_path / "out"
    assert bench.main([str(grid), "--out", str(out)]) == 0
    assert loads == ["tiny"]  # three stages (zero-shot; CoOp's fit, its novel test), one backbone load
    rows = {r["run_id"]: r for r in read_results(out)}
    assert set(rows) == {"zeroshot_demo_base2novel", "coop_demo_base2novel_K2_seed1"}
    coop = rows["coop_demo_base2novel_K2_seed1"]
    assert coop["status"] == "ok", coop["error"]
    assert 0 <= float(coop["acc"]) <= 1 and 0 <= float(coop["novel_acc"]) <= 1
    assert int(coop["trainable_params"]) == 4 * 32  # 4 context vectors of the tiny text width
    assert 0 < int(coop["checkpoint_bytes"]) < 50_000 and Path(coop["checkpoint"]).is_file()
    assert float(coop["train_seconds"]) > 0 and float(coop["eval_seconds"]) > 0 and float(coop["peak_rss_mb"]) > 0
    assert coop["method_class"] == "CoOp" and coop["backbone"] == "tiny" and coop["max_epochs"] == "1"
    zeroshot = rows["zeroshot_demo_base2novel"]
    assert zeroshot["status"] == "ok" and zeroshot["train_seconds"] == "" and zeroshot["trainable_params"] == "0"
    summary = (out / "summary.md").read_text()
    assert "Base-to-novel averages" in summary and "| coop |" in summary
    assert "feature store" in capsys.readouterr().out and store_size()[1] > 0
    assert bench.main([str(grid), "--resume", str(out)]) == 0
    said = capsys.readouterr().out
    assert "0 run(s) executed, 2 skipped" in said
    assert bench.main(["--clear-cache"]) == 0
    assert "removed the feature store" in capsys.readouterr().out and store_size() == (0, 0)


def test_every_cell_serves_fixed_image_paths_from_the_feature_store():
    """The store flags are added unless the grid's or entry's args set them (then theirs win)."""
    assert bench_job.with_feature_store(["--config", "a.yaml"]) == [
        "--config", "a.yaml", "--model.init_args.cache_eval_features=true",
        "--model.init_args.cache_train_features=true"]
    mine = ["--model.init_args.cache_train_features=false"]
    assert bench_job.with_feature_store(mine) == [*mine, "--model.init_args.cache_eval_features=true"]


def test_plain_rerun_continues_the_newest_folder_and_new_starts_another(configs, tmp_path, monkeypatch):
    """``dpt-bench GRID`` twice: the second call finds the first call's dated folder and skips every
    finished run; ``--new`` starts a fresh folder."""
    monkeypatch.chdir(tmp_path)
    grid = grid_file(configs, name="again", output=str(tmp_path / "runs"))
    calls = []

    def fake_run_grid(grid, folder, executor=None, fail_fast=False, stream=None, **kwargs):
        calls.append(folder)
        return run_grid(grid, folder, executor=FakeExecutor(), stream=stream)

    def stamped(n):  # run folders are named <grid>_<date>_<time>
        return tmp_path / "runs" / f"again_2031-01-0{n + 1}_00-00-00"

    monkeypatch.setattr(bench_local, "run_grid", fake_run_grid)
    monkeypatch.setattr(bench_command, "new_run_folder", lambda g: stamped(len(calls)))
    assert bench.main([str(grid)]) == 0
    assert bench.main([str(grid)]) == 0
    assert calls[0] == calls[1] == stamped(0)
    assert len(read_results(calls[0])) == 14
    assert bench.main([str(grid), "--new"]) == 0
    assert calls[2] == stamped(2)
    assert bench.main([str(grid), "--new", "--resume"]) == 2  # contradictory options


# ------------------------------------------------------------------------------ backbones axis
def test_backbones_axis_expands_and_labels_cells_only_when_it_compares(configs):
    one = expand(load_grid(grid_file(configs, backbones=["tiny-clip"])))
    assert [r.run_id for r in one] == [r.run_id for r in expand(load_grid(grid_file(configs)))]  # same folders
    (_, args, _), = one[0].stages(Path("/out/x"))
    assert "--model.init_args.backbone=tiny-clip" in args
    grid = load_grid(grid_file(configs, backbones=["tiny-demo", {"backbone": "openclip:ViT-B-16/openai", "name": "clip"},
                                                   "local-dir:/models/quilt-net/"]))
    assert [b.name for b in grid.backbones] == ["tiny-demo", "clip", "quilt-net"]
    runs = expand(grid)
    assert len(runs) == 3 * (2 * 1 + 2 * 2 * 3)
    ids = [r.run_id for r in runs]
    assert len(set(ids)) == len(ids) and "coop_clip_alpha_fewshot_K4_seed2" in ids and "zs_quilt-net_busi_fewshot" in ids
    cell = next(r for r in runs if r.run_id == "coop_clip_alpha_fewshot_K4_seed2")
    (_, args, _), = cell.stages(Path("/out/x"))
    assert args[args.index("--data.num_shots") - 1] == "--model.init_args.backbone=openclip:ViT-B-16/openai"
    assert cell.settings()["backbone_label"] == "clip" and cell.label().startswith("coop @ clip |")
    assert len({r.fingerprint() for r in runs if r.shots == 4 and r.seed == 2 and r.dataset.name == "alpha"}) == 3
    copy = load_grid(write(configs / "grids/copy.yaml", grid.to_yaml()))
    assert [r.run_id for r in expand(copy)] == ids
    assert bench.grid.backbone_label("hf-hub:wisdomik/QuiltNet-B-32") == "QuiltNet-B-32"


@pytest.mark.parametrize("change, message", [
    ({"backbones": []}, "'backbones' must be a non-empty list"),
    ({"backbones": ["tiny", {"backbone": "tiny-demo", "name": "tiny"}]}, r"labelled \['tiny'\] appear twice"),
    ({"backbones": [{"id": "tiny"}]}, "backbones entry"),
    ({"backbones": ["tiny"], "model": {"backbone": "tiny-demo"}}, "'model: backbone' and 'backbones'"),
])
def test_bad_backbones_axis_is_a_clear_error(configs, change, message):
    with pytest.raises(GridError, match=message):
        load_grid(grid_file(configs, **change))


def test_summary_shows_methods_by_backbones(configs, tmp_path):
    grid = load_grid(grid_file(configs, shots=[4], seeds=[1], datasets=["../datasets/alpha.yaml"],
                               backbones=["tiny-demo", "tiny-clip-demo"]))
    rows = [{"run_id": r.run_id, **r.settings(), "status": "ok", "acc": str(acc)}
            for r, acc in zip(expand(grid), (0.3, 0.4, 0.6, 0.8))]
    text, series, _ = bench_report.summary_markdown(grid, rows, tmp_path)
    assert "| coop @ tiny-clip-demo | 80.00 | 80.00 |" in text and "| zs @ tiny-demo | 30.00 | 30.00 |" in text
    assert "## Methods × backbones" in text
    assert "| method | tiny-demo | tiny-clip-demo |" in text
    assert "| coop | 60.00 | 80.00 |" in text and "| zs | 30.00 | 40.00 |" in text
    assert set(series) == {"zs @ tiny-demo", "zs @ tiny-clip-demo", "coop @ tiny-demo", "coop @ tiny-clip-demo"}


@pytest.mark.slow
def test_backbones_demo_grid_runs_on_both_tiny_families(tmp_path):
    """benchmarks/backbones_demo.yaml, cut to zero-shot and CoOp, one seed and one short epoch, with
    ``tiny-clip`` for ``tiny-clip-demo`` (the same family without its minute of pre-training): every
    cell runs on its backbone and summary.md shows methods × backbones."""
    from dpt_lightning.demo.pretrain import tiny_demo_dir

    tiny_demo_dir()  # generated once in this process, not by each cell
    shipped = yaml.safe_load((ROOT / "benchmarks/backbones_demo.yaml").read_text())
    assert shipped["backbones"] == ["tiny-demo", "tiny-clip-demo"]
    grid = write(tmp_path / "grid.yaml", {
        **shipped, "backbones": ["tiny-demo", "tiny-clip"],
        "methods": [str(ROOT / "trainers/zeroshot.yaml"), str(ROOT / "trainers/coop.yaml")],
        "datasets": [str(ROOT / "datasets/demo.yaml")], "seeds": [1],
        "trainer": {**shipped["trainer"], "max_epochs": 1, "limit_train_batches": 2, "enable_progress_bar": False},
    })
    out = tmp_path / "out"
    assert bench.main([str(grid), "--out", str(out)]) == 0
    rows = {r["run_id"]: r for r in read_results(out)}
    assert set(rows) == {"zeroshot_tiny-demo_demo_fewshot", "zeroshot_tiny-clip_demo_fewshot",
                         "coop_tiny-demo_demo_fewshot_K4_seed1", "coop_tiny-clip_demo_fewshot_K4_seed1"}
    assert all(r["status"] == "ok" for r in rows.values()), [r["error"] for r in rows.values()]
    assert {r["backbone"] for r in rows.values()} == {"tiny-demo", "tiny-clip"}
    assert int(rows["coop_tiny-clip_demo_fewshot_K4_seed1"]["trainable_params"]) == 4 * 32
    summary = (out / "summary.md").read_text()
    assert "## Methods × backbones" in summary and "| method | tiny-demo | tiny-clip |" in summary
    assert re.search(r"\| coop \| \d+\.\d\d \| \d+\.\d\d \|", summary)
    assert re.search(r"\| zeroshot \| \d+\.\d\d \| \d+\.\d\d \|", summary)
