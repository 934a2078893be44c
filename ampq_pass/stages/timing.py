"""Measured time gain per subgraph configuration (design.md §3 "Time gain", "Timing protocol").

For each sequential subgraph: extract it as a standalone model, rewrite it once per
configuration with the same :class:`Ranges` as everywhere, time all configurations of
that subgraph *together* (interleaved) on real activations captured at its inputs, and
record ``gain = T(hp) - T(config)`` with its noise. A gain inside the noise counts as zero
and is flagged. Results are cached on disk per subgraph, keyed by what the timing depends
on, so a rerun times nothing it knows and an interrupted run resumes at the first
subgraph it had not finished. The key is the subgraph's *structure*
(:mod:`ampq_pass.core.structure`: ops, wiring, shapes; not names, not weight values), and
entries are stored with position tokens in place of layer and tensor names: the repeated
blocks of a network are timed once, and the others read that measurement
(``SubgraphGains.repeat_of``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, NamedTuple

import numpy as np
import onnx

from tqdm.auto import tqdm

from ampq_pass.core.cache import Cache, MemoryCache, cached, digest, model_digest
from ampq_pass.core.errors import AmpqError
from ampq_pass.core.formats import HP
from ampq_pass.core.memory import release_freed_memory
from ampq_pass.core.proto import expected_bytes
from ampq_pass.core.structure import canonical_names, node_token, structure_digest
from ampq_pass.core.measure import (CostModel, Measurer, Protocol, Timing, median_ci, quick_protocol, split_time,
                                   with_protocol, within)
from ampq_pass.stages.boundaries import (STATES, boundary_cuts, forces, joins, quantized_feeds, split_at_cuts,
                                        with_states)
from ampq_pass.stages.calibrate import Ranges
from ampq_pass.stages.layers import Layer
from ampq_pass.stages.partition import Partition, Subgraph, configs as partition_configs
from ampq_pass.stages.plan import Plan
from ampq_pass.stages.rewrite import rewrite, written_for
from ampq_pass.stages.subgraphs import extract


#: bump when the meaning of a cached entry changes (3: keyed by structure, names as tokens)
_CACHE_VERSION = 3

#: one timed configuration of a subgraph: its layers' formats and its cut tensors' states
Config = tuple[dict[str, str], dict[str, str]]


@dataclass
class ConfigGain:
    """One configuration of one subgraph: ``gain`` is ``measured_gain`` or 0 when not significant.

    ``cuts`` are the states of the subgraph's cut tensors it was timed with (none: all hp);
    ``forces`` the cuts its own formats quantize (:func:`ampq_pass.stages.boundaries.forces`);
    ``joins`` the int8 cuts it computes in int8 next to (:func:`ampq_pass.stages.boundaries.joins`).
    ``derived``: not timed but added up from two timed configurations (:func:`_edge_derived`).
    ``quick``: timed with the quick protocol only, being clearly dominated (:func:`_measure`).
    """

    formats: dict[str, str]
    time: float
    gain: float
    noise: float
    significant: bool
    measured_gain: float
    ci: tuple[float, float] = (math.nan, math.nan)
    cuts: dict[str, str] = field(default_factory=dict)
    forces: list[str] = field(default_factory=list)
    derived: bool = False
    quick: bool = False
    joins: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        d["ci"] = list(self.ci)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ConfigGain":
        return cls(dict(d["formats"]), float(d["time"]), float(d["gain"]), float(d["noise"]), bool(d["significant"]),
                   float(d["measured_gain"]), tuple(float(x) for x in d.get("ci", (math.nan, math.nan))),
                   dict(d.get("cuts", {})), list(d.get("forces", [])), bool(d.get("derived", False)),
                   bool(d.get("quick", False)), list(d.get("joins", [])))


@dataclass
class SubgraphGains:
    """One subgraph's configurations. ``cached``: read from an entry an earlier run stored;
    ``repeat_of``: the index of an earlier subgraph of the same table with the same structure,
    whose measurement this one reuses (:func:`gain_table`); ``key`` the cache key both share."""

    index: int
    name: str
    layers: list[str]
    hp_time: float
    configs: list[ConfigGain]
    cached: bool = False
    repeat_of: int | None = None
    key: str = ""

    def matching(self, formats: dict[str, str]) -> list[ConfigGain]:
        """The configurations (one per cut state) that give each layer its format in ``formats``."""
        want = {l: formats.get(l, HP) for l in self.layers}
        return [c for c in self.configs if {l: c.formats.get(l, HP) for l in self.layers} == want]

    def lookup(self, formats: dict[str, str], cuts: dict[str, str] | None = None) -> ConfigGain:
        """The configuration that gives each layer of this subgraph its format in ``formats``
        and each of its cuts its state in ``cuts`` (unnamed: hp)."""
        cuts = cuts or {}
        for c in self.matching(formats):
            if all(cuts.get(t, HP) == st for t, st in c.cuts.items()):
                return c
        want = {l: formats.get(l, HP) for l in self.layers}
        raise AmpqError(f"subgraph {self.index} ({self.name}): configuration {want} with cut states "
                        f"{ {t: cuts.get(t, HP) for c in self.configs for t in c.cuts} } was not timed "
                        f"(tied layers must share one format)")

    def to_json(self) -> dict:
        return {"index": self.index, "name": self.name, "layers": list(self.layers), "hp_time": self.hp_time,
                "configs": [c.to_json() for c in self.configs], "cached": self.cached, "repeat_of": self.repeat_of,
                "key": self.key}

    @classmethod
    def from_json(cls, d: dict) -> "SubgraphGains":
        repeat = d.get("repeat_of")
        return cls(int(d["index"]), d["name"], list(d["layers"]), float(d["hp_time"]),
                   [ConfigGain.from_json(c) for c in d["configs"]], bool(d.get("cached", False)),
                   None if repeat is None else int(repeat), str(d.get("key", "")))


@dataclass
class GainTable:
    """Per subgraph: hp time and every configuration's time, gain and noise; plain data."""

    backend: str
    key: dict
    unit: str
    subgraphs: list[SubgraphGains] = field(default_factory=list)
    #: measured end-to-end hp time of the whole model (same unit), when it was measured
    hp_total: float | None = None
    hp_total_noise: float | None = None
    #: factor the subgraphs' times were scaled by to add up to the model's hp time (:func:`fit_to_model`)
    parts_scale: float = 1.0
    #: per low-precision format: the whole model measured with every layer that can take it in
    #: it, and what that did to the configurations' times (:func:`fit_formats_to_model`)
    format_anchors: dict = field(default_factory=dict)
    #: cut tensor -> time the whole model saves there when it is int8 with int8 work on both
    #: sides (``ConfigGain.joins``), beyond what the parts timed alone show (:func:`fit_formats_to_model`)
    cut_bonus: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"backend": self.backend, "key": self.key, "unit": self.unit, "hp_total": self.hp_total,
                "hp_total_noise": self.hp_total_noise, "parts_scale": self.parts_scale,
                "format_anchors": self.format_anchors, "cut_bonus": self.cut_bonus,
                "subgraphs": [s.to_json() for s in self.subgraphs]}

    @classmethod
    def from_json(cls, d: dict) -> "GainTable":
        return cls(d["backend"], dict(d["key"]), d["unit"], [SubgraphGains.from_json(s) for s in d["subgraphs"]],
                   d.get("hp_total"), d.get("hp_total_noise"), float(d.get("parts_scale", 1.0)),
                   dict(d.get("format_anchors") or {}), {t: float(b) for t, b in (d.get("cut_bonus") or {}).items()})

    def cut_sides(self, cut: str) -> list[int]:
        """Positions (in ``subgraphs``) of the subgraphs with ``cut`` among their cut tensors."""
        return [i for i, s in enumerate(self.subgraphs) if any(cut in c.cuts for c in s.configs)]

    def joined_cuts(self, chosen: list[ConfigGain], cuts: Iterable[str] | None = None) -> list[str]:
        """The cuts (of ``cuts``, default all) that every subgraph next to them computes in int8
        next to under ``chosen`` (one configuration per subgraph, as :meth:`lookup_all` gives)."""
        if cuts is None:
            cuts = dict.fromkeys(t for c in chosen for t in c.joins)
        out = []
        for t in cuts:
            sides = self.cut_sides(t)
            if len(sides) > 1 and all(t in chosen[i].joins for i in sides):
                out.append(t)
        return out

    def bonus_cuts(self, chosen: list[ConfigGain]) -> list[str]:
        """The cuts with a bonus that ``chosen`` earns (:meth:`joined_cuts`)."""
        return self.joined_cuts(chosen, self.cut_bonus)

    def earned(self, chosen: list[ConfigGain]) -> float:
        """The bonus of the cuts ``chosen`` earns (:meth:`bonus_cuts`)."""
        return float(sum(self.cut_bonus[t] for t in self.bonus_cuts(chosen)))

    def cut_states(self, formats: dict[str, str]) -> dict[str, str]:
        """The cut states ``formats`` give (the cuts some subgraph's layers quantize, each in
        the state that subgraph was timed with)."""
        out = {}
        for s in self.subgraphs:
            for c in s.matching(formats):
                out.update({t: c.cuts[t] for t in c.forces})
        return out

    def plan(self, formats: dict[str, str]) -> Plan:
        """The plan of ``formats`` with the cut states they give."""
        return Plan({l: f for l, f in formats.items() if f != HP}, self.cut_states(formats))

    def lookup_all(self, formats: dict[str, str] | Plan) -> list[ConfigGain]:
        """Each subgraph's configuration for a plan (cut states derived from its formats)."""
        formats = formats.formats if isinstance(formats, Plan) else formats
        cuts = self.cut_states(formats)
        return [s.lookup(formats, cuts) for s in self.subgraphs]

    def bonus(self, formats: dict[str, str] | Plan) -> float:
        """The cut bonus a plan earns (:meth:`bonus_cuts` of its configurations)."""
        return self.earned(self.lookup_all(formats))

    def total_gain(self, formats: dict[str, str] | Plan) -> float:
        """G(plan) = sum over subgraphs of the chosen configuration's gain, plus the bonus of every
        cut with int8 work on both sides (:attr:`cut_bonus`)."""
        chosen = self.lookup_all(formats)
        return float(sum(c.gain for c in chosen) + self.earned(chosen))

    @property
    def n_configs(self) -> int:
        return sum(len(s.configs) for s in self.subgraphs)


