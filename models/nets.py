"""The torch architectures: the seed's baseline and the optimized native-64 net, behind one input contract.

Both take uint8 N×C×64×64 and return one logit per image; the cast to float and the normalisation are the first
layer (`Preprocess`), so an exported graph takes raw bytes.

- `Baseline`: torchvision ResNet18 (2 classes, as the seed had it) with a bilinear 64→224 upsample in forward():
  ~1.8 GFLOPs an image. `native=True` skips the upsample (the same net at 64×64, ~12× cheaper).
- `ScreenNet`: MobileNetV2-style. A 3×3 stride-2 stem, inverted residual blocks (1×1 expand, 3×3 depthwise,
  1×1 project), a global pool, one logit. `stem="patch4"` replaces the stem with a 4×4 stride-4 patch convolution
  (each 4×4 patch of pixels becomes one vector, as ViT and ConvNeXt stems do) and keeps every later stage at the
  resolution it had (the second stage then does not stride): the 32×32 stage and its cost are gone. At width 1.0
  it is ~7.7 M multiply-adds (~15 MFLOPs) an image (6.6 M with the patch stem). The width multiplier trades
  capacity for speed, and so does the depth multiplier: each stage keeps ⌈repeats × depth⌉ of its blocks (at least
  one), so depth 0.5 keeps 6 of the 9 (1, 1, 2, 1, 1). `pool` is how the last 4×4 feature map becomes one vector: `avg` (MobileNetV2's
  own), `max`, or `avgmax` (both, concatenated). A finding is one small spot in an otherwise normal image, and an
  average over the 16 positions dilutes it 16-fold where a maximum keeps it (README "Clinical parity" measures it).
  `fold_batchnorm()` folds every BatchNorm into its convolution for export.

Imports torch: only `optimize` and the benchmarks use this module.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.contract import IMAGE_SIZE, PIXEL_MEAN, PIXEL_STD


class Preprocess(nn.Module):
    """uint8 pixels → normalised float, inside the graph."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - PIXEL_MEAN) * (1.0 / PIXEL_STD)


