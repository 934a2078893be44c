"""Fuzz cases for the CLI (issue 8.5), shared by tests/test_fuzz.py (bounded) and
benchmarks/bench_fuzz.py (long run).

Three targets, each a hypothesis strategy that yields a callable ``case(folder) -> argv``:
corrupted model files (byte-level: truncation, flips, splices; structure-level: a valid
proto with one field changed: op type, an input name, dims, dtype, an attribute, the
opset, ...), plans (random JSON and near-valid plans), and calibration archives (random
names, dtypes, shapes, non-finite values, list entries, damaged zip bytes).

The property: ``ampq_pass.cli.main(argv)`` returns 0 or 2; with 2, stderr ends with one
line ``ampq-pass: error: ...``; never a traceback (an uncaught exception fails the case).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from hypothesis import strategies as st

import models
from wild_models import wild_cnn

_BASES: dict[str, onnx.ModelProto] = {}


def bases() -> dict[str, onnx.ModelProto]:
    if not _BASES:
        _BASES["mlp"] = models.mlp()
        _BASES["wild"] = wild_cnn()
    return _BASES


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    from ampq_pass.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def check_outcome(code: int, err: str, argv: list[str]) -> None:
    assert code in (0, 2), f"exit code {code} for {argv}: {err[-2000:]}"
    assert "Traceback" not in err, err[-3000:]
    if code == 2:
        last = err.strip().splitlines()[-1] if err.strip() else ""
        # ours: "ampq-pass: error: ..."; argparse: "ampq-pass inspect: error: ..." after its usage line
        assert last.startswith("ampq-pass") and ": error: " in last, err[-2000:]
        assert len(last) < 2000


# ----------------------------------------------------------------------------- models

_OPS = ["MatMul", "Gemm", "Conv", "Relu", "Add", "Identity", "Cast", "Constant", "BatchNormalization", "Reshape",
        "ConvTranspose", "Squeeze", "Unsqueeze", "ReduceMean", "Softmax", "NoSuchOp", ""]


def _mutate_structure(model: onnx.ModelProto, kind: str, a: int, b: int) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    node = g.node[a % len(g.node)] if g.node else None
    init = g.initializer[a % len(g.initializer)] if g.initializer else None
    if kind == "op_type" and node is not None:
        node.op_type = _OPS[b % len(_OPS)]
    elif kind == "input_name" and node is not None and node.input:
        node.input[b % len(node.input)] = ["", "nope", "x", "y", node.output[0]][b % 5]
    elif kind == "drop_input" and node is not None and node.input:
        del node.input[b % len(node.input)]
    elif kind == "dims" and init is not None:
        if init.dims:
            init.dims[b % len(init.dims)] = [0, 1, 3, 7, 10**6, -1][b % 6]
        else:
            init.dims.append(b % 5)
    elif kind == "dtype" and init is not None:
        init.data_type = b % 26
    elif kind == "attribute" and node is not None:
        if node.attribute:
            at = node.attribute[b % len(node.attribute)]
            if at.type == onnx.AttributeProto.INT:
                at.i = [0, 1, -1, 2, 1000, 2**40][b % 6]
            elif at.type == onnx.AttributeProto.INTS:
                del at.ints[:]
                at.ints.extend([b % 3, -1][: 1 + b % 2])
            elif at.type == onnx.AttributeProto.FLOAT:
                at.f = [0.0, -1.0, float("nan"), 1e30][b % 4]
            else:
                at.name = "bogus"
        else:
            node.attribute.append(onnx.helper.make_attribute(["axis", "group", "transB", "to"][b % 4], b % 4))
    elif kind == "opset":
        m.opset_import[0].version = [1, 6, 7, 10, 11, 12, 13, 19, 21, 99][b % 10]
    elif kind == "ir_version":
        m.ir_version = [0, 1, 3, 4, 7, 8, 10, 99][b % 8]
    elif kind == "drop_output" and g.output:
        del g.output[b % len(g.output)]
    elif kind == "drop_node" and node is not None:
        g.node.remove(node)
    elif kind == "dup_node" and node is not None:
        g.node.append(node)
    elif kind == "drop_initializer" and init is not None:
        g.initializer.remove(init)
    elif kind == "input_type" and g.input:
        g.input[0].type.tensor_type.elem_type = b % 26
    elif kind == "input_rank" and g.input:
        dims = g.input[0].type.tensor_type.shape.dim
        if dims and b % 2:
            del dims[-1]
        else:
            dims.add().dim_value = 1 + b % 4
    elif kind == "raw_data" and init is not None:
        init.raw_data = init.raw_data[: b % (len(init.raw_data) + 1)]
    return m


_STRUCT_KINDS = ["op_type", "input_name", "drop_input", "dims", "dtype", "attribute", "opset", "ir_version",
                 "drop_output", "drop_node", "dup_node", "drop_initializer", "input_type", "input_rank", "raw_data"]


def _model_bytes() -> st.SearchStrategy:
    base = st.sampled_from(["mlp", "wild"])
    byte_level = st.tuples(base, st.sampled_from(["truncate", "flip", "splice"]), st.integers(0, 10**6),
                           st.binary(min_size=1, max_size=8))
    structural = st.tuples(base, st.lists(st.tuples(st.sampled_from(_STRUCT_KINDS), st.integers(0, 10**4),
                                                    st.integers(0, 10**4)), min_size=1, max_size=3))

    def from_bytes(t):
        name, how, pos, blob = t
        data = bases()[name].SerializeToString()
        pos %= len(data)
        if how == "truncate":
            return data[:pos]
        if how == "flip":
            return data[:pos] + bytes(x ^ 0xFF for x in blob) + data[pos + len(blob):]
        return data[:pos] + blob + data[pos:]

    def from_struct(t):
        name, edits = t
        m = bases()[name]
        for kind, a, b in edits:
            m = _mutate_structure(m, kind, a, b)
        return m.SerializeToString()

    return st.one_of(byte_level.map(from_bytes), structural.map(from_struct))


def model_cases() -> st.SearchStrategy:
    """A damaged model, then ``inspect`` on it or an all-hp ``--plan`` rewrite."""

    def make(args) -> Callable[[Path], list[str]]:
        data, command = args

        def case(folder: Path) -> list[str]:
            path = folder / "model.onnx"
            path.write_bytes(data)
            if command == "inspect":
                return ["inspect", str(path), "--json"]
            plan = folder / "plan.json"
            plan.write_text('{"formats": {}}')
            return [str(path), "-o", str(folder / "out.onnx"), "--plan", str(plan), "--cache-dir", str(folder / "c")]

        return case

    return st.tuples(_model_bytes(), st.sampled_from(["inspect", "plan"])).map(make)


# ----------------------------------------------------------------------------- plans

_LAYERS = ["fc1", "fc2", "fc3", "relu1", "fc", "Fc1", ""]
_FORMATS = ["hp", "int8", "int4", "fp16", "bf16", "fp8_e4m3", "INT8", "", "int3"]

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                     max_leaves=8)


def plan_cases() -> st.SearchStrategy:
    near = st.dictionaries(st.sampled_from(_LAYERS) | st.text(max_size=6),
                           st.sampled_from(_FORMATS) | _json, max_size=4).map(lambda f: json.dumps({"formats": f}))
    raw = st.one_of(_json.map(json.dumps), st.binary(max_size=40).map(lambda b: b.decode("latin-1")), near)

    def make(text: str) -> Callable[[Path], list[str]]:
        def case(folder: Path) -> list[str]:
            model = folder / "mlp.onnx"
            if not model.exists():
                onnx.save(bases()["mlp"], model)
                np.savez(folder / "calib.npz", x=np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32))
            plan = folder / "plan.json"
            plan.write_text(text, encoding="latin-1" if not text.isascii() else "utf-8", errors="replace")
            return [str(model), "-o", str(folder / "out.onnx"), "--plan", str(plan), "--calib",
                    str(folder / "calib.npz"), "--cache-dir", str(folder / "c")]

        return case

    return st.one_of(raw, near).map(make)


# ----------------------------------------------------------------------------- calibration archives

_DTYPES = [np.float32, np.float64, np.float16, np.int64, np.int32, np.uint8, np.bool_]


def _array() -> st.SearchStrategy:
    shape = st.lists(st.integers(0, 5), min_size=0, max_size=5)
    fill = st.sampled_from([0.0, 1.0, float("nan"), float("inf"), -1e30, None])
    return st.tuples(shape, st.sampled_from(_DTYPES), fill)


def _materialise(spec) -> np.ndarray:
    shape, dtype, fill = spec
    rng = np.random.default_rng(len(shape))
    if fill is None:
        return rng.standard_normal(shape).astype(dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.full(shape, fill).astype(dtype)


def calib_cases() -> st.SearchStrategy:
    names = st.sampled_from(["x", "x/0", "x/1", "x/2", "x/a", "y", "", "x/", "/0"])
    arrays = st.dictionaries(names, _array(), max_size=4)
    # near-valid: the right name with varying widths for the wild model
    lists = st.lists(st.tuples(st.integers(0, 3), st.integers(1, 24)), min_size=1, max_size=3)
    corrupt = st.tuples(st.integers(0, 10**5), st.binary(min_size=1, max_size=6))

    def make(args) -> Callable[[Path], list[str]]:
        which, content, widths, damage = args

        def case(folder: Path) -> list[str]:
            model = folder / "wild.onnx"
            if not model.exists():
                onnx.save(bases()["wild"], model)
            path = folder / "calib.npz"
            if which == "lists":
                feeds = {f"x/{i}": np.random.default_rng(i).standard_normal((n, 3, 8, w)).astype(np.float32)
                         for i, (n, w) in enumerate(widths)}
                np.savez(path, **feeds)
            else:
                np.savez(path, **{k: _materialise(v) for k, v in content.items()})
            if which == "damaged":
                data = path.read_bytes()
                pos, blob = damage
                pos %= max(1, len(data))
                path.write_bytes(data[:pos] + blob + data[pos + len(blob):])
            return ["inspect", str(model), "--calib", str(path), "--json"]

        return case

    return st.tuples(st.sampled_from(["arrays", "lists", "damaged"]), arrays, lists, corrupt).map(make)


def all_cases() -> dict[str, st.SearchStrategy]:
    return {"model": model_cases(), "plan": plan_cases(), "calib": calib_cases()}