def predict_speedup(table: GainTable, plan_formats: dict[str, str] | Plan, *, significant_only: bool = True) -> float:
    """``T_hp_total / (T_hp_total - sum_s g_s)`` for the plan, from the gain table alone.

    ``T_hp_total`` is the measured end-to-end hp time; without it (a table built without
    model inputs) the sum of the subgraphs' hp times stands in, which leaves out the
    side chains and is said here rather than hidden. With ``significant_only=False`` the
    raw measured gains are used, noise included.
    """
    total = table.hp_total if table.hp_total is not None else sum(s.hp_time for s in table.subgraphs)
    pick = (lambda c: c.gain) if significant_only else (lambda c: c.measured_gain)
    chosen = table.lookup_all(plan_formats)
    gain = sum(pick(c) for c in chosen) + table.earned(chosen)
    if total - gain <= 0:
        raise AmpqError(f"predicted time is not positive (T_hp {total:.4g} - gain {gain:.4g}); the gain table is inconsistent")
    return float(total / (total - gain))


# ----------------------------------------------------------------------------- keys

def input_signature(inputs: list[dict[str, np.ndarray]]) -> list:
    """Shapes and dtypes of the timing inputs: they set the time; their values barely do,
    and keying on values would make every new calibration set re-time everything."""
    return [sorted((k, str(v.dtype), list(v.shape)) for k, v in feeds.items()) for feeds in inputs]


@dataclass(frozen=True)
class Tokens:
    """A subgraph's layer and cut-tensor names -> position tokens
    (:func:`ampq_pass.core.structure.canonical_names`): cache entries are stored in tokens,
    so one entry serves every subgraph of the same structure, each reading it back in its
    own names. Layers and tensors are kept apart (ONNX lets a node and a tensor share a name)."""

    layers: dict[str, str]
    tensors: dict[str, str]

    @classmethod
    def of(cls, sub: onnx.ModelProto, configs: list[Config], names: dict[str, str] | None = None) -> "Tokens":
        names = names if names is not None else canonical_names(sub)
        # a name the subgraph does not hold keeps itself (marked): no other subgraph shares it
        layers = {l: node_token(names, l) or f"?{l}" for f, _ in configs for l in f}
        tensors = {t: names.get(t, f"?{t}") for _, st in configs for t in st}
        return cls(layers, tensors)

    def configs(self, configs: list[Config]) -> list:
        return [[sorted((self.layers[l], v) for l, v in f.items()), sorted((self.tensors[t], v) for t, v in st.items())]
                for f, st in configs]

    def encode(self, entry: dict) -> dict:
        """A :meth:`SubgraphGains.to_json` entry with tokens for names (and no index or name)."""
        return _renamed(entry, self.layers, self.tensors)

    def decode(self, entry: dict) -> dict:
        return _renamed(entry, {v: k for k, v in self.layers.items()}, {v: k for k, v in self.tensors.items()})


def _renamed(entry: dict, layers: dict[str, str], tensors: dict[str, str]) -> dict:
    def config(c: dict) -> dict:
        return dict(c, formats={layers.get(l, l): f for l, f in c["formats"].items()},
                    cuts={tensors.get(t, t): v for t, v in c.get("cuts", {}).items()},
                    forces=[tensors.get(t, t) for t in c.get("forces", [])],
                    joins=[tensors.get(t, t) for t in c.get("joins", [])])

    return dict(entry, index=0, name="", cached=False, repeat_of=None, key="",
                layers=[layers.get(l, l) for l in entry["layers"]], configs=[config(c) for c in entry["configs"]])


def subgraph_key(sub: onnx.ModelProto, configs: list[Config], inputs: list[dict[str, np.ndarray]],
                 measurer: Measurer, loss: dict[str, dict[str, float]] | None = None) -> tuple[str, Tokens]:
    """Cache key and name tokens: the subgraph's structure
    (:func:`ampq_pass.core.structure.structure_digest`: ops, attributes, wiring, shapes, dtypes;
    not names, not weight values), the configurations and input shapes in position tokens,
    the backend key, and whether dominated configurations are timed quickly only.

    Left out, because they do not change which kernels run on which shapes: the calibrated
    ranges (scale values), the weights' values, and the losses that pick the dominated
    configurations (a subgraph reusing another's entry keeps its quick measurements, which
    are measurements too, only less repeated).
    """
    names = canonical_names(sub)
    tokens = Tokens.of(sub, configs, names)
    shapes = [sorted((names.get(k, f"?{k}"), str(v.dtype), list(v.shape)) for k, v in feeds.items()) for feeds in inputs]
    parts = [structure_digest(sub, names), tokens.configs(configs), shapes, measurer.key()]
    if loss is not None:
        parts.append("prune")
    return digest("gain", _CACHE_VERSION, *parts), tokens


# ----------------------------------------------------------------------------- one subgraph

def config_name(formats: dict[str, str], states: dict[str, str] | None = None) -> str:
    used = sorted((l, f) for l, f in formats.items() if f != HP)
    cuts = sorted((t, st) for t, st in (states or {}).items() if st != HP)
    return ",".join([f"{l}={f}" for l, f in used] + [f"cut:{t}={st}" for t, st in cuts]) or HP


def time_subgraph(sub: onnx.ModelProto, layers: list[Layer], configs: list[dict[str, str] | Config], ranges: Ranges | None,
                  inputs: list[dict[str, np.ndarray]], measurer: Measurer, *, index: int = 0, name: str = "",
                  cache: Cache | None = None, loss: dict[str, dict[str, float]] | None = None,
                  seconds: float | None = None) -> SubgraphGains:
    """Time every configuration of one standalone subgraph model (hp first) and derive gains.

    With ``loss`` (layer -> format -> predicted loss), configurations that the quick protocol
    shows clearly dominated are not timed again with the full one (:func:`_measure`).
    ``seconds`` is the time allowed for its rounds (:func:`_measure`); None: the protocol's caps."""
    configs = full_configs(layers, configs)
    key, tokens = subgraph_key(sub, configs, inputs, measurer, loss)
    out, hit = cached(cache, "gain", key, lambda: _measure(sub, layers, configs, ranges, inputs, measurer, loss, seconds),
                      dump=lambda sg: tokens.encode(sg.to_json()),
                      load=lambda d: SubgraphGains.from_json(tokens.decode(d)))
    out.index, out.name, out.cached, out.key = index, name, hit, key
    return out


