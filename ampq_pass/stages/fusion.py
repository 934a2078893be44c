"""Follow a backend's fusion rules after the layer rewrite (issue 13, item 2).

:func:`ampq_pass.stages.rewrite.rewrite` places each quantized layer's Q/DQ; everything
between layers stays float. :func:`follow_rules` then quantizes the ops between layers that
the backend runs on 8-bit tensors (:class:`ampq_pass.core.fusion.FusionRules`), *only* where
the backend would fuse them: an op is taken when every data input is already 8-bit (it
comes out of a DequantizeLinear, or the tensor has a QuantizeLinear -> DequantizeLinear
pair that a layer placed) and every consumer of its output is 8-bit too (a QuantizeLinear,
or another op taken). Ops are decided together, as the greatest set that satisfies both
conditions (a chain Add -> Relu -> MaxPool -> Conv is taken whole or not at all), so no Q/DQ
is ever placed where the backend would keep DQ -> float -> Q.

What is placed, per kind:

- integer op (Add, Concat, GlobalAveragePool ...): its data inputs read the dequantized
  tensors; its output gets one Q -> DQ, the one a layer already placed on that tensor when
  there is one, else a new one from the tensor's calibrated range.
- absorbed activation (Relu, Clip) after an op with an 8-bit output: the Q/DQ between the op
  and the activation is removed and the activation's output is quantized (its zero point is
  the lowest code, which makes the activation redundant: the backend folds it into the op).
- passthrough op (MaxPool, Reshape, Transpose ...): DQ before and Q after with the *same*
  scale and zero point (tensors joined by passthrough ops share parameters; where two layers
  already fixed different ones, those ops stay float).
- passthrough op the backend does not fuse but runs on 8-bit tensors (``on_quantized``: ONNX
  Runtime's Pad): written on the quantized tensor, Q -> op -> DQ; the Q that followed it goes,
  the DQ before it goes when nothing else reads it, and an inserted value (Pad's constant) is
  mapped to its 8-bit code.
- a quantized layer's float output (a format that leaves it float, as ``int8_sym``), where the
  table allows it (:attr:`ampq_pass.core.fusion.FusionRules.layer_outputs`) and every reader is
  an op taken: one Q -> DQ right after the layer, from the tensor's calibrated range. On
  OpenVINO this is what lets a residual Add run in 8 bits (ResNet-50, every conv int8_sym: 4.70x
  over fp32 without it, 8.14x with every conv output quantized).

Only 8-bit per-tensor activations take part (the ``int8`` format's uint8 ones, or ``int8_sym``'s
uint8/int8 ones with zero point 0); new ones are made in the plan's 8-bit format. A tensor without a
calibrated range (ranges computed without the rules, see
:func:`ampq_pass.core.fusion.rule_tensors`) keeps its op in float.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ampq_pass.core.formats import FORMATS, Int8
from ampq_pass.core.fusion import ABSORBED, INTEGER, PASSTHROUGH, FusionRules, OpRule
from ampq_pass.core.graph import bodies, outer_scope_reads
from ampq_pass.core.proto import default_opset

_Q, _DQ = "QuantizeLinear", "DequantizeLinear"
_LAYERS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
_OUTSIDE = None  # a consumer the pass cannot see into (graph output, a subgraph body)


class _Graph:
    """Producers, consumers and the 8-bit activations of a rewritten graph."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.model = model
        self.inits = {t.name: t for t in g.initializer}
        self.prod: dict[str, onnx.NodeProto] = {o: n for n in g.node for o in n.output if o}
        self.cons: dict[str, list] = {}
        for n in g.node:
            for name in n.input:
                if name:
                    self.cons.setdefault(name, []).append(n)
            if bodies(n):
                for name in outer_scope_reads(n):
                    self.cons.setdefault(name, []).append(_OUTSIDE)
        for o in g.output:
            self.cons.setdefault(o.name, []).append(_OUTSIDE)
        #: float tensor -> (its dequantized name, scale initializer, zero-point initializer)
        self.view: dict[str, tuple[str, str, str]] = {}
        #: a dequantized name -> the 8-bit tensor it dequantizes
        self.qname: dict[str, str] = {}
        #: float outputs of quantized layers (an 8-bit activation and a dequantized weight in)
        self.layer_out: set[str] = set()
        for n in g.node:
            if self.is_act(n, _Q):
                dqs = [c for c in self.cons.get(n.output[0], []) if c is not _OUTSIDE and self.is_act(c, _DQ)
                       and list(c.input[1:3]) == list(n.input[1:3])]
                if dqs:
                    self.view.setdefault(n.input[0], (dqs[0].output[0], n.input[1], n.input[2]))
                    for dq in dqs:
                        self.view[dq.output[0]] = (dq.output[0], n.input[1], n.input[2])
                        self.qname[dq.output[0]] = n.output[0]
        for n in g.node:
            if n.op_type in _LAYERS and len(n.input) > 1 and n.output and n.output[0]:
                x, w = self.prod.get(n.input[0]), self.prod.get(n.input[1])
                if self.is_act(x, _DQ) and w is not None and w.op_type == _DQ:
                    self.layer_out.add(n.output[0])

    def is_act(self, node, op: str) -> bool:
        """Whether ``node`` is a QuantizeLinear/DequantizeLinear of an 8-bit per-tensor activation."""
        if node is _OUTSIDE or node.op_type != op or node.domain not in ("", "ai.onnx") or len(node.input) < 3:
            return False
        scale, zp = self.inits.get(node.input[1]), self.inits.get(node.input[2])
        return (scale is not None and zp is not None and zp.data_type in (TensorProto.UINT8, TensorProto.INT8)
                and int(np.prod(scale.dims)) == 1 and int(np.prod(zp.dims)) == 1)

    def params(self, tensor: str) -> tuple[float, np.integer]:
        """Scale and zero point (a numpy scalar of the 8-bit type) of a tensor with a Q/DQ."""
        _, s, z = self.view[tensor]
        return float(numpy_helper.to_array(self.inits[s]).reshape(())), numpy_helper.to_array(self.inits[z]).reshape(())[()]

    def users(self, tensor: str) -> list:
        return self.cons.get(tensor, [])


