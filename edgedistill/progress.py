"""One progress-bar helper for the stages' long loops (teacher answers, export, profiling)."""

from __future__ import annotations

from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextmanager
def task_progress(description: str, total: int, enabled: bool = True):
    """Yields `advance(n)`; draws a bar with count, elapsed time and ETA when enabled."""
    if not enabled:
        yield lambda n=1: None
        return
    columns = (TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
