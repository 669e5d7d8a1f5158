"""A model version's predictions in the lake: which ones are current, and the one way screenline reads them.

`predictions/<version>/<shard_id>.parquet` is *current* when

- `images/<shard_id>.parquet` exists and holds exactly the images it scored: the image-id digest of the images file,
  recorded in both footers, is the same; and
- it was decided at the operating point the version's (verified) manifest holds now for the engine that scored it:
  the same graph file with the same sha256, and the same threshold.

Anything else is stale, and says why. `screen` re-scores a file whose images or graph changed, re-decides one whose
threshold alone changed (a score is a fact of the graph and the image, a decision a fact of the score and the
threshold), and moves the predictions of a shard that is no longer in the lake aside to
`predictions/<version>/.superseded/`, which every Parquet reader skips. Audit and results read current files only:
no reader of screenline's sees two predictions for one image, or a decision at a threshold no longer in force.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa

from models.manifest import Manifest, Shipped
from screenline.files import SAFE_NAME
from tasks.lake import PREDICTIONS_SCHEMA, SHARD_ID, Lake, footer_and_rows, images_digest, move_aside

IMAGES_KEY = "screenline.images_digest"  # the image-id digest of the images file that was scored
ENGINE_KEY = "screenline.engine"
PRECISION_KEY = "screenline.precision"
FILE_KEY = "screenline.model_file"
FILE_SHA_KEY = "screenline.model_file_sha256"
THRESHOLD_KEY = "screenline.threshold"
GATE_KEY = "screenline.gate"  # "passed", or the override screen was told to make
POINT_KEY = "screenline.operating_point"  # "shipped", or "site:<subset>"
VERSION_KEY = "screenline.model_version"
RUN_KEY = "screenline.run_id"



def as_float32(value: float | str) -> float:
    """A threshold as predictions record it (float32): how two thresholds are compared."""
    return float(np.float32(float(value)))


@dataclass(frozen=True)
class OperatingPoint:
    """What decides a prediction: the engine and graph that score the image, and the threshold on the score."""

    engine: str
    precision: str
    file: str
    file_sha256: str
    threshold: float
    name: str = "shipped"  # or "site:<subset>"

    @classmethod
    def of(cls, shipped: Shipped, manifest: Manifest) -> "OperatingPoint":
        """The operating point of a shipped engine (`shipping` or `fallback`) of a verified manifest: its own
        threshold, or the site point recorded for its engine and graph."""
        threshold, name = manifest.decided_at(shipped)
        return cls(shipped.engine, shipped.precision, shipped.file, manifest.files[shipped.file],
                   as_float32(threshold), name)

    def footer(self) -> dict[str, str]:
        return {ENGINE_KEY: self.engine, PRECISION_KEY: self.precision, FILE_KEY: self.file,
                FILE_SHA_KEY: self.file_sha256, THRESHOLD_KEY: repr(self.threshold), POINT_KEY: self.name}


def operating_points(manifest: Manifest) -> list[OperatingPoint]:
    """The operating points a version holds now: its shipped engine's and, if any, its CPU fallback's."""
    return [OperatingPoint.of(p, manifest) for p in manifest.picks]


@dataclass(frozen=True)
class State:
    """Whether a shard's predictions are current, and if not, what screen does about it and why."""

    kind: str  # "current" | "missing" | "redecide" | "rescore" | "orphan" | "unreadable" (its images file)
    why: str = ""
    point: OperatingPoint | None = None  # for "current" and "redecide": the operating point that made the scores
    rows: int = -1  # for "current" and "redecide": predictions the file holds

    @property
    def current(self) -> bool:
        return self.kind == "current"