def _decide(gr: _Graph, cand: dict[str, tuple[onnx.NodeProto, OpRule]], ranges, act: Int8,
            layer_outputs: bool = False) -> tuple[set[str], dict]:
    """The greatest set of candidate nodes that satisfy the rules, and the parameters of every
    tensor the pass quantizes anew: tensor -> ("view", tensor with a Q/DQ) or ("range", (lo, hi))."""
    taken = set(cand)

    def avail(t: str) -> bool:
        p = gr.prod.get(t)
        if t in gr.view or (p is not None and p.name in taken):
            return True
        # a layer's float output, quantized only when every reader is taken (one Q, nothing float after it)
        return (layer_outputs and t in gr.layer_out
                and all(c is not _OUTSIDE and c.name in taken for c in gr.users(t)))

    def absorbed_ok(node) -> bool:
        x = node.input[0]
        if [c.name if c is not _OUTSIDE else None for c in gr.users(x)] != [node.name]:
            return False
        p = gr.prod.get(x)
        if p is None:
            return False
        if p.name in taken:
            return cand[p.name][1].kind == INTEGER
        if not gr.is_act(p, _DQ):
            return False
        q = gr.prod.get(p.input[0])
        return (q is not None and gr.is_act(q, _Q) and len(gr.users(q.output[0])) == 1
                and len(gr.users(q.input[0])) == 1)

    def output_ok(node, rule: OpRule) -> bool:
        # The backend wants each output to go to one Q only. Other float readers then read the
        # dequantized tensor, which is only worth it when an 8-bit reader needs the Q anyway.
        for out in rule.data_outputs(node):
            users = gr.users(out)
            qs = [c for c in users if gr.is_act(c, _Q)]
            if len(qs) > 1 or any(c is _OUTSIDE for c in users) or not (qs or any(c.name in taken for c in users)):
                return False
        return True

    def on_quantized_ok(node, rule: OpRule) -> bool:
        # the inserted value must be known to map it; the Q after the op goes, so nothing
        # outside the graph may read its output
        slot = rule.value_input
        if slot is not None and slot < len(node.input) and node.input[slot] and node.input[slot] not in gr.inits:
            return False
        return not any(c is _OUTSIDE for out in rule.data_outputs(node) for q in gr.users(out)
                       if gr.is_act(q, _Q) for c in gr.users(q.output[0]))

    def ok(name: str) -> bool:
        node, rule = cand[name]
        if rule.on_quantized and not on_quantized_ok(node, rule):
            return False
        if rule.kind == ABSORBED:
            if not absorbed_ok(node):
                return False
        elif not all(avail(node.input[i]) for i in rule.data_inputs(node)):
            return False
        return output_ok(node, rule)

    while True:
        while True:
            drop = {n for n in taken if not ok(n)}
            if not drop:
                break
            taken -= drop
        # tensors joined by taken passthrough ops share their parameters
        parent: dict[str, str] = {}

        def find(t):
            while parent.get(t, t) != t:
                t = parent[t]
            return t

        for name in taken:
            node, rule = cand[name]
            if rule.kind == PASSTHROUGH:
                for out in rule.data_outputs(node):
                    a, b = find(node.input[0]), find(out)
                    if a != b:
                        parent[b] = a
        members: dict[str, list[str]] = {}
        for name in taken:
            node, rule = cand[name]
            for t in ([node.input[i] for i in rule.data_inputs(node)] + rule.data_outputs(node)):
                members.setdefault(find(t), [])
                if t not in members[find(t)]:
                    members[find(t)].append(t)
        source: dict[str, tuple] = {}
        bad: set[str] = set()
        for root, ts in members.items():
            fixed = [t for t in ts if t in gr.view]
            values = {(s, int(z), z.dtype.name) for s, z in (gr.params(t) for t in fixed)}
            if len(values) > 1:  # the backend compares the values exactly
                bad.update(ts)
                continue
            if fixed:
                src = ("view", fixed[0])
            else:
                # a new class: the range of the tensor the chain starts from (a passthrough
                # op's output range lies inside its input's)
                start = [t for t in ts if not (gr.prod.get(t) is not None and gr.prod[t].name in taken
                                               and cand[gr.prod[t].name][1].kind == PASSTHROUGH)]
                t0 = start[0] if start else ts[0]
                if ranges is None or t0 not in ranges:
                    bad.update(ts)
                    continue
                src = ("range", tuple(ranges[t0]))
            for t in ts:
                source[t] = src
        # tensors a taken op writes but no Q follows (an integer op feeding an absorbed
        # activation) need no parameters; the rest must have some
        dropped = False
        for name in list(taken):
            node, rule = cand[name]
            out = node.output[0]
            feeds_absorbed = [c.name for c in gr.users(out) if c is not _OUTSIDE and c.name in taken
                              and cand[c.name][1].kind == ABSORBED]
            needs = [node.input[i] for i in rule.data_inputs(node)] if rule.kind != ABSORBED else []
            needs += [] if feeds_absorbed else rule.data_outputs(node)
            if (any(t in bad or t not in source for t in needs if t not in gr.view) or any(t in bad for t in needs)
                    or (rule.kind == ABSORBED and not _lowest_code(gr, source.get(out), act))):
                # no parameters, parameters in conflict, or a Q that leaves the activation needed
                taken.discard(name)
                dropped = True
        if not dropped and all(ok(n) for n in taken):
            return taken, source


