"""Downloads end to end against the loopback hub (tests/hub.py): ``dpt-data download``, the default
``hf-hub:`` backbone and ``python -m dpt_lightning.backbone download`` through the real
huggingface_hub, open_clip and transformers code, without internet.

The ``dpt-data`` failure tests run in this process with huggingface_hub pointed at the hub
(`hub_here`); the end-to-end tests run the real commands in subprocesses whose environment names
the hub (``HF_ENDPOINT``) and a private ``HF_HOME``.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from dpt_lightning.data import download
from dpt_lightning.data.audit import audit_dataset
from dpt_lightning.data.catalogue import CATALOGUE
from dpt_lightning.data_cli import main
from dpt_lightning.files import sha256_file
from hub import (AGENT_REGISTRY, BENCHMARK_REPO, BIOMEDBERT_REPO, BIOMEDCLIP_FILES, BIOMEDCLIP_REPO, benchmark_zip,
                 serve_biomedclip)

ROOT = Path(__file__).resolve().parents[1]
ZIP_PATH = f"/datasets/{BENCHMARK_REPO}/resolve/main/BTMRI.zip"


@pytest.fixture(scope="module")
def btmri_zip(tmp_path_factory) -> bytes:
    """A small BTMRI archive in the benchmark's layout (real classes and label order, generated images)."""
    return benchmark_zip("BTMRI", tmp_path_factory.mktemp("btmri-zip"))


