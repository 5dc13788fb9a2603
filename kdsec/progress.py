"""Progress reporting that suits where it runs: a bar in a terminal, log lines elsewhere."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

logger = logging.getLogger("kdsec")


class Advance(Protocol):
    def __call__(self, status: str) -> None: ...


@contextmanager
def progress(label: str, total: int) -> Iterator[Advance]:
    """Yield ``advance(status)``; call it once per step of ``total``."""
    if sys.stderr.isatty():
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn())
        with Progress(*columns, transient=True) as bar:
            task = bar.add_task(label, total=total, status="")
            yield lambda status: bar.update(task, advance=1, status=status)
        logger.info("%s: done", label)
        return
    step = 0
    every = max(1, total // 5)

    def advance(status: str) -> None:
        nonlocal step
        step += 1
        if step % every == 0 or step == total:
            logger.info("%s %d/%d %s", label, step, total, status)

    yield advance
