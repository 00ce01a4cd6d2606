"""The evaluation feature cache changes no result and never serves stale features."""
from __future__ import annotations

import os
import time

import torch
from lightning.pytorch import Trainer

from dpt_lightning import CoOp, DemoDataModule, ZeroShot
from dpt_lightning.feature_cache import EvalFeatureCache, weights_digest


def _test(model, datamodule):
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False)
    return trainer.test(model, datamodule=datamodule, verbose=False)[0]


def _count_image_encodings(model):
    calls = []
    original = model.encode_images
    model.encode_images = lambda images: calls.append(len(images)) or original(images)
    return calls


def test_cached_evaluation_equals_plain_and_skips_the_image_tower(tmp_path, monkeypatch):
    monkeypatch.setenv("DPT_CACHE_DIR", str(tmp_path))
    data = DemoDataModule(num_shots=2, num_workers=0, test_batch_size=16)
    classes = data.classnames
    plain = _test(CoOp(classnames=classes, backbone="tiny"), data)

    first = CoOp(classnames=classes, backbone="tiny", cache_eval_features=True)
    first_calls = _count_image_encodings(first)
    assert _test(first, data) == plain
    assert sum(first_calls) == 48

    second = ZeroShot(classnames=classes, backbone="tiny", cache_eval_features=True)  # same image path
    second_calls = _count_image_encodings(second)
    zero_plain = _test(ZeroShot(classnames=classes, backbone="tiny"), data)
    assert _test(second, data) == zero_plain
    assert sum(second_calls) == 0


def test_a_changed_file_or_backbone_is_never_served_stale(tmp_path, tiny):
    image = tmp_path / "a.png"
    image.write_bytes(b"first")
    cache = EvalFeatureCache(tmp_path / "cache", weights_digest(tiny), "plain", "transform")
    cache.put(str(image), torch.ones(3))
    cache.flush()
    reloaded = EvalFeatureCache(tmp_path / "cache", weights_digest(tiny), "plain", "transform")
    assert torch.equal(reloaded.get(str(image)), torch.ones(3))
    time.sleep(0.01)
    image.write_bytes(b"other")
    os.utime(image, ns=(time.time_ns(), time.time_ns()))
    assert reloaded.get(str(image)) is None
    for other in [("plain", "other transform"), ("zero tokens", "transform")]:
        assert EvalFeatureCache(tmp_path / "cache", weights_digest(tiny), *other).file != cache.file


def test_weights_digest_sees_any_weight_change():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert weights_digest(a) == weights_digest(b)
    c = torch.nn.Linear(3, 2)
    c.load_state_dict(a.state_dict())
    with torch.no_grad():
        c.weight[0, 0] += 1e-6
    assert weights_digest(c) != weights_digest(a)
