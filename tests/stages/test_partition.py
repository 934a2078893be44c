"""Sequential subgraphs: structure on the test models, the configuration cap, JSON."""

from __future__ import annotations

import json
import math

import models
import pytest

from ampq_pass.core.errors import AmpqError
from ampq_pass.stages.layers import find_layers
from ampq_pass.stages.layers import Layer
from ampq_pass.stages.partition import (Partition, coarsen_groups, configs, cut_tensors, dataflow_graph, main_flow,
                                        main_graph, partition)


@pytest.fixture(scope="module")
def llama_model():
    return models.llama_decoder(layers=2)


def modules(sg) -> list[str]:
    """Layer names reduced to their module (``/q/MatMul`` -> ``q``)."""
    return [l.split("/")[-2] for l in sg.layers]


def test_chain_mlp_gives_one_subgraph_per_layer(mlp_model):
    p = partition(mlp_model, find_layers(mlp_model))
    assert [s.layers for s in p.subgraphs] == [["fc1"], ["fc2"], ["fc3"]]
    # bias and activation are the layer's epilogue, not a subgraph of their own
    assert p.subgraphs[0].nodes == ["fc1", "fc1_bias", "relu1"]
    assert [s.inputs for s in p.subgraphs] == [["x"], ["r1"], ["r2"]]
    assert p.subgraphs[-1].outputs == ["y"]
    assert {"r1", "r2"} <= set(p.cuts)
    assert p.side_nodes == []
    assert {s.kind for s in p.subgraphs} == {"mlp"}


def test_encoder_block_gives_attention_then_mlp(block_model):
    p = partition(block_model, find_layers(block_model))
    assert [s.kind for s in p.subgraphs] == ["attention", "mlp"]
    att, mlp = p.subgraphs
    assert modules(att) == ["q", "k", "v", "o"]
    assert modules(mlp) == ["ff1", "ff2"]
    # the mask arithmetic is a side chain read by attention, not part of the main flow
    g = dataflow_graph(block_model)
    mask_readers = {c[1] for c in g.successors(("tensor", "mask"))}
    assert mask_readers <= set(p.side_nodes)
    assert "mask" not in att.inputs and "hidden" in att.inputs
    # attention ends at the first LayerNorm, whose output is the MLP's only real input
    assert mlp.inputs == att.outputs and len(mlp.inputs) == 1
    assert mlp.inputs[0] in p.cuts


def test_shape_reads_do_not_join_the_main_flow(block_model):
    """Shape(hidden) feeds Reshapes in attention; it reads a shape, not values, so the Shape
    ops are side nodes and the reshape targets are inputs of the attention subgraph."""
    g = dataflow_graph(block_model)
    main, seeds = main_flow(g, find_layers(block_model))
    shapes = [n for n in g if n[0] == "op" and g.nodes[n]["op_type"] == "Shape"]
    assert shapes and not set(shapes) & main
    assert seeds == ["hidden"]


def test_without_side_chains_there_is_no_cut_between_layers(llama_model):
    """Why side chains matter: with the mask as a seed, paths from the mask into layer 1's
    attention bypass every tensor of layer 0, so the layer boundary is no longer a cut."""
    g = dataflow_graph(llama_model)
    layers = find_layers(llama_model)
    main, seeds = main_flow(g, layers)
    assert seeds == ["input_ids"]
    with_side = cut_tensors(main_graph(g, main, seeds))
    everything = {n for n in g if n[0] == "op"}
    without = cut_tensors(main_graph(g, everything, ["input_ids", "attention_mask"]))
    boundary = partition(llama_model, layers).subgraphs[1].outputs  # layer 0 -> layer 1
    assert len(boundary) == 1
    assert boundary[0] in with_side and boundary[0] not in without


def test_llama_decoder_gives_two_subgraphs_per_layer_and_lm_head(llama_model):
    p = partition(llama_model, find_layers(llama_model))
    assert [s.kind for s in p.subgraphs] == ["attention", "mlp", "attention", "mlp", "mlp"]
    for i in range(2):
        att, mlp = p.subgraphs[2 * i], p.subgraphs[2 * i + 1]
        assert modules(att) == ["q_proj", "k_proj", "v_proj", "o_proj"]
        assert all(f"layers.{i}/" in l for l in att.layers + mlp.layers)
        assert modules(mlp) == ["gate_proj", "up_proj", "down_proj"]
    # the final norm is the last MLP's epilogue; lm_head is a subgraph of its own
    assert modules(p.subgraphs[-1]) == ["lm_head"]
    assert p.subgraphs[-1].outputs == ["logits"]
    # the causal mask and rotary tables are side chains: attention_mask is read by no subgraph op
    g = dataflow_graph(llama_model)
    inside = {n for s in p.subgraphs for n in s.nodes}
    assert not {c[1] for c in g.successors(("tensor", "attention_mask"))} & inside


