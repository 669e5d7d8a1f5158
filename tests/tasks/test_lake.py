"""The lake's layout, its fixed facts and its atomic writes."""

from __future__ import annotations

import pyarrow as pa
import pytest

from tasks.lake import LAKE_ENV, Lake, atomic_parquet_writer, lake_root


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
