"""Ingest: validate every entry of a shard and land it in the lake, keeping what it refuses.

`ingest_shard` is the plain function (tests call it directly); `ingest_shard_task` is its Prefect wrapper, retried
on I/O errors only and cached on the shard's content. A bad entry never fails its shard: it becomes a reject row
with a reason, whatever fails in it (a decoder's exception included); a reader that fails part-way keeps what it read
and adds one reject row for the rest. A shard that cannot be read at all becomes one reject row. Landing is
two-phase: the shard's rows
stream into a temp file; then, under the lake's lock, images already in the lake are dropped as duplicates, the
rejects file is written and the images file is renamed into place. The images file is the commit mark: a shard
whose images file exists is done, so a re-run after kill -9 redoes exactly the shards that had not landed.

Re-delivery. The same bytes with the same options land once, from any path. A shard lands again, replacing its
earlier landing, when it is ingested with other options (`--resize` after wrong_size rejects, `--subset` after the
fact: the footer records what it landed with); a corrected delivery (new labels.csv, new .cls files) replaces an
earlier shard delivered from the same path when it holds every image that one held; `--replace SHARD_ID` replaces
a named shard whatever its path or overlap. Replaced files move to images/.superseded/ and rejects/.superseded/,
kept for the record; their predictions stop being current and screen moves them aside. Anything else is a new
shard, and an image already in the lake is a duplicate whose reject row says which shard holds it and how to
replace that one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError
from prefect import get_run_logger, task

from models.contract import IMAGE_SIZE, SUPPORTED_CHANNELS
from screenline.files import temp_beside
from tasks.caching import IO_RETRIES, ShardContentCache
from tasks.hashes import HashIndex
from tasks.lake import (
    IMAGE_IDS_KEY,
    IMAGES_SCHEMA,
    LANDED_WITH_KEY,
    REJECTS_SCHEMA,
    ROW_GROUP_ROWS,
    SHARD_PATH_KEY,
    SHARD_SHA_KEY,
    Lake,
    atomic_parquet_writer,
    image_id,
    image_ids_digest,
    landed_with,
    move_aside,
    write_table_atomic,
)
from tasks.shards import (
    NPZ_TEST_SPLIT,
    Entry,
    Refusal,
    ShardRef,
    ShardUnreadable,
    find_shards,
    fingerprint,
    inbox_shards,
    not_shards,
    printable,
    read_entries,
)

MAX_PIXELS = IMAGE_SIZE * IMAGE_SIZE * 1024
"""Images declaring more pixels than this (4 Mpx) are refused before decoding: decompression-bomb guard."""

_HIGH_BIT_MODES = {"I;16": 8, "I;16B": 8, "I;16L": 8, "I;16N": 8}


@dataclass(frozen=True)
class IngestOptions:
    """How entries are validated; part of the cache key."""

    channels: int = 1
    resize: bool = False
    subset: str | None = None
    test_subset: str | None = None  # an .npz's own test split (test_images/test_labels) lands as this subset
    replace: tuple[str, ...] = ()  # shard ids this delivery replaces, whatever their path (ingest --replace)

    def landed_with(self) -> dict[str, Any]:
        """What a landing records of its options: ingesting the shard with others lands it again."""
        return {"resize": self.resize, "subset": self.subset, "test_subset": self.test_subset,
                "replace": sorted(self.replace)}

    def subset_of(self, ref: ShardRef, source: str) -> str | None:
        """The audit subset an entry lands in: `test_subset` for the test split of an .npz, else `subset`."""
        if self.test_subset and ref.kind == "npz" and source.startswith(f"{NPZ_TEST_SPLIT}/"):
            return self.test_subset
        return self.subset


@dataclass
class ShardSummary:
    """What ingest did with one shard: small, returned by the task, shown in the report."""

    shard_id: str
    shard: str
    accepted: int = 0
    rejected: int = 0
    status: str = "ingested"  # "ingested" | "replaced" (it replaced earlier landings) | "already_in_lake" | "refused"
    reasons: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    replaced: list[str] = field(default_factory=list)  # shard ids whose landings this one replaced

    @property
    def landed_now(self) -> bool:
        """Whether this run wrote the shard (new, or a re-delivery replacing an earlier landing)."""
        return self.status in ("ingested", "replaced")


class Rejected(Exception):
    """An entry that fails validation: carries the reject reason and detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def parse_label(raw: object) -> int | None:
    """0/1 from text or a number; None for empty; Rejected for anything else."""
    if raw is None:
        return None
    if isinstance(raw, str):
        text = raw.strip()
        if text == "":
            return None
        if text in ("0", "1"):
            return int(text)
    elif isinstance(raw, (int, np.integer, bool)) and int(raw) in (0, 1):
        return int(raw)
    raise Rejected("bad_label", f"label {raw!r} is not 0, 1 or empty")


