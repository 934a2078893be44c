"""User-facing errors.

Every problem caused by the user's input (a file, a tensor, a plan, a flag) is raised
as :class:`AmpqError`; the CLI prints its one-line message and exits with code 2.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


class AmpqError(Exception):
    """Bad input: the message names the file/tensor/node, and what was expected vs given."""

    exit_code = 2


def check(condition: bool, message: str) -> None:
    """Raise :class:`AmpqError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise AmpqError(message)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


@contextlib.contextmanager
def runtime_errors(what: str) -> Iterator[None]:
    """ONNX Runtime refusing or failing on the user's model becomes :class:`AmpqError`.

    Only ONNX Runtime's own exception types (``onnxruntime.capi...Fail``, ``InvalidGraph``,
    ``InvalidArgument``, ...) are converted: they describe the model or the inputs it was
    given. Any other exception is a bug here and keeps its traceback.
    """
    try:
        yield
    except AmpqError:
        raise
    except Exception as exc:
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        raise AmpqError(f"{what}: ONNX Runtime cannot run it ({first_line(exc)})") from None
