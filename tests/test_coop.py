"""CoOp's prompt construction, its equality with zero-shot at initialisation, gradients, schedule."""
from __future__ import annotations

import math

import pytest
import torch

from dpt_lightning import CoOp, ZeroShot
from dpt_lightning.prompts import ContextPrompt, reference_n_ctx
from dpt_lightning.methods.base import dassl_lr_factor

CLASSES = ["glioma tumor", "normal brain", "pituitary tumor"]


def test_context_sits_at_positions_1_to_n_and_starts_as_ctx_init(tiny):
    prompt = ContextPrompt(tiny, CLASSES, "a photo of a {}.")
    assert prompt.n_ctx == 4 == reference_n_ctx("a photo of a {}.")
    init_ids = tiny.tokenize(["a photo of a"])[0, 1:5]
    assert torch.equal(prompt.ctx.data, tiny.token_embedding(init_ids))
    with torch.no_grad():
        prompt.ctx.fill_(3.0)
    embeddings = prompt()
    assert embeddings.shape == (3, prompt.ids.shape[1], tiny.text_width)
    assert torch.equal(embeddings[:, 1:5], torch.full_like(embeddings[:, 1:5], 3.0))
    assert torch.equal(embeddings[:, 0], prompt.embeddings[:, 0])  # [CLS]
    assert torch.equal(embeddings[:, 5:], prompt.embeddings[:, 5:])  # class name, ".", [SEP], padding


def test_class_specific_and_random_context(tiny):
    torch.manual_seed(0)
    prompt = ContextPrompt(tiny, CLASSES, random_init=True, n_ctx=8, class_specific=True)
    assert prompt.ctx.shape == (3, 8, tiny.text_width)
    assert abs(prompt.ctx.std().item() - 0.02) < 0.005
    assert prompt.template == "x x x x x x x x {}."
    assert prompt().shape[1] == prompt.ids.shape[1]


@pytest.mark.parametrize("position", ["front", "middle"])
def test_class_token_positions(tiny, position):
    prompt = ContextPrompt(tiny, ["glioma tumor"], n_ctx=4, position=position)
    with torch.no_grad():
        prompt.ctx.fill_(5.0)
    e = prompt()[0]
    name = prompt.embeddings[0, 5:7]  # "glioma", "tumor"
    if position == "front":
        assert torch.equal(e[1:3], name) and torch.equal(e[3:7], torch.full_like(e[3:7], 5.0))
    else:
        assert torch.equal(e[1:3], torch.full_like(e[1:3], 5.0)) and torch.equal(e[3:5], name)
        assert torch.equal(e[5:7], torch.full_like(e[5:7], 5.0))
    assert torch.equal(e[7:], prompt.embeddings[0, 7:])


def test_n_ctx_larger_than_template_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="n_ctx=9 does not fit"):
        ContextPrompt(tiny, CLASSES, "a photo of a {}.", n_ctx=9)
    with pytest.raises(ValueError, match="exactly one"):
        ContextPrompt(tiny, CLASSES, "a photo of a thing.")


def test_coop_at_initialisation_equals_zero_shot(tiny):
    coop = CoOp(classnames=CLASSES, backbone="tiny").eval()
    zero = ZeroShot(classnames=CLASSES, backbone="tiny").eval()
    images = torch.randn(4, 3, 160, 160)
    torch.testing.assert_close(coop(images), zero(images), atol=1e-5, rtol=1e-5)


def test_only_the_context_gets_gradients(tiny):
    coop = CoOp(classnames=CLASSES, backbone="tiny")
    assert [n for n, p in coop.named_parameters() if p.requires_grad] == ["prompt.ctx"]
    coop.train()
    loss = torch.nn.functional.cross_entropy(coop(torch.randn(2, 3, 160, 160)), torch.tensor([0, 2]))
    loss.backward()
    assert coop.prompt.ctx.grad is not None and coop.prompt.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in coop.backbone.parameters())


def test_evaluation_text_features_are_cached_until_the_context_changes(tiny):
    coop = CoOp(classnames=CLASSES, backbone="tiny").eval()
    calls = []
    original = coop.encode_classes
    coop.encode_classes = lambda: calls.append(1) or original()
    images = torch.randn(2, 3, 160, 160)
    with torch.no_grad():  # evaluation: no gradient wanted (with gradients on, eval mode recomputes them)
        first = coop(images)
        coop(images)
    assert len(calls) == 1
    with torch.no_grad():
        coop.prompt.ctx.add_(0.1)
        assert not torch.equal(coop(images), first)
    assert len(calls) == 2


def test_reference_compute_gives_the_same_logits(tiny):
    fast = CoOp(classnames=CLASSES, backbone="tiny").eval()
    slow = CoOp(classnames=CLASSES, backbone="tiny", reference_compute=True).eval()
    assert slow.prompt.ids.shape[1] == tiny.context_length > fast.prompt.ids.shape[1]
    images = torch.randn(3, 3, 160, 160)
    torch.testing.assert_close(fast(images), slow(images), atol=1e-5, rtol=1e-5)


def test_dassl_schedule():
    """Constant 1e-5 for the warm-up epoch, then cosine over max_epochs restarting at 0."""
    lr, max_epochs = 0.002, 10
    lrs = [lr * dassl_lr_factor(e, max_epochs, 1, 1e-5 / lr) for e in range(max_epochs)]
    assert lrs[0] == pytest.approx(1e-5)
    assert lrs[1] == pytest.approx(lr)
    assert lrs[3] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 2 / max_epochs)))


def test_optimizer_is_sgd_on_the_context_only(tiny):
    coop = CoOp(classnames=CLASSES, backbone="tiny")
    config = coop.configure_optimizers()
    optimizer = config["optimizer"]
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert group["momentum"] == 0.9 and group["weight_decay"] == 5e-4 and not group["nesterov"]
    assert [p for g in optimizer.param_groups for p in g["params"]] == [coop.prompt.ctx]
    assert group["lr"] == pytest.approx(1e-5)  # the warm-up epoch


def test_zero_shot_cannot_fit(tiny):
    with pytest.raises(RuntimeError, match="no trainable parameters"):
        ZeroShot(classnames=CLASSES, backbone="tiny").configure_optimizers()


def test_missing_classnames_is_a_clear_error():
    with pytest.raises(ValueError, match="classnames"):
        CoOp(backbone="tiny")
