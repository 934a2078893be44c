"""Boundary states: cut tensors quantized by the plan, timed as the whole model runs them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import models
from fakes import Counting
from ampq_pass.backends.ort import OrtBackend
from ampq_pass.core.measure import Protocol
from ampq_pass.core.ort import make_session
from ampq_pass.core.samples import Samples
from ampq_pass.stages.boundaries import Cut, boundary_cuts, feed_name, forced_cuts, quantized_feeds, with_states
from ampq_pass.stages.calibrate import compute_ranges
from ampq_pass.stages.layers import find_layers
from ampq_pass.stages.partition import configs, partition
from ampq_pass.stages.plan import Plan
from ampq_pass.stages.rewrite import rewrite
from ampq_pass.stages.solve import Option, solve
from ampq_pass.stages.subgraphs import capture_inputs, extract
from ampq_pass.stages.timing import gain_table, predict_speedup, timed_model
from hardware import needs_exact_ort_int8

STATE = "int8"  # the cut state of ONNX Runtime's int8 (uint8 asymmetric activations)
FAST = Protocol(warmup=1, min_repeats=3, max_repeats=5, rel_ci=0.5, max_seconds=5)


@pytest.fixture(scope="module")
def cnn():
    model = models.cnn()
    layers = [l for l in find_layers(model)]
    samples = Samples(models.feeds_for(model, n=8))
    ranges = compute_ranges(model, layers, samples)
    part = partition(model, layers, formats={l.name: ["int8"] if "int8" in l.formats else [] for l in layers})
    return model, layers, samples, ranges, part


def _all_int8(layers):
    return {l.name: "int8" for l in layers if "int8" in l.formats}


def test_cut_states_follow_the_layers(cnn):
    model, layers, _, _, part = cnn
    by_name = {l.name: l for l in layers}
    cuts = boundary_cuts(model, part, layers)
    assert cuts, "the residual CNN has cuts next to convolutions"
    assert forced_cuts(cuts, {}, by_name) == {}
    assert forced_cuts(cuts, _all_int8(layers), by_name) == {t: STATE for t in cuts}
    # one conv in int8 quantizes exactly the cuts it reads or makes
    conv = next(l for l in layers if any(l.name in (c.producer_layer,) + c.readers for c in cuts.values()))
    mine = {t for t, c in cuts.items() if conv.name == c.producer_layer or conv.name in c.readers}
    assert set(forced_cuts(cuts, {conv.name: "int8"}, by_name)) == mine


def test_states_are_offered_only_where_a_neighbour_can_quantize_the_cut(cnn):
    model, layers, _, _, part = cnn
    by_name = {l.name: l for l in layers}
    cuts = boundary_cuts(model, part, layers)
    cands = {l.name: ["int8"] for l in layers}
    for sg in part.subgraphs:
        cfgs = with_states(sg.index, configs(sg, cands), cuts, by_name, cands)
        hp = cfgs[0]
        assert all(f == "hp" for f in hp[0].values()) and all(s == "hp" for s in hp[1].values())
        for formats, states in cfgs:
            for t, state in states.items():
                if forced_cuts({t: cuts[t]}, formats, by_name):
                    assert state == STATE  # a cut the configuration quantizes is never timed in hp
    # with no int8 candidate anywhere every cut stays hp
    none = {l.name: [] for l in layers}
    for sg in part.subgraphs:
        assert all(set(st.values()) <= {"hp"} for _, st in with_states(sg.index, configs(sg, none), cuts, by_name, none))


def test_an_int8_cut_has_one_qdq_that_every_reader_reads(cnn):
    model, layers, _, ranges, part = cnn
    by_name = {l.name: l for l in layers}
    cuts = boundary_cuts(model, part, layers)
    # a cut read by a conv and by the residual Add, quantized because the conv reads it in int8
    t, cut = next((t, c) for t, c in cuts.items() if c.readers)
    plan = Plan({cut.readers[0]: "int8"}, forced_cuts(cuts, {cut.readers[0]: "int8"}, by_name))
    assert t in plan.cuts
    q = rewrite(model, layers, plan, ranges)
    makers = [n for n in q.graph.node if t in n.output]
    assert [n.op_type for n in makers] == ["DequantizeLinear"]
    quantizers = [n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.output[0] == makers[0].input[0]]
    assert len(quantizers) == 1
    raw = quantizers[0].input[0]
    assert [n.op_type for n in q.graph.node if raw in n.input] == ["QuantizeLinear"]  # nothing reads it unquantized
    # without the cut state the Add keeps reading the float tensor (the behaviour before states)
    plain = rewrite(model, layers, Plan({cut.readers[0]: "int8"}), ranges)
    assert any(n.op_type != "QuantizeLinear" and t in n.input for n in plain.graph.node)


@pytest.mark.parametrize("fmt", ["int8", "int8_sym"])
def test_subgraphs_split_at_int8_cuts_compose_to_the_rewritten_model(cnn, fmt):
    """Each subgraph timed as :func:`timed_model` builds it (8-bit in and out at 8-bit cuts),
    run one after the other, computes what the whole rewritten model computes: every Q and
    DQ is in exactly one subgraph. With int8_sym (no Q/DQ at a conv's output) the cuts a conv
    makes are quantized by their readers, in uint8 or int8 as the range's sign says."""
    model, layers, samples, ranges, part = cnn
    by_name = {l.name: l for l in layers}
    formats = {l.name: fmt for l in layers if fmt in l.formats}
    cuts = boundary_cuts(model, part, layers)
    plan = Plan(formats, forced_cuts(cuts, formats, by_name))
    assert plan.cuts and set(plan.cuts.values()) == {fmt}
    feeds = next(iter(samples.batches(8)))
    whole = make_session(rewrite(model, layers, plan, ranges)).run(None, feeds)[0]
    values = dict(feeds)
    for sg in part.subgraphs:
        sub = extract(model, sg)
        mine = {t: s for t, s in plan.cuts.items() if t in sg.inputs or t in sg.outputs}
        m = timed_model(sub, [by_name[l] for l in sg.layers], ({l: formats.get(l, "hp") for l in sg.layers}, mine), ranges)
        sess = make_session(m)
        names = [i.name for i in sess.get_inputs()]
        outs = sess.run(None, {n: values[n] for n in names})
        for o, v in zip(sess.get_outputs(), outs):
            cut = next((t for t in mine if o.name.startswith(t)), None)
            if cut is not None and mine[cut] == fmt:
                lo = ranges[cut][0]
                assert v.dtype == (np.uint8 if fmt == "int8" or lo >= 0 else np.int8)
                values[feed_name(cut, fmt, helper.np_dtype_to_tensor_dtype(v.dtype))] = v
            values[o.name] = v
    assert np.allclose(values[model.graph.output[0].name], whole, atol=1e-5)


def test_quantized_feeds_match_quantize_linear(cnn):
    model, layers, samples, ranges, part = cnn
    t = next(iter(boundary_cuts(model, part, layers)))
    captured = capture_inputs(model, part, samples, batch_size=8)
    batch = next(b for b in captured.values() if t in b[0])
    fed = quantized_feeds(batch, [(t, STATE)], ranges)[0][feed_name(t, STATE, onnx.TensorProto.UINT8)]
    q = rewrite(model, layers, Plan({}, {t: STATE}), ranges)
    qnode = next(n for n in q.graph.node if n.op_type == "QuantizeLinear")
    from onnx import helper, TensorProto, numpy_helper
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])
    g = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
                          [numpy_helper.from_array(inits[qnode.input[1]], "s"), numpy_helper.from_array(inits[qnode.input[2]], "z")])
    ref = make_session(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])).run(None, {"x": batch[0][t]})[0]
    assert np.array_equal(fed, ref)


