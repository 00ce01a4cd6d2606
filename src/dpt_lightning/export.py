"""Export a prompt checkpoint to a small safetensors file plus a JSON card, and load it back.

``dpt-export run/checkpoints/last.ckpt -o btmri_coop.safetensors`` writes the learned prompt
tensors (a few KB) and ``btmri_coop.json``: the method, its settings, the backbone and its
fingerprint, the class names and the dataset. Neither file can run code when loaded; a checkpoint
or an export whose tensors hold NaN or infinite values is refused, naming them.
"""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

from safetensors.torch import load_file, save

from dpt_lightning.files import atomic_write
from dpt_lightning.methods import CheckpointMismatchError, PromptTrainer
from dpt_lightning.methods.checkpoints import CheckpointReadError, read_checkpoint, refuse_non_finite


def card_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def export_checkpoint(checkpoint: str | Path, output: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``output`` (.safetensors) and its JSON card from a dpt_lightning checkpoint."""
    output = Path(output)
    if output.suffix != ".safetensors":
        raise ValueError(f"{output}: the export file must end in .safetensors")
    card = card_path(output)
    for target in (output, card):
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    state = read_checkpoint(checkpoint)
    identity = state.get("dpt_lightning")
    if identity is None:
        raise CheckpointMismatchError(f"{checkpoint} was not written by dpt_lightning")
    tensors = {k: v.contiguous() for k, v in state["state_dict"].items()}
    info = {"dpt_lightning": identity, "hyper_parameters": method_settings(
        state.get(PromptTrainer.CHECKPOINT_HYPER_PARAMS_KEY, state.get("hyper_parameters", {}))),
            "tensors": {k: list(v.shape) for k, v in tensors.items()}}
    atomic_write(output, save(tensors), exclusive=not overwrite)
    atomic_write(card, json.dumps(info, indent=2, default=str), exclusive=not overwrite)
    return output, card


def method_settings(hyper_parameters: dict) -> dict:
    """The method's own settings: the hyper-parameters without the entries LightningCLI adds
    (``_class_path``, ``_instantiator``), which are no arguments of the method."""
    return {k: v for k, v in dict(hyper_parameters).items() if not str(k).startswith("_")}


def _method_class(class_path: str, method_class: type | None) -> type:
    if method_class is not None:
        return method_class
    module, _, name = class_path.rpartition(".")
    if not module.startswith("dpt_lightning."):
        raise CheckpointMismatchError(f"the card names {class_path!r}, which is not a dpt_lightning method; "
                                      "pass method_class= to load it (nothing is imported from a card)")
    cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, PromptTrainer)):
        raise CheckpointMismatchError(f"{class_path!r} is not a prompt method")
    return cls


def load_exported(weights: str | Path, method_class: type | None = None, allow_unverified_backbone: bool = False,
                  **overrides) -> PromptTrainer:
    """Rebuild the model of an export (backbone from its id, e.g. ``backbone='local-dir:...'`` as an
    override) and load the prompt tensors; the identity checks of checkpoints apply (an export of
    an older format that cannot show its backbone's weights needs ``allow_unverified_backbone``).
    Tensors that are not finite are refused, naming them, before anything is built."""
    card = json.loads(card_path(weights).read_text())
    identity = card["dpt_lightning"]
    cls = _method_class(identity.get("class_path", ""), method_class)
    state = load_file(str(weights))
    refuse_non_finite(state, f"export {weights}")
    model = cls(**{**method_settings(card["hyper_parameters"]), **overrides})
    model.allow_unverified_backbone = allow_unverified_backbone
    checkpoint = {"dpt_lightning": identity, "state_dict": state}
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"], strict=False)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dpt-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint written by dpt fit (e.g. .../checkpoints/last.ckpt)")
    parser.add_argument("-o", "--output", required=True, help="output .safetensors file (a .json card is written beside)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    args = parser.parse_args(argv)
    try:
        weights, card = export_checkpoint(args.checkpoint, args.output, args.overwrite)
    except (FileExistsError, ValueError, CheckpointMismatchError, CheckpointReadError, FileNotFoundError) as err:
        parser.exit(2, f"dpt-export: error: {err}\n")
    except OSError as err:  # an output folder that is read-only, a path that is a folder, a full disk
        target = err.filename or args.output
        parser.exit(2, f"dpt-export: error: cannot write {target}: {err.strerror or err}; choose another -o path\n")
    print(f"wrote {weights} ({weights.stat().st_size} bytes) and {card}")
