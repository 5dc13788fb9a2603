"""Progress away from a terminal: a log line at every fifth of the work, and at least every
LOG_EVERY_SECONDS while steps finish (so each slow full-size epoch gets its line)."""

import logging

from kdsec import progress as progress_module
from kdsec.progress import progress


def _logged(caplog, steps: int) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kdsec"), progress("train", steps) as advance:
        for step in range(steps):
            advance(f"loss {step}")
    return [record.getMessage() for record in caplog.records]


def test_quick_steps_log_every_fifth(caplog):
    assert _logged(caplog, 20) == [f"train {n}/20 loss {n - 1}" for n in (4, 8, 12, 16, 20)]


def test_slow_steps_log_every_step(caplog, monkeypatch):
    monkeypatch.setattr(progress_module, "LOG_EVERY_SECONDS", 0.0)
    assert _logged(caplog, 7) == [f"train {n}/7 loss {n - 1}" for n in range(1, 8)]
