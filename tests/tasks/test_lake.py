"""The lake's layout, its fixed facts and its atomic writes."""

from __future__ import annotations

import pyarrow as pa
import pytest

from tasks.lake import LAKE_ENV, Lake, atomic_parquet_writer, lake_root, numpy_column, repeated


def test_lake_root_precedence(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert lake_root() == tmp_path / "lake"
    monkeypatch.setenv(LAKE_ENV, str(tmp_path / "env-lake"))
    assert lake_root() == tmp_path / "env-lake"
    assert lake_root(tmp_path / "explicit") == tmp_path / "explicit"


def test_channels_are_fixed_by_the_first_use(tmp_path):
    lake = Lake(tmp_path / "lake")
    assert lake.read_meta() is None
    assert lake.ensure_channels(3) == 3
    assert lake.ensure_channels(1) == 3
    assert lake.read_meta()["channels"] == 3


def test_a_failed_write_leaves_no_file(tmp_path):
    target = tmp_path / "out.parquet"
    schema = pa.schema([("x", pa.int32())])
    with pytest.raises(RuntimeError):
        with atomic_parquet_writer(target, schema) as writer:
            writer.write_table(pa.table({"x": [1, 2]}, schema=schema))
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_counts_are_the_images_the_labelled_and_the_rejects(tmp_path):
    from helpers import images
    from tasks.ingest import IngestOptions, ingest_shard
    from tasks.samples import write_png_folder, write_tar
    from tasks.shards import fingerprint

    lake = Lake(tmp_path / "lake")
    assert lake.counts() == {"images": 0, "labelled": 0, "rejects": 0}
    write_tar(tmp_path / "labelled.tar", *images(12, "counts-a"), prefix="a")
    folder = tmp_path / "unlabelled"
    write_png_folder(folder, images(5, "counts-b")[0], None, prefix="b")
    (folder / "broken.png").write_bytes(b"not a png")
    for shard in (tmp_path / "labelled.tar", folder):
        ingest_shard(fingerprint(shard), lake, IngestOptions(channels=1))
    assert lake.counts() == {"images": 17, "labelled": 12, "rejects": 1}


def test_repeated_and_numpy_columns_hold_what_pa_array_would():
    from datetime import datetime, timezone

    import numpy as np

    at = datetime(2026, 12, 1, 21, 30, 5, 123456, tzinfo=timezone.utc)
    stamp = pa.timestamp("us", tz="UTC")
    assert repeated("sn-a", pa.string(), 3).equals(pa.array(["sn-a"] * 3, pa.string()))
    assert repeated("", pa.string(), 2).equals(pa.array(["", ""], pa.string()))
    assert repeated(0.0431, pa.float32(), 2).equals(pa.array([0.0431] * 2, pa.float32()))
    assert repeated(at, stamp, 2).equals(pa.array([at, at], stamp))
    assert repeated("x", pa.string(), 0).equals(pa.array([], pa.string()))
    bools = np.array([True, False, True, True, False, False, False, True, True])  # more than a byte of bits
    assert numpy_column(bools, pa.bool_()).equals(pa.array(bools.tolist(), pa.bool_()))
    scores = np.array([0.25, 0.5, 1e-8], np.float32)
    assert numpy_column(scores, pa.float32()).equals(pa.array(scores.tolist(), pa.float32()))
    with pytest.raises(TypeError):
        repeated("2026-12-01", stamp, 1)


def test_columns_whose_every_value_is_its_own_are_written_without_a_dictionary(tmp_path):
    table = pa.table({"image_id": ["a", "b"], "shard_id": ["s", "s"], "pixels": [b"\x00" * 16, b"\x01" * 16]})
    with atomic_parquet_writer(tmp_path / "t.parquet", table.schema) as writer:
        writer.write_table(table)
    import pyarrow.parquet as pq

    group = pq.ParquetFile(tmp_path / "t.parquet").metadata.row_group(0)
    assert {group.column(i).path_in_schema: group.column(i).has_dictionary_page for i in range(3)} == {
        "image_id": False, "shard_id": True, "pixels": False}
    assert pq.read_table(tmp_path / "t.parquet").equals(table)
