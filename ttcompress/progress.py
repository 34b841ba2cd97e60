"""A tiny progress protocol so the library can report long loops without depending on a terminal.

Library functions take ``progress: Progress | None``.  The CLI passes a rich-backed implementation; library users
and tests get the silent default.

    with progress.task("spectrum", total=len(layers)) as advance:
        for layer in layers:
            ...
            advance(1)
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Protocol

Advance = Callable[..., None]


class Progress(Protocol):
    def task(self, description: str, total: float | None = None) -> contextlib.AbstractContextManager[Advance]:
        """Open a task; the context yields ``advance(n=1, **fields)``."""
        ...


class SilentProgress:
    """Reports nothing."""

    @contextlib.contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[Advance]:
        def advance(n: float = 1, **fields: object) -> None:
            return None

        yield advance


SILENT = SilentProgress()


def ensure(progress: Progress | None) -> Progress:
    return SILENT if progress is None else progress
