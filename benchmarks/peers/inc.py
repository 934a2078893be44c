"""Intel Neural Compressor for ONNX (`onnx-neural-compressor` 1.0): `tuning.autotune`, its own
accuracy-driven search. Runs in benchmarks/peers/.venvs/inc (benchmarks/peers/setup.sh inc).

    benchmarks/peers/.venvs/inc/bin/python benchmarks/peers/inc.py minilm [--tolerable-loss 0.01 ...]

The search: INC's tuning config set, tried in order until one meets the accuracy goal
(relative loss of the eval metric <= tolerable_loss) or max_trials is reached: first
`StaticQuantConfig.get_config_set_for_tuning()` (QOperator U8S8, then dropping Add/Mul,
Gather..., Attention from the quantized op types; x per-channel on/off x last MatMul on/off),
then `DynamicQuantConfig.get_config_set_for_tuning()` (same idea for dynamic quantization).
Calibration: the same calibration samples as our pass (calib.npz). INC's eval_fn: mean
cosine to fp32 (classifier: top-1 agreement - rel. error) on search.npz, the samples our pass
holds out for its own verification; scoring later uses eval.npz, which neither search sees.

`--weight-only` (the decoder LM): INC's int4 weight-only quantizers instead (`MatMulNBitsQuantizer`
with RTN, GPTQ or AWQ; 4 bits, group 32, symmetric, accuracy_level 4), its LLM recipe for CPU;
GPTQ and AWQ calibrate on calib.npz.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peerlib  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tolerable-loss", type=float, nargs="+", default=[0.01])
    ap.add_argument("--max-trials", type=int, default=100)
    ap.add_argument("--config-set", choices=("both", "static", "dynamic"), default="both",
                    help="INC's tuning sets tried: static then dynamic (default), or one of them")
    ap.add_argument("--weight-only", nargs="*", metavar="ALGO", choices=("RTN", "GPTQ", "AWQ"),
                    help="int4 weight-only with these algorithms (none given: all three) instead of autotune")
    a = ap.parse_args()
    if a.weight_only is not None:
        return weight_only(a.model, a.weight_only or ["RTN", "GPTQ", "AWQ"])
    import onnx
    from onnx_neural_compressor.quantization import config, tuning

    m = peerlib.meta(a.model)
    fp32 = peerlib.model_dir(a.model) / "fp32.onnx"
    calib = peerlib.batches(peerlib.load(a.model, "calib"), m["batch"])
    metric = peerlib.SearchMetric(a.model)
    for tl in a.tolerable_loss:
        trials = []

        def eval_fn(path):
            v = metric(path)
            trials.append(v)
            print(f"[inc] trial {len(trials)}: metric {v:.5f}", flush=True)
            return v

        def produce(out: Path):
            cs = ((config.StaticQuantConfig.get_config_set_for_tuning() if a.config_set != "dynamic" else [])
                  + (config.DynamicQuantConfig.get_config_set_for_tuning() if a.config_set != "static" else []))
            tc = tuning.TuningConfig(config_set=cs, tolerable_loss=tl, max_trials=a.max_trials)
            q = tuning.autotune(str(fp32), tc, eval_fn=eval_fn, calibration_data_reader=peerlib.Reader(calib))
            if q is None:
                raise RuntimeError("autotune returned no model")
            onnx.save_model(q, str(out))
            base = trials[0]
            goal = base * (1 - tl)
            return {"trials": len(trials) - 1, "baseline_metric": base, "metric_per_trial": trials[1:],
                    "goal_met": trials[-1] >= goal, "chosen_search_metric": trials[-1]}

        suffix = "" if a.config_set == "both" else f"_{a.config_set}"
        peerlib.record(a.model, "inc", f"autotune_tl{tl:g}{suffix}", produce,
                       knobs={"tolerable_loss": tl, "max_trials": a.max_trials,
                              "config_set": {"both": "StaticQuantConfig.get_config_set_for_tuning() + "
                                                     "DynamicQuantConfig.get_config_set_for_tuning()",
                                             "static": "StaticQuantConfig.get_config_set_for_tuning()",
                                             "dynamic": "DynamicQuantConfig.get_config_set_for_tuning()"}[a.config_set],
                              "eval_fn": peerlib.SearchMetric.DESCRIBED[m["kind"]],
                              "calibration": m["calib"]},
                       packages=("onnx-neural-compressor", "onnxruntime", "onnx"))


def weight_only(model: str, algos: list[str]) -> None:
    import onnx
    from onnx_neural_compressor import data_reader
    from onnx_neural_compressor.quantization import matmul_nbits_quantizer as mnb

    m = peerlib.meta(model)
    fp32 = peerlib.model_dir(model) / "fp32.onnx"
    calib = peerlib.batches(peerlib.load(model, "calib"), m["batch"])

    class Reader(data_reader.CalibrationDataReader):  # INC checks the type of its reader
        def __init__(self):
            self.inner = peerlib.Reader(calib)

        def get_next(self):
            return self.inner.get_next()

        def rewind(self):
            self.inner.rewind()

    for algo in algos:
        cfg = {"RTN": lambda: mnb.RTNWeightOnlyQuantConfig(),
               "GPTQ": lambda: mnb.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader()),
               "AWQ": lambda: mnb.AWQWeightOnlyQuantConfig(calibration_data_reader=Reader())}[algo]

        def produce(out: Path, cfg=cfg):
            q = mnb.MatMulNBitsQuantizer(str(fp32), block_size=32, is_symmetric=True, accuracy_level=4,
                                         algo_config=cfg(), n_bits=4)
            q.process()
            onnx.save_model(getattr(q.model, "model", q.model), str(out))
            return {"search_metric": peerlib.SearchMetric(model)(out)}

        peerlib.record(model, "inc", f"int4_{algo.lower()}_g32", produce,
                       knobs={"algorithm": algo, "weight_bits": 4, "group_size": 32, "symmetric": True,
                              "accuracy_level": 4, "calibration": m["calib"] if algo != "RTN" else "none (RTN)"},
                       packages=("onnx-neural-compressor", "onnxruntime", "onnx"))


if __name__ == "__main__":
    main()
