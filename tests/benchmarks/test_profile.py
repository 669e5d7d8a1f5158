"""The per-operator profile names where a graph's time goes, grouped as the net is built, on both CPU engines."""

from __future__ import annotations

import numpy as np
import onnx
import pytest


@pytest.fixture(scope="module", params=["conv3s2", "patch4"])
def graphs(request, tmp_path_factory):
    import torch

    from models.export import export_onnx
    from models.nets import ScreenNet, ScreenNetConfig, fold_batchnorm
    from models.quantize import quantize_int8

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param)
    model = fold_batchnorm(ScreenNet(ScreenNetConfig(width=0.5, stem=request.param)).eval())
    fp32 = export_onnx(model, folder / "fp32.onnx")
    calibration = np.random.default_rng(0).integers(0, 256, (16, 1, 64, 64), dtype=np.uint8)
    return {"fp32": fp32, "int8": quantize_int8(fp32, folder / "int8.onnx", calibration)}


def test_conv_kinds_reads_the_stem_depthwise_and_pointwise_convolutions(graphs):
    from benchmarks.profile import conv_kinds

    for file in graphs.values():
        kinds = conv_kinds(onnx.load(str(file)))
        assert list(kinds.values()).count("stem") == 1  # through the cast, normalisation and Q/DQ
        # ScreenNet's 9 blocks: a depthwise 3×3 each; an expand 1×1 (not the first) and a project 1×1 each; the
        # head's 1×1
        assert list(kinds.values()).count("depthwise") == 9
        assert list(kinds.values()).count("1×1") == 8 + 9 + 1
        assert set(kinds.values()) == {"stem", "depthwise", "1×1"}


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_a_profile_puts_the_time_in_the_convolutions_and_its_shares_add_up(graphs, engine):
    from benchmarks.profile import markdown, profile

    result = profile(graphs["int8"], engine, batch=4, runs=3, threads=1)
    groups = {name: share for name, _, share in result["rows"]}
    assert {"conv stem", "conv depthwise", "conv 1×1"} <= set(groups)
    assert sum(groups.values()) == pytest.approx(1, abs=1e-3)
    assert "conv (other)" not in groups  # every convolution the engine ran was traced back to the net's layers
    assert result["us_per_image"] == pytest.approx(result["total_us"] / 4, rel=1e-3)
    lines = markdown(result, "int8")
    assert lines[0].startswith("Where the time goes (int8") and any(line.startswith("| conv 1×1 |") for line in lines)
