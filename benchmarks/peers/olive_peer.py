"""Microsoft Olive (`olive-ai` 0.13): its search over ONNX Runtime's quantizer options
(`OnnxQuantization`: dynamic or static, QDQ or QOperator, per-channel, reduce_range, calibration
method, ...), ranked by the same search metric the other peers use (a custom metric,
peerlib.SearchMetric on search.npz, with a max-degradation goal) and by latency, with the same
calibration samples. Runs in benchmarks/peers/.venvs/olive (setup.sh olive).

    benchmarks/peers/.venvs/olive/bin/python benchmarks/peers/olive_peer.py minilm [--tolerable-loss 0.01]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import peerlib  # noqa: E402


def produce(model: str, tolerable: float, samples: int) -> None:
    import logging

    logging.getLogger().setLevel(logging.ERROR)
    m = peerlib.meta(model)
    fp32 = peerlib.model_dir(model) / "fp32.onnx"
    script = str(HERE / "olive_user.py")
    name = f"search_tl{tolerable:g}"

    def run(out: Path):
        from olive.workflows import run as olive_run

        work = out.parent / f"{name}.work"
        shutil.rmtree(work, ignore_errors=True)
        config = {
            "input_model": {"type": "ONNXModel", "model_path": str(fp32)},
            "systems": {"local": {"type": "LocalSystem", "accelerators": [
                {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
            "data_configs": [{"name": "calib", "user_script": script,
                              "load_dataset_config": {"type": "peers_calib", "params": {"model": model}},
                              "dataloader_config": {"type": "peers_batches"}}],
            "evaluators": {"peers": {"metrics": [
                {"name": "quality", "type": "custom",
                 "sub_types": [{"name": "search_metric", "priority": 1, "higher_is_better": True,
                                "goal": {"type": "max-degradation", "value": tolerable}}],
                 "user_config": {"user_script": script, "evaluate_func": "evaluate",
                                 "evaluate_func_kwargs": {"model_name": model}}},
                {"name": "latency", "type": "latency", "data_config": "calib",
                 "sub_types": [{"name": "avg", "priority": 2}]}]}},
            "passes": {"quant": {"type": "OnnxQuantization", "data_config": "calib"}},
            "search_strategy": {"execution_order": "joint", "sampler": "sequential", "max_samples": samples},
            "evaluator": "peers", "host": "local", "target": "local",
            "cache_dir": str(work / "cache"), "output_dir": str(work / "out"),
        }
        result = olive_run(config)
        best = result.get_best_candidate()
        if best is None:
            raise RuntimeError("Olive's search returned no candidate meeting its goal")
        shutil.copy(best.model_path, out)
        return {"search_metric": peerlib.SearchMetric(model)(out),
                "olive_best": {"config": json.loads(json.dumps(best.config, default=str))
                               if hasattr(best, "config") else None,
                               "metrics": json.loads(json.dumps(getattr(best, "metrics", None), default=str))}}

    peerlib.record(model, "olive", name, run,
                   knobs={"settings": f"OnnxQuantization search (joint, sequential sampler, {samples} samples), "
                                      f"goal: search metric max-degradation {tolerable:g}, then latency",
                          "calibration": m["calib"]},
                   packages=("olive-ai", "onnxruntime", "onnx"))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tolerable-loss", type=float, default=0.01)
    ap.add_argument("--samples", type=int, default=24)
    a = ap.parse_args()
    produce(a.model, a.tolerable_loss, a.samples)
