"""Every speed-up is exact: the reference-style computation (``reference_compute=True``: prompts
padded to the tokenizer's full context, class text features recomputed for every evaluation batch)
gives the same training loss, the same gradients and the same evaluation logits as the shipped path,
for every method. The other speed-ups have their own equality tests: the evaluation feature cache
(test_feature_cache), the teacher encoded once per fit (test_biomed_dpt), checkpoints without the
backbone (test_cli, test_checkpoints)."""
from __future__ import annotations

import pytest
import torch

from dpt_lightning import CoOp, MaPLe, VPT, BiomedCoOp, BiomedDPT

DEMO = ["circle", "cross", "square", "stripes"]
METHODS = [CoOp, VPT, MaPLe, BiomedCoOp, BiomedDPT]


def pair(method):
    """The shipped module and its reference-style twin with identical parameters. BERT dropout is
    off in both, so that the random masks (whose shape follows the padded length) cannot differ."""
    torch.manual_seed(0)
    fast = method(classnames=DEMO, dataset="demo", backbone="tiny", backbone_dropout=False)
    slow = method(classnames=DEMO, dataset="demo", backbone="tiny", backbone_dropout=False, reference_compute=True)
    slow.load_state_dict(fast.state_dict(), strict=False)
    learnable = {name: p for name, p in slow.named_parameters() if p.requires_grad}
    assert learnable and all(torch.equal(p, fast.get_parameter(name)) for name, p in learnable.items())
    for module in (fast, slow):
        module.on_fit_start()  # the teachers of Biomed-DPT / BiomedCoOp
    return fast, slow


def batch(n: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, 160, 160, generator=g), "label": torch.tensor([0, 1, 2, 3][:n]),
            "path": [f"/nowhere/{i}.png" for i in range(n)]}


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.__name__)
def test_reference_compute_changes_no_loss_gradient_or_logit(method, tiny):
    fast, slow = pair(method)
    assert slow.tokenize(["a photo of a circle."]).shape[1] == tiny.context_length
    assert fast.tokenize(["a photo of a circle."]).shape[1] < tiny.context_length
    train = batch()
    losses, grads = [], []
    for module in (fast, slow):
        module.on_train_epoch_start()  # train mode; the backbone stays in eval (dropout off)
        loss = module.training_step(train, 0)
        loss.backward()
        losses.append(loss.detach())
        grads.append({name: p.grad.clone() for name, p in module.named_parameters() if p.requires_grad})
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)

    for module in (fast, slow):
        module.eval()
    with torch.no_grad():
        for seed in (1, 2):  # two evaluation batches: the second is served from the text cache
            test = batch(seed=seed)
            torch.testing.assert_close(fast.evaluation_logits(test), slow.evaluation_logits(test),
                                       atol=1e-5, rtol=1e-5)
