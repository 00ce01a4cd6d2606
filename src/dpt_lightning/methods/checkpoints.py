"""What a method's checkpoint records about the model it belongs to, and the check on loading.

A checkpoint holds the trainable parameters only (the frozen backbone is rebuilt from its id),
the method's settings (under ``method_settings``) and an identity: method, backbone (its
architecture and a digest of its frozen weights), class names, protocol and dataset. The model
is always defined by the user's config and command line; loading a checkpoint refuses, with one
message listing every mismatch, a checkpoint of another method, backbone or class list, and any
tensor that is not the method's own (a checkpoint cannot replace frozen backbone weights). A
checkpoint whose tensors hold NaN or infinite values is refused on reading and on loading; one of
an older format, without the weights digest, only with an explicit opt-in (`check_checkpoint`).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

CHECKPOINT_FORMAT = 2
BACKBONE_PREFIX = "backbone."


class CheckpointMismatchError(RuntimeError):
    """A checkpoint that does not belong to this model (other backbone, classes or method)."""


class CheckpointReadError(ValueError):
    """A file that cannot be read as a checkpoint (missing, truncated, not a checkpoint)."""


def read_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """``torch.load`` with ``weights_only=True`` (a checkpoint cannot run code) and a clear error
    naming the file when it is missing, truncated or not a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointReadError(f"checkpoint {path} does not exist" if not path.exists() else
                                  f"checkpoint {path} is not a file")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated zip, pickle refused, bad magic number, ...
        detail = str(err).split(". ")[0].splitlines()[0][:120] if str(err) else "no detail"
        raise CheckpointReadError(f"checkpoint {path} cannot be read ({type(err).__name__}: {detail}); it is "
                                  "truncated, damaged or not a checkpoint: use another one, e.g. an earlier "
                                  "epoch's") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointReadError(f"{path} is not a Lightning checkpoint (no state_dict)")
    refuse_non_finite(checkpoint["state_dict"], f"checkpoint {path}")
    return checkpoint


def non_finite_tensors(state: Mapping) -> list[str]:
    """Names of the floating-point tensors of ``state`` that hold a NaN or an infinity."""
    return [name for name, value in state.items() if isinstance(value, torch.Tensor) and value.is_floating_point()
            and not bool(torch.isfinite(value).all())]


def refuse_non_finite(state: Mapping, what: str) -> None:
    """A `CheckpointReadError` naming the tensors of ``state`` (the state dict of ``what``, a
    checkpoint or an export) that hold NaN or infinite values: they would be evaluated, silently."""
    bad = non_finite_tensors(state)
    if bad:
        raise CheckpointReadError(f"{what} holds NaN or infinite values in {', '.join(bad[:8])}"
                                  f"{' ...' if len(bad) > 8 else ''}: it is damaged (or comes from a diverged run) "
                                  "and would give meaningless predictions; use another one, e.g. an earlier epoch's")


def checkpoint_identity(model) -> dict:
    """What a checkpoint records to refuse loading into a different model."""
    from dpt_lightning.features import weights_digest

    cls = type(model)
    backbone = {**model.backbone.fingerprint(), "weights_digest": weights_digest(model.backbone)}
    return {"format": CHECKPOINT_FORMAT, "method": cls.__name__, "class_path": f"{cls.__module__}.{cls.__qualname__}",
            "backbone": backbone, "classnames": model.classnames, "protocol": model.hparams.protocol,
            "dataset": model.hparams.dataset}


def new_classes_scored(model) -> bool:
    """Can ``model``'s learned parameters score classes other than those they were trained on? The
    class's ``scores_new_classes``; CoOp-style prompts also need a context shared by all classes."""
    prompt = getattr(model, "prompt", None)
    return bool(getattr(model, "scores_new_classes", True)) and not getattr(prompt, "class_specific", False)


def drop_frozen_weights(state_dict: dict) -> None:
    """Remove the frozen backbone's tensors from a state dict (in place)."""
    for key in [k for k in state_dict if k.startswith(BACKBONE_PREFIX)]:
        del state_dict[key]


def unverified_backbone(identity: dict) -> str | None:
    """Why a checkpoint's identity cannot show which backbone weights it was trained on (written
    before format 2, which added the weights digest, or without the digest), or None."""
    fmt = identity.get("format")
    if not isinstance(fmt, int) or fmt < CHECKPOINT_FORMAT:
        return f"it was written by an older dpt_lightning (checkpoint format {fmt or 1}, this one writes " \
               f"{CHECKPOINT_FORMAT}) and records no digest of its backbone's weights"
    if not identity.get("backbone", {}).get("weights_digest"):
        return "it records no digest of its backbone's weights"
    return None


