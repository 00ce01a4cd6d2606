"""Description banks: the JSON format, the shipped banks, and ``dpt-prompts`` (import as data only).

Checked: every shipped bank covers its dataset's classes; a missing class is one error naming
every missing class; ``dpt-prompts import`` round-trips a reference-format ``prompt_templates.py``
and a JSON file, refuses (and never runs) a file with code in it, and never overwrites an output
without ``--force``; ``list``, ``show`` and ``check`` work and fail with a clear message.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpt_lightning.bank_cli import main
from dpt_lightning.demo.pictures import DEMO_CLASSES
from dpt_lightning.data.facts import BENCHMARK_DATASETS
from dpt_lightning.descriptions import (
    DescriptionBankError,
    builtin_bank_names,
    import_bank,
    load_bank,
    read_python_data,
    resolve_sentences,
    sentences_for,
    validate_bank,
)

DPT_BANK = {
    "glioma tumor": ["An irregular mass with a bright rim.", "It crosses the midline. "],
    "normal OCT scan": ["Smooth, evenly layered retina.", 'Quotes "inside" and unicode: µm, ≥ 3.'],
}
COOP_BANK = {"glioma tumor": ["another sentence"], "normal OCT scan": ["and another"]}


def reference_file(folder: Path, body: str = "") -> Path:
    """A file in the reference repositories' format: comments, a docstring, template dicts of
    strings, a list, and the description dicts written as Python literals."""
    path = folder / "prompt_templates.py"
    path.write_text(
        "# source: a comment line\n"
        '"""Prompt templates."""\n'
        "CUSTOM_TEMPLATES = {\n    'BTMRI': 'a photo of a {}.',\n    \"OCTMNIST\": \"a photo of a {}.\",\n}\n"
        "IMAGENET_TEMPLATES = [\n    'a bad photo of a {}.',\n    'a photo of many {}.',\n]\n"
        f"BIOMEDDPT_TEMPLATES = {DPT_BANK!r}\n"
        f"BIOMEDCOOP_TEMPLATES: dict = {json.dumps(COOP_BANK, indent=4)}\n" + body,
        encoding="utf-8")
    return path


def run(*args: str) -> int:
    return main(list(args))


# ------------------------------------------------------------------------------------------------
# The shipped banks.
@pytest.mark.parametrize("name", list(BENCHMARK_DATASETS))
def test_every_dataset_has_a_shipped_bank_of_about_50_sentences_per_class(name):
    facts = BENCHMARK_DATASETS[name]
    assert facts.key in builtin_bank_names()
    bank = load_bank(name)
    groups = sentences_for(bank, list(facts.classnames), name)
    for classname, sentences in zip(facts.classnames, groups):
        assert len(sentences) >= 45, classname
        assert len(set(sentences)) == len(sentences), f"{name}/{classname}: repeated sentences"


def test_the_demo_has_a_small_bank_for_its_classes():
    bank = load_bank("demo")
    assert sorted(bank) == sorted(DEMO_CLASSES) and all(len(s) >= 3 for s in bank.values())


def test_a_missing_class_is_one_error_listing_every_missing_class():
    bank = {"Glioma Tumor ": ["a"], "other": ["b"]}
    assert sentences_for(bank, ["glioma tumor"]) == [["a"]]  # case and spaces do not matter
    with pytest.raises(DescriptionBankError) as err:
        sentences_for(bank, ["glioma tumor", "normal brain", "pituitary tumor"], "my_bank.json")
    assert "my_bank.json has no sentences for 2 class(es): ['normal brain', 'pituitary tumor']" in str(err.value)


def test_bank_format_errors_are_listed():
    with pytest.raises(DescriptionBankError, match="a JSON object"):
        validate_bank(["not", "a", "dict"], "x.json")
    with pytest.raises(DescriptionBankError) as err:
        validate_bank({"a": [], "b": ["ok", ""], 3: ["x"]}, "x.json")
    message = str(err.value)
    assert "'a': expected a non-empty list" in message and "'b': every sentence" in message
    assert "class name 3 is not a non-empty string" in message
    bank = {"Normal": ["x"], "normal ": ["y"], "tumor": ["z"]}
    assert sentences_for(bank, ["tumor"]) == [["z"]]  # an ambiguity only matters for a class asked for
    with pytest.raises(DescriptionBankError, match="'normal': \\['Normal', 'normal '\\]"):
        sentences_for(bank, ["tumor", "normal"])


def test_auto_needs_a_dataset_and_paths_work(tmp_path):
    with pytest.raises(DescriptionBankError, match="model.descriptions: 'auto'.*JSON bank"):
        resolve_sentences("auto", None, ["a"])
    with pytest.raises(DescriptionBankError, match="no shipped bank for dataset 'mydata'"):
        resolve_sentences("auto", "mydata", ["a"])
    path = tmp_path / "bank.json"
    path.write_text(json.dumps({"A": ["one", "two"]}))
    assert resolve_sentences(str(path), None, ["a"]) == [["one", "two"]]
    with pytest.raises(DescriptionBankError, match="does not exist"):
        load_bank(str(tmp_path / "missing.json"))


# ------------------------------------------------------------------------------------------------
# dpt-prompts import.
def test_import_round_trips_a_reference_file(tmp_path):
    source = reference_file(tmp_path)
    data = read_python_data(source)
    assert data["BIOMEDDPT_TEMPLATES"] == DPT_BANK and data["IMAGENET_TEMPLATES"][0] == "a bad photo of a {}."

    out = tmp_path / "dpt.json"
    assert run("import", str(source), "-o", str(out), "--name", "BIOMEDDPT_TEMPLATES") == 0
    assert json.loads(out.read_text(encoding="utf-8")) == DPT_BANK  # sentences kept verbatim
    assert load_bank(str(out)) == DPT_BANK
    again = tmp_path / "again.json"
    assert run("import", str(out), "-o", str(again)) == 0  # JSON in, same JSON out
    assert json.loads(again.read_text(encoding="utf-8")) == DPT_BANK

    coop = tmp_path / "coop.json"
    assert run("import", str(source), "-o", str(coop), "--name", "BIOMEDCOOP_TEMPLATES") == 0
    assert json.loads(coop.read_text()) == COOP_BANK


def test_import_needs_a_name_when_the_file_has_several_banks(tmp_path, capsys):
    source = reference_file(tmp_path)
    assert run("import", str(source), "-o", str(tmp_path / "x.json")) == 1
    err = capsys.readouterr().err
    assert "several: ['BIOMEDCOOP_TEMPLATES', 'BIOMEDDPT_TEMPLATES']" in err and "--name" in err
    assert run("import", str(source), "-o", str(tmp_path / "x.json"), "--name", "CUSTOM_TEMPLATES") == 1
    assert "no {classname: [sentences]} dict named 'CUSTOM_TEMPLATES'" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_import_can_keep_one_datasets_classes(tmp_path, capsys):
    source = tmp_path / "bank.json"
    source.write_text(json.dumps({"Circle": ["c"], "square": ["s"], "cross": ["x"], "stripes": ["l"], "other": ["o"]}))
    out = tmp_path / "demo.json"
    assert run("import", str(source), "-o", str(out), "--classes", "circle", "square", "cross", "stripes") == 0
    assert json.loads(out.read_text()) == {"circle": ["c"], "square": ["s"], "cross": ["x"], "stripes": ["l"]}
    assert run("import", str(source), "-o", str(tmp_path / "b.json"), "--dataset", "BTMRI") == 1
    assert "has no sentences for 4 class(es)" in capsys.readouterr().err


@pytest.mark.parametrize("code", [
    "import os\nos.makedirs({marker!r})\n",
    "open({marker!r}, 'w').close()\n",
    "EXTRA = {{'a': [open({marker!r}, 'w').name]}}\n",
    "EXTRA = [__import__('os').makedirs({marker!r})]\n",
    "def f():\n    open({marker!r}, 'w')\n",
    "EXTRA = {{'a': [f\"{{open({marker!r}, 'w').name}}\"]}}\n",
    "EXTRA = [s for s in [open({marker!r}, 'w')]]\n",
    "EXTRA = BIOMEDDPT_TEMPLATES\n",
    "EXTRA = {{**BIOMEDDPT_TEMPLATES}}\n",
    "EXTRA = 'a' + 'b'\n",
    "if True:\n    open({marker!r}, 'w')\n",
])
def test_a_file_with_code_is_refused_and_never_run(tmp_path, capsys, code):
    marker = tmp_path / "ran"
    source = reference_file(tmp_path, code.format(marker=str(marker)))
    out = tmp_path / "bank.json"
    assert run("import", str(source), "-o", str(out), "--name", "BIOMEDDPT_TEMPLATES") == 1
    err = capsys.readouterr().err
    assert "never runs it" in err and "line " in err
    assert not marker.exists() and not out.exists()
    with pytest.raises(DescriptionBankError, match="is code, not data"):
        import_bank(source, "BIOMEDDPT_TEMPLATES")
    assert not marker.exists()


def test_a_broken_python_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("X = {'a': [\n")
    with pytest.raises(DescriptionBankError, match="not a readable Python file"):
        import_bank(bad)
    bad.write_text("X = {['a list as a key']: ['x']}\n")
    with pytest.raises(DescriptionBankError, match="line 1: not a plain literal"):
        import_bank(bad)
    with pytest.raises(DescriptionBankError, match=r"expected a \.py"):
        (tmp_path / "bank.txt").write_text("{}")
        import_bank(tmp_path / "bank.txt")


def test_import_never_overwrites_without_force(tmp_path, capsys):
    source = reference_file(tmp_path)
    out = tmp_path / "bank.json"
    out.write_text("precious")
    assert run("import", str(source), "-o", str(out), "--name", "BIOMEDDPT_TEMPLATES") == 1
    assert "--force" in capsys.readouterr().err and out.read_text() == "precious"
    assert run("import", str(source), "-o", str(out), "--name", "BIOMEDDPT_TEMPLATES", "--force") == 0
    assert json.loads(out.read_text()) == DPT_BANK


# ------------------------------------------------------------------------------------------------
# list / show / check, and the installed console script.
def test_list_show_and_check(tmp_path, capsys):
    assert run("list") == 0
    listed = capsys.readouterr().out
    assert "btmri: 4 classes" in listed and "demo: 4 classes" in listed
    assert run("show", "demo", "-n", "1") == 0
    shown = capsys.readouterr().out
    assert "circle (5 sentences)" in shown and "  - a red round circle" in shown
    assert run("check", "BTMRI", "--dataset", "BTMRI") == 0
    assert "ok: BTMRI covers all 4 classes" in capsys.readouterr().out
    assert run("check", "demo", "--dataset", "BTMRI") == 1
    assert "4 class(es): ['glioma tumor', 'meningioma tumor', 'pituitary tumor', 'normal brain']" in \
        capsys.readouterr().err
    assert run("check", "demo") == 1
    assert "--dataset NAME or --classes" in capsys.readouterr().err


def test_the_console_script_is_installed(tmp_path):
    script = Path(sys.executable).with_name("dpt-prompts")
    source = reference_file(tmp_path)
    out = tmp_path / "bank.json"
    result = subprocess.run([str(script), "import", str(source), "-o", str(out), "--name", "BIOMEDDPT_TEMPLATES"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and json.loads(out.read_text()) == DPT_BANK


def test_zero_shot_ensemble_config_uses_the_datasets_bank(tmp_path):
    from dpt_lightning.cli import build_cli

    repo = Path(__file__).resolve().parents[1]
    cli = build_cli(["test", "--config", str(repo / "trainers/zeroshot_ensemble.yaml"), "--config",
                     str(repo / "datasets/demo.yaml"), "--model.backbone", "tiny", "--trainer.limit_test_batches", "1",
                     "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])
    model = cli.model
    assert model.hparams.descriptions == "auto" and model.hparams.dataset == "demo"
    bank = load_bank("demo")
    expected = model.backbone.encode_class_sentences([bank[name] for name in model.classnames])
    assert model.class_features.shape == (4, model.backbone.embed_dim)
    assert (model.class_features - expected).abs().max() < 1e-5
    assert "test_acc" in cli.trainer.callback_metrics


# ------------------------------------------------------------------------------------------------
# Files that are not banks, outputs that cannot be written (issue 15.8): one line naming the path.
@pytest.mark.parametrize("content, message", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply to be a description bank"),
    (b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply to be a description bank"),
    (b'{"tumeur b\xe9nigne": ["x"]}', "not UTF-8 text"),
    (b"{", "not valid JSON"),
])
def test_unreadable_banks_name_the_file(tmp_path, capsys, content, message):
    path = tmp_path / "bank.json"
    path.write_bytes(content)
    with pytest.raises(DescriptionBankError, match=message) as err:
        load_bank(str(path))
    assert str(err.value).startswith(f"{path}: ")
    assert run("show", str(path)) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"dpt-prompts show: error: {path}: ") and message in line


def test_a_folder_is_not_a_bank(tmp_path, monkeypatch):
    (tmp_path / "bank.json").mkdir()
    with pytest.raises(DescriptionBankError, match="is a folder, not a description bank"):
        load_bank(str(tmp_path / "bank.json"))
    (tmp_path / "demo").mkdir()  # a folder named like a shipped bank does not hide it
    monkeypatch.chdir(tmp_path)
    assert load_bank("demo") == load_bank("DEMO")


def _import_to(tmp_path, capsys, output: Path, *extra: str) -> str:
    source = reference_file(tmp_path)
    assert run("import", str(source), "-o", str(output), "--name", "BIOMEDDPT_TEMPLATES", *extra) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("dpt-prompts import: error: ")
    return line


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_output_that_is_a_folder(tmp_path, capsys, force):
    (tmp_path / "out").mkdir()
    line = _import_to(tmp_path, capsys, tmp_path / "out", *force)
    assert f"{tmp_path / 'out'} is a folder; give the bank's file name, e.g. {tmp_path / 'out' / 'bank.json'}" in line


def test_output_below_a_file(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    line = _import_to(tmp_path, capsys, tmp_path / "notes.txt" / "bank.json")
    assert f"cannot write {tmp_path / 'notes.txt' / 'bank.json'}: {tmp_path / 'notes.txt'} is a file" in line


def test_output_in_a_read_only_folder(tmp_path, capsys):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("this user may write into read-only folders (root)")
        line = _import_to(tmp_path, capsys, folder / "bank.json")
        assert f"cannot write {folder / 'bank.json'}: Permission denied" in line
        assert list(folder.iterdir()) == []  # no temporary file left behind
    finally:
        folder.chmod(0o755)


def test_any_os_error_while_writing_is_one_line(tmp_path, capsys, monkeypatch):
    import dpt_lightning.descriptions as descriptions

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(descriptions, "atomic_write", refuse)  # what a read-only folder does, even for root
    line = _import_to(tmp_path, capsys, tmp_path / "bank.json")
    assert line == f"dpt-prompts import: error: cannot write {tmp_path / 'bank.json'}: Permission denied; choose a " \
                   "place you can write to"


def test_the_console_script_prints_no_traceback(tmp_path):
    (tmp_path / "out").mkdir()
    source = reference_file(tmp_path)
    result = subprocess.run([str(Path(sys.executable).with_name("dpt-prompts")), "import", str(source), "-o",
                             str(tmp_path / "out"), "--name", "BIOMEDDPT_TEMPLATES"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"dpt-prompts import: error: {tmp_path / 'out'} is a folder; give "
                                                  f"the bank's file name, e.g. {tmp_path / 'out' / 'bank.json'}"]
