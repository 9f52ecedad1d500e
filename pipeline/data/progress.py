"""Progress of a long pass over a data set's files (ingest's decoding, intake's copy, writing shards)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

log = logging.getLogger(__name__)

PROGRESS_LOG_S = 30.0  # without a terminal (dvc repro's log): one progress line this often

T = TypeVar("T")


def progress(items: Iterable[T], total: int, what: str = "ingest", done: str = "images read") -> Iterator[T]:
    """A tqdm bar (count, rate, time left) on an interactive stderr; elsewhere (dvc repro's log) an INFO line
    every ``PROGRESS_LOG_S`` with the same three."""
    if sys.stderr.isatty():
        yield from tqdm(items, total=total, desc=what, unit="img", file=sys.stderr, leave=False)
        return
    start = last = time.monotonic()
    for i, item in enumerate(items):
        now = time.monotonic()
        if now - last >= PROGRESS_LOG_S:
            rate = i / max(now - start, 1e-9)
            left = (total - i) / rate if rate else float("inf")
            log.info("%s: %d/%d %s (%.0f images/s, %.0f s left)", what, i, total, done, rate, left)
            last = now
        yield item
