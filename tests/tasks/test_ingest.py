"""Ingest without Prefect: every shard format lands, every kind of bad input becomes a reject row with a reason,
and the good entries of the same shard still land."""

from __future__ import annotations

import csv
import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import images, lake_rows, png_bomb, png_bytes
from tasks.ingest import IngestOptions, ShardSummary, ingest_shard, parse_label, Rejected
from tasks.lake import IMAGES_SCHEMA, REJECTS_SCHEMA, Lake
from tasks.samples import write_png_folder, write_tar
from tasks.shards import fingerprint


def land(path: Path, lake: Path, **options) -> ShardSummary:
    return ingest_shard(fingerprint(path), Lake(lake), IngestOptions(**options))


def rejects_by_entry(lake: Path) -> dict[str | None, str]:
    rows = lake_rows(lake, "rejects")
    return dict(zip(rows.get("entry", []), rows.get("reason", [])))


def pixels_of(rows: dict, source: str) -> np.ndarray:
    i = rows["source"].index(source)
    return np.frombuffer(rows["pixels"][i], np.uint8).reshape(rows["height"][i], rows["width"][i])


# --- each format ---------------------------------------------------------------------------------------------------


def test_png_folder_lands_with_labels_and_exact_pixels(png_shard, lake_dir):
    folder, imgs, labels = png_shard
    summary = land(folder, lake_dir)
    assert (summary.accepted, summary.rejected, summary.status) == (12, 0, "ingested")
    rows = lake_rows(lake_dir)
    assert pq.read_schema(next((lake_dir / "images").glob("*.parquet"))).remove_metadata() == IMAGES_SCHEMA
    assert rows["label"] == labels.tolist()
    assert np.array_equal(pixels_of(rows, "img-000003.png"), imgs[3])
    assert set(rows["channels"]) == {1} and not any(rows["resized"])
    assert len(set(rows["image_id"])) == 12


def test_npz_medmnist_layout_lands_every_split(npz_shard, lake_dir):
    path, imgs, labels = npz_shard
    summary = land(path, lake_dir)
    assert summary.accepted == 15
    rows = lake_rows(lake_dir)
    assert rows["source"][:2] == ["train/000000", "train/000001"]
    assert sum(s.startswith("test/") for s in rows["source"]) == 3
    assert np.array_equal(pixels_of(rows, "val/000001"), imgs[10])
    assert rows["label"] == labels.tolist()


def test_an_npz_test_split_lands_as_an_audit_subset_when_asked(npz_shard, lake_dir, tar_shard):
    path, _, labels = npz_shard
    land(path, lake_dir, subset=None, test_subset="official-test")
    land(tar_shard[0], lake_dir, test_subset="official-test")  # not an .npz: no test split of its own
    rows = lake_rows(lake_dir)
    subsets = dict(zip(rows["source"], rows["subset"]))
    assert {s for src, s in subsets.items() if src.startswith("test/")} == {"official-test"}
    assert {s for src, s in subsets.items() if not src.startswith("test/")} == {None}
    test_labels = [lab for src, lab in zip(rows["source"], rows["label"]) if src.startswith("test/")]
    assert test_labels == labels[12:].tolist()  # labelled: the audit counts them


def test_tar_webdataset_lands(tar_shard, lake_dir):
    path, imgs, labels = tar_shard
    assert land(path, lake_dir).accepted == 10
    rows = lake_rows(lake_dir)
    assert rows["source"][0] == "sample-000000.png"
    assert rows["label"] == labels.tolist()
    assert np.array_equal(pixels_of(rows, "sample-000009.png"), imgs[9])


def test_unlabelled_shard_has_null_labels_and_subset_is_recorded(tmp_path, lake_dir):
    imgs, _ = images(4, "unlabelled")
    write_png_folder(tmp_path / "inbox", imgs, None)
    land(tmp_path / "inbox", lake_dir, subset="holdout")
    rows = lake_rows(lake_dir)
    assert rows["label"] == [None] * 4
    assert rows["subset"] == ["holdout"] * 4


# --- bad input: a reject row with a reason, and the rest of the shard lands ----------------------------------------


@pytest.fixture
def folder_with(tmp_path):
    """A PNG folder of 3 good images plus the extra files given, labelled through labels.csv."""

    def make(extra: dict[str, bytes], labels: dict[str, str] | None = None) -> Path:
        imgs, _ = images(3, "good")
        folder = tmp_path / "bad-shard"
        names = write_png_folder(folder, imgs, np.array([0, 1, 0]))
        for name, data in extra.items():
            (folder / name).write_bytes(data)
        if labels:
            with open(folder / "labels.csv", "a", newline="") as fh:
                csv.writer(fh).writerows(labels.items())
        assert len(names) == 3
        return folder

    return make


