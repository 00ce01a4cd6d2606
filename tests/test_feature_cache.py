"""The feature store changes no result and never serves stale or foreign features: evaluation and
training views, every eligible method bit for bit, methods that learn in the image path never
served, concurrent writers, the size bound."""
from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from dpt_lightning import (VPT, BiomedCoOp, BiomedDPT, CLIPAdapter, CoCoOp, CoOp, DemoDataModule, KgCoOp,
                           LPPlusPlus, MaPLe, ProGrad, TipAdapterF, ZeroShot)
from dpt_lightning.features import FeatureStore, enforce_limit, store_size, weights_digest

SIZE = 160


def _test(model, datamodule):
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False)
    return trainer.test(model, datamodule=datamodule, verbose=False)[0]


def _count_image_encodings(model):
    calls = []
    original = model.encode_images
    model.encode_images = lambda images: calls.append(len(images)) or original(images)
    original_pool = model.pool_images
    model.pool_images = lambda images: calls.append(len(images)) or original_pool(images)
    return calls


@pytest.fixture
def store_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DPT_CACHE_DIR", str(tmp_path))
    return tmp_path / "features"


def test_cached_evaluation_equals_plain_and_skips_the_image_tower(store_dir):
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


def test_a_changed_file_backbone_or_view_is_never_served_stale(tmp_path, tiny):
    image = tmp_path / "a.png"
    image.write_bytes(b"first")
    store = FeatureStore(weights_digest(tiny), "plain", root=tmp_path / "store")
    store.put(str(image), "g1:eval", torch.ones(3))
    store.flush()
    reloaded = FeatureStore(weights_digest(tiny), "plain", root=tmp_path / "store")
    assert torch.equal(reloaded.get(str(image), "g1:eval"), torch.ones(3))
    assert reloaded.get(str(image), "g1:0:0") is None and reloaded.get(str(image), "g2:eval") is None
    assert reloaded.get(str(image), "") is None  # a view that cannot be reproduced is never stored
    time.sleep(0.01)
    image.write_bytes(b"other")
    os.utime(image, ns=(time.time_ns(), time.time_ns()))
    assert reloaded.get(str(image), "g1:eval") is None
    for digest, key in [("other weights", "plain"), (weights_digest(tiny), "zero-tokens")]:
        assert FeatureStore(digest, key, root=tmp_path / "store").folder != store.folder


def test_weights_digest_sees_any_weight_change():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert weights_digest(a) == weights_digest(b)
    c = torch.nn.Linear(3, 2)
    c.load_state_dict(a.state_dict())
    with torch.no_grad():
        c.weight[0, 0] += 1e-6
    assert weights_digest(c) != weights_digest(a)


def test_views_name_the_transform_the_folder_the_seed_and_the_augmentation(tmp_path):
    data = DemoDataModule(num_shots=2, num_workers=0, seed=3)
    data.setup("fit")
    train = next(iter(data.train_dataloader()))
    test = next(iter(data.test_dataloader()))
    groups = {v.split(":")[0] for v in train["view"]}
    assert len(groups) == 1 and all(v.count(":") == 2 for v in train["view"])
    assert all(v.endswith(":eval") for v in test["view"]) and {v.split(":")[0] for v in test["view"]} != groups
    other_seed = DemoDataModule(num_shots=2, num_workers=0, seed=4)
    other_seed.setup("fit")
    assert {v.split(":")[0] for v in next(iter(other_seed.train_dataloader()))["view"]} != groups


# ------------------------------------------------------------------------- training views
#: The text-side methods of the grid (and Biomed-DPT on its own key): each fitted with the store off,
#: then on, with the store already filled by other methods at other batch sizes.
ELIGIBLE = [CoOp, CoCoOp, KgCoOp, ProGrad, BiomedCoOp, BiomedDPT, LPPlusPlus, CLIPAdapter, TipAdapterF]


def _fit(cls, store: bool, batch_size: int, epochs: int = 2, prefilled: bool = True) -> tuple[dict, list]:
    seed_everything(1)
    data = DemoDataModule(num_shots=2, batch_size=batch_size, num_workers=0, seed=1)
    model = cls(classnames=data.classnames, backbone="tiny", dataset="demo", cache_train_features=store,
                cache_eval_features=store)
    if hasattr(model, "fit_features"):  # the frozen-feature heads read their training views themselves
        return _fit_head(model, data, epochs, prefilled)
    losses = []
    trainer = Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0)
    original = model.compute_loss
    model.compute_loss = lambda *a: (lambda out: losses.append(out["loss"].item()) or out)(original(*a))
    trainer.fit(model, datamodule=data)
    learned = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    _check_served(model, store, prefilled)
    return learned, losses


def _check_served(model, store: bool, prefilled: bool) -> None:
    """With the store on, the run read views that earlier runs stored; off, it never opened one."""
    stores = list(model._feature_stores.values())
    if store and prefilled:
        assert sum(s.hits for s in stores) > 0, type(model).__name__
    elif not store:
        assert not stores


