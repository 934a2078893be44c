"""Sensitivity (design.md §3): the first-order Taylor estimate of each layer's loss MSE in
each format, from forward and backward passes of a torch executor of the ONNX graph.

- :mod:`.taylor`: the estimate itself (:func:`sensitivity`, :func:`predicted_mse`, :func:`cut_mse`);
- :mod:`.executor`: the ONNX -> torch interpreter and its op table;
- :mod:`.losses`: the losses whose change is measured.
"""

from ampq_pass.stages.sensitivity.taylor import (CutLoss, Sensitivity, constant_output_warning, cut_mse, predicted_mse,
                                                sensitivity)

__all__ = ["CutLoss", "Sensitivity", "constant_output_warning", "cut_mse", "predicted_mse", "sensitivity"]