def check_checkpoint(model: nn.Module, checkpoint: dict) -> None:
    """Raise `CheckpointMismatchError` unless ``checkpoint`` fits ``model`` (see module docstring).

    A checkpoint of a newer format is refused; one that cannot show its backbone's weights (an
    older format, no digest: `unverified_backbone`) is refused unless ``model.allow_unverified_backbone``
    is set (the command's ``--allow_unverified_backbone true``): only the widths are then compared."""
    identity = checkpoint.get("dpt_lightning")
    if identity is None:
        raise CheckpointMismatchError("this checkpoint was not written by dpt_lightning")
    fmt = identity.get("format")
    if isinstance(fmt, int) and fmt > CHECKPOINT_FORMAT:
        raise CheckpointMismatchError(f"this checkpoint has format {fmt}, written by a newer dpt_lightning (this one "
                                      f"reads formats up to {CHECKPOINT_FORMAT}): upgrade dpt_lightning to load it")
    unverified = unverified_backbone(identity)
    if unverified and not getattr(model, "allow_unverified_backbone", False):
        raise CheckpointMismatchError(
            f"this checkpoint cannot be verified against the backbone: {unverified}, so any backbone of the same "
            f"widths would be accepted (this model: {model.backbone.name!r}). If you know it was trained on this "
            "backbone, load it with --allow_unverified_backbone true (Python: model.allow_unverified_backbone = "
            "True, or load_exported(..., allow_unverified_backbone=True)); better, train it again")
    refuse_non_finite(checkpoint["state_dict"], "the checkpoint")
    mine = checkpoint_identity(model)
    problems = []
    if identity["method"] != mine["method"]:
        problems.append(f"method {identity['method']} (this model: {mine['method']}); use the config of the "
                        f"method the checkpoint was trained with")
    theirs, ours = identity["backbone"], mine["backbone"]
    towers = [key for key in ("text_tower", "image_tower") if key in theirs and theirs[key] != ours.get(key)]
    if towers:  # (a checkpoint without the tower families: its widths and weights digest are checked below)
        problems.append(f"backbone {theirs.get('name')!r} with a {theirs.get('text_tower')} text tower and a "
                        f"{theirs.get('image_tower')} image tower (this model: {ours.get('name')!r} with "
                        f"{ours.get('text_tower')} + {ours.get('image_tower')}); load it with the backbone it was "
                        f"trained on: --model.init_args.backbone={theirs.get('name')}")
    for key in ("text_width", "vision_width", "embed_dim", "vocab_size"):
        if theirs.get(key) != ours.get(key):
            problems.append(f"backbone {key} {theirs.get(key)} (this model: {ours.get(key)})")
    if theirs.get("weights_digest") not in (None, ours["weights_digest"]):
        problems.append(f"backbone weights {theirs['weights_digest'][:12]} of {theirs.get('name')!r} (this model: "
                        f"{ours['weights_digest'][:12]} of {ours.get('name')!r}): the prompt was trained on other "
                        "weights; the same weights may come from another location (hf-hub: or local-dir:)")
    if identity["classnames"] != mine["classnames"]:
        if not identity.get("protocol") == mine["protocol"] == "base2novel":
            problems.append(f"classes {identity['classnames']} (this model: {mine['classnames']}); only a "
                            "base-to-novel evaluation may load a prompt trained on other classes")
        elif not new_classes_scored(model):
            problems.append(f"classes {identity['classnames']} (this model: {mine['classnames']}); "
                            f"{type(model).__name__} learns one entry per training class and cannot score "
                            "other classes: it has no base-to-novel evaluation")
    if problems:
        raise CheckpointMismatchError("checkpoint does not fit this model: " + "; ".join(problems))
    own = {name: t.shape for name, t in model.state_dict().items() if not name.startswith(BACKBONE_PREFIX)}
    state = checkpoint["state_dict"]
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise CheckpointMismatchError(f"checkpoint holds tensors this model does not have: {unexpected[:8]}"
                                      f"{' ...' if len(unexpected) > 8 else ''}; a checkpoint may only hold the "
                                      "method's own parameters (never the frozen backbone's)")
    wrong = [f"{k} {tuple(v.shape)} (this model: {tuple(own[k])})" for k, v in state.items() if v.shape != own[k]]
    if wrong:
        raise CheckpointMismatchError("checkpoint parameters have other shapes: " + "; ".join(wrong))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trainable - set(state))
    if missing:
        raise CheckpointMismatchError(f"checkpoint lacks trainable parameters {missing}")
