"""The lake: its layout on disk and its Parquet schemas, defined once and imported everywhere.

One root (`--lake`, default `./lake`, `SCREENLINE_LAKE` overrides) holds:

    lake.json            the lake's fixed facts: format version, channel count (set by the first ingest)
    images/<shard>.parquet      a row per accepted image, one file per ingested shard
    rejects/<shard>.parquet     a row per refused entry (or one row for a shard that could not be read)
    images/.superseded/, rejects/.superseded/   earlier landings a re-delivery replaced, kept, read by nobody
    predictions/<model_version>/<shard>.parquet  a row per image scored by that model version
    audits/ models/<version>/    written by audit and optimize
    index/                       the pixel-hash index of images/ ingest finds duplicates with (tasks/hashes.py)
    images/.footers.json, predictions/<version>/.footers.json   footers screen read, kept by file identity so the
                                 next run stats unchanged files instead of opening them (tasks/footers.py)

Every write goes to a hidden temp file in the same folder and is renamed into place (screenline/files.py), so
readers (pyarrow, pandas, DuckDB) only ever see whole files.

Every path built from a name found in data (a shard id, a model version, a file named by a manifest) goes through
`Lake.inside`: the name must be a plain name, and the path must stay inside the lake after symbolic links are
resolved, or `UnsafePath` is raised. Nothing the lake's contents say can make screenline read or write elsewhere.

An images file's footer records the digest of the image ids it holds (`IMAGE_IDS_KEY`); a predictions file records
the digest of the images file it scored, so a predictions file that no longer matches its shard is recognised.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from models.contract import IMAGE_SIZE
from screenline.files import UnsafePath, atomic_path, atomic_write_bytes, confined, safe_name

LAKE_ENV = "SCREENLINE_LAKE"
DEFAULT_LAKE = "lake"
LAKE_FORMAT = 1

IMAGES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("label", pa.int8()),  # 1 positive, 0 negative, null unknown
        pa.field("subset", pa.string()),  # null, or the name of a labelled audit subset
        pa.field("height", pa.int16(), nullable=False),
        pa.field("width", pa.int16(), nullable=False),
        pa.field("channels", pa.int8(), nullable=False),
        pa.field("resized", pa.bool_(), nullable=False),  # True when ingest resized it (`--resize`)
        pa.field("pixels", pa.binary(), nullable=False),  # raw uint8, H×W×C
        pa.field("sha256", pa.string(), nullable=False),  # of the pixels
        pa.field("ingested_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)

REJECTS_SCHEMA = pa.schema(
    [
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),  # the shard's path as given to ingest
        pa.field("entry", pa.string()),  # null when the whole shard was refused
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
        pa.field("rejected_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)

PREDICTIONS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),  # probability of a positive finding
        pa.field("positive", pa.bool_(), nullable=False),  # score >= threshold
        pa.field("threshold", pa.float32(), nullable=False),
        pa.field("operating_point", pa.string(), nullable=False),  # "shipped", or "site:<subset>" (calibrate)
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("engine", pa.string(), nullable=False),
        pa.field("precision", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)

FIGURES_SCHEMA = pa.schema([  # audits/figures/<audit id>.parquet: a row per subset and per subset × shard
    pa.field("audit_id", pa.string()), pa.field("audited_at", pa.timestamp("us", tz="UTC")),
    pa.field("subset", pa.string()), pa.field("group_kind", pa.string()), pa.field("group", pa.string()),
    pa.field("shard_id", pa.string()),
    *[pa.field(name, pa.int64()) for name in ("n", "positives", "negatives", "tp", "fn", "tn", "fp")],
    *[pa.field(name, pa.float64()) for name in (
        "sensitivity", "sensitivity_cp_low", "sensitivity_cp_high", "sensitivity_wilson_low",
        "sensitivity_wilson_high", "specificity", "specificity_cp_low", "specificity_cp_high",
        "specificity_wilson_low", "specificity_wilson_high", "ppv", "npv", "auc", "threshold", "target")],
    pa.field("meets_target", pa.bool_()), pa.field("claim_supported", pa.bool_()),
    pa.field("positives_needed", pa.int64()), pa.field("claim", pa.string()), pa.field("verdict", pa.string()),
    pa.field("model_version", pa.string()), pa.field("engine", pa.string()), pa.field("precision", pa.string()),
    pa.field("threshold_source", pa.string()), pa.field("operating_point", pa.string()),
    pa.field("shipped_threshold", pa.float64()), pa.field("shipped_sensitivity", pa.float64()),
    pa.field("shipped_specificity", pa.float64()),
])

DRIFT_SCHEMA = pa.schema([  # audits/drift/<audit id>.parquet: the batch's scores against the reference
    pa.field("audit_id", pa.string()), pa.field("audited_at", pa.timestamp("us", tz="UTC")),
    pa.field("reference", pa.string()), pa.field("batch_n", pa.int64()), pa.field("reference_n", pa.int64()),
    pa.field("ks_statistic", pa.float64()), pa.field("ks_pvalue", pa.float64()),
    pa.field("batch_positive_rate", pa.float64()), pa.field("reference_positive_rate", pa.float64()),
    pa.field("batch_mean_score", pa.float64()), pa.field("reference_mean_score", pa.float64()),
    pa.field("flagged", pa.bool_()), pa.field("why", pa.string()), pa.field("batch_shards", pa.list_(pa.string())),
    pa.field("model_version", pa.string()), pa.field("threshold", pa.float64()),
])

SHARD_SHA_KEY = "screenline.shard_sha256"
"""Images-file footer: the sha256 of the shard's source bytes (its identity for ingest)."""
SHARD_PATH_KEY = "screenline.shard_path"
"""Images-file footer: the shard's path as given to ingest."""
IMAGE_IDS_KEY = "screenline.image_ids_sha256"
"""Images-file footer: `image_ids_digest` of the image ids the file holds (what a predictions file must match)."""
LANDED_WITH_KEY = "screenline.landed_with"
"""Images-file footer: the ingest options the shard landed with, as JSON (a re-ingest with others lands it again)."""
SUPERSEDED = ".superseded"
"""The hidden folder beside images/, rejects/ and predictions/<version>/ that replaced files move to: kept for the
record, skipped by every Parquet reader (pyarrow, pandas and DuckDB ignore hidden paths) and by screenline."""


