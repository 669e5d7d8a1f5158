"""The labelled data optimize learns from: a deterministic train/val/test split, and loading a split's pixels.

The split is by image hash: an image's split is a function of its own pixels' sha256, so it is the same in every run
and new data never reshuffles old assignments. Images in a named `subset` are reserved for audits and never trained
on; `test_subsets` names labelled subsets that join the held-out test split (a site's enriched evaluation set, a
public benchmark's official test split): the held-out gates then rest on more positives, and nothing that trains,
chooses a checkpoint or calibrates a threshold ever reads them. A split is written once to
`lake/models/splits/<hash>.parquet` and passed around by reference.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from prefect import task

from tasks.caching import IO_RETRIES
from tasks.lake import Lake, pixel_array, write_table_atomic

SPLIT_PERCENT = {"train": 70, "val": 15, "test": 15}


def split_of(sha256: str) -> str:
    """train, val or test in the proportions of SPLIT_PERCENT, from the first 32 bits of an image's sha256."""
    bucket = int(sha256[:8], 16) % 100
    for name, upper in zip(SPLIT_PERCENT, itertools.accumulate(SPLIT_PERCENT.values())):
        if bucket < upper:
            return name
    raise AssertionError(f"SPLIT_PERCENT sums to {sum(SPLIT_PERCENT.values())}, not 100")


@dataclass(frozen=True)
class SplitRef:
    """A written split: its file, its content hash, and counts per split (images, positives).

    `sha256` covers every row (the held-out subsets' too): what evaluates on the test split keys on it.
    `training_sha256` covers the rows split by hash only: what trains keys on it, so adding a held-out subset
    re-evaluates but never retrains. Without held-out subsets the two are equal. `held_out` counts the test split's
    parts: "split" (by hash) and "subset NAME" per held-out subset."""

    lake_root: str
    path: str
    sha256: str
    channels: int
    counts: dict = field(default_factory=dict, hash=False, compare=False)
    training_sha256: str = ""
    test_subsets: tuple[str, ...] = ()
    held_out: dict = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        if not self.training_sha256:  # a split written before held-out subsets: one hash for both
            object.__setattr__(self, "training_sha256", self.sha256)

    def held_out_description(self) -> str:
        """What the held-out test split is made of, for messages: "the test split" or "the test split + subset X"."""
        return "the test split" + "".join(f" + subset {name!r}" for name in self.test_subsets)


def make_split(lake: Lake, test_subsets: tuple[str, ...] | list[str] = ()) -> SplitRef:
    """Split the lake's labelled, non-audit images; add the labelled images of `test_subsets` to the test split;
    write the assignment once, keyed by its content."""
    meta = lake.read_meta()
    files = lake.shard_files()
    if meta is None or not files:
        raise ValueError(f"the lake at {lake.root} holds no images: run `screenline ingest` (or `make demo`) first")
    dataset = ds.dataset([str(f) for f in files], format="parquet")
    table = dataset.to_table(
        columns=["image_id", "sha256", "label"],
        filter=pc.field("label").is_valid() & pc.field("subset").is_null(),
    ).sort_by("image_id")
    if table.num_rows == 0:
        raise ValueError(f"the lake at {lake.root} has no labelled images outside audit subsets to learn from")
    ids, labels = table.column("image_id").to_pylist(), table.column("label").to_pylist()
    splits = [split_of(h) for h in table.column("sha256").to_pylist()]
    sources: list[str | None] = [None] * len(ids)
    if test_subsets:
        held = held_out_images(lake, test_subsets)
        ids += held.column("image_id").to_pylist()
        labels += held.column("label").to_pylist()
        splits += ["test"] * held.num_rows
        sources += held.column("subset").to_pylist()
    return _written(lake.root, lake.models / "splits", ids, splits, labels, int(meta["channels"]), sources)


def split_of_version(lake: Lake, data: dict) -> SplitRef:
    """The split a registered version was made from, by its manifest's `data` record (benchmarks re-read it)."""
    return SplitRef(str(lake.root), str(lake.models / "splits" / data["split_file"]), data["split_sha256"],
                    int(lake.read_meta()["channels"]), data.get("counts", {}), data.get("training_sha256", ""),
                    tuple(data.get("test_subsets", ())), data.get("held_out", {}))


