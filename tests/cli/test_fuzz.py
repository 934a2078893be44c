"""Bounded fuzz of the CLI (issue 8.5): damaged models, plans and calibration archives end in
exit code 0 or 2 with one clear line, never a traceback. The long run is benchmarks/bench_fuzz.py."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from fuzz_cases import bases, calib_cases, check_outcome, model_cases, plan_cases, run_cli

ROOT = Path(__file__).resolve().parents[2]
FAST = settings(max_examples=int(os.environ.get("AMPQ_FUZZ_EXAMPLES", "20")), deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck), database=None)


def _run(case) -> None:
    with tempfile.TemporaryDirectory(prefix="ampq-fuzz-") as tmp:
        argv = case(Path(tmp))
        code, _, err = run_cli(argv)
        check_outcome(code, err, argv)


@FAST
@given(model_cases())
def test_fuzz_model_files(case):
    _run(case)


@FAST
@given(plan_cases())
def test_fuzz_plans(case):
    _run(case)


@FAST
@given(calib_cases())
def test_fuzz_calibration_archives(case):
    _run(case)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_subprocess_damaged_model_one_line(tmp_path, damage):
    """The installed entry point as a user runs it: exit 2, one line, no traceback, no hang."""
    data = bases()["mlp"].SerializeToString()
    path = tmp_path / "m.onnx"
    path.write_bytes({"truncate": data[: len(data) // 3], "garbage": os.urandom(300), "empty": b""}[damage])
    proc = subprocess.run([sys.executable, "-m", "ampq_pass.cli", "inspect", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ampq-pass: error: ") and "m.onnx" in lines[0]


def test_subprocess_bad_plan_one_line(tmp_path):
    import onnx

    model = tmp_path / "m.onnx"
    onnx.save(bases()["mlp"], model)
    plan = tmp_path / "p.json"
    plan.write_text('{"formats": {"fc1": "int9"}}')
    proc = subprocess.run([sys.executable, "-m", "ampq_pass.cli", str(model), "-o", str(tmp_path / "o.onnx"),
                           "--plan", str(plan)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown format 'int9'" in lines[0]


def test_input_without_element_type_is_one_line(tmp_path):
    """Found by the fuzzer: an input whose elem_type is UNDEFINED passed the checker and
    crashed with KeyError: 0 in input_specs."""
    import onnx

    from fuzz_cases import _mutate_structure

    path = tmp_path / "m.onnx"
    onnx.save(_mutate_structure(bases()["mlp"], "input_type", 0, 0), path)
    code, _, err = run_cli(["inspect", str(path)])
    assert code == 2 and err.strip().splitlines()[-1] == (
        "ampq-pass: error: model input 'x' has no usable tensor element type (elem_type 0); "
        "expected a numeric tensor input")


def test_npz_with_damaged_header_is_one_line(tmp_path):
    """Found by the fuzzer: numpy tokenizes a damaged .npy header and raised TokenError."""
    import zipfile

    path = tmp_path / "c.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", b"\x93NUMPY\x01\x00\x10\x00{'descr': ('<f4',  \n")
    import onnx

    model = tmp_path / "m.onnx"
    onnx.save(bases()["mlp"], model)
    code, _, err = run_cli(["inspect", str(model), "--calib", str(path)])
    assert code == 2 and "c.npz: not a readable .npz calibration archive" in err.strip().splitlines()[-1]


def test_non_utf8_name_is_one_line(tmp_path):
    """Found by the fuzzer: protobuf hands invalid UTF-8 names back as bytes, which crashed
    ``inspect --json`` (bytes are not JSON)."""
    data = bases()["mlp"].SerializeToString()
    i = data.index(b"fc1")
    path = tmp_path / "m.onnx"
    path.write_bytes(data[:i] + b"\xff\xfe1" + data[i + 3:])
    code, _, err = run_cli(["inspect", str(path), "--json"])
    assert code == 2 and "a node name is not valid UTF-8" in err.strip().splitlines()[-1]