def state_of(lake: Lake, version: str, shard_id: str, points: Iterable[OperatingPoint],
             digest: str | None = None,
             read: Callable[[Path], tuple[dict[str, str], int]] = footer_and_rows) -> State:
    """The state of `version`'s predictions of one shard. `digest`: the images file's, when the caller has it;
    `read`: how the predictions file's footer is read (a `FooterMemo`'s, over a whole folder)."""
    path = lake.predictions_file(version, shard_id)
    images = lake.image_file(shard_id)
    if not images.exists():
        return State("orphan", "its shard is no longer in the lake") if path.exists() else State("missing")
    if not path.exists():
        return State("missing")
    try:
        digest = digest or images_digest(images)
    except (pa.ArrowInvalid, OSError) as exc:
        return State("unreadable", f"its images file cannot be read ({exc}): delete it and re-ingest the shard")
    try:
        meta, rows = read(path)
    except (pa.ArrowInvalid, OSError):
        return State("rescore", "its predictions file cannot be read")
    if meta.get(IMAGES_KEY) != digest:
        return State("rescore", "the shard's images changed since they were scored" if meta.get(IMAGES_KEY) else
                     "written before predictions recorded what they scored")
    point = next((p for p in points if p.engine == meta.get(ENGINE_KEY) and p.file == meta.get(FILE_KEY)), None)
    if point is None or point.file_sha256 != meta.get(FILE_SHA_KEY):
        return State("rescore", f"scored by {meta.get(ENGINE_KEY)} {meta.get(FILE_KEY)}, a graph {version} does not "
                                f"ship now")
    if POINT_KEY not in meta:
        return State("rescore", "written before predictions recorded their operating point")
    recorded = as_float32(meta.get(THRESHOLD_KEY, "nan"))
    if recorded != point.threshold or meta[POINT_KEY] != point.name:
        return State("redecide", f"decided at threshold {recorded:.6g} ({meta.get(POINT_KEY, 'shipped')}); "
                                 f"{version}'s {point.engine} decides at {point.threshold:.6g} ({point.name}) now",
                     point, rows)
    return State("current", "", point, rows)


def prediction_files(lake: Lake, version: str) -> dict[str, Path]:
    """shard_id → the predictions file of every shard `version` has predictions for (current or not)."""
    folder = lake.predictions_dir(version)
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.parquet"))
            if SHARD_ID.fullmatch(p.stem) and not p.is_symlink() and p.is_file()}


def current_files(lake: Lake, version: str, manifest: Manifest) -> tuple[dict[str, Path], dict[str, State]]:
    """The current predictions files of `version` (shard_id → path), and the state of every other one."""
    points = operating_points(manifest)
    current, stale = {}, {}
    for shard_id, path in prediction_files(lake, version).items():
        state = state_of(lake, version, shard_id, points)
        if state.current:
            current[shard_id] = path
        else:
            stale[shard_id] = state
    return current, stale


def supersede(path: Path) -> Path:
    """Move a predictions file aside into its folder's .superseded/ (kept for the record, read by nobody)."""
    return move_aside(path)


def sweep_orphans(lake: Lake) -> list[Path]:
    """Move aside every version's predictions of shards that are no longer in the lake; returns where they went."""
    if not lake.predictions.is_dir():
        return []
    landed = {p.stem for p in lake.shard_files()}
    moved = []
    for folder in sorted(p for p in lake.predictions.iterdir()
                         if SAFE_NAME.fullmatch(p.name) and p.is_dir() and not p.is_symlink()):
        for shard_id, path in prediction_files(lake, folder.name).items():
            if shard_id not in landed:
                moved.append(supersede(path))
    return moved


def read_current(files: dict[str, Path], shard_ids: Iterable[str], columns: list[str]) -> pa.Table:
    """`columns` of the given current files (shard ids without a current file are skipped)."""
    paths = [str(files[s]) for s in sorted(set(shard_ids)) if s in files]
    if not paths:
        return PREDICTIONS_SCHEMA.empty_table().select(columns)
    import pyarrow.dataset as ds  # here, not at the top: it imports pandas (~40 MB), which screening never needs

    return ds.dataset(paths, format="parquet").to_table(columns=columns)
