"""Shared fixtures: a private Prefect home, one ephemeral Prefect server per session, and tiny shards and lakes."""

from __future__ import annotations

import shutil
from pathlib import Path

# first: it sets the environment before Prefect is imported
from session_env import ENGINE_CACHE, ENV, KEYS, PREFECT_HOME

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from helpers import images  # noqa: E402
from tasks.samples import write_npz, write_png_folder, write_tar  # noqa: E402


def pytest_unconfigure(config) -> None:
    """The session's Prefect home, keys and engine cache go with it (every fixture and subprocess is done by now)."""
    for folder in (PREFECT_HOME, KEYS, ENGINE_CACHE):
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_server():
    """One ephemeral Prefect server (SQLite in a temp dir) for every flow test of the session."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        ENV["PREFECT_API_URL"] = PREFECT_API_URL.value()
        yield
        ENV.pop("PREFECT_API_URL", None)


@pytest.fixture
def lake_dir(tmp_path: Path) -> Path:
    return tmp_path / "lake"


@pytest.fixture
def png_shard(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    imgs, labels = images(12, "png")
    folder = tmp_path / "shards" / "png-shard"
    write_png_folder(folder, imgs, labels)
    return folder, imgs, labels


@pytest.fixture
def npz_shard(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    imgs, labels = images(15, "npz", site="b")
    path = tmp_path / "shards" / "medmnist_64.npz"
    write_npz(path, {"train": (imgs[:9], labels[:9]), "val": (imgs[9:12], labels[9:12]),
                     "test": (imgs[12:], labels[12:])})
    return path, imgs, labels


@pytest.fixture
def tar_shard(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    imgs, labels = images(10, "tar", site="c")
    path = tmp_path / "shards" / "shard-000.tar"
    write_tar(path, imgs, labels)
    return path, imgs, labels


@pytest.fixture(scope="session")
def fp32_graph(tmp_path_factory) -> Path:
    """A random-weight ScreenNet's FP32 graph whose BatchNorm is not the identity (so folding is exercised), for the
    engine tests (OpenVINO, TensorRT's graphs): exported once a session (~6 s an export here). Read it, do not write
    over it."""
    import torch

    from models.export import export_onnx
    from models.nets import ScreenNet

    torch.manual_seed(3)
    model = ScreenNet().eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
    return export_onnx(model, tmp_path_factory.mktemp("fp32-graph") / "model-fp32.onnx")
