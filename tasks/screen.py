"""Screening: score every image of a shard with the promoted engine, writing predictions with lineage.

A shard's images stream from Parquet in record batches of the host's knee size; each batch's pixels go to the engine
as a numpy view over Arrow's buffer (no per-image Python work). Predictions land atomically in
`lake/predictions/<model_version>/<shard_id>.parquet`: one file per shard per model version, so re-running scores
nothing that is already there, promoting another model re-scores everything, and kill -9 then re-run leaves exactly
one prediction per image per model version.

One engine per process (ONNX Runtime sessions are expensive to create and safe to share between threads): the shard
tasks of a flow run, or of a Dask worker, share it through `shared_engine`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import get_run_logger, task

from models.engine import Engine, default_threads, find_knee
from models.registry import Registry, host_fingerprint
from tasks.caching import OutputCache
from tasks.ingest import IO_RETRIES
from tasks.lake import PREDICTIONS_SCHEMA, Lake, atomic_parquet_writer, pixel_array


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
    threads: int


@dataclass
class ShardScreenSummary:
    shard_id: str
    images: int
    flagged: int
    seconds: float
    status: str  # "scored" | "already_scored"


_ENGINES: dict[tuple[str, str, str, int], Engine] = {}
_ENGINES_LOCK = threading.Lock()


def shared_engine(model: ScreenModel) -> Engine:
    """This process's engine for `model` (created once, file verified against the manifest first)."""
    key = (model.lake_root, model.version, model.engine, model.threads)
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            _ENGINES[key] = Registry(Lake.at(model.lake_root)).load_engine(model.version, threads=model.threads,
                                                                           engine=model.engine)
        return _ENGINES[key]