_CONVERTIBLE = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "La"}


def _to_mode(image: Image.Image, channels: int) -> Image.Image:
    if image.mode in _HIGH_BIT_MODES:  # 16-bit grayscale: keep the top 8 bits rather than clipping
        arr = np.asarray(image).astype(np.uint16) >> _HIGH_BIT_MODES[image.mode]
        image = Image.fromarray(arr.astype(np.uint8))
    elif image.mode in ("I", "F"):
        raise Rejected("unsupported_mode", f"{image.mode} (32-bit) images are not supported; export 8-bit PNG")
    elif image.mode not in _CONVERTIBLE:
        raise Rejected("unsupported_mode", f"{image.mode} images are not supported; export 8-bit grey or RGB PNG")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("L" if channels == 1 else "RGB")


ENCODED_FORMATS = ("PNG", "JPEG")
"""What an encoded entry may be, whatever its name says: Pillow's other decoders (TIFF, PSD, ...) are never run."""


def _open_encoded(payload: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(payload), formats=ENCODED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Rejected("decompression_bomb", str(exc)) from None
    except UnidentifiedImageError:
        raise Rejected("decode_error", f"not a PNG or JPEG image ({len(payload):,} bytes)") from None
    except (OSError, SyntaxError, ValueError, zlib.error) as exc:
        raise Rejected("decode_error", f"{type(exc).__name__}: {exc}") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise Rejected("decompression_bomb", f"declares {width}×{height} pixels (limit {MAX_PIXELS:,})")
    return image


def _load(image: Image.Image) -> None:
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as exc:
        text = f"{type(exc).__name__}: {exc}"
        reason = "truncated" if "truncat" in text.lower() or isinstance(exc, EOFError) else "decode_error"
        raise Rejected(reason, text) from None


def decode(payload: bytes | np.ndarray, channels: int, resize: bool) -> tuple[np.ndarray, bool]:
    """An entry's pixels as uint8 H×W×C at the lake's size and channel count, and whether it was resized; Rejected
    for anything else, whatever the decoder raised (a bad entry is data, never the end of its shard)."""
    try:
        return _decode(payload, channels, resize)
    except Rejected:
        raise
    except MemoryError:
        raise Rejected("too_large", "decoding it would take more memory than this host has") from None
    except Exception as exc:  # noqa: BLE001 (Pillow raises what it likes on hostile input)
        raise Rejected("decode_error", f"{type(exc).__name__}: {exc}") from None


def _decode(payload: bytes | np.ndarray, channels: int, resize: bool) -> tuple[np.ndarray, bool]:
    if isinstance(payload, np.ndarray):
        arr = payload[..., 0] if payload.ndim == 3 and payload.shape[2] == 1 else payload
        image = Image.fromarray(np.ascontiguousarray(arr))
        width, height = image.size
    else:
        image = _open_encoded(payload)
        width, height = image.size
    if (width, height) != (IMAGE_SIZE, IMAGE_SIZE) and not resize:
        raise Rejected(
            "wrong_size", f"{width}×{height}, expected {IMAGE_SIZE}×{IMAGE_SIZE} (ingest with --resize to resize)"
        )
    _load(image)
    image = _to_mode(image, channels)
    resized = image.size != (IMAGE_SIZE, IMAGE_SIZE)
    if resized:
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE, channels)
    return np.ascontiguousarray(pixels), resized


def detect_channels(refs: list[ShardRef]) -> int:
    """The channel count of the first decodable image in these shards (1 for grayscale, 3 otherwise; 1 if none)."""
    for ref in refs:
        try:
            for item in read_entries(ref):
                if not isinstance(item, Entry):
                    continue
                if isinstance(item.payload, np.ndarray):
                    return 3 if item.payload.ndim == 3 and item.payload.shape[2] >= 3 else 1
                try:
                    image = _open_encoded(item.payload)
                except Rejected:
                    continue
                return 1 if image.mode in ("1", "L", "LA", "I", "F") or image.mode in _HIGH_BIT_MODES else 3
        except ShardUnreadable:
            continue
    return 1


