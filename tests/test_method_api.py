"""The method API: instance-conditioned class features, the input-space and image-path hooks, the
evaluation caches that can never serve stale features, and the shared helpers a method builds on."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpt_lightning.methods
from dpt_lightning import VPT, BiomedCoOp, BiomedDPT, CoOp, MaPLe, PromptTrainer, TipAdapter, ZeroShot
from dpt_lightning.prompts import ContextPrompt

CLASSES = ["circle", "cross", "square"]
SIZE = 160


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


class MetaCoOp(CoOp):
    """CoCoOp's shape: a per-image shift of the context from the image feature."""

    instance_conditioned = True

    def configure_prompts(self) -> None:
        super().configure_prompts()
        self.meta = nn.Linear(self.backbone.embed_dim, self.backbone.text_width)
        nn.init.zeros_(self.meta.weight)
        nn.init.zeros_(self.meta.bias)

    def encode_classes(self, image_features=None):
        return self.encode_prompt_embeddings(self.prompt(self.meta(image_features)), self.prompt.attention_mask)


class PixelShift(CoOp):
    """An input-space prompt: a learnable offset added to every pixel."""

    def configure_prompts(self) -> None:
        super().configure_prompts()
        self.offset = nn.Parameter(torch.zeros(3, 1, 1))

    def transform_images(self, images):
        return images + self.offset


def build(cls, **kwargs):
    torch.manual_seed(0)
    return cls(classnames=CLASSES, backbone="tiny", dataset="demo", **kwargs)


# ------------------------------------------------------------------ instance-conditioned features
@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_context_shift_moves_every_context_vector_and_nothing_else(tiny, position):
    prompt = ContextPrompt(tiny, CLASSES, n_ctx=4, position=position)
    plain = prompt()
    assert torch.equal(prompt(torch.zeros(2, tiny.text_width)), plain.expand(2, *plain.shape))
    shift = torch.randn(2, tiny.text_width)
    with torch.no_grad():
        moved = prompt(shift) - plain
        reference = prompt.ctx.clone()
        prompt.ctx.add_(1.0)  # where do the context vectors sit for this position?
        at_ctx = (prompt() != plain).all(-1)
        prompt.ctx.copy_(reference)
    assert at_ctx.sum() == len(CLASSES) * 4
    for b in range(2):
        torch.testing.assert_close(moved[b][at_ctx], shift[b].expand(int(at_ctx.sum()), -1), rtol=0, atol=1e-6)
        assert torch.equal(moved[b][~at_ctx], torch.zeros_like(moved[b][~at_ctx]))


def test_per_image_logits_are_each_images_own_classifier(tiny):
    model = build(CoOp)
    f = torch.nn.functional.normalize(torch.randn(4, tiny.embed_dim), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(4, len(CLASSES), tiny.embed_dim), dim=-1)
    expected = torch.stack([model.logits(f[b:b + 1], t[b])[0] for b in range(4)])
    torch.testing.assert_close(model.logits(f, t), expected, rtol=1e-6, atol=1e-5)


def test_encode_prompt_embeddings_flattens_any_leading_shape(tiny):
    model = build(CoOp).eval()
    shift = torch.randn(2, tiny.text_width)
    with torch.no_grad():
        batched = model.encode_prompt_embeddings(model.prompt(shift), model.prompt.attention_mask)
        one_by_one = [model.encode_prompt_embeddings(model.prompt(shift[b:b + 1])[0], model.prompt.attention_mask)
                      for b in range(2)]
    assert batched.shape == (2, len(CLASSES), tiny.embed_dim)
    for b in range(2):
        torch.testing.assert_close(batched[b], one_by_one[b], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(2, len(CLASSES)))


def test_instance_conditioned_method_with_a_zero_shift_equals_coop_and_learns_both_parts():
    coop, meta = build(CoOp), build(MetaCoOp)
    meta.load_state_dict(coop.state_dict(), strict=False)
    x = images(3)
    for mode in ("eval", "train"):
        getattr(coop, mode)()
        getattr(meta, mode)()
        if mode == "train":
            for module in (coop, meta):
                module.backbone.eval()  # no dropout: the two forwards must see the same network
        with torch.set_grad_enabled(mode == "train"):
            torch.testing.assert_close(meta(x), coop(x), rtol=1e-5, atol=1e-5)
    text = meta.text_features(meta.encode_images(x))
    assert text.shape == (3, len(CLASSES), meta.backbone.embed_dim)
    loss = meta.compute_loss(meta(x), torch.tensor([0, 1, 2]), None, None)["loss"]
    loss.backward()
    assert meta.prompt.ctx.grad.abs().sum() > 0 and meta.meta.bias.grad.abs().sum() > 0
    assert meta.meta.weight.grad.abs().sum() > 0  # the image feature reaches the shift


