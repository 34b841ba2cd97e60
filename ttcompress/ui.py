"""Terminal rendering: rich progress bars (on stderr, so ``--json`` stdout stays clean), tables, JSON output."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

# Paths, layer names and messages come from users and their files: never read them as rich markup or emoji codes
# (``model[v2].pt`` must print as itself, ``x[/red].pt`` must not crash, ``:x:`` stays text).  Styling is explicit.
err_console = Console(stderr=True, markup=False, emoji=False, highlight=False)
out_console = Console(markup=False, emoji=False, highlight=False)


def say(console: Console, label: str, message: str, style: str = "bold") -> None:
    """``label message`` on one line, the label styled and the message printed as plain text."""
    from rich.text import Text

    console.print(Text.assemble((label, style), " ", message), soft_wrap=True)


class RichProgress:
    """The CLI's implementation of :class:`ttcompress.progress.Progress`."""

    def __init__(self, console: Console = err_console, enabled: bool = True) -> None:
        self.console = console
        self.enabled = enabled and console.is_terminal

    @contextlib.contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[Any]:
        if not self.enabled:
            yield lambda n=1, **fields: None
            return
        columns = [
            TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}", markup=False),
        ]
        with Progress(*columns, console=self.console, transient=True) as bar:
            task_id = bar.add_task(description, total=total, info="")

            def advance(n: float = 1, **fields: Any) -> None:
                info = "  ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
                bar.update(task_id, advance=n, info=info)

            yield advance


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def sanitize(obj: Any) -> Any:
    """JSON cannot hold NaN/inf: turn them into null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v) for v in obj]
    return obj


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(sanitize(obj), indent=2) + "\n")
    sys.stdout.flush()


def table(title: str, columns: list[str], rows: list[list[Any]], justify_numbers: bool = True) -> Table:
    t = Table(title=title, title_justify="left", header_style="bold")
    for i, c in enumerate(columns):
        t.add_column(c, justify="right" if (justify_numbers and i > 0) else "left", no_wrap=(i == 0))
    for row in rows:
        t.add_row(*[_fmt(v) if not isinstance(v, str) else v for v in row])
    return t