class _RowBuffer:
    """Accumulates accepted rows and flushes them as row groups."""

    def __init__(self, writer: pq.ParquetWriter, shard_id: str, channels: int) -> None:
        self.writer, self.shard_id, self.channels = writer, shard_id, channels
        self.now = datetime.now(timezone.utc)
        self.rows: dict[str, list[Any]] = {"image_id": [], "source": [], "label": [], "subset": [], "resized": [],
                                           "pixels": [], "sha256": []}
        self.count = 0

    def add(self, source: str, label: int | None, subset: str | None, pixels: np.ndarray, resized: bool,
            sha: str) -> None:
        for key, value in (("image_id", image_id(sha)), ("source", source), ("label", label), ("subset", subset),
                           ("resized", resized), ("pixels", pixels.tobytes()), ("sha256", sha)):
            self.rows[key].append(value)
        if len(self.rows["source"]) >= ROW_GROUP_ROWS:
            self.flush()

    def flush(self) -> None:
        n = len(self.rows["source"])
        if n == 0:
            return
        table = pa.table(
            {
                "image_id": self.rows["image_id"],
                "shard_id": [self.shard_id] * n,
                "source": self.rows["source"],
                "label": pa.array(self.rows["label"], pa.int8()),
                "subset": pa.array(self.rows["subset"], pa.string()),
                "height": pa.array([IMAGE_SIZE] * n, pa.int16()),
                "width": pa.array([IMAGE_SIZE] * n, pa.int16()),
                "channels": pa.array([self.channels] * n, pa.int8()),
                "resized": self.rows["resized"],
                "pixels": pa.array(self.rows["pixels"], pa.binary()),
                "sha256": self.rows["sha256"],
                "ingested_at": pa.array([self.now] * n, pa.timestamp("us", tz="UTC")),
            },
            schema=IMAGES_SCHEMA,
        )
        self.writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        self.count += n
        for values in self.rows.values():
            values.clear()


def _summary_of_landed(lake: Lake, ref: ShardRef) -> ShardSummary:
    accepted = pq.ParquetFile(lake.image_file(ref.shard_id)).metadata.num_rows
    reasons: dict[str, int] = {}
    reject_file = lake.reject_file(ref.shard_id)
    if reject_file.exists():
        for reason in pq.read_table(reject_file, columns=["reason"]).column("reason").to_pylist():
            reasons[reason] = reasons.get(reason, 0) + 1
    return ShardSummary(ref.shard_id, ref.path, accepted, sum(reasons.values()), "already_in_lake", reasons)


def _rejects_table(ref: ShardRef, refusals: list[Refusal]) -> pa.Table:
    now = datetime.now(timezone.utc)
    return pa.table(
        {
            "shard_id": [ref.shard_id] * len(refusals),
            "shard": [printable(ref.path)] * len(refusals),
            "entry": [None if r.entry is None else printable(r.entry) for r in refusals],
            "reason": [r.reason for r in refusals],
            "detail": [printable(r.detail) for r in refusals],
            "rejected_at": pa.array([now] * len(refusals), pa.timestamp("us", tz="UTC")),
        },
        schema=REJECTS_SCHEMA,
    )


def _drop_rows(tmp: Path, out: Path, drop: set[str], metadata: dict[str, str], kept: list[str]) -> None:
    """Copy the staged images file without the rows whose sha256 is in `drop` (rare: cross-shard duplicates);
    `kept` are the sha256 of the rows that stay."""
    staged = pq.ParquetFile(tmp)
    keep_out = pa.array(sorted(drop), pa.string())
    metadata = {**metadata, IMAGE_IDS_KEY: image_ids_digest(image_id(sha) for sha in kept)}
    with atomic_parquet_writer(out, IMAGES_SCHEMA, metadata) as writer:
        for batch in staged.iter_batches(batch_size=ROW_GROUP_ROWS):
            mask = pc.invert(pc.is_in(batch.column("sha256"), value_set=keep_out))
            writer.write_table(pa.Table.from_batches([batch.filter(mask)], schema=IMAGES_SCHEMA))


def _entries_or_stop(ref: ShardRef) -> Iterator[Entry | Refusal]:
    """The shard's entries; when its reader fails part-way (a bug, or input no reader foresaw) one refusal for the
    rest, so what was read still lands. Failing before the first entry is ShardUnreadable (one reject row for the
    shard); OSError passes through, for the task to retry."""
    entries, n = read_entries(ref), 0
    while True:
        try:
            item = next(entries)
        except StopIteration:
            return
        except OSError:
            raise
        except ShardUnreadable as exc:
            if n == 0:
                raise
            yield Refusal(None, exc.reason, f"stopped after {n} entries: {exc.detail}")
            return
        except Exception as exc:  # noqa: BLE001 (bad input is data: the entries read so far still land)
            if n == 0:
                raise ShardUnreadable("unreadable_shard", f"{type(exc).__name__}: {exc}") from None
            yield Refusal(None, "unreadable_shard", f"stopped after {n} entries: {type(exc).__name__}: {exc}")
            return
        n += 1
        yield item


