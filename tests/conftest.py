"""Shared fixtures: offline, a private cache folder, the tiny backbone generated once per session."""
from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def dpt_cache(tmp_path_factory):
    """A fresh cache folder for generated models and data, shared by the whole session."""
    folder = os.environ.get("DPT_TEST_CACHE_DIR") or str(tmp_path_factory.mktemp("dpt-cache"))
    os.environ["DPT_CACHE_DIR"] = folder
    return folder


@pytest.fixture(scope="session")
def tiny():
    """The tiny BiomedCLIP-shaped backbone, loaded through open_clip's ``local-dir:`` path."""
    from dpt_lightning.backbone import BiomedCLIP

    return BiomedCLIP("tiny")


@pytest.fixture(scope="session")
def tiny_demo_backbone():
    """Builds the demo's pre-trained tiny backbone (``tiny-demo``) once, in this process, before
    any ``dpt`` subprocess would build it on its own."""
    from dpt_lightning.demo.pretrain import tiny_demo_dir

    return f"local-dir:{tiny_demo_dir()}"
