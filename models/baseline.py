"""The model screenline replaces, loaded from the user's checkpoint: a plain state_dict, never a pickled object.

Accepted: the seed's model (torchvision ResNet18, 2 classes, its keys bare as torchvision names them, or under `net.`
as `models.nets.Baseline` saves them, or under `module.` as DataParallel does) and any checkpoint this pipeline wrote
(its model.json beside it names the architecture). What the weights say is inferred: the family and the input
channels (conv1's shape); what they cannot say (whether forward() upsamples 64→224, as the seed's did, or runs at
native 64×64) is `arch`, given, or the seed's upsampling when not, and recorded as assumed.

Imports torch: only `optimize` uses it.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.nets import build_model

BASELINE_ARCHS = ("resnet18", "resnet18-native")


class BaselineError(ValueError):
    """A baseline checkpoint that cannot be loaded safely or does not fit a known architecture."""


@dataclass
class LoadedBaseline:
    """A baseline model and what was inferred about it."""

    model: nn.Module
    arch: str
    channels: int
    how: str  # how the architecture was settled, for the manifest

    def describe(self) -> dict:
        return {"arch": self.arch, "channels": self.channels, "architecture_from": self.how}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from `path` with weights_only=True; a pickled model or anything not tensors is refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BaselineError(f"baseline checkpoint {path} does not exist") from None
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError) as exc:
        raise BaselineError(
            f"{path} is not a plain state_dict (torch.load(weights_only=True) refused it: "
            f"{str(exc).splitlines()[0][:160]}): a pickled model would run its code on load; save "
            f"`torch.save(model.state_dict(), PATH)` instead"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # a training checkpoint wrapping the weights
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BaselineError(f"{path} holds {type(state).__name__}, not a state_dict of tensors")
    return state


def _as_baseline_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if all(k.startswith("net.") for k in state):
        return state
    return {f"net.{k}": v for k, v in state.items()}


def load_baseline(path: Path, arch: str | None = None) -> LoadedBaseline:
    """The baseline model (eval mode) from a checkpoint; `arch` resnet18 (64→224) or resnet18-native, else inferred
    from model.json beside the checkpoint, else the seed's resnet18 (assumed, and said so)."""
    if arch is not None and arch not in BASELINE_ARCHS + ("screennet",):
        raise BaselineError(f"baseline architecture must be one of {', '.join(BASELINE_ARCHS)}, got {arch!r}")
    path = Path(path)
    state = read_state_dict(path)
    meta_path = path.parent / "model.json"
    if meta_path.exists() and arch is None:  # a checkpoint this pipeline wrote names its own architecture
        meta = json.loads(meta_path.read_text())
        model = build_model(meta["arch"], meta["channels"], meta.get("width", 1.0), meta.get("pool", "avg"),
                            meta.get("stem", "conv3s2"), meta.get("depth", 1.0))
        model.load_state_dict(state)
        return LoadedBaseline(model.eval(), meta["arch"], meta["channels"], "model.json beside the checkpoint")
    state = _as_baseline_keys(state)
    conv1, fc = state.get("net.conv1.weight"), state.get("net.fc.weight")
    if conv1 is None or fc is None:
        raise BaselineError(f"{path} is not a ResNet18 state_dict (no conv1/fc weights; keys start "
                            f"{', '.join(sorted(state)[:3])}): pass a torchvision ResNet18's state_dict, or a "
                            f"checkpoint screenline trained (with its model.json)")
    if fc.shape[0] != 2:
        raise BaselineError(f"{path}: the ResNet18's classifier has {fc.shape[0]} outputs; the seed's has 2 "
                            f"(negative, positive)")
    channels = int(conv1.shape[1])
    how = "given" if arch else "assumed: the seed's 64→224 upsample (the weights cannot say; pass resnet18-native " \
                                "for a net trained at 64×64)"
    arch = arch or "resnet18"
    model = build_model(arch, channels)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise BaselineError(f"{path} does not fit {arch}: {str(exc).splitlines()[0][:200]}") from None
    return LoadedBaseline(model.eval(), arch, channels, how)
