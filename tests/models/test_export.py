"""ONNX export: one self-contained file, dynamic batch, BatchNorm folded, scores equal to torch; INT8 close."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from models.engine import OrtEngine, find_knee, scores
from models.export import export_onnx
from models.nets import ScreenNet
from models.quantize import quantize_int8
from tasks.train import predict


def trained_like() -> ScreenNet:
    model = ScreenNet().eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
    return model


def test_export_parity_dynamic_batch_and_single_file(tmp_path):
    model = trained_like()
    path = export_onnx(model, tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no external data
    graph = onnx.load(str(path))
    assert not any(n.op_type == "BatchNormalization" for n in graph.graph.node)
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    x = np.random.default_rng(1).integers(0, 256, (37, 1, 64, 64), dtype=np.uint8)
    engine = OrtEngine(path)
    for n in (1, 7, 37):
        assert engine.infer(x[:n]).shape == (n,)
    diff = np.abs(scores(engine, x) - predict(model, x)).max()
    assert diff < 1e-5


def test_int8_graph_tracks_fp32_and_the_knee_is_a_sweep_point(tmp_path):
    model = trained_like()
    fp32 = export_onnx(model, tmp_path / "m.onnx")
    x = np.random.default_rng(2).integers(0, 256, (128, 1, 64, 64), dtype=np.uint8)
    int8 = quantize_int8(fp32, tmp_path / "q.onnx", x[:64], "u8s8")
    q = onnx.load(str(int8))
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)
    a, b = scores(OrtEngine(fp32), x), scores(OrtEngine(int8, "int8"), x)
    assert np.abs(a - b).max() < 0.05  # probabilities; quality on real data is gated in optimize
    knee = find_knee(OrtEngine(int8, "int8"), x, max_batch=8, seconds_per_point=0.02)
    assert knee.batch in [p.batch for p in knee.sweep] and knee.sweep[0].batch == 1


def test_engine_refuses_float_input(tmp_path):
    engine = OrtEngine(export_onnx(trained_like(), tmp_path / "m.onnx"))
    import pytest

    with pytest.raises(ValueError, match="uint8"):
        engine.infer(np.zeros((1, 1, 64, 64), np.float32))


def test_the_knee_sweep_stops_at_an_engines_own_largest_batch(tmp_path):
    """A TensorRT plan accepts at most its profile's max: the sweep (and its extension) never asks for more."""
    engine = OrtEngine(export_onnx(trained_like(), tmp_path / "m.onnx"))
    engine.max_batch = 4
    x = np.random.default_rng(3).integers(0, 256, (16, 1, 64, 64), dtype=np.uint8)
    knee = find_knee(engine, x, max_batch=64, seconds_per_point=0.01)
    assert [p.batch for p in knee.sweep] == [1, 2, 4]


@pytest.mark.parametrize("fmt", ["u8s8", "s8s8"])
def test_int8_graphs_keep_the_head_in_float_so_scores_are_not_255_steps(tmp_path, fmt):
    """A threshold needs resolution: INT8 scores must differ from FP32 by rounding, not take one of 256 levels."""
    from tasks.samples import SITES, generate

    torch.manual_seed(0)
    net = ScreenNet().eval()
    with torch.no_grad():
        net.classifier.weight.mul_(300.0)  # random features barely vary: spread the logits
    fp32 = export_onnx(net, tmp_path / "f.onnx")
    x = generate(2000, 0.3, 7, SITES["a"], "resolution")[0][:, None]
    int8 = quantize_int8(fp32, tmp_path / "q.onnx", x[:256], fmt)
    nodes = onnx.load(str(int8)).graph.node
    pool = max(i for i, n in enumerate(nodes) if n.op_type == "ReduceMean")
    assert [n.op_type for n in nodes[pool + 1:]] == ["Reshape", "Gemm", "Squeeze", "Sigmoid"]  # no Q/DQ in the head
    quantized, exact = scores(OrtEngine(int8, "int8"), x), scores(OrtEngine(fp32), x)
    assert len(np.unique(quantized)) > 256
    assert np.abs(quantized - exact).max() < 1e-3


@pytest.mark.parametrize("pool", ["max", "avgmax"])
def test_a_max_pooled_net_exports_and_its_int8_head_stays_in_float(tmp_path, pool):
    from models.nets import ScreenNetConfig
    from models.quantize import POOLS, head_nodes

    torch.manual_seed(0)
    net = ScreenNet(ScreenNetConfig(pool=pool)).eval()
    fp32 = export_onnx(net, tmp_path / "f.onnx")
    x = np.random.default_rng(4).integers(0, 256, (64, 1, 64, 64), dtype=np.uint8)
    assert np.abs(scores(OrtEngine(fp32), x) - predict(net, x)).max() < 1e-5
    int8 = quantize_int8(fp32, tmp_path / "q.onnx", x, "u8s8")
    nodes = onnx.load(str(int8)).graph.node
    assert head_nodes(onnx.load(str(fp32)).graph)  # the head was found behind the max pool
    pool = max(i for i, n in enumerate(nodes) if n.op_type in POOLS)
    assert any(n.op_type in POOLS and "Max" in n.op_type for n in nodes)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in nodes[pool + 1:])  # head in float


@pytest.mark.parametrize("fmt", ["u8s8", "s8s8"])
def test_the_uint8_input_graph_reads_pixels_directly_and_scores_like_the_float_path(tmp_path, fmt):
    """models.quantize.uint8_input: no Cast/Sub/Mul/Quantize before the first convolution, and scores that stay as
    close to FP32 as the INT8 graph it came from (the half-level zero-point offset is folded into the bias)."""
    from models.engine import OpenVinoEngine
    from models.quantize import uint8_input
    from tasks.samples import SITES, generate

    torch.manual_seed(0)
    net = trained_like()
    with torch.no_grad():
        net.classifier.weight.mul_(300.0)  # random features barely vary: spread the logits
    fp32 = export_onnx(net, tmp_path / "f.onnx")
    x = generate(1000, 0.3, 8, SITES["a"], "uint8-path")[0][:, None]
    int8 = quantize_int8(fp32, tmp_path / "q.onnx", x[:256], fmt, per_channel=False)
    direct = uint8_input(int8, tmp_path / "u8.onnx")
    graph = onnx.load(str(direct)).graph
    first_conv = next(i for i, n in enumerate(graph.node) if n.op_type == "Conv")
    before = [n for n in graph.node[:first_conv] if "pixels" in n.input]
    assert [n.op_type for n in before] == ["DequantizeLinear"]  # the pixels, dequantized, and nothing else
    assert not any(n.op_type in ("Cast", "Sub", "Mul") for n in graph.node)
    exact = scores(OrtEngine(fp32), x)
    for engine in (OrtEngine, OpenVinoEngine):
        quantized, uint8_path = scores(engine(int8, "int8"), x), scores(engine(direct, "int8"), x)
        assert np.abs(uint8_path - exact).max() <= np.abs(quantized - exact).max() + 2e-3, engine.name
        assert np.abs(uint8_path - quantized).mean() < 2e-3, engine.name
