"""Baseline checkpoints: a plain state_dict round-trips with weights_only=True; anything else is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.baseline import BaselineError, load_baseline
from models.nets import Baseline
from tasks.train import predict


@pytest.fixture(scope="module")
def seed_model() -> Baseline:
    torch.manual_seed(0)
    return Baseline(native=True).eval()


def test_a_state_dict_round_trips_in_every_key_layout_the_seed_may_have_saved(tmp_path, seed_model):
    pixels = np.random.default_rng(0).integers(0, 256, (4, 1, 64, 64), dtype=np.uint8)
    expected = predict(seed_model, pixels)
    ours = seed_model.state_dict()  # keys under net.
    layouts = {"ours": ours, "torchvision": {k.removeprefix("net."): v for k, v in ours.items()},
               "dataparallel": {f"module.{k.removeprefix('net.')}": v for k, v in ours.items()},
               "wrapped": {"state_dict": ours, "epoch": 3}}
    for name, state in layouts.items():
        path = tmp_path / f"{name}.pt"
        torch.save(state, path)
        loaded = load_baseline(path, "resnet18-native")
        assert loaded.arch == "resnet18-native" and loaded.channels == 1 and loaded.how == "given"
        np.testing.assert_allclose(predict(loaded.model, pixels), expected, atol=1e-6)


def test_without_an_architecture_the_seeds_upsampling_is_assumed_and_said(tmp_path, seed_model):
    path = tmp_path / "seed.pt"
    torch.save(seed_model.state_dict(), path)
    loaded = load_baseline(path)
    assert loaded.arch == "resnet18" and not loaded.model.native and loaded.how.startswith("assumed")


def test_a_checkpoint_screenline_trained_names_its_architecture(tmp_path, seed_model):
    (tmp_path / "model.json").write_text(json.dumps({"arch": "resnet18-native", "channels": 1}))
    torch.save(seed_model.state_dict(), tmp_path / "model.pt")
    loaded = load_baseline(tmp_path / "model.pt")
    assert loaded.arch == "resnet18-native" and loaded.how.startswith("model.json")


def test_a_pickled_model_is_refused_and_its_code_never_runs(tmp_path, seed_model):
    path = tmp_path / "pickled.pt"
    torch.save(seed_model, path)  # the whole module: loading it would unpickle arbitrary classes
    with pytest.raises(BaselineError, match="not a plain state_dict.*state_dict\\(\\)"):
        load_baseline(path)


def test_checkpoints_that_are_not_a_resnet18_say_so(tmp_path):
    torch.save({"features.0.weight": torch.zeros(8, 1, 3, 3)}, tmp_path / "other.pt")
    with pytest.raises(BaselineError, match="not a ResNet18"):
        load_baseline(tmp_path / "other.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(BaselineError, match="not a state_dict"):
        load_baseline(tmp_path / "list.pt")
    with pytest.raises(BaselineError, match="does not exist"):
        load_baseline(tmp_path / "missing.pt")


def test_the_cli_refuses_a_pickled_baseline_in_one_line_before_any_flow_starts(tmp_path, seed_model, capsys):
    from screenline.cli import main

    path = tmp_path / "pickled.pt"
    torch.save(seed_model, path)
    assert main(["optimize", "--lake", str(tmp_path / "lake"), "--baseline", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("screenline: error: ") and "not a plain state_dict" in err[0]
