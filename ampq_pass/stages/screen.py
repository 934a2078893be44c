"""Screen each layer's self-contained formats before the subgraphs are timed (issue 12).

The number of configurations a subgraph is timed in is the product of its layers' candidate
counts (times the states of its cuts), so every candidate a layer does not need multiplies
the cold time of the pass: ConvNeXt-tiny's 18 blocks have 2 x 4 x 4 configurations each
before cut states, about 1,400 in all, and the pass ran past 10 minutes in the timing stage.

A *self-contained* format keeps its cost inside the layer: ``int8_dyn`` quantizes its own
input (DynamicQuantizeLinear + MatMulInteger), ``int4`` is weight-only, the 16-bit formats
cast at the layer's own edges. Its time on the layer alone is therefore what it costs in the
model, and it can be judged layer by layer. The cut-state format (``int8``, whose Q/DQ fuse
with neighbouring int8 ops across the layer's edges) is *protected*: alone it pays edge costs
the model does not, which is exactly what the boundary states exist to measure.

Definition. Layer ``l`` is timed alone in hp and in each of its screened candidates (one
interleaved group, :func:`ampq_pass.stages.timing.time_subgraph`). A screened format ``f`` is
*dominated* and dropped when

1. it is not faster than hp at all (median gain <= 0: hp loses no accuracy, so ``f`` cannot
   be on the front; a gain inside the noise is kept, since gains of several layers add up
   in a subgraph and one measured on a busy machine is easily inside it), or
2. another screened format ``g`` of ``l`` is faster than ``f`` beyond the noise of both and
   its predicted loss is no larger (``s[l][g] <= s[l][f]``).

Every dominated (layer, format) pair is also dominated in any configuration of any subgraph
that contains it, up to the interaction of neighbours the first-order model ignores anyway.

Except for a weight-only format on a memory-bound layer (at most :data:`MEMORY_BOUND_ROWS`
rows of activations per run: a decode step): timed alone, round after round, the layer's
weights stay in the CPU's caches, so fp32 reads them as fast as int4 does; in the model, whose
weights do not stay there, reading them is the cost int4 cuts. A decode step of a small Llama
(batch 1): the screen found int4 not faster alone on 5-8 of 29 MatMuls, and every MatMul in
int4 ran 2.14x over fp32 against 1.96x with those left hp. Such pairs are not screened.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from ampq_pass.core.cache import Cache
from ampq_pass.core.errors import AmpqError
from ampq_pass.core.formats import FORMATS, HP
from ampq_pass.core.measure import CostModel, Measurer
from ampq_pass.stages.boundaries import STATES
from ampq_pass.stages.calibrate import Ranges
from ampq_pass.stages.layers import Layer
from ampq_pass.stages.partition import Partition, Subgraph
from ampq_pass.stages.subgraphs import capture_inputs, extract
from ampq_pass.stages.timing import time_subgraph

#: layers whose inputs are captured in one run of the whole model: bounds the memory the
#: captured activations take (one batch of ConvNeXt's first stage is ~10 MB per layer)
CHUNK = 16
#: activation rows per run (tokens x batch) up to which a layer counts as memory-bound: a MAC
#: per 4-byte weight per row is far below what a CPU computes per byte it reads
MEMORY_BOUND_ROWS = 16


def activation_rows(batches: list[dict[str, np.ndarray]], layer: Layer) -> int | None:
    """Rows of ``layer``'s activation per run (its size over the last axis), from the captured
    batches; None when it is not among them."""
    x = next((b[layer.activation] for b in batches if layer.activation in b), None)
    if x is None or x.ndim == 0 or x.shape[-1] == 0:
        return None
    return int(x.size // x.shape[-1])


@dataclass
class ScreenEntry:
    """One (layer, screened format): its time alone against hp, and what became of it."""

    layer: str
    format: str
    speedup: float
    gain: float
    noise: float
    kept: bool
    reason: str = ""

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Screen:
    """The candidates left per layer, and the record of every screened (layer, format)."""

    candidates: dict[str, list[str]]
    entries: list[ScreenEntry] = field(default_factory=list)

    @property
    def dropped(self) -> list[ScreenEntry]:
        return [e for e in self.entries if not e.kept]

    def to_json(self) -> dict:
        return {"screened": len(self.entries), "dropped": len(self.dropped),
                "entries": [e.to_json() for e in self.entries]}

    def summary(self) -> str:
        """One line: how many screened pairs were dropped, per format and reason."""
        if not self.entries:
            return "no self-contained format to screen"
        counts: dict[tuple[str, str], int] = {}
        for e in self.dropped:
            counts[(e.format, e.reason)] = counts.get((e.format, e.reason), 0) + 1
        parts = [f"{fmt} on {n} layer{'s' if n > 1 else ''} ({why})" for (fmt, why), n in sorted(counts.items())]
        return (f"dropped {len(self.dropped)} of {len(self.entries)} (layer, format) pairs timed alone"
                + (": " + "; ".join(parts) if parts else ""))


def screened_formats(candidates: dict[str, list[str]], protect: tuple[str, ...] = STATES) -> dict[str, list[str]]:
    """Per layer, the candidates the screen judges: every format but hp and ``protect``."""
    return {l: [f for f in fs if f != HP and f not in protect] for l, fs in candidates.items()}


def dominated(alone: dict[str, tuple[float, float, float]], loss: dict[str, float]) -> dict[str, str]:
    """The dominated formats of one layer (module docstring), each with its reason.

    ``alone[f] = (time, gain over hp, noise of that gain)`` from one interleaved group;
    ``loss[f]`` the layer's predicted loss in ``f``. Formats missing from ``loss`` count as
    infinitely lossy (never dominate another).
    """
    out = {}
    for f, (t, gain, noise) in alone.items():
        if not gain > 0:
            out[f] = "not faster than hp alone"
    for f, (t, _, noise) in alone.items():
        if f in out:
            continue
        for g, (tg, _, ng) in alone.items():
            if g == f or g in out:
                continue
            if t - tg > math.hypot(noise, ng) and loss.get(g, math.inf) <= loss.get(f, math.inf):
                out[f] = f"{g} faster alone and no lossier"
                break
    return out


def layer_subgraph(model: onnx.ModelProto, layer: Layer, index: int) -> Subgraph:
    """The layer's node alone as a :class:`Subgraph`: its non-constant inputs in, its outputs out."""
    consts = {t.name for t in model.graph.initializer}
    node = None
    for n in model.graph.node:  # topological order: one pass finds what is made of constants only
        if n.name == layer.name:
            node = n
            break
        if n.input and all(t in consts for t in n.input if t):
            consts.update(n.output)
    if node is None:
        raise AmpqError(f"layer {layer.name!r} is not a node of the model")
    inputs = [t for t in dict.fromkeys(node.input) if t and t not in consts]
    return Subgraph(index, layer.name, [node.name], inputs, list(node.output), [layer.name], [[layer.name]], "layer")