def _fork() -> onnx.ModelProto:
    """x -> MatMul mm0 -> h; h read by MatMuls mm1 and mm2 (a cut with two reading layers)."""
    rng = np.random.default_rng(0)
    ws = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), f"w{i}") for i in range(3)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"], name="mm0"),
             helper.make_node("MatMul", ["h", "w1"], ["y1"], name="mm1"),
             helper.make_node("MatMul", ["h", "w2"], ["y2"], name="mm2"),
             helper.make_node("Add", ["y1", "y2"], ["y"], name="add")]
    g = helper.make_graph(nodes, "fork", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])], ws)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_a_cut_two_readers_would_quantize_in_two_formats_is_left_out():
    """One Q/DQ on a cut serves one format: a configuration whose layers read the same cut in
    int8 and in int8_sym has nothing to time, and with_states leaves it out; with both readers
    in int8_sym the cut is int8_sym, and the producer's side may meet it in either state."""
    by_name = {l.name: l for l in find_layers(_fork())}
    cut = Cut("h", 0, 1, "mm0", ("mm1", "mm2"))
    cuts, cands = {"h": cut}, {n: ["int8", "int8_sym"] for n in by_name}
    assert with_states(1, [{"mm1": "int8", "mm2": "int8_sym"}], cuts, by_name, cands) == []
    same = with_states(1, [{"mm1": "int8_sym", "mm2": "int8_sym"}], cuts, by_name, cands)
    assert [st for _, st in same] == [{"h": "int8_sym"}]
    assert forced_cuts(cuts, {"mm1": "int8_sym", "mm2": "int8_sym"}, by_name) == {"h": "int8_sym"}
    # the producer in hp meets whatever its neighbour can give the cut: hp, int8, int8_sym
    assert [st["h"] for _, st in with_states(0, [{"mm0": "hp"}], cuts, by_name, cands)] == ["hp", "int8", "int8_sym"]
    # a MatMul's int8 output is not quantized (no QLinearMatMul output here): the producer in
    # int8 does not force the cut, so it too is offered every state its readers can give
    assert [st["h"] for _, st in with_states(0, [{"mm0": "int8"}], cuts, by_name, cands)] == ["hp", "int8", "int8_sym"]


