"""Errors a user can cause, and how the CLI reports them.

`UserError` (and subclasses) mean "your input was wrong": the CLI prints its message on one line and exits with
code 2.  Anything else that escapes a command is a runtime failure (exit code 1).
"""

from __future__ import annotations


class TTCompressError(Exception):
    """Base class of every error this package raises on purpose.

    ``settings`` lists the setting names the message mentions as the library names them (``clip_to``);
    :meth:`render` spells them as the caller's interface does (the CLI: ``--clip-to``), so one message serves the
    library and the command line.
    """

    exit_code = 1

    def __init__(self, message: str = "", *settings: str) -> None:
        super().__init__(message)
        self.message = message
        self.settings = settings

    def render(self, spell) -> str:
        """The message with every named setting replaced by ``spell(name)``."""
        import re

        if not self.settings:
            return self.message
        pattern = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, self.settings)) + r")(?![\w-])")
        return pattern.sub(lambda m: spell(m.group(1)), self.message)


class UserError(TTCompressError):
    """Bad input: a missing file, a malformed option, a checkpoint that does not match its architecture."""

    exit_code = 2


class CheckpointError(UserError):
    """A checkpoint file that cannot be read, is unsafe, or does not fit the requested architecture."""


class DataError(UserError):
    """A data set that is missing, malformed, or cannot be fed to the model."""


class DivergenceError(TTCompressError):
    """Training produced a non-finite loss."""


class SettingError(UserError):
    """A setting with a bad value, named as the library names it (``clip_to``)."""