def screen_formats(model: onnx.ModelProto, layers: list[Layer], candidates: dict[str, list[str]],
                   loss: dict[str, dict[str, float]], ranges: Ranges | None, inputs: list[dict[str, np.ndarray]],
                   backend: Measurer, *, protect: tuple[str, ...] = STATES, cache: Cache | None = None,
                   max_batches: int = 2, progress=None) -> Screen:
    """Drop each layer's dominated self-contained formats (module docstring).

    ``candidates``: layer -> candidate formats; ``loss``: layer -> format -> predicted loss
    (the sensitivity's values); ``inputs``: whole-model feeds at the timing shapes (the first
    ``max_batches`` are used). A cost model is not screened: it costs nothing to evaluate
    every configuration. ``progress(n)`` is called as each layer starts.
    """
    out = Screen({l: list(fs) for l, fs in candidates.items()})
    if isinstance(backend, CostModel):
        return out
    screened = screened_formats(candidates, protect)
    todo = [l for l in layers if screened.get(l.name)]
    feeds = list(inputs)[:max_batches]

    def unscreened(layer: Layer, why: AmpqError) -> None:
        out.entries.extend(ScreenEntry(layer.name, f, math.nan, math.nan, math.nan, True, f"not screened: {why}")
                           for f in screened[layer.name])

    for start in range(0, len(todo), CHUNK):
        chunk = todo[start:start + CHUNK]
        try:
            part = Partition([layer_subgraph(model, l, start + i) for i, l in enumerate(chunk)])
            captured = capture_inputs(model, part, feeds)
        except AmpqError as exc:  # a screen that cannot run keeps every candidate: the subgraphs time them all
            for layer in chunk:
                unscreened(layer, exc)
                if progress is not None:
                    progress(1)
            continue
        for sg, layer in zip(part.subgraphs, chunk):
            batches = captured.pop(sg.index)
            rows = activation_rows(batches, layer)
            bound = rows is not None and rows <= MEMORY_BOUND_ROWS
            fmts = [f for f in screened[layer.name] if not (bound and f in FORMATS and not FORMATS[f].quantizes_activation)]
            out.entries.extend(ScreenEntry(layer.name, f, math.nan, math.nan, math.nan, True,
                                           f"not screened: weight-only on a memory-bound layer ({rows} rows)")
                               for f in screened[layer.name] if f not in fmts)
            if progress is not None:
                progress(1)
            if not fmts:
                continue
            try:
                gains = time_subgraph(extract(model, sg), [layer], [{layer.name: f} for f in fmts], ranges,
                                      batches, backend, index=sg.index, name=layer.name, cache=cache)
            except AmpqError as exc:  # the layer cannot stand alone: keep its formats for the subgraph timing
                unscreened(layer, exc)
                continue
            alone = {}
            for f in fmts:
                c = gains.lookup({layer.name: f})
                alone[f] = (c.time, c.measured_gain, c.noise)
            drop = dominated(alone, loss.get(layer.name, {}))
            for f in fmts:
                t, gain, noise = alone[f]
                out.entries.append(ScreenEntry(layer.name, f, gains.hp_time / t if t > 0 else math.inf, gain, noise,
                                               f not in drop, drop.get(f, "")))
            out.candidates[layer.name] = [f for f in candidates[layer.name] if f not in drop]
    return out