@pytest.fixture
def hub_here(loopback_hub, btmri_zip, monkeypatch):
    """The loopback hub serving BTMRI.zip, and huggingface_hub in this process pointed at it (its
    constants are read once, at import, from HF_ENDPOINT and HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", loopback_hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        loopback_hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # huggingface_hub writes in chunks of 10 MB; at 4 kB a cut in a small archive leaves bytes to resume from
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    loopback_hub.add("dataset", BENCHMARK_REPO, {"BTMRI.zip": btmri_zip, "README.md": b"the benchmark's archives"})
    return loopback_hub


def dpt_data(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def downloads(hub) -> list[tuple[str, str, str]]:
    return [request for request in hub.requests if request[1].startswith("/cdn/")]


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.name.endswith(".lock"))


# ------------------------------------------------------------------------------------ dpt-data download
def test_download_verifies_unpacks_and_installs_the_layout(hub_here, tmp_path, capsys):
    root = tmp_path / "data"
    status, out, err = dpt_data(capsys, "download", "BTMRI", "--root", str(root))
    assert status == 0, err
    assert "BTMRI: downloading BTMRI.zip" in out and "checking the SHA-256 of BTMRI.zip" in out
    assert "BTMRI: usable, but not the published benchmark" in out  # the small archive has other counts
    assert sorted(p.name for p in (root / "BTMRI").iterdir()) == ["BTMRI", "split_BTMRI.json"]
    assert audit_dataset(CATALOGUE["BTMRI"], root, decode=True).ok
    assert leftovers(root / ".dpt-data") == []  # neither the archive nor a part stays
    assert [(m, p) for m, p, _ in hub_here.requests if p != AGENT_REGISTRY] == \
        [("HEAD", ZIP_PATH), ("GET", downloads(hub_here)[0][1])]
    assert hub_here.unknown == []

    hub_here.clear()  # a second run finds the dataset there and downloads nothing
    status, out, _ = dpt_data(capsys, "download", "BTMRI", "--root", str(root))
    assert status == 0 and hub_here.requests == []


@pytest.mark.parametrize("fault, message", [
    ("404", "BTMRI.zip is not in the Hugging Face dataset repository TahaKoleilat/BiomedCoOp at main (HTTP 404"),
    ("500", "the hub answered HTTP 500 for BTMRI.zip"),
    ("500-cdn", "the hub answered HTTP 500 for BTMRI.zip"),
    ("corrupt", "BTMRI.zip does not match the SHA-256 the hub publishes for it"),
    ("huge", "downloading BTMRI.zip needs 1048576.00 GiB and the disk of"),
])
def test_a_failed_download_is_one_message_and_leaves_no_dataset(hub_here, tmp_path, capsys, fault, message):
    hub_here.fail("BTMRI.zip", fault)
    root = tmp_path / "data"
    status, out, err = dpt_data(capsys, "download", "BTMRI", "--root", str(root))
    assert status == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dpt-data download: error: ") and message in lines[0], err
    assert "Traceback" not in err and "dpt-data download BTMRI --root" in err or "dpt-data prepare" in err
    assert leftovers(root) == [".dpt-data"]  # no dataset, no part, no archive


def test_a_cut_transfer_is_resumed_within_the_run_and_by_the_next_run(hub_here, tmp_path, capsys, btmri_zip):
    root = tmp_path / "data"
    hub_here.fail("BTMRI.zip", "truncate", times=1)  # the connection drops once: huggingface_hub resumes
    assert dpt_data(capsys, "download", "BTMRI", "--root", str(root))[0] == 0
    first, resumed = [r for _, _, r in downloads(hub_here)]
    assert first == "" and 0 < int(re.fullmatch(r"bytes=(\d+)-", resumed)[1]) <= len(btmri_zip) // 2

    shutil.rmtree(root)
    hub_here.clear()
    hub_here.fail("BTMRI.zip", "truncate", times=1)  # the connection drops, then the server fails
    hub_here.fail("BTMRI.zip", "500-cdn")
    status, _, err = dpt_data(capsys, "download", "BTMRI", "--root", str(root))
    assert status == 1 and "HTTP 500" in err and "the next run resumes from there" in err
    (part,) = (root / ".dpt-data").glob("BTMRI.zip.*.part")
    kept = part.stat().st_size
    assert 0 < kept <= len(btmri_zip) // 2 and part.read_bytes() == btmri_zip[:kept]
    assert not (root / "BTMRI").exists()

    hub_here.clear()  # the next run asks only for the rest
    assert dpt_data(capsys, "download", "BTMRI", "--root", str(root))[0] == 0
    assert [r for _, _, r in downloads(hub_here)] == [f"bytes={kept}-"]
    assert audit_dataset(CATALOGUE["BTMRI"], root, decode=True).ok and leftovers(root / ".dpt-data") == []


def test_a_full_disk_while_downloading_keeps_the_part_for_the_next_run(hub_here, tmp_path, capsys, monkeypatch):
    class FullDisk:
        def __init__(self, file, room):
            self.file, self.room = file, room

        def write(self, data):
            if self.room < len(data):
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= len(data)
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(download, "open", lambda path, mode: FullDisk(open(path, mode), 0), raising=False)
    root = tmp_path / "data"
    status, _, err = dpt_data(capsys, "download", "BTMRI", "--root", str(root))
    assert status == 1 and "the disk is full (No space left on device)" in err and "Free some space" in err
    assert not (root / "BTMRI").exists()
    monkeypatch.undo()


def test_offline_mode_downloads_nothing_and_installs_a_verified_archive(hub_here, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    root = tmp_path / "data"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    status, _, err = dpt_data(capsys, "download", "BTMRI", "--root", str(root))
    assert status == 1 and "HF_HUB_OFFLINE is set, so BTMRI.zip cannot be downloaded" in err
    assert f"dpt-data prepare BTMRI --root {root} --archive <file>" in err and hub_here.requests == []

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert dpt_data(capsys, "download", "BTMRI", "--root", str(root), "--keep-archive")[0] == 0
    assert (root / ".dpt-data" / "BTMRI.zip").is_file()
    hub_here.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    status, out, _ = dpt_data(capsys, "download", "BTMRI", "--root", str(root), "--replace")
    assert status == 0 and "using the verified archive" in out and hub_here.requests == []


def test_dry_run_reports_sizes_and_writes_nothing(hub_here, tmp_path, capsys, btmri_zip):
    root = tmp_path / "data"
    status, out, _ = dpt_data(capsys, "download", "BTMRI", "--root", str(root), "--dry-run")
    assert status == 0 and f"BTMRI: TahaKoleilat/BiomedCoOp/BTMRI.zip, {len(btmri_zip)} B -> {root / 'BTMRI'}" in out
    assert not root.exists() and downloads(hub_here) == []


# ---------------------------------------------------------------------------------- end to end, as a user
def user_env(hub, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a first-time user's shell: the loopback hub as HF_ENDPOINT, an empty HF_HOME, and
    the package's commands on PATH (a shim for ``dpt-data`` where this environment's install predates it)."""
    bin_dir, shims = Path(sys.executable).parent, tmp_path / "shims"
    shims.mkdir(exist_ok=True)
    for command, module in (("dpt-data", "dpt_lightning.data_cli"), ("dpt", "dpt_lightning")):
        if not (bin_dir / command).is_file():
            (shims / command).write_text(f'#!/bin/sh\nexec "{sys.executable}" -m {module} "$@"\n')
            (shims / command).chmod(0o755)
    path = os.pathsep.join([str(shims), str(bin_dir), os.environ.get("PATH", "")])
    return {**os.environ, **hub.env(tmp_path / "hf-home"), "PATH": path, **extra}