def resolve_model(lake: Lake, version: str | None, workers: int, engine: str = "auto") -> ScreenModel:
    """The model to screen with (default: the promoted one), the engine this host runs it on (TensorRT where it
    can and the version has a TensorRT threshold, else ONNX Runtime), that engine's threshold, and this host's knee
    (measured and stored in the manifest when this host has none yet)."""
    registry = Registry(lake)
    ship = registry.pick(version, engine)
    version = ship["version"]
    manifest = registry.manifest(version)
    host = host_fingerprint(ship["engine"], ship["precision"])
    knee = manifest.get("knees", {}).get(host)
    threads = max(1, default_threads() // max(1, workers))
    if knee is None:
        runner = registry.load_engine(version, threads=default_threads(), engine=ship["engine"])
        sample = _sample_pixels(lake)
        knee = find_knee(runner, sample).as_dict()
        with lake.lock():
            manifest = registry.manifest(version)
            manifest.setdefault("knees", {})[host] = knee
            registry.write_manifest(version, manifest)
    return ScreenModel(str(lake.root), version, ship["engine"], ship["precision"], ship["file"],
                       float(ship["threshold"]), int(knee["batch"]), threads)


def _sample_pixels(lake: Lake, n: int = 1024) -> np.ndarray:
    """Up to n images from the lake's first non-empty shard: what the knee is measured on."""
    meta = lake.read_meta() or {"channels": 1}
    for file in sorted(lake.images.glob("*.parquet")):
        parquet = pq.ParquetFile(file)
        if parquet.metadata.num_rows:
            pixels = parquet.read_row_group(0, columns=["pixels"]).column("pixels").slice(0, n)
            return pixel_array(pixels, int(meta["channels"]))
    raise ValueError(f"the lake at {lake.root} holds no images to screen")


def predictions_file(lake: Lake, version: str, shard_id: str) -> Path:
    return lake.predictions / version / f"{shard_id}.parquet"


def screen_shard(shard_id: str, model: ScreenModel, run_id: str, engine: Engine | None = None) -> ShardScreenSummary:
    """Score one shard's images; a no-op when this model version already scored it."""
    lake = Lake.at(model.lake_root)
    out = predictions_file(lake, model.version, shard_id)
    if out.exists():
        return ShardScreenSummary(shard_id, pq.ParquetFile(out).metadata.num_rows, -1, 0.0, "already_scored")
    source = lake.image_file(shard_id)
    if not source.exists():
        raise ShardUnavailable(f"shard {shard_id}: {source} is missing from the lake; re-ingest the shard")
    try:
        reader = pq.ParquetFile(source)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ShardUnavailable(f"shard {shard_id}: {source} is not readable Parquet ({exc}); re-ingest the shard "
                           f"(delete the file, then run ingest on its source again)") from None
    channels = int((lake.read_meta() or {"channels": 1})["channels"])
    engine = engine or shared_engine(model)
    t0 = time.perf_counter()
    images = flagged = 0
    now = datetime.now(timezone.utc)
    meta = {"screenline.model_version": model.version, "screenline.run_id": run_id}
    # The lineage columns are the same for every row: built once at batch size, sliced per batch.
    lineage = {
        "shard_id": pa.array([shard_id] * model.batch, pa.string()),
        "threshold": pa.array(np.full(model.batch, model.threshold, np.float32)),
        "model_version": pa.array([model.version] * model.batch, pa.string()),
        "engine": pa.array([model.engine] * model.batch, pa.string()),
        "precision": pa.array([model.precision] * model.batch, pa.string()),
        "run_id": pa.array([run_id] * model.batch, pa.string()),
        "scored_at": pa.array([now] * model.batch, pa.timestamp("us", tz="UTC")),
    }
    with atomic_parquet_writer(out, PREDICTIONS_SCHEMA, meta) as writer:
        try:
            batches = reader.iter_batches(batch_size=model.batch, columns=["image_id", "pixels"])
            for batch in batches:
                scores = engine.infer(pixel_array(batch.column(1), channels))
                positive = scores >= model.threshold
                n = len(scores)
                columns = {name: values.slice(0, n) for name, values in lineage.items()}
                columns.update(image_id=batch.column(0), score=pa.array(scores, pa.float32()),
                               positive=pa.array(positive))
                writer.write_table(pa.table(columns, schema=PREDICTIONS_SCHEMA))
                images += n
                flagged += int(positive.sum())
        except (pa.ArrowInvalid, OSError) as exc:
            raise ShardUnavailable(f"shard {shard_id}: {source} is corrupt ({exc}); re-ingest the shard") from None
    return ShardScreenSummary(shard_id, images, flagged, time.perf_counter() - t0, "scored")


class ShardUnavailable(ValueError):
    """A lake shard that is missing or cannot be read: not retried (a re-run after re-ingest fixes it)."""


def _screen_output(inputs: dict[str, Any]) -> Path:
    model: ScreenModel = inputs["model"]
    return predictions_file(Lake.at(model.lake_root), model.version, inputs["shard_id"])


@task(name="screen-shard", cache_policy=OutputCache(namespace="screen/v1", output=_screen_output, exclude=("run_id",)),
      persist_result=True, **IO_RETRIES)
def screen_shard_task(shard_id: str, shard_sha256: str, model: ScreenModel, run_id: str) -> ShardScreenSummary:
    """Score one shard (cached on the shard's content hash and the model: version, engine, precision, threshold)."""
    summary = screen_shard(shard_id, model, run_id)
    get_run_logger().info("shard %s: %d images, %d flagged (%s)", shard_id, summary.images, summary.flagged,
                          summary.status)
    return summary


@task(name="resolve-model", **IO_RETRIES)
def resolve_model_task(lake_root: str, version: str | None, workers: int, engine: str = "auto") -> ScreenModel:
    """The model, engine, threshold and knee batch to screen with."""
    return resolve_model(Lake.at(lake_root), version, workers, engine)


@task(name="list-shards", **IO_RETRIES)
def list_shards_task(lake_root: str) -> list[tuple[str, str]]:
    """(shard_id, shard sha256) of every shard in the lake's images/."""
    lake = Lake.at(lake_root)
    shards = []
    for file in sorted(lake.images.glob("*.parquet")):
        try:
            sha = (pq.read_schema(file).metadata or {}).get(b"screenline.shard_sha256", b"").decode()
        except (pa.ArrowInvalid, OSError):
            sha = ""
        shards.append((file.stem, sha or file.stem))
    return shards