def shared_ranges(model: onnx.ModelProto, rules: FusionRules | None, ranges):
    """``ranges`` where tensors joined by the table's passthrough ops (MaxPool, Split, Reshape
    ...) share one range, the union of theirs: the layers then quantize them with equal
    parameters, which the backend needs to run those ops on 8-bit tensors (a Split whose two
    outputs feed two int8 convolutions calibrated apart would otherwise stay float). A
    passthrough op's output range lies inside its input's, so the union is the input's range
    in practice. Returns ``ranges`` itself when nothing is joined."""
    if rules is None or ranges is None:
        return ranges
    opset = default_opset(model)
    parent: dict[str, str] = {}

    def find(t):
        while parent.get(t, t) != t:
            t = parent[t]
        return t

    for node in model.graph.node:
        rule = rules.rule(node, opset)
        outs = rule.data_outputs(node) if rule is not None and rule.kind == PASSTHROUGH else None
        if outs and rule.data_inputs(node):
            for out in outs:
                a, b = find(node.input[rule.data_inputs(node)[0]]), find(out)
                if a != b:
                    parent[b] = a
    classes: dict[str, list[str]] = {}
    for t in ranges.tensors:
        classes.setdefault(find(t), []).append(t)
    joined = {}
    for ts in classes.values():
        if len(ts) > 1:
            lo, hi = min(ranges[t][0] for t in ts), max(ranges[t][1] for t in ts)
            joined.update({t: (lo, hi) for t in ts})
    if not joined or all(ranges[t] == r for t, r in joined.items()):
        return ranges
    return type(ranges)(ranges.method, {**ranges.tensors, **joined})


