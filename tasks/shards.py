"""Shard formats: finding shards, fingerprinting their content, and reading their entries.

A shard is one of
- a folder of PNG/JPEG files, with an optional `labels.csv` (`filename,label`);
- a NumPy `.npz` in MedMNIST layout (`train_images`, `train_labels`, `val_*`, `test_*`), or `images` [+ `labels`];
- a WebDataset-style `.tar` (`<key>.png` + `<key>.cls`), optionally gzipped.

Readers yield an `Entry` per image and a `Refusal` per entry they cannot use; they raise `ShardUnreadable` when the
shard as a whole cannot be read (not a zip, not a tar, a broken labels file), and let `OSError` through so that the
Prefect task can retry real I/O failures. Nothing is extracted to disk, and nothing is unpickled.

Symbolic links are never followed: a shard path that is one (given, matched by a glob, or found in an inbox or a
folder of shards) is refused, and inside a folder shard a link is a reject row whose target is never read, not even
to fingerprint the shard. A link could point anywhere (/etc, another site's folder, /dev/zero); what a site means to
deliver it copies into the shard.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import os
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence, Union

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LABELS_FILE = "labels.csv"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
NPZ_SPLITS = ("train", "val", "test")
NPZ_TEST_SPLIT = "test"
"""A MedMNIST .npz's held-out split; its entries are named test/NNNNNN (ingest --test-subset lands them apart)."""
_FILENAME_COLUMNS = ("filename", "file", "image", "path")


class ShardNotFound(ValueError):
    """A path or glob given to ingest matched nothing usable."""


class ShardUnreadable(Exception):
    """The shard as a whole cannot be read; becomes one reject row."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ShardRef:
    """A shard by path and content: what passes between tasks (never the shard's data)."""

    path: str
    kind: str  # "folder" | "npz" | "tar"
    sha256: str

    @property
    def shard_id(self) -> str:
        """Stable id of the shard's content: the same bytes at any path give the same id."""
        return self.sha256[:16]


@dataclass(frozen=True)
class Entry:
    """One image inside a shard: encoded bytes (folder, tar) or a decoded array (npz), and its raw label."""

    source: str
    payload: Union[bytes, np.ndarray]
    label: object = None  # text or number as found; validated by ingest


@dataclass(frozen=True)
class Refusal:
    """An entry the reader could not turn into an image."""

    entry: str | None
    reason: str
    detail: str


def shard_kind(path: Path) -> str | None:
    """"folder", "npz" or "tar" for a path screenline can ingest, else None."""
    if path.is_dir():
        return "folder"
    name = path.name.lower()
    if name.endswith(".npz"):
        return "npz"
    if name.endswith(TAR_SUFFIXES):
        return "tar"
    return None


def _visible_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]


def _is_container(folder: Path) -> bool:
    """A folder holding only shards (sub-folders, .npz, .tar) is a folder of shards, not a shard itself."""
    children = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if not children:
        return False
    files = [p for p in children if p.is_file()]
    return all(shard_kind(p) in ("npz", "tar") for p in files)


def _not_a_link(path: Path) -> Path:
    if path.is_symlink():
        raise ShardNotFound(f"{path} is a symbolic link (to {os.readlink(path)}); screenline does not follow links "
                            f"out of the folder it is given: copy the shard there, or pass its real path")
    return path


def find_shards(patterns: Sequence[str]) -> list[Path]:
    """Expand paths and globs into shard paths, sorted and de-duplicated.

    A folder holding only shards (an inbox) expands to its shards. Raises ShardNotFound with a one-line message
    when a pattern matches nothing, names something that is not a shard, or names or finds a symbolic link.
    """
    if not patterns:
        raise ShardNotFound("no shard given: pass shard paths or globs (folders, .npz, .tar)")
    found: dict[Path, None] = {}
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = [Path(p) for p in sorted(glob.glob(pattern))]
            if not matches:
                raise ShardNotFound(f"no shard matches {pattern!r}")
        else:
            matches = [Path(pattern)]
            if not matches[0].exists() and not matches[0].is_symlink():
                raise ShardNotFound(f"no such shard: {pattern}")
        for path in matches:
            path = _not_a_link(path.absolute()).resolve()
            if path.is_dir() and _is_container(path):
                for child in sorted(path.iterdir()):
                    if not child.name.startswith(".") and shard_kind(child):
                        found[_not_a_link(child).resolve()] = None
            elif shard_kind(path):
                found[path] = None
            else:
                raise ShardNotFound(
                    f"not a shard: {path} (expected a folder of PNG/JPEG, a .npz or a .tar)"
                )
    return sorted(found)


