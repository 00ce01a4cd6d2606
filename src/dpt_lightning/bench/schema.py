"""Checking a YAML file's data against a schema declared as dataclasses with type hints.

`parse(value, hint)` returns the value with every mapping that a dataclass describes turned into
that dataclass, and the list of `Problem`s found (all of them, each with its place in the data):

* ``str``, ``int`` (not a boolean), ``bool`` (not the string ``'false'``), ``Any``, ``None``;
* ``Literal[...]``, ``list[T]``, ``dict[K, V]``, unions ``A | B``;
* a dataclass: a mapping with the dataclass's fields as keys; unknown keys and missing required
  fields are problems; a key left out takes the field's default;
* ``Annotated[T, AXIS]``: an axis of a grid, a non-empty list without repeated values (a single
  value stands for a list of one).

`line_of` finds the line of a place in the YAML text, for messages.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

import yaml

AXIS = "axis"
Place = tuple  # keys and list indices from the top of the data: ("methods", 0, "fit")

_NAMES = {str: "a string", int: "an integer", bool: "true or false", float: "a number", type(None): "nothing",
          list: "a list", dict: "a mapping"}
_PLURALS = {str: "strings", int: "integers", bool: "booleans", float: "numbers"}


@dataclass
class Problem:
    """What is wrong (``message``, a predicate: "must be ...") at ``place`` in the data."""

    place: Place
    message: str

    def subject(self) -> str:
        """The place in words: ``'seeds'``, ``seeds entry 2``, ``methods entry 1: 'fit'``."""
        if not self.place:
            return "the file"
        text, quoted = str(self.place[0]), True
        for part in self.place[1:]:
            if isinstance(part, int):
                text, quoted = f"{text} entry {part + 1}", False
            else:
                text = f"{text}.{part}" if quoted else f"{text}: '{part}'"
        return f"'{text}'" if quoted else text

    def __str__(self) -> str:
        return f"{self.subject()} {self.message}"


def parse(value, hint, place: Place = ()) -> tuple[object, list[Problem]]:
    problems: list[Problem] = []
    return _parse(value, hint, place, problems), problems


def _parse(value, hint, place: Place, problems: list[Problem]):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        check = _axis if AXIS in args[1:] else _parse
        return check(value, args[0], place, problems)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        return _union(value, args, place, problems)
    if origin is Literal:
        if not any(value == a and type(value) is type(a) for a in args):
            problems.append(Problem(place, f"must be {describe(hint)}, got {show(value)}"))
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(Problem(place, f"must be {describe(hint)}, got {show(value)}"))
            return value
        return [_parse(item, args[0], (*place, i), problems) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(Problem(place, f"must be {describe(hint)}, got {show(value)}"))
            return value
        return {_parse(k, args[0], (*place, k), problems): _parse(v, args[1], (*place, k), problems)
                for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return _dataclass(value, hint, place, problems)
    if not _is(value, hint):
        problems.append(Problem(place, f"must be {describe(hint)}, got {show(value)}"))
    return value


def _is(value, hint) -> bool:
    if hint in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if hint is float else hint)


def _axis(value, hint, place: Place, problems: list[Problem]):
    if value is None or value == []:
        problems.append(Problem(place, "must be a non-empty list: give at least one value (or leave the key "
                                       "out for its default)"))
        return value
    found = len(problems)
    value = _parse(value, hint, place, problems)
    items = value if isinstance(value, list) else [value]
    repeated = [item for i, item in enumerate(items) if item in items[:i]]
    if repeated and len(problems) == found:
        problems.append(Problem(place, f"has values that appear twice: {show(repeated, kind=False)} (each "
                                       "value of an axis makes its own cells: give it once)"))
    return items


def _union(value, alternatives, place: Place, problems: list[Problem]):
    for alternative in alternatives:
        converted, trial = parse(value, alternative, place)
        if not trial:
            return converted
    shaped = [a for a in alternatives if type(value) in _shapes(a)]
    if len(shaped) == 1:  # the value has the form of one alternative: say what is wrong inside it
        return _parse(value, shaped[0], place, problems)
    wanted = " or ".join(describe(a) for a in alternatives if a is not type(None))
    problems.append(Problem(place, f"must be {wanted}, got {show(value)}"))
    return value


def _shapes(hint) -> set[type]:
    """The Python types a value of ``hint`` can have at its top level."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:  # an axis left empty (null) is a wrong axis
        return _shapes(args[0]) | ({type(None)} if AXIS in args[1:] else set())
    if origin in (Union, types.UnionType):
        return set().union(*map(_shapes, args))
    if origin is Literal:
        return {type(a) for a in args}
    if origin in (list, dict):
        return {origin}
    if dataclasses.is_dataclass(hint):
        return {dict}
    return {hint} | ({int} if hint is float else set())


def _dataclass(value, cls, place: Place, problems: list[Problem]):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(value, dict):
        problems.append(Problem(place, f"expected {describe(cls)}, got {show(value)}"))
        return value
    found = len(problems)
    unknown = [k for k in value if k not in fields]
    if unknown:
        problems.append(Problem(place, f"has unknown key(s) {unknown}; allowed: {list(fields)}"))
    missing = [name for name, f in fields.items() if name not in value and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        problems.append(Problem(place, f"lacks the key(s) {missing}"))
    hints = typing.get_type_hints(cls, include_extras=True)
    known = {k: _parse(v, hints[k], (*place, k), problems) for k, v in value.items() if k in fields}
    return cls(**known) if len(problems) == found else value


def describe(hint) -> str:
    """What a value of ``hint`` is, in words: "a list of integers", "true or false"..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return describe(args[0])
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args if a is not type(None))
    if origin is Literal:
        return "one of " + ", ".join(dict.fromkeys(str(a).lower() for a in args))  # True and "true" alike
    if origin is list:
        return f"a list of {_PLURALS[args[0]]}" if args[0] in _PLURALS else "a list"
    if origin is dict or hint is dict:
        return "a mapping of settings (key: value)"
    if dataclasses.is_dataclass(hint):
        return "a mapping with the keys " + ", ".join(f.name for f in dataclasses.fields(hint))
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def show(value, kind: bool = True) -> str:
    """A value as written in YAML, and (``kind``) what it is: ``'false' (a string)``."""
    text = repr(value) if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
    text = text.removesuffix("\n...").strip()
    if len(text) > 60:
        text = text[:57] + "..."
    if not kind:
        return text
    note = " written in quotes, so text, not a boolean" if isinstance(value, str) and \
        value.lower() in ("true", "false", "yes", "no") else ""
    return f"{text} ({_NAMES.get(type(value), type(value).__name__)}{note})"


def line_of(text: str, place: Place) -> int | None:
    """The line (1-based) of ``place`` in the YAML ``text``: the line of its key, list item or the
    nearest place above it that exists."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    line = node.start_mark.line + 1 if node is not None else None
    for part in place:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line