def held_out_images(lake: Lake, test_subsets: tuple[str, ...] | list[str]) -> pa.Table:
    """image_id, label, subset of the labelled images of `test_subsets`; ValueError naming a subset that is not in
    the lake or lacks positives or negatives (the held-out gates need both)."""
    files = lake.shard_files()
    names = sorted(set(test_subsets))
    held = ds.dataset([str(f) for f in files], format="parquet").to_table(
        columns=["image_id", "label", "subset"],
        filter=pc.field("label").is_valid() & pc.field("subset").isin(names),
    ).sort_by("image_id") if files else None
    for name in names:
        found = held.filter(pc.equal(held.column("subset"), name)) if held is not None else None
        n = found.num_rows if found is not None else 0
        positives = int(pc.sum(found.column("label")).as_py() or 0) if n else 0
        if n == 0 or positives == 0 or positives == n:
            raise ValueError(
                f"subset {name!r} cannot join the held-out test split: it holds {n} labelled image(s), {positives} "
                f"positive, in {lake.root}; the gates need positives and negatives (ingest labelled shards with "
                f"`screenline ingest SHARD --subset {name}`)")
    return held


@task(name="make-split", **IO_RETRIES)
def make_split_task(lake_root: str, test_subsets: tuple[str, ...] | list[str] = ()) -> SplitRef:
    """The lake's split, written once (a reference to it: its file, hash and counts)."""
    return make_split(Lake.at(lake_root), test_subsets)


def _written(lake_root: Path, folder: Path, ids: list[str], splits: list[str], labels: list[int],
             channels: int, sources: list[str | None] | None = None) -> SplitRef:
    """Write an assignment once, named by its content hash; counts per split. `sources`: per row, None for a row
    split by hash, else the held-out subset it comes from."""
    sources = sources if sources is not None else [None] * len(ids)
    digest, training = hashlib.sha256(), hashlib.sha256()
    for image_id, split, label, source in zip(ids, splits, labels, sources):
        line = f"{image_id},{split},{label}" + ("" if source is None else f",{source}") + "\n"
        digest.update(line.encode())
        if source is None:
            training.update(line.encode())
    sha = digest.hexdigest()
    path = folder / f"{sha[:16]}.parquet"
    if not path.exists():
        write_table_atomic(path, pa.table({"image_id": ids, "split": splits, "label": pa.array(labels, pa.int8()),
                                           "subset": pa.array(sources, pa.string())}))
    counts = {}
    for name in SPLIT_PERCENT:
        in_split = [lab for s, lab in zip(splits, labels) if s == name]
        counts[name] = {"images": len(in_split), "positives": int(sum(in_split))}
    subsets = tuple(sorted({s for s in sources if s is not None}))
    held_out = {}
    for part in (None, *subsets):
        in_part = [lab for s, lab, src in zip(splits, labels, sources) if s == "test" and src == part]
        held_out["split" if part is None else f"subset {part}"] = {"images": len(in_part),
                                                                   "positives": int(sum(in_part))}
    return SplitRef(str(lake_root), str(path), sha, channels, counts, training.hexdigest(), subsets, held_out)


def fold_of(image_id: str, folds: int) -> int:
    """Cross-fitting's fold of an image, from bits of its id that neither the split nor the site halves use."""
    return int(image_id[8:16], 16) % folds


def fold_split(ref: SplitRef, k: int, folds: int) -> SplitRef:
    """Cross-fitting's k-th split of `ref`: fold k of train+val is validation (the images it scores out of fold),
    the rest of train+val trains, and the test split stays the test split, seen by no fold."""
    if not 0 <= k < folds or folds < 2:
        raise ValueError(f"fold {k} of {folds}: need 2 or more folds and 0 ≤ k < folds")
    table = pq.read_table(ref.path)
    ids = table.column("image_id").to_pylist()
    splits = ["test" if s == "test" else "val" if fold_of(i, folds) == k else "train"
              for i, s in zip(ids, table.column("split").to_pylist())]
    sources = table.column("subset").to_pylist() if "subset" in table.column_names else None
    return _written(Path(ref.lake_root), Path(ref.path).parent, ids, splits, table.column("label").to_pylist(),
                    ref.channels, sources)


def load_split(ref: SplitRef, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (uint8 N×C×64×64) and labels (uint8 N) of one split, in image_id order."""
    assignment = pq.read_table(ref.path, filters=[("split", "=", name)], columns=["image_id"])
    lake = Lake.at(ref.lake_root)
    files = sorted(lake.images.glob("*.parquet"))
    table = ds.dataset([str(f) for f in files], format="parquet").to_table(
        columns=["image_id", "label", "pixels"],
        filter=pc.field("image_id").isin(assignment.column("image_id")),
    ).sort_by("image_id")
    if table.num_rows != assignment.num_rows:
        raise ValueError(
            f"split {ref.sha256[:16]} lists {assignment.num_rows} {name} images but the lake has {table.num_rows}: "
            f"images were removed since; re-run optimize"
        )
    pixels = pixel_array(table.column("pixels"), ref.channels)
    return np.ascontiguousarray(pixels), table.column("label").to_numpy().astype(np.uint8)