def test_the_solver_links_both_sides_of_a_cut():
    k = "cut0"
    hp0 = Option({"a": "hp"}, 0.0, 0.0, cuts={k: "hp"})
    free0 = Option({"a": "hp"}, -0.1, 0.0, cuts={k: STATE})  # hp layers, timed ending in a Q
    int0 = Option({"a": "int8"}, 1.0, 1.0, cuts={k: STATE}, forces=frozenset({k}))
    hp1 = Option({"b": "hp"}, 0.0, 0.0, cuts={k: "hp"})
    free1 = Option({"b": "hp"}, 0.5, 0.0, cuts={k: STATE})  # hp layers, timed starting at a DQ
    # a Q/DQ at the cut that no layer asks for cannot be bought: no free0 + free1 (gain 0.4)
    sol = solve([[hp0, free0, int0], [hp1, free1]], 0.5)
    assert sol.plan.formats == {} and sol.plan.cuts == {} and sol.gain == 0.0
    # when a conv quantizes the cut, the consumer is timed with the DQ at its edge
    sol = solve([[hp0, free0, int0], [hp1, free1]], 2.0)
    assert sol.plan.formats == {"a": "int8"} and sol.plan.cuts == {k: STATE} and sol.gain == pytest.approx(1.5)
    # ... and pays for it: a consumer much slower with a quantized input makes int8 not worth it
    slow1 = Option({"b": "hp"}, -2.0, 0.0, cuts={k: STATE})
    sol = solve([[hp0, free0, int0], [hp1, slow1]], 2.0)
    assert sol.plan.formats == {} and sol.gain == 0.0


