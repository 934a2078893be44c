"""Assemble benchmarks/README.md from the result files the benchmark scripts wrote.

Run: .venv/bin/python benchmarks/make_readme.py
Nothing here computes or edits a number: the README quotes benchmarks/results/*.md
verbatim (headings demoted, figure links pointed into results/), so every figure in it
comes from a run of a committed script.
"""

from __future__ import annotations

import re
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"

MAIN = [  # issue 7: the comparison against baselines
    ("minilm_front.md", "all-MiniLM-L6-v2 on real sentences: our front against the baselines",
     "benchmarks/run_snapshot.sh benchmarks/bench_minilm_front.py"),
    ("llama_front.md", "Llama-style decoder (random init): timing, partition, prediction",
     "benchmarks/run_snapshot.sh benchmarks/bench_models.py llama"),
    ("cnn_front.md", "Residual CNN (random init): timing, partition, prediction",
     "benchmarks/run_snapshot.sh benchmarks/bench_models.py cnn"),
    ("cnn_fronts.md", "Corpus CNNs: our front against every ORT quantize_static configuration (issue 13)",
     "benchmarks/run_snapshot.sh benchmarks/bench_cnn_fronts.py [NAME ...]"),
    ("peers.md", "Peers' own automatic mixed-precision searches against ours (issue 15)",
     "benchmarks/peers/run_all.sh MODEL; benchmarks/run_snapshot.sh benchmarks/peers/score.py MODEL"),
]
EARLIER = [  # per-stage benchmarks from earlier issues
    ("rewrite_int8.md", "all-int8 rewrite vs fp32 on MiniLM", ".venv/bin/python benchmarks/bench_rewrite_int8.py"),
    ("sensitivity.md", "sensitivity: parity, time/memory, prediction", "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_sensitivity.py"),
    ("partition.md", "partition into sequential subgraphs", ".venv/bin/python benchmarks/bench_partition.py"),
    ("timing.md", "gain table and additivity", ".venv/bin/python benchmarks/bench_timing.py"),
    ("solve.md", "integer program on a synthetic instance", ".venv/bin/python benchmarks/bench_solve.py"),
    ("pass.md", "the whole pass, three budgets", "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_pass.py"),
    ("ab.md", "two plans of one corpus model alone against fp32, 200 rounds, with what ONNX Runtime compiles "
     "each to (MobileNetV2: ours against ORT's best quantize_static, issue 13's ties)",
     "benchmarks/run_snapshot.sh benchmarks/bench_ab.py NAME MODEL_A MODEL_B --rounds 200"),
    ("boundaries.md", "CNNs: prediction with and without boundary states (issue 13)",
     ".venv/bin/python benchmarks/bench_boundaries.py cnn corpus:mtcnn_onet corpus:mtcnn_rnet corpus:mtcnn_pnet "
     "corpus:mobilenetv2_classic"),
    ("fusion.md", "every conv int8 with and without ORT's fusion rules (issue 13)",
     ".venv/bin/python benchmarks/bench_fusion.py cnn resnet50"),
    ("backends.md", "ONNX Runtime CPU EP vs OpenVINO CPU: each backend's plan on both (issue 14)",
     "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_backends.py --resnet --detector"),
    ("backends_yolov8n.md", "the same, YOLOv8n only, after the numerics stage (issue 14)",
     "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_backends.py --no-minilm --detector --out backends_yolov8n.md"),
    ("backends_minilm.md", "the same, MiniLM only, at budget 0.4 (issue 14's MiniLM target), with the decode-shape probe",
     "benchmarks/run_snapshot.sh benchmarks/bench_backends.py --budget 0.4 --out backends_minilm.md"),
    ("backends_minilm_metric.md", "the same, MiniLM only, each plan by the metric search (cosine drop <= 0.01): "
     "issue 14's MiniLM target at equal quality",
     "benchmarks/run_snapshot.sh benchmarks/bench_backends.py --max-metric-drop 0.01 --out backends_minilm_metric.md"),
    ("cuda.md", "ONNX Runtime's CUDA EP on a lent H100: formats probe and the pass",
     "bash benchmarks/gpu_check.sh (on a GPU machine; see its header)"),
]


