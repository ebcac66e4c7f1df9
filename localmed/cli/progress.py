"""Progress of long work drawn as rich bars on stderr (the :class:`localmed.progress.Progress`
the converters and quantizers report to)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as RichBars
from rich.text import Text


class _AmountColumn(ProgressColumn):
    """Bytes and bytes/s for the file tasks; ``done/total chunks`` for a task counted in other
    units (the importance matrix's calibration run)."""

    def __init__(self) -> None:
        super().__init__()
        self._bytes, self._speed = DownloadColumn(), TransferSpeedColumn()

    def render(self, task: Task) -> RenderableType:
        unit = task.fields.get("unit")
        if unit != "bytes":
            total = "?" if task.total is None else f"{task.total:.0f}"
            return Text(f"{task.completed:.0f}/{total} {unit}", style="progress.download")
        return Text.assemble(self._bytes.render(task), " ", self._speed.render(task))


class BarsProgress:
    """:class:`localmed.progress.Progress` as rich bars; remarks print above them."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.bars = RichBars(TextColumn("[bold]{task.description}"), BarColumn(), _AmountColumn(),
                             TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                             transient=False)

    def add_task(self, description: str, *, total: float | None, unit: str = "bytes") -> int:
        self.bars.start()  # drawn from the first task on: remarks before it print plainly
        return self.bars.add_task(description, total=total, unit=unit)

    def update(self, task: int, *, completed: float | None = None,
               total: float | None = None) -> None:
        self.bars.update(task, completed=completed, total=total)  # type: ignore[arg-type]

    def advance(self, task: int, amount: float) -> None:
        self.bars.advance(task, amount)

    def info(self, text: str) -> None:
        self.console.print(f"[dim]{escape(text)}[/]", soft_wrap=True)

    def warn(self, text: str) -> None:
        self.console.print(f"[yellow]note:[/] {escape(text)}", soft_wrap=True)


@contextmanager
def progress_bars(console: Console) -> Iterator[BarsProgress]:
    """Bars for the duration of a command's long work, stopped (and left on screen) after."""
    progress = BarsProgress(console)
    try:
        yield progress
    finally:
        progress.bars.stop()