def full_configs(layers: list[Layer], configs: list[dict[str, str] | Config]) -> list[Config]:
    """Every configuration naming every layer of the subgraph (hp where unnamed) with its
    cut states (a bare format dict: all hp), the all-hp one first: what
    :func:`time_subgraph` times and keys the cache by."""
    names = [l.name for l in layers]
    pairs = [c if isinstance(c, tuple) else (c, {}) for c in configs]
    out = [({l: f.get(l, HP) for l in names}, dict(st)) for f, st in pairs]
    hp_config = ({l: HP for l in names}, {t: HP for _, st in out for t in st})
    out = [c for c in out if c != hp_config]
    return [hp_config] + out


def measure_subgraph(measurer: Measurer, sub: onnx.ModelProto, layers: list[Layer], configs: list[Config],
                     ranges: Ranges | None, inputs: list[dict[str, np.ndarray]],
                     loss: dict[str, dict[str, float]] | None = None, seconds: float | None = None) -> dict:
    """One job of a device pool: the cache entry :func:`time_subgraph` would store for
    ``configs`` (from :func:`full_configs`), measured on ``measurer`` (the worker's device)."""
    return _measure(sub, layers, configs, ranges, inputs, measurer, loss, seconds).to_json()


def time_on_pool(pool, work, ranges: Ranges | None, measurer: Measurer, *, cache: Cache | None = None,
                 bar=None, loss: dict[str, dict[str, float]] | None = None,
                 seconds: float | None = None, total: int = 0) -> list[SubgraphGains]:
    """Every subgraph of ``work`` (``(subgraph, standalone model, layers, configs, inputs)``
    tuples, consumed lazily) timed on a device pool, in ``work``'s order.

    One job per subgraph: all its configurations run on one device, interleaved exactly as
    :func:`time_subgraph` does. Entries already in ``cache`` are read, not dispatched; each
    finished job is stored at once under the same key, so an interrupted or resumed run, or
    one with more workers, reuses every finished measurement. ``pool.map(fn, jobs)`` runs
    ``fn(worker_measurer, *args)`` for each ``(tag, args)`` and yields ``(tag, result)`` as
    they finish (:class:`ampq_pass.backends.ray_pool.RayPool`). ``seconds`` (with ``total``, the
    configurations of all of ``work``) is shared among the jobs in proportion to their
    configurations, as :func:`gain_table` does; the devices run in parallel, so the stage takes
    at most about that long.
    """
    bar = bar or _NoBar()
    cache = cache if cache is not None else MemoryCache()
    done: dict[int, SubgraphGains] = {}
    waiting: dict[str, list] = {}  # key -> subgraphs of the same structure as one in flight

    def finish(pos: int, sg, tokens: Tokens, key: str, entry: dict, hit: bool, n: int) -> None:
        out = SubgraphGains.from_json(tokens.decode(entry))
        out.index, out.name, out.cached, out.key = sg.index, sg.name, hit, key
        done[pos] = out
        bar.update(n)

    def jobs():
        for pos, (sg, sub, sub_layers, cfgs, inputs) in enumerate(work):
            configs = full_configs(sub_layers, cfgs)
            key, tokens = subgraph_key(sub, configs, inputs, measurer, loss)
            if key in waiting:
                waiting[key].append((pos, sg, tokens, len(cfgs)))
                continue
            hit = cache.get("gain", key)
            if hit is not None:
                finish(pos, sg, tokens, key, hit, True, len(cfgs))
                continue
            waiting[key] = []
            share = None if seconds is None else seconds * len(cfgs) / max(total, len(cfgs))
            yield (pos, sg, key, tokens, len(cfgs)), (sub, sub_layers, configs, ranges, inputs, loss, share)

    for (pos, sg, key, tokens, n), data in pool.map(measure_subgraph, jobs()):
        entry = tokens.encode(data)
        cache.put("gain", key, entry)
        finish(pos, sg, tokens, key, entry, False, n)
        for w_pos, w_sg, w_tokens, w_n in waiting.pop(key, []):
            finish(w_pos, w_sg, w_tokens, key, entry, False, w_n)
    return [done[p] for p in sorted(done)]


def timed_model(sub: onnx.ModelProto, layers: list[Layer], config: Config, ranges: Ranges | None,
                rules=None) -> onnx.ModelProto:
    """The standalone subgraph as it runs inside the rewritten model under ``config``: the
    layers' formats, one Q/DQ on every int8 cut, and its edges moved past them
    (:func:`ampq_pass.stages.boundaries.split_at_cuts`)."""
    formats, states = config
    cuts = {t: st for t, st in states.items() if st != HP}
    model = rewrite(sub, layers, Plan(dict(formats), cuts), ranges, rules=rules)
    if not cuts:
        return model
    ins = {i.name: cuts[i.name] for i in sub.graph.input if i.name in cuts}
    outs = [o.name for o in sub.graph.output if o.name in cuts]
    try:
        return split_at_cuts(model, ins, outs)
    except AmpqError:
        # The fusion rules moved a cut's Q/DQ (a Relu folded across it), so its edge is not one
        # Q or DQ: time the subgraph with the Q/DQ inside and float edges rather than refuse a
        # valid model (the split had changed the model in place, hence a fresh rewrite).
        return rewrite(sub, layers, Plan(dict(formats), cuts), ranges, rules=rules)


#: models timed together: each session holds its own ONNX Runtime arena (ResNet-50's first
#: subgraph at batch 8: ~200 MB each; 16 configurations at once peaked at 3.3 GB), so the
#: configurations of a large subgraph are timed in groups, each with the hp configuration
GROUP = 8
#: what the sessions of one group may hold together, by :func:`session_bytes`: a Whisper-tiny
#: encoder layer at batch 8 x 1500 tokens has 432 MB attention-score tensors, so 8 sessions of
#: it would hold several GB; such a subgraph is timed 2 or 3 configurations at a time (the pass
#: still peaked at 5.7 GB on it at batch 8, so the rest of that peak comes from elsewhere)
GROUP_BYTES = 1 << 30


