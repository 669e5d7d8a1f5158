"""The split optimize learns from: by image hash, in SPLIT_PERCENT's proportions, stable as the lake grows."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import images
from tasks.dataset import SPLIT_PERCENT, fold_split, load_split, make_split, split_of
from tasks.ingest import IngestOptions, ingest_shard
from tasks.lake import Lake
from tasks.samples import write_png_folder, write_tar
from tasks.shards import fingerprint


def land(lake: Lake, path, subset: str | None = None) -> None:
    """What the ingest flow does for one shard: fix the lake's channels, then land it."""
    ingest_shard(fingerprint(path), lake, IngestOptions(channels=lake.ensure_channels(1), subset=subset))


def test_split_of_follows_split_percent_and_depends_only_on_the_hash():
    counts = Counter(split_of(hashlib.sha256(str(i).encode()).hexdigest()) for i in range(20_000))
    for name, percent in SPLIT_PERCENT.items():
        assert counts[name] / 20_000 == pytest.approx(percent / 100, abs=0.01), name
    digest = hashlib.sha256(b"one image").hexdigest()
    assert {split_of(digest) for _ in range(3)} == {split_of(digest)}


def test_the_split_leaves_out_audit_subsets_and_unlabelled_images_and_old_images_keep_their_split(tmp_path):
    lake = Lake(tmp_path / "lake")
    write_tar(tmp_path / "train.tar", *images(120, "split-train", prevalence=0.5), prefix="t")
    write_tar(tmp_path / "holdout.tar", *images(30, "split-hold", prevalence=0.5), prefix="h")
    write_png_folder(tmp_path / "unlabelled", images(10, "split-none")[0], None, prefix="u")
    for path, subset in ((tmp_path / "train.tar", None), (tmp_path / "holdout.tar", "holdout"),
                         (tmp_path / "unlabelled", None)):
        land(lake, path, subset)
    first = make_split(lake)
    assert sum(c["images"] for c in first.counts.values()) == 120  # not the 30 held out, not the 10 unlabelled
    assert make_split(lake) == first  # written once, found again
    x, y = load_split(first, "train")
    assert x.shape == (first.counts["train"]["images"], 1, 64, 64) and int(y.sum()) == first.counts["train"]["positives"]

    write_tar(tmp_path / "more.tar", *images(60, "split-more", prevalence=0.5), prefix="m")
    land(lake, tmp_path / "more.tar")
    grown = make_split(lake)
    before = dict(zip(*pq.read_table(first.path).select(["image_id", "split"]).to_pydict().values()))
    after = dict(zip(*pq.read_table(grown.path).select(["image_id", "split"]).to_pydict().values()))
    assert grown.sha256 != first.sha256 and len(after) == 180
    assert {i: after[i] for i in before} == before  # new data never moves an old image


def test_cross_fitting_folds_cover_train_and_val_once_and_never_touch_test(tmp_path):
    lake = Lake(tmp_path / "lake")
    write_tar(tmp_path / "train.tar", *images(150, "split-folds", prevalence=0.5), prefix="f")
    land(lake, tmp_path / "train.tar")
    base = make_split(lake)
    table = pq.read_table(base.path).to_pydict()
    split = dict(zip(table["image_id"], table["split"]))
    held_out = Counter()
    for k in range(3):
        fold = pq.read_table(fold_split(base, k, 3).path).to_pydict()
        for image_id, s in zip(fold["image_id"], fold["split"]):
            assert (s == "test") == (split[image_id] == "test")
            held_out[image_id] += s == "val"
    assert {i: n for i, n in held_out.items() if split[i] != "test"} == {i: 1 for i in split if split[i] != "test"}
    with pytest.raises(ValueError, match="2 or more folds"):
        fold_split(base, 0, 1)


def test_a_held_out_subset_joins_the_test_split_only_and_never_changes_what_trains(tmp_path):
    lake = Lake(tmp_path / "lake")
    write_tar(tmp_path / "train.tar", *images(120, "split-train", prevalence=0.5), prefix="t")
    write_tar(tmp_path / "eval.tar", *images(40, "split-eval", prevalence=0.5), prefix="e")
    land(lake, tmp_path / "train.tar")
    land(lake, tmp_path / "eval.tar", "evaluation")
    plain, joined = make_split(lake), make_split(lake, ["evaluation"])
    eval_ids = set(pq.read_table(joined.path, filters=[("subset", "=", "evaluation")]).column("image_id").to_pylist())
    assert len(eval_ids) == 40
    rows = pq.read_table(joined.path).to_pydict()
    assert {s for i, s in zip(rows["image_id"], rows["split"]) if i in eval_ids} == {"test"}
    # the split's identity covers the subset (what evaluates re-runs); what trains keys on the same rows as before
    assert joined.sha256 != plain.sha256 and joined.training_sha256 == plain.training_sha256 == plain.sha256
    for name in ("train", "val"):
        assert np.array_equal(load_split(joined, name)[0], load_split(plain, name)[0])
    x, y = load_split(joined, "test")
    assert len(y) == plain.counts["test"]["images"] + 40 == joined.counts["test"]["images"]
    assert joined.held_out == {"split": plain.counts["test"], "subset evaluation": {"images": 40,
                                                                                    "positives": int(y.sum()) -
                                                                                    plain.counts["test"]["positives"]}}
    assert joined.held_out_description() == "the test split + subset 'evaluation'"
    # cross-fitting's folds keep the subset in test, and train on the same rows as without it
    assert fold_split(joined, 0, 3).training_sha256 == fold_split(plain, 0, 3).training_sha256
    assert fold_split(joined, 0, 3).counts["test"] == joined.counts["test"]


@pytest.mark.parametrize("labels, says", [(None, "holds 0 labelled image"), ("ones", "40 positive")])
def test_a_held_out_subset_without_positives_and_negatives_is_refused_naming_it(tmp_path, labels, says):
    lake = Lake(tmp_path / "lake")
    write_tar(tmp_path / "train.tar", *images(60, "split-train", prevalence=0.5), prefix="t")
    land(lake, tmp_path / "train.tar")
    if labels == "ones":
        x, _ = images(40, "split-ones", prevalence=0.5)
        write_tar(tmp_path / "ones.tar", x, np.ones(40, np.uint8), prefix="o")
        land(lake, tmp_path / "ones.tar", "evaluation")
    with pytest.raises(ValueError, match=f"subset 'evaluation' cannot join the held-out test split: .*{says}"):
        make_split(lake, ["evaluation"])