def _lowest_code(gr: _Graph, src, act: Int8) -> bool:
    """Whether the zero point of ``src``'s parameters is its type's lowest code (a Q that
    clips at 0 by itself, which makes a Relu before it redundant)."""
    if src is None:
        return False
    zp = gr.params(src[1])[1] if src[0] == "view" else act.activation_params(*src[1])[1]
    return int(zp) == int(np.iinfo(zp.dtype).min)


def follow_rules(model: onnx.ModelProto, rules: FusionRules | None, ranges, fmt: str = "int8") -> bool:
    """Quantize, in place, the ops of ``model`` (already rewritten by the plan) that ``rules``
    fuse between 8-bit neighbours; ``ranges`` (:class:`ampq_pass.stages.calibrate.Ranges`)
    gives the parameters of tensors no layer quantized, in 8-bit format ``fmt`` (the plan's).
    Returns whether ``model`` changed."""
    if rules is None:
        return False
    act = FORMATS[fmt]
    opset = default_opset(model)
    gr = _Graph(model)
    cand = {}
    for node in model.graph.node:
        rule = rules.rule(node, opset)
        if rule is None or not node.name or not rule.data_outputs(node):
            continue
        if rule.kind != ABSORBED and not rule.data_inputs(node):
            continue
        cand[node.name] = (node, rule)
    if not cand:
        return False
    taken, source = _decide(gr, cand, ranges, act, rules.layer_outputs)
    if not taken:
        return False

    g = model.graph
    after: dict[str, list[onnx.NodeProto]] = {}
    removed: set[str] = set()
    made: dict[tuple, tuple[str, str]] = {}  # parameters -> (scale, zero point) initializer names

    def params_of(src, tensor: str) -> tuple[str, str]:
        if src[0] == "view":
            _, s, z = gr.view[src[1]]
            return s, z
        if src not in made:
            scale, zp = act.activation_params(*src[1])
            base = f"{tensor}_fused_int8"
            g.initializer.extend([numpy_helper.from_array(np.asarray(scale, np.float32), base + "_scale"),
                                  numpy_helper.from_array(np.asarray(zp), base + "_zero_point")])
            made[src] = (base + "_scale", base + "_zero_point")
        return made[src]

    def quantize(t: str, anchor: str) -> None:
        """One Q -> DQ on ``t`` right after node ``anchor``, recorded as ``t``'s view."""
        s, z = params_of(source[t], t)
        base = f"{t}_fused_int8"
        q = helper.make_node(_Q, [t, s, z], [base + "_quantized"], name=base + "_QuantizeLinear")
        dq = helper.make_node(_DQ, [base + "_quantized", s, z], [base + "_dequantized"], name=base + "_DequantizeLinear")
        after.setdefault(anchor, []).extend([q, dq])
        gr.view[t] = gr.view[base + "_dequantized"] = (base + "_dequantized", s, z)
        gr.qname[base + "_dequantized"] = base + "_quantized"

    rename: dict[str, str] = {}  # an 8-bit tensor whose Q went -> the op output that replaces it

    def write_on_quantized(node: onnx.NodeProto, rule: OpRule) -> None:
        """Q -> op -> DQ: the op reads the input's 8-bit tensor and its output is one."""
        i = rule.data_inputs(node)[0]
        t = node.input[i]
        if t not in gr.view:  # a layer's float output (_decide's avail)
            quantize(t, gr.prod[t].name)
        node.input[i] = gr.qname[gr.view[t][0]]
        out = node.output[0]
        s, z = params_of(source[out], out) if out not in gr.view else gr.view[out][1:]
        if rule.value_input is not None:
            slot = rule.value_input
            given = node.input[slot] if slot < len(node.input) else ""
            value = float(numpy_helper.to_array(gr.inits[given]).reshape(())) if given else 0.0
            scale = float(numpy_helper.to_array(gr.inits[s]).reshape(()))
            zp = numpy_helper.to_array(gr.inits[z]).reshape(())
            info = np.iinfo(zp.dtype)
            code = np.asarray(np.clip(np.rint(value / scale) + int(zp), info.min, info.max), zp.dtype)
            g.initializer.append(numpy_helper.from_array(code, f"{node.name}_value_8bit"))
            while len(node.input) <= slot:
                node.input.append("")
            node.input[slot] = f"{node.name}_value_8bit"
        node.output[0] = out8 = f"{out}_8bit"
        if out in gr.view:  # the Q after it goes; what read that Q's output reads the op's
            q = next(c for c in gr.users(out) if gr.is_act(c, _Q))
            removed.add(q.name)
            rename[q.output[0]] = out8
            gr.qname[gr.view[out][0]] = out8
        else:
            dq = helper.make_node(_DQ, [out8, s, z], [out8 + "_dequantized"], name=out8 + "_DequantizeLinear")
            after.setdefault(node.name, []).append(dq)
            gr.view[out] = gr.view[dq.output[0]] = (dq.output[0], s, z)
            gr.qname[dq.output[0]] = out8
        for c in gr.users(out):
            if not gr.is_act(c, _Q):
                for k, name in enumerate(c.input):
                    if name == out:
                        c.input[k] = gr.view[out][0]

    for node in list(g.node):
        if node.name not in taken:
            continue
        rule = cand[node.name][1]
        if rule.on_quantized:
            write_on_quantized(node, rule)
            continue
        if rule.kind == ABSORBED:
            x = node.input[0]
            p = gr.prod[x]
            if p.name not in taken:  # op -> Q -> DQ -> activation: the activation reads the op's output
                q = gr.prod[p.input[0]]
                node.input[0] = q.input[0]
                removed.update({p.name, q.name})
        else:
            for i in rule.data_inputs(node):
                if node.input[i] not in gr.view:  # a layer's float output (_decide's avail): Q/DQ after the layer
                    quantize(node.input[i], gr.prod[node.input[i]].name)
                node.input[i] = gr.view[node.input[i]][0]
        for out in rule.data_outputs(node):
            users = gr.users(out)
            if any(c.name in taken and cand[c.name][1].kind == ABSORBED for c in users):
                continue  # the activation after it carries the Q (and is its only reader)
            if out not in gr.view:  # else a layer's Q/DQ already follows
                quantize(out, node.name)
            for c in users:  # every reader but the Q reads the dequantized tensor
                if not gr.is_act(c, _Q):
                    for i, name in enumerate(c.input):
                        if name == out:
                            c.input[i] = gr.view[out][0]
    ordered = []
    for node in g.node:
        if node.name in removed:
            continue
        ordered.append(node)
        ordered.extend(after.get(node.name, []))
    for node in ordered:
        for k, name in enumerate(node.input):
            if name in rename:
                node.input[k] = rename[name]
    if any(cand[n][1].on_quantized for n in taken):
        ordered = _without_dead_qdq(ordered, {o.name for o in g.output})
        written = {o for n in ordered for o in n.output}
        # an op written on the quantized tensor renamed its float output away
        kept = [v for v in g.value_info if v.name in written or v.name not in gr.prod]
        del g.value_info[:]
        g.value_info.extend(kept)
    del g.node[:]
    g.node.extend(_topological(ordered, {i.name for i in g.input} | set(gr.inits)))
    return True


