"""Pulling predictions out: Parquet or CSV, written whole, joined with where each image came from."""

from __future__ import annotations

import csv

import pyarrow.parquet as pq
import pytest

from helpers import images, register_model, screen_plain
from tasks.ingest import IngestOptions, ingest_shard
from tasks.lake import Lake
from tasks.results import ResultsQuery, write_results
from tasks.samples import write_tar
from tasks.shards import fingerprint


LABELS = images(20, "results", prevalence=0.5)[1]


@pytest.fixture
def screened(tmp_path) -> Lake:
    lake = Lake(tmp_path / "lake")
    write_tar(tmp_path / "s.tar", *images(20, "results", prevalence=0.5), prefix="r")
    ingest_shard(fingerprint(tmp_path / "s.tar"), lake, IngestOptions(channels=1))
    register_model(lake.root, "sn-results", seed=4, threshold=0.5)
    screen_plain(lake)
    return lake


def test_results_go_to_parquet_or_csv_whole_with_source_and_label(screened, tmp_path):
    n, path = write_results(str(screened.root), ResultsQuery(), str(tmp_path / "out" / "r.csv"))
    rows = list(csv.DictReader(open(path)))
    assert n == len(rows) == 20 and {r["model_version"] for r in rows} == {"sn-results"}
    assert len({r["source"] for r in rows}) == 20 and all(r["source"].startswith("r-") for r in rows)
    assert sum(int(r["label"]) for r in rows) == int(LABELS.sum())  # labels joined from the images file
    n2, parquet = write_results(str(screened.root), ResultsQuery(positives_only=True),
                                str(tmp_path / "out" / "p.parquet"))
    table = pq.read_table(parquet)
    assert n2 == table.num_rows == sum(r["positive"] == "true" for r in rows)
    assert set(table.column("positive").to_pylist()) == {True}  # some rows, every one positive
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p.parquet", "r.csv"]  # no temp file left


def test_results_refuse_an_unknown_suffix_and_write_nothing(screened, tmp_path):
    with pytest.raises(ValueError, match="must end in .parquet or .csv"):
        write_results(str(screened.root), ResultsQuery(), str(tmp_path / "r.txt"))
    assert not (tmp_path / "r.txt").exists()