def _fit_head(model, data, epochs: int, prefilled: bool) -> tuple[dict, list]:
    trainer = Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=data)
    learned = {n: t.detach().clone() for n, t in model.state_dict().items() if not n.startswith("backbone.")}
    _check_served(model, model.hparams.cache_train_features, prefilled)
    return learned, [float(trainer.callback_metrics.get("train_loss", float("nan")))]


@pytest.mark.slow
def test_every_eligible_method_trains_bit_for_bit_the_same_with_the_store(store_dir):
    _fit(CoOp, store=True, batch_size=3, prefilled=False)  # fills the store with batches of another size
    _fit(KgCoOp, store=True, batch_size=5)
    _fit(BiomedDPT, store=True, batch_size=3, prefilled=False)  # its zero tokens: a store of its own
    _fit(LPPlusPlus, store=True, batch_size=3, prefilled=False)  # the heads' own views (their own augmentation)
    for cls in ELIGIBLE:
        off, losses_off = _fit(cls, store=False, batch_size=4)
        on, losses_on = _fit(cls, store=True, batch_size=4)
        assert losses_on == losses_off, cls.__name__
        assert off.keys() == on.keys() and off
        for name in off:
            assert torch.equal(off[name], on[name]), f"{cls.__name__}.{name}"
    size, shards = store_size(store_dir)
    assert shards and size > 0


def test_the_store_serves_the_views_it_has_and_pools_only_the_others(store_dir):
    data = DemoDataModule(num_shots=2, batch_size=4, num_workers=0, seed=1)
    model = CoOp(classnames=data.classnames, backbone="tiny", cache_train_features=True).train()
    data.use_transforms(model.backbone.train_transform(), model.backbone.test_transform())
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    model.backbone.eval()
    calls = _count_image_encodings(model)
    first = model.image_features(batch)
    assert calls == [4]
    again = model.image_features(batch)
    half = {k: v[:2] if k != "label" else v[:2] for k, v in batch.items()}
    model.image_features(half)
    assert calls == [4] and torch.equal(first, again)
    assert torch.equal(first, model.encode_images(batch["image"]))  # the same numbers as the tower
    gradient_free = CoOp(classnames=data.classnames, backbone="tiny", cache_train_features=False).train()
    assert gradient_free.feature_store() is None


@pytest.mark.parametrize("cls", [VPT, MaPLe])
def test_methods_that_learn_in_the_image_path_are_never_served(cls, store_dir):
    model = cls(classnames=["circle", "cross"], backbone="tiny", cache_train_features=True, cache_eval_features=True)
    for mode in (model.train, model.eval):
        mode()
        assert model.feature_store() is None


def test_biomed_dpt_has_its_own_store(store_dir):
    classes = ["circle", "cross"]
    coop = CoOp(classnames=classes, backbone="tiny", cache_eval_features=True).eval()
    dpt = BiomedDPT(classnames=classes, backbone="tiny", dataset="demo", cache_eval_features=True).eval()
    assert coop.feature_store().folder != dpt.feature_store().folder


# ----------------------------------------------------------------------- concurrency, size
def _writer(root: str, digest: str, path: str, values: list[float], barrier) -> None:
    store = FeatureStore(digest, "plain", root=root)
    barrier.wait()
    for i, value in enumerate(values):
        store.put(path, f"g:0:{i}", torch.full((4,), value))
    store.flush()


def test_two_concurrent_writers_of_the_same_keys_leave_a_consistent_store(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(b"x")
    values = [float(i) for i in range(200)]
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    workers = [context.Process(target=_writer, args=(str(tmp_path / "s"), "d", str(image), values, barrier))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    store = FeatureStore("d", "plain", root=tmp_path / "s")
    for i, value in enumerate(values):
        assert torch.equal(store.get(str(image), f"g:0:{i}"), torch.full((4,), value))
    files = list((tmp_path / "s").rglob("*"))
    assert not [f for f in files if f.name.endswith(".tmp")]  # no partial shard left behind
    assert len([f for f in files if f.suffix == ".pt"]) == 2


def test_the_store_stays_within_its_bound(tmp_path, monkeypatch):
    image = tmp_path / "a.png"
    image.write_bytes(b"x")
    for group in ("old", "mid", "new"):
        store = FeatureStore("d", "plain", root=tmp_path / "s")
        store.put(str(image), f"{group}:eval", torch.zeros(10_000))
        store.flush()
        time.sleep(0.01)
    size, shards = store_size(tmp_path / "s")
    assert shards == 3
    with pytest.warns(UserWarning, match="removed .* of the oldest features"):
        enforce_limit(tmp_path / "s", limit=size - 1)
    remaining = sorted(p.name.split("-")[0] for p in Path(tmp_path / "s").rglob("*.pt"))
    assert remaining == ["mid", "new"]
    monkeypatch.setenv("DPT_FEATURE_STORE_GB", "lots")
    with pytest.raises(ValueError, match="DPT_FEATURE_STORE_GB"):
        enforce_limit(tmp_path / "s")
