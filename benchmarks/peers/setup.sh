#!/bin/sh
# Creates one peer's own virtualenv: benchmarks/peers/.venvs/<peer>/ (ignored by git).
#   benchmarks/peers/setup.sh ort|inc|aimet|modelopt|quark|olive
# Each peer pins its own versions, so each gets its own venv. Where a peer needs torch, the CPU
# build torch==2.13.0 (on local disk) goes in FIRST; then `pip install --dry-run` of the peer's
# packages is checked: if it would install any torch other than the one present, or any nvidia-*
# / CUDA wheel, the script stops before installing anything (an unpinned torch pulls multi-GB
# CUDA builds). Installs run under `nice -n 15` (the machine is shared).
set -e
PEER="$1"
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="$HERE/.venvs/$PEER"
case "$PEER" in
  # ort: ONNX Runtime's own quantizers; its int4 weight-only quantizer (MatMulNBitsQuantizer) needs onnx-ir,
  # which the project does not depend on
  ort)      TORCH=0; PKGS="onnxruntime==1.32.0 onnx onnx-ir numpy" ;;
  inc)      TORCH=0; PKGS="onnx-neural-compressor==1.0 prettytable scipy onnxruntime==1.32.0 onnx" ;;
  aimet)    TORCH=1; PKGS="aimet-onnx==2.42.0 torchvision==0.28.0 onnxruntime==1.32.0" ;;
  # modelopt: the [onnx] extra minus its GPU packages (onnxruntime-gpu, cupy-cuda12x)
  modelopt) TORCH=1; PKGS="nvidia-modelopt==0.47.0 onnxruntime==1.32.0 onnx onnx-graphsurgeon onnxconverter-common~=1.16.0 onnxslim onnxscript polygraphy ml_dtypes lief cppimport" ;;
  quark)    TORCH=1; PKGS="amd-quark==0.13 onnxruntime==1.32.0 onnx" ;;
  # olive: Microsoft Olive's search over ONNX Runtime's quantizer options (OnnxQuantization)
  olive)    TORCH=1; PKGS="olive-ai==0.13.0 onnxruntime==1.32.0 onnx requests" ;;
  *) echo "usage: $0 ort|inc|aimet|modelopt|quark|olive" >&2; exit 2 ;;
esac
mkdir -p "$HERE/.venvs"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="nice -n 15 $VENV/bin/pip"
$PIP install -q --upgrade pip
if [ "$TORCH" = 1 ]; then $PIP install -q torch==2.13.0; fi
REPORT="$(mktemp)"
$PIP install -q --dry-run --report "$REPORT" $PKGS $EXTRA >/dev/null
"$VENV/bin/python" - "$REPORT" "$TORCH" <<'PY'
import json, sys
rep = json.load(open(sys.argv[1]))
names = [(i["metadata"]["name"].lower(), i["metadata"]["version"]) for i in rep["install"]]
ok = {"nvidia-modelopt", "nvidia-ml-py"}  # the peer itself; NVML's pure-Python bindings
bad = [f"{n}=={v}" for n, v in names if (n.startswith("nvidia-") and n not in ok) or n.startswith("cuda-") or "cu1" in v or n == "triton"
       or (n == "torch" and not v.endswith("+cpu"))]
print(f"dry run: {len(names)} packages; torch: {[v for n, v in names if n == 'torch'] or 'none'}")
if bad:
    sys.exit(f"refusing to install, CUDA packages would come in: {bad}")
PY
rm -f "$REPORT"
$PIP install -q $PKGS $EXTRA
if [ "$PEER" = olive ]; then
  # Olive 0.13.0 cannot serialise any run config holding a custom metric (its validator sets the
  # metric's backend to None, its serializer then calls None.model_dump(): PydanticSerializationError
  # in run_engine before anything runs; the same for its sub-metrics' metric_config). Two one-line
  # fixes of those serializers (None serialised as None), and its resource search's enum lookup of
  # those None values (not a member), and the metric's user_config serialised as its own class (not
  # as the base class, which drops every field); nothing else changed.
  "$VENV/bin/python" - <<'PY'
import pathlib, olive.evaluator.metric as m
p = pathlib.Path(m.__file__)
s = p.read_text()
fixes = {"return backend if isinstance(backend, str) else backend.model_dump()":
         "return backend if backend is None or isinstance(backend, str) else backend.model_dump()",
         "return metric_config.model_dump()": "return None if metric_config is None else metric_config.model_dump()"}
for old, new in fixes.items():
    if old in s:
        s = s.replace(old, new)
        print("patched", p, ":", new)
p.write_text(s)
# and its resource search then feeds those None values to a case-insensitive enum lookup
import olive.common.config_utils as cu
p = pathlib.Path(cu.__file__)
s = p.read_text()
old = "    def _missing_(cls, value):\n        value = value.lower()"
new = "    def _missing_(cls, value):\n        if not isinstance(value, str):\n            return None\n        value = value.lower()"
if old in s:
    p.write_text(s.replace(old, new))
    print("patched", p, ": a non-string value is no member")
# and the metric's user_config, declared as the base ConfigBase, serialises as {} (pydantic 2 writes a
# field as its declared type): the custom metric's evaluate_func is lost on the way to the evaluator
p = pathlib.Path(m.__file__)
s = p.read_text()
old = "    user_config: Optional[ConfigBase] = Field("
new = "    user_config: Optional[SerializeAsAny[ConfigBase]] = Field("
if old in s:
    s = s.replace(old, new).replace("from pydantic import Field,", "from pydantic import Field, SerializeAsAny,", 1)
    p.write_text(s)
    print("patched", p, ": user_config serialised as its own class")
PY
fi
echo "$PEER venv ready: $VENV"
