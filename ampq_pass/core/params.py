"""Parameter constraints declared as data, checked in one place with one message template.

After scikit-learn's ``utils/_param_validation.py``: a class declares
``{parameter: constraint}`` once and :func:`validate_params` checks every parameter,
raising ``AmpqError("<name> must be <what>, got <value>")``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ampq_pass.core.errors import AmpqError


class Constraint:
    """What a parameter may be; :meth:`describe` completes "``name`` must be ..."."""

    optional: bool = False

    def accepts(self, value) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Integer(Constraint):
    """An integer (not a bool) ``>= minimum``, not one of ``excluded``."""

    minimum: int
    optional: bool = False
    excluded: tuple[int, ...] = ()
    meaning: str = ""

    def accepts(self, value) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= self.minimum \
            and value not in self.excluded

    def describe(self) -> str:
        return self.meaning or f"an integer >= {self.minimum}"


@dataclass(frozen=True)
class Number(Constraint):
    """A finite real number ``>= minimum``."""

    minimum: float
    optional: bool = False

    def accepts(self, value) -> bool:
        return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
            and math.isfinite(value) and value >= self.minimum

    def describe(self) -> str:
        return f"a finite number >= {self.minimum:g}"


@dataclass(frozen=True)
class OneOf(Constraint):
    """One of a fixed set of values."""

    values: tuple
    optional: bool = False

    def accepts(self, value) -> bool:
        return value in self.values

    def describe(self) -> str:
        return "one of " + ", ".join(map(str, self.values))


@dataclass(frozen=True)
class SubsetOf(Constraint):
    """A non-empty tuple or list whose every item is one of ``values``."""

    values: tuple
    optional: bool = False

    def accepts(self, value) -> bool:
        return isinstance(value, (tuple, list)) and bool(value) and all(v in self.values for v in value)

    def describe(self) -> str:
        return "some of " + ", ".join(map(str, self.values))


@dataclass(frozen=True)
class Shapes(Constraint):
    """``{input name: shape}`` with every shape a non-empty sequence of positive integers."""

    optional: bool = False

    def accepts(self, value) -> bool:
        return isinstance(value, dict) and all(
            isinstance(s, (tuple, list)) and s and all(Integer(1).accepts(d) for d in s) for s in value.values())

    def describe(self) -> str:
        return "{input name: shape} with shapes of positive integers, batch first"


def validate_params(owner: object, constraints: dict[str, Constraint]) -> None:
    """Check every attribute of ``owner`` named in ``constraints``; the first violation raises."""
    for name, constraint in constraints.items():
        value = getattr(owner, name)
        if value is None and constraint.optional:
            continue
        if not constraint.accepts(value):
            raise AmpqError(f"{name} must be {constraint.describe()}, got {value!r}")
