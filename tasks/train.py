"""Training the screening net (torch is imported inside these functions, never by screening).

Class imbalance: the positive class is weighted by negatives/positives in the loss, so that a threshold with high
sensitivity still leaves useful specificity. Augmentation (default `flip-exposure-affine`): horizontal flips and
exposure jitter (gain, offset), because sites differ mostly in exposure, and per image a small move, turn and zoom
with sensor noise, because a finding can sit anywhere in a lung. The training split holds ~1,700 positives; without
the geometric part the net learns them by heart (training loss 0.09, validation AUC flat from epoch 8) and half of
its misses at 98% sensitivity are its own, not the images': on a 9,000-positive reference set it lifted specificity
at 98% from 0.71 to 0.80 (README "Clinical parity"). `flip-exposure` is the recipe before that.
Distillation (`teacher`, a baseline checkpoint): logit KD with a temperature, class-weighted like the hard loss. The
teacher's logits are computed once per training image (un-augmented) and reused every epoch: a teacher as slow as
the seed's 64→224 ResNet18 would otherwise cost more than the whole training on 2 cores; flips leave the teacher's
answer unchanged and exposure jitter or a few pixels' move barely move it, which is the trade-off taken.
Other levers (measured in benchmarks/parity.py, README "Clinical parity"): label smoothing or focal loss, weight EMA,
AdamW/OneCycle or SGD/cosine, epochs and width. The best epoch by validation AUC is kept (of the EMA weights when
EMA is on).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from screenline.files import atomic_path, atomic_write_bytes
from tasks.dataset import SplitRef, load_split
from tasks.metrics import auc

AUGMENTS = ("flip-exposure", "flip-exposure-shift", "flip-exposure-affine", "none")


@dataclass(frozen=True)
class TrainSettings:
    """How a model is trained; every field is part of the cache key and the manifest."""

    arch: str = "screennet"  # "screennet" | "resnet18" (the seed's, 64→224) | "resnet18-native" (at 64×64)
    width: float = 1.25
    depth: float = 1.0  # screennet's depth multiplier (models/nets.py; README "Depth against width" measures the trade)
    pool: str = "avg"  # screennet's global pool: "avg" | "max" | "avgmax" (models/nets.py)
    stem: str = "patch4"  # screennet's stem: "patch4" | "conv3s2" (models/nets.py; issue 18 measured patch4 level and faster)
    epochs: int = 16
    batch_size: int = 128
    lr: float = 4e-3
    weight_decay: float = 1e-4
    seed: int = 0
    threads: int = 2
    teacher: str | None = None  # a baseline checkpoint (state_dict) for distillation
    teacher_arch: str | None = None  # a bare teacher checkpoint's architecture (models/baseline.py), if given
    distill_weight: float = 0.5  # α: (1 − α)·hard loss + α·T²·soft loss
    temperature: float = 4.0  # T of the soft targets sigmoid(teacher logit / T)
    loss: str = "bce"  # "bce" (class-weighted) | "focal" (γ = 2, class-weighted)
    label_smoothing: float = 0.0
    ema: float = 0.0  # decay of an exponential moving average of the weights; 0: off
    optimizer: str = "adamw"  # "adamw" with a one-cycle schedule | "sgd" (Nesterov) with warm-up and cosine decay
    augment: str = "flip-exposure-affine"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def shape(self) -> dict[str, Any]:
        """The net's shape fields, as `models.nets.build_model` takes them by keyword."""
        return {"width": self.width, "pool": self.pool, "stem": self.stem, "depth": self.depth}

    def check(self) -> None:
        """Fail before training on a setting no branch below handles."""
        for name, value, allowed in (("loss", self.loss, ("bce", "focal")),
                                     ("optimizer", self.optimizer, ("adamw", "sgd")),
                                     ("augment", self.augment, AUGMENTS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if not 0 <= self.ema < 1 or not 0 <= self.label_smoothing < 0.5 or self.temperature <= 0:
            raise ValueError("ema must be in [0, 1), label_smoothing in [0, 0.5), temperature > 0")


def load_checkpoint(path: Path):
    """A model (eval mode) from a state_dict checkpoint, read with weights_only=True, so no pickled code runs.

    The architecture comes from model.json beside it (what training writes); a bare checkpoint without one is a
    baseline (models/baseline.py infers which).
    """
    from models.baseline import load_baseline

    return load_baseline(path).model

def _augment(x, generator, how: str):
    import torch

    if how == "none":
        return x
    n = x.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    gain = 1.0 + (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 0.3
    offset = (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 40.0
    x = (x.float() * gain + offset).clamp_(0, 255).round_().to(torch.uint8)
    if how == "flip-exposure-affine":  # each image its own small move, turn and zoom, plus sensor noise
        x = _affine(x, generator)
    if how == "flip-exposure-shift":  # up to 4 pixels each way, edges replicated
        dy, dx = (int(v) for v in torch.randint(-4, 5, (2,), generator=generator))
        x = torch.nn.functional.pad(x.float(), (4, 4, 4, 4), mode="replicate")[..., 4 + dy: 68 + dy,
                                                                                4 + dx: 68 + dx].to(torch.uint8)
    return x


def _affine(x, generator, p: float = 0.7):
    """A random translation (±6 px), rotation (±10°) and zoom (0.9–1.1) per image, with probability p, bilinear
    with edges replicated; then Gaussian noise of 0–4 grey levels. A finding can sit anywhere in a lung, at any
    angle, and sites differ in noise: none of these changes the label."""
    import math

    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    u = lambda: torch.rand(n, generator=generator)  # noqa: E731
    angle, scale = (u() - 0.5) * math.radians(20), 0.9 + u() * 0.2
    shift = (torch.rand(n, 2, generator=generator) - 0.5) * (12 / 32)  # in the grid's −1…1 units: ±6 px
    moved = u() < p
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    theta[~moved] = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    xf = x.float()
    grid = F.affine_grid(theta, list(xf.shape), align_corners=False)
    out = torch.where(moved[:, None, None, None],
                      F.grid_sample(xf, grid, mode="bilinear", padding_mode="border", align_corners=False), xf)
    out = out + torch.randn(out.shape, generator=generator) * (u() * 4.0)[:, None, None, None]
    return out.clamp_(0, 255).round_().to(torch.uint8)


def logits(model, pixels: np.ndarray, batch: int = 512, device: str = "cpu") -> np.ndarray:
    """Logits from a torch model on uint8 N×C×64×64."""
    import torch

    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(pixels), batch):
            x = torch.from_numpy(pixels[i: i + batch]).to(device).contiguous(memory_format=torch.channels_last)
            out.append(model(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def predict(model, pixels: np.ndarray, batch: int = 512, device: str = "cpu") -> np.ndarray:
    """Probabilities from a torch model on uint8 N×C×64×64 (float32 sigmoid, as the exported graph computes them)."""
    import torch

    return torch.sigmoid(torch.from_numpy(logits(model, pixels, batch, device))).numpy()


def _ema_with_warmup(decay: float):
    """An EMA update whose decay grows as min(decay, (1 + n) / (10 + n)) with the updates n so far: early weights
    (random, then from the high learning-rate phase) fade at once instead of lingering for 1 / (1 − decay) steps. A
    fixed 0.999 over a 16-epoch run (~2,100 steps) kept 12% of the random initial weights and averaged across the
    one-cycle peak: validation AUC 0.56 (README "Clinical parity"). Integer buffers (BatchNorm's batch counter) are
    copied, not averaged."""
    import torch

    def update(averaged: list, current: list, updates) -> None:
        n = float(updates)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        floats = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], weight)
        for a, c in zip(averaged, current):
            if not a.is_floating_point():
                a.copy_(c)

    return update


def fit(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, settings: TrainSettings,
        channels: int, teacher_logits: np.ndarray | None = None, device: str = "cpu",
        log: Callable[[str], Any] = print) -> tuple[dict, dict[str, Any]]:
    """Train on arrays and keep the best epoch by val AUC; returns (state_dict, what happened). The plain core of
    `train_model`, which the parity benchmark also calls (on a GPU, for its ablations)."""
    import torch
    import torch.nn.functional as F
    from torch.optim.swa_utils import AveragedModel

    settings.check()
    torch.manual_seed(settings.seed)
    if device == "cpu":
        torch.set_num_threads(settings.threads)
    if y_train.sum() == 0 or y_train.sum() == len(y_train):
        raise ValueError("the training split needs both positives and negatives")
    from models.nets import build_model

    model = build_model(settings.arch, channels, **settings.shape())
    model = model.to(device).to(memory_format=torch.channels_last)
    ema = (AveragedModel(model, multi_avg_fn=_ema_with_warmup(settings.ema), use_buffers=True)
           if settings.ema else None)
    pos_weight = torch.tensor(float((y_train == 0).sum()) / float(y_train.sum()), device=device)
    per_epoch = max(1, len(x_train) // settings.batch_size)
    steps = settings.epochs * per_epoch
    if settings.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=steps, pct_start=0.2)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=0.9, nesterov=True,
                                    weight_decay=settings.weight_decay)
        warm = max(1, per_epoch)
        schedule = torch.optim.lr_scheduler.SequentialLR(optimizer, [
            torch.optim.lr_scheduler.LinearLR(optimizer, 0.1, 1.0, warm),
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps - warm))], [warm])
    generator = torch.Generator().manual_seed(settings.seed)
    images, labels = torch.from_numpy(x_train), torch.from_numpy(y_train).float()
    teacher = torch.from_numpy(teacher_logits).float() if teacher_logits is not None else None
    t, alpha = settings.temperature, settings.distill_weight

    def weighted(loss_per_image, y):  # positives weighted by negatives/positives, as in the hard loss
        return (loss_per_image * torch.where(y > 0.5, pos_weight, 1.0)).mean()

    best_auc, best_state, history = -1.0, None, []
    for epoch in range(settings.epochs):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(images), generator=generator)
        total = 0.0
        for i in range(per_epoch):
            idx = order[i * settings.batch_size: (i + 1) * settings.batch_size]
            x = _augment(images[idx], generator, settings.augment).to(device).contiguous(
                memory_format=torch.channels_last)
            y = labels[idx].to(device)
            z = model(x)
            target = y * (1 - settings.label_smoothing) + 0.5 * settings.label_smoothing
            if settings.loss == "focal":
                p = torch.sigmoid(z)
                p_true = torch.where(y > 0.5, p, 1 - p)
                hard = weighted(F.binary_cross_entropy_with_logits(z, target, reduction="none")
                                * (1 - p_true).pow(2), y)
            else:  # the fused form: bit-for-bit the recipe's numbers before these levers existed
                hard = F.binary_cross_entropy_with_logits(z, target, pos_weight=pos_weight)
            loss = hard
            if teacher is not None:
                soft = torch.sigmoid(teacher[idx].to(device) / t)
                kd = weighted(F.binary_cross_entropy_with_logits(z / t, soft, reduction="none"), y) * t * t
                loss = (1 - alpha) * hard + alpha * kd
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if ema is not None:
                ema.update_parameters(model)
            total += loss.item()
        judged = ema.module if ema is not None else model
        val_auc = auc(predict(judged, x_val, device=device), y_val)
        history.append({"epoch": epoch + 1, "loss": total / per_epoch, "val_auc": val_auc,
                        "seconds": time.perf_counter() - t0})
        log(f"epoch {epoch + 1}/{settings.epochs}: loss {history[-1]['loss']:.4f}, val AUC {val_auc:.4f}, "
            f"{history[-1]['seconds']:.0f} s")
        if val_auc > best_auc:
            best_auc = val_auc
            best_state = {k: v.detach().cpu().clone() for k, v in judged.state_dict().items()}
    return best_state, {"val_auc": best_auc, "history": history}


