"""How long work reports its progress, without drawing anything.

Converters and quantizers report through this interface; the command line draws it (rich bars
on stderr, :mod:`localmed.cli.progress`), and a caller with no screen passes nothing. The shape is
rich's ``Progress``: tasks with a total, updated or advanced, plus one-line remarks.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Where long work says how far it is."""

    def add_task(self, description: str, *, total: float | None, unit: str = "bytes") -> int:
        """A new task of ``total`` ``unit`` (``bytes``, or a count such as ``chunks``)."""
        ...

    def update(self, task: int, *, completed: float | None = None,
               total: float | None = None) -> None:
        ...

    def advance(self, task: int, amount: float) -> None:
        ...

    def info(self, text: str) -> None:
        """A remark on what is being done (which converter, a cache reused)."""
        ...

    def warn(self, text: str) -> None:
        """Something the user should know that does not stop the work."""
        ...


class NoProgress:
    """Progress reported to no one."""

    def add_task(self, description: str, *, total: float | None, unit: str = "bytes") -> int:
        return 0

    def update(self, task: int, *, completed: float | None = None,
               total: float | None = None) -> None:
        pass

    def advance(self, task: int, amount: float) -> None:
        pass

    def info(self, text: str) -> None:
        pass

    def warn(self, text: str) -> None:
        pass