def already_landed(lake: Lake, ref: ShardRef, options: IngestOptions) -> bool:
    """Whether this shard is in the lake, landed with these options (re-ingesting it changes nothing)."""
    final = lake.image_file(ref.shard_id)
    return final.exists() and landed_with(final) == options.landed_with()


def ingest_shard(ref: ShardRef, lake: Lake, options: IngestOptions) -> ShardSummary:
    """Validate and land one shard; a no-op when the shard's content is already in the lake with these options."""
    if already_landed(lake, ref, options):
        return _summary_of_landed(lake, ref)
    refusals: list[Refusal] = []
    seen: dict[str, str] = {}  # sha256 -> source, within this shard
    metadata = {SHARD_SHA_KEY: ref.sha256, SHARD_PATH_KEY: ref.path,
                LANDED_WITH_KEY: json.dumps(options.landed_with(), sort_keys=True)}
    staging = temp_beside(lake.image_file(ref.shard_id), ".staging")  # hidden, this writer's: swept if it dies
    with atomic_parquet_writer(staging, IMAGES_SCHEMA, metadata) as writer:
        rows = _RowBuffer(writer, ref.shard_id, options.channels)
        try:
            for item in _entries_or_stop(ref):
                if isinstance(item, Refusal):
                    refusals.append(item)
                    continue
                try:
                    label = parse_label(item.label)
                    pixels, resized = decode(item.payload, options.channels, options.resize)
                except Rejected as rej:
                    refusals.append(Refusal(item.source, rej.reason, rej.detail))
                    continue
                sha = hashlib.sha256(pixels.data).hexdigest()
                if sha in seen:
                    refusals.append(Refusal(item.source, "duplicate", f"same pixels as {seen[sha]} in this shard"))
                    continue
                seen[sha] = item.source
                rows.add(item.source, label, options.subset_of(ref, item.source), pixels, resized, sha)
        except ShardUnreadable as exc:  # raised before the first entry (_entries_or_stop): nothing was written yet
            refusals = [Refusal(None, exc.reason, exc.detail)]
            seen.clear()
            rows.rows = {k: [] for k in rows.rows}
        rows.flush()
        writer.add_key_value_metadata({IMAGE_IDS_KEY: image_ids_digest(image_id(sha) for sha in seen)})
    if not seen and not refusals:
        refusals.append(Refusal(None, "empty_shard", "the shard holds no entries"))
    return _commit_shard(ref, lake, staging, seen, refusals, metadata, options)


def _replaced_by(lake: Lake, index: HashIndex, ref: ShardRef, options: IngestOptions,
                 seen: dict[str, str]) -> list[str]:
    """The shards this delivery replaces: itself landed with other options, those named by --replace, and earlier
    deliveries from the same path whose every image it holds (a corrected re-delivery)."""
    replaced = [ref.shard_id] if lake.image_file(ref.shard_id).exists() else []
    for shard_id in options.replace:
        if not lake.image_file(shard_id).exists():
            raise ValueError(f"--replace {shard_id}: no such shard in {lake.root} (`screenline results` and "
                             f"lake/images/ name the shards)")
        replaced.append(shard_id)
    for shard_id in index.delivered_from(ref.path):
        if shard_id not in replaced and index.hashes_of(shard_id) <= seen.keys():
            replaced.append(shard_id)
    return replaced


def _commit_shard(
    ref: ShardRef, lake: Lake, staging: Path, seen: dict[str, str], refusals: list[Refusal], metadata: dict[str, str],
    options: IngestOptions,
) -> ShardSummary:
    final = lake.image_file(ref.shard_id)
    try:
        with lake.lock(), HashIndex.open(lake) as index:
            if already_landed(lake, ref, options):  # the same content landed meanwhile (another path, another run)
                return _summary_of_landed(lake, ref)
            replaced = _replaced_by(lake, index, ref, options, seen)
            existing = index.holders(seen, excluding=replaced) if seen else {}  # O(shard), not O(lake)
            dups = {sha for sha in seen if sha in existing}
            for sha in sorted(dups, key=seen.get):
                shard_id, source = existing[sha].split("/", 1)
                refusals.append(Refusal(seen[sha], "duplicate", (
                    f"same pixels as {source} of shard {shard_id}, already in the lake; a corrected delivery of "
                    f"that shard replaces it when it comes from the same path and holds every image it held, or "
                    f"with `screenline ingest ... --replace {shard_id}`")))
            for shard_id in replaced:  # aside first: a kill -9 before the rename below leaves the shard to re-land
                for old in (lake.image_file(shard_id), lake.reject_file(shard_id)):
                    if old.exists():
                        move_aside(old)
            if refusals:
                write_table_atomic(lake.reject_file(ref.shard_id), _rejects_table(ref, refusals))
            if dups:
                _drop_rows(staging, final, dups, metadata, [sha for sha in seen if sha not in dups])
            else:
                staging.replace(final)
            index.forget(replaced)  # a kill -9 before these two lines: the next commit's reconcile does them
            index.add(ref.shard_id, final)
    finally:
        staging.unlink(missing_ok=True)
    reasons: dict[str, int] = {}
    for r in refusals:
        reasons[r.reason] = reasons.get(r.reason, 0) + 1
    unreadable = len(refusals) == 1 and refusals[0].entry is None and not seen
    return ShardSummary(
        ref.shard_id,
        ref.path,
        accepted=len(seen) - len(dups),
        rejected=len(refusals),
        status="refused" if unreadable else "replaced" if replaced else "ingested",
        reasons=reasons,
        error=f"{refusals[0].reason}: {refusals[0].detail}" if unreadable else None,
        replaced=replaced,
    )


