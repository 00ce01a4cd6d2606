"""What a method's checkpoint records about the model it belongs to, and the check on loading.

A checkpoint holds the trainable prompt parameters only (the frozen backbone is rebuilt from its
id), plus an identity: method, backbone, class names, protocol and dataset. Loading refuses a
checkpoint of another method, backbone or class list with one message that lists every mismatch.
"""
from __future__ import annotations

from torch import nn

CHECKPOINT_FORMAT = 1
BACKBONE_PREFIX = "backbone."


class CheckpointMismatchError(RuntimeError):
    """A checkpoint that does not belong to this model (other backbone, classes or method)."""


def checkpoint_identity(model) -> dict:
    """What a checkpoint records to refuse loading into a different model."""
    cls = type(model)
    return {"format": CHECKPOINT_FORMAT, "method": cls.__name__, "class_path": f"{cls.__module__}.{cls.__qualname__}",
            "backbone": model.backbone.fingerprint(), "classnames": model.classnames,
            "protocol": model.hparams.protocol, "dataset": model.hparams.dataset}


def drop_frozen_weights(state_dict: dict) -> None:
    """Remove the frozen backbone's tensors from a state dict (in place)."""
    for key in [k for k in state_dict if k.startswith(BACKBONE_PREFIX)]:
        del state_dict[key]


def check_checkpoint(model: nn.Module, checkpoint: dict) -> None:
    """Raise `CheckpointMismatchError` unless ``checkpoint`` fits ``model`` (see module docstring)."""
    identity = checkpoint.get("dpt_lightning")
    if identity is None:
        raise CheckpointMismatchError("this checkpoint was not written by dpt_lightning")
    mine = checkpoint_identity(model)
    problems = []
    if identity["method"] != mine["method"]:
        problems.append(f"method {identity['method']} (this model: {mine['method']})")
    for key in ("text_width", "vision_width", "embed_dim", "vocab_size"):
        if identity["backbone"].get(key) != mine["backbone"].get(key):
            problems.append(f"backbone {key} {identity['backbone'].get(key)} (this model: {mine['backbone'].get(key)})")
    if identity["classnames"] != mine["classnames"] and not (
            identity.get("protocol") == mine["protocol"] == "base2novel"):
        problems.append(f"classes {identity['classnames']} (this model: {mine['classnames']}); only a "
                        "base-to-novel evaluation may load a prompt trained on other classes")
    if problems:
        raise CheckpointMismatchError("checkpoint does not fit this model: " + "; ".join(problems))
    shapes = {name: p.shape for name, p in model.named_parameters() if p.requires_grad}
    state = checkpoint["state_dict"]
    wrong = [f"{k} {tuple(v.shape)} (this model: {tuple(shapes[k])})"
             for k, v in state.items() if k in shapes and v.shape != shapes[k]]
    if wrong:
        raise CheckpointMismatchError("checkpoint parameters have other shapes: " + "; ".join(wrong))
    missing = sorted(set(shapes) - set(state))
    if missing:
        raise CheckpointMismatchError(f"checkpoint lacks trainable parameters {missing}")
