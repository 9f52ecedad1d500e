"""Environment variables set (or left to a library to set) for a while, then put back as they were."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


@contextmanager
def environ(values: dict[str, str] | None = None, keep: Iterable[str] = ()) -> Iterator[None]:
    """``values`` set in ``os.environ`` for the block; afterwards each of them, and each name in ``keep``
    (what the block itself may change), is as it was before, unset included."""
    names = {*(values or {}), *keep}
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(values or {})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
