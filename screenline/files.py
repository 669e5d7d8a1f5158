"""Whole-or-nothing file writes, file hashes and safe names: the bottom of the import graph (standard library only).

Every file screenline writes (lake Parquet, manifests, ONNX graphs, checkpoints, caches, exports) is written to a
hidden temp file in its own folder and renamed into place, so a reader or a kill -9 never sees half a file: pyarrow
skips names that start with ".", and a `*.parquet` glob skips `*.tmp`. models/ and tasks/ both write through here.
A temp name carries its writer (host and PID), so what a killed writer left is recognised and removed by the next
run (`remove_stale_temps`), and a live writer's temp never is.

A path built from a name found in data (a model version, an audit id, a file a manifest lists) is built from a
`safe_name` and `confined` to its folder, so nothing the data says can make screenline read or write elsewhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Iterator


def _writer() -> str:
    """Who writes a temp file: this host and process (a name that survives being part of a file name)."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}~{os.getpid()}"


def temp_beside(path: Path, suffix: str = "") -> Path:
    """A hidden, unique temp name in `path`'s folder, naming its writer (`suffix` for writers that append one, like
    np.save's .npy): `.<name>.<host>~<pid>.<random>.tmp<suffix>`."""
    return path.with_name(f".{path.name}.{_writer()}.{uuid.uuid4().hex[:8]}.tmp{suffix}")


_TEMP = re.compile(r"^\..*\.(?P<host>[A-Za-z0-9-]+)~(?P<pid>\d+)\.[0-9a-f]{8}\.tmp")
_OLD_TEMP = re.compile(r"^\..*\.[0-9a-f]{8}\.tmp")  # before temp names named their writer
OLD_TEMP_AGE_S = 24 * 3600


def stale_temps(root: Path) -> list[Path]:
    """Temp files under `root` that no process will finish: their writer, on this host, is gone (a kill -9, a
    power cut). A temp of another host is left to that host; one from before names carried the writer is stale once
    a day old."""
    host = _writer().split("~")[0]
    stale = []
    for folder, _dirs, files in os.walk(root):
        for name in files:
            match = _TEMP.match(name)
            path = Path(folder, name)
            if match and match["host"] == host and not _alive(int(match["pid"])):
                stale.append(path)
            elif not match and _OLD_TEMP.match(name) and time.time() - path.lstat().st_mtime > OLD_TEMP_AGE_S:
                stale.append(path)
    return sorted(stale)


def remove_stale_temps(root: Path) -> list[Path]:
    """Remove `stale_temps(root)`; returns what was removed."""
    removed = []
    for path in stale_temps(root):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


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


def copy_atomic(source: Path, path: Path) -> bool:
    """Copy `source` to `path` whole or not at all, and not at all when `path` already holds the same bytes (a
    file in use, a promoted model's graph, is then never touched). Returns whether it wrote."""
    if path.is_file() and not path.is_symlink() and sha256_file(path) == sha256_file(source):
        return False
    with atomic_path(path) as tmp:
        shutil.copyfile(source, tmp)
    return True


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
