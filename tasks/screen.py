"""Screening: score every image of a shard with the promoted engine, writing predictions with lineage.

A shard's images stream from Parquet in record batches of the host's knee size; each batch's pixels go to the engine
as a numpy view over Arrow's buffer (no per-image Python work). Predictions land atomically in
`lake/predictions/<model_version>/<shard_id>.parquet`: one file per shard per model version, its footer recording
what it was made from (the images file's image-id digest, the engine, graph and sha256, the threshold, the gate).
A shard whose predictions are current (tasks/predictions.py) is skipped; one whose images or graph changed is
re-scored; one whose threshold alone changed is re-decided from its scores; predictions of shards no longer in the
lake are moved aside. So re-running scores nothing new, promoting another model re-scores everything, and kill -9
then re-run, or any change to images/, leaves exactly one current prediction per image per model version.

One engine per process (sessions are expensive to create and safe to share between threads): the shard tasks of a flow
run, or of a Dask worker, share it through `shared_engine`, made for as many callers at once as run there.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import get_run_logger, task

from models.engine import Engine, default_threads, find_knee
from models.registry import ModelIntegrityError, Registry, host_fingerprint
from tasks.caching import IO_RETRIES, OutputCache
from tasks.footers import FooterMemo
from tasks.lake import (
    IMAGE_IDS_KEY,
    PREDICTIONS_SCHEMA,
    ROW_GROUP_ROWS,
    Lake,
    atomic_parquet_writer,
    footer,
    image_ids_digest,
    images_digest,
    numpy_column,
    pixel_array,
    repeated,
    streaming_reader,
)
from tasks.predictions import (
    GATE_KEY,
    IMAGES_KEY,
    POINT_KEY,
    RUN_KEY,
    THRESHOLD_KEY,
    VERSION_KEY,
    OperatingPoint,
    State,
    operating_points,
    state_of,
    supersede,
    sweep_orphans,
)

MAX_KNEE = 1 << 16
"""A knee read from a manifest above this (or below 1) is not believed: it is measured again."""


@dataclass(frozen=True)
class ScreenModel:
    """What screening needs to know about the model: small, passed to every shard task."""

    lake_root: str
    version: str
    engine: str
    precision: str
    file: str
    threshold: float
    batch: int
    threads: int  # a call's
    file_sha256: str
    gate: str  # "passed", or the override screen was told to make (--allow-failed-gate)
    points: tuple[OperatingPoint, ...]  # every operating point the version holds now (shipping, fallback)
    operating_point: str = "shipped"  # which decides here: "shipped", or the site point calibrate applied
    callers: int = 1  # shard tasks calling this process's engine at once (threads × callers cores busy)

    @property
    def point(self) -> OperatingPoint:
        """The operating point this host decides at."""
        return next(p for p in self.points if p.engine == self.engine and p.file == self.file)


@dataclass
class ShardScreenSummary:
    shard_id: str
    images: int
    flagged: int
    seconds: float
    status: str  # "scored" | "redecided" | "already_scored"
    why: str = ""  # why a shard was scored again or re-decided


_ENGINES: dict[tuple, Engine] = {}
_ENGINES_LOCK = threading.Lock()


def shared_engine(model: ScreenModel) -> Engine:
    """This process's engine for `model` (created once, file verified against the manifest first)."""
    key = (model.lake_root, model.version, model.engine, model.file, model.threads, model.callers, model.batch)
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            registry = Registry(Lake.at(model.lake_root))
            manifest = registry.manifest(model.version)
            shipped = next((s for s in manifest.picks if s.engine == model.engine and s.file == model.file), None)
            if shipped is None or manifest.files.get(model.file) != model.file_sha256:
                raise ModelIntegrityError(f"{model.version}'s {model.file} changed during this screen run; re-run it")
            engine = registry.load_shipped(model.version, shipped, model.threads, model.callers, model.batch)
            _ENGINES[key] = engine
        return _ENGINES[key]