def readme_online_path() -> str:
    """The README's first-time online command (section "Getting the data")."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"```bash\n(dpt-data download BTMRI --root data && dpt fit [^\n]+)\n```", text)
    assert match, "README 'Getting the data' lost its first-time online command"
    return match[1]


@pytest.mark.slow
def test_readme_online_path_runs_against_the_loopback_hub(loopback_hub, btmri_zip, tiny_biomedclip_dir, tmp_path):
    """``dpt-data download BTMRI && dpt fit ...`` exactly as the README writes it, with the default
    backbone id (hf-hub:microsoft/BiomedCLIP-...), then the same fit offline from the caches alone."""
    loopback_hub.add("dataset", BENCHMARK_REPO, {"BTMRI.zip": btmri_zip})
    serve_biomedclip(loopback_hub, tiny_biomedclip_dir)
    command = readme_online_path()
    run = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=user_env(loopback_hub, tmp_path),
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    asked = {path for _, path, _ in loopback_hub.requests}
    assert ZIP_PATH in asked and loopback_hub.unknown == []
    assert f"/{BIOMEDCLIP_REPO}/resolve/main/open_clip_pytorch_model.bin" in asked
    assert any(path.startswith(f"/{BIOMEDBERT_REPO}/resolve/") and path.endswith("/config.json") for path in asked)
    metrics = pd.read_csv(tmp_path / "lightning_logs" / "version_0" / "metrics.csv")
    assert metrics["test_acc"].notna().any()

    loopback_hub.clear()  # offline afterwards: the dataset and the Hugging Face cache are enough
    offline = user_env(loopback_hub, tmp_path, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    fit = command.split(" && ", 1)[1]
    run = subprocess.run(["bash", "-c", fit], cwd=tmp_path, env=offline, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert loopback_hub.requests == []
    again = pd.read_csv(tmp_path / "lightning_logs" / "version_1" / "metrics.csv")
    assert again["test_acc"].dropna().iloc[-1] == metrics["test_acc"].dropna().iloc[-1]


@pytest.mark.slow
def test_backbone_download_writes_the_offline_folder_from_the_hub(loopback_hub, tiny_biomedclip_dir, tmp_path):
    serve_biomedclip(loopback_hub, tiny_biomedclip_dir)
    folder = tmp_path / "biomedclip"
    run = subprocess.run([sys.executable, "-m", "dpt_lightning.backbone", "download", f"hf-hub:{BIOMEDCLIP_REPO}",
                          str(folder)], env=user_env(loopback_hub, tmp_path), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-5000:]
    assert loopback_hub.unknown == []
    assert {"open_clip_config.json", "open_clip_pytorch_model.bin", "config.json", "vocab.txt"} <= \
        {p.name for p in folder.iterdir()}
    served = torch.load(tiny_biomedclip_dir / "open_clip_pytorch_model.bin", weights_only=True)
    written = torch.load(folder / "open_clip_pytorch_model.bin", weights_only=True)
    assert served.keys() == written.keys() and all(torch.equal(served[k], written[k]) for k in served)

    from dpt_lightning.backbone.loading import load_open_clip  # offline (conftest), from the folder alone

    model, _, _ = load_open_clip(f"local-dir:{folder}")
    assert all(torch.equal(model.state_dict()[k], served[k]) for k in served)


#: Faults of the weights file, and what the one message says when loading (info) and downloading.
WEIGHTS_FAULTS = {
    "404": ("has no open_clip weights on the hub (neither open_clip_model.safetensors nor open_clip_pytorch_model.bin)",
            "downloading test/biomedclip-404: not found on the hub (HTTP 404 for http://127.0.0.1:"),
    "500-cdn": ("downloading open_clip_pytorch_model.bin of test/biomedclip-500-cdn: the hub answered HTTP 500 for",
                "downloading test/biomedclip-500-cdn: the hub answered HTTP 500 for"),
    "corrupt": ("the downloaded open_clip_pytorch_model.bin of test/biomedclip-corrupt does not match the SHA-256",
                "the downloaded open_clip_pytorch_model.bin of test/biomedclip-corrupt does not match the SHA-256"),
    "truncate": ("open_clip_pytorch_model.bin of test/biomedclip-truncate: the connection to http://127.0.0.1:",
                 "downloading test/biomedclip-truncate: the connection to http://127.0.0.1:"),
}

DRIVER = """
import sys
from dpt_lightning.backbone.__main__ import main
for fault, folder in zip(sys.argv[1::2], sys.argv[2::2]):
    name = f"hf-hub:test/biomedclip-{fault}"
    for command in (["info", name], ["download", name, folder]):
        print(f"=== {fault} {command[0]}", file=sys.stderr, flush=True)
        print(f"=== status {main(command)}", file=sys.stderr, flush=True)