def test_instance_conditioned_evaluation_never_uses_the_class_cache():
    meta = build(MetaCoOp).eval()
    calls = []
    original = meta.encode_classes
    meta.encode_classes = lambda image_features=None: calls.append(len(image_features)) or original(image_features)
    with torch.no_grad():
        meta.evaluation_logits({"image": images(2), "path": ["a", "b"], "label": torch.tensor([0, 1])})
        meta.evaluation_logits({"image": images(3, 1), "path": ["c", "d", "e"], "label": torch.tensor([0, 1, 2])})
    assert calls == [2, 3]


# ---------------------------------------------------------------------------- gradients in eval mode
BUILT_IN = sorted((cls for cls in map(dpt_lightning.methods.__dict__.get, dpt_lightning.methods.__all__)
                   if isinstance(cls, type) and issubclass(cls, PromptTrainer) and cls is not PromptTrainer),
                  key=lambda cls: cls.__name__)


def loss_gradients(model, x, labels) -> dict[str, torch.Tensor]:
    """The gradients of the method's own training loss on a batch (without Lightning)."""
    features = model.encode_images(x)
    text = model.text_features(features)
    loss = model.compute_loss(model.logits(features, text), labels, features, text)["loss"]
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {n: g for n, g in zip(names, grads) if g is not None}


@pytest.mark.parametrize("cls", BUILT_IN, ids=lambda cls: cls.__name__)
def test_a_backward_in_eval_mode_gives_the_training_gradients(cls):
    """Issue 21.6: with gradients on, eval mode (dropout off) must not serve the no-grad class-feature
    cache: the loss of every built-in method that learns by gradient has the same gradients as in
    train mode with the backbone's dropout off (CoOp's loss had no graph at all; MaPLe's context lost
    its text-side gradient)."""
    model = build(cls)
    if not [p for p in model.parameters() if p.requires_grad]:
        assert cls in (ZeroShot, TipAdapter)  # nothing learns by gradient
        return
    if "cache_keys" in getattr(cls, "data_shaped", ()):  # Tip-Adapter-F: a cache to train
        model.cache_keys.data = F.normalize(torch.randn(6, model.backbone.embed_dim,
                                                        generator=torch.Generator().manual_seed(1)), dim=-1)
        model.cache_labels = torch.arange(6) % len(CLASSES)
    x, labels = images(3), torch.tensor([0, 1, 2])
    model.train()
    model.backbone.train(False)  # the backbone's dropout off: both passes see the same network
    trained = loss_gradients(model, x, labels)
    model.eval()
    evaluated = loss_gradients(model, x, labels)
    assert trained and evaluated.keys() == trained.keys()
    for name, grad in trained.items():
        torch.testing.assert_close(evaluated[name], grad, rtol=0, atol=0, msg=name)
    if not model.instance_conditioned:
        with torch.no_grad():  # no gradient wanted: the evaluation cache serves the class features again
            features = model.encode_images(x)
            assert model.text_features(features) is model.text_features(features)


# --------------------------------------------------------------------------------- stale caches
@pytest.mark.parametrize("change", ["data", "load_state_dict", "optimizer"])
def test_class_text_cache_is_never_stale(change):
    model = build(CoOp).eval()
    x = images(2)
    with torch.no_grad():
        before = model(x)
        new = model.prompt.ctx.detach() + 0.5
        if change == "data":
            model.prompt.ctx.data.copy_(new)  # keeps the parameter's version counter
        elif change == "load_state_dict":
            model.load_state_dict({"prompt.ctx": new}, strict=False)
        else:
            model.prompt.ctx.add_(0.5)
        after = model(x)
    fresh = build(CoOp).eval()
    with torch.no_grad():
        fresh.prompt.ctx.copy_(new)
        torch.testing.assert_close(after, fresh(x), rtol=0, atol=0)
    assert not torch.equal(after, before)