LEARNED = """## What we learned (read with the tables below)

- **2026-11-28, evening (AMD EPYC with AVX2 only; no GPU lent): a layer the backend computes less
  accurately keeps its format, its loss scaled.** The numerics check dropped every (layer, format) pair
  OpenVINO computed beyond twice ONNX Runtime's error: on this CPU eight YOLOv8n convolutions in
  `int8_sym`, 2.9-27x off alone, stayed hp in every OpenVINO plan, and NVIDIA ModelOpt's every-conv int8
  ran 6-7% faster head to head (0.933, 0.943). A single layer off by at most 30x now keeps the format
  with its sensitivity times the squared ratio (the 80-240x box-head `int8` kernels are still dropped):
  budget 0.1 ships every conv `int8_sym`, 1.65x over OpenVINO's fp32 at OpenVINO output error 0.0756
  (ModelOpt: 1.65-1.67x at 0.100); head to head 0.998 and 0.995 (ties; at 150 rounds one was 0.991
  [0.983, 1.000]). The peers table: 7 of 103 points above our front by point estimate, all ties head to
  head. Where memory holds one variant at a time the ship choice now times the verified plans in pairs
  (a knockout, two sessions a run) rather than two of them beside the input (three).

- **2026-11-28, afternoon (AMD EPYC with AVX2 only; no GPU lent): call ties head to head; decide between
  verified plans in one run.** The peer points left above our front all had overlapping CIs, so
  `benchmarks/peers/ties.py` times each against the plan of ours it beat, alone, in two runs with the
  creation order swapped: the model created first ran 0.4-1.3% slower on MiniLM and 2-5% at the Llama decode
  step, more than most gaps. MiniLM's two points, ResNet-50's ORT point and the decode step's two are ties;
  on OpenVINO AIMET's every-quantizer ResNet-50 models ran 0.5-0.6% faster than our budget-0.15 plan and tie
  our every-layer one (`--ours rmse_0.2`). Quark's int4
  decode step ran 4.7% faster than our previous plan in one head-to-head and tied our new one in the next;
  its file has about 100 fewer shape nodes (onnxslim). The pass itself made the same mistake: each verified
  plan was timed against the input in a run of its own, and at budget 0.05 it shipped a plan that verified
  at 2.00x over the every-int4 one at 1.94x, scored 2.11x against 2.44x; with two or more candidates it now
  times them together (`verify.time_together`) and budget 0.05 ships every-int4. int4's clip search shrinks
  each block's second moment toward its diagonal (Schafer-Strimmer): 16 decode tokens gave a rank-16 moment
  per block of 128 (every-int4 logit error 0.1452 -> 0.1441; a Ledoit-Wolf identity target did as well there
  but erred 4-14% more than no shrinkage on synthetic tokens with unequal channels).

- **2026-11-28, noon (AMD EPYC with AVX2 only; no GPU lent): 8-bit weights that the saturating kernel
  computes exactly.** On ResNet-50 our every-layer 7-bit plan ran as fast as the peers' every-layer int8 (a
  quiet interleaved check: 242-249 ms for ours, AIMET, ORT and INC alike) but lost on error: one 3x3
  convolution of the last block carried 0.18 of the plan's loss MSE of 0.56 through `int8_w7`'s halved
  resolution. `vpmaddubsw` only saturates where two neighbouring weights of one sign add up to more than 128,
  so `int8_pairs` / `int8_dyn_pairs` keep 8-bit codes, cut such pairs evenly (in the ONNX and the NHWC order of
  K; a probe of single 127 pairs found ORT 1.32's QLinearConv pairing even-aligned neighbours of kH x kW x C)
  and pick each channel's scale among absmax/64..127 for the least squared error after the cuts (about half
  of 7-bit error on Gaussian weights, never worse). The naive version (scale absmax/127, then cut) had 18-150x
  int8's error: most cuts are large. ResNet-50 at budget 0.1: 53 of 54 layers, 1.89x at logit error 0.0365
  (7-bit: 1.80x at 0.052); peers ORT 1 of 14, OpenVINO 2 of 13 above our front (was 5 and 3). MiniLM: 1.285x
  at budget 0.1 (7-bit 1.208x); ORT 2 of 12 above at 72 rounds, both ties (0 of 12 at 100 rounds before).
  Also: no repair round after one whose plan measured no faster than the plan it repaired.

- **2026-11-28, morning (AMD EPYC with AVX2 only; no GPU lent): clip int4 against the layer's input; write
  the file as ONNX Runtime would have optimised it.** ModelOpt's AWQ int4 was the one peer beyond the noise on
  the decoder LM: its clip search picks, per block, the range that minimises the layer's output error on the
  calibration inputs. Ours now does the same with each block's second-moment matrix (`Int4.search_clip`,
  ratios in `Ranges.clips`, used alike by sensitivity and rewrite): every MatMul int4 0.161 -> 0.145-0.148
  logit error, block 128 0.195 -> 0.161, 9 s of search for the 29 MatMuls. The next gap was not the plan but
  the file: the same graph runs 4-7% faster in ONNX Runtime when saved after its basic-level optimisation
  than when optimised while loading (same final op counts; our every-int4 plan 1.99x -> 2.08-2.12x, four
  interleaved runs), and ORT's, INC's and Quark's quantizers write such files. `ort:cpu` now writes that
  form (`OrtBackend.deployed`) and verifies it. Decoder LM peers (300 rounds, 06:36): ORT 2 of 14, OpenVINO
  0 of 14 above our front, none beyond both CIs (was 5 and 2, 2 beyond). Checked and kept: the screen's drop
  of `int8_dyn_w7` on four small k/v projections (the every-MatMul dynamic plan ran 1.70x with them, 1.74x
  without).

- **2026-11-28, early morning (AMD EPYC with AVX2 only, no VNNI; no GPU lent): dynamic scales span the run, and
  int8 saturates on CPUs without VNNI.** The sensitivity took `int8_dyn`'s scale over the calibration sub-batch (8
  samples); the model runs the decode step one token at a time, so the range it quantizes is one token's. Taken over
  the timing batch (`run_batch`), the Llama decode step's predicted whole-model loss of `int8_dyn` went from above
  static `int8`'s to below it (relative RMS 0.0049 against 0.0054, was 0.0056) and the plans at small budgets became
  mostly dynamic. This session's machine lists AVX2 only: ONNX Runtime's u8s8 GEMM there adds pairs of products in
  int16 and saturates (one MatMul: 11 of 160 outputs off by up to 7.6, each equal to the saturated sum to 1e-6), so the
  sensitivity under-predicted `int8` plans 4.2-4.8x on the decode step. The CPU backend now probes the kernel and
  offers `int8_w7` / `int8_dyn_w7` (weights in [-64, 64], ORT's `reduce_range`) there, which the kernel computes
  exactly: measured/predicted loss 1.24-1.52 at the same budgets. The peers' int8 is scored as written and, for ORT,
  with `reduce_range=True` too (error 0.052 -> 0.032 for its dynamic int8). Peers on the decoder LM (300 rounds,
  04:30): ORT 5 of 14, OpenVINO 2 of 14 above our front, 2 beyond both CIs (ModelOpt's AWQ int4 on both backends);
  an every-MatMul int4 plan (budget 0.042) ties the RTN block-32 peers. Eleven tests whose premise is exact `int8`
  kernels skip on such CPUs, saying why (`tests/hardware.py`).

- **2026-11-28, small hours (AMD EPYC; no GPU lent): the configuration cap keeps kinds apart; the decode step
  needs hundreds of rounds.** Where a subgraph has no finer cut, the cap used to tie all its layers into one
  decision; now groups of one kind (weight layers, attention MatMuls) merge pairwise first. On MiniLM on OpenVINO
  that let the pass measure and ship the weights-`int8` / attention-`int8_sym` plan (budget 0.3: 2.57x over
  OpenVINO's fp32 at cosine 0.9911, 100 rounds), above ModelOpt's int8 QDQ with attention (2.53x at 0.978). The
  Llama decode step scored with 40 rounds (7 s for 28 models) gave CIs of +-5-10% and ratios that moved by 25%
  between two runs an hour apart; with 300 rounds (`PEERS_MAX_ROUNDS`) the CIs are 1-3% and four peer points
  come out above our front beyond both CIs, all on the decoder LM: ORT's dynamic int8 (our sensitivity ranks
  dynamic int8 as the lossier format where the measurement says static is: 0.0317 every MatMul static against
  0.0207 every MatMul dynamic), ModelOpt's AWQ int4 (a better int4 than round-to-nearest; on both backends) and, on
  OpenVINO, AIMET's W8A8 (our OpenVINO plans at small budgets keep most layers hp). A cold run's subgraph timings taken
  while a unit test ran beside it over-predicted its plans by 17-20% (`parts_scale` 0.86; 1.0 in the clean
  re-run): that run was thrown away; nothing may run beside a cold pass.

- **2026-11-27, night (AMD EPYC; an H100 lent): a metric bound falls between the front's plans; the device's
  own error, counted.** The solver's front is solved at geometrically spaced loss budgets, so its plans lie far
  apart where the loss is large, which is where a metric bound falls: on MiniLM on OpenVINO (cosine drop <= 0.01)
  the front had 32 layers at 1.91x within the bound and 36 layers 0.0107 over it, nothing between. The metric
  search now solves plans between the last within and the first over (up to 4): it found 36 layers (33 `int8`,
  3 `int8_sym`) within the bound, and at equal quality OpenVINO's plan runs 2.88x over ORT's fp32 at held-out
  cosine 0.9908 (`results/backends_minilm_metric.md`; issue 14's MiniLM target, missed on this machine at a loss
  budget of 0.4, which put 28 layers in `int8_sym` at 0.9807). The numerics check now keeps, per format, the
  backend's output error over ONNX Runtime's with every faithful layer together, and scales the format's loss by
  its square beyond 1.1x: YOLOv8n's `int8_sym` on OpenVINO 1.57x (loss x2.47); the same plan's measured/predicted
  loss went from 1.41 (unscaled terms) to 0.62: the budget now errs on the safe side there, by more than it
  erred on the other side before (one model; the CUDA EP's ratios are 1.001 and 0.998). MobileNetV2's two ORT
  points "above our front" are ties: 200 rounds of the two models alone give 0.999 and 0.998
  (`results/ab.md`), and ONNX Runtime compiles both to the same QLinearConv/QLinearAdd kernels. PaddleOCR's
  detector front re-run: prediction error 0.4% median, 6.0% max (was 6.9% / 9.2%). On ResNet-50 a budget
  between two plans gave 53 of 54 layers in int8 at a larger output error (0.0666) than all 54 (0.0603), and
  the percentile and entropy calibrators gave larger errors than minmax (the every-layer plan written with
  `ampq-pass --plan ... --calib-method M`, scored on the peers' 64 evaluation images: 0.072, 0.090 against 0.060): AIMET's 0.0516 at the same formats comes from its encodings, not from which layer stays.

- **2026-11-27, evening (AMD EPYC; an H100 lent): int4 on OpenVINO; marginal gains fitted both ways; the GPU's
  fp32 is not the CPU's.** OpenVINO's CPU plugin runs the blocked int4 weight DequantizeLinear as a
  compressed-weight kernel: one token through two 4096x4096 MatMuls 4.98 ms fp32, 1.54 ms int8_sym, 1.24 ms int4,
  1.13 ms int4_b128 (at 128 tokens int4 is 0.95x), so `int4`/`int4_b128` are offered there and the screen decides
  (MiniLM: dropped on 35-36 layers; the decoder LM: kept on all 29). With OpenVINO plans for the decoder LM and more
  OpenVINO budgets, the peers' OpenVINO column went from 20 to 10 of 42 points above our front (`results/peers.md`);
  on ONNX Runtime 3 of 45. The repair loop's context gains are marginal gains, and they were fitted to the measured
  plan only when they added up to more; on YOLOv8n on OpenVINO they added up to less (sub-additive subgraphs: the
  corrected table predicted 1.715x for a plan one layer from one measured at 2.095x, and it measured 2.226x), so they
  are now scaled to the measurement both ways. The lent H100 (`results/cuda.md`): the numerics check ran on ORT's
  CUDA EP (int8, int4 faithful) and the verified loss is now the CUDA EP's own, 0.000226 for the unchanged fp32 model
  against the CPU reference; a 16-bit compute format, probed by hand, pays there only with fp16 between layers
  (1.20-1.23x as a chain, 0.82-0.83x with Casts around each layer). The decode step stays the noisiest thing we
  time: the same every-int4_b128 Llama plan measured 1.94x and 1.44x over OpenVINO fp32 in two passes an hour apart.

- **2026-11-27, afternoon (AMD EPYC): OpenVINO computes some QDQ models far off what they say; the pass now
  checks.** Scored with OpenVINO computing them (the peers' OpenVINO column had used ONNX Runtime's quality), every
  int8 YOLOv8n of every tool loses accuracy on OpenVINO: AIMET's W8A8 0.0165 -> 0.154 relative output error,
  ORT's `quantize_static` 0.0175 -> 0.146, ModelOpt's 0.021 -> 0.102, our OpenVINO plan 0.017 -> 0.2085.
  Bisected one layer at a time: 12 `int8_sym` convolutions fed by a Concat (0.02-0.26 alone on OpenVINO,
  0.0004-0.003 in ONNX Runtime) and, in `int8` with an output Q/DQ, the 3 box-head convolutions feeding the head's
  Concat; everything else agrees to the digit. The new numerics stage finds such (layer, format) pairs by group
  testing on one calibration batch (96 compilations, 66 s on YOLOv8n; 2 on MiniLM and ResNet-50, which OpenVINO
  computes faithfully) and drops them; the verified loss is measured with the backend computing the plan. Our
  YOLOv8n OpenVINO plan: 2.23x over OpenVINO's fp32 at error 0.0233 on OpenVINO (`results/peers.md`); in
  `results/backends_yolov8n.md` it runs 2.16x at 1 - mean error 0.977 there, the ORT plan 1.74x at 0.853: each
  backend's own plan is now the fastest and the more accurate on it. ModelOpt's int8 QDQ (2.52x at 0.102) stays above
  our OpenVINO front: reaching it takes the pairs OpenVINO computes off. Separately, on the PaddleOCR detector's
  over-prediction (issue 13): the whole-model ratios of this model moved by up to 20% between runs within an hour
  (the every-int8 plan measured 1.12x, 1.26x and 1.34x over hp, each interleaved in one process), and two subgraphs of its neck (the FPN
  convs and the head conv, 9-10 ms gain each alone) measured sub-additive together (predicted 1.29x, measured
  1.16x, each alone 1.11x); not fixed. The Llama front with budgets 0.035 and 0.003 added: 2 of 12 peer points
  above on ONNX Runtime (was 5).
- **2026-11-27, noon (AMD EPYC): the peers re-run on one machine; a uniform plan within the noise is verified; two
  ideas measured and dropped.** The peers tables of MiniLM, ResNet-50 and the Llama decoder were Intel Xeon runs
  whose MiniLM rows showed our verification rejecting three plans under load (unpaired intervals). Re-run here with
  the paired intervals: MiniLM on ORT **0 of 10** peer points above our front (was 3 of 10; every budget ships,
  its prediction within 0.5-1.3% of its own verification), on OpenVINO 3 of 10; ResNet-50: every all-int8 model of
  every tool within 3% (ours 3.45-3.51x at logit error 0.060, the peers 3.43-3.50x at 0.052-0.136), 1 of 12 above.
  The pass now verifies a uniform plan measured in the whole model while timing (an anchor) also where that
  measurement is under its plan but its 95% interval reaches above it: at the Llama decode step the
  every-int4_b128 plan had measured 2.37x while timing, under the 2.49x verified, and was dropped, while ORT's own
  block-128 model (the same quantization) scored 2.71x; budgets 0.05-0.1 now ship it (2.68-2.78x at error 0.195,
  ORT's 2.68x), and with budget 0.04 added the Llama front has 5 of 12 peer points above (was 7). The PaddleOCR
  detector's front re-run after the HardSwish change: still 0 of 7 ORT points above (ours 1.56x at error 0.140,
  ORT's best 1.48x at 0.173), but the pass over-predicts its plans there by 6-9% (median 6.9%, max 9.2% over the
  normalised model; 1.6% / 2.7% with the x*HardSigmoid form): not explained yet. Dropped after measuring: (1) the
  attention's activation x activation MatMuls as layers on OpenVINO (ModelOpt's int8 QDQ quantizes them and runs
  MiniLM 2.60x over OpenVINO's fp32): here the every-int8_sym plan with them ran 2.24x against 2.42x without, and a
  45-of-48-layer plan was predicted 2.22x and measured 1.71x; (2) a cut bonus kept per 8-bit state (today an int8
  cut also earns the bonus int8_sym's anchor measured): recomputed on the OpenVINO corpus's round-0 plans it moved
  BERT-base from 1.9% to 5.7% prediction error and ResNet-50 from 8.1% to 10.7% (ViT-S 4.6% to 2.0%), so the
  shared bonus stays.

- **2026-11-27, morning (AMD EPYC): EfficientNet's "int8 destroys it" was an ONNX Runtime kernel; TF-style Pads
  cost the int8 models what fp32 never paid.** The corpus CNN fronts had EfficientNet-B0 at output error 1.0 for
  every int8 plan, ours and ORT `quantize_static`'s, and we blamed the random weights. Bisecting the optimized
  graph: ORT's QLinearAveragePool divides a `ceil_mode` window that hangs off the input by the whole kernel under
  `count_include_pad` (its float AveragePool was fixed for this, ORT issue 16203), and HF EfficientNet's pooler is
  `AvgPool2d(1280, ceil_mode=True)` on a 7x7 map: the logits came out constant. The rule table now keeps such an
  AveragePool float (`OpRule.float_when`); our all-int8 plan went from error 1.0 to 0.47. Second, TensorFlow-style
  "same" padding exports a Pad (its pads computed from constants) before every convolution (HF MobileNetV2: 52,
  EfficientNet-B0: 5). ONNX Runtime keeps DQ -> Pad -> Q in float, and the SiLU before a float Pad stayed float
  with it (EfficientNet all-int8 profile: 74 ms against ORT's own QDQ model's 60). Normalisation now folds a zero
  Pad into the convolution's pads (`FoldPadsIntoConvs`), and a Pad that cannot fold runs on the 8-bit tensor
  (`OpRule.on_quantized`). EfficientNet-B0 all-int8: 1.28x -> 1.87x (ORT's best 1.45x); MobileNetV2 classic 1.91x
  -> 2.16x (ORT pre-processed 2.23x, CIs overlapping). The folded model is itself faster than the file on
  EfficientNet (ORT does not fold those Pads in fp32: 1.29x at 0 layers quantized), which the pass's own
  speed-ups (over the model as it loads it) do not count. ConvNeXt-T's first front: 2.20x against ORT's best
  1.70x, at output error 0.0000 - with random weights HF's layer scale (1e-6 at init) leaves the blocks' MatMuls
  almost no say in the output, so this front says nothing about ConvNeXt's accuracy.
- **2026-11-27, early morning (AMD EPYC): a cut's Q/DQ is read by more than layers; the anchors keep to the time
  budget.** An 8-bit cut state quantizes a tensor once for every reader, and the sensitivity counted only the layers
  reading it: in a transformer the LayerNorm output that feeds q/k/v (or ff1) is also the residual the next Add reads.
  With every LayerNorm output an int8 cut (OpenVINO's plans) DistilBERT measured 175 against 52 predicted and
  BERT-base 4.36x its prediction; the loss check blamed "the first-order estimates per layer". A per-cut term
  `E[(<G_t - sum of the layer readers' G, E>)^2]` (`Sensitivity.cuts`), added once per 8-bit cut, brought them to
  0.96 and 1.05 (predicted 163 and 214, measured 156 and 226), and BERT-base's plan is now bound by the loss budget.
  On the repo's residual CNN the same terms are about 6% of the prediction (cuts made by int8 Convs, whose own
  output term already counts every reader, add nothing). Separately, the whole-model anchors (hp, int8, int8_sym,
  up to 60 s each) had run outside the timing allowance: OpenVINO ConvNeXt-T took 514 s of a 325 s allowance and
  616 s cold; with the subgraphs at 70% and the anchors sharing the rest it took 378 s and 457 s cold. The corpus
  CNN fronts (`results/cnn_fronts.md`) put our front at or above every ORT `quantize_static` configuration on
  ResNet-50, YOLOv8n and MTCNN ONet, tied on MobileNetV2, below on EfficientNet-B0 (all-int8 1.28x vs 1.47x, both
  at 100% output error); they also found the repair loop over-correcting: context gains, each measured with the
  rest of the plan in place, count a saving shared by int8 neighbours once per side (ResNet-50 at budget 0.02:
  2.01x predicted, 1.275x measured); fitted to the measured plan, 1.39x / 1.29x.

- **2026-11-27, night (AMD EPYC this time): int4 with blocks of 128; OpenVINO refusals up front; the whole corpus on
  OpenVINO.** The "unexplained" gap between our int4 plan and ModelOpt's identical int4 RTN was the position in the
  run: the same optimised graph (29 MatMulNBits, accuracy level 4) ran 3.67 vs 3.50 ms with ours listed first and
  3.57 vs 3.73 ms with ORT's first. What is real is the block size: blocks of 128 ran 12-17% faster than blocks of
  32 at a decode step, so `int4_b128` is offered beside `int4` and the pass mixes them (corpus Llama: 14 b128, 4
  b32, 11 int8, 2.52x predicted / 2.45x measured). In the peers table it is still not enough: two score runs of the
  same 17 models, a minute apart, put our budget-0.1 plan at 2.23x and 2.53x and ORT's block-128 MatMulNBits at
  2.71x and 2.66x (errors 0.212 and 0.195): batch-1 decode timings move 10-15% between runs, and ORT's point stays
  above ours (`results/peers.md`). OpenVINO refuses some models ONNX Runtime runs (EfficientNet-B0's AveragePool
  with a kernel wider than its input, silero-vad's dynamic-rank Conv): the pass now compiles and runs the whole
  model there before any work and says so in 4-9 s (was 227 s, and once a traceback after 310 s where OpenVINO
  deferred the check to the first inference). The OpenVINO corpus is complete: 20 of 24 ok, 4 refused in one line,
  median prediction error 3.6% (`results/corpus_openvino.md`, rows from two machines, each naming its CPU).

- **2026-11-26, late night: each 8-bit state linked; the loss budget measured; a decoder LM among the peers.**
  With int8 and int8_sym both offered (OpenVINO) the solver linked only one state per cut, so both sides of a cut
  could take the other with no layer asking for it: MobileNetV2's OpenVINO plan quantized 16 tensors twice
  (uint8 cut, then int8 at the reader) and measured 54.7x its predicted loss (now 1.77x, `results/corpus_openvino.md`;
  MiniLM 12.3x -> 1.89x). A plan whose measured loss is over 2x the budget no longer ships (the pass solves again
  aiming at 0.9 of that); on OpenVINO MiniLM's 30-layer plan measured 2.07x the budget and the 29-layer one shipped:
  2.42x over ORT fp32 at cosine 0.9956 (`results/backends.md`). On the repo CNN the "shipped plans slower than the
  solver's own" of `results/cnn_front.md` was noise: in a 40-round A/B (spinning off) they ran 2.644x vs 2.673x
  (budget 0.001) and 3.204x vs 3.202x (0.002); a many-model interleaved run also inflates fp32 (141 ms there, 110 ms
  with seven models): ratios from different runs do not compare. The decoder LM (small Llama, a decode step, batch
  1, past 256; `results/peers.md`): the peers' int4 weight-only recipes (ORT/INC/Quark MatMulNBits, ModelOpt DQ
  int4) run 2.24-2.42x at logit error 0.15-0.22. Our subgraph-chosen int4/int8 mix shipped 1.84x; the uniform
  int4 plan, now a whole-model candidate the pass verifies, 1.96x with 24 of 29 MatMuls: the screen timed each
  MatMul alone, where its 1 MB of fp32 weights stays in cache between repeats, so int4 looked no faster than fp32
  on 5-8 layers, while in the model (181 MB of weights per step) every one is memory-bound. With int4 no longer
  screened on memory-bound layers (<= 16 rows per run) every MatMul ships in int4: 2.14x at 0.18 - still below
  the peers (ModelOpt's identical int4 RTN 2.24x in the same run, ORT's block 128 2.42x): missed.

- **2026-11-26, night: OpenVINO's own activation convention.** OpenVINO runs symmetric activations (zero point
  0) far faster than ONNX Runtime's uint8 asymmetric ones on SiLU networks: every YOLOv8n conv 1.86x over fp32 in
  the new `int8_sym` format against 1.46x in `int8` (and error 0.014 against 0.145 there, the conv-output Q/DQ
  hurting on OpenVINO). But not everywhere: MiniLM's plan made with `int8_sym` alone ran 2.24x over ORT fp32
  against 2.47x with `int8` alone (one-sided GELU ranges cost accuracy, fewer layers fit). And dropping the
  conv-output Q/DQ stranded ResNet-50's residual Adds in float (every conv int8_sym 4.70x against 7.98x for
  int8) until the fusion stage quantized a layer's output where every reader is an 8-bit op (7.17x). With both
  formats offered and chosen per layer (`results/backends.md`): MiniLM 2.55x over ORT fp32 at cosine 0.9931
  (26 int8 + 4 int8_sym), ResNet-50 6.74x, YOLOv8n 2.06x, each the fastest plan on its backend but ResNet-50 on
  ORT (a tie); OpenVINO pass errors 3.7/1.6/1.0%, but its passes take 153-588 s (three options per layer).
  In the peers table the YOLOv8n OpenVINO plan (int8_sym alone) went from 1.74x to 2.19x over OpenVINO's fp32,
  ModelOpt's 2.21-2.25x now within the CIs (`results/peers.md`).

- **2026-11-26, evening: a GPU, the OpenVINO time model, memory-bounded timing, YOLOv8n among the peers.**
  On a lent H100 (`results/cuda.md`) no format as the rewrite writes it beats fp32 on ONNX Runtime's CUDA EP
  (QDQ int8/fp8 0.39-0.69x, int4 0.54-0.57x, fp16/bf16 Cast pairs 0.71-0.83x, int8_dyn falls back to the CPU), so
  `ort:cuda` offers hp only and the pass kept the model (1.02x, noise); a 16-bit compute format is what would pay
  there. Trying the int8 anchor's cut bonus before the factor's bounds took the OpenVINO pass on ResNet-50 from
  50.7% to 4.0% prediction error (`results/backends.md`; median over three models 4.0%). The default timing batch
  is cut to what one whole-model session holds in 1 GiB: the 736 x 3008 detector's whole pass peaked at 2.98 GB
  (target 3.04) in 527 s (`results/memory.md`). YOLOv8n in the peers table (`results/peers.md`): on ORT our plans
  (1.87-2.02x) tie AIMET W8A8 (2.12x) and ORT `quantize_static` (2.06x) within the spread of our own identical
  plans; on OpenVINO ModelOpt's int8 QDQ (2.17x) beats our OpenVINO plan (1.74x) - missed: by A/B, OpenVINO runs
  signed symmetric int8 activations faster than our uint8 asymmetric ones (our plan made symmetric: 1.92x).

- **Issue 15 (2026-11-26): the peers' own automatic searches** (`results/peers.md`; each peer in its own venv,
  same calibration data, one interleaved timing run per model on this VM at load 4-6, so CIs are wide). MiniLM:
  our metric-driven search (`--max-metric-drop 0.01`, the metric the peers search with) 2.28x at cosine 0.9932,
  INC `autotune` (tolerable_loss 0.01) 2.32x at 0.9932, ORT dynamic per-channel 2.14x at 0.9935, our budget 0.15
  2.08x at 0.9944: ties within the CIs; AIMET AMP 1.42x at 0.9953 (ours at budget 0.1: 1.53x at 0.9966), Quark AMP
  0.93x at 0.965, ModelOpt INT8 1.08-1.15x at <= 0.978. Under that load the pass rejected its plans at budgets
  0.03/0.05 (CIs overlapping) and wrote the input. ResNet-50 (random init): ours 3.69x at logit error 0.061 and
  3.10x at 0.040; AIMET AMP with its default config (3.73x at 0.052) and INC's static autotune (3.76x at 0.106)
  lie above our front - missed there.

- **Issue 13, later the same day: the parts fitted to a measured int8 anchor.** A subgraph timed alone pays edge
  costs the whole model does not (ORT: a Transpose at each edge of an int8 subgraph, NCHWc reorders on hp ones);
  the pass now also times the model with every int8-capable layer in int8 and scales the int8 configurations to
  predict it, and verifies that plan too when it fits the budget. Round-0 error over the five CNNs of
  `results/boundaries.md`: median 0.7%, max 3.2%; corpus ResNet-50 4.8% (was 15%); YOLOv8n 9.8-16.5%
  over-predicted (a plan with a few hp layers loses more than one factor says), and it now ships the verified
  all-int8 plan at 1.84x. Repo CNN front (`results/cnn_front.md`, before the verified anchor): 3.18x against ORT
  `quantize_static` U8S8 per-channel 3.48x - missed. Ray (issue 16): 8-worker efficiency 0.91 (`results/ray.md`).

- **Issue 13 (2026-11-26): boundary states and fusion rules** replace the "additivity breaks at the cuts" finding
  below: with the cut tensors timed in the state the plan gives them, the CNN prediction error is median 2.7% (max
  12.2%) over five CNNs against 8.1% (max 78.3%) without, and the repo CNN's shipped plan runs 3.01x instead of 2.05x
  (`results/boundaries.md`); the corpus ResNet-50 went from 1.35x to 2.83x measured (`results/corpus.md`).

- **Targets on MiniLM (batch 8 x seq 128, ORT CPU EP)**: speed-up >= 1.5x at mean cosine >= 0.99 is met; the
  time-gain prediction error (median over every mixed plan measured) is within 5%; the whole pass is far under
  10 min cold / 1 min warm. "Our front is never below any baseline's front" is **missed**: see the next points.
- **Against the other plan makers** (same sensitivities, same rewrite): at equal predicted-loss budget our plans
  are the fastest at most budgets on MiniLM, but the margins over the `mac` cost model and the per-layer greedy are
  mostly inside the timing CI, and on the Llama decoder they are ties within noise. Ordered by *measured* quality
  (the strict front check) several baseline points land marginally above ours, because plans of nearly equal
  predicted loss rank differently on measured cosine.
- **Residual CNN: the pass's additivity assumption breaks at the cuts.** An int8 Conv emits a quantized output
  and ONNX Runtime folds DQ->Q across the cut, so quantizing the stem conv pays off end to end while its subgraph
  timed alone shows no gain; the pass keeps it in fp32 and the `mac` program (which quantizes it) is faster at
  most budgets. ONNX Runtime's own QOperator / per-channel QDQ output keeps int8 through Add/Relu and is faster still.
- **Strongest baseline on the transformers: `quantize_dynamic` with per-channel weights**, at about the same
  quality as our all-quantized plan and faster on MiniLM (and slightly on Llama); it is very slow on the CNN
  (ConvInteger). `quantize_static` with its defaults (S8S8 QDQ on every op) ruins MiniLM; S8S8 activations are not
  fast on this CPU; the best static settings (per-channel, U8S8, MatMul only) are fast but lose quality on MiniLM.
- **Loss-MSE prediction holds** on all three models (measured/predicted near 1 on every mixed plan).
- **Timing on a shared machine.** During development (earlier runs of the same scripts while other engineers'
  jobs loaded this 2-core VM; those results were overwritten and are not in the tables), the cold pass's gain
  table absorbed load bursts: identical blocks got fp32 times up to ~2x apart, the predicted speed-up drifted far
  from the measured one, and the integer program optimised the noise. The timing protocol's CI check cannot see a
  level shift that hits all configurations of a subgraph alike. The scripts now wait for a quiet machine and use
  paired per-round ratios; the "per subgraph (ms)" line of each report shows whether twin blocks agreed.
  Since commit "timing: anchor every subgraph's hp time..." (after the issue-7 runs above, which used dd89805),
  the pass itself times every subgraph's fp32 model and the whole model together in one interleaved
  measurement and keeps each subgraph's measured config/fp32 *ratios* on that common scale, so a burst during one
  subgraph's rounds no longer inflates its gain (`tests/test_timing.py::test_anchoring_undoes_a_load_burst`);
  `results/pass.md` was measured with it. The issue-7 tables have not been re-run since.
"""


