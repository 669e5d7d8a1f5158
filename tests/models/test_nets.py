"""The input contract and the architectures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.contract import PIXEL_MEAN, PIXEL_STD
from models.nets import Baseline, ScreenNet, ScreenNetConfig, fold_batchnorm, macs_per_image


def pixels(n: int = 4, channels: int = 1) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, channels, 64, 64), dtype=np.uint8))


@pytest.mark.parametrize("channels", [1, 3])
def test_uint8_input_gives_the_same_scores_as_the_float_path(channels):
    model = ScreenNet(ScreenNetConfig(channels=channels)).eval()
    x = pixels(channels=channels)
    normalised = (x.double().numpy() - PIXEL_MEAN) / PIXEL_STD
    with torch.inference_mode():
        from_bytes = model(x)
        from_float = model.forward_head(model.features(torch.from_numpy(normalised).float()))
    assert torch.allclose(from_bytes, from_float, atol=1e-5)


def test_screennet_cost_is_in_the_budget_and_width_scales_it():
    assert 5e6 <= macs_per_image(ScreenNet()) <= 15e6  # 5-30 MFLOPs
    assert macs_per_image(ScreenNet(ScreenNetConfig(width=0.5))) < macs_per_image(ScreenNet()) / 2


def test_baseline_upsamples_to_224_and_native_does_not():
    assert macs_per_image(Baseline()) > 10 * macs_per_image(Baseline(native=True))
    with torch.inference_mode():
        assert Baseline().eval()(pixels(2)).shape == (2,)


def test_folding_batchnorm_keeps_the_outputs():
    model = ScreenNet().eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    x = pixels()
    with torch.inference_mode():
        before = model(x)
        fold_batchnorm(model)
        after = model(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert torch.allclose(before, after, atol=1e-4)


def test_the_patch4_stem_goes_straight_to_16x16_and_keeps_every_later_stage_at_its_resolution():
    shapes = {}
    for stem in ("conv3s2", "patch4"):
        model = ScreenNet(ScreenNetConfig(width=1.25, stem=stem)).eval()
        seen = []
        hooks = [block.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[1:])))
                 for block in model.features]
        with torch.inference_mode():
            assert model(pixels(2)).shape == (2,)
        for h in hooks:
            h.remove()
        shapes[stem] = seen
    assert shapes["patch4"][0][1:] == (16, 16) and shapes["conv3s2"][0][1:] == (32, 32)
    # from the second stage on (the stem and the first block differ) every block's output is the same shape
    assert shapes["patch4"][2:] == shapes["conv3s2"][2:] and shapes["patch4"][-1][1:] == (4, 4)
    cheaper = macs_per_image(ScreenNet(ScreenNetConfig(width=1.25, stem="patch4")))
    assert cheaper < 0.85 * macs_per_image(ScreenNet(ScreenNetConfig(width=1.25)))
    with pytest.raises(ValueError, match="stem must be one of conv3s2, patch4"):
        ScreenNet(ScreenNetConfig(stem="patch8"))


def test_a_checkpoint_of_the_patch4_stem_rebuilds_from_its_model_json(tmp_path):
    import json

    from models.baseline import load_baseline

    model = ScreenNet(ScreenNetConfig(width=0.5, stem="patch4")).eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")  # as training saves it
    (tmp_path / "model.json").write_text(json.dumps({"arch": "screennet", "channels": 1, "width": 0.5,
                                                     "pool": "avg", "stem": "patch4"}))
    loaded = load_baseline(tmp_path / "model.pt").model
    with torch.inference_mode():
        assert torch.allclose(loaded(pixels()), model(pixels()))


def test_depth_keeps_the_ceiling_of_each_stages_blocks_and_their_resolutions():
    from models.nets import STAGES, InvertedResidual

    def blocks(depth: float) -> list[tuple[int, ...]]:
        model = ScreenNet(ScreenNetConfig(width=1.25, stem="patch4", depth=depth)).eval()
        seen: list[tuple[int, ...]] = []
        hooks = [m.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[1:])))
                 for m in model.features if isinstance(m, InvertedResidual)]
        with torch.inference_mode():
            assert model(pixels(2)).shape == (2,)
        for h in hooks:
            h.remove()
        return seen

    full, half = blocks(1.0), blocks(0.5)
    assert len(full) == sum(r for _, _, r, _ in STAGES) == 9
    assert len(half) == 6  # ⌈1·½⌉, ⌈2·½⌉, ⌈3·½⌉, ⌈2·½⌉, ⌈1·½⌉ = 1, 1, 2, 1, 1
    assert len(blocks(0.1)) == len(STAGES)  # never fewer than one block a stage
    # every stage still ends at the resolution and channels it had: only repeats inside a stage go
    assert sorted(set(half)) == sorted(set(full)) and half[-1] == full[-1] == (120, 4, 4)
    assert macs_per_image(ScreenNet(ScreenNetConfig(width=1.25, stem="patch4", depth=0.5))) < 0.7 * macs_per_image(
        ScreenNet(ScreenNetConfig(width=1.25, stem="patch4")))
    with pytest.raises(ValueError, match="width and depth must be in"):
        ScreenNet(ScreenNetConfig(depth=0))


def test_a_checkpoint_of_a_shallower_net_rebuilds_from_the_model_json_training_writes(tmp_path):
    import json

    from models.baseline import load_baseline
    from tasks.train import TrainSettings

    settings = TrainSettings(width=0.5, depth=0.5)
    model = ScreenNet(ScreenNetConfig(**settings.shape())).eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    # the fields training writes (tasks/train.py: arch, channels and the settings' shape)
    (tmp_path / "model.json").write_text(json.dumps({"arch": "screennet", "channels": 1, **settings.shape()}))
    loaded = load_baseline(tmp_path / "model.pt").model
    assert loaded.config.depth == 0.5
    with torch.inference_mode():
        assert torch.allclose(loaded(pixels()), model(pixels()))
