"""Progress reporting that suits where it runs: a bar in a terminal, log lines elsewhere."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

logger = logging.getLogger("kdsec")

# Away from a terminal a line is logged at every fifth of the work, and at least this often
# while steps keep finishing (a full-size epoch takes ~10-60 s: each one gets its line).
LOG_EVERY_SECONDS = 10.0


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
    last = time.monotonic()

    def advance(status: str) -> None:
        nonlocal step, last
        step += 1
        now = time.monotonic()
        if step % every == 0 or step == total or now - last >= LOG_EVERY_SECONDS:
            last = now
            logger.info("%s %d/%d %s", label, step, total, status)

    yield advance