def test_residual_cnn_gives_one_subgraph_per_residual_block(cnn_model):
    p = partition(cnn_model, find_layers(cnn_model))
    assert [s.layers for s in p.subgraphs] == [
        ["/stem/Conv"], ["/block1/conv1/Conv", "/block1/conv2/Conv"],
        ["/block2/conv1/Conv", "/block2/conv2/Conv"], ["/head/Gemm"]]
    assert [s.kind for s in p.subgraphs] == ["conv", "conv", "conv", "mlp"]
    # each block's residual Add (and its ReLU) belongs to the block
    assert any("/block1/Add" == n for n in p.subgraphs[1].nodes)


@pytest.mark.parametrize("name", ["mlp", "cnn", "block", "llama"])
@pytest.mark.parametrize("activation_matmuls", [False, True])
def test_every_layer_and_op_is_in_exactly_one_place(name, activation_matmuls, mlp_model, cnn_model, block_model,
                                                    llama_model):
    model = {"mlp": mlp_model, "cnn": cnn_model, "block": block_model, "llama": llama_model}[name]
    layers = find_layers(model, activation_matmuls=activation_matmuls)
    p = partition(model, layers)
    placed = [l for s in p.subgraphs for l in s.layers]
    assert sorted(placed) == sorted(l.name for l in layers)
    for s in p.subgraphs:
        assert sorted(l for grp in s.groups for l in grp) == sorted(s.layers)
        assert s.layers, "a subgraph without a layer should have been merged"
    nodes = [n for s in p.subgraphs for n in s.nodes] + p.side_nodes
    assert len(nodes) == len(set(nodes)) == len(model.graph.node)
    assert [s.index for s in p.subgraphs] == list(range(len(p.subgraphs)))


def test_subgraph_order_is_an_execution_order(llama_model):
    """Every subgraph input is a model input, a side tensor or produced by an earlier subgraph."""
    p = partition(llama_model, find_layers(llama_model))
    made = {i.name for i in llama_model.graph.input}
    side_out = {t for n in llama_model.graph.node if n.name in set(p.side_nodes) for t in n.output}
    for s in p.subgraphs:
        assert all(t in made or t in side_out for t in s.inputs), s.name
        made.update(s.outputs)
    assert {o.name for o in llama_model.graph.output} <= made


def test_cap_ties_layers_that_read_the_same_tensor(block_model):
    layers = find_layers(block_model)
    formats = {l.name: ["int8"] for l in layers}  # 2 candidates per layer: 2^4 = 16 for attention
    p = partition(block_model, layers, formats=formats, max_configs=8)
    att = p.subgraphs[0]
    assert [[x.split("/")[-2] for x in grp] for grp in att.groups] == [["q", "k", "v"], ["o"]]
    assert "tied q,k,v" in att.note
    cfgs = configs(att, formats)
    assert len(cfgs) == 4
    # one decision: q, k and v always share a format
    assert all(len({c[l] for l in att.groups[0]}) == 1 for c in cfgs)
    assert p.subgraphs[1].note == ""  # the MLP (2 layers, 4 configs) fits untouched


def test_cap_splits_at_finer_cuts_when_tying_is_not_enough(block_model):
    layers = find_layers(block_model)
    formats = {l.name: ["int8"] for l in layers}
    p = partition(block_model, layers, formats=formats, max_configs=3)
    assert [modules(s) for s in p.subgraphs] == [["q", "k", "v"], ["o"], ["ff1"], ["ff2"]]
    assert all(len(configs(s, formats)) <= 3 for s in p.subgraphs)
    assert all("split at finer cut" in s.note for s in p.subgraphs)
    assert p.subgraphs[0].kind == p.subgraphs[1].kind == "attention"  # parts keep the block's kind
    # the finer cut tensors are cuts now: each part after the first reads the one before it
    for prev, nxt in zip(p.subgraphs, p.subgraphs[1:]):
        assert set(prev.outputs) & set(nxt.inputs) & set(p.cuts)
    # splitting never loses a node
    assert sorted(n for s in p.subgraphs for n in s.nodes) == sorted(
        n for s in partition(block_model, layers).subgraphs for n in s.nodes)


def test_parallel_layers_without_finer_cut_are_tied_together(mlp_model):
    layers = find_layers(mlp_model)
    formats = {l.name: ["int8", "fp16"] for l in layers}
    p = partition(mlp_model, layers, formats=formats, max_configs=2)
    # one layer alone has 3 configs > 2 and nothing to tie or split: the cap cannot be met
    assert all("exceed the cap" in s.note for s in p.subgraphs)


