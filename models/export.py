"""Torch → ONNX: BatchNorm folded, a dynamic batch axis, one self-contained file, checked and compared with torch.

The exported graph is the whole input contract: uint8 N×C×64×64 in, float32 probabilities N out (the sigmoid is in
the graph too), so every engine returns the same thing.
"""

from __future__ import annotations

import copy
from pathlib import Path

import onnx
import torch
from torch import nn

from models.contract import IMAGE_SIZE, INPUT_NAME, OUTPUT_NAME
from models.nets import fold_batchnorm
from screenline.files import atomic_path

OPSET = 18


class _WithSigmoid(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(x))


def export_onnx(model: nn.Module, path: Path, channels: int = 1) -> Path:
    """Write `model` (eval, BatchNorm folded) as a single-file ONNX graph with a dynamic batch axis."""
    model = fold_batchnorm(copy.deepcopy(model).eval())
    wrapped = _WithSigmoid(model).eval()
    example = torch.zeros(2, channels, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    with atomic_path(path) as tmp, torch.inference_mode():
        # torch 2.14's exporter writes weights as external data by default: one self-contained file instead.
        torch.onnx.export(
            wrapped, (example,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            opset_version=OPSET, dynamo=True, external_data=False, verbose=False,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
        onnx.checker.check_model(onnx.load(str(tmp)), full_check=True)
    return path

