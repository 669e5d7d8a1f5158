"""Training the screening net on the CPU (torch is imported inside these functions, never by screening).

Class imbalance: the positive class is weighted by negatives/positives in the loss, so that a threshold with high
sensitivity still leaves useful specificity. Augmentation: horizontal flips and exposure jitter (gain, offset),
because sites differ mostly in exposure. Optional distillation: a teacher checkpoint (the seed's baseline) adds a
soft-target term. The best epoch by validation AUC is kept.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.dataset import SplitRef, load_split
from tasks.metrics import auc


@dataclass(frozen=True)
class TrainSettings:
    """How a model is trained; every field is part of the cache key and the manifest."""

    arch: str = "screennet"  # "screennet" | "resnet18" (the seed's, 64→224) | "resnet18-native" (at 64×64)
    width: float = 1.25
    epochs: int = 16
    batch_size: int = 128
    lr: float = 4e-3
    weight_decay: float = 1e-4
    seed: int = 0
    threads: int = 2
    teacher: str | None = None  # a baseline checkpoint (state_dict) for distillation
    distill_weight: float = 0.5

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_model(arch: str, channels: int, width: float = 1.0):
    """A fresh model by name."""
    from models.nets import Baseline, ScreenNet, ScreenNetConfig

    if arch == "screennet":
        return ScreenNet(ScreenNetConfig(channels=channels, width=width))
    if arch in ("resnet18", "resnet18-native"):
        return Baseline(channels=channels, native=arch.endswith("native"))
    raise ValueError(f"unknown architecture {arch!r}: screennet, resnet18 or resnet18-native")


def load_checkpoint(path: Path, channels: int = 1):
    """A model from a state_dict checkpoint; weights_only, so no pickled code runs.

    The architecture comes from model.json beside it (what training writes); a bare checkpoint without one is taken
    to be the seed's baseline (ResNet18, 64→224) with `channels` input channels.
    """
    import torch

    meta_path = path.parent / "model.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"arch": "resnet18", "channels": channels}
    model = build_model(meta["arch"], meta["channels"], meta.get("width", 1.0))
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def _augment(x, generator):
    import torch

    n = x.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    gain = 1.0 + (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 0.3
    offset = (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 40.0
    return (x.float() * gain + offset).clamp_(0, 255).round_().to(torch.uint8)


def predict(model, pixels: np.ndarray, batch: int = 512) -> np.ndarray:
    """Probabilities from a torch model on uint8 N×C×64×64."""
    import torch

    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(pixels), batch):
            x = torch.from_numpy(pixels[i: i + batch]).contiguous(memory_format=torch.channels_last)
            out.append(torch.sigmoid(model(x)).float().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def train_model(split: SplitRef, settings: TrainSettings, out_dir: Path, log=print) -> Path:
    """Train on the split's train part, keep the best epoch by val AUC; writes out_dir/model.pt and model.json."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(settings.seed)
    torch.set_num_threads(settings.threads)
    x_train, y_train = load_split(split, "train")
    x_val, y_val = load_split(split, "val")
    if y_train.sum() == 0 or y_train.sum() == len(y_train):
        raise ValueError("the training split needs both positives and negatives")
    model = build_model(settings.arch, split.channels, settings.width).to(memory_format=torch.channels_last)
    teacher = load_checkpoint(Path(settings.teacher), split.channels) if settings.teacher else None
    pos_weight = torch.tensor(float((y_train == 0).sum()) / float(y_train.sum()))
    steps = settings.epochs * max(1, len(x_train) // settings.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=steps, pct_start=0.2)
    generator = torch.Generator().manual_seed(settings.seed)
    images, labels = torch.from_numpy(x_train), torch.from_numpy(y_train).float()
    best_auc, best_state, history = -1.0, None, []
    for epoch in range(settings.epochs):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(images), generator=generator)
        total = 0.0
        for i in range(len(order) // settings.batch_size):
            idx = order[i * settings.batch_size: (i + 1) * settings.batch_size]
            x = _augment(images[idx], generator).contiguous(memory_format=torch.channels_last)
            logits = model(x)
            loss = F.binary_cross_entropy_with_logits(logits, labels[idx], pos_weight=pos_weight)
            if teacher is not None:
                with torch.inference_mode():
                    soft = torch.sigmoid(teacher(x))
                loss = (1 - settings.distill_weight) * loss + settings.distill_weight * \
                    F.binary_cross_entropy_with_logits(logits, soft.clone())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        val_auc = auc(predict(model, x_val), y_val)
        history.append({"epoch": epoch + 1, "loss": total / max(1, len(order) // settings.batch_size),
                        "val_auc": val_auc, "seconds": time.perf_counter() - t0})
        log(f"epoch {epoch + 1}/{settings.epochs}: loss {history[-1]['loss']:.4f}, val AUC {val_auc:.4f}, "
            f"{history[-1]['seconds']:.0f} s")
        if val_auc > best_auc:
            best_auc = val_auc
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"arch": settings.arch, "channels": split.channels, "width": settings.width, "val_auc": best_auc,
            "history": history, "settings": settings.as_dict(), "split": split.sha256}
    (out_dir / "model.json").write_text(json.dumps(meta, indent=2))
    tmp = out_dir / ".model.pt.tmp"
    torch.save(best_state, tmp)
    tmp.replace(out_dir / "model.pt")  # written last: the checkpoint's presence means training finished
    return out_dir / "model.pt"
