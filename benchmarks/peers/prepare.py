"""Writes, for each model, the fp32 ONNX model and the data every method uses (main venv:
it imports ampq_pass's MiniLM code; the peers' venvs only read the files written here).

    .venv/bin/python benchmarks/peers/prepare.py [minilm] [resnet50] [yolov8n]

-> benchmarks/out/peers/<model>/
   fp32.onnx        the model (MiniLM: exported as bench_minilm_front.py does, opset 17)
   calib.npz        calibration samples for every peer: MiniLM sentences 0-63 (as our pass)
   search.npz       samples a peer's own accuracy-driven search may evaluate on: the ones our
                    pass holds out for its own verification (MiniLM sentences 64-95)
   pass_calib.npz   what our pass reads: calib + search (it keeps the last ones as holdout)
   eval.npz         held-out evaluation samples for scoring (MiniLM sentences 1000-1255,
                    disjoint from all of the above)
   meta.json        counts, batch size, which output the metric reads
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
sys.path.insert(0, str(BENCH))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

OUT = BENCH / "out" / "peers"
SEQ, BATCH = 128, 8
N_CALIB, N_SEARCH, EVAL_OFFSET, N_EVAL = 64, 32, 1000, 256


def minilm() -> Path:
    from common import minilm_path

    from ampq_pass.cli.minilm import english_sentences, tokenize

    d = OUT / "minilm"
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "fp32.onnx").exists():
        shutil.copy(minilm_path(), d / "fp32.onnx")
    calib = tokenize(english_sentences(N_CALIB + N_SEARCH), SEQ)
    ev = tokenize(english_sentences(N_EVAL, offset=EVAL_OFFSET), SEQ)
    np.savez(d / "calib.npz", **{k: v[:N_CALIB] for k, v in calib.items()})
    np.savez(d / "search.npz", **{k: v[N_CALIB:] for k, v in calib.items()})
    np.savez(d / "pass_calib.npz", **calib)
    np.savez(d / "eval.npz", **ev)
    meta = {"model": "all-MiniLM-L6-v2", "kind": "embedding", "output": "last_hidden_state", "batch": BATCH,
            "seq": SEQ, "calib": f"sentences 0-{N_CALIB - 1}", "search": f"sentences {N_CALIB}-{N_CALIB + N_SEARCH - 1}",
            "eval": f"sentences {EVAL_OFFSET}-{EVAL_OFFSET + N_EVAL - 1}", "pass_holdout": N_SEARCH,
            "sentences": "CPython pydoc_data (ampq_pass.cli.minilm.english_sentences)"}
    (d / "meta.json").write_text(json.dumps(meta, indent=1))
    return d


def _from_corpus(name: str, corpus: str, input_name: str, eval_images: np.ndarray, seed: int, meta: dict) -> Path:
    """A corpus image model: its file, its 48 calibration images split 32 calib / 16 search (all
    48 for our pass, which holds the last 16 out), held-out ``eval_images`` (another seed of the
    corpus's generator) and ``meta`` completed with the split."""
    src = BENCH / "corpus" / "models" / corpus
    d = OUT / name
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "fp32.onnx").exists():
        shutil.copy(src / "model.onnx", d / "fp32.onnx")
    with np.load(src / "calib.npz") as z:
        imgs = z[input_name]  # 48 images from the corpus build
    n_calib = 32
    np.savez(d / "calib.npz", **{input_name: imgs[:n_calib]})
    np.savez(d / "search.npz", **{input_name: imgs[n_calib:]})
    np.savez(d / "pass_calib.npz", **{input_name: imgs})
    np.savez(d / "eval.npz", **{input_name: eval_images})
    meta = {**meta, "batch": BATCH, "calib": f"corpus images 0-{n_calib - 1}", "search": f"corpus images {n_calib}-47",
            "eval": f"{len(eval_images)} images, benchmarks/corpus/build.py smooth_images seed {seed}",
            "pass_holdout": len(imgs) - n_calib}
    (d / "meta.json").write_text(json.dumps(meta, indent=1))
    return d


def resnet50() -> Path:
    sys.path.insert(0, str(BENCH / "corpus"))
    from build import IMAGENET_MEAN, IMAGENET_STD, smooth_images

    ev = ((smooth_images(64, 224, 224, 1006) - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
    return _from_corpus("resnet50", "resnet50_classic", "pixel_values", ev, 1006, {
        "model": "ResNet-50 (transformers ResNetForImageClassification, random init; corpus resnet50_classic)",
        "kind": "classifier", "output": "logits"})


def yolov8n() -> Path:
    """nudenet's YOLOv8n (real weights, 320x320), the corpus's detector."""
    sys.path.insert(0, str(BENCH / "corpus"))
    from build import smooth_images

    ev = smooth_images(64, 320, 320, 1001).astype(np.float32)
    return _from_corpus("yolov8n", "nudenet_yolov8n", "images", ev, 1001, {
        "model": "YOLOv8n detector (nudenet 320n.onnx, real weights; corpus nudenet_yolov8n)",
        "kind": "detector", "output": "output0"})


if __name__ == "__main__":
    for name in sys.argv[1:] or ["minilm"]:
        print(globals()[name]())
