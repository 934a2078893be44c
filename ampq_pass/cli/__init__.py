"""The command line: a thin shell over the Python API (``ampq-pass``, ``python -m ampq_pass.cli``)."""

from ampq_pass.cli.main import main

__all__ = ["main"]
