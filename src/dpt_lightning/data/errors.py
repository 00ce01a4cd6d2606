"""Errors of the data layer: every problem of the data in one exception."""
from __future__ import annotations


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
