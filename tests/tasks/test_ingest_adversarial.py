"""Hostile and careless input, one family at a time: every entry that does not land is a reject row with a reason,
every good entry of the same shard still lands, and memory is bounded by the entry, not by what a shard declares.

(The night that carries on past a poisoned inbox is tests/flows/test_nightly.py; the CLI's errors are
tests/screenline/test_cli.py.)
"""

from __future__ import annotations

import csv
import io
import os
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import images, lake_rows, png_bytes
from tasks.ingest import IngestOptions, ingest_shard
from tasks.lake import Lake
from tasks.samples import write_npz, write_png_folder, write_tar
from tasks.shards import (MAX_ENTRY_BYTES, NPZ_CHUNK_IMAGES, ShardNotFound, find_shards, fingerprint, inbox_shards,
                          read_entries)

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def land(path: Path, lake: Path, **options):
    return ingest_shard(fingerprint(path), Lake(lake), IngestOptions(**options))


def rejects(lake: Path) -> list[tuple[str | None, str, str]]:
    rows = lake_rows(lake, "rejects")
    return sorted(zip(rows.get("entry", []), rows.get("reason", []), rows.get("detail", [])),
                  key=lambda r: (r[0] or "", r[1]))


def reasons(lake: Path) -> dict[str | None, str]:
    return {entry: reason for entry, reason, _ in rejects(lake)}


def sources(lake: Path) -> list[str]:
    return sorted(lake_rows(lake).get("source", []))


@pytest.fixture
def good():
    """Three good 64×64 images and their labels."""
    return images(3, "adversarial-good", prevalence=0.5)


def folder(tmp_path: Path, good, extra: dict[str, bytes] = {}, labels_rows: list[list[str]] | None = None) -> Path:
    """A folder shard: the three good images (img-00000N.png, labelled), the extra files, extra labels.csv rows."""
    out = tmp_path / "site"
    write_png_folder(out, good[0], good[1])
    for name, data in extra.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    if labels_rows:
        with open(out / "labels.csv", "a", newline="") as fh:
            csv.writer(fh).writerows(labels_rows)
    return out


GOOD_PNGS = ["img-000000.png", "img-000001.png", "img-000002.png"]


# --- 1. nothing lost without a word --------------------------------------------------------------------------------


def test_a_file_named_twice_in_labels_csv_with_two_labels_is_refused_not_guessed(tmp_path, lake_dir, good):
    first_label = str(int(good[1][0]))
    land(folder(tmp_path, good, labels_rows=[["img-000000.png", str(1 - int(first_label))]]), lake_dir)
    ((entry, reason, detail),) = rejects(lake_dir)
    assert (entry, reason) == ("img-000000.png", "conflicting_labels")
    assert f"'{first_label}' (line 2)" in detail and "(line 5)" in detail and "fix the file" in detail
    assert sources(lake_dir) == GOOD_PNGS[1:]


def test_a_repeated_labels_row_that_agrees_lands_the_image_and_says_so(tmp_path, lake_dir, good):
    land(folder(tmp_path, good, labels_rows=[["img-000001.png", str(int(good[1][1]))]]), lake_dir)
    assert reasons(lake_dir) == {"labels.csv:5": "duplicate_label_row"}
    assert sources(lake_dir) == GOOD_PNGS


def test_hidden_files_fifos_and_unlistable_entries_are_reject_rows_not_silence(tmp_path, lake_dir, good):
    shard = folder(tmp_path, good, {".DS_Store": b"\0\0", ".cache/thumb.png": png_bytes(good[0][0])})
    os.mkfifo(shard / "scan.png")  # a FIFO named like an image: never opened (it would block)
    land(shard, lake_dir)
    assert reasons(lake_dir) == {".DS_Store": "unsupported_entry", ".cache": "unsupported_entry",
                                 "scan.png": "unsupported_entry"}
    assert "FIFO" in dict((e, d) for e, _, d in rejects(lake_dir))["scan.png"]
    assert sources(lake_dir) == GOOD_PNGS


def test_an_npz_array_under_a_key_the_layout_does_not_name_is_said_not_dropped(tmp_path, lake_dir, good):
    path = tmp_path / "plain.npz"
    np.savez(path, images=good[0], label=good[1])  # `label`, not `labels`
    land(path, lake_dir)
    ((entry, reason, detail),) = rejects(lake_dir)
    assert (entry, reason) == ("label", "unsupported_entry") and "reads images, labels" in detail
    assert lake_rows(lake_dir)["label"] == [None] * 3  # landed unlabelled, and the reject row says why