def move_aside(path: Path) -> Path:
    """Move a file into its folder's .superseded/, named with the time it moved; returns where it went."""
    aside = path.parent / SUPERSEDED / f"{path.stem}.{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}{path.suffix}"
    aside.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, aside)
    return aside

SHARD_ID = re.compile(r"[0-9a-f]{16}")
"""A shard id: the first 16 hex digits of the shard's content hash (`ShardRef.shard_id`)."""
def shard_id_of(name: object) -> str:
    """`name` if it is a shard id; UnsafePath otherwise."""
    if not isinstance(name, str) or not SHARD_ID.fullmatch(name):
        raise UnsafePath(f"{name!r} is not a shard id (16 lowercase hex digits)")
    return name


def image_id(sha256: str) -> str:
    """An image's stable id: the first 24 hex digits of its pixels' sha256."""
    return sha256[:24]


def image_ids_digest(ids: Iterable[str]) -> str:
    """sha256 of a set of image ids (order does not matter): what an images file holds, what was scored."""
    digest = hashlib.sha256()
    for image_id in sorted(ids):
        digest.update(image_id.encode() + b"\n")
    return digest.hexdigest()


def footer(path: Path) -> dict[str, str]:
    """A Parquet file's key-value metadata (screenline's lineage keys), without Arrow's own schema entry."""
    return footer_and_rows(path)[0]


def footer_and_rows(path: Path) -> tuple[dict[str, str], int]:
    """`footer`, and how many rows the file holds, from one read of its footer."""
    meta = pq.read_metadata(path)
    return key_values(meta), meta.num_rows


def key_values(meta: pq.FileMetaData) -> dict[str, str]:
    """A Parquet footer's key-value metadata as text, without Arrow's own schema entry."""
    return {k.decode(): v.decode() for k, v in (meta.metadata or {}).items() if k != b"ARROW:schema"}


def images_digest(path: Path) -> str:
    """The image-id digest of an images file: from its footer, or computed from its ids (files from before the
    footer recorded it)."""
    recorded = footer(path).get(IMAGE_IDS_KEY)
    if recorded:
        return recorded
    return image_ids_digest(pq.read_table(path, columns=["image_id"]).column("image_id").to_pylist())


def landed_with(path: Path) -> dict:
    """The ingest options an images file landed with: from its footer, or, for a file from before the footer
    recorded them, what its rows show (resized rows, one subset for all)."""
    recorded = footer(path).get(LANDED_WITH_KEY)
    if recorded:
        return json.loads(recorded)
    rows = pq.read_table(path, columns=["subset", "resized"])
    subsets = set(rows.column("subset").to_pylist())
    return {"resize": bool(pc.any(rows.column("resized")).as_py()), "test_subset": None, "replace": [],
            "subset": subsets.pop() if len(subsets) == 1 else None}


ROW_GROUP_ROWS = 8192
"""Rows per Parquet row group in images/: 32 MiB of grayscale pixels, so readers stream in modest batches."""

