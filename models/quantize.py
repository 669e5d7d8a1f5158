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


def uint8_input(int8: Path, out: Path) -> Path:
    """Write `int8` with its first convolution reading the uint8 pixels as a quantized tensor.

    The exported graph normalises every pixel in float (Cast → Sub → Mul) and the quantizer then quantizes the
    result twice more (QuantizeLinear/DequantizeLinear after Sub and after Mul): seven elementwise passes over every
    pixel before the first convolution. Here the first convolution's input DequantizeLinear reads the pixels
    themselves, with scale 1/PIXEL_STD and zero point ⌈PIXEL_MEAN⌉ (pixels are already exact uint8 levels), and the
    half-level offset between that zero point and PIXEL_MEAN is folded into the convolution's (quantized) bias. That
    is exact where the 3×3 window lies inside the image; on the one-pixel border, where the window reads padding,
    the padded taps differ by the offset times their weights (a rounding-sized change, which the uint8-input test
    bounds). The normalising nodes, now unused, are removed.
    """
    import math

    from onnx import helper, numpy_helper

    from models.contract import PIXEL_MEAN, PIXEL_STD

    model = onnx.load(str(int8))
    graph = model.graph
    init = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    conv, frontier, seen = None, [INPUT_NAME], set()
    while frontier and conv is None:  # breadth-first from the input to the first Conv
        name = frontier.pop(0)
        for node in consumers.get(name, []):
            if node.op_type == "Conv":
                conv = node
                break
            if node.name not in seen:
                seen.add(node.name)
                frontier.extend(node.output)
    if conv is None or producer.get(conv.input[0]) is None or producer[conv.input[0]].op_type != "DequantizeLinear":
        raise ValueError(f"{int8.name}: no quantized first convolution (Conv fed by a DequantizeLinear) to feed uint8")
    dq = producer[conv.input[0]]
    zero_point = math.ceil(PIXEL_MEAN)
    offset = (zero_point - PIXEL_MEAN) / PIXEL_STD  # true input = (pixel - zero_point) / PIXEL_STD + offset
    scale_name, zp_name = f"{INPUT_NAME}_scale", f"{INPUT_NAME}_zero_point"
    graph.initializer.extend([numpy_helper.from_array(np.array(1.0 / PIXEL_STD, np.float32), scale_name),
                              numpy_helper.from_array(np.array(zero_point, np.uint8), zp_name)])
    new_dq = helper.make_node("DequantizeLinear", [INPUT_NAME, scale_name, zp_name], [f"{INPUT_NAME}_dequantized"],
                              name=f"{INPUT_NAME}_DequantizeLinear")
    conv.input[0] = new_dq.output[0]
    if offset and len(conv.input) > 2:
        weight = _dequantized(producer, init, conv.input[1])
        bias_dq = producer.get(conv.input[2])
        if bias_dq is None or bias_dq.op_type != "DequantizeLinear":
            raise ValueError(f"{int8.name}: the first convolution's bias is not a quantized initializer")
        q = numpy_helper.to_array(init[bias_dq.input[0]])
        bias_scale = numpy_helper.to_array(init[bias_dq.input[1]]).astype(np.float64)
        shift = offset * weight.reshape(weight.shape[0], -1).sum(axis=1)
        init[bias_dq.input[0]].CopyFrom(numpy_helper.from_array(
            (q + np.round(shift / bias_scale)).astype(q.dtype), bias_dq.input[0]))
    nodes = [new_dq] + [n for n in graph.node if n is not dq]
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(nodes):  # topological order: a node is kept when something kept reads what it writes
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    used = {i for n in graph.node for i in n.input}
    keep_init = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep_init)
    onnx.checker.check_model(model)
    with atomic_path(out) as tmp:
        onnx.save(model, str(tmp))
    return out


def _dequantized(producer: dict, init: dict, name: str) -> np.ndarray:
    """The float value of a DequantizeLinear of an initializer (per-tensor or per-channel on axis 0)."""
    from onnx import numpy_helper

    node = producer[name]
    q = numpy_helper.to_array(init[node.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(init[node.input[1]]).astype(np.float64)
    zp = numpy_helper.to_array(init[node.input[2]]).astype(np.float64) if len(node.input) > 2 else 0.0
    shape = (-1,) + (1,) * (q.ndim - 1) if np.ndim(scale) else ()
    return (q - np.reshape(zp, shape)) * np.reshape(scale, shape)
