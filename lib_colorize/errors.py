"""Errors that reach the user.

Every failure a user can cause or fix (a bad option, a missing or broken weight file) is a
:class:`ColorizeError`. Its message is shown as-is: in the webui as a notice and as the HTTP error text of
the API, on the command line as the error line. Anything else is a bug and keeps its own type.
"""
from __future__ import annotations

import os


class ColorizeError(Exception):
    """A failure the user can act on; ``str(error)`` is the complete message."""


class InvalidInput(ColorizeError, ValueError):
    """An option or input image is unusable. ``field`` names the option (API key / CLI flag stem)."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"ColorizeDiffusion: {field}: {message}")


class CheckpointError(ColorizeError):
    """A weight file cannot be used as it is. The message names the file and the problem."""

    def __init__(self, path: "str | os.PathLike[str]", problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"ColorizeDiffusion: {self.path}: {problem}")


class MissingWeights(ColorizeError):
    """A weight file is needed but absent and cannot be downloaded; the message says what to put where."""


class NotColorizeModel(ColorizeError):
    """The loaded model is not a ColorizeDiffusion checkpoint (e.g. a plain SD checkpoint in the webui)."""
