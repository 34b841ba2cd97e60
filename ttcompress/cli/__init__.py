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
        from ttcompress.ui import err_console

        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except TTCompressError as exc:
            if _debug_enabled():
                raise
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code)
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]")
            raise typer.Exit(130)
        except Exception as exc:  # a bug or an environment failure: still one line unless --debug
            if _debug_enabled():
                raise
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            err_console.print(
                f"[bold red]error:[/] {type(exc).__name__}: {msg} (run with --debug for the traceback)",
                highlight=False, soft_wrap=True,
            )
            raise typer.Exit(1)

    return wrapper


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



def main() -> None:
    from ttcompress.cli import decompose, spectrum  # noqa: F401  (registers the commands)

    for name in OPTIONAL_COMMANDS:
        try:
            __import__(f"ttcompress.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"ttcompress.cli.{name}":
                raise
    app()


OPTIONAL_COMMANDS = ("init", "finetune", "evaluate", "demo", "sensitivity")