def resolve_model(lake: Lake, version: str | None, workers: int, engine: str = "auto",
                  allow_failed_gate: bool = False, callers: int = 1) -> ScreenModel:
    """The model to screen with (default: the promoted one), the engine this host runs it on (TensorRT where it
    can and the version has a TensorRT threshold, else ONNX Runtime), that engine's threshold, and this host's knee
    (measured and stored in the manifest when this host has none yet). A version whose held-out gate failed is
    refused unless `allow_failed_gate` (registry.Registry.pick). `workers` shard tasks run at once on this host,
    `callers` of them in one process (all of them on threads, one a process on Dask): a call gets
    cores // workers threads."""
    registry = Registry(lake)
    pick = registry.pick(version, engine, allow_failed_gate)
    manifest = registry.manifest(pick.version)
    shipped = pick.shipped
    host = host_fingerprint(shipped.engine, shipped.precision)
    knee = manifest.knees.get(host)
    threads = max(1, default_threads() // max(1, workers))
    if not _believable(knee):
        runner = registry.load_shipped(pick.version, shipped, threads=default_threads())
        knee = find_knee(runner, _sample_pixels(lake)).as_dict()
        registry.record(pick.version, "knees", host, knee)
    return ScreenModel(str(lake.root), pick.version, shipped.engine, shipped.precision, shipped.file,
                       float(pick.threshold), int(knee["batch"]), threads, manifest.files[shipped.file], pick.gate,
                       tuple(operating_points(manifest)), pick.operating_point, max(1, callers))


def _believable(knee: Any) -> bool:
    batch = knee.get("batch") if isinstance(knee, dict) else None
    return isinstance(batch, int) and not isinstance(batch, bool) and 1 <= batch <= MAX_KNEE


def _sample_pixels(lake: Lake, n: int = 1024) -> np.ndarray:
    """Up to n images from the lake's first non-empty shard: what the knee is measured on."""
    meta = lake.read_meta() or {"channels": 1}
    for file in lake.shard_files():
        parquet = pq.ParquetFile(file)
        if parquet.metadata.num_rows:
            pixels = parquet.read_row_group(0, columns=["pixels"]).column("pixels").slice(0, n)
            return pixel_array(pixels, int(meta["channels"]))
    raise ValueError(f"the lake at {lake.root} holds no images to screen")


def screen_shard(shard_id: str, model: ScreenModel, run_id: str, engine: Engine | None = None) -> ShardScreenSummary:
    """Score one shard's images, re-decide them, or nothing, as the state of its predictions requires."""
    lake = Lake.at(model.lake_root)
    out = lake.predictions_file(model.version, shard_id)
    source = lake.image_file(shard_id)
    if not source.exists():
        raise ShardUnavailable(f"shard {shard_id}: {source} is missing from the lake; re-ingest the shard")
    try:
        reader = streaming_reader(source)  # one handle: the digest and the rows come from the same file
        recorded = (reader.metadata.metadata or {}).get(IMAGE_IDS_KEY.encode(), b"").decode()
        digest = recorded or images_digest(source)
    except (pa.ArrowInvalid, OSError) as exc:
        if _system_error(exc):
            raise  # the disk, not the file: retried, and said as it is
        raise ShardUnavailable(f"shard {shard_id}: {source} is not readable Parquet ({exc}); re-ingest the shard "
                               f"(delete the file, then run ingest on its source again)") from None
    state = state_of(lake, model.version, shard_id, model.points, digest)
    if state.current:
        return ShardScreenSummary(shard_id, state.rows, -1, 0.0, "already_scored")
    if state.kind == "redecide":
        return _redecide(out, shard_id, state, run_id)
    if out.exists():
        supersede(out)
    summary = _score(reader, source, out, shard_id, digest, model, run_id, engine or shared_engine(model))
    summary.why = state.why
    return summary


def triage(model: ScreenModel, shards: list[tuple[str, str]]) -> tuple[list[tuple[str, str]],
                                                                       list[ShardScreenSummary]]:
    """The shards with work to do, and a summary of each current one: its predictions file's footer read once (the
    images file's was, listing the shards), or remembered from the last run where the file is unchanged
    (tasks/footers.py), and no task started for it, so a nightly run over a lake of many shards costs the new
    shards' tasks and a stat a shard. A shard whose state cannot be read here is left to its task, which says what
    is wrong with it."""
    lake = Lake.at(model.lake_root)
    memo = FooterMemo(lake.predictions_dir(model.version))
    pending, current = [], []
    for shard_id, digest in shards:
        try:
            if digest and (state := state_of(lake, model.version, shard_id, model.points, digest,
                                             memo.footer_and_rows)).current:
                current.append(ShardScreenSummary(shard_id, state.rows, -1, 0.0, "already_scored"))
                continue
        except (pa.ArrowInvalid, OSError):
            pass
        pending.append((shard_id, digest))
    memo.save()
    return pending, current


def _footer(model: ScreenModel, run_id: str, digest: str) -> dict[str, str]:
    return {VERSION_KEY: model.version, RUN_KEY: run_id, IMAGES_KEY: digest, GATE_KEY: model.gate,
            **model.point.footer()}


def _score(reader: pq.ParquetFile, source: Path, out: Path, shard_id: str, digest: str, model: ScreenModel,
           run_id: str, engine: Engine) -> ShardScreenSummary:
    channels = int((Lake.at(model.lake_root).read_meta() or {"channels": 1})["channels"])
    t0 = time.perf_counter()
    images = flagged = 0
    scored_ids: list[str] = []
    now = datetime.now(timezone.utc)
    # The lineage columns are the same for every row: one value each, repeated to a row group's length.
    lineage = {
        "shard_id": (shard_id, pa.string()),
        "threshold": (model.threshold, pa.float32()),
        "operating_point": (model.point.name, pa.string()),
        "model_version": (model.version, pa.string()),
        "engine": (model.engine, pa.string()),
        "precision": (model.precision, pa.string()),
        "run_id": (run_id, pa.string()),
        "scored_at": (now, pa.timestamp("us", tz="UTC")),
    }
    pending_ids: list[pa.Array] = []
    pending_scores: list[np.ndarray] = []
    pending_positive: list[np.ndarray] = []
    threshold = np.float32(model.threshold)

    def write(writer: pq.ParquetWriter) -> None:
        """The batches scored so far as one row group (a full disk: OSError, retried)."""
        scores = np.concatenate(pending_scores)
        columns = {name: repeated(value, type, len(scores)) for name, (value, type) in lineage.items()}
        columns.update(image_id=pa.concat_arrays(pending_ids), score=numpy_column(scores, pa.float32()),
                       positive=numpy_column(np.concatenate(pending_positive), pa.bool_()))
        writer.write_table(pa.table(columns, schema=PREDICTIONS_SCHEMA))
        for pending in (pending_ids, pending_scores, pending_positive):
            pending.clear()

    with atomic_parquet_writer(out, PREDICTIONS_SCHEMA, _footer(model, run_id, digest)) as writer:
        for batch in _batches(reader, model.batch, source, shard_id):
            scores = engine.infer(pixel_array(batch.column(1), channels))
            positive = scores >= threshold
            pending_ids.append(batch.column(0))
            pending_scores.append(scores)
            pending_positive.append(positive)
            scored_ids.extend(batch.column(0).to_pylist())
            images += len(scores)
            flagged += int(np.count_nonzero(positive))
            if images % ROW_GROUP_ROWS < len(scores):  # crossed a multiple: row groups like images/' own
                write(writer)
        if pending_scores:
            write(writer)
        if image_ids_digest(scored_ids) != digest:  # checked before the file is committed: nothing lands
            raise ShardUnavailable(f"shard {shard_id}: {source} holds other images than its footer records; it was "
                                   f"altered after ingest: delete it and re-ingest the shard")
    return ShardScreenSummary(shard_id, images, flagged, time.perf_counter() - t0, "scored")


def _system_error(exc: BaseException) -> bool:
    """An OSError from the system (EIO, ENOSPC, EACCES: it carries an errno), not pyarrow's word for bad bytes."""
    return isinstance(exc, OSError) and exc.errno is not None


def _batches(reader: pq.ParquetFile, size: int, source: Path, shard_id: str) -> Iterator[pa.RecordBatch]:
    """The images file's (image_id, pixels) in batches; ShardUnavailable when its bytes are bad (re-ingest), the
    OSError itself when the disk is (retried: the file may be fine)."""
    # One thread decodes: the pages of two columns give Arrow's thread pool nothing to share, and its threads'
    # allocator caches held ~40 MB a reader.
    batches = reader.iter_batches(batch_size=size, columns=["image_id", "pixels"], use_threads=False)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowInvalid, OSError) as exc:
            if _system_error(exc):
                raise
            raise ShardUnavailable(f"shard {shard_id}: {source} is corrupt ({exc}); re-ingest the shard") from None
        yield batch