def recode_unsigned(model: onnx.ModelProto, rules: FusionRules | None) -> bool:
    """Write, in place, the signed 8-bit activations of every 8-bit region of ``model`` that
    holds an op of ``rules.unsigned_only`` as uint8 codes with zero point + 128 (the same
    values: ``(q + 128) - (z + 128) = q - z``). Returns whether ``model`` changed.

    An 8-bit region is a set of activation Q/DQ pairs joined through ops the table runs in
    8 bits: an op whose input a pair dequantizes, or whose output (directly, or through
    passthrough ops) a pair quantizes, joins every pair around it. The second case matters:
    OpenVINO moves a FakeQuantize that follows a Concat above it onto the Concat's inputs
    (MoveFakeQuantize), so ``Concat -> Q -> DQ -> Conv`` runs the Concat in 8 bits too.

    Why: OpenVINO 2026.4's CPU plugin computes ``Concat -> Q/DQ (int8, zero point 0) -> Conv``
    wrong (relative error 0.22 against ONNX Runtime at 8 x 192 x 40 x 40, the same with the
    Q/DQ on the Concat's inputs; 0.00009 with uint8 codes and zero point 128, and 0.00003 for an
    int8_sym conv without the Concat); on YOLOv8n every conv after a Concat was unfaithful in
    int8_sym (numerics: 0.25 against 0.002) and the model with every conv int8_sym had error
    0.217 on OpenVINO against 0.0165 on ONNX Runtime, 0.0167 once recoded, at the same speed
    (2.38x against 2.40x over fp32, 30 interleaved rounds). ``tests/backends/test_openvino.py``
    checks the recoded form against the installed OpenVINO.
    """
    if rules is None or not rules.unsigned_only:
        return False
    g = model.graph
    gr = _Graph(model)
    opset = default_opset(model)
    qs = [n for n in g.node if gr.is_act(n, _Q) and n.input[0] not in gr.inits]
    if not any(numpy_helper.to_array(gr.inits[q.input[2]]).dtype == np.int8 for q in qs):
        return False
    parent = {q.output[0]: q.output[0] for q in qs}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    flagged: set[str] = set()
    by_input = {}
    for q in qs:
        by_input.setdefault(q.input[0], []).append(q.output[0])
    for node in g.node:
        rule = rules.rule(node, opset)
        if rule is None or node.op_type in (_Q, _DQ):
            continue
        members = []
        for name in node.input:  # pairs it reads: name is a DQ's output whose input a Q made
            dq = gr.prod.get(name)
            if gr.is_act(dq, _DQ) and dq.input[0] in parent:
                members.append(dq.input[0])
        for out in node.output:  # pairs quantizing its output, directly or past passthrough ops
            members.extend(_quantized_after(gr, rules, opset, out, by_input))
        if not members:
            continue
        root = find(members[0])
        for m in members[1:]:
            parent[find(m)] = root
        if node.op_type in rules.unsigned_only:
            flagged.add(root)
    flagged = {find(r) for r in flagged}
    changed = False
    made: set[str] = set()
    for q in qs:
        zp = numpy_helper.to_array(gr.inits[q.input[2]])
        if zp.dtype != np.int8 or find(q.output[0]) not in flagged:
            continue
        new = f"{q.input[2]}_uint8"
        if new not in made:
            g.initializer.append(numpy_helper.from_array((zp.astype(np.int16) + 128).astype(np.uint8), new))
            made.add(new)
        for n in [q, *(c for c in gr.users(q.output[0]) if gr.is_act(c, _DQ) and c.input[2] == q.input[2])]:
            n.input[2] = new
        changed = True
    if changed:
        drop = {v.name for v in g.value_info if v.name in parent}  # their element type changed
        kept = [v for v in g.value_info if v.name not in drop]
        del g.value_info[:]
        g.value_info.extend(kept)
    return changed


