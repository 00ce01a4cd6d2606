"""Errors of the data layer (every problem of the data in one exception) and the JSON reader that names its file."""
from __future__ import annotations

import json
from pathlib import Path


class DataError(ValueError):
    """Problems with the user's data, every problem listed, each naming its file.

    Args:
        problems: one line per problem, each starting with the file (or folder) it is about.
        context: the first line: what was being read.
        hint: what to do, printed after the list (optional).
    """

    #: How many problems the message shows (all are kept in ``problems``).
    shown = 50

    def __init__(self, problems: list[str], context: str = "data problems", hint: str | None = None):
        self.problems = list(problems)
        self.context, self.hint = context, hint
        listed = "\n  - ".join(self.problems[:self.shown])
        more = f"\n  ... and {len(self.problems) - self.shown} more" if len(self.problems) > self.shown else ""
        advice = f"\n{hint}" if hint else ""
        super().__init__(f"{context} ({len(self.problems)}):\n  - {listed}{more}{advice}")

    def __reduce__(self):  # pickled (e.g. from a worker process) with its problems, not its text
        return type(self), (self.problems, self.context, self.hint)


class JSONFileError(ValueError):
    """A JSON file that cannot be read, in one line naming the file and what to do."""


def read_json(path: str | Path, what: str) -> object:
    """The content of the UTF-8 JSON file ``path`` (a ``what``, e.g. "split file", for messages).

    A missing file is a ``FileNotFoundError``; a folder, an unreadable file, bytes that are not
    UTF-8, invalid JSON and JSON nested too deeply to parse (which Python reports as a bare
    ``RecursionError`` naming no file) are a `JSONFileError` naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if path.is_dir():
        raise JSONFileError(f"{path}: is a folder, not a {what} (give the path of the JSON file)")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise JSONFileError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save the {what} "
                            "as UTF-8") from None
    except OSError as err:
        raise JSONFileError(f"{path}: cannot read the {what} ({err.strerror or err})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise JSONFileError(f"{path}: not valid JSON ({err})") from None
    except RecursionError:
        raise JSONFileError(f"{path}: lists or objects nested too deeply to be a {what} (a {what} is at most "
                            "a few levels deep)") from None
