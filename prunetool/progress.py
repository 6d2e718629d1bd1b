"""Progress bars on long work; silent when disabled (``--quiet`` or stdout not a terminal)."""

from __future__ import annotations

from typing import Iterable, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import distributed

T = TypeVar("T")


class Bars:
    def __init__(self, enabled: bool = False):
        self.enabled = enabled and distributed.is_main()  # one set of bars under torchrun

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterable[T]:
        if not self.enabled:
            yield from items
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, transient=True) as progress:
            if total is None:
                total = len(items) if hasattr(items, "__len__") else None  # None: rich shows an open-ended bar
            task = progress.add_task(description, total=total)
            for item in items:
                yield item
                progress.advance(task)


QUIET = Bars(False)
