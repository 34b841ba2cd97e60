"""The ``ttcompress`` command line: parse, call the library, render.  No numerical work happens here."""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import typer

from ttcompress import __version__
from ttcompress.errors import TTCompressError

app = typer.Typer(
    name="ttcompress",
    help=(
        "Tensor-train compression of CNNs with exact control of convolution singular values.\n\n"
        "Example: ttcompress decompose resnet20.th --arch resnet20 --rank 8 -o r20-tt.safetensors"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _debug_enabled() -> bool:
    return os.environ.get("TTCOMPRESS_DEBUG", "") not in ("", "0")


def handles_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """User errors → one line, exit 2; other failures → one line, exit 1; ``--debug`` shows the traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ttcompress.ui import err_console, say

        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except TTCompressError as exc:
            if _debug_enabled():
                raise
            say(err_console, "error:", _one_line(str(exc)), "bold red")
            raise typer.Exit(exc.exit_code)
        except KeyboardInterrupt:
            say(err_console, "interrupted", "", "bold red")
            raise typer.Exit(130)
        except Exception as exc:  # a bug or an environment failure: still one line unless --debug
            if _debug_enabled():
                raise
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            say(err_console, "error:", f"{type(exc).__name__}: {msg} (run with --debug for the traceback)", "bold red")
            raise typer.Exit(1)

    return wrapper


def _one_line(text: str) -> str:
    """A message on one line, whatever a file or a library put in it."""
    return " ".join(text.split()) or "no detail"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ttcompress {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Tensor-train compression of CNNs with exact control of convolution singular values."""
    if debug:
        os.environ["TTCOMPRESS_DEBUG"] = "1"



def _route_warnings() -> None:
    """ttcompress's own warnings as one ``warning:`` line; other libraries' (torch's pickle notice, matplotlib's glyph
    warnings, …) are not ours to show in a normal run — ``--debug`` shows everything."""
    import warnings
    from pathlib import Path

    package = Path(__file__).resolve().parent.parent
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        if _debug_enabled():
            default(message, category, filename, lineno, file, line)
            return
        try:
            ours = Path(filename).resolve().is_relative_to(package)
        except (OSError, ValueError):
            ours = False
        if ours:
            from ttcompress.ui import err_console, say

            say(err_console, "warning:", _one_line(str(message)), "yellow")

    warnings.showwarning = show


def main() -> None:
    from ttcompress.cli import decompose, spectrum  # noqa: F401  (registers the commands)

    _route_warnings()

    for name in OPTIONAL_COMMANDS:
        try:
            __import__(f"ttcompress.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"ttcompress.cli.{name}":
                raise
    app()


OPTIONAL_COMMANDS = ("init", "finetune", "evaluate", "demo", "export", "archs", "sensitivity")
