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


#: A tiny open_clip ModifiedResNet (RN50's layout at width 8, 64 px) with a 2-layer text transformer.
RESNET_RECIPE = {
    "model_cfg": {"embed_dim": 32,
                  "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}},
    "seed": 0,
}


@pytest.fixture(scope="session")
def resnet(tmp_path_factory) -> str:
    """A ``local-dir:`` backbone with open_clip's ResNet image tower (`RESNET_RECIPE`)."""
    from dpt_lightning.demo.models import write_clip_dir

    folder = tmp_path_factory.mktemp("tiny-rn")
    write_clip_dir(folder, RESNET_RECIPE)
    return f"local-dir:{folder}"


@pytest.fixture(scope="session")
def tiny_demo_backbone():
    """Builds the demo's pre-trained tiny backbone (``tiny-demo``) once, in this process, before
    any ``dpt`` subprocess would build it on its own."""
    from dpt_lightning.demo.pretrain import tiny_demo_dir

    return f"local-dir:{tiny_demo_dir()}"


#: Shorter searches for the frozen-feature heads where a search dominates a cell's time in a test
#: run (one C for the linear probe, 20 x 20 Tip-Adapter points, 2 candidate alphas for Tip-Adapter-F).
QUICK_SEARCH = {"linear_probe": ["--model.init_args.c_grid=[1.0]", "--model.init_args.bisection_steps=0"],
                "tip_adapter": ["--model.init_args.search_step=[20, 20]"],
                "tip_adapter_f": ["--model.init_args.search_step=[20, 20]", "--model.init_args.init_alpha_scale=2"]}


# ------------------------------------------------------------------------- the loopback hub (tests/hub.py)
@pytest.fixture
def loopback_hub():
    """A Hugging Face hub on 127.0.0.1 (`hub.LoopbackHub`), empty; shut down after the test (and
    after 10 minutes in any case). Processes reach it with ``env=hub.env(hf_home)``: conftest sets
    HF_HUB_OFFLINE=1 for this process, so a subprocess's environment must say otherwise."""
    from hub import LoopbackHub

    with LoopbackHub(lifetime=600) as hub:
        yield hub


@pytest.fixture(scope="session")
def tiny_biomedclip_dir(tmp_path_factory):
    """The BiomedCLIP-shaped tiny model that the loopback hub serves under the real repository ids."""
    from hub import tiny_biomedclip

    return tiny_biomedclip(tmp_path_factory.mktemp("loopback-biomedclip"))