def _round(channels: float, divisor: int = 8) -> int:
    return max(divisor, int(channels + divisor / 2) // divisor * divisor)


class ConvBN(nn.Sequential):
    """Conv → BatchNorm → ReLU6 (activation optional); `fold_batchnorm()` folds the BN into the conv."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1, act: bool = True,
                 padding: int | None = None):
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2 if padding is None else padding, groups=groups,
                      bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act:
            layers.append(nn.ReLU6(inplace=True))
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand → 3×3 depthwise → 1×1 linear project, residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [] if expand == 1 else [ConvBN(cin, hidden, 1)]
        layers += [ConvBN(hidden, hidden, 3, stride, groups=hidden), ConvBN(hidden, cout, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


# (expansion, output channels at width 1.0, repeats, stride of the first) per stage; 64 → 32 → 16 → 8 → 4.
STAGES = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 3, 2), (4, 64, 2, 2), (4, 96, 1, 1))


POOLS = ("avg", "max", "avgmax")
STEMS = ("conv3s2", "patch4")


@dataclass(frozen=True)
class ScreenNetConfig:
    """The optimized net's shape; stored in the manifest so a version can be rebuilt."""

    channels: int = 1
    width: float = 1.0
    head: int = 320
    dropout: float = 0.1
    pool: str = "avg"  # "avg" | "max" | "avgmax"
    stem: str = "conv3s2"  # "conv3s2" (3×3 stride 2, then a 32×32 stage) | "patch4" (4×4 stride 4, to 16×16)
    depth: float = 1.0  # each stage keeps ⌈repeats × depth⌉ blocks, at least one

    def as_dict(self) -> dict:
        return asdict(self)


class ScreenNet(nn.Module):
    """MobileNetV2-style screening net at native 64×64; forward(uint8 N×C×64×64) → logits N."""

    def __init__(self, config: ScreenNetConfig = ScreenNetConfig()):
        super().__init__()
        self.config = config
        if config.stem not in STEMS:
            raise ValueError(f"stem must be one of {', '.join(STEMS)}, got {config.stem!r}")
        if not 0 < config.depth <= 4 or not 0 < config.width <= 4:
            raise ValueError(f"width and depth must be in (0, 4], got {config.width} and {config.depth}")
        cin = _round(16 * config.width)
        patch = config.stem == "patch4"
        layers: list[nn.Module] = [ConvBN(config.channels, cin, 4, 4, padding=0) if patch
                                   else ConvBN(config.channels, cin, 3, 2)]
        for index, (expand, cout, repeats, stride) in enumerate(STAGES):
            cout = _round(cout * config.width)
            repeats = max(1, math.ceil(repeats * config.depth))
            stride = 1 if patch and index == 1 else stride  # the patch stem already went to 16×16
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        layers.append(ConvBN(cin, config.head, 1))
        self.preprocess = Preprocess()
        self.features = nn.Sequential(*layers)
        if config.pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {config.pool!r}")
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.head * (2 if config.pool == "avgmax" else 1), 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.preprocess(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        pooled = {"avg": lambda: F.adaptive_avg_pool2d(x, 1), "max": lambda: F.adaptive_max_pool2d(x, 1),
                  "avgmax": lambda: torch.cat([F.adaptive_avg_pool2d(x, 1), F.adaptive_max_pool2d(x, 1)], 1)}
        return self.classifier(self.dropout(torch.flatten(pooled[self.config.pool](), 1))).squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class Baseline(nn.Module):
    """The seed's model: torchvision ResNet18, 2 classes, 64→224 bilinear upsample in forward().

    forward() returns the positive-class logit margin (logit[1] - logit[0]), so sigmoid gives P(positive) exactly
    as softmax over the two classes would, and every model here shares one output contract.
    """

    def __init__(self, channels: int = 1, native: bool = False):
        super().__init__()
        from torchvision.models import resnet18

        self.native = native
        self.preprocess = Preprocess()
        self.net = resnet18(weights=None, num_classes=2)  # weights only from a local checkpoint or training
        if channels != 3:
            self.net.conv1 = nn.Conv2d(channels, 64, 7, 2, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(x)
        if not self.native:
            x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
        logits = self.net(x)
        return logits[:, 1] - logits[:, 0]


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every Conv2d→BatchNorm2d pair (in eval statistics) into the conv, in place; returns the model."""
    for module in model.modules():
        if isinstance(module, ConvBN) and isinstance(module[1], nn.BatchNorm2d):
            conv, bn = module[0], module[1]
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              groups=conv.groups, bias=True)
            with torch.no_grad():
                fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
                fused.bias.copy_(bn.bias - bn.running_mean * scale)
            module[0], module[1] = fused, nn.Identity()
    return model


def macs_per_image(model: nn.Module, channels: int = 1) -> int:
    """Multiply-adds of one forward pass at 64×64 (convolutions and linear layers), counted with hooks."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out) -> None:
        nonlocal total
        total += out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m: nn.Linear, _inp, out) -> None:
        nonlocal total
        total += m.in_features * m.out_features

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        model(torch.zeros(1, channels, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8))
    model.train(was_training)
    for h in hooks:
        h.remove()
    return total


def build_model(arch: str, channels: int, width: float = 1.0, pool: str = "avg", stem: str = "conv3s2",
                depth: float = 1.0) -> nn.Module:
    """A fresh model by name."""
    if arch == "screennet":
        return ScreenNet(ScreenNetConfig(channels=channels, width=width, pool=pool, stem=stem, depth=depth))
    if arch in ("resnet18", "resnet18-native"):
        return Baseline(channels=channels, native=arch.endswith("native"))
    raise ValueError(f"unknown architecture {arch!r}: screennet, resnet18 or resnet18-native")
