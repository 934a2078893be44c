"""Sequential subgraphs (design.md §3 "Sequential subgraph", "Configuration").

The ONNX graph becomes a bipartite networkx DiGraph of op nodes and tensor nodes.
Every algorithm below is a plain function over that graph and states the definition it
computes; the graph algorithms themselves (dominators, articulation points, ancestors)
are networkx's.

Pipeline of :func:`partition`:

1. :func:`dataflow_graph` - ops and tensors, with *metadata edges* marked: an op that
   reads only a tensor's shape (``Shape``, ``Size``) does not depend on its values.
2. :func:`main_flow` - the ops that carry activation values; every other op is a
   *side node* (attention masks, position ids, rotary tables, shape arithmetic).
3. :func:`cut_tensors` - tensors through which every source-sink path of the main flow
   passes (the dominators of a virtual sink, seen from a virtual source).
4. :func:`segments` - the main ops between consecutive cuts; :func:`merge_layerless`
   folds segments without a quantizable layer into a neighbour.
5. :func:`fit_cap` - above ``max_configs`` configurations, layers reading the same tensor
   are tied to one decision, then the subgraph is split at finer cuts
   (:func:`finer_cuts`, articulation points), then groups of one kind are merged
   (:func:`coarsen_groups`), and as a last resort all its layers are tied.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from itertools import product

import networkx as nx
import onnx

from ampq_pass.core.errors import AmpqError
from ampq_pass.core.formats import HP
from ampq_pass.core.graph import node_names, outer_scope_reads
from ampq_pass.core.ops import WEIGHTED_OPS
from ampq_pass.stages.layers import Layer

#: Ops whose output depends only on the *shape* of their input, not on its values.
METADATA_OPS = frozenset({"Shape", "Size"})
NONDETERMINISTIC_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                                  "Multinomial", "Bernoulli"})
SOURCE, SINK = ("virtual", "source"), ("virtual", "sink")
KINDS = ("attention", "mlp", "conv", "other")


@dataclass
class Subgraph:
    """A run of main-flow ops between two cut tensors.

    ``inputs`` are the tensors its extracted model takes as graph inputs (cut tensors,
    side-chain tensors, model inputs); tensors made only from constants are embedded
    instead. ``outputs`` are the tensors it produces that later subgraphs or the model's
    outputs read. ``groups`` partitions ``layers``: layers of one group get one format.
    """

    index: int
    name: str
    nodes: list[str]
    inputs: list[str]
    outputs: list[str]
    layers: list[str]
    groups: list[list[str]]
    kind: str
    note: str = ""

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Partition:
    """Subgraphs in execution order, the side nodes outside all of them, and the cut tensors."""

    subgraphs: list[Subgraph]
    side_nodes: list[str] = field(default_factory=list)
    cuts: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"subgraphs": [s.to_json() for s in self.subgraphs], "side_nodes": list(self.side_nodes),
                "cuts": list(self.cuts)}

    @classmethod
    def from_json(cls, data: dict) -> "Partition":
        try:
            subgraphs = [Subgraph(**s) for s in data["subgraphs"]]
        except (KeyError, TypeError) as exc:
            raise AmpqError(f"partition JSON: malformed subgraph entry ({exc})") from None
        return cls(subgraphs, list(data.get("side_nodes", [])), list(data.get("cuts", [])))

    def subgraph_of(self, layer: str) -> Subgraph:
        for s in self.subgraphs:
            if layer in s.layers:
                return s
        raise AmpqError(f"layer {layer!r} is in no subgraph of this partition")


# --------------------------------------------------------------------------- graph

def op_key(name: str) -> tuple[str, str]:
    return ("op", name)


def tensor_key(name: str) -> tuple[str, str]:
    return ("tensor", name)


def dataflow_graph(model: onnx.ModelProto) -> nx.DiGraph:
    """The model as a bipartite DiGraph: ``("op", node name)`` and ``("tensor", name)``.

    Edges: producer op -> tensor -> consumer op. Node attributes: ``op_type`` and
    ``index`` (graph order) on ops; ``initializer``/``graph_input``/``graph_output``
    flags on tensors. An edge into an op from :data:`METADATA_OPS` carries
    ``meta=True``: the op reads the tensor's shape, not its values. Ops are keyed by
    :func:`ampq_pass.core.graph.node_names`.
    """
    g = nx.DiGraph()
    inits = {t.name for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    for vi in model.graph.input:
        g.add_node(tensor_key(vi.name), initializer=vi.name in inits, graph_input=vi.name not in inits)
    for name in inits:
        g.add_node(tensor_key(name), initializer=True, graph_input=False)
    for index, (name, node) in enumerate(zip(node_names(model), model.graph.node)):
        key = op_key(name)
        if key in g:
            raise AmpqError(f"node name {name!r} is used twice; plans and partitions refer to nodes by name")
        g.add_node(key, op_type=node.op_type, index=index)
        for t in list(node.input) + outer_scope_reads(node):
            if t:
                g.add_edge(tensor_key(t), key, meta=node.op_type in METADATA_OPS)
        for t in node.output:
            if t:
                g.add_edge(key, tensor_key(t))
    for t in outputs:
        g.nodes[tensor_key(t)]["graph_output"] = True
    return g


def value_graph(g: nx.DiGraph) -> nx.DiGraph:
    """``g`` without metadata edges: ``u`` reaches ``v`` iff ``v`` depends on ``u``'s values.
    (A copy, not a filtered view: traversals on views are several times slower.)"""
    vg = nx.DiGraph()
    vg.add_nodes_from(g.nodes(data=True))
    vg.add_edges_from((u, v) for u, v, meta in g.edges(data="meta", default=False) if not meta)
    return vg


def ops(g: nx.DiGraph) -> list[tuple[str, str]]:
    return [n for n in g if n[0] == "op"]


def producer(g: nx.DiGraph, tensor: tuple[str, str]) -> tuple[str, str] | None:
    preds = list(g.predecessors(tensor))
    return preds[0] if preds else None


# --------------------------------------------------------------------------- main flow

def entry_layers(vg: nx.DiGraph, layers: list[Layer]) -> list[Layer]:
    """Layers with no other layer among their value-ancestors: the first ones activations reach."""
    keys = {op_key(l.name) for l in layers}
    after_layer: dict = {}  # node -> some layer is among its ancestors
    for n in nx.topological_sort(vg):
        after_layer[n] = any(p in keys or after_layer[p] for p in vg.predecessors(n))
    return [l for l in layers if not after_layer[op_key(l.name)]]


def main_flow(g: nx.DiGraph, layers: list[Layer]) -> tuple[set, list[str]]:
    """(main ops, seed tensors).

    The *seeds* are the model inputs whose values reach the input activation of an entry
    layer (:func:`entry_layers`); with no layer, every model input. The *main flow* is
    every op that depends on a seed's values. The other ops depend only on constants, on
    inputs that are not seeds (attention mask), and on tensor *shapes* (a ``Shape`` op
    reads its input's shape, not its values): these are side nodes.
    """
    vg = value_graph(g)
    graph_inputs = [n for n, d in g.nodes(data=True) if n[0] == "tensor" and d.get("graph_input")]
    seeds = set()
    for layer in entry_layers(vg, layers):
        act = tensor_key(layer.activation)
        reach = nx.ancestors(vg, act) | {act}
        seeds.update(t for t in graph_inputs if t in reach)
    if not seeds:
        seeds = set(graph_inputs)
    main = _descendant_ops(vg, seeds)
    # A layer fed from side inputs only (a rotary-table MatMul, say) still needs a subgraph:
    # its activation becomes a seed of the main flow too.
    stray = [l for l in layers if op_key(l.name) not in main]
    if stray:
        seeds.update(tensor_key(l.activation) for l in stray)
        main = _descendant_ops(vg, seeds)
    return main, sorted(t[1] for t in seeds)


def _descendant_ops(vg: nx.DiGraph, seeds: set) -> set:
    out = set()
    for s in seeds:
        out.update(n for n in nx.descendants(vg, s) if n[0] == "op")
    return out


def main_graph(g: nx.DiGraph, main: set, seeds: list[str]) -> nx.DiGraph:
    """Main ops with the tensors they produce, plus the seeds, as a DiGraph with a
    virtual source (-> seeds) and sink (<- main tensors that are model outputs)."""
    keep = set(main) | {tensor_key(s) for s in seeds}
    keep.update(t for op in main for t in g.successors(op))
    m = nx.DiGraph(value_graph(g).subgraph(keep))
    m.add_edges_from((SOURCE, tensor_key(s)) for s in seeds)
    m.add_edges_from((t, SINK) for t in keep if t[0] == "tensor" and g.nodes[t].get("graph_output"))
    return m


def cut_tensors(m: nx.DiGraph) -> list[str]:
    """Tensors on every SOURCE -> SINK path of ``m``, in flow order.

    A node lies on every source-sink path iff it dominates the sink, so the cuts are the
    tensor nodes on the sink's chain of immediate dominators.
    """
    if SINK not in m or not nx.has_path(m, SOURCE, SINK):
        return []
    idom = nx.immediate_dominators(m, SOURCE)
    chain, node = [], SINK
    while node != SOURCE:
        node = idom[node]
        if node[0] == "tensor":
            chain.append(node[1])
    return chain[::-1]


def segments(m: nx.DiGraph, cuts: list[str]) -> list[list[tuple[str, str]]]:
    """Main ops grouped by the number of cut tensors among their ancestors.

    On a source-sink path the cuts are totally ordered, so this count is the index of the
    gap between consecutive cuts an op lies in; ops off every path to the sink (dead ends)
    join the gap of their inputs. Segments come out in flow order.
    """
    cut_set = {tensor_key(c) for c in cuts}
    level: dict = {}
    for n in nx.topological_sort(m):
        if n == SOURCE:
            level[n] = 0
            continue
        base = max((level[p] for p in m.predecessors(n)), default=0)
        level[n] = base + (1 if n in cut_set else 0)
    groups: dict[int, list] = {}
    for n in m:
        if n[0] == "op":
            groups.setdefault(level[n], []).append(n)
    return [groups[k] for k in sorted(groups)]


def merge_layerless(parts: list[list], layer_keys: set) -> list[list]:
    """Each segment without a quantizable layer is appended to the one before it (it is that
    segment's epilogue: bias, activation, norm); a leading one is prepended to the next."""
    merged: list[list] = []
    pending: list = []
    for part in parts:
        has_layer = any(n in layer_keys for n in part)
        if has_layer:
            merged.append(pending + list(part))
            pending = []
        elif merged:
            merged[-1].extend(part)
        else:
            pending.extend(part)
    if pending:  # a model without any layer: one subgraph
        merged.append(pending)
    return merged


# --------------------------------------------------------------------------- configurations

def group_candidates(group: list[str], formats: dict[str, list[str]]) -> list[str]:
    """Formats every layer of ``group`` can take (in the first layer's order), ``hp`` first."""
    missing = [l for l in group if l not in formats]
    if missing:
        raise AmpqError(f"no candidate formats given for layer {missing[0]!r}")
    common = [f for f in formats[group[0]] if f != HP and all(f in formats[l] for l in group[1:])]
    return [HP] + common


def n_configs(groups: list[list[str]], formats: dict[str, list[str]]) -> int:
    return math.prod(len(group_candidates(g, formats)) for g in groups)


def configs(subgraph: Subgraph, formats: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every configuration of ``subgraph``: ``{layer: format}`` with one format per group,
    ``hp`` included; the all-``hp`` configuration comes first."""
    choices = [group_candidates(g, formats) for g in subgraph.groups]
    out = []
    for picked in product(*choices):
        out.append({layer: fmt for group, fmt in zip(subgraph.groups, picked) for layer in group})
    return out


def tie_shared_inputs(layers: list[Layer], formats: dict[str, list[str]]) -> list[list[str]]:
    """Groups of layers reading the same activation tensor (q/k/v, gate/up), in layer order.

    Layers are tied only if they share a candidate format besides ``hp``."""
    groups: dict[str, list[Layer]] = {}
    for layer in layers:
        groups.setdefault(layer.activation, []).append(layer)
    out = []
    for members in groups.values():
        names = [l.name for l in members]
        if len(names) > 1 and len(group_candidates(names, formats)) == 1:
            out += [[n] for n in names]
        else:
            out.append(names)
    order = {l.name: i for i, l in enumerate(layers)}
    return sorted(out, key=lambda grp: order[grp[0]])


def coarsen_groups(groups: list[list[str]], layers: list[Layer], formats: dict[str, list[str]],
                   max_configs: int) -> list[list[str]] | None:
    """``groups`` merged pair by pair until they have at most ``max_configs`` configurations.

    Two groups may merge if their layers are of one kind - weight layers, or MatMuls of two
    activations - and they are neighbours among that kind's groups in layer order, and they
    share a format besides ``hp``. Each step merges the allowed pair with the fewest layers
    (the earliest of equals). Returns the groups in layer order, or ``None`` where no
    sequence of such merges reaches the cap.

    Kinds stay apart because a backend may run them fastest in different formats: on
    OpenVINO MiniLM's weight MatMuls in ``int8`` with its attention MatMuls in ``int8_sym``
    beat every uniform plan, and one decision for a whole attention block cannot express it.
    """
    is_scores = {l.name: l.weight is None for l in layers}
    out = [list(g) for g in groups]
    while n_configs(out, formats) > max_configs:
        best = None
        for i, first in enumerate(out):
            j = next((j for j in range(i + 1, len(out)) if is_scores[out[j][0]] == is_scores[first[0]]), None)
            if j is None or len(group_candidates(first + out[j], formats)) < 2:
                continue
            size = len(first) + len(out[j])
            if best is None or size < best[0]:
                best = (size, i, j)
        if best is None:
            return None
        _, i, j = best
        out[i] = out[i] + out.pop(j)
    return out


def finer_cuts(g: nx.DiGraph, nodes: list[tuple[str, str]]) -> list[tuple[str, list, list]]:
    """Ways to cut a subgraph in two at one of its own tensors.

    The subgraph's ops and the tensors they produce form an undirected graph (tensors
    from outside - its inputs, such as a residual's skip - are left out, so they join
    nothing). A produced tensor that is an articulation point of it separates an upstream
    part (the side of its producer) from the rest. Returns ``(tensor, upstream ops,
    downstream ops)`` for each such tensor whose both sides are non-empty.
    """
    node_set = set(nodes)
    produced = {t for n in nodes for t in g.successors(n)}
    u = nx.Graph()
    u.add_nodes_from(nodes)
    for t in produced:
        for c in g.successors(t):
            if c in node_set:
                u.add_edge(t, c)
        u.add_edge(producer(g, t), t)
    out = []
    for t in nx.articulation_points(u):
        if t[0] != "tensor":
            continue
        rest = u.copy()
        rest.remove_node(t)
        up = nx.node_connected_component(rest, producer(g, t))
        upstream = [n for n in nodes if n in up]
        downstream = [n for n in nodes if n not in up]
        if upstream and downstream:
            out.append((t[1], upstream, downstream))
    return out


def fit_cap(g: nx.DiGraph, nodes: list, layers: list[Layer], formats: dict[str, list[str]],
            max_configs: int) -> list[tuple[list, list[list[str]], str, str | None]]:
    """Bring one subgraph within ``max_configs`` configurations.

    Returns ``(ops, groups, note, cut)`` parts in flow order (``cut``: the finer cut tensor
    that ends the part, if any). Tying layers that read the same tensor keeps them timed
    jointly, so it is tried first; then the subgraph is split at the finer cut that best
    balances the parts; in a part that cannot be split, groups of one kind are merged
    (:func:`coarsen_groups`), and where that is not enough all its layers are tied.
    """
    names = {op_key(l.name): l for l in layers}
    mine = [names[n] for n in sorted(nodes, key=lambda n: g.nodes[n]["index"]) if n in names]
    singles = [[l.name] for l in mine]
    if n_configs(singles, formats) <= max_configs:
        return [(nodes, singles, "", None)]
    tied = tie_shared_inputs(mine, formats)
    if n_configs(tied, formats) <= max_configs:
        note = "; ".join(f"tied {','.join(short_name(x) for x in grp)} (same input)" for grp in tied if len(grp) > 1)
        return [(nodes, tied, f"{note} (cap {max_configs})", None)]
    best = None
    for tensor, up, down in finer_cuts(g, nodes):
        n_up = sum(1 for n in up if n in names)
        n_down = sum(1 for n in down if n in names)
        if not n_up or not n_down:
            continue
        # judge a cut by the parts as they will be fitted (ties included), so that a cut
        # between layers reading one tensor (q | k, v) does not look better than it is
        cost = max(n_configs(tie_shared_inputs([l for l in mine if op_key(l.name) in set(side)], formats), formats)
                   for side in (up, down))
        if best is None or cost < best[0]:
            best = (cost, tensor, up, down)
    if best is not None:
        _, tensor, up, down = best
        parts = fit_cap(g, up, mine, formats, max_configs)
        head = parts[:-1] + [(parts[-1][0], parts[-1][1], parts[-1][2], tensor)]
        tail = fit_cap(g, down, mine, formats, max_configs)
        split_note = f"split at finer cut {tensor} (cap {max_configs})"
        return [(n, grp, "; ".join(x for x in (split_note, note) if x), c) for n, grp, note, c in head + tail]
    coarse = coarsen_groups(tied, mine, formats, max_configs)
    if coarse is not None:
        note = "; ".join(f"tied {','.join(short_name(x) for x in grp)} (same input or kind)" for grp in coarse if len(grp) > 1)
        return [(nodes, coarse, f"{note} (cap {max_configs}, no finer cut)", None)]
    everything = [[l.name for l in mine]]
    note = f"all {len(mine)} layers tied to one decision to fit {max_configs} configs (no finer cut)"
    if n_configs(everything, formats) > max_configs:
        note = f"{n_configs(everything, formats)} configs for one decision exceed the cap {max_configs}"
    return [(nodes, everything, note, None)]


def short_name(layer: str) -> str:
    """``/model/layers.0/self_attn/q_proj/MatMul`` -> ``q_proj``: the module, not the op."""
    parts = [p for p in layer.split("/") if p]
    if len(parts) > 1 and parts[-1].split("_")[0] in WEIGHTED_OPS:
        return parts[-2]
    return parts[-1] if parts else layer


# --------------------------------------------------------------------------- subgraph data

def kind_of(g: nx.DiGraph, nodes: list, layers: list[Layer]) -> str:
    """``attention`` if it holds a Softmax, ``conv`` if a Conv layer, ``mlp`` if other layers."""
    op_types = {g.nodes[n]["op_type"] for n in nodes}
    if not layers:
        return "other"
    if "Softmax" in op_types:
        return "attention"
    if any(l.op_type in ("Conv", "ConvTranspose") for l in layers):
        return "conv"
    return "mlp"


def constant_tensors(g: nx.DiGraph) -> set:
    """Tensors whose value the model alone fixes: initializers, and outputs of ops whose
    inputs are all such tensors (Constant, Identity of a weight, folded shape constants).
    Extraction copies the ops that make them instead of taking them as inputs."""
    out = {n for n, d in g.nodes(data=True) if n[0] == "tensor" and d.get("initializer")}
    for n in nx.topological_sort(g):
        if n[0] == "op" and g.nodes[n]["op_type"] not in NONDETERMINISTIC_OPS \
                and all(t in out for t in g.predecessors(n)):
            out.update(g.successors(n))
    return out


def boundary(g: nx.DiGraph, nodes: list, owner: dict) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of an op set: non-constant tensors read from outside it, in first-read
    order; tensors it produces that another subgraph or the model's outputs read."""
    node_set = set(nodes)
    consts = constant_tensors(g)
    inputs, outputs = [], []
    seen = set()
    for n in sorted(nodes, key=lambda n: g.nodes[n]["index"]):
        for t in g.predecessors(n):
            if t in seen or t in consts:
                continue
            seen.add(t)
            p = producer(g, t)
            if p is None or p not in node_set:
                inputs.append(t[1])
        for t in g.successors(n):
            readers = [c for c in g.successors(t) if c not in node_set and owner.get(c) is not None]
            if readers or g.nodes[t].get("graph_output"):
                outputs.append(t[1])
    return inputs, outputs


def _common_prefix(layers: list[str]) -> str:
    split = [[p for p in l.split("/") if p] for l in layers]
    if not split:
        return ""
    common = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    if len(layers) == 1:
        common = split[0][:-1] or split[0]
    return "/".join(common)


def partition(model: onnx.ModelProto, layers: list[Layer], *, formats: dict[str, list[str]] | None = None,
              max_configs: int = 64) -> Partition:
    """Sequential subgraphs of ``model`` (see the module docstring for the steps).

    ``formats`` maps layer name -> candidate formats besides ``hp`` (default: each
    ``Layer.formats``); ``max_configs`` caps the configurations per subgraph.
    """
    if max_configs < 2:
        raise AmpqError(f"max_configs must be at least 2 (hp and one format), got {max_configs}")
    formats = {l.name: list(l.formats) for l in layers} | dict(formats or {})
    g = dataflow_graph(model)
    unknown = [l.name for l in layers if op_key(l.name) not in g]
    if unknown:
        raise AmpqError(f"layer {unknown[0]!r} is not a node of the model")
    main, seeds = main_flow(g, layers)
    layer_keys = {op_key(l.name) for l in layers}
    m = main_graph(g, main, seeds)
    cuts = cut_tensors(m)
    parts = merge_layerless(segments(m, cuts), layer_keys)
    index_of = lambda n: g.nodes[n]["index"]  # noqa: E731
    fitted = []
    for part in parts:
        part = sorted(part, key=index_of)
        mine = [l for l in layers if op_key(l.name) in set(part)]
        kind = kind_of(g, part, mine)
        for nodes, groups, note, cut in fit_cap(g, part, mine, formats, max_configs):
            fitted.append((sorted(nodes, key=index_of), groups, note, kind, cut))
    owner = {n: i for i, (nodes, *_rest) in enumerate(fitted) for n in nodes}
    subgraphs, names = [], set()
    all_cuts = list(cuts)
    for i, (nodes, groups, note, kind, cut) in enumerate(fitted):
        if cut:
            all_cuts.append(cut)
        inputs, outputs = boundary(g, nodes, owner)
        layer_names = [l for grp in groups for l in grp]
        layer_names.sort(key=lambda l: index_of(op_key(l)))
        name = _common_prefix(layer_names) or f"{kind}{i}"
        if name in names:
            name = f"{name}#{i}"
        names.add(name)
        subgraphs.append(Subgraph(i, name, [n[1] for n in nodes], inputs, outputs, layer_names,
                                  groups, kind, note))
    side = sorted((n for n in ops(g) if n not in main), key=index_of)
    order = {c: index_of(producer(g, tensor_key(c))) if producer(g, tensor_key(c)) else -1 for c in all_cuts}
    return Partition(subgraphs, [n[1] for n in side], sorted(all_cuts, key=order.get))

