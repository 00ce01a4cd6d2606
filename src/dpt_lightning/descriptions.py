"""The description bank: ``{classname: [sentences]}`` per dataset, shipped JSON files or the user's.

Format (UTF-8 JSON): one object whose keys are class names and whose values are non-empty lists of
sentences, e.g. ``{"glioma tumor": ["An irregular ring-enhancing mass ...", ...], ...}``. A value
may instead be the name of another class of the bank, an alias (``"Pleural Effusion": "Effusion"``:
CheXpert's name for ChestX-ray14's finding); `validate_bank` resolves aliases into lists. Class
names are matched without regard to case, surrounding spaces or ``_`` for a space
(``Pleural_Thickening`` is ``Pleural Thickening``); a bank may hold more classes than a dataset
needs (one bank for several datasets is fine), but a bank missing any class is an error that lists
every missing class. A shipped bank may serve several datasets under their names (`SHIPPED_ALIASES`).

The reference repositories keep their sentences in a Python module (``prompt_templates.py``, dicts
such as ``BIOMEDDPT_TEMPLATES``). `import_bank` reads such a module as DATA: the file is parsed with
``ast`` and only ``NAME = <literal>`` assignments are accepted; a file containing any other code
(imports, calls, names, f-strings, comprehensions, functions ...) is refused and never executed.
"""
from __future__ import annotations

import ast
import json
import warnings
from importlib import resources
from pathlib import Path

from dpt_lightning.files import JSONFileError, atomic_write, read_json


class DescriptionBankError(ValueError):
    """A description bank that cannot be used, with the reason."""


#: Datasets served by another dataset's shipped bank: name -> the bank's name.
SHIPPED_ALIASES = {"chexpert": "chestxray14", "demo_multilabel": "demo"}