def test_every_8_bit_state_of_a_cut_is_linked_and_bought_by_a_layer_in_that_state():
    """With two 8-bit states on one cut, each is linked: neither side may take a state that
    no layer quantizes the cut in (a reader in int8_sym does not pay for an int8 cut)."""
    k = "cut0"
    hp0 = Option({"a": "hp"}, 0.0, 0.0, cuts={k: "hp"})
    edge0 = {st: Option({"a": "hp"}, 0.3, 0.0, cuts={k: st}) for st in ("int8", "int8_sym")}  # timed with a Q
    sym0 = Option({"a": "int8_sym"}, 1.0, 1.0, cuts={k: "int8_sym"}, forces=frozenset({k}))
    hp1 = Option({"b": "hp"}, 0.0, 0.0, cuts={k: "hp"})
    edge1 = {st: Option({"b": "hp"}, 0.5, 0.0, cuts={k: st}) for st in ("int8", "int8_sym")}
    sym1 = Option({"b": "int8_sym"}, 1.0, 1.0, cuts={k: "int8_sym"}, forces=frozenset({k}))
    options = [[hp0, edge0["int8_sym"], edge0["int8"], sym0], [hp1, edge1["int8_sym"], edge1["int8"], sym1]]
    # free edges in a state nobody quantizes in: not buyable, whatever their gain
    assert solve(options, 0.0).plan.cuts == {}
    # one layer in int8_sym: the cut is int8_sym on both sides, never the int8 also offered
    sol = solve(options, 1.0)
    assert sol.plan.formats == {"a": "int8_sym"} and sol.plan.cuts == {k: "int8_sym"}
    assert sol.gain == pytest.approx(1.5)
    # with a forcing option in int8 the int8 state is buyable too, and chosen only with it
    int0 = Option({"a": "int8"}, 1.2, 1.0, cuts={k: "int8"}, forces=frozenset({k}))
    sol = solve([[*options[0], int0], options[1]], 1.0)
    assert sol.plan.formats == {"a": "int8"} and sol.plan.cuts == {k: "int8"} and sol.gain == pytest.approx(1.7)


def test_gain_table_with_states_predicts_a_plan_from_its_formats(cnn):
    model, layers, samples, ranges, part = cnn
    by_name = {l.name: l for l in layers}
    captured = capture_inputs(model, part, samples, batch_size=4)
    backend = OrtBackend(protocol=FAST, formats=("int8",), saturating_int8=True)
    table = gain_table(model, layers, part, ranges, captured, backend, progress=False)
    plain = gain_table(model, layers, part, ranges, captured, backend, progress=False, boundary_states=False)
    assert table.n_configs > plain.n_configs
    formats = _all_int8(layers)
    cuts = boundary_cuts(model, part, layers)
    assert table.cut_states(formats) == forced_cuts(cuts, formats, by_name)
    assert table.plan(formats).cuts == forced_cuts(cuts, formats, by_name)
    for sg in table.subgraphs:
        chosen = sg.lookup(formats, table.cut_states(formats))
        assert all(chosen.cuts[t] == STATE for t in chosen.forces)
    assert predict_speedup(table, table.plan(formats)) > 0


def test_edge_only_configurations_are_added_up_not_timed():
    """A configuration with no int8 layer whose cut is int8 only because of its neighbour is
    the same formats with an hp cut plus the all-hp formats with that cut state."""
    model = models.transformer_block()
    layers = find_layers(model)
    samples = Samples(models.feeds_for(model, n=8))
    ranges = compute_ranges(model, layers, samples)
    part = partition(model, layers, formats={l.name: [f for f in l.formats if f in ("int8", "int8_dyn")] for l in layers})
    captured = capture_inputs(model, part, samples, batch_size=4)
    backend = Counting(OrtBackend(protocol=FAST, formats=("int8", "int8_dyn"), saturating_int8=True))
    table = gain_table(model, layers, part, ranges, captured, backend, progress=False)
    derived = [(sg, c) for sg in table.subgraphs for c in sg.configs if c.derived]
    assert derived, "an int8_dyn configuration next to an int8-capable neighbour"
    assert len(backend.timed) == table.n_configs - len(derived)
    for sg, c in derived:
        assert "int8" not in c.formats.values() and STATE in c.cuts.values()
        base = sg.lookup(c.formats, {})
        edge = sg.lookup({}, c.cuts)
        assert c.measured_gain == pytest.approx(base.measured_gain + edge.measured_gain)


def test_an_edge_the_rules_moved_is_timed_with_float_edges(cnn, monkeypatch):
    """When the cut's edge is not one Q or DQ (the rules folded a Relu across it), the
    subgraph is timed with its Q/DQ inside rather than the pass refusing the model."""
    import ampq_pass.stages.timing as timing
    from ampq_pass.core.errors import AmpqError

    model, layers, _, ranges, part = cnn
    by_name = {l.name: l for l in layers}
    sg = next(s for s in part.subgraphs if any(t in boundary_cuts(model, part, layers) for t in s.inputs))
    cut = next(t for t in sg.inputs if t in boundary_cuts(model, part, layers))

    def refuse(*a, **k):
        raise AmpqError("moved")

    monkeypatch.setattr(timing, "split_at_cuts", refuse)
    m = timed_model(extract(model, sg), [by_name[l] for l in sg.layers], ({}, {cut: STATE}), ranges)
    assert cut in [i.name for i in m.graph.input]  # float input, its Q/DQ inside
    assert any(n.op_type == "QuantizeLinear" and n.input[0] == cut for n in m.graph.node)


