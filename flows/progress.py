"""Rich progress bars driven by the components' `progress(stage, done, total)` callbacks."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

STAGE_LABELS = {
    "features": "feature extraction",
    "coreset": "greedy coreset",
    "calibration": "threshold calibration",
    "evaluate": "scoring test images",
    "score": "scoring",
    "predict": "predicting",
}


@contextmanager
def progress_bars(console: Console | None = None, enabled: bool = True):
    """Yield a ProgressFn that opens one bar per stage and updates it; a no-op when disabled."""
    if not enabled:
        yield None
        return
    columns = (TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console or Console(stderr=True), transient=False) as bars:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int | None) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(STAGE_LABELS.get(stage, stage), total=total)
            bars.update(tasks[stage], completed=done, total=total)

        yield update