def builtin_bank_names() -> list[str]:
    """Names of the banks shipped with the package (one per dataset; `SHIPPED_ALIASES` included)."""
    folder = resources.files("dpt_lightning") / "descriptions"
    return sorted([p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json")] + list(SHIPPED_ALIASES))


def class_key(name: str) -> str:
    """The form in which class names are matched: lower case, ``_`` as a space, spaces collapsed."""
    return " ".join(name.replace("_", " ").lower().split())


def validate_bank(bank: object, source: str) -> dict[str, list[str]]:
    """Check that ``bank`` is a dict of non-empty lists of non-empty strings, or of aliases (the
    name of another class of the bank that has sentences); returns it with each alias replaced
    by its class's sentences."""
    if not isinstance(bank, dict):
        raise DescriptionBankError(f"{source}: a description bank is a JSON object {{classname: [sentences]}}, "
                                   f"got {type(bank).__name__}")
    problems = []
    lists = {class_key(name): name for name, value in bank.items()
             if isinstance(name, str) and isinstance(value, list)}
    for name, sentences in bank.items():
        if not isinstance(name, str) or not name.strip():
            problems.append(f"class name {name!r} is not a non-empty string")
        elif isinstance(sentences, str):
            if class_key(sentences) not in lists:
                problems.append(f"{name!r}: an alias names a class of the bank that has sentences; "
                                f"{sentences!r} is none")
        elif not isinstance(sentences, list) or not sentences:
            problems.append(f"{name!r}: expected a non-empty list of sentences")
        elif not all(isinstance(s, str) and s.strip() for s in sentences):
            problems.append(f"{name!r}: every sentence must be a non-empty string")
    if problems:
        raise DescriptionBankError(f"{source}: " + "; ".join(problems))
    return {name: bank[lists[class_key(value)]] if isinstance(value, str) else value for name, value in bank.items()}


def load_bank(source: str) -> dict[str, list[str]]:
    """A bank from a JSON file path, or the name of a shipped bank (``btmri``, ``BTMRI``, ...).

    A file that cannot be used (missing, a folder, not UTF-8, not JSON, nested too deeply) is a
    `DescriptionBankError` naming it."""
    path = Path(source).expanduser()
    if path.suffix == ".json" or path.is_file():
        return validate_bank(_read_json(path), str(path))
    name = source.lower()
    if name not in builtin_bank_names():
        raise DescriptionBankError(f"no shipped description bank {source!r}; shipped: {builtin_bank_names()}; "
                                   "or pass a path to a JSON file")
    name = SHIPPED_ALIASES.get(name, name)
    text = (resources.files("dpt_lightning") / "descriptions" / f"{name}.json").read_text(encoding="utf-8")
    return validate_bank(json.loads(text), f"shipped bank {name}")


def _read_json(path: Path) -> object:
    """A bank file's JSON; every way it can fail is a `DescriptionBankError` naming the file."""
    try:
        return read_json(path, "description bank")
    except FileNotFoundError as err:
        raise DescriptionBankError(str(err)) from None
    except JSONFileError as err:
        raise DescriptionBankError(str(err)) from None


def sentences_for(bank: dict[str, list[str]], classnames: list[str], source: str = "bank") -> list[list[str]]:
    """The sentences of each class in order; every missing class is named in one error. Names
    match as `class_key` (without regard to case, surrounding spaces, ``_`` for a space); a class
    that matches two entries of the bank (``Normal`` and ``normal``) is an error too."""
    keys: dict[str, list[str]] = {}
    for key in bank:
        keys.setdefault(class_key(key), []).append(key)
    missing = [name for name in classnames if class_key(name) not in keys]
    if missing:
        raise DescriptionBankError(f"{source} has no sentences for {len(missing)} class(es): {missing}. "
                                   f"It has: {sorted(bank)}")
    ambiguous = {name: keys[class_key(name)] for name in classnames if len(keys[class_key(name)]) > 1}
    if ambiguous:
        raise DescriptionBankError(f"{source}: these classes match several entries that differ only in case, "
                                   f"spaces or '_': {ambiguous}; keep one of each")
    return [bank[keys[class_key(name)][0]] for name in classnames]


def resolve_sentences(descriptions: str, dataset: str | None, classnames: list[str],
                      setting: str = "model.descriptions") -> list[list[str]]:
    """Each class's sentences from ``descriptions``: ``auto`` (the shipped bank of ``dataset``) or
    a JSON bank path / shipped bank name. Errors name ``setting`` and say what to do."""
    if descriptions == "auto":
        if dataset is None:
            raise DescriptionBankError(
                f"{setting}: 'auto' means the shipped bank of a benchmark dataset, but this data has no "
                "dataset name; give a JSON bank {classname: [sentences]} (README 'Description banks'), "
                "e.g. one made with 'dpt-prompts import'")
        if dataset.lower() not in builtin_bank_names():
            raise DescriptionBankError(
                f"{setting}: 'auto' found no shipped bank for dataset {dataset!r} (shipped: "
                f"{builtin_bank_names()}); give a JSON bank path")
        descriptions = dataset
    return sentences_for(load_bank(descriptions), classnames, f"description bank {descriptions!r} ({setting})")


# ------------------------------------------------------------------ import
#: AST nodes a data-only Python module may contain inside an assigned value.
_LITERAL_NODES = (ast.Constant, ast.List, ast.Tuple, ast.Set, ast.Dict, ast.Load)


def _refuse(source: str, node: ast.AST, what: str) -> DescriptionBankError:
    line = getattr(node, "lineno", "?")
    return DescriptionBankError(
        f"{source}, line {line}: {what}. dpt-prompts reads a Python file only as data (NAME = literal "
        "dicts, lists, strings and numbers) and never runs it; remove the code or convert the file to JSON")


def _check_literal(node: ast.AST, source: str) -> None:
    """Refuse any node of ``node``'s tree that is not a plain literal (calls, names, f-strings ...)."""
    for child in ast.walk(node):
        if isinstance(child, ast.UnaryOp) and isinstance(child.op, (ast.USub, ast.UAdd)) \
                and isinstance(child.operand, ast.Constant):
            continue
        if isinstance(child, (ast.USub, ast.UAdd)):
            continue
        if not isinstance(child, _LITERAL_NODES):
            raise _refuse(source, child, f"{type(child).__name__} is code, not data")
        if isinstance(child, ast.Dict):
            keys = [k.value for k in child.keys if isinstance(k, ast.Constant)]
            if None in child.keys:
                raise _refuse(source, child, "a '**' dict unpacking is code, not data")
            repeated = sorted({k for k in keys if keys.count(k) > 1}, key=str)
            if repeated:
                warnings.warn(f"{source}, line {child.lineno}: keys repeated in one dict (the last wins): "
                              f"{repeated}", stacklevel=3)


def read_python_data(path: str | Path) -> dict[str, object]:
    """The ``NAME = <literal>`` assignments of a Python module, parsed with ``ast``, never executed.

    Only assignments to plain names, annotated assignments and string statements (docstrings) are
    allowed at the top level; anything else refuses the whole file with the line of the offence.
    """
    path = Path(path)
    source = str(path)
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=source)
    except (SyntaxError, UnicodeDecodeError, ValueError, RecursionError, MemoryError) as err:
        raise DescriptionBankError(f"{source}: not a readable Python file ({type(err).__name__}: {err})") from None
    values: dict[str, object] = {}
    for statement in tree.body:
        if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant) \
                and isinstance(statement.value.value, str):
            continue  # a docstring or a bare string: harmless text
        if isinstance(statement, ast.Assign) and all(isinstance(t, ast.Name) for t in statement.targets):
            targets, value = [t.id for t in statement.targets], statement.value
        elif isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name) \
                and statement.value is not None:
            targets, value = [statement.target.id], statement.value
        else:
            raise _refuse(source, statement, f"{type(statement).__name__} statement is code, not data")
        _check_literal(value, source)
        try:
            literal = ast.literal_eval(value)
        except (ValueError, TypeError, RecursionError) as err:  # e.g. a list as a dict key
            raise _refuse(source, value, f"not a plain literal ({type(err).__name__}: {err})") from None
        for target in targets:
            values[target] = literal
    return values


