"""Whole-or-nothing file writes, file hashes and safe names: the bottom of the import graph (standard library only).

Every file screenline writes (lake Parquet, manifests, ONNX graphs, checkpoints, caches, exports) is written to a
hidden temp file in its own folder and renamed into place, so a reader or a kill -9 never sees half a file: pyarrow
skips names that start with ".", and a `*.parquet` glob skips `*.tmp`. models/ and tasks/ both write through here.

A path built from a name found in data (a model version, an audit id, a file a manifest lists) is built from a
`safe_name` and `confined` to its folder, so nothing the data says can make screenline read or write elsewhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import uuid
from pathlib import Path
from typing import Iterator


def temp_beside(path: Path, suffix: str = "") -> Path:
    """A hidden, unique temp name in `path`'s folder (`suffix` for writers that append one, like np.save's .npy)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp{suffix}")


def commit(tmp: Path, path: Path) -> None:
    """Make the finished `tmp` durable and rename it to `path`, then make the rename durable."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = "") -> Iterator[Path]:
    """A temp path to write `path`'s content to; it becomes `path` only if the block exits cleanly.

        with atomic_path(out) as tmp:
            torch.save(state, tmp)
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path, suffix)
    try:
        yield tmp
        commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""A model version, an audit id, a model file: one path component, no separators, not hidden, not `..`."""


class UnsafePath(ValueError):
    """A name from data that is not a plain name, or a path that would leave its folder."""


def safe_name(name: object, what: str) -> str:
    """`name` if it is a plain name (see SAFE_NAME); UnsafePath naming `what` otherwise."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in name:
        raise UnsafePath(f"{what} {name!r} is not a plain name (letters, digits, '.', '_', '-'; no '/' or '..'): "
                         f"refusing to build a path from it")
    return name


def confined(base: Path, *parts: str) -> Path:
    """base/parts, refused (UnsafePath) if it leaves `base` once symbolic links are resolved."""
    path = base.joinpath(*parts)
    resolved, root = path.resolve(), base.resolve()
    if resolved != root and not resolved.is_relative_to(root):
        raise UnsafePath(f"{path} resolves to {resolved}, outside {root}: refusing to follow it")
    return path
