"""dpt_lightning: prompt learning for biomedical vision-language models with PyTorch Lightning.

The methods, data modules and the backbone (``from dpt_lightning import CoOp``) are imported when
first asked for, not with the package, so that commands that need none of them (``dpt-prompts``)
start without loading torch.
"""
import importlib
import importlib.util

__version__ = "0.1.0"

#: The subpackages whose public names the package exports (``__all__``), besides the backbone's two.
_EXPORTING = ("dpt_lightning.data", "dpt_lightning.methods")
_BACKBONE_NAMES = ("BIOMEDCLIP_HUB_ID", "BiomedCLIP")


def _exported() -> dict[str, str]:
    """``{public name: the module that defines it}`` (imports the subpackages)."""
    names = dict.fromkeys(_BACKBONE_NAMES, "dpt_lightning.backbone")
    for module in _EXPORTING:
        names |= dict.fromkeys(importlib.import_module(module).__all__, module)
    return names


def __getattr__(name: str):
    if name.startswith("__") and name != "__all__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name != "__all__" and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")  # a module: dpt_lightning.methods, .features ...
    exported = _exported()
    if name == "__all__":
        value = list(exported)
    elif name in exported:
        value = getattr(importlib.import_module(exported[name]), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_exported()})