def test_image_path_key_is_derived_safely():
    assert build(CoOp).image_path_key() == "plain" == build(ZeroShot).image_path_key()
    assert build(BiomedCoOp).image_path_key() == "plain"
    assert build(PixelShift).image_path_key() is None  # changed the input: never served plain features
    assert build(VPT).image_path_key() is None and build(MaPLe).image_path_key() is None
    assert build(BiomedDPT).image_path_key().startswith("zero-tokens:replace:4x")
    assert build(BiomedDPT, vision_prompt="off").image_path_key() == "plain"


def test_an_input_space_prompt_is_never_served_cached_plain_features(tmp_path, monkeypatch):
    monkeypatch.setenv("DPT_CACHE_DIR", str(tmp_path))
    batch = {"image": images(2), "path": [str(tmp_path / "a.png"), str(tmp_path / "b.png")],
             "view": ["g:eval", "g:eval"]}
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"x")
    plain = build(CoOp, cache_eval_features=True).eval()
    with torch.no_grad():
        plain.evaluation_logits(batch)
    plain._flush_features()
    assert list((tmp_path / "features").glob("*/*.pt"))  # the plain features are on disk now
    pixel = build(PixelShift, cache_eval_features=True).eval()
    with torch.no_grad():
        pixel.offset.fill_(0.3)
        served = pixel.evaluation_logits(batch)
        assert torch.equal(served, pixel(batch["image"]))
    assert pixel.feature_store() is None


def test_input_space_hook_gets_gradients_and_changes_the_features():
    model = build(PixelShift)
    model.on_train_epoch_start()
    x = images(2)
    loss = model.compute_loss(model(x), torch.tensor([0, 1]), None, None)["loss"]
    loss.backward()
    assert model.offset.grad.abs().sum() > 0
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"prompt.ctx", "offset"}


# ---------------------------------------------------------------------------------- helpers
def test_frozen_class_features_are_zero_shots(tiny):
    coop = build(CoOp)
    torch.testing.assert_close(coop.frozen_class_features("a photo of a {}."), build(ZeroShot).class_features,
                               rtol=0, atol=0)
    ensemble = coop.frozen_class_features(descriptions="demo")
    torch.testing.assert_close(ensemble, build(ZeroShot, descriptions="demo").class_features, rtol=0, atol=0)
    assert not ensemble.requires_grad


def test_learns_declarations():
    assert ZeroShot.learns is False
    assert all(cls.learns for cls in (CoOp, VPT, MaPLe, BiomedCoOp, BiomedDPT, PromptTrainer))


def test_teacher_takes_the_first_min_count_sentences_of_an_uneven_bank(tmp_path, tiny):
    """Issue 15.12: Biomed-DPT's teacher uses each class's first n sentences, n = the smallest count
    (the reference rule, as BiomedCoOp), not every sentence of the longer classes."""
    bank = {"circle": ["a red circle", "a round circle", "a circle"],
            "cross": ["a cross", "a yellow cross", "a bright cross", "a cross with lines", "cross"],
            "square": ["a square", "green square", "a sharp square", "square"]}
    path = tmp_path / "uneven.json"
    path.write_text(json.dumps(bank))
    dpt = build(BiomedDPT, descriptions=str(path))
    coop = build(BiomedCoOp, descriptions=str(path))
    assert dpt.teacher_sentences == coop.teacher_sentences == [group[:3] for group in bank.values()]
    hand = torch.stack([torch.nn.functional.normalize(tiny.encode_sentences(group[:3]).mean(0), dim=0)
                        for group in bank.values()])
    torch.testing.assert_close(dpt.teacher_text_features(), hand, rtol=0, atol=1e-6)
    every = torch.stack([torch.nn.functional.normalize(tiny.encode_sentences(group).mean(0), dim=0)
                         for group in bank.values()])
    assert not torch.allclose(dpt.teacher_text_features(), every, atol=1e-4)
    assert build(BiomedDPT, descriptions=str(path), n_prompts=2).teacher_sentences == [g[:2] for g in bank.values()]
    with pytest.raises(ValueError, match="n_prompts=4.*circle"):
        build(BiomedDPT, descriptions=str(path), n_prompts=4)
