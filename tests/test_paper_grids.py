"""The papers' whole baseline table as dpt-bench grids (benchmarks/paper_fewshot.yaml,
benchmarks/paper_base2novel.yaml): what they name and how many cells they expand to (nothing runs),
and a demo-size version of the few-shot table run for real through dpt-bench (every method of the
paper grid on the demo data, tiny-demo backbone, K = 1, one seed, one short epoch)."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

from dpt_lightning import CLIPAdapter, CoOp, LinearProbe, LPPlusPlus, PromptTrainer, TipAdapter, TipAdapterF, bench
from dpt_lightning.bench import expand, load_grid, read_results
from dpt_lightning.bench.grid import import_class, model_class_path
from dpt_lightning.bench.report import published
from dpt_lightning.data.facts import BENCHMARK_DATASETS
from dpt_lightning.methods.checkpoints import CheckpointMismatchError, check_checkpoint, checkpoint_identity
from dpt_lightning.methods.frozen_features import FrozenFeatureTrainer

ROOT = Path(__file__).resolve().parents[1]
FEWSHOT = ROOT / "benchmarks/paper_fewshot.yaml"
BASE2NOVEL = ROOT / "benchmarks/paper_base2novel.yaml"
#: The canonical (paper) variants of VPT and MaPLe: shipped, but not part of the published table.
NOT_IN_TABLE = {"vpt_deep.yaml", "maple_deep.yaml"}


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("DPT_DATA_ROOT", str(tmp_path))
    return tmp_path


def method_class(entry) -> type:
    cls = import_class(model_class_path(entry.config, entry.args))
    assert cls is not None and issubclass(cls, PromptTrainer), entry.config
    return cls


def test_paper_fewshot_grid_is_every_shipped_method_on_the_eleven_datasets(data_root):
    grid = load_grid(FEWSHOT)
    shipped = {p.name for p in (ROOT / "trainers").glob("*.yaml")} - NOT_IN_TABLE
    assert sorted(Path(m.config).name for m in grid.methods) == sorted(shipped)
    assert len(grid.methods) >= 15 and all(method_class(m) for m in grid.methods)
    assert sorted(Path(d.config).stem for d in grid.datasets) == sorted(n.lower() for n in BENCHMARK_DATASETS)
    assert all(d.root == str(data_root) for d in grid.datasets)
    assert grid.protocols == ["fewshot"] and grid.shots == {"fewshot": [1, 2, 4, 8, 16]} and grid.seeds == [1, 2, 3]
    tested_only = {m.name for m in grid.methods if not m.fit}
    assert tested_only == {"zeroshot", "zeroshot_ensemble"}
    learners = len(grid.methods) - len(tested_only)
    runs = expand(grid)
    assert len(runs) == learners * 11 * 5 * 3 + len(tested_only) * 11 == 2332
    assert len({r.run_id for r in runs}) == len(runs)
    # every method but VPT (no published biomedical number) has the papers' averages beside it
    theirs = set(published().query("protocol == 'fewshot'")["method"])
    assert {m.name for m in grid.methods} - theirs == {"vpt"}


def test_the_adapter_baselines_train_every_seed_on_seed_ones_images(data_root):
    """Issue 21.2: BiomedCoOp's main.py builds the dataset with seed 1 for every task, so the published
    rows of its five adapter baselines train seeds 1-3 on seed 1's few-shot images; the other methods
    select with each seed. The cells say so in their names, arguments and fingerprints."""
    grid = load_grid(FEWSHOT)
    fixed = {m.name: m.selection_seed for m in grid.methods if m.selection_seed is not None}
    assert fixed == dict.fromkeys(["linear_probe", "lp_plus_plus", "clip_adapter", "tip_adapter", "tip_adapter_f"], 1)
    runs = {r.run_id: r for r in expand(grid)}
    probe, coop = runs["linear_probe_btmri_fewshot_K16_sel1_seed2"], runs["coop_btmri_fewshot_K16_seed2"]
    assert probe.label().endswith("K=16 | seed 2 (images of seed 1)")
    args = probe.stages(Path("/r"))[0][1]
    assert args[args.index("--data.seed") + 1] == "2" and args[args.index("--data.selection_seed") + 1] == "1"
    assert "--data.selection_seed" not in coop.stages(Path("/r"))[0][1]
    assert probe.settings()["selection_seed"] == 1 and "selection_seed" not in coop.settings()
    free = dataclasses.replace(probe, method=dataclasses.replace(probe.method, selection_seed=None))
    assert free.run_id == "linear_probe_btmri_fewshot_K16_seed2" and free.fingerprint() != probe.fingerprint()
    again = load_grid(FEWSHOT)  # the grid copied into a run folder reads back with its selection seeds
    copy_path = data_root / "grid.yaml"
    copy_path.write_text(again.to_yaml())
    assert {m.name: m.selection_seed for m in load_grid(copy_path).methods} == {m.name: m.selection_seed
                                                                               for m in grid.methods}


def test_paper_base2novel_grid_is_the_methods_that_can_name_novel_classes(data_root):
    fewshot, grid = load_grid(FEWSHOT), load_grid(BASE2NOVEL)
    classes = {m.name: method_class(m) for m in fewshot.methods}
    # the frozen-feature heads (one row / cache column per training class) are left out, nothing else
    assert {m.name for m in grid.methods} == {n for n, c in classes.items() if not issubclass(c, FrozenFeatureTrainer)}
    assert {n for n, c in classes.items() if issubclass(c, FrozenFeatureTrainer)} == {
        "linear_probe", "lp_plus_plus", "clip_adapter", "tip_adapter", "tip_adapter_f"}
    assert [d.name for d in grid.datasets] == [d.name for d in fewshot.datasets]
    assert grid.protocols == ["base2novel"] and grid.shots == {"base2novel": [16]} and grid.seeds == [1, 2, 3]
    runs = expand(grid)
    learners = sum(m.fit for m in grid.methods)
    assert len(runs) == learners * 11 * 3 + (len(grid.methods) - learners) * 11 == 319
    # the reference's base-to-novel schedules: 50 epochs, ProGrad at lr 0.0015; CoCoOp and CLIP-SVD
    # keep their configs' epochs (no grid-wide max_epochs)
    assert not any("max_epochs" in a for a in grid.args)
    epochs = {m.name: [a for a in m.args if "max_epochs" in a] for m in grid.methods}
    assert {n for n, e in epochs.items() if e == ["--trainer.max_epochs=50"]} == {
        "coop", "kgcoop", "prograd", "vpt", "maple", "biomed_coop", "biomed_dpt"}
    assert "--model.init_args.lr=0.0015" in next(m for m in grid.methods if m.name == "prograd").args
    for run in runs:  # every learner is fit on base and its checkpoint tested on novel
        stages = run.stages(Path("/r"))
        assert [s[2] for s in stages] == ["", "novel_"]


@pytest.mark.parametrize("cls, scores_novel", [(LinearProbe, False), (LPPlusPlus, False), (TipAdapter, False),
                                                (TipAdapterF, False), (CLIPAdapter, True), (CoOp, True)])
def test_which_methods_can_score_novel_classes(cls, scores_novel):
    assert cls.scores_new_classes is scores_novel


@pytest.mark.parametrize("cls, settings, scores_novel", [
    (LinearProbe, {}, False), (CLIPAdapter, {}, True), (CoOp, {"class_specific": True}, False)])
def test_base2novel_refuses_a_head_of_the_base_classes_on_novel_ones(cls, settings, scores_novel):
    """The novel test loads the base fit's checkpoint: a method that learns one entry per training
    class is refused with a clear error (a failed cell), even when both halves have as many classes
    and every tensor would fit; class-agnostic parameters load."""
    base = cls(classnames=["circle", "cross"], backbone="tiny", dataset="demo", protocol="base2novel", **settings)
    checkpoint = {"dpt_lightning": checkpoint_identity(base),
                  "state_dict": {k: v for k, v in base.state_dict().items() if not k.startswith("backbone.")}}
    check_checkpoint(base, checkpoint)  # its own classes: always
    novel = copy.deepcopy(base)
    novel.classnames = ["square", "stripes"]  # what the novel test's model is named after
    if scores_novel:
        check_checkpoint(novel, checkpoint)
    else:
        with pytest.raises(CheckpointMismatchError, match="learns one entry per training class"):
            check_checkpoint(novel, checkpoint)


@pytest.mark.slow
def test_demo_size_paper_table_through_dpt_bench(tmp_path, data_root, tiny_demo_backbone):
    """Every method of the paper grid, as the grid lists it, one cell each on the demo data, two
    cells at a time (the workers split the cores). The searches are shortened where they dominate
    a cell: one C for the linear probe, 20 x 20 (beta, alpha) points, 2 candidate alphas for
    Tip-Adapter-F's trainings."""
    paper = load_grid(FEWSHOT)
    from conftest import QUICK_SEARCH as quick

    grid = tmp_path / "paper_demo.yaml"
    grid.write_text(yaml.safe_dump({
        "name": "paper_demo", "protocol": "fewshot",
        "methods": [{"config": m.config, "name": m.name, "args": [*m.args, *quick.get(m.name, [])],
                     **({"selection_seed": m.selection_seed} if m.selection_seed is not None else {})}
                    for m in paper.methods],
        "datasets": [str(ROOT / "datasets/demo.yaml")], "shots": [1], "seeds": [1],
        "trainer": {"accelerator": "cpu", "max_epochs": 1, "limit_train_batches": 1,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "args": ["--data.num_workers=0"],
    }))
    out = tmp_path / "out"
    assert bench.main([str(grid), "--out", str(out), "--workers", "2"]) == 0
    rows = {r["method"]: r for r in read_results(out)}
    assert set(rows) == {m.name for m in paper.methods}
    failed = {name: row["error"] for name, row in rows.items() if row["status"] != "ok"}
    assert not failed
    assert all(0 <= float(row["acc"]) <= 1 for row in rows.values())
    summary = (out / "summary.md").read_text()
    table = summary.split("## Few-shot")[1].split("\n\n")[1]
    listed = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert listed == [m.name for m in paper.methods] and len(listed) >= 15
    plot = out / "plots" / "accuracy_vs_shots.png"
    assert plot.is_file() and plot.stat().st_size > 0
