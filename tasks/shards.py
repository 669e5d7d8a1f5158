"""Shard formats: finding shards, fingerprinting their content, and reading their entries.

A shard is one of
- a folder of PNG/JPEG files, with an optional `labels.csv` (`filename,label`);
- a NumPy `.npz` in MedMNIST layout (`train_images`, `train_labels`, `val_*`, `test_*`), or `images` [+ `labels`];
- a WebDataset-style `.tar` (`<key>.png` + `<key>.cls`), optionally gzipped.

Readers yield an `Entry` per image and a `Refusal` per entry they cannot use or will not read (a hidden file, a FIFO,
a second file for the same sample, an array under a key the layout does not name, a name that is not UTF-8, an entry
over MAX_ENTRY_BYTES); they raise `ShardUnreadable` when the shard as a whole cannot be read (not a zip, not a tar,
a broken labels file, no permission), and let other `OSError`s through so that the Prefect task can retry real I/O
failures. Memory is bounded by the entry, never by what a shard declares: an entry's size is checked before it is
read, an .npz's arrays are read from their headers and streamed in chunks, never loaded whole. Nothing is extracted
to disk, and nothing is unpickled.

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
MAX_ENTRY_BYTES = 32 << 20
"""An entry (an encoded image, a tar member) larger than this is refused unread: a 64×64 PNG is ~10 KB, and a 4-Mpx
one for --resize a few MB."""
MAX_LABELS_BYTES = 64 << 20
"""A labels.csv larger than this refuses its shard (~2 million rows)."""
MAX_LABEL_ARRAY_BYTES = 256 << 20
"""An .npz labels array declaring more than this is refused (32 million int64 labels)."""
NPZ_CHUNK_IMAGES = 4096
"""An .npz's images are read this many at a time (16 MB for 64×64×1)."""
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


def printable(text: str) -> str:
    """A name from a shard as text every writer takes: bytes that are not UTF-8 as backslash escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _not_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def shard_kind(path: Path) -> str | None:
    """"folder", "npz" or "tar" for a path screenline can ingest, else None. A .npz or .tar must be a regular file:
    a FIFO or a device under that name would block or never end."""
    if path.is_dir():
        return "folder"
    name = path.name.lower()
    if not name.endswith((".npz", *TAR_SUFFIXES)) or not path.is_file():
        return None
    return "npz" if name.endswith(".npz") else "tar"


def _is_container(folder: Path) -> bool:
    """A folder of shards, not a shard itself: it holds shards (sub-folders, .npz, .tar) and no image or labels
    file of its own. Other files beside the shards (a README) are left alone, and said (`not_shards`)."""
    children = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if any(p.name == LABELS_FILE or p.suffix.lower() in IMAGE_SUFFIXES for p in children if not p.is_dir()):
        return False
    return any(shard_kind(p) for p in children if not p.is_symlink())


def not_shards(folder: Path) -> list[Path]:
    """What a folder of shards holds beside its shards (ignored by ingest, which says so)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and not p.is_symlink()
                  and not shard_kind(p))


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
        return ShardRef(str(path), kind, hashlib.sha256(_readable_sha256(path).encode()).hexdigest()
                        if not os.access(path, os.R_OK) else _file_sha256(path))
    digest = hashlib.sha256()
    for file in _walk(path):
        rel = file.relative_to(path).as_posix()
        if any(part.startswith(".") for part in PurePosixPath(rel).parts) or not (file.is_symlink() or file.is_file()):
            continue
        content = f"symlink:{os.readlink(file)}" if file.is_symlink() else _readable_sha256(file)
        digest.update(rel.encode("utf-8", "surrogateescape") + b"\0" + content.encode() + b"\n")
    return ShardRef(str(path), kind, digest.hexdigest())


def _readable_sha256(path: Path) -> str:
    """A file's sha256, or what stands for it when it may not be read (its entry is refused; reading it once it
    may be is a new delivery)."""
    try:
        return _file_sha256(path)
    except PermissionError as exc:
        return f"unreadable:{exc.errno}:{path.stat().st_size}"