def _is_bank(value: object) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(s, str) for s in v) for k, v in value.items())


def import_bank(path: str | Path, name: str | None = None) -> dict[str, list[str]]:
    """A bank from a reference ``prompt_templates.py`` (read as data, see `read_python_data`) or a
    JSON file. ``name`` picks one dict of a Python file (e.g. ``BIOMEDDPT_TEMPLATES``); without it
    the file must hold exactly one ``{classname: [sentences]}`` dict."""
    path = Path(path)
    if not path.is_file():
        raise DescriptionBankError(f"{path} does not exist")
    if path.suffix == ".json":
        if name is not None:
            raise DescriptionBankError(f"{path}: --name picks a dict of a Python file; a JSON file is one bank")
        return load_bank(str(path))
    if path.suffix != ".py":
        raise DescriptionBankError(f"{path}: expected a .py (reference prompt_templates.py) or a .json file")
    values = read_python_data(path)
    banks = sorted(k for k, v in values.items() if _is_bank(v))
    if name is None:
        if len(banks) != 1:
            found = f"several: {banks}" if banks else "none"
            raise DescriptionBankError(f"{path}: expected one {{classname: [sentences]}} dict, found {found}; "
                                       "choose one with --name")
        name = banks[0]
    elif name not in banks:
        raise DescriptionBankError(f"{path}: no {{classname: [sentences]}} dict named {name!r}; "
                                   f"the file has: {banks or 'none'}")
    return validate_bank(values[name], f"{path}:{name}")


def write_bank(bank: dict[str, list[str]], path: str | Path, force: bool = False) -> Path:
    """Write a validated bank as JSON, atomically; an existing file is kept unless ``force``.

    An output that cannot be written (a folder, a read-only or missing place) is a
    `DescriptionBankError` naming it; an existing file without ``force`` a ``FileExistsError``."""
    path = Path(path)
    validate_bank(bank, str(path))
    if path.is_dir():
        raise DescriptionBankError(f"{path} is a folder; give the bank's file name, e.g. {path / 'bank.json'}")
    exists = f"{path} exists; choose another output or pass --force to overwrite it"
    if path.exists() and not force:
        raise FileExistsError(exists)
    text = json.dumps(bank, indent=2, ensure_ascii=False) + "\n"
    try:
        return atomic_write(path, text, exclusive=not force)
    except FileExistsError:  # created meanwhile, or a folder on the way is a file
        blocking = next((parent for parent in path.parents if parent.is_file()), None)
        if blocking is None:
            raise FileExistsError(exists) from None
        raise DescriptionBankError(f"cannot write {path}: {blocking} is a file, not a folder") from None
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise DescriptionBankError(f"cannot write {path}: {reason}; choose a place you can write to") from None
