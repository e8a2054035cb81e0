"""The progress display of `edgelm compare` and `edgelm check`: a live rich display on a terminal, one line
per finished row elsewhere."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


class ProgressDisplay:
    """Progress on stderr: on a terminal, a live rich display of rows (the reference, each target) and what
    each is doing; elsewhere (a log, a CI job) one line per finished row. Silent when `enabled` is False."""

    def __init__(self, enabled: bool, rows: Sequence[str]) -> None:
        self.enabled = enabled
        self.rows = list(rows)
        self.tasks: dict[str, Any] = {}
        self.progress: Any = None
        self.console: Any = None

    def __enter__(self) -> ProgressDisplay:
        if not self.enabled:
            return self
        from rich.console import Console

        self.console = Console(stderr=True)
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("{task.description:<18}"),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[status]}"),
                console=self.console,
            )
            self.progress.start()
            for row in self.rows:
                self.tasks[row] = self.progress.add_task(row, total=None, status="waiting", start=False)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def callback(self, row: str) -> Callable[[str, int, int], None]:
        """A `progress` callback for `check` that updates `row`."""
        return lambda stage, done, total: self.update(row, stage, done, total)

    def update(self, row: str, stage: str, done: int, total: int) -> None:
        """Show `stage` at `done` of `total` on `row`."""
        if row in self.tasks:
            task = self.tasks[row]
            self.progress.start_task(task)
            self.progress.update(task, total=total, completed=done, status=stage)

    def status(self, row: str, text: str) -> None:
        """Show `text` on `row`, without a count."""
        if row in self.tasks:
            self.progress.start_task(self.tasks[row])
            self.progress.update(self.tasks[row], status=text)

    def done(self, row: str, text: str) -> None:
        """Mark `row` finished with a one-line summary."""
        if row in self.tasks:
            task = self.tasks[row]
            self.progress.update(task, total=1, completed=1, status=text)
            self.progress.stop_task(task)
        elif self.console is not None:
            self.console.print(f"{row}: {text}", highlight=False)