def read_entries(ref: ShardRef) -> Iterator[Entry | Refusal]:
    """Every entry of a shard, in a stable order."""
    path = Path(ref.path)
    if not os.access(path, os.R_OK | (os.X_OK if ref.kind == "folder" else 0)):
        raise ShardUnreadable("unreadable_shard", f"{path}: permission denied (screenline's user may not read it)")
    if ref.kind == "folder":
        yield from _read_folder(path)
    elif ref.kind == "npz":
        yield from _read_npz(path)
    elif ref.kind == "tar":
        yield from _read_tar(path)
    else:
        raise ShardUnreadable("unsupported_shard", f"unknown shard kind {ref.kind!r}")


def _read_labels_csv(path: Path) -> dict[str, list[tuple[int, str]]]:
    """labels.csv: per file name, every (line, label) it gives (a name given twice is the caller's to judge)."""
    if path.stat().st_size > MAX_LABELS_BYTES:
        raise ShardUnreadable("bad_labels_file", f"{LABELS_FILE} is {path.stat().st_size:,} bytes, over the "
                                                 f"{MAX_LABELS_BYTES:,} a labels file may have")
    text = path.read_bytes().decode("utf-8-sig", errors="replace")
    reader = csv.DictReader(io.StringIO(text))
    try:
        fields = [f.strip().lower() for f in (reader.fieldnames or [])]
        name_col = next((c for c in _FILENAME_COLUMNS if c in fields), None)
        if name_col is None or "label" not in fields:
            raise ShardUnreadable(
                "bad_labels_file",
                f"{LABELS_FILE} needs a header with 'filename' and 'label' columns, found {fields or 'none'}",
            )
        labels: dict[str, list[tuple[int, str]]] = {}
        for row in reader:
            row = {(k or "").strip().lower(): (v or "") for k, v in row.items() if isinstance(v, str) or v is None}
            labels.setdefault(row.get(name_col, "").strip(), []).append((reader.line_num,
                                                                         row.get("label", "").strip()))
    except csv.Error as exc:  # a field over the csv module's limit, a NUL byte, an unclosed quote
        raise ShardUnreadable("bad_labels_file", f"{LABELS_FILE} line {reader.line_num}: {exc}") from None
    return labels


def _label_of(name: str, rows: list[tuple[int, str]] | None) -> tuple[str | None, list[Refusal]]:
    """The label labels.csv gives `name`, and a refusal for each row beyond the first; rows that disagree refuse
    the image (which label is right cannot be known)."""
    if not rows:
        return None, []
    values = {label for _, label in rows}
    if len(values) > 1:
        said = ", ".join(f"{label!r} (line {line})" for line, label in rows)
        raise ValueError(f"{LABELS_FILE} gives {name} {len(rows)} labels that disagree: {said}; fix the file and "
                         f"deliver the shard again")
    extra = [Refusal(f"{LABELS_FILE}:{line}", "duplicate_label_row",
                     f"another row for {name} (the same label {label!r}, first on line {rows[0][0]}): ignored")
             for line, label in rows[1:]]
    return rows[0][1], extra


def _read_folder(folder: Path) -> Iterator[Entry | Refusal]:
    labels_path = folder / LABELS_FILE
    labels = _read_labels_csv(labels_path) if labels_path.is_file() else {}
    seen: set[str] = set()
    for file in _walk(folder):
        rel = file.relative_to(folder).as_posix()
        if rel == LABELS_FILE:
            continue
        seen.add(rel)
        if _not_utf8(rel):
            yield Refusal(printable(rel), "bad_name", "the file name is not valid UTF-8: rename the file")
            continue
        if file.name.startswith("."):
            yield Refusal(rel, "unsupported_entry", "a hidden file or folder: not read")
            continue
        if file.is_symlink():
            yield Refusal(rel, "unsafe_path", "symbolic link; copy the file into the shard instead")
            continue
        if file.is_dir():
            yield Refusal(rel, "unreadable_entry", "a folder screenline may not list: not read")
            continue
        if not file.is_file():
            yield Refusal(rel, "unsupported_entry", "not a regular file (a FIFO, socket or device): not read")
            continue
        if file.suffix.lower() not in IMAGE_SUFFIXES:
            yield Refusal(rel, "unsupported_entry", f"not a PNG/JPEG file ({file.suffix or 'no suffix'})")
            continue
        try:
            label, extra = _label_of(rel, labels.get(rel))
        except ValueError as exc:
            yield Refusal(rel, "conflicting_labels", str(exc))
            continue
        yield from extra
        size = file.stat().st_size
        if size > MAX_ENTRY_BYTES:
            yield Refusal(rel, "too_large", f"{size:,} bytes, over the {MAX_ENTRY_BYTES:,} an image may have")
            continue
        try:
            payload = file.read_bytes()
        except (PermissionError, IsADirectoryError) as exc:
            yield Refusal(rel, "unreadable_entry", f"{type(exc).__name__}: {exc.strerror}")
            continue
        yield Entry(rel, payload, label)
    for name in labels:
        if name not in seen:
            yield Refusal(printable(name), "missing_file", f"listed in {LABELS_FILE} but not in the shard")