def session_bytes(sub: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> int:
    """An upper bound on what one session of ``sub`` holds while it runs on ``feeds``: its
    weights plus every tensor it computes, at the shapes onnx shape inference gives for the
    feeds' concrete shapes (tensors of unknown shape count nothing). The arena reuses memory
    between tensors whose lives do not overlap, so the session usually needs less."""
    model = _shaped(sub, feeds)
    return _initializer_bytes(model) + sum(_computed_bytes(model).values())


def subgraph_session_bytes(model: onnx.ModelProto, partition: Partition,
                           feeds: dict[str, np.ndarray]) -> tuple[int, dict[int, int]]:
    """:func:`session_bytes` of ``model`` at ``feeds`` and of each subgraph of ``partition``
    (index -> bytes) at the tensors the model computes there, from one shape inference of the
    whole model: a subgraph's session holds the initializers its nodes read and the tensors its
    nodes compute. Extracting every subgraph to infer it alone gave the same within the
    constants an extracted subgraph embeds, at the cost of a copy of the model per subgraph."""
    shaped = _shaped(model, feeds)
    computed = _computed_bytes(shaped)
    sizes = {t.name: int(np.prod(t.dims, dtype=np.int64)) * _itemsize(t.data_type) for t in shaped.graph.initializer}
    by_name = {n.name: n for n in shaped.graph.node}
    held = {}
    for s in partition.subgraphs:
        nodes = [by_name[name] for name in s.nodes if name in by_name]
        read = {t for n in nodes for t in n.input if t in sizes}
        held[s.index] = sum(sizes[t] for t in read) + sum(computed.get(o, 0) for n in nodes for o in n.output)
    return sum(sizes.values()) + sum(computed.values()), held


def _shaped(sub: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``sub`` with its inputs fixed to the feeds' shapes and shapes inferred (as far
    as onnx shape inference goes; a model it refuses keeps no value_info)."""
    model = onnx.ModelProto()
    model.CopyFrom(sub)
    for vi in model.graph.input:
        if vi.name in feeds and vi.type.HasField("tensor_type"):
            dims = vi.type.tensor_type.shape.dim
            del dims[:]
            for d in np.shape(feeds[vi.name]):
                dims.add().dim_value = int(d)
    del model.graph.value_info[:]
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - an estimate only: inference refusing a model leaves the weights
        return model


def _initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims, dtype=np.int64)) * _itemsize(t.data_type) for t in model.graph.initializer)


def _computed_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> bytes, for the value_info and outputs of ``model`` whose shape is fully known."""
    out = {}
    for vi in list(model.graph.value_info) + list(model.graph.output):
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            out[vi.name] = int(np.prod([d.dim_value for d in tt.shape.dim], dtype=np.int64)) * _itemsize(tt.elem_type)
    return out


#: what one session of the whole model may hold at the timing batch, by :func:`session_bytes`:
#: nudenet's YOLOv8n fed 736 x 3008 images holds about 1.1 GB of computed tensors per 2 images,
#: and at the default batch 8 the pass went past 3.6 GB in the timing stage (every subgraph's
#: captured inputs are held at that batch too, and the anchor runs the model beside subgraphs)
TIMING_SESSION_BYTES = 1 << 30


def fit_timing_batch(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]],
                     bound: int | None = None) -> tuple[list[dict[str, np.ndarray]], str | None]:
    """``feeds`` (batches along axis 0) cut to the largest batch whose whole-model session holds
    at most ``bound`` bytes (default :data:`TIMING_SESSION_BYTES`), and a note saying so (None:
    left as they are).

    :func:`session_bytes` at the batch given and at batch 1 give the bytes per sample (the
    weights do not grow with the batch); the batch is never cut below 1. A smaller batch
    times the same kernels on the same real samples; per-sample times shift a little (less
    parallel work per run) and the user can ask for a batch with ``--shape``.
    """
    bound = TIMING_SESSION_BYTES if bound is None else bound
    batch = min(len(v) for v in feeds[0].values()) if feeds and feeds[0] else 0
    if batch <= 1:
        return feeds, None
    full = session_bytes(model, feeds[0])
    if full <= bound:
        return feeds, None
    one = session_bytes(model, {k: v[:1] for k, v in feeds[0].items()})
    per = (full - one) / (batch - 1)
    if per <= 0:
        return feeds, None
    fits = int(max(1, min(batch - 1, (bound - (one - per)) // per)))
    note = (f"batch cut from {batch} to {fits}: the whole model's session would hold {full / 2**30:.2f} GiB of "
            f"weights and tensors at {batch} (bound {bound / 2**30:.2f} GiB); --shape names another batch")
    return [{k: v[:fits] for k, v in f.items()} for f in feeds], note


def _itemsize(elem_type: int) -> int:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 4


def group_size(sub: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> int:
    """Configurations timed at once (hp included): :data:`GROUP`, fewer when their sessions
    would hold more than :data:`GROUP_BYTES` together, never fewer than 2 (hp and one)."""
    return max(2, min(GROUP, GROUP_BYTES // max(session_bytes(sub, feeds), 1)))


#: of the timing allowance, the share the subgraphs' configurations may use; the rest is for the
#: whole-model anchors after them (:func:`anchor_hp_times`, :func:`fit_formats_to_model`): on
#: OpenVINO, ConvNeXt-T's timing stage took 514 s of a 325 s allowance when the anchors (hp,
#: int8, int8_sym, each up to the protocol's 60 s cap, and their compilations) ran outside it
SUBGRAPH_SHARE = 0.7

#: at least this many timed configurations before the quick first pass pays for itself
PRUNE_MIN = 8


def _measure(sub: onnx.ModelProto, layers: list[Layer], configs: list[Config], ranges: Ranges | None,
             inputs: list[dict[str, np.ndarray]], measurer: Measurer,
             loss: dict[str, dict[str, float]] | None = None, seconds: float | None = None) -> SubgraphGains:
    """Time ``configs`` (hp first) in groups, each with hp; gains on the first group's scale.

    ``seconds`` is the time allowed for all the rounds: each group's attempt may take what is
    left divided by the groups still to time (:func:`ampq_pass.core.measure.within`), and
    never less than the protocol's ``min_repeats`` rounds. A large subgraph then gets fewer
    rounds, so wider confidence intervals (its gains' noise says how wide), instead of making
    the pass run for as long as its configurations times fifty rounds.

    With ``loss`` and a backend that follows a :class:`Protocol`, every configuration is first
    timed with the quick protocol (:func:`ampq_pass.core.measure.quick_protocol`), and only
    those not *clearly dominated* are timed again with the full one: a configuration is
    clearly dominated when another with the same cut states has no more predicted loss and
    a quick gain larger beyond both quick noises. The solver never picks it on any budget
    (the other is as accurate and faster), so its time needs no more precision; it keeps its
    quick measurement (``ConfigGain.quick``). On a transformer block with int8, int8_dyn and
    cut states most configurations are dominated, and the timing rounds are what the cold
    time is made of (DistilBERT: 108 configurations of one attention block took 7 minutes).
    """
    names = [l.name for l in layers]
    labels = [config_name(*c) for c in configs]
    if isinstance(measurer, CostModel):
        timings = {lab: Timing.exact(measurer.cost(sub, layers, f, inputs)) for lab, (f, _) in zip(labels, configs)}
        hp = timings[labels[0]]
        by_label = {lab: _config_gain(f, st, hp, timings[lab]) for lab, (f, st) in zip(labels, configs)}
        return SubgraphGains(0, "", names, hp.median, [by_label[lab] for lab in labels])
    rules = measurer.capabilities().rules  # the backend's fusions, as in the whole-model rewrite
    derived = _edge_derived(configs)
    graph_inputs = {i.name for i in sub.graph.input}
    int8_inputs = sorted({(t, v) for _, st in configs for t, v in st.items() if v != HP and t in graph_inputs})
    feeds = quantized_feeds(inputs, int8_inputs, ranges)
    by_config = dict(zip(labels, configs))
    timed = [lab for lab in labels[1:] if lab not in derived]  # labels[0]: all hp (full_configs)
    size = group_size(sub, feeds[0]) if feeds else GROUP
    scale: list[float] = []  # the first group's hp median: every group is put on it

    started = time.monotonic()

    def in_groups(todo: list[str], timer: Measurer) -> dict[str, ConfigGain]:
        out: dict[str, ConfigGain] = {}
        starts = range(0, max(len(todo), 1), size - 1)
        for k, start in enumerate(starts):
            group = [labels[0]] + todo[start:start + size - 1]
            models = {lab: timed_model(sub, layers, by_config[lab], ranges, rules) for lab in group}
            left = None if seconds is None else seconds - (time.monotonic() - started)
            timings = (timer if left is None else within(timer, left / (len(starts) - k))).time(models, feeds)
            del models
            release_freed_memory(collect=False)  # the group's sessions and arenas, freed but resident until trimmed
            hp_g = timings[labels[0]]
            # every group on the first group's scale: a group timed while the machine was busier
            # keeps its ratios to hp (gain and noise scale alike, significance is unchanged)
            if not scale:
                scale.append(hp_g.median)
            factor = scale[0] / hp_g.median if hp_g.median > 0 else 1.0
            for lab in group:
                if lab not in out:
                    out[lab] = _config_gain(*by_config[lab], hp_g, timings[lab], factor)
        return out

    protocol = getattr(measurer, "protocol", None)
    if loss is not None and isinstance(protocol, Protocol) and len(timed) >= PRUNE_MIN:
        first = in_groups(timed, with_protocol(measurer, quick_protocol(protocol)))
        losses = {lab: _config_loss(by_config[lab][0], loss) for lab in first}
        keep = [lab for lab in timed if not _clearly_dominated(lab, first, losses)]
        by_label = {lab: dataclasses.replace(c, quick=True) for lab, c in first.items()}
        by_label.update(in_groups(keep, measurer))
    else:
        by_label = in_groups(timed, measurer)
    hp_time = by_label[labels[0]].time
    for lab, (f, st) in zip(labels, configs):
        if lab in derived:
            b, e = (by_label[x] for x in derived[lab])
            measured = b.measured_gain + e.measured_gain
            by_label[lab] = _gain(f, st, hp_time - measured, measured, math.hypot(b.noise, e.noise),
                                  (math.nan, math.nan), derived=True)
    return SubgraphGains(0, "", names, hp_time, [by_label[lab] for lab in labels])


def _config_loss(formats: dict[str, str], loss: dict[str, dict[str, float]]) -> float:
    """The configuration's predicted loss: its layers' losses added (a missing one: infinite)."""
    return sum(loss.get(l, {}).get(f, math.inf) for l, f in formats.items() if f != HP)


def _clearly_dominated(label: str, quick: dict[str, ConfigGain], losses: dict[str, float]) -> bool:
    """Whether another quickly timed configuration with the same cut states has no more loss
    and a gain larger beyond both noises (see :func:`_measure`)."""
    me = quick[label]
    return any(other != label and c.cuts == me.cuts and losses[other] <= losses[label]
               and c.measured_gain - c.noise > me.measured_gain + me.noise
               for other, c in quick.items())


def _config_gain(formats: dict[str, str], states: dict[str, str], hp: Timing, t: Timing,
                 factor: float = 1.0) -> ConfigGain:
    return _gain(formats, states, t.median * factor, (hp.median - t.median) * factor, gain_noise(hp, t) * factor,
                 (t.ci_low * factor, t.ci_high * factor))


def _gain(formats: dict[str, str], states: dict[str, str], time: float, measured: float, noise: float,
          ci: tuple[float, float], *, derived: bool = False) -> ConfigGain:
    """A configuration's entry: a gain inside its noise counts as zero."""
    significant = abs(measured) > noise
    return ConfigGain(dict(formats), time, measured if significant else 0.0, noise, significant, measured, ci,
                      dict(states), derived=derived)


def _edge_derived(configs: list[Config]) -> dict[str, tuple[str, str]]:
    """Configurations not timed: label -> (labels of the two timed ones whose gains it adds).

    A configuration with no layer in the cut state's format (int8) whose cuts are int8 only
    because its neighbours quantize them differs from the same formats with hp cuts by a
    Q or DQ at its edge that no op of its own fuses with (there is no int8 kernel inside to
    fuse with): its gain is taken as the formats' gain with hp cuts plus the gain of the
    all-hp formats with those cut states. On a transformer block with int8_dyn and int4
    candidates this spares most of what an int8 neighbour adds (it doubles the
    configurations); where an int8 layer could fuse across the edge (CNNs: QLinearConv ->
    Relu -> Q) everything is timed. The report counts derived configurations.
    Configurations must come from :func:`full_configs` (the all-hp one first) and
    :func:`ampq_pass.stages.boundaries.with_states` (every free state also offered as hp).
    """
    labels = {config_name(*c) for c in configs}
    out = {}
    for formats, states in configs:
        if any(f in STATES for f in formats.values()) or all(f == HP for f in formats.values()):
            continue
        if all(v == HP for v in states.values()):
            continue
        base = config_name(formats, {t: HP for t in states})
        edge = config_name({l: HP for l in formats}, states)
        if base in labels and edge in labels:
            out[config_name(formats, states)] = (base, edge)
    return out


def gain_noise(hp: Timing, other: Timing) -> float:
    """Half-width of the 95% CI of the gain.

    Interleaved rounds pair the samples (same round, same inputs), so the CI of the
    median of per-round differences is used: drift common to both cancels. Unpaired
    samples fall back to combining the two medians' half-widths in quadrature.
    """
    if hp is other:
        return 0.0
    a, b = np.asarray(hp.samples), np.asarray(other.samples)
    if len(a) == len(b) and len(a) >= 2:
        lo, hi = median_ci(a - b)
        return float((hi - lo) / 2.0)
    return float(math.hypot(hp.half_width, other.half_width))


# ----------------------------------------------------------------------------- whole model

def gain_table(model: onnx.ModelProto, layers: list[Layer], partition, ranges: Ranges | None,
               inputs_by_subgraph: dict[int, list[dict[str, np.ndarray]]], backend: Measurer, *,
               formats: Iterable[str] | None = None, cache: Cache | None = None, progress: bool = True,
               model_inputs: list[dict[str, np.ndarray]] | None = None, max_batches: int | None = None,
               pool=None, boundary_states: bool = True, candidates: dict[str, list[str]] | None = None,
               loss: dict[str, dict[str, float]] | None = None, seconds: float | None = None) -> GainTable:
    """The gain table of every configuration of every subgraph of ``partition``.

    ``formats`` narrows the candidates; only formats the backend runs fast are used.
    ``model_inputs`` (batches for the whole model) also measures the end-to-end hp time
    that :func:`predict_speedup` divides by. ``max_batches`` bounds the captured batches
    used per subgraph (one batch per timing round, cycled). ``pool`` (a device pool such as
    :class:`ampq_pass.backends.ray_pool.RayPool`) times the subgraphs in parallel, one per
    device, through the same cache (:func:`time_on_pool`); the table is the same.
    With ``boundary_states`` (and a measuring backend) each configuration is also timed with
    every state its cut tensors can have (:mod:`ampq_pass.stages.boundaries`); without, every
    cut is timed in high precision, as in the paper. ``candidates`` (layer -> formats, such as
    :func:`ampq_pass.stages.screen.screen_formats` leaves) narrows each layer further.
    ``loss`` (layer -> format -> predicted loss, the sensitivity) lets each subgraph time its
    clearly dominated configurations with the quick protocol only (:func:`_measure`).
    ``seconds`` is the time allowed for timing the subgraphs: what is left of it goes to each
    subgraph in proportion to its configurations (a subgraph reusing an earlier one's timing
    spends nothing and leaves its share to the rest); within a subgraph, the protocol's rounds
    give way to it (:func:`_measure`). None: every measurement runs to the protocol's caps.
    """
    caps = backend.capabilities()
    wanted = caps.formats if formats is None else caps.filter(tuple(formats))
    by_name = {l.name: l for l in layers}
    # without a disk cache the run still times each distinct block once
    cache = cache if cache is not None else MemoryCache()
    table = GainTable(getattr(backend, "name", type(backend).__name__), backend.key(), backend.unit)
    # per-layer candidates: what the layer can take and the backend runs fast
    candidates = {l.name: [f for f in l.formats if f in wanted and (candidates is None or f in candidates.get(l.name, ()))]
                  for l in layers}
    cuts = boundary_cuts(model, partition, layers) if boundary_states and not isinstance(backend, CostModel) else {}
    plan_cfgs = [(sg, with_states(sg.index, partition_configs(sg, candidates), cuts, by_name, candidates))
                 for sg in partition.subgraphs]
    total = sum(len(c) for _, c in plan_cfgs)
    bar = _progress(total, progress, backend)
    def work():
        for sg, cfgs in plan_cfgs:
            sub_layers = [by_name[_layer_name(l)] for l in sg.layers]
            inputs = inputs_by_subgraph.get(sg.index)
            if not inputs:
                raise AmpqError(f"subgraph {sg.index} ({sg.name}): no captured inputs to time it on")
            if max_batches is not None:
                inputs = inputs[:max_batches]
            bar.set_postfix_str(f"subgraph {sg.index} {sg.name}"[:40])
            yield sg, extract(model, sg), sub_layers, cfgs, inputs

    started, remaining = time.monotonic(), total
    parts = None if seconds is None else seconds * SUBGRAPH_SHARE

    def left() -> float | None:
        return None if seconds is None else max(seconds - (time.monotonic() - started), 0.0)

    try:
        if pool is not None:
            table.subgraphs.extend(time_on_pool(pool, work(), ranges, backend, cache=cache, bar=bar, loss=loss,
                                                seconds=parts, total=total))
        else:
            for sg, sub, sub_layers, cfgs, inputs in work():
                share = None if parts is None else \
                    max(parts - (time.monotonic() - started), 0.0) * len(cfgs) / max(remaining, 1)
                table.subgraphs.append(time_subgraph(sub, sub_layers, cfgs, ranges, inputs, backend,
                                                     index=sg.index, name=sg.name, cache=cache, loss=loss,
                                                     seconds=share))
                remaining -= len(cfgs)
                bar.update(len(cfgs))
    finally:
        bar.close()
    first: dict[str, SubgraphGains] = {}
    for sg in table.subgraphs:
        if sg.key in first:
            sg.repeat_of, sg.cached = first[sg.key].index, first[sg.key].cached
        first.setdefault(sg.key, sg)
        for c in sg.configs:
            c.forces = [t for t in c.cuts if t in cuts and forces(cuts[t], c.formats, by_name, sg.index)]
            c.joins = [t for t, st in c.cuts.items()
                       if st in STATES and t in cuts and joins(cuts[t], c.formats, by_name, sg.index, st)]
    if model_inputs:
        anchored_formats = ANCHORED_FORMATS if cuts else ()
        # the whole-model anchors share what the subgraphs left of the allowance: the hp one and
        # each 8-bit format's (:func:`fit_formats_to_model`) an equal part of it
        n_anchors = 1 + (len({f for fs in candidates.values() for f in fs} & set(anchored_formats))
                         if boundary_states else 0)
        hp_timer = backend if seconds is None else within(backend, left() / n_anchors)
        anchored = None if isinstance(backend, CostModel) else anchor_hp_times(
            model, partition, inputs_by_subgraph, model_inputs, hp_timer, cache=cache, max_batches=max_batches)
        if anchored is None:
            table.hp_total, table.hp_total_noise = measure_hp_total(model, layers, model_inputs, backend, cache=cache)
        else:
            (table.hp_total, table.hp_total_noise), hp_times = anchored
            for sg in table.subgraphs:
                rescale(sg, hp_times[sg.index])
        table.parts_scale = fit_to_model(table)
        if boundary_states and not isinstance(backend, CostModel):  # without states: the paper's model
            # the 8-bit anchors are part of the time model where some cut can carry 8 bits (a
            # decoder whose cuts all pass a norm first has none); the other uniform plans are
            # candidates, measured only while the timing allowance has time left
            table.format_anchors = fit_formats_to_model(table, model, layers, ranges, model_inputs, backend,
                                                        candidates, cache=cache, formats=anchored_formats,
                                                        seconds=left())
    return table


def fit_to_model(table: GainTable) -> float:
    """Scale every subgraph's times so that their hp times add up to no more than the model's.

    A subgraph timed alone pays costs at its edges that the model does not pay between
    subgraphs (ONNX Runtime's CPU EP reorders fp32 activations into and out of its blocked
    layout, and int8 ones into and out of NHWC, at every graph input and output): on the
    repo's residual CNN the hp subgraphs add up to 184 ms against 160 ms for the model, and
    the additive prediction ``T - sum of gains`` gave 5.3x for a plan measured at 2.8x.
    Scaling all times by the same factor keeps every ratio (and the solver's choice) and
    puts the gains on the model's scale (the same plan was then predicted at 2.81x). When the
    subgraphs add up to less than the model (side chains outside them), nothing is scaled.
    Returns the factor applied.
    """
    parts = sum(sg.hp_time for sg in table.subgraphs)
    if not table.hp_total or parts <= table.hp_total:
        return 1.0
    factor = table.hp_total / parts
    for sg in table.subgraphs:
        rescale(sg, sg.hp_time * factor)
    return factor


#: bounds on the factors :func:`fit_formats_to_model` applies: beyond them the whole-model
#: measurement says more than costs at edges (a broken plan, a burst of load)
FIT_BOUNDS = (0.5, 2.0)


#: the formats :func:`fit_formats_to_model` anchors by default: those whose cut states the
#: boundary model times (see its docstring for why not the others)
ANCHORED_FORMATS = STATES


def fit_formats_to_model(table: GainTable, model: onnx.ModelProto, layers: list[Layer], ranges: Ranges | None,
                         model_inputs: list[dict[str, np.ndarray]], backend: Measurer,
                         candidates: dict[str, list[str]], *, cache: Cache | None = None,
                         formats: Iterable[str] = ANCHORED_FORMATS, seconds: float | None = None) -> dict[str, dict]:
    """Scale the quantized configurations' times so that, for every low-precision format, the
    plan "every layer that can take it in it" is predicted at its measured whole-model time.

    More anchors for the time model, beside :func:`fit_to_model`'s hp one. A subgraph timed
    alone pays costs at its edges that the whole model pays only where something really
    changes there: ONNX Runtime's CPU EP runs int8 convolutions in NHWC, so every int8
    subgraph timed alone has a Transpose at each edge, and the hp ones reorder into and out
    of the blocked NCHWc layout; in the model, neighbours with the same layout pass the
    tensor on as it is. Fitting all times to the hp model scales the quantized configurations
    by the hp edges' factor, not their own: ResNet-50 was predicted at 2.41x and measured at
    2.83x, ViT-S at 2.12x and 2.49x.

    So for each format ``p`` the plan with every layer that can take ``p`` in ``p`` (cut states
    as the table derives them) is rewritten and timed against the hp model, paired; its
    configurations hold ``p`` and hp only, and their times get the one factor that makes the
    table predict that measured ratio. A configuration mixing formats gets the mean of their
    factors, weighted by its layers. Plans between the anchors are predicted from parts
    fitted at the ends; a plan equal to an anchor is predicted at its own measurement (the
    report says which: ``boundaries.format_anchors``). A format's factor is left at 1 when
    its anchor's prediction is already within the measurement's noise, or when the factor
    falls outside :data:`FIT_BOUNDS`. Returns ``{format: what was measured and done}``.

    For int8, when the model is *faster* than its parts and the anchor has int8 cuts with int8
    work on both sides (``ConfigGain.joins``), the difference is credited to those cuts instead
    (``GainTable.cut_bonus``, the same amount each), and a plan earns a cut's bonus only where
    its own subgraphs on both sides join it (the solver's AND variables,
    :func:`ampq_pass.stages.solve.solve`). The bonus is tried before the factor's bounds: it
    scales no configuration, so a factor out of bounds says nothing against it.
    That is where the model saves what the parts pay: each int8 subgraph timed alone converts
    its input from and its output to the plain layout, and in the model two int8 neighbours
    pass the int8 tensor on as it is; a factor spreads that saving over every int8
    configuration, also over an int8 subgraph between hp ones, which pays the conversions in
    the model too. Offline over YOLOv8n, ResNet-50, EfficientNet-B0 and MobileNetV2 plans the
    bonus model's error was 4.7% mean, 10.1% max, against 5.8% and 16.0% with the factor.

    The uniform plans of the other formats offered (int8_dyn, int4 on ONNX
    Runtime) are measured too, where the format covers at least half of the layers, but scale
    nothing: they are whole-model candidates the pass verifies when they beat its plan (at a
    decode step of a small Llama every MatMul in int4 ran 2.14x over fp32, where the
    subgraphs, each a millisecond alone, had made a mixed int4/int8 plan the fastest: 1.84x).

    Only ``formats`` are anchored, by default the 8-bit cut states, and only with boundary
    states (:func:`gain_table`). Measured (quiet Xeon): on the repo's residual CNN with states the
    int8 anchor took the solver's plan from 12.2% to 4.7% prediction error; without states
    the same fit gave 33% (parts that leave out the cut's Q/DQ are far from the anchor, and
    one factor does not carry over to a plan with hp layers); on MiniLM the int8_dyn anchor
    (uniform plan 8% faster than its parts) made a 27-of-36-layer plan over-predicted by 4.8%
    where it had been exact: the gain of a uniform plan is not spread evenly over its parts.

    ``seconds`` is the time allowed for these measurements: each gets an equal share of what
    is left when it starts (never fewer than the protocol's ``min_repeats`` rounds), the anchored
    formats first; the other formats' candidates are measured only while some of it is left.
    None: the protocol's caps.
    """
    if not table.hp_total:
        return {}
    wanted = set(formats)
    offered = list(dict.fromkeys(f for fmts in candidates.values() for f in fmts if f != HP))
    offered.sort(key=lambda f: f not in wanted)  # the anchors first: the time model needs them
    started = time.monotonic()
    records: dict[str, dict] = {}
    factors: dict[str, float] = {}
    todo = []
    for fmt in offered:
        uniform = uniform_formats(table, fmt)
        if fmt not in wanted and 2 * len(uniform) < len(layers):
            continue  # a whole-model candidate only where the format covers most layers (see below)
        try:
            chosen = table.lookup_all(uniform)
        except AmpqError:  # the configuration cap left this plan out of some subgraph
            continue
        mine = [(sg, c) for sg, c in zip(table.subgraphs, chosen) if fmt in c.formats.values()]
        if mine:
            todo.append(WholeModelPlan(fmt, uniform, chosen, mine))
    todo += _split_candidates(table, layers, [f for f in offered if f in wanted])
    for k, (fmt, uniform, chosen, mine, split) in enumerate(todo):
        left = None if seconds is None else seconds - (time.monotonic() - started)
        if fmt not in wanted and split is None and left is not None and left <= 0:
            # a candidate, not part of the time model: only while time is left (a split one is
            # measured as the anchors are, at the protocol's fewest rounds if need be: on
            # OpenVINO, MiniLM's timing stage spent its allowance and the split plan was never seen)
            continue
        timer = backend if left is None else within(backend, max(left, 0.0) / (len(todo) - k))
        plan = table.plan(uniform)
        key = digest("format_anchor", _CACHE_VERSION, "deployed", model_digest(model), plan.to_json(),
                     input_signature(model_inputs), backend.key())

        def measure(plan=plan, timer=timer) -> dict:
            # in the form the pass writes it, as the verification measures plans
            quantized = written_for(backend, model, layers, plan, ranges)
            t = timer.time({"hp": model, "plan": quantized}, model_inputs)
            ratios = np.asarray(t["plan"].samples) / np.asarray(t["hp"].samples)  # paired, round by round
            lo, hi = median_ci(ratios)
            return {"ratio": float(np.median(ratios)), "ratio_ci": [lo, hi]}

        got, _ = cached(cache, "gain", key, measure, dump=dict, load=dict)
        parts = sum(c.time for _, c in mine)
        rest = table.hp_total - sum(sg.hp_time for sg, _ in mine)  # hp parts and what no subgraph holds
        target = table.hp_total * got["ratio"]
        factor = (target - rest) / parts if parts > 0 else 1.0
        predicted = rest + parts
        lo, hi = (table.hp_total * r for r in got["ratio_ci"])
        record = {"layers": len(plan.formats), "formats": uniform, "predicted_speedup": table.hp_total / predicted,
                  **({"plan": _SPLIT_PLAN.format(*split)} if split else {}),
                  "measured_speedup": 1.0 / got["ratio"],
                  "measured_speedup_ci": [1.0 / got["ratio_ci"][1], 1.0 / got["ratio_ci"][0]],
                  "factor": factor, "applied": False}
        both = table.joined_cuts(chosen)
        if fmt not in wanted:
            records[fmt] = {**record, "factor": 1.0, "outcome": "measured as a whole-model candidate, nothing scaled"}
        elif lo <= predicted <= hi or math.isclose(predicted, target, rel_tol=1e-9):
            records[fmt] = {**record, "outcome": "within the noise of the measurement, nothing scaled"}
        elif fmt in STATES and both and predicted > target > rest:
            # The model is faster than its parts: credit the cuts where int8 meets int8 (see above).
            # Before the factor's bounds: a bonus changes no configuration's time, and the factor it
            # replaces says nothing about it (OpenVINO's ResNet-50: the int8 model 8.94x, its parts
            # 4.40x, factor 0.499 - that is the layout and FakeQuantize folding shared between int8
            # neighbours, which the bonus credits, not a broken measurement). ``target > rest``: the
            # int8 subgraphs cannot take less than nothing.
            bonus = (predicted - target) / len(both)
            # A cut's bonus is not kept per state: where two 8-bit formats' anchors (int8 and
            # int8_sym on OpenVINO) both credit a cut, it keeps the smaller, so that neither
            # format's plans are credited the other's larger saving.
            table.cut_bonus.update({t: min(bonus, table.cut_bonus.get(t, bonus)) for t in both})
            records[fmt] = {**record, "applied": True, "factor": 1.0, "parts_factor": factor, "cut_bonus": bonus,
                            "bonus_cuts": len(both),
                            "outcome": f"{len(both)} int8 cuts with int8 work on both sides credited "
                                       f"{bonus:.4g} {table.unit} each"}
        elif not FIT_BOUNDS[0] <= factor <= FIT_BOUNDS[1]:
            records[fmt] = {**record, "outcome": f"factor {factor:.3f} out of bounds {FIT_BOUNDS}, nothing scaled"}
        else:
            factors[fmt] = factor
            records[fmt] = {**record, "applied": True, "outcome": f"{fmt} configurations' times scaled by {factor:.3f}"}
    if factors:
        for sg in table.subgraphs:
            sg.configs = [_scaled(c, sg.hp_time, f) if (f := _mixed_factor(c.formats, factors)) != 1.0 else c
                          for c in sg.configs]
    return records


class WholeModelPlan(NamedTuple):
    """A whole-model plan :func:`fit_formats_to_model` measures: ``label`` names its record (a
    format, or ``"int8+int8_sym"`` for a split one), ``chosen`` is its configuration in every
    subgraph, ``mine`` the subgraphs where it is not all hp; ``split`` is ``(weight layers'
    format, activation MatMuls' format)`` for a split plan, ``None`` for a uniform one."""

    label: str
    formats: dict[str, str]
    chosen: list[ConfigGain]
    mine: list[tuple[SubgraphGains, ConfigGain]]
    split: tuple[str, str] | None = None


#: what a split candidate of :func:`_split_candidates` is, in words
_SPLIT_PLAN = "weight layers in {0}, activation-by-activation MatMuls in {1}"


def _split_candidates(table: GainTable, layers: list[Layer], formats: list[str]) -> list[WholeModelPlan]:
    """Whole-model candidates beside the uniform ones where the model has both weight layers and
    activation-by-activation MatMuls: the weight layers in one of ``formats``, those MatMuls in
    another (labelled ``"int8+int8_sym"``). A backend may run the two kinds fastest in different
    formats, and no uniform plan measures that mix: on OpenVINO MiniLM's weight MatMuls in
    ``int8`` with its attention MatMuls in ``int8_sym`` measured 2.67x over fp32, every layer in
    ``int8`` 2.37x, every layer in ``int8_sym`` 2.63x; the solver's plan, from the parts, 2.54x
    predicted (2.62x measured). Returned as :func:`fit_formats_to_model`'s to-do entries."""
    scores = {l.name for l in layers if l.weight is None}
    if not scores or len(scores) == len(layers):
        return []
    out = []
    for fw in formats:
        for fa in formats:
            if fw == fa:
                continue
            split = {**{l: f for l, f in uniform_formats(table, fw).items() if l not in scores},
                     **{l: f for l, f in uniform_formats(table, fa).items() if l in scores}}
            if not split.keys() & scores or not split.keys() - scores:
                continue
            try:
                chosen = table.lookup_all(split)
            except AmpqError:  # the configuration cap left this mix out of some subgraph
                continue
            mine = [(sg, c) for sg, c in zip(table.subgraphs, chosen) if set(c.formats.values()) - {HP}]
            out.append(WholeModelPlan(f"{fw}+{fa}", split, chosen, mine, split=(fw, fa)))
    return out


def uniform_formats(table: GainTable, fmt: str) -> dict[str, str]:
    """The plan "every layer in ``fmt`` that can be": in each subgraph, the configuration of
    ``fmt`` and hp with the most layers in ``fmt`` (layers tied by a shared input take one
    format together, so where the screen left ``fmt`` to some of them only, none takes it)."""
    out: dict[str, str] = {}
    for sg in table.subgraphs:
        mine = [c.formats for c in sg.configs if set(c.formats.values()) <= {HP, fmt}]
        best = max(mine, key=lambda f: sum(v == fmt for v in f.values()), default={})
        out.update({layer: f for layer, f in best.items() if f == fmt})
    return out


def _mixed_factor(formats: dict[str, str], factors: dict[str, float]) -> float:
    """The layer-weighted mean factor of a configuration's low-precision formats (1 for all-hp)."""
    low = [f for f in formats.values() if f != HP]
    return sum(factors.get(f, 1.0) for f in low) / len(low) if low else 1.0


def _scaled(c: ConfigGain, hp_time: float, factor: float) -> ConfigGain:
    """``c`` with its time multiplied by ``factor`` (its gain follows; its noise is the measurement's)."""
    time = c.time * factor
    out = _gain(c.formats, c.cuts, time, hp_time - time, c.noise, (c.ci[0] * factor, c.ci[1] * factor),
                derived=c.derived)
    out.forces, out.joins = list(c.forces), list(c.joins)
    return out


def anchor_hp_times(model: onnx.ModelProto, partition, inputs_by_subgraph: dict[int, list[dict[str, np.ndarray]]],
                    model_inputs: list[dict[str, np.ndarray]], backend, *, cache: Cache | None = None,
                    max_batches: int | None = None) -> tuple[tuple[float, float], dict[int, float]] | None:
    """Every subgraph's hp time and the whole model's, timed interleaved in the same rounds.

    Each subgraph's configurations are timed in rounds of their own; if the machine was
    busier during one subgraph's rounds, all its times (hp included) are inflated and so
    is its gain, while the end-to-end hp time that :func:`predict_speedup` divides by
    was measured at another moment. Timing all hp subgraphs and the model together puts
    them on one scale; :func:`rescale` then keeps each subgraph's measured *ratios*
    (config / hp, which a uniform slowdown leaves unchanged) on that scale. The subgraphs go
    in chunks of bounded weight (:func:`anchor_chunks`), each timed with the whole model,
    which carries the scale from chunk to chunk. Returns None when the backend cannot time
    models with different inputs together.
    """
    by_index = {s.index: s for s in partition.subgraphs}
    key = digest("anchor", _CACHE_VERSION, model_digest(model), [s.to_json() for s in partition.subgraphs],
                 input_signature(model_inputs),
                 {s.index: input_signature(inputs_by_subgraph[s.index][:max_batches]) for s in partition.subgraphs},
                 backend.key())
    def measure() -> dict:
        sizes = weight_bytes(model, partition)
        # what each session holds while it runs: on a detector fed 2 x 736 x 3008 images the
        # subgraphs' activations, not their weights, made the anchor the pass's peak (4.4 GB)
        whole, held = subgraph_session_bytes(model, partition, model_inputs[0])
        chunks = anchor_chunks(model, partition, sizes, held, model_bytes=whole)
        # the scale goes from chunk to chunk through one subgraph of the first, timed in every
        # chunk: the heaviest, so that its own noise stays small (the whole model would do too,
        # at the cost of one more model run per round in every chunk)
        carrier = str(max(chunks[0], key=lambda s: sizes[s.index]).index)
        out: dict = {"subgraphs": {}}
        timer = split_time(backend, len(chunks))  # about as long in chunks as whole
        for k, chunk in enumerate(chunks):
            jobs = {"model": (model, model_inputs)} if k == 0 else {}
            for s in chunk if k == 0 else [by_index[int(carrier)]] + chunk:
                jobs[str(s.index)] = (extract(model, s), inputs_by_subgraph[s.index][:max_batches])
            timings = timer.time_each(jobs)
            del jobs
            if k == 0:
                total = timings.pop("model")
                out.update(total=total.median, noise=total.half_width, carrier=timings[carrier].median)
                factor = 1.0
            else:
                ref = timings.pop(carrier)
                factor = out["carrier"] / ref.median if ref.median > 0 else 1.0
            out["subgraphs"].update({name: t.median * factor for name, t in timings.items()})
        out.pop("carrier", None)
        return out

    try:
        result, _ = cached(cache, "gain", key, measure, dump=dict, load=dict)
    except NotImplementedError:  # the backend cannot time different models together
        return None
    return (float(result["total"]), float(result["noise"])), {int(k): float(v) for k, v in result["subgraphs"].items()}


#: weight bytes of the subgraphs timed beside the whole model at once by :func:`anchor_hp_times`:
#: all of GPT-2 small's at once (the model's session and every subgraph's, each holding its
#: weights) was the pass's peak, 4.8 GB against 3.4 GB in any other stage
ANCHOR_CHUNK_BYTES = 128 << 20
#: what the sessions of one chunk may hold, by :func:`session_bytes` (weights and every
#: computed tensor; the same bound as a group of configurations, :data:`GROUP_BYTES`)
ANCHOR_SESSION_BYTES = 1 << 30


def weight_bytes(model: onnx.ModelProto, partition: Partition) -> dict[int, int]:
    """Subgraph index -> bytes of the initializers its nodes read."""
    sizes = {t.name: expected_bytes(t) or 0 for t in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    return {s.index: sum(sizes.get(t, 0) for t in {t for name in s.nodes if name in by_name
                                                   for t in by_name[name].input})
            for s in partition.subgraphs}


def anchor_chunks(model: onnx.ModelProto, partition: Partition, sizes: dict[int, int] | None = None,
                  sessions: dict[int, int] | None = None, *, model_bytes: int = 0) -> list[list[Subgraph]]:
    """``partition``'s subgraphs in order, in runs whose initializers add up to at most
    :data:`ANCHOR_CHUNK_BYTES` and whose sessions (``sessions``: index -> :func:`session_bytes`)
    to at most :data:`ANCHOR_SESSION_BYTES`, the first run counting the whole model's session
    (``model_bytes``) too; every run has at least one subgraph. ``sizes`` as
    :func:`weight_bytes` gives them (computed when not given)."""
    sizes = sizes if sizes is not None else weight_bytes(model, partition)
    sessions = sessions or {}
    chunks: list[list] = [[]]
    weights, held = 0, model_bytes
    for s in partition.subgraphs:
        size, session = sizes[s.index], sessions.get(s.index, 0)
        if chunks[-1] and (weights + size > ANCHOR_CHUNK_BYTES or held + session > ANCHOR_SESSION_BYTES):
            chunks.append([])
            weights, held = 0, 0
        chunks[-1].append(s)
        weights += size
        held += session
    return [c for c in chunks if c]


def rescale(sg: SubgraphGains, hp_time: float) -> None:
    """Put a subgraph's timings on the scale of ``hp_time`` (its hp time measured with the
    others): every time, gain and noise is multiplied by ``hp_time / sg.hp_time``; which
    gains are significant does not change (a common factor scales gain and noise alike)."""
    if sg.hp_time <= 0 or hp_time <= 0:
        return
    factor = hp_time / sg.hp_time
    for c in sg.configs:
        c.time *= factor
        c.gain *= factor
        c.noise *= factor
        c.measured_gain *= factor
        c.ci = (c.ci[0] * factor, c.ci[1] * factor)
    sg.hp_time = hp_time


def _layer_name(layer) -> str:
    return layer if isinstance(layer, str) else layer.name


def measure_hp_total(model: onnx.ModelProto, layers: list[Layer], inputs: list[dict[str, np.ndarray]],
                     backend: Measurer, *, cache: Cache | None = None) -> tuple[float, float]:
    """End-to-end hp time of the whole model (median, CI half-width), cached like a subgraph."""
    if isinstance(backend, CostModel):
        return backend.cost(model, layers, {}, inputs), 0.0
    key = digest("hp_total", _CACHE_VERSION, model_digest(model), input_signature(inputs), backend.key())
    def measure() -> dict:
        t = backend.time({"hp": model}, inputs)["hp"]
        return {"median": t.median, "noise": t.half_width}

    hp, _ = cached(cache, "gain", key, measure, dump=dict, load=dict)
    return float(hp["median"]), float(hp["noise"])


class _NoBar:
    def update(self, n: int = 1) -> None: ...

    def set_postfix_str(self, s: str) -> None: ...

    def close(self) -> None: ...


def _progress(total: int, enabled: bool, backend: Measurer):
    if not enabled:
        return _NoBar()
    return tqdm(total=total, desc=f"timing on {getattr(backend, 'name', '')}", unit="config")


def table_json(table: GainTable) -> str:
    return json.dumps(table.to_json(), indent=1)