def inbox_shards(inbox: str | Path) -> tuple[list[Path], list[Path]]:
    """The shards in an inbox folder (sub-folders of images, .npz, .tar) and the other entries, which are ignored:
    symbolic links among them (never followed, whatever they point at).

    Raises ShardNotFound when the inbox does not exist: a mistyped inbox must not look like a quiet night.
    """
    folder = Path(inbox).expanduser()
    if not folder.is_dir():
        raise ShardNotFound(f"inbox {folder.resolve()} is not a folder: create it, or pass the folder the sites drop "
                            f"their shards in (parameter `inbox`)")
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    shards = [p for p in entries if not p.is_symlink() and shard_kind(p)]
    return [p.resolve() for p in shards], [p for p in entries if p not in shards]


def _file_sha256(path: Path, h: "hashlib._Hash | None" = None) -> str:
    digest = h or hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(path: Path) -> ShardRef:
    """Hash a shard's content (for a folder: every file's relative path and bytes, in sorted order; a symbolic link
    counts by its name and where it points, never by what it points at)."""
    path = _not_a_link(Path(path).absolute()).resolve()
    kind = shard_kind(path)
    if kind is None:
        raise ShardNotFound(f"not a shard: {path}")
    if kind != "folder":
        return ShardRef(str(path), kind, _file_sha256(path))
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_symlink() or p.is_file()):
        rel = file.relative_to(path).as_posix()
        if any(part.startswith(".") for part in PurePosixPath(rel).parts):
            continue
        content = f"symlink:{os.readlink(file)}" if file.is_symlink() else _file_sha256(file)
        digest.update(rel.encode() + b"\0" + content.encode() + b"\n")
    return ShardRef(str(path), kind, digest.hexdigest())


def read_entries(ref: ShardRef) -> Iterator[Entry | Refusal]:
    """Every entry of a shard, in a stable order."""
    path = Path(ref.path)
    if ref.kind == "folder":
        yield from _read_folder(path)
    elif ref.kind == "npz":
        yield from _read_npz(path)
    elif ref.kind == "tar":
        yield from _read_tar(path)
    else:
        raise ShardUnreadable("unsupported_shard", f"unknown shard kind {ref.kind!r}")


def _read_labels_csv(path: Path) -> dict[str, str]:
    text = path.read_bytes().decode("utf-8-sig", errors="replace")
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip().lower() for f in (reader.fieldnames or [])]
    name_col = next((c for c in _FILENAME_COLUMNS if c in fields), None)
    if name_col is None or "label" not in fields:
        raise ShardUnreadable(
            "bad_labels_file",
            f"{LABELS_FILE} needs a header with 'filename' and 'label' columns, found {fields or 'none'}",
        )
    labels: dict[str, str] = {}
    for row in reader:
        row = {(k or "").strip().lower(): (v or "") for k, v in row.items()}
        labels.setdefault(row[name_col].strip(), row["label"].strip())
    return labels


def _read_folder(folder: Path) -> Iterator[Entry | Refusal]:
    labels_path = folder / LABELS_FILE
    labels = _read_labels_csv(labels_path) if labels_path.is_file() else {}
    seen: set[str] = set()
    for file in sorted(folder.rglob("*")):
        rel = file.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in PurePosixPath(rel).parts) or rel == LABELS_FILE:
            continue
        if file.is_symlink():
            yield Refusal(rel, "unsafe_path", "symbolic link; copy the file into the shard instead")
            continue
        if not file.is_file():
            continue
        seen.add(rel)
        if file.suffix.lower() not in IMAGE_SUFFIXES:
            yield Refusal(rel, "unsupported_entry", f"not a PNG/JPEG file ({file.suffix or 'no suffix'})")
            continue
        yield Entry(rel, file.read_bytes(), labels.get(rel))
    for name in labels:
        if name not in seen:
            yield Refusal(name, "missing_file", f"listed in {LABELS_FILE} but not in the shard")


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()  # OSError here is I/O: let the task retry
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError) as exc:
        raise ShardUnreadable("unreadable_shard", f"not a readable .npz ({type(exc).__name__}: {exc})") from None


