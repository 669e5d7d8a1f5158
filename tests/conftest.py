"""Shared fixtures: a private Prefect home, one ephemeral Prefect server per session, and tiny shards and lakes."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# Before anything imports Prefect: runs never touch ~/.prefect or a configured server, and the ephemeral server
# gets the time it needs to start on a loaded 2-core machine.
_PREFECT_HOME = tempfile.mkdtemp(prefix="screenline-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.pop("PREFECT_API_URL", None)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ.pop("SCREENLINE_LAKE", None)
# The session's own signing and trusted keys (models/signing.py): never the user's ~/.config/screenline.
os.environ["SCREENLINE_KEYS"] = tempfile.mkdtemp(prefix="screenline-keys-")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from helpers import images  # noqa: E402
from tasks.samples import write_npz, write_png_folder, write_tar  # noqa: E402

ENV = dict(os.environ)
"""The environment tests give to subprocesses (the CLI, killed ingests). While the session's Prefect server runs it
names that server, so a subprocess's flow does not start an ephemeral server of its own (10-20 s each); a test
whose subprocess runs a flow asks for `prefect_server`."""


def pytest_unconfigure(config) -> None:
    """The session's Prefect home and keys go with it (every fixture and subprocess has finished by now)."""
    for folder in (_PREFECT_HOME, os.environ["SCREENLINE_KEYS"]):
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