"""


@pytest.mark.slow
def test_a_failed_backbone_download_is_one_message_and_leaves_nothing(loopback_hub, tiny_biomedclip_dir, tmp_path):
    """Loading an ``hf-hub:`` backbone (the ``dpt`` path) and ``python -m dpt_lightning.backbone download``,
    each weights fault in turn (one process for all): one message, no damaged file in the cache, no folder."""
    serve_biomedclip(loopback_hub, tiny_biomedclip_dir)
    arguments = []
    for fault in WEIGHTS_FAULTS:
        loopback_hub.add_folder("model", f"test/biomedclip-{fault}", tiny_biomedclip_dir, BIOMEDCLIP_FILES)
        loopback_hub.fail(f"test/biomedclip-{fault}/open_clip_pytorch_model.bin", fault)
        arguments += [fault, str(tmp_path / f"folder-{fault}")]
    run = subprocess.run([sys.executable, "-c", DRIVER, *arguments], env=user_env(loopback_hub, tmp_path),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-5000:]
    assert "Traceback" not in run.stderr and loopback_hub.unknown == []
    outputs = re.split(r"=== (\S+) (info|download)\n", run.stderr)[1:]
    for fault, command, output in zip(outputs[0::3], outputs[1::3], outputs[2::3]):
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        expected = WEIGHTS_FAULTS[fault][command == "download"]
        assert len(errors) == 1 and expected in errors[0], (fault, command, output)
        assert output.rstrip().endswith("=== status 1")
        if command == "info":
            assert "The cache keeps no partial or damaged file" in errors[0]
        else:
            assert f"nothing was written to {tmp_path / f'folder-{fault}'}" in errors[0]
    assert len(outputs) == 3 * 2 * len(WEIGHTS_FAULTS)
    assert not any((tmp_path / f"folder-{fault}").exists() for fault in WEIGHTS_FAULTS)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left
    blobs = [p for p in (tmp_path / "hf-home" / "hub").rglob("blobs/*")]
    assert blobs and all(len(p.name) != 64 or sha256_file(p) == p.name for p in blobs)  # nothing damaged kept
    weights = hashlib.sha256((tiny_biomedclip_dir / "open_clip_pytorch_model.bin").read_bytes()).hexdigest()
    assert not any(p.name == weights for p in blobs)