@pytest.mark.parametrize("second", ["s-0.png", "s-0.PNG", "s-0.jpg"])
def test_a_tar_sample_with_a_second_image_keeps_the_first_and_refuses_the_second(tmp_path, lake_dir, good, second):
    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as archive:
        for name, data in [("s-0.png", png_bytes(good[0][0])), (second, png_bytes(good[0][1])), ("s-0.cls", b"1"),
                           ("s-1.png", png_bytes(good[0][2]))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    land(path, lake_dir)
    assert reasons(lake_dir) == {second: "duplicate_entry"}
    rows = lake_rows(lake_dir)
    assert sorted(rows["source"]) == ["s-0.png", "s-1.png"]
    kept = np.frombuffer(rows["pixels"][rows["source"].index("s-0.png")], np.uint8).reshape(64, 64)
    assert np.array_equal(kept, good[0][0])  # the first one, not whichever came last


def test_a_folder_of_shards_with_a_readme_beside_them_ingests_the_shards(tmp_path, good):
    inbox = tmp_path / "delivery"
    write_tar(inbox / "a.tar", good[0], good[1])
    np.savez(inbox / "b.npz", images=images(2, "b")[0], labels=np.array([0, 1]))
    (inbox / "README.txt").write_text("shards from site A\n")
    assert [p.name for p in find_shards([str(inbox)])] == ["a.tar", "b.npz"]


def test_a_fifo_or_device_named_like_a_shard_is_not_a_shard(tmp_path, tar_shard):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    os.mkfifo(inbox / "night.npz")  # opening it would block the night
    path, _, _ = tar_shard
    (inbox / "real.tar").write_bytes(path.read_bytes())
    shards, ignored = inbox_shards(inbox)
    assert [p.name for p in shards] == ["real.tar"] and [p.name for p in ignored] == ["night.npz"]
    with pytest.raises(ShardNotFound, match="not a shard"):
        find_shards([str(inbox / "night.npz")])
    with pytest.raises(ShardNotFound, match="not a shard"):
        find_shards(["/dev/zero"])


# --- 2. a poison entry costs one reject row, never the shard -------------------------------------------------------


def lab_tiff() -> bytes:
    out = io.BytesIO()
    Image.new("LAB", (64, 64)).save(out, format="TIFF")
    return out.getvalue()


@pytest.mark.parametrize("name, payload, reason", [
    ("lab.png", lab_tiff(), "decode_error"),  # a TIFF under a .png name: only PNG and JPEG decoders ever run
    ("cmyk.jpg", None, None),  # a CMYK JPEG is a real JPEG: converted, lands
    ("huge.png", b"\x89PNG" + b"\0" * (MAX_ENTRY_BYTES + 1), "too_large"),
    ("zero.png", b"", "decode_error"),
])
def test_poison_images_are_reject_rows_and_the_rest_lands(tmp_path, lake_dir, good, name, payload, reason):
    if payload is None:
        out = io.BytesIO()
        Image.new("CMYK", (64, 64), (0, 0, 0, 40)).save(out, format="JPEG")
        payload = out.getvalue()
    land(folder(tmp_path, good, {name: payload}), lake_dir)
    assert reasons(lake_dir) == ({name: reason} if reason else {})
    assert sources(lake_dir) == sorted(GOOD_PNGS + ([] if reason else [name]))


def test_an_oversized_csv_field_refuses_the_labels_file_in_one_row(tmp_path, lake_dir, good):
    shard = folder(tmp_path, good)
    with open(shard / "labels.csv", "a") as fh:
        fh.write('img-000000.png,"' + "1" * 200_000 + '"\n')  # over the csv module's field limit
    summary = land(shard, lake_dir)
    assert summary.status == "refused" and reasons(lake_dir) == {None: "bad_labels_file"}
    assert "field larger than field limit" in rejects(lake_dir)[0][2]


def npy_header(shape: tuple[int, ...], dtype: str = "|u1") -> bytes:
    header = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


def test_an_npz_declaring_a_40_gb_array_is_refused_from_its_header(tmp_path, lake_dir):
    path = tmp_path / "liar.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("images.npy", npy_header((10_000_000, 64, 64)) + b"\0" * 4096)
    summary = land(path, lake_dir)
    assert summary.status == "refused" and reasons(lake_dir) == {None: "bad_npz"}
    assert "declares (10000000, 64, 64) uint8 (40,960,000,000 bytes) but holds 4,096" in rejects(lake_dir)[0][2]


def test_an_npz_of_many_images_is_read_in_chunks_never_whole(tmp_path, lake_dir, monkeypatch):
    import tasks.shards as shards

    n = NPZ_CHUNK_IMAGES * 2 + 7
    x = np.zeros((n, 64, 64), np.uint8)
    x[:, 0, 0], x[:, 0, 1] = np.arange(n) % 256, np.arange(n) // 256  # each image unique
    path = tmp_path / "many.npz"
    np.savez_compressed(path, images=x, labels=np.arange(n) % 2)
    reads = []
    real = shards._row_chunks

    def counted(archive, member, rows):
        for chunk in real(archive, member, rows):
            reads.append((member.key, len(chunk)))
            yield chunk

    monkeypatch.setattr(shards, "_row_chunks", counted)
    summary = land(path, lake_dir)
    assert summary.accepted == n
    assert reads == [("labels", n), ("images", NPZ_CHUNK_IMAGES), ("images", NPZ_CHUNK_IMAGES), ("images", 7)]


def test_a_gzip_bomb_member_of_a_tar_is_refused_unread(tmp_path, lake_dir, good):
    path = tmp_path / "bomb.tar.gz"
    with tarfile.open(path, "w:gz", format=tarfile.GNU_FORMAT) as archive:
        for i, image in enumerate(good[0]):
            data = png_bytes(image)
            info = tarfile.TarInfo(f"ok-{i}.png")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("bomb.png")
        info.size = MAX_ENTRY_BYTES * 4  # zeros: a gzip bomb, 128 MB from a few hundred KB
        archive.addfile(info, _Zeros(info.size))
    land(path, lake_dir)
    assert reasons(lake_dir) == {"bomb.png": "too_large"}
    assert sources(lake_dir) == ["ok-0.png", "ok-1.png", "ok-2.png"]


class _Zeros(io.RawIOBase):
    """`size` zero bytes, produced as they are read (the archive is written without holding them)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = b"\0" * n
        self.left -= n
        return n

    def readable(self) -> bool:
        return True


def test_names_that_are_not_utf8_are_reject_rows_with_the_bytes_escaped(tmp_path, lake_dir, good):
    shard = folder(tmp_path, good)
    with open(os.path.join(os.fsencode(shard), b"scan-\xff.png"), "wb") as fh:  # a Latin-1 name, as bytes
        fh.write(png_bytes(images(1, "latin")[0][0]))
    tar = tmp_path / "names.tar"
    with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as archive:
        for name, data in [("caf\xe9.png", png_bytes(images(1, "cafe")[0][0])), ("ok.png", png_bytes(good[0][0]))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    land(shard, lake_dir)
    land(tar, lake_dir)
    assert reasons(lake_dir) == {"scan-\\udcff.png": "bad_name", "caf\\udce9.png": "bad_name",
                                 "ok.png": "duplicate"}  # ok.png is img-000000.png's pixels: a duplicate across shards
    assert sources(lake_dir) == GOOD_PNGS


@pytest.mark.skipif(AS_ROOT, reason="root reads every file whatever its mode; run the suite as a user to check this")
def test_a_file_screenline_may_not_read_is_a_reject_row_and_an_unreadable_shard_one_row(tmp_path, lake_dir, good):
    shard = folder(tmp_path, good, {"locked.png": png_bytes(images(1, "locked")[0][0])})
    (shard / "locked.png").chmod(0)
    land(shard, lake_dir)
    assert reasons(lake_dir) == {"locked.png": "unreadable_entry"} and sources(lake_dir) == GOOD_PNGS
    tar = tmp_path / "locked.tar"
    write_tar(tar, *images(2, "locked-tar"))
    tar.chmod(0)
    assert land(tar, lake_dir).status == "refused"


def test_a_reader_that_fails_part_way_keeps_what_it_read_and_says_where_it_stopped(tmp_path, lake_dir, monkeypatch):
    import tasks.ingest as ingest

    x, y = images(5, "partway")
    path = tmp_path / "p.npz"
    write_npz(path, {"train": (x, y)})
    real = ingest.read_entries

    def breaks_after_three(ref):
        for i, item in enumerate(real(ref)):
            if i == 3:
                raise RuntimeError("a reader bug, or input nobody foresaw")
            yield item

    monkeypatch.setattr(ingest, "read_entries", breaks_after_three)
    summary = land(path, lake_dir)
    assert summary.accepted == 3 and reasons(lake_dir) == {None: "unreadable_shard"}
    assert "stopped after 3 entries: RuntimeError: a reader bug" in rejects(lake_dir)[0][2]


def test_every_entry_of_a_shard_is_landed_or_refused(tmp_path, good):
    """The mechanism behind the families above: a reader accounts for every entry it finds."""
    shard = folder(tmp_path, good, {"notes.txt": b"x", ".hidden": b"y", "sub/deep.png": png_bytes(good[0][0])},
                   labels_rows=[["ghost.png", "1"]])
    os.mkfifo(shard / "pipe")
    found = {getattr(item, "source", None) or getattr(item, "entry", None) for item in read_entries(fingerprint(shard))}
    on_disk = {p.relative_to(shard).as_posix() for p in shard.rglob("*")}
    assert found == on_disk - {"labels.csv", "sub"} | {"ghost.png"}  # ghost.png: listed, missing (a reject row)