def assert_rejected(lake: Path, entry: str, reason: str, good: int = 3) -> None:
    assert rejects_by_entry(lake).get(entry) == reason, rejects_by_entry(lake)
    assert len(lake_rows(lake)["source"]) == good


def test_undecodable_file(folder_with, lake_dir):
    land(folder_with({"junk.png": b"not an image at all"}), lake_dir)
    assert_rejected(lake_dir, "junk.png", "decode_error")


def test_truncated_png(folder_with, lake_dir):
    whole = png_bytes(images(1, "t")[0][0])
    land(folder_with({"cut.png": whole[: len(whole) // 2]}), lake_dir)
    assert_rejected(lake_dir, "cut.png", "truncated")


def test_wrong_size_refused_by_default_and_resized_on_request(folder_with, lake_dir, tmp_path):
    big = np.kron(images(1, "big")[0][0], np.ones((2, 2), np.uint8))
    folder = folder_with({"big.png": png_bytes(big)})
    land(folder, lake_dir)
    assert_rejected(lake_dir, "big.png", "wrong_size")
    other = tmp_path / "lake2"
    land(folder, other, resize=True)
    rows = lake_rows(other)
    i = rows["source"].index("big.png")
    assert rows["resized"][i] is True and rows["height"][i] == 64
    assert sum(rows["resized"]) == 1


def test_modes_are_normalised_to_the_lake_channels(folder_with, lake_dir, tmp_path):
    gray, other = images(2, "mode")[0]
    rgb = np.stack([gray, gray, gray], axis=-1)
    sixteen = other.astype(np.uint16) * 257
    folder = folder_with({"rgb.png": png_bytes(rgb), "deep.png": png_bytes(sixteen)})
    land(folder, lake_dir, channels=1)
    rows = lake_rows(lake_dir)
    assert np.array_equal(pixels_of(rows, "rgb.png"), gray)
    assert np.array_equal(pixels_of(rows, "deep.png"), other)
    three = tmp_path / "lake3"
    land(folder, three, channels=3)
    rows = lake_rows(three)
    assert set(rows["channels"]) == {3} and all(len(p) == 64 * 64 * 3 for p in rows["pixels"])


def test_bad_label_value(folder_with, lake_dir):
    extra = png_bytes(images(1, "lbl")[0][0])
    land(folder_with({"x.png": extra}, labels={"x.png": "2"}), lake_dir)
    assert_rejected(lake_dir, "x.png", "bad_label")


@pytest.mark.parametrize("raw,expected", [("1", 1), (" 0 ", 0), ("", None), (None, None), (1, 1), (np.uint8(0), 0)])
def test_parse_label_accepts_binary_and_empty(raw, expected):
    assert parse_label(raw) == expected


@pytest.mark.parametrize("raw", ["yes", "0.5", "-1", 3, "1,0"])
def test_parse_label_refuses_the_rest(raw):
    with pytest.raises(Rejected):
        parse_label(raw)


def test_duplicate_within_a_shard(folder_with, lake_dir):
    folder = folder_with({})
    shutil.copy(folder / "img-000001.png", folder / "z-copy.png")
    land(folder, lake_dir)
    assert_rejected(lake_dir, "z-copy.png", "duplicate")


def test_duplicate_across_shards_lands_once(tmp_path, lake_dir):
    imgs, labels = images(5, "shared")
    write_png_folder(tmp_path / "one", imgs[:3], labels[:3])
    write_tar(tmp_path / "two.tar", imgs[2:], labels[2:])
    land(tmp_path / "one", lake_dir)
    summary = land(tmp_path / "two.tar", lake_dir)
    assert (summary.accepted, summary.reasons) == (2, {"duplicate": 1})
    rows = lake_rows(lake_dir)
    assert len(rows["sha256"]) == len(set(rows["sha256"])) == 5


def test_empty_shard(tmp_path, lake_dir):
    (tmp_path / "empty").mkdir()
    summary = land(tmp_path / "empty", lake_dir)
    assert summary.accepted == 0
    assert rejects_by_entry(lake_dir) == {None: "empty_shard"}


def test_tar_with_unsafe_paths(tmp_path, lake_dir):
    imgs, labels = images(3, "tarsafe")
    path = tmp_path / "evil.tar"
    write_tar(path, imgs, labels)
    with tarfile.open(path, "a") as archive:
        for name in ("/etc/abs.png", "../escape.png", "a/../../up.png"):
            info = tarfile.TarInfo(name)
            data = png_bytes(imgs[0])
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    land(path, lake_dir)
    reasons = rejects_by_entry(lake_dir)
    assert [reasons[n] for n in ("/etc/abs.png", "../escape.png", "a/../../up.png")] == ["unsafe_path"] * 3
    assert len(lake_rows(lake_dir)["source"]) == 3


def test_decompression_bomb_is_refused_before_decoding(folder_with, lake_dir):
    land(folder_with({"bomb.png": png_bomb()}), lake_dir, resize=True)
    assert_rejected(lake_dir, "bomb.png", "decompression_bomb")


def test_npz_missing_labels_key(tmp_path, lake_dir):
    imgs, labels = images(6, "npzkeys")
    path = tmp_path / "partial.npz"
    np.savez(path, train_images=imgs[:3], train_labels=labels[:3, None], val_images=imgs[3:])
    summary = land(path, lake_dir)
    assert summary.accepted == 3
    assert rejects_by_entry(lake_dir) == {"val_images": "bad_npz"}


def test_npz_wrong_dtype_and_shape(tmp_path, lake_dir):
    imgs, labels = images(6, "npzdtype")
    path = tmp_path / "typed.npz"
    np.savez(path, train_images=imgs.astype(np.float32), train_labels=labels,
             val_images=imgs, val_labels=np.zeros((6, 14), np.uint8),
             test_images=imgs[:2], test_labels=labels[:2])
    land(path, lake_dir)
    rows = lake_rows(lake_dir, "rejects")
    details = dict(zip(rows["entry"], rows["detail"]))
    assert "dtype float32" in details["train_images"] and "one binary label" in details["val_images"]
    assert set(rows["reason"]) == {"bad_npz"}
    assert len(lake_rows(lake_dir)["source"]) == 2


@pytest.mark.parametrize("name", ["garbage.npz", "garbage.tar"])
def test_unreadable_shard_is_one_reject_row(tmp_path, lake_dir, name):
    path = tmp_path / name
    path.write_bytes(b"\x00\x01 definitely not an archive " * 10)
    summary = land(path, lake_dir)
    assert summary.status == "refused" and summary.error
    assert rejects_by_entry(lake_dir) == {None: "unreadable_shard"}
    assert lake_rows(lake_dir)["image_id"] == []  # an empty images file marks the shard as done
    assert land(path, lake_dir).status == "already_in_lake"


def test_folder_oddities_missing_file_and_non_image(folder_with, lake_dir):
    land(folder_with({"notes.txt": b"hello"}, labels={"ghost.png": "1"}), lake_dir)
    assert rejects_by_entry(lake_dir) == {"notes.txt": "unsupported_entry", "ghost.png": "missing_file"}


def test_broken_labels_file_refuses_the_shard(tmp_path, lake_dir):
    imgs, _ = images(2, "csv")
    write_png_folder(tmp_path / "s", imgs, None)
    (tmp_path / "s" / "labels.csv").write_text("name;value\nimg-000000.png;1\n")
    summary = land(tmp_path / "s", lake_dir)
    assert summary.status == "refused" and "filename" in summary.error


# --- idempotency and atomicity -------------------------------------------------------------------------------------


def test_reingest_same_bytes_any_path_writes_nothing(tar_shard, lake_dir, tmp_path):
    path, _, _ = tar_shard
    land(path, lake_dir)
    before = {p: p.stat().st_mtime_ns for p in lake_dir.rglob("*.parquet")}
    moved = tmp_path / "elsewhere" / "renamed.tar"
    moved.parent.mkdir()
    shutil.copy(path, moved)
    again = land(moved, lake_dir)
    assert again.status == "already_in_lake" and again.accepted == 10
    assert {p: p.stat().st_mtime_ns for p in lake_dir.rglob("*.parquet")} == before


def test_no_temp_files_are_left_and_rejects_have_their_schema(folder_with, lake_dir):
    land(folder_with({"junk.png": b"x"}), lake_dir)
    assert [p.name for p in lake_dir.rglob(".*") if p.name != ".lock"] == []
    reject_file = next((lake_dir / "rejects").glob("*.parquet"))
    assert pq.read_schema(reject_file).remove_metadata() == REJECTS_SCHEMA


# --- property: random bytes never crash ingest ---------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=4096), suffix=st.sampled_from([".npz", ".tar", ".png"]))
def test_random_bytes_as_a_shard_never_crash(tmp_path_factory, data, suffix):
    root = tmp_path_factory.mktemp("fuzz")
    if suffix == ".png":
        (root / "shard").mkdir()
        (root / "shard" / "x.png").write_bytes(data)
        path = root / "shard"
    else:
        path = root / f"shard{suffix}"
        path.write_bytes(data)
    summary = land(path, root / "lake")
    assert summary.accepted + summary.rejected >= 1
    assert land(path, root / "lake").status == "already_in_lake"


# --- re-delivery: what landing a shard again does ------------------------------------------------------------------


def current_rejects(lake: Path) -> dict[str | None, str]:
    return rejects_by_entry(lake)


def superseded(lake: Path) -> list[str]:
    return sorted(p.parent.parent.name for p in lake.glob("*/.superseded/*.parquet"))


def test_the_wrong_size_advice_works_resize_lands_the_shard_again(folder_with, lake_dir):
    big = np.kron(images(1, "big-again")[0][0], np.ones((2, 2), np.uint8))
    shard = folder_with({"big.png": png_bytes(big)})
    first = land(shard, lake_dir)
    assert current_rejects(lake_dir) == {"big.png": "wrong_size"} and "--resize" in lake_rows(lake_dir, "rejects")[
        "detail"][0]
    again = land(shard, lake_dir, resize=True)  # as the reject row advises
    assert again.status == "replaced" and again.replaced == [first.shard_id] and again.accepted == 4
    assert current_rejects(lake_dir) == {} and "big.png" in lake_rows(lake_dir)["source"]
    assert superseded(lake_dir) == ["images", "rejects"]  # the first landing, kept for the record
    assert land(shard, lake_dir, resize=True).status == "already_in_lake"  # and now idempotent again


def test_a_subset_given_after_the_fact_lands_the_shard_again_as_that_subset(tar_shard, lake_dir):
    path, _, _ = tar_shard
    land(path, lake_dir)
    ids = sorted(lake_rows(lake_dir)["image_id"])
    again = land(path, lake_dir, subset="holdout")
    rows = lake_rows(lake_dir)
    assert again.status == "replaced" and sorted(rows["image_id"]) == ids and set(rows["subset"]) == {"holdout"}


def test_a_corrected_labels_file_from_the_same_path_replaces_the_earlier_delivery(folder_with, lake_dir):
    shard = folder_with({})
    first = land(shard, lake_dir)
    (shard / "labels.csv").write_text("filename,label\nimg-000000.png,1\nimg-000001.png,1\nimg-000002.png,0\n")
    again = land(shard, lake_dir)  # new bytes: a new shard id, the same images
    rows = lake_rows(lake_dir)
    assert again.status == "replaced" and again.replaced == [first.shard_id] and again.shard_id != first.shard_id
    assert dict(zip(rows["source"], rows["label"])) == {"img-000000.png": 1, "img-000001.png": 1,
                                                        "img-000002.png": 0}
    assert current_rejects(lake_dir) == {}  # not "duplicate": the delivery it corrects is no longer in the lake
    assert set(rows["shard_id"]) == {again.shard_id}


def test_a_delivery_that_drops_images_replaces_nothing_unless_told_and_says_how(folder_with, lake_dir, tmp_path):
    shard = folder_with({})
    first = land(shard, lake_dir)
    (shard / "img-000002.png").unlink()
    (shard / "labels.csv").write_text("filename,label\nimg-000000.png,1\nimg-000001.png,1\n")
    partial = land(shard, lake_dir)
    rows = lake_rows(lake_dir, "rejects")
    assert partial.status == "ingested" and set(rows["reason"]) == {"duplicate"}
    assert all(f"--replace {first.shard_id}" in d for d in rows["detail"])  # the advice, with the shard to name
    told = land(shard, lake_dir, replace=(first.shard_id,))
    assert told.status == "replaced" and set(told.replaced) == {partial.shard_id, first.shard_id}
    assert sorted(lake_rows(lake_dir)["source"]) == ["img-000000.png", "img-000001.png"]  # the dropped one left


def test_a_new_night_under_an_old_name_is_a_new_shard_not_a_replacement(tmp_path, lake_dir):
    write_tar(tmp_path / "night.tar", *images(5, "monday"))
    monday = land(tmp_path / "night.tar", lake_dir)
    write_tar(tmp_path / "night.tar", *images(5, "tuesday"))  # the same path, other images
    tuesday = land(tmp_path / "night.tar", lake_dir)
    assert tuesday.status == "ingested" and not tuesday.replaced
    assert set(lake_rows(lake_dir)["shard_id"]) == {monday.shard_id, tuesday.shard_id}


def test_a_replacement_killed_before_it_lands_lands_whole_on_the_next_run(folder_with, lake_dir, monkeypatch):
    shard = folder_with({})
    land(shard, lake_dir)
    (shard / "labels.csv").write_text("filename,label\nimg-000000.png,1\nimg-000001.png,1\nimg-000002.png,1\n")
    real = Path.replace

    def killed(self, target):
        if Path(target).parent.name == "images" and not Path(target).parent.name.startswith("."):
            raise KeyboardInterrupt("kill -9")  # as if the process died between moving aside and landing
        return real(self, target)

    monkeypatch.setattr(Path, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        land(shard, lake_dir)
    monkeypatch.setattr(Path, "replace", real)
    assert lake_rows(lake_dir).get("image_id", []) == []  # the old landing is aside, the new one not in: nothing twice
    again = land(shard, lake_dir)
    assert again.accepted == 3 and set(lake_rows(lake_dir)["label"]) == {1}