def _read_npz(path: Path) -> Iterator[Entry | Refusal]:
    arrays = _load_npz(path)
    splits = [s for s in NPZ_SPLITS if f"{s}_images" in arrays]
    plain = "images" in arrays
    if not splits and not plain:
        raise ShardUnreadable(
            "bad_npz",
            f"no image arrays: expected train_images/val_images/test_images (MedMNIST layout) or images; "
            f"found keys {sorted(arrays) or 'none'}",
        )
    for split in splits + ([""] if plain else []):
        images_key, labels_key = (f"{split}_images", f"{split}_labels") if split else ("images", "labels")
        images = arrays[images_key]
        labels = arrays.get(labels_key)
        problem = _npz_problem(images_key, images, labels_key, labels, labels_required=bool(split))
        if problem:
            yield Refusal(images_key, "bad_npz", problem)
            continue
        flat = None if labels is None else labels.reshape(len(images))
        prefix = f"{split}/" if split else ""
        for i in range(len(images)):
            yield Entry(f"{prefix}{i:06d}", images[i], None if flat is None else flat[i].item())


def _npz_problem(
    images_key: str, images: np.ndarray, labels_key: str, labels: np.ndarray | None, labels_required: bool
) -> str | None:
    if images.dtype != np.uint8:
        return f"{images_key} has dtype {images.dtype}; expected uint8"
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3, 4)):
        return f"{images_key} has shape {images.shape}; expected N×H×W or N×H×W×C (C in 1, 3, 4)"
    if labels is None:
        return f"missing key {labels_key} for {images_key}" if labels_required else None
    if labels.dtype.kind not in "iub":
        return f"{labels_key} has dtype {labels.dtype}; expected integers"
    if labels.shape not in ((len(images),), (len(images), 1)):
        return (
            f"{labels_key} has shape {labels.shape}; expected ({len(images)},) or ({len(images)}, 1): "
            f"one binary label per image"
        )
    return None


def _unsafe_member(name: str) -> bool:
    p = PurePosixPath(name)
    return not p.parts or p.is_absolute() or ".." in p.parts or name.startswith("\\")


def _tar_sample(key: str, parts: dict[str, bytes]) -> Iterator[Entry | Refusal]:
    images = [ext for ext in parts if f".{ext}" in IMAGE_SUFFIXES]
    for ext in parts:
        if ext != "cls" and ext not in images[:1]:
            yield Refusal(f"{key}.{ext}", "unsupported_entry", "not an image or .cls component")
    if not images:
        if "cls" in parts:
            yield Refusal(f"{key}.cls", "missing_image", "label without an image in this sample")
        return
    label = parts["cls"].decode("utf-8", errors="replace").strip() if "cls" in parts else None
    yield Entry(f"{key}.{images[0]}", parts[images[0]], label)


def _read_tar(path: Path) -> Iterator[Entry | Refusal]:
    """Stream a WebDataset tar: a sample's files are adjacent, so a sample is complete when the key changes."""
    try:
        archive = tarfile.open(path, mode="r:*")
    except tarfile.TarError as exc:
        raise ShardUnreadable("unreadable_shard", f"not a readable tar ({type(exc).__name__}: {exc})") from None
    done: set[str] = set()
    key, parts = None, {}
    with archive:
        members = iter(archive)
        while True:
            try:
                member = next(members)
            except StopIteration:
                break
            except (tarfile.TarError, EOFError, zlib.error) as exc:
                yield Refusal(None, "truncated", f"tar ends early after {len(done)} samples: {exc}")
                break
            name = member.name
            if _unsafe_member(name):
                yield Refusal(name, "unsafe_path", "absolute or '..' path in tar")
                continue
            if member.isdir():
                continue
            if not member.isfile():
                yield Refusal(name, "unsupported_entry", "links and special files are not read")
                continue
            parent, base = PurePosixPath(name).parent, PurePosixPath(name).name
            if base.startswith("."):
                continue
            key_base, _, ext = base.partition(".")
            member_key = str(parent / key_base) if str(parent) != "." else key_base
            if member_key != key:
                if key is not None:
                    yield from _tar_sample(key, parts)
                    done.add(key)
                key, parts = member_key, {}
            if member_key in done:
                yield Refusal(name, "unsupported_entry", "not next to the other files of its sample")
                continue
            try:
                fh = archive.extractfile(member)
                payload = fh.read() if fh else b""
            except (tarfile.TarError, EOFError, zlib.error) as exc:
                yield Refusal(name, "truncated", f"cannot read member: {exc}")
                continue
            if len(payload) != member.size:
                yield Refusal(name, "truncated", f"member has {len(payload)} of {member.size} bytes")
                continue
            parts.setdefault(ext.lower(), payload)
        if key is not None:
            yield from _tar_sample(key, parts)
