"""Backends: where time gains are measured (design.md §4).

Installed as ``ampq_pass.backends`` (see ``package-dir`` in pyproject.toml), so the
repository's top-level ``backends/`` folder never becomes a generic top-level module.
"""