def _quantized_after(gr: _Graph, rules: FusionRules, opset: int, tensor: str, by_input: dict) -> list[str]:
    """The quantized outputs of the Q nodes that read ``tensor``, or read it past passthrough ops."""
    out, todo, seen = [], [tensor], set()
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        out.extend(by_input.get(t, []))
        for c in gr.users(t):
            rule = None if c is _OUTSIDE else rules.rule(c, opset)
            if rule is not None and rule.kind == PASSTHROUGH and c.op_type not in (_Q, _DQ):
                todo.extend(o for o in c.output if o)
    return out


def _without_dead_qdq(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` without the Q/DQ nodes nothing reads any more (the DQ before an op written on
    the quantized tensor, when that op was its only reader)."""
    while True:
        read = set(outputs)
        for n in nodes:
            read.update(i for i in n.input if i)
            if bodies(n):
                read.update(outer_scope_reads(n))
        keep = [n for n in nodes if n.op_type not in (_Q, _DQ) or any(o in read for o in n.output)]
        if len(keep) == len(nodes):
            return nodes
        nodes = keep


def _topological(nodes: list[onnx.NodeProto], ready: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` in an order where every tensor is written before it is read, as close to the
    given order as possible (a reader rewired to a DQ that a layer placed just before itself
    may come earlier in the list than that DQ)."""
    written = {o for n in nodes for o in n.output if o}
    known = set(ready)

    def needs(n):
        reads = [i for i in n.input if i] + (outer_scope_reads(n) if bodies(n) else [])
        return [i for i in reads if i in written and i not in known]

    out, waiting = [], []
    for n in nodes:
        waiting.append(n)
        progress = True
        while progress:
            progress = False
            rest = []
            for w in waiting:
                if needs(w):
                    rest.append(w)
                else:
                    out.append(w)
                    known.update(o for o in w.output if o)
                    progress = True
            waiting = rest
    return out + waiting
