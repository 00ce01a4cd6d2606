"""What makes loading a backbone cheap, and that it changes nothing: the skipped random
initialisation gives the same model, bit for bit, for each tower family; a load draws nothing from
the caller's random generator; a kept model is served as independent copies and is loaded anew when
its folder changes."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

from dpt_lightning.backbone import loading
from dpt_lightning.backbone.loading import SkipRandomInit, forget_loaded_model, keep_loaded_model, load_open_clip
from dpt_lightning.demo.models import tiny_model_dir


def tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and every buffer, persistent or not."""
    return {**dict(model.named_parameters()), **{f"buffer:{k}": v for k, v in model.named_buffers()}}


@pytest.mark.parametrize("name", ["tiny", "tiny-clip", "resnet"])  # resnet: tests/conftest.py
def test_skipping_the_random_init_loads_the_same_model(name, resnet, monkeypatch):
    name = resnet if name == "resnet" else name
    skipped = tensors(load_open_clip(name)[0])
    monkeypatch.setattr(loading, "SkipRandomInit", contextlib.nullcontext)
    initialised = tensors(load_open_clip(name)[0])
    assert skipped.keys() == initialised.keys()
    assert [k for k in skipped if not torch.equal(skipped[k], initialised[k])] == []


def test_skip_random_init_zeroes_what_it_skips_and_nothing_else():
    with SkipRandomInit():
        linear = torch.nn.Linear(8, 4)
        mask = torch.full((3, 3), float("-inf")).triu_(1)
        embedding = torch.nn.Embedding(5, 2)
        positions = torch.arange(6)
    assert not linear.weight.any() and not linear.bias.any() and not embedding.weight.any()
    assert torch.equal(mask, torch.full((3, 3), float("-inf")).triu_(1)) and torch.equal(positions, torch.arange(6))
    assert torch.nn.Linear(8, 4).weight.any()  # outside the mode, initialisation is as usual


def test_a_load_draws_nothing_from_the_callers_generator():
    torch.manual_seed(3)
    load_open_clip("tiny")
    after_load = torch.rand(5)
    torch.manual_seed(3)
    assert torch.equal(after_load, torch.rand(5))


def test_a_kept_model_is_served_as_copies_and_reloaded_when_its_folder_changes(monkeypatch):
    forget_loaded_model()
    loads = []
    real_load = loading._load
    monkeypatch.setattr(loading, "_load", lambda *a: loads.append(a[0]) or real_load(*a))
    fresh = tensors(load_open_clip("tiny")[0])
    with keep_loaded_model():
        first, tokenizer, cfg = load_open_clip("tiny")
        with torch.no_grad():
            next(first.parameters()).add_(1.0)  # what a run does to its own copy
        cfg["mean"] = None
        second, second_tokenizer, second_cfg = load_open_clip("tiny")
    assert len(loads) == 2  # the fresh load and the first kept one; the second is a copy
    assert second is not first and second_tokenizer is tokenizer and second_cfg["mean"] is not None
    served = tensors(second)
    assert all(torch.equal(served[k], fresh[k]) for k in fresh)
    assert next(first.parameters()).data_ptr() != next(second.parameters()).data_ptr()

    load_open_clip("tiny")  # outside the context: a plain load
    assert len(loads) == 3
    weights = next(f for f in tiny_model_dir().iterdir() if f.suffix in loading.WEIGHT_SUFFIXES)
    stat = weights.stat()
    with keep_loaded_model():
        load_open_clip("tiny")
        assert len(loads) == 3  # still kept
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        try:
            load_open_clip("tiny")
        finally:
            os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert len(loads) == 4  # the folder changed: loaded anew
