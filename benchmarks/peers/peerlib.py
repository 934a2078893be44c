"""What every peer script shares (numpy + onnxruntime only: it runs in each peer's own venv).

Reads the files prepare.py wrote, gives the calibration data as batches / an ORT
CalibrationDataReader, the search metric a peer's accuracy-driven search may use (on the
search samples only, never the evaluation ones), and records a run: knob values, wall time,
peak RSS, versions, and the exact error of a failed run.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "out" / "peers"


def model_dir(model: str) -> Path:
    d = OUT / model
    if not (d / "fp32.onnx").exists():
        sys.exit(f"{d}/fp32.onnx missing: run .venv/bin/python benchmarks/peers/prepare.py {model} first")
    return d


def meta(model: str) -> dict:
    return json.loads((model_dir(model) / "meta.json").read_text())


def load(model: str, which: str) -> dict[str, np.ndarray]:
    with np.load(model_dir(model) / f"{which}.npz") as z:
        return {k: z[k] for k in z.files}


def batches(arrays: dict[str, np.ndarray], batch: int) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(arrays.values())))
    return [{k: v[i:i + batch] for k, v in arrays.items()} for i in range(0, n, batch)]


class Reader:
    """onnxruntime.quantization.CalibrationDataReader over feed dicts (duck-typed)."""

    def __init__(self, feeds):
        self.feeds = list(feeds)
        self.it = iter(self.feeds)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.feeds)

    def __len__(self):
        return len(self.feeds)


def run_model(model, feeds: list[dict], threads: int = 2) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    src = model if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
    sess = ort.InferenceSession(str(src) if isinstance(src, os.PathLike) else src, so,
                               providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return [sess.run(None, {k: v for k, v in f.items() if k in names})[0] for f in feeds]


def mean_pool(hidden, mask):
    m = mask[..., None].astype(hidden.dtype)
    return (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)


def quality(kind: str, ref: list[np.ndarray], outs: list[np.ndarray], feeds: list[dict]) -> dict:
    """MiniLM: cosine of mean-pooled embeddings to fp32 (mean, min). Classifier: top-1
    agreement with fp32 and relative L2 error of the logits. Decoder LM (``lm``): the same on
    the next-token logits of each decode step (top-1 = the greedy next token). Detector:
    relative L2 error of the raw head output and the share of fp32's detections kept."""
    if kind == "embedding":
        a = np.concatenate([mean_pool(o, f["attention_mask"]) for o, f in zip(ref, feeds)])
        b = np.concatenate([mean_pool(o, f["attention_mask"]) for o, f in zip(outs, feeds)])
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
        cos = (a * b).sum(1)
        return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min())}
    a, b = np.concatenate(ref), np.concatenate(outs)
    if kind == "lm":  # [steps, 1 new token, vocab] -> [steps, vocab]
        a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    rel_err = float(np.linalg.norm(a - b) / np.linalg.norm(a))
    if kind == "detector":
        # YOLOv8 head [N, 4 box + C classes, anchors]: the anchors fp32 scores above DETECT in some
        # class, and how many of them the model keeps (same class, score above DETECT)
        sa, sb = a[:, 4:], b[:, 4:]
        hit = sa.max(1) >= DETECT
        kept = hit & (sb.max(1) >= DETECT) & (sa.argmax(1) == sb.argmax(1))
        return {"rel_err": rel_err, "detections": int(hit.sum()),
                "kept": float(kept.sum() / hit.sum()) if hit.any() else None}
    return {"top1": float((a.argmax(1) == b.argmax(1)).mean()), "rel_err": rel_err}


#: class score above which a YOLOv8 anchor counts as a detection (the detector's quality)
DETECT = 0.25


class SearchMetric:
    """The metric a peer's search evaluates (higher is better): MiniLM = mean cosine to fp32,
    classifier and decoder LM = top-1 agreement minus relative error of the logits (so ties
    still rank), detector = 1 minus the relative error of the head output, on search.npz."""

    def __init__(self, model: str):
        m = meta(model)
        self.kind = m["kind"]
        self.feeds = batches(load(model, "search"), m["batch"])
        self.ref = run_model(model_dir(model) / "fp32.onnx", self.feeds)
        self.calls = 0

    #: what :meth:`score` computes, per kind (for the knobs the peers record)
    DESCRIBED = {"embedding": "mean cosine to fp32 on search.npz",
                 "classifier": "top-1 agreement - relative logit error on search.npz",
                 "lm": "next-token top-1 agreement - relative logit error on search.npz (decode steps)",
                 "detector": "1 - relative error of the head output on search.npz"}

    def describe(self) -> str:
        return self.DESCRIBED[self.kind]

    def score(self, outs: list[np.ndarray]) -> float:
        """The metric of outputs already computed on :attr:`feeds`."""
        q = quality(self.kind, self.ref, outs, self.feeds)
        if self.kind == "embedding":
            return q["cos_mean"]
        return q["top1"] - q["rel_err"] if self.kind in ("classifier", "lm") else 1.0 - q["rel_err"]

    def __call__(self, model) -> float:
        self.calls += 1
        return self.score(run_model(model, self.feeds))


def versions(*names: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    return out


def peak_rss_mb() -> float:
    s = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    c = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(s, c) / 1024


def record(model: str, peer: str, config: str, fn, *, knobs: dict, packages: tuple[str, ...]) -> dict:
    """Runs ``fn(out_path) -> dict of extra facts`` and writes
    benchmarks/out/peers/<model>/<peer>/<config>.json beside <config>.onnx, also on failure
    (status 'failed' with the exact exception)."""
    d = model_dir(model) / peer
    d.mkdir(parents=True, exist_ok=True)
    out = d / f"{config}.onnx"
    res = {"peer": peer, "config": config, "model": model, "knobs": knobs, "versions": versions(*packages),
           "onnx": str(out.relative_to(OUT)), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "load_before": os.getloadavg()}
    t0 = time.perf_counter()
    try:
        extra = fn(out) or {}
        res.update(status="ok", **extra)
        if not out.exists():
            res.update(status="failed", error="the peer returned without writing a model")
    except BaseException as e:  # a peer that fails is recorded with its error, not hidden
        if isinstance(e, KeyboardInterrupt):
            raise
        res.update(status="failed", error=f"{type(e).__name__}: {str(e)[:2000]}",
                   traceback=traceback.format_exc()[-6000:])
    res["search_s"] = time.perf_counter() - t0
    res["peak_rss_mb"] = peak_rss_mb()
    res["load_after"] = os.getloadavg()
    (d / f"{config}.json").write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps({k: v for k, v in res.items() if k != "traceback"}, indent=1, default=str))
    return res