STREAM_BUFFER = 1 << 20


def streaming_reader(path: Path) -> pq.ParquetFile:
    """An images file opened to stream: column chunks read through a 1 MiB buffer, not a row group's 32 MiB at
    once (each concurrent shard reader holds ~11 MB of Arrow memory instead of ~47 MB, and reads no slower: an
    images file without a pixels dictionary in 33 ms, as with 4 MiB, against 52 ms with one)."""
    return pq.ParquetFile(path, buffer_size=STREAM_BUFFER, pre_buffer=False)


def lake_root(path: str | os.PathLike[str] | None = None) -> Path:
    """The lake's root: the explicit path, else $SCREENLINE_LAKE, else ./lake."""
    return Path(path or os.environ.get(LAKE_ENV) or DEFAULT_LAKE).expanduser().resolve()


@dataclass(frozen=True)
class Lake:
    """Paths inside one lake root. Cheap to create; touches nothing until asked."""

    root: Path

    @classmethod
    def at(cls, path: str | os.PathLike[str] | None = None) -> "Lake":
        """The lake at `path` (or $SCREENLINE_LAKE, or ./lake)."""
        return cls(lake_root(path))

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def rejects(self) -> Path:
        return self.root / "rejects"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    @property
    def audits(self) -> Path:
        return self.root / "audits"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def meta_path(self) -> Path:
        return self.root / "lake.json"

    def inside(self, *parts: str) -> Path:
        """root/parts, refused (UnsafePath) if it leaves the lake once symbolic links are resolved."""
        return confined(self.root, *parts)

    def work_dir(self, name: str) -> Path:
        """A step's outputs (a training, an export, a baseline's evaluation), named by their inputs' content key."""
        return self.inside("models", "work", safe_name(name, "work folder"))

    def figures_file(self, audit_id: str) -> Path:
        return self.inside("audits", "figures", f"{safe_name(audit_id, 'audit id')}.parquet")

    def drift_file(self, audit_id: str) -> Path:
        return self.inside("audits", "drift", f"{safe_name(audit_id, 'audit id')}.parquet")

    def report_file(self, audit_id: str) -> Path:
        return self.inside("audits", "reports", f"{safe_name(audit_id, 'audit id')}.html")

    def calibration_file(self, calibration_id: str) -> Path:
        return self.inside("audits", "calibrations", f"{safe_name(calibration_id, 'calibration id')}.json")

    def image_file(self, shard_id: str) -> Path:
        return self.inside("images", f"{shard_id_of(shard_id)}.parquet")

    def reject_file(self, shard_id: str) -> Path:
        return self.inside("rejects", f"{shard_id_of(shard_id)}.parquet")

    def predictions_dir(self, version: str) -> Path:
        """Where one model version's predictions live."""
        return self.inside("predictions", safe_name(version, "model version"))

    def predictions_file(self, version: str, shard_id: str) -> Path:
        """One shard's predictions by one model version."""
        return self.inside("predictions", safe_name(version, "model version"), f"{shard_id_of(shard_id)}.parquet")

    def shard_files(self) -> list[Path]:
        """The images files of landed shards, by shard id: regular files named `<shard id>.parquet`. Anything else
        in images/ (a symbolic link, a stray file) is not a shard and is never read."""
        if not self.images.is_dir():
            return []
        return sorted(p for p in self.images.glob("*.parquet")
                      if SHARD_ID.fullmatch(p.stem) and not p.is_symlink() and p.is_file())

    def read_meta(self) -> dict | None:
        """The lake's fixed facts, or None for a lake nothing was ingested into yet."""
        if not self.meta_path.exists():
            return None
        return json.loads(self.meta_path.read_text())

    def ensure_channels(self, channels: int) -> int:
        """Fix the lake's channel count on first use; afterwards return the fixed one.

        Raises ValueError when `channels` contradicts a lake that already has a different count.
        """
        with self.lock():
            meta = self.read_meta()
            if meta is None:
                meta = {"format": LAKE_FORMAT, "channels": int(channels), "image_size": IMAGE_SIZE}
                atomic_write_bytes(self.meta_path, json.dumps(meta, indent=2).encode())
            return int(meta["channels"])

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """An exclusive lock on the lake, across threads and processes (flock on a fresh file description)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def counts(self) -> dict[str, int]:
        """How many images (and of them labelled) and how many rejects the lake holds (reads two small columns)."""
        import pyarrow.dataset as ds  # here, not at the top: it imports pandas (~40 MB), which screening never needs

        images = ds.dataset([str(f) for f in self.shard_files()], format="parquet").to_table(columns=["label"]) \
            if self.shard_files() else pa.table({"label": pa.array([], pa.int8())})
        rejects = sorted(self.rejects.glob("*.parquet")) if self.rejects.is_dir() else []
        return {"images": images.num_rows, "labelled": images.num_rows - images.column("label").null_count,
                "rejects": sum(pq.ParquetFile(f).metadata.num_rows for f in rejects)}


UNIQUE_COLUMNS = frozenset({"image_id", "pixels", "sha256", "score"})
"""Written without dictionary encoding: a value an image, so Parquet's writer only gave up on a dictionary after
filling a page of it (4 MB a row group of pixels), which every reader then held (~4 MB each, and slower reads)."""


@contextlib.contextmanager
def atomic_parquet_writer(
    path: Path, schema: pa.Schema, metadata: dict[str, str] | None = None
) -> Iterator[pq.ParquetWriter]:
    """A zstd ParquetWriter whose file appears at `path` only if the block exits cleanly; no dictionary for the
    columns whose every value is its own (UNIQUE_COLUMNS)."""
    if metadata:
        schema = schema.with_metadata({**(schema.metadata or {}), **metadata})
    dictionary = [name for name in schema.names if name not in UNIQUE_COLUMNS]
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd",
                                                    use_dictionary=dictionary) as writer:
        yield writer


def write_table_atomic(path: Path, table: pa.Table, metadata: dict[str, str] | None = None) -> None:
    """Write one small table atomically (rejects, audits)."""
    with atomic_parquet_writer(path, table.schema, metadata) as writer:
        writer.write_table(table)


def numpy_column(values: np.ndarray, type: pa.DataType) -> pa.Array:
    """A 1-D numpy array as an Arrow array of `type` (bool, or fixed-width: its values cast to `type`'s width;
    timestamps as int64 in `type`'s unit).

    `pa.array` and `pa.scalar` import pandas (~48 MB) the first time a process calls them, to check whether they
    were given pandas objects; the screen path builds its columns with this and `repeated` instead.
    """
    if pa.types.is_boolean(type):
        data = np.packbits(np.asarray(values, np.bool_), bitorder="little")
    else:
        data = np.ascontiguousarray(values, np.int64 if pa.types.is_timestamp(type) else type.to_pandas_dtype())
    return pa.Array.from_buffers(type, len(values), [None, pa.py_buffer(data)])


EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def repeated(value: str | float | datetime, type: pa.DataType, n: int) -> pa.Array:
    """`value` n times as an Arrow array of `type`: string, a number, or a timestamp in microseconds (see
    `numpy_column`: no pandas)."""
    if pa.types.is_string(type):
        encoded = str(value).encode()
        if (n + 1) * len(encoded) >= 2**31:
            raise ValueError(f"{n} copies of a {len(encoded)}-byte string exceed a string array's 2 GiB")
        offsets = np.arange(n + 1, dtype=np.int32) * np.int32(len(encoded))
        return pa.Array.from_buffers(type, n, [None, pa.py_buffer(offsets), pa.py_buffer(encoded * n)])
    if pa.types.is_timestamp(type):
        if type.unit != "us" or not isinstance(value, datetime):
            raise TypeError(f"repeated: a datetime into microseconds, not {value!r} into {type}")
        return numpy_column(np.full(n, (value - EPOCH) // timedelta(microseconds=1), np.int64), type)
    return numpy_column(np.full(n, value), type)


def pixel_array(pixels: pa.Array | pa.ChunkedArray, channels: int) -> np.ndarray:
    """A binary pixels column (H×W×C bytes each) as uint8 N×C×64×64, without a per-image Python loop.

    For one channel this is a view over Arrow's data buffer when the column is one contiguous chunk; three channels
    need one transpose copy (the lake stores H×W×C, engines take C×H×W).
    """
    if isinstance(pixels, pa.ChunkedArray):
        pixels = pixels.combine_chunks() if pixels.num_chunks != 1 else pixels.chunk(0)
    n = len(pixels)
    size = IMAGE_SIZE * IMAGE_SIZE * channels
    if n == 0:
        return np.zeros((0, channels, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    offsets = np.frombuffer(pixels.buffers()[1], np.int32, n + 1, pixels.offset * 4)
    if not np.all(np.diff(offsets) == size):
        raise ValueError(f"pixels column holds values that are not {size} bytes (64×64×{channels})")
    data = np.frombuffer(pixels.buffers()[2], np.uint8, n * size, int(offsets[0]))
    hwc = data.reshape(n, IMAGE_SIZE, IMAGE_SIZE, channels)
    return hwc.reshape(n, 1, IMAGE_SIZE, IMAGE_SIZE) if channels == 1 else np.ascontiguousarray(
        hwc.transpose(0, 3, 1, 2))
