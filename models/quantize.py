"""INT8 post-training static quantization with ONNX Runtime (QDQ), calibrated on lake images.

Two activation formats are built and measured: U8S8 (uint8 activations, int8 weights; ORT's fast path on x86 with
VNNI, where it fuses Conv/Add into QLinear kernels) and S8S8 (int8 activations, ORT's default, and what TensorRT
needs with symmetric activations). Weights are per-channel when asked.

The head (everything after the global pool: the classifier, the squeeze, the sigmoid) stays in float. Quantized, the
logit and the probability each took one of 256 levels, so every score was a multiple of 1/255 and the thresholds that
matter (0.004–0.03) could only move in steps that changed specificity by ~0.1. The head is one 320×1 product per
image: keeping it in float costs nothing measurable, and INT8 scores then differ from FP32 by rounding, not by steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from models.contract import INPUT_NAME
from screenline.files import atomic_path, temp_beside

POOLS = ("GlobalAveragePool", "ReduceMean", "GlobalMaxPool", "ReduceMax")

FORMATS = {"u8s8": "QUInt8", "s8s8": "QInt8"}


class _Reader:
    """Feeds calibration batches of uint8 pixels to the quantizer."""

    def __init__(self, pixels: np.ndarray, batch: int = 64):
        self.batches = iter([pixels[i: i + batch] for i in range(0, len(pixels), batch)])

    def get_next(self) -> dict | None:
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch)}


def head_nodes(graph: onnx.GraphProto) -> list[str]:
    """Names of the nodes after the last global pool: the head, kept in float. ONNX lists nodes in topological
    order, so they are the nodes after it in the list."""
    pools = [i for i, node in enumerate(graph.node) if node.op_type in POOLS]
    if not pools:
        raise ValueError("no global pool (GlobalAveragePool/GlobalMaxPool/ReduceMean/ReduceMax) in the graph: cannot find its head")
    return [node.name for node in graph.node[pools[-1] + 1:]]


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray, fmt: str = "u8s8",
                  per_channel: bool = True, symmetric_activations: bool = False) -> Path:
    """Write a QDQ INT8 graph of `fp32` to `out`, calibrated (MinMax) on `calibration` pixels; the head stays in
    float (see the module's docstring)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out.parent.mkdir(parents=True, exist_ok=True)
    prepped = temp_beside(out, ".pre.onnx")
    try:
        quant_pre_process(str(fp32), str(prepped), skip_symbolic_shape=True)
        with atomic_path(out) as tmp:
            quantize_static(
                str(prepped), str(tmp), _Reader(calibration), quant_format=QuantFormat.QDQ,
                activation_type=getattr(QuantType, FORMATS[fmt]), weight_type=QuantType.QInt8,
                per_channel=per_channel, calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=head_nodes(onnx.load(str(prepped)).graph),
                extra_options={"ActivationSymmetric": symmetric_activations},
            )
    finally:
        prepped.unlink(missing_ok=True)
    return out