def _walk(folder: Path) -> Iterator[Path]:
    """A folder shard's entries in a stable order: files, links and special files at any depth; a hidden folder is
    one entry (not descended into), a link to a folder is one entry (never followed), and so is a folder that may
    not be listed."""
    for entry in sorted(folder.iterdir()):
        listable = entry.is_dir() and not entry.is_symlink() and os.access(entry, os.R_OK | os.X_OK)
        if listable and not entry.name.startswith("."):
            yield from _walk(entry)
        else:
            yield entry


@dataclass(frozen=True)
class _NpyMember:
    """One array of an .npz, from its header: nothing of its data read yet."""

    key: str
    member: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int  # bytes before the data in the member

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _npz_members(archive: zipfile.ZipFile) -> dict[str, _NpyMember]:
    """Every array's header, checked against the bytes the member really holds."""
    members = {}
    for info in archive.infolist():
        if not info.filename.endswith(".npy"):
            continue
        with archive.open(info) as fh:
            try:
                version = np.lib.format.read_magic(fh)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)  # 2.0 and 3.0 share the 4-byte length
                shape, fortran, dtype = read_header(fh)
            except (ValueError, SyntaxError, UnicodeDecodeError) as exc:
                raise ShardUnreadable("bad_npz", f"{info.filename}: not a .npy array ({exc})") from None
            offset = fh.tell()
        member = _NpyMember(info.filename[:-4], info.filename, tuple(shape), dtype, fortran, offset)
        if dtype.hasobject:
            raise ShardUnreadable("bad_npz", f"{member.key} holds Python objects ({dtype}); screenline reads numbers "
                                             f"only and never unpickles")
        if info.file_size - offset != member.nbytes:
            raise ShardUnreadable("bad_npz", f"{member.key} declares {shape} {dtype} ({member.nbytes:,} bytes) but "
                                             f"holds {info.file_size - offset:,}")
        members[member.key] = member
    return members


def _row_chunks(archive: zipfile.ZipFile, member: _NpyMember, rows: int) -> Iterator[np.ndarray]:
    """A C-ordered array's rows, `rows` at a time, read in one pass over its member: memory is one chunk, never the
    array (a compressed member is decompressed once, front to back)."""
    row = member.nbytes // member.shape[0] if member.shape[0] else 0
    with archive.open(member.member) as fh:
        fh.read(member.offset)
        for start in range(0, member.shape[0], rows):
            stop = min(member.shape[0], start + rows)
            data = fh.read((stop - start) * row)
            if len(data) != (stop - start) * row:
                raise ShardUnreadable("truncated", f"{member.key} ends early at row {start + len(data) // max(row, 1)}")
            yield np.frombuffer(data, member.dtype).reshape((stop - start, *member.shape[1:]))


def _read_npz(path: Path) -> Iterator[Entry | Refusal]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise ShardUnreadable("unreadable_shard", f"not a readable .npz ({type(exc).__name__}: {exc})") from None
    with archive:
        try:
            arrays = _npz_members(archive)
        except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError) as exc:
            raise ShardUnreadable("unreadable_shard", f"not a readable .npz ({type(exc).__name__}: {exc})") from None
        splits = [s for s in NPZ_SPLITS if f"{s}_images" in arrays]
        plain = "images" in arrays
        if not splits and not plain:
            raise ShardUnreadable(
                "bad_npz",
                f"no image arrays: expected train_images/val_images/test_images (MedMNIST layout) or images; "
                f"found keys {sorted(arrays) or 'none'}",
            )
        layout = [(f"{s}_images", f"{s}_labels", s) for s in splits] + ([("images", "labels", "")] if plain else [])
        known = {k for pair in layout for k in pair[:2]}
        for key in sorted(set(arrays) - known):
            yield Refusal(key, "unsupported_entry", f"array {key!r} is not read: this layout reads "
                                                    f"{', '.join(sorted(known))}")
        for images_key, labels_key, split in layout:
            yield from _npz_split(archive, arrays[images_key], arrays.get(labels_key), labels_key, split)


