"""Progress of a long conversion (import, export, calibration) on stderr: a bar with the item at work and an
ETA on a terminal, nothing elsewhere (a log, a pipe, a test)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(description: str, total: int, show: bool = True) -> Iterator[Callable[[str], None]]:
    """A context whose value, `advance(detail)`, marks one of `total` steps done and shows `detail` (what
    was just done, e.g. a tensor's name). Silent unless `show` and stderr is a terminal."""
    from rich.console import Console

    console = Console(stderr=True)
    if not show or not console.is_terminal:
        yield lambda detail: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[detail]}"),
        console=console,
    )
    with bar:
        task = bar.add_task(description, total=total, detail="")
        yield lambda detail: bar.update(task, advance=1, detail=detail)