def teacher_logits_for(teacher: Path, x: np.ndarray, arch: str | None = None,
                       cache: Path | None = None) -> np.ndarray:
    """The teacher's logits on these images (the un-augmented training split), read from `cache` when written."""
    from models.baseline import load_baseline

    if cache is not None and cache.exists():
        return np.load(cache, allow_pickle=False)
    values = logits(load_baseline(teacher, arch).model, x, batch=64)
    if cache is not None:
        with atomic_path(cache, suffix=".npy") as tmp:
            np.save(tmp, values, allow_pickle=False)
    return values


def train_model(split: SplitRef, settings: TrainSettings, out_dir: Path, log=print) -> Path:
    """Train on the split's train part, keep the best epoch by val AUC; writes out_dir/model.pt and model.json."""
    import torch

    x_train, y_train = load_split(split, "train")
    x_val, y_val = load_split(split, "val")
    teacher = None
    if settings.teacher:
        t0 = time.perf_counter()
        teacher = teacher_logits_for(Path(settings.teacher), x_train, settings.teacher_arch,
                                     out_dir / "teacher-logits.npy")
        log(f"teacher logits on {len(x_train)} training images: {time.perf_counter() - t0:.0f} s")
    state, fitted = fit(x_train, y_train, x_val, y_val, settings, split.channels, teacher, log=log)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"arch": settings.arch, "channels": split.channels, **settings.shape(), **fitted,
            "settings": settings.as_dict(), "split": split.training_sha256}  # the rows it learned from
    atomic_write_bytes(out_dir / "model.json", json.dumps(meta, indent=2).encode())
    with atomic_path(out_dir / "model.pt") as tmp:  # written last: the checkpoint's presence means training finished
        torch.save(state, tmp)
    return out_dir / "model.pt"