# --- Prefect wrappers ---------------------------------------------------------------------------------------------




@task(name="fingerprint-shard", **IO_RETRIES)
def fingerprint_task(path: str) -> ShardRef:
    """Hash a shard's content: the key for idempotency and caching."""
    return fingerprint(Path(path))


@task(name="lake-channels", **IO_RETRIES)
def lake_channels_task(lake_root: str, shards: list[ShardRef], channels: int | None) -> int:
    """The lake's channel count: fixed by its first ingest (from `channels`, else the first readable image)."""
    lake = Lake.at(lake_root)
    meta = lake.read_meta()
    if meta is not None:
        if channels is not None and channels != meta["channels"]:
            raise ValueError(
                f"the lake at {lake.root} holds {meta['channels']}-channel images; --channels {channels} conflicts"
            )
        return int(meta["channels"])
    if channels is None:
        channels = detect_channels(shards)
    if channels not in SUPPORTED_CHANNELS:
        raise ValueError(f"--channels must be one of {SUPPORTED_CHANNELS}, got {channels}")
    return lake.ensure_channels(channels)


@task(name="ingest-shard", cache_policy=ShardContentCache(), persist_result=True, **IO_RETRIES)
def ingest_shard_task(ref: ShardRef, lake_root: str, options: IngestOptions) -> ShardSummary:
    """Land one shard in the lake (see `ingest_shard`)."""
    summary = ingest_shard(ref, Lake.at(lake_root), options)
    logger = get_run_logger()
    if summary.status == "refused":
        logger.error("shard %s could not be read and was refused: %s", ref.path, summary.error)
    else:
        logger.info(
            "shard %s: %d accepted, %d rejected (%s)", ref.path, summary.accepted, summary.rejected, summary.status
        )
    return summary


INBOX_ENV = "SCREENLINE_INBOX"
DEFAULT_INBOX = "inbox"


def inbox_root(path: str | None = None) -> str:
    """The inbox sites drop shards in: `path`, else $SCREENLINE_INBOX, else ./inbox."""
    return path or os.environ.get(INBOX_ENV) or DEFAULT_INBOX


@task(name="find-shards", **IO_RETRIES)
def find_shards_task(patterns: list[str]) -> list[str]:
    """The shards these paths and globs name (ShardNotFound for one that names none); what a folder of shards holds
    beside them is logged and left alone."""
    shards = find_shards(patterns)
    containers = {Path(p).resolve() for p in patterns if Path(p).is_dir()} - set(shards)  # folders of shards
    for stray in (s for folder in sorted(containers) for s in not_shards(folder)):
        get_run_logger().warning("%s is not a shard (a folder of images, .npz or .tar): ignored", stray)
    return [str(p) for p in shards]


@task(name="list-inbox", **IO_RETRIES)
def list_inbox_task(inbox: str) -> list[str]:
    """The shards waiting in an inbox folder (entries that are not shards are logged and left alone)."""
    shards, ignored = inbox_shards(inbox)
    for path in ignored:
        if path.is_symlink():
            get_run_logger().warning("inbox entry %s is a symbolic link (to %s): not followed, ignored; a site "
                                     "copies its shard into the inbox", path, os.readlink(path))
        else:
            what = "" if path.is_dir() or path.is_file() else " (not a regular file: a FIFO, socket or device)"
            get_run_logger().warning("inbox entry %s is not a shard (a folder of images, .npz or .tar)%s: ignored",
                                     path, what)
    return [str(p) for p in shards]
