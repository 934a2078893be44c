"""Split a model into sequential subgraphs (the units timed jointly) and show them.

    ampq-pass partition MODEL [--json FILE] [--draw FILE.png] [--max-configs N] [--formats int8,fp16]

Prints one row per subgraph: its kind, op count, layers, number of configurations, inputs
(cut tensors, side-chain tensors, model inputs) and notes (ties and finer cuts made to stay
within the configuration cap). ``--json`` writes ``{"subgraphs": [{"layers": [...], ...}]}``
atomically; ``--draw`` renders the graph with each subgraph in its own colour.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import networkx as nx

from ampq_pass.cli.args import parse_formats
from ampq_pass.core.cache import save_json
from ampq_pass.core.errors import AmpqError
from ampq_pass.core.model import load_model
from ampq_pass.core.text import table
from ampq_pass.stages.layers import find_layers, require_layers
from ampq_pass.stages.partition import configs, constant_tensors, dataflow_graph, partition, short_name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model")
    parser.add_argument("--json", dest="json_path", metavar="FILE", help="write the partition as JSON")
    parser.add_argument("--draw", metavar="FILE.png", help="draw the graph with subgraphs coloured (PNG)")
    parser.add_argument("--max-configs", type=int, default=64,
                        help="cap on configurations per subgraph; above it layers are tied or split (default: 64)")
    parser.add_argument("--formats", help="comma-separated candidate formats (default: every format a layer can take)")
    parser.add_argument("--activation-matmuls", action="store_true",
                        help="also count activation x activation MatMuls (attention scores) as layers")


def candidate_formats(layers, arg: str | None) -> dict[str, list[str]]:
    wanted = parse_formats(arg)
    return {l.name: [f for f in l.formats if wanted is None or f in wanted] for l in layers}


def rows(part, formats: dict[str, list[str]], model_inputs: set[str]) -> list[list[object]]:

    cut_set = set(part.cuts)
    out = []
    for sg in part.subgraphs:
        n_cut = sum(1 for t in sg.inputs if t in cut_set)
        n_model = sum(1 for t in sg.inputs if t in model_inputs and t not in cut_set)
        n_side = len(sg.inputs) - n_cut - n_model
        groups = " | ".join(",".join(short_name(l) for l in g) for g in sg.groups) or "-"
        out.append([sg.index, sg.kind, len(sg.nodes), groups, len(configs(sg, formats)),
                    f"{n_cut} cut, {n_side} side, {n_model} model", sg.note or "-"])
    return out


def run(args: argparse.Namespace) -> int:
    if args.max_configs < 2:
        raise AmpqError(f"--max-configs must be at least 2, got {args.max_configs}")
    for flag, path in (("--json", args.json_path), ("--draw", args.draw)):
        if path and not Path(path).parent.resolve().is_dir():
            raise AmpqError(f"{path}: {flag} directory {Path(path).parent} does not exist")
    model = load_model(args.model)
    layers = require_layers(model, find_layers(model, activation_matmuls=args.activation_matmuls), args.model)
    formats = candidate_formats(layers, args.formats)
    part = partition(model, layers, formats=formats, max_configs=args.max_configs)
    print(table(["#", "kind", "ops", "layers (| separates decisions)", "configs", "inputs", "notes"],
                rows(part, formats, {i.name for i in model.graph.input}), max_width=70))
    kinds: dict[str, int] = {}
    for sg in part.subgraphs:
        kinds[sg.kind] = kinds.get(sg.kind, 0) + 1
    summary = ", ".join(f"{v} {k}" for k, v in kinds.items())
    print(f"{len(part.subgraphs)} subgraphs ({summary}), {len(layers)} layers, "
          f"{len(part.side_nodes)} side-chain ops, {len(part.cuts)} cut tensors")
    if args.json_path:
        save_json(part.to_json(), args.json_path)
        print(f"wrote {args.json_path}")
    if args.draw:
        draw(model, part, args.draw)
        print(f"wrote {args.draw}")
    return 0


def draw(model, part, path: str) -> None:
    """PNG of the op graph: x = longest path from the inputs, subgraph ops in colour above,
    side-chain ops grey below; ops that only compute constants are left out."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the headless backend


    g = dataflow_graph(model)
    consts = constant_tensors(g)
    ops = nx.DiGraph()
    ops.add_nodes_from(n[1] for n in g if n[0] == "op" and not all(t in consts for t in g.successors(n)))
    for t in (n for n in g if n[0] == "tensor" and n not in consts):
        for p in g.predecessors(t):
            ops.add_edges_from((p[1], c[1]) for c in g.successors(t))
    in_sub = {n for sg in part.subgraphs for n in sg.nodes}
    pos, rows_used = {}, {}
    for x, gen in enumerate(nx.topological_generations(ops)):
        for n in sorted(gen):
            side = n not in in_sub
            k = rows_used.get((x, side), 0)
            rows_used[(x, side)] = k + 1
            pos[n] = (x, -1 - k if side else k)
    generations = range(1 + max((p[0] for p in pos.values()), default=0))
    owner = {n: sg.index for sg in part.subgraphs for n in sg.nodes}
    cmap = plt.get_cmap("tab20")
    colours = [cmap(owner[n] % 20) if n in owner else (0.8, 0.8, 0.8, 1.0) for n in ops]
    width = min(200.0, max(8.0, len(generations) / 8))
    height = max(4.0, min(40.0, (max(rows_used.values(), default=1) + 4) / 2))
    fig, ax = plt.subplots(figsize=(width, height))
    nx.draw_networkx_edges(ops, pos, ax=ax, arrows=False, width=0.3, edge_color="#999999")
    nx.draw_networkx_nodes(ops, pos, ax=ax, node_size=12, node_color=colours)
    layer_names = {l for sg in part.subgraphs for l in sg.layers}
    nx.draw_networkx_nodes(ops, pos, nodelist=[n for n in ops if n in layer_names], ax=ax, node_size=40,
                           node_color=[colours[i] for i, n in enumerate(ops) if n in layer_names],
                           edgecolors="black", linewidths=0.6)
    handles = [plt.Line2D([], [], marker="o", ls="", color=cmap(sg.index % 20), label=f"{sg.index} {sg.kind}")
               for sg in part.subgraphs]
    handles.append(plt.Line2D([], [], marker="o", ls="", color=(0.8, 0.8, 0.8), label="side chain"))
    ax.legend(handles=handles, loc="upper left", fontsize=7, ncol=max(1, len(handles) // 20))
    ax.set_title(f"{len(part.subgraphs)} sequential subgraphs (outlined: quantizable layers)")
    ax.axis("off")
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
