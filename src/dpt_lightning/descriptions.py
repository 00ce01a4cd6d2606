"""The description bank: ``{classname: [sentences]}`` per dataset, shipped JSON files or the user's.

Class names are matched without regard to case. A bank missing any class is an error that lists
every missing class.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path


class DescriptionBankError(ValueError):
    """A description bank that cannot be used, with the reason."""


def builtin_bank_names() -> list[str]:
    """Names of the banks shipped with the package (one per benchmark dataset)."""
    folder = resources.files("dpt_lightning") / "descriptions"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def validate_bank(bank: object, source: str) -> dict[str, list[str]]:
    """Check that ``bank`` is a dict of non-empty lists of non-empty strings."""
    if not isinstance(bank, dict):
        raise DescriptionBankError(f"{source}: a description bank is a JSON object {{classname: [sentences]}}, "
                                   f"got {type(bank).__name__}")
    problems = []
    for name, sentences in bank.items():
        if not isinstance(name, str) or not name.strip():
            problems.append(f"class name {name!r} is not a non-empty string")
        elif not isinstance(sentences, list) or not sentences:
            problems.append(f"{name!r}: expected a non-empty list of sentences")
        elif not all(isinstance(s, str) and s.strip() for s in sentences):
            problems.append(f"{name!r}: every sentence must be a non-empty string")
    if problems:
        raise DescriptionBankError(f"{source}: " + "; ".join(problems))
    return bank


def load_bank(source: str) -> dict[str, list[str]]:
    """A bank from a JSON file path, or the name of a shipped bank (``btmri``, ``BTMRI``, ...)."""
    path = Path(source).expanduser()
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise DescriptionBankError(f"description bank {path} does not exist")
        try:
            bank = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DescriptionBankError(f"{path}: not valid JSON ({err})") from None
        return validate_bank(bank, str(path))
    name = source.lower()
    if name not in builtin_bank_names():
        raise DescriptionBankError(f"no shipped description bank {source!r}; shipped: {builtin_bank_names()}; "
                                   "or pass a path to a JSON file")
    text = (resources.files("dpt_lightning") / "descriptions" / f"{name}.json").read_text(encoding="utf-8")
    return validate_bank(json.loads(text), f"shipped bank {name}")


def sentences_for(bank: dict[str, list[str]], classnames: list[str], source: str = "bank") -> list[list[str]]:
    """The sentences of each class in order; every missing class is named in one error."""
    lowered = {k.lower().strip(): v for k, v in bank.items()}
    missing = [name for name in classnames if name.lower().strip() not in lowered]
    if missing:
        raise DescriptionBankError(f"{source} has no sentences for {len(missing)} class(es): {missing}. "
                                   f"It has: {sorted(bank)}")
    return [lowered[name.lower().strip()] for name in classnames]
