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
