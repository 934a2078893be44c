"""User-facing errors.

Every problem caused by the user's input (a file, a tensor, a plan, a flag) is raised
as :class:`AmpqError`; the CLI prints its one-line message and exits with code 2.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class AmpqError(Exception):
    """Bad input: the message names the file/tensor/node, and what was expected vs given."""

    exit_code = 2


def check(condition: bool, message: str) -> None:
    """Raise :class:`AmpqError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise AmpqError(message)