def _npz_split(archive: zipfile.ZipFile, images: _NpyMember, labels_member: _NpyMember | None, labels_key: str,
               split: str) -> Iterator[Entry | Refusal]:
    problem = _npz_problem(images, labels_key, labels_member, labels_required=bool(split))
    if problem:
        yield Refusal(images.key, "bad_npz", problem)
        return
    n = images.shape[0]
    labels = None
    if labels_member is not None and n:
        labels = np.concatenate(list(_row_chunks(archive, labels_member, n))).reshape(n)
    prefix = f"{split}/" if split else ""
    start = 0
    for chunk in _row_chunks(archive, images, NPZ_CHUNK_IMAGES):
        for i in range(start, start + len(chunk)):
            yield Entry(f"{prefix}{i:06d}", chunk[i - start], None if labels is None else labels[i].item())
        start += len(chunk)


def _npz_problem(images: _NpyMember, labels_key: str, labels: _NpyMember | None, labels_required: bool) -> str | None:
    if images.dtype != np.uint8:
        return f"{images.key} has dtype {images.dtype}; expected uint8"
    if len(images.shape) not in (3, 4) or (len(images.shape) == 4 and images.shape[3] not in (1, 3, 4)):
        return f"{images.key} has shape {images.shape}; expected N×H×W or N×H×W×C (C in 1, 3, 4)"
    if int(np.prod(images.shape[1:])) > MAX_ENTRY_BYTES:
        return f"{images.key} has images of {images.shape[1:]}: over the {MAX_ENTRY_BYTES:,} bytes an image may have"
    if images.fortran and images.shape[0] > 1:
        return f"{images.key} is stored in Fortran order; save it C-ordered (np.ascontiguousarray)"
    if labels is None:
        return f"missing key {labels_key} for {images.key}" if labels_required else None
    if labels.dtype.kind not in "iub":
        return f"{labels_key} has dtype {labels.dtype}; expected integers"
    n = images.shape[0]
    if labels.shape not in ((n,), (n, 1)):
        return f"{labels_key} has shape {labels.shape}; expected ({n},) or ({n}, 1): one binary label per image"
    if labels.nbytes > MAX_LABEL_ARRAY_BYTES:
        return f"{labels_key} declares {labels.nbytes:,} bytes, over the {MAX_LABEL_ARRAY_BYTES:,} labels may have"
    return None


def _unsafe_member(name: str) -> bool:
    p = PurePosixPath(name)
    return not p.parts or p.is_absolute() or ".." in p.parts or name.startswith("\\")


def _tar_sample(key: str, parts: dict[str, bytes]) -> Iterator[Entry | Refusal]:
    images = [ext for ext in parts if f".{ext}" in IMAGE_SUFFIXES]
    for ext in parts:
        if ext in images[1:]:
            yield Refusal(f"{key}.{ext}", "duplicate_entry", f"a second image for sample {key} (its .{images[0]} "
                                                             f"is read)")
        elif ext != "cls" and ext not in images[:1]:
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
            if _not_utf8(name):
                yield Refusal(printable(name), "bad_name", "the member name is not valid UTF-8")
                continue
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
                yield Refusal(name, "unsupported_entry", "a hidden file: not read")
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
            if ext.lower() in parts:
                yield Refusal(name, "duplicate_entry", f"sample {member_key} has a .{ext.lower()} already (member "
                                                       f"names differ only in case, or repeat): only the first is read")
                continue
            if member.size > MAX_ENTRY_BYTES:
                yield Refusal(name, "too_large", f"{member.size:,} bytes, over the {MAX_ENTRY_BYTES:,} an entry may "
                                                 f"have: not read")
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
            parts[ext.lower()] = payload
        if key is not None:
            yield from _tar_sample(key, parts)
