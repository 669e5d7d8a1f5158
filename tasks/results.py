"""Pulling predictions out of the lake: by model version, run or date range, joined with where each image came from.

Only current predictions are returned (tasks/predictions.py): never two for one image, never a decision at a
threshold the version no longer holds. Stale ones are left out and named, with what brings them up to date.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.dataset as ds

from models.registry import ModelNotFound, Registry
from screenline.files import atomic_path, safe_name
from tasks.lake import IMAGES_SCHEMA, Lake, write_table_atomic
from tasks.predictions import State, current_files


@dataclass(frozen=True)
class ResultsQuery:
    """Which predictions to pull. Without version or run_id: the promoted model's."""

    version: str | None = None
    run_id: str | None = None
    since: str | None = None  # ISO date or date-time, UTC
    until: str | None = None
    positives_only: bool = False


def _when(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an ISO date or date-time: {text!r} (e.g. 2026-11-23 or 2026-11-23T02:00)") from None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def query_results(lake_root: str | None, query: ResultsQuery) -> pa.Table:
    """Current predictions matching `query`, with the image's shard_id, source, label and subset."""
    return query_current(lake_root, query)[0]


def query_current(lake_root: str | None, query: ResultsQuery) -> tuple[pa.Table, dict[str, dict[str, State]]]:
    """Current predictions matching `query` (as `query_results`), and per version the stale files left out."""
    lake = Lake.at(lake_root)
    registry = Registry(lake)
    if query.version or not query.run_id:
        try:
            versions = [safe_name(query.version, "model version") if query.version else registry.promoted()]
        except ModelNotFound as exc:
            raise ValueError(str(exc)) from None
    else:
        versions = [v for v in registry.versions() if lake.predictions_dir(v).is_dir()]
    files, stale = [], {}
    for version in versions:
        current, left_out = current_files(lake, version, registry.manifest(version))
        files += list(current.values())
        if left_out:
            stale[version] = left_out
    if not files:
        where = lake.predictions_dir(versions[0]) if len(versions) == 1 else lake.predictions
        if note := stale_note(stale):
            raise ValueError(f"no current predictions in {where}: {note}")
        raise ValueError(f"no current predictions in {where}: run `screenline screen` first")
    condition = pc.scalar(True)
    if query.run_id:
        condition &= pc.field("run_id") == query.run_id
    if query.since:
        condition &= pc.field("scored_at") >= pa.scalar(_when(query.since), pa.timestamp("us", tz="UTC"))
    if query.until:
        condition &= pc.field("scored_at") < pa.scalar(_when(query.until), pa.timestamp("us", tz="UTC"))
    if query.positives_only:
        condition &= pc.field("positive")
    predictions = ds.dataset([str(f) for f in files], format="parquet").to_table(filter=condition)
    # the images files behind these predictions only: they are readable (their predictions are current)
    shard_ids = sorted(set(predictions.column("shard_id").to_pylist()))
    images = ds.dataset([str(lake.image_file(s)) for s in shard_ids], format="parquet",
                        schema=IMAGES_SCHEMA).to_table(
        columns=["image_id", "source", "label", "subset"],
        filter=pc.field("image_id").isin(predictions.column("image_id").combine_chunks().cast(pa.string())),
    )
    joined = predictions.join(images, "image_id", join_type="left outer")
    order = ["image_id", "shard_id", "source", "label", "subset", "score", "positive", "threshold",
             "operating_point", "model_version", "engine", "precision", "run_id", "scored_at"]
    return joined.select(order).sort_by([("shard_id", "ascending"), ("source", "ascending")]), stale


def stale_note(stale: dict[str, dict[str, State]]) -> str | None:
    """One line naming the stale predictions left out, and what brings them up to date; None when there are none."""
    if not stale:
        return None
    parts = []
    for version, states in sorted(stale.items()):
        shard_id, state = next(iter(sorted(states.items())))
        parts.append(f"{len(states)} shard(s) of {version} (e.g. {shard_id}: {state.why})")
    return ("left out stale predictions of " + "; ".join(parts)
            + ": `screenline screen` (with --version for a version that is not promoted) brings them up to date")


def write_results(lake_root: str | None, query: ResultsQuery, out: str | None) -> tuple[int, str | None]:
    """Write matching predictions to out (.parquet or .csv) or as CSV to standard output; a stale-predictions note
    goes to standard error."""
    table, stale = query_current(lake_root, query)
    if note := stale_note(stale):
        print(f"screenline: warning: {note}", file=sys.stderr)
    if out is None:
        pcsv.write_csv(table, sys.stdout.buffer)
        return table.num_rows, None
    path = Path(out)
    if path.suffix == ".parquet":
        write_table_atomic(path, table)
    elif path.suffix == ".csv":
        with atomic_path(path) as tmp:
            pcsv.write_csv(table, str(tmp))
    else:
        raise ValueError(f"--out must end in .parquet or .csv, got {out}")
    return table.num_rows, str(path)
