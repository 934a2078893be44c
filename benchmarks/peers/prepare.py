"""Writes, for each model, the fp32 ONNX model and the data every method uses (main venv:
it imports ampq_pass's MiniLM code; the peers' venvs only read the files written here).

    .venv/bin/python benchmarks/peers/prepare.py [minilm] [resnet50] [yolov8n] [llama]

-> benchmarks/out/peers/<model>/
   fp32.onnx        the model (MiniLM: exported as bench_minilm_front.py does, opset 17)
   calib.npz        calibration samples for every peer: MiniLM sentences 0-63 (as our pass)
   search.npz       samples a peer's own accuracy-driven search may evaluate on: the ones our
                    pass holds out for its own verification (MiniLM sentences 64-95)
   pass_calib.npz   what our pass reads: calib + search (it keeps the last ones as holdout)
   eval.npz         held-out evaluation samples for scoring (MiniLM sentences 1000-1255,
                    disjoint from all of the above)
   meta.json        counts, batch size, which output the metric reads (and, where the model
                    needs them, the flags our pass takes: pass_flags)
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


def llama() -> Path:
    """The corpus's decoder LM (llama_kv_decode: transformers LlamaForCausalLM, 4 layers, d512,
    RANDOM init, optimum's with-past export) at a decode step: batch 1, one new token, past 256,
    the shape LLM serving on CPU runs. Calibration: the corpus's 24 decode feeds (16 calib / 8
    search, all 24 for our pass, which holds the last 8 out). Evaluation: 32 new decode steps
    whose past is the fp32 model's own cache after a 256-token prompt of another text (its
    prefill run here, in ONNX Runtime: the random weights were not kept, the ONNX model is the
    model)."""
    import onnxruntime as ort

    sys.path.insert(0, str(BENCH / "corpus"))
    from build import hashed_ids

    src = BENCH / "corpus" / "models" / "llama_kv_decode"
    d = OUT / "llama"
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "fp32.onnx").exists():
        shutil.copy(src / "model.onnx", d / "fp32.onnx")
    with np.load(src / "calib.npz") as z:
        feeds = {k: z[k] for k in z.files}
    n_calib, past, n_eval, seed = 16, 256, 32, 7
    np.savez(d / "calib.npz", **{k: v[:n_calib] for k, v in feeds.items()})
    np.savez(d / "search.npz", **{k: v[n_calib:] for k, v in feeds.items()})
    np.savez(d / "pass_calib.npz", **feeds)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(d / "fp32.onnx"), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    heads = {k: v.shape[1:] for k, v in feeds.items() if k.startswith("past_key_values.")}
    ev: dict[str, list] = {}
    for row in hashed_ids(32000, n_eval, past + 1, seed=seed):  # seed 3 made the calibration feeds
        prompt = {"input_ids": row[None, :past], "attention_mask": np.ones((1, past), np.int64),
                  "position_ids": np.arange(past, dtype=np.int64)[None]}
        prompt.update({k: np.zeros((1, s[0], 0, s[2]), np.float32) for k, s in heads.items()})
        out = dict(zip(names, sess.run(None, prompt)))
        step = {"input_ids": row[None, past:], "attention_mask": np.ones((1, past + 1), np.int64),
                "position_ids": np.array([[past]], np.int64)}
        step.update({k: out[k.replace("past_key_values", "present")] for k in heads})
        for k, v in step.items():
            ev.setdefault(k, []).append(v)
    np.savez(d / "eval.npz", **{k: np.concatenate(v) for k, v in ev.items()})
    shapes = " ".join(f"--shape {k}=" + "x".join(["1"] + [str(s) for s in v.shape[1:]]) for k, v in feeds.items())
    meta = {"model": "small Llama decoder (transformers LlamaForCausalLM, 4 layers, d512, GQA 8/4, vocab 32000, "
                     "RANDOM init; corpus llama_kv_decode, optimum with-past export)",
            "kind": "lm", "output": "logits", "batch": 1, "past": past,
            "calib": f"corpus decode feeds 0-{n_calib - 1}", "search": f"corpus decode feeds {n_calib}-{len(feeds['input_ids']) - 1}",
            "eval": f"{n_eval} decode steps after 256-token prompts (benchmarks/corpus/build.py hashed_ids seed {seed}), "
                    "past = the fp32 model's own cache",
            "pass_holdout": len(feeds["input_ids"]) - n_calib,
            # timed at the decode shape; every format ONNX Runtime's CPU EP runs fast is offered
            # (int8, int8_dyn, int4 weight-only: the peers' int8 dynamic and int4 recipes)
            "pass_flags": shapes}
    (d / "meta.json").write_text(json.dumps(meta, indent=1))
    return d


if __name__ == "__main__":
    for name in sys.argv[1:] or ["minilm"]:
        print(globals()[name]())