def _redecide(out: Path, shard_id: str, state: State, run_id: str) -> ShardScreenSummary:
    """Decide a shard's scores again at the threshold its operating point holds now: the scores, the engine that
    made them and the rest of their lineage stay; `positive`, `threshold` and `run_id` are this decision's."""
    t0 = time.perf_counter()
    old = pq.read_table(out)
    threshold = np.float32(state.point.threshold)
    positive = old.column("score").to_numpy() >= threshold
    n = old.num_rows
    table = old.set_column(old.schema.get_field_index("positive"), "positive", numpy_column(positive, pa.bool_())) \
        .set_column(old.schema.get_field_index("threshold"), "threshold", repeated(threshold, pa.float32(), n)) \
        .set_column(old.schema.get_field_index("run_id"), "run_id", repeated(run_id, pa.string(), n)) \
        .set_column(old.schema.get_field_index("operating_point"), "operating_point",
                    repeated(state.point.name, pa.string(), n))
    meta = {**footer(out), THRESHOLD_KEY: repr(state.point.threshold), POINT_KEY: state.point.name, RUN_KEY: run_id}
    supersede(out)
    with atomic_parquet_writer(out, PREDICTIONS_SCHEMA, meta) as writer:
        writer.write_table(table.cast(PREDICTIONS_SCHEMA))
    return ShardScreenSummary(shard_id, n, int(positive.sum()), time.perf_counter() - t0, "redecided", state.why)