def test_without_finer_cut_groups_of_one_kind_merge_before_all_are_tied(llama_model):
    """Layer 0's attention has no finer cut; at cap 9 its q,k,v and o become one decision and its
    two score MatMuls another, so the mix "weights int8, scores int8_sym" stays a configuration."""
    layers = find_layers(llama_model, activation_matmuls=True)
    scores = {l.name for l in layers if l.weight is None}
    formats = {l.name: ["int8", "int8_sym"] for l in layers}
    p = partition(llama_model, layers, formats=formats, max_configs=9)
    att = p.subgraphs[0]
    assert "same input or kind" in att.note and "tied to one decision" not in att.note
    assert sorted(len(g) for g in att.groups) == [2, 4]
    assert all(len({x in scores for x in g}) == 1 for g in att.groups)  # no group mixes kinds
    cfgs = configs(att, formats)
    assert len(cfgs) == 9
    assert {l: ("int8_sym" if l in scores else "int8") for l in att.layers} in cfgs
    # at the default cap the weight layers keep two decisions (q,k,v and o)
    att64 = partition(llama_model, layers, formats=formats).subgraphs[0]
    assert len(att64.groups) == 3 and len(configs(att64, formats)) == 27


def _layer(name: str, scores: bool = False) -> Layer:
    return Layer(name, "MatMul", f"{name}_in", None if scores else f"{name}_w", None if scores else (4, 4), 1, f"{name}_out",
                 activation2=f"{name}_in2" if scores else None)


def test_coarsen_groups_merges_the_smallest_pair_of_one_kind_first():
    layers = [_layer("a"), _layer("b"), _layer("s", scores=True), _layer("c"), _layer("t", scores=True)]
    formats = {l.name: ["int8", "int8_sym"] for l in layers}
    groups = [["a", "b"], ["s"], ["c"], ["t"]]
    assert coarsen_groups(groups, layers, formats, 81) == groups  # already within the cap
    # s and t (2 layers) merge before a,b and c (3 layers), though a,b and c come first
    assert coarsen_groups(groups, layers, formats, 27) == [["a", "b"], ["s", "t"], ["c"]]
    assert coarsen_groups(groups, layers, formats, 9) == [["a", "b", "c"], ["s", "t"]]
    assert coarsen_groups(groups, layers, formats, 8) is None  # two kinds: 9 configurations at least
    # groups without a common format besides hp never merge
    formats["c"] = ["fp16"]
    assert coarsen_groups(groups, layers, formats, 9) is None


def test_default_cap_with_all_formats(llama_model):
    layers = find_layers(llama_model)
    p = partition(llama_model, layers)
    formats = {l.name: list(l.formats) for l in layers}
    for s in p.subgraphs:
        assert len(configs(s, formats)) <= 64


def test_configs_hp_first_and_complete(block_model):
    layers = find_layers(block_model)
    p = partition(block_model, layers)
    formats = {l.name: list(l.formats) for l in layers}
    mlp = p.subgraphs[1]
    cfgs = configs(mlp, formats)
    assert cfgs[0] == {l: "hp" for l in mlp.layers}
    assert len(cfgs) == math.prod(len(formats[l]) + 1 for l in mlp.layers)
    assert len({tuple(sorted(c.items())) for c in cfgs}) == len(cfgs)
    with pytest.raises(AmpqError, match="no candidate formats"):
        configs(mlp, {})


def test_tied_group_takes_common_formats_only(block_model):
    layers = find_layers(block_model)
    formats = {l.name: ["int8", "fp16"] for l in layers}
    q = next(l.name for l in layers if "/q/" in l.name)
    formats[q] = ["fp16"]
    p = partition(block_model, layers, formats=formats, max_configs=9)
    att = p.subgraphs[0]
    assert sorted({c[q] for c in configs(att, formats)}) == ["fp16", "hp"]


def test_json_round_trip(llama_model):
    layers = find_layers(llama_model)
    p = partition(llama_model, layers)
    data = json.loads(json.dumps(p.to_json()))
    assert [s["layers"] for s in data["subgraphs"]] == [s.layers for s in p.subgraphs]
    assert Partition.from_json(data) == p
    with pytest.raises(AmpqError):
        Partition.from_json({"subgraphs": [{"layers": []}]})


def test_bad_requests(mlp_model, block_model):
    layers = find_layers(mlp_model)
    with pytest.raises(AmpqError, match="max_configs"):
        partition(mlp_model, layers, max_configs=1)
    with pytest.raises(AmpqError, match="not a node"):
        partition(block_model, layers)


def test_unnamed_nodes_are_refused_until_named(mlp_model):
    """Stages never invent node names: load_model names every node once (ensure_node_names);
    a model built in memory without names is a clear error, and named the same way it works."""
    import onnx

    from ampq_pass.core.graph import ensure_node_names

    m = onnx.ModelProto()
    m.CopyFrom(mlp_model)
    for n in m.graph.node:
        n.name = ""
    with pytest.raises(AmpqError, match=r"node #0 \(MatMul\) has no name"):
        find_layers(m)
    ensure_node_names(m)
    layers = find_layers(m)
    p = partition(m, layers)
    assert [s.layers for s in p.subgraphs] == [["MatMul_0"], ["Gemm_3"], ["MatMul_5"]]
