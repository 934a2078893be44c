"""A mixed-precision plan: one format per quantizable layer, as plain data."""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ampq_pass.core.errors import AmpqError
from ampq_pass.core.formats import ALL_FORMATS, HP
from ampq_pass.stages.layers import Layer


@dataclass
class Plan:
    """``formats[node name] = format``; layers not named stay ``hp``. ``cuts[tensor] = state``:
    the cut tensors the plan quantizes, each with one Q/DQ that all its readers read (their
    states follow from the layers' formats: :mod:`ampq_pass.stages.boundaries`)."""

    formats: dict[str, str] = field(default_factory=dict)
    cuts: dict[str, str] = field(default_factory=dict)

    def format_of(self, layer: str) -> str:
        return self.formats.get(layer, HP)

    def used_formats(self) -> set[str]:
        return {f for f in self.formats.values() if f != HP}

    def to_json(self) -> dict:
        return {"formats": dict(self.formats), "cuts": dict(self.cuts)}

    @classmethod
    def uniform(cls, layers: list[Layer], fmt: str) -> "Plan":
        return cls({l.name: fmt for l in layers if fmt == HP or fmt in l.formats})


def load_plan(path: str | os.PathLike) -> Plan:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise AmpqError(f"{path}: no such plan file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AmpqError(f"{path}: not a JSON plan ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("formats"), dict):
        raise AmpqError(f'{path}: a plan is {{"formats": {{"<node name>": "<format>"}}}}; no "formats" object found')
    formats = data["formats"]
    for k, v in formats.items():
        if not isinstance(v, str):
            raise AmpqError(f"{path}: format of node {k!r} must be a string, got {type(v).__name__}")
    cuts = data.get("cuts", {})
    if not isinstance(cuts, dict) or not all(isinstance(v, str) for v in cuts.values()):
        raise AmpqError(f'{path}: "cuts" must be an object {{"<tensor>": "<state>"}}')
    return Plan(dict(formats), dict(cuts))


def validate_plan(plan: Plan, layers: list[Layer], source: str = "plan") -> None:
    """Every named node is a quantizable layer and every format is one it can take."""
    by_name = {l.name: l for l in layers}
    for tensor, state in plan.cuts.items():
        if state != HP and state not in ALL_FORMATS:
            raise AmpqError(f"{source}: cut tensor {tensor!r}: unknown state {state!r}, expected a format name")
    for node, fmt in plan.formats.items():
        if node not in by_name:
            close = difflib.get_close_matches(node, list(by_name), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise AmpqError(f"{source}: node {node!r} is not a quantizable layer of the model{hint}")
        if fmt not in ALL_FORMATS:
            raise AmpqError(f"{source}: node {node!r}: unknown format {fmt!r}, expected one of {', '.join(ALL_FORMATS)}")
        if fmt != HP and fmt not in by_name[node].formats:
            raise AmpqError(
                f"{source}: node {node!r} ({by_name[node].op_type}) cannot take format {fmt!r}; "
                f"expected one of {', '.join((HP,) + by_name[node].formats)}"
            )