class ShardUnavailable(ValueError):
    """A lake shard that is missing or cannot be read: not retried (a re-run after re-ingest fixes it)."""


def _screen_current(inputs: dict[str, Any]) -> bool:
    model: ScreenModel = inputs["model"]
    try:
        return state_of(Lake.at(model.lake_root), model.version, inputs["shard_id"], model.points,
                        inputs["images_digest"] or None).current
    except (pa.ArrowInvalid, OSError, ValueError):
        return False


@task(name="screen-shard", cache_policy=OutputCache(namespace="screen/v2", current=_screen_current,
                                                    exclude=("run_id",)),
      persist_result=True, **IO_RETRIES)
def screen_shard_task(shard_id: str, images_digest: str, model: ScreenModel, run_id: str) -> ShardScreenSummary:
    """Score one shard (cached on its images file's image-id digest and the model: version, engine, graph,
    threshold; never while its predictions are not current)."""
    summary = screen_shard(shard_id, model, run_id)
    if summary.status == "already_scored":
        get_run_logger().info("shard %s: %d images, already scored", shard_id, summary.images)
    else:
        get_run_logger().info("shard %s: %d images, %d flagged (%s%s)", shard_id, summary.images, summary.flagged,
                              summary.status, f": {summary.why}" if summary.why else "")
    return summary


@task(name="triage-shards", **IO_RETRIES)
def triage_task(model: ScreenModel, shards: list[tuple[str, str]]) -> tuple[list[tuple[str, str]],
                                                                           list[ShardScreenSummary]]:
    """The shards to screen, and the current ones (see `triage`)."""
    return triage(model, shards)


@task(name="resolve-model", **IO_RETRIES)
def resolve_model_task(lake_root: str, version: str | None, workers: int, engine: str = "auto",
                       allow_failed_gate: bool = False, callers: int = 1) -> ScreenModel:
    """The model, engine, threshold and knee batch to screen with."""
    return resolve_model(Lake.at(lake_root), version, workers, engine, allow_failed_gate, callers)


@task(name="list-shards", **IO_RETRIES)
def list_shards_task(lake_root: str) -> list[tuple[str, str]]:
    """(shard_id, image-id digest) of every shard in the lake's images/ ("" for a file whose footer cannot be read:
    its task then fails naming it)."""
    lake = Lake.at(lake_root)
    memo = FooterMemo(lake.images)
    shards = []
    for file in lake.shard_files():
        try:
            digest = memo.footer_and_rows(file)[0].get(IMAGE_IDS_KEY) or images_digest(file)
        except (pa.ArrowInvalid, OSError):
            digest = ""
        shards.append((file.stem, digest))
    memo.save()
    landed = {f"{shard_id}.parquet" for shard_id, _ in shards}
    strays = sorted(p.name for p in lake.images.iterdir() if not p.name.startswith(".") and p.name not in landed) \
        if lake.images.is_dir() else []
    if strays:
        get_run_logger().warning("not shards, not read: %s in %s (only <shard id>.parquet files are)",
                                 ", ".join(strays[:5]) + (" …" if len(strays) > 5 else ""), lake.images)
    return shards


@task(name="sweep-predictions", **IO_RETRIES)
def sweep_orphans_task(lake_root: str) -> int:
    """Move aside the predictions of shards that are no longer in the lake (every version); how many moved."""
    moved = sweep_orphans(Lake.at(lake_root))
    if moved:
        get_run_logger().warning("%d predictions file(s) of shards no longer in the lake moved aside to %s",
                                 len(moved), ", ".join(sorted({str(p.parent) for p in moved})))
    return len(moved)