def quoted(text: str) -> str:
    text = re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + 2) + " ", text, flags=re.M)
    return re.sub(r"\]\(([^)/]+\.png)\)", r"](results/\1)", text)


def main() -> None:
    out = ["# Benchmarks\n",
           "One command per benchmark; each writes a markdown table (and PNG figures) into `results/`, with the "
           "machine, library versions and date at its top. This README is assembled from those files by "
           "`.venv/bin/python benchmarks/make_readme.py` and quotes them verbatim.\n",
           "Machine: a shared 2-core x86-64 VM (other engineers run tests on it at the same time). Every "
           "comparison of speed is a ratio from one process in which all compared models were timed "
           "interleaved (round-robin, same inputs), and the load average is recorded beside it.\n",
           "`benchmarks/run_snapshot.sh` runs a script against a clean snapshot of the committed code "
           "(`git archive HEAD` into /tmp, first on PYTHONPATH), because the package is edited in this "
           "checkout while benchmarks run; the commit is named in each result file. The issue-7 benchmarks "
           "(`bench_minilm_front.py`, `bench_models.py`) share their engine, `front.py`.\n",
           LEARNED,
           "| benchmark | command | results |\n|---|---|---|"]
    for f, title, cmd in MAIN + EARLIER:
        if (RESULTS / f).exists():
            out.append(f"| {title} | `{cmd}` | [results/{f}](results/{f}) |")
    out.append("")
    for f, title, cmd in MAIN:
        path = RESULTS / f
        if not path.exists():
            out.append(f"## {title}\n\nNot run yet: `{cmd}`.\n")
            continue
        out.append(f"## {title}\n\nCommand: `{cmd}`\n")
        out.append(quoted(path.read_text()))
    out.append("## Earlier per-stage benchmarks\n")
    for f, title, cmd in EARLIER:
        if (RESULTS / f).exists():
            out.append(f"- {title}: `{cmd}` -> [results/{f}](results/{f})")
    (HERE / "README.md").write_text("\n".join(out) + "\n")
    print(f"wrote {HERE / 'README.md'}")


if __name__ == "__main__":
    main()
