"""User-facing errors.

Every problem a user can cause (a bad flag, a missing folder, a checkpoint that does not fit) is
raised as :class:`CoErasingError`. The command-line entry points print its message as one
paragraph and exit with status 2 instead of showing a traceback.
"""

from __future__ import annotations


class CoErasingError(Exception):
    """An error the user can fix; the message says what was wrong and how to fix it."""


class NonFiniteLossError(CoErasingError):
    """The training loss became NaN or infinite."""