@needs_exact_ort_int8
def test_a_cut_that_a_recoded_region_reads_is_fed_uint8_codes_of_the_same_values():
    """x -> conv a -> t; conv b reads t and a Concat reads t and conv b's output. With OpenVINO's
    table the Concat's region is written in uint8 codes (:func:`ampq_pass.stages.fusion.recode_unsigned`),
    so the subgraph that reads cut t takes a uint8 input though int8_sym writes t's codes as int8:
    :func:`quantized_feeds` gives both, under names that carry the type, and the subgraphs run in
    order (each cut's codes passed on, shifted by 128 where the reader takes the other type)
    compute what the whole rewritten model computes."""
    from ampq_pass.backends.openvino_rules import OPENVINO_CPU_RULES as rules

    rng = np.random.default_rng(5)
    w = lambda name, o, i: numpy_helper.from_array(rng.normal(0, 0.3, (o, i, 1, 1)).astype(np.float32), name)  # noqa: E731
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "wa"], ["t"], name="conv_a"), helper.make_node("Conv", ["t", "wb"], ["u"], name="conv_b"),
         helper.make_node("Concat", ["t", "u"], ["cat"], axis=1, name="concat"),
         helper.make_node("Conv", ["cat", "wc"], ["y"], name="conv_c")], "cut_concat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 16, 16])], [w("wa", 4, 3), w("wb", 4, 4), w("wc", 4, 8)])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    layers = find_layers(model)
    by_name = {l.name: l for l in layers}
    feeds = {"x": rng.standard_normal((8, 3, 16, 16)).astype(np.float32)}
    ranges = compute_ranges(model, layers, Samples(feeds), rules=rules)
    part = partition(model, layers, formats={l.name: ["int8_sym"] for l in layers})
    formats = {l.name: "int8_sym" for l in layers}
    plan = Plan(formats, forced_cuts(boundary_cuts(model, part, layers), formats, by_name))
    assert plan.cuts.get("t") == "int8_sym" and ranges["t"][0] < 0  # signed: int8 codes
    whole = make_session(rewrite(model, layers, plan, ranges, rules=rules)).run(None, feeds)[0]
    captured = capture_inputs(model, part, Samples(feeds), batch_size=8)
    values: dict[str, np.ndarray] = dict(feeds)  # tensor -> what its producer subgraph returned
    for sg in part.subgraphs:
        mine = {t: s for t, s in plan.cuts.items() if t in sg.inputs or t in sg.outputs}
        m = timed_model(extract(model, sg), [by_name[l] for l in sg.layers],
                        ({l: formats[l] for l in sg.layers}, mine), ranges, rules)
        types = {i.name: i.type.tensor_type.elem_type for i in m.graph.input}
        if sg.index == 1:
            fed = quantized_feeds(captured[1], [("t", "int8_sym")], ranges)[0]
            u8, i8 = (feed_name("t", "int8_sym", k) for k in (TensorProto.UINT8, TensorProto.INT8))
            assert types == {u8: TensorProto.UINT8}
            assert np.array_equal(fed[u8].astype(np.int16) - 128, fed[i8])
        run = {}
        for name, kind in types.items():
            t = next((c for c in mine if name.startswith(c + "__")), name)
            v = values[t]
            if v.dtype != helper.tensor_dtype_to_np_dtype(kind):  # int8 codes <-> uint8 codes, zero point + 128
                v = (v.astype(np.int16) + (128 if kind == TensorProto.UINT8 else -128)).astype(helper.tensor_dtype_to_np_dtype(kind))
            run[name] = v
        sess = make_session(m)
        for o, v in zip(sess.get_outputs(), sess.run(None, run)):
            values[next((c for c in mine if o.name.startswith(c)), o.name)] = v
    assert np.allclose(values["y"], whole, atol=1e-5)
